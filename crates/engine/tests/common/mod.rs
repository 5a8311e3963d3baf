//! Shared helpers for the engine's integration tests: where the models are,
//! the reference fixture, and RSS.
//!
//! The models are not in the repository: `scripts/fetch-model` installs them
//! (CI runs it before the tests). A missing model fails the test with that
//! instruction instead of skipping it, so a misconfigured CI cannot pass
//! without running the model.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use inferd_engine::{Engine, EngineConfig};

/// The default model: int8 all-MiniLM-L6-v2.
pub const INT8_MODEL: &str = "all-MiniLM-L6-v2";
/// The fp32 model without token_type_ids and with several outputs.
pub const L3_MODEL: &str = "paraphrase-MiniLM-L3-v2";

/// `$INFERD_MODEL_DIR`, else `$HOME/.cache/inferd/models` (as scripts/fetch-model).
pub fn model_root() -> PathBuf {
    match std::env::var_os("INFERD_MODEL_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let home = std::env::var_os("HOME").expect("HOME is not set; set INFERD_MODEL_DIR");
            Path::new(&home).join(".cache/inferd/models")
        }
    }
}

/// The config for one installed model; panics with instructions if missing.
pub fn config(model: &str) -> EngineConfig {
    let config = EngineConfig::for_model_dir(model_root().join(model));
    for file in [&config.model_path, &config.tokenizer_path] {
        assert!(
            file.is_file(),
            "model file {} is missing: run scripts/fetch-model first \
             (it installs the pinned models into $INFERD_MODEL_DIR or ~/.cache/inferd/models)",
            file.display()
        );
    }
    config
}

pub fn load(model: &str) -> Engine {
    Engine::load(&config(model)).unwrap_or_else(|e| panic!("loading {model}: {}", chain(&e)))
}

/// An error and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// One model's reference results from tests/fixtures/reference_embeddings.json.
pub struct Reference {
    pub texts: Vec<String>,
    pub token_counts: Vec<usize>,
    pub truncated: Vec<bool>,
    pub vectors: Vec<Vec<f32>>,
}

pub fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/reference_embeddings.json")
}

pub fn reference(model: &str) -> Reference {
    let path = fixture_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let entry = json["models"]
        .as_array()
        .expect("models array")
        .iter()
        .find(|m| m["name"] == model)
        .unwrap_or_else(|| panic!("model {model} not in the fixture"));
    let mut r = Reference {
        texts: vec![],
        token_counts: vec![],
        truncated: vec![],
        vectors: vec![],
    };
    for e in entry["embeddings"].as_array().expect("embeddings array") {
        r.texts.push(e["text"].as_str().expect("text").to_owned());
        r.token_counts
            .push(e["token_count"].as_u64().expect("token_count") as usize);
        r.truncated
            .push(e["truncated"].as_bool().expect("truncated"));
        r.vectors.push(
            e["vector"]
                .as_array()
                .expect("vector")
                .iter()
                .map(|v| v.as_f64().expect("float") as f32)
                .collect(),
        );
    }
    r
}

/// `n` words of English prose, cycling through a fixed paragraph (~5 bytes
/// per token).
pub fn prose(n: usize) -> String {
    const PROSE: &str = "The supervisor keeps a small pool of worker processes, each of \
        which loads the embedding model once and then answers requests one at a time. \
        When a worker grows past its memory limit (measured in MiB), a replacement is \
        started; naïve Ünïcödé, Straße and Σίσυφος are handled too.";
    PROSE
        .split(' ')
        .cycle()
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vector lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Resident set size of this process, in bytes (VmRSS from /proc/self/status).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kb * 1024
}
