//! Hostile and invalid input costs the sender its connection or its request,
//! and nobody else anything: in every test a well-behaved client runs
//! requests before, during and after, and all of them must succeed.

use std::time::Duration;

use inferd_proto::{encode_frame, ClientMessage, ServerMessage, PROTOCOL_VERSION};
use inferd_tests::{
    ready_count, sample_texts, BackgroundLoad, ClientError, Daemon, DaemonConfig, Expected,
    RawConn, RequestError,
};

/// Well under the daemon's 5 s handshake timeout: a connection closed this
/// fast was closed because of what it sent, not because it went quiet.
const CLOSE_BOUND: Duration = Duration::from_secs(3);
const PROGRESS_TIMEOUT: Duration = Duration::from_secs(60);

/// A daemon with a checked background load running.
struct Scenario {
    daemon: Daemon,
    load: BackgroundLoad,
}

impl Scenario {
    /// Starts the daemon and the load, and waits for answers "before".
    async fn start() -> Scenario {
        let daemon = Daemon::start(DaemonConfig::new()).await;
        let expected = Expected::compute(&daemon, &sample_texts()).await;
        let load = BackgroundLoad::start(daemon.socket_path(), 2, &expected);
        load.wait_progress(3, PROGRESS_TIMEOUT).await;
        Scenario { daemon, load }
    }

    async fn raw(&self) -> RawConn {
        RawConn::connect(self.daemon.socket_path()).await
    }

    /// Waits for answers "after", stops the load, and checks that nothing
    /// failed and the pool is whole.
    async fn finish(self) {
        self.load.wait_progress(3, PROGRESS_TIMEOUT).await;
        let report = self.load.stop().await;
        assert!(
            report.errors.is_empty(),
            "the well-behaved client saw {} errors (of {} ok):\n{}",
            report.errors.len(),
            report.ok,
            report.errors.join("\n"),
        );
        self.daemon
            .wait_for(|s| ready_count(s) == 2, Duration::from_secs(30))
            .await;
        let mut client = self.daemon.client().await;
        client
            .embed(vec!["still serving".into()], None)
            .await
            .expect("a fresh client is served");
    }
}

fn embed_frame(texts: Vec<String>) -> Vec<u8> {
    encode_frame(&ClientMessage::Embed {
        id: 1,
        texts,
        deadline_ms: None,
    })
    .expect("encode")
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    let t = Scenario::start().await;

    // Capitals that are not an HTTP method: the third byte is 0, so this is
    // a native length prefix (~16 MiB), over the hello's limit.
    let mut raw = t.raw().await;
    let _ = raw.write(b"GE\x00\x01 / HTTP/1.1\r\n\r\n").await;
    raw.expect_closed(CLOSE_BOUND).await;

    // A real HTTP request is served as HTTP (tests/tests/http.rs), and a
    // connection that sends one `Connection: close` request is closed.
    let mut raw = t.raw().await;
    let _ = raw
        .write(b"GET / HTTP/1.1\r\nHost: inferd\r\nConnection: close\r\n\r\n")
        .await;
    let answer = raw.expect_closed(CLOSE_BOUND).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 404 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A complete frame whose payload is not a hello.
    let mut raw = t.raw().await;
    let _ = raw.write_frame(&[0xff; 9]).await;
    raw.expect_closed(CLOSE_BOUND).await;

    // Garbage after a good handshake.
    let mut raw = t.raw().await;
    raw.handshake().await;
    let _ = raw
        .write(&[0x05, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 0x00])
        .await;
    raw.expect_closed(CLOSE_BOUND).await;

    t.finish().await;
}

#[tokio::test]
async fn oversize_length_prefix_closes_the_connection() {
    let t = Scenario::start().await;

    // Before the handshake.
    let mut raw = t.raw().await;
    let _ = raw.write(&u32::MAX.to_le_bytes()).await;
    raw.expect_closed(CLOSE_BOUND).await;

    // After it: one byte over the default 16 MiB limit, with some payload.
    let mut raw = t.raw().await;
    raw.handshake().await;
    let mut bytes = (16u32 * 1024 * 1024 + 1).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 1024]);
    let _ = raw.write(&bytes).await;
    raw.expect_closed(CLOSE_BOUND).await;

    t.finish().await;
}

#[tokio::test]
async fn half_a_frame_then_disconnect() {
    let t = Scenario::start().await;
    let frame = embed_frame(vec!["half of me".into(); 4]);

    // Half a request, then the client vanishes.
    let mut raw = t.raw().await;
    raw.handshake().await;
    raw.write(&frame[..frame.len() / 2])
        .await
        .expect("write half");
    drop(raw);

    // Half a request, then EOF while we keep listening: closed promptly.
    let mut raw = t.raw().await;
    raw.handshake().await;
    raw.write(&frame[..frame.len() / 2])
        .await
        .expect("write half");
    raw.shutdown_write().await.expect("shutdown");
    raw.expect_closed(CLOSE_BOUND).await;

    // Half a hello.
    let hello = encode_frame(&inferd_proto::Hello::new("half")).expect("encode");
    let mut raw = t.raw().await;
    raw.write(&hello[..hello.len() / 2])
        .await
        .expect("write half");
    drop(raw);

    t.finish().await;
}

#[tokio::test]
async fn wrong_protocol_version_gets_the_real_version() {
    let t = Scenario::start().await;

    let mut raw = t.raw().await;
    raw.send_hello(PROTOCOL_VERSION + 1)
        .await
        .expect("send hello");
    let hello = raw.read_hello().await;
    assert_eq!(
        hello.protocol_version, PROTOCOL_VERSION,
        "the daemon says which version it speaks"
    );
    // Then the connection closes, possibly after a typed error frame.
    let rest = raw.expect_closed(CLOSE_BOUND).await;
    if !rest.is_empty() {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("a length prefix")) as usize;
        let message: ServerMessage =
            inferd_proto::decode_payload(&rest[4..4 + len]).expect("a server message");
        assert!(
            matches!(message, ServerMessage::Error { .. }),
            "only an error may follow a version mismatch: {message:?}"
        );
    }

    t.finish().await;
}

#[tokio::test]
async fn empty_text_list_is_a_bad_request() {
    let t = Scenario::start().await;
    let mut client = t.daemon.client().await;
    let err = client.embed(vec![], None).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Request(RequestError::BadRequest { .. })),
        "{err:?}"
    );
    // A typed error leaves the connection usable.
    client
        .embed(vec!["fine".into()], None)
        .await
        .expect("the same connection still works");
    t.finish().await;
}

#[tokio::test]
async fn one_mib_text_is_a_bad_request_naming_the_limit() {
    let t = Scenario::start().await;
    let mut client = t.daemon.client().await;
    let err = client
        .embed(vec!["ok".into(), "a".repeat(1 << 20)], None)
        .await
        .unwrap_err();
    match &err {
        ClientError::Request(RequestError::BadRequest { reason }) => {
            assert!(
                reason.contains("65536"),
                "the reason names the limit: {reason}"
            );
        }
        other => panic!("expected a bad request, got {other:?}"),
    }
    client
        .embed(vec!["fine".into()], None)
        .await
        .expect("the same connection still works");
    t.finish().await;
}

#[tokio::test]
async fn too_many_texts_is_a_bad_request() {
    let t = Scenario::start().await;
    let mut client = t.daemon.client().await;
    let err = client.embed(vec!["x".into(); 65], None).await.unwrap_err();
    match &err {
        ClientError::Request(RequestError::BadRequest { reason }) => {
            assert!(
                reason.contains("64"),
                "the reason names the limit: {reason}"
            );
        }
        other => panic!("expected a bad request, got {other:?}"),
    }
    // Exactly at the limit is fine.
    let result = client
        .embed(vec!["x".into(); 64], None)
        .await
        .expect("64 texts are allowed");
    assert_eq!(result.embeddings.len(), 64);
    t.finish().await;
}

#[tokio::test]
async fn invalid_request_after_hello_closes_the_connection() {
    let t = Scenario::start().await;

    // A variant index no ClientMessage has.
    let mut raw = t.raw().await;
    raw.handshake().await;
    let _ = raw.write_frame(&[0x09, 0x01]).await;
    raw.expect_closed(CLOSE_BOUND).await;

    // A valid request with a trailing byte.
    let mut raw = t.raw().await;
    raw.handshake().await;
    let mut frame = encode_frame(&ClientMessage::Status { id: 1 }).expect("encode");
    frame.push(0);
    let len = (frame.len() - 4) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    let _ = raw.write(&frame).await;
    raw.expect_closed(CLOSE_BOUND).await;

    // A text that is not UTF-8: Embed, id 1, one string of 2 bytes 0xff 0xfe.
    let mut raw = t.raw().await;
    raw.handshake().await;
    let _ = raw
        .write_frame(&[0x00, 0x01, 0x01, 0x02, 0xff, 0xfe, 0x00])
        .await;
    raw.expect_closed(CLOSE_BOUND).await;

    t.finish().await;
}

/// A frame whose payload declares a length far beyond the frame itself:
/// `prefix` (the message up to the length), then bincode's u64 varint marker
/// and `claimed`, then a few bytes.
fn claiming(prefix: &[u8], claimed: u64) -> Vec<u8> {
    let mut payload = prefix.to_vec();
    payload.push(0xfd);
    payload.extend_from_slice(&claimed.to_le_bytes());
    payload.extend_from_slice(b"tail");
    payload
}

/// Once, a 14-byte hello claiming a 2^60-byte string made the supervisor
/// abort on the allocation ("memory allocation of 1152921504606846976 bytes
/// failed"), and so did a text claiming 2^40 bytes in an embed request. Each
/// now closes only its own connection.
#[tokio::test]
async fn declared_lengths_beyond_the_frame_close_only_that_connection() {
    let t = Scenario::start().await;

    // The reported hello, byte for byte: version 3, then a 2^60-byte string.
    let mut raw = t.raw().await;
    let _ = raw
        .write_frame(&[0x03, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10])
        .await;
    raw.expect_closed(CLOSE_BOUND).await;

    // The same with the current version.
    let mut raw = t.raw().await;
    let version = u8::try_from(PROTOCOL_VERSION).expect("a one-byte varint");
    let _ = raw.write_frame(&claiming(&[version], 1 << 60)).await;
    raw.expect_closed(CLOSE_BOUND).await;

    // A hello announced larger than the pre-authentication limit: refused
    // from its length prefix, before anything is buffered for it.
    let mut raw = t.raw().await;
    let announced = u32::try_from(inferd_proto::HELLO_MAX_BYTES + 1).expect("small");
    let _ = raw.write(&announced.to_le_bytes()).await;
    raw.expect_closed(CLOSE_BOUND).await;

    // Embed (variant 0), id 1, one text claiming 2^40 and then 2^60 bytes.
    for claimed in [1u64 << 40, 1 << 60] {
        let mut raw = t.raw().await;
        raw.handshake().await;
        let _ = raw
            .write_frame(&claiming(&[0x00, 0x01, 0x01], claimed))
            .await;
        raw.expect_closed(CLOSE_BOUND).await;
    }

    // More texts than the protocol allows in one request.
    let mut raw = t.raw().await;
    raw.handshake().await;
    let count = u64::try_from(inferd_proto::MAX_TEXTS_PER_REQUEST + 1).expect("fits");
    let _ = raw.write_frame(&claiming(&[0x00, 0x01], count)).await;
    raw.expect_closed(CLOSE_BOUND).await;

    t.finish().await;
}

/// A peer the allow-list refuses is answered before anything it sends is
/// decoded: its hostile hello costs the daemon nothing, and it learns why.
#[tokio::test]
async fn refused_peer_is_told_why_before_its_frames_are_read() {
    let own = nix::unistd::getuid().as_raw();
    let daemon =
        Daemon::spawn(DaemonConfig::new().with(|c| c.access.allowed_uids = vec![own + 4242]));
    daemon
        .wait_for_log("worker ready", Duration::from_secs(60))
        .await;
    for _ in 0..3 {
        let mut raw = RawConn::connect(daemon.socket_path()).await;
        let _ = raw
            .write_frame(&[0x03, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x10])
            .await;
        let hello = raw.read_hello().await;
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        let refusal = raw.read_frame().await.expect("a refusal frame");
        match inferd_proto::decode_payload::<ServerMessage>(&refusal) {
            Ok(ServerMessage::Refused {
                error: RequestError::PermissionDenied { reason },
            }) => assert!(reason.contains(&format!("uid {own}")), "{reason}"),
            other => panic!("expected a permission-denied refusal, got {other:?}"),
        }
        raw.expect_closed(CLOSE_BOUND).await;
    }
    assert!(
        daemon.exit_status().is_none(),
        "the daemon is still running"
    );
    let status_answer = daemon.try_status().await;
    assert!(
        matches!(
            status_answer,
            Err(ClientError::Request(RequestError::PermissionDenied { .. }))
        ),
        "{status_answer:?}"
    );
}

/// The hand-made frames above are what their comments say.
#[test]
fn raw_payloads_are_what_they_claim() {
    use inferd_proto::decode_payload;
    let good: ClientMessage = decode_payload(&[0x00, 0x01, 0x01, 0x02, b'h', b'i', 0x00])
        .expect("the same layout with UTF-8 decodes");
    assert_eq!(
        good,
        ClientMessage::Embed {
            id: 1,
            texts: vec!["hi".into()],
            deadline_ms: None
        }
    );
    assert!(decode_payload::<ClientMessage>(&[0x00, 0x01, 0x01, 0x02, 0xff, 0xfe, 0x00]).is_err());
    assert!(decode_payload::<ClientMessage>(&[0x09, 0x01]).is_err());
    assert!(decode_payload::<inferd_proto::Hello>(&[0xff; 9]).is_err());
    // With a small claimed length instead, the same layouts decode.
    let small: inferd_proto::Hello =
        decode_payload(&[0x03, 0x02, b'h', b'i']).expect("a hello with a 2-byte string");
    assert_eq!(small.software, "hi");
    let mut short = vec![0x00, 0x01, 0x01, 0x04];
    short.extend_from_slice(b"tail\x00");
    assert!(decode_payload::<ClientMessage>(&short).is_ok());
    assert!(decode_payload::<ClientMessage>(&claiming(&[0x00, 0x01, 0x01], 1 << 40)).is_err());
}
