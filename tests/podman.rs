//! podman runs containers with ember-runtime (`podman --runtime`), each a microVM: an image the
//! test imports from a busybox root (there is no registry), a command's output, its exit status,
//! `-e`, `-w`, `-u` and a `-v` volume whose write reaches the host, with `--network none`; runc
//! (Debian's) runs the same container as the baseline; a detached container `exec`'d into,
//! `stop`ped (143) and removed; nothing of the containers is left. The detached container is on
//! podman's default network (CNI's bridge, 10.88.0.0/16): from inside the VM it fetches a file
//! from a server on the network's gateway address, as the same container under runc does, and
//! has the container's address and host name. podman runs inside a network namespace of the
//! test's own, so its bridge and firewall rules never touch the host's network. podman 4.3 on
//! this kind of host needs a private configuration: cgroupfs (crun refuses the hybrid cgroup
//! layout; runc is used), ulimits within the sandbox's hard limits, vfs storage and file events
//! in directories of the test's own.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::netns::{KillOnDrop, Namespace};
use common::{kvm_available, linux_guest, scratch_dir, LINUX_TIMEOUT};

/// The gateway of podman's default network (its bridge's address in the namespace).
const GATEWAY: &str = "10.88.0.1";

/// podman in `ns`, with storage, run state and configuration under `dir`.
fn podman(ns: &Namespace, dir: &Path, args: &[&str]) -> common::Run {
    let child = ns
        .command_network_only(&["podman"])
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

/// podman in `ns` as a shell command line, for script(1)'s pseudo-terminal.
fn podman_shell(ns: &Namespace, dir: &Path) -> String {
    format!(
        "nsenter --net={} env CONTAINERS_CONF={} podman --root {} --runroot {} --storage-driver vfs",
        ns.path(),
        dir.join("containers.conf").display(),
        dir.join("storage").display(),
        dir.join("run").display()
    )
}

/// The image `localhost/ember-test:1`: busybox and its applets.
fn import_image(ns: &Namespace, dir: &Path) {
    let tar = common::busybox_rootfs_tar(
        dir,
        &[
            "sh", "echo", "cat", "pwd", "id", "true", "sleep", "wget", "hostname", "ip", "stty",
            "tty", "grep",
        ],
    );
    let r = podman(
        ns,
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
    let ns = Namespace::new("podman");
    // A server on every address of the namespace, the gateway's among them once podman's bridge
    // is up.
    let www = dir.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("greeting"), "hello from the gateway\n").unwrap();
    let _server = KillOnDrop(
        ns.command_network_only(&["busybox", "httpd", "-f", "-p", "8080", "-h"])
            .arg(&www)
            .spawn()
            .expect("busybox httpd"),
    );
    let podman = |dir: &Path, args: &[&str]| podman(&ns, dir, args);
    fs::write(
        dir.join("containers.conf"),
        "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
         [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
    )
    .unwrap();
    import_image(&ns, &dir);
    let shared = dir.join("shared");
    fs::create_dir_all(&shared).unwrap();
    // The container's user (1000) writes into it.
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o777)).unwrap();
    let volume = format!("{}:/work", shared.display());
    fs::write(
        shared.join("job.sh"),
        "echo \"$GREETING from $(pwd) as $(id -u):$(id -g)\"; echo written > out; tty; stty size; \
         exit 7\n",
    )
    .unwrap();
    // `-it` on a pseudo-terminal (script(1)) whose size the container sees.
    let run = |runtime: &str| {
        let inner = format!(
            "stty rows 30 cols 100; {} run --rm -it --runtime {runtime} --network none \
             -e GREETING=hello -w /work -u 1000:1000 -v {volume} localhost/ember-test:1 \
             sh /work/job.sh; echo \"podman-exit=$?\"",
            podman_shell(&ns, &dir)
        );
        let r = common::finish(common::in_pty(&inner), LINUX_TIMEOUT);
        r.stdout.replace('\r', "")
    };
    let baseline = run("runc");
    let ember = run(runtime().to_str().unwrap());
    for (name, out) in [("runc", &baseline), ("ember", &ember)] {
        for line in ["hello from /work as 1000:1000", "30 100", "podman-exit=7"] {
            assert!(out.lines().any(|l| l == line), "{name}: {line:?} in {out}");
        }
        assert!(out.contains("/dev/pts/"), "{name}: {out}");
    }
    assert_eq!(fs::read_to_string(shared.join("out")).unwrap(), "written\n");

    // The default network under runc: what the VM must reach too.
    let url = format!("http://{GATEWAY}:8080/greeting");
    let fetched = podman(
        &dir,
        &[
            "run",
            "--rm",
            "--runtime",
            "runc",
            "localhost/ember-test:1",
            "wget",
            "-qO-",
            &url,
        ],
    );
    assert_eq!(fetched.code(), 0, "runc: {fetched:?}");
    assert_eq!(
        fetched.stdout, "hello from the gateway\n",
        "runc: {fetched:?}"
    );

    // A detached container on the default network: running, a second process in it, stopped by
    // SIGTERM, removed.
    let runtime = runtime();
    let started = podman(
        &dir,
        &[
            "run",
            "-d",
            "--runtime",
            runtime.to_str().unwrap(),
            "--group-add",
            "10",
            "--ulimit",
            "nofile=512:1024",
            "--security-opt",
            "no-new-privileges",
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
    // The process spec's further groups, limits and no_new_privs hold in the guest.
    let exec = podman(
        &dir,
        &[
            "exec",
            &id,
            "sh",
            "-c",
            "echo from exec; id -G; ulimit -n; ulimit -Hn; grep NoNewPrivs /proc/self/status; exit 4",
        ],
    );
    assert_eq!(exec.code(), 4, "{exec:?}");
    assert_eq!(
        exec.stdout, "from exec\n0 10\n512\n1024\nNoNewPrivs:\t1\n",
        "{exec:?}"
    );
    // `exec -it` on a pseudo-terminal resized while the process runs (8 s in: on a loaded host
    // the first `stty size` has been seen 3 s after the exec started).
    let inner = format!(
        "stty rows 30 cols 100; (sleep 8; stty rows 40 cols 120 </dev/tty) & \
         {} exec -it {id} sh -c 'stty size; sleep 20; stty size'; echo \"exec-exit=$?\"; wait",
        podman_shell(&ns, &dir)
    );
    let tty = common::finish(common::in_pty(&inner), LINUX_TIMEOUT);
    let out = tty.stdout.replace('\r', "");
    for line in ["30 100", "40 120", "exec-exit=0"] {
        assert!(out.lines().any(|l| l == line), "{line:?} in {out}");
    }
    // The VM is on the container's network: its address, its host name, the gateway's server;
    // podman's /etc/hosts and /etc/resolv.conf (single files, bound over the image's).
    let address = inspect("{{.NetworkSettings.IPAddress}}");
    let sandbox = inspect("{{.NetworkSettings.SandboxKey}}");
    let script = format!(
        "hostname; ip -4 -o addr show dev eth0; wget -qO- {url}; cat /etc/hosts /etc/resolv.conf"
    );
    let network = podman(&dir, &["exec", &id, "sh", "-c", &script]);
    assert_eq!(network.code(), 0, "{network:?}");
    let lines: Vec<&str> = network.stdout.lines().collect();
    assert_eq!(lines.first(), Some(&&id[..12]), "{network:?}");
    assert!(
        lines
            .get(1)
            .is_some_and(|l| l.contains(&format!("inet {}/16", address.trim()))),
        "{network:?} (the container's address is {address})"
    );
    assert_eq!(lines.get(2), Some(&"hello from the gateway"), "{network:?}");
    assert!(
        network
            .stdout
            .contains(&format!("{GATEWAY}\thost.containers.internal")),
        "{network:?}"
    );
    assert!(network.stdout.contains("nameserver "), "{network:?}");
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
    // The TAP went with the container's network namespace.
    let sandbox = sandbox.trim();
    assert!(!sandbox.is_empty());
    if Path::new(sandbox).exists() {
        let links = Command::new("nsenter")
            .arg(format!("--net={sandbox}"))
            .args(["ip", "-o", "link"])
            .output()
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&links.stdout).contains("ember-tap"),
            "a TAP is left in {sandbox}"
        );
    }
    let monitors = Command::new("pgrep")
        .args(["-f", &format!("virtiofsd.*{}", shared.display())])
        .output()
        .unwrap();
    assert!(monitors.stdout.is_empty(), "a virtiofsd is left");
    let _ = podman(&dir, &["rmi", "-a", "-f"]);
    let _ = Command::new("rm").arg("-rf").arg(&dir).status();
}
