//! `inferctl` against a fake daemon: output formats and exit codes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use inferd_proto::{
    ClientMessage, Connection, Counters, EmbedResult, PoolStatus, RequestError, ServerMessage,
    Timing, WorkerStatus, DEFAULT_MAX_FRAME_BYTES,
};
use tokio::net::{UnixListener, UnixStream};

/// A fake daemon on a thread of its own: answers every request on every
/// connection with `answer`, until the test process exits.
fn fake_daemon(answer: fn(ClientMessage) -> ServerMessage) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fake.sock");
    let std_listener = std::os::unix::net::UnixListener::bind(&path).expect("bind fake socket");
    std_listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let listener = UnixListener::from_std(std_listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(serve(stream, answer));
            }
        });
    });
    (dir, path)
}

async fn serve(stream: UnixStream, answer: fn(ClientMessage) -> ServerMessage) {
    let mut conn: Connection<_, ServerMessage, ClientMessage> =
        Connection::new(stream, DEFAULT_MAX_FRAME_BYTES);
    if conn.handshake("fake-inferd").await.is_err() {
        return;
    }
    while let Ok(Some(request)) = conn.recv().await {
        if conn.send(&answer(request)).await.is_err() {
            return;
        }
    }
}

fn embed_answer(request: ClientMessage) -> ServerMessage {
    match request {
        ClientMessage::Embed { id, texts, .. } => ServerMessage::Embeddings {
            id,
            result: EmbedResult {
                model: "fake-model".into(),
                dims: 2,
                embeddings: texts.iter().map(|t| vec![t.len() as f32, 0.5]).collect(),
                truncated: vec![false; texts.len()],
                token_counts: texts.iter().map(|t| t.len() as u32).collect(),
            },
            timing: Timing::default(),
        },
        ClientMessage::Status { id } => ServerMessage::Status {
            id,
            status: Box::new(PoolStatus {
                pid: 777,
                uptime_secs: 5,
                model: "/m/model.onnx".into(),
                target_workers: 1,
                workers: vec![WorkerStatus {
                    id: 1,
                    pid: 778,
                    state: inferd_proto::WorkerStateKind::Ready,
                    rss_bytes: None,
                    requests_served: 0,
                    age_secs: 1.0,
                    ..WorkerStatus::default()
                }],
                queue_depth: 0,
                queue_capacity: 8,
                unavailable_reason: None,
                counters: Counters::default(),
                ..PoolStatus::default()
            }),
        },
        other @ (ClientMessage::Roll { .. }
        | ClientMessage::Metrics { .. }
        | ClientMessage::Tokenize { .. }) => error_answer(other),
    }
}

fn error_answer(request: ClientMessage) -> ServerMessage {
    let id = request.id();
    ServerMessage::Error {
        id,
        error: RequestError::BadRequest {
            reason: "text 0 is too long".into(),
        },
    }
}

fn inferctl(socket: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_inferctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("INFERD_SOCKET")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start inferctl");
    let mut pipe = child.stdin.take().expect("stdin pipe");
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    drop(pipe);
    child.wait_with_output().expect("inferctl output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn embed_prints_json() {
    let (_dir, socket) = fake_daemon(embed_answer);
    let out = inferctl(&socket, &["embed", "abc", "hello"], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["model"], "fake-model");
    assert_eq!(json["dims"], 2);
    assert_eq!(
        json["embeddings"],
        serde_json::json!([[3.0, 0.5], [5.0, 0.5]])
    );
    assert_eq!(json["truncated"], serde_json::json!([false, false]));
    assert_eq!(json["token_counts"], serde_json::json!([3, 5]));
}

#[test]
fn embed_reads_stdin_lines_without_arguments() {
    let (_dir, socket) = fake_daemon(embed_answer);
    let out = inferctl(
        &socket,
        &["embed", "--deadline-ms", "500"],
        Some("one\nthree\n"),
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["token_counts"], serde_json::json!([3, 5]));
}

#[test]
fn status_table_and_json() {
    let (_dir, socket) = fake_daemon(embed_answer);
    let out = inferctl(&socket, &["status"], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("pid 777"), "{table}");
    assert!(table.contains("STATE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("778") && l.contains("ready")),
        "{table}"
    );

    let out = inferctl(&socket, &["status", "--json"], None);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("valid JSON");
    assert_eq!(json["pid"], 777);
    assert_eq!(json["workers"][0]["state"], "ready");
    assert_eq!(json["counters"]["requests_ok"], 0);
}

#[test]
fn daemon_error_exits_1_with_the_typed_message() {
    let (_dir, socket) = fake_daemon(error_answer);
    let out = inferctl(&socket, &["embed", "x"], None);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).trim_end(),
        "inferctl: bad request: text 0 is too long"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn no_daemon_exits_2_with_a_hint() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = inferctl(&dir.path().join("absent.sock"), &["status"], None);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("inferctl: cannot connect to "),
        "{stderr}"
    );
    assert!(stderr.contains("is inferd running?"), "{stderr}");
}

#[test]
fn socket_comes_from_the_environment() {
    let (_dir, socket) = fake_daemon(embed_answer);
    let out = Command::new(env!("CARGO_BIN_EXE_inferctl"))
        .args(["status", "--json"])
        .env("INFERD_SOCKET", &socket)
        .output()
        .expect("run inferctl");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
}
