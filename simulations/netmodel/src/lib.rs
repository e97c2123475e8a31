//! Link impairment model: what happens to each packet on one direction of
//! a link. The simulator applies it to virtual links; `netshim` applies it
//! to real UDP traffic between processes (the kernel here has no netem).
//! Same model, same profiles, same seeds.
//!
//! Per packet, in order:
//! 1. **Loss**, Gilbert-Elliott (two-state Markov chain, lossless Good
//!    state, lossy Bad state): from the mean loss rate `p` and the mean
//!    burst length `b` (packets), the chain leaves Bad with probability
//!    `r = 1/b` and enters it with `q = p r / (1 - p)`, so the stationary
//!    loss is `p` and losses come in bursts of mean length `b`. `b = 1` is
//!    independent loss.
//! 2. **Rate**: with a rate cap, a packet waits for the packets before it
//!    to be serialised (a FIFO at `rate_kbps`); a packet that would wait
//!    longer than `queue_ms` is dropped (drop-tail).
//! 3. **Delay**: the base one-way delay plus jitter, a normal deviation of
//!    standard deviation `jitter_ms` folded to be non-negative. Jitter can
//!    reorder packets, as on real paths.
//!
//! Time is an argument ([`Duration`] since any origin), and randomness
//! comes from a seeded ChaCha8 generator, so runs repeat exactly.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Impairment of one direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Profile {
    /// Base one-way delay, ms.
    pub delay_ms: f64,
    /// Standard deviation of the per-packet extra delay, ms.
    pub jitter_ms: f64,
    /// Mean loss rate, 0..1.
    pub loss: f64,
    /// Mean loss burst length in packets (>= 1; 1 means independent).
    pub burst: f64,
    /// Rate cap in kbit/s (0: none).
    pub rate_kbps: f64,
    /// Longest queueing delay under the rate cap before drop-tail, ms.
    pub queue_ms: f64,
}

impl Default for Profile {
    fn default() -> Self {
        Profile::CLEAN
    }
}

/// Why a profile was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid profile: {0}")]
pub struct ProfileError(pub String);

impl Profile {
    /// No impairment at all.
    pub const CLEAN: Profile = Profile {
        delay_ms: 0.0,
        jitter_ms: 0.0,
        loss: 0.0,
        burst: 1.0,
        rate_kbps: 0.0,
        queue_ms: 200.0,
    };

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let finite = [
            self.delay_ms,
            self.jitter_ms,
            self.loss,
            self.burst,
            self.rate_kbps,
            self.queue_ms,
        ]
        .iter()
        .all(|v| v.is_finite());
        if !finite {
            return Err(ProfileError("values must be finite".into()));
        }
        if self.delay_ms < 0.0
            || self.jitter_ms < 0.0
            || self.rate_kbps < 0.0
            || self.queue_ms < 0.0
        {
            return Err(ProfileError(
                "delay, jitter, rate and queue must not be negative".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.loss) {
            return Err(ProfileError("loss must be in [0, 1)".into()));
        }
        if self.burst < 1.0 {
            return Err(ProfileError("burst must be at least 1 packet".into()));
        }
        Ok(())
    }

    /// Sets `key=value` (the keys are the field names); used by command
    /// lines and the netshim control protocol.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ProfileError> {
        let v: f64 = value
            .parse()
            .map_err(|_| ProfileError(format!("{key}: {value:?} is not a number")))?;
        match key {
            "delay_ms" | "delay" => self.delay_ms = v,
            "jitter_ms" | "jitter" => self.jitter_ms = v,
            "loss" => self.loss = v,
            "burst" => self.burst = v,
            "rate_kbps" | "rate" => self.rate_kbps = v,
            "queue_ms" => self.queue_ms = v,
            _ => return Err(ProfileError(format!("unknown key {key}"))),
        }
        Ok(())
    }
}

/// One direction of an impaired link.
#[derive(Debug, Clone)]
pub struct LinkModel {
    profile: Profile,
    rng: ChaCha8Rng,
    bad: bool,
    /// When the rate-capped transmitter is free again.
    busy_until: Duration,
    stats: LinkStats,
}

/// What happened to the packets so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStats {
    /// Packets offered.
    pub packets: u64,
    /// Lost to the loss model.
    pub lost: u64,
    /// Dropped by the rate cap's queue.
    pub queue_drops: u64,
}

impl LinkModel {
    /// A link with `profile`, randomness from `seed`.
    pub fn new(profile: Profile, seed: u64) -> Self {
        Self {
            profile,
            rng: ChaCha8Rng::seed_from_u64(seed),
            bad: false,
            busy_until: Duration::ZERO,
            stats: LinkStats::default(),
        }
    }

    /// The current profile.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// Changes the profile from now on.
    pub fn set_profile(&mut self, profile: Profile) {
        self.profile = profile;
    }

    /// Counters so far.
    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Decides the fate of a packet of `size` bytes sent at `now`: `None`
    /// when it is lost, else the time until it arrives.
    pub fn transmit(&mut self, now: Duration, size: usize) -> Option<Duration> {
        let p = self.profile;
        self.stats.packets += 1;
        if self.lose(&p) {
            self.stats.lost += 1;
            return None;
        }
        let mut wait = Duration::ZERO;
        if p.rate_kbps > 0.0 {
            let start = self.busy_until.max(now);
            let queued = start - now;
            if queued.as_secs_f64() * 1e3 > p.queue_ms {
                self.stats.queue_drops += 1;
                return None;
            }
            let serialise = Duration::from_secs_f64(size as f64 * 8.0 / (p.rate_kbps * 1e3));
            self.busy_until = start + serialise;
            wait = self.busy_until - now;
        }
        let jitter = if p.jitter_ms > 0.0 {
            (self.normal() * p.jitter_ms).abs()
        } else {
            0.0
        };
        Some(wait + Duration::from_secs_f64((p.delay_ms + jitter) / 1e3))
    }

    fn lose(&mut self, p: &Profile) -> bool {
        if p.loss <= 0.0 {
            self.bad = false;
            return false;
        }
        let leave_bad = 1.0 / p.burst.max(1.0);
        let enter_bad = (p.loss * leave_bad / (1.0 - p.loss)).min(1.0);
        self.bad = if self.bad {
            !self.rng.random_bool(leave_bad)
        } else {
            self.rng.random_bool(enter_bad)
        };
        self.bad
    }

    /// A standard normal deviate (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1: f64 = self.rng.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.rng.random_range(0.0..1.0);
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1e3)
    }

    #[test]
    fn gilbert_elliott_hits_mean_loss_and_burst_length() {
        let profile = Profile {
            loss: 0.05,
            burst: 4.0,
            ..Profile::CLEAN
        };
        let mut m = LinkModel::new(profile, 1);
        let n = 400_000;
        let mut lost = 0;
        let mut bursts = 0;
        let mut prev = false;
        for i in 0..n {
            let l = m.transmit(ms(i as f64), 100).is_none();
            lost += l as u32;
            if l && !prev {
                bursts += 1;
            }
            prev = l;
        }
        let rate = f64::from(lost) / n as f64;
        let mean_burst = f64::from(lost) / f64::from(bursts);
        assert!((rate - 0.05).abs() < 0.003, "loss {rate}");
        assert!((mean_burst - 4.0).abs() < 0.3, "burst {mean_burst}");
        assert_eq!(m.stats().lost, u64::from(lost));
    }

    #[test]
    fn delay_jitter_and_determinism() {
        let profile = Profile {
            delay_ms: 50.0,
            jitter_ms: 5.0,
            ..Profile::CLEAN
        };
        let mut a = LinkModel::new(profile, 9);
        let mut b = LinkModel::new(profile, 9);
        let da: Vec<_> = (0..1000)
            .map(|i| a.transmit(ms(f64::from(i)), 100).unwrap())
            .collect();
        let db: Vec<_> = (0..1000)
            .map(|i| b.transmit(ms(f64::from(i)), 100).unwrap())
            .collect();
        assert_eq!(da, db, "same seed, same run");
        assert!(da.iter().all(|d| *d >= ms(50.0)));
        let mean_extra = da.iter().map(|d| d.as_secs_f64() * 1e3 - 50.0).sum::<f64>() / 1000.0;
        // E|N(0, s)| = s * sqrt(2/pi) = 3.99 for s = 5.
        assert!((mean_extra - 3.99).abs() < 0.4, "{mean_extra}");
    }

    #[test]
    fn rate_cap_serialises_and_drops_tail() {
        let profile = Profile {
            rate_kbps: 800.0, // 100 bytes per ms
            queue_ms: 10.0,
            ..Profile::CLEAN
        };
        let mut m = LinkModel::new(profile, 1);
        // A burst of 30 packets of 100 bytes at t=0: 1 ms each.
        let fates: Vec<_> = (0..30).map(|_| m.transmit(Duration::ZERO, 100)).collect();
        assert_eq!(fates[0], Some(ms(1.0)));
        assert_eq!(fates[9], Some(ms(10.0)));
        assert!(fates[11].is_none(), "queue above 10 ms drops");
        assert_eq!(m.stats().queue_drops, 19);
    }

    #[test]
    fn profiles_validate_and_parse() {
        let mut p = Profile::CLEAN;
        p.set("loss", "0.1").unwrap();
        p.set("delay", "20").unwrap();
        assert_eq!((p.loss, p.delay_ms), (0.1, 20.0));
        assert!(p.set("loss", "x").is_err());
        assert!(p.set("nope", "1").is_err());
        p.loss = 1.0;
        assert!(p.validate().is_err());
        p.loss = 0.1;
        p.burst = 0.5;
        assert!(p.validate().is_err());
    }
}
