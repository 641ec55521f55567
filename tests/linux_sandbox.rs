//! The sandbox under a Linux guest: a job VM with a disk, the network (in a namespace this test
//! creates), vsock and the control socket, every one of its threads filtered while the guest
//! uses each device.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::netns::{Namespace, HOST_IP};
use common::{kvm_available, linux_guest, LINUX_TIMEOUT};

#[test]
fn every_thread_of_a_job_vm_with_every_device_is_filtered() {
    if !kvm_available() {
        return;
    }
    let ns = Namespace::new("sandbox");
    let dir = common::scratch_dir("linux-sandbox");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let socket = dir.join("api.sock");
    let (kernel, initrd) = linux_guest();
    // Each device moves data under its thread's filter before the threads are looked at.
    let script = format!(
        "dd if=/dev/urandom of=/dev/vda bs=4k count=64 conv=fsync 2>/dev/null && echo disk=ok; \
         ip addr add 10.0.2.2/24 dev eth0; ip link set eth0 up; \
         ping -c 1 -W 10 {HOST_IP} >/dev/null && echo net=ok; \
         echo ready; sleep 300"
    );
    let mut command = ns.command(&[]);
    command
        .arg(common::ember())
        .args(["run", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--memory", "256M", "--net", "tap=tap0", "--disk"])
        .arg(format!("path={}", disk.display()))
        .arg("--api-socket")
        .arg(&socket)
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (child, before) = common::spawn_command_until(command, "ready", LINUX_TIMEOUT);
    let mut vm = common::Reaper(Some(child));
    // `ip netns exec` runs ember as its child: the VM is the one process under it.
    let pid = ember_pid(vm.child().id());
    let threads = common::thread_seccomp_modes(pid);
    let metrics = common::run(
        &["ctl", socket.to_str().unwrap(), "metrics"],
        Duration::from_secs(60),
    );
    common::send_signal(vm.child(), libc::SIGTERM);
    let mut r = common::finish(vm.take(), Duration::from_secs(120));
    r.stdout.insert_str(0, &before);

    assert!(r.stdout.contains("disk=ok"), "{r:?}");
    assert!(r.stdout.contains("net=ok"), "{r:?}");
    let names: Vec<&str> = threads.iter().map(|(name, _)| name.as_str()).collect();
    for expected in [
        "ember",
        "vcpu0",
        "virtio-block0",
        "virtio-net0",
        "virtio-vsock0",
        "ember-api",
        "job",
        "job-agent",
        "job-writer",
    ] {
        assert!(
            names.contains(&expected),
            "no thread {expected}: {threads:?}"
        );
    }
    assert!(
        threads.iter().all(|(_, mode)| mode == "2"),
        "a thread without a filter: {threads:?}"
    );
    assert_eq!(metrics.code(), 0, "{metrics:?}");
    // The guest's 256 KiB went through the filtered block thread.
    let written: u64 = metrics
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("ember_device_written_bytes_total{device=\"block0\",kind=\"block\"} ")
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_default();
    assert!(written >= 256 << 10, "{metrics:?}");
    // SIGTERM goes to the command: sh ends with 143, and ember with it.
    assert_eq!(r.code(), 143, "{r:?}");
    assert!(!r.stderr.contains("seccomp"), "{r:?}");
    std::fs::remove_dir_all(dir).ok();
}

/// The ember process: `pid` itself, or its only child when `pid` is `ip netns exec`, which
/// execs (then it is ember) or forks.
fn ember_pid(pid: u32) -> u32 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if exe.file_name().is_some_and(|name| name == "ember") {
        return pid;
    }
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    children
        .split_whitespace()
        .next()
        .and_then(|child| child.parse().ok())
        .unwrap_or(pid)
}
