//! Tokenizing only as much of a text as can survive truncation.
//!
//! The tokenizer with truncation still tokenizes the whole text and only then
//! cuts the encoding, so a 64 KiB text costs ~25 ms although only its first
//! `max_seq_len` tokens are used. [`BoundedEncoder`] tokenizes a prefix that
//! ends where the full text has a word boundary; when that prefix already
//! overflows the truncation limit, its first `max_seq_len` tokens are the full
//! text's, and so is the (true) truncation flag. Otherwise it retries with a
//! longer prefix, and in the end with the whole text.
//!
//! Why a prefix cut before a *cut char* `c` tokenizes exactly like the start
//! of the full text, for a `BertNormalizer` + `BertPreTokenizer` pipeline
//! (any model: they all work on one pre-tokenized word at a time):
//!
//! * The normalizer works char by char (clean text, padding CJK ideographs
//!   with spaces, per-char lowercasing, stripping nonspacing marks), except
//!   that NFD reorders runs of combining marks; every cut char is a starter
//!   (canonical combining class 0), so no reordering crosses the cut.
//! * After normalization the cut char is, or begins with, whitespace (ASCII
//!   `' '`, `\t`, `\n`, `\r` and non-control Unicode whitespace; a CJK
//!   ideograph is padded with spaces) or ASCII punctuation, both of which the
//!   pre-tokenizer splits on, so the word before the cut ends there in the
//!   full text too. Not *all* whitespace: controls such as U+000B or U+0085
//!   are deleted by the normalizer, which joins the words around them.
//! * Added tokens (`[CLS]`, `[MASK]`, ...) are matched before the pipeline; a
//!   match spanning the cut would contain the cut char, so chars that occur
//!   in an added token are not cut chars.
//!
//! Other pipelines (byte-level BPE, Metaspace, ...) are not analysed here and
//! are always tokenized whole.
//!
//! Cost: a text dense in tokens (prose in any script with spaces, CJK,
//! punctuation) is settled by its first prefix, ~8 bytes per allowed token
//! (2 KiB for 256 tokens), whatever its length. A text sparse in tokens
//! (long whitespace runs, words over 100 chars) takes retries, at most
//! twice the work of tokenizing it whole. A text whose only separators are
//! not cut chars (e.g. `…` or kana between words) is tokenized whole.

use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{Encoding, NormalizedString, Normalizer, Tokenizer};

/// First prefix length, in bytes per allowed token. English averages ~5
/// bytes per token and CJK 3, so most texts that will be truncated are
/// settled by the first prefix, which stays small next to the whole text.
const FIRST_WINDOW_BYTES_PER_TOKEN: usize = 8;

/// How much longer each retry's prefix is. Retries happen for texts sparse
/// in tokens (long whitespace runs, words over 100 chars, which are one
/// `[UNK]` each); growing geometrically keeps their cost within a constant
/// factor of tokenizing them once.
const GROWTH: usize = 2;

/// Encodes texts with a truncating tokenizer while bounding the work per text
/// by the truncation length rather than by the text's length.
#[derive(Debug, Clone)]
pub(crate) struct BoundedEncoder {
    /// Whether CJK ideographs are padded with spaces (so split) by the
    /// normalizer.
    cjk: bool,
    /// ASCII punctuation that occurs in some added token.
    in_added_tokens: Vec<char>,
    /// Length of the first prefix tried, in bytes.
    first_window: usize,
}

impl BoundedEncoder {
    /// The encoder for `tokenizer`, which truncates at `max_seq_len` tokens
    /// from the right; `None` if its pipeline is one where cutting a text
    /// early is not known to be exact.
    pub(crate) fn new(tokenizer: &Tokenizer, max_seq_len: usize) -> Option<BoundedEncoder> {
        let cjk = match tokenizer.get_normalizer() {
            None => false,
            Some(NormalizerWrapper::BertNormalizer(n)) => n.handle_chinese_chars,
            Some(_) => return None,
        };
        if !matches!(
            tokenizer.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::BertPreTokenizer(_))
        ) {
            return None;
        }
        let mut in_added_tokens = Vec::new();
        for token in tokenizer.get_added_tokens_decoder().values() {
            // A single-word token matches at the end of a prefix but not
            // before a CJK ideograph (a word char) in the full text.
            if token.single_word {
                return None;
            }
            // Normalized tokens are matched in the normalized text, where the
            // cut char may have changed (e.g. a CJK ideograph gains spaces).
            let mut normalized = NormalizedString::from(token.content.as_str());
            if let Some(normalizer) = tokenizer.get_normalizer() {
                normalizer.normalize(&mut normalized).ok()?;
            }
            for c in token.content.chars().chain(normalized.get().chars()) {
                if c.is_whitespace() || is_chinese_char(c) {
                    return None;
                }
                if c.is_ascii_punctuation() && !in_added_tokens.contains(&c) {
                    in_added_tokens.push(c);
                }
            }
        }
        Some(BoundedEncoder {
            cjk,
            in_added_tokens,
            first_window: max_seq_len.saturating_mul(FIRST_WINDOW_BYTES_PER_TOKEN),
        })
    }

    /// Exactly `tokenizer.encode(text, true)` in ids, type ids, attention
    /// mask and length, and in whether `get_overflowing()` is empty (which is
    /// all the overflow says: it may hold only part of the cut-off rest).
    /// `tokenizer` must be the one given to [`BoundedEncoder::new`].
    pub(crate) fn encode(&self, tokenizer: &Tokenizer, text: &str) -> tokenizers::Result<Encoding> {
        self.encode_counting(tokenizer, text)
            .map(|(encoding, _)| encoding)
    }

    /// [`BoundedEncoder::encode`], and how many bytes it handed to the
    /// tokenizer in all: the work done, which the tests bound without timing
    /// anything.
    fn encode_counting(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
    ) -> tokenizers::Result<(Encoding, usize)> {
        // Only prefixes of at most half the text: as each is at least twice
        // the one before, a text that never overflows costs at most twice
        // tokenizing it whole.
        let half = text.len() / 2;
        let mut window = self.first_window;
        let mut tokenized = 0;
        while window <= half {
            let cut = self.cut_at_or_after(text, window);
            if cut > half {
                break;
            }
            let encoding = tokenizer.encode(&text[..cut], true)?;
            tokenized += cut;
            if !encoding.get_overflowing().is_empty() {
                return Ok((encoding, tokenized));
            }
            // From the cut, which a long word may have pushed past the window.
            window = cut.saturating_mul(GROWTH);
        }
        Ok((tokenizer.encode(text, true)?, tokenized + text.len()))
    }

    /// The first byte offset at or after `window` where a cut char starts,
    /// or `text.len()` if there is none. Never 0 (the window is at least 1).
    fn cut_at_or_after(&self, text: &str, window: usize) -> usize {
        let Some(start) = (window..text.len()).find(|&i| text.is_char_boundary(i)) else {
            return text.len();
        };
        text[start..]
            .char_indices()
            .find(|&(_, c)| self.is_cut_char(c))
            .map_or(text.len(), |(i, _)| start + i)
    }

    /// Whether the full text has a word boundary right before `c` (see the
    /// module docs).
    fn is_cut_char(&self, c: char) -> bool {
        match c {
            ' ' | '\t' | '\n' | '\r' => true,
            _ if c.is_ascii_punctuation() => !self.in_added_tokens.contains(&c),
            _ if c.is_ascii() => false,
            _ => (c.is_whitespace() && !c.is_control()) || (self.cjk && is_chinese_char(c)),
        }
    }
}

/// The CJK ideographs `BertNormalizer` pads with spaces (its own ranges).
fn is_chinese_char(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The shipped tokenizers, as `tests/common` finds them (a missing model
    /// fails, as there: scripts/fetch-model installs them).
    fn tokenizers() -> Vec<(&'static str, Tokenizer)> {
        let root = match std::env::var_os("INFERD_MODEL_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/inferd/models"),
        };
        ["all-MiniLM-L6-v2", "paraphrase-MiniLM-L3-v2"]
            .into_iter()
            .map(|model| {
                let path = root.join(model).join("tokenizer.json");
                let mut tokenizer = Tokenizer::from_file(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (run scripts/fetch-model)", path.display())
                });
                // The shipped file pads and truncates at 128.
                tokenizer.with_padding(None);
                tokenizer.with_truncation(None).expect("no truncation");
                (model, tokenizer)
            })
            .collect()
    }

    fn ids(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer
            .encode(text, false)
            .unwrap_or_else(|e| panic!("encoding {text:?}: {e}"))
            .get_ids()
            .to_vec()
    }

    /// The claim the whole module rests on, checked for every cut char:
    /// tokenizing the text before it and the text from it separately gives
    /// the tokens of the whole. The contexts make a wrong cut visible: a word
    /// continued across it would get `##` pieces (or `[UNK]`), a nonspacing
    /// mark after it would be reordered or stripped with the one before, and
    /// `[MASK` + `]` would no longer be one added token.
    #[test]
    fn cutting_before_a_cut_char_never_changes_the_tokens() {
        let contexts = [
            ("ab", "cd"),
            ("cafe\u{301}", "\u{316}x"),
            ("[MASK", "] z"),
            ("x\u{85}", "\u{b}y"),
        ];
        for (model, tokenizer) in tokenizers() {
            let encoder = BoundedEncoder::new(&tokenizer, 256)
                .unwrap_or_else(|| panic!("{model}: the shipped tokenizer is supported"));
            let cut_chars: Vec<char> = (0..=char::MAX as u32)
                .filter_map(char::from_u32)
                .filter(|&c| encoder.is_cut_char(c))
                .collect();
            // Whitespace, ASCII punctuation but '[' and ']', CJK ideographs.
            assert!(
                cut_chars.len() > 80_000,
                "{model}: {} cut chars",
                cut_chars.len()
            );
            assert!(!encoder.is_cut_char('[') && !encoder.is_cut_char(']'));
            // All ~80k ideographs take half a minute; the normalizer treats
            // each range alike, so check its edges (where a wrong range would
            // show), the compatibility ideographs (NFD maps them to others)
            // and a sample of the rest.
            let near_edge = |c: char| {
                let near = |d: i64| {
                    is_chinese_char(char::from_u32((c as i64 + d) as u32).unwrap_or('a'))
                        != is_chinese_char(c)
                };
                (1..=64).any(|d| near(d) || near(-d))
            };
            let sampled = cut_chars.into_iter().filter(|&c| {
                !is_chinese_char(c)
                    || near_edge(c)
                    || (0xF900..=0xFAFF).contains(&(c as u32))
                    || (0x2F800..=0x2FA1F).contains(&(c as u32))
                    || (c as u32).is_multiple_of(31)
            });
            for c in sampled {
                for (left, right) in contexts {
                    let right = format!("{c}{right}");
                    let mut split = ids(&tokenizer, left);
                    split.extend(ids(&tokenizer, &right));
                    assert_eq!(
                        ids(&tokenizer, &format!("{left}{right}")),
                        split,
                        "{model}: cutting {left:?} + {right:?} before U+{:04X}",
                        c as u32
                    );
                }
            }
        }
    }

    /// The chars that look like separators but are not: the normalizer
    /// deletes them (controls, U+FFFD) and joins the words around them, or
    /// they are part of a word. Cutting before them would change the tokens,
    /// which the test above would not notice since they are not cut chars.
    #[test]
    fn separators_the_normalizer_deletes_are_not_cut_chars() {
        for (model, tokenizer) in tokenizers() {
            let encoder = BoundedEncoder::new(&tokenizer, 256).expect("supported");
            for c in [
                '\u{b}', '\u{c}', '\u{85}', '\u{0}', '\u{fffd}', '\u{200b}', '\u{ad}', '\u{301}',
            ] {
                assert!(!encoder.is_cut_char(c), "{model}: U+{:04X}", c as u32);
                let whole = ids(&tokenizer, &format!("ab{c}cd"));
                let mut split = ids(&tokenizer, "ab");
                split.extend(ids(&tokenizer, &format!("{c}cd")));
                assert_ne!(
                    whole, split,
                    "{model}: U+{:04X} does separate words",
                    c as u32
                );
            }
        }
    }

    /// 64 KiB of `piece`s, cut back to a char boundary.
    fn big_text(piece: &str) -> String {
        let mut text = piece.repeat((64 << 10) / piece.len() + 1);
        let mut end = 64 << 10;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text
    }

    /// The cost of a text is bounded by the truncation length, not by the
    /// text's length, and the answer is the whole text's. Counted in bytes
    /// handed to the tokenizer, not timed: tokenizing is linear in them
    /// (64 KiB of English take ~20 ms whole on a 2-core machine, against
    /// ~0.5 ms for the 2 KiB of the first prefix).
    #[test]
    fn work_is_bounded_by_the_truncation_length() {
        const MAX_SEQ_LEN: usize = 256;
        let first_window = MAX_SEQ_LEN * FIRST_WINDOW_BYTES_PER_TOKEN;
        for (model, mut tokenizer) in tokenizers() {
            tokenizer
                .with_truncation(Some(tokenizers::TruncationParams {
                    max_length: MAX_SEQ_LEN,
                    ..Default::default()
                }))
                .expect("truncation");
            let encoder = BoundedEncoder::new(&tokenizer, MAX_SEQ_LEN).expect("supported");
            let whole = |text: &str| tokenizer.encode(text, true).expect("encode");
            // Dense texts: settled by the first prefix, which ends at the
            // first cut char at or after the window.
            for (what, piece) in [
                ("English", "the quick brown fox jumps over the lazy dog. "),
                ("CJK", "中文字符测试，这是一个句子。"),
                ("punctuation", "!?.,;:-"),
            ] {
                let text = big_text(piece);
                let (encoding, tokenized) =
                    encoder.encode_counting(&tokenizer, &text).expect("encode");
                assert!(
                    (first_window..first_window + 16).contains(&tokenized),
                    "{model}: {what}: {tokenized} bytes tokenized of {}",
                    text.len()
                );
                let expected = whole(&text);
                assert_eq!(encoding.get_ids(), expected.get_ids(), "{model}: {what}");
                assert_eq!(encoding.len(), MAX_SEQ_LEN);
                assert!(!encoding.get_overflowing().is_empty());
            }
            // Sparse texts never overflow a prefix: retried, then tokenized
            // whole, at most twice the text in all.
            let sparse = format!("{}{}", "word ".repeat(200), " ".repeat((64 << 10) - 1000));
            let (encoding, tokenized) = encoder
                .encode_counting(&tokenizer, &sparse)
                .expect("encode");
            assert!(
                tokenized > sparse.len() && tokenized <= 2 * sparse.len(),
                "{model}: sparse: {tokenized} bytes tokenized of {}",
                sparse.len()
            );
            assert_eq!(encoding.get_ids(), whole(&sparse).get_ids());
            assert!(encoding.get_overflowing().is_empty());
            // Short texts go to the tokenizer once, whole.
            let (_, tokenized) = encoder
                .encode_counting(&tokenizer, "a short text")
                .expect("encode");
            assert_eq!(tokenized, "a short text".len());
        }
    }

    #[test]
    fn other_pipelines_are_not_cut() {
        let (_, mut tokenizer) = tokenizers().remove(0);
        tokenizer.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        assert!(BoundedEncoder::new(&tokenizer, 256).is_none());
    }
}
