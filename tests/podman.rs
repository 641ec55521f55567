//! podman runs containers with ember-runtime (`podman --runtime`), each a microVM: an image the
//! test imports from a busybox root (there is no registry), a command's output, its exit status,
//! `-e`, `-w`, `-u` and a `-v` volume whose write reaches the host, with `--network none`; runc
//! (Debian's) runs the same container as the baseline; a detached container `exec`'d into,
//! `stop`ped (143) and removed; nothing of the containers is left. podman 4.3 on this kind of host needs a private configuration: cgroupfs (crun
//! refuses the hybrid cgroup layout; runc is used), ulimits within the sandbox's hard limits,
//! vfs storage and file events in directories of the test's own.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{kvm_available, linux_guest, scratch_dir, LINUX_TIMEOUT};

/// podman with storage, run state and configuration under `dir`.
fn podman(dir: &Path, args: &[&str]) -> common::Run {
    let child = Command::new("podman")
        .env("CONTAINERS_CONF", dir.join("containers.conf"))
        .arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .args(["--storage-driver", "vfs"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("podman (resources/install-deps.sh installs it)");
    common::finish(child, LINUX_TIMEOUT)
}

/// The image `localhost/ember-test:1`: busybox and its applets.
fn import_image(dir: &Path) {
    let root = dir.join("rootfs");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "cat", "pwd", "id", "true", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    let r = podman(
        dir,
        &["import", tar.to_str().unwrap(), "localhost/ember-test:1"],
    );
    assert_eq!(r.code(), 0, "{r:?}");
}

fn runtime() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember-runtime"))
}

#[test]
fn podman_runs_a_container_as_a_microvm() {
    if !kvm_available() {
        return;
    }
    linux_guest();
    let dir = scratch_dir("podman");
    fs::write(
        dir.join("containers.conf"),
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
    )
    .unwrap();
    import_image(&dir);
    let shared = dir.join("shared");
    fs::create_dir_all(&shared).unwrap();
    // The container's user (1000) writes into it.
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let volume = format!("{}:/work", shared.display());
    let script = "echo \"$GREETING from $(pwd) as $(id -u):$(id -g)\"; echo written > out; exit 7";
    let run = |runtime: &str| {
        podman(
            &dir,
            &[
                "run",
                "--rm",
                "--runtime",
                runtime,
                "--network",
                "none",
                "-e",
                "GREETING=hello",
                "-w",
                "/work",
                "-u",
                "1000:1000",
                "-v",
                &volume,
                "localhost/ember-test:1",
                "sh",
                "-c",
                script,
            ],
        )
    };
    let baseline = run("runc");
    let ember = run(runtime().to_str().unwrap());
    for (name, r) in [("runc", &baseline), ("ember", &ember)] {
        assert_eq!(r.code(), 7, "{name}: {r:?}");
        assert!(
            r.stdout.contains("hello from /work as 1000:1000"),
            "{name}: {r:?}"
        );
    }
    assert_eq!(fs::read_to_string(shared.join("out")).unwrap(), "written\n");

    // A detached container: running, a second process in it, stopped by SIGTERM, removed.
    let runtime = runtime();
    let started = podman(
        &dir,
        &[
            "run",
            "-d",
            "--runtime",
            runtime.to_str().unwrap(),
            "--network",
            "none",
            "localhost/ember-test:1",
            "sleep",
            "300",
        ],
    );
    assert_eq!(started.code(), 0, "{started:?}");
    let id = started.stdout.trim().to_string();
    let inspect = |what: &str| {
        podman(&dir, &["inspect", "--format", what, &id])
            .stdout
            .clone()
    };
    assert_eq!(inspect("{{.State.Status}}").trim(), "running");
    let exec = podman(&dir, &["exec", &id, "sh", "-c", "echo from exec; exit 4"]);
    assert_eq!(exec.code(), 4, "{exec:?}");
    assert!(exec.stdout.contains("from exec"), "{exec:?}");
    let stopped = podman(&dir, &["stop", "-t", "10", &id]);
    assert_eq!(stopped.code(), 0, "{stopped:?}");
    assert_eq!(
        inspect("{{.State.Status}} {{.State.ExitCode}}").trim(),
        "exited 143"
    );
    assert_eq!(podman(&dir, &["rm", &id]).code(), 0);
    // Nothing of the container is left: no container, no monitor, no virtiofsd.
    let left = podman(&dir, &["ps", "-a", "--format", "{{.ID}}"]);
    assert_eq!(left.stdout.trim(), "", "{left:?}");
    let monitors = Command::new("pgrep")
        .args(["-f", &format!("virtiofsd.*{}", shared.display())])
        .output()
        .unwrap();
    assert!(monitors.stdout.is_empty(), "a virtiofsd is left");
    let _ = podman(&dir, &["rmi", "-a", "-f"]);
    let _ = Command::new("rm").arg("-rf").arg(&dir).status();
}
