//! The raw data as CSV: `samples.csv` (one row per worker per sample) and
//! `failures.csv` (one row per failure).

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
        "t_s,worker_id,pid,rss_mib,ready_workers,supervisor_rss_mib,supervisor_cpu_s,state"
    )?;
    for sample in samples {
        let shared = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            write!(
                out,
                "{},{},{}",
                sample.serving.map(|n| n.to_string()).unwrap_or_default(),
                sample
                    .supervisor_rss
                    .map(|b| format!("{:.2}", b as f64 / MIB))
                    .unwrap_or_default(),
                sample
                    .supervisor_cpu_s
                    .map(|s| format!("{s:.3}"))
                    .unwrap_or_default(),
            )
        };
        if sample.workers.is_empty() {
            write!(out, "{:.3},,,,", sample.t_s)?;
            shared(&mut out)?;
            writeln!(out, ",")?;
        }
        for worker in &sample.workers {
            write!(
                out,
                "{:.3},{},{},{},",
                sample.t_s,
                worker.id,
                worker.pid,
                worker
                    .rss_bytes
                    .map(|b| format!("{:.2}", b as f64 / MIB))
                    .unwrap_or_default()
            )?;
            shared(&mut out)?;
            writeln!(out, ",{}", csv_field(worker.state.as_str()))?;
        }
    }
    out.flush()
        .with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn write_failures_csv(path: &Path, failures: &[Failure]) -> Result<()> {
    let mut out =
        BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    writeln!(out, "t_s,client,kind,error")?;
    for f in failures {
        writeln!(
            out,
            "{:.3},{},{},{}",
            f.t_s,
            f.client,
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
