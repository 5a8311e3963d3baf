//! HTTP error answers, in the two shapes clients expect.
//!
//! Routes under `/v1/` answer like OpenAI's API (`{"error": {"message",
//! "type", "code"}}`), so the `openai` Python client raises its own typed
//! exceptions; every other route answers like text-embeddings-inference
//! (`{"error", "error_type"}`). The status codes follow TEI's router: 422
//! for a request that fails validation on its routes (OpenAI clients expect
//! 400), 429 with `Retry-After` when the queue is full, 503 while nothing
//! can serve (with `Retry-After` when the connection caps are reached), 504
//! past the deadline, 401 for a TCP request without a valid key.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use inferd_proto::RequestError;
use serde_json::json;

/// Which API's error body to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI's shape, for `/v1/*`.
    OpenAi,
    /// text-embeddings-inference's shape, for everything else.
    Tei,
}

impl Flavor {
    /// The flavor of the route at `path`.
    pub fn of_path(path: &str) -> Self {
        if path == "/v1" || path.starts_with("/v1/") {
            Self::OpenAi
        } else {
            Self::Tei
        }
    }
}

/// One error answer: status, message and machine-readable kind.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Body shape.
    pub flavor: Flavor,
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// OpenAI `type` / TEI `error_type`.
    pub kind: &'static str,
    /// OpenAI `code` (TEI has none); `None` writes `null`.
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying, sent as `Retry-After`.
    pub retry_after: Option<u32>,
}

impl ApiError {
    /// An error with `status` and `message`, typed `kind`.
    pub fn new(flavor: Flavor, status: StatusCode, kind: &'static str, message: String) -> Self {
        Self {
            flavor,
            status,
            message,
            kind,
            code: None,
            retry_after: None,
        }
    }

    /// The request is invalid: 400 on OpenAI routes, 422 (TEI's validation
    /// error) elsewhere.
    pub fn invalid(flavor: Flavor, message: impl Into<String>) -> Self {
        match flavor {
            Flavor::OpenAi => Self::new(
                flavor,
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                message.into(),
            ),
            Flavor::Tei => Self::new(
                flavor,
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation",
                message.into(),
            ),
        }
    }

    /// The body is not JSON of the expected shape: 400 on OpenAI routes
    /// (`invalid_json`), TEI's 422 elsewhere.
    pub fn bad_json(flavor: Flavor, problem: &serde_json::Error) -> Self {
        if problem.is_data() {
            // Valid JSON, wrong shape or a value out of range.
            return Self::invalid(
                flavor,
                format!("the request body is not the JSON this route takes: {problem}"),
            );
        }
        Self::invalid(
            flavor,
            format!("the request body is not valid JSON: {problem}"),
        )
        .with_code("invalid_json")
    }

    /// The body is larger than `max_frame_bytes`.
    pub fn too_large(flavor: Flavor, limit: usize) -> Self {
        Self::new(
            flavor,
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body is larger than {limit} bytes (max_frame_bytes)"),
        )
        .with_code("payload_too_large")
    }

    /// Sets the OpenAI `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The answer to a request the pool (or the access policy) refused.
    pub fn from_request(flavor: Flavor, error: &RequestError) -> Self {
        let message = error.to_string();
        let kind = error.kind().as_str();
        let (status, kind) = match error {
            RequestError::BadRequest { .. } => {
                return Self::invalid(flavor, message).with_code(kind);
            }
            RequestError::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, kind),
            RequestError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, kind),
            RequestError::WorkerLost { .. } => (StatusCode::INTERNAL_SERVER_ERROR, kind),
            RequestError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, kind),
            RequestError::Unavailable { .. } => (StatusCode::SERVICE_UNAVAILABLE, kind),
            RequestError::TooManyConnections { .. } => (StatusCode::SERVICE_UNAVAILABLE, kind),
            RequestError::PermissionDenied { .. } => (StatusCode::FORBIDDEN, kind),
            // Only a roll asks for it; no HTTP route does.
            RequestError::RollFailed { .. } | RequestError::Internal { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, kind)
            }
        };
        let mut answer = Self::new(flavor, status, kind, message).with_code(kind);
        if matches!(
            error,
            RequestError::Overloaded { .. } | RequestError::TooManyConnections { .. }
        ) {
            // The queue drains, and connections close, in milliseconds to
            // seconds; one second is what TEI's clients and the openai
            // client's backoff expect.
            answer.retry_after = Some(1);
        }
        answer
    }

    /// A TCP request without a valid API key: 401, shaped as OpenAI's own
    /// (`invalid_api_key`), so its client raises `AuthenticationError`.
    pub fn unauthorized(flavor: Flavor) -> Self {
        let message = "missing or invalid API key: send `Authorization: Bearer KEY` with a key \
                       from the daemon's api_keys_file"
            .to_owned();
        let kind = match flavor {
            Flavor::OpenAi => "invalid_request_error",
            Flavor::Tei => "unauthorized",
        };
        Self::new(flavor, StatusCode::UNAUTHORIZED, kind, message).with_code("invalid_api_key")
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        match self.flavor {
            Flavor::OpenAi => json!({
                "error": {
                    "message": self.message,
                    "type": self.kind,
                    "code": self.code,
                }
            }),
            Flavor::Tei => json!({
                "error": self.message,
                "error_type": self.kind,
            }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_error_has_its_status_and_shape() {
        let cases = [
            (
                RequestError::BadRequest { reason: "x".into() },
                StatusCode::BAD_REQUEST,
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                RequestError::Overloaded { capacity: 3 },
                StatusCode::TOO_MANY_REQUESTS,
                StatusCode::TOO_MANY_REQUESTS,
            ),
            (
                RequestError::Timeout { elapsed_ms: 9 },
                StatusCode::GATEWAY_TIMEOUT,
                StatusCode::GATEWAY_TIMEOUT,
            ),
            (
                RequestError::WorkerLost { deaths: 2 },
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
            (
                RequestError::ShuttingDown,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                RequestError::Unavailable { reason: "x".into() },
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                RequestError::TooManyConnections { reason: "x".into() },
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
            ),
            (
                RequestError::PermissionDenied { reason: "x".into() },
                StatusCode::FORBIDDEN,
                StatusCode::FORBIDDEN,
            ),
            (
                RequestError::Internal {
                    message: "x".into(),
                },
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::INTERNAL_SERVER_ERROR,
            ),
        ];
        for (error, openai, tei) in cases {
            let a = ApiError::from_request(Flavor::OpenAi, &error);
            assert_eq!(a.status, openai, "{error:?}");
            let body = a.body();
            assert_eq!(body["error"]["message"], error.to_string());
            assert!(body["error"]["type"].is_string(), "{body}");
            assert_eq!(body["error"]["code"], error.kind().as_str());
            let t = ApiError::from_request(Flavor::Tei, &error);
            assert_eq!(t.status, tei, "{error:?}");
            let body = t.body();
            assert_eq!(body["error"], error.to_string());
            assert!(body["error_type"].is_string(), "{body}");
            let retry = a
                .into_response()
                .headers()
                .get(header::RETRY_AFTER)
                .cloned();
            assert_eq!(
                retry.is_some(),
                matches!(
                    error,
                    RequestError::Overloaded { .. } | RequestError::TooManyConnections { .. }
                ),
                "Retry-After only where waiting helps: {error:?}"
            );
        }
        assert_eq!(
            ApiError::from_request(Flavor::Tei, &RequestError::WorkerLost { deaths: 2 }).kind,
            "worker_lost"
        );
    }

    #[test]
    fn flavor_follows_the_path() {
        assert_eq!(Flavor::of_path("/v1/embeddings"), Flavor::OpenAi);
        assert_eq!(Flavor::of_path("/v1"), Flavor::OpenAi);
        assert_eq!(Flavor::of_path("/v10"), Flavor::Tei);
        assert_eq!(Flavor::of_path("/embed"), Flavor::Tei);
    }
}
