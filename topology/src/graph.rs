//! The overlay graph: relays and the directed links between them.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cost::Metrics;

/// Identifies a relay in the whole network. Operators assign it in the
/// relay's config; the control plane rejects duplicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RelayId(pub u32);

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What routing may do with a relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RelayState {
    /// Source, destination and transit.
    #[default]
    Active,
    /// Still serves its own clients (source and destination) but carries no
    /// transit traffic, so it can be emptied and taken down.
    Draining,
    /// Gone: no routes to, from or through it.
    Down,
}

impl RelayState {
    /// True when routes may pass through the relay.
    pub fn allows_transit(self) -> bool {
        self == RelayState::Active
    }

    /// True when routes may start or end at the relay.
    pub fn allows_endpoint(self) -> bool {
        self != RelayState::Down
    }
}

/// Errors from building a [`Graph`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GraphError {
    /// A link names a relay that was never added.
    #[error("relay {0} is not in the graph")]
    UnknownRelay(RelayId),
    /// A link from a relay to itself.
    #[error("link from relay {0} to itself")]
    SelfLink(RelayId),
    /// Metrics with NaN, infinite or negative values, or loss outside 0..=1.
    #[error("invalid metrics on link {from} -> {to}: {metrics:?}")]
    InvalidMetrics {
        /// Link source.
        from: RelayId,
        /// Link destination.
        to: RelayId,
        /// The rejected values.
        metrics: Metrics,
    },
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Node {
    state: RelayState,
    out: BTreeMap<RelayId, Metrics>,
}

/// Relays and directed links with their measured metrics. Links may be
/// asymmetric: `a -> b` and `b -> a` are independent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Graph {
    nodes: BTreeMap<RelayId, Node>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a relay (no-op if present) in the `Active` state.
    pub fn add_relay(&mut self, id: RelayId) {
        self.nodes.entry(id).or_default();
    }

    /// Removes a relay and every link to or from it.
    pub fn remove_relay(&mut self, id: RelayId) {
        self.nodes.remove(&id);
        for node in self.nodes.values_mut() {
            node.out.remove(&id);
        }
    }

    /// Sets a relay's state, adding the relay if needed.
    pub fn set_state(&mut self, id: RelayId, state: RelayState) {
        self.nodes.entry(id).or_default().state = state;
    }

    /// A relay's state, if it is in the graph.
    pub fn state(&self, id: RelayId) -> Option<RelayState> {
        self.nodes.get(&id).map(|n| n.state)
    }

    /// Sets (or replaces) the metrics of the directed link `from -> to`.
    pub fn set_link(
        &mut self,
        from: RelayId,
        to: RelayId,
        metrics: Metrics,
    ) -> Result<(), GraphError> {
        if from == to {
            return Err(GraphError::SelfLink(from));
        }
        if !metrics.is_valid() {
            return Err(GraphError::InvalidMetrics { from, to, metrics });
        }
        if !self.nodes.contains_key(&to) {
            return Err(GraphError::UnknownRelay(to));
        }
        let node = self
            .nodes
            .get_mut(&from)
            .ok_or(GraphError::UnknownRelay(from))?;
        node.out.insert(to, metrics);
        Ok(())
    }

    /// Removes the link `from -> to` if present.
    pub fn remove_link(&mut self, from: RelayId, to: RelayId) {
        if let Some(node) = self.nodes.get_mut(&from) {
            node.out.remove(&to);
        }
    }

    /// Metrics of the link `from -> to`.
    pub fn link(&self, from: RelayId, to: RelayId) -> Option<&Metrics> {
        self.nodes.get(&from)?.out.get(&to)
    }

    /// All relays with their states, in id order.
    pub fn relays(&self) -> impl Iterator<Item = (RelayId, RelayState)> + '_ {
        self.nodes.iter().map(|(&id, n)| (id, n.state))
    }

    /// All links `(from, to, metrics)`, ordered by `from` then `to`.
    pub fn links(&self) -> impl Iterator<Item = (RelayId, RelayId, &Metrics)> + '_ {
        self.nodes
            .iter()
            .flat_map(|(&from, n)| n.out.iter().map(move |(&to, m)| (from, to, m)))
    }

    /// Outgoing links of one relay.
    pub fn links_from(&self, from: RelayId) -> impl Iterator<Item = (RelayId, &Metrics)> + '_ {
        self.nodes
            .get(&from)
            .into_iter()
            .flat_map(|n| n.out.iter().map(|(&to, m)| (to, m)))
    }

    /// Number of relays.
    pub fn relay_count(&self) -> usize {
        self.nodes.len()
    }

    /// Number of directed links.
    pub fn link_count(&self) -> usize {
        self.nodes.values().map(|n| n.out.len()).sum()
    }

    /// Re-evaluates a path on this graph: its end-to-end metrics, or `None`
    /// when a link is missing, an endpoint is down or a transit relay does
    /// not allow transit.
    pub fn path_metrics(&self, hops: &[RelayId]) -> Option<Metrics> {
        let (&first, rest) = hops.split_first()?;
        let &last = rest.last()?;
        for (i, &id) in hops.iter().enumerate() {
            let state = self.state(id)?;
            let ok = if id == first || id == last {
                state.allows_endpoint()
            } else {
                state.allows_transit()
            };
            if !ok || hops[..i].contains(&id) {
                return None;
            }
        }
        hops.windows(2).try_fold(Metrics::default(), |acc, w| {
            self.link(w[0], w[1]).map(|m| acc.then(m))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_need_known_relays_and_valid_metrics() {
        let mut g = Graph::new();
        g.add_relay(RelayId(1));
        g.add_relay(RelayId(2));
        assert_eq!(
            g.set_link(RelayId(1), RelayId(3), Metrics::rtt(1.0)),
            Err(GraphError::UnknownRelay(RelayId(3)))
        );
        assert_eq!(
            g.set_link(RelayId(1), RelayId(1), Metrics::rtt(1.0)),
            Err(GraphError::SelfLink(RelayId(1)))
        );
        assert!(matches!(
            g.set_link(RelayId(1), RelayId(2), Metrics::rtt(f64::NAN)),
            Err(GraphError::InvalidMetrics { .. })
        ));
        g.set_link(RelayId(1), RelayId(2), Metrics::rtt(5.0))
            .unwrap();
        assert_eq!(g.link_count(), 1);
        assert!(
            g.link(RelayId(2), RelayId(1)).is_none(),
            "links are directed"
        );
        g.remove_relay(RelayId(2));
        assert_eq!(g.link_count(), 0);
    }

    #[test]
    fn path_metrics_respect_states() {
        let mut g = Graph::new();
        for i in 1..=3 {
            g.add_relay(RelayId(i));
        }
        g.set_link(RelayId(1), RelayId(2), Metrics::rtt(10.0))
            .unwrap();
        g.set_link(RelayId(2), RelayId(3), Metrics::rtt(20.0))
            .unwrap();
        let path = [RelayId(1), RelayId(2), RelayId(3)];
        assert_eq!(g.path_metrics(&path).unwrap().rtt_ms, 30.0);
        g.set_state(RelayId(2), RelayState::Draining);
        assert!(
            g.path_metrics(&path).is_none(),
            "draining relays carry no transit"
        );
        assert!(g.path_metrics(&path[..2]).is_some(), "but stay endpoints");
        g.set_state(RelayId(2), RelayState::Down);
        assert!(g.path_metrics(&path[..2]).is_none());
        assert!(g.path_metrics(&path[..1]).is_none(), "a path has two ends");
    }
}
