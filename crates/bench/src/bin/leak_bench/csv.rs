//! The raw data as CSV: `samples.csv` (one row per worker per sample) and
//! `failures.csv` (one row per failure).
//!
//! In `samples.csv`, `ready_workers` counts the serving workers (ready or
//! busy) and `spare_workers` those held in reserve; `rss_mib`, `state` and
//! `growth_kib_per_s` come from the daemon's status. The `supervisor_*`
//! columns are read from /proc at every sample, whatever `--interval-ms`:
//! that is two small files of one process (well under a millisecond), the
//! workers' own memory being in the status. `sample_ms` is how long the
//! sample's reads took, so a slow sample shows.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::Path;

use anyhow::{Context, Result};

use crate::load::Failure;
use crate::scenario::Sample;
use crate::MIB;

pub(crate) fn write_samples_csv(path: &Path, samples: &[Sample]) -> Result<()> {
    let mut out =
        BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(
        out,
        "t_s,worker_id,pid,rss_mib,ready_workers,supervisor_rss_mib,supervisor_cpu_s,state,spare_workers,growth_kib_per_s,sample_ms"
    )?;
    let number = |value: Option<f64>, decimals: usize| {
        value.map_or(String::new(), |v| format!("{v:.decimals$}"))
    };
    for sample in samples {
        // The columns every row of a sample shares, after the worker's
        // columns; `state` and `growth` are the worker's.
        let row = |state: &str, growth: Option<f64>| {
            format!(
                "{},{},{},{},{},{},{:.2}",
                sample.serving.map(|n| n.to_string()).unwrap_or_default(),
                number(sample.supervisor_rss.map(|b| b as f64 / MIB), 2),
                number(sample.supervisor_cpu_s, 3),
                csv_field(state),
                sample.spares.map(|n| n.to_string()).unwrap_or_default(),
                number(growth.map(|g| g / 1024.0), 1),
                sample.read_ms,
            )
        };
        if sample.workers.is_empty() {
            writeln!(out, "{:.3},,,,{}", sample.t_s, row("", None))?;
        }
        for worker in &sample.workers {
            writeln!(
                out,
                "{:.3},{},{},{},{}",
                sample.t_s,
                worker.id,
                worker.pid,
                number(worker.rss_bytes.map(|b| b as f64 / MIB), 2),
                row(worker.state.as_str(), worker.growth_bytes_per_sec)
            )?;
        }
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn write_failures_csv(path: &Path, failures: &[Failure]) -> Result<()> {
    let mut out =
        BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(out, "t_s,client,request,kind,error")?;
    for f in failures {
        writeln!(
            out,
            "{:.3},{},{},{},{}",
            f.t_s,
            f.client,
            f.request.map_or("", |r| r.as_str()),
            csv_field(&f.kind),
            csv_field(&f.error)
        )?;
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

/// A CSV field, quoted when it holds a comma, quote or line break.
pub(crate) fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_owned()
    }
}
