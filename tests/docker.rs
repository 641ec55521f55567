//! Docker runs a container with ember-runtime: a dockerd of the test's own (private data and exec
//! roots, its own containerd, in a network namespace of the test's) with the runtime added as
//! `--add-runtime ember=…`, so the path is dockerd → containerd → the runc shim
//! (`containerd-shim-runc-v2`, whose binary is ember-runtime) → the monitor. One container's
//! output and exit status, the same as under runc; nothing of it left after `--rm`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{KillOnDrop, Namespace};
use common::{kvm_available, linux_guest, scratch_dir, LINUX_TIMEOUT};

fn docker(dir: &Path, args: &[&str]) -> common::Run {
    let child = Command::new("docker")
        .arg("-H")
        .arg(format!("unix://{}", dir.join("docker.sock").display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker (resources/install-deps.sh installs docker.io)");
    common::finish(child, LINUX_TIMEOUT)
}

/// dockerd with everything under `dir`; stopped (with its containerd) when dropped.
struct Dockerd {
    daemon: Option<KillOnDrop>,
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            // SIGTERM: dockerd stops its containers and its containerd, then exits.
            common::send_signal(&daemon.0, libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = daemon.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn start_dockerd(ns: &Namespace, dir: &Path, runtime: &Path) -> Dockerd {
    let log = fs::File::create(dir.join("dockerd.log")).unwrap();
    let daemon = ns
        .command_network_only(&["dockerd"])
        .arg("--data-root")
        .arg(dir.join("data"))
        .arg("--exec-root")
        .arg(dir.join("exec"))
        .arg("--pidfile")
        .arg(dir.join("docker.pid"))
        .arg("-H")
        .arg(format!("unix://{}", dir.join("docker.sock").display()))
        // No bridge or firewall rules: the containers run with --network none.
        .args(["--bridge=none", "--iptables=false", "--ip6tables=false"])
        .arg("--add-runtime")
        .arg(format!("ember={}", runtime.display()))
        // This host: cgroup v1 without systemd, and hard limits below Docker's defaults.
        .args(["--exec-opt", "native.cgroupdriver=cgroupfs"])
        .args(["--default-ulimit", "nofile=1024:1024"])
        .args(["--default-ulimit", "nproc=1024:1024"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("dockerd (resources/install-deps.sh installs docker.io)");
    let dockerd = Dockerd {
        daemon: Some(KillOnDrop(daemon)),
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while docker(dir, &["info"]).code() != 0 {
        assert!(
            Instant::now() < deadline,
            "dockerd did not come up: {}",
            fs::read_to_string(dir.join("dockerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    dockerd
}

#[test]
fn docker_runs_a_container_with_ember_runtime() {
    if !kvm_available() {
        return;
    }
    linux_guest();
    let dir = scratch_dir("docker");
    let ns = Namespace::new("docker");
    let runtime = PathBuf::from(env!("CARGO_BIN_EXE_ember-runtime"));
    let _dockerd = start_dockerd(&ns, &dir, &runtime);
    // The image, from a busybox root (there is no registry).
    let tar = common::busybox_rootfs_tar(&dir, &["sh", "echo", "cat", "hostname"]);
    let imported = docker(&dir, &["import", tar.to_str().unwrap(), "ember-test:1"]);
    assert_eq!(imported.code(), 0, "{imported:?}");

    let run = |runtime: &str| {
        docker(
            &dir,
            &[
                "run",
                "--rm",
                "--runtime",
                runtime,
                "--network",
                "none",
                "--hostname",
                "boxed",
                "-e",
                "GREETING=hello",
                "ember-test:1",
                "sh",
                "-c",
                "echo \"$GREETING from $(hostname)\"; echo to stderr >&2; exit 7",
            ],
        )
    };
    let baseline = run("runc");
    let ember = run("ember");
    for (name, r) in [("runc", &baseline), ("ember", &ember)] {
        assert_eq!(r.code(), 7, "{name}: {r:?}");
        assert_eq!(r.stdout, "hello from boxed\n", "{name}: {r:?}");
        assert!(r.stderr.contains("to stderr"), "{name}: {r:?}");
    }
    let left = docker(&dir, &["ps", "-a", "-q"]);
    assert_eq!(left.stdout.trim(), "", "{left:?}");
    let state = dir.join("exec/runtime-runc/moby");
    let states: Vec<_> = fs::read_dir(&state)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        states.is_empty(),
        "container state left in {state:?}: {states:?}"
    );
    drop(_dockerd);
    let _ = Command::new("rm").arg("-rf").arg(&dir).status();
}
