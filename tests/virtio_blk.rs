//! virtio-mmio and virtio-blk without Linux: a micro-guest with a small polled driver reads and
//! writes known sectors, so the transport is proven without the guest kernel's help.

mod common;

use std::time::Duration;

use common::{kvm_available, micro_guest, run};

const TIMEOUT: Duration = Duration::from_secs(60);
const SECTOR: usize = 512;

fn image(name: &str, sectors: usize) -> (std::path::PathBuf, Vec<u8>) {
    let path = std::env::temp_dir().join(format!("ember-vblk-{}-{name}.img", std::process::id()));
    let contents: Vec<u8> = (0..sectors * SECTOR)
        .map(|i| (i * 31 % 251) as u8)
        .collect();
    std::fs::write(&path, &contents).unwrap();
    (path, contents)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn pattern() -> Vec<u8> {
    (0..SECTOR).map(|i| ((i * 7 + 3) & 0xff) as u8).collect()
}

#[test]
fn polled_driver_reads_writes_and_flushes() {
    if !kvm_available() {
        return;
    }
    let (path, original) = image("rw", 2048);
    let disk = format!("path={},id=testdisk", path.display());
    let kernel = micro_guest("virtio-blk");
    let r = run(
        &["run", "--kernel", kernel.to_str().unwrap(), "--disk", &disk],
        TIMEOUT,
    );
    assert_eq!(r.code(), 0, "{r:?}");
    r.assert_line("virtio: magic=0x74726976 version=2 device=2");
    r.assert_line("virtio: capacity=2048 ro=0");
    r.assert_line("virtio: id=testdisk");
    r.assert_line(&format!("virtio: sector0={}", hex(&original[..16])));
    r.assert_line("virtio: write+flush ok");
    r.assert_line("virtio: past-end status=1");
    r.assert_line("virtio: done");
    let after = std::fs::read(&path).unwrap();
    assert_eq!(&after[SECTOR..2 * SECTOR], pattern().as_slice());
    assert_eq!(&after[..SECTOR], &original[..SECTOR]);
    assert_eq!(&after[2 * SECTOR..], &original[2 * SECTOR..]);
    std::fs::remove_file(path).ok();
}

#[test]
fn read_only_disk_refuses_writes() {
    if !kvm_available() {
        return;
    }
    let (path, original) = image("ro", 64);
    let disk = format!("path={},readonly=on", path.display());
    let kernel = micro_guest("virtio-blk");
    let r = run(
        &["run", "--kernel", kernel.to_str().unwrap(), "--disk", &disk],
        TIMEOUT,
    );
    assert_eq!(r.code(), 0, "{r:?}");
    r.assert_line("virtio: capacity=64 ro=1");
    r.assert_line("virtio: write status=1");
    assert_eq!(std::fs::read(&path).unwrap(), original);
    std::fs::remove_file(path).ok();
}

#[test]
fn disk_errors_are_one_line() {
    if !kvm_available() {
        return;
    }
    let kernel = micro_guest("virtio-blk");
    let odd = std::env::temp_dir().join(format!("ember-vblk-{}-odd.img", std::process::id()));
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    for (disk, needle) in [
        (
            "path=/nonexistent/disk.img".to_string(),
            "cannot open disk image /nonexistent/disk.img",
        ),
        (format!("path={}", odd.display()), "512"),
    ] {
        let r = run(
            &["run", "--kernel", kernel.to_str().unwrap(), "--disk", &disk],
            TIMEOUT,
        );
        assert_eq!(r.code(), 125, "{r:?}");
        assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
        assert!(r.stderr.contains(needle), "{r:?}");
    }
    std::fs::remove_file(odd).ok();
}

#[test]
fn a_writable_image_cannot_be_used_twice() {
    if !kvm_available() {
        return;
    }
    let (path, _) = image("locked", 64);
    let disk = format!("path={}", path.display());
    let hang = micro_guest("exit-hang");
    // Once the first VM runs, it holds the image's lock.
    let first = common::spawn_until(
        &["run", "--kernel", hang.to_str().unwrap(), "--disk", &disk],
        "hanging",
    );
    let kernel = micro_guest("virtio-blk");
    let second = run(
        &["run", "--kernel", kernel.to_str().unwrap(), "--disk", &disk],
        TIMEOUT,
    );
    common::send_signal(&first, libc::SIGTERM);
    common::finish(first, Duration::from_secs(10));
    assert_eq!(second.code(), 125, "{second:?}");
    assert!(second.stderr.contains("is in use"), "{second:?}");
    std::fs::remove_file(path).ok();
}
