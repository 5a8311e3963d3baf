//! The HTTP API on the client socket, driven by real `curl --unix-socket`
//! and, where curl makes a case awkward (keep-alive, a client that stops
//! halfway through its headers, concurrent requests), by raw HTTP/1.1 over
//! a Unix stream. Vectors are checked against the onnxruntime fixture.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use inferd_tests::{
    max_abs_diff, model_files, reference, test_model_name, Daemon, DaemonConfig, POLL_INTERVAL,
    TOLERANCE,
};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Bound on any one HTTP exchange in these tests.
const EXCHANGE: Duration = Duration::from_secs(30);

/// One HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header lines, lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    /// Asserts the status and OpenAI's error shape; returns the error object.
    fn openai_error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        let error = body["error"].clone();
        assert!(error["message"].is_string(), "{body}");
        assert!(error["type"].is_string(), "{body}");
        assert!(error.get("code").is_some(), "{body}");
        error
    }

    /// Asserts the status and TEI's error shape; returns the body.
    fn tei_error(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "{self:?}");
        let body = self.json();
        assert!(body["error"].is_string(), "{body}");
        assert!(body["error_type"].is_string(), "{body}");
        body
    }
}

/// Parses a whole response (head and body).
fn parse_answer(raw: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `curl --unix-socket` to `path` (GET, or POST of `body` as JSON) with
/// extra arguments.
fn curl(socket: &Path, method: &str, path: &str, body: Option<&[u8]>, extra: &[&str]) -> Answer {
    let unix = ["--unix-socket", socket.to_str().expect("a UTF-8 path")];
    curl_at(
        "http://localhost",
        &[&unix[..], extra].concat(),
        method,
        path,
        body,
    )
}

/// `curl` over TCP to `base` (`http://127.0.0.1:PORT`).
fn curl_tcp(base: &str, method: &str, path: &str, body: Option<&[u8]>, extra: &[&str]) -> Answer {
    curl_at(base, extra, method, path, body)
}

fn curl_at(base: &str, args: &[&str], method: &str, path: &str, body: Option<&[u8]>) -> Answer {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cmd = Command::new("/usr/bin/curl");
    cmd.args(["-sS", "-i", "--max-time", "30", "-X", method])
        .args(args);
    if let Some(body) = body {
        let file = dir.path().join("body.json");
        std::fs::write(&file, body).expect("write body");
        cmd.args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", file.display()));
    }
    let out = cmd
        .arg(format!("{base}{path}"))
        .output()
        .expect("curl runs");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_answer(&out.stdout)
}

fn post(socket: &Path, path: &str, body: &Value) -> Answer {
    curl(socket, "POST", path, Some(body.to_string().as_bytes()), &[])
}

fn get(socket: &Path, path: &str) -> Answer {
    curl(socket, "GET", path, None, &[])
}

/// Reads one response from a raw connection (`Content-Length` bodies).
async fn read_answer(stream: &mut UnixStream) -> Answer {
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = parse_answer(&buf[..end + 4]);
                let len: usize = head
                    .header("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return parse_answer(&buf[..end + 4 + len]);
                }
            }
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed mid-answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(EXCHANGE, read)
        .await
        .expect("an answer within the bound")
}

/// A raw request with a JSON body.
fn raw_post(path: &str, body: &Value, extra_headers: &str) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn vector_of(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// A daemon with the reference fixture's settings.
async fn reference_daemon() -> Daemon {
    let reference = reference();
    Daemon::start(
        DaemonConfig::new()
            .max_seq_len(reference.max_seq_len)
            .normalize(reference.normalize),
    )
    .await
}

#[tokio::test]
async fn openai_embeddings_match_onnxruntime_in_float_and_base64() {
    let daemon = reference_daemon().await;
    let socket = daemon.socket_path();
    let reference = reference();
    let want = reference.model(&test_model_name());
    let texts: Vec<&str> = want.embeddings.iter().map(|e| e.text.as_str()).collect();
    let model = test_model_name();

    let float = post(
        socket,
        "/v1/embeddings",
        &json!({"input": texts, "model": model}),
    );
    assert_eq!(float.status, 200, "{float:?}");
    let body = float.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], model.as_str());
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), texts.len());
    for (i, (item, expected)) in data.iter().zip(&want.embeddings).enumerate() {
        assert_eq!(item["object"], "embedding");
        assert_eq!(item["index"], i);
        let diff = max_abs_diff(&vector_of(&item["embedding"]), &expected.vector);
        assert!(diff <= TOLERANCE, "text {i}: max abs diff {diff}");
    }
    let tokens: u64 = want
        .embeddings
        .iter()
        .map(|e| u64::from(e.token_count))
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"], tokens, "{}", body["usage"]);
    assert_eq!(body["usage"]["total_tokens"], tokens);
    assert_eq!(
        float.header("x-compute-tokens"),
        Some(tokens.to_string().as_str())
    );
    assert!(
        float.header("x-total-time").is_some(),
        "{:?}",
        float.headers
    );

    let b64 = post(
        socket,
        "/v1/embeddings",
        &json!({"input": texts[0], "model": model, "encoding_format": "base64", "user": "u1"}),
    );
    assert_eq!(b64.status, 200, "{b64:?}");
    let body = b64.json();
    let encoded = body["data"][0]["embedding"]
        .as_str()
        .expect("a base64 string");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("valid base64");
    let vector: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let diff = max_abs_diff(&vector, &want.embeddings[0].vector);
    assert!(diff <= TOLERANCE, "base64: max abs diff {diff}");

    // The model's own size is accepted as `dimensions`; others are not.
    let dims = want.dims;
    let ok = post(
        socket,
        "/v1/embeddings",
        &json!({"input": "a", "dimensions": dims}),
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    let err = post(
        socket,
        "/v1/embeddings",
        &json!({"input": "a", "dimensions": 64}),
    )
    .openai_error(400);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Matryoshka"),
        "{err}"
    );
}

#[tokio::test]
async fn tei_embed_matches_onnxruntime_and_refuses_cut_inputs_without_truncation() {
    let daemon = reference_daemon().await;
    let socket = daemon.socket_path();
    let reference = reference();
    let want = reference.model(&test_model_name());
    let texts: Vec<&str> = want.embeddings.iter().map(|e| e.text.as_str()).collect();

    let answer = post(socket, "/embed", &json!({"inputs": texts}));
    assert_eq!(answer.status, 200, "{answer:?}");
    let vectors = answer.json();
    let vectors = vectors.as_array().expect("[[f32]]");
    assert_eq!(vectors.len(), texts.len());
    for (i, (got, expected)) in vectors.iter().zip(&want.embeddings).enumerate() {
        let diff = max_abs_diff(&vector_of(got), &expected.vector);
        assert!(diff <= TOLERANCE, "text {i}: max abs diff {diff}");
    }
    let single = post(
        socket,
        "/embed",
        &json!({"inputs": texts[0], "normalize": true, "truncate": true, "truncation_direction": "Right"}),
    );
    assert_eq!(single.status, 200, "{single:?}");
    assert_eq!(single.json().as_array().map(Vec::len), Some(1));
    assert!(single.header("x-compute-tokens").is_some(), "{single:?}");

    let cut = want
        .embeddings
        .iter()
        .find(|e| e.truncated)
        .expect("the fixture has a truncated text");
    let refused = post(
        socket,
        "/embed",
        &json!({"inputs": [cut.text], "truncate": false}),
    )
    .tei_error(413);
    assert_eq!(refused["error_type"], "validation");
    let left = post(
        socket,
        "/embed",
        &json!({"inputs": "x", "truncation_direction": "Left"}),
    );
    left.tei_error(422);
}

#[tokio::test]
async fn errors_have_the_shape_and_status_of_their_route() {
    let daemon = Daemon::start(DaemonConfig::new().max_texts(2).max_frame_bytes(64 * 1024)).await;
    let socket = daemon.socket_path();

    let err = post(
        socket,
        "/v1/embeddings",
        &json!({"input": "a", "model": "gpt-4"}),
    )
    .openai_error(404);
    assert_eq!(err["code"], "model_not_found", "{err}");

    let bad = curl(socket, "POST", "/v1/embeddings", Some(b"{\"input\": "), &[]);
    let err = bad.openai_error(400);
    assert!(
        err["message"].as_str().unwrap_or_default().contains("JSON"),
        "{err}"
    );
    let bad = curl(socket, "POST", "/embed", Some(b"[1, 2"), &[]);
    let body = bad.tei_error(422);
    assert!(
        body["error"].as_str().unwrap_or_default().contains("JSON"),
        "{body}"
    );
    let missing = post(socket, "/embed", &json!({"texts": ["a"]}));
    let body = missing.tei_error(422);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("inputs"),
        "{body}"
    );

    // More inputs than max_texts: OpenAI's route runs them in parts (as
    // LangChain sends up to 1000 at once), in order; TEI's refuses them.
    let texts = ["a", "b", "c", "d", "e"];
    let many = post(socket, "/v1/embeddings", &json!({"input": texts}));
    assert_eq!(many.status, 200, "{many:?}");
    let data = many.json()["data"].clone();
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(data[i]["index"], i);
        let alone = post(socket, "/v1/embeddings", &json!({"input": text})).json();
        let diff = max_abs_diff(
            &vector_of(&data[i]["embedding"]),
            &vector_of(&alone["data"][0]["embedding"]),
        );
        assert!(diff <= TOLERANCE, "input {i} out of place: {diff}");
    }
    let too_many = vec!["a"; 2049];
    let err = post(socket, "/v1/embeddings", &json!({"input": too_many})).openai_error(400);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .contains("limit is 2048"),
        "{err}"
    );
    let body = post(socket, "/embed", &json!({"inputs": ["a", "b", "c"]})).tei_error(422);
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("limit is 2"),
        "{body}"
    );

    let ids = post(
        socket,
        "/v1/embeddings",
        &json!({"input": [[1, 2], [3, 999_999_999]]}),
    );
    let err = ids.openai_error(400);
    let message = err["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("999999999") && message.contains("check_embedding_ctx_length=False"),
        "{err}"
    );
    post(socket, "/embed", &json!({"inputs": [[1, 2]]})).tei_error(422);

    let huge = json!({"input": "x".repeat(100 * 1024)}).to_string();
    curl(socket, "POST", "/v1/embeddings", Some(huge.as_bytes()), &[]).openai_error(413);
    curl(socket, "POST", "/embed", Some(huge.as_bytes()), &[]).tei_error(413);

    get(socket, "/nowhere").tei_error(404);
    get(socket, "/v1/nowhere").openai_error(404);
    get(socket, "/v1/embeddings").openai_error(405);
    curl(socket, "DELETE", "/health", None, &[]).tei_error(405);

    let bad_deadline = curl(
        socket,
        "POST",
        "/v1/embeddings",
        Some(br#"{"input": "a"}"#),
        &["-H", "X-Request-Timeout-Ms: soon"],
    );
    bad_deadline.openai_error(400);

    // Still serving after all that.
    let ok = post(socket, "/v1/embeddings", &json!({"input": ["a", "b"]}));
    assert_eq!(ok.status, 200, "{ok:?}");
}

#[tokio::test]
async fn timeouts_overload_and_lost_workers_reach_http_clients() {
    let daemon = Daemon::start(
        DaemonConfig::new()
            .workers(1)
            .queue_capacity(1)
            .request_timeout(Duration::from_secs(2))
            .crash_marker("boom")
            .hang_marker("hang"),
    )
    .await;
    let socket = daemon.socket_path().to_owned();

    // One request hangs the only worker, one waits in the queue (capacity
    // 1), and the next finds the queue full.
    let mut hung = Vec::new();
    for _ in 0..2 {
        let mut stream = UnixStream::connect(&socket).await.expect("connect");
        stream
            .write_all(&raw_post(
                "/v1/embeddings",
                &json!({"input": "hang"}),
                "X-Request-Timeout-Ms: 5000\r\n",
            ))
            .await
            .expect("write");
        hung.push(stream);
        let started = Instant::now();
        while daemon.status().await.counters.requests_accepted < hung.len() as u64 {
            assert!(started.elapsed() < EXCHANGE, "request not accepted");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    let full = post(&socket, "/embed", &json!({"inputs": "x"}));
    let body = full.tei_error(429);
    assert_eq!(body["error_type"], "overloaded");
    assert_eq!(full.header("retry-after"), Some("1"), "{full:?}");
    for mut stream in hung {
        let answer = read_answer(&mut stream).await;
        let err = answer.openai_error(504);
        assert_eq!(err["code"], "timeout", "{err}");
    }

    let lost = curl(
        &socket,
        "POST",
        "/v1/embeddings",
        Some(br#"{"input": ["boom"]}"#),
        &[],
    );
    let err = lost.openai_error(500);
    assert_eq!(err["type"], "worker_lost", "{err}");
}

#[tokio::test]
async fn health_info_models_and_metrics() {
    let daemon = reference_daemon().await;
    let socket = daemon.socket_path();
    let model = test_model_name();

    let health = get(socket, "/health");
    assert_eq!(health.status, 200, "{health:?}");
    assert_eq!(health.json(), json!({"status": "ok"}));

    let models = get(socket, "/v1/models");
    assert_eq!(models.status, 200);
    let body = models.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], model.as_str(), "{body}");
    assert_eq!(body["data"][0]["object"], "model");

    // dims are known once a worker answered.
    let ok = post(socket, "/embed", &json!({"inputs": "hello"}));
    assert_eq!(ok.status, 200, "{ok:?}");
    let info = get(socket, "/info");
    assert_eq!(info.status, 200);
    let body = info.json();
    assert_eq!(body["model_id"], model.as_str(), "{body}");
    assert_eq!(body["dims"], reference().model(&model).dims, "{body}");
    assert_eq!(body["max_seq_len"], reference().max_seq_len, "{body}");
    for key in ["max_texts", "max_text_bytes", "max_frame_bytes", "version"] {
        assert!(!body[key].is_null(), "{key} missing: {body}");
    }
    // The fixture leaves the limits "auto": derived from the first worker.
    let memory = &body["memory"];
    assert!(memory["hard_limit_bytes"].as_u64().is_some(), "{body}");
    assert!(
        memory["limits_origin"]
            .as_str()
            .is_some_and(|o| o.starts_with("auto: baseline")),
        "{body}"
    );

    let metrics = get(socket, "/metrics");
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(
        metrics
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{:?}",
        metrics.headers
    );
    let exposition = openmetrics_parser::prometheus::parse_prometheus(&metrics.body)
        .unwrap_or_else(|e| panic!("not valid Prometheus text: {e:?}\n{}", metrics.body));
    assert!(exposition.families.contains_key("inferd_requests_ok_total"));
    let ok_line = metrics
        .body
        .lines()
        .find(|l| l.starts_with("inferd_requests_ok_total "))
        .expect("ok counter sample");
    let served: f64 = ok_line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("value");
    assert!(served >= 1.0, "HTTP requests count as requests: {ok_line}");
}

#[tokio::test]
async fn metrics_need_control_access() {
    let own = nix::unistd::getuid().as_raw();
    let daemon = Daemon::start(
        DaemonConfig::new()
            .workers(1)
            .with(|c| c.access.control_uids = vec![own + 4242]),
    )
    .await;
    let body = get(daemon.socket_path(), "/metrics").tei_error(403);
    assert_eq!(body["error_type"], "permission_denied", "{body}");
    assert_eq!(get(daemon.socket_path(), "/health").status, 200);
}

#[tokio::test]
async fn health_is_503_while_no_worker_can_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such-model.onnx");
    let daemon = Daemon::spawn(DaemonConfig::with_model((
        missing,
        dir.path().join("tokenizer.json"),
    )));
    daemon
        .wait_for(|s| s.unavailable_reason.is_some(), Duration::from_secs(60))
        .await;
    let health = get(daemon.socket_path(), "/health");
    let body = health.tei_error(503);
    assert_eq!(body["error_type"], "unhealthy");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no-such-model.onnx"),
        "{body}"
    );
    let embed = post(
        daemon.socket_path(),
        "/v1/embeddings",
        &json!({"input": "a"}),
    );
    let err = embed.openai_error(503);
    assert_eq!(err["code"], "unavailable", "{err}");

    // The same daemon with a real model is healthy.
    let healthy =
        Daemon::start(DaemonConfig::with_model(model_files(&test_model_name())).workers(1)).await;
    assert_eq!(get(healthy.socket_path(), "/health").status, 200);
}

#[tokio::test]
async fn keep_alive_and_native_clients_share_the_socket() {
    let daemon = Daemon::start(DaemonConfig::new()).await;
    let socket = daemon.socket_path().to_owned();
    let mut native = daemon.client().await;

    let mut stream = UnixStream::connect(&socket).await.expect("connect");
    for round in 0..3 {
        stream
            .write_all(&raw_post(
                "/v1/embeddings",
                &json!({"input": format!("text {round}")}),
                "",
            ))
            .await
            .expect("write");
        let answer = read_answer(&mut stream).await;
        assert_eq!(answer.status, 200, "round {round}: {answer:?}");
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        assert_eq!(read_answer(&mut stream).await.status, 200, "round {round}");
        // A native client on the same socket, between HTTP requests of a
        // connection that stays open.
        let result = native
            .embed(vec![format!("native {round}")], None)
            .await
            .expect("native embed");
        assert_eq!(result.embeddings.len(), 1);
    }

    // Native and HTTP requests interleaved from concurrent tasks.
    let http = tokio::spawn({
        let socket = socket.clone();
        async move {
            let mut stream = UnixStream::connect(&socket).await.expect("connect");
            for i in 0..20 {
                stream
                    .write_all(&raw_post(
                        "/embed",
                        &json!({"inputs": [format!("h{i}")]}),
                        "",
                    ))
                    .await
                    .expect("write");
                assert_eq!(read_answer(&mut stream).await.status, 200);
            }
        }
    });
    for i in 0..20 {
        native
            .embed(vec![format!("n{i}")], None)
            .await
            .expect("native embed during HTTP traffic");
    }
    tokio::time::timeout(EXCHANGE, http)
        .await
        .expect("HTTP task done in time")
        .expect("HTTP task");
}

#[tokio::test]
async fn slow_header_clients_are_cut_while_others_are_served() {
    let daemon = Daemon::start(DaemonConfig::new().workers(1)).await;
    let socket = daemon.socket_path().to_owned();

    let mut slow = UnixStream::connect(&socket).await.expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\n")
        .await
        .expect("write");
    let started = Instant::now();

    // Others are served meanwhile.
    let health = get(&socket, "/health");
    assert_eq!(health.status, 200);

    // The header timeout is 5 s; the connection must be closed by 10 s.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(closed, Ok(Ok(_)) | Ok(Err(_))),
        "a client that never finished its head is still connected after {elapsed:?}"
    );
    assert!(
        elapsed >= Duration::from_secs(4),
        "cut at {elapsed:?}, before the header timeout"
    );
    // Whatever was sent before closing (hyper may answer 408) is not a
    // successful answer.
    assert!(
        !String::from_utf8_lossy(&rest).contains(" 200 "),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(get(&socket, "/health").status, 200);
}

/// A loopback port nobody listens on now (the daemon binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits (bounded) until the daemon's TCP listener answers `/health`.
async fn wait_tcp_health(base: &str) {
    let deadline = Instant::now() + EXCHANGE;
    loop {
        let out = Command::new("/usr/bin/curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "5",
            ])
            .arg(format!("{base}/health"))
            .output()
            .expect("curl runs");
        if out.stdout == b"200" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "TCP listener never became healthy"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test]
async fn tcp_listener_needs_a_key_and_serves_the_same_api() {
    let key = "test-key-0123456789abcdef";
    let keys_dir = tempfile::tempdir().expect("temp dir");
    let keys_file = keys_dir.path().join("api-keys");
    std::fs::write(&keys_file, format!("# CI\n{key}\n")).expect("write keys");
    std::fs::set_permissions(&keys_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let port = free_port();
    let reference = reference();
    let daemon = Daemon::start(
        DaemonConfig::new()
            .max_seq_len(reference.max_seq_len)
            .normalize(reference.normalize)
            .with(|c| {
                c.http_listen = Some(([127, 0, 0, 1], port).into());
                c.api_keys_file = Some(keys_file.clone());
            }),
    )
    .await;
    let base = format!("http://127.0.0.1:{port}");
    wait_tcp_health(&base).await;
    let want = reference.model(&test_model_name());
    let texts: Vec<&str> = want.embeddings.iter().map(|e| e.text.as_str()).collect();
    let body = json!({"input": texts}).to_string();
    let body = body.as_bytes();
    let bearer = format!("Authorization: Bearer {key}");
    let json = ["-H", "content-type: application/json"];

    // No key, a wrong key, another scheme: 401 in the route's shape.
    let none = curl_tcp(&base, "POST", "/v1/embeddings", Some(body), &json);
    let err = none.openai_error(401);
    assert_eq!(err["code"], "invalid_api_key", "{err}");
    assert_eq!(none.header("www-authenticate"), Some("Bearer"));
    let wrong = ["-H", "Authorization: Bearer test-key-0123456789abcdeX"];
    curl_tcp(
        &base,
        "POST",
        "/v1/embeddings",
        Some(body),
        &[&json[..], &wrong[..]].concat(),
    )
    .openai_error(401);
    let basic = ["-H", "Authorization: Basic dGVzdDp0ZXN0"];
    curl_tcp(&base, "GET", "/v1/models", None, &basic).openai_error(401);
    curl_tcp(&base, "GET", "/info", None, &[]).tei_error(401);
    curl_tcp(&base, "GET", "/metrics", None, &[]).tei_error(401);
    curl_tcp(&base, "GET", "/nowhere", None, &[]).tei_error(401);

    // With the key: the same answers as on the Unix socket.
    let with_key = ["-H", bearer.as_str()];
    let ok = curl_tcp(
        &base,
        "POST",
        "/v1/embeddings",
        Some(body),
        &[&json[..], &with_key[..]].concat(),
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    let data = ok.json()["data"].clone();
    for (i, expected) in want.embeddings.iter().enumerate() {
        let diff = max_abs_diff(&vector_of(&data[i]["embedding"]), &expected.vector);
        assert!(diff <= TOLERANCE, "text {i}: max abs diff {diff}");
    }
    let tei = json!({"inputs": texts[0]}).to_string();
    let tei = curl_tcp(
        &base,
        "POST",
        "/embed",
        Some(tei.as_bytes()),
        &[&json[..], &with_key[..]].concat(),
    );
    assert_eq!(tei.status, 200, "{tei:?}");
    let diff = max_abs_diff(&vector_of(&tei.json()[0]), &want.embeddings[0].vector);
    assert!(diff <= TOLERANCE, "/embed: max abs diff {diff}");
    let metrics = curl_tcp(&base, "GET", "/metrics", None, &with_key);
    assert_eq!(metrics.status, 200, "{metrics:?}");
    assert!(
        metrics.body.contains("inferd_requests_ok_total"),
        "{}",
        metrics.body
    );
    // The Unix socket needs no key.
    assert_eq!(get(daemon.socket_path(), "/info").status, 200);
}

#[test]
fn a_network_listener_without_keys_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("inferd.toml");
    let (model, tokenizer) = inferd_tests::default_model();
    std::fs::write(
        &config,
        format!(
            "socket = {:?}\nmodel = {:?}\ntokenizer = {:?}\nhttp_listen = \"0.0.0.0:{}\"\n",
            dir.path().join("s.sock"),
            model,
            tokenizer,
            free_port()
        ),
    )
    .expect("write config");
    let out = Command::new(inferd_tests::binary("inferd"))
        .arg("--config")
        .arg(&config)
        .output()
        .expect("inferd runs");
    assert!(!out.status.success(), "inferd must refuse to start");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("http_listen") && stderr.contains("api_keys_file"),
        "{stderr}"
    );
    assert!(!dir.path().join("s.sock").exists(), "nothing was served");
}

#[tokio::test]
async fn openai_token_ids_are_read_as_cl100k_and_aliases_name_the_model() {
    let reference = reference();
    let daemon = Daemon::start(
        DaemonConfig::new()
            .max_seq_len(reference.max_seq_len)
            .normalize(reference.normalize)
            .with(|c| c.model_aliases = vec!["text-embedding-3-small".to_owned()]),
    )
    .await;
    let socket = daemon.socket_path();
    let want = reference.model(&test_model_name());
    let cl100k = tiktoken_rs::cl100k_base().expect("bundled vocabulary");
    let ids: Vec<Vec<u32>> = want
        .embeddings
        .iter()
        .map(|e| cl100k.encode_ordinary(&e.text))
        .collect();
    // What LangChain's OpenAIEmbeddings sends by default: ids, an alias.
    let answer = post(
        socket,
        "/v1/embeddings",
        &json!({"input": ids, "model": "text-embedding-3-small", "encoding_format": "float"}),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let data = answer.json()["data"].clone();
    for (i, expected) in want.embeddings.iter().enumerate() {
        let diff = max_abs_diff(&vector_of(&data[i]["embedding"]), &expected.vector);
        assert!(
            diff <= TOLERANCE,
            "text {i} as cl100k ids: max abs diff {diff}"
        );
    }
    // One flat list is one input.
    let one = post(socket, "/v1/embeddings", &json!({"input": ids[0]}));
    assert_eq!(
        one.json()["data"].as_array().map(Vec::len),
        Some(1),
        "{one:?}"
    );
    let models = get(socket, "/v1/models").json();
    let names: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(
        names,
        [test_model_name().as_str(), "text-embedding-3-small"]
    );
}

#[tokio::test]
async fn answers_say_where_the_time_went() {
    let daemon = Daemon::start(DaemonConfig::new().workers(1)).await;
    let answer = post(
        daemon.socket_path(),
        "/embed",
        &json!({"inputs": ["where did the time go"]}),
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let ms = |name: &str| -> u64 {
        answer
            .header(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing or not a number: {:?}", answer.headers))
    };
    let (total, queue, inference) = (
        ms("x-total-time"),
        ms("x-queue-time"),
        ms("x-inference-time"),
    );
    assert!(
        queue + inference <= total + 1,
        "queue {queue} + inference {inference} > total {total}"
    );
    assert!(ms("x-compute-tokens") > 0);
}

#[tokio::test]
async fn refused_http_clients_get_an_http_answer() {
    let port = free_port();
    let daemon = Daemon::start(DaemonConfig::new().with(|c| {
        c.max_connections_per_uid = 1;
        c.http_listen = Some(([127, 0, 0, 1], port).into());
    }))
    .await;
    let socket = daemon.socket_path();
    let base = format!("http://127.0.0.1:{port}");
    wait_tcp_health(&base).await;
    // This uid's one place, held by a connection that has not spoken yet.
    let _held = UnixStream::connect(socket).await.expect("connect");
    let poll_refused = |path: &'static str| {
        let deadline = Instant::now() + EXCHANGE;
        loop {
            let answer = get(socket, path);
            if answer.status == 503 || Instant::now() > deadline {
                return answer;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    };
    let refused = poll_refused("/health");
    let body = refused.tei_error(503);
    assert_eq!(body["error_type"], "too_many_connections", "{body}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    let err = get(socket, "/v1/models").openai_error(503);
    assert!(
        err["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_connections_per_uid"),
        "{err}"
    );
    // Every TCP client together is one tenant, with the same cap.
    let _held_tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let deadline = Instant::now() + EXCHANGE;
    let refused = loop {
        let answer = curl_tcp(&base, "GET", "/v1/models", None, &[]);
        if answer.status == 503 || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    };
    let err = refused.openai_error(503);
    assert!(
        err["message"].as_str().unwrap_or_default().contains("TCP"),
        "{err}"
    );
}

#[tokio::test]
async fn tokenize_shows_the_model_tokenizer_at_work() {
    let reference = reference();
    let daemon = Daemon::start(DaemonConfig::new().max_seq_len(reference.max_seq_len)).await;
    let socket = daemon.socket_path();
    let answer = post(socket, "/tokenize", &json!({"inputs": "Hello world"}));
    assert_eq!(answer.status, 200, "{answer:?}");
    let tokens = answer.json();
    let expected = json!([[
        {"id": 101, "text": "[CLS]", "special": true, "start": null, "stop": null},
        {"id": 7592, "text": "Hello", "special": false, "start": 0, "stop": 5},
        {"id": 2088, "text": "world", "special": false, "start": 6, "stop": 11},
        {"id": 102, "text": "[SEP]", "special": true, "start": null, "stop": null},
    ]]);
    assert_eq!(tokens, expected);
    let plain = post(
        socket,
        "/tokenize",
        &json!({"inputs": ["Hello world"], "add_special_tokens": false}),
    )
    .json();
    assert_eq!(plain[0].as_array().map(Vec::len), Some(2), "{plain}");
    // As many tokens as the model ran for each fixture text (cut at max_seq_len).
    let want = reference.model(&test_model_name());
    let texts: Vec<&str> = want.embeddings.iter().map(|e| e.text.as_str()).collect();
    let lists = post(socket, "/tokenize", &json!({"inputs": texts})).json();
    for (i, expected) in want.embeddings.iter().enumerate() {
        assert_eq!(
            lists[i].as_array().map(Vec::len),
            Some(expected.token_count as usize),
            "text {i}"
        );
    }
    post(socket, "/tokenize", &json!({"inputs": [[1, 2]]})).tei_error(422);
    // The native protocol has the same operation.
    let mut client = daemon.client().await;
    let native = client
        .tokenize(vec!["Hello world".into()], None)
        .await
        .expect("tokenize");
    let ids: Vec<u32> = native.tokens[0].iter().map(|t| t.id).collect();
    assert_eq!(ids, [101, 7592, 2088, 102]);
}
