//! The engine against onnxruntime: tests/fixtures/reference_embeddings.json
//! (made by scripts/reference_embeddings.py), for both installed models.

mod common;

use common::{load, max_abs_diff, reference, INT8_MODEL, L3_MODEL};

/// Max abs difference allowed per component, after pooling and normalisation.
const TOLERANCE: f32 = 1e-4;

fn check_against_fixture(model: &str) {
    let engine = load(model);
    let reference = reference(model);
    assert_eq!(engine.model_name(), model);
    assert_eq!(engine.dims(), reference.vectors[0].len());

    let mut worst = 0f32;
    for (i, text) in reference.texts.iter().enumerate() {
        // One text per batch, as the reference was computed.
        let out = engine.embed(std::slice::from_ref(text)).expect("embed");
        assert_eq!(out.vectors.len(), 1);
        assert_eq!(
            out.token_counts[0], reference.token_counts[i],
            "token count of text {i}"
        );
        assert_eq!(
            out.truncated[0], reference.truncated[i],
            "truncated flag of text {i}"
        );
        let diff = max_abs_diff(&out.vectors[0], &reference.vectors[i]);
        assert!(
            diff <= TOLERANCE,
            "{model}, text {i} ({text:?}): max abs diff {diff} > {TOLERANCE}"
        );
        worst = worst.max(diff);
    }
    eprintln!(
        "{model}: max abs diff to onnxruntime over {} texts: {worst:e}",
        reference.texts.len()
    );
}

#[test]
fn int8_minilm_l6_matches_onnxruntime() {
    check_against_fixture(INT8_MODEL);
}

#[test]
fn fp32_minilm_l3_matches_onnxruntime() {
    check_against_fixture(L3_MODEL);
}

#[test]
fn int8_known_similarity() {
    // Published all-MiniLM-L6-v2 values (as checked by the fixture script).
    let engine = load(INT8_MODEL);
    let texts = [
        "A man is eating food.".to_owned(),
        "A man is eating a piece of bread.".to_owned(),
    ];
    let out = engine.embed(&texts).expect("embed");
    let head = [0.03095f32, 0.00667, -0.00437, 0.04751, -0.13992];
    assert!(
        max_abs_diff(&out.vectors[0][..5], &head) < 1e-4,
        "head {:?}",
        &out.vectors[0][..5]
    );
    let cosine: f32 = out.vectors[0]
        .iter()
        .zip(&out.vectors[1])
        .map(|(a, b)| a * b)
        .sum();
    assert!((cosine - 0.7535).abs() < 5e-4, "cosine {cosine}");
    let norm: f32 = out.vectors[0].iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-5, "normalised, norm {norm}");
}
