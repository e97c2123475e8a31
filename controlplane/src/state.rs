//! The replicated state machine: what crosses Raft and how it is applied.
//!
//! Every node applies the same [`Command`]s in log order to a
//! [`ClusterState`]; application is deterministic and never fails (a
//! command that does not make sense is recorded as rejected, the same way
//! on every node).
//!
//! What is replicated: relay membership and admin state (drain), liveness
//! decisions (lease expiry), apps and their secrets, policy, the routing
//! inputs (link metrics quantized, only when they changed meaningfully) and
//! the route decisions (primary paths, as diffs per epoch). Raw probe
//! samples and periodic reports are soft state on the leader; see
//! [`crate::engine`].

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use topology::{
    Graph, Hops, Metrics, RelayId, RelayState, Route, RouteEntry, RouteSet, RouteTable,
    RoutingConfig,
};

/// A relay's admin state, set by operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Admin {
    /// In service.
    #[default]
    Active,
    /// No transit, clients told to move.
    Draining,
}

/// What a relay says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Name.
    pub name: String,
    /// Region code.
    pub region: String,
    /// Coordinates.
    pub location: Option<(f64, f64)>,
    /// Where clients and peers reach it.
    pub addr: String,
    /// Clients it is willing to serve.
    pub capacity: u32,
}

/// A registered relay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayRecord {
    /// Its id.
    pub id: RelayId,
    /// What it registered with.
    pub info: RelayInfo,
    /// Operator state.
    pub admin: Admin,
    /// Liveness as decided by the leader from heartbeats (lease).
    pub alive: bool,
}

impl RelayRecord {
    /// The state routing sees.
    pub fn routing_state(&self) -> RelayState {
        match (self.alive, self.admin) {
            (false, _) => RelayState::Down,
            (true, Admin::Draining) => RelayState::Draining,
            (true, Admin::Active) => RelayState::Active,
        }
    }
}

/// An app secret: hex, never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Routing policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Cost weights, poor thresholds, hysteresis.
    pub routing: RoutingConfig,
    /// Directed links never used.
    pub forbidden_links: Vec<(RelayId, RelayId)>,
    /// Regions whose relays never carry transit (they stay endpoints).
    pub no_transit_regions: Vec<String>,
}

/// Link metrics as replicated: quantized so that noise does not make
/// every report a change (RTT and jitter in 0.1 ms, loss in 0.001 %).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkMetricsQ {
    /// RTT, 0.1 ms units.
    pub rtt: u32,
    /// Jitter, 0.1 ms units.
    pub jitter: u32,
    /// Loss, 1e-5 units.
    pub loss: u32,
}

impl LinkMetricsQ {
    /// Quantizes metrics.
    pub fn from_metrics(m: &Metrics) -> Self {
        let q = |v: f64, unit: f64| (v / unit).round().clamp(0.0, f64::from(u32::MAX)) as u32;
        Self {
            rtt: q(m.rtt_ms, 0.1),
            jitter: q(m.jitter_ms, 0.1),
            loss: q(m.loss.clamp(0.0, 1.0), 1e-5),
        }
    }

    /// Back to metrics.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            rtt_ms: f64::from(self.rtt) * 0.1,
            jitter_ms: f64::from(self.jitter) * 0.1,
            loss: (f64::from(self.loss) * 1e-5).min(1.0),
        }
    }
}

/// One link's change in an epoch: new metrics, or `None` when it is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkUpdate {
    /// Link source.
    pub from: RelayId,
    /// Link destination.
    pub to: RelayId,
    /// New metrics, or removed.
    pub metrics: Option<LinkMetricsQ>,
}

/// One pair's new primary path in an epoch: `None` when the pair lost its
/// route.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryUpdate {
    /// Source.
    pub from: RelayId,
    /// Destination.
    pub to: RelayId,
    /// The path, source first, or none.
    pub hops: Option<Vec<RelayId>>,
}

/// A replicated command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Command {
    /// A relay joins or updates its registration.
    RegisterRelay {
        /// Its id (authenticated by its certificate).
        id: RelayId,
        /// What it says about itself.
        info: RelayInfo,
    },
    /// Operator drain / undrain.
    SetAdmin {
        /// The relay.
        id: RelayId,
        /// New admin state.
        admin: Admin,
    },
    /// The leader's liveness decision (lease kept or expired).
    SetAlive {
        /// The relay.
        id: RelayId,
        /// Alive or not.
        alive: bool,
    },
    /// Removes a relay and its links and routes.
    RemoveRelay {
        /// The relay.
        id: RelayId,
    },
    /// Adds or replaces an app.
    PutApp {
        /// App id.
        id: String,
        /// Hex secret.
        secret: Secret,
    },
    /// Removes an app.
    DeleteApp {
        /// App id.
        id: String,
    },
    /// Replaces the policy.
    SetPolicy {
        /// The new policy.
        policy: Policy,
    },
    /// A route epoch: link metric changes and the leader's route decisions.
    RouteEpoch {
        /// Must be the current epoch + 1.
        epoch: u64,
        /// Links that changed meaningfully.
        links: Vec<LinkUpdate>,
        /// Pairs whose primary changed.
        primaries: Vec<PrimaryUpdate>,
        /// Relays' routing states the decision was made on (so the epoch
        /// is rejected if they changed since).
        basis: u64,
    },
    /// Records a control-plane member's address (with its conf change).
    SetMember {
        /// Raft node id.
        id: u64,
        /// Its QUIC address, or none when removed.
        addr: Option<String>,
    },
    /// A key-value write, for tests and benchmarks of the log itself.
    Put {
        /// Key.
        key: String,
        /// Value.
        value: String,
    },
}

/// What an applied command touched, for persistence and notifications.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effect {
    /// Keys whose values changed.
    pub keys: Vec<Key>,
    /// A new route epoch was applied.
    pub new_epoch: bool,
    /// Membership, liveness, admin or policy changed: routes need a new epoch.
    pub routing_inputs_changed: bool,
    /// Apps changed: relays need the new set.
    pub apps_changed: bool,
}

/// A persisted item of the state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Key {
    /// A relay record.
    Relay(RelayId),
    /// An app.
    App(String),
    /// The policy.
    Policy,
    /// A link.
    Link(RelayId, RelayId),
    /// A primary path.
    Primary(RelayId, RelayId),
    /// The epoch counters.
    Epoch,
    /// A control-plane member.
    Member(u64),
    /// A key-value pair.
    Kv(String),
}

/// The replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Registered relays.
    pub relays: BTreeMap<RelayId, RelayRecord>,
    /// Apps.
    pub apps: BTreeMap<String, Secret>,
    /// Policy.
    pub policy: Policy,
    /// Link metrics, as of the last epoch.
    pub links: BTreeMap<(RelayId, RelayId), LinkMetricsQ>,
    /// Primary paths, as of the last epoch.
    pub primaries: BTreeMap<(RelayId, RelayId), Vec<RelayId>>,
    /// The last route epoch.
    pub epoch: u64,
    /// Bumped on every change of routing inputs other than links.
    pub basis: u64,
    /// Control-plane members' addresses.
    pub members: BTreeMap<u64, String>,
    /// Test key-value pairs.
    pub kv: BTreeMap<String, String>,
    /// Commands rejected so far (deterministic on every node).
    pub rejected: u64,
}

impl ClusterState {
    /// Applies a command. Rejections change nothing but the counter.
    pub fn apply(&mut self, cmd: &Command) -> Result<Effect, String> {
        let mut e = Effect::default();
        let result = self.apply_inner(cmd, &mut e);
        if result.is_err() {
            self.rejected += 1;
            return result.map(|_| Effect::default());
        }
        Ok(e)
    }

    fn inputs_changed(&mut self, e: &mut Effect) {
        self.basis += 1;
        e.keys.push(Key::Epoch);
        e.routing_inputs_changed = true;
    }

    fn apply_inner(&mut self, cmd: &Command, e: &mut Effect) -> Result<(), String> {
        match cmd {
            Command::RegisterRelay { id, info } => {
                let rec = self.relays.entry(*id).or_insert_with(|| RelayRecord {
                    id: *id,
                    info: info.clone(),
                    admin: Admin::Active,
                    alive: true,
                });
                rec.info = info.clone();
                rec.alive = true;
                e.keys.push(Key::Relay(*id));
                self.inputs_changed(e);
            }
            Command::SetAdmin { id, admin } => {
                let rec = self
                    .relays
                    .get_mut(id)
                    .ok_or_else(|| format!("unknown relay {id}"))?;
                rec.admin = *admin;
                e.keys.push(Key::Relay(*id));
                self.inputs_changed(e);
            }
            Command::SetAlive { id, alive } => {
                let rec = self
                    .relays
                    .get_mut(id)
                    .ok_or_else(|| format!("unknown relay {id}"))?;
                rec.alive = *alive;
                e.keys.push(Key::Relay(*id));
                self.inputs_changed(e);
            }
            Command::RemoveRelay { id } => {
                self.relays
                    .remove(id)
                    .ok_or_else(|| format!("unknown relay {id}"))?;
                e.keys.push(Key::Relay(*id));
                let links: Vec<_> = self
                    .links
                    .keys()
                    .filter(|(a, b)| a == id || b == id)
                    .copied()
                    .collect();
                for (a, b) in links {
                    self.links.remove(&(a, b));
                    e.keys.push(Key::Link(a, b));
                }
                let paths: Vec<_> = self
                    .primaries
                    .iter()
                    .filter(|((a, b), hops)| a == id || b == id || hops.contains(id))
                    .map(|(k, _)| *k)
                    .collect();
                for (a, b) in paths {
                    self.primaries.remove(&(a, b));
                    e.keys.push(Key::Primary(a, b));
                }
                self.inputs_changed(e);
            }
            Command::PutApp { id, secret } => {
                let bytes = hex_len(&secret.0).ok_or("app secret is not hex")?;
                if bytes < relay_core::token::MIN_SECRET_LEN {
                    return Err(format!(
                        "app secret must be at least {} bytes",
                        relay_core::token::MIN_SECRET_LEN
                    ));
                }
                if id.is_empty() || id.len() > 255 {
                    return Err("app id must be 1 to 255 bytes".into());
                }
                self.apps.insert(id.clone(), secret.clone());
                e.keys.push(Key::App(id.clone()));
                e.apps_changed = true;
            }
            Command::DeleteApp { id } => {
                self.apps
                    .remove(id)
                    .ok_or_else(|| format!("unknown app {id:?}"))?;
                e.keys.push(Key::App(id.clone()));
                e.apps_changed = true;
            }
            Command::SetPolicy { policy } => {
                let r = &policy.routing;
                if !(r.switch_ratio > 0.0 && r.switch_ratio <= 1.0) {
                    return Err("switch_ratio must be in (0, 1]".into());
                }
                self.policy = policy.clone();
                e.keys.push(Key::Policy);
                self.inputs_changed(e);
            }
            Command::RouteEpoch {
                epoch,
                links,
                primaries,
                basis,
            } => {
                if *epoch != self.epoch + 1 {
                    return Err(format!("epoch {epoch} does not follow {}", self.epoch));
                }
                if *basis != self.basis {
                    return Err("routing inputs changed since the epoch was computed".into());
                }
                for u in links {
                    match u.metrics {
                        Some(m) => self.links.insert((u.from, u.to), m),
                        None => self.links.remove(&(u.from, u.to)),
                    };
                    e.keys.push(Key::Link(u.from, u.to));
                }
                for p in primaries {
                    match &p.hops {
                        Some(h) => self.primaries.insert((p.from, p.to), h.clone()),
                        None => self.primaries.remove(&(p.from, p.to)),
                    };
                    e.keys.push(Key::Primary(p.from, p.to));
                }
                self.epoch = *epoch;
                e.keys.push(Key::Epoch);
                e.new_epoch = true;
            }
            Command::SetMember { id, addr } => {
                match addr {
                    Some(a) => self.members.insert(*id, a.clone()),
                    None => self.members.remove(id),
                };
                e.keys.push(Key::Member(*id));
            }
            Command::Put { key, value } => {
                self.kv.insert(key.clone(), value.clone());
                e.keys.push(Key::Kv(key.clone()));
            }
        }
        Ok(())
    }

    /// The routing graph: relays with their states (policy applied) and
    /// the replicated links (forbidden ones left out).
    pub fn graph(&self) -> Graph {
        self.graph_with(&[])
    }

    /// The routing graph as it will be once `updates` are applied (in
    /// order), without copying the state to apply them.
    pub fn graph_with(&self, updates: &[LinkUpdate]) -> Graph {
        let mut g = Graph::new();
        for r in self.relays.values() {
            let mut state = r.routing_state();
            if state == RelayState::Active
                && self.policy.no_transit_regions.contains(&r.info.region)
            {
                state = RelayState::Draining;
            }
            g.set_state(r.id, state);
        }
        // The last update of a link wins, as when applied in order.
        let updated: BTreeMap<(RelayId, RelayId), Option<&LinkMetricsQ>> = updates
            .iter()
            .map(|u| ((u.from, u.to), u.metrics.as_ref()))
            .collect();
        let current = self
            .links
            .iter()
            .filter(|(key, _)| !updated.contains_key(key));
        let new = updated.iter().filter_map(|(k, m)| Some((k, (*m)?)));
        for (&(a, b), m) in current.chain(new) {
            if self.policy.forbidden_links.contains(&(a, b)) {
                continue;
            }
            // Links of unregistered relays wait for their registration.
            let _ = g.set_link(a, b, m.metrics());
        }
        g
    }

    /// The replicated primaries as a route set (no backups), the
    /// hysteresis input of the next computation.
    pub fn primary_set(&self) -> RouteSet {
        // The map is sorted by (source, destination): one run per table.
        let mut tables = Vec::new();
        let mut pairs = self.primaries.iter().peekable();
        while let Some(&(&(source, _), _)) = pairs.peek() {
            let mut entries = Vec::new();
            while let Some((&(_, destination), hops)) = pairs.next_if(|(k, _)| k.0 == source) {
                entries.push(RouteEntry {
                    destination,
                    primary: Route {
                        hops: hops.iter().copied().collect::<Hops>(),
                        metrics: Metrics::default(),
                        cost: 0.0,
                        poor: false,
                    },
                    backup: None,
                });
            }
            tables.extend(RouteTable::new(source, self.epoch, entries).ok());
        }
        RouteSet::from_tables(tables)
    }
}

fn hex_len(s: &str) -> Option<usize> {
    (s.len().is_multiple_of(2) && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s.len() / 2)
}

/// Diffs a newly computed route set against the replicated primaries:
/// changed and new pairs in order, then removed ones in order. Both sides
/// are sorted by (source, destination), so this is a merge of the two.
pub fn primary_updates(state: &ClusterState, computed: &RouteSet) -> Vec<PrimaryUpdate> {
    let mut new = computed
        .tables()
        .iter()
        .flat_map(|t| {
            t.entries()
                .iter()
                .map(move |e| ((t.source(), e.destination), &e.primary.hops))
        })
        .peekable();
    let mut old = state.primaries.iter().peekable();
    let (mut out, mut removed) = (Vec::new(), Vec::new());
    loop {
        match (old.peek(), new.peek()) {
            (Some(&(&k, _)), Some(&(n, _))) if k < n => {
                removed.push(k);
                old.next();
            }
            (Some(&(&k, hops)), Some(&(n, new_hops))) if k == n => {
                if hops[..] != new_hops[..] {
                    out.push((n, new_hops));
                }
                old.next();
                new.next();
            }
            (_, Some(&(n, new_hops))) => {
                out.push((n, new_hops));
                new.next();
            }
            (Some(&(&k, _)), None) => {
                removed.push(k);
                old.next();
            }
            (None, None) => break,
        }
    }
    let changed = out.into_iter().map(|((from, to), hops)| PrimaryUpdate {
        from,
        to,
        hops: Some(hops.to_vec()),
    });
    let gone = removed.into_iter().map(|(from, to)| PrimaryUpdate {
        from,
        to,
        hops: None,
    });
    changed.chain(gone).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> RelayInfo {
        RelayInfo {
            name: name.into(),
            region: "SG".into(),
            location: None,
            addr: "127.0.0.1:1".into(),
            capacity: 100,
        }
    }

    #[test]
    fn relays_admin_liveness_and_graph_states() {
        let mut s = ClusterState::default();
        s.apply(&Command::RegisterRelay {
            id: RelayId(1),
            info: info("a"),
        })
        .unwrap();
        s.apply(&Command::RegisterRelay {
            id: RelayId(2),
            info: info("b"),
        })
        .unwrap();
        s.apply(&Command::SetAdmin {
            id: RelayId(2),
            admin: Admin::Draining,
        })
        .unwrap();
        let g = s.graph();
        assert_eq!(g.state(RelayId(2)), Some(RelayState::Draining));
        s.apply(&Command::SetAlive {
            id: RelayId(1),
            alive: false,
        })
        .unwrap();
        assert_eq!(s.graph().state(RelayId(1)), Some(RelayState::Down));
        assert!(
            s.apply(&Command::SetAdmin {
                id: RelayId(9),
                admin: Admin::Active
            })
            .is_err()
        );
        assert_eq!(s.rejected, 1);
    }

    #[test]
    fn epochs_must_follow_and_match_their_basis() {
        let mut s = ClusterState::default();
        let epoch = |epoch, basis| Command::RouteEpoch {
            epoch,
            links: vec![LinkUpdate {
                from: RelayId(1),
                to: RelayId(2),
                metrics: Some(LinkMetricsQ::from_metrics(&Metrics::rtt(12.34))),
            }],
            primaries: vec![],
            basis,
        };
        assert!(s.apply(&epoch(2, 0)).is_err(), "must follow epoch 0");
        let e = s.apply(&epoch(1, 0)).unwrap();
        assert!(e.new_epoch);
        assert_eq!(s.links[&(RelayId(1), RelayId(2))].rtt, 123);
        s.apply(&Command::RegisterRelay {
            id: RelayId(1),
            info: info("a"),
        })
        .unwrap();
        assert!(s.apply(&epoch(2, 0)).is_err(), "inputs changed since");
        assert!(s.apply(&epoch(2, s.basis)).is_ok());
    }

    #[test]
    fn graph_with_updates_is_the_graph_after_applying_them() {
        let mut s = ClusterState::default();
        for id in 1..=3 {
            s.apply(&Command::RegisterRelay {
                id: RelayId(id),
                info: info(&format!("r{id}")),
            })
            .unwrap();
        }
        let q = |rtt| Some(LinkMetricsQ::from_metrics(&Metrics::rtt(rtt)));
        let link = |from, to, metrics| LinkUpdate {
            from: RelayId(from),
            to: RelayId(to),
            metrics,
        };
        let first = vec![
            link(1, 2, q(10.0)),
            link(2, 3, q(20.0)),
            link(3, 1, q(30.0)),
        ];
        let epoch = |epoch, links, basis| Command::RouteEpoch {
            epoch,
            links,
            primaries: vec![],
            basis,
        };
        s.apply(&epoch(1, first, s.basis)).unwrap();
        // Changed, removed, new, and a link updated twice (the last wins).
        let next = vec![
            link(1, 2, q(11.0)),
            link(2, 3, None),
            link(1, 3, q(5.0)),
            link(3, 2, None),
            link(3, 2, q(7.0)),
        ];
        let planned = s.graph_with(&next);
        s.apply(&epoch(2, next, s.basis)).unwrap();
        let applied = s.graph();
        let links = |g: &Graph| {
            g.links()
                .map(|(a, b, m)| (a, b, m.rtt_ms))
                .collect::<Vec<_>>()
        };
        assert_eq!(links(&planned), links(&applied));
        assert_eq!(links(&applied).len(), 4);
    }

    #[test]
    fn primary_updates_list_changes_then_removals() {
        let mut s = ClusterState::default();
        let ids = |v: &[u32]| v.iter().map(|&i| RelayId(i)).collect::<Vec<_>>();
        for (from, to, hops) in [
            (1, 2, vec![1, 2]),
            (1, 3, vec![1, 2, 3]),
            (2, 1, vec![2, 1]),
        ] {
            s.primaries.insert((RelayId(from), RelayId(to)), ids(&hops));
        }
        let route = |hops: &[u32]| RouteEntry {
            destination: RelayId(*hops.last().unwrap()),
            primary: Route {
                hops: ids(hops).into_iter().collect(),
                metrics: Metrics::default(),
                cost: 0.0,
                poor: false,
            },
            backup: None,
        };
        // 1->2 kept, 1->3 changed, 2->1 removed, 2->3 and 3->1 new.
        let computed = RouteSet::from_tables(vec![
            RouteTable::new(RelayId(1), 0, vec![route(&[1, 2]), route(&[1, 3])]).unwrap(),
            RouteTable::new(RelayId(2), 0, vec![route(&[2, 3])]).unwrap(),
            RouteTable::new(RelayId(3), 0, vec![route(&[3, 1])]).unwrap(),
        ]);
        let got: Vec<_> = primary_updates(&s, &computed)
            .into_iter()
            .map(|u| (u.from.0, u.to.0, u.hops.map(|h| h.len())))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 3, Some(2)),
                (2, 3, Some(2)),
                (3, 1, Some(2)),
                (2, 1, None)
            ]
        );
        assert!(primary_updates(&s, &s.primary_set()).is_empty());
    }

    #[test]
    fn secrets_are_checked_and_never_printed() {
        let mut s = ClusterState::default();
        let secret = Secret("00112233445566778899aabbccddeeff".into());
        s.apply(&Command::PutApp {
            id: "shop".into(),
            secret: secret.clone(),
        })
        .unwrap();
        assert!(!format!("{s:?}").contains("0011223344"));
        assert!(
            s.apply(&Command::PutApp {
                id: "x".into(),
                secret: Secret("abcd".into())
            })
            .is_err()
        );
        assert!(
            s.apply(&Command::PutApp {
                id: "x".into(),
                secret: Secret("zz".repeat(20))
            })
            .is_err()
        );
    }

    #[test]
    fn quantization_round_trips_closely() {
        let m = Metrics {
            rtt_ms: 123.456,
            jitter_ms: 3.21,
            loss: 0.01234,
        };
        let back = LinkMetricsQ::from_metrics(&m).metrics();
        assert!((back.rtt_ms - 123.5).abs() < 1e-9);
        assert!((back.loss - 0.01234).abs() < 1e-9);
    }
}
