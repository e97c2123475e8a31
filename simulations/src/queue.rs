//! The simulator's event queue: events in time order, and in insertion
//! order at the same instant, so a run repeats exactly.
//!
//! A radix heap (Ahuja, Mehlhorn, Orlin and Tarjan, 1990): virtual time
//! never runs backwards, so every key pushed is at least the last one
//! popped, and keys can be kept in buckets by the highest bit in which
//! they differ from it. A pop empties the lowest non-empty bucket into
//! lower ones; every key moves down a few times in its life, by appends
//! to short vectors. The binary heap it replaces sifted through ~17
//! levels of a megabyte-sized array at every pop: the simulator's
//! largest cache-miss cost after the relays themselves.
//!
//! A key is `(time in nanoseconds, insertion number)` in one `u128`, so
//! keys are unique (the lowest bucket holds at most one) and ties at the
//! same instant keep their insertion order. Events wait in a slab beside
//! the buckets, which move only `(key, slot)` pairs.

use std::time::Duration;

/// Buckets: one for the last popped key itself, one per bit of a key.
const BUCKETS: usize = 129;

/// A time-ordered queue of `T`.
#[derive(Debug)]
pub struct EventQueue<T> {
    buckets: Vec<Vec<(u128, u32)>>,
    /// Bit `i - 1` set when bucket `i` (1 to 128) is not empty.
    occupied: u128,
    /// The last key popped: no key below it may be pushed.
    last: u128,
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    pushed: u64,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
            occupied: 0,
            last: 0,
            slots: Vec::new(),
            free: Vec::new(),
            pushed: 0,
        }
    }
}

/// The bucket of `key` while `last` is the last key popped: 0 when equal,
/// else one more than the index of the highest differing bit.
fn bucket(key: u128, last: u128) -> usize {
    (u128::BITS - (key ^ last).leading_zeros()) as usize
}

impl<T> EventQueue<T> {
    /// Schedules `event` at `at` (after everything already at `at`).
    ///
    /// # Panics
    /// If `at` is before the time of the last event popped: the simulator
    /// never schedules into the past.
    pub fn push(&mut self, at: Duration, event: T) {
        // u64 nanoseconds last 584 years of virtual time.
        let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.pushed += 1;
        let key = (u128::from(nanos) << 64) | u128::from(self.pushed);
        assert!(
            key > self.last,
            "event scheduled at {at:?}, before the current time"
        );
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(event);
                slot
            }
            None => {
                self.slots.push(Some(event));
                u32::try_from(self.slots.len() - 1).expect("fewer than 2^32 pending events")
            }
        };
        self.put(key, slot);
    }

    fn put(&mut self, key: u128, slot: u32) {
        let b = bucket(key, self.last);
        self.buckets[b].push((key, slot));
        if b > 0 {
            self.occupied |= 1 << (b - 1);
        }
    }

    /// The earliest event and its time.
    pub fn pop(&mut self) -> Option<(Duration, T)> {
        if self.buckets[0].is_empty() {
            if self.occupied == 0 {
                return None;
            }
            let i = self.occupied.trailing_zeros() as usize + 1;
            self.occupied &= !(1 << (i - 1));
            // The smallest key of the lowest non-empty bucket becomes
            // `last`; the others differ from it in a lower bit than `i`.
            let mut moving = std::mem::take(&mut self.buckets[i]);
            self.last = moving.iter().map(|&(key, _)| key).min().expect("not empty");
            for &(key, slot) in &moving {
                self.put(key, slot);
            }
            // Hand the emptied vector back to keep its capacity.
            moving.clear();
            self.buckets[i] = moving;
        }
        let (key, slot) = self.buckets[0].pop().expect("the minimum is in bucket 0");
        let event = self.slots[slot as usize]
            .take()
            .expect("a queued slot is full");
        self.free.push(slot);
        Some((Duration::from_nanos((key >> 64) as u64), event))
    }

    /// Number of pending events.
    pub fn len(&self) -> usize {
        // Every slot is pending or free.
        self.slots.len() - self.free.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    #[test]
    fn pops_in_time_then_insertion_order_and_reuses_slots() {
        let ms = Duration::from_millis;
        let mut q = EventQueue::default();
        for (at, name) in [(30, "c"), (10, "a1"), (20, "b"), (10, "a2"), (10, "a3")] {
            q.push(ms(at), name);
        }
        let mut order = Vec::new();
        while let Some((at, name)) = q.pop() {
            order.push((at.as_millis(), name));
            if name == "b" {
                q.push(ms(25), "b2");
                q.push(ms(20), "b3");
            }
        }
        assert_eq!(
            order,
            vec![
                (10, "a1"),
                (10, "a2"),
                (10, "a3"),
                (20, "b"),
                (20, "b3"),
                (25, "b2"),
                (30, "c")
            ]
        );
        assert!(q.is_empty());
        assert_eq!(q.slots.len(), 5, "the late pushes took freed slots");
    }

    /// Against a binary heap of `(time, insertion number)`, through a long
    /// random mix of pushes (now, soon, much later, the far future) and
    /// pops, as the simulator makes them.
    #[test]
    fn matches_a_binary_heap_on_random_schedules() {
        for seed in 0..20u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut q = EventQueue::default();
            let mut reference = BinaryHeap::new();
            let mut now = 0u64;
            let mut id = 0u64;
            for step in 0..20_000 {
                if rng.random_bool(0.55) {
                    let ahead = match rng.random_range(0..4) {
                        0 => 0,
                        1 => rng.random_range(0..1_000),
                        2 => rng.random_range(0..2_000_000_000),
                        _ => rng.random_range(0..u64::MAX / 4),
                    };
                    let at = now.saturating_add(ahead);
                    id += 1;
                    q.push(Duration::from_nanos(at), id);
                    reference.push(Reverse((at, id)));
                } else {
                    let got = q.pop().map(|(at, id)| (at.as_nanos() as u64, id));
                    let want = reference.pop().map(|Reverse(k)| k);
                    assert_eq!(got, want, "seed {seed}, step {step}");
                    if let Some((at, _)) = got {
                        now = at;
                    }
                }
                assert_eq!(q.len(), reference.len(), "seed {seed}, step {step}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "before the current time")]
    fn refuses_the_past() {
        let mut q = EventQueue::default();
        q.push(Duration::from_secs(2), ());
        let _ = q.pop();
        q.push(Duration::from_secs(1), ());
    }
}
