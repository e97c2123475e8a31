//! Choosing a relay and deciding when to leave it: pure logic, time is an
//! argument.
//!
//! - [`order_by_distance`]: candidates nearest the client first (GeoIP),
//!   which decides the few that get probed.
//! - [`choose`]: the probed candidate with the lowest RTT-equivalent score
//!   (RTT plus jitter and loss penalties, the overlay's [`CostModel`]).
//! - [`Monitor`]: keeps probing the relay in use and a standby, and says
//!   when the relay in use has failed (silent past a deadline), turned poor
//!   while the standby is better, or is beaten by a standby under 2/3 of
//!   its score (the hysteresis of tailscale's and iroh's relay choice).

use std::time::{Duration, Instant};

use topology::geo::great_circle_km;
use topology::{CostModel, LinkMetrics, LinkMetricsConfig, LinkStats, Metrics};

use crate::discovery::Candidate;
use crate::geoip::Place;

/// A candidate's place in the probing order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// Index into the candidate list.
    pub index: usize,
    /// Great-circle distance from the client, when both places are known.
    pub distance_km: Option<f64>,
}

/// Orders candidates for probing: by distance when the client's and the
/// relay's coordinates are known; relays in the client's country next when
/// only countries are; the rest in DNS preference order (the sort is
/// stable, so without any GeoIP data the order is the DNS order).
pub fn order_by_distance(candidates: &[Candidate], client: Option<&Place>) -> Vec<Ranked> {
    let mut ranked: Vec<(u8, f64, Ranked)> = candidates
        .iter()
        .enumerate()
        .map(|(index, c)| {
            let distance_km = client
                .and_then(|p| p.location)
                .zip(c.location)
                .map(|(a, b)| great_circle_km(a, b));
            let same_country = client
                .and_then(|p| p.country.as_deref())
                .zip(c.country.as_deref())
                .is_some_and(|(a, b)| a == b);
            let class = match (distance_km, same_country) {
                (Some(_), _) => 0,
                (None, true) => 1,
                (None, false) => 2,
            };
            (
                class,
                distance_km.unwrap_or(0.0),
                Ranked { index, distance_km },
            )
        })
        .collect();
    ranked.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    ranked.into_iter().map(|(_, _, r)| r).collect()
}

/// What probing a candidate measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Smoothed RTT.
    pub rtt: Duration,
    /// RFC 3550 jitter.
    pub jitter: Duration,
    /// Fraction of probes without an echo.
    pub loss: f64,
    /// Probes sent.
    pub sent: u32,
    /// Echoes received.
    pub received: u32,
}

impl Measured {
    /// From an estimator fed with the probes; `None` without any echo.
    pub fn from_stats(stats: &LinkStats, sent: u32, received: u32) -> Option<Measured> {
        Some(Measured {
            rtt: stats.rtt?,
            jitter: stats.jitter,
            loss: if sent == 0 {
                0.0
            } else {
                1.0 - f64::from(received.min(sent)) / f64::from(sent)
            },
            sent,
            received,
        })
    }

    /// The link metrics of the overlay's cost model.
    pub fn metrics(&self) -> Metrics {
        Metrics {
            rtt_ms: self.rtt.as_secs_f64() * 1e3,
            jitter_ms: self.jitter.as_secs_f64() * 1e3,
            loss: self.loss,
        }
    }

    /// RTT-equivalent score in ms: RTT + 2 x jitter + 25 ms per % of loss,
    /// the overlay's path cost without hop penalty. Lower is better.
    pub fn score_ms(&self) -> f64 {
        CostModel::default().path_cost(&self.metrics(), 0)
    }
}

/// Why a relay was chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Index into the probed list.
    pub index: usize,
    /// Human explanation.
    pub reason: String,
}

/// Picks the lowest score among probed candidates. `probed[i]` is
/// `(name, distance, measurement)` in probing (distance) order; `None`
/// measurements did not answer.
pub fn choose(probed: &[(String, Option<f64>, Option<Measured>)]) -> Option<Choice> {
    let best = probed
        .iter()
        .enumerate()
        .filter_map(|(i, (_, _, m))| m.map(|m| (i, m)))
        .min_by(|a, b| a.1.score_ms().total_cmp(&b.1.score_ms()))?;
    let (index, m) = best;
    let mut reason = format!(
        "lowest score {:.1} ms (rtt {:.1} ms, loss {:.1} %, jitter {:.1} ms)",
        m.score_ms(),
        m.rtt.as_secs_f64() * 1e3,
        m.loss * 100.0,
        m.jitter.as_secs_f64() * 1e3
    );
    if index != 0 {
        let (name, dist, first) = &probed[0];
        let what = match first {
            Some(f) => format!("scored {:.1} ms", f.score_ms()),
            None => "did not answer".into(),
        };
        let place = if dist.is_some() {
            "geo-nearest"
        } else {
            "first-listed"
        };
        reason += &format!("; {place} {name} {what}");
    }
    let unreachable = probed.iter().filter(|p| p.2.is_none()).count();
    if unreachable > 0 {
        reason += &format!("; {unreachable} of {} did not answer", probed.len());
    }
    Some(Choice { index, reason })
}

/// Tuning of the [`Monitor`].
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// Probe interval on the relay in use.
    pub probe_interval: Duration,
    /// Probe interval on the standby.
    pub standby_probe_interval: Duration,
    /// The relay in use has failed when no echo arrived for this long (or
    /// four smoothed RTTs, if longer).
    pub failure_timeout: Duration,
    /// Move to the standby when its score is under this fraction of the
    /// current relay's.
    pub switch_ratio: f64,
    /// Echoes needed on both relays before comparing them.
    pub min_samples: u64,
    /// No quality-driven move within this long of the last move.
    pub hold: Duration,
    /// Window of the loss estimate.
    pub loss_window: Duration,
    /// Quality bar: a relay failing it is left for any better standby.
    pub cost: CostModel,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            probe_interval: Duration::from_millis(100),
            standby_probe_interval: Duration::from_millis(250),
            failure_timeout: Duration::from_millis(400),
            switch_ratio: 2.0 / 3.0,
            min_samples: 10,
            hold: Duration::from_secs(10),
            loss_window: Duration::from_secs(5),
            cost: CostModel::default(),
        }
    }
}

/// The two relays a client probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    /// The relay in use.
    Active,
    /// The one it moves to.
    Standby,
}

/// What the client should do.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The relay in use stopped answering: move now.
    ActiveFailed {
        /// Why.
        reason: String,
    },
    /// The standby is clearly better: move (make before break).
    SwitchToStandby {
        /// Why.
        reason: String,
    },
    /// The standby stopped answering: find another.
    StandbyFailed {
        /// Why.
        reason: String,
    },
}

#[derive(Debug)]
struct Probed {
    metrics: LinkMetrics,
    next_seq: u64,
    next_probe: Instant,
    /// When the last echo arrived, or when probing started.
    heard: Instant,
    reported: bool,
}

impl Probed {
    fn new(config: &MonitorConfig, now: Instant) -> Self {
        Probed {
            metrics: LinkMetrics::new(LinkMetricsConfig {
                probe_timeout: Duration::from_secs(1),
                loss_window: config.loss_window,
                max_outstanding: 128,
                // A handful of probes: report the plain fraction lost.
                loss_min_samples: 0,
                ..LinkMetricsConfig::default()
            }),
            next_seq: 0,
            next_probe: now,
            heard: now,
            reported: false,
        }
    }

    fn failure_timeout(&self, config: &MonitorConfig, now: Instant) -> Duration {
        let rtt = self.metrics.stats(now).rtt.unwrap_or_default();
        config.failure_timeout.max(rtt * 4)
    }

    fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.heard)
    }

    fn measured(&self, now: Instant, min_samples: u64) -> Option<Metrics> {
        let s = self.metrics.stats(now);
        if s.samples < min_samples {
            return None;
        }
        Some(Metrics {
            rtt_ms: s.rtt?.as_secs_f64() * 1e3,
            jitter_ms: s.jitter.as_secs_f64() * 1e3,
            loss: s.loss,
        })
    }
}

/// Probing schedule and move decisions for the relay in use and a standby.
///
/// The driver sends the probes [`Monitor::poll_probe`] asks for, reports
/// echoes with [`Monitor::on_echo`], and acts on [`Monitor::poll_decision`];
/// it tells the monitor what it did (`promote_standby`, `swap`,
/// `set_standby`, `clear_standby`, `replace_active`).
#[derive(Debug)]
pub struct Monitor {
    config: MonitorConfig,
    active: Probed,
    standby: Option<Probed>,
    last_move: Instant,
}

impl Monitor {
    /// Starts probing a freshly chosen relay.
    pub fn new(config: MonitorConfig, now: Instant) -> Self {
        Monitor {
            active: Probed::new(&config, now),
            standby: None,
            last_move: now,
            config,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &MonitorConfig {
        &self.config
    }

    fn slot(&mut self, slot: Slot) -> Option<&mut Probed> {
        match slot {
            Slot::Active => Some(&mut self.active),
            Slot::Standby => self.standby.as_mut(),
        }
    }

    /// The next probe due at `now`, as `(slot, sequence number)`; call
    /// until `None`.
    pub fn poll_probe(&mut self, now: Instant) -> Option<(Slot, u64)> {
        let intervals = [
            (Slot::Active, self.config.probe_interval),
            (Slot::Standby, self.config.standby_probe_interval),
        ];
        for (slot, interval) in intervals {
            let Some(p) = self.slot(slot) else { continue };
            if p.next_probe <= now {
                let seq = p.next_seq;
                p.next_seq += 1;
                p.next_probe = now + interval;
                p.metrics.on_probe_sent(seq, now);
                return Some((slot, seq));
            }
        }
        None
    }

    /// An echo arrived.
    pub fn on_echo(&mut self, slot: Slot, seq: u64, now: Instant) {
        if let Some(p) = self.slot(slot)
            && p.metrics.on_echo(seq, now).is_some()
        {
            p.heard = now;
        }
    }

    /// Current estimates for a slot.
    pub fn stats(&self, slot: Slot, now: Instant) -> Option<LinkStats> {
        match slot {
            Slot::Active => Some(self.active.metrics.stats(now)),
            Slot::Standby => self.standby.as_ref().map(|p| p.metrics.stats(now)),
        }
    }

    /// When the monitor next needs the driver: a probe or a deadline.
    pub fn next_wakeup(&self, now: Instant) -> Instant {
        let mut t = self.active.next_probe;
        if !self.active.reported {
            t = t.min(self.active.heard + self.active.failure_timeout(&self.config, now));
        }
        if let Some(s) = &self.standby {
            t = t.min(s.next_probe);
            if !s.reported {
                t = t.min(s.heard + s.failure_timeout(&self.config, now));
            }
        }
        if let Some(e) = self.active.metrics.next_timeout() {
            t = t.min(e);
        }
        t
    }

    /// What to do now, if anything. Each failure is reported once.
    pub fn poll_decision(&mut self, now: Instant) -> Option<Decision> {
        self.active.metrics.expire_probes(now);
        if let Some(s) = &mut self.standby {
            s.metrics.expire_probes(now);
        }
        let timeout = self.active.failure_timeout(&self.config, now);
        if !self.active.reported && self.active.silent_for(now) >= timeout {
            self.active.reported = true;
            return Some(Decision::ActiveFailed {
                reason: format!(
                    "no probe echo for {} ms",
                    self.active.silent_for(now).as_millis()
                ),
            });
        }
        let standby = self.standby.as_mut()?;
        let timeout = standby.failure_timeout(&self.config, now);
        if !standby.reported && standby.silent_for(now) >= timeout {
            standby.reported = true;
            return Some(Decision::StandbyFailed {
                reason: format!(
                    "no probe echo for {} ms",
                    standby.silent_for(now).as_millis()
                ),
            });
        }
        if standby.reported || now.saturating_duration_since(self.last_move) < self.config.hold {
            return None;
        }
        let min = self.config.min_samples;
        let (cur, alt) = (
            self.active.measured(now, min)?,
            self.standby.as_ref()?.measured(now, min)?,
        );
        let cost = &self.config.cost;
        let (cur_score, alt_score) = (cost.path_cost(&cur, 0), cost.path_cost(&alt, 0));
        if cost.is_poor(&cur) && !cost.is_poor(&alt) && alt_score < cur_score {
            self.last_move = now;
            return Some(Decision::SwitchToStandby {
                reason: format!(
                    "relay in use is poor (rtt {:.0} ms, loss {:.1} %, jitter {:.1} ms); standby scores {:.0} ms against {:.0} ms",
                    cur.rtt_ms,
                    cur.loss * 100.0,
                    cur.jitter_ms,
                    alt_score,
                    cur_score
                ),
            });
        }
        if alt_score < self.config.switch_ratio * cur_score {
            self.last_move = now;
            return Some(Decision::SwitchToStandby {
                reason: format!(
                    "standby scores {alt_score:.0} ms, under {:.0} % of {cur_score:.0} ms",
                    self.config.switch_ratio * 100.0
                ),
            });
        }
        None
    }

    /// A standby is connected: start probing it.
    pub fn set_standby(&mut self, now: Instant) {
        self.standby = Some(Probed::new(&self.config, now));
    }

    /// The standby is gone.
    pub fn clear_standby(&mut self) {
        self.standby = None;
    }

    /// The relay in use failed and the standby took over; no standby left.
    pub fn promote_standby(&mut self, now: Instant) {
        if let Some(mut s) = self.standby.take() {
            // A fresh failure deadline: the new relay just took the load.
            s.heard = s.heard.max(now);
            s.reported = false;
            s.next_probe = now;
            self.active = s;
        } else {
            self.active = Probed::new(&self.config, now);
        }
        self.last_move = now;
    }

    /// A quality move: the standby is now in use and the old relay becomes
    /// the standby (it still works).
    pub fn swap(&mut self, now: Instant) {
        if let Some(s) = self.standby.as_mut() {
            std::mem::swap(&mut self.active, s);
            self.active.next_probe = now;
        }
        self.last_move = now;
    }

    /// A new relay is in use, found by probing (no standby was ready).
    pub fn replace_active(&mut self, now: Instant) {
        self.active = Probed::new(&self.config, now);
        self.last_move = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, loc: Option<(f64, f64)>, country: Option<&str>) -> Candidate {
        let mut c = Candidate::new(name, "127.0.0.1:1".parse().unwrap());
        c.location = loc;
        c.country = country.map(str::to_owned);
        c
    }

    const MANILA: (f64, f64) = (14.6, 121.0);
    const SINGAPORE: (f64, f64) = (1.35, 103.82);
    const TOKYO: (f64, f64) = (35.68, 139.69);
    const FRANKFURT: (f64, f64) = (50.11, 8.68);

    #[test]
    fn distance_orders_candidates_and_unknowns_keep_dns_order() {
        let cands = vec![
            cand("fra", Some(FRANKFURT), Some("DE")),
            cand("nowhere-1", None, None),
            cand("tyo", Some(TOKYO), Some("JP")),
            cand("sin", Some(SINGAPORE), Some("SG")),
            cand("nowhere-2", None, Some("PH")),
        ];
        let manila = Place {
            location: Some(MANILA),
            country: Some("PH".into()),
        };
        let names = |r: Vec<Ranked>| -> Vec<&str> {
            r.iter().map(|r| cands[r.index].name.as_str()).collect()
        };
        let order = order_by_distance(&cands, Some(&manila));
        assert_eq!(
            names(order.clone()),
            ["sin", "tyo", "fra", "nowhere-2", "nowhere-1"]
        );
        let d = order[0].distance_km.unwrap();
        assert!((2300.0..2500.0).contains(&d), "{d}");
        // A Country database: same country first, then DNS order.
        let country_only = Place {
            location: None,
            country: Some("JP".into()),
        };
        assert_eq!(
            names(order_by_distance(&cands, Some(&country_only))),
            ["tyo", "fra", "nowhere-1", "sin", "nowhere-2"]
        );
        // No GeoIP: DNS order.
        assert_eq!(
            names(order_by_distance(&cands, None)),
            ["fra", "nowhere-1", "tyo", "sin", "nowhere-2"]
        );
    }

    fn measured(rtt_ms: u64, loss: f64) -> Option<Measured> {
        Some(Measured {
            rtt: Duration::from_millis(rtt_ms),
            jitter: Duration::ZERO,
            loss,
            sent: 10,
            received: 10 - (loss * 10.0) as u32,
        })
    }

    #[test]
    fn choice_is_by_measured_score_and_explains_itself() {
        let probed = vec![
            ("sin".to_owned(), Some(2400.0), measured(180, 0.0)),
            ("tyo".to_owned(), Some(3000.0), measured(60, 0.0)),
            ("hkg".to_owned(), Some(1100.0), None),
        ];
        let c = choose(&probed).unwrap();
        assert_eq!(c.index, 1);
        assert!(
            c.reason.contains("geo-nearest sin scored 180.0 ms"),
            "{}",
            c.reason
        );
        assert!(c.reason.contains("1 of 3 did not answer"), "{}", c.reason);
        // 10 % loss costs ~263 ms: a lossy near relay loses to a clean far one.
        let probed = vec![
            ("near".to_owned(), None, measured(20, 0.1)),
            ("far".to_owned(), None, measured(90, 0.0)),
        ];
        assert_eq!(choose(&probed).unwrap().index, 1);
        assert!(choose(&[("x".into(), None, None)]).is_none());
    }

    /// Drives a monitor with a fixed RTT per slot; `None` drops echoes.
    fn run(
        m: &mut Monitor,
        now: &mut Instant,
        until: Duration,
        active_rtt: Option<Duration>,
        standby_rtt: Option<Duration>,
    ) -> Vec<(Duration, Decision)> {
        let start = *now;
        let mut pending: Vec<(Instant, Slot, u64)> = Vec::new();
        let mut decisions = Vec::new();
        let step = Duration::from_millis(1);
        while *now < start + until {
            while let Some((slot, seq)) = m.poll_probe(*now) {
                let rtt = match slot {
                    Slot::Active => active_rtt,
                    Slot::Standby => standby_rtt,
                };
                if let Some(rtt) = rtt {
                    pending.push((*now + rtt, slot, seq));
                }
            }
            pending.retain(|&(at, slot, seq)| {
                if at <= *now {
                    m.on_echo(slot, seq, *now);
                    false
                } else {
                    true
                }
            });
            while let Some(d) = m.poll_decision(*now) {
                decisions.push((now.duration_since(start), d));
            }
            *now += step;
        }
        decisions
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn silent_relay_fails_within_the_timeout_once() {
        let t0 = Instant::now();
        let mut now = t0;
        let mut m = Monitor::new(MonitorConfig::default(), now);
        assert!(run(&mut m, &mut now, ms(2000), Some(ms(20)), None).is_empty());
        // The relay dies.
        let d = run(&mut m, &mut now, ms(2000), None, None);
        assert_eq!(d.len(), 1, "{d:?}");
        let (at, Decision::ActiveFailed { .. }) = &d[0] else {
            panic!("{d:?}")
        };
        // The last echo came up to one probe interval before the death;
        // the deadline is 400 ms after it.
        assert!(*at >= ms(290) && *at <= ms(401), "{at:?}");
        // A slow relay gets a deadline of four RTTs instead.
        let mut m = Monitor::new(MonitorConfig::default(), now);
        run(&mut m, &mut now, ms(3000), Some(ms(150)), None);
        let d = run(&mut m, &mut now, ms(2000), None, None);
        assert!(d[0].0 >= ms(440), "{d:?}");
    }

    #[test]
    fn switches_only_below_two_thirds_and_not_within_hold() {
        let mut now = Instant::now();
        let config = MonitorConfig {
            hold: ms(2000),
            ..MonitorConfig::default()
        };
        let mut m = Monitor::new(config, now);
        m.set_standby(now);
        // 45 ms against 60 ms is 75 %: stay.
        let d = run(&mut m, &mut now, ms(6000), Some(ms(60)), Some(ms(45)));
        assert!(d.is_empty(), "{d:?}");
        // 35 ms is 58 %: move (repeated once per hold period until the
        // driver acts on it).
        let d = run(&mut m, &mut now, ms(2500), Some(ms(60)), Some(ms(35)));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(matches!(d[0].1, Decision::SwitchToStandby { .. }), "{d:?}");
        m.swap(now);
        let d = run(&mut m, &mut now, ms(6000), Some(ms(35)), Some(ms(60)));
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn hold_delays_a_move_after_the_last_one() {
        let mut now = Instant::now();
        let mut m = Monitor::new(MonitorConfig::default(), now);
        m.set_standby(now);
        let d = run(&mut m, &mut now, ms(12_000), Some(ms(90)), Some(ms(20)));
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].0 >= ms(10_000), "{d:?}");
        m.swap(now);
        // The old relay is now the standby and worse: no move back.
        let d = run(&mut m, &mut now, ms(12_000), Some(ms(20)), Some(ms(90)));
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn standby_failure_is_reported_and_promotion_resets_the_deadline() {
        let mut now = Instant::now();
        let mut m = Monitor::new(MonitorConfig::default(), now);
        m.set_standby(now);
        let d = run(&mut m, &mut now, ms(1000), Some(ms(20)), None);
        assert!(
            matches!(&d[..], [(_, Decision::StandbyFailed { .. })]),
            "{d:?}"
        );
        m.set_standby(now);
        run(&mut m, &mut now, ms(1000), Some(ms(20)), Some(ms(30)));
        let d = run(&mut m, &mut now, ms(1000), None, Some(ms(30)));
        assert!(
            matches!(&d[..], [(_, Decision::ActiveFailed { .. })]),
            "{d:?}"
        );
        m.promote_standby(now);
        assert!(m.stats(Slot::Standby, now).is_none());
        assert!(m.stats(Slot::Active, now).unwrap().samples > 0);
        let d = run(&mut m, &mut now, ms(3000), Some(ms(30)), None);
        assert!(d.is_empty(), "{d:?}");
    }
}
