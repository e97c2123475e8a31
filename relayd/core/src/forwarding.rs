//! Which path each packet takes: the route table, fast reroute onto
//! backups, and the delivery trees built from it.

use std::collections::HashMap;

use bytes::Bytes;
use smallvec::SmallVec;
use topology::{Hops, RouteTable};

use crate::ids::{ChannelId, RelayId};
use crate::wire::route::TreeBuilder;

/// How good a link to a neighbour is for forwarding right now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LinkState {
    /// Healthy.
    Usable,
    /// Connected and alive but poor (lossy or jittery), with its recent
    /// loss: used only when nothing better exists.
    Degraded(f64),
    /// Not connected, or dead.
    Down,
}

impl LinkState {
    /// Lower is better.
    fn rank(self) -> f64 {
        match self {
            LinkState::Usable => 0.0,
            LinkState::Degraded(loss) => 1.0 + loss,
            LinkState::Down => 3.0,
        }
    }
}

/// How the forwarder sees the links to its neighbours.
pub trait LinkView {
    /// The state of the link to `peer`.
    fn state(&self, peer: RelayId) -> LinkState;
}

impl<F: Fn(RelayId) -> bool> LinkView for F {
    fn state(&self, peer: RelayId) -> LinkState {
        if self(peer) {
            LinkState::Usable
        } else {
            LinkState::Down
        }
    }
}

/// The path chosen for one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chosen {
    /// Relays from here to the destination.
    pub hops: Hops,
    /// True when the primary's next hop was unusable and the backup was
    /// taken (fast reroute).
    pub rerouted: bool,
}

/// Next hops with their encoded subtrees, one per next hop.
pub type NextHops = SmallVec<[(RelayId, Bytes); 4]>;

#[derive(Debug, Clone)]
struct CachedPlan {
    generation: u64,
    hops: NextHops,
    rerouted: bool,
}

/// The forwarding table of one relay.
#[derive(Debug, Clone)]
pub struct Forwarding {
    me: RelayId,
    table: RouteTable,
    /// Bumped whenever routes, link usability or interest change; cached
    /// plans from older generations are rebuilt.
    generation: u64,
    cache: HashMap<ChannelId, CachedPlan>,
}

impl Forwarding {
    /// No routes: every destination must be a usable neighbour.
    pub fn new(me: RelayId) -> Self {
        Self {
            me,
            table: RouteTable::empty(me),
            generation: 0,
            cache: HashMap::new(),
        }
    }

    /// Installs a route table (the caller checks epochs).
    pub fn set_table(&mut self, table: RouteTable) {
        self.table = table;
        self.invalidate();
    }

    /// The installed table.
    pub fn table(&self) -> &RouteTable {
        &self.table
    }

    /// Forgets cached plans (links or interest changed).
    pub fn invalidate(&mut self) {
        self.generation += 1;
    }

    /// The path to `dest`: the primary, or the backup when the primary's
    /// next hop is not usable and the backup's next hop is in a better
    /// state (usable, or less lossy); the direct link to a neighbour that
    /// is not down when the table has no entry (a degraded link is poor,
    /// but there is nothing better to use: dropping everything would be
    /// worse).
    pub fn path_to(&self, dest: RelayId, links: &impl LinkView) -> Option<Chosen> {
        if let Some(e) = self.table.get(dest) {
            let primary = links.state(e.primary.next_hop());
            if primary != LinkState::Usable
                && let Some(b) = &e.backup
                && links.state(b.next_hop()).rank() < primary.rank()
            {
                return Some(Chosen {
                    hops: b.hops.clone(),
                    rerouted: true,
                });
            }
            return Some(Chosen {
                hops: e.primary.hops.clone(),
                rerouted: false,
            });
        }
        (links.state(dest) != LinkState::Down).then(|| Chosen {
            hops: [self.me, dest].into_iter().collect(),
            rerouted: false,
        })
    }

    /// Builds the delivery tree to `dests`: next hops and their subtrees,
    /// and whether any destination was rerouted. Destinations without a
    /// path are left out.
    pub fn build(
        &self,
        dests: impl IntoIterator<Item = RelayId>,
        links: &impl LinkView,
    ) -> (NextHops, bool) {
        let mut tree = TreeBuilder::new(self.me);
        let mut rerouted = false;
        for d in dests {
            if d == self.me {
                continue;
            }
            if let Some(c) = self.path_to(d, links) {
                // A tree too large for one datagram drops the excess
                // destinations; announcing a channel to >60 relays is
                // outside what one tree carries.
                if tree.add_path(&c.hops).is_ok() {
                    rerouted |= c.rerouted;
                }
            }
        }
        let hops = tree.next_hops().map(|(r, b)| (r, b.freeze())).collect();
        (hops, rerouted)
    }

    /// The cached plan for a channel's media from this relay, rebuilt when
    /// anything changed since.
    pub fn plan(
        &mut self,
        channel: ChannelId,
        dests: &[RelayId],
        links: &impl LinkView,
    ) -> (&NextHops, bool) {
        let stale = self
            .cache
            .get(&channel)
            .is_none_or(|p| p.generation != self.generation);
        if stale {
            let (hops, rerouted) = self.build(dests.iter().copied(), links);
            self.cache.insert(
                channel,
                CachedPlan {
                    generation: self.generation,
                    hops,
                    rerouted,
                },
            );
        }
        let p = &self.cache[&channel];
        (&p.hops, p.rerouted)
    }

    /// Drops the cached plan of a channel nobody here publishes to any more.
    pub fn forget(&mut self, channel: ChannelId) {
        self.cache.remove(&channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use topology::{Metrics, Route, RouteEntry};

    fn route(h: &[u32]) -> Route {
        Route {
            hops: h.iter().map(|&i| RelayId(i)).collect(),
            metrics: Metrics::default(),
            cost: 0.0,
            poor: false,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(
            RelayId(1),
            1,
            vec![
                RouteEntry {
                    destination: RelayId(3),
                    primary: route(&[1, 3]),
                    backup: Some(route(&[1, 2, 3])),
                },
                RouteEntry {
                    destination: RelayId(4),
                    primary: route(&[1, 2, 4]),
                    backup: None,
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn backup_when_next_hop_unusable() {
        let mut f = Forwarding::new(RelayId(1));
        f.set_table(table());
        let all = |_: RelayId| true;
        let no3 = |r: RelayId| r != RelayId(3);
        assert_eq!(f.path_to(RelayId(3), &all).unwrap().hops.len(), 2);
        let c = f.path_to(RelayId(3), &no3).unwrap();
        assert!(c.rerouted);
        assert_eq!(c.hops.as_slice(), &[RelayId(1), RelayId(2), RelayId(3)]);
        // No table entry: a usable neighbour directly, else nothing.
        assert_eq!(f.path_to(RelayId(5), &all).unwrap().hops.len(), 2);
        assert!(f.path_to(RelayId(5), &no3).is_some());
        assert!(f.path_to(RelayId(5), &|_| false).is_none());
    }

    #[test]
    fn without_an_entry_a_degraded_neighbour_is_still_used() {
        // Overload or a lossy stretch makes the only link degraded: a
        // relay with no route for the neighbour keeps forwarding on it
        // instead of dropping everything.
        let f = Forwarding::new(RelayId(1));
        struct View(LinkState);
        impl LinkView for View {
            fn state(&self, _: RelayId) -> LinkState {
                self.0
            }
        }
        let c = f
            .path_to(RelayId(2), &View(LinkState::Degraded(0.06)))
            .unwrap();
        assert_eq!(c.hops.as_slice(), &[RelayId(1), RelayId(2)]);
        assert!(!c.rerouted);
        assert!(f.path_to(RelayId(2), &View(LinkState::Down)).is_none());
    }

    #[test]
    fn least_bad_next_hop_when_neither_is_usable() {
        let mut f = Forwarding::new(RelayId(1));
        f.set_table(table());
        struct View(LinkState, LinkState);
        impl LinkView for View {
            fn state(&self, peer: RelayId) -> LinkState {
                if peer == RelayId(3) { self.0 } else { self.1 }
            }
        }
        let pick = |a, b| f.path_to(RelayId(3), &View(a, b)).unwrap().rerouted;
        assert!(pick(LinkState::Degraded(0.1), LinkState::Degraded(0.02)));
        assert!(!pick(LinkState::Degraded(0.02), LinkState::Degraded(0.1)));
        assert!(pick(LinkState::Down, LinkState::Degraded(0.5)));
        assert!(!pick(LinkState::Degraded(0.5), LinkState::Down));
        assert!(!pick(LinkState::Down, LinkState::Down));
    }

    #[test]
    fn plans_are_cached_per_generation() {
        let mut f = Forwarding::new(RelayId(1));
        f.set_table(table());
        let dests = [RelayId(3), RelayId(4)];
        let (hops, rerouted) = f.plan(ChannelId(1), &dests, &|_| true);
        assert!(!rerouted);
        let next: Vec<_> = hops.iter().map(|h| h.0).collect();
        assert_eq!(next, vec![RelayId(3), RelayId(2)]);
        // Link to 3 fails: until invalidated, the cached plan stays.
        let no3 = |r: RelayId| r != RelayId(3);
        assert_eq!(f.plan(ChannelId(1), &dests, &no3).0.len(), 2);
        f.invalidate();
        let (hops, rerouted) = f.plan(ChannelId(1), &dests, &no3);
        assert!(rerouted);
        assert_eq!(hops.len(), 1, "both destinations now share next hop 2");
        assert_eq!(hops[0].0, RelayId(2));
    }
}
