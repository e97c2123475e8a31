//! Duplicate suppression for media arriving from other relays.
//!
//! Delivery trees mark each destination once, so duplicates should not
//! happen; this window is the safety net that makes "no duplicate delivered"
//! hold even if they do (a repair during a route change, a misbehaving
//! peer). Per origin relay it keeps the highest sequence number seen and a
//! bitmap of the `WINDOW` numbers below it, like IPsec's anti-replay window
//! (RFC 4303 section 3.4.3) but accepting reordering within the window.

use std::collections::HashMap;

use crate::ids::RelayId;

/// Sequence numbers remembered per origin.
pub const WINDOW: u32 = 4096;
const WORDS: usize = (WINDOW / 64) as usize;

/// What the window says about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First time seen: deliver.
    Fresh,
    /// Already delivered.
    Duplicate,
    /// Older than the window (or from an older epoch): cannot tell, drop.
    TooOld,
}

#[derive(Debug, Clone)]
struct OriginWindow {
    epoch: u32,
    top: u32,
    bits: [u64; WORDS],
}

impl OriginWindow {
    fn new(epoch: u32, seq: u32) -> Self {
        let mut w = OriginWindow {
            epoch,
            top: seq,
            bits: [0; WORDS],
        };
        w.set(seq);
        w
    }

    fn slot(seq: u32) -> (usize, u64) {
        let i = seq % WINDOW;
        ((i / 64) as usize, 1u64 << (i % 64))
    }

    fn set(&mut self, seq: u32) {
        let (w, b) = Self::slot(seq);
        self.bits[w] |= b;
    }

    fn clear(&mut self, seq: u32) {
        let (w, b) = Self::slot(seq);
        self.bits[w] &= !b;
    }

    fn test(&self, seq: u32) -> bool {
        let (w, b) = Self::slot(seq);
        self.bits[w] & b != 0
    }
}

/// Per-origin duplicate windows.
#[derive(Debug, Clone, Default)]
pub struct DedupWindows {
    origins: HashMap<RelayId, OriginWindow>,
}

impl DedupWindows {
    /// An empty set of windows.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `(origin, epoch, seq)` and says whether it is new.
    pub fn check(&mut self, origin: RelayId, epoch: u32, seq: u32) -> Verdict {
        let w = match self.origins.get_mut(&origin) {
            None => {
                self.origins.insert(origin, OriginWindow::new(epoch, seq));
                return Verdict::Fresh;
            }
            Some(w) => w,
        };
        if epoch != w.epoch {
            // Epochs grow when a relay restarts (they are start times).
            if epoch < w.epoch {
                return Verdict::TooOld;
            }
            *w = OriginWindow::new(epoch, seq);
            return Verdict::Fresh;
        }
        let ahead = seq.wrapping_sub(w.top) as i32;
        if ahead > 0 {
            let ahead = ahead as u32;
            if ahead >= WINDOW {
                w.bits = [0; WORDS];
            } else {
                for s in 1..=ahead {
                    w.clear(w.top.wrapping_add(s));
                }
            }
            w.top = seq;
            w.set(seq);
            return Verdict::Fresh;
        }
        let behind = (-(ahead as i64)) as u32;
        if behind >= WINDOW {
            return Verdict::TooOld;
        }
        if w.test(seq) {
            Verdict::Duplicate
        } else {
            w.set(seq);
            Verdict::Fresh
        }
    }

    /// Forgets an origin (it left the network).
    pub fn forget(&mut self, origin: RelayId) {
        self.origins.remove(&origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: RelayId = RelayId(1);

    #[test]
    fn in_order_reordered_and_duplicates() {
        let mut d = DedupWindows::new();
        assert_eq!(d.check(A, 1, 10), Verdict::Fresh);
        assert_eq!(d.check(A, 1, 12), Verdict::Fresh);
        assert_eq!(
            d.check(A, 1, 11),
            Verdict::Fresh,
            "reordered within the window"
        );
        assert_eq!(d.check(A, 1, 11), Verdict::Duplicate);
        assert_eq!(d.check(A, 1, 12), Verdict::Duplicate);
        assert_eq!(d.check(A, 1, 12 + WINDOW), Verdict::Fresh);
        assert_eq!(d.check(A, 1, 12), Verdict::TooOld);
        assert_eq!(
            d.check(RelayId(2), 1, 12),
            Verdict::Fresh,
            "origins are independent"
        );
    }

    #[test]
    fn sequence_wraps_and_epochs_reset() {
        let mut d = DedupWindows::new();
        assert_eq!(d.check(A, 1, u32::MAX - 1), Verdict::Fresh);
        assert_eq!(d.check(A, 1, 2), Verdict::Fresh);
        assert_eq!(d.check(A, 1, u32::MAX), Verdict::Fresh);
        assert_eq!(d.check(A, 1, u32::MAX - 1), Verdict::Duplicate);
        // The origin restarted: sequence numbers start over.
        assert_eq!(d.check(A, 2, 0), Verdict::Fresh);
        assert_eq!(d.check(A, 2, 0), Verdict::Duplicate);
        assert_eq!(d.check(A, 1, 5), Verdict::TooOld, "stale epoch");
    }

    proptest! {
        /// Against a set of everything seen: never Fresh twice, and
        /// always Fresh the first time within the window.
        #[test]
        fn never_delivers_twice(seqs in prop::collection::vec(0u32..6000, 1..500)) {
            let mut d = DedupWindows::new();
            let mut seen = std::collections::HashSet::new();
            let mut top = 0u32;
            for s in seqs {
                let v = d.check(A, 7, s);
                if v == Verdict::Fresh {
                    prop_assert!(seen.insert(s), "{} delivered twice", s);
                } else if v == Verdict::Duplicate {
                    prop_assert!(seen.contains(&s));
                }
                if !seen.contains(&s) && top.saturating_sub(s) < WINDOW && s <= top {
                    prop_assert!(false, "{} fresh in window but refused", s);
                }
                top = top.max(s);
            }
        }
    }
}
