//! Batching, truncation, configuration and error behaviour of the engine, and
//! the gather-before-dequantize rewrite on the real int8 model.

mod common;

use common::{chain, config, load, max_abs_diff, reference, INT8_MODEL, L3_MODEL};
use inferd_engine::{Engine, EngineConfig, EngineError};

fn batch_equals_single_runs(model: &str) {
    let engine = load(model);
    let texts = reference(model).texts;
    // Mixed lengths (6 to 256 tokens) in one padded batch.
    let batch = engine.embed(&texts).expect("embed batch");
    assert_eq!(batch.vectors.len(), texts.len());
    for (i, text) in texts.iter().enumerate() {
        let single = engine.embed(std::slice::from_ref(text)).expect("embed one");
        assert_eq!(batch.token_counts[i], single.token_counts[0]);
        assert_eq!(batch.truncated[i], single.truncated[0]);
        let diff = max_abs_diff(&batch.vectors[i], &single.vectors[0]);
        assert!(
            diff <= 1e-5,
            "{model}: text {i} differs in a batch by {diff}"
        );
    }
}

#[test]
fn int8_batch_of_mixed_lengths_equals_single_runs() {
    batch_equals_single_runs(INT8_MODEL);
}

#[test]
fn l3_batch_of_mixed_lengths_equals_single_runs() {
    batch_equals_single_runs(L3_MODEL);
}

#[test]
fn truncation_is_reported() {
    let engine = load(L3_MODEL);
    let long = "word ".repeat(600);
    let out = engine
        .embed(&[long, "short text".to_owned()])
        .expect("embed");
    assert_eq!(out.token_counts, [256, 4]);
    assert_eq!(out.truncated, [true, false]);

    // Exactly at the limit is not truncated: [CLS] + 254 words + [SEP].
    let exact = "word ".repeat(254);
    let out = engine.embed(&[exact]).expect("embed");
    assert_eq!(out.token_counts, [256]);
    assert_eq!(out.truncated, [false]);
}

#[test]
fn max_seq_len_is_configurable() {
    let mut cfg = config(L3_MODEL);
    cfg.max_seq_len = 16;
    let engine = Engine::load(&cfg).expect("load");
    let out = engine.embed(&["one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen".to_owned(), "hi".to_owned()]).expect("embed");
    assert_eq!(out.token_counts, [16, 3]);
    assert_eq!(out.truncated, [true, false]);
}

#[test]
fn normalisation_can_be_turned_off() {
    let mut cfg = config(L3_MODEL);
    cfg.normalize = false;
    let raw = Engine::load(&cfg).expect("load");
    let normalised = load(L3_MODEL);
    let text = ["A man is eating food.".to_owned()];
    let r = raw.embed(&text).expect("embed").vectors.remove(0);
    let n = normalised.embed(&text).expect("embed").vectors.remove(0);
    let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!(
        (norm - 1.0).abs() > 1e-3,
        "mean-pooled L3 vectors are not unit length (norm {norm})"
    );
    let rescaled: Vec<f32> = r.iter().map(|v| v / norm).collect();
    assert!(max_abs_diff(&rescaled, &n) < 1e-6);
}

#[test]
fn empty_batch_is_an_error() {
    let engine = load(L3_MODEL);
    assert!(matches!(engine.embed(&[]), Err(EngineError::EmptyBatch)));
}

#[test]
fn empty_and_unicode_texts_embed() {
    let engine = load(INT8_MODEL);
    let out = engine
        .embed(&[String::new(), "🙂".to_owned(), "\u{0}\u{200b}".to_owned()])
        .expect("embed");
    assert_eq!(out.token_counts[0], 2, "[CLS] [SEP]");
    for v in &out.vectors {
        assert_eq!(v.len(), 384);
        assert!(v.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn gather_rewrite_matches_the_unrewritten_model() {
    let mut off = config(INT8_MODEL);
    off.gather_before_dequantize = false;
    let plain = Engine::load(&off).expect("load without rewrite");
    let rewritten = load(INT8_MODEL);
    let texts = reference(INT8_MODEL).texts;
    let a = plain.embed(&texts).expect("embed");
    let b = rewritten.embed(&texts).expect("embed");
    assert_eq!(a.token_counts, b.token_counts);
    let mut worst = 0f32;
    for (i, (x, y)) in a.vectors.iter().zip(&b.vectors).enumerate() {
        let diff = max_abs_diff(x, y);
        assert!(
            diff <= 1e-5,
            "text {i}: rewrite changed the embedding by {diff}"
        );
        worst = worst.max(diff);
    }
    eprintln!(
        "gather rewrite: max abs diff {worst:e} over {} texts",
        texts.len()
    );
}

#[test]
fn missing_files_name_the_failed_operation() {
    let dir = std::env::temp_dir().join("inferd-engine-test-missing");
    let cfg = EngineConfig::for_model_dir(&dir);
    match Engine::load(&cfg) {
        Err(e @ EngineError::ReadModel { .. }) => {
            let msg = chain(&e);
            assert!(msg.contains("model.onnx"), "{msg}");
        }
        other => panic!("expected ReadModel, got {other:?}"),
    }

    // A readable model with a missing tokenizer.
    let mut cfg = config(L3_MODEL);
    cfg.tokenizer_path = dir.join("tokenizer.json");
    assert!(matches!(
        Engine::load(&cfg),
        Err(EngineError::LoadTokenizer { .. })
    ));

    // A file that is not ONNX.
    let mut cfg = config(L3_MODEL);
    cfg.model_path = cfg.tokenizer_path.clone();
    let err = Engine::load(&cfg).expect_err("a tokenizer is not a model");
    assert!(
        matches!(
            err,
            EngineError::ReadModel { .. } | EngineError::ParseModel { .. }
        ),
        "{err:?}"
    );
}

#[test]
fn gather_rewrite_applies_to_the_int8_tables_only() {
    use tract_onnx::prelude::Framework;
    let count = |model: &str| {
        let mut proto = tract_onnx::onnx()
            .proto_model_for_path(config(model).model_path)
            .expect("read model");
        inferd_engine::rewrite::gather_before_dequantize(&mut proto)
    };
    // Word and position embeddings; token_type_embeddings is stored as f32.
    assert_eq!(count(INT8_MODEL), 2);
    // The fp32 export has no quantized table: a no-op.
    assert_eq!(count(L3_MODEL), 0);
}

#[test]
fn debug_output_is_short() {
    let engine = load(L3_MODEL);
    let debug = format!("{engine:?}");
    assert!(debug.contains("paraphrase-MiniLM-L3-v2"), "{debug}");
    assert!(
        debug.len() < 400,
        "Debug prints the vocabulary or graph: {} bytes",
        debug.len()
    );
}
