//! Link quality estimation from probe events.
//!
//! A [`LinkMetrics`] is fed with what a prober sees on one directed link:
//! probes sent, echoes received, probes that timed out, and (optionally)
//! loss counts the peer reports for data it received from us. It keeps a
//! smoothed RTT, the RFC 3550 interarrival jitter and the loss over a sliding
//! time window, plus the sample count and the age of the last echo so that a
//! stale or never-measured link is recognisable. Time is always an argument.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cost::Metrics;

/// Tuning of a [`LinkMetrics`] estimator.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkMetricsConfig {
    /// Weight of a new RTT sample in the smoothed RTT (RFC 6298 uses 1/8).
    pub rtt_gain: f64,
    /// A probe without an echo after this long counts as lost (the bound
    /// of the adaptive timeout when that is on).
    pub probe_timeout: Duration,
    /// Time probes out after `1.25 x SRTT + 4 x jitter + 5 ms` (at least
    /// 20 ms, at most `probe_timeout`) instead of the fixed timeout, as
    /// TCP's RTO adapts: a dead link is then noticed within a few probe
    /// intervals plus about one RTT, rather than after a timeout sized
    /// for the slowest link.
    pub adaptive_timeout: bool,
    /// Loss is the fraction lost among observations younger than this.
    pub loss_window: Duration,
    /// Consecutive lost probes after which the link is considered dead.
    pub dead_after_losses: u32,
    /// Probes tracked at once; older ones count as lost when exceeded, which
    /// bounds memory when a peer never answers.
    pub max_outstanding: usize,
    /// Loss is reported as lost / max(observations, this). Probes alone
    /// give 20 observations in a 10 s window, where one unlucky probe would
    /// read as 5 % loss and flip a healthy link to poor (and move routes);
    /// with this floor it reads as 0.5 %, two lost probes as 1 %, and three
    /// (15 % real loss, or a burst) make the link poor. The steady-state
    /// simulation measured the flapping without it. With media traffic
    /// (hundreds of observations) the estimate is the plain fraction.
    pub loss_min_samples: u64,
}

impl Default for LinkMetricsConfig {
    fn default() -> Self {
        Self {
            rtt_gain: 1.0 / 8.0,
            probe_timeout: Duration::from_millis(1500),
            adaptive_timeout: false,
            loss_window: Duration::from_secs(10),
            dead_after_losses: 3,
            max_outstanding: 64,
            loss_min_samples: 200,
        }
    }
}

/// Liveness of a link as far as probing can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkHealth {
    /// No echo received yet.
    Unmeasured,
    /// Echoes arrive.
    Alive,
    /// The last `dead_after_losses` probes were all lost.
    Dead,
}

/// A point-in-time summary of a link, as reported to routing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Smoothed RTT; `None` until the first echo.
    pub rtt: Option<Duration>,
    /// RFC 3550 interarrival jitter of the RTT samples.
    pub jitter: Duration,
    /// Fraction of probes and reported data lost within the loss window.
    pub loss: f64,
    /// Observations (probes and reported packets) behind `loss`.
    pub loss_samples: u64,
    /// Number of RTT samples ever taken.
    pub samples: u64,
    /// Time since the last echo; `None` if there never was one.
    pub age: Option<Duration>,
    /// Probes lost in a row since the last echo.
    pub consecutive_losses: u32,
    /// Liveness derived from the above.
    pub health: LinkHealth,
}

impl LinkStats {
    /// The metrics routing uses, or `None` when the link has never been
    /// measured or is dead.
    pub fn metrics(&self) -> Option<Metrics> {
        if self.health != LinkHealth::Alive {
            return None;
        }
        let rtt = self.rtt?;
        Some(Metrics {
            rtt_ms: rtt.as_secs_f64() * 1e3,
            jitter_ms: self.jitter.as_secs_f64() * 1e3,
            loss: self.loss,
        })
    }

    /// True when the last echo is older than `max_age` (or there was none).
    pub fn is_stale(&self, max_age: Duration) -> bool {
        self.age.is_none_or(|age| age > max_age)
    }
}

#[derive(Debug, Clone, Copy)]
struct LossObservation {
    at: Instant,
    sent: u64,
    lost: u64,
}

/// RTT, jitter and loss estimator for one directed link.
#[derive(Debug, Clone)]
pub struct LinkMetrics {
    config: LinkMetricsConfig,
    srtt: Option<f64>,
    last_rtt: Option<f64>,
    jitter: f64,
    outstanding: VecDeque<(u64, Instant)>,
    /// Probe timeout for the current estimates, and when the oldest
    /// outstanding probe reaches it: drivers ask with every timer, these
    /// change only with probes and echoes.
    timeout: Duration,
    expiry: Option<Instant>,
    observations: VecDeque<LossObservation>,
    /// Sums of `sent` and `lost` over `observations`, so that the loss over
    /// the window does not walk it.
    observed: (u64, u64),
    samples: u64,
    last_echo: Option<Instant>,
    consecutive_losses: u32,
}

impl LinkMetrics {
    /// A fresh estimator with no samples.
    pub fn new(config: LinkMetricsConfig) -> Self {
        let timeout = config.probe_timeout;
        Self {
            config,
            srtt: None,
            last_rtt: None,
            jitter: 0.0,
            outstanding: VecDeque::new(),
            timeout,
            expiry: None,
            observations: VecDeque::new(),
            observed: (0, 0),
            samples: 0,
            last_echo: None,
            consecutive_losses: 0,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &LinkMetricsConfig {
        &self.config
    }

    /// A probe with sequence number `seq` left at `now`.
    pub fn on_probe_sent(&mut self, seq: u64, now: Instant) {
        if self.outstanding.len() >= self.config.max_outstanding
            && let Some((_, sent)) = self.outstanding.pop_front()
        {
            self.record_loss(sent.max(now));
        }
        self.outstanding.push_back((seq, now));
        self.refresh_expiry();
    }

    fn refresh_expiry(&mut self) {
        self.expiry = self
            .outstanding
            .front()
            .map(|&(_, sent)| sent + self.timeout);
    }

    /// The echo of probe `seq` arrived at `now`. Returns the RTT sample, or
    /// `None` for an unknown, duplicate or already timed-out probe.
    pub fn on_echo(&mut self, seq: u64, now: Instant) -> Option<Duration> {
        let pos = self.outstanding.iter().position(|&(s, _)| s == seq)?;
        let (_, sent) = self.outstanding.remove(pos)?;
        self.refresh_expiry();
        let rtt = now.checked_duration_since(sent)?.as_secs_f64();
        self.srtt = Some(match self.srtt {
            None => rtt,
            Some(srtt) => srtt + self.config.rtt_gain * (rtt - srtt),
        });
        // RFC 3550 section 6.4.1: J += (|D| - J) / 16, where D is the change
        // in transit time between consecutive samples.
        if let Some(prev) = self.last_rtt {
            self.jitter += ((rtt - prev).abs() - self.jitter) / 16.0;
        }
        self.last_rtt = Some(rtt);
        self.timeout = self.compute_timeout();
        self.refresh_expiry();
        self.samples += 1;
        self.last_echo = Some(now);
        self.consecutive_losses = 0;
        self.push_observation(LossObservation {
            at: now,
            sent: 1,
            lost: 0,
        });
        Some(Duration::from_secs_f64(rtt))
    }

    /// Probe `seq` is declared lost (its timeout fired). Unknown sequence
    /// numbers are ignored.
    pub fn on_probe_timeout(&mut self, seq: u64, now: Instant) {
        if let Some(pos) = self.outstanding.iter().position(|&(s, _)| s == seq) {
            self.outstanding.remove(pos);
            self.refresh_expiry();
            self.record_loss(now);
        }
    }

    /// Declares every probe older than the probe timeout lost. Drivers call
    /// this at [`LinkMetrics::next_timeout`].
    pub fn expire_probes(&mut self, now: Instant) {
        while let Some(&(_, sent)) = self.outstanding.front() {
            if now.saturating_duration_since(sent) < self.timeout {
                break;
            }
            self.outstanding.pop_front();
            self.record_loss(now);
        }
        self.refresh_expiry();
    }

    /// When the oldest outstanding probe times out.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.expiry
    }

    /// The current probe timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn compute_timeout(&self) -> Duration {
        match self.srtt {
            Some(srtt) if self.config.adaptive_timeout => {
                let t = srtt * 1.25 + 4.0 * self.jitter + 0.005;
                Duration::from_secs_f64(t)
                    .clamp(Duration::from_millis(20), self.config.probe_timeout)
            }
            _ => self.config.probe_timeout,
        }
    }

    /// The peer reports that of `sent` data packets we sent it over the last
    /// report interval, `lost` never arrived. Data makes loss estimates far
    /// more precise than probes alone when traffic flows.
    pub fn on_loss_report(&mut self, sent: u64, lost: u64, now: Instant) {
        if sent == 0 {
            return;
        }
        self.push_observation(LossObservation {
            at: now,
            sent,
            lost: lost.min(sent),
        });
    }

    /// Current estimates.
    pub fn stats(&self, now: Instant) -> LinkStats {
        // Observations are in time order: the window's sums are the totals
        // less the few at the front that have aged out since the last push.
        let horizon = now.checked_sub(self.config.loss_window);
        let (mut sent, mut lost) = self.observed;
        for o in &self.observations {
            if horizon.is_none_or(|h| o.at >= h) {
                break;
            }
            sent -= o.sent;
            lost -= o.lost;
        }
        LinkStats {
            rtt: self.srtt.map(Duration::from_secs_f64),
            jitter: self.jitter(),
            loss: if sent == 0 {
                0.0
            } else {
                lost as f64 / sent.max(self.config.loss_min_samples) as f64
            },
            loss_samples: sent,
            samples: self.samples,
            age: self.last_echo.map(|t| now.saturating_duration_since(t)),
            consecutive_losses: self.consecutive_losses,
            health: self.health(),
        }
    }

    /// [`LinkStats::health`] alone: drivers check it at every echo and
    /// timer, where the whole summary would be wasted.
    pub fn health(&self) -> LinkHealth {
        if self.consecutive_losses >= self.config.dead_after_losses {
            LinkHealth::Dead
        } else if self.samples == 0 {
            LinkHealth::Unmeasured
        } else {
            LinkHealth::Alive
        }
    }

    /// [`LinkStats::jitter`] alone.
    pub fn jitter(&self) -> Duration {
        Duration::from_secs_f64(self.jitter)
    }

    /// [`LinkStats::samples`] alone.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Loss and the number of observations behind it since `since`: a
    /// shorter view than the loss window, for decisions that must react
    /// fast (a relay's fast reroute).
    pub fn loss_since(&self, since: Instant) -> (f64, u64) {
        let (sent, lost) = self
            .observations
            .iter()
            .rev()
            .take_while(|o| o.at >= since)
            .fold((0u64, 0u64), |(s, l), o| (s + o.sent, l + o.lost));
        let loss = if sent == 0 {
            0.0
        } else {
            lost as f64 / sent as f64
        };
        (loss, sent)
    }

    fn record_loss(&mut self, now: Instant) {
        self.consecutive_losses = self.consecutive_losses.saturating_add(1);
        self.push_observation(LossObservation {
            at: now,
            sent: 1,
            lost: 1,
        });
    }

    fn push_observation(&mut self, obs: LossObservation) {
        self.observations.push_back(obs);
        self.observed.0 += obs.sent;
        self.observed.1 += obs.lost;
        // Keep only what the loss window can still see.
        if let Some(horizon) = obs.at.checked_sub(self.config.loss_window) {
            while let Some(&old) = self.observations.front()
                && old.at < horizon
            {
                self.observations.pop_front();
                self.observed.0 -= old.sent;
                self.observed.1 -= old.lost;
            }
        }
    }
}

impl Default for LinkMetrics {
    fn default() -> Self {
        Self::new(LinkMetricsConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn unmeasured_until_first_echo() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        assert_eq!(m.stats(t0).health, LinkHealth::Unmeasured);
        assert!(m.stats(t0).metrics().is_none());
        m.on_probe_sent(1, t0);
        assert_eq!(m.on_echo(1, t0 + ms(40)), Some(ms(40)));
        let s = m.stats(t0 + ms(40));
        assert_eq!(s.health, LinkHealth::Alive);
        assert_eq!(s.rtt, Some(ms(40)));
        assert_eq!(s.samples, 1);
        assert_eq!(s.age, Some(Duration::ZERO));
        assert!((s.metrics().unwrap().rtt_ms - 40.0).abs() < 1e-9);
    }

    /// The running sums behind the windowed loss agree with a walk of the
    /// window, and the cached expiry with the oldest probe, as probes, echoes, timeouts and loss reports come and go
    /// (including queries long after the last observation), on a
    /// driver's clock, which never goes back.
    #[test]
    fn windowed_loss_sums_match_a_walk_of_the_window() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        let window = m.config().loss_window;
        let mut x: u64 = 7; // xorshift: a fixed, varied sequence
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut now = t0;
        for seq in 1..3000u64 {
            now += ms(next() % 400);
            m.on_probe_sent(seq, now);
            now += ms(next() % 50);
            match next() % 4 {
                0 => {}
                1 => m.on_loss_report(10, next() % 3, now),
                _ => {
                    let _ = m.on_echo(seq, now);
                }
            }
            m.expire_probes(now);
            let oldest = m.outstanding.front().map(|&(_, sent)| sent + m.timeout());
            assert_eq!(m.next_timeout(), oldest, "probe {seq}");
            for later in [ms(30), window / 2, window * 2] {
                let at = now + later;
                let walked = m
                    .observations
                    .iter()
                    .filter(|o| o.at >= at - window)
                    .fold((0, 0), |(s, l), o| (s + o.sent, l + o.lost));
                let stats = m.stats(at);
                assert_eq!(stats.loss_samples, walked.0, "probe {seq}");
                let expected = if walked.0 == 0 {
                    0.0
                } else {
                    walked.1 as f64 / walked.0.max(m.config().loss_min_samples) as f64
                };
                assert_eq!(stats.loss, expected, "probe {seq}");
            }
        }
    }

    #[test]
    fn smoothed_rtt_follows_rfc6298_gain() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        m.on_probe_sent(1, t0);
        m.on_echo(1, t0 + ms(100));
        m.on_probe_sent(2, t0 + ms(500));
        m.on_echo(2, t0 + ms(500) + ms(180));
        // 100 + (180 - 100) / 8 = 110
        let rtt = m.stats(t0 + ms(700)).rtt.unwrap();
        assert!((rtt.as_secs_f64() * 1e3 - 110.0).abs() < 1e-6, "{rtt:?}");
    }

    #[test]
    fn jitter_is_rfc3550_interarrival() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        let rtts = [50u64, 60, 50, 60, 50];
        let mut expected = 0.0f64;
        for (i, &r) in rtts.iter().enumerate() {
            let sent = t0 + ms(500 * i as u64);
            m.on_probe_sent(i as u64, sent);
            m.on_echo(i as u64, sent + ms(r));
            if i > 0 {
                expected += (10.0 - expected) / 16.0;
            }
        }
        let j = m.stats(t0 + ms(3000)).jitter.as_secs_f64() * 1e3;
        assert!((j - expected).abs() < 1e-6, "{j} vs {expected}");
    }

    #[test]
    fn loss_over_sliding_window_and_dead_detection() {
        let t0 = Instant::now();
        let cfg = LinkMetricsConfig {
            loss_window: Duration::from_secs(5),
            loss_min_samples: 0,
            ..Default::default()
        };
        let mut m = LinkMetrics::new(cfg);
        // 10 probes, every 500 ms; the 3rd and 7th are lost.
        for i in 0..10u64 {
            let at = t0 + ms(500 * i);
            m.on_probe_sent(i, at);
            if i == 2 || i == 6 {
                m.on_probe_timeout(i, at + ms(1500));
            } else {
                m.on_echo(i, at + ms(20));
            }
        }
        let s = m.stats(t0 + ms(4600));
        assert_eq!(s.loss_samples, 10);
        assert!((s.loss - 0.2).abs() < 1e-9);
        assert_eq!(s.health, LinkHealth::Alive);
        // Later everything is lost: old observations leave the window and
        // three losses in a row mark the link dead.
        for i in 10..22u64 {
            let at = t0 + ms(500 * i);
            m.on_probe_sent(i, at);
            m.expire_probes(at);
        }
        let now = t0 + ms(500 * 22);
        m.expire_probes(now);
        let s = m.stats(now);
        assert_eq!(s.health, LinkHealth::Dead);
        assert!(s.loss > 0.9, "{s:?}");
        assert!(s.metrics().is_none());
        assert!(s.is_stale(Duration::from_secs(2)));
    }

    #[test]
    fn adaptive_timeout_follows_the_rtt_within_bounds() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::new(LinkMetricsConfig {
            adaptive_timeout: true,
            ..Default::default()
        });
        assert_eq!(m.timeout(), Duration::from_millis(1500), "unmeasured");
        for i in 0..20u64 {
            m.on_probe_sent(i, t0 + ms(100 * i));
            m.on_echo(i, t0 + ms(100 * i + 40));
        }
        // 40 ms RTT without jitter: 55 ms.
        assert!(
            (m.timeout().as_secs_f64() - 0.055).abs() < 1e-3,
            "{:?}",
            m.timeout()
        );
        m.on_probe_sent(100, t0 + ms(3000));
        m.expire_probes(t0 + ms(3050));
        assert_eq!(m.stats(t0 + ms(3050)).consecutive_losses, 0);
        m.expire_probes(t0 + ms(3056));
        assert_eq!(m.stats(t0 + ms(3056)).consecutive_losses, 1);
    }

    #[test]
    fn one_lost_probe_does_not_read_as_poor_loss() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        // 20 probes in the 10 s window, one lost: 0.5 %, under the 1.2 %
        // bar and under the control plane's 0.5-point change threshold.
        for i in 0..20u64 {
            let at = t0 + ms(500 * i);
            m.on_probe_sent(i, at);
            if i == 5 {
                m.on_probe_timeout(i, at + ms(1500));
            } else {
                m.on_echo(i, at + ms(30));
            }
        }
        let s = m.stats(t0 + ms(9800));
        assert_eq!(s.loss_samples, 20);
        assert!((s.loss - 0.005).abs() < 1e-9, "{s:?}");
        // With media reports behind it the estimate is the plain fraction.
        m.on_loss_report(1000, 30, t0 + ms(9900));
        let s = m.stats(t0 + ms(9950));
        assert!((s.loss - 31.0 / 1020.0).abs() < 1e-9, "{s:?}");
    }

    #[test]
    fn late_duplicate_and_unknown_echoes_are_ignored() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        m.on_probe_sent(1, t0);
        m.expire_probes(t0 + ms(2000));
        assert_eq!(m.on_echo(1, t0 + ms(2100)), None);
        assert_eq!(m.on_echo(99, t0 + ms(2100)), None);
        m.on_probe_sent(2, t0 + ms(2200));
        assert!(m.on_echo(2, t0 + ms(2250)).is_some());
        assert_eq!(m.on_echo(2, t0 + ms(2260)), None);
        assert_eq!(m.stats(t0 + ms(2300)).samples, 1);
    }

    #[test]
    fn outstanding_probes_are_bounded() {
        let t0 = Instant::now();
        let cfg = LinkMetricsConfig {
            max_outstanding: 4,
            ..Default::default()
        };
        let mut m = LinkMetrics::new(cfg);
        for i in 0..100u64 {
            m.on_probe_sent(i, t0 + ms(i));
        }
        assert_eq!(m.outstanding.len(), 4);
        assert_eq!(m.stats(t0 + ms(100)).consecutive_losses, 96);
    }

    #[test]
    fn data_loss_reports_weigh_by_packets() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        m.on_probe_sent(1, t0);
        m.on_echo(1, t0 + ms(10));
        m.on_loss_report(999, 99, t0 + ms(20));
        let s = m.stats(t0 + ms(30));
        assert_eq!(s.loss_samples, 1000);
        assert!((s.loss - 0.099).abs() < 1e-9);
        // Nonsense reports cannot push loss above 100 %.
        m.on_loss_report(10, 50, t0 + ms(40));
        assert!(m.stats(t0 + ms(50)).loss <= 1.0);
    }

    #[test]
    fn short_view_of_loss() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        m.on_loss_report(1000, 0, t0);
        m.on_loss_report(100, 10, t0 + ms(5000));
        assert_eq!(m.loss_since(t0 + ms(4000)), (0.1, 100));
        assert!((m.stats(t0 + ms(5000)).loss - 10.0 / 1100.0).abs() < 1e-12);
    }

    #[test]
    fn next_timeout_tracks_oldest_probe() {
        let t0 = Instant::now();
        let mut m = LinkMetrics::default();
        assert_eq!(m.next_timeout(), None);
        m.on_probe_sent(1, t0);
        m.on_probe_sent(2, t0 + ms(500));
        assert_eq!(m.next_timeout(), Some(t0 + ms(1500)));
        m.on_echo(1, t0 + ms(600));
        assert_eq!(m.next_timeout(), Some(t0 + ms(2000)));
    }
}
