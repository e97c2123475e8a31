//! Route computation for the relay overlay: pure, deterministic, no I/O.
//!
//! This crate decides *where packets go*. The relay daemon, the control
//! plane and the simulator all call it, so it has no sockets, no tasks and
//! no clock: time is an argument.
//!
//! # Model
//! - [`LinkMetrics`] turns probe events (sent, echoed, timed out) into a
//!   smoothed RTT, RFC 3550 jitter and windowed loss for one directed link.
//! - [`CostModel`] maps link [`Metrics`] to an additive cost
//!   (`rtt + a*jitter + b*-ln(1-loss) + hop_penalty`) and decides whether a
//!   path is *poor* (RTT > 320 ms, loss > 1.2 % or jitter > 12 ms, after Via,
//!   SIGCOMM 2016).
//! - [`Graph`] holds relays (active, draining or down) and directed links.
//! - [`RouteSet::compute`] finds, for every ordered pair, a primary path
//!   (fewest poor paths first, then lowest cost) and a backup that shares no
//!   link with it, applying hysteresis against the previous set.
//! - [`RouteTable`] is one source relay's slice of that, with an epoch and a
//!   [`RouteDiff`] between versions.
//!
//! # Driving it
//! ```
//! use topology::{Graph, Metrics, RelayId, RouteSet, RoutingConfig};
//!
//! let mut g = Graph::new();
//! for id in 1..=3 {
//!     g.add_relay(RelayId(id));
//! }
//! g.set_link(RelayId(1), RelayId(3), Metrics::rtt(250.0)).unwrap();
//! g.set_link(RelayId(1), RelayId(2), Metrics::rtt(60.0)).unwrap();
//! g.set_link(RelayId(2), RelayId(3), Metrics::rtt(70.0)).unwrap();
//!
//! let routes = RouteSet::compute(&g, &RoutingConfig::default(), None);
//! let entry = routes.route(RelayId(1), RelayId(3)).unwrap();
//! assert_eq!(entry.primary.next_hop(), RelayId(2));
//! assert_eq!(entry.backup.as_ref().unwrap().hops.as_slice(), &[RelayId(1), RelayId(3)]);
//!
//! // Next round: pass the current set so pairs only move for a clear gain.
//! let next = RouteSet::compute(&g, &RoutingConfig::default(), Some(&routes));
//! assert_eq!(routes.changes(&next).primary_changed, 0);
//! ```
#![cfg_attr(test, allow(clippy::disallowed_methods))]

pub mod cost;
pub mod geo;
pub mod graph;
pub mod metrics;
pub mod routing;
pub mod table;

pub use cost::{CostModel, CostWeights, Metrics, PoorThresholds};
pub use graph::{Graph, GraphError, RelayId, RelayState};
pub use metrics::{LinkHealth, LinkMetrics, LinkMetricsConfig, LinkStats};
pub use routing::{FixedRoutes, RouteSet, RouteSetChanges, RoutingConfig};
pub use table::{Hops, Route, RouteDiff, RouteEntry, RouteTable, RouteTableError};
