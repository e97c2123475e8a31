//! The leader's route engine: soft state in, replicated decisions out.
//!
//! Relays report link measurements every few seconds and whenever a link
//! changes meaningfully; those reports stay in the leader's memory (soft
//! state: a new leader rebuilds it from the next reports within seconds).
//! What crosses Raft is decided here, at most once per epoch interval:
//! - link metrics, quantized, only for links that changed *meaningfully*
//!   (RTT by more than 10 % and 5 ms, jitter by more than 2 ms, loss by
//!   more than half a percentage point, or the poor verdict flipped), that
//!   appeared, or that went stale or dead;
//! - liveness: a relay silent for longer than its lease is marked down, and
//!   up again when it reports;
//! - the new primary paths (computed with `topology`, hysteresis against
//!   the replicated primaries), as a diff.
//!
//! Thousands of probe samples a second thus become a handful of log
//! entries a minute in a steady network.

use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use topology::{Metrics, PoorThresholds, RelayId, RouteSet};

use crate::state::{ClusterState, Command, LinkMetricsQ, LinkUpdate, primary_updates};

/// Engine timing.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Shortest time between two route epochs.
    pub epoch_interval: Duration,
    /// A link not reported for this long is removed.
    pub stale_after: Duration,
    /// A relay not heard from for this long is marked down.
    pub lease: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            epoch_interval: Duration::from_secs(1),
            stale_after: Duration::from_secs(15),
            lease: Duration::from_secs(10),
        }
    }
}

/// One link as a relay reports it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    /// The peer at the other end.
    pub peer: RelayId,
    /// Metrics, or `None` when the link is down or unmeasured.
    pub metrics: Option<Metrics>,
}

/// True when `new` differs from `old` enough to be worth a log entry.
pub fn meaningful_change(old: &Metrics, new: &Metrics, poor: &PoorThresholds) -> bool {
    let rtt = (new.rtt_ms - old.rtt_ms).abs();
    let jitter = (new.jitter_ms - old.jitter_ms).abs();
    let loss = (new.loss - old.loss).abs();
    rtt > 5.0 && rtt > 0.1 * old.rtt_ms
        || jitter > 2.0
        || loss > 0.005
        || poor.is_poor(old) != poor.is_poor(new)
}

/// A relay's side of link reporting, shared by `relayd` and the
/// simulator: checked periodically, it says when to send a report (a link
/// changed meaningfully, appeared or went away, or a full period passed)
/// and what it carries. Time is an argument.
#[derive(Debug, Clone)]
pub struct LinkReporter {
    period: Duration,
    last_sent: FxHashMap<RelayId, Option<Metrics>>,
    last_full: Instant,
}

impl LinkReporter {
    /// Full reports every `period`, the first one period after `now`
    /// (links that are already measured are reported at once, as changes).
    pub fn new(period: Duration, now: Instant) -> Self {
        Self {
            period,
            last_sent: FxHashMap::default(),
            last_full: now,
        }
    }

    /// The report to send now for these links, if one is due.
    pub fn poll(
        &mut self,
        links: &[relay_core::links::LinkReport],
        poor: &PoorThresholds,
        now: Instant,
    ) -> Option<Vec<LinkReport>> {
        let links: Vec<LinkReport> = links
            .iter()
            .map(|l| LinkReport {
                peer: l.peer,
                metrics: if l.connected { l.stats.metrics() } else { None },
            })
            .collect();
        let changed = links.iter().any(|l| {
            match (self.last_sent.get(&l.peer).copied().flatten(), l.metrics) {
                (Some(old), Some(new)) => meaningful_change(&old, &new, poor),
                (None, None) => false,
                _ => true,
            }
        });
        let full_due = now.saturating_duration_since(self.last_full) >= self.period;
        if !(changed || full_due) {
            return None;
        }
        self.last_full = now;
        self.last_sent = links.iter().map(|l| (l.peer, l.metrics)).collect();
        Some(links)
    }

    /// Forgets what was sent (a restart): measured links are reported at
    /// the next poll.
    pub fn reset(&mut self) {
        self.last_sent.clear();
    }
}

/// The leader's soft state.
#[derive(Debug, Default)]
pub struct RouteEngine {
    config: EngineConfig,
    // Keyed by relay ids from the replicated membership: a fast hash.
    reports: FxHashMap<(RelayId, RelayId), (Option<Metrics>, Instant)>,
    heard: FxHashMap<RelayId, Instant>,
    last_epoch: Option<Instant>,
    in_flight: bool,
    leader_since: Option<Instant>,
}

/// An epoch the leader decided to compute: plan it with
/// [`RouteEngine::plan`] off the consensus task.
#[derive(Debug, Clone)]
pub struct EpochStart {
    /// Link changes to carry.
    pub links: Vec<LinkUpdate>,
    /// Compute even if no primary moves (relays or policy changed).
    pub force: bool,
}

/// A route epoch ready to propose.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    /// The command.
    pub command: Command,
    /// Pairs whose primary changes.
    pub route_changes: usize,
    /// Links that change.
    pub link_changes: usize,
    /// The primary paths as they are once `command` is applied (those of
    /// [`ClusterState::primary_set`] then, here with the metrics they were
    /// chosen on): a caller applying the command itself need not rebuild
    /// them for the backups.
    pub primaries: RouteSet,
}

impl RouteEngine {
    /// An engine with the given timing.
    pub fn new(config: EngineConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    /// This node became leader at `now`: start the leases afresh (the
    /// previous leader's knowledge is gone) and forget in-flight work.
    pub fn became_leader(&mut self, now: Instant) {
        self.leader_since = Some(now);
        self.in_flight = false;
        self.last_epoch = None;
    }

    /// This node stopped leading: drop the soft state.
    pub fn lost_leadership(&mut self) {
        *self = RouteEngine::new(self.config.clone());
    }

    /// A relay's report of its outgoing links.
    pub fn on_report(&mut self, relay: RelayId, links: &[LinkReport], now: Instant) {
        self.heard.insert(relay, now);
        for l in links {
            if l.peer != relay {
                self.reports
                    .insert((relay, l.peer), (l.metrics.filter(Metrics::is_valid), now));
            }
        }
    }

    /// A relay was heard from (connected, heartbeat).
    pub fn on_heartbeat(&mut self, relay: RelayId, now: Instant) {
        self.heard.insert(relay, now);
    }

    /// Liveness decisions to propose now.
    pub fn liveness(&self, state: &ClusterState, now: Instant) -> Vec<Command> {
        let Some(since) = self.leader_since else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for r in state.relays.values() {
            // A new leader gives every relay a full lease first.
            let last = self.heard.get(&r.id).copied().unwrap_or(since).max(since);
            let alive = now.saturating_duration_since(last) < self.config.lease;
            if alive != r.alive {
                out.push(Command::SetAlive { id: r.id, alive });
            }
        }
        out
    }

    /// True when an epoch may be computed now.
    pub fn due(&self, now: Instant) -> bool {
        !self.in_flight
            && self
                .last_epoch
                .is_none_or(|t| now.saturating_duration_since(t) >= self.config.epoch_interval)
    }

    /// Link changes worth replicating, against the replicated links.
    pub fn link_updates(&self, state: &ClusterState, now: Instant) -> Vec<LinkUpdate> {
        let poor = &state.policy.routing.cost.poor;
        let mut out = Vec::new();
        for (&(from, to), &(metrics, at)) in &self.reports {
            let fresh = now.saturating_duration_since(at) < self.config.stale_after;
            let current = state.links.get(&(from, to));
            match (metrics.filter(|_| fresh), current) {
                (Some(m), None) => out.push(LinkUpdate {
                    from,
                    to,
                    metrics: Some(LinkMetricsQ::from_metrics(&m)),
                }),
                (Some(m), Some(q)) if meaningful_change(&q.metrics(), &m, poor) => {
                    out.push(LinkUpdate {
                        from,
                        to,
                        metrics: Some(LinkMetricsQ::from_metrics(&m)),
                    })
                }
                (None, Some(_)) => out.push(LinkUpdate {
                    from,
                    to,
                    metrics: None,
                }),
                _ => {}
            }
        }
        // Replicated links nobody reports any more.
        if let Some(since) = self.leader_since
            && now.saturating_duration_since(since) >= self.config.stale_after
        {
            for &(from, to) in state.links.keys() {
                if !self.reports.contains_key(&(from, to)) {
                    out.push(LinkUpdate {
                        from,
                        to,
                        metrics: None,
                    });
                }
            }
        }
        out.sort_by_key(|u| (u.from, u.to));
        out
    }

    /// Plans the next epoch: link updates, then routes on the updated
    /// graph with hysteresis against the replicated primaries. `None` when
    /// nothing would change, unless `force` (relays or policy changed:
    /// backups must be recomputed even if no primary moves). Pure
    /// computation: run it off the Raft task.
    pub fn plan(state: &ClusterState, links: Vec<LinkUpdate>, force: bool) -> Option<EpochPlan> {
        Self::plan_from(state, &state.primary_set(), links, force)
    }

    /// [`RouteEngine::plan`] with the state's primary set given: `current`
    /// must be [`ClusterState::primary_set`] of `state` (such as the last
    /// plan's primaries while the state's epoch and basis are those it was
    /// applied at), which a caller planning every second need not rebuild.
    pub fn plan_from(
        state: &ClusterState,
        current: &RouteSet,
        links: Vec<LinkUpdate>,
        force: bool,
    ) -> Option<EpochPlan> {
        // Primaries only: backups are computed by every node from the
        // replicated primaries once the epoch is applied.
        let routes = RouteSet::primaries(
            &state.graph_with(&links),
            &state.policy.routing,
            Some(current),
        );
        let primaries = primary_updates(state, &routes);
        if links.is_empty() && primaries.is_empty() && state.epoch > 0 && !force {
            return None;
        }
        let mut routes = routes;
        routes.set_epoch(state.epoch + 1);
        Some(EpochPlan {
            route_changes: primaries.len(),
            link_changes: links.len(),
            primaries: routes,
            command: Command::RouteEpoch {
                epoch: state.epoch + 1,
                links,
                primaries,
                basis: state.basis,
            },
        })
    }

    /// The leader's periodic decision, shared by the server and the
    /// simulator: liveness changes to propose, and whether to start a
    /// route epoch now (with the link updates it carries and whether it
    /// must be computed even if no link changed). `routed_basis` is the
    /// basis of the last applied epoch. Starting an epoch marks it in
    /// flight until [`RouteEngine::epoch_finished`].
    pub fn tick(
        &mut self,
        state: &ClusterState,
        routed_basis: Option<u64>,
        now: Instant,
    ) -> (Vec<Command>, Option<EpochStart>) {
        let liveness = self.liveness(state, now);
        if !self.due(now) {
            return (liveness, None);
        }
        let links = self.link_updates(state, now);
        let first = state.epoch == 0 && !state.relays.is_empty();
        let force = state.epoch > 0 && routed_basis != Some(state.basis);
        if links.is_empty() && !first && !force {
            return (liveness, None);
        }
        self.epoch_started(now);
        (liveness, Some(EpochStart { links, force }))
    }

    /// An epoch computation started.
    pub fn epoch_started(&mut self, now: Instant) {
        self.in_flight = true;
        self.last_epoch = Some(now);
    }

    /// The epoch was applied, rejected or abandoned.
    pub fn epoch_finished(&mut self) {
        self.in_flight = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RelayInfo;

    fn state_with(relays: &[u32]) -> ClusterState {
        let mut s = ClusterState::default();
        for &r in relays {
            s.apply(&Command::RegisterRelay {
                id: RelayId(r),
                info: RelayInfo {
                    name: format!("r{r}"),
                    region: "X".into(),
                    location: None,
                    addr: "127.0.0.1:1".into(),
                    capacity: 1,
                },
            })
            .unwrap();
        }
        s
    }

    fn report(peer: u32, rtt: f64) -> LinkReport {
        LinkReport {
            peer: RelayId(peer),
            metrics: Some(Metrics::rtt(rtt)),
        }
    }

    #[test]
    fn only_meaningful_changes_cross_raft() {
        let t0 = Instant::now();
        let mut s = state_with(&[1, 2]);
        let mut e = RouteEngine::new(EngineConfig::default());
        e.became_leader(t0);
        e.on_report(RelayId(1), &[report(2, 100.0)], t0);
        let u = e.link_updates(&s, t0);
        assert_eq!(u.len(), 1, "new link");
        let plan = RouteEngine::plan(&s, u, false).unwrap();
        s.apply(&plan.command).unwrap();
        // A few percent of RTT noise: nothing to replicate.
        e.on_report(RelayId(1), &[report(2, 104.0)], t0 + Duration::from_secs(1));
        assert!(e.link_updates(&s, t0 + Duration::from_secs(1)).is_empty());
        // 30 % more: replicate.
        e.on_report(RelayId(1), &[report(2, 130.0)], t0 + Duration::from_secs(2));
        assert_eq!(e.link_updates(&s, t0 + Duration::from_secs(2)).len(), 1);
        // Loss crossing the poor bar replicates even if small in absolute terms.
        let lossy = Metrics {
            rtt_ms: 100.0,
            jitter_ms: 0.0,
            loss: 0.013,
        };
        assert!(meaningful_change(
            &Metrics::rtt(100.0),
            &lossy,
            &PoorThresholds::default()
        ));
        // Silence: the link goes stale and is removed.
        let later = t0 + Duration::from_secs(30);
        let u = e.link_updates(&s, later);
        assert_eq!(
            u,
            vec![LinkUpdate {
                from: RelayId(1),
                to: RelayId(2),
                metrics: None
            }]
        );
    }

    #[test]
    fn reporter_sends_changes_at_once_and_the_rest_every_period() {
        use relay_core::links::LinkReport as Link;
        use topology::{LinkHealth, LinkStats};
        let link = |rtt_ms: u64| Link {
            peer: RelayId(2),
            connected: true,
            usable: true,
            stats: LinkStats {
                rtt: Some(Duration::from_millis(rtt_ms)),
                jitter: Duration::ZERO,
                loss: 0.0,
                loss_samples: 10,
                samples: 10,
                age: Some(Duration::ZERO),
                consecutive_losses: 0,
                health: LinkHealth::Alive,
            },
        };
        let poor = PoorThresholds::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut r = LinkReporter::new(Duration::from_secs(5), t0);
        assert_eq!(r.poll(&[], &poor, at(250)), None, "nothing measured yet");
        let sent = r.poll(&[link(100)], &poor, at(500)).expect("new link");
        assert_eq!(sent[0].metrics.map(|m| m.rtt_ms), Some(100.0));
        assert_eq!(r.poll(&[link(103)], &poor, at(750)), None, "noise");
        assert!(
            r.poll(&[link(140)], &poor, at(1000)).is_some(),
            "meaningful"
        );
        assert_eq!(r.poll(&[link(141)], &poor, at(5900)), None);
        assert!(
            r.poll(&[link(141)], &poor, at(6000)).is_some(),
            "full period"
        );
        r.reset();
        assert!(
            r.poll(&[link(141)], &poor, at(6250)).is_some(),
            "after reset"
        );
    }

    #[test]
    fn leases_expire_and_recover_with_grace_after_failover() {
        let t0 = Instant::now();
        let s = state_with(&[1, 2]);
        let mut e = RouteEngine::new(EngineConfig::default());
        e.became_leader(t0);
        assert!(
            e.liveness(&s, t0 + Duration::from_secs(5)).is_empty(),
            "grace"
        );
        e.on_heartbeat(RelayId(1), t0 + Duration::from_secs(8));
        let cmds = e.liveness(&s, t0 + Duration::from_secs(12));
        assert_eq!(
            cmds,
            vec![Command::SetAlive {
                id: RelayId(2),
                alive: false
            }]
        );
    }

    #[test]
    fn plans_route_epochs_with_primary_diffs() {
        let t0 = Instant::now();
        let mut s = state_with(&[1, 2, 3]);
        let mut e = RouteEngine::new(EngineConfig::default());
        e.became_leader(t0);
        e.on_report(RelayId(1), &[report(2, 50.0), report(3, 200.0)], t0);
        e.on_report(RelayId(2), &[report(1, 50.0), report(3, 50.0)], t0);
        e.on_report(RelayId(3), &[report(1, 200.0), report(2, 50.0)], t0);
        let plan = RouteEngine::plan(&s, e.link_updates(&s, t0), false).unwrap();
        assert_eq!(plan.link_changes, 6);
        s.apply(&plan.command).unwrap();
        assert_eq!(s.epoch, 1);
        let paths = |set: &RouteSet| {
            set.tables()
                .iter()
                .flat_map(|t| t.entries().iter().map(|e| e.primary.hops.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(paths(&plan.primaries), paths(&s.primary_set()));
        assert_eq!(
            s.primaries[&(RelayId(1), RelayId(3))],
            vec![RelayId(1), RelayId(2), RelayId(3)]
        );
        // Nothing changed: no epoch.
        assert!(RouteEngine::plan(&s, vec![], false).is_none());
        assert!(
            RouteEngine::plan(&s, vec![], true).is_some(),
            "forced by a relay change"
        );
    }
}
