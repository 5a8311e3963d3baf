//! A maximal request (64 texts of 64 KiB) runs as 64 texts of `max_seq_len`
//! tokens: each text is cut to the limit, flagged as truncated, and embeds as
//! the same text at the limit does.
//!
//! That the *work* of tokenizing is bounded by `max_seq_len`, not by the
//! text's length, is counted (in bytes handed to the tokenizer) by the unit
//! test `tokenize::tests::work_is_bounded_by_the_truncation_length`; timings
//! are for benchmarks, not tests.

mod common;

use common::{chain, config, prose, INT8_MODEL, L3_MODEL};
use inferd_engine::{Engine, DEFAULT_MAX_SEQ_LEN};

const TEXTS: usize = 64;
const BIG: usize = 64 << 10;

/// The largest char boundary at or before `at`.
fn floor_char_boundary(text: &str, at: usize) -> usize {
    (0..=at.min(text.len()))
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0)
}

#[test]
fn a_maximal_request_runs_at_the_truncation_length() {
    for model in [L3_MODEL, INT8_MODEL] {
        let engine = Engine::load(&config(model))
            .unwrap_or_else(|e| panic!("loading {model}: {}", chain(&e)));
        let texts: Vec<String> = (0..TEXTS)
            .map(|i| {
                let mut text = format!("{i} {}", prose(100));
                while text.len() < BIG {
                    text.push_str(&prose(100));
                }
                text.truncate(floor_char_boundary(&text, BIG));
                text
            })
            .collect();
        let big = engine.embed(&texts).expect("embed");
        assert_eq!(big.token_counts, [DEFAULT_MAX_SEQ_LEN; TEXTS], "{model}");
        assert_eq!(big.truncated, [true; TEXTS], "{model}");

        // The same texts cut well past the limit (4 KiB is >256 tokens of
        // prose) embed alike: nothing after the limit counted.
        let cut: Vec<String> = texts
            .iter()
            .map(|t| t[..floor_char_boundary(t, 4096)].to_owned())
            .collect();
        let small = engine.embed(&cut).expect("embed");
        assert_eq!(small.truncated, [true; TEXTS], "{model}");
        for (i, (a, b)) in big.vectors.iter().zip(&small.vectors).enumerate() {
            let diff = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{model}: text {i} differs by {diff}");
        }
    }
}
