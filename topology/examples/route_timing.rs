//! Quick timing of a full recomputation on the bench's synthetic mesh, or
//! with a third argument `overlay` on its sparse overlay:
//! `cargo run -p topology --release --example route_timing -- 300 5 [overlay]`.
//! It also prints a digest of the routes (every hop, cost and flag of
//! every primary and backup), so that two commits can be shown to compute
//! the same routes.
#![allow(clippy::disallowed_methods)]

#[path = "../benches/support/mesh.rs"]
mod mesh;

use std::time::Instant;
use topology::{RouteSet, RoutingConfig};

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(300);
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let g = match args.next().as_deref() {
        Some("overlay") => mesh::synthetic_overlay(n, 42),
        _ => mesh::synthetic_mesh(n, 42),
    };
    let config = RoutingConfig::default();
    let mut best = f64::INFINITY;
    let mut routes = RouteSet::default();
    for _ in 0..runs {
        let t = Instant::now();
        routes = std::hint::black_box(RouteSet::compute(&g, &config, None));
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!(
        "n={n}, {} links: best of {runs}: {:.1} ms; routes digest {:016x}",
        g.link_count(),
        best * 1e3,
        digest(&routes)
    );
}

/// FNV-1a over every route's hops, cost bits and poor flag, in order.
fn digest(routes: &RouteSet) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for table in routes.tables() {
        for e in table.entries() {
            for r in std::iter::once(&e.primary).chain(e.backup.as_ref()) {
                for hop in &r.hops {
                    eat(u64::from(hop.0));
                }
                eat(r.cost.to_bits());
                eat(u64::from(r.poor));
            }
            eat(u64::MAX); // entry separator
        }
    }
    h
}
