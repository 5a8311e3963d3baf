//! Where the binaries, the models and the reference embeddings are.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Name of the default model (int8 export) in the model cache.
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";
/// Name of the small fp32 model in the model cache.
pub const SMALL_MODEL: &str = "paraphrase-MiniLM-L3-v2";

/// Directory holding `inferd`, `inferd-worker` and `inferctl`:
/// `$INFERD_BIN_DIR` if set, else the cargo target profile directory of the
/// running test executable (`target/<profile>/deps/<test>` → `target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("INFERD_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let mut dir = exe
        .parent()
        .expect("the test executable lives in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of one of the workspace's binaries; panics with the command to run
/// when it has not been built.
pub fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    if !path.is_file() {
        panic!(
            "{name} not found at {}: run `cargo build --workspace --bins` first \
             (the end-to-end tests start the real binaries; set INFERD_BIN_DIR to look elsewhere)",
            path.display()
        );
    }
    path
}

/// The model cache: `$INFERD_MODEL_DIR`, else `$HOME/.cache/inferd/models`.
pub fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("INFERD_MODEL_DIR") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").expect("HOME is set (or set INFERD_MODEL_DIR)");
    Path::new(&home).join(".cache/inferd/models")
}

/// `(model.onnx, tokenizer.json)` of the cached model `name`; panics with the
/// command to run when they are missing.
pub fn model_files(name: &str) -> (PathBuf, PathBuf) {
    let dir = model_dir().join(name);
    let model = dir.join("model.onnx");
    let tokenizer = dir.join("tokenizer.json");
    for file in [&model, &tokenizer] {
        if !file.is_file() {
            panic!(
                "{} is missing: run scripts/fetch-model (it fills {})",
                file.display(),
                model_dir().display()
            );
        }
    }
    (model, tokenizer)
}

/// `(model.onnx, tokenizer.json)` of [`DEFAULT_MODEL`].
pub fn default_model() -> (PathBuf, PathBuf) {
    model_files(DEFAULT_MODEL)
}

/// The model [`crate::DaemonConfig::new`] serves: `$INFERD_TEST_MODEL` (a
/// name in the model cache, e.g. [`SMALL_MODEL`] for a faster run), else
/// [`DEFAULT_MODEL`].
pub fn test_model_name() -> String {
    std::env::var("INFERD_TEST_MODEL").unwrap_or_else(|_| DEFAULT_MODEL.to_string())
}

/// `(model.onnx, tokenizer.json)` of [`SMALL_MODEL`].
pub fn small_model() -> (PathBuf, PathBuf) {
    model_files(SMALL_MODEL)
}

/// `tests/fixtures/reference_embeddings.json`: embeddings computed with
/// onnxruntime by `scripts/reference_embeddings.py`.
#[derive(Debug, Clone, Deserialize)]
pub struct Reference {
    /// Truncation length the reference used.
    pub max_seq_len: usize,
    /// Whether the vectors are L2-normalised.
    pub normalize: bool,
    /// The input texts, in order.
    pub texts: Vec<String>,
    /// One entry per model.
    pub models: Vec<ReferenceModel>,
}

/// Reference results of one model.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceModel {
    /// Model name, as in the model cache.
    pub name: String,
    /// Vector length.
    pub dims: usize,
    /// One entry per text, in [`Reference::texts`] order.
    pub embeddings: Vec<ReferenceEmbedding>,
}

/// Reference result for one text.
#[derive(Debug, Clone, Deserialize)]
pub struct ReferenceEmbedding {
    /// The input text.
    pub text: String,
    /// Tokens fed to the model (after truncation).
    pub token_count: u32,
    /// Whether the input was truncated.
    pub truncated: bool,
    /// The embedding.
    pub vector: Vec<f32>,
}

impl Reference {
    /// The results for model `name`; panics if the fixture has none.
    pub fn model(&self, name: &str) -> &ReferenceModel {
        self.models
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no model {name} in the reference fixture"))
    }
}

/// Loads the reference fixture.
pub fn reference() -> Reference {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/reference_embeddings.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()))
}

/// Largest absolute difference between two vectors; infinite if their
/// lengths differ.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Texts for load tests: the reference texts (short, unicode, long and
/// truncated) plus a few short sentences, all distinct.
pub fn sample_texts() -> Vec<String> {
    let mut texts = reference().texts;
    texts.extend(
        [
            "The quick brown fox jumps over the lazy dog.",
            "Workers are recycled before they leak too much memory.",
            "A poison input is quarantined after two worker deaths.",
            "SIGHUP rolls every worker without failing a request.",
            "How many roads must a man walk down?",
            "Das ist ein kurzer deutscher Satz.",
            "0123456789",
            "?",
        ]
        .map(String::from),
    );
    texts
}
