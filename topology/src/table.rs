//! Route tables: per source relay, the primary and backup path to every
//! reachable destination, stamped with an epoch, and diffs between them.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::cost::Metrics;
use crate::graph::RelayId;

/// The relays of a path from source to destination, both included. Paths of
/// up to two transit relays need no allocation.
pub type Hops = SmallVec<[RelayId; 4]>;

/// One path with its quality as computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// Source first, destination last.
    pub hops: Hops,
    /// End-to-end metrics when the route was computed.
    pub metrics: Metrics,
    /// Additive cost when the route was computed.
    pub cost: f64,
    /// Whether `metrics` fail the quality bar.
    pub poor: bool,
}

impl Route {
    /// The relay after the source.
    pub fn next_hop(&self) -> RelayId {
        self.hops[1]
    }

    /// The relays strictly between source and destination.
    pub fn transit(&self) -> &[RelayId] {
        &self.hops[1..self.hops.len() - 1]
    }

    /// The directed links of the path.
    pub fn links(&self) -> impl Iterator<Item = (RelayId, RelayId)> + '_ {
        self.hops.windows(2).map(|w| (w[0], w[1]))
    }

    /// True when the two paths share no directed link.
    pub fn is_link_disjoint(&self, other: &Route) -> bool {
        self.links().all(|l| other.links().all(|o| o != l))
    }

    /// True when the two paths share no transit relay.
    pub fn is_transit_disjoint(&self, other: &Route) -> bool {
        self.transit().iter().all(|r| !other.transit().contains(r))
    }
}

/// Routes from a table's source to one destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteEntry {
    /// Where the routes lead.
    pub destination: RelayId,
    /// The path in use.
    pub primary: Route,
    /// A path sharing no link with the primary (and no transit relay where
    /// the graph allows), used at once when the primary's first link fails.
    pub backup: Option<Route>,
}

/// Why a route table was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteTableError {
    /// Entries must be sorted by destination without duplicates.
    #[error("entries are not sorted by destination or repeat one ({0})")]
    Unsorted(RelayId),
    /// A path must run from the table's source to the entry's destination.
    #[error("a path to {0} does not run from the source to the destination")]
    WrongEnds(RelayId),
    /// A path visits a relay twice.
    #[error("a path to {0} visits a relay twice")]
    Loop(RelayId),
}

/// All routes of one source relay, as of one epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RouteTableWire", into = "RouteTableWire")]
pub struct RouteTable {
    source: RelayId,
    epoch: u64,
    entries: Vec<RouteEntry>,
    /// The entries' destinations, in order: `get` searches these four-byte
    /// keys instead of the ~150-byte entries, where every probe of the
    /// binary search missed the cache.
    destinations: Vec<RelayId>,
}

#[derive(Serialize, Deserialize)]
struct RouteTableWire {
    source: RelayId,
    epoch: u64,
    entries: Vec<RouteEntry>,
}

impl TryFrom<RouteTableWire> for RouteTable {
    type Error = RouteTableError;
    fn try_from(w: RouteTableWire) -> Result<Self, Self::Error> {
        RouteTable::new(w.source, w.epoch, w.entries)
    }
}

impl From<RouteTable> for RouteTableWire {
    fn from(t: RouteTable) -> Self {
        RouteTableWire {
            source: t.source,
            epoch: t.epoch,
            entries: t.entries,
        }
    }
}

impl RouteTable {
    /// Builds a table, checking that entries are sorted by destination and
    /// every path is a simple path from `source` to its destination.
    pub fn new(
        source: RelayId,
        epoch: u64,
        entries: Vec<RouteEntry>,
    ) -> Result<Self, RouteTableError> {
        for pair in entries.windows(2) {
            if pair[0].destination >= pair[1].destination {
                return Err(RouteTableError::Unsorted(pair[1].destination));
            }
        }
        for e in &entries {
            for route in std::iter::once(&e.primary).chain(&e.backup) {
                let hops = &route.hops;
                if hops.len() < 2 || hops[0] != source || hops[hops.len() - 1] != e.destination {
                    return Err(RouteTableError::WrongEnds(e.destination));
                }
                if hops.iter().enumerate().any(|(i, h)| hops[..i].contains(h)) {
                    return Err(RouteTableError::Loop(e.destination));
                }
            }
        }
        Ok(Self::unchecked(source, epoch, entries))
    }

    fn unchecked(source: RelayId, epoch: u64, entries: Vec<RouteEntry>) -> Self {
        let destinations = entries.iter().map(|e| e.destination).collect();
        Self {
            source,
            epoch,
            entries,
            destinations,
        }
    }

    /// A table the router built: sorted simple paths by construction, so
    /// the checks of [`RouteTable::new`] are skipped (debug builds assert).
    pub(crate) fn from_computed(source: RelayId, entries: Vec<RouteEntry>) -> Self {
        debug_assert!(Self::new(source, 0, entries.clone()).is_ok());
        Self::unchecked(source, 0, entries)
    }

    /// An empty table.
    pub fn empty(source: RelayId) -> Self {
        Self::unchecked(source, 0, Vec::new())
    }

    /// The relay these routes start at.
    pub fn source(&self) -> RelayId {
        self.source
    }

    /// The epoch the table belongs to; newer tables have larger epochs.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Stamps the table with an epoch.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.epoch = epoch;
    }

    /// Entries in destination order.
    pub fn entries(&self) -> &[RouteEntry] {
        &self.entries
    }

    /// Routes to `destination`.
    pub fn get(&self, destination: RelayId) -> Option<&RouteEntry> {
        self.destinations
            .binary_search(&destination)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Next hop of the primary path to `destination`.
    pub fn next_hop(&self, destination: RelayId) -> Option<RelayId> {
        self.get(destination).map(|e| e.primary.next_hop())
    }

    /// What changed from `self` to `newer`.
    pub fn diff(&self, newer: &RouteTable) -> RouteDiff {
        let mut diff = RouteDiff::default();
        let (mut a, mut b) = (
            self.entries.iter().peekable(),
            newer.entries.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(x), None) => {
                    diff.removed.push(x.destination);
                    a.next();
                }
                (None, Some(y)) => {
                    diff.added.push(y.destination);
                    b.next();
                }
                (Some(x), Some(y)) => match x.destination.cmp(&y.destination) {
                    std::cmp::Ordering::Less => {
                        diff.removed.push(x.destination);
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        diff.added.push(y.destination);
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if x.primary.hops != y.primary.hops {
                            diff.primary_changed.push(x.destination);
                        }
                        let hops = |e: &RouteEntry| e.backup.as_ref().map(|r| r.hops.clone());
                        if hops(x) != hops(y) {
                            diff.backup_changed.push(x.destination);
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        diff
    }
}

/// Destinations whose routes differ between two tables of one source.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDiff {
    /// Newly reachable.
    pub added: Vec<RelayId>,
    /// No longer reachable.
    pub removed: Vec<RelayId>,
    /// Primary path changed.
    pub primary_changed: Vec<RelayId>,
    /// Backup path changed (or appeared, or vanished).
    pub backup_changed: Vec<RelayId>,
}

impl RouteDiff {
    /// True when nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.primary_changed.is_empty()
            && self.backup_changed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smallvec::smallvec;

    fn route(hops: &[u32]) -> Route {
        Route {
            hops: hops.iter().map(|&h| RelayId(h)).collect(),
            metrics: Metrics::default(),
            cost: 0.0,
            poor: false,
        }
    }

    fn entry(dst: u32, primary: &[u32], backup: Option<&[u32]>) -> RouteEntry {
        RouteEntry {
            destination: RelayId(dst),
            primary: route(primary),
            backup: backup.map(route),
        }
    }

    #[test]
    fn rejects_malformed_tables() {
        let src = RelayId(1);
        assert_eq!(
            RouteTable::new(
                src,
                1,
                vec![entry(3, &[1, 3], None), entry(2, &[1, 2], None)]
            ),
            Err(RouteTableError::Unsorted(RelayId(2)))
        );
        assert_eq!(
            RouteTable::new(src, 1, vec![entry(3, &[2, 3], None)]),
            Err(RouteTableError::WrongEnds(RelayId(3)))
        );
        assert_eq!(
            RouteTable::new(src, 1, vec![entry(3, &[1, 2, 1, 3], None)]),
            Err(RouteTableError::Loop(RelayId(3)))
        );
        // Deserialisation goes through the same checks.
        let wire = RouteTableWire {
            source: src,
            epoch: 1,
            entries: vec![entry(2, &[1], None)],
        };
        assert_eq!(
            RouteTable::try_from(wire),
            Err(RouteTableError::WrongEnds(RelayId(2)))
        );
    }

    #[test]
    fn diff_reports_each_kind_of_change() {
        let src = RelayId(1);
        let old = RouteTable::new(
            src,
            1,
            vec![
                entry(2, &[1, 2], Some(&[1, 3, 2])),
                entry(3, &[1, 3], None),
                entry(4, &[1, 4], None),
            ],
        )
        .unwrap();
        let new = RouteTable::new(
            src,
            2,
            vec![
                entry(2, &[1, 2], Some(&[1, 4, 2])),
                entry(4, &[1, 2, 4], None),
                entry(5, &[1, 5], None),
            ],
        )
        .unwrap();
        let d = old.diff(&new);
        assert_eq!(d.added, vec![RelayId(5)]);
        assert_eq!(d.removed, vec![RelayId(3)]);
        assert_eq!(d.primary_changed, vec![RelayId(4)]);
        assert_eq!(d.backup_changed, vec![RelayId(2)]);
        assert!(old.diff(&old).is_empty());
        assert_eq!(new.next_hop(RelayId(4)), Some(RelayId(2)));
        assert_eq!(new.next_hop(RelayId(3)), None);
    }

    #[test]
    fn disjointness() {
        let a = route(&[1, 2, 3, 4]);
        let b = route(&[1, 5, 4]);
        let c = route(&[1, 2, 6, 4]);
        assert!(a.is_link_disjoint(&b) && a.is_transit_disjoint(&b));
        assert!(!a.is_link_disjoint(&c) && !a.is_transit_disjoint(&c));
        let h: Hops = smallvec![RelayId(1), RelayId(2), RelayId(3), RelayId(4)];
        assert!(!h.spilled(), "two transit relays fit inline");
    }
}
