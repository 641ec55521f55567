//! ember-runtime, the OCI runtime, driven as podman's conmon drives runc: a bundle made here
//! (a busybox root and its config.json), `create` with a PID file, `state`, `start`, the
//! monitor's exit status read by this process as the containers' subreaper, `kill`, `delete`;
//! and the refusals (a second `create` of one ID, `delete` of a running container, what a VM
//! cannot do, a bad option in the log format asked for).

mod common;

use std::fs;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{kvm_available, linux_guest, scratch_dir};

fn runtime() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember-runtime"))
}

/// `ember-runtime --root ROOT ARGS`.
fn rt(root: &Path, args: &[&str]) -> common::Run {
    let child = Command::new(runtime())
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember-runtime");
    common::finish(child, Duration::from_secs(60))
}

/// A bundle whose process runs `script` with busybox's sh.
fn make_bundle(dir: &Path, script: &str, extra: &str) -> PathBuf {
    let bundle = dir.join("bundle");
    let root = bundle.join("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let _ = std::os::unix::fs::symlink("busybox", root.join("bin/sh"));
    let config = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", script],
            "env": ["PATH=/bin", "GREETING=hello"],
            "cwd": "/"
        },
        "root": {"path": "rootfs", "readonly": false},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
        // A network namespace of its own, without a path: the VM has no network.
        "linux": {"namespaces": [{"type": "pid"}, {"type": "network"}]},
        "annotations": {"org.example": extra}
    });
    fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    bundle
}

fn state(root: &Path, id: &str) -> serde_json::Value {
    let r = rt(root, &["state", id]);
    assert_eq!(r.code(), 0, "{r:?}");
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"))
}

/// Waits for a child this process inherited as subreaper; its exit code (128+N for a signal).
fn wait_for(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for a process this test became the parent of (subreaper), into a local.
    let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(rc, pid, "waitpid: {}", std::io::Error::last_os_error());
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    }
}

/// `create` as conmon runs it: the container's stdout is a pipe this test reads (the monitor
/// keeps it open after `create` exits). `create`'s exit code, its stderr, and the output.
fn create(
    root: &Path,
    bundle: &Path,
    id: &str,
    pid_file: &Path,
) -> (i32, String, common::OutputCollector) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 returns.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and ours alone.
    let (read, write) = unsafe { (fs::File::from_raw_fd(fds[0]), fs::File::from_raw_fd(fds[1])) };
    let output = common::OutputCollector::start(read);
    let stderr_path = pid_file.with_extension("stderr");
    let mut child = Command::new(runtime())
        .arg("--root")
        .arg(root)
        .args(["create", "--bundle"])
        .arg(bundle)
        .arg("--pid-file")
        .arg(pid_file)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        // A file, not a pipe: the monitor keeps its stderr after `create` exits.
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("start ember-runtime create");
    let status = child.wait().expect("wait for create");
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    (status.code().unwrap_or(-1), stderr, output)
}

#[test]
fn a_container_created_started_killed_and_deleted() {
    if !kvm_available() {
        return;
    }
    linux_guest();
    // Monitors outlive `create`, as runc's container processes do: they become ours.
    // SAFETY: a prctl without pointers, on this test process.
    let subreaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(subreaper, 0);
    let dir = scratch_dir("runtime");
    let root = dir.join("state");
    let bundle = make_bundle(
        &dir,
        "echo $GREETING from $(pwd); echo made > /made; exit 7",
        "x",
    );
    let pid_file = dir.join("pid");

    let (code, stderr, output) = create(&root, &bundle, "c1", &pid_file);
    assert_eq!(code, 0, "{stderr}");
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let s = state(&root, "c1");
    assert_eq!(s["status"], "created", "{s}");
    assert_eq!(s["pid"], pid, "{s}");
    assert_eq!(s["ociVersion"], "1.0.2", "{s}");
    assert_eq!(
        s["bundle"],
        bundle.canonicalize().unwrap().display().to_string()
    );
    assert_eq!(s["annotations"]["org.example"], "x", "{s}");
    // Nothing has run yet.
    assert!(!bundle.join("rootfs/made").exists());
    let again = rt(
        &root,
        &["create", "--bundle", bundle.to_str().unwrap(), "c1"],
    );
    assert_eq!(again.code(), 1, "{again:?}");
    assert!(again.stderr.contains("exists already"), "{again:?}");
    let refused = rt(&root, &["delete", "c1"]);
    assert_eq!(refused.code(), 1, "{refused:?}");
    assert!(refused.stderr.contains("--force"), "{refused:?}");

    let started = rt(&root, &["start", "c1"]);
    assert_eq!(started.code(), 0, "{started:?}");
    assert_eq!(wait_for(pid), 7, "the process's status is the monitor's");
    let text = output.text();
    assert!(text.contains("hello from /"), "{text}");
    assert_eq!(
        fs::read_to_string(bundle.join("rootfs/made")).unwrap(),
        "made\n"
    );
    assert_eq!(state(&root, "c1")["status"], "stopped");
    let deleted = rt(&root, &["delete", "c1"]);
    assert_eq!(deleted.code(), 0, "{deleted:?}");
    assert!(!root.join("c1").exists());

    // A second container, stopped by a signal: SIGTERM reaches the process in the guest.
    let bundle2 = make_bundle(&dir.join("two"), "echo waiting; sleep 300", "y");
    let (code, stderr, _output) = create(&root, &bundle2, "c2", &pid_file);
    assert_eq!(code, 0, "{stderr}");
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(rt(&root, &["start", "c2"]).code(), 0);
    assert_eq!(state(&root, "c2")["status"], "running");
    // Another process in it, through its guest agent: its output and status are exec's.
    let exec = rt(
        &root,
        &[
            "exec",
            "--env",
            "X=y",
            "--cwd",
            "/bin",
            "c2",
            "sh",
            "-c",
            "echo exec $X $(pwd); exit 3",
        ],
    );
    assert_eq!(exec.code(), 3, "{exec:?}");
    assert!(exec.stdout.contains("exec y /bin"), "{exec:?}");
    let process = dir.join("process.json");
    fs::write(
        &process,
        r#"{"args":["sh","-c","echo as $(id -u)"],"env":["PATH=/bin"],"cwd":"/","user":{"uid":1000,"gid":1000},"capabilities":{}}"#,
    )
    .unwrap();
    let exec = rt(
        &root,
        &["exec", "--process", process.to_str().unwrap(), "c2"],
    );
    assert_eq!(exec.code(), 0, "{exec:?}");
    assert!(exec.stdout.contains("as 1000"), "{exec:?}");
    let killed = rt(&root, &["kill", "c2", "TERM"]);
    assert_eq!(killed.code(), 0, "{killed:?}");
    assert_eq!(wait_for(pid), 143);
    assert_eq!(rt(&root, &["delete", "c2"]).code(), 0);
    fs::remove_dir_all(dir).ok();
}

#[test]
fn what_the_runtime_refuses_and_reports() {
    let dir = scratch_dir("runtime-refusals");
    let root = dir.join("state");
    // features and --version answer without a container.
    let features = rt(&root, &["features"]);
    assert_eq!(features.code(), 0, "{features:?}");
    let json: serde_json::Value = serde_json::from_str(&features.stdout).unwrap();
    assert_eq!(json["ociVersionMax"], "1.0.2");
    let version = rt(&root, &["--version"]);
    assert!(version.stdout.contains("spec: 1.0.2"), "{version:?}");
    // Unknown containers and IDs that would leave the root.
    let missing = rt(&root, &["state", "nope"]);
    assert_eq!(missing.code(), 1);
    assert_eq!(missing.stderr.lines().count(), 1, "{missing:?}");
    assert!(missing.stderr.contains("does not exist"), "{missing:?}");
    assert_eq!(rt(&root, &["state", "../etc"]).code(), 1);
    // What a VM cannot do yet: refused, naming the field, nothing left behind.
    let bundle = make_bundle(&dir, "true", "z");
    let mut config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(bundle.join("config.json")).unwrap()).unwrap();
    config["process"]["terminal"] = true.into();
    fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    let terminal = rt(
        &root,
        &["create", "--bundle", bundle.to_str().unwrap(), "t1"],
    );
    assert_eq!(terminal.code(), 1, "{terminal:?}");
    assert!(terminal.stderr.contains("process.terminal"), "{terminal:?}");
    assert!(!root.join("t1").exists());
    // The host's network (no network namespace): a VM has its own.
    config["process"]["terminal"] = false.into();
    config["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}]);
    fs::write(bundle.join("config.json"), config.to_string()).unwrap();
    let host_network = rt(
        &root,
        &["create", "--bundle", bundle.to_str().unwrap(), "t1"],
    );
    assert_eq!(host_network.code(), 1, "{host_network:?}");
    assert!(
        host_network.stderr.contains("host's network"),
        "{host_network:?}"
    );
    assert!(!root.join("t1").exists());
    // A bad option, reported in the log format asked for.
    let log = dir.join("log.json");
    let bad = rt(
        &root,
        &[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "create",
            "--bogus",
            "x",
        ],
    );
    assert_eq!(bad.code(), 2, "{bad:?}");
    let logged: serde_json::Value =
        serde_json::from_str(fs::read_to_string(&log).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(logged["level"], "error");
    assert!(
        logged["msg"].as_str().unwrap().contains("--bogus"),
        "{logged}"
    );
    assert!(rt(&root, &["exec", "x", "true"])
        .stderr
        .contains("does not exist"));
    fs::remove_dir_all(dir).ok();
}
