//! Byte-level reading and writing shared by the wire formats.
//!
//! Integers are big-endian. Strings and byte strings carry a length prefix
//! (`u8` or `u16`, stated per field). Variable-length integers use the QUIC
//! encoding (RFC 9000 section 16): the two top bits of the first byte give
//! the length, 1, 2, 4 or 8 bytes.

use bytes::{BufMut, BytesMut};

/// Why bytes could not be decoded. Every variant is the peer's fault; the
/// receiver counts it and drops the frame or closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The input ended before the value did.
    #[error("truncated")]
    Truncated,
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// A frame or datagram type this build does not know.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// Bytes left over after a complete value.
    #[error("{0} trailing bytes")]
    Trailing(usize),
    /// A string that is not UTF-8.
    #[error("invalid UTF-8 in {0}")]
    Utf8(&'static str),
    /// A value outside its allowed range or shape.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// A cursor over input bytes.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Starts at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The unconsumed rest, consuming it.
    pub fn rest(&mut self) -> &'a [u8] {
        let r = &self.buf[self.pos..];
        self.pos = self.buf.len();
        r
    }

    /// Fails unless everything was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Truncated)?;
        let out = self.buf.get(self.pos..end).ok_or(DecodeError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    /// A `u8`.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    /// A big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A QUIC variable-length integer.
    pub fn varint(&mut self) -> Result<u64, DecodeError> {
        let first = self.u8()?;
        let len = 1usize << (first >> 6);
        let mut v = u64::from(first & 0x3f);
        for _ in 1..len {
            v = (v << 8) | u64::from(self.u8()?);
        }
        Ok(v)
    }

    /// Bytes with a `u8` length prefix.
    pub fn bytes8(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u8()? as usize;
        self.bytes(n)
    }

    /// Bytes with a `u16` length prefix.
    pub fn bytes16(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        self.bytes(n)
    }

    /// A UTF-8 string with a `u8` length prefix.
    pub fn str8(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes8()?).map_err(|_| DecodeError::Utf8(what))
    }

    /// A UTF-8 string with a `u16` length prefix.
    pub fn str16(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        std::str::from_utf8(self.bytes16()?).map_err(|_| DecodeError::Utf8(what))
    }
}

/// Appends encoded values to a buffer.
pub trait WriteExt {
    /// A QUIC variable-length integer (values up to 2^62 - 1).
    fn put_varint(&mut self, v: u64);
    /// Bytes with a `u8` length prefix; longer input is a caller bug.
    fn put_bytes8(&mut self, b: &[u8]);
    /// Bytes with a `u16` length prefix; longer input is a caller bug.
    fn put_bytes16(&mut self, b: &[u8]);
}

impl WriteExt for BytesMut {
    fn put_varint(&mut self, v: u64) {
        if v < 1 << 6 {
            self.put_u8(v as u8);
        } else if v < 1 << 14 {
            self.put_u16(0x4000 | v as u16);
        } else if v < 1 << 30 {
            self.put_u32(0x8000_0000 | v as u32);
        } else {
            assert!(v < 1 << 62, "varint out of range");
            self.put_u64(0xc000_0000_0000_0000 | v);
        }
    }

    fn put_bytes8(&mut self, b: &[u8]) {
        let n = u8::try_from(b.len()).expect("field longer than 255 bytes");
        self.put_u8(n);
        self.put_slice(b);
    }

    fn put_bytes16(&mut self, b: &[u8]) {
        let n = u16::try_from(b.len()).expect("field longer than 65535 bytes");
        self.put_u16(n);
        self.put_slice(b);
    }
}

/// Encoded length of a varint.
pub fn varint_len(v: u64) -> usize {
    match v {
        v if v < 1 << 6 => 1,
        v if v < 1 << 14 => 2,
        v if v < 1 << 30 => 4,
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_roundtrip(v in 0u64..(1 << 62)) {
            let mut b = BytesMut::new();
            b.put_varint(v);
            prop_assert_eq!(b.len(), varint_len(v));
            let mut r = Reader::new(&b);
            prop_assert_eq!(r.varint().unwrap(), v);
            prop_assert!(r.finish().is_ok());
        }

        #[test]
        fn reader_never_panics(data in prop::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&data);
            let _ = r.varint();
            let _ = r.str16("x");
            let _ = r.bytes8();
            let _ = r.u64();
        }
    }

    #[test]
    fn truncation_is_an_error() {
        let mut r = Reader::new(&[0x40]);
        assert_eq!(r.varint(), Err(DecodeError::Truncated));
        let mut r = Reader::new(&[0, 5, b'a']);
        assert_eq!(r.bytes16(), Err(DecodeError::Truncated));
        let mut r = Reader::new(&[1, 0xff]);
        assert_eq!(r.str8("name"), Err(DecodeError::Utf8("name")));
        assert_eq!(Reader::new(&[1]).finish(), Err(DecodeError::Trailing(1)));
    }
}
