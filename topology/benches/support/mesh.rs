//! Synthetic world-like graphs for the routing benchmark: full meshes and
//! sparse overlays.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use topology::{Graph, Metrics, RelayId};

/// `n` relays at uniform random points on the globe, fully meshed. Each
/// directed link's RTT is the great-circle fiber delay (1 ms per 100 km of
/// round trip) times a random inflation in [1.3, 3.0] plus 2 ms, jitter
/// 0.2-4 ms; 5 % of links lose 0.5-5 % and 2 % have 10-40 ms of jitter.
#[allow(dead_code)] // not every user of this module uses both worlds
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

/// `n` relays in countries of about eight (a random point on the globe
/// each, the relays within 300 km of it), peered like the simulator's
/// overlay: three domestic peers (the country's first relay, its hub,
/// first), one relay in each of the four nearest other countries, and a
/// full mesh of the hubs. Link metrics are drawn as in [`synthetic_mesh`]
/// (per direction) and quantised to 0.1 ms like the control plane's.
/// About 16 links per relay: the sparse case, where backups rarely have a
/// two-hop path and most searches start below a hub.
#[allow(dead_code)] // not every user of this module uses both worlds
pub(crate) fn synthetic_overlay(n: u32, seed: u64) -> Graph {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let countries = n.div_ceil(8) as usize;
    let centres: Vec<(f64, f64)> = (0..countries)
        .map(|_| {
            let lat = (rng.random_range(-1.0f64..1.0)).asin().to_degrees();
            (lat, rng.random_range(-180.0..180.0))
        })
        .collect();
    // Relay `i` is in country `i % countries`; the first of each is its hub.
    let country = |i: usize| i % countries;
    let sites: Vec<(f64, f64)> = (0..n as usize)
        .map(|i| {
            let (lat, lon) = centres[country(i)];
            (
                lat + rng.random_range(-2.0..2.0),
                lon + rng.random_range(-2.0..2.0),
            )
        })
        .collect();
    let mut peers = std::collections::BTreeSet::new();
    for a in 0..n as usize {
        let domestic = (0..n as usize).filter(|&b| b != a && country(b) == country(a));
        let mut domestic: Vec<usize> = domestic.collect();
        domestic.sort_by_key(|&b| (b >= countries, b.abs_diff(a)));
        for &b in domestic.iter().take(3) {
            peers.insert((a.min(b), a.max(b)));
        }
        let mut foreign: Vec<(f64, usize)> = (0..n as usize)
            .filter(|&b| country(b) != country(a))
            .map(|b| (great_circle_km(sites[a], sites[b]), b))
            .collect();
        foreign.sort_by(|x, y| x.0.total_cmp(&y.0));
        let mut seen = std::collections::BTreeSet::new();
        for (_, b) in foreign {
            if seen.len() == 4 {
                break;
            }
            if seen.insert(country(b)) {
                peers.insert((a.min(b), a.max(b)));
            }
        }
        if a < countries {
            for b in 0..countries {
                if b != a {
                    peers.insert((a.min(b), a.max(b)));
                }
            }
        }
    }
    let mut g = Graph::new();
    for i in 0..n {
        g.add_relay(RelayId(i));
    }
    let q = |x: f64| (x * 10.0).round() / 10.0;
    for &(a, b) in &peers {
        let km = great_circle_km(sites[a], sites[b]);
        for (x, y) in [(a, b), (b, a)] {
            let mut m = Metrics {
                rtt_ms: q(km / 100.0 * rng.random_range(1.3..3.0) + 2.0),
                jitter_ms: q(rng.random_range(0.2..4.0)),
                loss: 0.0,
            };
            if rng.random_bool(0.05) {
                m.loss = rng.random_range(0.005..0.05);
            }
            g.set_link(RelayId(x as u32), RelayId(y as u32), m).unwrap();
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
