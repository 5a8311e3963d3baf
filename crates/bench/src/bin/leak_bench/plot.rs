//! `rss.svg`: worker RSS over time against the limits the daemon applied (as
//! its last status gave them), with the supervisor's RSS in a lower panel.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;

use crate::scenario::{DaemonSettings, Sample};
use crate::MIB;

/// Distinguishable line colours for workers (matplotlib's tab10 without its
/// orange and red, which mark the limits), cycled by worker id.
const WORKER_COLORS: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (44, 160, 44),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// `rss.svg`: worker RSS over time (one line per worker id) with the limits,
/// and the supervisor's RSS in a lower panel.
pub(crate) fn plot(
    path: &Path,
    samples: &[Sample],
    settings: Option<&DaemonSettings>,
    titles: [&str; 2],
) -> Result<()> {
    use plotters::prelude::*;

    let mut workers: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for sample in samples {
        for worker in &sample.workers {
            if let Some(rss) = worker.rss_bytes {
                workers
                    .entry(worker.id)
                    .or_default()
                    .push((sample.t_s, rss as f64 / MIB));
            }
        }
    }
    let supervisor: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.t_s, s.supervisor_rss? as f64 / MIB)))
        .collect();
    let x_max = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let highest =
        |points: &mut dyn Iterator<Item = &(f64, f64)>| points.map(|(_, y)| *y).fold(0.0, f64::max);
    let worker_max = highest(&mut workers.values().flatten());
    let limits: Vec<(&str, f64, RGBColor)> = [
        (
            "soft limit",
            settings.and_then(|s| s.soft_limit_bytes),
            RGBColor(230, 140, 0),
        ),
        ("hard limit", settings.and_then(|s| s.hard_limit_bytes), RED),
    ]
    .into_iter()
    .filter_map(|(name, bytes, color)| Some((name, bytes? as f64 / MIB, color)))
    .collect();
    let limit_max = limits.iter().map(|(_, mib, _)| *mib).fold(0.0, f64::max);
    // Head room above the highest line for the legend box.
    let y_max = (limit_max.max(worker_max) * 1.3).max(1.0);
    let sup_max = (highest(&mut supervisor.iter()) * 1.25).max(1.0);
    let whole = |v: &f64| format!("{v:.0}");

    let root = SVGBackend::new(path, (1100, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(540);

    let mut chart = ChartBuilder::on(&upper)
        .caption(titles[0], ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("worker RSS (MiB)")
        .x_label_formatter(&whole)
        .y_label_formatter(&whole)
        .draw()?;
    let worker_color = |i: usize| {
        let (r, g, b) = WORKER_COLORS[i % WORKER_COLORS.len()];
        RGBColor(r, g, b)
    };
    for (i, points) in workers.values().enumerate() {
        let style = worker_color(i).stroke_width(2);
        let series = chart.draw_series(LineSeries::new(points.iter().copied(), style))?;
        if i == 0 {
            series
                .label(format!(
                    "worker RSS, one line per worker id ({} ids)",
                    workers.len()
                ))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
    }
    // A limit the daemon does not apply (off, or not derived yet) has no line.
    for (name, mib, color) in limits {
        let style = color.stroke_width(2);
        chart
            .draw_series(DashedLineSeries::new(
                vec![(0.0, mib), (x_max, mib)],
                8,
                5,
                style,
            ))?
            .label(format!("{name} {mib:.0} MiB"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let mut chart = ChartBuilder::on(&lower)
        .caption(titles[1], ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..x_max, 0.0..sup_max)?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("supervisor RSS (MiB)")
        .x_label_formatter(&whole)
        .y_labels(5)
        .draw()?;
    chart.draw_series(LineSeries::new(supervisor, BLUE.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
