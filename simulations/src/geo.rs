//! Geography: sites, great-circle distances and the speed-of-light bound.

use serde::{Deserialize, Serialize};
pub use topology::geo::great_circle_km;

/// Light in fiber travels at about 2/3 c: 200 km per millisecond one way,
/// so 100 km of distance cost 1 ms of round trip.
const FIBER_KM_PER_RTT_MS: f64 = 100.0;

/// A place on the globe where a relay (or a client) sits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Site {
    /// Short name, unique in a world: an ISO 3166 country code for the
    /// country worlds, anything for a matrix given on the command line.
    pub code: String,
    /// Human name of the place.
    pub city: String,
    /// Latitude, degrees.
    pub lat: f64,
    /// Longitude, degrees.
    pub lon: f64,
}

impl Site {
    /// Great-circle distance to `other`, km (haversine).
    pub fn distance_km(&self, other: &Site) -> f64 {
        great_circle_km((self.lat, self.lon), (other.lat, other.lon))
    }

    /// Lowest possible RTT to `other` over fiber along the great circle, ms.
    pub fn fiber_rtt_ms(&self, other: &Site) -> f64 {
        self.distance_km(other) / FIBER_KM_PER_RTT_MS
    }
}
