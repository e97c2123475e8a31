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
//! `--listen` and `--upstream` may be repeated, in pairs: each listening
//! address forwards to its upstream, all served by the one thread (the load
//! generator sends its latency probes through a route of their own to a
//! sink of their own).
//!
//! ```text
//! udp-forward --listen 127.0.0.1:4000 --upstream 127.0.0.1:5000
//! ```
//!
//! It prints the addresses it listens on, one line each on standard
//! output in the order given, once bound (so `--listen 127.0.0.1:0` lets
//! the system choose a free port).
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
    /// Address clients send to (repeatable: one per route).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    /// Where the datagrams sent to the `--listen` of the same place go.
    #[arg(long, required = true)]
    upstream: Vec<SocketAddr>,
    /// Most clients served at once per route; datagrams from further
    /// addresses are dropped.
    #[arg(long, default_value_t = 4096)]
    max_clients: usize,
}

impl Cli {
    /// Each `--listen` with the `--upstream` given in the same place.
    fn routes(&self) -> anyhow::Result<Vec<(SocketAddr, SocketAddr)>> {
        anyhow::ensure!(
            self.listen.len() == self.upstream.len(),
            "{} --listen but {} --upstream: give them in pairs",
            self.listen.len(),
            self.upstream.len()
        );
        Ok(self
            .listen
            .iter()
            .copied()
            .zip(self.upstream.iter().copied())
            .collect())
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

/// Forwards from `listen` to `upstream` and back, for at most
/// `max_clients` client addresses, until a socket error on `listen`.
async fn serve(listen: UdpSocket, upstream: SocketAddr, max_clients: usize) -> anyhow::Result<()> {
    let listen = Arc::new(listen);
    let unspecified: SocketAddr = match upstream {
        SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
        SocketAddr::V6(_) => "[::]:0".parse()?,
    };
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; BUFFER];
    loop {
        let (n, from) = listen.recv_from(&mut buf).await?;
        let socket = match clients.get(&from) {
            Some(s) => s,
            None if clients.len() >= max_clients => continue,
            None => {
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
    let routes = cli.routes()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let mut serving = tokio::task::JoinSet::new();
        for (listen, upstream) in routes {
            let listen = udp_socket(listen)?;
            // The bound address, for whoever started us with port 0.
            println!("{}", listen.local_addr()?);
            serving.spawn(serve(listen, upstream, cli.max_clients));
        }
        // The first route to fail ends the forwarder.
        match serving.join_next().await {
            Some(result) => result?,
            None => Ok(()),
        }
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

    #[test]
    fn listen_and_upstream_come_in_pairs() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from([&["udp-forward"], args].concat())
                .unwrap()
                .routes()
        };
        let routes = parse(&[
            "--listen",
            "127.0.0.1:1",
            "--upstream",
            "127.0.0.1:2",
            "--listen",
            "127.0.0.1:3",
            "--upstream",
            "127.0.0.1:4",
        ])
        .unwrap();
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(routes, [(addr(1), addr(2)), (addr(3), addr(4))]);
        let uneven = parse(&[
            "--listen",
            "127.0.0.1:1",
            "--listen",
            "127.0.0.1:3",
            "--upstream",
            "127.0.0.1:2",
        ]);
        assert!(uneven.unwrap_err().to_string().contains("in pairs"));
    }

    #[tokio::test]
    async fn each_client_gets_its_own_path_upstream_and_replies_come_back() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let server = UdpSocket::bind(any).await.unwrap();
        let listen = udp_socket(any).unwrap();
        let listen_addr = listen.local_addr().unwrap();
        tokio::spawn(serve(listen, server.local_addr().unwrap(), 2));
        let clients = [
            UdpSocket::bind(any).await.unwrap(),
            UdpSocket::bind(any).await.unwrap(),
            UdpSocket::bind(any).await.unwrap(),
        ];
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
        // A third client is over the limit: dropped, the others still served.
        clients[2].send_to(b"over", listen_addr).await.unwrap();
        clients[0].send_to(b"again", listen_addr).await.unwrap();
        assert_eq!(recv(&server).await, (b"again".to_vec(), seen_from[0]));
    }
}
