//! The texts `inferd-http-load` sends, their token counts, and the request
//! bodies built from them.
//!
//! Token counts are those of the all-MiniLM-L6-v2 tokenizer (BERT uncased
//! WordPiece), `[CLS]` and `[SEP]` included; `bench/onnxruntime_app.py`
//! and inferd both report them (`usage.prompt_tokens`), so the load tool
//! can check that every side ran exactly the tokens it was meant to.

use clap::ValueEnum;
use serde::Serialize;

/// The short text: a search query's length (the text of the engine and
/// daemon benchmarks in docs/BENCHMARKS.md).
pub const SHORT_TEXT: &str = "A man is eating food.";

/// Tokens in [`SHORT_TEXT`].
pub const SHORT_TOKENS: u64 = 8;

/// The long text: a retrieval passage of exactly [`LONG_TOKENS`] tokens,
/// under the 256-token limit, so no side truncates it.
pub const LONG_TEXT: &str = "Search systems often split long documents into passages of a few \
hundred tokens before they embed them, because a sentence embedding model reads at most a fixed \
number of tokens and anything past that limit is silently dropped. A passage of this size is \
typical of what a retrieval pipeline sends: a paragraph or two from a manual, a support ticket, \
a product description or a page of meeting notes. The model turns each passage into a single \
vector, and the vectors of passages that talk about the same subject end up close to each \
other, even when they share few words. When a user asks a question, the question is embedded \
the same way and the nearest passages are returned, ranked by cosine similarity. Because every \
passage must be embedded once when the collection is indexed, and again whenever the model \
changes, the cost of embedding long texts dominates the cost of running such a system. Short \
queries are cheap by comparison, but they arrive one at a time, while a person waits for the \
answer, so their latency matters more than their throughput. A service that embeds text must \
therefore do both of these jobs well, on the same small machine, too.";

/// Tokens in [`LONG_TEXT`].
pub const LONG_TOKENS: u64 = 242;

/// Which text every request carries (`--batch` copies of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TextKind {
    /// [`SHORT_TEXT`], 8 tokens.
    Short,
    /// [`LONG_TEXT`], 242 tokens.
    Long,
}

impl TextKind {
    /// The text itself.
    pub fn text(self) -> &'static str {
        match self {
            TextKind::Short => SHORT_TEXT,
            TextKind::Long => LONG_TEXT,
        }
    }

    /// Its token count with the all-MiniLM-L6-v2 tokenizer.
    pub fn tokens(self) -> u64 {
        match self {
            TextKind::Short => SHORT_TOKENS,
            TextKind::Long => LONG_TOKENS,
        }
    }

    /// How tables name it.
    pub fn describe(self) -> String {
        match self {
            TextKind::Short => format!("short ({SHORT_TOKENS} tokens)"),
            TextKind::Long => format!("{LONG_TOKENS} tokens"),
        }
    }
}

/// Which HTTP API the body and the answer follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/embeddings`: `{"input": [...]}` answered with
    /// `{"data": [{"index", "embedding"}], "usage": {"prompt_tokens"}}`.
    Openai,
    /// text-embeddings-inference's `POST /embed`: `{"inputs": [...]}`
    /// answered with `[[f32]]`.
    Tei,
}

impl Api {
    /// The route this API is served on by default.
    pub fn default_path(self) -> &'static str {
        match self {
            Api::Openai => "/v1/embeddings",
            Api::Tei => "/embed",
        }
    }
}

/// The JSON body of one request: `batch` copies of `text`, plus `model`
/// when given (OpenAI only).
pub fn json_body(api: Api, text: &str, batch: usize, model: Option<&str>) -> Vec<u8> {
    let texts = vec![text; batch];
    let value = match (api, model) {
        (Api::Openai, Some(model)) => serde_json::json!({ "input": texts, "model": model }),
        (Api::Openai, None) => serde_json::json!({ "input": texts }),
        (Api::Tei, _) => serde_json::json!({ "inputs": texts }),
    };
    // Serializing a `Value` of strings cannot fail.
    serde_json::to_vec(&value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_every_copy_and_the_model() {
        let body: serde_json::Value =
            serde_json::from_slice(&json_body(Api::Openai, "hi", 3, Some("m"))).expect("json");
        assert_eq!(body["input"].as_array().map(Vec::len), Some(3));
        assert_eq!(body["model"], "m");
        let body: serde_json::Value =
            serde_json::from_slice(&json_body(Api::Tei, "hi", 2, Some("m"))).expect("json");
        assert_eq!(body["inputs"].as_array().map(Vec::len), Some(2));
        assert!(body.get("model").is_none());
    }

    #[test]
    fn the_long_text_is_one_paragraph() {
        assert!(!LONG_TEXT.contains("  "));
        assert!(LONG_TEXT.ends_with("too."));
    }
}
