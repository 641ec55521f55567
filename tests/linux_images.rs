//! `--image` and `--volume` on the default Linux guest: the guest's root from an image (a
//! directory here; tarballs and OCI images are unpacked by the same code, unit-tested in
//! `src/image/`), writable above a read-only disk, and host directories and single
//! files shared over virtio-fs.

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

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
    // Single files, as engines bind /etc/hosts: one read-only, one written through.
    fs::write(dir.join("motd"), "file volume\n").unwrap();
    fs::write(dir.join("notes"), "first\n").unwrap();

    let script = "\
        . /etc/os-release; echo \"os=$ID\"; \
        cat /etc/motd; if echo x > /etc/motd 2>/dev/null; then echo motd=writable; else echo motd=refused; fi; \
        echo second >> /etc/notes; \
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
        "--volume".into(),
        format!("{}:/etc/motd:ro", dir.join("motd").display()),
        "--volume".into(),
        format!("{}:/etc/notes", dir.join("notes").display()),
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
        "file volume",
        "motd=refused",
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
        fs::read_to_string(dir.join("notes")).unwrap(),
        "first\nsecond\n"
    );
    assert_eq!(
        fs::read_to_string(image.join("etc/os-release")).unwrap(),
        "ID=ember-test\nVERSION_CODENAME=tiny\n"
    );
    fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_host_directory_as_the_root() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("root-volume");
    let root = dir.join("rootfs");
    busybox_root(&root);
    let shared = dir.join("shared");
    fs::create_dir_all(&shared).unwrap();
    fs::write(shared.join("in"), "from the host\n").unwrap();
    // Listed after the volume that goes inside it: the root is mounted first all the same.
    let mut args = linux_args("");
    args.extend([
        "--volume".to_string(),
        format!("{}:/src", shared.display()),
        "--volume".into(),
        format!("{}:/", root.display()),
        "--".into(),
        "sh".into(),
        "-c".into(),
        ". /etc/os-release; echo \"os=$ID\"; cat /src/in; echo made > /made; \
         test -e /lib/ember/init.sh || echo initramfs=hidden"
            .into(),
    ]);
    let r = common::run(&strs(&args), LINUX_TIMEOUT);
    assert_eq!(r.code(), 0, "{r:?}");
    for line in ["os=ember-test", "from the host", "initramfs=hidden"] {
        assert!(r.stdout.lines().any(|l| l == line), "{line:?} in {r:?}");
    }
    // The guest's write is in the host directory at once: it is the guest's root.
    assert_eq!(fs::read_to_string(root.join("made")).unwrap(), "made\n");

    // An image and a root volume cannot both be the root: one line, no boot.
    let r = common::run(
        &[
            "run",
            "--image",
            root.to_str().unwrap(),
            "--volume",
            &format!("{}:/", root.display()),
            "--",
            "true",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(r.code(), 125, "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
    assert!(r.stderr.contains("volume at /"), "{r:?}");
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

/// A tar layer holding `entries`: (path, contents or None for a directory, or a symlink target).
fn layer(entries: &[(&str, Entry)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, entry) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        match entry {
            Entry::File(data, mode) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, &data[..]).unwrap();
            }
            Entry::Dir(mode) => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder
                    .append_data(&mut header, path, std::io::empty())
                    .unwrap();
            }
            Entry::Link(target) => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target).unwrap();
            }
        }
    }
    builder.into_inner().unwrap()
}

enum Entry {
    File(Vec<u8>, u32),
    Dir(u32),
    Link(&'static str),
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(data))
}

/// Writes `data` as a blob of the OCI layout at `dir`; returns its descriptor's digest.
fn blob(dir: &Path, data: &[u8]) -> String {
    let digest = sha256(data);
    fs::write(dir.join("blobs/sha256").join(&digest), data).unwrap();
    format!("sha256:{digest}")
}

/// An OCI image layout of two layers: a busybox root with /etc/gone, then a layer that deletes
/// /etc/gone (a whiteout) and adds /app; its config sets Env and WorkingDir.
fn two_layer_oci(dir: &Path) {
    fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let busybox = fs::read("/bin/busybox").unwrap();
    let base = layer(&[
        ("bin", Entry::Dir(0o755)),
        ("bin/busybox", Entry::File(busybox, 0o755)),
        ("bin/sh", Entry::Link("busybox")),
        ("etc", Entry::Dir(0o755)),
        (
            "etc/os-release",
            Entry::File(b"ID=ember-oci\n".to_vec(), 0o644),
        ),
        (
            "etc/gone",
            Entry::File(b"deleted by the next layer\n".to_vec(), 0o644),
        ),
    ]);
    let top = layer(&[
        ("etc/.wh.gone", Entry::File(Vec::new(), 0o644)),
        // Writable by anyone: the image runs its commands as user 1234.
        ("app", Entry::Dir(0o777)),
        ("app/marker", Entry::File(b"top layer\n".to_vec(), 0o644)),
    ]);
    let layers: Vec<(String, usize)> = [&base, &top]
        .iter()
        .map(|data| (blob(dir, data), data.len()))
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREETING=from-the-image"], "WorkingDir": "/app",
                   "User": "1234:5678"},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.0.clone()).collect::<Vec<_>>()},
    })
    .to_string();
    let config_digest = blob(dir, config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layers.iter().map(|(digest, size)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": size,
        })).collect::<Vec<_>>(),
    })
    .to_string();
    let manifest_digest = blob(dir, manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                       "digest": manifest_digest, "size": manifest.len(),
                       "platform": {"architecture": "amd64", "os": "linux"}}],
    });
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

#[test]
fn two_vms_share_an_oci_image_and_neither_changes_it() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("images-oci");
    let image = dir.join("oci");
    two_layer_oci(&image);
    // Two VMs at once on the one image, one given the layout and one the archive: each writes
    // into its root and a 1 MiB file into its own volume, then looks for the other's file (which
    // its overlay must not show).
    // The same image as an oci-archive (`podman save --format oci-archive`: the layout, tarred).
    let archive = dir.join("image.oci.tar");
    let mut tar = tar::Builder::new(fs::File::create(&archive).unwrap());
    tar.append_dir_all(".", &image).unwrap();
    tar.finish().unwrap();
    drop(tar);
    let images = [image.clone(), archive];
    let runs: Vec<_> = (0..2)
        .map(|n| {
            let image = &images[n];
            let out = dir.join(format!("out{n}"));
            fs::create_dir_all(&out).unwrap();
            // The image's user writes there.
            fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
            let mut args = linux_args("");
            args.extend([
                "--image".to_string(),
                image.display().to_string(),
                "--volume".into(),
                format!("{}:/out", out.display()),
                "--".into(),
                "sh".into(),
                "-c".into(),
                format!(
                    ". /etc/os-release; echo \"os=$ID greeting=$GREETING pwd=$(pwd)\"; \
                     echo \"id=$(id -u):$(id -g)\"; \
                     cat /app/marker; [ -e /etc/gone ] && echo gone=present || echo gone=deleted; \
                     echo {n} > /app/vm{n}; sleep 5; ls /app | grep '^vm' | tr '\\n' ' '; echo; \
                     head -c 1048576 /dev/urandom > /out/blob; md5sum /out/blob"
                ),
            ]);
            std::thread::spawn(move || (common::run(&strs(&args), LINUX_TIMEOUT), out))
        })
        .collect();
    for (n, run) in runs.into_iter().enumerate() {
        let (r, out) = run.join().unwrap();
        assert_eq!(r.code(), 0, "{r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert!(
            lines.contains(&"os=ember-oci greeting=from-the-image pwd=/app"),
            "{r:?}"
        );
        // The image's User, from its config, with no /etc/passwd to name it.
        assert!(lines.contains(&"id=1234:5678"), "{r:?}");
        assert!(lines.contains(&"top layer"), "{r:?}");
        assert!(lines.contains(&"gone=deleted"), "{r:?}");
        // Only its own file: the other VM's writes went to the other VM's overlay.
        assert!(lines.contains(&format!("vm{n} ").as_str()), "{r:?}");
        // The 1 MiB file on the host, byte for byte what the guest summed.
        let guest_md5 = lines.last().unwrap().split_whitespace().next().unwrap();
        assert_eq!(common::netns::md5(&out.join("blob")), guest_md5, "{r:?}");
        let blob = fs::metadata(out.join("blob")).unwrap();
        assert_eq!(blob.len(), 1 << 20);
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&blob), 1234, "{r:?}");
    }
    fs::remove_dir_all(&dir).ok();
}

/// A Debian bookworm root made by `mmdebstrap --variant=minbase` (resources/debian-image.sh,
/// cached outside the clone), as a rootfs tarball: a real distribution boots as the guest's root,
/// its tools run, and `-u` names a user of its /etc/passwd.
#[test]
fn a_debian_bookworm_root_runs_its_own_tools() {
    if !kvm_available() {
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/resources/debian-image.sh");
    let made = std::process::Command::new(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(made.status.success(), "{script} failed");
    let tarball = String::from_utf8(made.stdout).unwrap().trim().to_string();

    let mut args = linux_args("");
    args.extend(
        [
            "--image",
            &tarball,
            "--memory",
            "512M",
            "-u",
            "nobody",
            "--",
            "sh",
            "-c",
            ". /etc/os-release; echo \"codename=$VERSION_CODENAME\"; \
             apt-get --version | head -n 1; python3 -c 'print(\"python\", 6 * 7)'; \
             echo \"packages=$(dpkg-query -f '.\\n' -W | wc -l)\"; \
             echo \"user=$(id -un):$(id -gn) home=$HOME\"; \
             touch /etc/x 2>/dev/null && echo root-writable || echo root-refused",
        ]
        .map(String::from),
    );
    let r = common::run(&strs(&args), LINUX_TIMEOUT);
    assert_eq!(r.code(), 0, "{r:?}");
    r.assert_line("codename=bookworm");
    r.assert_line("python 42");
    r.assert_line("user=nobody:nogroup home=/nonexistent");
    r.assert_line("root-refused");
    assert!(r.stdout.lines().any(|l| l.starts_with("apt 2.6")), "{r:?}");
    let packages: usize = r.lines_with("packages=")[0].parse().unwrap();
    assert!(packages > 80, "a minbase root has ~90 packages: {r:?}");
}
