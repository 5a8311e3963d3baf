//! Engine latency with the int8 embedding-table rewrite on and off.
//!
//! ```text
//! scripts/fetch-model
//! cargo run --release -p inferd-engine --example engine_bench -- [--iters N] [--model-dir DIR] [--rewrite on|off|both]
//! ```
//!
//! For each setting it loads the int8 all-MiniLM-L6-v2 in a fresh child
//! process (so the RSS after load is that setting's alone), then times
//! `Engine::embed` (tokenize + run + pool, single thread) on an 8-token
//! sentence and on a ~128-token text, and prints median and p99 latency.
//! Results go to docs/BENCHMARKS.md by hand.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use inferd_engine::{Engine, EngineConfig};

const SHORT: &str = "A man is eating food.";
const LONG: &str = "The supervisor keeps a small pool of worker processes, each of which loads \
    the embedding model once and then answers requests one at a time over a socket. When a worker \
    grows past its memory limit, the supervisor starts a replacement, waits until it is ready, \
    stops sending work to the old one, and lets it finish the request it holds before asking it \
    to exit. If the kernel kills a worker because the machine ran out of memory, the request it \
    was holding is sent to another worker once, and a request that kills two workers is answered \
    with an error instead of being retried forever, so that one input never takes the pool down.";

struct Args {
    iters: usize,
    model_dir: PathBuf,
    rewrite: String,
}

fn usage() -> ! {
    eprintln!("usage: engine_bench [--iters N] [--model-dir DIR] [--rewrite on|off|both]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let default_dir = match std::env::var_os("INFERD_MODEL_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/inferd/models")
        }
    };
    let mut args = Args {
        iters: 200,
        model_dir: default_dir.join("all-MiniLM-L6-v2"),
        rewrite: "both".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--iters" => args.iters = value().parse().unwrap_or_else(|_| usage()),
            "--model-dir" => args.model_dir = PathBuf::from(value()),
            "--rewrite" => args.rewrite = value(),
            _ => usage(),
        }
    }
    args
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kb / 1024.0
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let ix = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[ix].as_secs_f64() * 1e3
}

/// Times `iters` calls (after a few warm-up calls); returns (median, p99) in ms.
fn time(engine: &Engine, text: &str, iters: usize) -> (f64, f64) {
    let batch = [text.to_owned()];
    for _ in 0..5 {
        engine.embed(&batch).expect("embed");
    }
    let mut samples: Vec<Duration> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(engine.embed(&batch).expect("embed"));
            t.elapsed()
        })
        .collect();
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

fn run_one(args: &Args, rewrite: bool) {
    let mut config = EngineConfig::for_model_dir(&args.model_dir);
    config.gather_before_dequantize = rewrite;
    let started = Instant::now();
    let engine = Engine::load(&config).unwrap_or_else(|e| {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!(
            "loading {}: {msg} (run scripts/fetch-model?)",
            args.model_dir.display()
        );
        std::process::exit(1)
    });
    let load_s = started.elapsed().as_secs_f64();
    let rss = rss_mb();
    let short_tokens = engine
        .embed(&[SHORT.to_owned()])
        .expect("embed")
        .token_counts[0];
    let long_tokens = engine
        .embed(&[LONG.to_owned()])
        .expect("embed")
        .token_counts[0];
    let (short_med, short_p99) = time(&engine, SHORT, args.iters);
    let (long_med, long_p99) = time(&engine, LONG, args.iters.div_ceil(4).max(20));
    println!(
        "| {} | {:.2} s | {:.0} MB | {:.0} MB | {} tok: {:.2} / {:.2} ms | {} tok: {:.2} / {:.2} ms |",
        if rewrite { "on" } else { "off" },
        load_s,
        rss,
        rss_mb(),
        short_tokens,
        short_med,
        short_p99,
        long_tokens,
        long_med,
        long_p99
    );
}

fn main() {
    let args = parse_args();
    match args.rewrite.as_str() {
        "on" => run_one(&args, true),
        "off" => run_one(&args, false),
        "both" => {
            println!(
                "model: {} ({} iterations short, 1 thread)",
                args.model_dir.display(),
                args.iters
            );
            println!(
                "| gather_before_dequantize | load | RSS after load | RSS after runs | short: median / p99 | long: median / p99 |"
            );
            println!("|---|---|---|---|---|---|");
            let exe = std::env::current_exe().expect("current exe");
            for setting in ["on", "off"] {
                // A child per setting: RSS after load must not include the
                // other engine's pages.
                let status = Command::new(&exe)
                    .args([
                        "--iters",
                        &args.iters.to_string(),
                        "--rewrite",
                        setting,
                        "--model-dir",
                    ])
                    .arg(&args.model_dir)
                    .status()
                    .expect("spawning the benchmark child");
                if !status.success() {
                    std::process::exit(1);
                }
            }
        }
        _ => usage(),
    }
}
