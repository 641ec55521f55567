//! Host-side mistakes get one line naming the problem (and the fix), a non-zero exit code and no
//! backtrace.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{ember, kvm_available, micro_guest, run};

const TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_SETUP_FAILED: i32 = 125;
const EXIT_USAGE: i32 = 2;

fn assert_one_line_error(r: &common::Run, code: i32, needle: &str) {
    assert_eq!(r.code(), code, "{r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr: {r:?}");
    assert!(lines[0].starts_with("ember: error: "), "{r:?}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in {:?}",
        lines[0]
    );
    assert!(!r.stderr.contains("panicked") && !r.stderr.contains("backtrace"));
}

fn temp_file(name: &str, contents: &[u8]) -> std::path::PathBuf {
    let path =
        std::env::temp_dir().join(format!("ember-host-errors-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn bad_command_line_values() {
    for (args, needle) in [
        (&["run", "--cpus", "0"][..], "--cpus"),
        (&["run", "--cpus", "255"], "--cpus"),
        (&["run", "--cpus", "many"], "--cpus"),
        (&["run", "--memory", "0"], "more than zero"),
        (&["run", "--memory", "12Q"], "unknown unit"),
        (&["run", "--console", "tty"], "stdio, off or file=PATH"),
    ] {
        let r = run(args, TIMEOUT);
        assert_one_line_error(&r, EXIT_USAGE, needle);
    }
}

#[test]
fn bad_kernels() {
    if !kvm_available() {
        return;
    }
    let garbage = temp_file("garbage", &[0x5a; 8192]);
    let truncated_elf = temp_file("elf", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let dir = std::env::temp_dir();
    for (kernel, needle) in [
        (garbage.to_str().unwrap(), "not a kernel Ember can boot"),
        (truncated_elf.to_str().unwrap(), "invalid ELF kernel"),
        (
            "/nonexistent/vmlinux",
            "cannot open kernel /nonexistent/vmlinux",
        ),
        (dir.to_str().unwrap(), "cannot read the kernel image"),
    ] {
        let r = run(&["run", "--kernel", kernel], TIMEOUT);
        assert_one_line_error(&r, EXIT_SETUP_FAILED, needle);
    }
    std::fs::remove_file(garbage).ok();
    std::fs::remove_file(truncated_elf).ok();
}

#[test]
fn bad_initrds_and_memory() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("pvh-info");
    let kernel = kernel.to_str().unwrap();
    let big = temp_file("big-initrd", &vec![0u8; 8 << 20]);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--kernel", kernel, "--initrd", "/nonexistent/initrd"],
            "cannot open initrd /nonexistent/initrd",
        ),
        (
            vec![
                "run",
                "--kernel",
                kernel,
                "--initrd",
                big.to_str().unwrap(),
                "--memory",
                "8M",
            ],
            "does not fit",
        ),
        (
            vec!["run", "--kernel", kernel, "--memory", "64T"],
            "more than the host's",
        ),
        (
            vec!["run", "--kernel", kernel, "--memory", "1M"],
            "at least 2 MiB",
        ),
    ];
    for (args, needle) in cases {
        let r = run(&args, TIMEOUT);
        assert_one_line_error(&r, EXIT_SETUP_FAILED, needle);
    }
    std::fs::remove_file(big).ok();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run_command(cmd: &mut Command) -> common::Run {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    common::finish(child, TIMEOUT)
}

#[test]
fn missing_or_forbidden_dev_kvm() {
    if !kvm_available() {
        return;
    }
    if !is_root() {
        // Simulating a host without /dev/kvm needs a private mount namespace, which needs root.
        common::record_skip("/dev/kvm error cases need root");
        return;
    }
    let kernel = micro_guest("pvh-info");
    let ember = ember();
    // A private /dev without kvm in it.
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {}",
        ember.display(),
        kernel.display()
    );
    let r = run_command(Command::new("unshare").args(["--mount", "sh", "-c", &script]));
    assert_one_line_error(&r, EXIT_SETUP_FAILED, "/dev/kvm does not exist");

    // An unprivileged user and a root-only /dev/kvm.
    let script = format!(
        "mount -t tmpfs none /dev && mknod -m 600 /dev/kvm c 10 232 && exec setpriv --reuid=65534 --regid=65534 --clear-groups {} run --kernel {}",
        ember.display(),
        kernel.display()
    );
    let r = run_command(Command::new("unshare").args(["--mount", "sh", "-c", &script]));
    assert_one_line_error(&r, EXIT_SETUP_FAILED, "no permission to open /dev/kvm");
}
