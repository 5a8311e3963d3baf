//! How fast a worker's memory grows: a short history of its readings and a
//! growth rate that a real leak shows and a busy worker does not.
//!
//! Readings arrive after every answer and on the memory timer. A reading
//! taken while a large request runs shows that request's activations, not
//! a leak, so the rate looks only at *sustained* growth: the readings of the
//! last [`WINDOW`] are kept in [`BUCKET`]-wide buckets (lowest and highest
//! reading of each), the window is cut in thirds, and the rate is how far
//! the lowest reading of the last third lies above the highest reading of
//! the first, over the time between them. A leak raises every reading, so
//! its rate comes out whole; a peak in the first third raises the bar the
//! last third must clear, and a peak in the last third does not lower its
//! minimum. Until the readings span [`MIN_SPAN`] there is no rate; a worker
//! already above its soft limit is judged on [`SHORT_SPAN`], so a leak fast
//! enough to cross the hard limit within a few seconds is still caught (the
//! peak of a large request stays far below the soft limit).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Readings within this much time share one bucket.
const BUCKET: Duration = Duration::from_millis(250);
/// How far back the rate looks.
const WINDOW: Duration = Duration::from_secs(12);
/// No rate before the readings span this long.
pub const MIN_SPAN: Duration = Duration::from_secs(3);
/// The span a worker above its soft limit is judged on.
pub const SHORT_SPAN: Duration = Duration::from_secs(1);

/// The lowest and highest reading within one bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Time of its first reading.
    start: Instant,
    low: u64,
    high: u64,
}

/// One worker's recent memory readings.
#[derive(Debug, Default)]
pub struct MemoryHistory {
    buckets: VecDeque<Bucket>,
}

impl MemoryHistory {
    /// Adds a reading taken at `now`.
    pub fn record(&mut self, now: Instant, bytes: u64) {
        match self.buckets.back_mut() {
            Some(last) if now.duration_since(last.start) < BUCKET => {
                last.low = last.low.min(bytes);
                last.high = last.high.max(bytes);
            }
            _ => self.buckets.push_back(Bucket {
                start: now,
                low: bytes,
                high: bytes,
            }),
        }
        while self
            .buckets
            .front()
            .is_some_and(|first| now.duration_since(first.start) > WINDOW)
        {
            self.buckets.pop_front();
        }
    }

    /// Sustained growth in bytes per second (0 when the readings do not
    /// rise as a whole); `None` until they span [`MIN_SPAN`].
    pub fn growth_per_sec(&self) -> Option<f64> {
        self.growth_over(MIN_SPAN)
    }

    /// [`MemoryHistory::growth_per_sec`], once the readings span `min_span`.
    pub fn growth_over(&self, min_span: Duration) -> Option<f64> {
        let first = self.buckets.front()?.start;
        let last = self.buckets.back()?.start;
        let span = last.duration_since(first);
        if span < min_span {
            return None;
        }
        let early_end = first + span / 3;
        let late_start = last - span / 3;
        let early_high = self
            .buckets
            .iter()
            .take_while(|b| b.start <= early_end)
            .map(|b| b.high)
            .max()?;
        let late_low = self
            .buckets
            .iter()
            .skip_while(|b| b.start < late_start)
            .map(|b| b.low)
            .min()?;
        let rise = late_low.saturating_sub(early_high) as f64;
        Some(rise / late_start.duration_since(early_end).as_secs_f64())
    }
}

/// Whether memory at `bytes`, growing at `growth` bytes/s, reaches `hard`
/// within `horizon` (the time a replacement needs to be Ready, plus a
/// margin).
pub fn reaches_within(bytes: u64, growth: f64, hard: u64, horizon: Duration) -> bool {
    growth > 0.0 && bytes as f64 + growth * horizon.as_secs_f64() >= hard as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Feeds `reading(t)` every `step` for `duration`; returns the rate.
    fn rate_of(
        step: Duration,
        duration: Duration,
        reading: impl Fn(Duration) -> u64,
    ) -> Option<f64> {
        let start = Instant::now();
        let mut history = MemoryHistory::default();
        let mut t = Duration::ZERO;
        while t <= duration {
            history.record(start + t, reading(t));
            t += step;
        }
        history.growth_per_sec()
    }

    #[test]
    fn a_steady_leak_shows_its_rate() {
        // 64 MiB/s, read every 10 ms.
        let rate = rate_of(Duration::from_millis(10), Duration::from_secs(6), |t| {
            100 * MIB + (t.as_secs_f64() * 64.0 * MIB as f64) as u64
        })
        .expect("6 s of readings");
        let mib_per_s = rate / MIB as f64;
        assert!((55.0..=70.0).contains(&mib_per_s), "{mib_per_s} MiB/s");
    }

    #[test]
    fn no_rate_before_three_seconds_unless_asked_for_a_short_span() {
        let start = Instant::now();
        let mut history = MemoryHistory::default();
        // 300 MiB/s for 1.2 s.
        for ms in (0..=1200u64).step_by(10) {
            history.record(
                start + Duration::from_millis(ms),
                100 * MIB + ms * 300 * MIB / 1000,
            );
        }
        assert_eq!(history.growth_per_sec(), None);
        let rate = history.growth_over(SHORT_SPAN).expect("1.2 s of readings") / MIB as f64;
        assert!((200.0..=330.0).contains(&rate), "{rate} MiB/s");
    }

    #[test]
    fn peaks_of_large_requests_are_not_growth() {
        // Baseline 100 MiB; every third second a reading at a 240 MiB peak,
        // and the last 2 s only peaks (a run of large requests).
        let rate = rate_of(Duration::from_millis(100), Duration::from_secs(10), |t| {
            let s = t.as_secs_f64();
            if s > 8.0 || ((s as u64).is_multiple_of(3) && s.fract() < 0.2) {
                240 * MIB
            } else {
                100 * MIB
            }
        })
        .expect("10 s of readings");
        // The first third has a peak: the last third must rise above it.
        assert_eq!(rate, 0.0);
    }

    #[test]
    fn old_readings_leave_the_window() {
        let start = Instant::now();
        let mut history = MemoryHistory::default();
        // A fast rise long ago, flat since.
        for i in 0..40u64 {
            history.record(
                start + Duration::from_millis(100 * i),
                100 * MIB + i * 10 * MIB,
            );
        }
        for i in 0..200u64 {
            history.record(
                start + Duration::from_secs(4) + Duration::from_millis(100 * i),
                500 * MIB,
            );
        }
        assert_eq!(history.growth_per_sec(), Some(0.0));
        assert!(
            history.buckets.len() <= 49,
            "{} buckets",
            history.buckets.len()
        );
    }

    #[test]
    fn projection_against_the_hard_limit() {
        let horizon = Duration::from_secs(2);
        let rate = 50.0 * MIB as f64;
        assert!(reaches_within(520 * MIB, rate, 612 * MIB, horizon));
        assert!(!reaches_within(500 * MIB, rate, 612 * MIB, horizon));
        assert!(!reaches_within(600 * MIB, 0.0, 612 * MIB, horizon));
    }
}
