//! The client protocol (ALPN `edge-relay/1`), documented in
//! `docs/protocol.md`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{DecodeError, Reader, WriteExt};
use crate::ids::{ChannelId, RelayId, SourceId};

/// Protocol version byte carried by every frame and datagram.
pub const VERSION: u8 = 1;
/// ALPN of client connections.
pub const CLIENT_ALPN: &[u8] = b"edge-relay/1";
/// Largest frame on the control stream (after the length prefix).
pub const MAX_FRAME_LEN: usize = 64 * 1024;
/// Largest chat/control message body.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;

/// Bytes before the payload of a publish datagram: version, type, channel.
pub const PUBLISH_HEADER_LEN: usize = 10;
/// Bytes before the payload of a delivery datagram: version, type, channel,
/// source.
pub const DELIVERY_HEADER_LEN: usize = 18;

mod ty {
    pub(super) const JOIN: u8 = 0x01;
    pub(super) const LEAVE: u8 = 0x02;
    pub(super) const MESSAGE: u8 = 0x03;
    pub(super) const PING: u8 = 0x04;

    pub(super) const WELCOME: u8 = 0x81;
    pub(super) const JOINED: u8 = 0x82;
    pub(super) const LEFT: u8 = 0x83;
    pub(super) const MESSAGE_FROM: u8 = 0x84;
    pub(super) const PONG: u8 = 0x85;
    pub(super) const DRAIN: u8 = 0x86;
    pub(super) const ERROR: u8 = 0x87;

    pub(super) const PUBLISH: u8 = 0x10;
    pub(super) const DELIVERY: u8 = 0x11;
    pub(super) const PROBE: u8 = 0x12;
    pub(super) const PROBE_ECHO: u8 = 0x13;
}

/// What a member of a channel may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sends and receives media and messages.
    Publisher,
    /// Receives media and messages, sends messages only.
    Subscriber,
}

impl Role {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            Role::Publisher => 1,
            Role::Subscriber => 2,
        }
    }

    /// From the wire value.
    pub fn from_u8(v: u8) -> Result<Role, DecodeError> {
        match v {
            1 => Ok(Role::Publisher),
            2 => Ok(Role::Subscriber),
            _ => Err(DecodeError::Invalid("role")),
        }
    }
}

/// Application close codes a relay uses when it ends a client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum CloseCode {
    /// Normal close.
    Normal = 0,
    /// The token is malformed or its signature does not verify.
    InvalidToken = 0x101,
    /// The token's expiry has passed.
    TokenExpired = 0x102,
    /// The token is for another channel than the one requested.
    WrongChannel = 0x103,
    /// The token names an app this relay does not know.
    UnknownApp = 0x104,
    /// A frame that does not decode or breaks the protocol's rules.
    ProtocolViolation = 0x105,
    /// A frame above the size limit.
    FrameTooLarge = 0x106,
    /// The relay is shutting down; reconnect elsewhere.
    Draining = 0x107,
    /// Too many channels joined on one connection.
    TooManyChannels = 0x108,
    /// The client does not read its control stream fast enough.
    Overloaded = 0x109,
}

impl CloseCode {
    /// Numeric value for the QUIC application close.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// From the numeric value.
    pub fn from_code(v: u32) -> Option<CloseCode> {
        use CloseCode::*;
        [
            Normal,
            InvalidToken,
            TokenExpired,
            WrongChannel,
            UnknownApp,
            ProtocolViolation,
            FrameTooLarge,
            Draining,
            TooManyChannels,
            Overloaded,
        ]
        .into_iter()
        .find(|c| c.code() == v)
    }
}

/// Non-fatal error codes in [`RelayToClient::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Media or a message for a channel the client has not joined.
    NotJoined = 1,
    /// Media from a subscriber.
    NotPublisher = 2,
    /// A message body above the limit.
    MessageTooLarge = 3,
}

/// Frames a client sends on its control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientToRelay {
    /// Join `channel` with a signed token for it.
    Join {
        /// The token as issued (base64url).
        token: String,
        /// Channel name; must equal the token's.
        channel: String,
    },
    /// Leave a joined channel.
    Leave {
        /// The channel.
        channel: ChannelId,
    },
    /// A reliable message (chat, control) to every member of a channel.
    Message {
        /// The channel.
        channel: ChannelId,
        /// Opaque body, at most [`MAX_MESSAGE_LEN`] bytes.
        body: Bytes,
    },
    /// Liveness check; the relay answers [`RelayToClient::Pong`].
    Ping {
        /// Echoed back.
        nonce: u64,
    },
}

/// Another relay a draining relay suggests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternative {
    /// The relay.
    pub relay: RelayId,
    /// Where clients reach it (`host:port`).
    pub address: String,
}

/// Frames a relay sends on a client's control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayToClient {
    /// First frame: who the relay is and how it sees the client.
    Welcome {
        /// The relay's id.
        relay: RelayId,
        /// Its region code.
        region: String,
        /// The client's address as the relay sees it (its public address
        /// behind NAT), for GeoIP.
        observed: SocketAddr,
        /// Largest media payload the relay forwards.
        max_payload: u16,
    },
    /// A join succeeded.
    Joined {
        /// The channel's id, used in datagrams and frames.
        channel: ChannelId,
        /// The channel's name.
        name: String,
        /// The role granted by the token.
        role: Role,
        /// The id this client's media and messages carry.
        source: SourceId,
    },
    /// The client left a channel (or was removed from it).
    Left {
        /// The channel.
        channel: ChannelId,
    },
    /// A message from another member.
    Message {
        /// The channel.
        channel: ChannelId,
        /// Sender's source id.
        source: SourceId,
        /// Sender's user id.
        user: String,
        /// Body.
        body: Bytes,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// The relay is going away: reconnect elsewhere within the time given.
    Drain {
        /// Human reason.
        reason: String,
        /// Milliseconds until the relay closes the connection.
        deadline_ms: u32,
        /// Relays to try.
        alternatives: Vec<Alternative>,
    },
    /// A request was refused; the connection stays up.
    Error {
        /// What went wrong ([`ErrorCode`] values).
        code: u16,
        /// Human text.
        message: String,
    },
}

/// Prepends the length prefix to a frame written after a 4-byte gap.
fn finish_frame(buf: &mut BytesMut, start: usize) {
    let len = (buf.len() - start - 4) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Length of the frame that follows a 4-byte prefix, checked against the
/// limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::Invalid("frame length"));
    }
    if len < 2 {
        return Err(DecodeError::Truncated);
    }
    Ok(len)
}

fn header(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v != VERSION {
        return Err(DecodeError::Version(v));
    }
    r.u8()
}

impl ClientToRelay {
    /// Appends the frame, length prefix included.
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_u32(0);
        buf.put_u8(VERSION);
        match self {
            ClientToRelay::Join { token, channel } => {
                buf.put_u8(ty::JOIN);
                buf.put_bytes16(token.as_bytes());
                buf.put_bytes16(channel.as_bytes());
            }
            ClientToRelay::Leave { channel } => {
                buf.put_u8(ty::LEAVE);
                buf.put_u64(channel.0);
            }
            ClientToRelay::Message { channel, body } => {
                buf.put_u8(ty::MESSAGE);
                buf.put_u64(channel.0);
                buf.put_bytes16(body);
            }
            ClientToRelay::Ping { nonce } => {
                buf.put_u8(ty::PING);
                buf.put_u64(*nonce);
            }
        }
        finish_frame(buf, start);
    }

    /// Decodes one frame (without its length prefix).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(frame);
        let f = match header(&mut r)? {
            ty::JOIN => ClientToRelay::Join {
                token: r.str16("token")?.to_owned(),
                channel: r.str16("channel")?.to_owned(),
            },
            ty::LEAVE => ClientToRelay::Leave {
                channel: ChannelId(r.u64()?),
            },
            ty::MESSAGE => {
                let channel = ChannelId(r.u64()?);
                let body = r.bytes16()?;
                if body.len() > MAX_MESSAGE_LEN {
                    return Err(DecodeError::Invalid("message length"));
                }
                ClientToRelay::Message {
                    channel,
                    body: Bytes::copy_from_slice(body),
                }
            }
            ty::PING => ClientToRelay::Ping { nonce: r.u64()? },
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(f)
    }
}

fn put_addr(buf: &mut BytesMut, a: &SocketAddr) {
    match a.ip() {
        IpAddr::V4(ip) => {
            buf.put_u8(4);
            buf.put_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            buf.put_u8(6);
            buf.put_slice(&ip.octets());
        }
    }
    buf.put_u16(a.port());
}

fn addr(r: &mut Reader<'_>) -> Result<SocketAddr, DecodeError> {
    let ip = match r.u8()? {
        4 => IpAddr::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(r.bytes(4)?).expect("4 bytes"),
        )),
        6 => IpAddr::V6(Ipv6Addr::from(
            <[u8; 16]>::try_from(r.bytes(16)?).expect("16 bytes"),
        )),
        _ => return Err(DecodeError::Invalid("address family")),
    };
    Ok(SocketAddr::new(ip, r.u16()?))
}

impl RelayToClient {
    /// Appends the frame, length prefix included.
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_u32(0);
        buf.put_u8(VERSION);
        match self {
            RelayToClient::Welcome {
                relay,
                region,
                observed,
                max_payload,
            } => {
                buf.put_u8(ty::WELCOME);
                buf.put_u32(relay.0);
                buf.put_bytes8(region.as_bytes());
                put_addr(buf, observed);
                buf.put_u16(*max_payload);
            }
            RelayToClient::Joined {
                channel,
                name,
                role,
                source,
            } => {
                buf.put_u8(ty::JOINED);
                buf.put_u64(channel.0);
                buf.put_bytes16(name.as_bytes());
                buf.put_u8(role.to_u8());
                buf.put_u64(source.0);
            }
            RelayToClient::Left { channel } => {
                buf.put_u8(ty::LEFT);
                buf.put_u64(channel.0);
            }
            RelayToClient::Message {
                channel,
                source,
                user,
                body,
            } => {
                buf.put_u8(ty::MESSAGE_FROM);
                buf.put_u64(channel.0);
                buf.put_u64(source.0);
                buf.put_bytes8(user.as_bytes());
                buf.put_bytes16(body);
            }
            RelayToClient::Pong { nonce } => {
                buf.put_u8(ty::PONG);
                buf.put_u64(*nonce);
            }
            RelayToClient::Drain {
                reason,
                deadline_ms,
                alternatives,
            } => {
                buf.put_u8(ty::DRAIN);
                buf.put_bytes16(reason.as_bytes());
                buf.put_u32(*deadline_ms);
                buf.put_u8(alternatives.len().min(255) as u8);
                for a in alternatives.iter().take(255) {
                    buf.put_u32(a.relay.0);
                    buf.put_bytes8(a.address.as_bytes());
                }
            }
            RelayToClient::Error { code, message } => {
                buf.put_u8(ty::ERROR);
                buf.put_u16(*code);
                buf.put_bytes16(message.as_bytes());
            }
        }
        finish_frame(buf, start);
    }

    /// Decodes one frame (without its length prefix).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(frame);
        let f = match header(&mut r)? {
            ty::WELCOME => RelayToClient::Welcome {
                relay: RelayId(r.u32()?),
                region: r.str8("region")?.to_owned(),
                observed: addr(&mut r)?,
                max_payload: r.u16()?,
            },
            ty::JOINED => RelayToClient::Joined {
                channel: ChannelId(r.u64()?),
                name: r.str16("channel")?.to_owned(),
                role: Role::from_u8(r.u8()?)?,
                source: SourceId(r.u64()?),
            },
            ty::LEFT => RelayToClient::Left {
                channel: ChannelId(r.u64()?),
            },
            ty::MESSAGE_FROM => RelayToClient::Message {
                channel: ChannelId(r.u64()?),
                source: SourceId(r.u64()?),
                user: r.str8("user")?.to_owned(),
                body: Bytes::copy_from_slice(r.bytes16()?),
            },
            ty::PONG => RelayToClient::Pong { nonce: r.u64()? },
            ty::DRAIN => {
                let reason = r.str16("reason")?.to_owned();
                let deadline_ms = r.u32()?;
                let n = r.u8()?;
                let mut alternatives = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    alternatives.push(Alternative {
                        relay: RelayId(r.u32()?),
                        address: r.str8("address")?.to_owned(),
                    });
                }
                RelayToClient::Drain {
                    reason,
                    deadline_ms,
                    alternatives,
                }
            }
            ty::ERROR => RelayToClient::Error {
                code: r.u16()?,
                message: r.str16("message")?.to_owned(),
            },
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(f)
    }
}

/// A publish datagram (client to relay): media for one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    /// The channel.
    pub channel: ChannelId,
    /// Opaque media.
    pub payload: &'a [u8],
}

impl<'a> Publish<'a> {
    /// Encodes a publish datagram.
    pub fn encode(channel: ChannelId, payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(PUBLISH_HEADER_LEN + payload.len());
        b.put_u8(VERSION);
        b.put_u8(ty::PUBLISH);
        b.put_u64(channel.0);
        b.put_slice(payload);
        b.freeze()
    }

    /// Decodes a publish datagram.
    pub fn decode(d: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(d);
        match header(&mut r)? {
            ty::PUBLISH => Ok(Publish {
                channel: ChannelId(r.u64()?),
                payload: r.rest(),
            }),
            t => Err(DecodeError::UnknownType(t)),
        }
    }
}

/// A delivery datagram (relay to client): media from one source on one
/// channel. Relays also carry it unchanged inside relay-to-relay media
/// datagrams, so the egress relay hands it to subscribers without a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery<'a> {
    /// The channel.
    pub channel: ChannelId,
    /// Who published it.
    pub source: SourceId,
    /// Opaque media.
    pub payload: &'a [u8],
}

impl<'a> Delivery<'a> {
    /// Encodes a delivery datagram.
    pub fn encode(channel: ChannelId, source: SourceId, payload: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(DELIVERY_HEADER_LEN + payload.len());
        Self::write(&mut b, channel, source, payload);
        b.freeze()
    }

    /// Appends a delivery datagram to `b`.
    pub fn write(b: &mut BytesMut, channel: ChannelId, source: SourceId, payload: &[u8]) {
        b.put_u8(VERSION);
        b.put_u8(ty::DELIVERY);
        b.put_u64(channel.0);
        b.put_u64(source.0);
        b.put_slice(payload);
    }

    /// Decodes a delivery datagram.
    pub fn decode(d: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(d);
        match header(&mut r)? {
            ty::DELIVERY => Ok(Delivery {
                channel: ChannelId(r.u64()?),
                source: SourceId(r.u64()?),
                payload: r.rest(),
            }),
            t => Err(DecodeError::UnknownType(t)),
        }
    }
}

/// A probe datagram (client to relay) and its echo (relay to client).
///
/// Clients measure RTT, loss and jitter to a relay with these, before they
/// join anything (to choose a relay) and while connected (to notice when it
/// degrades or dies). The relay echoes the datagram unchanged except for
/// the type byte, so a client may pad probes to the size of its media.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientProbe {
    /// The client's sequence number, echoed back.
    pub seq: u64,
    /// True for the relay's echo.
    pub echo: bool,
}

impl ClientProbe {
    /// Bytes of an unpadded probe: version, type, sequence number.
    pub const LEN: usize = 10;

    /// Encodes a probe with `padding` zero bytes after the header.
    pub fn encode(seq: u64, padding: usize) -> Bytes {
        let mut b = BytesMut::with_capacity(Self::LEN + padding);
        b.put_u8(VERSION);
        b.put_u8(ty::PROBE);
        b.put_u64(seq);
        b.put_bytes(0, padding);
        b.freeze()
    }

    /// Decodes a probe or an echo (padding ignored).
    pub fn decode(d: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(d);
        let echo = match header(&mut r)? {
            ty::PROBE => false,
            ty::PROBE_ECHO => true,
            t => return Err(DecodeError::UnknownType(t)),
        };
        Ok(ClientProbe {
            seq: r.u64()?,
            echo,
        })
    }

    /// The echo of `d` if it is a well-formed probe.
    pub fn echo_of(d: &[u8]) -> Option<Bytes> {
        if d.len() < Self::LEN || d[0] != VERSION || d[1] != ty::PROBE {
            return None;
        }
        let mut b = BytesMut::from(d);
        b[1] = ty::PROBE_ECHO;
        Some(b.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn probes_echo_with_their_sequence_and_padding() {
        let p = ClientProbe::encode(42, 100);
        assert_eq!(p.len(), ClientProbe::LEN + 100);
        assert_eq!(
            ClientProbe::decode(&p).unwrap(),
            ClientProbe {
                seq: 42,
                echo: false
            }
        );
        let e = ClientProbe::echo_of(&p).unwrap();
        assert_eq!(e.len(), p.len());
        assert_eq!(
            ClientProbe::decode(&e).unwrap(),
            ClientProbe {
                seq: 42,
                echo: true
            }
        );
        // Echoes, publishes and short probes are not echoed.
        assert!(ClientProbe::echo_of(&e).is_none());
        assert!(ClientProbe::echo_of(&p[..5]).is_none());
        assert!(ClientProbe::echo_of(&Publish::encode(ChannelId(1), b"x")).is_none());
        assert!(ClientProbe::decode(&p[..5]).is_err());
    }

    fn roundtrip_c2r(f: ClientToRelay) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        let len = frame_len(b[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, b.len() - 4);
        assert_eq!(ClientToRelay::decode(&b[4..]).unwrap(), f);
    }

    fn roundtrip_r2c(f: RelayToClient) {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        assert_eq!(RelayToClient::decode(&b[4..]).unwrap(), f);
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip_c2r(ClientToRelay::Join {
            token: "abc.def".into(),
            channel: "live/1".into(),
        });
        roundtrip_c2r(ClientToRelay::Leave {
            channel: ChannelId(7),
        });
        roundtrip_c2r(ClientToRelay::Message {
            channel: ChannelId(7),
            body: Bytes::from_static(b"hello"),
        });
        roundtrip_c2r(ClientToRelay::Ping { nonce: 99 });
        roundtrip_r2c(RelayToClient::Welcome {
            relay: RelayId(3),
            region: "SG".into(),
            observed: "203.0.113.7:5555".parse().unwrap(),
            max_payload: 1100,
        });
        roundtrip_r2c(RelayToClient::Welcome {
            relay: RelayId(3),
            region: "SG".into(),
            observed: "[2001:db8::1]:443".parse().unwrap(),
            max_payload: 1100,
        });
        roundtrip_r2c(RelayToClient::Joined {
            channel: ChannelId(1),
            name: "c".into(),
            role: Role::Subscriber,
            source: SourceId(2),
        });
        roundtrip_r2c(RelayToClient::Message {
            channel: ChannelId(1),
            source: SourceId(2),
            user: "u".into(),
            body: Bytes::from_static(b"hi"),
        });
        roundtrip_r2c(RelayToClient::Drain {
            reason: "upgrade".into(),
            deadline_ms: 5000,
            alternatives: vec![Alternative {
                relay: RelayId(2),
                address: "127.0.0.1:4433".into(),
            }],
        });
        roundtrip_r2c(RelayToClient::Error {
            code: 1,
            message: "no".into(),
        });
        roundtrip_r2c(RelayToClient::Pong { nonce: 1 });
        roundtrip_r2c(RelayToClient::Left {
            channel: ChannelId(1),
        });
    }

    #[test]
    fn datagrams_roundtrip() {
        let p = Publish::encode(ChannelId(5), b"media");
        assert_eq!(p.len(), PUBLISH_HEADER_LEN + 5);
        let d = Publish::decode(&p).unwrap();
        assert_eq!((d.channel, d.payload), (ChannelId(5), &b"media"[..]));
        let del = Delivery::encode(ChannelId(5), SourceId(9), b"media");
        assert_eq!(del.len(), DELIVERY_HEADER_LEN + 5);
        let d = Delivery::decode(&del).unwrap();
        assert_eq!(
            (d.channel, d.source, d.payload),
            (ChannelId(5), SourceId(9), &b"media"[..])
        );
        assert_eq!(Publish::decode(&del), Err(DecodeError::UnknownType(0x11)));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(ClientToRelay::decode(&[2, 1]), Err(DecodeError::Version(2)));
        assert_eq!(
            ClientToRelay::decode(&[1, 0x7f]),
            Err(DecodeError::UnknownType(0x7f))
        );
        assert_eq!(
            ClientToRelay::decode(&[1, 4, 0, 0]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            ClientToRelay::decode(&[1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 9]),
            Err(DecodeError::Trailing(1))
        );
        assert!(frame_len((MAX_FRAME_LEN as u32 + 1).to_be_bytes()).is_err());
        let mut big = BytesMut::new();
        ClientToRelay::Message {
            channel: ChannelId(1),
            body: Bytes::from(vec![0u8; MAX_MESSAGE_LEN + 1]),
        }
        .encode(&mut big);
        assert_eq!(
            ClientToRelay::decode(&big[4..]),
            Err(DecodeError::Invalid("message length"))
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = ClientToRelay::decode(&data);
            let _ = RelayToClient::decode(&data);
            let _ = Publish::decode(&data);
            let _ = Delivery::decode(&data);
        }
    }
}
