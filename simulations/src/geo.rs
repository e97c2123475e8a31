//! Geography: sites, great-circle distances and the speed-of-light bound.

use serde::{Deserialize, Serialize};

/// Mean Earth radius, km.
const EARTH_RADIUS_KM: f64 = 6371.0;

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

/// Haversine distance between two `(lat, lon)` points in degrees, km.
pub fn great_circle_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1) = (a.0.to_radians(), a.1.to_radians());
    let (la2, lo2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_distances() {
        // Singapore - Jakarta is about 895 km; London - New York about 5,570 km.
        let sg = (1.3521, 103.8198);
        let jkt = (-6.2088, 106.8456);
        assert!((great_circle_km(sg, jkt) - 895.0).abs() < 20.0);
        let lon = (51.5074, -0.1278);
        let nyc = (40.7128, -74.0060);
        assert!((great_circle_km(lon, nyc) - 5570.0).abs() < 30.0);
        assert_eq!(great_circle_km(sg, sg), 0.0);
    }
}
