//! Snapshots of the Linux guest: one taken through the control socket while a shell loop
//! counts, resumed by a new ember, which goes on counting with its files and disk as they were,
//! and whose guest agent answers over the restored vsock device.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{kvm_available, linux_args, scratch_dir, LINUX_TIMEOUT};

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// `ember exec --vsock SOCKET -- CMD`, again until the guest agent answers with status 0.
fn exec_until_answered(vsock: &std::path::Path, command: &[&str]) {
    let deadline = Instant::now() + LINUX_TIMEOUT;
    loop {
        let mut args = vec!["exec", "--vsock", vsock.to_str().unwrap(), "--"];
        args.extend_from_slice(command);
        let r = common::run(&args, Duration::from_secs(120));
        if r.code() == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the agent never answered: {r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn a_linux_guest_resumes_from_its_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("linux-snapshot");
    let socket = dir.join("api.sock");
    let snapshot = dir.join("snap");
    let disk = dir.join("disk.img");
    let vsock = dir.join("v.sock");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // No double quotes: the script is one kernel command-line value. It counts until a file
    // appears, which only `ember exec` after the restore makes.
    let script =
        "echo kept > /tmp/note; echo before-snapshot | dd of=/dev/vda conv=sync 2>/dev/null; \
                  sync; i=0; while [ ! -e /tmp/stop ]; do i=$((i+1)); echo tick $i; sleep 1; done; \
                  echo 3 > /proc/sys/vm/drop_caches; echo note=$(cat /tmp/note); \
                  echo disk=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n 1)";
    let mut args = linux_args(&format!("ember.cmd=\"{script}\""));
    args.extend([
        "--disk".to_string(),
        format!("path={}", disk.display()),
        "--api-socket".into(),
        socket.display().to_string(),
        "--vsock".into(),
        format!("cid=3,socket={}", vsock.display()),
    ]);
    let mut vm = common::Reaper(Some(common::spawn(&strs(&args), Stdio::null())));
    let reader = common::OutputCollector::start(vm.child().stdout.take().unwrap());
    let output = reader.output.clone();
    let deadline = Instant::now() + LINUX_TIMEOUT;
    while !output.lock().unwrap().contains("tick 2") {
        assert!(
            Instant::now() < deadline && vm.child().try_wait().unwrap().is_none(),
            "no tick 2: {}",
            output.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ctl = |action: &[&str]| {
        let mut all = vec!["ctl", socket.to_str().unwrap()];
        all.extend_from_slice(action);
        common::run(&all, Duration::from_secs(300))
    };
    // The agent answers before the snapshot (it starts beside the console's command).
    exec_until_answered(&vsock, &["true"]);
    // The disk's counters: the guest has written (and read, booting) through it.
    let metrics = ctl(&["metrics"]);
    assert_eq!(metrics.code(), 0, "{metrics:?}");
    let counter = |name: &str| -> u64 {
        let device = if name == "connections" {
            "device=\"vsock0\",kind=\"vsock\""
        } else {
            "device=\"block0\",kind=\"block\""
        };
        let prefix = format!("ember_device_{name}_total{{{device}}} ");
        metrics
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {name} for block0 in {}", metrics.stdout))
            .parse()
            .unwrap()
    };
    assert!(counter("requests") > 0);
    assert!(counter("written_bytes") >= 512, "{}", metrics.stdout);
    // The exec's, at least (nothing listens for the agent's ready connection in console mode).
    assert!(counter("connections") >= 1, "{}", metrics.stdout);
    let r = ctl(&["snapshot", snapshot.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    // A graceful shutdown: the agent syncs and restarts the guest (its kernel has no ACPI to
    // power off with; it says so on the console), which ends ember with 0 before the grace
    // runs out.
    let asked = Instant::now();
    let shutdown = ctl(&["shutdown"]);
    assert_eq!(shutdown.code(), 0, "{shutdown:?}");
    assert!(
        shutdown.stdout.contains(r#""graceful":true"#),
        "{shutdown:?}"
    );
    assert_eq!(vm.take().wait().unwrap().code(), Some(0));
    assert!(asked.elapsed() < Duration::from_secs(120));
    reader.join();
    let before = output.lock().unwrap().clone();
    assert!(
        before.contains("reboot: Restarting system"),
        "no restart: {before}"
    );
    assert!(
        !before.contains("note="),
        "the original ran to the end: {before}"
    );

    // Its disk replaced by a copy (another file, same size and bytes): refused, one line, 125.
    let original = dir.join("disk.original");
    std::fs::rename(&disk, &original).unwrap();
    std::fs::copy(&original, &disk).unwrap();
    let refused = common::run(
        &["run", "--restore", snapshot.to_str().unwrap()],
        Duration::from_secs(60),
    );
    assert_eq!(refused.code(), 125, "{refused:?}");
    assert!(refused.stderr.contains("another file"), "{refused:?}");
    assert_eq!(refused.stderr.lines().count(), 1, "{refused:?}");
    std::fs::rename(&original, &disk).unwrap();

    // The restored loop prints a tick (with a later number than any before the snapshot)
    // before anything lets it stop, and its agent answers.
    let mut command = std::process::Command::new(common::ember());
    command
        .args(["-v", "run", "--restore", snapshot.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The clone gets the host's entropy and time before anything else is asked of it.
    let (restored, mut first) =
        common::spawn_command_until(command, "took the host's entropy and time", LINUX_TIMEOUT);
    let mut restored = common::Reaper(Some(restored));
    while !first.contains("tick ") {
        let mut buf = [0u8; 256];
        let n = std::io::Read::read(restored.child().stdout.as_mut().unwrap(), &mut buf).unwrap();
        assert!(n > 0, "the restored guest ended without a tick: {first}");
        first.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    // The restored vsock device reset the guest's connections; its agent still listens, and a
    // new connection through the new ember reaches it.
    exec_until_answered(&vsock, &["touch", "/tmp/stop"]);
    let mut r = common::finish(restored.take(), LINUX_TIMEOUT);
    r.stdout.insert_str(0, &first);
    assert_eq!(r.code(), 0, "{r:?}");
    // It goes on from where the snapshot was: later ticks, not the first; no boot again.
    let ticks: Vec<u32> = r
        .lines_with("tick ")
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        !ticks.is_empty() && ticks.iter().all(|&n| n > 2),
        "the restored loop counts on from past tick 2: {r:?}"
    );
    assert!(!r.stdout.contains("tick 1\n"), "{r:?}");
    assert!(!r.stdout.contains("EMBER-INIT"), "it booted again: {r:?}");
    // Its tmpfs, and the disk (read from the device again, caches dropped), as they were.
    // The clone got the host's entropy and time before anything else ran in it.
    assert!(
        r.stderr
            .contains("restore: the guest agent took the host's entropy and time"),
        "{r:?}"
    );
    r.assert_line("note=kept");
    r.assert_line("disk=before-snapshot");
    std::fs::remove_dir_all(&dir).ok();
}
