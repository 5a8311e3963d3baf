//! `Engine::embed` latency, one text at a time, for texts given in a file:
//! the inferd side of `bench/engine-vs-onnxruntime`.
//!
//! ```text
//! cargo run --release -p inferd-engine --example engine_latency -- \
//!     --model-dir ~/.cache/inferd/models/all-MiniLM-L6-v2 --texts texts.json --iters 200
//! ```
//!
//! `texts.json` is a JSON array of `{"name": ..., "text": ...}`. For each
//! text (in the order given, after `--warmup` untimed calls) it times
//! `--iters` calls of `Engine::embed` on that one text (tokenize, run,
//! mean-pool, normalise; one thread) and prints one JSON line:
//! `{"name", "tokens", "samples_ms": [...]}`. The caller computes the
//! statistics, so both sides of the comparison are summarised the same way.
//! `--no-fusions` loads the engine without its load-time fusions
//! (`EngineConfig::fusions`): the engine as it was before them.

use std::path::PathBuf;
use std::time::Instant;

use inferd_engine::{Engine, EngineConfig};

fn usage() -> ! {
    eprintln!(
        "usage: engine_latency --model-dir DIR --texts FILE [--iters N] [--warmup N] [--no-fusions]"
    );
    std::process::exit(2)
}

fn main() {
    let mut model_dir: Option<PathBuf> = None;
    let mut texts_file: Option<PathBuf> = None;
    let mut iters = 200usize;
    let mut warmup = 10usize;
    let mut fusions = true;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--model-dir" => model_dir = Some(PathBuf::from(value())),
            "--texts" => texts_file = Some(PathBuf::from(value())),
            "--iters" => iters = value().parse().unwrap_or_else(|_| usage()),
            "--warmup" => warmup = value().parse().unwrap_or_else(|_| usage()),
            "--no-fusions" => fusions = false,
            _ => usage(),
        }
    }
    let (Some(model_dir), Some(texts_file)) = (model_dir, texts_file) else {
        usage()
    };
    let texts: Vec<serde_json::Value> = std::fs::read_to_string(&texts_file)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| {
            eprintln!(
                "engine_latency: {} is not a JSON array",
                texts_file.display()
            );
            std::process::exit(2)
        });
    let mut config = EngineConfig::for_model_dir(&model_dir);
    config.fusions = fusions;
    let engine = Engine::load(&config).unwrap_or_else(|err| {
        eprintln!("engine_latency: cannot load {}: {err}", model_dir.display());
        std::process::exit(1)
    });
    for entry in texts {
        let name = entry["name"].as_str().unwrap_or("?").to_owned();
        let text = vec![entry["text"].as_str().unwrap_or_default().to_owned()];
        let mut tokens = 0;
        for _ in 0..warmup {
            tokens = embed(&engine, &text).token_counts[0];
        }
        let samples_ms: Vec<f64> = (0..iters)
            .map(|_| {
                let started = Instant::now();
                tokens = embed(&engine, &text).token_counts[0];
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({"name": name, "tokens": tokens, "samples_ms": samples_ms})
        );
    }
}

fn embed(engine: &Engine, text: &[String]) -> inferd_engine::Embeddings {
    engine.embed(text).unwrap_or_else(|err| {
        eprintln!("engine_latency: embed failed: {err}");
        std::process::exit(1)
    })
}
