//! The default Linux guest under the real `ember` binary. A boot costs tens of seconds on software
//! KVM, so each test boots once and checks many things.

mod common;

use std::io::Write;
use std::process::Stdio;

use common::{kvm_available, linux_args, LINUX_TIMEOUT};

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `EMBER-TEST key=value` lines.
fn value(r: &common::Run, key: &str) -> String {
    let found = r.lines_with(&format!("EMBER-TEST {key}="));
    assert_eq!(
        found.len(),
        1,
        "EMBER-TEST {key} in:\n{}\n{}",
        r.stdout,
        r.stderr
    );
    found[0].clone()
}

#[test]
fn guest_sees_its_machine_and_its_status_comes_back() {
    if !kvm_available() {
        return;
    }
    // 2 vCPUs, 256 MiB; run the info and userland checks, then exit with 42.
    let mut args = linux_args(r#"ember.cmd="sh /tests/info.sh; sh /tests/userland.sh && exit 42""#);
    // -v: ember logs the boot-timer mark /init writes.
    args.extend(["--cpus", "2", "--memory", "256M", "-v"].map(String::from));
    let r = common::run(&as_strs(&args), LINUX_TIMEOUT);
    r.assert_line("EMBER-INIT");
    let init_mark_ms: f64 = r
        .stderr
        .lines()
        .find_map(|l| {
            l.split_once("boot timer: guest wrote 0x60 at ")?
                .1
                .strip_suffix(" ms")
        })
        .unwrap_or_else(|| panic!("no boot-timer mark from /init: {r:?}"))
        .parse()
        .unwrap();
    assert!(
        init_mark_ms > 0.0 && init_mark_ms < r.elapsed.as_secs_f64() * 1000.0,
        "{init_mark_ms} ms: {r:?}"
    );
    assert_eq!(value(&r, "cpus"), "2");
    assert_eq!(value(&r, "online"), "0-1");
    let memtotal: u64 = value(&r, "memtotal_kib").parse().unwrap();
    // MemTotal is RAM minus what the kernel reserves for itself: most of 256 MiB.
    assert!(
        (200 * 1024..=256 * 1024).contains(&memtotal),
        "MemTotal {memtotal} KiB"
    );
    assert!(
        value(&r, "cmdline").contains("noxsave")
            || !std::path::Path::new("/sys/module/kvm_pvm").exists()
    );
    assert_eq!(value(&r, "userland"), "ok");
    r.assert_line("EMBER-EXIT status=42");
    assert_eq!(r.code(), 42, "{r:?}");
}

#[test]
fn serial_input_reaches_the_shell_and_reboot_exits_zero() {
    if !kvm_available() {
        return;
    }
    // The interactive default mode: a shell on the console. Type once its prompt is up (as a
    // person would): busybox's line editor queries the terminal before each prompt and would take
    // typed-ahead bytes for the answer.
    let args = linux_args("");
    let mut command = std::process::Command::new(common::ember());
    command
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (mut child, before) = common::spawn_command_until(command, "ember:/# ", LINUX_TIMEOUT);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"echo \"shell-got-$((6 * 7))\"\nreboot -f\n")
        .unwrap();
    let r = common::finish(child, LINUX_TIMEOUT);
    drop(stdin);
    assert!(before.contains("EMBER-INIT"), "{before}");
    assert!(r.stdout.contains("shell-got-42"), "{r:?}");
    assert_eq!(r.code(), 0, "reboot ends the VM with 0: {r:?}");
}
