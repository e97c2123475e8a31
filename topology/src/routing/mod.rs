//! All-pairs route computation: primary and backup paths with hysteresis.
//!
//! # Objective
//! For each ordered pair the router minimises poor paths first and cost
//! second. A path containing a poor link is poor (every metric only grows
//! along a path), so the router first searches the subgraph of non-poor
//! links: the cheapest path there, if it is not poor as a whole, is optimal.
//! Otherwise (no such path, or one that is poor by its sums) it also takes
//! the cheapest path over all links and the direct link, and keeps the best
//! of the three. Finding a non-poor path that is not the cheapest in its
//! subgraph is a constrained shortest-path problem (NP-hard); beyond the
//! direct link we do not attempt it.
//!
//! # Backups
//! The backup of a pair shares no link with its primary and, where the graph
//! allows, no transit relay. It is the cheapest of the direct link and the
//! two-hop paths through a relay off the primary; failing those, the best
//! loop-free alternate (RFC 5286: a neighbour whose own primary avoids this
//! relay and the primary's relays and links); only when none exists does
//! the router search longer paths (first avoiding the primary's transit
//! relays and links, then only its links). In a mesh that search is rare;
//! in a sparse overlay it is common, so it is made cheap: destinations
//! behind the same transit relays share one search; a search repairs the
//! source's unrestricted shortest-path tree (only the relays below a
//! blocked relay or link are searched again); and the tree avoiding
//! `[a, b]` is repaired from the one avoiding `[a]`, so a hub carrying half
//! the tree is searched around once per source, not once per transit set.
//!
//! # Hysteresis
//! With the previous route set given, a pair keeps its current primary
//! unless that path is broken (a link gone, a relay down or no longer
//! allowed to carry transit), or the new best is clearly better: not poor
//! while the current is poor, or at the same quality level with a cost
//! below `switch_ratio` times the current cost. Requiring the margin between
//! two poor paths as well keeps pairs without a good path from flapping.
//!
//! # Complexity
//! Dense Dijkstra is `O(n^2)` per source and the two-hop backup scan
//! `O(n^2)` per source, so `O(n^3)` in all over tight arrays; see the
//! `routes` benchmark.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

mod kernels;
use kernels::argmin;

use crate::cost::{CostModel, Metrics};
use crate::graph::{Graph, RelayId};
use crate::table::{Route, RouteEntry, RouteTable};

/// Everything that steers route computation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Link cost and the poor-path bar.
    pub cost: CostModel,
    /// A pair moves to a new primary of the same quality level only when
    /// its cost is below this fraction of the current path's cost.
    pub switch_ratio: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            cost: CostModel::default(),
            switch_ratio: 0.9,
        }
    }
}

/// Route tables for every source relay of a graph.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RouteSet {
    tables: Vec<RouteTable>,
}

/// Summary of the changes between two route sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSetChanges {
    /// Pairs that gained a route.
    pub added: usize,
    /// Pairs that lost their route.
    pub removed: usize,
    /// Pairs whose primary path changed.
    pub primary_changed: usize,
    /// Pairs whose backup path changed.
    pub backup_changed: usize,
}

impl RouteSet {
    /// Computes primary and backup routes for every pair of non-down
    /// relays. With `previous`, pairs keep their current primary unless the
    /// hysteresis rule above says to move.
    pub fn compute(graph: &Graph, config: &RoutingConfig, previous: Option<&RouteSet>) -> RouteSet {
        let mut dense = Dense::new(graph, &config.cost);
        let mut work = Workspace::new(dense.n);
        // Every source's primaries first: backups use the neighbours'.
        let all: Vec<Vec<Option<Path>>> = (0..dense.n)
            .map(|s| {
                let prev = previous.and_then(|p| p.table(dense.ids[s]));
                dense.primaries_for(s, config, prev, &mut work)
            })
            .collect();
        let tables = (0..dense.n)
            .map(|s| dense.with_backups(s, &all, &mut work))
            .collect();
        RouteSet { tables }
    }

    /// Primary routes only (no backups), with the same hysteresis: what
    /// the control plane needs to decide an epoch, at half the cost.
    pub fn primaries(
        graph: &Graph,
        config: &RoutingConfig,
        previous: Option<&RouteSet>,
    ) -> RouteSet {
        let mut dense = Dense::new(graph, &config.cost);
        let mut work = Workspace::new(dense.n);
        let tables = (0..dense.n)
            .map(|s| {
                let prev = previous.and_then(|p| p.table(dense.ids[s]));
                let primaries = dense.primaries_for(s, config, prev, &mut work);
                dense.table(s, &primaries, None)
            })
            .collect();
        RouteSet { tables }
    }

    /// Backups for fixed primaries: the given set's primary paths (as
    /// decided elsewhere, e.g. replicated by the control plane) with their
    /// metrics re-evaluated on `graph` and a backup computed for each.
    /// Primaries broken on this graph are dropped.
    pub fn with_backups(graph: &Graph, config: &RoutingConfig, primaries: &RouteSet) -> RouteSet {
        let mut fixed = FixedRoutes::new(graph, config, primaries);
        let tables = (0..fixed.dense.n).map(|s| fixed.table_at(s)).collect();
        RouteSet { tables }
    }

    /// A set made of given tables (sorted by source).
    pub fn from_tables(mut tables: Vec<RouteTable>) -> RouteSet {
        tables.sort_by_key(|t| t.source());
        tables.dedup_by_key(|t| t.source());
        RouteSet { tables }
    }

    /// All tables, in source order.
    pub fn tables(&self) -> &[RouteTable] {
        &self.tables
    }

    /// Consumes the set into its tables.
    pub fn into_tables(self) -> Vec<RouteTable> {
        self.tables
    }

    /// The table of one source.
    pub fn table(&self, source: RelayId) -> Option<&RouteTable> {
        self.tables
            .binary_search_by_key(&source, |t| t.source())
            .ok()
            .map(|i| &self.tables[i])
    }

    /// Routes for one pair.
    pub fn route(&self, source: RelayId, destination: RelayId) -> Option<&RouteEntry> {
        self.table(source)?.get(destination)
    }

    /// Stamps every table with `epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        for t in &mut self.tables {
            t.set_epoch(epoch);
        }
    }

    /// Number of pairs with a route.
    pub fn pair_count(&self) -> usize {
        self.tables.iter().map(|t| t.entries().len()).sum()
    }

    /// Counts what changed from `self` to `newer`.
    pub fn changes(&self, newer: &RouteSet) -> RouteSetChanges {
        let mut c = RouteSetChanges::default();
        let empty = |s| RouteTable::empty(s);
        let mut sources: Vec<RelayId> = self
            .tables
            .iter()
            .chain(&newer.tables)
            .map(|t| t.source())
            .collect();
        sources.sort();
        sources.dedup();
        for s in sources {
            let (a, b) = (self.table(s).cloned(), newer.table(s).cloned());
            let d = a
                .unwrap_or_else(|| empty(s))
                .diff(&b.unwrap_or_else(|| empty(s)));
            c.added += d.added.len();
            c.removed += d.removed.len();
            c.primary_changed += d.primary_changed.len();
            c.backup_changed += d.backup_changed.len();
        }
        c
    }
}

/// Fixed primaries on one graph, with backups computed one source at a
/// time: [`RouteSet::with_backups`] for the sources asked about only. A
/// source's table does not depend on which others were computed before
/// it, so a caller that needs few tables (the simulator installs backups
/// only once a relay could use them) gets the same tables for less.
pub struct FixedRoutes {
    dense: Dense,
    /// Every source's primaries, re-evaluated on the graph: a source's
    /// backups read its neighbours' (loop-free alternates).
    all: Vec<Vec<Option<Path>>>,
    work: Workspace,
}

impl FixedRoutes {
    /// The given set's primary paths with their metrics re-evaluated on
    /// `graph`; primaries broken there are dropped.
    pub fn new(graph: &Graph, config: &RoutingConfig, primaries: &RouteSet) -> FixedRoutes {
        let dense = Dense::new(graph, &config.cost);
        let work = Workspace::new(dense.n);
        let all = (0..dense.n)
            .map(|s| dense.fixed_primaries(s, primaries.table(dense.ids[s])))
            .collect();
        FixedRoutes { dense, all, work }
    }

    /// `source`'s table without backups; `None` for a relay not in the
    /// graph (or down).
    pub fn primaries(&self, source: RelayId) -> Option<RouteTable> {
        let s = self.dense.index(source)?;
        Some(self.dense.table(s, &self.all[s], None))
    }

    /// `source`'s table with backups, as [`RouteSet::with_backups`] has
    /// it; `None` for a relay not in the graph (or down).
    pub fn with_backups(&mut self, source: RelayId) -> Option<RouteTable> {
        let s = self.dense.index(source)?;
        Some(self.table_at(s))
    }

    fn table_at(&mut self, s: usize) -> RouteTable {
        self.dense.with_backups(s, &self.all, &mut self.work)
    }
}

impl std::fmt::Debug for FixedRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedRoutes")
            .field("relays", &self.dense.n)
            .finish_non_exhaustive()
    }
}

const NONE: u32 = u32::MAX;

/// A path over relay indices with its quality, before it becomes a [`Route`].
#[derive(Debug, Clone)]
struct Path {
    idx: SmallVec<[u32; 6]>,
    metrics: Metrics,
    cost: f64,
    poor: bool,
}

impl Path {
    fn transit(&self) -> &[u32] {
        &self.idx[1..self.idx.len() - 1]
    }

    fn beats(&self, other: &Path) -> bool {
        better((self.poor, self.cost), (other.poor, other.cost))
    }
}

/// Lexicographic order of the router's objective: not poor beats poor,
/// then lower cost.
fn better(a: (bool, f64), b: (bool, f64)) -> bool {
    let (a_poor, a_cost) = a;
    let (b_poor, b_cost) = b;
    (!a_poor && b_poor) || (a_poor == b_poor && a_cost < b_cost)
}

/// The graph as dense matrices over the relays that are not down.
struct Dense {
    n: usize,
    /// Relay ids in increasing order; a relay's index is its position.
    ids: Vec<RelayId>,
    transit: Vec<bool>,
    /// Link cost, `INFINITY` where there is no link (and on the diagonal).
    /// `f32` halves memory traffic and doubles SIMD width in the `O(n^3)`
    /// loops. Route costs are these link costs summed.
    cost: Vec<f32>,
    /// Like `cost` but `INFINITY` on poor links too; `None` if no link is poor.
    good_cost: Option<Vec<f32>>,
    /// Link metrics, compact so that more of the matrix stays in cache.
    metrics: Vec<CompactMetrics>,
    model: CostModel,
    /// Out- and in-neighbours per relay, for the loop-free alternates and
    /// for repairing trees: in a sparse overlay a list is much shorter than
    /// a matrix row or column.
    neighbours: Vec<Vec<u32>>,
    in_neighbours: Vec<Vec<u32>>,
}

/// [`Metrics`] of one link in single precision.
#[derive(Debug, Clone, Copy, Default)]
struct CompactMetrics {
    rtt_ms: f32,
    jitter_ms: f32,
    loss: f32,
}

impl CompactMetrics {
    fn widen(self) -> Metrics {
        Metrics {
            rtt_ms: f64::from(self.rtt_ms),
            jitter_ms: f64::from(self.jitter_ms),
            loss: f64::from(self.loss),
        }
    }
}

/// Scratch buffers reused across sources.
struct Workspace {
    full: Tree,
    good: Tree,
    scratch: Tree,
    repair: Repair,
    /// Cheapest two-hop path to each destination off its primary: cost and
    /// intermediate relay.
    two_hop_cost: Vec<f32>,
    two_hop_via: Vec<u32>,
    spare_cost: Vec<f32>,
    spare_via: Vec<u32>,
    /// Per relay `m`: the destinations whose primary runs through `m`.
    on_primary: Buckets,
    saved: Vec<f32>,
    /// Destinations grouped by their two-hop relay (the last group: those
    /// without one), the order backups are computed in.
    visit: Buckets,
    /// For the last-resort search while `scratch` holds a shared tree.
    fallback: Tree,
    /// Trees avoiding ever longer prefixes of a transit set.
    levels: Vec<Tree>,
}

impl Workspace {
    fn new(n: usize) -> Self {
        Self {
            full: Tree::new(n),
            good: Tree::new(n),
            scratch: Tree::new(n),
            repair: Repair {
                affected: Vec::with_capacity(n),
                keys: Vec::with_capacity(n),
                cut: vec![false; n],
                slot: vec![NONE; n],
                marks: vec![false; n],
            },
            two_hop_cost: vec![f32::INFINITY; n],
            two_hop_via: vec![NONE; n],
            spare_cost: vec![f32::INFINITY; n],
            spare_via: vec![NONE; n],
            on_primary: Buckets::default(),
            saved: Vec::with_capacity(n),
            visit: Buckets::default(),
            fallback: Tree::new(n),
            levels: Vec::new(),
        }
    }
}

/// Scratch for [`Dense::research`]: the relays whose path in a base tree
/// is not allowed in the tree being built from it, their tentative
/// distances, and a mark per relay that is cut off (all false between
/// uses).
struct Repair {
    affected: Vec<usize>,
    keys: Vec<f32>,
    cut: Vec<bool>,
    /// Position of an affected relay in `affected` (`NONE` otherwise).
    slot: Vec<u32>,
    /// Marks the relays a search still has to settle (all false between
    /// uses).
    marks: Vec<bool>,
}

/// Small integers grouped by a key in `0..keys`: a counting sort, `O(n)`
/// where a comparison sort showed up in the profile.
#[derive(Default)]
struct Buckets {
    /// Group `k` is `items[start[k]..start[k + 1]]`.
    start: Vec<u32>,
    items: Vec<u32>,
}

impl Buckets {
    /// Regroups `(key, item)` pairs (items keep their order within a group).
    fn fill<I: Iterator<Item = (u32, u32)> + Clone>(&mut self, keys: usize, pairs: I) {
        self.start.clear();
        self.start.resize(keys + 1, 0);
        for (k, _) in pairs.clone() {
            self.start[k as usize + 1] += 1;
        }
        for k in 0..keys {
            self.start[k + 1] += self.start[k];
        }
        self.items.clear();
        self.items.resize(self.start[keys] as usize, 0);
        // `start[k]` runs ahead while group `k` fills; shifting back
        // afterwards restores it.
        for (k, item) in pairs {
            let slot = &mut self.start[k as usize];
            self.items[*slot as usize] = item;
            *slot += 1;
        }
        self.start.copy_within(0..keys, 1);
        self.start[0] = 0;
    }

    fn group(&self, k: usize) -> &[u32] {
        &self.items[self.start[k] as usize..self.start[k + 1] as usize]
    }
}

/// A shortest-path tree from one source.
struct Tree {
    /// Distances. During the search a settled relay's distance is stored
    /// negated: relaxation (`candidate < dist`, candidates are never
    /// negative) then leaves it alone, and the minimum scan skips it because
    /// negative floats compare above infinity as bit patterns. No separate
    /// flag array is needed in the two hot loops.
    dist: Vec<f32>,
    parent: Vec<u32>,
    /// Scratch for [`kernels::relax`].
    spare_dist: Vec<f32>,
    spare_parent: Vec<u32>,
    /// Relays in settle order (parents before children).
    order: Vec<u32>,
    metrics: Vec<Metrics>,
    /// Whether the tree path crosses a poor link.
    uses_poor: Vec<bool>,
}

impl Tree {
    fn new(n: usize) -> Self {
        Self {
            dist: vec![f32::INFINITY; n],
            parent: vec![NONE; n],
            spare_dist: vec![f32::INFINITY; n],
            spare_parent: vec![NONE; n],
            order: Vec::with_capacity(n),
            metrics: vec![Metrics::default(); n],
            uses_poor: vec![false; n],
        }
    }

    fn reachable(&self, v: usize) -> bool {
        self.dist[v].is_finite()
    }

    fn path_idx(&self, src: usize, dst: usize) -> SmallVec<[u32; 6]> {
        let mut idx = SmallVec::new();
        let mut v = dst as u32;
        while v != NONE {
            idx.push(v);
            if v as usize == src {
                break;
            }
            v = self.parent[v as usize];
        }
        idx.reverse();
        idx
    }
}

impl Dense {
    fn new(graph: &Graph, model: &CostModel) -> Dense {
        let relays: Vec<_> = graph
            .relays()
            .filter(|(_, s)| s.allows_endpoint())
            .collect();
        let n = relays.len();
        let ids: Vec<RelayId> = relays.iter().map(|&(id, _)| id).collect();
        let transit = relays.iter().map(|(_, s)| s.allows_transit()).collect();
        let mut cost = vec![f32::INFINITY; n * n];
        let mut metrics = vec![CompactMetrics::default(); n * n];
        let mut poor_links = Vec::new();
        for (from, to, m) in graph.links() {
            let (Ok(u), Ok(v)) = (ids.binary_search(&from), ids.binary_search(&to)) else {
                continue;
            };
            cost[u * n + v] = model.link_cost(m) as f32;
            metrics[u * n + v] = CompactMetrics {
                rtt_ms: m.rtt_ms as f32,
                jitter_ms: m.jitter_ms as f32,
                loss: m.loss as f32,
            };
            if model.is_poor(m) {
                poor_links.push(u * n + v);
            }
        }
        let good_cost = (!poor_links.is_empty()).then(|| {
            let mut good = cost.clone();
            for i in poor_links {
                good[i] = f32::INFINITY;
            }
            good
        });
        let neighbours: Vec<Vec<u32>> = (0..n)
            .map(|u| {
                (0..n as u32)
                    .filter(|&v| cost[u * n + v as usize].is_finite())
                    .collect()
            })
            .collect();
        let mut in_neighbours = vec![Vec::new(); n];
        for (u, out) in neighbours.iter().enumerate() {
            for &v in out {
                in_neighbours[v as usize].push(u as u32);
            }
        }
        Dense {
            n,
            ids,
            transit,
            cost,
            good_cost,
            metrics,
            model: *model,
            neighbours,
            in_neighbours,
        }
    }

    fn index(&self, id: RelayId) -> Option<usize> {
        // Relays are often numbered 0..n: then the id is its own index.
        let guess = id.0 as usize;
        if self.ids.get(guess) == Some(&id) {
            return Some(guess);
        }
        self.ids.binary_search(&id).ok()
    }

    fn is_poor_link(&self, u: usize, v: usize) -> bool {
        self.good_cost
            .as_ref()
            .is_some_and(|g| g[u * self.n + v].is_infinite())
    }

    /// Evaluates a path of relay indices on the current graph; `None` when a
    /// link is missing or a transit relay may not carry transit.
    fn evaluate(&self, idx: SmallVec<[u32; 6]>) -> Option<Path> {
        if idx.len() < 2
            || idx[1..idx.len() - 1]
                .iter()
                .any(|&i| !self.transit[i as usize])
        {
            return None;
        }
        let (mut metrics, mut cost) = (Metrics::default(), 0.0f64);
        for w in idx.windows(2) {
            let link = w[0] as usize * self.n + w[1] as usize;
            if !self.cost[link].is_finite() {
                return None;
            }
            metrics = metrics.then(&self.metrics[link].widen());
            cost += f64::from(self.cost[link]);
        }
        Some(Path {
            idx,
            metrics,
            cost,
            poor: self.model.is_poor(&metrics),
        })
    }

    fn to_route(&self, p: &Path) -> Route {
        Route {
            hops: p.idx.iter().map(|&i| self.ids[i as usize]).collect(),
            metrics: p.metrics,
            cost: p.cost,
            poor: p.poor,
        }
    }

    fn tree_path(&self, t: &Tree, s: usize, d: usize) -> Path {
        Path {
            idx: t.path_idx(s, d),
            metrics: t.metrics[d],
            cost: f64::from(t.dist[d]),
            poor: self.model.is_poor(&t.metrics[d]),
        }
    }

    /// Dijkstra over a dense cost matrix. Relays that do not allow transit
    /// are reached but not expanded (except the source). Both inner loops
    /// are branch-free over contiguous arrays so that they vectorise.
    fn shortest_tree(&self, costs: &[f32], src: usize, t: &mut Tree) {
        let n = self.n;
        t.dist.fill(f32::INFINITY);
        t.parent.fill(NONE);
        t.order.clear();
        t.dist[src] = 0.0;
        while let Some(u) = argmin(&t.dist) {
            let du = t.dist[u];
            t.dist[u] = -du;
            t.order.push(u as u32);
            if u != src && !self.transit[u] {
                continue;
            }
            let row = &costs[u * n..(u + 1) * n];
            kernels::relax(
                &mut t.dist,
                &mut t.parent,
                &mut t.spare_dist,
                &mut t.spare_parent,
                row,
                du,
                u as u32,
            );
        }
        for d in &mut t.dist {
            *d = d.abs();
        }
        // Path metrics in settle order: parents come first.
        t.metrics[src] = Metrics::default();
        t.uses_poor[src] = false;
        for &v in &t.order[1..] {
            let (v, p) = (v as usize, t.parent[v as usize] as usize);
            t.metrics[v] = t.metrics[p].then(&self.metrics[p * n + v].widen());
            t.uses_poor[v] = t.uses_poor[p] || self.is_poor_link(p, v);
        }
    }

    /// The cheapest paths over non-poor links, built from the full tree:
    /// a relay whose cheapest path crosses no poor link has the same path
    /// there, so only the others need a search. Returns false when no
    /// relay needs one (then `work.good` is stale and unused).
    fn good_tree(&self, s: usize, work: &mut Workspace) -> bool {
        let Some(costs) = &self.good_cost else {
            return false;
        };
        let n = self.n;
        let Workspace {
            full, good, repair, ..
        } = work;
        if !full.order.iter().any(|&v| full.uses_poor[v as usize]) {
            return false;
        }
        Self::cut_from(full, good, repair, |v, _| {
            if full.uses_poor[v] {
                Cut::Search
            } else {
                Cut::Keep
            }
        });
        good.metrics.copy_from_slice(&full.metrics);
        good.uses_poor.fill(false);
        let kept = good.order.len();
        self.research(s, costs, good, repair, &[], false);
        for &v in &full.order[1..] {
            repair.cut[v as usize] = false;
        }
        for &v in &good.order[kept..] {
            let (v, p) = (v as usize, good.parent[v as usize] as usize);
            good.metrics[v] = good.metrics[p].then(&self.metrics[p * n + v].widen());
        }
        true
    }

    /// Searches again the relays of `repair.affected`, which are marked in
    /// `repair.cut` (so are any relays that must not be entered at all) and
    /// reset to unreached in `t`; every other relay reached in `t` keeps
    /// its distance and path. Each affected relay starts from its cheapest
    /// link from a kept relay, then Dijkstra runs among them, appending
    /// them to `t.order` as they settle, without `blocked_links`; with
    /// `stop_early`, only until every relay marked in `repair.marks` is
    /// settled.
    fn research(
        &self,
        s: usize,
        costs: &[f32],
        t: &mut Tree,
        repair: &mut Repair,
        blocked_links: &[(usize, usize)],
        stop_early: bool,
    ) {
        let n = self.n;
        let Repair {
            affected,
            keys,
            cut,
            slot,
            marks,
        } = repair;
        let mut left = affected.iter().filter(|&&v| marks[v]).count();
        if stop_early && left == 0 {
            return;
        }
        let forwards = |u: usize| u == s || self.transit[u];
        keys.clear();
        keys.resize(affected.len(), f32::INFINITY);
        for (i, &v) in affected.iter().enumerate() {
            slot[v] = i as u32;
        }
        for (k, &v) in keys.iter_mut().zip(affected.iter()) {
            for &u in &self.in_neighbours[v] {
                let u = u as usize;
                if cut[u] || !forwards(u) || blocked_links.contains(&(u, v)) {
                    continue;
                }
                let candidate = t.dist[u] + costs[u * n + v];
                if candidate < *k {
                    *k = candidate;
                    t.parent[v] = u as u32;
                }
            }
        }
        while let Some(i) = argmin(keys) {
            let u = affected[i];
            let du = keys[i];
            keys[i] = f32::INFINITY;
            t.dist[u] = du;
            t.order.push(u as u32);
            if stop_early && marks[u] {
                left -= 1;
                if left == 0 {
                    break;
                }
            }
            if !forwards(u) {
                continue;
            }
            for &v in &self.neighbours[u] {
                let (v, i) = (v as usize, slot[v as usize]);
                if i == NONE {
                    continue;
                }
                let candidate = du + costs[u * n + v];
                let k = &mut keys[i as usize];
                if candidate < *k && candidate < t.dist[v] && !blocked_links.contains(&(u, v)) {
                    *k = candidate;
                    t.parent[v] = u as u32;
                }
            }
        }
        for &v in affected.iter() {
            slot[v] = NONE;
        }
    }

    /// The given table's primaries, re-evaluated on this graph; entries
    /// whose path is broken here are dropped.
    fn fixed_primaries(&self, s: usize, table: Option<&RouteTable>) -> Vec<Option<Path>> {
        let mut primaries = vec![None; self.n];
        for e in table.map_or(&[][..], |t| t.entries()) {
            let Some(d) = self.index(e.destination).filter(|&d| d != s) else {
                continue;
            };
            let idx: Option<SmallVec<[u32; 6]>> = e
                .primary
                .hops
                .iter()
                .map(|&h| self.index(h).map(|i| i as u32))
                .collect();
            primaries[d] = idx.and_then(|idx| self.evaluate(idx));
        }
        primaries
    }

    fn primaries_for(
        &mut self,
        s: usize,
        config: &RoutingConfig,
        previous: Option<&RouteTable>,
        work: &mut Workspace,
    ) -> Vec<Option<Path>> {
        // Cheapest paths over all links. Only where such a path crosses a
        // poor link can the cheapest path over non-poor links be better
        // (otherwise the two coincide), so that search runs only then.
        self.shortest_tree(&self.cost, s, &mut work.full);
        let has_good = self.good_tree(s, work);

        let mut primaries: Vec<Option<Path>> = Vec::with_capacity(self.n);
        for d in 0..self.n {
            if d == s || !work.full.reachable(d) {
                primaries.push(None);
                continue;
            }
            let mut best = self.tree_path(&work.full, s, d);
            if has_good && work.full.uses_poor[d] && work.good.reachable(d) {
                let g = self.tree_path(&work.good, s, d);
                if g.beats(&best) {
                    best = g;
                }
            }
            // A poor result may still lose to a dearer but clean direct link.
            if best.poor
                && best.idx.len() > 2
                && let Some(direct) = self.evaluate(smallvec::smallvec![s as u32, d as u32])
                && direct.beats(&best)
            {
                best = direct;
            }
            let current = previous
                .and_then(|t| t.get(self.ids[d]))
                .and_then(|e| {
                    e.primary
                        .hops
                        .iter()
                        .map(|&h| self.index(h).map(|i| i as u32))
                        .collect()
                })
                .and_then(|idx| self.evaluate(idx));
            primaries.push(Some(match current {
                Some(cur) if !should_switch(&cur, &best, config.switch_ratio) => cur,
                _ => best,
            }));
        }
        primaries
    }

    /// Completes the source's primaries (`all[s]`) with backups into its
    /// table.
    fn with_backups(
        &mut self,
        s: usize,
        all: &[Vec<Option<Path>>],
        work: &mut Workspace,
    ) -> RouteTable {
        let n = self.n;
        let primaries = &all[s];
        let transits = primaries.iter().enumerate().flat_map(|(d, p)| {
            let transit = p.as_ref().map_or(&[][..], |p| p.transit());
            transit.iter().map(move |&m| (m, d as u32))
        });
        work.on_primary.fill(n, transits);
        self.scan_two_hop(s, work);

        // Backups, visiting destinations grouped by their two-hop relay so
        // that its row of link metrics is read in one sweep.
        let via = &work.two_hop_via;
        let routed = (0..n as u32).filter(|&d| primaries[d as usize].is_some());
        work.visit
            .fill(n + 1, routed.map(|d| (via[d as usize].min(n as u32), d)));
        let mut backups: Vec<Option<Path>> = vec![None; n];
        let mut without: Vec<u32> = Vec::new();
        for i in 0..work.visit.items.len() {
            let d = work.visit.items[i] as usize;
            if let Some(primary) = &primaries[d] {
                backups[d] = self.short_backup(s, d, primary, work);
                if backups[d].is_none() {
                    without.push(d as u32);
                }
            }
        }
        // Loop-free alternates (IP fast reroute, RFC 5286) for the rest: a
        // neighbour off the primary whose own primary avoids this relay and
        // the primary's relays and links. Neighbour by neighbour, so that
        // each one's primaries are read in one sweep: the other way round
        // every check was a cache miss.
        without.sort_unstable();
        for &v in &self.neighbours[s] {
            if !self.transit[v as usize] {
                continue;
            }
            for &d in &without {
                let d = d as usize;
                let (Some(primary), Some(theirs)) = (&primaries[d], &all[v as usize][d]) else {
                    continue;
                };
                if let Some(p) = self.loop_free_alternate(s, v as usize, primary, theirs)
                    && backups[d].as_ref().is_none_or(|b| p.beats(b))
                {
                    backups[d] = Some(p);
                }
            }
        }
        // Destinations whose backup needs a search, grouped by what it
        // avoids: `(transit relays, destination of a direct primary)`.
        let mut pending: BTreeMap<(SmallVec<[u32; 4]>, u32), Vec<u32>> = BTreeMap::new();
        for &d in &without {
            let d = d as usize;
            if let (None, Some(primary)) = (&backups[d], &primaries[d]) {
                // Avoiding every transit relay avoids every primary link
                // (each touches one); a direct primary avoids its link only.
                let transit: SmallVec<[u32; 4]> = primary.transit().iter().copied().collect();
                let key_d = if transit.is_empty() { d as u32 } else { NONE };
                pending.entry((transit, key_d)).or_default().push(d as u32);
            }
        }
        if pending.is_empty() {
            return self.table(s, primaries, Some(&backups));
        }
        // One tree per transit set, each repaired from the tree avoiding
        // the set's longest prefix that has one: the sets come in
        // lexicographic order, so `[a]`, `[a, b]`, `[a, b, c]` are built one
        // from the other while `levels[k]` avoids `chain[..=k]`. In a
        // sparse overlay the first transit relay is often a hub below which
        // half the tree hangs; it is searched again once per first relay,
        // not once per transit set.
        let Workspace {
            full,
            scratch,
            fallback,
            repair,
            levels,
            ..
        } = work;
        self.shortest_tree(&self.cost, s, full);
        let mut chain: SmallVec<[u32; 4]> = SmallVec::new();
        let settle = |d: usize, tree: &Tree, fallback: &mut Tree, repair: &mut Repair| {
            tree_path(&tree.parent, s, d)
                .and_then(|idx| self.evaluate(idx))
                .or_else(|| {
                    // Last resort: keep off the primary's links only.
                    let links: SmallVec<[(usize, usize); 4]> = primaries[d]
                        .as_ref()?
                        .idx
                        .windows(2)
                        .map(|w| (w[0] as usize, w[1] as usize))
                        .collect();
                    self.avoid_tree(s, &[], &links, &[d as u32], full, fallback, repair);
                    self.evaluate(tree_path(&fallback.parent, s, d)?)
                })
        };
        for ((transit, direct_to), targets) in &pending {
            let tree = if transit.is_empty() {
                let direct_link = [(s, *direct_to as usize)];
                self.avoid_tree(s, &[], &direct_link, targets, full, scratch, repair);
                &*scratch
            } else {
                let shared = chain.iter().zip(transit).take_while(|(a, b)| a == b);
                chain.truncate(shared.count());
                while chain.len() < transit.len() {
                    let k = chain.len();
                    if levels.len() <= k {
                        levels.push(Tree::new(self.n));
                    }
                    let (done, next) = levels.split_at_mut(k);
                    let base = done.last().unwrap_or(full);
                    let blocked = [transit[k] as usize];
                    self.avoid_tree(s, &blocked, &[], &[], base, &mut next[0], repair);
                    chain.push(transit[k]);
                }
                &levels[transit.len() - 1]
            };
            for &d in targets {
                backups[d as usize] = settle(d as usize, tree, fallback, repair);
            }
        }
        self.table(s, primaries, Some(&backups))
    }

    /// The source's table from its primaries and, if computed, backups.
    fn table(
        &self,
        s: usize,
        primaries: &[Option<Path>],
        backups: Option<&[Option<Path>]>,
    ) -> RouteTable {
        // Sized up front: growing a vector of ~100-byte entries one
        // doubling at a time showed up in the profile.
        let mut entries = Vec::with_capacity(primaries.iter().flatten().count());
        for (d, primary) in primaries.iter().enumerate() {
            let Some(primary) = primary else { continue };
            entries.push(RouteEntry {
                destination: self.ids[d],
                primary: self.to_route(primary),
                backup: backups
                    .and_then(|b| b[d].as_ref())
                    .map(|b| self.to_route(b)),
            });
        }
        RouteTable::from_computed(self.ids[s], entries)
    }

    /// Fills the workspace's two-hop arrays with the cheapest path
    /// `s -> m -> d` to every destination `d` whose `m` is not a transit
    /// relay of the primary to `d`. This is the `O(n^2)`-per-source loop of
    /// the backup search: the exclusions are written into `m`'s cost row as
    /// infinities (and restored) so that the kernel needs no exceptions.
    fn scan_two_hop(&mut self, s: usize, work: &mut Workspace) {
        let n = self.n;
        work.two_hop_cost.fill(f32::INFINITY);
        work.two_hop_via.fill(NONE);
        for m in 0..n {
            let mine = work.on_primary.group(m);
            let first = self.cost[s * n + m];
            if m == s || !self.transit[m] || !first.is_finite() {
                continue;
            }
            let row = &mut self.cost[m * n..(m + 1) * n];
            work.saved.clear();
            for &d in mine {
                work.saved.push(row[d as usize]);
                row[d as usize] = f32::INFINITY;
            }
            kernels::two_hop_step(
                &mut work.two_hop_cost,
                &mut work.two_hop_via,
                &mut work.spare_cost,
                &mut work.spare_via,
                row,
                first,
                m as u32,
            );
            for (&d, &saved) in mine.iter().zip(&work.saved) {
                row[d as usize] = saved;
            }
        }
    }

    /// The cheaper of the direct link (unless it is the primary) and the
    /// best two-hop path off the primary, built from what the scan already
    /// knows.
    fn short_backup(&self, s: usize, d: usize, primary: &Path, work: &Workspace) -> Option<Path> {
        let n = self.n;
        let mut best: Option<Path> = None;
        if !primary.transit().is_empty() && self.cost[s * n + d].is_finite() {
            let metrics = self.metrics[s * n + d].widen();
            best = Some(Path {
                idx: smallvec::smallvec![s as u32, d as u32],
                metrics,
                cost: f64::from(self.cost[s * n + d]),
                poor: self.model.is_poor(&metrics),
            });
        }
        let via = work.two_hop_via[d];
        if via != NONE {
            let metrics = self.metrics[s * n + via as usize]
                .widen()
                .then(&self.metrics[via as usize * n + d].widen());
            let two_hop = Path {
                idx: smallvec::smallvec![s as u32, via, d as u32],
                metrics,
                cost: f64::from(work.two_hop_cost[d]),
                poor: self.model.is_poor(&metrics),
            };
            if best.as_ref().is_none_or(|b| two_hop.beats(b)) {
                best = Some(two_hop);
            }
        }
        best
    }

    /// `s`, then neighbour `v`'s primary (`theirs`) to the destination of
    /// `primary`, if that is a loop-free alternate: `v` may carry transit,
    /// is not the destination, the link to it is not the primary's, and
    /// `theirs` avoids `s` and the primary's transit relays and links.
    fn loop_free_alternate(
        &self,
        s: usize,
        v: usize,
        primary: &Path,
        theirs: &Path,
    ) -> Option<Path> {
        let transit = primary.transit();
        let is_primary_link = |a: u32, b: u32| primary.idx.windows(2).any(|w| w == [a, b]);
        let (s32, v32) = (s as u32, v as u32);
        if v32 == *theirs.idx.last()?
            || is_primary_link(s32, v32)
            || theirs.idx.contains(&s32)
            || theirs.idx[..theirs.idx.len() - 1]
                .iter()
                .any(|m| transit.contains(m))
            || theirs.idx.windows(2).any(|w| is_primary_link(w[0], w[1]))
        {
            return None;
        }
        let mut idx: SmallVec<[u32; 6]> = SmallVec::with_capacity(theirs.idx.len() + 1);
        idx.push(s32);
        idx.extend_from_slice(&theirs.idx);
        self.evaluate(idx)
    }

    /// Shortest-path tree from `s` into `t` entering none of `blocked`
    /// and using none of `blocked_links`, repaired from `base`, a complete
    /// tree from `s` (on `self.cost`, possibly avoiding more): a relay
    /// whose path there avoids both keeps it, and only the relays below a
    /// blocked relay or link are searched again. With `targets`, only
    /// until those are settled; without, completely (then `t` can be the
    /// base of another repair).
    #[allow(clippy::too_many_arguments)] // disjoint parts of the workspace
    fn avoid_tree(
        &self,
        s: usize,
        blocked: &[usize],
        blocked_links: &[(usize, usize)],
        targets: &[u32],
        base: &Tree,
        t: &mut Tree,
        repair: &mut Repair,
    ) {
        Self::cut_from(base, t, repair, |v, p| {
            if blocked.contains(&v) {
                Cut::Blocked
            } else if blocked_links.contains(&(p, v)) {
                Cut::Search
            } else {
                Cut::Keep
            }
        });
        for &d in targets {
            repair.marks[d as usize] = true;
        }
        let stop_early = !targets.is_empty();
        self.research(s, &self.cost, t, repair, blocked_links, stop_early);
        for &d in targets {
            repair.marks[d as usize] = false;
        }
        for &v in &base.order[1..] {
            repair.cut[v as usize] = false;
        }
    }

    /// Starts a repair of `base` (a complete tree from its first relay)
    /// into `t`: relays `cut_off` cuts, and every relay below them (parents
    /// settle before children, so one pass finds them), are marked in
    /// `repair.cut` and reset to unreached, those to search again listed in
    /// `repair.affected`; the rest keep their paths, in `t.order`.
    fn cut_from(
        base: &Tree,
        t: &mut Tree,
        repair: &mut Repair,
        cut_off: impl Fn(usize, usize) -> Cut,
    ) {
        t.dist.copy_from_slice(&base.dist);
        t.parent.copy_from_slice(&base.parent);
        t.order.clear();
        t.order.push(base.order[0]);
        repair.affected.clear();
        for &v in &base.order[1..] {
            let (v, p) = (v as usize, base.parent[v as usize] as usize);
            let cut = match cut_off(v, p) {
                Cut::Keep if repair.cut[p] => Cut::Search,
                cut => cut,
            };
            if cut == Cut::Keep {
                t.order.push(v as u32);
                continue;
            }
            repair.cut[v] = true;
            t.dist[v] = f32::INFINITY;
            t.parent[v] = NONE;
            if cut == Cut::Search {
                repair.affected.push(v);
            }
        }
    }
}

/// What a repair does with one relay of the base tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Its path stays.
    Keep,
    /// Its path is gone: searched again.
    Search,
    /// Never entered.
    Blocked,
}

/// The path from `s` to `d` in a tree of parents, if `d` is in it.
fn tree_path(parent: &[u32], s: usize, d: usize) -> Option<SmallVec<[u32; 6]>> {
    let mut idx: SmallVec<[u32; 6]> = SmallVec::new();
    let mut v = d as u32;
    while v as usize != s {
        if v == NONE || idx.len() > parent.len() {
            return None;
        }
        idx.push(v);
        v = parent[v as usize];
    }
    idx.push(s as u32);
    idx.reverse();
    Some(idx)
}

fn should_switch(current: &Path, new: &Path, switch_ratio: f64) -> bool {
    if current.idx == new.idx {
        return false;
    }
    match (current.poor, new.poor) {
        (true, false) => true,
        (false, true) => false,
        _ => new.cost < switch_ratio * current.cost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::RelayState;

    fn mesh(n: u32, rtt: impl Fn(u32, u32) -> f64) -> Graph {
        let mut g = Graph::new();
        for i in 0..n {
            g.add_relay(RelayId(i));
        }
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    g.set_link(RelayId(i), RelayId(j), Metrics::rtt(rtt(i, j)))
                        .unwrap();
                }
            }
        }
        g
    }

    fn hops(r: &Route) -> Vec<u32> {
        r.hops.iter().map(|h| h.0).collect()
    }

    #[test]
    fn buckets_group_by_key_and_keep_order() {
        let mut b = Buckets::default();
        b.fill(4, [(2, 10), (0, 11), (2, 12), (3, 13), (0, 14)].into_iter());
        let groups: Vec<&[u32]> = (0..4).map(|k| b.group(k)).collect();
        assert_eq!(groups, [&[11, 14][..], &[], &[10, 12], &[13]]);
        b.fill(2, std::iter::empty());
        assert!(b.group(0).is_empty() && b.group(1).is_empty());
    }

    #[test]
    fn detour_beats_inflated_direct_link() {
        // 0 -> 2 direct is 200 ms, through 1 it is 50 + 50 (+ hop penalties).
        let g = mesh(3, |i, j| if i + j == 2 && i != 1 { 200.0 } else { 50.0 });
        let routes = RouteSet::compute(&g, &RoutingConfig::default(), None);
        let e = routes.route(RelayId(0), RelayId(2)).unwrap();
        assert_eq!(hops(&e.primary), vec![0, 1, 2]);
        assert_eq!(hops(e.backup.as_ref().unwrap()), vec![0, 2]);
        assert!((e.primary.cost - 110.0).abs() < 1e-9);
    }

    #[test]
    fn poor_first_then_cost() {
        // Direct link is cheap but lossy (poor); the detour is dearer but clean.
        let mut g = mesh(3, |_, _| 60.0);
        let lossy = Metrics {
            rtt_ms: 10.0,
            jitter_ms: 0.0,
            loss: 0.015,
        };
        g.set_link(RelayId(0), RelayId(2), lossy).unwrap();
        let cfg = RoutingConfig::default();
        assert!(cfg.cost.link_cost(&lossy) < 2.0 * cfg.cost.link_cost(&Metrics::rtt(60.0)));
        let routes = RouteSet::compute(&g, &cfg, None);
        let e = routes.route(RelayId(0), RelayId(2)).unwrap();
        assert_eq!(hops(&e.primary), vec![0, 1, 2]);
        assert!(!e.primary.poor);
    }

    #[test]
    fn hysteresis_keeps_path_until_clearly_better() {
        let mut g = mesh(3, |_, _| 100.0);
        let cfg = RoutingConfig::default();
        let r1 = RouteSet::compute(&g, &cfg, None);
        assert_eq!(
            hops(&r1.route(RelayId(0), RelayId(2)).unwrap().primary),
            vec![0, 2]
        );
        // The detour gets a little better than direct: stay.
        g.set_link(RelayId(0), RelayId(1), Metrics::rtt(45.0))
            .unwrap();
        g.set_link(RelayId(1), RelayId(2), Metrics::rtt(45.0))
            .unwrap();
        // detour cost 100 vs direct 105: better but not below 0.9 x 105.
        let r2 = RouteSet::compute(&g, &cfg, Some(&r1));
        assert_eq!(
            hops(&r2.route(RelayId(0), RelayId(2)).unwrap().primary),
            vec![0, 2]
        );
        let fresh = RouteSet::compute(&g, &cfg, None);
        assert_eq!(
            hops(&fresh.route(RelayId(0), RelayId(2)).unwrap().primary),
            vec![0, 1, 2]
        );
        // Clearly better: move.
        g.set_link(RelayId(0), RelayId(1), Metrics::rtt(30.0))
            .unwrap();
        g.set_link(RelayId(1), RelayId(2), Metrics::rtt(30.0))
            .unwrap();
        let r3 = RouteSet::compute(&g, &cfg, Some(&r2));
        assert_eq!(
            hops(&r3.route(RelayId(0), RelayId(2)).unwrap().primary),
            vec![0, 1, 2]
        );
        assert_eq!(r2.changes(&r3).primary_changed, 1);
        // The transit relay drains: the current path is broken, move back.
        g.set_state(RelayId(1), RelayState::Draining);
        let r4 = RouteSet::compute(&g, &cfg, Some(&r3));
        assert_eq!(
            hops(&r4.route(RelayId(0), RelayId(2)).unwrap().primary),
            vec![0, 2]
        );
    }

    #[test]
    fn backups_for_fixed_primaries_match_a_full_computation() {
        let g = mesh(6, |i, j| 20.0 + f64::from((i * 7 + j * 3) % 11) * 15.0);
        let cfg = RoutingConfig::default();
        let full = RouteSet::compute(&g, &cfg, None);
        // Keep only primaries, as a control plane replicates them.
        let stripped = RouteSet::from_tables(
            full.tables()
                .iter()
                .map(|t| {
                    let entries = t
                        .entries()
                        .iter()
                        .map(|e| RouteEntry {
                            backup: None,
                            ..e.clone()
                        })
                        .collect();
                    RouteTable::new(t.source(), t.epoch(), entries).unwrap()
                })
                .collect(),
        );
        let rebuilt = RouteSet::with_backups(&g, &cfg, &stripped);
        assert_eq!(rebuilt, full);
    }

    #[test]
    fn backup_falls_back_to_longer_paths_in_sparse_graphs() {
        // A ring 0-1-2-3-4-0 (both directions): the backup of 0 -> 1 goes
        // the long way round.
        let mut g = Graph::new();
        for i in 0..5 {
            g.add_relay(RelayId(i));
        }
        for i in 0..5u32 {
            let j = (i + 1) % 5;
            g.set_link(RelayId(i), RelayId(j), Metrics::rtt(10.0))
                .unwrap();
            g.set_link(RelayId(j), RelayId(i), Metrics::rtt(10.0))
                .unwrap();
        }
        let routes = RouteSet::compute(&g, &RoutingConfig::default(), None);
        let e = routes.route(RelayId(0), RelayId(1)).unwrap();
        assert_eq!(hops(&e.primary), vec![0, 1]);
        assert_eq!(hops(e.backup.as_ref().unwrap()), vec![0, 4, 3, 2, 1]);
    }

    #[test]
    fn down_relays_vanish_and_draining_relays_stay_endpoints() {
        let mut g = mesh(4, |_, _| 10.0);
        g.set_state(RelayId(3), RelayState::Down);
        g.set_state(RelayId(2), RelayState::Draining);
        let routes = RouteSet::compute(&g, &RoutingConfig::default(), None);
        assert!(routes.table(RelayId(3)).is_none());
        assert!(routes.route(RelayId(0), RelayId(3)).is_none());
        let e = routes.route(RelayId(0), RelayId(1)).unwrap();
        assert_eq!(hops(&e.primary), vec![0, 1]);
        assert!(e.backup.is_none(), "only transit candidate is draining");
        assert!(routes.route(RelayId(0), RelayId(2)).is_some());
    }
}
