//! Token ids on `/v1/embeddings`, read as OpenAI's tokenizer (cl100k_base).
//!
//! LangChain's `OpenAIEmbeddings` splits long texts with tiktoken and, by
//! default (`check_embedding_ctx_length=True`), sends the cl100k_base ids
//! instead of the text. Those ids mean nothing to this model's own
//! tokenizer, so they are decoded back to text here (with the vocabulary
//! that `tiktoken-rs` bundles: nothing is downloaded) and the text is
//! embedded as any other: LangChain works with its default settings.
//!
//! The vocabulary is loaded on the first request that sends ids (about
//! 0.1 s and some tens of MB in the supervisor), never otherwise. Decoding
//! runs on the blocking pool; the id lists are bounded as they are parsed
//! ([`super::inputs`]) and each decoded text by `max_text_bytes`, checked
//! every [`DECODE_STEP`] ids, so a list of long tokens cannot blow up. An id outside the
//! vocabulary is refused; bytes that are not UTF-8 (an id list cut inside
//! a multi-byte character, as a split at LangChain's chunk boundary can
//! leave) become U+FFFD, as tiktoken's own `decode` does.

use tiktoken_rs::{cl100k_base_singleton, CoreBPE};

/// What to tell a client whose ids do not decode.
pub const FIX: &str = "token ids on /v1/embeddings are read as OpenAI's cl100k_base \
    (what LangChain's OpenAIEmbeddings sends by default); send the text instead \
    (for LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))";

/// Ids decoded at a time, so that a text over its limit is refused after
/// at most this many ids' worth of bytes past it.
const DECODE_STEP: usize = 256;

/// Decodes each id list to its text, or says which id is not a cl100k_base
/// token, or which input decodes to more than `max_text_bytes`.
pub async fn decode(lists: Vec<Vec<u32>>, max_text_bytes: usize) -> Result<Vec<String>, String> {
    tokio::task::spawn_blocking(move || {
        decode_with(cl100k_base_singleton(), &lists, max_text_bytes)
    })
    .await
    .map_err(|err| format!("cannot decode token ids: {err}"))?
}

fn decode_with(bpe: &CoreBPE, lists: &[Vec<u32>], max_bytes: usize) -> Result<Vec<String>, String> {
    lists
        .iter()
        .enumerate()
        .map(|(index, ids)| {
            let mut bytes = Vec::new();
            for step in ids.chunks(DECODE_STEP) {
                let decoded = bpe.decode_bytes(step).map_err(|err| {
                    format!(
                        "input {index}: token id {} is not in the cl100k_base vocabulary; {FIX}",
                        err.token
                    )
                })?;
                bytes.extend_from_slice(&decoded);
                if bytes.len() > max_bytes {
                    return Err(format!(
                        "input {index} decodes to more than {max_bytes} bytes (max_text_bytes)"
                    ));
                }
            }
            Ok(String::from_utf8_lossy(&bytes).into_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cl100k_ids_decode_to_their_text_and_unknown_ids_name_the_fix() {
        let bpe = cl100k_base_singleton();
        let text = "Rust supervisors keep embedding workers healthy. Ünïcödé too.";
        let ids = bpe.encode_ordinary(text);
        let decoded = decode_with(bpe, &[ids.clone(), Vec::new()], 1 << 20).expect("decodes");
        assert_eq!(decoded, vec![text.to_owned(), String::new()]);
        let err = decode_with(bpe, &[ids.clone(), vec![1, 999_999_999]], 1 << 20)
            .expect_err("unknown id");
        assert!(
            err.contains("input 1") && err.contains("999999999"),
            "{err}"
        );
        assert!(err.contains("check_embedding_ctx_length=False"), "{err}");
        // A text longer than max_text_bytes is refused while decoding.
        let long = vec![ids[0]; 10 * DECODE_STEP];
        let err = decode_with(bpe, &[long], 100).expect_err("too long");
        assert!(err.contains("more than 100 bytes"), "{err}");
        // A cut inside a multi-byte character decodes lossily, not as an error.
        let ids = bpe.encode_ordinary("𝔘𝔫𝔦𝔠𝔬𝔡𝔢");
        let cut = (1..ids.len())
            .find(|&n| std::str::from_utf8(&bpe.decode_bytes(&ids[..n]).unwrap()).is_err())
            .expect("some prefix ends inside a character");
        let decoded =
            decode_with(bpe, &[ids[..cut].to_vec()], 1 << 20).expect("lossy, not an error");
        assert!(decoded[0].ends_with('\u{FFFD}'), "{:?}", decoded[0]);
    }
}
