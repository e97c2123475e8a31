//! Outgoing datagrams cut from shared blocks, so that forwarding does not
//! allocate per datagram.

use bytes::{Bytes, BytesMut};

/// Bytes per block: 75 deliveries of 200-byte media, 13 of 1,200 bytes.
///
/// A block lives as long as any datagram cut from it, so a datagram that
/// waits keeps its whole block alive: this much memory per waiting
/// datagram at worst, against the datagram's own size with an allocation
/// each. Large enough that relayd, whose datagrams wait in quinn's queues
/// until the connection tasks run after a batch of input (up to 256 at a
/// time), renews a block seldom: at 200,000 datagrams/s the arena
/// allocated 0.06 times per datagram with this size, 0.2 with 4 KB blocks
/// (relayd in all: `scripts/count-mallocs`; the arena's share: a call
/// graph of those calls, `perf record -e probe_libc:malloc -g`).
pub const BLOCK: usize = 16384;

/// Cuts outgoing datagrams from blocks of [`BLOCK`] bytes.
///
/// A new block is allocated only when the current one is full while a
/// datagram cut from it is still alive. Once every such datagram has been
/// dropped (quinn drops one as soon as it is in a packet) the block is
/// reused in place, so a relay that keeps up allocates nothing here,
/// provided it makes room ([`Arena::make_room`]) before cutting datagrams
/// that live together, such as a delivery and the media datagrams that
/// carry it on: a block renewed between those would still be in use.
#[derive(Debug, Default)]
pub struct Arena {
    buf: BytesMut,
}

impl Arena {
    /// An arena with no block yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes sure the current block has `len` bytes left, renewing it if
    /// not: in place when no datagram cut from it is alive, else a new
    /// block.
    pub fn make_room(&mut self, len: usize) {
        if self.buf.capacity() < len {
            self.buf.reserve(BLOCK.max(len));
        }
    }

    /// A datagram of `len` bytes, written by `write` (which may write
    /// more or less: `len` only sizes the room made for it).
    pub fn datagram(&mut self, len: usize, write: impl FnOnce(&mut BytesMut)) -> Bytes {
        self.make_room(len);
        write(&mut self.buf);
        self.buf.split().freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn cut(arena: &mut Arena, fill: u8, len: usize) -> Bytes {
        arena.datagram(len, |b| b.put_bytes(fill, len))
    }

    #[test]
    fn datagrams_are_what_was_written_and_share_blocks() {
        let mut arena = Arena::new();
        let ds: Vec<Bytes> = (0..40u8).map(|i| cut(&mut arena, i, 200)).collect();
        for (i, d) in ds.iter().enumerate() {
            assert_eq!(&d[..], &[i as u8; 200][..]);
        }
        // Consecutive datagrams of one block are adjacent in memory.
        let adjacent = ds
            .windows(2)
            .filter(|w| w[0].as_ptr().wrapping_add(200) == w[1].as_ptr())
            .count();
        assert!(
            adjacent >= 40 - 3,
            "{adjacent} of 39 adjacent: blocks of 20"
        );
        // Larger than a block: a block of its own size.
        let big = cut(&mut arena, 9, BLOCK + 1);
        assert_eq!(big.len(), BLOCK + 1);
        assert!(big.iter().all(|&b| b == 9));
    }

    #[test]
    fn a_block_is_reused_once_its_datagrams_are_dropped() {
        let mut arena = Arena::new();
        let first = cut(&mut arena, 1, 200);
        let start = first.as_ptr();
        drop(first);
        // Fill the rest of the block and more, dropping each datagram.
        for _ in 0..3 * BLOCK / 200 {
            let d = cut(&mut arena, 2, 200);
            let offset = d.as_ptr() as usize - start as usize;
            assert!(offset < BLOCK, "cut from the first block again");
        }
        // A datagram kept alive keeps its block: the next one is elsewhere.
        let kept = cut(&mut arena, 3, 200);
        for _ in 0..BLOCK / 200 + 1 {
            drop(cut(&mut arena, 4, 200));
        }
        let later = cut(&mut arena, 5, 200);
        let old_block = start as usize..start as usize + BLOCK;
        assert!(
            !old_block.contains(&(later.as_ptr() as usize)),
            "a new block while the old one is in use"
        );
        assert_eq!(&kept[..], &[3u8; 200][..]);
    }
}
