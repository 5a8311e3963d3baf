//! `--kill-every`: SIGKILL one serving worker every so often during the load,
//! and what the pool's serving count did afterwards.
//!
//! The victim is the serving worker (ready or busy; never a spare, nor one
//! starting, draining or stopping) with the lowest id in the latest status
//! sample: the oldest, so the kills go round the pool rather than hitting
//! the newest replacement again. Just before the signal its parent is read
//! from /proc and must be the daemon, so a pid reused since the sample is
//! never signalled.
//!
//! The dips are computed from the samples afterwards, on `(seconds, serving)`
//! points (`serving` is `None` where status could not be read; such a point
//! changes nothing, the last known count carries on). Time below target
//! counts from the first sample that shows fewer serving workers than the
//! target until the first sample that shows the target again, so it has the
//! sampling interval's resolution; a dip no sample shows (a spare promoted
//! before the next sample) counts 0.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use crate::procfs::parent_pid;
use crate::scenario::WorkerSample;

/// How long after a kill the fewest serving workers are looked for.
pub(crate) const DIP_WINDOW_S: f64 = 5.0;

/// One scheduled kill.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Kill {
    /// Seconds since the load started, when the signal was sent (or not).
    pub(crate) t_s: f64,
    /// The worker signalled; `None` if none was.
    pub(crate) worker_id: Option<u64>,
    pub(crate) pid: Option<u32>,
    /// Why no signal was sent, if none was.
    pub(crate) skipped: Option<String>,
}

/// The serving worker to kill from one sample's workers: the oldest.
pub(crate) fn pick_victim(workers: &[WorkerSample]) -> Option<&WorkerSample> {
    workers
        .iter()
        .filter(|w| w.state.is_serving())
        .min_by_key(|w| w.id)
}

/// SIGKILLs the victim picked from `workers`, if it is still the daemon's
/// child.
pub(crate) fn kill_one(t_s: f64, workers: &[WorkerSample], daemon_pid: u32) -> Kill {
    let skipped = |worker: Option<&WorkerSample>, why: String| Kill {
        t_s,
        worker_id: worker.map(|w| w.id),
        pid: worker.map(|w| w.pid),
        skipped: Some(why),
    };
    let Some(victim) = pick_victim(workers) else {
        return skipped(None, "no serving worker in the latest sample".to_owned());
    };
    match parent_pid(victim.pid) {
        Some(parent) if parent == daemon_pid => {}
        Some(parent) => {
            return skipped(
                Some(victim),
                format!("pid {} now has parent {parent}, not the daemon", victim.pid),
            )
        }
        None => return skipped(Some(victim), format!("pid {} is gone", victim.pid)),
    }
    let Ok(raw) = i32::try_from(victim.pid) else {
        return skipped(Some(victim), format!("pid {} out of range", victim.pid));
    };
    match kill(Pid::from_raw(raw), Signal::SIGKILL) {
        Ok(()) => Kill {
            t_s,
            worker_id: Some(victim.id),
            pid: Some(victim.pid),
            skipped: None,
        },
        Err(err) => skipped(Some(victim), format!("kill failed: {err}")),
    }
}

/// What the serving count did after one kill.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct Dip {
    /// Fewest serving workers in the samples from the kill until
    /// [`DIP_WINDOW_S`] after it.
    pub(crate) min_serving: Option<usize>,
    /// How long the count stayed below target after the kill, ms (0 if no
    /// sample in the window showed it below).
    pub(crate) below_target_ms: f64,
    /// False if it was still below target at the last sample.
    pub(crate) recovered: bool,
}

/// The dip after a kill at `t_kill`, from `(seconds, serving)` points in
/// time order.
pub(crate) fn dip_after(points: &[(f64, Option<usize>)], t_kill: f64, target: usize) -> Dip {
    let in_window = |t: f64| t >= t_kill && t <= t_kill + DIP_WINDOW_S;
    let min_serving = points
        .iter()
        .filter(|(t, _)| in_window(*t))
        .filter_map(|(_, n)| *n)
        .min();
    let first_below = points
        .iter()
        .position(|(t, n)| in_window(*t) && n.is_some_and(|n| n < target));
    let Some(first_below) = first_below else {
        return Dip {
            min_serving,
            below_target_ms: 0.0,
            recovered: true,
        };
    };
    let from = points[first_below].0;
    let recovery = points[first_below..]
        .iter()
        .find(|(_, n)| n.is_some_and(|n| n >= target));
    let (until, recovered) = match recovery {
        Some((t, _)) => (*t, true),
        None => (points.last().map_or(from, |(t, _)| *t), false),
    };
    Dip {
        min_serving,
        below_target_ms: (until - from) * 1e3,
        recovered,
    }
}

/// Seconds the serving count was below `target` over all `points`: each
/// point's count holds until the next point.
pub(crate) fn time_below(points: &[(f64, Option<usize>)], target: usize) -> f64 {
    let mut known = None;
    let mut total = 0.0;
    for pair in points.windows(2) {
        known = pair[0].1.or(known);
        if known.is_some_and(|n| n < target) {
            total += pair[1].0 - pair[0].0;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use inferd_client::WorkerStateKind;

    fn worker(id: u64, state: WorkerStateKind) -> WorkerSample {
        WorkerSample {
            id,
            pid: 1000 + id as u32,
            state,
            rss_bytes: None,
            growth_bytes_per_sec: None,
        }
    }

    #[test]
    fn victim_is_the_oldest_serving_worker_never_a_spare() {
        use WorkerStateKind::*;
        let workers = [
            worker(3, Busy),
            worker(1, Spare),
            worker(2, Starting),
            worker(4, Ready),
        ];
        assert_eq!(pick_victim(&workers).map(|w| w.id), Some(3));
        assert!(pick_victim(&[worker(1, Spare), worker(2, Draining)]).is_none());
        let kill = kill_one(1.5, &[worker(1, Spare)], 1);
        assert_eq!(kill.pid, None);
        assert!(kill.skipped.is_some());
    }

    /// Samples every 10 ms; target 2.
    fn points(serving: &[Option<usize>]) -> Vec<(f64, Option<usize>)> {
        serving
            .iter()
            .enumerate()
            .map(|(i, n)| (i as f64 * 0.01, *n))
            .collect()
    }

    #[test]
    fn dip_counts_from_the_first_sample_below_to_the_first_back() {
        let p = points(&[
            Some(2),
            Some(2),
            Some(2), // kill at 0.025
            Some(2), // the death not yet noticed
            Some(1), // 0.04
            None,    // a failed status read changes nothing
            Some(1),
            Some(2), // 0.07: back
            Some(2),
        ]);
        let dip = dip_after(&p, 0.025, 2);
        assert_eq!(dip.min_serving, Some(1));
        assert!((dip.below_target_ms - 30.0).abs() < 1e-6, "{dip:?}");
        assert!(dip.recovered);
        assert!((time_below(&p, 2) - 0.03).abs() < 1e-9);
    }

    #[test]
    fn dip_is_zero_when_no_sample_shows_it_and_open_when_never_recovered() {
        let steady = points(&[Some(2); 10]);
        assert_eq!(
            dip_after(&steady, 0.02, 2),
            Dip {
                min_serving: Some(2),
                below_target_ms: 0.0,
                recovered: true
            }
        );
        assert_eq!(time_below(&steady, 2), 0.0);
        // A dip before the kill is not the kill's.
        let earlier = points(&[Some(1), Some(2), Some(2), Some(2)]);
        assert_eq!(dip_after(&earlier, 0.015, 2).below_target_ms, 0.0);
        let open = points(&[Some(2), Some(0), Some(1), Some(1)]);
        let dip = dip_after(&open, 0.0, 2);
        assert_eq!(dip.min_serving, Some(0));
        assert!((dip.below_target_ms - 20.0).abs() < 1e-6, "{dip:?}");
        assert!(!dip.recovered);
        // The window ends 5 s after the kill: a later dip is not this kill's.
        let late = vec![(0.0, Some(2)), (6.0, Some(1)), (6.5, Some(2))];
        assert_eq!(dip_after(&late, 0.0, 2).below_target_ms, 0.0);
        assert!((time_below(&late, 2) - 0.5).abs() < 1e-9);
    }
}
