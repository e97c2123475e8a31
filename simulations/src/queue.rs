//! The simulator's event queue: events in time order, and in insertion
//! order at the same instant, so a run repeats exactly.
//!
//! The heap holds only small keys (time, insertion number, slot) and the
//! events wait in a slab: the heap is sifted at every push and pop, and
//! with the events inline (over 70 bytes each) its reads were the
//! simulator's single largest cache-miss cost.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// A time-ordered queue of `T`.
#[derive(Debug)]
pub struct EventQueue<T> {
    heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
    slots: Vec<Option<T>>,
    free: Vec<u32>,
    pushed: u64,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            slots: Vec::new(),
            free: Vec::new(),
            pushed: 0,
        }
    }
}

impl<T> EventQueue<T> {
    /// Schedules `event` at `at` (after everything already at `at`).
    pub fn push(&mut self, at: Duration, event: T) {
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
        // u64 nanoseconds last 584 years of virtual time.
        let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.pushed += 1;
        self.heap.push(Reverse((nanos, self.pushed, slot)));
    }

    /// The earliest event and its time.
    pub fn pop(&mut self) -> Option<(Duration, T)> {
        let Reverse((nanos, _, slot)) = self.heap.pop()?;
        let event = self.slots[slot as usize]
            .take()
            .expect("a queued slot is full");
        self.free.push(slot);
        Some((Duration::from_nanos(nanos), event))
    }

    /// Number of pending events.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            }
        }
        assert_eq!(
            order,
            vec![
                (10, "a1"),
                (10, "a2"),
                (10, "a3"),
                (20, "b"),
                (25, "b2"),
                (30, "c")
            ]
        );
        assert!(q.is_empty());
        assert_eq!(q.slots.len(), 5, "the late push took a freed slot");
    }
}
