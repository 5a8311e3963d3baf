//! Tests of cgroup detection and of real leaves (where the machine can
//! make them).

use super::detect::{
    cgroup_dir, is_systemd_managed, parse_mountinfo, parse_proc_cgroup, CgroupLine,
};
use super::*;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};

const MIB: u64 = 1024 * 1024;

/// A leaf name unique across concurrent tests and test processes.
fn unique(tag: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "inferd-test-{tag}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The prepared cgroups, or `None` after printing why the test is
/// skipped. `INFERD_TEST_CGROUP_PARENT` names a parent to use instead of
/// the test process's own cgroup (e.g. an empty delegated v2 cgroup).
fn cgroups_or_skip(test: &str) -> Option<Cgroups> {
    let parent = std::env::var_os("INFERD_TEST_CGROUP_PARENT").map(PathBuf::from);
    match detect(parent.as_deref()) {
        CgroupSupport::Unavailable { reason } => {
            // Straight to stderr: libtest captures `println!`, and a
            // skip must be seen.
            if std::env::var_os("INFERD_REQUIRE_CGROUPS").is_some_and(|v| v == "1") {
                panic!("{test} needs cgroups, and INFERD_REQUIRE_CGROUPS=1 says this machine can make them: {reason}");
            }
            let _ = writeln!(std::io::stderr().lock(), "{test}: skipped: {reason}");
            None
        }
        support => Some(support.prepare().expect("prepare detected cgroups")),
    }
}

/// Kills and reaps the child if the test ends early.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for the child's exit, polling for at most `limit`.
fn wait_bounded(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "child did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn leaf_gets_its_limit_and_is_removed() {
    let Some(cgroups) = cgroups_or_skip("leaf_gets_its_limit_and_is_removed") else {
        return;
    };
    let leaf = cgroups
        .create_leaf(&unique("limit"), Some(64 * MIB))
        .expect("create leaf");
    let path = leaf.path().to_path_buf();
    println!("{:?} leaf {}", cgroups.version(), path.display());
    assert!(path.is_dir());
    assert_eq!(leaf.memory_limit(), Some(64 * MIB));
    assert_eq!(leaf.oom_kills().expect("read oom_kill"), 0);
    assert!(leaf.memory_current().is_some());
    leaf.remove().expect("remove leaf");
    assert!(!path.exists(), "{} still exists", path.display());
}

#[test]
fn dropping_a_leaf_removes_it() {
    let Some(cgroups) = cgroups_or_skip("dropping_a_leaf_removes_it") else {
        return;
    };
    let leaf = cgroups
        .create_leaf(&unique("drop"), Some(32 * MIB))
        .expect("create leaf");
    let path = leaf.path().to_path_buf();
    drop(leaf);
    assert!(!path.exists(), "{} still exists", path.display());
}

#[test]
fn stale_leaf_is_replaced() {
    let Some(cgroups) = cgroups_or_skip("stale_leaf_is_replaced") else {
        return;
    };
    let name = unique("stale");
    let stale = cgroups.parent().join(&name);
    fs::create_dir(&stale).expect("create stale leaf");
    write_limit(
        &stale.join(match cgroups.version() {
            CgroupVersion::V1 => "memory.limit_in_bytes",
            CgroupVersion::V2 => "memory.max",
        }),
        &(16 * MIB).to_string(),
    )
    .expect("stale limit");
    let leaf = cgroups
        .create_leaf(&name, Some(48 * MIB))
        .expect("create over stale leaf");
    assert_eq!(leaf.memory_limit(), Some(48 * MIB));
    leaf.remove().expect("remove leaf");
}

#[test]
fn adding_a_missing_process_fails() {
    let Some(cgroups) = cgroups_or_skip("adding_a_missing_process_fails") else {
        return;
    };
    let leaf = cgroups
        .create_leaf(&unique("nopid"), Some(32 * MIB))
        .expect("create leaf");
    let err = leaf
        .add_process(Pid::from_raw(i32::MAX))
        .expect_err("no such process");
    assert!(matches!(err, LeafError::AddProcess { .. }), "{err:?}");
    leaf.remove().expect("remove leaf");
}

#[test]
fn invalid_leaf_names_are_rejected() {
    for name in [
        "",
        "a/b",
        "..",
        "memory.max",
        "cgroup.procs",
        SUPERVISOR_LEAF,
    ] {
        assert!(
            matches!(validate_name(name), Err(LeafError::InvalidName { .. })),
            "{name:?} accepted"
        );
    }
    validate_name("worker-12_b").expect("plain name");
}

/// The kernel OOM-kills a process over its leaf's limit; the leaf's
/// counter shows it and a sibling's does not.
#[test]
fn oom_kill_is_attributed_to_the_leaf() {
    let Some(cgroups) = cgroups_or_skip("oom_kill_is_attributed_to_the_leaf") else {
        return;
    };
    let leaf = cgroups
        .create_leaf(&unique("oom"), Some(64 * MIB))
        .expect("create leaf");
    let sibling = cgroups
        .create_leaf(&unique("sibling"), Some(64 * MIB))
        .expect("create sibling leaf");
    let host_before = host_oom_kills();

    // Waits for a line on stdin, then grows without bound (tail keeps a
    // newline-free stream in memory). ulimit -v caps it at 1 GiB in
    // case the cgroup limit does not hold.
    let child = Command::new("sh")
        .args(["-c", "ulimit -v 1048576; read go; exec tail /dev/zero"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sh");
    let mut child = KillOnDrop(child);
    let pid = Pid::from_raw(i32::try_from(child.0.id()).expect("pid fits i32"));
    leaf.add_process(pid).expect("move child into leaf");
    let procs = fs::read_to_string(leaf.path().join("cgroup.procs")).expect("read procs");
    assert!(
        procs.split_whitespace().any(|p| p == pid.to_string()),
        "child {pid} in leaf: {procs:?}"
    );
    assert_eq!(leaf.oom_kills().expect("read oom_kill"), 0);

    child
        .0
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(b"go\n")
        .expect("start the child");
    let status = wait_bounded(&mut child.0, Duration::from_secs(30));

    let kills = leaf.oom_kills().expect("read oom_kill");
    let sibling_kills = sibling.oom_kills().expect("read sibling oom_kill");
    let host_after = host_oom_kills();
    println!(
        "child {status:?} (signal {:?}); leaf oom_kill 0 -> {kills}; sibling oom_kill {sibling_kills}; host oom_kill {host_before:?} -> {host_after:?}; leaf memory now {:?}",
        status.signal(),
        leaf.memory_current()
    );
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "child killed: {status:?}"
    );
    assert!(kills >= 1, "leaf oom_kill rose: {kills}");
    assert_eq!(sibling_kills, 0, "sibling untouched");
    if let (Some(before), Some(after)) = (host_before, host_after) {
        assert!(after > before, "host oom_kill rose: {before} -> {after}");
    }

    let path = leaf.path().to_path_buf();
    leaf.remove().expect("remove leaf");
    sibling.remove().expect("remove sibling");
    assert!(!path.exists());
}

#[test]
fn host_oom_kills_is_readable() {
    let kills = host_oom_kills();
    println!("host oom_kill: {kills:?}");
    assert!(kills.is_some(), "/proc/vmstat has oom_kill on this kernel");
}

#[test]
fn override_that_is_no_cgroup_is_unavailable() {
    let dir = tempfile::tempdir().expect("tempdir");
    match detect(Some(dir.path())) {
        CgroupSupport::Unavailable { reason } => {
            assert!(reason.contains("not a memory cgroup"), "{reason}");
        }
        other => panic!("a temp dir is no cgroup: {other:?}"),
    }
    let missing = dir.path().join("a/b");
    match detect(Some(&missing)) {
        CgroupSupport::Unavailable { reason } => {
            assert!(reason.contains("does not exist"), "{reason}");
        }
        other => panic!("a missing dir is no cgroup: {other:?}"),
    }
}

#[test]
fn prepare_without_support_fails() {
    let support = CgroupSupport::Unavailable {
        reason: "test".into(),
    };
    assert!(matches!(
        support.prepare(),
        Err(SetupError::Unavailable { .. })
    ));
}

#[test]
fn parses_v1_oom_control() {
    let text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
    assert_eq!(keyed_value(text, "oom_kill"), Some(3));
    assert_eq!(keyed_value(text, "oom_kill_disable"), Some(0));
    // Kernels before 4.13 have no counter.
    assert_eq!(
        keyed_value("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"),
        None
    );
}

#[test]
fn parses_v2_memory_events() {
    let text = "low 0\nhigh 12\nmax 40\noom 2\noom_kill 1\noom_group_kill 0\n";
    assert_eq!(keyed_value(text, "oom_kill"), Some(1));
    assert_eq!(keyed_value(text, "oom"), Some(2));
    assert_eq!(keyed_value("", "oom_kill"), None);
    assert_eq!(keyed_value("oom_kill x\n", "oom_kill"), None);
}

#[test]
fn parses_vmstat() {
    let text = "nr_free_pages 3618236\noom_kill 7\nnuma_hit 1\n";
    assert_eq!(keyed_value(text, "oom_kill"), Some(7));
    assert_eq!(keyed_value(text, "oom"), None, "whole keys only");
}

#[test]
fn parses_proc_self_cgroup() {
    let text = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/x\n0::/\nbogus\n";
    let lines = parse_proc_cgroup(text);
    assert_eq!(lines.len(), 4);
    assert_eq!(
        lines[1],
        CgroupLine {
            hierarchy: "4".into(),
            controllers: vec!["memory".into()],
            path: "/process_api/abc".into()
        }
    );
    assert_eq!(lines[2].controllers, ["cpu", "cpuacct"]);
    assert_eq!(lines[3].hierarchy, "0");
    assert!(lines[3].controllers.is_empty());
}

#[test]
fn parses_mountinfo_and_resolves_cgroup_dirs() {
    let text = "\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 31 0:40 /docker/abc /sys/fs/cgroup/with\\040space rw - cgroup cgroup rw,cpu,memory
";
    let mounts = parse_mountinfo(text);
    assert_eq!(mounts.len(), 3);
    assert_eq!(mounts[0].fs_type, "cgroup");
    assert_eq!(mounts[0].super_options, ["rw", "memory"]);
    assert_eq!(mounts[1].fs_type, "cgroup2");
    assert_eq!(
        mounts[2].mount_point,
        PathBuf::from("/sys/fs/cgroup/with space")
    );
    assert_eq!(mounts[2].root, "/docker/abc");

    assert_eq!(
        cgroup_dir(&mounts[..1], "/process_api/abc").map(|(dir, _)| dir),
        Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/abc"))
    );
    assert_eq!(
        cgroup_dir(&mounts[1..2], "/").map(|(dir, _)| dir),
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    );
    // A mount of a subtree: paths are relative to its root.
    assert_eq!(
        cgroup_dir(&mounts[2..], "/docker/abc/sub").map(|(dir, _)| dir),
        Some(PathBuf::from("/sys/fs/cgroup/with space/sub"))
    );
    assert_eq!(cgroup_dir(&mounts[2..], "/docker/abcd"), None);
    assert_eq!(cgroup_dir(&mounts[2..], "/other"), None);
}

#[test]
fn recognises_systemd_managed_paths() {
    let mount = Path::new("/sys/fs/cgroup");
    assert!(is_systemd_managed(
        Path::new("/sys/fs/cgroup/system.slice/inferd.service"),
        mount
    ));
    assert!(is_systemd_managed(
        Path::new("/sys/fs/cgroup/user.slice/user-1000.slice/session-2.scope"),
        mount
    ));
    assert!(!is_systemd_managed(Path::new("/sys/fs/cgroup"), mount));
    assert!(!is_systemd_managed(
        Path::new("/sys/fs/cgroup/docker/abc"),
        mount
    ));
}
