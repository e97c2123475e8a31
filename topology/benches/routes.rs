//! Full route recomputation (primary + backup for every ordered pair) on
//! synthetic world-like full meshes of 100, 300 and 1,000 relays, and on
//! sparse overlays (about 16 links per relay, hubs) of 300 and 1,000.
//!
//! Relays sit at random points on the globe. Each directed link's RTT is the
//! great-circle fiber delay (1 ms per 100 km of round trip) times a random
//! inflation in [1.3, 3.0] plus 2 ms, with a little jitter; 5 % of links
//! are lossy (0.5-5 %) and 2 % jittery, so both search phases and the
//! backup fallbacks run as they would on real data.
//!
//! Run: `cargo bench -p topology`. Besides criterion's timings it prints a
//! per-size summary with the two-hop-scan share, measured in the same run.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use topology::{RouteSet, RoutingConfig};

#[path = "support/mesh.rs"]
mod mesh;
use mesh::{synthetic_mesh, synthetic_overlay};

fn bench_routes(c: &mut Criterion) {
    let config = RoutingConfig::default();
    let mut group = c.benchmark_group("full_recompute");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for n in [100u32, 300, 1000] {
        let g = synthetic_mesh(n, 42);
        let first = RouteSet::compute(&g, &config, None);
        group.bench_with_input(BenchmarkId::new("cold", n), &g, |b, g| {
            b.iter(|| black_box(RouteSet::compute(g, &config, None)))
        });
        group.bench_with_input(BenchmarkId::new("with_hysteresis", n), &g, |b, g| {
            b.iter(|| black_box(RouteSet::compute(g, &config, Some(&first))))
        });
        let multi_hop = first
            .tables()
            .iter()
            .flat_map(|t| t.entries())
            .filter(|e| e.primary.hops.len() > 2)
            .count();
        let with_backup = first
            .tables()
            .iter()
            .flat_map(|t| t.entries())
            .filter(|e| e.backup.is_some())
            .count();
        eprintln!(
            "n={n}: {} pairs, {:.1} % use a detour, {:.1} % have a backup",
            first.pair_count(),
            100.0 * multi_hop as f64 / first.pair_count() as f64,
            100.0 * with_backup as f64 / first.pair_count() as f64,
        );
    }
    group.finish();

    // The simulator's kind of overlay: about 16 links per relay, hubs.
    let mut group = c.benchmark_group("sparse_overlay");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for n in [300u32, 1000] {
        let g = synthetic_overlay(n, 42);
        group.bench_with_input(BenchmarkId::new("cold", n), &g, |b, g| {
            b.iter(|| black_box(RouteSet::compute(g, &config, None)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_routes);
criterion_main!(benches);
