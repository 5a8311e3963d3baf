//! The HTTP routes: each one a translation into a pool message and back.
//!
//! | route | answers |
//! |---|---|
//! | `POST /v1/embeddings` | OpenAI's embeddings API (float or base64; text or cl100k_base token ids) |
//! | `GET /v1/models` | OpenAI's model list: the served model and its aliases |
//! | `POST /embed` | text-embeddings-inference's `[[f32]]` |
//! | `POST /tokenize` | TEI's tokens, as the model's tokenizer makes them |
//! | `GET /info` | model name, dims (once known), limits, version |
//! | `GET /health` | 200 while a worker is ready, else 503 |
//! | `GET /metrics` | `inferctl metrics`' Prometheus text (control access) |
//!
//! Bodies are read up to `max_frame_bytes` (413 past it) and parsed here
//! rather than by axum's `Json` extractor, so a bad body gets an error in the
//! route's own shape that names the problem. Embedding answers carry TEI's
//! timing headers, in milliseconds: `x-total-time` (as the handler measured
//! it), `x-queue-time` and `x-inference-time` (the pool's [`Timing`]), and
//! `x-compute-tokens`. On the TCP listener, [`require_key`] checks the API
//! key before any route runs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::BodyExt;
use inferd_proto::{EmbedResult, PoolStatus, RequestError, ServerMessage, Timing};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::error::{ApiError, Flavor};
use super::inputs::Inputs;
use super::{openai_ids, ConnState, Door};
use crate::pool::PoolMsg;
use crate::request::{Responder, Task};

/// Header carrying a per-request deadline in milliseconds.
const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// Shorthand for a route's state.
type Conn = State<Arc<ConnState>>;

/// The routes, bound to one connection's state.
pub(super) fn router(state: Arc<ConnState>) -> Router {
    Router::new()
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/models", get(openai_models))
        .route("/embed", post(tei_embed))
        .route("/tokenize", post(tei_tokenize))
        .route("/info", get(info))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            require_key,
        ))
        .with_state(state)
}

/// On the Unix socket, lets through only peers the access lists admit now
/// (a reload may have dropped one since it connected: it is refused and
/// its connection closed). On the TCP listener with keys configured, lets
/// through only requests with a valid key, and `/health` (a load
/// balancer's probe has none).
async fn require_key(State(conn): Conn, request: Request, next: Next) -> Response {
    if let Door::Unix(peer) = conn.door {
        if let Err(reason) = conn.config().access.admit(peer) {
            tracing::warn!(%reason, "the access lists no longer admit this client; closing its connection");
            let flavor = Flavor::of_path(request.uri().path());
            let error = RequestError::PermissionDenied { reason };
            let mut response = ApiError::from_request(flavor, &error).into_response();
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    }
    if matches!(conn.door, Door::Tcp) && request.uri().path() != "/health" {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .map(HeaderValue::as_bytes);
        if conn.shared.refuses_key(presented) {
            let flavor = Flavor::of_path(request.uri().path());
            let mut response = ApiError::unauthorized(flavor).into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

async fn not_found(uri: Uri) -> ApiError {
    let flavor = Flavor::of_path(uri.path());
    ApiError::new(
        flavor,
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {}", uri.path()),
    )
    .with_code("not_found")
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let flavor = Flavor::of_path(uri.path());
    ApiError::new(
        flavor,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
    .with_code("method_not_allowed")
}

/// The served model's name, as the worker's engine derives it: the
/// directory of a generic `model.onnx`, else the file stem. (The engine's
/// own function is not used: the supervisor does not link the engine.)
fn model_name(config: &crate::config::Config) -> String {
    let path = &config.model;
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = path
        .parent()
        .and_then(std::path::Path::file_name)
        .map(|s| s.to_string_lossy().into_owned());
    match parent {
        Some(dir) if stem.is_empty() || stem == "model" => dir,
        _ if !stem.is_empty() => stem,
        _ => path.display().to_string(),
    }
}

// ---------------------------------------------------------------- OpenAI

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

async fn openai_embeddings(State(conn): Conn, headers: HeaderMap, body: Body) -> Response {
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

async fn openai_models(State(conn): Conn) -> Json<Value> {
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

// ------------------------------------------------------------------- TEI

/// `POST /embed` body (TEI's `EmbedRequest`).
#[derive(Debug, Deserialize)]
struct TeiRequest {
    /// A string or an array of strings.
    inputs: Inputs,
    /// L2-normalise (default true).
    normalize: Option<bool>,
    /// Cut inputs at `max_seq_len` (default true; inferd always does, so
    /// `false` turns a cut input into an error).
    truncate: Option<bool>,
    /// Only `Right` (inferd keeps the start of a text).
    truncation_direction: Option<String>,
}

async fn tei_embed(State(conn): Conn, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let flavor = Flavor::Tei;
    let answer = async {
        let request: TeiRequest = read_json(&conn, flavor, body).await?;
        let normalize = request.normalize.unwrap_or(true);
        if !normalize && conn.config().normalize {
            return Err(ApiError::invalid(
                flavor,
                "normalize=false is not supported: the daemon's normalize setting is true",
            ));
        }
        if let Some(direction) = request.truncation_direction.as_deref() {
            if !direction.eq_ignore_ascii_case("right") {
                return Err(ApiError::invalid(
                    flavor,
                    format!("truncation_direction `{direction}` is not supported: only `Right`"),
                ));
            }
        }
        let texts = match request.inputs {
            Inputs::Texts(texts) => texts,
            Inputs::TokenIds(_) => {
                return Err(ApiError::invalid(
                    flavor,
                    "token id inputs are not supported on /embed: send the text",
                ))
            }
        };
        let (mut result, timing) = embed(&conn, flavor, &headers, texts).await?;
        if request.truncate == Some(false) && result.truncated.iter().any(|&cut| cut) {
            // TEI's answer to an over-long input with truncation off. The
            // worker only reports that it cut, not the original length.
            let max = conn.config().max_seq_len;
            return Err(ApiError::new(
                flavor,
                StatusCode::PAYLOAD_TOO_LARGE,
                "validation",
                format!(
                    "Input validation error: `inputs` must have less than {max} tokens. \
                     Given: more than {max}"
                ),
            ));
        }
        if normalize && !conn.config().normalize {
            for vector in &mut result.embeddings {
                l2_normalize(vector);
            }
        }
        Ok((result, timing))
    };
    match answer.await {
        Ok((result, timing)) => {
            let tokens = result.token_counts.iter().map(|&n| u64::from(n)).sum();
            timed(
                Json(result.embeddings).into_response(),
                started,
                tokens,
                timing,
            )
        }
        Err(error) => error.into_response(),
    }
}

/// `POST /tokenize` body (TEI's `TokenizeRequest`).
#[derive(Debug, Deserialize)]
struct TeiTokenizeRequest {
    /// A string or an array of strings.
    inputs: Inputs,
    /// Keep `[CLS]`/`[SEP]` (default true).
    add_special_tokens: Option<bool>,
}

/// One token as TEI writes it.
#[derive(Serialize)]
struct TeiToken<'a> {
    /// Vocabulary id.
    id: u32,
    /// The text it covers, or the special token.
    text: &'a str,
    /// Added by the tokenizer.
    special: bool,
    /// Byte offsets into the input; `null` for a special token.
    start: Option<u32>,
    /// End, exclusive.
    stop: Option<u32>,
}

async fn tei_tokenize(State(conn): Conn, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let flavor = Flavor::Tei;
    let answer = async {
        let request: TeiTokenizeRequest = read_json(&conn, flavor, body).await?;
        let texts = match request.inputs {
            Inputs::Texts(texts) => texts,
            Inputs::TokenIds(_) => {
                return Err(ApiError::invalid(
                    flavor,
                    "`inputs` must be text to tokenize",
                ))
            }
        };
        match run(&conn, flavor, &headers, Task::Tokenize, texts).await? {
            (ServerMessage::Tokens { result, .. }, timing) => {
                Ok((result, timing, request.add_special_tokens.unwrap_or(true)))
            }
            (other, _) => Err(ApiError::from_request(flavor, &unexpected(Some(other)))),
        }
    };
    let (result, timing, special) = match answer.await {
        Ok(answer) => answer,
        Err(error) => return error.into_response(),
    };
    let lists: Vec<Vec<TeiToken>> = result
        .tokens
        .iter()
        .map(|tokens| {
            tokens
                .iter()
                .filter(|token| special || !token.special)
                .map(|token| TeiToken {
                    id: token.id,
                    text: &token.text,
                    special: token.special,
                    start: token.start,
                    stop: token.stop,
                })
                .collect()
        })
        .collect();
    let tokens = lists.iter().map(|l| l.len() as u64).sum();
    timed(Json(lists).into_response(), started, tokens, timing)
}

fn l2_normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

async fn info(State(conn): Conn) -> Json<Value> {
    let config = conn.config();
    let config = &config;
    let model = model_name(config);
    Json(json!({
        "model_id": model,
        "dims": conn.shared.dims(&model),
        "max_seq_len": config.max_seq_len,
        "max_input_length": config.max_seq_len,
        "max_texts": config.max_texts,
        "max_client_batch_size": config.max_texts,
        "max_text_bytes": config.max_text_bytes,
        "max_frame_bytes": config.max_frame_bytes,
        "normalize": config.normalize,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn health(State(conn): Conn) -> Response {
    let status = match status(&conn).await {
        Ok(status) => status,
        Err(error) => return ApiError::from_request(Flavor::Tei, &error).into_response(),
    };
    let serving = status
        .workers
        .iter()
        .filter(|w| w.state.is_serving())
        .count();
    if serving > 0 {
        return Json(json!({"status": "ok"})).into_response();
    }
    let why = status
        .unavailable_reason
        .unwrap_or_else(|| "workers are starting".into());
    ApiError::new(
        Flavor::Tei,
        StatusCode::SERVICE_UNAVAILABLE,
        "unhealthy",
        format!("no worker is ready: {why}"),
    )
    .into_response()
}

async fn metrics(State(conn): Conn) -> Response {
    // TCP clients reach this only with an API key (see `require_key`).
    if let Door::Unix(peer) = conn.door {
        if let Err(reason) = conn.config().access.control(peer) {
            let error = RequestError::PermissionDenied { reason };
            return ApiError::from_request(Flavor::Tei, &error).into_response();
        }
    }
    let (responder, mut answers) = responder(&conn);
    if let Err(mpsc::error::SendError(msg)) = conn.pool.send(PoolMsg::Metrics { responder }).await {
        msg.refuse(RequestError::ShuttingDown);
    }
    match answers.recv().await {
        Some(ServerMessage::Metrics { text, .. }) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            )],
            text,
        )
            .into_response(),
        other => ApiError::from_request(Flavor::Tei, &unexpected(other)).into_response(),
    }
}

// --------------------------------------------------------------- helpers

/// Reads the body (at most `max_frame_bytes`) and parses it as `T`.
async fn read_json<T: serde::de::DeserializeOwned>(
    conn: &ConnState,
    flavor: Flavor,
    body: Body,
) -> Result<T, ApiError> {
    let limit = conn.config().max_frame_bytes;
    // Held until the body is read and parsed, like a native frame's.
    let _permits = conn
        .shared
        .body_permits(axum::body::HttpBody::size_hint(&body).exact(), limit)
        .await;
    let bytes: Bytes = match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError::too_large(flavor, limit));
        }
        Err(err) => {
            return Err(ApiError::invalid(
                flavor,
                format!("cannot read the request body: {err}"),
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|err| ApiError::bad_json(flavor, &err))
}

/// A responder for a new request of this connection, and where its answer
/// arrives.
fn responder(conn: &ConnState) -> (Responder, mpsc::UnboundedReceiver<ServerMessage>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
    (Responder::new(id, tx), rx)
}

/// The error for an answer of the wrong kind (or none: the pool is gone).
fn unexpected(answer: Option<ServerMessage>) -> RequestError {
    match answer {
        Some(ServerMessage::Error { error, .. }) => error,
        None => RequestError::ShuttingDown,
        Some(other) => RequestError::Internal {
            message: format!("unexpected answer from the pool: {other:?}"),
        },
    }
}

async fn status(conn: &ConnState) -> Result<PoolStatus, RequestError> {
    let (responder, mut answers) = responder(conn);
    if let Err(mpsc::error::SendError(msg)) = conn.pool.send(PoolMsg::Status { responder }).await {
        msg.refuse(RequestError::ShuttingDown);
    }
    match answers.recv().await {
        Some(ServerMessage::Status { status, .. }) => Ok(*status),
        other => Err(unexpected(other)),
    }
}

/// Runs an OpenAI request's `texts` through the pool in requests of at most
/// `max_texts` each, run side by side, and joins the answers in order.
/// LangChain's `OpenAIEmbeddings` sends up to 1000 inputs at a time by
/// default; OpenAI takes 2048. The parts are ordinary pool requests of this
/// connection (its lane of the fair queue, its in-transit places), so
/// nothing is queued anywhere but in the pool; the first part that fails
/// fails the whole request, and the others are dropped (their handlers
/// abort, which tells the pool).
async fn embed_in_parts(
    conn: &Arc<ConnState>,
    flavor: Flavor,
    headers: &HeaderMap,
    texts: Vec<String>,
) -> Result<(EmbedResult, Timing), ApiError> {
    let part_len = conn.config().max_texts.max(1);
    if texts.len() <= part_len {
        return embed(conn, flavor, headers, texts).await;
    }
    let mut parts = tokio::task::JoinSet::new();
    let mut texts = texts.into_iter();
    let mut index = 0;
    loop {
        let part: Vec<String> = texts.by_ref().take(part_len).collect();
        if part.is_empty() {
            break;
        }
        let (conn, headers) = (Arc::clone(conn), headers.clone());
        parts.spawn(async move { (index, embed(&conn, flavor, &headers, part).await) });
        index += 1;
    }
    let mut answers = Vec::with_capacity(index);
    while let Some(joined) = parts.join_next().await {
        let (index, answer) = joined.map_err(|err| {
            ApiError::from_request(
                flavor,
                &RequestError::Internal {
                    message: format!("a part of the request failed: {err}"),
                },
            )
        })?;
        answers.push((index, answer?));
    }
    answers.sort_by_key(|(index, _)| *index);
    let mut joined: Option<(EmbedResult, Timing)> = None;
    for (_, (result, timing)) in answers {
        match &mut joined {
            None => joined = Some((result, timing)),
            Some((all, total)) => {
                all.embeddings.extend(result.embeddings);
                all.truncated.extend(result.truncated);
                all.token_counts.extend(result.token_counts);
                // The parts ran side by side: the slowest says how long.
                total.queue_us = total.queue_us.max(timing.queue_us);
                total.inference_us = total.inference_us.max(timing.inference_us);
            }
        }
    }
    joined.ok_or_else(|| ApiError::invalid(flavor, "no inputs"))
}

/// Runs `texts` through the pool as one embed request, as a native
/// `Embed` frame would be, with the deadline from [`TIMEOUT_HEADER`].
async fn embed(
    conn: &ConnState,
    flavor: Flavor,
    headers: &HeaderMap,
    texts: Vec<String>,
) -> Result<(EmbedResult, Timing), ApiError> {
    match run(conn, flavor, headers, Task::Embed, texts).await? {
        (ServerMessage::Embeddings { result, .. }, timing) => {
            conn.shared
                .learn_dims(&model_name(&conn.config()), result.dims);
            Ok((result, timing))
        }
        (other, _) => Err(ApiError::from_request(flavor, &unexpected(Some(other)))),
    }
}

/// Runs `texts` through the pool as one request for `task`, with the
/// deadline from [`TIMEOUT_HEADER`]; the pool's answer and its timing.
async fn run(
    conn: &ConnState,
    flavor: Flavor,
    headers: &HeaderMap,
    task: Task,
    texts: Vec<String>,
) -> Result<(ServerMessage, Timing), ApiError> {
    let deadline = match headers.get(TIMEOUT_HEADER) {
        None => None,
        Some(value) => match value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            Some(ms) => Some(Duration::from_millis(ms)),
            None => {
                return Err(ApiError::invalid(
                    flavor,
                    format!("{TIMEOUT_HEADER} must be a whole number of milliseconds"),
                ))
            }
        },
    };
    let fail = |error: RequestError| ApiError::from_request(flavor, &error);
    if conn.shutdown.is_cancelled() {
        return Err(fail(RequestError::ShuttingDown));
    }
    let Ok(ticket) = Arc::clone(&conn.in_transit).acquire_owned().await else {
        return Err(fail(RequestError::ShuttingDown));
    };
    let (responder, mut answers) = responder(conn);
    let abandoned = AbandonGuard {
        pool: &conn.pool,
        conn: conn.client.conn,
        armed: true,
    };
    let msg = PoolMsg::Embed {
        ticket,
        client: conn.client,
        task,
        texts: Arc::from(texts),
        deadline,
        responder,
    };
    if let Err(mpsc::error::SendError(msg)) = conn.pool.send(msg).await {
        msg.refuse(RequestError::ShuttingDown);
    }
    let answer = answers.recv().await;
    abandoned.disarm();
    match answer {
        Some(answer @ ServerMessage::Embeddings { timing, .. })
        | Some(answer @ ServerMessage::Tokens { timing, .. }) => Ok((answer, timing)),
        other => Err(fail(unexpected(other))),
    }
}

/// Tells the pool at once when a handler is dropped while its request is
/// queued (the client went away mid-request and hyper dropped the handler),
/// so the pool drops the request unrun, as for a native client that leaves.
struct AbandonGuard<'a> {
    /// The pool.
    pool: &'a mpsc::Sender<PoolMsg>,
    /// The connection.
    conn: u64,
    /// False once the answer arrived.
    armed: bool,
}

impl AbandonGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for AbandonGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            debug!("HTTP client gone; dropping its queued request");
            // A full channel is not worth waiting for: the pool also sees
            // the dropped responder on its next tick.
            let _ = self
                .pool
                .try_send(PoolMsg::Disconnected { conn: self.conn });
        }
    }
}

/// Adds TEI's timing headers (milliseconds) to an embedding answer.
fn timed(mut response: Response, started: Instant, tokens: u64, timing: Timing) -> Response {
    let total_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    let headers = response.headers_mut();
    headers.insert("x-total-time", HeaderValue::from(total_ms));
    headers.insert("x-queue-time", HeaderValue::from(timing.queue_us / 1000));
    headers.insert(
        "x-inference-time",
        HeaderValue::from(timing.inference_us / 1000),
    );
    headers.insert("x-compute-tokens", HeaderValue::from(tokens));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_name_is_the_directory_of_a_generic_file() {
        let mut config = crate::config::Config {
            model: "/m/all-MiniLM-L6-v2/model.onnx".into(),
            ..Default::default()
        };
        assert_eq!(model_name(&config), "all-MiniLM-L6-v2");
        config.model = "/m/minilm-int8.onnx".into();
        assert_eq!(model_name(&config), "minilm-int8");
    }

    #[test]
    fn normalizing_gives_unit_length() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut zero = vec![0.0; 3];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0; 3]);
    }
}
