//! Quick timing of a full recomputation on the bench's synthetic mesh:
//! `cargo run -p topology --release --example route_timing -- 300 5`.
#![allow(clippy::disallowed_methods)]

#[path = "../benches/support/mesh.rs"]
mod mesh;

use std::time::Instant;
use topology::{RouteSet, RoutingConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let g = mesh::synthetic_mesh(n, 42);
    let config = RoutingConfig::default();
    let mut best = f64::INFINITY;
    for _ in 0..runs {
        let t = Instant::now();
        let routes = RouteSet::compute(&g, &config, None);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(routes);
    }
    println!("n={n}: best of {runs}: {:.1} ms", best * 1e3);
}
