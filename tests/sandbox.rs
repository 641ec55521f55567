//! The sandbox on micro-guests. seccomp: every thread of a running ember is filtered, a forbidden
//! call ends ember with 159 and a line naming the thread and the call, `log` lets it through.
//! `--jail`: the guest's exit status comes through the jail's parent; without root, one line.
//!
//! The forbidden call comes from the test-only trigger `EMBER_TEST_SECCOMP_VIOLATION=THREAD`,
//! compiled in with the `test-hooks` feature (resources/test.sh builds with it).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, micro_guest, scratch_dir};

fn ember_with_trigger(thread: &str, args: &[&str]) -> common::Run {
    let child = Command::new(common::ember())
        .args(args)
        .env("EMBER_TEST_SECCOMP_VIOLATION", thread)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember");
    common::finish(child, Duration::from_secs(60))
}

#[test]
fn every_thread_of_a_running_ember_is_filtered() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("seccomp-threads");
    let socket = dir.join("api.sock");
    let kernel = micro_guest("echo");
    let mut vm = common::Reaper(Some(common::spawn(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--api-socket",
            socket.to_str().unwrap(),
        ],
        Stdio::piped(),
    )));
    let pid = vm.child().id();
    // The main thread confines itself last, once every other thread runs.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut threads = common::thread_seccomp_modes(pid);
    while Instant::now() < deadline
        && (threads.len() < 4 || threads.iter().any(|(_, mode)| mode != "2"))
    {
        std::thread::sleep(Duration::from_millis(50));
        threads = common::thread_seccomp_modes(pid);
    }
    common::assert_threads_filtered(&threads, &["ember", "vcpu0", "console-in", "ember-api"]);
    // Still serving under its filters: a pause and a resume through the control socket.
    for action in ["pause", "resume"] {
        let r = common::run(
            &["ctl", socket.to_str().unwrap(), action],
            Duration::from_secs(60),
        );
        assert_eq!(r.code(), 0, "{action}: {r:?}");
    }
    common::send_signal(vm.child(), libc::SIGTERM);
    let r = common::finish(vm.take(), Duration::from_secs(60));
    assert_eq!(r.code(), 143, "{r:?}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn with_seccomp_off_no_thread_is_filtered() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("exit-hang");
    let mut vm = common::Reaper(Some(common::spawn(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--seccomp",
            "off",
        ],
        Stdio::null(),
    )));
    let pid = vm.child().id();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut threads = common::thread_seccomp_modes(pid);
    while Instant::now() < deadline && !threads.iter().any(|(name, _)| name == "vcpu0") {
        std::thread::sleep(Duration::from_millis(50));
        threads = common::thread_seccomp_modes(pid);
    }
    // Settled: the main thread would have confined itself by now.
    std::thread::sleep(Duration::from_millis(300));
    let threads = common::thread_seccomp_modes(pid);
    assert!(threads.iter().all(|(_, mode)| mode == "0"), "{threads:?}");
    common::send_signal(vm.child(), libc::SIGTERM);
    let r = common::finish(vm.take(), Duration::from_secs(60));
    assert_eq!(r.code(), 143, "{r:?}");
}

#[test]
fn a_forbidden_call_ends_ember_with_159_and_one_line() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("exit-hang");
    let kernel = kernel.to_str().unwrap();
    // A vCPU (confined as it starts) and the main thread (confined last).
    for thread in ["vcpu0", "main"] {
        let r = ember_with_trigger(thread, &["run", "--kernel", kernel]);
        assert_eq!(r.code(), 159, "{thread}: {r:?}");
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{thread}: {r:?}");
        assert!(
            lines[0].starts_with(&format!(
                "ember: seccomp: thread '{thread}' made system call {},",
                libc::SYS_personality
            )),
            "{r:?}"
        );
    }
}

#[test]
fn log_mode_lets_a_forbidden_call_through() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("exit-status");
    for mode in ["log", "off"] {
        let r = ember_with_trigger(
            "vcpu0",
            &[
                "run",
                "--kernel",
                kernel.to_str().unwrap(),
                "--cmdline",
                "status=7",
                "--seccomp",
                mode,
            ],
        );
        assert_eq!(r.code(), 7, "{mode}: {r:?}");
        assert!(!r.stderr.contains("seccomp"), "{mode}: {r:?}");
    }
}

#[test]
fn a_bad_mode_is_a_usage_error() {
    let r = common::run(
        &[
            "run",
            "--kernel",
            Path::new("/nonexistent").to_str().unwrap(),
            "--seccomp",
            "maybe",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stderr.contains("--seccomp"), "{r:?}");
}

#[test]
fn a_jailed_guest_s_status_comes_back_through_the_jail() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("exit-status");
    let r = common::run(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--cmdline",
            "status=7",
            "--jail",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 7, "{r:?}");
    assert!(r.stderr.is_empty(), "{r:?}");
}

#[test]
fn a_jail_without_root_is_one_line() {
    use std::os::unix::process::CommandExt;
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("exit-status");
    // A copy nobody can run wherever the checkout is (a home directory may be closed to them).
    let dir = std::env::temp_dir().join(format!("ember-nobody-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ember = dir.join("ember");
    std::fs::copy(common::ember(), &ember).unwrap();
    for path in [&dir, &ember] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let child = Command::new(&ember)
        .args(["run", "--kernel", kernel.to_str().unwrap(), "--jail"])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember as nobody");
    let r = common::finish(child, Duration::from_secs(60));
    assert_eq!(r.code(), 125, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("--jail needs root"), "{r:?}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn what_a_jail_cannot_hold_is_refused() {
    let kernel = micro_guest("exit-status");
    let kernel = kernel.to_str().unwrap();
    let cases: [&[&str]; 3] = [
        &["run", "--kernel", kernel, "--jail", "--", "true"],
        &["run", "--kernel", kernel, "--jail", "--volume", "/tmp:/mnt"],
        &["run", "--kernel", kernel, "--uid", "1000"],
    ];
    for args in cases {
        let r = common::run(args, Duration::from_secs(30));
        assert!(r.code() == 125 || r.code() == 2, "{args:?}: {r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{args:?}: {r:?}");
        assert!(
            r.stderr.contains("--jail") || r.stderr.contains("jail"),
            "{args:?}: {r:?}"
        );
    }
}

#[test]
fn on_a_terminal_the_line_comes_and_the_jail_passes_the_status() {
    if !kvm_available() {
        return;
    }
    let ember = common::ember();
    let hang = micro_guest("exit-hang");
    let status = micro_guest("exit-status");
    // The SIGSYS handler restores the raw-mode terminal (TCSETS, then glibc's TCGETS) from a
    // vCPU thread, and the jail's parent restores it after the monitor, under their filters.
    let cases = [
        (
            format!(
                "EMBER_TEST_SECCOMP_VIOLATION=vcpu0 {} run --kernel {}",
                ember.display(),
                hang.display()
            ),
            159,
        ),
        (
            format!(
                "{} run --jail --kernel {} --cmdline status=7",
                ember.display(),
                status.display()
            ),
            7,
        ),
    ];
    for (command, code) in cases {
        let child = common::in_pty(&command);
        let r = common::finish(child, Duration::from_secs(60));
        assert_eq!(r.code(), code, "{command}: {r:?}");
        assert!(!r.stdout.contains("Bad system call"), "{command}: {r:?}");
    }
}
