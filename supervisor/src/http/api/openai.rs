//! OpenAI's embeddings API: `POST /v1/embeddings` (string or array input,
//! text or token ids, float or base64 vectors) and `GET /v1/models`.

use super::*;

/// `POST /v1/embeddings` body. Unknown fields are ignored, as OpenAI does.
#[derive(Debug, Deserialize)]
struct OpenAiRequest {
    /// A string, an array of strings, or cl100k_base token ids.
    input: Inputs,
    /// The served model or one of `model_aliases`.
    model: Option<String>,
    /// `float` (default) or `base64`.
    encoding_format: Option<String>,
    /// Only the model's own size.
    dimensions: Option<u32>,
}

pub(super) async fn openai_embeddings(
    State(conn): Conn,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let flavor = Flavor::OpenAi;
    let served = model_name(&conn.config());
    let answer = async {
        let request: OpenAiRequest = read_json(&conn, flavor, body).await?;
        if let Some(model) = request.model.as_deref() {
            if model != served && !conn.config().model_aliases.iter().any(|a| a == model) {
                return Err(ApiError::new(
                    flavor,
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    format!("the model `{model}` does not exist; this daemon serves `{served}`"),
                )
                .with_code("model_not_found"));
            }
        }
        let base64 = match request.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::invalid(
                    flavor,
                    format!("encoding_format `{other}` is not supported: use `float` or `base64`"),
                ))
            }
        };
        let check_dims = |dims: u32| match request.dimensions {
            Some(asked) if asked != dims => Err(ApiError::invalid(
                flavor,
                format!(
                    "`{served}` is not Matryoshka-trained: it only gives {dims}-dimensional \
                     embeddings, not {asked}"
                ),
            )),
            _ => Ok(()),
        };
        if let Some(dims) = conn.shared.dims(&served) {
            check_dims(dims)?;
        }
        let texts = match request.input {
            Inputs::Texts(texts) => texts,
            Inputs::TokenIds(ids) => openai_ids::decode(ids, conn.config().max_text_bytes)
                .await
                .map_err(|m| ApiError::invalid(flavor, m).with_code("invalid_token_ids"))?,
        };
        let (result, timing) = embed_in_parts(&conn, flavor, &headers, texts).await?;
        check_dims(result.dims)?;
        Ok((result, timing, base64))
    };
    let (result, timing, base64) = match answer.await {
        Ok(answer) => answer,
        Err(error) => return error.into_response(),
    };
    let tokens = result.token_counts.iter().map(|&n| u64::from(n)).sum();
    let data = result
        .embeddings
        .iter()
        .enumerate()
        .map(|(index, vector)| OpenAiEmbedding {
            object: "embedding",
            index,
            embedding: if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Vector::Float(vector)
            },
        })
        .collect();
    let body = OpenAiResponse {
        object: "list",
        data,
        model: &served,
        usage: Usage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    timed(Json(body).into_response(), started, tokens, timing)
}

/// `POST /v1/embeddings` answer. Typed rather than a `json!` value so that
/// vectors are written as `f32` (shortest form), not widened to `f64`.
#[derive(Serialize)]
struct OpenAiResponse<'a> {
    /// Always `list`.
    object: &'static str,
    /// One entry per input, in order.
    data: Vec<OpenAiEmbedding<'a>>,
    /// The served model.
    model: &'a str,
    /// Token counts.
    usage: Usage,
}

/// One vector of an [`OpenAiResponse`].
#[derive(Serialize)]
struct OpenAiEmbedding<'a> {
    /// Always `embedding`.
    object: &'static str,
    /// The input's position.
    index: usize,
    /// The vector.
    embedding: Vector<'a>,
}

/// A vector as numbers or as base64 of its little-endian `f32` bytes.
#[derive(Serialize)]
#[serde(untagged)]
enum Vector<'a> {
    /// `encoding_format: "float"`.
    Float(&'a [f32]),
    /// `encoding_format: "base64"`.
    Base64(String),
}

/// Tokens the model ran (after truncation).
#[derive(Serialize)]
struct Usage {
    /// Tokens of all inputs.
    prompt_tokens: u64,
    /// The same: embeddings have no completion tokens.
    total_tokens: u64,
}

pub(super) async fn openai_models(State(conn): Conn) -> Json<Value> {
    let served = model_name(&conn.config());
    let entry = |id: &str| {
        json!({
            "id": id,
            "object": "model",
            "created": 0,
            "owned_by": "inferd",
        })
    };
    let data: Vec<Value> = std::iter::once(served.as_str())
        .chain(conn.config().model_aliases.iter().map(String::as_str))
        .map(entry)
        .collect();
    Json(json!({ "object": "list", "data": data }))
}
