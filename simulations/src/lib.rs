//! Simulations of the relay network and the route-quality report.
//!
//! - [`world`]: relay sites and base link metrics from real measurements
//!   (RIPE Atlas country RTTs, WonderNetwork sites), any latency matrix in
//!   CSV, or a built-in fallback world.
//! - [`report`]: the route-quality report, direct path against the best
//!   overlay path for every pair.
//! - [`scenario`]: scenario files (TOML): world, overlay, workload, events,
//!   checks.
//! - [`sim`]: the discrete-event simulator driving the relay and
//!   control-plane cores in virtual time.
//! - [`plots`]: SVG charts and the world map of a run.
//! - [`queue`]: the simulator's event queue.

pub mod geo;
pub mod plots;
pub mod queue;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod world;
