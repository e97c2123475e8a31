//! Node-to-node transport: QUIC with mutual TLS under the cluster CA.
//!
//! Each node keeps one outgoing connection per peer and writes frames on a
//! unidirectional stream: `u32` length, then a kind byte and the payload.
//! Kind 0 is a Raft message (protobuf), kind 1 a relay report forwarded to
//! the leader. Incoming frames are decoded only from peers whose
//! certificate names them `cp-<id>`, only up to [`MAX_RAFT_FRAME`] bytes,
//! and a Raft message must come *from* the authenticated id: raft-rs's
//! protobuf decoder (RUSTSEC-2024-0437) never sees bytes from anyone else.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use quinn::VarInt;
use raft::eraftpb::Message;
use relay_net::tls::{Identity, control_plane_name, identity, peer_certificate};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use topology::RelayId;
use tracing::{debug, warn};

use crate::api::{MAX_RAFT_FRAME, RAFT_ALPN};
use crate::engine::LinkReport;
use crate::node::{decode_message, encode_message};

/// A relay report forwarded by a follower to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardedReport {
    /// The relay.
    pub relay: RelayId,
    /// Its links.
    pub links: Vec<LinkReport>,
    /// Its clients.
    pub clients: u32,
}

/// Something received from a peer node.
#[derive(Debug)]
pub enum Incoming {
    /// A Raft message (its `from` checked).
    Raft(Message),
    /// A forwarded relay report.
    Report(ForwardedReport),
}

const KIND_RAFT: u8 = 0;
const KIND_REPORT: u8 = 1;
const QUEUE: usize = 4096;

/// Outgoing connections to the other members.
pub struct Transport {
    me: u64,
    endpoint: quinn::Endpoint,
    client_config: quinn::ClientConfig,
    domain: Arc<str>,
    peers: HashMap<u64, (String, mpsc::Sender<Bytes>)>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("me", &self.me)
            .field("peers", &self.peers.len())
            .finish()
    }
}

fn frame(kind: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u32(payload.len() as u32 + 1);
    b.put_u8(kind);
    b.put_slice(payload);
    b.freeze()
}

impl Transport {
    /// A transport for node `me` sending with `client_config` (mutual TLS).
    pub fn new(
        me: u64,
        endpoint: quinn::Endpoint,
        client_config: quinn::ClientConfig,
        domain: &str,
    ) -> Self {
        Self {
            me,
            endpoint,
            client_config,
            domain: domain.into(),
            peers: HashMap::new(),
        }
    }

    /// Keeps connections to exactly these members (other than ourselves).
    pub fn set_members(&mut self, members: &BTreeMap<u64, String>) {
        self.peers
            .retain(|id, (addr, _)| members.get(id).is_some_and(|a| a == addr));
        for (&id, addr) in members {
            if id == self.me || self.peers.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(sender(
                self.endpoint.clone(),
                self.client_config.clone(),
                id,
                addr.clone(),
                self.domain.clone(),
                rx,
            ));
            self.peers.insert(id, (addr.clone(), tx));
        }
    }

    /// Sends a Raft message; returns false when it had to be dropped
    /// (unknown peer or full queue: Raft retransmits).
    pub fn send(&self, msg: &Message) -> bool {
        let Some((_, tx)) = self.peers.get(&msg.to) else {
            return false;
        };
        tx.try_send(frame(KIND_RAFT, &encode_message(msg))).is_ok()
    }

    /// Forwards a relay report to node `to` (the leader).
    pub fn forward_report(&self, to: u64, report: &ForwardedReport) {
        if let Some((_, tx)) = self.peers.get(&to) {
            let json = serde_json::to_vec(report).expect("reports serialise");
            let _ = tx.try_send(frame(KIND_REPORT, &json));
        }
    }
}

async fn sender(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    id: u64,
    addr: String,
    domain: Arc<str>,
    mut rx: mpsc::Receiver<Bytes>,
) {
    let name = control_plane_name(id, &domain);
    let mut backoff = Duration::from_millis(50);
    loop {
        let stream = async {
            let sock = tokio::net::lookup_host(&addr)
                .await?
                .next()
                .ok_or_else(|| anyhow::anyhow!("no address"))?;
            let conn = endpoint.connect_with(config.clone(), sock, &name)?.await?;
            anyhow::Ok((conn.clone(), conn.open_uni().await?))
        };
        match tokio::time::timeout(Duration::from_secs(2), stream).await {
            Ok(Ok((conn, mut send))) => {
                backoff = Duration::from_millis(50);
                loop {
                    let Some(f) = rx.recv().await else {
                        conn.close(VarInt::from_u32(0), b"member removed");
                        return;
                    };
                    if send.write_all(&f).await.is_err() {
                        break;
                    }
                }
            }
            Ok(Err(e)) => debug!(peer = id, error = %e, "raft connect failed"),
            Err(_) => debug!(peer = id, "raft connect timed out"),
        }
        if rx.is_closed() {
            return;
        }
        // Drop what queued up while disconnected: Raft resends what matters.
        while rx.try_recv().is_ok() {}
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
}

/// Serves an incoming node connection: checks the certificate names a
/// control-plane node, then decodes its frames.
pub async fn serve_peer(conn: quinn::Connection, domain: &str, out: mpsc::Sender<Incoming>) {
    let peer = match peer_certificate(&conn).and_then(|c| identity(&c, domain)) {
        Some(Identity::ControlPlane(id)) => id,
        _ => {
            conn.close(VarInt::from_u32(1), b"not a control-plane node");
            return;
        }
    };
    while let Ok(mut recv) = conn.accept_uni().await {
        let out = out.clone();
        tokio::spawn(async move {
            loop {
                let mut prefix = [0u8; 4];
                if recv.read_exact(&mut prefix).await.is_err() {
                    return;
                }
                let len = u32::from_be_bytes(prefix) as usize;
                if len == 0 || len > MAX_RAFT_FRAME {
                    warn!(
                        peer,
                        len, "oversized or empty frame from peer node; dropping stream"
                    );
                    return;
                }
                let mut buf = vec![0u8; len];
                if recv.read_exact(&mut buf).await.is_err() {
                    return;
                }
                let item = match buf[0] {
                    KIND_RAFT => match decode_message(&buf[1..]) {
                        Ok(m) if m.from == peer => Incoming::Raft(m),
                        Ok(m) => {
                            warn!(peer, from = m.from, "raft message with a forged sender");
                            continue;
                        }
                        Err(e) => {
                            warn!(peer, error = %e, "undecodable raft message");
                            continue;
                        }
                    },
                    KIND_REPORT => match serde_json::from_slice(&buf[1..]) {
                        Ok(r) => Incoming::Report(r),
                        Err(_) => continue,
                    },
                    _ => continue,
                };
                if out.send(item).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The ALPN peers use.
pub fn alpn() -> &'static [u8] {
    RAFT_ALPN
}
