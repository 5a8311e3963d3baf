//! Where the engine's time goes, per op and per node, for one text of a
//! given number of tokens: the profile behind the engine's graph rewrites.
//!
//! ```text
//! cargo run --release -p inferd-engine --example engine_profile -- \
//!     --model-dir ~/.cache/inferd/models/all-MiniLM-L6-v2 --tokens 242 [--runs 50] [--top 15]
//! ```
//!
//! `--no-fusions` profiles the plan without the engine's load-time fusions
//! (`EngineConfig::fusions`), as tract alone optimizes it.
//!
//! The text is the most words of prose that make at most `--tokens` tokens
//! ([CLS] and [SEP] included; the first line says how many). Prints, per op kind, the total time per run, the node count and
//! the share; then the `--top` slowest nodes. Uses tract's per-node
//! evaluation hook ([`inferd_engine::Engine::profile`]), which adds a clock
//! read per node: compare the sum with `engine_latency` for the overhead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use inferd_engine::{Engine, EngineConfig};

fn usage() -> ! {
    eprintln!(
        "usage: engine_profile --model-dir DIR --tokens N [--runs N] [--top N] [--no-fusions]"
    );
    std::process::exit(2)
}

const PROSE: &str = "The supervisor keeps a small pool of worker processes, each of which \
    loads the embedding model once and then answers requests one at a time over a socket. \
    When a worker grows past its memory limit, the supervisor starts a replacement, waits \
    until it is ready and only then retires the old one, so that no request is lost. ";

fn main() {
    let mut model_dir: Option<PathBuf> = None;
    let mut tokens = 242usize;
    let mut runs = 50usize;
    let mut top = 15usize;
    let mut fusions = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--model-dir" => model_dir = Some(PathBuf::from(value())),
            "--tokens" => tokens = value().parse().unwrap_or_else(|_| usage()),
            "--runs" => runs = value().parse().unwrap_or_else(|_| usage()),
            "--top" => top = value().parse().unwrap_or_else(|_| usage()),
            "--no-fusions" => fusions = false,
            _ => usage(),
        }
    }
    let Some(model_dir) = model_dir else { usage() };
    let mut config = EngineConfig::for_model_dir(&model_dir);
    config.fusions = fusions;
    let engine = Engine::load(&config).unwrap_or_else(|err| {
        eprintln!("engine_profile: cannot load {}: {err}", model_dir.display());
        std::process::exit(1)
    });
    let text = text_of(&engine, tokens);
    // Warm up (allocations, caches) before measuring.
    engine
        .profile(std::slice::from_ref(&text), 3)
        .expect("warm-up run");
    let nodes = engine
        .profile(std::slice::from_ref(&text), runs)
        .unwrap_or_else(|err| {
            eprintln!("engine_profile: {err}");
            std::process::exit(1)
        });
    let per_run = |d: Duration| d.as_secs_f64() * 1e3 / runs as f64;
    let total: f64 = nodes.iter().map(|n| per_run(n.total)).sum();
    let mut by_op: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for node in &nodes {
        let entry = by_op.entry(&node.op).or_default();
        entry.0 += per_run(node.total);
        entry.1 += 1;
    }
    let mut by_op: Vec<_> = by_op.into_iter().collect();
    by_op.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    println!(
        "{} tokens, {}: {total:.2} ms per run over {} nodes ({runs} runs)",
        engine.tokenize(&text).map(|e| e.len()).unwrap_or(0),
        engine.model_name(),
        nodes.len()
    );
    println!("{:<28} {:>9} {:>6} {:>6}", "op", "ms/run", "nodes", "share");
    for (op, (ms, count)) in &by_op {
        println!("{op:<28} {ms:>9.3} {count:>6} {:>5.1}%", 100.0 * ms / total);
    }
    println!("\nslowest nodes:");
    for node in nodes.iter().take(top) {
        println!(
            "{:>9.3} ms  {:<20} {}  {}  [{}]",
            per_run(node.total),
            node.op,
            node.node,
            node.inputs,
            node.info
        );
    }
}

/// The most words of prose that make at most `tokens` tokens.
fn text_of(engine: &Engine, tokens: usize) -> String {
    let prose = PROSE.repeat(8);
    let words: Vec<&str> = prose.split_whitespace().collect();
    let mut best = String::new();
    for n in 1..=words.len() {
        let candidate = words[..n].join(" ");
        match engine.tokenize(&candidate) {
            Ok(e) if e.len() <= tokens && e.get_overflowing().is_empty() => best = candidate,
            _ => break,
        }
    }
    best
}
