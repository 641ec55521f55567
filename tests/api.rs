//! The control socket (`--api-socket`) on the `echo` micro-guest, which polls COM1's line status
//! register without end: every poll is an exit, so the exit counters show whether it runs.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{kvm_available, micro_guest, scratch_dir};
use ember::snapshot::file::HostFacts;

fn ctl(socket: &std::path::Path, action: &str) -> common::Run {
    common::run(
        &["ctl", socket.to_str().unwrap(), action],
        Duration::from_secs(60),
    )
}

/// The guest's port-input exits so far, from `GET /metrics`.
fn io_in_exits(socket: &std::path::Path) -> u64 {
    let r = ctl(socket, "metrics");
    assert_eq!(r.code(), 0, "{r:?}");
    r.stdout
        .lines()
        .find_map(|l| l.strip_prefix("ember_vcpu_exits_total{reason=\"io_in\"} "))
        .unwrap_or_else(|| panic!("no io_in counter in {}", r.stdout))
        .parse()
        .unwrap()
}

/// A raw request, as curl would send it; the status line back.
fn raw(socket: &std::path::Path, request: &str) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer.lines().next().unwrap_or_default().to_string()
}

/// The `echo` micro-guest with a control socket at `socket`, its stdin and stdout piped.
fn echo_guest_with_api(
    socket: &std::path::Path,
) -> (
    std::process::Child,
    std::process::ChildStdin,
    std::process::ChildStdout,
) {
    let kernel = micro_guest("echo");
    let mut vm = common::spawn(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            socket.to_str().unwrap(),
        ],
        Stdio::piped(),
    );
    let stdin = vm.stdin.take().unwrap();
    let stdout = vm.stdout.take().unwrap();
    (vm, stdin, stdout)
}

#[test]
fn pause_resume_info_metrics_and_shutdown() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api");
    let socket = dir.join("api.sock");
    let (mut vm, mut stdin, stdout) = echo_guest_with_api(&socket);
    let reader = common::OutputCollector::start(stdout);
    let output = reader.output.clone();
    let wait_for = |text: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !output.lock().unwrap().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in {:?}",
                output.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("echo: ready");
    let mode = std::fs::metadata(&socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let info = ctl(&socket, "info");
    assert_eq!(info.code(), 0, "{info:?}");
    let info: serde_json::Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["config"]["cpus"], 1);
    assert!(info["uptime_seconds"].as_f64().unwrap() > 0.0);

    // Running: the guest polls, so the counter moves.
    let before = io_in_exits(&socket);
    std::thread::sleep(Duration::from_millis(200));
    assert!(io_in_exits(&socket) > before, "the guest is not running");

    // Paused: not one more exit, and input waits.
    let paused = ctl(&socket, "pause");
    assert_eq!(paused.stdout.trim(), r#"{"state":"paused"}"#, "{paused:?}");
    let at_pause = io_in_exits(&socket);
    stdin.write_all(b"hello\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        io_in_exits(&socket),
        at_pause,
        "a paused guest made progress"
    );
    assert!(!output.lock().unwrap().contains("hello"));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ctl(&socket, "info").stdout).unwrap()["state"],
        "paused"
    );
    // Pausing twice is still paused.
    assert_eq!(ctl(&socket, "pause").code(), 0);

    // Resumed: it goes on where it was, and echoes what came meanwhile.
    let resumed = ctl(&socket, "resume");
    assert_eq!(
        resumed.stdout.trim(),
        r#"{"state":"running"}"#,
        "{resumed:?}"
    );
    wait_for("hello");
    assert!(io_in_exits(&socket) > at_pause);

    // A snapshot: the VM pauses, its state and RAM go into the directory, and it goes on.
    let snapshot_dir = dir.join("snap");
    let r = common::run(
        &[
            "ctl",
            socket.to_str().unwrap(),
            "snapshot",
            snapshot_dir.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    let answer: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert!(answer["pause_ms"].as_f64().unwrap() > 0.0, "{answer}");
    let here = HostFacts::current(ember::kvm::is_software_kvm());
    let state = ember::snapshot::file::read(&snapshot_dir.join("state"), &here).unwrap();
    assert_eq!(state.vcpus.len(), 1);
    assert_eq!(state.config.cpus, 1);
    assert_eq!(state.memory.iter().map(|r| r.size).sum::<u64>(), 128 << 20);
    let memory = std::fs::metadata(snapshot_dir.join("memory")).unwrap();
    assert_eq!(memory.len(), 128 << 20);
    // Sparse: the micro-guest touched a few pages of its 128 MiB.
    let allocated = std::os::unix::fs::MetadataExt::blocks(&memory) * 512;
    assert!(allocated < 8 << 20, "{allocated} bytes allocated");
    assert!(!snapshot_dir.join("state.partial").exists());
    stdin.write_all(b"after the snapshot\n").unwrap();
    wait_for("after the snapshot");
    // A relative or missing directory is the client's mistake.
    assert_eq!(
        raw(
            &socket,
            "PUT /vm/snapshot HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
        ),
        "HTTP/1.1 400 Bad Request"
    );

    // What curl would get for mistakes.
    assert_eq!(
        raw(&socket, "GET /nope HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        raw(&socket, "GET /vm/pause HTTP/1.1\r\n\r\n"),
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(raw(&socket, "nonsense\r\n\r\n"), "HTTP/1.1 400 Bad Request");

    // Shutdown ends ember with 0 and takes the socket with it. With no agent to ask (no vsock
    // device) it is not graceful: the VM ends at once.
    let shutdown = ctl(&socket, "shutdown");
    assert_eq!(shutdown.code(), 0, "{shutdown:?}");
    assert!(
        shutdown.stdout.contains(r#""graceful":false"#),
        "{shutdown:?}"
    );
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = vm.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "ember did not end after shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    reader.join();
    assert_eq!(status.code(), Some(0));
    assert!(!socket.exists(), "the API socket outlived ember");

    // Nothing listens now: one line, exit 1.
    let gone = ctl(&socket, "info");
    assert_eq!(gone.code(), 1, "{gone:?}");
    assert_eq!(gone.stderr.lines().count(), 1, "{gone:?}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn an_api_socket_path_that_is_taken_is_one_line_and_125() {
    let dir = scratch_dir("api-taken");
    let path = dir.join("not-a-socket");
    std::fs::write(&path, "x").unwrap();
    let kernel = micro_guest("echo");
    let r = common::run(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            path.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(r.stderr.contains("API socket"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "x");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_snapshot_resumes_in_new_embers_exactly_where_it_was() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("api-restore");
    let socket = dir.join("api.sock");
    let snapshot = dir.join("snap");
    let (mut vm, mut stdin, mut stdout) = echo_guest_with_api(&socket);
    // The guest counts what it echoes: 4 bytes before the snapshot.
    stdin.write_all(b"abc\n").unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("abc") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the guest ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let r = common::run(
        &[
            "ctl",
            socket.to_str().unwrap(),
            "snapshot",
            snapshot.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(ctl(&socket, "shutdown").code(), 0);
    drop(stdin);
    assert_eq!(vm.wait().unwrap().code(), Some(0));

    // Two new embers resume it at once, each with its own input: each guest goes on counting
    // from the 4 bytes it had, and neither sees the other's.
    let clones: Vec<_> = [&b"xyQ"[..], b"zQ"]
        .into_iter()
        .map(|input| {
            let args = ["run", "--restore", snapshot.to_str().unwrap()].map(String::from);
            std::thread::spawn(move || {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                common::run_with_input(&args, input, Duration::from_secs(60))
            })
        })
        .collect();
    let counts: Vec<String> = clones
        .into_iter()
        .map(|clone| {
            let r = clone.join().unwrap();
            assert_eq!(r.code(), 0, "{r:?}");
            assert!(!r.stdout.contains("echo: ready"), "it booted again: {r:?}");
            r.lines_with("echo: ").concat()
        })
        .collect();
    assert_eq!(counts, ["6 bytes", "5 bytes"]);

    // A damaged state file: one line, 125, nothing run.
    let state = snapshot.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    std::fs::write(&state, &bytes).unwrap();
    let r = common::run(
        &["run", "--restore", snapshot.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(r.stderr.contains("corrupt"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    // No snapshot there at all.
    std::fs::remove_dir_all(&snapshot).ok();
    let r = common::run(
        &["run", "--restore", dir.join("none").to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    // The shape of the VM is the snapshot's: asking for another is a usage error.
    let r = common::run(
        &["run", "--restore", "/x", "--cpus", "2"],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 2, "{r:?}");
    std::fs::remove_dir_all(&dir).ok();
}
