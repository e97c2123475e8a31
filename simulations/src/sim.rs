//! The discrete-event simulator: virtual time, a seeded RNG, and the real
//! decision code of the daemons.
//!
//! What runs for real (the same code as `relayd` and `controlplane`):
//! - every relay is a [`relay_core::Relay`]: its prober sends every probe
//!   and echo as a datagram through the link model, its link estimator
//!   and fast-reroute verdicts decide the paths, and live streams are
//!   forwarded packet by packet through its delivery trees, interest
//!   propagation and duplicate suppression;
//! - the control plane is the leader's [`RouteEngine`] and the replicated
//!   [`ClusterState`]: relays report their links as `relayd` does (on a
//!   meaningful change, checked every 250 ms, and every 5 s), leases
//!   expire, epochs are planned with hysteresis and backups are computed
//!   with `topology`. A relay's table gets its backups when it could first
//!   use one (on arrival if a link is unusable or a next hop unknown, else
//!   once a link turns unusable): forwarding reads a backup only then, so
//!   the run is the same as with every table shipped complete (a test
//!   compares both), and a steady network skips most of that work.
//!
//! What is modelled:
//! - the network: per directed relay link a [`LinkModel`] (delay, jitter,
//!   Gilbert-Elliott loss) from the world's base metrics plus scenario
//!   impairments; control frames are reliable and take the base delay;
//! - Raft: an epoch commits a fixed `commit_ms` after its plan, and the
//!   route computation costs a fixed `compute_ms` of virtual time (the
//!   real computation runs, its wall time does not count);
//! - flows (thousands) are evaluated every interval from the true state of
//!   the path the relays would use at that instant (RTT, jitter and loss
//!   composed along it), not packet by packet; streams are per packet.
//!   Client access legs are not modelled: a flow runs relay to relay.
//!
//! Virtual time is a [`Duration`] since the start; the relay cores get
//! `Instant`s as a fixed origin plus that duration, so nothing depends on
//! the wall clock.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use controlplane::engine::{EngineConfig, EpochPlan, LinkReport, LinkReporter, RouteEngine};
use controlplane::state::{ClusterState, Command, RelayInfo};
use netmodel::{LinkModel, Profile};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use relay_core::token::Claims;
use relay_core::wire::client::{ClientToRelay, Delivery, Publish, Role};
use relay_core::{Action, ChannelId, ClientId, Relay, RelayConfig};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::Serialize;
use topology::{
    FixedRoutes, Graph, Hops, Metrics, PoorThresholds, RelayId, RouteSet, RoutingConfig,
};

use crate::queue::EventQueue;
use crate::scenario::{EventKind, Scenario, named_profile, stack};
use crate::world::World;

const APP: &str = "sim";
const SECRET: &[u8] = b"simulation-secret-0123456789abcd";
/// Unix time given to token checks (tokens never expire in a run).
const UNIX_NOW: u64 = 1_800_000_000;
/// How long a reroute is waited for before the pair counts as unrecovered.
const REROUTE_DEADLINE: Duration = Duration::from_secs(60);
/// Reroute polling step.
const REROUTE_STEP: Duration = Duration::from_millis(50);
/// QUIC idle timeout between relays: a dead peer's connection ends then.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The control plane's tick (the server's loop period).
const CP_TICK: Duration = Duration::from_millis(100);

/// How a pair got off a broken or poor path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// A relay switched to its precomputed backup or repaired locally.
    Local,
    /// A new route epoch from the control plane.
    ControlPlane,
}

/// One relay of the simulated network.
#[derive(Debug)]
pub struct Node {
    /// `CC-n`.
    pub name: String,
    /// Country code.
    pub country: String,
    /// Index of the country's site in the world.
    pub site: usize,
    /// Where it is drawn (near its country's site).
    pub lat: f64,
    /// Where it is drawn.
    pub lon: f64,
    /// The first relay of its country.
    pub hub: bool,
    /// Peers (symmetric).
    pub peers: Vec<u32>,
    core: Relay,
    alive: bool,
    /// Bumped on every kill and restart: packets for an older life are lost.
    life: u32,
    armed: Option<Duration>,
    reporter: LinkReporter,
    /// The routes of the installed table's epoch while that table has no
    /// backups yet: they are added once the relay could use one.
    backups: Option<EpochRoutes>,
}

/// One epoch's routes, from which relays' tables are made.
type EpochRoutes = Rc<RefCell<FixedRoutes>>;

/// An event. Large payloads are boxed so that the queue's slab of events
/// stays compact: the common ones (datagrams, timers) are small.
#[derive(Debug)]
enum Ev {
    Wake(u32),
    /// A datagram (`frame: false`) or a control frame arriving at a relay
    /// in its `life`.
    Peer {
        from: u32,
        to: u32,
        life: u32,
        frame: bool,
        data: Bytes,
    },
    Connect(u32, u32),
    Disconnect(u32, u32),
    ReportCheck(u32),
    ReportArrive {
        relay: u32,
        links: Vec<LinkReport>,
        cp_life: u32,
    },
    CpTick,
    EpochCommit {
        plan: Option<Box<EpochPlan>>,
        cp_life: u32,
    },
    RoutesReady {
        routes: EpochRoutes,
        epoch: u64,
        cp_life: u32,
    },
    RoutesArrive {
        relay: u32,
        life: u32,
        table: Box<topology::RouteTable>,
        /// Where its backups come from, if it has none yet.
        backups: Option<EpochRoutes>,
    },
    Scenario(usize),
    PairSample,
    FlowTick,
    ReroutePoll,
    Publish(usize),
    Join {
        stream: usize,
        sub: usize,
    },
    Snapshot,
}

struct ControlPlane {
    up: bool,
    /// Bumped on every stop: work in flight from before is dropped.
    life: u32,
    engine: RouteEngine,
    state: ClusterState,
    routed_basis: Option<u64>,
    site: usize,
    /// The last applied plan's primaries with the state's epoch and basis
    /// after it: the state's primary set while those are unchanged.
    primaries: Option<(u64, u64, RouteSet)>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct PathAccum {
    samples: u64,
    latency_ms: f64,
    loss: f64,
    poor: u64,
    broken: u64,
}

impl PathAccum {
    fn add(&mut self, m: Option<Metrics>, poor: &PoorThresholds) {
        self.samples += 1;
        match m {
            Some(m) => {
                self.latency_ms += m.rtt_ms / 2.0;
                self.loss += m.loss;
                if poor.is_poor(&m) {
                    self.poor += 1;
                }
            }
            None => {
                self.broken += 1;
                self.loss += 1.0;
            }
        }
    }
}

struct Flow {
    src: u32,
    dst: u32,
    overlay: PathAccum,
    direct: PathAccum,
}

struct Tracked {
    event: usize,
    pair: (u32, u32),
    since: Duration,
    /// The source's route epoch at the event: recovering on the same
    /// epoch is the relays' own doing (backups, repair), on a newer one
    /// the control plane's.
    epoch: u64,
}

struct Subscriber {
    relay: u32,
    client: ClientId,
    join_at: Duration,
    first: Option<Duration>,
    first_seq: Option<u64>,
    received: u64,
    /// Highest sequence number seen and a bitmap of the 128 before it.
    highest: u64,
    seen: u128,
}

struct Stream {
    spec: crate::scenario::StreamSpec,
    channel: ChannelId,
    publisher: (u32, ClientId),
    seq: u64,
    subscribers: Vec<Subscriber>,
    /// Latency histogram, 1 ms buckets.
    latency_hist: Vec<u64>,
    duplicates: u64,
}

/// A snapshot for the world map.
#[derive(Debug, Clone, Serialize)]
pub struct MapSnapshot {
    /// Virtual time, s.
    pub at_s: f64,
    /// `(relay, alive)`.
    pub alive: Vec<bool>,
    /// Relay links: `(a, b, state)` with state `good`, `poor` or `down`,
    /// and whether a sampled pair's overlay path uses it.
    pub links: Vec<(u32, u32, &'static str, bool)>,
}

/// The outcome of a run, written as JSON and drawn as SVG.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Short form.
    pub short: bool,
    /// Where the base metrics come from.
    pub world_source: String,
    /// Virtual seconds.
    pub duration_s: f64,
    /// Start-up left out of sums and checks, seconds.
    pub warmup_s: f64,
    /// Wall-clock seconds the run took (set by the caller).
    pub wall_s: f64,
    /// Events processed.
    pub events_processed: u64,
    /// Relays, with names, countries and map positions.
    pub relays: Vec<RelaySummary>,
    /// Directed probed links.
    pub links: usize,
    /// Datagrams relays sent to each other (probes, echoes, media).
    pub peer_datagrams: u64,
    /// Sampled relay pairs.
    pub pairs: usize,
    /// Flows evaluated.
    pub flows: usize,
    /// Poor-pair shares over time.
    pub timeline: Vec<TimelinePoint>,
    /// Scenario events (time, label).
    pub events: Vec<(f64, String)>,
    /// Route epochs: (time, pairs whose primary changed).
    pub epochs: Vec<(f64, usize)>,
    /// Reroute times after events.
    pub reroutes: Vec<Reroute>,
    /// Affected pairs that did not recover within the deadline.
    pub unrecovered: usize,
    /// Observed overlay path changes per sampled pair per hour.
    pub route_changes_per_pair_hour: f64,
    /// Path changes per pair over the run (for the histogram).
    pub route_changes_by_pair: Vec<u32>,
    /// Poor pair-time removed by the overlay over that removed by the
    /// oracle (1 = as good as the oracle); `None` when the oracle removes
    /// nothing.
    pub overlay_vs_oracle: Option<f64>,
    /// Share of pair-time poor: direct, overlay, oracle.
    pub poor_share: (f64, f64, f64),
    /// Per flow: direct and overlay mean latency (ms, one way), loss, poor
    /// share.
    pub flow_results: Vec<FlowResult>,
    /// Streams simulated per packet.
    pub streams: Vec<StreamResult>,
    /// Map snapshots.
    pub maps: Vec<MapSnapshot>,
    /// Headline checks.
    pub checks: Vec<CheckResult>,
    /// Route tables installed without backups, and how many of them got
    /// their backups later because the relay could use one. Not in the
    /// JSON: it is the simulator's bookkeeping, the only thing that
    /// differs from a run with every table complete on arrival.
    #[serde(skip)]
    pub backups_completed: (u64, u64),
}

/// A relay in the result.
#[derive(Debug, Clone, Serialize)]
pub struct RelaySummary {
    /// Name.
    pub name: String,
    /// Country.
    pub country: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
}

/// Poor-pair shares at one instant.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TimelinePoint {
    /// Virtual time, s.
    pub t: f64,
    /// Direct Internet paths.
    pub direct: f64,
    /// The paths the relays use.
    pub overlay: f64,
    /// The best paths on the true link state.
    pub oracle: f64,
}

/// One pair's reroute after an event.
#[derive(Debug, Clone, Serialize)]
pub struct Reroute {
    /// Index into `events`.
    pub event: usize,
    /// Seconds from the event to a good path.
    pub seconds: f64,
    /// How.
    pub mechanism: Mechanism,
}

/// One flow's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct FlowResult {
    /// Source relay name.
    pub src: String,
    /// Destination relay name.
    pub dst: String,
    /// Direct: mean one-way latency ms, mean loss, poor share.
    pub direct: (f64, f64, f64),
    /// Overlay: the same.
    pub overlay: (f64, f64, f64),
}

/// A stream's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct StreamResult {
    /// Channel.
    pub channel: String,
    /// Subscribers.
    pub subscribers: usize,
    /// Subscribers that received media.
    pub receiving: usize,
    /// Join to first media, seconds, sorted.
    pub join_to_first_s: Vec<f64>,
    /// Packets published.
    pub published: u64,
    /// Delivered over expected (from each subscriber's first packet on).
    pub delivery: f64,
    /// Latency p50 / p99, ms (relay to relay, one way).
    pub latency_p50_ms: f64,
    /// p99.
    pub latency_p99_ms: f64,
    /// Duplicates delivered to a subscriber (must be 0).
    pub duplicates: u64,
}

/// A checked property.
#[derive(Debug, Clone, Serialize)]
pub struct CheckResult {
    /// What.
    pub name: String,
    /// Measured.
    pub value: f64,
    /// Bound.
    pub bound: f64,
    /// Held.
    pub ok: bool,
}

/// The simulator.
pub struct Sim {
    scenario: Scenario,
    seed: u64,
    short: bool,
    world_source: String,
    origin: Instant,
    now: Duration,
    queue: EventQueue<Ev>,
    processed: u64,
    datagrams: u64,
    rng: ChaCha8Rng,
    nodes: Vec<Node>,
    /// Base one-way profile between two relays' countries (by site), and
    /// the base RTT (for peering choices).
    base: FxHashMap<(usize, usize), Profile>,
    domestic: Profile,
    impair: FxHashMap<(usize, usize), Profile>,
    cut: FxHashSet<(usize, usize)>,
    models: FxHashMap<(u32, u32), LinkModel>,
    connected: FxHashSet<(u32, u32)>,
    poor: PoorThresholds,
    routing: RoutingConfig,
    cp: ControlPlane,
    oracle: Option<Arc<RouteSet>>,
    pairs: Vec<(u32, u32)>,
    last_paths: Vec<Option<Hops>>,
    path_changes: Vec<u32>,
    flows: Vec<Flow>,
    streams: Vec<Stream>,
    clients: HashMap<ClientId, (usize, usize)>,
    next_client: u64,
    tracked: Vec<Tracked>,
    polling: bool,
    // results
    timeline: Vec<TimelinePoint>,
    poor_sums: (u64, u64, u64),
    warm_samples: u64,
    events_log: Vec<(f64, String)>,
    epochs: Vec<(f64, usize)>,
    reroutes: Vec<Reroute>,
    unrecovered: usize,
    maps: Vec<MapSnapshot>,
    /// Every relay's table gets its backups when it arrives, as the
    /// control plane ships them, instead of once the relay could use one.
    /// Same results, more time: for the test that says so.
    eager_backups: bool,
    /// Tables installed without backups, and those completed later.
    backups_pending: u64,
    backups_completed: u64,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("scenario", &self.scenario.name)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// Why a run could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SetupError(pub String);

impl Sim {
    /// Builds the network of `scenario` over `world` (whose sites are the
    /// countries).
    pub fn new(scenario: Scenario, world: &World, short: bool) -> Result<Sim, SetupError> {
        // The one clock read: an origin for the cores' `Instant`s. Nothing
        // depends on its value; virtual time is an offset from it.
        #[allow(clippy::disallowed_methods)]
        let origin = Instant::now();
        let seed = scenario.seed;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let report_period = Duration::from_millis(scenario.control_plane.report_interval_ms);
        let spec = scenario.world.clone();
        let countries: Vec<usize> = if spec.countries.is_empty() {
            (0..world.sites.len()).collect()
        } else {
            spec.countries
                .iter()
                .map(|c| {
                    world.site_index(c).ok_or_else(|| {
                        SetupError(format!(
                            "country {c} is not in the world ({})",
                            world.source
                        ))
                    })
                })
                .collect::<Result<_, _>>()?
        };
        // Countries measured against fewer than a third of the others cannot
        // be placed faithfully (the data set drops noisy and anycast-only
        // pairs): leave them out, and say so.
        let measured = |c: usize| {
            countries
                .iter()
                .filter(|&&o| o != c && world.links.contains_key(&(c, o)))
                .count()
        };
        let (countries, dropped): (Vec<usize>, Vec<usize>) = countries
            .iter()
            .partition(|&&c| countries.len() < 3 || 3 * measured(c) >= countries.len() - 1);
        if countries.is_empty() {
            return Err(SetupError("the world has no sites".into()));
        }
        let mut world_source = world.source.clone();
        if !dropped.is_empty() {
            let names: Vec<&str> = dropped
                .iter()
                .map(|&c| world.sites[c].code.as_str())
                .collect();
            world_source.push_str(&format!(
                "; left out for sparse measurements: {}",
                names.join(", ")
            ));
        }
        let base_profile = |m: &Metrics| Profile {
            delay_ms: m.rtt_ms / 2.0,
            jitter_ms: m.jitter_ms.max(spec.base_jitter_ms),
            loss: m.loss.max(spec.base_loss),
            ..Profile::CLEAN
        };
        let mut base = FxHashMap::default();
        for (&(a, b), m) in &world.links {
            base.insert((a, b), base_profile(m));
        }
        let domestic = base_profile(&Metrics::rtt(spec.domestic_rtt_ms));

        // Relays, round-robin over the countries.
        let total = spec.relays.max(countries.len());
        let mut per_country: BTreeMap<usize, u32> = BTreeMap::new();
        let mut nodes = Vec::with_capacity(total);
        for i in 0..total {
            let site = countries[i % countries.len()];
            let n = per_country.entry(site).or_default();
            *n += 1;
            let s = &world.sites[site];
            // Draw a country's relays on a small circle around its site.
            let angle = f64::from(*n) * 2.399;
            let r = if *n == 1 { 0.0 } else { 1.2 };
            let mut config = RelayConfig::new(RelayId(i as u32));
            config.region = s.code.clone();
            config.apps.insert(APP.into(), SECRET.to_vec());
            config.link.probe_interval = Duration::from_millis(scenario.relay.probe_interval_ms);
            config.link.metrics.probe_timeout =
                Duration::from_millis(scenario.relay.probe_timeout_ms);
            config.link.metrics.dead_after_losses = scenario.relay.dead_after_losses;
            config.link.metrics.adaptive_timeout = scenario.relay.adaptive_timeout;
            config.max_channels_per_client = 4;
            nodes.push(Node {
                name: format!("{}-{}", s.code, n),
                country: s.code.clone(),
                site,
                lat: s.lat + r * angle.sin(),
                lon: s.lon + r * angle.cos(),
                hub: *n == 1,
                peers: Vec::new(),
                core: Relay::new(config),
                alive: true,
                life: 1,
                armed: None,
                reporter: LinkReporter::new(report_period, origin),
                backups: None,
            });
        }

        // Peering: domestic neighbours, the nearest relays abroad, and the
        // hub mesh.
        let rtt = |a: &Node, b: &Node| -> Option<f64> {
            if a.site == b.site {
                Some(spec.domestic_rtt_ms)
            } else {
                base.get(&(a.site, b.site)).map(|p| p.delay_ms * 2.0)
            }
        };
        let mut peer_set: BTreeSet<(u32, u32)> = BTreeSet::new();
        let add = |a: usize, b: usize, set: &mut BTreeSet<(u32, u32)>| {
            if a != b {
                set.insert((a.min(b) as u32, a.max(b) as u32));
            }
        };
        let overlay = &scenario.overlay;
        for a in 0..nodes.len() {
            let mut domestic_peers: Vec<usize> = (0..nodes.len())
                .filter(|&b| b != a && nodes[b].site == nodes[a].site)
                .collect();
            // Hub first, then by index distance (a ring inside the country).
            domestic_peers.sort_by_key(|&b| (!nodes[b].hub, b.abs_diff(a)));
            for &b in domestic_peers.iter().take(overlay.domestic_peers) {
                add(a, b, &mut peer_set);
            }
            let mut foreign: Vec<(f64, usize)> = (0..nodes.len())
                .filter(|&b| nodes[b].site != nodes[a].site)
                .filter_map(|b| rtt(&nodes[a], &nodes[b]).map(|r| (r, b)))
                .collect();
            foreign.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
            // One relay per foreign country, so the nearest country does not
            // take every slot.
            let mut seen = HashSet::new();
            for (_, b) in foreign {
                if seen.len() >= overlay.foreign_peers {
                    break;
                }
                if seen.insert(nodes[b].site) {
                    add(a, b, &mut peer_set);
                }
            }
            if overlay.hub_mesh && nodes[a].hub {
                for b in 0..nodes.len() {
                    if nodes[b].hub && rtt(&nodes[a], &nodes[b]).is_some() {
                        add(a, b, &mut peer_set);
                    }
                }
            }
        }
        let mut models = FxHashMap::default();
        for &(a, b) in &peer_set {
            if rtt(&nodes[a as usize], &nodes[b as usize]).is_none() {
                continue;
            }
            nodes[a as usize].peers.push(b);
            nodes[b as usize].peers.push(a);
            for (x, y) in [(a, b), (b, a)] {
                let link_seed =
                    seed ^ (u64::from(x) << 32 | u64::from(y)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                models.insert((x, y), LinkModel::new(Profile::CLEAN, link_seed));
            }
        }

        // The control plane knows every relay from the start.
        let cp_site = world
            .site_index(&scenario.control_plane.site)
            .ok_or_else(|| {
                SetupError(format!(
                    "control-plane site {} is not in the world",
                    scenario.control_plane.site
                ))
            })?;
        let mut state = ClusterState::default();
        for (i, n) in nodes.iter().enumerate() {
            state
                .apply(&Command::RegisterRelay {
                    id: RelayId(i as u32),
                    info: RelayInfo {
                        name: n.name.clone(),
                        region: n.country.clone(),
                        location: Some((n.lat, n.lon)),
                        addr: format!("sim:{i}"),
                        capacity: 1000,
                    },
                })
                .map_err(SetupError)?;
        }
        let mut engine = RouteEngine::new(EngineConfig {
            epoch_interval: Duration::from_millis(scenario.control_plane.epoch_interval_ms),
            ..EngineConfig::default()
        });
        engine.became_leader(origin);

        // Sampled pairs: relays in different countries.
        let mut all_pairs: Vec<(u32, u32)> = Vec::new();
        for a in 0..nodes.len() {
            for b in 0..nodes.len() {
                if nodes[a].site != nodes[b].site
                    && base.contains_key(&(nodes[a].site, nodes[b].site))
                {
                    all_pairs.push((a as u32, b as u32));
                }
            }
        }
        let pairs = if scenario.pairs.sample == 0 || scenario.pairs.sample >= all_pairs.len() {
            all_pairs
        } else {
            all_pairs.shuffle(&mut rng);
            all_pairs.truncate(scenario.pairs.sample);
            all_pairs.sort_unstable();
            all_pairs
        };

        // Flows between the given countries.
        let in_set = |set: &[String], n: &Node| {
            set.is_empty() || set.iter().any(|c| c.eq_ignore_ascii_case(&n.country))
        };
        let senders: Vec<u32> = (0..nodes.len() as u32)
            .filter(|&i| in_set(&scenario.flows.from, &nodes[i as usize]))
            .collect();
        let receivers: Vec<u32> = (0..nodes.len() as u32)
            .filter(|&i| in_set(&scenario.flows.to, &nodes[i as usize]))
            .collect();
        let mut flows = Vec::new();
        if scenario.flows.count > 0 {
            if senders.is_empty() || receivers.is_empty() {
                return Err(SetupError(
                    "flows: no relay in the sender or receiver countries".into(),
                ));
            }
            let mut attempts = 0;
            while flows.len() < scenario.flows.count && attempts < scenario.flows.count * 20 {
                attempts += 1;
                let src = senders[rng.random_range(0..senders.len())];
                let dst = receivers[rng.random_range(0..receivers.len())];
                let (s, d) = (&nodes[src as usize], &nodes[dst as usize]);
                if s.site == d.site || !base.contains_key(&(s.site, d.site)) {
                    continue;
                }
                flows.push(Flow {
                    src,
                    dst,
                    overlay: PathAccum::default(),
                    direct: PathAccum::default(),
                });
            }
        }

        let routing = RoutingConfig::default();
        let mut sim = Sim {
            seed,
            short,
            world_source,
            origin,
            now: Duration::ZERO,
            queue: EventQueue::default(),
            processed: 0,
            datagrams: 0,
            rng,
            nodes,
            base,
            domestic,
            impair: FxHashMap::default(),
            cut: FxHashSet::default(),
            models,
            connected: FxHashSet::default(),
            poor: routing.cost.poor,
            routing,
            cp: ControlPlane {
                up: true,
                life: 1,
                engine,
                state,
                routed_basis: None,
                site: cp_site,
                primaries: None,
            },
            oracle: None,
            last_paths: vec![None; pairs.len()],
            path_changes: vec![0; pairs.len()],
            pairs,
            flows,
            streams: Vec::new(),
            clients: HashMap::new(),
            next_client: 1,
            tracked: Vec::new(),
            polling: false,
            timeline: Vec::new(),
            poor_sums: (0, 0, 0),
            warm_samples: 0,
            events_log: Vec::new(),
            epochs: Vec::new(),
            reroutes: Vec::new(),
            unrecovered: 0,
            maps: Vec::new(),
            eager_backups: false,
            backups_pending: 0,
            backups_completed: 0,
            scenario,
        };
        for (a, b) in sim.models.keys().copied().collect::<Vec<_>>() {
            sim.refresh_model(a, b);
        }
        sim.setup_streams()?;
        Ok(sim)
    }

    /// Computes every table's backups when it arrives (see
    /// `complete_backups`): the results must not change.
    pub fn with_eager_backups(mut self) -> Sim {
        self.eager_backups = true;
        self
    }

    fn instant(&self) -> Instant {
        self.origin + self.now
    }

    fn push(&mut self, at: Duration, ev: Ev) {
        self.queue.push(at, ev);
    }

    // ----- the network ---------------------------------------------------

    /// The true one-way profile from relay `a` to relay `b` now, `None`
    /// when no packet gets through.
    fn truth_profile(&self, a: u32, b: u32) -> Option<Profile> {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        if !na.alive || !nb.alive {
            return None;
        }
        self.site_profile(na.site, nb.site)
    }

    fn site_profile(&self, sa: usize, sb: usize) -> Option<Profile> {
        if sa == sb {
            return Some(self.domestic);
        }
        if self.cut.contains(&(sa, sb)) {
            return None;
        }
        let base = self.base.get(&(sa, sb))?;
        Some(match self.impair.get(&(sa, sb)) {
            Some(extra) => stack(base, extra),
            None => *base,
        })
    }

    fn metrics_of(fwd: &Profile, rev: &Profile) -> Metrics {
        Metrics {
            rtt_ms: fwd.delay_ms + rev.delay_ms,
            jitter_ms: fwd.jitter_ms,
            loss: fwd.loss,
        }
    }

    /// True metrics of the relay link `a -> b` (RTT both ways, jitter and
    /// loss of the forward direction).
    fn truth_link(&self, a: u32, b: u32) -> Option<Metrics> {
        let f = self.truth_profile(a, b)?;
        let r = self.truth_profile(b, a)?;
        Some(Self::metrics_of(&f, &r))
    }

    /// True metrics of the direct Internet path between two relays' places.
    fn truth_direct(&self, a: u32, b: u32) -> Option<Metrics> {
        let (sa, sb) = (self.nodes[a as usize].site, self.nodes[b as usize].site);
        let f = self.site_profile(sa, sb)?;
        let r = self.site_profile(sb, sa)?;
        Some(Self::metrics_of(&f, &r))
    }

    fn refresh_model(&mut self, a: u32, b: u32) {
        if let Some(p) = self.truth_profile(a, b)
            && let Some(m) = self.models.get_mut(&(a, b))
        {
            m.set_profile(p);
        }
    }

    fn refresh_all_models(&mut self) {
        for (a, b) in self.models.keys().copied().collect::<Vec<_>>() {
            self.refresh_model(a, b);
        }
        self.oracle = None;
    }

    fn truth_graph(&self) -> Graph {
        let mut g = Graph::new();
        for (i, n) in self.nodes.iter().enumerate() {
            g.add_relay(RelayId(i as u32));
            if !n.alive {
                g.set_state(RelayId(i as u32), topology::RelayState::Down);
            }
        }
        for &(a, b) in self.models.keys() {
            if let Some(m) = self.truth_link(a, b) {
                let _ = g.set_link(RelayId(a), RelayId(b), m);
            }
        }
        g
    }

    /// Best routes on the true link state, recomputed after the truth
    /// changed (events) and shared otherwise.
    fn oracle(&mut self) -> Arc<RouteSet> {
        if self.oracle.is_none() {
            self.oracle = Some(Arc::new(RouteSet::primaries(
                &self.truth_graph(),
                &self.routing,
                None,
            )));
        }
        self.oracle.clone().expect("just computed")
    }

    // ----- relays --------------------------------------------------------

    fn arm(&mut self, r: u32) {
        let node = &self.nodes[r as usize];
        if !node.alive {
            return;
        }
        let Some(t) = node.core.poll_timeout() else {
            return;
        };
        let at = t.saturating_duration_since(self.origin).max(self.now);
        if node.armed.is_none_or(|armed| at < armed) {
            self.nodes[r as usize].armed = Some(at);
            self.push(at, Ev::Wake(r));
        }
    }

    /// Adds the backups to relay `r`'s table if it could now use one: on
    /// `arrival` of the table, or once one of its links is unusable (the
    /// relays' forwarding reads a backup only then). Tables are otherwise
    /// what the control plane computes, and in a steady network most
    /// relays never need their backups: computing them for every relay at
    /// every epoch was a quarter of the simulator's time.
    fn complete_backups(&mut self, r: u32, arrival: bool) {
        let node = &mut self.nodes[r as usize];
        let Some(routes) = &node.backups else {
            return;
        };
        let needed = if arrival {
            node.core.may_use_backups()
        } else {
            node.core.has_unusable_link()
        };
        if !needed {
            return;
        }
        self.backups_completed += 1;
        let table = routes.borrow_mut().with_backups(RelayId(r));
        node.backups = None;
        if let Some(mut table) = table {
            table.set_epoch(node.core.route_table().epoch());
            node.core.complete_route_table(table);
        }
    }

    /// Executes relay `r`'s pending actions.
    fn drain(&mut self, r: u32) {
        self.complete_backups(r, false);
        // Usability changes are for relayd's logs: dropped here.
        while self.nodes[r as usize].core.poll_link_change().is_some() {}
        // Actions are owned: handling one borrows nothing of the relay.
        while let Some(a) = self.nodes[r as usize].core.poll_action() {
            match a {
                Action::PeerDatagram { peer, datagram } => {
                    self.datagrams += 1;
                    let to = peer.0;
                    if !self.connected.contains(&(r, to)) {
                        continue;
                    }
                    let now = self.now;
                    let Some(model) = self.models.get_mut(&(r, to)) else {
                        continue;
                    };
                    // Dead ends and cuts lose everything.
                    let through = {
                        let (na, nb) = (&self.nodes[r as usize], &self.nodes[to as usize]);
                        na.alive && nb.alive && !self.cut.contains(&(na.site, nb.site))
                    };
                    if !through {
                        continue;
                    }
                    if let Some(delay) = model.transmit(now, datagram.len()) {
                        let life = self.nodes[to as usize].life;
                        self.push(
                            now + delay,
                            Ev::Peer {
                                from: r,
                                to,
                                life,
                                frame: false,
                                data: datagram,
                            },
                        );
                    }
                }
                Action::PeerFrame { peer, frame } => {
                    let to = peer.0;
                    if !self.connected.contains(&(r, to)) {
                        continue;
                    }
                    if let Some(p) = self.truth_profile(r, to) {
                        let life = self.nodes[to as usize].life;
                        let at = self.now + Duration::from_secs_f64(p.delay_ms / 1e3);
                        self.push(
                            at,
                            Ev::Peer {
                                from: r,
                                to,
                                life,
                                frame: true,
                                data: frame,
                            },
                        );
                    }
                }
                Action::ClientDatagram { client, datagram } => self.deliver(client, &datagram),
                Action::ClientFrame { .. } | Action::CloseClient { .. } => {}
            }
        }
        self.arm(r);
    }

    fn connect(&mut self, a: u32, b: u32) {
        let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
        if !na.alive || !nb.alive || self.cut.contains(&(na.site, nb.site)) {
            return;
        }
        if !self.connected.insert((a, b)) {
            return;
        }
        self.connected.insert((b, a));
        let now = self.instant();
        self.nodes[a as usize]
            .core
            .handle_peer_connected(RelayId(b), now);
        self.nodes[b as usize]
            .core
            .handle_peer_connected(RelayId(a), now);
        self.drain(a);
        self.drain(b);
    }

    fn disconnect(&mut self, a: u32, b: u32) {
        if !self.connected.remove(&(a, b)) {
            return;
        }
        self.connected.remove(&(b, a));
        let now = self.instant();
        for (x, y) in [(a, b), (b, a)] {
            if self.nodes[x as usize].alive {
                self.nodes[x as usize]
                    .core
                    .handle_peer_disconnected(RelayId(y), now);
                self.drain(x);
            }
        }
    }

    /// The path media from `src` to `dst` takes now, as the relays decide
    /// it: the source's choice, repaired by transit relays whose next link
    /// is unusable. Also says whether any relay used a backup or repair.
    fn overlay_path(&self, src: u32, dst: u32) -> Option<(Hops, bool)> {
        let now = self.instant();
        let n = &self.nodes[src as usize];
        if !n.alive {
            return None;
        }
        let chosen = n.core.path_to(RelayId(dst), now)?;
        let mut hops = chosen.hops;
        let mut local = chosen.rerouted;
        let mut i = 1;
        while i + 1 < hops.len() {
            let here = hops[i].0 as usize;
            if hops.len() > 9 || !self.nodes[here].alive {
                break;
            }
            let core = &self.nodes[here].core;
            if !core.link_usable(hops[i + 1]) {
                let Some(repair) = core.path_to(RelayId(dst), now) else {
                    break;
                };
                if repair.hops[1..].iter().any(|h| hops[..=i].contains(h)) {
                    break; // would loop: the packet is lost there
                }
                hops.truncate(i);
                hops.extend(repair.hops.iter().copied());
                local = true;
            }
            i += 1;
        }
        Some((hops, local))
    }

    fn path_metrics(&self, hops: &[RelayId]) -> Option<Metrics> {
        hops.last()?;
        let mut m = Metrics::default();
        for w in hops.windows(2) {
            m = m.then(&self.truth_link(w[0].0, w[1].0)?);
        }
        Some(m)
    }

    fn overlay_metrics(&self, src: u32, dst: u32) -> (Option<Metrics>, Option<(Hops, bool)>) {
        match self.overlay_path(src, dst) {
            Some((hops, local)) if hops.last() == Some(&RelayId(dst)) => {
                (self.path_metrics(&hops), Some((hops, local)))
            }
            other => (None, other),
        }
    }

    fn is_good(&self, m: Option<Metrics>) -> bool {
        m.is_some_and(|m| !self.poor.is_poor(&m))
    }

    // ----- streams -------------------------------------------------------

    fn setup_streams(&mut self) -> Result<(), SetupError> {
        let specs = self.scenario.streams.clone();
        for (si, spec) in specs.into_iter().enumerate() {
            let publisher = self
                .nodes
                .iter()
                .position(|n| n.hub && n.country.eq_ignore_ascii_case(&spec.publisher))
                .ok_or_else(|| {
                    SetupError(format!(
                        "stream {}: no relay in {}",
                        spec.channel, spec.publisher
                    ))
                })? as u32;
            let candidates: Vec<u32> = (0..self.nodes.len() as u32)
                .filter(|&i| {
                    let n = &self.nodes[i as usize];
                    n.hub
                        && (spec.subscriber_countries.is_empty()
                            || spec
                                .subscriber_countries
                                .iter()
                                .any(|c| c.eq_ignore_ascii_case(&n.country)))
                })
                .collect();
            if candidates.is_empty() {
                return Err(SetupError(format!(
                    "stream {}: no subscriber relays",
                    spec.channel
                )));
            }
            let pub_client = self.new_client(si, usize::MAX);
            let mut subscribers = Vec::with_capacity(spec.subscribers);
            for k in 0..spec.subscribers {
                let relay = candidates[k % candidates.len()];
                let offset = if spec.subscribers > 1 {
                    spec.join_window_s * k as f64 / (spec.subscribers - 1) as f64
                } else {
                    0.0
                };
                let client = self.new_client(si, k);
                let join_at = Duration::from_secs_f64(spec.join_at_s + offset);
                subscribers.push(Subscriber {
                    relay,
                    client,
                    join_at,
                    first: None,
                    first_seq: None,
                    received: 0,
                    highest: 0,
                    seen: 0,
                });
                self.push(join_at, Ev::Join { stream: si, sub: k });
            }
            self.streams.push(Stream {
                channel: ChannelId::derive(APP, &spec.channel),
                publisher: (publisher, pub_client),
                seq: 0,
                subscribers,
                latency_hist: vec![0; 2001],
                duplicates: 0,
                spec,
            });
            self.push(
                Duration::ZERO,
                Ev::Join {
                    stream: si,
                    sub: usize::MAX,
                },
            );
        }
        Ok(())
    }

    fn new_client(&mut self, stream: usize, sub: usize) -> ClientId {
        let id = ClientId(self.next_client);
        self.next_client += 1;
        self.clients.insert(id, (stream, sub));
        id
    }

    fn join(&mut self, stream: usize, sub: usize) {
        let s = &self.streams[stream];
        let (relay, client, role) = if sub == usize::MAX {
            (s.publisher.0, s.publisher.1, Role::Publisher)
        } else {
            (
                s.subscribers[sub].relay,
                s.subscribers[sub].client,
                Role::Subscriber,
            )
        };
        if !self.nodes[relay as usize].alive {
            return;
        }
        let token = Claims {
            app: APP.into(),
            channel: s.spec.channel.clone(),
            user: format!("u{}", client.0),
            role,
            expires: UNIX_NOW + 86_400,
        }
        .sign(SECRET);
        let frame = ClientToRelay::Join {
            token,
            channel: s.spec.channel.clone(),
        };
        let mut b = bytes::BytesMut::new();
        frame.encode(&mut b);
        let now = self.instant();
        let core = &mut self.nodes[relay as usize].core;
        core.handle_client_connected(client, "203.0.113.9:40000".parse().expect("valid"));
        core.handle_client_frame(client, &b[4..], now, UNIX_NOW);
        self.drain(relay);
        if sub == usize::MAX {
            let first = self.now + Duration::from_millis(100);
            self.push(first, Ev::Publish(stream));
        }
    }

    fn publish(&mut self, stream: usize) {
        let s = &mut self.streams[stream];
        s.seq += 1;
        let mut payload = vec![0u8; s.spec.payload.max(16)];
        payload[..8].copy_from_slice(&s.seq.to_be_bytes());
        payload[8..16].copy_from_slice(&(self.now.as_nanos() as u64).to_be_bytes());
        let d = Publish::encode(s.channel, &payload);
        let (relay, client) = s.publisher;
        let period = Duration::from_secs_f64(1.0 / s.spec.rate_pps);
        if self.nodes[relay as usize].alive {
            let now = self.instant();
            self.nodes[relay as usize]
                .core
                .handle_client_datagram(client, &d, now);
            self.drain(relay);
        }
        let next = self.now + period;
        if next.as_secs_f64() < self.scenario.duration_s {
            self.push(next, Ev::Publish(stream));
        }
    }

    fn deliver(&mut self, client: ClientId, datagram: &[u8]) {
        let Some(&(stream, sub)) = self.clients.get(&client) else {
            return;
        };
        if sub == usize::MAX {
            return;
        }
        let Ok(d) = Delivery::decode(datagram) else {
            return;
        };
        if d.payload.len() < 16 {
            return;
        }
        let seq = u64::from_be_bytes(d.payload[..8].try_into().expect("8 bytes"));
        let sent = u64::from_be_bytes(d.payload[8..16].try_into().expect("8 bytes"));
        let now = self.now;
        let s = &mut self.streams[stream];
        let latency_ms = (now.as_nanos() as u64).saturating_sub(sent) / 1_000_000;
        s.latency_hist[(latency_ms as usize).min(2000)] += 1;
        let sub = &mut s.subscribers[sub];
        if sub.first.is_none() {
            sub.first = Some(now);
            sub.first_seq = Some(seq);
        }
        // Duplicate suppression check, over a 128-packet window.
        if seq > sub.highest {
            let shift = seq - sub.highest;
            sub.seen = if shift >= 128 { 0 } else { sub.seen << shift };
            sub.seen |= 1;
            sub.highest = seq;
        } else {
            let back = sub.highest - seq;
            if back < 128 {
                if sub.seen & (1u128 << back) != 0 {
                    s.duplicates += 1;
                    return;
                }
                sub.seen |= 1u128 << back;
            }
        }
        sub.first_seq = sub.first_seq.map(|f| f.min(seq));
        sub.received += 1;
    }

    // ----- the control plane ---------------------------------------------

    fn report_check(&mut self, r: u32) {
        let period = Duration::from_millis(self.scenario.control_plane.change_check_ms);
        self.push(self.now + period, Ev::ReportCheck(r));
        if !self.nodes[r as usize].alive {
            return;
        }
        let now = self.instant();
        let node = &mut self.nodes[r as usize];
        let Some(links) = node.reporter.poll(&node.core.links(now), &self.poor, now) else {
            return;
        };
        let site = node.site;
        if let Some(p) = self.site_profile(site, self.cp.site) {
            let at = self.now + Duration::from_secs_f64(p.delay_ms / 1e3);
            let cp_life = self.cp.life;
            self.push(
                at,
                Ev::ReportArrive {
                    relay: r,
                    links,
                    cp_life,
                },
            );
        }
    }

    fn cp_tick(&mut self) {
        self.push(self.now + CP_TICK, Ev::CpTick);
        if !self.cp.up {
            return;
        }
        let now = self.instant();
        let (liveness, start) = self
            .cp
            .engine
            .tick(&self.cp.state, self.cp.routed_basis, now);
        for cmd in liveness {
            let _ = self.cp.state.apply(&cmd);
        }
        if let Some(start) = start {
            let state = &self.cp.state;
            let plan = match &self.cp.primaries {
                Some((epoch, basis, current)) if (*epoch, *basis) == (state.epoch, state.basis) => {
                    RouteEngine::plan_from(state, current, start.links, start.force)
                }
                _ => RouteEngine::plan(state, start.links, start.force),
            };
            let cpc = &self.scenario.control_plane;
            let at = self.now + Duration::from_millis(cpc.compute_ms + cpc.commit_ms);
            let plan = plan.map(Box::new);
            let cp_life = self.cp.life;
            self.push(at, Ev::EpochCommit { plan, cp_life });
        }
    }

    fn epoch_commit(&mut self, plan: Option<EpochPlan>) {
        self.cp.engine.epoch_finished();
        let Some(plan) = plan else {
            return;
        };
        if self.cp.state.apply(&plan.command).is_err() {
            return;
        }
        self.cp.routed_basis = Some(self.cp.state.basis);
        self.epochs
            .push((self.now.as_secs_f64(), plan.route_changes));
        // The plan's primaries are the applied state's primary set.
        let state = &self.cp.state;
        let routes = FixedRoutes::new(&state.graph(), &state.policy.routing, &plan.primaries);
        let at = self.now + Duration::from_millis(self.scenario.control_plane.compute_ms);
        let (epoch, cp_life) = (state.epoch, self.cp.life);
        self.cp.primaries = Some((state.epoch, state.basis, plan.primaries));
        self.push(
            at,
            Ev::RoutesReady {
                routes: Rc::new(RefCell::new(routes)),
                epoch,
                cp_life,
            },
        );
    }

    fn routes_ready(&mut self, routes: EpochRoutes, epoch: u64) {
        for r in 0..self.nodes.len() as u32 {
            let node = &self.nodes[r as usize];
            if !node.alive {
                continue;
            }
            let Some(p) = self.site_profile(self.cp.site, node.site) else {
                continue;
            };
            // Backups now only when asked to (a test compares both ways);
            // otherwise once the relay could use them.
            let table = if self.eager_backups {
                routes.borrow_mut().with_backups(RelayId(r))
            } else {
                routes.borrow().primaries(RelayId(r))
            };
            let mut table = table.unwrap_or_else(|| topology::RouteTable::empty(RelayId(r)));
            table.set_epoch(epoch);
            let at = self.now + Duration::from_secs_f64(p.delay_ms / 1e3);
            let life = node.life;
            let backups = (!self.eager_backups).then(|| routes.clone());
            self.push(
                at,
                Ev::RoutesArrive {
                    relay: r,
                    life,
                    table: Box::new(table),
                    backups,
                },
            );
        }
    }

    // ----- scenario events ---------------------------------------------

    fn sites_of(&self, codes: &[String]) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| codes.iter().any(|c| c.eq_ignore_ascii_case(&n.country)))
            .map(|n| n.site)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Directed site pairs between two sets (both directions); `to` empty
    /// means every other site with relays.
    fn site_pairs(&self, from: &[String], to: &[String], except: &[String]) -> Vec<(usize, usize)> {
        let a = self.sites_of(from);
        let b: Vec<usize> = if to.is_empty() {
            let mut all: Vec<usize> = self.nodes.iter().map(|n| n.site).collect();
            all.sort_unstable();
            all.dedup();
            all
        } else {
            self.sites_of(to)
        };
        let ex = self.sites_of(except);
        let mut out = Vec::new();
        for &x in &a {
            for &y in &b {
                if x != y && !ex.contains(&y) && !(a.contains(&y) && to.is_empty()) {
                    out.push((x, y));
                    out.push((y, x));
                }
            }
        }
        out
    }

    fn relays_named(&self, names: &[String]) -> Vec<u32> {
        (0..self.nodes.len() as u32)
            .filter(|&i| {
                let n = &self.nodes[i as usize];
                names
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(&n.name) || s.eq_ignore_ascii_case(&n.country))
            })
            .collect()
    }

    fn scenario_event(&mut self, index: usize) {
        let event = self.scenario.events[index].clone();
        // Pairs whose current overlay path the event may hurt are tracked
        // until they are on a good path again.
        let hurts = matches!(
            event.kind,
            EventKind::Degrade { .. } | EventKind::Cut { .. } | EventKind::Kill { .. }
        );
        let before: Vec<Option<Hops>> = if hurts {
            self.pairs
                .iter()
                .map(|&(a, b)| self.overlay_path(a, b).map(|(h, _)| h))
                .collect()
        } else {
            Vec::new()
        };
        let label;
        match &event.kind {
            EventKind::Degrade {
                from,
                to,
                except,
                profile,
                impairment,
                label: l,
            } => {
                let extra = impairment
                    .or_else(|| profile.as_deref().and_then(named_profile))
                    .unwrap_or(Profile::CLEAN);
                for p in self.site_pairs(from, to, except) {
                    self.impair.insert(p, extra);
                }
                label = l.clone().unwrap_or_else(|| {
                    format!(
                        "degrade {} ({})",
                        from.join("/"),
                        profile.as_deref().unwrap_or("custom")
                    )
                });
            }
            EventKind::Recover { from, to, except } => {
                for p in self.site_pairs(from, to, except) {
                    self.impair.remove(&p);
                }
                label = format!("recover {}", from.join("/"));
            }
            EventKind::Cut { from, to } => {
                for p in self.site_pairs(from, to, &[]) {
                    self.cut.insert(p);
                }
                // Connections across the cut time out.
                let pairs: Vec<(u32, u32)> = self.connected_across_cut();
                for (a, b) in pairs {
                    self.push(self.now + IDLE_TIMEOUT, Ev::Disconnect(a, b));
                }
                label = format!("cut {} - {}", from.join("/"), to.join("/"));
            }
            EventKind::Restore { from, to } => {
                for p in self.site_pairs(from, to, &[]) {
                    self.cut.remove(&p);
                }
                self.reconnect_all();
                label = format!("restore {} - {}", from.join("/"), to.join("/"));
            }
            EventKind::Kill { relays } => {
                for r in self.relays_named(relays) {
                    let n = &mut self.nodes[r as usize];
                    n.alive = false;
                    n.life += 1;
                    n.armed = None;
                    for &p in &n.peers.clone() {
                        self.push(self.now + IDLE_TIMEOUT, Ev::Disconnect(r, p));
                    }
                }
                label = format!("kill {}", relays.join(","));
            }
            EventKind::Restart { relays } => {
                for r in self.relays_named(relays) {
                    self.restart(r);
                }
                label = format!("restart {}", relays.join(","));
            }
            EventKind::ControlPlaneStop => {
                self.cp.up = false;
                self.cp.life += 1;
                self.cp.engine.lost_leadership();
                label = "control plane stops".into();
            }
            EventKind::ControlPlaneStart => {
                self.cp.up = true;
                let now = self.instant();
                self.cp.engine.became_leader(now);
                label = "control plane starts".into();
            }
        }
        self.refresh_all_models();
        self.events_log.push((self.now.as_secs_f64(), label));
        if !hurts {
            return;
        }
        let log_index = self.events_log.len() - 1;
        let mut oracle_good = Vec::new();
        for (i, &(a, b)) in self.pairs.iter().enumerate() {
            let Some(hops) = &before[i] else { continue };
            let was = self.path_metrics(hops);
            // Only pairs the event broke or made poor, that can be helped.
            if self.is_good(was) {
                continue;
            }
            oracle_good.push((i, a, b));
        }
        let oracle = self.oracle();
        for (i, a, b) in oracle_good {
            let fixable = oracle
                .route(RelayId(a), RelayId(b))
                .is_some_and(|e| !self.poor.is_poor(&e.primary.metrics));
            if fixable {
                let epoch = self.nodes[a as usize].core.route_table().epoch();
                self.tracked.push(Tracked {
                    event: log_index,
                    pair: self.pairs[i],
                    since: self.now,
                    epoch,
                });
            }
        }
        if !self.tracked.is_empty() && !self.polling {
            self.polling = true;
            self.push(self.now + REROUTE_STEP, Ev::ReroutePoll);
        }
    }

    fn connected_across_cut(&self) -> Vec<(u32, u32)> {
        self.connected
            .iter()
            .filter(|&&(a, b)| {
                a < b && {
                    let (sa, sb) = (self.nodes[a as usize].site, self.nodes[b as usize].site);
                    self.cut.contains(&(sa, sb))
                }
            })
            .copied()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    fn reconnect_all(&mut self) {
        let at = self.now + Duration::from_millis(self.scenario.relay.reconnect_ms);
        let pairs: BTreeSet<(u32, u32)> = self.models.keys().copied().collect();
        for (a, b) in pairs {
            if a < b && !self.connected.contains(&(a, b)) {
                self.push(at, Ev::Connect(a, b));
            }
        }
    }

    fn restart(&mut self, r: u32) {
        let n = &mut self.nodes[r as usize];
        if n.alive {
            return;
        }
        let mut config = n.core.config().clone();
        config.epoch += 1;
        n.core = Relay::new(config);
        n.backups = None;
        n.alive = true;
        n.life += 1;
        n.armed = None;
        n.reporter.reset();
        // The old connections are gone on both sides.
        let peers = n.peers.clone();
        for p in peers {
            self.disconnect(r, p);
        }
        self.reconnect_all();
        // Its stream clients rejoin (as the SDK does).
        for si in 0..self.streams.len() {
            let s = &self.streams[si];
            let subs: Vec<usize> = (0..s.subscribers.len())
                .filter(|&k| s.subscribers[k].relay == r && s.subscribers[k].join_at <= self.now)
                .collect();
            let publisher = s.publisher.0 == r;
            let at = self.now + Duration::from_millis(self.scenario.relay.reconnect_ms);
            for k in subs {
                self.push(at, Ev::Join { stream: si, sub: k });
            }
            if publisher {
                self.push(
                    at,
                    Ev::Join {
                        stream: si,
                        sub: usize::MAX,
                    },
                );
            }
        }
    }

    // ----- sampling ------------------------------------------------------

    fn sample_pairs(&mut self) {
        let interval = Duration::from_millis(self.scenario.pairs.interval_ms);
        self.push(self.now + interval, Ev::PairSample);
        if self.pairs.is_empty() {
            return;
        }
        let oracle = self.oracle();
        let warm = self.now.as_secs_f64() >= self.scenario.report.warmup_s;
        let (mut d, mut o, mut x) = (0u64, 0u64, 0u64);
        for i in 0..self.pairs.len() {
            let (a, b) = self.pairs[i];
            if !self.is_good(self.truth_direct(a, b)) {
                d += 1;
            }
            let (m, path) = self.overlay_metrics(a, b);
            if !self.is_good(m) {
                o += 1;
            }
            let best = oracle
                .route(RelayId(a), RelayId(b))
                .map(|e| e.primary.metrics)
                .filter(|_| self.nodes[a as usize].alive && self.nodes[b as usize].alive);
            if !self.is_good(best) {
                x += 1;
            }
            let hops = path.map(|(h, _)| h);
            if warm && self.last_paths[i].is_some() && hops.is_some() && self.last_paths[i] != hops
            {
                self.path_changes[i] += 1;
            }
            if hops.is_some() {
                self.last_paths[i] = hops;
            }
        }
        let n = self.pairs.len() as f64;
        if warm {
            self.poor_sums.0 += d;
            self.poor_sums.1 += o;
            self.poor_sums.2 += x;
            self.warm_samples += 1;
        }
        self.timeline.push(TimelinePoint {
            t: self.now.as_secs_f64(),
            direct: d as f64 / n,
            overlay: o as f64 / n,
            oracle: x as f64 / n,
        });
    }

    fn flow_tick(&mut self) {
        let interval = Duration::from_millis(self.scenario.flows.interval_ms);
        self.push(self.now + interval, Ev::FlowTick);
        for i in 0..self.flows.len() {
            let (src, dst) = (self.flows[i].src, self.flows[i].dst);
            let (m, _) = self.overlay_metrics(src, dst);
            let direct = self.truth_direct(src, dst);
            let poor = self.poor;
            let f = &mut self.flows[i];
            f.overlay.add(m, &poor);
            f.direct.add(direct, &poor);
        }
    }

    fn reroute_poll(&mut self) {
        let mut still = Vec::new();
        for t in std::mem::take(&mut self.tracked) {
            let (a, b) = t.pair;
            let (m, _) = self.overlay_metrics(a, b);
            if self.is_good(m) {
                let local = self.nodes[a as usize].core.route_table().epoch() == t.epoch;
                self.reroutes.push(Reroute {
                    event: t.event,
                    seconds: (self.now - t.since).as_secs_f64(),
                    mechanism: if local {
                        Mechanism::Local
                    } else {
                        Mechanism::ControlPlane
                    },
                });
            } else if self.now - t.since >= REROUTE_DEADLINE {
                self.unrecovered += 1;
            } else {
                still.push(t);
            }
        }
        self.tracked = still;
        if self.tracked.is_empty() {
            self.polling = false;
        } else {
            self.push(self.now + REROUTE_STEP, Ev::ReroutePoll);
        }
    }

    fn snapshot(&mut self) {
        let mut used: HashSet<(u32, u32)> = HashSet::new();
        for &(a, b) in &self.pairs {
            if let Some((hops, _)) = self.overlay_path(a, b) {
                for w in hops.windows(2) {
                    used.insert((w[0].0.min(w[1].0), w[0].0.max(w[1].0)));
                }
            }
        }
        let mut links = Vec::new();
        for &(a, b) in self.models.keys().collect::<BTreeSet<_>>() {
            if a > b {
                continue;
            }
            let state = match (self.truth_link(a, b), self.truth_link(b, a)) {
                (Some(x), Some(y)) if !self.poor.is_poor(&x) && !self.poor.is_poor(&y) => "good",
                (Some(_), Some(_)) => "poor",
                _ => "down",
            };
            links.push((a, b, state, used.contains(&(a, b))));
        }
        self.maps.push(MapSnapshot {
            at_s: self.now.as_secs_f64(),
            alive: self.nodes.iter().map(|n| n.alive).collect(),
            links,
        });
    }

    // ----- the loop ------------------------------------------------------

    /// Runs the scenario to its end and returns the result.
    pub fn run(mut self) -> RunResult {
        let end = Duration::from_secs_f64(self.scenario.duration_s);
        // Peer connections come up in the first second, staggered.
        let mut pairs: Vec<(u32, u32)> =
            self.models.keys().copied().filter(|(a, b)| a < b).collect();
        pairs.sort_unstable();
        for (a, b) in pairs {
            let at = Duration::from_micros(self.rng.random_range(0..1_000_000));
            self.push(at, Ev::Connect(a, b));
        }
        let check = self.scenario.control_plane.change_check_ms;
        for r in 0..self.nodes.len() as u32 {
            let at = Duration::from_millis(self.rng.random_range(0..check));
            self.push(at, Ev::ReportCheck(r));
        }
        self.push(Duration::ZERO, Ev::CpTick);
        self.push(Duration::ZERO, Ev::PairSample);
        self.push(Duration::ZERO, Ev::FlowTick);
        for i in 0..self.scenario.events.len() {
            let at = Duration::from_secs_f64(self.scenario.events[i].at_s);
            self.push(at, Ev::Scenario(i));
        }
        for i in 0..self.scenario.report.map_at_s.len() {
            let at = Duration::from_secs_f64(self.scenario.report.map_at_s[i]);
            self.push(at, Ev::Snapshot);
        }
        while let Some((at, ev)) = self.queue.pop() {
            if at > end {
                break;
            }
            self.now = at;
            self.processed += 1;
            self.handle(ev);
        }
        self.now = end;
        // Pairs still waiting at the end never recovered.
        self.unrecovered += self.tracked.len();
        self.finish()
    }

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Wake(r) => {
                let now = self.instant();
                let node = &mut self.nodes[r as usize];
                if !node.alive || node.armed != Some(self.now) {
                    return;
                }
                node.armed = None;
                node.core.handle_timeout(now);
                self.drain(r);
            }
            Ev::Peer {
                from,
                to,
                life,
                frame,
                data,
            } => {
                let now = self.instant();
                let node = &mut self.nodes[to as usize];
                if !node.alive || node.life != life || !self.connected.contains(&(to, from)) {
                    return;
                }
                if frame {
                    // Frames carry their length prefix; relays send valid ones.
                    let _ = node.core.handle_peer_frame(RelayId(from), &data[4..], now);
                } else {
                    node.core.handle_peer_datagram(RelayId(from), &data, now);
                }
                self.drain(to);
            }
            Ev::Connect(a, b) => self.connect(a, b),
            Ev::Disconnect(a, b) => {
                // Only if the reason still holds (a restart or restore may
                // have come first).
                let (na, nb) = (&self.nodes[a as usize], &self.nodes[b as usize]);
                if !na.alive || !nb.alive || self.cut.contains(&(na.site, nb.site)) {
                    self.disconnect(a, b);
                }
            }
            Ev::ReportCheck(r) => self.report_check(r),
            Ev::ReportArrive {
                relay,
                links,
                cp_life,
            } => {
                if self.cp.up && cp_life == self.cp.life {
                    let now = self.instant();
                    self.cp.engine.on_report(RelayId(relay), &links, now);
                }
            }
            Ev::CpTick => self.cp_tick(),
            Ev::EpochCommit { plan, cp_life } => {
                if self.cp.up && cp_life == self.cp.life {
                    self.epoch_commit(plan.map(|p| *p));
                }
            }
            Ev::RoutesReady {
                routes,
                epoch,
                cp_life,
            } => {
                if self.cp.up && cp_life == self.cp.life {
                    self.routes_ready(routes, epoch);
                }
            }
            Ev::RoutesArrive {
                relay,
                life,
                table,
                backups,
            } => {
                let node = &mut self.nodes[relay as usize];
                if node.alive && node.life == life {
                    if node.core.set_route_table(*table) {
                        self.backups_pending += u64::from(backups.is_some());
                        node.backups = backups;
                        self.complete_backups(relay, true);
                    }
                    self.drain(relay);
                }
            }
            Ev::Scenario(i) => self.scenario_event(i),
            Ev::PairSample => self.sample_pairs(),
            Ev::FlowTick => self.flow_tick(),
            Ev::ReroutePoll => self.reroute_poll(),
            Ev::Publish(s) => self.publish(s),
            Ev::Join { stream, sub } => self.join(stream, sub),
            Ev::Snapshot => self.snapshot(),
        }
    }

    fn finish(self) -> RunResult {
        let hours = (self.scenario.duration_s - self.scenario.report.warmup_s).max(1.0) / 3600.0;
        let changes: u64 = self.path_changes.iter().map(|&c| u64::from(c)).sum();
        let route_changes_per_pair_hour = if self.pairs.is_empty() {
            0.0
        } else {
            changes as f64 / self.pairs.len() as f64 / hours
        };
        let (d, o, x) = self.poor_sums;
        let overlay_vs_oracle = (d > x).then(|| (d as f64 - o as f64) / (d - x) as f64);
        let samples = (self.warm_samples * self.pairs.len() as u64).max(1) as f64;
        let summarize = |a: &PathAccum| {
            let n = a.samples.max(1) as f64;
            let good = (a.samples - a.broken).max(1) as f64;
            (
                a.latency_ms / good,
                a.loss / n,
                (a.poor + a.broken) as f64 / n,
            )
        };
        let flow_results = self
            .flows
            .iter()
            .map(|f| FlowResult {
                src: self.nodes[f.src as usize].name.clone(),
                dst: self.nodes[f.dst as usize].name.clone(),
                direct: summarize(&f.direct),
                overlay: summarize(&f.overlay),
            })
            .collect();
        let streams = self.streams.iter().map(stream_result).collect();
        let mut result = RunResult {
            scenario: self.scenario.name.clone(),
            seed: self.seed,
            short: self.short,
            world_source: self.world_source.clone(),
            duration_s: self.scenario.duration_s,
            warmup_s: self.scenario.report.warmup_s,
            wall_s: 0.0,
            events_processed: self.processed,
            relays: self
                .nodes
                .iter()
                .map(|n| RelaySummary {
                    name: n.name.clone(),
                    country: n.country.clone(),
                    lat: n.lat,
                    lon: n.lon,
                })
                .collect(),
            links: self.models.len(),
            peer_datagrams: self.datagrams,
            pairs: self.pairs.len(),
            flows: self.flows.len(),
            timeline: self.timeline,
            events: self.events_log,
            epochs: self.epochs,
            reroutes: self.reroutes,
            unrecovered: self.unrecovered,
            route_changes_per_pair_hour,
            route_changes_by_pair: self.path_changes,
            overlay_vs_oracle,
            poor_share: (d as f64 / samples, o as f64 / samples, x as f64 / samples),
            flow_results,
            streams,
            maps: self.maps,
            checks: Vec::new(),
            backups_completed: (self.backups_pending, self.backups_completed),
        };
        result.checks = evaluate_checks(&self.scenario.checks, &result);
        result
    }
}

impl RunResult {
    /// Seconds to reroute of the pairs that recovered by `mechanism`.
    pub fn reroute_seconds(&self, mechanism: Mechanism) -> Vec<f64> {
        self.reroutes
            .iter()
            .filter(|x| x.mechanism == mechanism)
            .map(|x| x.seconds)
            .collect()
    }
}

fn stream_result(s: &Stream) -> StreamResult {
    let mut join: Vec<f64> = s
        .subscribers
        .iter()
        .filter_map(|x| x.first.map(|f| f.saturating_sub(x.join_at).as_secs_f64()))
        .collect();
    join.sort_by(f64::total_cmp);
    let (mut got, mut expected) = (0u64, 0u64);
    for x in &s.subscribers {
        if let Some(first) = x.first_seq {
            got += x.received;
            expected += s.seq.saturating_sub(first) + 1;
        }
    }
    let total: u64 = s.latency_hist.iter().sum();
    let pct = |q: f64| -> f64 {
        let target = (total as f64 * q).ceil() as u64;
        let mut acc = 0;
        for (ms, &n) in s.latency_hist.iter().enumerate() {
            acc += n;
            if acc >= target.max(1) {
                return ms as f64;
            }
        }
        f64::NAN
    };
    StreamResult {
        channel: s.spec.channel.clone(),
        subscribers: s.subscribers.len(),
        receiving: join.len(),
        join_to_first_s: join,
        published: s.seq,
        delivery: if expected == 0 {
            0.0
        } else {
            got as f64 / expected as f64
        },
        latency_p50_ms: pct(0.5),
        latency_p99_ms: pct(0.99),
        duplicates: s.duplicates,
    }
}

/// p-quantile of unsorted values (NaN when empty).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    crate::report::percentile(&v, q)
}

fn evaluate_checks(c: &crate::scenario::Checks, r: &RunResult) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let mut check = |name: &str, value: f64, bound: f64, at_least: bool| {
        let ok = if at_least {
            value >= bound
        } else {
            value <= bound
        };
        out.push(CheckResult {
            name: name.into(),
            value,
            bound,
            ok: ok && !value.is_nan(),
        });
    };
    if let Some(b) = c.overlay_vs_oracle_min {
        check(
            "overlay removes this share of the poor pair-time the oracle removes",
            r.overlay_vs_oracle.unwrap_or(f64::NAN),
            b,
            true,
        );
    }
    if let Some(b) = c.reroute_cp_p95_max_s {
        check(
            "reroute through the control plane, p95 s",
            quantile(&r.reroute_seconds(Mechanism::ControlPlane), 0.95),
            b,
            false,
        );
    }
    if let Some(b) = c.reroute_local_p95_max_s {
        check(
            "reroute through local backups, p95 s",
            quantile(&r.reroute_seconds(Mechanism::Local), 0.95),
            b,
            false,
        );
    }
    if let Some(b) = c.route_changes_per_pair_hour_max {
        check(
            "route changes per pair per hour",
            r.route_changes_per_pair_hour,
            b,
            false,
        );
    }
    for s in &r.streams {
        if let Some(b) = c.stream_delivery_min {
            check(
                &format!("stream {}: delivered share", s.channel),
                s.delivery,
                b,
                true,
            );
            check(
                &format!("stream {}: subscribers receiving", s.channel),
                s.receiving as f64 / s.subscribers.max(1) as f64,
                b,
                true,
            );
        }
        if let Some(b) = c.stream_join_p95_max_s {
            check(
                &format!("stream {}: join to first media p95 s", s.channel),
                quantile(&s.join_to_first_s, 0.95),
                b,
                false,
            );
        }
    }
    if let Some(b) = c.final_overlay_poor_max {
        let last = r.timeline.last().map_or(f64::NAN, |p| p.overlay - p.oracle);
        check(
            "overlay poor share above the oracle's at the end",
            last,
            b,
            false,
        );
    }
    out
}
