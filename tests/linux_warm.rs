//! Warm starts on the default Linux guest: the first `ember run -- CMD` boots and saves a
//! snapshot when the guest agent is ready, later ones resume it (each clone with its own
//! randomness and the host's time), `--cold` leaves the cache alone, and a damaged snapshot is
//! removed with a warning and replaced by a cold boot's.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{ember, kvm_available, linux_args, scratch_dir, Run, LINUX_TIMEOUT};

/// The same deterministic output each time, then what must differ (the kernel's randomness)
/// and what must be the host's (the time), then a status of its own.
const SCRIPT: &str = "echo out; echo err >&2; echo uuid=$(cat /proc/sys/kernel/random/uuid); \
                      echo urandom=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'); \
                      echo time=$(date +%s); exit 7";

/// `ember -v run … [extra] -- sh -c SCRIPT` with its snapshot cache under `cache`.
fn job(cache: &Path, extra: &[&str]) -> Run {
    let child = Command::new(ember())
        .env("XDG_CACHE_HOME", cache)
        .arg("-v")
        .args(linux_args(""))
        .args(extra)
        .args(["--", "sh", "-c", SCRIPT])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    common::finish(child, LINUX_TIMEOUT)
}

/// The guest's value of `name=`.
fn value(run: &Run, name: &str) -> String {
    let values = run.lines_with(&format!("{name}="));
    assert_eq!(values.len(), 1, "one {name}= line: {run:?}");
    values[0].clone()
}

/// Checks a run of SCRIPT: its output, status, and a guest clock that is the host's.
fn check(run: &Run) {
    assert_eq!(run.code(), 7, "{run:?}");
    assert!(run.stdout.starts_with("out\nuuid="), "{run:?}");
    assert!(
        run.stderr.lines().any(|l| l == "err"),
        "the command's stderr: {run:?}"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let guest: u64 = value(run, "time").parse().expect("a time");
    // The snapshot's clock is minutes old by now: the agent set the host's before running it.
    assert!(
        guest <= now && now - guest < 120,
        "guest time {guest}, host {now}: {run:?}"
    );
    assert_eq!(value(run, "urandom").len(), 32, "{run:?}");
}

#[test]
fn later_runs_resume_the_snapshot_the_first_one_saved() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("linux-warm");
    let cache = dir.join("cache");
    let snapshots = cache.join("ember").join("snapshots");

    let first = job(&cache, &[]);
    check(&first);
    assert!(
        first.stderr.contains("no snapshot of this guest yet"),
        "{first:?}"
    );
    assert!(first.stderr.contains("warm start: saved"), "{first:?}");
    let entries: Vec<_> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(entries.len(), 1, "one entry, no staging left: {entries:?}");
    let entry = entries[0].clone();

    // Two clones of the snapshot at once, and a cold run beside them.
    let warm: Vec<_> = (0..2)
        .map(|_| {
            let cache = cache.clone();
            std::thread::spawn(move || job(&cache, &[]))
        })
        .collect();
    let cold = job(&cache, &["--cold"]);
    let warm: Vec<Run> = warm.into_iter().map(|t| t.join().unwrap()).collect();
    for run in &warm {
        check(run);
        assert!(run.stderr.contains("warm start: resuming"), "{run:?}");
        assert!(!run.stderr.contains("booting cold"), "{run:?}");
        assert_eq!(run.stdout.lines().next(), first.stdout.lines().next());
    }
    check(&cold);
    assert!(cold.stderr.contains("not used (--cold)"), "{cold:?}");
    assert!(!cold.stderr.contains("warm start: saved"), "{cold:?}");
    // Clones never share the kernel's RNG state: the agent reseeded each from the host.
    let uuids: Vec<String> = [&first, &warm[0], &warm[1], &cold]
        .iter()
        .map(|r| value(r, "uuid"))
        .collect();
    let urandom: Vec<String> = [&first, &warm[0], &warm[1], &cold]
        .iter()
        .map(|r| value(r, "urandom"))
        .collect();
    for i in 0..uuids.len() {
        for j in i + 1..uuids.len() {
            assert_ne!(uuids[i], uuids[j], "runs {i} and {j} share randomness");
            assert_ne!(urandom[i], urandom[j], "runs {i} and {j} share randomness");
        }
    }
    // How much faster a warm run is lives in the benchmark (resources/bench/snapshot.py), not
    // here: on a loaded host, two clones running their command beside a cold boot were once
    // slower than the first run (CI, 2026-12-03), and a timed assertion is a flaky test.

    // A damaged snapshot: detected, removed with a warning, replaced by a cold boot's.
    let state = entry.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 0x20;
    std::fs::write(&state, &bytes).unwrap();
    let damaged = job(&cache, &[]);
    check(&damaged);
    let warning: Vec<&str> = damaged
        .stderr
        .lines()
        .filter(|l| l.starts_with("ember: warning:"))
        .collect();
    assert_eq!(warning.len(), 1, "{damaged:?}");
    assert!(
        warning[0].contains("corrupt") && warning[0].contains("booting cold"),
        "{damaged:?}"
    );
    assert!(damaged.stderr.contains("warm start: saved"), "{damaged:?}");
    assert_ne!(std::fs::read(&state).unwrap(), bytes, "a new snapshot");
    std::fs::remove_dir_all(&dir).unwrap();
}
