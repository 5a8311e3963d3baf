//! text-embeddings-inference's routes: `/embed`, `/tokenize`, `/info`,
//! `/health`, and `/metrics`.

use super::*;

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

pub(super) async fn tei_embed(State(conn): Conn, headers: HeaderMap, body: Body) -> Response {
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

pub(super) async fn tei_tokenize(State(conn): Conn, headers: HeaderMap, body: Body) -> Response {
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

pub(super) async fn info(State(conn): Conn) -> Json<Value> {
    let config = conn.config();
    let config = &config;
    let model = model_name(config);
    // The limits in force: "auto" ones exist only once derived by the pool.
    let memory = status(&conn).await.ok().map(|s| {
        json!({
            "soft_limit_bytes": s.soft_limit_bytes,
            "hard_limit_bytes": s.hard_limit_bytes,
            "limits_origin": s.limits_origin,
            "spare_workers": s.target_spares,
            "cgroups": s.cgroups,
        })
    });
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
        "memory": memory,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

pub(super) async fn health(State(conn): Conn) -> Response {
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

pub(super) async fn metrics(State(conn): Conn) -> Response {
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
