//! Scenario files: the world, the overlay, the workload and what happens
//! over time, in TOML (`simulations/scenarios/*.toml`).
//!
//! Every section has defaults; a scenario names only what it changes.
//! Unknown keys are errors, so a typo does not silently run the default.

use std::path::Path;

use netmodel::Profile;
use serde::{Deserialize, Serialize};

/// A whole scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name (the file name without `.toml` by convention).
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// Virtual duration, seconds.
    #[serde(default = "default_duration")]
    pub duration_s: f64,
    /// RNG seed (overridable on the command line).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Relays and where they are.
    #[serde(default)]
    pub world: WorldSpec,
    /// Which relays peer with which.
    #[serde(default)]
    pub overlay: OverlaySpec,
    /// Relay core settings.
    #[serde(default)]
    pub relay: RelaySpec,
    /// The control plane model.
    #[serde(default)]
    pub control_plane: ControlPlaneSpec,
    /// Flows evaluated from their path's state.
    #[serde(default)]
    pub flows: FlowSpec,
    /// Relay pairs sampled for the poor-pair fractions.
    #[serde(default)]
    pub pairs: PairSpec,
    /// Live streams simulated packet by packet through the relay cores.
    #[serde(default)]
    pub streams: Vec<StreamSpec>,
    /// What happens, when.
    #[serde(default)]
    pub events: Vec<EventSpec>,
    /// Headline properties checked at the end (a failed check fails the run).
    #[serde(default)]
    pub checks: Checks,
    /// Report settings.
    #[serde(default)]
    pub report: ReportSpec,
    /// Overrides for the short form CI runs (`--short`).
    #[serde(default)]
    pub short: ShortSpec,
}

fn default_duration() -> f64 {
    600.0
}
fn default_seed() -> u64 {
    1
}

/// Relays and where they are.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorldSpec {
    /// Country codes with relays (empty: every country of the built-in
    /// table that the data covers).
    pub countries: Vec<String>,
    /// Total relays, spread round-robin over the countries (at least one
    /// per country).
    pub relays: usize,
    /// RTT between two relays of the same country, ms (metro fiber and
    /// exchange points).
    pub domestic_rtt_ms: f64,
    /// Jitter on every link, ms (the data set's `rtt_std` mostly measures
    /// route changes, not packet-to-packet jitter).
    pub base_jitter_ms: f64,
    /// Loss on every link, 0..1.
    pub base_loss: f64,
}

impl Default for WorldSpec {
    fn default() -> Self {
        Self {
            countries: Vec::new(),
            relays: 96,
            domestic_rtt_ms: 4.0,
            base_jitter_ms: 1.0,
            base_loss: 0.001,
        }
    }
}

/// Which relays peer with which (probed links the overlay may use).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverlaySpec {
    /// Peers in the same country, nearest first.
    pub domestic_peers: usize,
    /// Peers abroad, lowest base RTT first.
    pub foreign_peers: usize,
    /// The first relay of every country is a hub, and hubs form a full
    /// mesh (the long-haul backbone).
    pub hub_mesh: bool,
}

impl Default for OverlaySpec {
    fn default() -> Self {
        Self {
            domestic_peers: 3,
            foreign_peers: 4,
            hub_mesh: true,
        }
    }
}

/// Relay core settings (as in `relayd.toml`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySpec {
    /// Probe interval per peer, ms.
    pub probe_interval_ms: u64,
    /// A probe without an echo after this long is lost, ms.
    pub probe_timeout_ms: u64,
    /// Consecutive lost probes that make a link dead.
    pub dead_after_losses: u32,
    /// Probe timeout from the measured RTT (`probe_timeout_ms` bounds it).
    pub adaptive_timeout: bool,
    /// Time a peer connection takes to come back after a restart, ms.
    pub reconnect_ms: u64,
}

impl Default for RelaySpec {
    fn default() -> Self {
        Self {
            probe_interval_ms: 500,
            probe_timeout_ms: 1500,
            dead_after_losses: 3,
            adaptive_timeout: false,
            reconnect_ms: 2000,
        }
    }
}

/// The control plane as the simulator models it: the real route engine
/// and replicated state machine, with Raft replaced by a fixed commit delay.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneSpec {
    /// Country of the leader (reports and route pushes take the one-way
    /// delay from and to it).
    pub site: String,
    /// Shortest time between route epochs, ms.
    pub epoch_interval_ms: u64,
    /// Full link report period per relay, ms (changes go out sooner).
    pub report_interval_ms: u64,
    /// How often relays check their links for meaningful changes, ms.
    pub change_check_ms: u64,
    /// Raft commit of an epoch (a quorum round trip and fsync), ms.
    pub commit_ms: u64,
    /// Route computation with backups for the whole network, ms.
    pub compute_ms: u64,
}

impl Default for ControlPlaneSpec {
    fn default() -> Self {
        Self {
            site: "DE".into(),
            epoch_interval_ms: 1000,
            report_interval_ms: 5000,
            change_check_ms: 250,
            commit_ms: 10,
            compute_ms: 60,
        }
    }
}

/// Flows between relays, evaluated from the state of their path.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowSpec {
    /// Number of flows.
    pub count: usize,
    /// Evaluation interval, ms.
    pub interval_ms: u64,
    /// Countries the senders are in (empty: any).
    pub from: Vec<String>,
    /// Countries the receivers are in (empty: any).
    pub to: Vec<String>,
}

impl Default for FlowSpec {
    fn default() -> Self {
        Self {
            count: 2000,
            interval_ms: 1000,
            from: Vec::new(),
            to: Vec::new(),
        }
    }
}

/// Relay pairs sampled for the poor-pair fractions and reroute times.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PairSpec {
    /// Ordered pairs of relays in different countries, sampled (0: all).
    pub sample: usize,
    /// Sampling interval, ms.
    pub interval_ms: u64,
}

impl Default for PairSpec {
    fn default() -> Self {
        Self {
            sample: 4000,
            interval_ms: 1000,
        }
    }
}

/// A live stream: one publisher, subscribers joining over a window, every
/// media packet simulated through the relay cores.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSpec {
    /// Channel name.
    pub channel: String,
    /// Country of the publisher's relay.
    pub publisher: String,
    /// Countries the subscribers are spread over (empty: all).
    #[serde(default)]
    pub subscriber_countries: Vec<String>,
    /// Number of subscribers.
    pub subscribers: usize,
    /// When the first subscriber joins, seconds.
    #[serde(default)]
    pub join_at_s: f64,
    /// Joins are spread uniformly over this window, seconds.
    #[serde(default)]
    pub join_window_s: f64,
    /// Media packets per second.
    #[serde(default = "default_rate")]
    pub rate_pps: f64,
    /// Payload bytes.
    #[serde(default = "default_payload")]
    pub payload: usize,
}

fn default_rate() -> f64 {
    25.0
}
fn default_payload() -> usize {
    200
}

/// Something that happens at a point in virtual time. (Unknown keys are
/// refused by the flattened [`EventKind`].)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventSpec {
    /// When, seconds.
    pub at_s: f64,
    /// What.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// The kinds of events.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum EventKind {
    /// Impair the paths between two sets of countries (both directions):
    /// the direct Internet path and every relay link between them.
    Degrade {
        /// Countries on one side.
        from: Vec<String>,
        /// Countries on the other side (empty: every other country).
        #[serde(default)]
        to: Vec<String>,
        /// Countries excluded from `to` (regional paths that stay good).
        #[serde(default)]
        except: Vec<String>,
        /// A named profile (see [`named_profile`]) ...
        #[serde(default)]
        profile: Option<String>,
        /// ... or explicit extra impairment.
        #[serde(default)]
        impairment: Option<Profile>,
        /// Label on plots.
        #[serde(default)]
        label: Option<String>,
    },
    /// Remove the impairments between the sets again.
    Recover {
        /// Countries on one side.
        from: Vec<String>,
        /// Countries on the other side (empty: every other country).
        #[serde(default)]
        to: Vec<String>,
        /// Countries excluded from `to`.
        #[serde(default)]
        except: Vec<String>,
    },
    /// Cut every path between the sets (fiber cut, both directions).
    Cut {
        /// Countries on one side.
        from: Vec<String>,
        /// Countries on the other side.
        to: Vec<String>,
    },
    /// Undo a cut.
    Restore {
        /// Countries on one side.
        from: Vec<String>,
        /// Countries on the other side.
        to: Vec<String>,
    },
    /// Kill relays (no goodbye).
    Kill {
        /// Relays by name (`SG-1`), or every relay of a country (`SG`).
        relays: Vec<String>,
    },
    /// Restart killed relays (a new epoch; peers reconnect).
    Restart {
        /// As for `kill`.
        relays: Vec<String>,
    },
    /// Stop the control plane: no reports, no epochs, no pushes.
    ControlPlaneStop,
    /// Start it again (a new leader: soft state rebuilt from reports).
    ControlPlaneStart,
}

/// Headline properties checked at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Checks {
    /// Overlay's removed poor pair-time over the oracle's, at least.
    pub overlay_vs_oracle_min: Option<f64>,
    /// p95 time to reroute through the control plane, at most (s).
    pub reroute_cp_p95_max_s: Option<f64>,
    /// p95 time to reroute through local backups, at most (s).
    pub reroute_local_p95_max_s: Option<f64>,
    /// Route changes per pair per hour, at most.
    pub route_changes_per_pair_hour_max: Option<f64>,
    /// Share of a stream's subscribers receiving media, at least.
    pub stream_delivery_min: Option<f64>,
    /// p95 of join-to-first-media, at most (s).
    pub stream_join_p95_max_s: Option<f64>,
    /// Overlay poor-pair share at the end, at most (recovered).
    pub final_overlay_poor_max: Option<f64>,
}

/// Report settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReportSpec {
    /// Instants (seconds) at which the world map is drawn.
    pub map_at_s: Vec<f64>,
    /// Start-up left out of the sums and checks (links being measured,
    /// first epochs), seconds.
    pub warmup_s: f64,
}

impl Default for ReportSpec {
    fn default() -> Self {
        Self {
            map_at_s: vec![],
            warmup_s: 30.0,
        }
    }
}

/// Smaller numbers for CI; the timeline stays the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShortSpec {
    /// Relays.
    pub relays: usize,
    /// Flows.
    pub flows: usize,
    /// Sampled pairs.
    pub pairs: usize,
    /// Subscribers per stream at most.
    pub subscribers: usize,
    /// Duration at most, seconds (events after it are dropped).
    pub duration_s: Option<f64>,
}

impl Default for ShortSpec {
    fn default() -> Self {
        Self {
            relays: 48,
            flows: 500,
            pairs: 1000,
            subscribers: 500,
            duration_s: None,
        }
    }
}

/// Why a scenario was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML for a scenario.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// Values that make no sense.
    #[error("{0}")]
    Invalid(String),
}

impl Scenario {
    /// Reads a scenario file, or a scenario by name from `scenarios_dir`.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates scenario text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: origin.into(),
            source: Box::new(e),
        })?;
        s.validate()?;
        Ok(s)
    }

    fn validate(&self) -> Result<(), ScenarioError> {
        let bad = |m: String| Err(ScenarioError::Invalid(format!("{}: {m}", self.name)));
        if !(self.duration_s > 0.0 && self.duration_s <= 24.0 * 3600.0) {
            return bad(format!("duration_s {} not in (0, 86400]", self.duration_s));
        }
        if self.world.relays == 0 {
            return bad("world.relays must be at least 1".into());
        }
        if self.relay.probe_interval_ms < 10 || self.relay.probe_timeout_ms < 10 {
            return bad("probe interval and timeout must be at least 10 ms".into());
        }
        if self.relay.dead_after_losses == 0 {
            return bad("relay.dead_after_losses must be at least 1".into());
        }
        for (what, v) in [
            ("flows.interval_ms", self.flows.interval_ms),
            ("pairs.interval_ms", self.pairs.interval_ms),
            (
                "control_plane.epoch_interval_ms",
                self.control_plane.epoch_interval_ms,
            ),
            (
                "control_plane.report_interval_ms",
                self.control_plane.report_interval_ms,
            ),
            (
                "control_plane.change_check_ms",
                self.control_plane.change_check_ms,
            ),
        ] {
            if v < 10 {
                return bad(format!("{what} must be at least 10"));
            }
        }
        for s in &self.streams {
            if !(s.rate_pps > 0.0 && s.rate_pps <= 1000.0) {
                return bad(format!(
                    "stream {}: rate_pps must be in (0, 1000]",
                    s.channel
                ));
            }
            if s.payload == 0 || s.payload > 1100 {
                return bad(format!("stream {}: payload must be 1..=1100", s.channel));
            }
        }
        for e in &self.events {
            if e.at_s.is_nan() || e.at_s < 0.0 {
                return bad(format!("event at {} s: time must be >= 0", e.at_s));
            }
            if let EventKind::Degrade {
                profile,
                impairment,
                ..
            } = &e.kind
            {
                match (profile, impairment) {
                    (Some(name), None) => {
                        if named_profile(name).is_none() {
                            return bad(format!(
                                "event at {} s: unknown profile {name:?} (known: {})",
                                e.at_s,
                                PROFILE_NAMES.join(", ")
                            ));
                        }
                    }
                    (None, Some(p)) => p
                        .validate()
                        .map_err(|err| ScenarioError::Invalid(format!("{}: {err}", self.name)))?,
                    _ => {
                        return bad(format!(
                            "event at {} s: degrade needs exactly one of profile or impairment",
                            e.at_s
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies the short form.
    pub fn shorten(&mut self) {
        let s = self.short.clone();
        self.world.relays = self.world.relays.min(s.relays);
        self.flows.count = self.flows.count.min(s.flows);
        self.pairs.sample = if self.pairs.sample == 0 {
            s.pairs
        } else {
            self.pairs.sample.min(s.pairs)
        };
        for st in &mut self.streams {
            st.subscribers = st.subscribers.min(s.subscribers);
        }
        if let Some(d) = s.duration_s {
            self.duration_s = self.duration_s.min(d);
            let end = self.duration_s;
            self.events.retain(|e| e.at_s < end);
            self.report.map_at_s.retain(|t| *t <= end);
        }
    }
}

/// Names of the built-in impairment profiles.
pub const PROFILE_NAMES: &[&str] = &["sea-3g", "sea-mobile", "weak-inter-region", "congested"];

/// The built-in impairment profiles: extra delay, jitter and bursty loss
/// added on top of a path's base metrics.
///
/// - `sea-3g`: a 3G access network in Southeast Asia: +90 ms one way,
///   25 ms jitter, 3 % loss in bursts of 3 packets. Ookla and OpenSignal
///   report 3G latencies of 150-300 ms RTT in ID, PH and VN; ITU-T G.1050
///   gives 1-3 % bursty loss for "poor" managed mobile access.
/// - `sea-mobile`: congested 4G in the region: +40 ms, 12 ms jitter, 1.5 %
///   loss in bursts of 2 (OpenSignal's 4G latency 45-70 ms in ID/PH with
///   evening peaks).
/// - `weak-inter-region`: a congested long-haul transit: +60 ms, 15 ms
///   jitter, 2 % loss in bursts of 4 (RIPE Atlas `rtt_std` of 50-100 ms on
///   transpacific and Asia-Middle East pairs; Via's poor thresholds).
/// - `congested`: a busy peering point: +20 ms, 8 ms jitter, 0.8 % loss.
pub fn named_profile(name: &str) -> Option<Profile> {
    let p = |delay_ms, jitter_ms, loss, burst| Profile {
        delay_ms,
        jitter_ms,
        loss,
        burst,
        ..Profile::CLEAN
    };
    match name {
        "sea-3g" => Some(p(90.0, 25.0, 0.03, 3.0)),
        "sea-mobile" => Some(p(40.0, 12.0, 0.015, 2.0)),
        "weak-inter-region" => Some(p(60.0, 15.0, 0.02, 4.0)),
        "congested" => Some(p(20.0, 8.0, 0.008, 1.0)),
        _ => None,
    }
}

/// `base` with `extra` impairment on top: delays add, jitters add in
/// quadrature, losses compound, the worse burst length wins.
pub fn stack(base: &Profile, extra: &Profile) -> Profile {
    Profile {
        delay_ms: base.delay_ms + extra.delay_ms,
        jitter_ms: (base.jitter_ms.powi(2) + extra.jitter_ms.powi(2)).sqrt(),
        loss: 1.0 - (1.0 - base.loss) * (1.0 - extra.loss),
        burst: base.burst.max(extra.burst),
        rate_kbps: if extra.rate_kbps > 0.0 {
            extra.rate_kbps
        } else {
            base.rate_kbps
        },
        queue_ms: base.queue_ms.max(extra.queue_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    Some(s.name.as_str()),
                    path.file_stem().and_then(|s| s.to_str())
                );
                n += 1;
            }
        }
        assert!(n >= 5, "{n} scenarios");
    }

    #[test]
    fn bad_scenarios_are_explained() {
        let e = Scenario::parse("name = \"x\"\nduraton_s = 5\n", "t").unwrap_err();
        assert!(e.to_string().contains("duraton_s"), "{e}");
        let e = Scenario::parse(
            "name = \"x\"\n[[events]]\nat_s = 1\nkind = \"degrade\"\nfrom = [\"ID\"]\nprofile = \"4g\"\n",
            "t",
        )
        .unwrap_err();
        assert!(e.to_string().contains("unknown profile"), "{e}");
        let e = Scenario::parse("name = \"x\"\nduration_s = -1\n", "t").unwrap_err();
        assert!(e.to_string().contains("duration_s"), "{e}");
    }

    #[test]
    fn impairments_stack() {
        let base = Profile {
            delay_ms: 50.0,
            jitter_ms: 3.0,
            loss: 0.01,
            ..Profile::CLEAN
        };
        let s = stack(&base, &named_profile("sea-3g").unwrap());
        assert_eq!(s.delay_ms, 140.0);
        assert!((s.jitter_ms - (9.0f64 + 625.0).sqrt()).abs() < 1e-9);
        assert!((s.loss - (1.0 - 0.99 * 0.97)).abs() < 1e-12);
        assert_eq!(s.burst, 3.0);
    }
}
