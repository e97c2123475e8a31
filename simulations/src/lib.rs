//! Simulations of the relay network and the route-quality report.
//!
//! - [`world`]: relay sites and base link metrics from real measurements
//!   (RIPE Atlas country RTTs, WonderNetwork sites), any latency matrix in
//!   CSV, or a built-in fallback world.
//! - [`report`]: the route-quality report, direct path against the best
//!   overlay path for every pair.
//!
//! The simulator proper (virtual time driving the relay and control-plane
//! cores) is added by the simulations issue.

pub mod geo;
pub mod report;
pub mod world;
