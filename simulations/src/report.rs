//! The route-quality report: for every pair of relay sites, the direct path
//! against the best overlay path.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use topology::{RelayId, Route, RouteSet, RoutingConfig};

use crate::world::World;

/// Pairs closer than this fiber RTT are left out of stretch figures: a ratio
/// over a near-zero bound says nothing.
const MIN_BOUND_FOR_STRETCH_MS: f64 = 5.0;

/// One path of a pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathSummary {
    /// Site codes from source to destination.
    pub hops: Vec<String>,
    /// Round-trip time, ms.
    pub rtt_ms: f64,
    /// Jitter, ms.
    pub jitter_ms: f64,
    /// Loss fraction.
    pub loss: f64,
    /// Additive cost.
    pub cost: f64,
    /// Fails the Via quality bar.
    pub poor: bool,
    /// RTT over the great-circle fiber RTT of the pair.
    pub stretch: f64,
}

/// Direct and overlay path of one ordered pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairResult {
    /// Source site code.
    pub src: String,
    /// Destination site code.
    pub dst: String,
    /// Great-circle fiber RTT between the sites, ms.
    pub fiber_bound_ms: f64,
    /// The direct link.
    pub direct: PathSummary,
    /// The router's primary path.
    pub overlay: PathSummary,
    /// The overlay leaves the direct link for a better path (not poor where
    /// the direct link is, or cheaper).
    pub improved: bool,
}

/// Median and 90th percentile.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Spread {
    /// 50th percentile.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(f64::total_cmp);
        Spread {
            median: percentile(&values, 0.5),
            p90: percentile(&values, 0.9),
        }
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// The whole report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteReport {
    /// Where the world's numbers come from.
    pub world: String,
    /// Site codes, one relay each.
    pub sites: Vec<String>,
    /// Ordered pairs with a direct measurement (the pairs compared).
    pub pairs: usize,
    /// Share of pairs whose overlay path is a detour (better than direct).
    pub improved_share: f64,
    /// RTT gain (direct minus overlay) over improved pairs, ms.
    pub rtt_gain_improved_ms: Spread,
    /// RTT gain over all pairs, ms.
    pub rtt_gain_all_ms: Spread,
    /// Share of pairs whose direct path is poor.
    pub poor_direct_share: f64,
    /// Share of pairs whose overlay path is poor.
    pub poor_overlay_share: f64,
    /// RTT over the fiber bound, direct paths.
    pub stretch_direct: Spread,
    /// RTT over the fiber bound, overlay paths.
    pub stretch_overlay: Spread,
    /// Overlay paths by number of relay hops (index 1 = direct).
    pub overlay_hops: Vec<usize>,
    /// Time to compute all routes, ms.
    pub compute_ms: f64,
    /// Every pair.
    pub pair_results: Vec<PairResult>,
}

impl RouteReport {
    /// Computes the report for `world`.
    #[allow(clippy::disallowed_methods)] // reports how long routing took
    pub fn compute(world: &World, config: &RoutingConfig) -> RouteReport {
        let graph = world.graph();
        let started = std::time::Instant::now();
        let routes = RouteSet::compute(&graph, config, None);
        let compute_ms = started.elapsed().as_secs_f64() * 1e3;
        let code = |r: RelayId| world.sites[r.0 as usize].code.clone();
        let summary = |r: &Route, bound: f64| PathSummary {
            hops: r.hops.iter().map(|&h| code(h)).collect(),
            rtt_ms: r.metrics.rtt_ms,
            jitter_ms: r.metrics.jitter_ms,
            loss: r.metrics.loss,
            cost: r.cost,
            poor: r.poor,
            stretch: r.metrics.rtt_ms / bound,
        };
        let mut pair_results = Vec::new();
        let mut overlay_hops = vec![0usize; 2];
        for (&(a, b), m) in &world.links {
            let (ra, rb) = (RelayId(a as u32), RelayId(b as u32));
            let Some(entry) = routes.route(ra, rb) else {
                continue;
            };
            let bound = world.sites[a].fiber_rtt_ms(&world.sites[b]);
            let direct = Route {
                hops: [ra, rb].into_iter().collect(),
                metrics: *m,
                cost: config.cost.link_cost(m),
                poor: config.cost.is_poor(m),
            };
            let hops = entry.primary.hops.len() - 1;
            if overlay_hops.len() <= hops {
                overlay_hops.resize(hops + 1, 0);
            }
            overlay_hops[hops] += 1;
            pair_results.push(PairResult {
                src: code(ra),
                dst: code(rb),
                fiber_bound_ms: bound,
                // With hysteresis off the router leaves the direct link only
                // for a path that is better by its objective.
                improved: hops > 1,
                direct: summary(&direct, bound),
                overlay: summary(&entry.primary, bound),
            });
        }
        let n = pair_results.len().max(1) as f64;
        let share = |f: &dyn Fn(&PairResult) -> bool| {
            pair_results.iter().filter(|p| f(p)).count() as f64 / n
        };
        let gain = |p: &PairResult| p.direct.rtt_ms - p.overlay.rtt_ms;
        let stretch = |f: &dyn Fn(&PairResult) -> f64| {
            Spread::of(
                pair_results
                    .iter()
                    .filter(|p| p.fiber_bound_ms >= MIN_BOUND_FOR_STRETCH_MS)
                    .map(f)
                    .collect(),
            )
        };
        RouteReport {
            world: world.source.clone(),
            sites: world.sites.iter().map(|s| s.code.clone()).collect(),
            pairs: pair_results.len(),
            improved_share: share(&|p| p.improved),
            rtt_gain_improved_ms: Spread::of(
                pair_results
                    .iter()
                    .filter(|p| p.improved)
                    .map(gain)
                    .collect(),
            ),
            rtt_gain_all_ms: Spread::of(pair_results.iter().map(gain).collect()),
            poor_direct_share: share(&|p| p.direct.poor),
            poor_overlay_share: share(&|p| p.overlay.poor),
            stretch_direct: stretch(&|p| p.direct.stretch),
            stretch_overlay: stretch(&|p| p.overlay.stretch),
            overlay_hops,
            compute_ms,
            pair_results,
        }
    }

    /// The human summary printed by the command.
    pub fn render_text(&self) -> String {
        let mut s = String::new();
        let pct = |x: f64| 100.0 * x;
        let _ = writeln!(s, "Route-quality report");
        let _ = writeln!(s, "  world:  {}", self.world);
        let _ = writeln!(
            s,
            "  relays: {} sites: {}",
            self.sites.len(),
            self.sites.join(" ")
        );
        let _ = writeln!(
            s,
            "  pairs compared (ordered, with a direct measurement): {}",
            self.pairs
        );
        let _ = writeln!(
            s,
            "  overlay improves {:.1} % of pairs; RTT gain on those: median {:.1} ms, p90 {:.1} ms",
            pct(self.improved_share),
            self.rtt_gain_improved_ms.median,
            self.rtt_gain_improved_ms.p90
        );
        let _ = writeln!(
            s,
            "  RTT gain over all pairs: median {:.1} ms, p90 {:.1} ms",
            self.rtt_gain_all_ms.median, self.rtt_gain_all_ms.p90
        );
        let _ = writeln!(
            s,
            "  poor pairs (RTT > 320 ms, loss > 1.2 % or jitter > 12 ms): direct {:.1} %, overlay {:.1} %",
            pct(self.poor_direct_share),
            pct(self.poor_overlay_share)
        );
        let _ = writeln!(
            s,
            "  stretch over the fiber bound: direct median {:.2}x p90 {:.2}x; overlay median {:.2}x p90 {:.2}x",
            self.stretch_direct.median,
            self.stretch_direct.p90,
            self.stretch_overlay.median,
            self.stretch_overlay.p90
        );
        let hops: Vec<String> = self
            .overlay_hops
            .iter()
            .enumerate()
            .skip(1)
            .map(|(h, c)| format!("{h} hop{}: {c}", if h == 1 { "" } else { "s" }))
            .collect();
        let _ = writeln!(s, "  overlay paths by relay hops: {}", hops.join(", "));
        let mut best: Vec<&PairResult> = self.pair_results.iter().filter(|p| p.improved).collect();
        best.sort_by(|a, b| {
            (b.direct.rtt_ms - b.overlay.rtt_ms).total_cmp(&(a.direct.rtt_ms - a.overlay.rtt_ms))
        });
        let _ = writeln!(s, "  largest gains:");
        for p in best.iter().take(5) {
            let _ = writeln!(
                s,
                "    {}->{}: direct {:.0} ms, via {} {:.0} ms",
                p.src,
                p.dst,
                p.direct.rtt_ms,
                p.overlay.hops.join(">"),
                p.overlay.rtt_ms
            );
        }
        let _ = writeln!(s, "  routes computed in {:.2} ms", self.compute_ms);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_world_report_is_consistent() {
        let world = World::builtin(&[]).unwrap();
        let r = RouteReport::compute(&world, &RoutingConfig::default());
        let n = world.sites.len();
        assert_eq!(r.pairs, n * (n - 1));
        assert!(r.improved_share > 0.0 && r.improved_share < 1.0);
        assert!(r.poor_overlay_share <= r.poor_direct_share);
        assert!(r.rtt_gain_improved_ms.median > 0.0);
        assert!(r.stretch_overlay.median <= r.stretch_direct.median);
        assert!(
            r.stretch_overlay.median >= 1.0,
            "no path beats light in fiber"
        );
        assert_eq!(r.overlay_hops.iter().sum::<usize>(), r.pairs);
        for p in &r.pair_results {
            let better_class = !p.overlay.poor && p.direct.poor;
            assert!(
                better_class || p.overlay.cost <= p.direct.cost + 1e-3,
                "{p:?}"
            );
            assert_eq!(p.improved, p.overlay.hops.len() > 2);
        }
        let text = r.render_text();
        assert!(text.contains("overlay improves"), "{text}");
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 5.0);
        assert_eq!(percentile(&v, 0.9), 9.0);
        assert_eq!(percentile(&v[..1], 0.9), 1.0);
    }
}
