//! Bounded tokenization is exact: for every kind of text, tokenizing only as
//! much as can survive truncation gives the same tokens, token counts,
//! truncation flags and vectors as tokenizing the whole text
//! (`EngineConfig::bounded_tokenization` off).
//!
//! Small `max_seq_len`s make the prefix windows small, so the same texts go
//! through many cuts and retries; 256 is the shipped setting.

mod common;

use common::{chain, config, max_abs_diff, prose, INT8_MODEL, L3_MODEL};
use inferd_engine::Engine;

/// The engine that cuts long texts and the one that tokenizes them whole.
fn engines(model: &str, max_seq_len: usize) -> (Engine, Engine) {
    let load = |bounded| {
        let mut cfg = config(model);
        cfg.max_seq_len = max_seq_len;
        cfg.bounded_tokenization = bounded;
        Engine::load(&cfg).unwrap_or_else(|e| panic!("loading {model}: {}", chain(&e)))
    };
    (load(true), load(false))
}

/// Same ids, type ids, mask, length and truncation flag for every text.
fn assert_same_tokens(bounded: &Engine, whole: &Engine, texts: &[String], what: &str) {
    for (i, text) in texts.iter().enumerate() {
        let b = bounded.tokenize(text).expect("tokenize");
        let w = whole.tokenize(text).expect("tokenize");
        let show = || {
            let head: String = text.chars().take(60).collect();
            format!("{what}: text {i} ({} bytes, {head:?}...)", text.len())
        };
        assert_eq!(b.get_ids(), w.get_ids(), "{}: ids", show());
        assert_eq!(b.get_type_ids(), w.get_type_ids(), "{}: type ids", show());
        assert_eq!(
            b.get_attention_mask(),
            w.get_attention_mask(),
            "{}: mask",
            show()
        );
        assert_eq!(
            b.get_overflowing().is_empty(),
            w.get_overflowing().is_empty(),
            "{}: truncated",
            show()
        );
    }
}

/// Same token counts, flags and vectors from `embed` on the whole batch.
fn assert_same_embeddings(bounded: &Engine, whole: &Engine, texts: &[String], what: &str) {
    let b = bounded.embed(texts).expect("embed");
    let w = whole.embed(texts).expect("embed");
    assert_eq!(b.token_counts, w.token_counts, "{what}: token counts");
    assert_eq!(b.truncated, w.truncated, "{what}: truncated");
    for (i, (x, y)) in b.vectors.iter().zip(&w.vectors).enumerate() {
        let diff = max_abs_diff(x, y);
        assert!(diff <= 1e-6, "{what}: text {i}: vectors differ by {diff}");
    }
}

/// Texts built around the prefix window of `max_seq_len` (whatever it is, the
/// long ones are far longer than it) and the truncation limit.
fn edge_cases(max_seq_len: usize) -> Vec<String> {
    let m = max_seq_len;
    let long_run = " ".repeat(20 * m);
    let mut texts = vec![
        String::new(),
        "A man is eating food.".to_owned(),
        // At the limit (m-2 words between [CLS] and [SEP]) and one either side,
        // short and followed by whitespace runs longer than any first window.
        "word ".repeat(m - 3),
        "word ".repeat(m - 2),
        "word ".repeat(m - 1),
        format!("{}{long_run}", "word ".repeat(m - 2)),
        format!("{}{long_run}", "word ".repeat(m - 1)),
        format!("{}{long_run}x", "word ".repeat(m - 3)),
        format!("{}{long_run}x", "word ".repeat(m - 2)),
        format!("{}{long_run}{long_run}{long_run}x y", "word ".repeat(m - 4)),
        // Whitespace only, and its kinds; \x0b and \u{85} are deleted by the
        // normalizer and join the words around them.
        " ".repeat(64 << 10),
        "\t\n\r \u{a0}\u{3000}".repeat(4 << 10),
        format!("{}end", " \t\n".repeat(10 << 10)),
        "ab\u{85}cd\u{b}ef ".repeat(8 << 10),
        // Long English.
        prose(12_000),
        // No whitespace at all: one word (> 100 chars: [UNK]), and words
        // joined by punctuation or by non-ASCII punctuation (not cut chars).
        "a".repeat(64 << 10),
        "ab.cd-ef_gh".repeat(6 << 10),
        "ab…cd«ef»gh、".repeat(3 << 10),
        "😀".repeat(16 << 10),
        // CJK, alone and with kana (not split by the normalizer) in between.
        "中文字符测试".repeat(3640),
        "日本語のテキストです。".repeat(2000),
        "한국어 텍스트입니다 ".repeat(3000),
        // Words over, at and under the 100-char WordPiece limit.
        format!("{} ", "x".repeat(150)).repeat(400),
        format!("{} ", "ab".repeat(50)).repeat(600),
        format!("{} ", "ab".repeat(50) + "c").repeat(600),
        format!("{} ", "supercalifragilistic".repeat(4)).repeat(600),
        // Mixed scripts, accents (precomposed and decomposed), final sigma.
        "Ünïcödé cafe\u{301} ΣΊΣΥΦΟΣ Москва مرحبا עברית naïve résumé ".repeat(1200),
        "e\u{301}\u{316}\u{302}x".repeat(10 << 10),
        // Punctuation runs and added tokens, spaced and not.
        "!?.,;:()[]{}<>/\\|@#$%^&*-_=+~`'\"".repeat(2000),
        "[MASK][SEP][CLS]x[UNK][PAD]".repeat(2000),
        "[MASK [MASK] ]MASK] [".repeat(3000),
    ];
    // One long word (> 100 chars: [UNK]) starting before the limit, of chars
    // that look like separators but are not: cutting before one would give
    // the word's start its own tokens.
    for x in [
        "の", "ก", "가", "…", "😀", "\u{85}", "\u{ad}", "\u{200b}", "\u{301}", "ß",
    ] {
        texts.push(format!(
            "{}{}",
            "w ".repeat(m - 4),
            format!("ab{x}").repeat(4 << 10)
        ));
    }
    // Cuts landing in, right after and right before a long whitespace run,
    // after m-3..m-1 words: the run ends at every offset around each window a
    // prefix can have (8m bytes first, then twice the previous cut, as of
    // writing), and the text goes on long enough to be cut there.
    let tail = format!("tail words here{}", " x".repeat(40 * m));
    for k in [m - 3, m - 2, m - 1] {
        for window in [8 * m, 16 * m, 32 * m] {
            for d in [-2i64, -1, 0, 1, 2, 17] {
                let head = "word ".repeat(k);
                let run_len = (window as i64 + d - head.len() as i64).max(1) as usize;
                texts.push(format!("{head}{}{tail}", " ".repeat(run_len)));
                texts.push(format!(
                    "{head}{}[MASK]x\u{85}y{tail}",
                    "\n".repeat(run_len)
                ));
            }
        }
    }
    texts
}

/// A deterministic generator (xorshift64*): the same texts on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

/// Random texts of pieces chosen to interact with cuts: separators the
/// normalizer keeps, deletes or joins across, marks that NFD reorders, CJK,
/// long words, added tokens and pieces of them.
fn random_texts(count: usize, max_len: usize, seed: u64) -> Vec<String> {
    const PIECES: &[&str] = &[
        "word", "the", "Straße", "naïve", "e\u{301}", "\u{316}", "\u{302}", " ", " ", " ", "\t",
        "\n", "\r\n", "\u{85}", "\u{b}", "\u{0}", "\u{a0}", "\u{3000}", "\u{200b}", "\u{fffd}",
        ".", ",", "!", "-", "'", "…", "、", "。", "中", "文", "の", "😀", "[MASK]", "[SEP]", "[",
        "]", "MASK", "ΣΑΣ", "ß", "İ", "ﬁ", "Ａ", "١٢٣", "42",
    ];
    let mut rng = Rng(seed);
    (0..count)
        .map(|_| {
            let target = rng.below(max_len);
            let mut text = String::new();
            while text.len() < target {
                match rng.below(20) {
                    0 => text.push_str(&" ".repeat(rng.below(300))),
                    1 => text.push_str(&"x".repeat(90 + rng.below(20))),
                    _ => text.push_str(PIECES[rng.below(PIECES.len())]),
                }
            }
            text
        })
        .collect()
}

fn check_model(model: &str) {
    for max_seq_len in [8, 16, 64, 256] {
        let (bounded, whole) = engines(model, max_seq_len);
        let what = format!("{model}, max_seq_len {max_seq_len}");
        let edge = edge_cases(max_seq_len);
        assert_same_tokens(&bounded, &whole, &edge, &format!("{what}, edge cases"));
        let random = random_texts(300, 40 * max_seq_len, max_seq_len as u64);
        assert_same_tokens(&bounded, &whole, &random, &format!("{what}, random"));
        // Vectors are a function of the tokens; embed the short settings only
        // (a batch of 256-token texts takes tens of seconds in a debug build).
        if max_seq_len <= 16 {
            assert_same_embeddings(&bounded, &whole, &edge, &format!("{what}, edge cases"));
        }
    }
}

#[test]
fn int8_bounded_tokenization_is_exact() {
    check_model(INT8_MODEL);
}

#[test]
fn l3_bounded_tokenization_is_exact() {
    check_model(L3_MODEL);
}

/// The truncation flag at the limit, worked out by hand rather than taken
/// from the whole-text path; and most edge cases do truncate, so the checks
/// above do go through cuts.
#[test]
fn truncation_flag_is_exact_at_the_limit() {
    let (bounded, _) = engines(L3_MODEL, 16);
    let flags: Vec<bool> = edge_cases(16)
        .iter()
        .map(|t| {
            !bounded
                .tokenize(t)
                .expect("tokenize")
                .get_overflowing()
                .is_empty()
        })
        .collect();
    let expected = [
        false, false, false, false, true, false, true, false, true, false, false,
    ];
    assert_eq!(flags[..expected.len()], expected);
    assert!(
        flags.iter().filter(|&&t| t).count() > flags.len() / 2,
        "{flags:?}"
    );
}
