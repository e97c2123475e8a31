//! The relay-to-relay protocol (ALPN `edge-relay-peer/1`), documented in
//! `docs/protocol.md`.

use bytes::{BufMut, Bytes, BytesMut};

use super::client::VERSION;
use super::codec::{DecodeError, Reader, WriteExt};
use crate::ids::{ChannelId, RelayId, SourceId};

/// ALPN of relay-to-relay connections.
pub const PEER_ALPN: &[u8] = b"edge-relay-peer/1";
/// Largest frame on the peer control stream (after the length prefix).
pub const MAX_PEER_FRAME_LEN: usize = 1024 * 1024;
/// Most channel ids in one interest announcement.
pub const MAX_INTEREST_CHANNELS: usize = 100_000;

mod ty {
    pub(super) const HELLO: u8 = 0x01;
    pub(super) const INTEREST: u8 = 0x02;
    pub(super) const MESSAGE: u8 = 0x03;

    pub(super) const PROBE: u8 = 0x20;
    pub(super) const ECHO: u8 = 0x21;
    pub(super) const MEDIA: u8 = 0x22;
}

/// Frames on the reliable peer control stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerFrame {
    /// First frame in each direction: who is speaking. The relay id must
    /// match the name in the peer's TLS certificate.
    Hello {
        /// The sender's id.
        relay: RelayId,
        /// Changes when the sender restarts (media sequence numbers restart).
        epoch: u32,
    },
    /// The full set of channels with subscribers at relay `origin`,
    /// flooded to every relay; newer versions replace older ones.
    Interest {
        /// Whose interest this is.
        origin: RelayId,
        /// Increases with every change (restart-safe: high bits are the
        /// origin's epoch).
        version: u64,
        /// The channels.
        channels: Vec<ChannelId>,
    },
    /// A reliable message for the members of a channel at relay `to`,
    /// forwarded hop by hop when `to` is not a neighbour.
    Message {
        /// Destination relay.
        to: RelayId,
        /// Ingress relay.
        origin: RelayId,
        /// Hops left.
        hop_limit: u8,
        /// Channel.
        channel: ChannelId,
        /// Sender.
        source: SourceId,
        /// Sender's user id.
        user: String,
        /// Body.
        body: Bytes,
    },
}

fn header(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v != VERSION {
        return Err(DecodeError::Version(v));
    }
    r.u8()
}

impl PeerFrame {
    /// Appends the frame, length prefix included.
    pub fn encode(&self, buf: &mut BytesMut) {
        let start = buf.len();
        buf.put_u32(0);
        buf.put_u8(VERSION);
        match self {
            PeerFrame::Hello { relay, epoch } => {
                buf.put_u8(ty::HELLO);
                buf.put_u32(relay.0);
                buf.put_u32(*epoch);
            }
            PeerFrame::Interest {
                origin,
                version,
                channels,
            } => {
                buf.put_u8(ty::INTEREST);
                buf.put_u32(origin.0);
                buf.put_u64(*version);
                buf.put_u32(channels.len() as u32);
                for c in channels {
                    buf.put_u64(c.0);
                }
            }
            PeerFrame::Message {
                to,
                origin,
                hop_limit,
                channel,
                source,
                user,
                body,
            } => {
                buf.put_u8(ty::MESSAGE);
                buf.put_u32(to.0);
                buf.put_u32(origin.0);
                buf.put_u8(*hop_limit);
                buf.put_u64(channel.0);
                buf.put_u64(source.0);
                buf.put_bytes8(user.as_bytes());
                buf.put_bytes16(body);
            }
        }
        let len = (buf.len() - start - 4) as u32;
        buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one frame (without its length prefix).
    pub fn decode(frame: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(frame);
        let f = match header(&mut r)? {
            ty::HELLO => PeerFrame::Hello {
                relay: RelayId(r.u32()?),
                epoch: r.u32()?,
            },
            ty::INTEREST => {
                let origin = RelayId(r.u32()?);
                let version = r.u64()?;
                let n = r.u32()? as usize;
                if n > MAX_INTEREST_CHANNELS || n * 8 > r.remaining() {
                    return Err(DecodeError::Invalid("interest length"));
                }
                let channels = (0..n)
                    .map(|_| r.u64().map(ChannelId))
                    .collect::<Result<_, _>>()?;
                PeerFrame::Interest {
                    origin,
                    version,
                    channels,
                }
            }
            ty::MESSAGE => PeerFrame::Message {
                to: RelayId(r.u32()?),
                origin: RelayId(r.u32()?),
                hop_limit: r.u8()?,
                channel: ChannelId(r.u64()?),
                source: SourceId(r.u64()?),
                user: r.str8("user")?.to_owned(),
                body: Bytes::copy_from_slice(r.bytes16()?),
            },
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(f)
    }
}

/// Length of the peer frame that follows a 4-byte prefix.
pub fn peer_frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_PEER_FRAME_LEN {
        return Err(DecodeError::Invalid("frame length"));
    }
    if len < 2 {
        return Err(DecodeError::Truncated);
    }
    Ok(len)
}

/// What the receiver of our data has seen, piggybacked on probe echoes:
/// cumulative counts, so lost reports do not skew the estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReceiverReport {
    /// Media datagrams received from the prober, ever.
    pub received: u64,
    /// Highest link sequence number seen from the prober.
    pub highest_seq: u32,
}

/// Header of a relay-to-relay media datagram; the delivery datagram for
/// clients follows it unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaHeader {
    /// Hops the packet may still take.
    pub hop_limit: u8,
    /// The ingress relay.
    pub origin: RelayId,
    /// The ingress relay's epoch (sequence numbers restart with it).
    pub epoch: u32,
    /// Per-origin sequence number, for duplicate suppression.
    pub seq: u32,
    /// Per-link sequence number, for loss measurement on this link.
    pub link_seq: u32,
}

/// A datagram between relays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerDatagram {
    /// A probe; the receiver echoes it at once.
    Probe {
        /// Probe sequence number.
        seq: u64,
    },
    /// Echo of a probe, with what the echoing relay received from the prober.
    Echo {
        /// The probe's sequence number.
        seq: u64,
        /// Reverse-direction data statistics.
        report: ReceiverReport,
    },
    /// Media with its delivery tree.
    Media {
        /// Header fields.
        header: MediaHeader,
        /// The delivery tree rooted at the receiver (encoded, see
        /// [`super::route`]).
        route: Bytes,
        /// The client delivery datagram.
        delivery: Bytes,
    },
}

/// Bytes of a media datagram besides the tree and the delivery datagram.
pub const MEDIA_HEADER_LEN: usize = 2 + 1 + 4 + 4 + 4 + 4 + 1;

impl PeerDatagram {
    /// Encodes a probe.
    pub fn probe(seq: u64) -> Bytes {
        let mut b = BytesMut::with_capacity(10);
        b.put_u8(VERSION);
        b.put_u8(ty::PROBE);
        b.put_u64(seq);
        b.freeze()
    }

    /// Encodes an echo.
    pub fn echo(seq: u64, report: ReceiverReport) -> Bytes {
        let mut b = BytesMut::with_capacity(22);
        b.put_u8(VERSION);
        b.put_u8(ty::ECHO);
        b.put_u64(seq);
        b.put_u64(report.received);
        b.put_u32(report.highest_seq);
        b.freeze()
    }

    /// Encodes a media datagram.
    pub fn media(header: &MediaHeader, route: &[u8], delivery: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(Self::media_len(route, delivery));
        Self::write_media(&mut b, header, route, delivery);
        b.freeze()
    }

    /// Length of a media datagram.
    pub fn media_len(route: &[u8], delivery: &[u8]) -> usize {
        MEDIA_HEADER_LEN + route.len() + delivery.len()
    }

    /// Appends a media datagram to `b`.
    pub fn write_media(b: &mut BytesMut, header: &MediaHeader, route: &[u8], delivery: &[u8]) {
        b.put_u8(VERSION);
        b.put_u8(ty::MEDIA);
        b.put_u8(header.hop_limit);
        b.put_u32(header.origin.0);
        b.put_u32(header.epoch);
        b.put_u32(header.seq);
        b.put_u32(header.link_seq);
        b.put_bytes8(route);
        b.put_slice(delivery);
    }

    /// Decodes a datagram; media parts are zero-copy slices of `d`.
    pub fn decode(d: &Bytes) -> Result<PeerDatagram, DecodeError> {
        let mut r = Reader::new(d);
        let out = match header(&mut r)? {
            ty::PROBE => PeerDatagram::Probe { seq: r.u64()? },
            ty::ECHO => PeerDatagram::Echo {
                seq: r.u64()?,
                report: ReceiverReport {
                    received: r.u64()?,
                    highest_seq: r.u32()?,
                },
            },
            ty::MEDIA => {
                let header = MediaHeader {
                    hop_limit: r.u8()?,
                    origin: RelayId(r.u32()?),
                    epoch: r.u32()?,
                    seq: r.u32()?,
                    link_seq: r.u32()?,
                };
                let route_len = r.u8()? as usize;
                let start = r.position();
                r.bytes(route_len)?;
                let route = d.slice(start..start + route_len);
                let delivery = d.slice(r.position()..);
                r.rest();
                return Ok(PeerDatagram::Media {
                    header,
                    route,
                    delivery,
                });
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_roundtrip() {
        for f in [
            PeerFrame::Hello {
                relay: RelayId(4),
                epoch: 77,
            },
            PeerFrame::Interest {
                origin: RelayId(4),
                version: 9,
                channels: vec![ChannelId(1), ChannelId(u64::MAX)],
            },
            PeerFrame::Message {
                to: RelayId(1),
                origin: RelayId(2),
                hop_limit: 3,
                channel: ChannelId(5),
                source: SourceId(6),
                user: "bob".into(),
                body: Bytes::from_static(b"hey"),
            },
        ] {
            let mut b = BytesMut::new();
            f.encode(&mut b);
            assert_eq!(
                peer_frame_len(b[..4].try_into().unwrap()).unwrap(),
                b.len() - 4
            );
            assert_eq!(PeerFrame::decode(&b[4..]).unwrap(), f);
        }
    }

    #[test]
    fn interest_length_is_checked_before_allocating() {
        let mut b = BytesMut::new();
        b.put_u8(VERSION);
        b.put_u8(ty::INTEREST);
        b.put_u32(1);
        b.put_u64(1);
        b.put_u32(u32::MAX);
        assert_eq!(
            PeerFrame::decode(&b),
            Err(DecodeError::Invalid("interest length"))
        );
    }

    #[test]
    fn datagrams_roundtrip() {
        let p = PeerDatagram::probe(5);
        assert_eq!(
            PeerDatagram::decode(&p).unwrap(),
            PeerDatagram::Probe { seq: 5 }
        );
        let report = ReceiverReport {
            received: 10,
            highest_seq: 12,
        };
        let e = PeerDatagram::echo(5, report);
        assert_eq!(
            PeerDatagram::decode(&e).unwrap(),
            PeerDatagram::Echo { seq: 5, report }
        );
        let h = MediaHeader {
            hop_limit: 7,
            origin: RelayId(1),
            epoch: 2,
            seq: 3,
            link_seq: 4,
        };
        let m = PeerDatagram::media(&h, &[2, 0x80], b"delivery");
        assert_eq!(m.len(), MEDIA_HEADER_LEN + 2 + 8);
        match PeerDatagram::decode(&m).unwrap() {
            PeerDatagram::Media {
                header,
                route,
                delivery,
            } => {
                assert_eq!(header, h);
                assert_eq!(&route[..], &[2, 0x80]);
                assert_eq!(&delivery[..], b"delivery");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            PeerDatagram::decode(&Bytes::from_static(&[1, 0x22, 1])),
            Err(DecodeError::Truncated)
        );
    }

    proptest! {
        #[test]
        fn decoders_never_panic(data in prop::collection::vec(any::<u8>(), 0..120)) {
            let _ = PeerFrame::decode(&data);
            let _ = PeerDatagram::decode(&Bytes::from(data));
        }
    }
}
