//! Embeddings served through the daemon match onnxruntime's
//! (`tests/fixtures/reference_embeddings.json`), and `inferctl embed` prints
//! them as JSON.

use std::io::Write;
use std::process::{Output, Stdio};

use inferd_tests::ByteSize;
use inferd_tests::{
    max_abs_diff, model_files, ready_count, reference, test_model_name, ClientError, Daemon,
    DaemonConfig, RequestError, DEFAULT_MODEL, SMALL_MODEL, TOLERANCE,
};

/// Starts a daemon serving `name` with the reference's settings and checks
/// every reference text, one per request and all in one batch.
async fn matches_reference(name: &str) {
    let reference = reference();
    let want = reference.model(name);
    let daemon = Daemon::start(
        DaemonConfig::with_model(model_files(name))
            .max_seq_len(reference.max_seq_len)
            .normalize(reference.normalize),
    )
    .await;
    let mut client = daemon.client().await;
    let mut failures = Vec::new();

    for (i, expected) in want.embeddings.iter().enumerate() {
        let result = client
            .embed(vec![expected.text.clone()], None)
            .await
            .unwrap_or_else(|e| panic!("text {i} failed: {e}"));
        assert_eq!(result.dims as usize, want.dims, "dims");
        assert_eq!(result.embeddings.len(), 1);
        if result.token_counts != [expected.token_count] {
            failures.push(format!(
                "text {i}: token count {:?}, reference {}",
                result.token_counts, expected.token_count
            ));
        }
        if result.truncated != [expected.truncated] {
            failures.push(format!(
                "text {i}: truncated {:?}, reference {}",
                result.truncated, expected.truncated
            ));
        }
        let diff = max_abs_diff(&result.embeddings[0], &expected.vector);
        if diff > TOLERANCE {
            failures.push(format!("text {i} alone: max abs diff {diff}"));
        }
    }

    let texts: Vec<String> = want.embeddings.iter().map(|e| e.text.clone()).collect();
    let batch = client
        .embed(texts, None)
        .await
        .unwrap_or_else(|e| panic!("the batch failed: {e}"));
    assert_eq!(batch.embeddings.len(), want.embeddings.len());
    for (i, (got, expected)) in batch.embeddings.iter().zip(&want.embeddings).enumerate() {
        let diff = max_abs_diff(got, &expected.vector);
        if diff > TOLERANCE {
            failures.push(format!("text {i} in a batch: max abs diff {diff}"));
        }
    }
    let counts: Vec<u32> = want.embeddings.iter().map(|e| e.token_count).collect();
    if batch.token_counts != counts {
        failures.push(format!(
            "batch token counts {:?}, reference {counts:?}",
            batch.token_counts
        ));
    }

    assert!(
        failures.is_empty(),
        "{name} differs from onnxruntime:\n{}",
        failures.join("\n")
    );
}

#[tokio::test]
async fn default_model_matches_onnxruntime() {
    matches_reference(DEFAULT_MODEL).await;
}

#[tokio::test]
async fn small_model_matches_onnxruntime() {
    matches_reference(SMALL_MODEL).await;
}

fn run(mut cmd: std::process::Command, stdin: Option<&str>) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start inferctl");
    let mut pipe = child.stdin.take().expect("stdin pipe");
    if let Some(input) = stdin {
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    drop(pipe);
    child.wait_with_output().expect("inferctl finishes")
}

fn check_cli_json(out: &Output, texts: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "inferctl failed: {stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inferctl printed invalid JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(json["dims"], 384, "{json}");
    assert!(json["model"].is_string(), "{json}");
    let reference = reference();
    let want = reference.model(&test_model_name());
    let vectors = json["embeddings"].as_array().expect("embeddings array");
    assert_eq!(vectors.len(), texts.len());
    for (text, vector) in texts.iter().zip(vectors) {
        let got: Vec<f32> = vector
            .as_array()
            .expect("a vector is an array")
            .iter()
            .map(|x| x.as_f64().expect("numbers") as f32)
            .collect();
        assert_eq!(got.len(), 384);
        let expected = want
            .embeddings
            .iter()
            .find(|e| e.text == *text)
            .expect("texts come from the reference");
        let diff = max_abs_diff(&got, &expected.vector);
        assert!(diff <= TOLERANCE, "{text:?}: max abs diff {diff}");
    }
    assert_eq!(
        json["truncated"].as_array().map(Vec::len),
        Some(texts.len())
    );
    assert_eq!(
        json["token_counts"].as_array().map(Vec::len),
        Some(texts.len())
    );
}

#[tokio::test]
async fn inferctl_embed_and_status() {
    let reference = reference();
    let daemon = Daemon::start(
        DaemonConfig::new()
            .max_seq_len(reference.max_seq_len)
            .normalize(reference.normalize),
    )
    .await;
    let texts = [reference.texts[0].as_str(), reference.texts[5].as_str()];

    let mut cmd = daemon.inferctl();
    cmd.args(["embed", "--deadline-ms", "30000"]).args(texts);
    check_cli_json(&run(cmd, None), &texts);

    let mut cmd = daemon.inferctl();
    cmd.arg("embed");
    check_cli_json(
        &run(cmd, Some(&format!("{}\n{}\n", texts[0], texts[1]))),
        &texts,
    );

    // --socket wins over the environment.
    let mut cmd = daemon.inferctl();
    cmd.env("INFERD_SOCKET", "/nonexistent/inferd.sock")
        .arg("--socket")
        .arg(daemon.socket_path())
        .args(["embed", texts[0]]);
    check_cli_json(&run(cmd, None), &texts[..1]);

    let mut cmd = daemon.inferctl();
    cmd.args(["status", "--json"]);
    let out = run(cmd, None);
    assert_eq!(out.status.code(), Some(0));
    // The JSON is the status itself: it reads back into the typed struct.
    let status: inferd_tests::PoolStatus =
        serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status.pid, daemon.pid());
    assert_eq!(status.target_workers, 2);
    assert_eq!(ready_count(&status), 2, "{status:?}");

    let mut cmd = daemon.inferctl();
    cmd.arg("status");
    let out = run(cmd, None);
    assert_eq!(out.status.code(), Some(0));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&format!("pid {}", daemon.pid())), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains(" ready ")).count(),
        2,
        "{table}"
    );

    // The daemon's typed error: exit 1, message on stderr.
    let mut cmd = daemon.inferctl();
    cmd.arg("embed").args(std::iter::repeat_n("x", 65));
    let out = run(cmd, None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("inferctl: bad request"), "{stderr}");
    assert!(out.stdout.is_empty());

    // The library sees the same typed error.
    let err = daemon
        .client()
        .await
        .embed(vec!["x".into(); 65], None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Request(RequestError::BadRequest { .. })),
        "{err:?}"
    );
    assert_eq!(ready_count(&daemon.status().await), 2);
}

#[tokio::test]
async fn requests_past_16_mib_within_raised_limits_reach_the_worker() {
    // The link to a worker once had a fixed 16 MiB frame limit: a request
    // the raised limits allow made every worker it reached exit, and was
    // answered worker_lost.
    let daemon = Daemon::start(
        DaemonConfig::new()
            .workers(1)
            .max_frame_bytes(48 << 20)
            .max_texts(2)
            .max_text_bytes(20 << 20)
            .with(|c| c.max_queued_bytes = ByteSize::mib(64)),
    )
    .await;
    let big = "a long request ".repeat((17 << 20) / 15 + 1);
    assert!(big.len() > 17 << 20);
    let mut client = daemon.client().await;
    let result = client
        .embed(vec![big, "short".into()], None)
        .await
        .expect("a request within the configured limits is served");
    assert_eq!(result.embeddings.len(), 2);
    assert_eq!(result.truncated, vec![true, false]);
    let status = daemon.status().await;
    assert!(
        status.recent_exits.is_empty(),
        "no worker died: {:?}",
        status.recent_exits
    );
}

#[tokio::test]
async fn a_new_worker_warms_up_before_it_is_ready_unless_told_not_to() {
    let daemon = Daemon::start(DaemonConfig::new().workers(1)).await;
    let log = daemon.log();
    let warmed = log
        .find("warm-up inference done")
        .expect("the worker warmed up");
    let ready = log.find("worker ready").expect("the worker is ready");
    assert!(warmed < ready, "warm-up comes before Ready:\n{log}");

    let cold = Daemon::start(DaemonConfig::new().workers(1).with(|c| c.warm_up = false)).await;
    assert!(
        !cold.log().contains("warm-up inference done"),
        "warm_up = false skips it"
    );
    cold.client()
        .await
        .embed(vec!["first".into()], None)
        .await
        .expect("a cold worker serves too");
}

#[tokio::test]
async fn a_request_run_in_parts_under_the_token_budget_gets_the_same_answer() {
    let texts = inferd_tests::sample_texts();
    assert!(texts.len() >= 4, "mixed lengths, several runs");
    let mut answers = Vec::new();
    // 512 tokens: two texts a run at max_seq_len 256; 0: one run.
    for budget in [512, 0] {
        let daemon = Daemon::start(
            DaemonConfig::new()
                .workers(1)
                .with(|c| c.max_batch_tokens = budget),
        )
        .await;
        let result = daemon
            .client()
            .await
            .embed(texts.clone(), None)
            .await
            .expect("embedded");
        answers.push(result);
    }
    let (parts, whole) = (&answers[0], &answers[1]);
    assert_eq!(parts.token_counts, whole.token_counts);
    assert_eq!(parts.truncated, whole.truncated);
    for (i, (a, b)) in parts.embeddings.iter().zip(&whole.embeddings).enumerate() {
        let diff = max_abs_diff(a, b);
        assert!(diff <= 1e-6, "text {i}: max abs diff {diff}");
    }
}
