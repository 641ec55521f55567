//! virtio-blk under Linux: an ext4 image made on the host, read and written by the guest, a
//! read-only disk, discard punching holes in the image file, and a root filesystem on virtio-blk.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{kvm_available, linux_args, LINUX_TIMEOUT};

fn scratch(name: &str) -> PathBuf {
    common::scratch_dir(&format!("linux-disks-{name}"))
}

/// An ext4 image of `size_mib` MiB holding the contents of `from`.
fn mkfs_ext4(image: &Path, from: &Path, size_mib: u32) {
    let status = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0",
            "-d",
        ])
        .arg(from)
        .arg(image)
        .arg(format!("{size_mib}M"))
        .status()
        .expect("mkfs.ext4 (e2fsprogs)");
    assert!(status.success());
}

/// Reads a file out of an ext4 image on the host, with debugfs (no mount needed).
fn ext4_cat(image: &Path, file: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {file}")])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn as_strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn ext4_disks_read_write_readonly_and_discard() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("data");
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("hello.txt"), "hello from the host\n").unwrap();
    let data = dir.join("data.img");
    let readonly = dir.join("readonly.img");
    mkfs_ext4(&data, &content, 64);
    mkfs_ext4(&readonly, &content, 16);
    let readonly_before = std::fs::read(&readonly).unwrap();
    // A raw disk full of data, every block allocated, for the guest to discard.
    let raw = dir.join("raw.img");
    std::fs::write(&raw, vec![0xaau8; 4 << 20]).unwrap();

    // In the guest: read the host's file, write one and sync; fill and delete 16 MiB, then
    // fstrim so the host file gets its blocks back; try to write the read-only disk.
    let script = [
        "mkdir -p /mnt/data /mnt/ro",
        "mount -t ext4 /dev/vda /mnt/data",
        "echo EMBER-TEST hello=$(cat /mnt/data/hello.txt | tr ' ' _)",
        "echo EMBER-TEST serial=$(cat /sys/block/vda/serial)",
        "echo written-by-the-guest > /mnt/data/guest.txt",
        "sync",
        "blkdiscard /dev/vdc && echo EMBER-TEST discard=ok",
        "echo EMBER-TEST ro=$(cat /sys/block/vdb/ro)",
        "mount -t ext4 -o ro /dev/vdb /mnt/ro && echo EMBER-TEST ro_hello=$(cat /mnt/ro/hello.txt | tr ' ' _)",
        "dd if=/dev/zero of=/dev/vdb bs=512 count=1 oflag=direct 2>/dev/null && echo EMBER-TEST ro_write=allowed || echo EMBER-TEST ro_write=refused",
        "umount /mnt/data; exit 7",
    ]
    .join("; ");
    let mut args = linux_args(&format!("ember.cmd=\"{script}\""));
    args.extend([
        "--memory".into(),
        "256M".into(),
        "--disk".into(),
        format!("path={},id=data-disk", data.display()),
        "--disk".into(),
        format!("path={},readonly=on", readonly.display()),
        "--disk".into(),
        format!("path={}", raw.display()),
    ]);
    let raw_blocks_before = std::fs::metadata(&raw).unwrap().blocks();
    let r = common::run(&as_strs(&args), LINUX_TIMEOUT);
    let raw_blocks_after = std::fs::metadata(&raw).unwrap().blocks();

    assert_eq!(r.code(), 7, "{r:?}");
    let tag = |key: &str| r.lines_with(&format!("EMBER-TEST {key}=")).join("");
    assert_eq!(tag("hello"), "hello_from_the_host");
    assert_eq!(tag("serial"), "data-disk");
    assert_eq!(tag("ro"), "1");
    assert_eq!(tag("ro_hello"), "hello_from_the_host");
    assert_eq!(tag("ro_write"), "refused");
    // The guest's write is in the host file after ember exits.
    assert_eq!(ext4_cat(&data, "/guest.txt"), "written-by-the-guest\n");
    assert_eq!(std::fs::read(&readonly).unwrap(), readonly_before);
    // The guest discarded the whole raw disk: the host file keeps its size but gives its blocks
    // back (holes punched), and reads as zeros.
    assert_eq!(tag("discard"), "ok");
    assert!(raw_blocks_before >= 8192, "{raw_blocks_before}");
    assert!(
        raw_blocks_after < raw_blocks_before / 8,
        "discard did not give blocks back: {raw_blocks_before} -> {raw_blocks_after} blocks"
    );
    let raw_after = std::fs::read(&raw).unwrap();
    assert_eq!(raw_after.len(), 4 << 20);
    assert!(raw_after.iter().all(|&b| b == 0));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn rootfs_on_virtio_blk() {
    if !kvm_available() {
        return;
    }
    // The root filesystem is the default guest's initramfs, unpacked onto an ext4 image.
    let dir = scratch("rootfs");
    let tree = dir.join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let (kernel, initrd) = common::linux_guest();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && cpio -id --quiet < {}",
            tree.display(),
            initrd.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "unpacking the initramfs");
    let rootfs = dir.join("rootfs.img");
    mkfs_ext4(&rootfs, &tree, 64);
    let cmd = "echo EMBER-TEST rootfs=$(awk -v m=/ '$2==m {print $3}' /proc/mounts); echo rootfs-was-here > /root-note; sync; exit 3";
    let args = [
        "run".to_string(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--rootfs".into(),
        rootfs.display().to_string(),
        "--cmdline".into(),
        format!("{} init=/init ember.cmd=\"{cmd}\"", common::TEST_CMDLINE),
    ];
    let r = common::run(&as_strs(&args), LINUX_TIMEOUT);
    assert_eq!(r.code(), 3, "{r:?}");
    assert_eq!(r.lines_with("EMBER-TEST rootfs="), vec!["ext4".to_string()]);
    assert_eq!(ext4_cat(&rootfs, "/root-note"), "rootfs-was-here\n");
    std::fs::remove_dir_all(dir).ok();
}

/// Nothing the guest synced is lost when ember is killed: the guest writes and `sync`s one file
/// after another on an ext4 disk, reporting each on the console once synced; ember gets SIGKILL
/// mid-loop. Every file reported is in the image with its contents, and once its journal is
/// replayed (what mounting it would do) e2fsck finds the file system clean.
#[test]
fn a_killed_ember_loses_nothing_the_guest_synced() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("kill");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let image = dir.join("data.ext4");
    mkfs_ext4(&image, &empty, 32);
    let script = "mkdir -p /data && mount -t ext4 /dev/vda /data && i=0 && while :; do \
                  i=$((i+1)); echo record-$i > /data/r$i; sync; echo synced-$i; done";
    let mut args = linux_args(&format!("ember.cmd=\"{script}\""));
    args.extend(["--disk".into(), format!("path={}", image.display())]);
    let mut vm = common::Reaper(Some(common::spawn(
        &as_strs(&args),
        std::process::Stdio::null(),
    )));
    let console = common::OutputCollector::start(vm.child().stdout.take().unwrap());
    let deadline = std::time::Instant::now() + LINUX_TIMEOUT;
    while !console.text().contains("synced-3\n") && !console.text().contains("synced-3\r") {
        assert!(
            std::time::Instant::now() < deadline && vm.child().try_wait().unwrap().is_none(),
            "the guest never synced three files: {}",
            console.text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // Mid-loop: the guest is writing, syncing or about to.
    common::send_signal(vm.child(), libc::SIGKILL);
    let status = vm.take().wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let output = console.text();
    console.join();
    let synced = output
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("synced-"))
        .filter_map(|n| n.parse::<u32>().ok())
        .max()
        .unwrap();
    assert!(synced >= 3, "{output}");

    let replay = Command::new("e2fsck")
        .args(["-fy", "-E", "journal_only"])
        .arg(&image)
        .output()
        .expect("e2fsck (e2fsprogs)");
    // 0: nothing to do, 1: the journal was replayed.
    assert!(
        matches!(replay.status.code(), Some(0 | 1)),
        "journal replay: {replay:?}"
    );
    let check = Command::new("e2fsck")
        .arg("-fn")
        .arg(&image)
        .output()
        .expect("e2fsck (e2fsprogs)");
    assert_eq!(check.status.code(), Some(0), "e2fsck -fn: {check:?}");
    for i in 1..=synced {
        assert_eq!(
            ext4_cat(&image, &format!("/r{i}")),
            format!("record-{i}\n"),
            "file {i} of {synced} synced: {output}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
