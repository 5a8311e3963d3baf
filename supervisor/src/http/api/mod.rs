//! The HTTP routes: each one a translation into a pool message and back.
//!
//! | route | answers |
//! |---|---|
//! | `POST /v1/embeddings` | OpenAI's embeddings API (float or base64; text or cl100k_base token ids) |
//! | `GET /v1/models` | OpenAI's model list: the served model and its aliases |
//! | `POST /embed` | text-embeddings-inference's `[[f32]]` |
//! | `POST /tokenize` | TEI's tokens, as the model's tokenizer makes them |
//! | `GET /info` | model name, dims (once known), request limits, memory limits (and how "auto" derived them), version |
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

mod openai;
mod tei;

use openai::{openai_embeddings, openai_models};
use tei::{health, info, metrics, tei_embed, tei_tokenize};

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

fn l2_normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
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
