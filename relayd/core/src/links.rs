//! Per-peer link state: probing, loss accounting and the health verdict
//! that drives fast reroute.
//!
//! Every connected peer is probed every `probe_interval`; the echo returns
//! at once and carries the peer's count of media received from us, so the
//! loss estimate uses real traffic whenever there is some (thousands of
//! samples a second) and the probes otherwise.
//!
//! A link is *unusable* for forwarding when it is disconnected or dead
//! (probes lost in a row), or when over the last `fast_window` it lost more
//! than the poor threshold (with enough samples to tell) or its jitter is
//! above the poor threshold. It becomes usable again only when the last
//! `recover_after` were clean on enough samples (once traffic moved away,
//! only probes measure it), so a marginal link does not flap. RTT
//! increases alone do not trigger a local reroute: they lose nothing, and
//! the control plane weighs them against the alternatives.

use std::time::{Duration, Instant};

use bytes::Bytes;
use topology::{LinkHealth, LinkMetrics, LinkMetricsConfig, LinkStats, PoorThresholds};

use crate::ids::RelayId;
use crate::wire::peer::{PeerDatagram, ReceiverReport};

/// Probing and health tuning.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Time between probes to each peer.
    pub probe_interval: Duration,
    /// The estimator's settings.
    pub metrics: LinkMetricsConfig,
    /// What counts as poor.
    pub poor: PoorThresholds,
    /// Loss window for the health verdict.
    pub fast_window: Duration,
    /// Observations needed in the fast window before loss can make a link
    /// unusable (probes alone rarely reach it: a few lost probes are noise).
    pub min_loss_samples: u64,
    /// Good health needed before an unusable link is used again.
    pub recover_after: Duration,
    /// Observations within `recover_after` needed before an unusable link
    /// can be judged good again.
    pub min_recover_samples: u64,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            probe_interval: Duration::from_millis(500),
            metrics: LinkMetricsConfig::default(),
            poor: PoorThresholds::default(),
            fast_window: Duration::from_secs(2),
            min_loss_samples: 50,
            recover_after: Duration::from_secs(5),
            min_recover_samples: 8,
        }
    }
}

/// One peer's link.
#[derive(Debug, Clone)]
pub struct PeerLink {
    connected: bool,
    metrics: LinkMetrics,
    next_probe: Option<Instant>,
    probe_seq: u64,
    next_link_seq: u32,
    last_report: Option<ReceiverReport>,
    received: ReceiverReport,
    usable: bool,
    /// When the link last became unusable (`None`: it never was).
    unusable_since: Option<Instant>,
}

impl PeerLink {
    /// A link that is not connected yet.
    pub fn new(config: &LinkConfig) -> Self {
        Self {
            connected: false,
            metrics: LinkMetrics::new(config.metrics.clone()),
            next_probe: None,
            probe_seq: 0,
            next_link_seq: 0,
            last_report: None,
            received: ReceiverReport::default(),
            usable: false,
            unusable_since: None,
        }
    }

    /// The connection came up: probe at once.
    pub fn on_connected(&mut self, now: Instant) {
        self.connected = true;
        self.next_probe = Some(now);
        self.last_report = None;
        self.received = ReceiverReport::default();
    }

    /// The connection went away.
    pub fn on_disconnected(&mut self, now: Instant) {
        self.connected = false;
        self.next_probe = None;
        if self.usable {
            self.unusable_since = Some(now);
        }
        self.usable = false;
    }

    /// True while connected.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// True when forwarding may use the link.
    pub fn is_usable(&self) -> bool {
        self.usable
    }

    /// The link's state for forwarding decisions.
    pub fn state(&self, now: Instant, config: &LinkConfig) -> crate::forwarding::LinkState {
        use crate::forwarding::LinkState;
        if self.usable {
            return LinkState::Usable;
        }
        let stats = self.metrics.stats(now);
        if !self.connected || stats.health == LinkHealth::Dead {
            return LinkState::Down;
        }
        // Ranked by the long-window loss: steadier than the fast window,
        // which on a link without traffic holds only a few probes.
        let _ = config;
        LinkState::Degraded(stats.loss)
    }

    /// A probe to send now, if one is due.
    pub fn poll_probe(&mut self, now: Instant, config: &LinkConfig) -> Option<Bytes> {
        let due = self.next_probe?;
        if now < due {
            return None;
        }
        self.probe_seq += 1;
        self.metrics.on_probe_sent(self.probe_seq, now);
        // Stay on the grid unless we fell far behind.
        let next = due + config.probe_interval;
        self.next_probe = Some(if next <= now {
            now + config.probe_interval
        } else {
            next
        });
        Some(PeerDatagram::probe(self.probe_seq))
    }

    /// The echo to a probe from the peer, with what we received from it.
    pub fn echo_for(&self, seq: u64) -> Bytes {
        PeerDatagram::echo(seq, self.received)
    }

    /// An echo of our probe arrived.
    pub fn on_echo(&mut self, seq: u64, report: ReceiverReport, now: Instant) {
        self.metrics.on_echo(seq, now);
        if let Some(last) = self.last_report
            && report.received >= last.received
        {
            let got = report.received - last.received;
            let expected = u64::from(report.highest_seq.wrapping_sub(last.highest_seq));
            // A report from before a restart, or reordered: ignore it.
            if expected >= got && expected < u64::from(u32::MAX / 2) {
                self.metrics.on_loss_report(expected, expected - got, now);
            }
        }
        self.last_report = Some(report);
    }

    /// Media with `link_seq` arrived from the peer.
    pub fn on_media_received(&mut self, link_seq: u32) {
        self.received.received += 1;
        if self.received.received == 1
            || (link_seq.wrapping_sub(self.received.highest_seq) as i32) > 0
        {
            self.received.highest_seq = link_seq;
        }
    }

    /// Sequence number for the next media datagram we send on the link.
    pub fn take_link_seq(&mut self) -> u32 {
        let s = self.next_link_seq;
        self.next_link_seq = s.wrapping_add(1);
        s
    }

    /// Expires overdue probes and re-evaluates health. Returns true when
    /// the link's usability changed.
    pub fn update(&mut self, now: Instant, config: &LinkConfig) -> bool {
        self.metrics.expire_probes(now);
        let m = &self.metrics;
        let alive = self.connected && m.health() != LinkHealth::Dead;
        let jittery = m.samples() >= 3 && m.jitter().as_secs_f64() * 1e3 > config.poor.jitter_ms;
        let before = self.usable;
        if self.usable {
            let (fast_loss, samples) = self
                .metrics
                .loss_since(now.checked_sub(config.fast_window).unwrap_or(now));
            let lossy = samples >= config.min_loss_samples && fast_loss > config.poor.loss;
            if !alive || lossy || jittery {
                self.usable = false;
                self.unusable_since = Some(now);
            }
        } else if let Some(since) = self.unusable_since {
            // Coming back needs evidence that the link is good *now*:
            // the last `recover_after` must be clean on enough samples
            // (once traffic moved away, mostly probes), and that long must
            // have passed since it went bad.
            let window_start = now.checked_sub(config.recover_after).unwrap_or(now);
            let (loss, samples) = self.metrics.loss_since(window_start);
            let clean = samples >= config.min_recover_samples && loss <= config.poor.loss;
            if alive
                && !jittery
                && clean
                && now.saturating_duration_since(since) >= config.recover_after
            {
                self.usable = true;
            }
        } else {
            // Never bad before: usable as soon as it is up.
            self.usable = alive;
        }
        before != self.usable
    }

    /// When this link needs `update` or `poll_probe` next. (Recovery is
    /// re-evaluated with every probe and echo, so it needs no timer.)
    pub fn next_timeout(&self) -> Option<Instant> {
        [self.next_probe, self.metrics.next_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Current estimates.
    pub fn stats(&self, now: Instant) -> LinkStats {
        self.metrics.stats(now)
    }
}

/// A peer and its link, for reporting.
#[derive(Debug, Clone, Copy)]
pub struct LinkReport {
    /// The peer.
    pub peer: RelayId,
    /// Connected now.
    pub connected: bool,
    /// Usable for forwarding now.
    pub usable: bool,
    /// Estimates.
    pub stats: LinkStats,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn probes_on_schedule_and_echoes_measure() {
        let cfg = LinkConfig::default();
        let t0 = Instant::now();
        let mut l = PeerLink::new(&cfg);
        assert!(l.poll_probe(t0, &cfg).is_none(), "not connected");
        l.on_connected(t0);
        assert!(l.update(t0, &cfg));
        assert!(l.is_usable());
        let p = l.poll_probe(t0, &cfg).unwrap();
        let PeerDatagram::Probe { seq } = PeerDatagram::decode(&p).unwrap() else {
            panic!()
        };
        assert!(l.poll_probe(t0 + ms(100), &cfg).is_none());
        assert_eq!(l.next_timeout(), Some(t0 + ms(500)));
        l.on_echo(seq, ReceiverReport::default(), t0 + ms(40));
        assert_eq!(l.stats(t0 + ms(50)).rtt, Some(ms(40)));
        assert!(l.poll_probe(t0 + ms(500), &cfg).is_some());
    }

    #[test]
    fn data_loss_makes_link_unusable_then_recovers_after_hold_down() {
        let cfg = LinkConfig::default();
        let t0 = Instant::now();
        let mut l = PeerLink::new(&cfg);
        l.on_connected(t0);
        l.update(t0, &cfg);
        let mut t = t0;
        let mut report = ReceiverReport::default();
        let mut seq = 0;
        // 4 s of 1000 packets per 500 ms with 10 % loss.
        for _ in 0..8 {
            t += ms(500);
            let probe = l.poll_probe(t, &cfg).unwrap();
            let PeerDatagram::Probe { seq: s } = PeerDatagram::decode(&probe).unwrap() else {
                panic!()
            };
            seq += 1000;
            report.received += 900;
            report.highest_seq = seq;
            l.on_echo(s, report, t + ms(20));
            l.update(t + ms(20), &cfg);
        }
        assert!(!l.is_usable(), "10 % loss over the fast window");
        // Loss stops: still unusable for the hold-down after the window clears.
        let mut recovered_at = None;
        for i in 0..60 {
            t += ms(500);
            if let Some(probe) = l.poll_probe(t, &cfg) {
                let PeerDatagram::Probe { seq: s } = PeerDatagram::decode(&probe).unwrap() else {
                    panic!()
                };
                seq += 1000;
                report.received += 1000;
                report.highest_seq = seq;
                l.on_echo(s, report, t + ms(20));
            }
            l.update(t + ms(20), &cfg);
            if l.is_usable() {
                recovered_at = Some(i);
                break;
            }
        }
        let i = recovered_at.expect("recovers");
        // 5 s of clean traffic after the loss stopped; 500 ms steps.
        assert!((9..=11).contains(&i), "recovered after {i} steps");
    }

    #[test]
    fn lost_probes_kill_the_link() {
        let cfg = LinkConfig::default();
        let t0 = Instant::now();
        let mut l = PeerLink::new(&cfg);
        l.on_connected(t0);
        l.update(t0, &cfg);
        let mut t = t0;
        for _ in 0..6 {
            l.poll_probe(t, &cfg);
            l.update(t, &cfg);
            t += ms(500);
        }
        assert!(!l.is_usable());
        assert_eq!(l.stats(t).health, LinkHealth::Dead);
        l.on_disconnected(t);
        assert!(!l.is_connected());
    }

    #[test]
    fn receiver_side_counts() {
        let cfg = LinkConfig::default();
        let mut l = PeerLink::new(&cfg);
        l.on_media_received(5);
        l.on_media_received(4);
        l.on_media_received(7);
        let PeerDatagram::Echo { report, .. } = PeerDatagram::decode(&l.echo_for(1)).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            report,
            ReceiverReport {
                received: 3,
                highest_seq: 7
            }
        );
        assert_eq!(l.take_link_seq(), 0);
        assert_eq!(l.take_link_seq(), 1);
    }
}
