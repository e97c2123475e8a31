//! Synthetic world-like full meshes for the routing benchmark.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use topology::{Graph, Metrics, RelayId};

/// `n` relays at uniform random points on the globe, fully meshed. Each
/// directed link's RTT is the great-circle fiber delay (1 ms per 100 km of
/// round trip) times a random inflation in [1.3, 3.0] plus 2 ms, jitter
/// 0.2-4 ms; 5 % of links lose 0.5-5 % and 2 % have 10-40 ms of jitter.
pub(crate) fn synthetic_mesh(n: u32, seed: u64) -> Graph {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let sites: Vec<(f64, f64)> = (0..n)
        .map(|_| {
            // Uniform on the sphere.
            let lat = (rng.random_range(-1.0f64..1.0)).asin().to_degrees();
            let lon = rng.random_range(-180.0..180.0);
            (lat, lon)
        })
        .collect();
    let mut g = Graph::new();
    for i in 0..n {
        g.add_relay(RelayId(i));
    }
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let km = great_circle_km(sites[i as usize], sites[j as usize]);
            let mut m = Metrics {
                rtt_ms: km / 100.0 * rng.random_range(1.3..3.0) + 2.0,
                jitter_ms: rng.random_range(0.2..4.0),
                loss: 0.0,
            };
            if rng.random_bool(0.05) {
                m.loss = rng.random_range(0.005..0.05);
            }
            if rng.random_bool(0.02) {
                m.jitter_ms = rng.random_range(10.0..40.0);
            }
            g.set_link(RelayId(i), RelayId(j), m).unwrap();
        }
    }
    g
}

fn great_circle_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}
