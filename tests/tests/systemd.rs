//! systemd integration against the real binary: the exact `sd_notify`
//! sequence on a real datagram socket, and socket activation with a
//! pre-bound listener passed as fd 3.

use std::os::unix::net::{UnixDatagram, UnixListener};
use std::time::{Duration, Instant};

use inferd_tests::{Daemon, DaemonConfig, Signal};

/// Every datagram that arrived on `socket` so far.
fn drain(socket: &UnixDatagram) -> Vec<String> {
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    messages
}

/// The state-changing lines of the messages, in order (STATUS= and
/// WATCHDOG= are progress reports, not states).
fn states(messages: &[String]) -> Vec<String> {
    messages
        .iter()
        .flat_map(|m| m.lines())
        .filter(|l| ["READY=1", "RELOADING=1", "STOPPING=1"].contains(l))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn notify_sequence_across_start_sighup_roll_and_stop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind notify socket");
    socket.set_nonblocking(true).expect("non-blocking");
    let daemon =
        Daemon::start(DaemonConfig::new().env("NOTIFY_SOCKET", path.to_string_lossy())).await;
    let mut seen = Vec::new();
    let wait_states = |seen: &mut Vec<String>, want: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while states(seen).len() < want {
            assert!(Instant::now() < deadline, "only {:?}", states(seen));
            seen.extend(drain(&socket));
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_states(&mut seen, 1);

    daemon.signal(Signal::SIGHUP);
    wait_states(&mut seen, 3);
    let out = daemon
        .inferctl()
        .arg("roll")
        .output()
        .expect("inferctl roll");
    assert!(out.status.success());
    wait_states(&mut seen, 5);
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("daemon exits");
    assert!(status.success(), "{status:?}");
    seen.extend(drain(&socket));

    assert_eq!(
        states(&seen),
        [
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "RELOADING=1",
            "READY=1",
            "STOPPING=1"
        ],
        "all messages: {seen:#?}"
    );
    for message in seen.iter().filter(|m| m.contains("RELOADING=1")) {
        let usec = message
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap_or_else(|| panic!("RELOADING=1 without MONOTONIC_USEC: {message}"));
        assert!(usec.parse::<u64>().is_ok_and(|v| v > 0), "{message}");
    }
    let first_ready = seen.iter().find(|m| m.contains("READY=1")).expect("ready");
    assert!(
        first_ready.contains("STATUS=") && first_ready.contains("workers ready"),
        "{first_ready}"
    );
    assert!(
        seen.iter()
            .any(|m| m.starts_with("STATUS=") && m.contains("2/2 workers ready")),
        "a live STATUS line: {seen:#?}"
    );
}

#[tokio::test]
async fn socket_activation_serves_the_passed_listener_and_leaves_its_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("activated.sock");
    let listener = UnixListener::bind(&path).expect("pre-bind the socket");
    let daemon = Daemon::start(DaemonConfig::new().socket(&path).listen_socket(listener)).await;
    let mut client = daemon.client().await;
    client
        .embed(vec!["through an activated socket".into()], None)
        .await
        .expect("served");
    assert!(
        daemon.log().contains("socket activation"),
        "{}",
        daemon.log()
    );
    daemon.signal(Signal::SIGTERM);
    let status = daemon
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("daemon exits");
    assert!(status.success(), "{status:?}");
    assert!(
        path.exists(),
        "the socket file belongs to systemd and stays"
    );
}
