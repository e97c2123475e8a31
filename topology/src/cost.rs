//! The cost model: how link metrics become an additive path cost, and when a
//! path is "poor".
//!
//! RTT and jitter add along a path. Loss composes as `1 - prod(1 - l_i)`, so
//! `-ln(1 - l)` is additive. A link's cost is
//!
//! ```text
//! cost = rtt_ms + jitter_weight * jitter_ms + loss_weight * -ln(1 - loss) + hop_penalty_ms
//! ```
//!
//! in milliseconds-equivalent, which plain shortest-path algorithms can
//! minimise. The defaults are explained on [`CostWeights::default`].

use serde::{Deserialize, Serialize};

/// Measured quality of a link or a whole path.
///
/// For a path, `rtt_ms` and `jitter_ms` are sums over its links and `loss`
/// is the composed end-to-end loss.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Metrics {
    /// Round-trip time in milliseconds.
    pub rtt_ms: f64,
    /// Interarrival jitter in milliseconds.
    pub jitter_ms: f64,
    /// Loss as a fraction in `[0, 1]`.
    pub loss: f64,
}

impl Metrics {
    /// Metrics of a link with only an RTT.
    pub fn rtt(rtt_ms: f64) -> Self {
        Self {
            rtt_ms,
            ..Self::default()
        }
    }

    /// The metrics of this path followed by `next`.
    pub fn then(&self, next: &Metrics) -> Metrics {
        Metrics {
            rtt_ms: self.rtt_ms + next.rtt_ms,
            jitter_ms: self.jitter_ms + next.jitter_ms,
            loss: 1.0 - (1.0 - self.loss) * (1.0 - next.loss),
        }
    }

    /// True when every value is finite and in range.
    pub fn is_valid(&self) -> bool {
        self.rtt_ms.is_finite()
            && self.rtt_ms >= 0.0
            && self.jitter_ms.is_finite()
            && self.jitter_ms >= 0.0
            && (0.0..=1.0).contains(&self.loss)
    }
}

/// Quality bar for a path. Defaults: a call is poor when RTT > 320 ms, or
/// loss > 1.2 %, or jitter > 12 ms (Jiang et al., "Via: Improving Internet
/// Telephony Call Quality Using Predictive Relay Selection", SIGCOMM 2016).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoorThresholds {
    /// Poor above this RTT, milliseconds.
    pub rtt_ms: f64,
    /// Poor above this loss fraction.
    pub loss: f64,
    /// Poor above this jitter, milliseconds.
    pub jitter_ms: f64,
}

impl Default for PoorThresholds {
    fn default() -> Self {
        Self {
            rtt_ms: 320.0,
            loss: 0.012,
            jitter_ms: 12.0,
        }
    }
}

impl PoorThresholds {
    /// True when `m` fails the quality bar.
    pub fn is_poor(&self, m: &Metrics) -> bool {
        m.rtt_ms > self.rtt_ms || m.loss > self.loss || m.jitter_ms > self.jitter_ms
    }
}

/// Weights of the additive link cost, in milliseconds-equivalent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostWeights {
    /// Milliseconds of cost per millisecond of jitter.
    pub jitter: f64,
    /// Milliseconds of cost per unit of `-ln(1 - loss)` (about per 100 % of
    /// small losses).
    pub loss: f64,
    /// Milliseconds added per relay hop.
    pub hop_penalty_ms: f64,
}

impl Default for CostWeights {
    /// - `jitter = 2`: a receiver's jitter buffer holds about two jitter
    ///   spans of delay, so a millisecond of jitter costs about two of
    ///   playout delay.
    /// - `loss = 2500`: one percent of loss (`-ln(0.99) = 0.01005`) costs
    ///   25 ms, so the loss bar of the poor test (1.2 %) is worth ~30 ms of
    ///   RTT. Simulations (`simulations route-report --sweep`) show lower
    ///   weights keep lossy direct links that the overlay could avoid and
    ///   higher ones trade large RTT for tiny loss gains.
    /// - `hop_penalty_ms = 5`: forwarding through a relay costs a little
    ///   processing, one more failure point and one more path to keep
    ///   measured; a detour must win by more than that.
    fn default() -> Self {
        Self {
            jitter: 2.0,
            loss: 2500.0,
            hop_penalty_ms: 5.0,
        }
    }
}

/// Cost weights plus the poor-path thresholds: everything that ranks paths.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostModel {
    /// Additive cost weights.
    pub weights: CostWeights,
    /// The quality bar.
    pub poor: PoorThresholds,
}

/// Loss values are clamped below 1 so that `-ln(1 - loss)` stays finite;
/// a link that loses everything is dead and is removed, not costed.
const MAX_COSTED_LOSS: f64 = 0.999_999;

impl CostModel {
    /// Additive cost of one link (hop penalty included).
    pub fn link_cost(&self, m: &Metrics) -> f64 {
        let w = &self.weights;
        m.rtt_ms + w.jitter * m.jitter_ms + w.loss * loss_term(m.loss) + w.hop_penalty_ms
    }

    /// Cost of a path with `hops` links and end-to-end metrics `m`.
    ///
    /// Equal to the sum of [`CostModel::link_cost`] over its links, because
    /// every term is additive.
    pub fn path_cost(&self, m: &Metrics, hops: usize) -> f64 {
        let w = &self.weights;
        m.rtt_ms
            + w.jitter * m.jitter_ms
            + w.loss * loss_term(m.loss)
            + w.hop_penalty_ms * hops as f64
    }

    /// True when `m` fails the quality bar.
    pub fn is_poor(&self, m: &Metrics) -> bool {
        self.poor.is_poor(m)
    }
}

fn loss_term(loss: f64) -> f64 {
    -(1.0 - loss.clamp(0.0, MAX_COSTED_LOSS)).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_composes_and_cost_is_additive() {
        let model = CostModel::default();
        let a = Metrics {
            rtt_ms: 40.0,
            jitter_ms: 2.0,
            loss: 0.01,
        };
        let b = Metrics {
            rtt_ms: 60.0,
            jitter_ms: 3.0,
            loss: 0.02,
        };
        let path = a.then(&b);
        assert!((path.loss - (1.0 - 0.99 * 0.98)).abs() < 1e-12);
        let sum = model.link_cost(&a) + model.link_cost(&b);
        assert!((model.path_cost(&path, 2) - sum).abs() < 1e-9);
    }

    #[test]
    fn via_thresholds() {
        let t = PoorThresholds::default();
        assert!(!t.is_poor(&Metrics::rtt(320.0)));
        assert!(t.is_poor(&Metrics::rtt(320.1)));
        assert!(t.is_poor(&Metrics {
            rtt_ms: 10.0,
            jitter_ms: 0.0,
            loss: 0.013
        }));
        assert!(t.is_poor(&Metrics {
            rtt_ms: 10.0,
            jitter_ms: 12.5,
            loss: 0.0
        }));
    }

    #[test]
    fn total_loss_has_finite_cost() {
        let c = CostModel::default().link_cost(&Metrics {
            rtt_ms: 1.0,
            jitter_ms: 0.0,
            loss: 1.0,
        });
        assert!(c.is_finite() && c > 10_000.0);
    }
}
