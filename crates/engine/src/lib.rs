//! Sentence embeddings from an ONNX model: tokenizers + tract-onnx, mean
//! pooling, optional L2 normalisation.
//!
//! # How it works
//!
//! [`Engine::load`] does all the expensive work once:
//!
//! 1. Reads the ONNX protobuf and, unless disabled, applies the
//!    [`rewrite::gather_before_dequantize`] graph rewrite (int8 exports
//!    otherwise dequantize their whole embedding table on every run).
//! 2. Parses it with tract **without forcing any input fact**: the inputs keep
//!    the symbolic `batch`/`sequence` dims the file declares (forcing facts on
//!    the int8 file fails to unify `Sym(sequence)` with `Sym(S)`).
//! 3. Types the graph, keeps only the rank-3 f32 output (the token embeddings
//!    `[batch, seq, dim]`; some exports carry extra outputs, one of them
//!    pooled but not normalised), declutters it, rewrites what tract alone
//!    leaves slow (GELU, the attention softmax, every f32 elementwise op,
//!    products over k = 1536: the `fuse` module), optimizes it and builds
//!    **one** runnable plan, single-threaded. That single plan serves every batch size and
//!    sequence length. Building a plan per concrete shape would be faster to
//!    write but each plan holds its own copy of the weights, so the process
//!    would grow with every new input length (measured 16 MB → 329 MB over
//!    1000 mixed inputs): exactly the leak inferd exists to contain.
//! 4. Loads the tokenizer, turns its padding off (the shipped tokenizer.json
//!    pads everything to 128) and sets truncation to
//!    [`EngineConfig::max_seq_len`] (the shipped file truncates at 128).
//!
//! [`Engine::embed`] then tokenizes the texts ([`Engine::tokenize`]: only as
//! much of each text as can survive truncation), pads them by hand to the
//! longest text of the batch, feeds whichever of `input_ids`,
//! `attention_mask` and `token_type_ids` the model declares, and mean-pools
//! the token embeddings over the real (unpadded) tokens, then L2-normalises
//! if configured. This is the sentence-transformers pipeline; the results
//! match onnxruntime to ~3e-7 (see `tests/reference.rs` and
//! `scripts/reference_embeddings.py`).
//!
//! The engine is synchronous and single-threaded by design: an inferd worker
//! runs one request at a time, and the pool scales with processes.

#![warn(missing_docs, clippy::unwrap_used)]

mod fuse;
pub mod rewrite;
mod tokenize;

use std::path::{Path, PathBuf};
use std::time::Instant;

use tokenize::BoundedEncoder;
/// What [`Engine::tokenize`] returns (tokenizers' own type).
pub use tokenizers::Encoding;
use tokenizers::{Tokenizer, TruncationParams};
use tract_onnx::prelude::multithread::Executor;
use tract_onnx::prelude::tract_data::internal::DimLike;
use tract_onnx::prelude::*;

/// A boxed error from tract or tokenizers, kept as the `source` of an
/// [`EngineError`] (tract's are `anyhow` errors with context chains).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Default truncation length, in tokens (including `[CLS]`/`[SEP]`), as
/// sentence-transformers uses for the MiniLM models.
pub const DEFAULT_MAX_SEQ_LEN: usize = 256;

/// How to load a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The ONNX file.
    pub model_path: PathBuf,
    /// The Hugging Face `tokenizer.json` matching the model.
    pub tokenizer_path: PathBuf,
    /// Longest input, in tokens including special tokens; longer texts are
    /// truncated and reported as such in [`Embeddings::truncated`].
    pub max_seq_len: usize,
    /// L2-normalise the pooled vectors (cosine similarity becomes a dot
    /// product).
    pub normalize: bool,
    /// Apply the [`rewrite::gather_before_dequantize`] rewrite at load time.
    /// Off only to measure what it saves; it is a no-op on models without the
    /// pattern.
    pub gather_before_dequantize: bool,
    /// Tokenize only as much of a long text as can survive truncation
    /// ([`Engine::tokenize`]); the result is the same as tokenizing it
    /// whole. Applies to BERT-style tokenizers (`BertNormalizer` and
    /// `BertPreTokenizer`, as the MiniLM models ship); others are always
    /// tokenized whole. Off only to compare with, or to measure what it
    /// saves.
    pub bounded_tokenization: bool,
    /// Apply the load-time rewrites of the graph (fused GELU and attention
    /// softmax, flat elementwise ops, long products split; see the `fuse`
    /// module docs). Off only to measure what they save; the results agree
    /// to ~1e-7.
    pub fusions: bool,
}

impl EngineConfig {
    /// A config with the defaults: truncation at [`DEFAULT_MAX_SEQ_LEN`],
    /// normalisation, the gather rewrite, bounded tokenization and the
    /// fusions on.
    pub fn new(model_path: impl Into<PathBuf>, tokenizer_path: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            model_path: model_path.into(),
            tokenizer_path: tokenizer_path.into(),
            max_seq_len: DEFAULT_MAX_SEQ_LEN,
            normalize: true,
            gather_before_dequantize: true,
            bounded_tokenization: true,
            fusions: true,
        }
    }

    /// The config for a model directory laid out as `scripts/fetch-model`
    /// installs it: `DIR/model.onnx` and `DIR/tokenizer.json`.
    pub fn for_model_dir(dir: impl AsRef<Path>) -> EngineConfig {
        let dir = dir.as_ref();
        EngineConfig::new(dir.join("model.onnx"), dir.join("tokenizer.json"))
    }
}

impl Default for EngineConfig {
    /// `model.onnx` and `tokenizer.json` in the current directory, with the
    /// defaults of [`EngineConfig::new`].
    fn default() -> EngineConfig {
        EngineConfig::new("model.onnx", "tokenizer.json")
    }
}

/// Why loading a model or embedding a batch failed. Each variant names the
/// operation; the underlying error, when there is one, is the `source()`
/// (print the chain, e.g. anyhow's `{:#}`, to see it).
#[derive(thiserror::Error, Debug)]
pub enum EngineError {
    /// The configuration cannot work (e.g. `max_seq_len` of 0).
    #[error("invalid engine configuration: {0}")]
    InvalidConfig(String),
    /// The ONNX file could not be read or decoded.
    #[error("reading ONNX model {}", path.display())]
    ReadModel {
        /// The model file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// tract could not build a graph from the ONNX protobuf.
    #[error("parsing ONNX model {}", path.display())]
    ParseModel {
        /// The model file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// The model has an input the engine cannot feed.
    #[error("unsupported model input `{name}` (the engine feeds input_ids, attention_mask and token_type_ids)")]
    UnsupportedInput {
        /// The input's name in the ONNX graph.
        name: String,
    },
    /// Type and shape inference of the graph failed.
    #[error("analysing the model graph (type inference)")]
    AnalyseModel(#[source] BoxError),
    /// The model has no rank-3 f32 output with a known last dim (the token
    /// embeddings `[batch, sequence, dim]`).
    #[error("the model has no token-embedding output (rank 3, f32, [batch, sequence, dim] with a known dim)")]
    NoEmbeddingOutput,
    /// Optimizing the graph or building the runnable plan failed.
    #[error("optimizing the model")]
    OptimizeModel(#[source] BoxError),
    /// The tokenizer file could not be loaded.
    #[error("loading tokenizer {}", path.display())]
    LoadTokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: BoxError,
    },
    /// The tokenizer rejected the padding/truncation settings.
    #[error("configuring the tokenizer")]
    ConfigureTokenizer(#[source] BoxError),
    /// `embed` was called with no texts.
    #[error("empty batch: at least one text is required")]
    EmptyBatch,
    /// Tokenizing an input failed.
    #[error("tokenizing the input")]
    Tokenize(#[source] BoxError),
    /// Building the input tensors failed.
    #[error("building the input tensors")]
    BuildInputs(#[source] BoxError),
    /// Running the model failed.
    #[error("running the model")]
    Run(#[source] BoxError),
    /// The model's output does not have the shape its inputs imply.
    #[error("unexpected model output shape {actual:?}, expected {expected:?}")]
    OutputShape {
        /// `[batch, sequence, dim]` as fed.
        expected: [usize; 3],
        /// What the model returned.
        actual: Vec<usize>,
    },
}

/// The embeddings of one batch, in the order of the texts.
#[derive(Debug, Clone, PartialEq)]
pub struct Embeddings {
    /// One vector of [`Engine::dims`] floats per text (unit length if
    /// normalisation is on).
    pub vectors: Vec<Vec<f32>>,
    /// Tokens the model saw per text, special tokens included, after
    /// truncation.
    pub token_counts: Vec<usize>,
    /// Whether the text was longer than `max_seq_len` tokens and was cut.
    pub truncated: Vec<bool>,
}

/// Time spent in one node of the plan over the runs of [`Engine::profile`].
#[derive(Debug, Clone)]
pub struct NodeTime {
    /// The node's name (from the ONNX graph, or given by a rewrite).
    pub node: String,
    /// Its op, as tract names it (`OptMatMul`, `Softmax`, ...).
    pub op: String,
    /// The op's parameters, as tract prints them.
    pub info: String,
    /// The shapes of its inputs (symbolic: `batch`, `sequence`).
    pub inputs: String,
    /// Total time over all runs.
    pub total: std::time::Duration,
}

/// The model inputs the engine knows how to fill from an [`Encoding`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputKind {
    InputIds,
    AttentionMask,
    TokenTypeIds,
}

impl InputKind {
    fn from_name(name: &str) -> Option<InputKind> {
        match name {
            "input_ids" => Some(InputKind::InputIds),
            "attention_mask" => Some(InputKind::AttentionMask),
            "token_type_ids" => Some(InputKind::TokenTypeIds),
            _ => None,
        }
    }
}

/// One model input, in the order the plan expects them.
#[derive(Debug, Clone)]
struct ModelInput {
    /// Which encoding field fills it.
    kind: InputKind,
    /// The element type the model declares (i64 for the MiniLM exports);
    /// inputs are built as i64 and cast when it differs.
    datum_type: DatumType,
}

/// A loaded model and tokenizer, ready to embed batches of texts.
///
/// `Send` (and `Sync`): a worker may load it on one thread and use it on
/// another. `embed` takes `&self` and keeps no state between calls.
pub struct Engine {
    /// Truncation at `max_seq_len`, padding off: the engine pads per batch.
    tokenizer: Tokenizer,
    /// Tokenizes long texts in part; `None` when turned off or when the
    /// tokenizer's pipeline is not one it is known to be exact for.
    bounded: Option<BoundedEncoder>,
    /// The single optimized plan, symbolic in batch and sequence length.
    plan: Arc<TypedRunnableModel>,
    /// The plan's inputs, in order.
    inputs: Vec<ModelInput>,
    /// Length of the output vectors.
    dims: usize,
    /// Readable name for logs and status, derived from the model path.
    model_name: String,
    /// Whether to L2-normalise pooled vectors.
    normalize: bool,
}

impl Engine {
    /// Loads, rewrites and optimizes the model and loads the tokenizer.
    /// Takes a fraction of a second to a few seconds; call once per process.
    pub fn load(config: &EngineConfig) -> Result<Engine, EngineError> {
        if config.max_seq_len == 0 {
            return Err(EngineError::InvalidConfig(
                "max_seq_len must be at least 1".into(),
            ));
        }
        let started = Instant::now();
        let model_name = model_name(&config.model_path);
        let onnx = tract_onnx::onnx();
        let path = &config.model_path;

        let mut proto = onnx
            .proto_model_for_path(path)
            .map_err(|e| EngineError::ReadModel {
                path: path.clone(),
                source: e.into(),
            })?;
        let rewritten = if config.gather_before_dequantize {
            rewrite::gather_before_dequantize(&mut proto)
        } else {
            0
        };
        // The directory is where tract resolves external tensor data from.
        let model_dir = path.parent().and_then(Path::to_str);
        let parsed = onnx
            .parse(&proto, model_dir)
            .map_err(|e| EngineError::ParseModel {
                path: path.clone(),
                source: e.into(),
            })?;
        // The protobuf holds a copy of every weight: free it before optimizing.
        drop(proto);
        if !parsed.unresolved_inputs.is_empty() {
            return Err(EngineError::ParseModel {
                path: path.clone(),
                source: format!(
                    "tensors used but never produced: {:?}",
                    parsed.unresolved_inputs
                )
                .into(),
            });
        }
        let model = parsed.model;

        let input_names: Vec<String> = model
            .input_outlets()
            .map_err(|e| EngineError::AnalyseModel(e.into()))?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let kinds = input_names
            .iter()
            .map(|name| {
                InputKind::from_name(name)
                    .ok_or_else(|| EngineError::UnsupportedInput { name: name.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mut typed = model
            .into_typed()
            .map_err(|e| EngineError::AnalyseModel(e.into()))?;
        let inputs = kinds
            .into_iter()
            .enumerate()
            .map(|(ix, kind)| {
                let fact = typed
                    .input_fact(ix)
                    .map_err(|e| EngineError::AnalyseModel(e.into()))?;
                Ok(ModelInput {
                    kind,
                    datum_type: fact.datum_type,
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;

        let (output, dims) = embedding_output(&typed)?;
        // Dropping the other outputs lets the optimizer prune what only they
        // needed (the L3 export also computes a pooled vector we redo anyway).
        typed
            .select_output_outlets(&[output])
            .map_err(|e| EngineError::OptimizeModel(e.into()))?;
        // `into_optimized()` is declutter + optimize; the facts are refreshed
        // in between. tract 0.23.9's declutter replaces `And(c, m)`, where it
        // proves `c` all-true, by `m` even when `c` broadcasts `m` to a larger
        // shape (the int8 file's attention mask: [batch,1,1,seq] stands in for
        // [batch,1,seq,seq]) and keeps the larger fact downstream. The values
        // are still right (the mask broadcasts later), but the facts no longer
        // match the tensors, which debug builds of tract reject at run time
        // ("Evaluating node_Where_92: output 0, expected ..."). Recomputing
        // every fact from its op makes the graph consistent again.
        typed
            .declutter()
            .map_err(|e| EngineError::OptimizeModel(e.into()))?;
        typed
            .refresh_output_facts()
            .map_err(|e| EngineError::OptimizeModel(e.into()))?;
        // What tract's declutter leaves to its slow generic loops (see
        // `fuse`): fused before codegen so the optimizer sees the fused ops;
        // the elementwise ops are flattened after it, once codegen has placed
        // what it could.
        let optimize_error = |e: TractError| EngineError::OptimizeModel(e.into());
        let (fused_gelus, fused_softmaxes, split_products) = if config.fusions {
            (
                fuse::fuse_gelu(&mut typed).map_err(optimize_error)?,
                fuse::fuse_masked_softmax(&mut typed).map_err(optimize_error)?,
                fuse::split_long_products(&mut typed).map_err(optimize_error)?,
            )
        } else {
            (0, 0, 0)
        };
        typed.optimize().map_err(optimize_error)?;
        let flat_binaries = if config.fusions {
            fuse::flatten_binaries(&mut typed).map_err(optimize_error)?
        } else {
            0
        };
        let optimized = typed;
        // Explicitly single-threaded: workers = cores is the scaling model,
        // and tract's multithreaded matmul gains little on these shapes.
        let options = RunOptions {
            executor: Some(Executor::SingleThread),
            ..RunOptions::default()
        };
        let plan = optimized
            .into_runnable_with_options(&options)
            .map_err(|e| EngineError::OptimizeModel(e.into()))?;

        let tokenizer = load_tokenizer(&config.tokenizer_path, config.max_seq_len)?;
        let bounded = config
            .bounded_tokenization
            .then(|| BoundedEncoder::new(&tokenizer, config.max_seq_len))
            .flatten();

        tracing::info!(
            model = %model_name,
            dims,
            inputs = ?input_names,
            gather_rewrites = rewritten,
            fused_gelus,
            fused_softmaxes,
            split_products,
            flat_binaries,
            max_seq_len = config.max_seq_len,
            bounded_tokenization = bounded.is_some(),
            load_ms = started.elapsed().as_millis() as u64,
            "embedding model loaded"
        );
        Ok(Engine {
            tokenizer,
            bounded,
            plan,
            inputs,
            dims,
            model_name,
            normalize: config.normalize,
        })
    }

    /// Embeds all `texts` as one padded batch. The result holds one vector
    /// per text, in order. An empty slice is an error ([`EngineError::EmptyBatch`]).
    pub fn embed(&self, texts: &[String]) -> Result<Embeddings, EngineError> {
        let (encodings, seq) = self.encode_batch(texts)?;
        let batch = encodings.len();
        let inputs = self.input_tensors(&encodings, seq)?;

        let outputs = self
            .plan
            .run(inputs)
            .map_err(|e| EngineError::Run(e.into()))?;
        let hidden = outputs
            .first()
            .ok_or_else(|| EngineError::Run("the model returned no output".into()))?
            .to_plain_array_view::<f32>()
            .map_err(|e| EngineError::Run(e.into()))?;
        let expected = [batch, seq, self.dims];
        if hidden.shape() != expected {
            return Err(EngineError::OutputShape {
                expected,
                actual: hidden.shape().to_vec(),
            });
        }

        let mut vectors = Vec::with_capacity(batch);
        for (b, enc) in encodings.iter().enumerate() {
            let mut pooled = vec![0f32; self.dims];
            let mut count = 0f32;
            for (s, &m) in enc.get_attention_mask().iter().enumerate() {
                if m == 0 {
                    continue;
                }
                count += 1.0;
                for (acc, v) in pooled
                    .iter_mut()
                    .zip(hidden.slice(tract_ndarray::s![b, s, ..]).iter())
                {
                    *acc += *v;
                }
            }
            // sentence-transformers clamps the token count at 1e-9.
            let count = count.max(1e-9);
            pooled.iter_mut().for_each(|v| *v /= count);
            if self.normalize {
                // F.normalize's epsilon: an all-zero vector stays zero.
                let norm = pooled.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                pooled.iter_mut().for_each(|v| *v /= norm);
            }
            vectors.push(pooled);
        }

        Ok(Embeddings {
            vectors,
            token_counts: encodings.iter().map(Encoding::len).collect(),
            truncated: encodings
                .iter()
                .map(|e| !e.get_overflowing().is_empty())
                .collect(),
        })
    }

    /// Tokenizes `text` as [`Engine::embed`] does: special tokens added,
    /// truncated at `max_seq_len` tokens, not padded. Ids, type ids,
    /// attention mask and length are those of tokenizing the whole text, and
    /// the text was truncated iff `get_overflowing()` is not empty; what the
    /// overflow holds is unspecified, since only as much of a long text is
    /// tokenized as can survive truncation
    /// ([`EngineConfig::bounded_tokenization`]).
    pub fn tokenize(&self, text: &str) -> Result<Encoding, EngineError> {
        match &self.bounded {
            Some(bounded) => bounded.encode(&self.tokenizer, text),
            None => self.tokenizer.encode(text, true),
        }
        .map_err(EngineError::Tokenize)
    }

    /// How many nodes of each op the optimized plan holds, by tract's op
    /// names (`OptMatMul`, `GeluExact`, `InferdMaskedSoftmax`, ...): what
    /// the load-time fusions left, for tests and diagnostics.
    pub fn plan_ops(&self) -> std::collections::BTreeMap<String, usize> {
        let mut ops = std::collections::BTreeMap::new();
        for node in self.plan.model().nodes() {
            *ops.entry(node.op().name().into_owned()).or_insert(0) += 1;
        }
        ops
    }

    /// Runs the plan `runs` times on `texts` (one batch, as [`Engine::embed`]
    /// would) and returns the time spent in each node, slowest first: the
    /// profile that guides the engine's rewrites (`examples/engine_profile`).
    /// Diagnostic only; it adds a clock read around every node.
    pub fn profile(&self, texts: &[String], runs: usize) -> Result<Vec<NodeTime>, EngineError> {
        let (encodings, seq) = self.encode_batch(texts)?;
        let model = self.plan.model();
        let mut times: Vec<Option<NodeTime>> = vec![None; model.nodes().len()];
        let mut state =
            TypedSimpleState::new(&self.plan).map_err(|e| EngineError::Run(e.into()))?;
        for _ in 0..runs {
            let inputs = self.input_tensors(&encodings, seq)?;
            state
                .run_plan_with_eval(inputs, |session, op_state, node, input| {
                    let started = Instant::now();
                    let output = tract_onnx::tract_core::plan::eval(session, op_state, node, input);
                    let spent = started.elapsed();
                    let slot = times[node.id].get_or_insert_with(|| NodeTime {
                        node: node.name.clone(),
                        op: node.op().name().into_owned(),
                        info: node.op().info().unwrap_or_default().join(", "),
                        inputs: node
                            .inputs
                            .iter()
                            .map(|outlet| {
                                model
                                    .outlet_fact(*outlet)
                                    .map(|f| format!("{:?}", f.shape))
                                    .unwrap_or_default()
                            })
                            .collect::<Vec<_>>()
                            .join(" "),
                        total: std::time::Duration::ZERO,
                    });
                    slot.total += spent;
                    output
                })
                .map_err(|e| EngineError::Run(e.into()))?;
        }
        let mut times: Vec<NodeTime> = times.into_iter().flatten().collect();
        times.sort_by_key(|t| std::cmp::Reverse(t.total));
        Ok(times)
    }

    /// Length of the embedding vectors (384 for the MiniLM models).
    pub fn dims(&self) -> usize {
        self.dims
    }

    /// A readable model name: the model file's directory for a generic file
    /// name (`.../all-MiniLM-L6-v2/model.onnx` → `all-MiniLM-L6-v2`), else the
    /// file stem.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// The encodings of a batch and the length it is padded to.
    fn encode_batch(&self, texts: &[String]) -> Result<(Vec<Encoding>, usize), EngineError> {
        if texts.is_empty() {
            return Err(EngineError::EmptyBatch);
        }
        let encodings = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<Encoding>, _>>()?;
        // At least one position, so a tokenizer that yields no token for an
        // empty string still gives the model a valid (fully masked) input.
        let seq = encodings
            .iter()
            .map(Encoding::len)
            .max()
            .unwrap_or(0)
            .max(1);
        Ok((encodings, seq))
    }

    /// The `[batch, seq]` tensors for the plan's inputs, padded with zeros
    /// (padding is masked out of attention and of pooling).
    fn input_tensors(
        &self,
        encodings: &[Encoding],
        seq: usize,
    ) -> Result<TVec<TValue>, EngineError> {
        let batch = encodings.len();
        self.inputs
            .iter()
            .map(|input| {
                let mut data = vec![0i64; batch * seq];
                for (row, enc) in data.chunks_mut(seq).zip(encodings) {
                    let values: &[u32] = match input.kind {
                        InputKind::InputIds => enc.get_ids(),
                        InputKind::AttentionMask => enc.get_attention_mask(),
                        InputKind::TokenTypeIds => enc.get_type_ids(),
                    };
                    for (slot, v) in row.iter_mut().zip(values) {
                        *slot = i64::from(*v);
                    }
                }
                let tensor = Tensor::from_shape(&[batch, seq], &data)
                    .map_err(|e| EngineError::BuildInputs(e.into()))?;
                let tensor = if input.datum_type == i64::datum_type() {
                    tensor
                } else {
                    tensor
                        .cast_to_dt(input.datum_type)
                        .map_err(|e| EngineError::BuildInputs(e.into()))?
                        .into_owned()
                };
                Ok(tensor.into_tvalue())
            })
            .collect()
    }
}

impl std::fmt::Debug for Engine {
    // By hand: the derived form would print the whole vocabulary and graph.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model_name", &self.model_name)
            .field("dims", &self.dims)
            .field("inputs", &self.inputs)
            .field("normalize", &self.normalize)
            .field("bounded_tokenization", &self.bounded.is_some())
            .finish_non_exhaustive()
    }
}

/// The first output that is rank 3 f32 with a concrete last dim, and that dim.
fn embedding_output(model: &TypedModel) -> Result<(OutletId, usize), EngineError> {
    let outlets = model
        .output_outlets()
        .map_err(|e| EngineError::AnalyseModel(e.into()))?;
    for outlet in outlets {
        let fact = model
            .outlet_fact(*outlet)
            .map_err(|e| EngineError::AnalyseModel(e.into()))?;
        if fact.datum_type == f32::datum_type() && fact.rank() == 3 {
            if let Ok(dims) = fact.shape[2].to_usize() {
                return Ok((*outlet, dims));
            }
        }
    }
    Err(EngineError::NoEmbeddingOutput)
}

fn load_tokenizer(path: &Path, max_seq_len: usize) -> Result<Tokenizer, EngineError> {
    let mut tokenizer =
        Tokenizer::from_file(path).map_err(|source| EngineError::LoadTokenizer {
            path: path.to_owned(),
            source,
        })?;
    // The shipped tokenizer.json pads every input to 128 and truncates at
    // 128: padding to a fixed length wastes compute on short texts (the batch
    // is padded to its own longest text instead), and the model is good for
    // 256 tokens.
    tokenizer.with_padding(None);
    // The default direction (cut from the right) is what lets
    // `BoundedEncoder` tokenize a prefix only.
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_seq_len,
            ..TruncationParams::default()
        }))
        .map_err(EngineError::ConfigureTokenizer)?;
    Ok(tokenizer)
}

fn model_name(model_path: &Path) -> String {
    let stem = model_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = model_path
        .parent()
        .and_then(Path::file_name)
        .map(|s| s.to_string_lossy().into_owned());
    match parent {
        Some(dir) if stem.is_empty() || stem == "model" => dir,
        _ if !stem.is_empty() => stem,
        _ => model_path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_name_prefers_the_directory_of_a_generic_file() {
        assert_eq!(
            model_name(Path::new("/m/all-MiniLM-L6-v2/model.onnx")),
            "all-MiniLM-L6-v2"
        );
        assert_eq!(
            model_name(Path::new("/m/paraphrase-MiniLM-L3-v2.onnx")),
            "paraphrase-MiniLM-L3-v2"
        );
        assert_eq!(model_name(Path::new("model.onnx")), "model");
    }

    #[test]
    fn engine_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Engine>();
    }

    #[test]
    fn zero_max_seq_len_is_rejected_before_reading_anything() {
        let mut config =
            EngineConfig::new("/nonexistent/model.onnx", "/nonexistent/tokenizer.json");
        config.max_seq_len = 0;
        assert!(matches!(
            Engine::load(&config),
            Err(EngineError::InvalidConfig(_))
        ));
    }
}
