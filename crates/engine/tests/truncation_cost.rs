//! The cost of a text is bounded by `max_seq_len`, not by its length: a
//! maximal request (64 texts of 64 KiB) costs about what 64 texts of 256
//! tokens cost.
//!
//! Alone in its own test binary so that no other test competes for the CPU
//! while it measures. The tokenization check is the one that tells bounded
//! from whole-text tokenization apart (measured on a 2-core machine: 64 × 64
//! KiB of English take ~1.3 s whole, ~40 ms bounded, ~23 ms for 64 texts of
//! 256 tokens); end to end, the model run over 64 × 256 tokens dominates
//! either way (5 s for L3, 15 s for L6 in the test build), so the `embed`
//! check only guards against the maximal request costing more than a batch
//! of texts at the limit.

mod common;

use std::time::{Duration, Instant};

use common::{chain, config, prose, INT8_MODEL, L3_MODEL};
use inferd_engine::{Engine, DEFAULT_MAX_SEQ_LEN};

const TEXTS: usize = 64;
const BIG: usize = 64 << 10;

fn load(model: &str, bounded: bool) -> Engine {
    let mut cfg = config(model);
    cfg.bounded_tokenization = bounded;
    Engine::load(&cfg).unwrap_or_else(|e| panic!("loading {model}: {}", chain(&e)))
}

/// 64 different texts of exactly `BIG` bytes, made of `piece`s.
fn big_texts(piece: &str) -> Vec<String> {
    (0..TEXTS)
        .map(|i| {
            let mut text = format!("{i} ");
            while text.len() < BIG {
                text.push_str(piece);
            }
            let mut end = BIG;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text
        })
        .collect()
}

/// 64 different English texts of exactly `DEFAULT_MAX_SEQ_LEN` tokens, not
/// truncated.
fn limit_texts(engine: &Engine) -> Vec<String> {
    let tokens = |text: &str| {
        let e = engine.tokenize(text).expect("tokenize");
        (e.len(), !e.get_overflowing().is_empty())
    };
    // "0".."63" are one token each, as is "a".
    let words = (100..)
        .take_while(|&n| !tokens(&format!("0 {}", prose(n))).1)
        .last()
        .expect("100 words fit");
    let mut text = prose(words);
    while tokens(&format!("0 {text}")).0 < DEFAULT_MAX_SEQ_LEN {
        text.push_str(" a");
    }
    (0..TEXTS).map(|i| format!("{i} {text}")).collect()
}

/// The fastest of three runs of `f`.
fn best_of_3(mut f: impl FnMut()) -> Duration {
    (0..3)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .min()
        .expect("three runs")
}

fn tokenize_all(engine: &Engine, texts: &[String]) -> Duration {
    best_of_3(|| {
        for text in texts {
            engine.tokenize(text).expect("tokenize");
        }
    })
}

#[test]
fn cost_is_bounded_by_max_seq_len() {
    // Both models ship the same tokenizer; the fast-loading one serves.
    let bounded = load(L3_MODEL, true);
    let whole = load(L3_MODEL, false);
    let limit = limit_texts(&bounded);
    let english = big_texts(&prose(100));
    let cjk = big_texts("中文字符测试，这是一个句子。");
    let punctuation = big_texts("!?.,;:-");

    let limit_time = tokenize_all(&bounded, &limit);
    eprintln!(
        "tokenize {TEXTS} texts of {DEFAULT_MAX_SEQ_LEN} tokens: {limit_time:.2?} bounded, {:.2?} whole",
        tokenize_all(&whole, &limit)
    );
    // 3x, not 1x: the first prefix is 2 KiB, against ~1.2 KiB for a text at
    // the limit, and CJK and punctuation cost more per byte. Whole-text
    // tokenization is 50-100x.
    for (what, texts) in [
        ("English", &english),
        ("CJK", &cjk),
        ("punctuation", &punctuation),
    ] {
        let time = tokenize_all(&bounded, texts);
        eprintln!(
            "tokenize {TEXTS} texts of 64 KiB {what}: {time:.2?} bounded, {:.2?} whole",
            tokenize_all(&whole, texts)
        );
        assert!(
            time <= limit_time * 3,
            "tokenizing 64 KiB {what} texts took {time:.2?}, over three times the \
             {limit_time:.2?} of {DEFAULT_MAX_SEQ_LEN}-token texts"
        );
    }

    // Texts sparse in tokens never overflow a prefix and end up tokenized
    // whole after the retries; those must stay within a small factor of
    // tokenizing them whole once (at most 2x by construction).
    let sparse: Vec<String> = (0..TEXTS)
        .map(|i| format!("{i} {}{}", "word ".repeat(200), " ".repeat(BIG - 1010)))
        .collect();
    let time = tokenize_all(&bounded, &sparse);
    let whole_time = tokenize_all(&whole, &sparse);
    eprintln!(
        "tokenize {TEXTS} texts of 64 KiB, 200 words: {time:.2?} bounded, {whole_time:.2?} whole"
    );
    assert!(
        time <= whole_time * 5 / 2,
        "tokenizing sparse texts took {time:.2?} bounded, {whole_time:.2?} whole"
    );

    for model in [L3_MODEL, INT8_MODEL] {
        let engine = load(model, true);
        let started = Instant::now();
        let at_limit = engine.embed(&limit).expect("embed");
        let limit_time = started.elapsed();
        let started = Instant::now();
        let big = engine.embed(&english).expect("embed");
        let big_time = started.elapsed();
        eprintln!(
            "{model}: embed {TEXTS} texts of {DEFAULT_MAX_SEQ_LEN} tokens: {limit_time:.2?}, \
             of 64 KiB: {big_time:.2?}"
        );
        assert_eq!(at_limit.token_counts, [DEFAULT_MAX_SEQ_LEN; TEXTS]);
        assert_eq!(at_limit.truncated, [false; TEXTS]);
        assert_eq!(big.token_counts, [DEFAULT_MAX_SEQ_LEN; TEXTS]);
        assert_eq!(big.truncated, [true; TEXTS]);
        assert!(
            big_time <= limit_time * 2,
            "{model}: embedding 64 KiB texts took {big_time:.2?}, over twice the \
             {limit_time:.2?} of {DEFAULT_MAX_SEQ_LEN}-token texts"
        );
    }
}
