//! Many short-lived processes at once, the way CI jobs use a guest: two streams of exec loops,
//! pipelines and exit statuses on two vCPUs, with disk I/O (a raw virtio-blk disk) and network
//! I/O (virtio-net, inside a network namespace this test creates) going on, and the vector
//! register isolation check beside them. On software KVM this is what crashed when guest
//! processes shared their AVX registers (see `src/arch/x86_64/xstate.rs`). One boot; the test
//! counts failures, not seconds.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::netns::{md5, write_blob, Namespace, GUEST_IP, HOST_IP};
use common::{kvm_available, linux_args};

/// Rounds per stream; each runs ~7 processes, so with the I/O loops and the register check the
/// guest creates and ends several hundred. Each costs ~1 s of emulated kernel code on software
/// KVM: this keeps the test to a few minutes (resources/soak.sh runs the long version).
const ITERATIONS: u32 = 10;
const STREAMS: u32 = 2;
/// A few minutes on an idle machine; a busy CI machine may take several times that.
const TIMEOUT: Duration = Duration::from_secs(1800);

#[test]
fn hundreds_of_processes_with_io_and_isolated_registers() {
    if !kvm_available() {
        return;
    }
    let ns = Namespace::new("stress");
    let dir = common::scratch_dir("stress");
    let blob = dir.join("blob");
    write_blob(&blob, 64 << 10);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let _httpd = ns.serve(&dir);

    let mut args = linux_args(&format!(
        "ember.cmd=\"sh /tests/stress.sh {ITERATIONS} {STREAMS} {HOST_IP} {GUEST_IP}\""
    ));
    args.extend(
        [
            "--cpus",
            "2",
            "--memory",
            "256M",
            "--disk",
            &format!("path={}", disk.display()),
            "--net",
            "tap=tap0",
        ]
        .map(String::from),
    );
    let mut ember = ns.command(&[]);
    ember
        .arg(common::ember())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = common::finish(ember.spawn().expect("start ember"), TIMEOUT);

    let tag = |key: &str| r.lines_with(&format!("EMBER-TEST {key}=")).join(" ");
    assert_eq!(tag("streams"), "ok");
    assert_eq!(tag("vecregs"), "ok");
    assert_eq!(tag("disk"), "ok");
    assert_eq!(tag("net"), "ok");
    assert_eq!(
        tag("net_md5"),
        md5(&blob),
        "the guest's copies of the host's file"
    );
    let processes: u32 = tag("processes").parse().unwrap();
    assert!(processes >= 200, "only {processes} processes");
    let disk_rounds: u32 = tag("disk_rounds").parse().unwrap();
    let net_rounds: u32 = tag("net_rounds").parse().unwrap();
    assert!(disk_rounds > 0 && net_rounds > 0);
    // No process of the guest was killed by a signal: print-fatal-signals reports each with its
    // user-mode registers (CS 0x33). Kernel-mode reports (an RCU stall warning when the host is
    // busy: CS 0x10) are not crashes.
    assert!(!r.stdout.contains("RIP: 0033:"), "a guest process crashed");
    assert_eq!(r.code(), 0, "the stress script's status");
    eprintln!(
        "stress: {processes} processes, {disk_rounds} disk rounds, {net_rounds} network rounds, \
         {:.0} s",
        r.elapsed.as_secs_f64()
    );
    std::fs::remove_dir_all(dir).ok();
}
