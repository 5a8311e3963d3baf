//! Percentiles and the per-target / per-round summaries.

use std::time::Duration;

use serde::Serialize;

/// The `p` quantile (0..=1) of `values`, interpolated linearly between the
/// closest ranks (numpy's default); `NaN` when empty.
pub fn quantile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (sorted.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

/// The median of `values`.
pub fn median(values: &[f64]) -> f64 {
    quantile(values, 0.5)
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What one target did in one round (one phase).
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Latencies of the answered requests, ms.
    pub latencies_ms: Vec<f64>,
    /// Answers that count for throughput: all of them in a phase of a
    /// number of requests. In a timed phase, a request still in flight at
    /// the deadline is answered and its latency kept, but counts only for
    /// the part of its time before the deadline (so neither the closed
    /// loop's ramp-down after the deadline nor the work cut off by it biases
    /// the rate, whatever the request's length).
    pub answers: f64,
    /// The time `answers` took: from the phase's start to its last answer,
    /// or to its deadline.
    pub wall: Duration,
}

impl Round {
    /// Answered requests per second in this round.
    pub fn throughput(&self) -> f64 {
        self.answers / self.wall.as_secs_f64()
    }
}

/// Latency and throughput of one target over the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Answered requests.
    pub requests: usize,
    /// Sum of the phases' wall times, s.
    pub wall_s: f64,
    /// Requests per second (the rounds' answers / wall; see [`Round`]).
    pub requests_per_s: f64,
    /// Texts per second (requests per second × batch).
    pub texts_per_s: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
}

impl Summary {
    /// Summarises `rounds` of requests carrying `batch` texts each.
    pub fn of(rounds: &[Round], batch: usize) -> Summary {
        let all: Vec<f64> = rounds
            .iter()
            .flat_map(|r| r.latencies_ms.iter().copied())
            .collect();
        let wall: Duration = rounds.iter().map(|r| r.wall).sum();
        let answers: f64 = rounds.iter().map(|r| r.answers).sum();
        let requests_per_s = answers / wall.as_secs_f64();
        Summary {
            requests: all.len(),
            wall_s: wall.as_secs_f64(),
            requests_per_s,
            texts_per_s: requests_per_s * batch as f64,
            p50_ms: median(&all),
            p90_ms: quantile(&all, 0.9),
            p99_ms: quantile(&all, 0.99),
            mean_ms: all.iter().sum::<f64>() / all.len() as f64,
            max_ms: all.iter().copied().fold(f64::NAN, f64::max),
        }
    }
}

/// A target against the baseline (the first target), over the same rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Versus {
    /// p50 / baseline p50.
    pub p50_ratio: f64,
    /// p50 − baseline p50, ms.
    pub p50_diff_ms: f64,
    /// Median over rounds of (this round's p50 − the baseline's p50 in the
    /// same round), ms: with one request per round, the median of paired
    /// differences, which cancels the machine's drift.
    pub p50_diff_paired_ms: f64,
    /// Requests per second / baseline requests per second.
    pub throughput_ratio: f64,
    /// Median over rounds of the per-round throughput ratio.
    pub throughput_ratio_median_of_rounds: f64,
}

impl Versus {
    /// Compares `rounds` with `base` (same number of rounds, in order).
    pub fn of(rounds: &[Round], base: &[Round], batch: usize) -> Versus {
        let this = Summary::of(rounds, batch);
        let that = Summary::of(base, batch);
        let paired: Vec<f64> = rounds
            .iter()
            .zip(base)
            .filter(|(a, b)| !a.latencies_ms.is_empty() && !b.latencies_ms.is_empty())
            .map(|(a, b)| median(&a.latencies_ms) - median(&b.latencies_ms))
            .collect();
        let ratios: Vec<f64> = rounds
            .iter()
            .zip(base)
            .filter(|(a, b)| !a.latencies_ms.is_empty() && !b.latencies_ms.is_empty())
            .map(|(a, b)| a.throughput() / b.throughput())
            .collect();
        Versus {
            p50_ratio: this.p50_ms / that.p50_ms,
            p50_diff_ms: this.p50_ms - that.p50_ms,
            p50_diff_paired_ms: median(&paired),
            throughput_ratio: this.requests_per_s / that.requests_per_s,
            throughput_ratio_median_of_rounds: median(&ratios),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.9), 4.6);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn paired_differences_cancel_drift() {
        // The machine slows down by 10 ms between rounds; the target is
        // always 0.2 ms slower than the baseline in the same round.
        let round = |base: f64| Round {
            latencies_ms: vec![base],
            answers: 1.0,
            wall: Duration::from_millis(base as u64),
        };
        let base: Vec<Round> = (0..5).map(|i| round(5.0 + 10.0 * i as f64)).collect();
        let this: Vec<Round> = (0..5)
            .map(|i| round(5.2 + 10.0 * i as f64 + if i == 0 { 30.0 } else { 0.0 }))
            .collect();
        let versus = Versus::of(&this, &base, 1);
        assert!((versus.p50_diff_paired_ms - 0.2).abs() < 1e-9);
        assert!(versus.p50_diff_ms > 0.2);
    }

    #[test]
    fn summary_counts_texts() {
        let rounds = vec![Round {
            latencies_ms: vec![10.0; 10],
            answers: 10.0,
            wall: Duration::from_millis(100),
        }];
        let s = Summary::of(&rounds, 32);
        assert_eq!(s.requests, 10);
        assert!((s.requests_per_s - 100.0).abs() < 1e-9);
        assert!((s.texts_per_s - 3200.0).abs() < 1e-9);
    }
}
