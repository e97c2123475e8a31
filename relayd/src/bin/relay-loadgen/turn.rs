//! Just enough of a TURN client (RFC 8656, over UDP, no authentication)
//! to carry one QUIC connection through a TURN server such as coturn: an
//! allocation, one channel bound to the peer, and a quinn socket that
//! wraps each packet it sends in ChannelData and unwraps what it receives.
//! The messages are encoded and decoded by `stun_codec`; ChannelData is a
//! 4-byte header (channel number, length), written here.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytecodec::{DecodeExt, EncodeExt};
use quinn::udp::{RecvMeta, Transmit};
use relay_net::quic::{DEFAULT_SOCKET_BUFFER, bind_udp};
use stun_codec::rfc5766::attributes::{
    ChannelNumber, Lifetime, RequestedTransport, XorPeerAddress, XorRelayAddress,
};
use stun_codec::rfc5766::methods::{ALLOCATE, CHANNEL_BIND, REFRESH};
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, Method, TransactionId};
use tokio::net::UdpSocket;

/// IANA protocol number of UDP, for REQUESTED-TRANSPORT.
const UDP: u8 = 17;
/// The one channel each socket binds (the first of the range).
const CHANNEL: u16 = ChannelNumber::MIN;
/// Length of the ChannelData header.
const HEADER: usize = 4;
/// Allocations, permissions and channels expire (coturn: 10, 5 and 10
/// minutes); a long sweep outlives them, so they are refreshed this often.
const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// A UDP socket whose packets go through a TURN server's channel to one
/// peer: quinn sees the peer's address, the wire sees ChannelData to and
/// from the server.
pub(crate) struct TurnSocket {
    socket: UdpSocket,
    server: SocketAddr,
    peer: SocketAddr,
    /// The address the server relays from (what the peer sees).
    relayed: SocketAddr,
}

impl fmt::Debug for TurnSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TurnSocket")
            .field("server", &self.server)
            .field("peer", &self.peer)
            .field("relayed", &self.relayed)
            .finish()
    }
}

impl TurnSocket {
    /// Allocates a relayed address on `server` and binds a channel to
    /// `peer`; retries while the server starts (up to `patience`). Keeps
    /// the allocation and the channel refreshed while the socket lives.
    pub(crate) async fn connect(
        server: SocketAddr,
        peer: SocketAddr,
        patience: Duration,
    ) -> anyhow::Result<Arc<TurnSocket>> {
        let (socket, _) = bind_udp("127.0.0.1:0".parse()?, DEFAULT_SOCKET_BUFFER)?;
        socket.set_nonblocking(true)?;
        let socket = UdpSocket::from_std(socket)?;
        let allocate = request(ALLOCATE, |m| {
            m.add_attribute(RequestedTransport::new(UDP));
        });
        let response = transact(&socket, server, &allocate, patience)
            .await
            .context("TURN Allocate")?;
        let relayed = response
            .get_attribute::<XorRelayAddress>()
            .context("TURN Allocate: no XOR-RELAYED-ADDRESS in the answer")?
            .address();
        let bind = channel_bind(peer);
        transact(&socket, server, &bind, patience)
            .await
            .context("TURN ChannelBind")?;
        let turn = Arc::new(TurnSocket {
            socket,
            server,
            peer,
            relayed,
        });
        tokio::spawn(keep_alive(Arc::downgrade(&turn), REFRESH_EVERY));
        Ok(turn)
    }

    /// The server's relayed address for this socket.
    #[cfg(test)]
    fn relayed(&self) -> SocketAddr {
        self.relayed
    }
}

/// Refreshes the allocation and the channel (which also refreshes the
/// permission) until the socket is dropped. The answers arrive on the
/// socket quinn reads, which drops them: loopback does not lose requests.
async fn keep_alive(turn: Weak<TurnSocket>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(turn) = turn.upgrade() else { return };
        let refresh = request(REFRESH, |m| {
            m.add_attribute(Lifetime::from_u32(600));
        });
        // `try_send_to` registers no waker: an awaited send could take the
        // socket's one write waker from quinn's poller.
        for message in [refresh, channel_bind(turn.peer)] {
            let _ = turn.socket.try_send_to(&message, turn.server);
        }
    }
}

type Attribute = stun_codec::rfc5766::Attribute;

/// An encoded request of `method` with a fresh transaction id.
fn request(method: Method, attributes: impl FnOnce(&mut Message<Attribute>)) -> Vec<u8> {
    let mut message = Message::new(MessageClass::Request, method, transaction_id());
    attributes(&mut message);
    MessageEncoder::new()
        .encode_into_bytes(message)
        .expect("a request of known attributes encodes")
}

fn channel_bind(peer: SocketAddr) -> Vec<u8> {
    request(CHANNEL_BIND, |m| {
        m.add_attribute(ChannelNumber::new(CHANNEL).expect("in the channel range"));
        m.add_attribute(XorPeerAddress::new(peer));
    })
}

/// Unique in this process, and unlike other processes' (RFC 8489 asks
/// for randomness against off-path attackers; this runs on loopback).
fn transaction_id() -> TransactionId {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut id = [0u8; 12];
    id[..4].copy_from_slice(&std::process::id().to_be_bytes());
    id[4..].copy_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    TransactionId::new(id)
}

/// Sends `request` to `server` until a response with its transaction id
/// arrives (every 250 ms, for up to `patience`); an error response is an
/// error.
async fn transact(
    socket: &UdpSocket,
    server: SocketAddr,
    request: &[u8],
    patience: Duration,
) -> anyhow::Result<Message<Attribute>> {
    let id = &request[8..20];
    let deadline = tokio::time::Instant::now() + patience;
    let mut buf = vec![0u8; 2048];
    while tokio::time::Instant::now() < deadline {
        socket.send_to(request, server).await?;
        let wait = tokio::time::sleep(Duration::from_millis(250));
        tokio::pin!(wait);
        loop {
            let (n, from) = tokio::select! {
                received = socket.recv_from(&mut buf) => received?,
                () = &mut wait => break,
            };
            if from != server || buf.get(8..20) != Some(id) {
                continue;
            }
            let answer = &buf[..n];
            let Ok(Ok(message)) = MessageDecoder::<Attribute>::new().decode_from_bytes(answer)
            else {
                bail!("undecodable answer from {server}");
            };
            return match message.class() {
                MessageClass::SuccessResponse => Ok(message),
                class => bail!("{server} answered {class:?}: {}", error_code(answer)),
            };
        }
    }
    bail!("no answer from {server} in {patience:?}")
}

/// The ERROR-CODE of an error response, as "code reason".
fn error_code(answer: &[u8]) -> String {
    use stun_codec::rfc5389::{Attribute, attributes::ErrorCode};
    MessageDecoder::<Attribute>::new()
        .decode_from_bytes(answer)
        .ok()
        .and_then(|m| m.ok())
        .and_then(|m| {
            m.get_attribute::<ErrorCode>()
                .map(|e| format!("{} {}", e.code(), e.reason_phrase()))
        })
        .unwrap_or_else(|| "no error code".into())
}

/// The payload length of a ChannelData message on `channel`, if `packet`
/// is one (over UDP it may carry padding after the payload).
fn channel_data(packet: &[u8], channel: u16) -> Option<usize> {
    let header = packet.get(..HEADER)?;
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    (u16::from_be_bytes([header[0], header[1]]) == channel && packet.len() >= HEADER + len)
        .then_some(len)
}

impl quinn::AsyncUdpSocket for TurnSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable(self))
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // One datagram per transmit: `max_transmit_segments` is 1, as each
        // needs a header of its own.
        let len = u16::try_from(transmit.contents.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "datagram too long"))?;
        let mut packet = Vec::with_capacity(HEADER + transmit.contents.len());
        packet.extend_from_slice(&CHANNEL.to_be_bytes());
        packet.extend_from_slice(&len.to_be_bytes());
        packet.extend_from_slice(transmit.contents);
        self.socket.try_send_to(&packet, self.server).map(drop)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(meta)) = (bufs.first_mut(), meta.first_mut()) else {
            return Poll::Ready(Ok(0));
        };
        loop {
            let mut read = tokio::io::ReadBuf::new(buf);
            let from = ready!(self.socket.poll_recv_from(cx, &mut read))?;
            let n = read.filled().len();
            // Anything else (answers to refreshes, strays) is dropped.
            let Some(len) = channel_data(&buf[..n], CHANNEL).filter(|_| from == self.server) else {
                continue;
            };
            buf.copy_within(HEADER..HEADER + len, 0);
            *meta = RecvMeta {
                addr: self.peer,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            return Poll::Ready(Ok(1));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

/// Write readiness of a [`TurnSocket`]. Tokio keeps one waker for it, so
/// the socket serves one connection (whose driver is the only sender).
#[derive(Debug)]
struct Writable(Arc<TurnSocket>);

impl quinn::UdpPoller for Writable {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.socket.poll_send_ready(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn channel_data_is_recognised_by_channel_and_length() {
        let packet = [0x40, 0x00, 0x00, 0x03, 1, 2, 3, 0];
        assert_eq!(channel_data(&packet, CHANNEL), Some(3));
        assert_eq!(channel_data(&packet, CHANNEL + 1), None);
        // Shorter than its length says, or not even a header.
        assert_eq!(channel_data(&packet[..6], CHANNEL), None);
        assert_eq!(channel_data(&packet[..3], CHANNEL), None);
    }

    /// A TURN server of the least kind, for one client: answers Allocate
    /// and ChannelBind (or refuses Allocate with 486 when `refuse`), then
    /// relays ChannelData on the bound channel to the peer and the peer's
    /// datagrams back, from a relay socket of its own.
    /// Returns its address and the methods of the requests it got.
    pub(crate) async fn tiny_turn_server(refuse: bool) -> (SocketAddr, Arc<Mutex<Vec<Method>>>) {
        use stun_codec::rfc5389::attributes::ErrorCode;
        let listen = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let relay = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = listen.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        tokio::spawn(async move {
            let (mut client, mut peer) = (None, None);
            let (mut a, mut b) = (vec![0u8; 2048], vec![0u8; 2048]);
            loop {
                tokio::select! {
                    Ok((n, from)) = listen.recv_from(&mut a) => {
                        client = Some(from);
                        if let Some(len) = channel_data(&a[..n], CHANNEL) {
                            relay.send_to(&a[HEADER..HEADER + len], peer.unwrap()).await.unwrap();
                            continue;
                        }
                        let m = MessageDecoder::<Attribute>::new().decode_from_bytes(&a[..n]).unwrap().unwrap();
                        log.lock().unwrap().push(m.method());
                        if let Some(p) = m.get_attribute::<XorPeerAddress>() {
                            peer = Some(p.address());
                        }
                        let answer = if refuse {
                            let mut r = Message::<stun_codec::rfc5389::Attribute>::new(
                                MessageClass::ErrorResponse, m.method(), m.transaction_id());
                            r.add_attribute(ErrorCode::new(486, "Allocation Quota Reached".into()).unwrap());
                            MessageEncoder::new().encode_into_bytes(r).unwrap()
                        } else {
                            let mut r = Message::<Attribute>::new(
                                MessageClass::SuccessResponse, m.method(), m.transaction_id());
                            if m.method() == ALLOCATE {
                                r.add_attribute(XorRelayAddress::new(relay.local_addr().unwrap()));
                            }
                            MessageEncoder::new().encode_into_bytes(r).unwrap()
                        };
                        listen.send_to(&answer, from).await.unwrap();
                    }
                    Ok((n, _)) = relay.recv_from(&mut b) => {
                        let mut packet = CHANNEL.to_be_bytes().to_vec();
                        packet.extend_from_slice(&(n as u16).to_be_bytes());
                        packet.extend_from_slice(&b[..n]);
                        listen.send_to(&packet, client.unwrap()).await.unwrap();
                    }
                }
            }
        });
        (addr, requests)
    }

    #[tokio::test]
    async fn datagrams_cross_the_channel_both_ways() {
        let (server, _) = tiny_turn_server(false).await;
        let sink = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let peer = sink.local_addr().unwrap();
        let turn = TurnSocket::connect(server, peer, Duration::from_secs(2))
            .await
            .unwrap();
        // Datagrams sent through the socket reach the peer from the
        // relayed address, unwrapped; the peer's answers come back with
        // the peer's address.
        let transmit = Transmit {
            destination: peer,
            ecn: None,
            contents: b"hello",
            segment_size: None,
            src_ip: None,
        };
        quinn::AsyncUdpSocket::try_send(&*turn, &transmit).unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = sink.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"hello"[..], turn.relayed()));
        sink.send_to(b"world", from).await.unwrap();
        let mut storage = [0u8; 64];
        let mut meta = [RecvMeta::default()];
        let got = std::future::poll_fn(|cx| {
            let mut bufs = [IoSliceMut::new(&mut storage)];
            quinn::AsyncUdpSocket::poll_recv(&*turn, cx, &mut bufs, &mut meta)
        })
        .await
        .unwrap();
        assert_eq!((got, meta[0].addr, meta[0].len), (1, peer, 5));
        assert_eq!(&storage[..5], b"world");
    }

    #[tokio::test]
    async fn the_allocation_and_channel_are_refreshed_while_the_socket_lives() {
        let (server, requests) = tiny_turn_server(false).await;
        let turn = TurnSocket::connect(server, server, Duration::from_secs(2))
            .await
            .unwrap();
        let refresher = tokio::spawn(keep_alive(Arc::downgrade(&turn), Duration::from_millis(20)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = requests.lock().unwrap().clone();
        assert_eq!(seen[..2], [ALLOCATE, CHANNEL_BIND]);
        assert!(
            seen[2..].contains(&REFRESH) && seen[2..].contains(&CHANNEL_BIND),
            "{seen:?}"
        );
        drop(turn);
        tokio::time::timeout(Duration::from_secs(1), refresher)
            .await
            .expect("the refresher ends with its socket")
            .unwrap();
    }

    #[tokio::test]
    async fn a_refusal_is_reported_with_its_code() {
        let (server, _) = tiny_turn_server(true).await;
        let err = TurnSocket::connect(server, server, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("486"), "{err:#}");
    }

    #[tokio::test]
    async fn a_silent_server_is_an_error_after_the_patience() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let err = TurnSocket::connect(addr, addr, Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("no answer"), "{err:#}");
    }
}
