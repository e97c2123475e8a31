//! QUIC transport settings shared by every node.
//!
//! Media rides in QUIC datagrams. QUIC applies congestion control to
//! datagrams too, and a loss-based controller (quinn's default is Cubic)
//! shrinks its window on every random loss: on a 3G path losing a few
//! percent it would throttle a voice stream the path can carry. A relay is
//! a forwarder, like a TURN server: the media's own rate control (the
//! application's, end to end) decides the rate, and relays must not add a
//! second, loss-driven one. Relay connections therefore use a fixed window
//! large enough never to bind ([`FixedWindow`]); the reliable control
//! streams on them carry little.

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::congestion::{Controller, ControllerFactory};

/// Congestion "control" that never limits: a fixed window.
#[derive(Debug, Clone)]
pub struct FixedWindow {
    window: u64,
}

impl Controller for FixedWindow {
    fn on_congestion_event(
        &mut self,
        _now: Instant,
        _sent: Instant,
        _persistent: bool,
        _lost_bytes: u64,
    ) {
    }

    fn on_mtu_update(&mut self, _new_mtu: u16) {}

    fn window(&self) -> u64 {
        self.window
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(self.clone())
    }

    fn initial_window(&self) -> u64 {
        self.window
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// Builds [`FixedWindow`] controllers.
#[derive(Debug, Clone)]
pub struct FixedWindowFactory {
    /// Window in bytes.
    pub window: u64,
}

impl ControllerFactory for FixedWindowFactory {
    fn build(self: Arc<Self>, _now: Instant, _mtu: u16) -> Box<dyn Controller> {
        Box::new(FixedWindow {
            window: self.window,
        })
    }
}

/// Transport for media-carrying connections (relay to relay, relay to
/// client): keep-alives, a short idle timeout so dead peers are noticed,
/// datagram buffers for bursts, and the fixed window above.
pub fn media_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(Duration::from_secs(5).try_into().expect("5 s fits")));
    t.datagram_receive_buffer_size(Some(4 * 1024 * 1024));
    t.datagram_send_buffer_size(4 * 1024 * 1024);
    t.congestion_controller_factory(Arc::new(FixedWindowFactory {
        window: 64 * 1024 * 1024,
    }));
    // Datagrams are never retransmitted, so prompt ACKs buy little; asking
    // the peer (QUIC ACK-frequency extension) to acknowledge every 16th
    // packet or every 20 ms saves an ACK packet for every second media
    // packet in each direction. A longer delay would not help connections
    // that carry a datagram less often than that: quinn never requests more
    // than max(RTT, 25 ms), so on a short path each of their datagrams
    // still gets an ACK packet of its own.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(16))
        .max_ack_delay(Some(Duration::from_millis(20)));
    t.ack_frequency_config(Some(ack));
    t
}

/// UDP socket buffer size asked for by default. A relay's one socket
/// carries every client's and peer's packets; the kernel's default (about
/// 200 KB, a few hundred small datagrams) overflows whenever the relay's
/// thread is descheduled for a millisecond or two at tens of thousands of
/// datagrams per second, and the kernel then drops packets before QUIC sees
/// them. 8 MiB holds several hundred milliseconds of such a burst.
pub const DEFAULT_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

/// What the kernel granted for a socket's buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// Bytes asked for, each direction.
    pub requested: usize,
    /// Receive buffer granted, bytes.
    pub recv: usize,
    /// Send buffer granted, bytes.
    pub send: usize,
}

impl SocketBuffers {
    /// Whether the kernel capped either buffer below the request (on Linux
    /// at `net.core.rmem_max` / `net.core.wmem_max`).
    pub fn capped(&self) -> bool {
        self.recv < self.requested || self.send < self.requested
    }
}

/// Binds a UDP socket for a QUIC endpoint with `buffer` bytes of receive
/// and send buffer, as far as the kernel allows. Being capped is not an
/// error (the caller should say so: see [`SocketBuffers::capped`]).
pub fn bind_udp(
    addr: SocketAddr,
    buffer: usize,
) -> std::io::Result<(std::net::UdpSocket, SocketBuffers)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_recv_buffer_size(buffer)?;
    socket.set_send_buffer_size(buffer)?;
    socket.bind(&addr.into())?;
    // Linux reports twice the granted size (the doubling covers its own
    // bookkeeping); other systems report what they granted.
    let granted = |reported: usize| {
        if cfg!(target_os = "linux") {
            reported / 2
        } else {
            reported
        }
    };
    let buffers = SocketBuffers {
        requested: buffer,
        recv: granted(socket.recv_buffer_size()?),
        send: granted(socket.send_buffer_size()?),
    };
    Ok((socket.into(), buffers))
}

/// Transport for control connections (Raft, operator tools): standard
/// congestion control.
pub fn control_transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(300)));
    t.max_idle_timeout(Some(
        Duration::from_millis(2500).try_into().expect("2.5 s fits"),
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_socket_reports_its_buffers() {
        let (socket, buffers) = bind_udp("127.0.0.1:0".parse().unwrap(), 256 * 1024).unwrap();
        assert_ne!(socket.local_addr().unwrap().port(), 0);
        assert_eq!(buffers.requested, 256 * 1024);
        // Granted, or capped by the system's maximum: never zero.
        assert!(buffers.recv > 0 && buffers.send > 0, "{buffers:?}");
        assert_eq!(
            buffers.capped(),
            buffers.recv < 256 * 1024 || buffers.send < 256 * 1024
        );
    }

    #[test]
    fn a_request_above_the_system_maximum_is_capped_not_refused() {
        // 1 GiB is above any default net.core.rmem_max.
        let (_socket, buffers) = bind_udp("127.0.0.1:0".parse().unwrap(), 1 << 30).unwrap();
        assert!(buffers.capped(), "{buffers:?}");
    }
}
