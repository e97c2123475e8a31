//! `udp-forward`: a plain UDP forwarder, the baseline `relay-loadgen
//! --baseline` measures relayd against.
//!
//! It relays datagrams as they are, the way a TURN server such as coturn
//! relays without encryption of its own: each client address that sends to
//! `--listen` gets a socket of its own towards `--upstream`, and replies on
//! that socket go back to the client from `--listen`. One `recvfrom` and
//! one `sendto` per datagram, no decryption, no batching: the least work a
//! relay process can do per datagram on this host, so its latency and CPU
//! figures are the floor for any relay on the same CPU.
//!
//! `--client-upstream CLIENT=UPSTREAM` sends one client's datagrams
//! elsewhere, through the same listening socket as everyone's (the load
//! generator's latency probes reach a sink of their own that way, queued
//! with the load as a TURN server's clients are).
//!
//! ```text
//! udp-forward --listen 127.0.0.1:4000 --upstream 127.0.0.1:5000
//! ```
//!
//! It prints the address it listens on, one line on standard output, once
//! bound (so `--listen 127.0.0.1:0` lets the system choose a free port).
#![allow(clippy::disallowed_methods)] // a benchmark tool

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use clap::Parser;
use relay_net::quic::{DEFAULT_SOCKET_BUFFER, bind_udp};
use tokio::net::UdpSocket;

#[derive(Parser)]
#[command(about = "Plain UDP forwarder: the baseline for relay-loadgen --baseline")]
struct Cli {
    /// Address clients send to.
    #[arg(long)]
    listen: SocketAddr,
    /// Where their datagrams go.
    #[arg(long)]
    upstream: SocketAddr,
    /// `CLIENT=UPSTREAM`: the datagrams of the client at CLIENT go to
    /// UPSTREAM instead (repeatable).
    #[arg(long, value_parser = parse_client_upstream)]
    client_upstream: Vec<(SocketAddr, SocketAddr)>,
    /// Most clients served at once; datagrams from further addresses are
    /// dropped.
    #[arg(long, default_value_t = 4096)]
    max_clients: usize,
}

fn parse_client_upstream(arg: &str) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let (client, upstream) = arg
        .split_once('=')
        .ok_or_else(|| anyhow::anyhow!("expected CLIENT=UPSTREAM, got {arg:?}"))?;
    Ok((client.parse()?, upstream.parse()?))
}

/// Where each client's datagrams go.
#[derive(Debug, Clone)]
struct Upstreams {
    default: SocketAddr,
    by_client: HashMap<SocketAddr, SocketAddr>,
}

impl Upstreams {
    fn of(&self, client: SocketAddr) -> SocketAddr {
        self.by_client.get(&client).copied().unwrap_or(self.default)
    }
}

/// Large enough for any UDP datagram.
const BUFFER: usize = 65_536;

fn udp_socket(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    // The same socket buffers as relayd's, so that neither side of the
    // comparison drops for want of buffer space.
    let (socket, _) = bind_udp(addr, DEFAULT_SOCKET_BUFFER)?;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket)?)
}

/// Replies from upstream on `socket` go back to `client` from `listen`.
async fn reply_loop(socket: Arc<UdpSocket>, listen: Arc<UdpSocket>, client: SocketAddr) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) => {
                let _ = listen.send_to(&buf[..n], client).await;
            }
            // An ICMP error from upstream (not listening yet) surfaces as
            // one failed receive; the next datagram may get through.
            Err(_) => continue,
        }
    }
}

/// Forwards from `listen` to each client's upstream and back, for at most
/// `max_clients` client addresses, until a socket error on `listen`.
async fn serve(listen: UdpSocket, upstreams: Upstreams, max_clients: usize) -> anyhow::Result<()> {
    let listen = Arc::new(listen);
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; BUFFER];
    loop {
        let (n, from) = listen.recv_from(&mut buf).await?;
        let socket = match clients.get(&from) {
            Some(s) => s,
            None if clients.len() >= max_clients => continue,
            None => {
                let upstream = upstreams.of(from);
                let unspecified: SocketAddr = match upstream {
                    SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
                    SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
                };
                let socket = Arc::new(udp_socket(unspecified)?);
                socket.connect(upstream).await?;
                tokio::spawn(reply_loop(socket.clone(), listen.clone(), from));
                clients.entry(from).or_insert(socket)
            }
        };
        let _ = socket.send(&buf[..n]).await;
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let listen = udp_socket(cli.listen)?;
        // The bound address, for whoever started us with port 0.
        println!("{}", listen.local_addr()?);
        let upstreams = Upstreams {
            default: cli.upstream,
            by_client: cli.client_upstream.into_iter().collect(),
        };
        serve(listen, upstreams, cli.max_clients).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn recv(socket: &UdpSocket) -> (Vec<u8>, SocketAddr) {
        let mut buf = [0u8; 64];
        let (n, from) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .expect("a datagram within 5 s")
            .unwrap();
        (buf[..n].to_vec(), from)
    }

    #[tokio::test]
    async fn each_client_gets_its_own_path_upstream_and_replies_come_back() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = UdpSocket::bind(any).await.unwrap();
        let listen = udp_socket(any).unwrap();
        let listen_addr = listen.local_addr().unwrap();
        let clients = [
            UdpSocket::bind(any).await.unwrap(),
            UdpSocket::bind(any).await.unwrap(),
            UdpSocket::bind(any).await.unwrap(),
        ];
        // One client of its own goes to a server of its own.
        let own_server = UdpSocket::bind(any).await.unwrap();
        let own_client = UdpSocket::bind(any).await.unwrap();
        let upstreams = Upstreams {
            default: server.local_addr().unwrap(),
            by_client: [(
                own_client.local_addr().unwrap(),
                own_server.local_addr().unwrap(),
            )]
            .into(),
        };
        tokio::spawn(serve(listen, upstreams, 3));
        own_client.send_to(b"mine", listen_addr).await.unwrap();
        let (data, from) = recv(&own_server).await;
        assert_eq!(data, b"mine");
        own_server.send_to(b"yours", from).await.unwrap();
        assert_eq!(recv(&own_client).await, (b"yours".to_vec(), listen_addr));
        let mut seen_from = Vec::new();
        for (i, c) in clients[..2].iter().enumerate() {
            c.send_to(&[i as u8; 3], listen_addr).await.unwrap();
            let (data, from) = recv(&server).await;
            assert_eq!(data, [i as u8; 3]);
            seen_from.push(from);
            // The server answers the address it saw; the client hears it
            // from the forwarder's address.
            server.send_to(b"reply", from).await.unwrap();
            assert_eq!(recv(c).await, (b"reply".to_vec(), listen_addr));
        }
        assert_ne!(seen_from[0], seen_from[1], "a socket upstream per client");
        // A fourth client is over the limit: dropped, the others still served.
        clients[2].send_to(b"over", listen_addr).await.unwrap();
        clients[0].send_to(b"again", listen_addr).await.unwrap();
        assert_eq!(recv(&server).await, (b"again".to_vec(), seen_from[0]));
    }

    #[test]
    fn a_client_upstream_is_two_addresses() {
        let parse = |client_upstream: &str| {
            Cli::try_parse_from([
                "udp-forward",
                "--listen",
                "127.0.0.1:1",
                "--upstream",
                "127.0.0.1:2",
                "--client-upstream",
                client_upstream,
            ])
        };
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let cli = parse("127.0.0.1:3=127.0.0.1:4").unwrap();
        assert_eq!(cli.client_upstream, [(addr(3), addr(4))]);
        for bad in ["127.0.0.1:3", "127.0.0.1:3=nowhere"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
