//! The forwarding path allocates nothing per datagram once warm: an
//! ingress relay delivering a publish to local subscribers and sending it
//! on to a peer, and a transit relay passing it on, are watched by a
//! global allocator that counts this thread's allocations. (The only test
//! in this binary, so no other test allocates meanwhile.)

// A global allocator that counts needs `unsafe impl GlobalAlloc`.
#![allow(unsafe_code)]

mod harness;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;

use harness::Net;
use relay_core::wire::client::{Publish, Role};
use relay_core::{Action, RelayId};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn note_allocation() {
    if COUNTING.with(Cell::get) {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: forwards to the system allocator; the counting touches only
// const-initialised thread locals, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_allocation();
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_allocation();
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MS: Duration = Duration::from_millis(1);

/// Counts this thread's allocations while `f` runs.
fn allocations(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.with(Cell::get)
}

#[test]
fn forwarding_a_datagram_allocates_nothing_once_warm() {
    // A line 1 - 2 - 3: the publisher and two subscribers on relay 1, a
    // subscriber on relay 3, reached through relay 2.
    let mut net = Net::new(11);
    for i in 1..=3 {
        net.add_relay(Net::config(i));
    }
    net.connect(1, 2, 10 * MS);
    net.connect(2, 3, 10 * MS);
    net.set_routes(1, &[(2, &[1, 2], None), (3, &[1, 2, 3], None)]);
    net.set_routes(2, &[(1, &[2, 1], None), (3, &[2, 3], None)]);
    net.set_routes(3, &[(1, &[3, 2, 1], None), (2, &[3, 2], None)]);
    let publisher = net.client(1);
    let channel = net.join(publisher, "live", Role::Publisher);
    for relay in [1, 1, 3] {
        let s = net.client(relay);
        net.join(s, "live", Role::Subscriber);
    }
    net.run_for(300 * MS); // interest reaches relay 1
    let now = net.now;

    // Ingress: relay 1 delivers to its two subscribers and sends one copy
    // on towards relay 3. Each datagram is dropped once handed on, as
    // quinn does once it is in a packet.
    let ingress = net.relays.get_mut(&RelayId(1)).unwrap();
    let publish = Publish::encode(channel, &[7u8; 200]);
    let mut to_peer = None;
    let mut forward = |n: u32| {
        let (mut local, mut remote) = (0, 0);
        for _ in 0..n {
            ingress.handle_client_datagram(publisher, &publish, now);
            while let Some(action) = ingress.poll_action() {
                match action {
                    Action::ClientDatagram { .. } => local += 1,
                    Action::PeerDatagram { peer, datagram } => {
                        assert_eq!(peer, RelayId(2));
                        remote += 1;
                        to_peer.get_or_insert(datagram);
                    }
                    _ => {}
                }
            }
        }
        (local, remote)
    };
    forward(1_000); // warm: queues and caches at their working size
    let mut fanned = (0, 0);
    let n = allocations(|| fanned = forward(10_000));
    assert_eq!(fanned, (20_000, 10_000), "fan-out as expected");
    assert_eq!(n, 0, "ingress: {n} allocations for 10,000 datagrams");

    // Transit: relay 2 sends the datagram on to relay 3 (the same one
    // again and again: its duplicates are not delivered, but forwarded
    // along the tree they came with).
    let media = to_peer.expect("a datagram for relay 2");
    let transit = net.relays.get_mut(&RelayId(2)).unwrap();
    let mut relay_on = |n: u32| {
        let mut sent = 0;
        for _ in 0..n {
            transit.handle_peer_datagram(RelayId(1), &media, now);
            while let Some(action) = transit.poll_action() {
                if let Action::PeerDatagram { peer, .. } = action {
                    assert_eq!(peer, RelayId(3));
                    sent += 1;
                }
            }
        }
        sent
    };
    relay_on(1_000);
    let mut sent = 0;
    let n = allocations(|| sent = relay_on(10_000));
    assert_eq!(sent, 10_000, "relayed on as expected");
    assert_eq!(n, 0, "transit: {n} allocations for 10,000 datagrams");
}
