//! Snapshots of the Linux guest: one taken through the control socket while a shell loop
//! counts, resumed by a new ember, which goes on counting with its files and disk as they were.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, linux_args, scratch_dir, LINUX_TIMEOUT};

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
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
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    // No double quotes: the script is one kernel command-line value.
    let script =
        "echo kept > /tmp/note; echo before-snapshot | dd of=/dev/vda conv=sync 2>/dev/null; \
                  sync; i=0; while [ $i -lt 6 ]; do i=$((i+1)); echo tick $i; sleep 1; done; \
                  echo 3 > /proc/sys/vm/drop_caches; echo note=$(cat /tmp/note); \
                  echo disk=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -n 1)";
    let mut args = linux_args(&format!("ember.cmd=\"{script}\""));
    args.extend([
        "--disk".to_string(),
        format!("path={}", disk.display()),
        "--api-socket".into(),
        socket.display().to_string(),
    ]);
    let mut vm = common::spawn(&strs(&args), Stdio::null());
    let mut stdout = vm.stdout.take().unwrap();
    let output = Arc::new(Mutex::new(String::new()));
    let reader = std::thread::spawn({
        let output = output.clone();
        move || {
            let mut buf = [0u8; 512];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                output
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let deadline = Instant::now() + LINUX_TIMEOUT;
    while !output.lock().unwrap().contains("tick 2") {
        assert!(
            Instant::now() < deadline && vm.try_wait().unwrap().is_none(),
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
    let r = ctl(&["snapshot", snapshot.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(ctl(&["shutdown"]).code(), 0);
    assert_eq!(vm.wait().unwrap().code(), Some(0));
    reader.join().unwrap();
    let before = output.lock().unwrap().clone();
    assert!(
        !before.contains("note="),
        "the original ran to the end: {before}"
    );

    let r = common::run(
        &["run", "--restore", snapshot.to_str().unwrap()],
        LINUX_TIMEOUT,
    );
    assert_eq!(r.code(), 0, "{r:?}");
    // It goes on from where the snapshot was: later ticks, not the first; no boot again.
    r.assert_line("tick 6");
    assert!(!r.stdout.contains("tick 1\n"), "{r:?}");
    assert!(!r.stdout.contains("EMBER-INIT"), "it booted again: {r:?}");
    // Its tmpfs, and the disk (read from the device again, caches dropped), as they were.
    r.assert_line("note=kept");
    r.assert_line("disk=before-snapshot");
    std::fs::remove_dir_all(&dir).ok();
}
