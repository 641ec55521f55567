//! The sandbox under a Linux guest, with a disk and the network (in a namespace each test
//! creates): every thread of a job VM filtered while the guest uses each device; a jailed VM in
//! an empty root, unprivileged, in its cgroup limits, which are gone after it.

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
    // A snapshot pauses and wakes every device from the main thread (the TAP's offloads are set
    // again): under the main thread's filter too.
    let snapshot_dir = dir.join("snapshot");
    let snapshot = common::run(
        &[
            "ctl",
            socket.to_str().unwrap(),
            "snapshot",
            snapshot_dir.to_str().unwrap(),
        ],
        Duration::from_secs(120),
    );
    common::send_signal(vm.child(), libc::SIGTERM);
    let mut r = common::finish(vm.take(), Duration::from_secs(120));
    r.stdout.insert_str(0, &before);

    assert!(r.stdout.contains("disk=ok"), "{r:?}");
    assert!(r.stdout.contains("net=ok"), "{r:?}");
    common::assert_threads_filtered(
        &threads,
        &[
            "ember",
            "vcpu0",
            "virtio-block0",
            "virtio-net0",
            "virtio-vsock0",
            "ember-api",
            "job",
            "job-agent",
            "job-writer",
        ],
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
    assert_eq!(snapshot.code(), 0, "{snapshot:?}");
    // SIGTERM goes to the command: sh ends with 143, and ember with it.
    assert_eq!(r.code(), 143, "{r:?}");
    assert!(!r.stderr.contains("seccomp"), "{r:?}");
    std::fs::remove_dir_all(dir).ok();
}

/// The ember process: `pid` itself, or its child when `pid` is `ip netns exec`, which forks.
fn ember_pid(pid: u32) -> u32 {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    if exe.file_name().is_some_and(|name| name == "ember") {
        return pid;
    }
    common::first_child(pid).unwrap_or(pid)
}

/// The monitor under `ember run --jail` (`parent`): its one child.
fn jailed_monitor(parent: u32) -> u32 {
    common::first_child(parent)
        .unwrap_or_else(|| panic!("ember {parent} has no child: not jailed?"))
}

/// Each cgroup (v1 hierarchy or v2) the process is in: (controllers, directory under
/// /sys/fs/cgroup).
fn cgroup_dirs(pid: u32) -> Vec<(String, std::path::PathBuf)> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    own.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?.to_string();
            let path = parts.next()?.trim_start_matches('/');
            let mount = match controllers.as_str() {
                "" => "unified".to_string(),
                c => c.to_string(),
            };
            Some((
                controllers,
                std::path::Path::new("/sys/fs/cgroup")
                    .join(mount)
                    .join(path),
            ))
        })
        .collect()
}

#[test]
fn a_jailed_vm_with_a_disk_and_the_network() {
    if !kvm_available() {
        return;
    }
    let ns = Namespace::new("jail");
    let dir = common::scratch_dir("linux-jail");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let socket = dir.join("api.sock");
    let script = format!(
        "echo jailed-write | dd of=/dev/vda conv=fsync 2>/dev/null && echo disk=ok; \
         ip addr add 10.0.2.2/24 dev eth0; ip link set eth0 up; \
         ping -c 1 -W 10 {HOST_IP} >/dev/null && echo net=ok; \
         echo ready; sleep 300"
    );
    let mut args = common::linux_args(&format!("ember.cmd=\"{script}\""));
    args.extend(
        [
            "--memory",
            "256M",
            "--net",
            "tap=tap0",
            "--jail",
            "--cpu-quota",
            "150",
            "--memory-limit",
            "1G",
        ]
        .map(String::from),
    );
    args.extend(["--disk".into(), format!("path={}", disk.display())]);
    args.extend(["--api-socket".into(), socket.display().to_string()]);
    // The network namespace only: `ip netns exec` would hide the cgroup hierarchies.
    let mut command = ns.command_network_only(&[]);
    command
        .arg(common::ember())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (child, before) = common::spawn_command_until(command, "ready", LINUX_TIMEOUT);
    let mut vm = common::Reaper(Some(child));
    // nsenter execs ember: the child is ember, the jail's parent; the monitor is its child.
    let parent = vm.child().id();
    let monitor = jailed_monitor(parent);
    // The parent, outside the jail, has a filter of its own too.
    let parent_threads = common::thread_seccomp_modes(parent);
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{monitor}/root"))
        .unwrap()
        .collect();
    let status = std::fs::read_to_string(format!("/proc/{monitor}/status")).unwrap();
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    let cgroups = cgroup_dirs(monitor);
    let limit = |controller: &str, file: &str| {
        cgroups
            .iter()
            .find(|(controllers, dir)| {
                controllers.split(',').any(|c| c == controller)
                    && dir.ends_with(format!("ember-{monitor}"))
            })
            .map(|(_, dir)| {
                std::fs::read_to_string(dir.join(file))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            })
    };
    // v1 hierarchies (this host), or v2.
    let cpu = limit("cpu", "cpu.cfs_quota_us").or_else(|| limit("", "cpu.max"));
    let memory = limit("memory", "memory.limit_in_bytes").or_else(|| limit("", "memory.max"));
    let ember_dirs: Vec<_> = cgroups
        .iter()
        .filter(|(_, dir)| dir.ends_with(format!("ember-{monitor}")))
        .map(|(_, dir)| dir.clone())
        .collect();
    // The control socket was opened before the jail closed, and answers from inside it.
    let info = common::run(
        &["ctl", socket.to_str().unwrap(), "info"],
        Duration::from_secs(60),
    );

    common::send_signal(vm.child(), libc::SIGTERM);
    let mut r = common::finish(vm.take(), Duration::from_secs(120));
    r.stdout.insert_str(0, &before);

    assert!(r.stdout.contains("disk=ok"), "{r:?}");
    assert!(r.stdout.contains("net=ok"), "{r:?}");
    assert!(root.is_empty(), "the jail's root is not empty: {root:?}");
    assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("Gid:"), "65534 65534 65534 65534", "{status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{status}");
    assert_eq!(field("CapPrm:"), "0000000000000000", "{status}");
    assert_eq!(field("CapBnd:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");
    assert_eq!(field("Seccomp:"), "2", "{status}");
    common::assert_threads_filtered(&parent_threads, &["ember"]);
    // PID 1 of a namespace of its own.
    assert_eq!(field("NSpid:"), format!("{monitor} 1"), "{status}");
    let expected_cpu = ["150000".to_string(), "150000 100000".to_string()];
    assert!(
        cpu.as_ref().is_some_and(|c| expected_cpu.contains(c)),
        "cpu limit {cpu:?} in {cgroups:?}"
    );
    assert_eq!(memory.as_deref(), Some("1073741824"), "{cgroups:?}");
    assert_eq!(info.code(), 0, "{info:?}");
    // SIGTERM reaches the monitor through its parent; the status comes back the same way.
    assert_eq!(r.code(), 143, "{r:?}");
    for dir in ember_dirs {
        assert!(!dir.exists(), "{} is left after exit", dir.display());
    }
    let written = std::fs::read(&disk).unwrap();
    assert!(
        written.starts_with(b"jailed-write\n"),
        "the guest's write is not in the image"
    );
    std::fs::remove_dir_all(dir).ok();
}
