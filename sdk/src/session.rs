//! One QUIC connection to one relay: the client protocol
//! (`docs/protocol.md`) over a control stream and datagrams.
//!
//! [`Session`] is the building block: the load generator and tests use it
//! directly; [`crate::Client`] adds discovery, ranking and failover on top.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use quinn::{ConnectionError, VarInt};
use relay_core::wire::client::{
    CLIENT_ALPN, ClientProbe, ClientToRelay, CloseCode, Delivery, MAX_FRAME_LEN, Publish,
    RelayToClient, Role,
};
use relay_core::{ChannelId, RelayId, SourceId};
use relay_net::framing::{read_frame, spawn_writer};
use tokio::sync::mpsc;

/// Why a session operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The QUIC connection could not be established.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The relay address.
        addr: SocketAddr,
        /// Why.
        message: String,
    },
    /// The relay closed the connection, with its reason.
    #[error("relay closed the connection: {code:?} {reason}")]
    Closed {
        /// The relay's close code, when it is one of the protocol's.
        code: Option<CloseCode>,
        /// The relay's reason text.
        reason: String,
    },
    /// The connection broke (timeout, reset, network).
    #[error("connection lost: {0}")]
    Lost(String),
    /// The relay sent something that does not decode.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A payload above the relay's limit.
    #[error("payload of {len} bytes is above the relay's limit of {max}")]
    TooLarge {
        /// Payload size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// No answer in time.
    #[error("timed out waiting for the relay")]
    Timeout,
}

impl From<ConnectionError> for SessionError {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(c) => SessionError::Closed {
                code: u32::try_from(c.error_code.into_inner())
                    .ok()
                    .and_then(CloseCode::from_code),
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            other => SessionError::Lost(other.to_string()),
        }
    }
}

/// What the relay said about itself when we connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Its id.
    pub relay: RelayId,
    /// Its region.
    pub region: String,
    /// Our address as the relay sees it.
    pub observed: SocketAddr,
    /// Largest media payload it forwards.
    pub max_payload: u16,
}

/// A joined channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// Channel id (used in media and messages).
    pub channel: ChannelId,
    /// Channel name.
    pub name: String,
    /// Our role.
    pub role: Role,
    /// Our source id.
    pub source: SourceId,
}

/// A media datagram received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media {
    /// The channel.
    pub channel: ChannelId,
    /// Who sent it.
    pub source: SourceId,
    /// The payload.
    pub payload: Bytes,
}

/// A datagram from a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Media on a joined channel.
    Media(Media),
    /// The echo of our probe with this sequence number.
    ProbeEcho(u64),
}

impl Incoming {
    /// Decodes a datagram; `None` for unknown types, skipped for forward
    /// compatibility.
    fn decode(d: Bytes) -> Option<Incoming> {
        if let Ok(m) = Delivery::decode(&d) {
            let offset = d.len() - m.payload.len();
            return Some(Incoming::Media(Media {
                channel: m.channel,
                source: m.source,
                payload: d.slice(offset..),
            }));
        }
        match ClientProbe::decode(&d) {
            Ok(p) if p.echo => Some(Incoming::ProbeEcho(p.seq)),
            _ => None,
        }
    }
}

/// Publishes media on a session from any task (cheap to clone).
#[derive(Debug, Clone)]
pub struct MediaSender {
    conn: quinn::Connection,
    max_payload: usize,
}

impl MediaSender {
    /// Publishes a media payload on a joined channel as a datagram.
    pub fn publish(&self, channel: ChannelId, payload: &[u8]) -> Result<(), SessionError> {
        if payload.len() > self.max_payload {
            return Err(SessionError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        self.conn
            .send_datagram(Publish::encode(channel, payload))
            .map_err(|e| match e {
                quinn::SendDatagramError::ConnectionLost(c) => SessionError::from(c),
                other => SessionError::Protocol(other.to_string()),
            })
    }
}

/// Reads a session's datagrams from another task.
#[derive(Debug, Clone)]
pub struct Datagrams(quinn::Connection);

impl Datagrams {
    /// The next datagram from the relay.
    pub async fn recv(&self) -> Result<Incoming, SessionError> {
        loop {
            let d = self.0.read_datagram().await?;
            if let Some(i) = Incoming::decode(d) {
                return Ok(i);
            }
        }
    }
}

/// A connection to one relay.
#[derive(Debug)]
pub struct Session {
    conn: quinn::Connection,
    writer: mpsc::Sender<Bytes>,
    frames: mpsc::Receiver<Result<RelayToClient, SessionError>>,
    pending: VecDeque<RelayToClient>,
    welcome: Welcome,
}

/// QUIC client config for sessions, trusting `roots`.
pub fn client_config(
    roots: Arc<rustls::RootCertStore>,
) -> Result<quinn::ClientConfig, SessionError> {
    relay_net::tls::quic_client_with_roots(
        roots,
        CLIENT_ALPN,
        Arc::new(relay_net::quic::media_transport()),
    )
    .map_err(|e| SessionError::Protocol(e.to_string()))
}

impl Session {
    /// Connects to the relay at `addr` (whose certificate must be valid for
    /// `server_name`), opens the control stream and waits for the welcome.
    pub async fn connect(
        endpoint: &quinn::Endpoint,
        config: quinn::ClientConfig,
        addr: SocketAddr,
        server_name: &str,
        timeout: Duration,
    ) -> Result<Session, SessionError> {
        let connect = async {
            let connecting = endpoint
                .connect_with(config, addr, server_name)
                .map_err(|e| SessionError::Connect {
                    addr,
                    message: e.to_string(),
                })?;
            let conn = connecting.await.map_err(|e| SessionError::Connect {
                addr,
                message: e.to_string(),
            })?;
            let (send, mut recv) = conn.open_bi().await?;
            let writer = spawn_writer(send, 256);
            let (tx, frames) = mpsc::channel(1024);
            let closer = conn.clone();
            tokio::spawn(async move {
                loop {
                    let item = match read_frame(&mut recv, MAX_FRAME_LEN).await {
                        Ok(Some(f)) => RelayToClient::decode(&f)
                            .map_err(|e| SessionError::Protocol(e.to_string())),
                        Ok(None) => Err(SessionError::Lost("control stream ended".into())),
                        Err(_) => Err(closer
                            .close_reason()
                            .map(SessionError::from)
                            .unwrap_or_else(|| SessionError::Lost("control stream failed".into()))),
                    };
                    let end = item.is_err();
                    if tx.send(item).await.is_err() || end {
                        break;
                    }
                }
            });
            // The stream only reaches the relay with its first bytes: a ping.
            let mut s = Session {
                conn,
                writer,
                frames,
                pending: VecDeque::new(),
                welcome: Welcome {
                    relay: RelayId(0),
                    region: String::new(),
                    observed: addr,
                    max_payload: 0,
                },
            };
            s.send(ClientToRelay::Ping { nonce: 0 }).await?;
            loop {
                match s.frames.recv().await {
                    Some(Ok(RelayToClient::Welcome {
                        relay,
                        region,
                        observed,
                        max_payload,
                    })) => {
                        s.welcome = Welcome {
                            relay,
                            region,
                            observed,
                            max_payload,
                        };
                        return Ok(s);
                    }
                    Some(Ok(other)) => s.pending.push_back(other),
                    Some(Err(e)) => return Err(e),
                    None => return Err(SessionError::Lost("connection ended".into())),
                }
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| SessionError::Timeout)?
    }

    /// What the relay said when we connected.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The relay's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.conn.remote_address()
    }

    /// QUIC's RTT estimate to the relay.
    pub fn rtt(&self) -> Duration {
        self.conn.rtt()
    }

    /// The underlying connection's statistics.
    pub fn connection_stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    async fn send(&self, frame: ClientToRelay) -> Result<(), SessionError> {
        let mut b = BytesMut::new();
        frame.encode(&mut b);
        self.writer
            .send(b.freeze())
            .await
            .map_err(|_| self.closed_error())
    }

    fn closed_error(&self) -> SessionError {
        self.conn
            .close_reason()
            .map(SessionError::from)
            .unwrap_or_else(|| SessionError::Lost("connection closed".into()))
    }

    /// Joins a channel with a token for it and waits for the relay's answer.
    pub async fn join(&mut self, channel: &str, token: &str) -> Result<Joined, SessionError> {
        let mut joined = self
            .join_many(&[(channel.to_owned(), token.to_owned())])
            .await
            .map_err(|(_, e)| e)?;
        Ok(joined.remove(0))
    }

    /// Joins several channels at once (one round trip, not one each), as
    /// after moving to another relay. On failure also returns the joins
    /// that succeeded: a relay refuses a bad token by closing the
    /// connection, so the first channel not joined is the refused one.
    pub async fn join_many(
        &mut self,
        channels: &[(String, String)],
    ) -> Result<Vec<Joined>, (Vec<Joined>, SessionError)> {
        for (channel, token) in channels {
            let frame = ClientToRelay::Join {
                token: token.clone(),
                channel: channel.clone(),
            };
            if let Err(e) = self.send(frame).await {
                return Err((Vec::new(), e));
            }
        }
        let mut joined: Vec<Option<Joined>> = vec![None; channels.len()];
        while joined.iter().any(Option::is_none) {
            match self.frames.recv().await {
                Some(Ok(RelayToClient::Joined {
                    channel: id,
                    name,
                    role,
                    source,
                })) => match channels.iter().position(|(n, _)| *n == name) {
                    Some(i) => {
                        joined[i] = Some(Joined {
                            channel: id,
                            name,
                            role,
                            source,
                        })
                    }
                    None => self.pending.push_back(RelayToClient::Joined {
                        channel: id,
                        name,
                        role,
                        source,
                    }),
                },
                Some(Ok(other)) => self.pending.push_back(other),
                Some(Err(e)) => return Err((joined.into_iter().map_while(|j| j).collect(), e)),
                None => {
                    let e = self.closed_error();
                    return Err((joined.into_iter().map_while(|j| j).collect(), e));
                }
            }
        }
        Ok(joined.into_iter().flatten().collect())
    }

    /// Leaves a channel.
    pub async fn leave(&self, channel: ChannelId) -> Result<(), SessionError> {
        self.send(ClientToRelay::Leave { channel }).await
    }

    /// Sends a reliable message to the channel's other members.
    pub async fn send_message(&self, channel: ChannelId, body: Bytes) -> Result<(), SessionError> {
        self.send(ClientToRelay::Message { channel, body }).await
    }

    /// Sends a ping (answered by a pong event).
    pub async fn ping(&self, nonce: u64) -> Result<(), SessionError> {
        self.send(ClientToRelay::Ping { nonce }).await
    }

    /// Publishes a media payload on a joined channel as a datagram
    /// (unreliable, unordered).
    pub fn publish(&self, channel: ChannelId, payload: &[u8]) -> Result<(), SessionError> {
        self.media_sender().publish(channel, payload)
    }

    /// A handle that publishes on this session from any task.
    pub fn media_sender(&self) -> MediaSender {
        MediaSender {
            conn: self.conn.clone(),
            max_payload: self.welcome.max_payload as usize,
        }
    }

    /// Sends a probe datagram (answered by an echo datagram, see
    /// [`Session::recv_datagram`]), padded by `padding` zero bytes.
    pub fn send_probe(&self, seq: u64, padding: usize) -> Result<(), SessionError> {
        self.conn
            .send_datagram(ClientProbe::encode(seq, padding))
            .map_err(|e| match e {
                quinn::SendDatagramError::ConnectionLost(c) => SessionError::from(c),
                other => SessionError::Protocol(other.to_string()),
            })
    }

    /// The next datagram from the relay: media or a probe echo.
    pub async fn recv_datagram(&self) -> Result<Incoming, SessionError> {
        loop {
            let d = self.conn.read_datagram().await?;
            if let Some(i) = Incoming::decode(d) {
                return Ok(i);
            }
        }
    }

    /// The next media datagram (probe echoes are skipped).
    pub async fn recv_media(&self) -> Result<Media, SessionError> {
        loop {
            if let Incoming::Media(m) = self.recv_datagram().await? {
                return Ok(m);
            }
        }
    }

    /// A handle to the connection for tasks that only read datagrams.
    pub fn datagrams(&self) -> Datagrams {
        Datagrams(self.conn.clone())
    }

    /// The next frame from the relay (messages, drain notices, errors).
    pub async fn next_event(&mut self) -> Result<RelayToClient, SessionError> {
        if let Some(f) = self.pending.pop_front() {
            return Ok(f);
        }
        match self.frames.recv().await {
            Some(r) => r,
            None => Err(self.closed_error()),
        }
    }

    /// Waits until the connection closes and says why.
    pub async fn closed(&self) -> SessionError {
        self.conn.closed().await.into()
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.conn
            .close(VarInt::from_u32(CloseCode::Normal.code()), b"bye");
    }
}
