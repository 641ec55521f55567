//! `--image` and `--volume` on the default Linux guest: the guest's root from an image (a
//! directory here; tarballs and OCI images are unpacked by the same code, unit-tested in
//! `src/image/`), writable above a read-only disk, and host directories shared over virtio-fs.

mod common;

use std::fs;
use std::path::Path;

use common::{kvm_available, linux_args, scratch_dir, LINUX_TIMEOUT};

/// A tiny root filesystem: static busybox as /bin/sh, and an os-release to recognise it by.
fn busybox_root(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
    fs::write(
        dir.join("etc/os-release"),
        "ID=ember-test\nVERSION_CODENAME=tiny\n",
    )
    .unwrap();
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn a_bad_image_is_one_line_and_125() {
    let r = common::run(
        &["run", "--image", "/nonexistent/image.tar", "--", "true"],
        std::time::Duration::from_secs(60),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(r.stderr.contains("not found"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
}

#[test]
fn an_image_root_with_volumes() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("images");
    let image = dir.join("rootfs");
    busybox_root(&image);
    let shared = dir.join("shared");
    let read_only = dir.join("read-only");
    fs::create_dir_all(&shared).unwrap();
    fs::create_dir_all(&read_only).unwrap();
    fs::write(shared.join("in"), "from the host\n").unwrap();
    fs::write(read_only.join("ro-file"), "read me\n").unwrap();

    let script = "\
        . /etc/os-release; echo \"os=$ID\"; \
        cat /src/in; echo written > /src/out; \
        cat /ro/ro-file; if echo x > /ro/x 2>/dev/null; then echo ro=writable; else echo ro=refused; fi; \
        echo changed > /etc/os-release && echo root=writable; \
        echo pwd=$(pwd)";
    let mut args = linux_args("");
    args.extend([
        "--image".to_string(),
        image.display().to_string(),
        "--scratch".into(),
        "64M".into(),
        "--volume".into(),
        format!("{}:/src", shared.display()),
        "--volume".into(),
        format!("{}:/ro:ro", read_only.display()),
        "-w".into(),
        "/src".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        script.into(),
    ]);
    let r = common::run(&strs(&args), LINUX_TIMEOUT);
    assert_eq!(r.code(), 0, "{r:?}");
    for line in [
        "os=ember-test",
        "from the host",
        "read me",
        "ro=refused",
        "root=writable",
        "pwd=/src",
    ] {
        assert!(r.stdout.lines().any(|l| l == line), "{line:?} in {r:?}");
    }
    // Writes reached the shared directory; the read-only one and the image did not change.
    assert_eq!(fs::read_to_string(shared.join("out")).unwrap(), "written\n");
    assert!(!read_only.join("x").exists());
    assert_eq!(
        fs::read_to_string(image.join("etc/os-release")).unwrap(),
        "ID=ember-test\nVERSION_CODENAME=tiny\n"
    );
    fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_dying_virtiofsd_ends_ember_with_125() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("images-dying");
    let shared = dir.join("shared");
    fs::create_dir_all(&shared).unwrap();
    let mut args = linux_args("");
    args.extend([
        "--volume".to_string(),
        format!("{}:/src", shared.display()),
        "--".into(),
        "sleep".into(),
        "600".into(),
    ]);
    let child = common::spawn(&strs(&args), std::process::Stdio::null());
    // A failed check must not leave the VM running.
    let pid = child.id() as libc::pid_t;
    let guard = KillOnPanic(pid);
    // The daemon serving this test's directory (the path is unique to the test).
    let pattern = format!("--shared-dir {}", shared.display());
    let daemon = || {
        std::process::Command::new("pgrep")
            .args(["-f", "--", &pattern])
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let daemon_pid = loop {
        let pid = daemon();
        if !pid.is_empty() {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "virtiofsd never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    // Let the guest come up and mount it, then take the daemon away.
    std::thread::sleep(std::time::Duration::from_secs(5));
    // virtiofsd forks a sandboxed child: kill every process of it.
    for pid in daemon_pid.split_whitespace() {
        let killed = std::process::Command::new("kill")
            .args(["-9", pid])
            .status()
            .unwrap();
        assert!(killed.success());
    }
    let r = common::finish(child, LINUX_TIMEOUT);
    std::mem::forget(guard);
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(r.stderr.contains("virtiofsd"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r:?}");
    assert_eq!(daemon(), "", "a virtiofsd outlived ember");
    fs::remove_dir_all(&dir).ok();
}

/// Kills a process when a check fails before it was waited for.
struct KillOnPanic(libc::pid_t);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}
