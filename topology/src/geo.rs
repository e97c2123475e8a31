//! Great-circle geometry, shared by the simulator (fiber delay bounds) and
//! the SDK (ordering relays by distance before probing them).

/// Mean Earth radius, km.
const EARTH_RADIUS_KM: f64 = 6371.0;

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
