//! Tests of the `listener` module.

use super::*;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// A gid other than our own that we may give files to, so a test can
/// tell "given to the group" from "the creator's default group": any
/// gid as root, else one of our supplementary groups. Falls back to our
/// own gid (the group assertions then cannot tell the two apart).
fn other_gid() -> Gid {
    let own = nix::unistd::getegid();
    if nix::unistd::geteuid().is_root() {
        return Gid::from_raw(if own.as_raw() == 4242 { 4243 } else { 4242 });
    }
    nix::unistd::getgroups()
        .unwrap_or_default()
        .into_iter()
        .find(|gid| *gid != own)
        .unwrap_or(own)
}

/// Names in `dir`, sorted.
fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn bind_detects_live_and_stale_sockets_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let first = ClientSocket::bind(&path, 0o660, None).await.unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    // The connect succeeds through the linked name: it reaches `first`.
    assert!(matches!(
        ClientSocket::bind(&path, 0o660, None).await,
        Err(ListenerError::AlreadyRunning(_))
    ));
    // A socket file nobody listens on is stale.
    drop(first);
    assert!(!path.exists(), "dropping removes the socket file");
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let second = ClientSocket::bind(&path, 0o600, None).await.unwrap();
    drop(second);
    assert!(!path.exists());
    assert!(entries(dir.path()).is_empty(), "no private directory left");
}

#[tokio::test]
async fn clients_reach_the_listener_at_the_final_path_and_nothing_else_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.sock");
    let socket = ClientSocket::bind(&path, 0o600, None).await.unwrap();
    assert_eq!(
        entries(dir.path()),
        ["d.sock"],
        "the private directory is gone"
    );
    let client = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (accepted, _) = socket.listener().unwrap().accept().await.unwrap();
    let cred = accepted.peer_cred().unwrap();
    assert_eq!(cred.pid(), client.peer_cred().unwrap().pid());
}

#[tokio::test]
async fn group_is_set_by_number_or_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.sock");
    let gid = other_gid();
    let socket = ClientSocket::bind(&path, 0o660, Some(&gid.as_raw().to_string()))
        .await
        .unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.gid(), gid.as_raw());
    assert_eq!(meta.mode() & 0o7777, 0o660);
    drop(socket);
    // By name: our own group's, which every system names.
    let own = nix::unistd::getegid();
    let name = nix::unistd::Group::from_gid(own).unwrap().unwrap().name;
    let socket = ClientSocket::bind(&path, 0o640, Some(&name)).await.unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.gid(), own.as_raw());
    assert_eq!(meta.mode() & 0o7777, 0o640);
    drop(socket);
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn unknown_group_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.sock");
    assert!(matches!(
        ClientSocket::bind(&path, 0o660, Some("no-such-group-inferd-test")).await,
        Err(ListenerError::UnknownGroup(_))
    ));
    assert!(entries(dir.path()).is_empty());
}

/// The point of binding in a private directory: whenever anything is at
/// the final path, it already has the final mode and group. A thread
/// polls the path while the socket is bound, many times over. Binding in
/// place and then chmod/chown (the old way) is caught here within a few
/// rounds: the window is some microseconds, a stat one.
#[tokio::test]
async fn the_final_path_never_shows_other_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.sock");
    let gid = other_gid();
    let group = gid.as_raw().to_string();
    for _ in 0..200 {
        let stop = Arc::new(AtomicBool::new(false));
        // Times the observer found something at the path.
        let seen = Arc::new(AtomicU32::new(0));
        let observer = {
            let (path, stop, seen) = (path.clone(), Arc::clone(&stop), Arc::clone(&seen));
            std::thread::spawn(move || {
                let mut wrong = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(meta) = std::fs::symlink_metadata(&path) {
                        seen.fetch_add(1, Ordering::Relaxed);
                        if meta.mode() & 0o7777 != 0o600 || meta.gid() != gid.as_raw() {
                            wrong.push(format!("mode {:o} gid {}", meta.mode(), meta.gid()));
                        }
                    }
                }
                wrong
            })
        };
        let socket = ClientSocket::bind(&path, 0o600, Some(&group))
            .await
            .unwrap();
        // Stop only once the observer has seen the bound socket, so
        // each round really looked at the path while it was there.
        while seen.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        let wrong = observer.join().unwrap();
        assert!(wrong.is_empty(), "the final path showed {wrong:?}");
        drop(socket);
    }
    assert!(entries(dir.path()).is_empty());
}

#[tokio::test]
async fn a_daemon_that_binds_meanwhile_wins_and_we_clean_up() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.sock");
    let staged = Staged::bind(&path, 0o600, None).unwrap();
    // Another daemon binds the path between our stale check and link.
    let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let other_ino = std::fs::symlink_metadata(&path).unwrap().ino();
    assert!(matches!(
        staged.publish(&path).await,
        Err(ListenerError::AlreadyRunning(_))
    ));
    assert_eq!(
        std::fs::symlink_metadata(&path).unwrap().ino(),
        other_ino,
        "the other daemon's socket stays"
    );
    assert_eq!(entries(dir.path()), ["r.sock"], "private directory removed");
    drop(other);
}

#[tokio::test]
async fn anything_else_created_meanwhile_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.sock");
    let staged = Staged::bind(&path, 0o600, None).unwrap();
    std::fs::write(&path, "data").unwrap();
    assert!(matches!(
        staged.publish(&path).await,
        Err(ListenerError::PathTaken(_))
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    assert_eq!(entries(dir.path()), ["r.sock"], "private directory removed");
}

#[tokio::test]
async fn too_long_paths_are_refused_clearly_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // The final path itself does not fit.
    let long = dir.path().join("x".repeat(MAX_SOCKET_PATH));
    assert!(matches!(
        ClientSocket::bind(&long, 0o600, None).await,
        Err(ListenerError::PathTooLong { .. })
    ));
    // The final path fits with 4 bytes to spare; the temporary one,
    // `.inferd.<pid>.<n>/s` instead of `s`, does not.
    let base = dir.path().as_os_str().len() + 1;
    let parent = dir.path().join("p".repeat(MAX_SOCKET_PATH - 6 - base));
    std::fs::create_dir(&parent).unwrap();
    let path = parent.join("s");
    assert_eq!(path.as_os_str().len(), MAX_SOCKET_PATH - 4);
    let err = ClientSocket::bind(&path, 0o600, None).await.unwrap_err();
    let ListenerError::TemporaryPathTooLong { temporary, len, .. } = &err else {
        panic!("expected TemporaryPathTooLong, got {err:?}");
    };
    assert!(*len > MAX_SOCKET_PATH);
    assert!(temporary.starts_with(&parent));
    assert!(entries(&parent).is_empty());
}

#[tokio::test]
async fn refuses_to_replace_a_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not-a-socket");
    std::fs::write(&path, "data").unwrap();
    assert!(matches!(
        ClientSocket::bind(&path, 0o660, None).await,
        Err(ListenerError::NotASocket(_))
    ));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "data");
    assert!(entries(dir.path()) == ["not-a-socket"]);
}
