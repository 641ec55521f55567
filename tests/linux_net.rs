//! virtio-net under Linux, inside a network namespace this test creates and deletes: the guest
//! configures an address, pings the host side of its TAP, and moves 4 MiB each way over TCP
//! (busybox wget and httpd on both sides) with checksums. No address outside the namespace is
//! ever used.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::netns::{md5, write_blob, Namespace, GUEST_IP, HOST_IP};
use common::{kvm_available, linux_args, micro_guest, LINUX_TIMEOUT};

#[test]
fn guest_pings_and_moves_data_both_ways() {
    if !kvm_available() {
        return;
    }
    let ns = Namespace::new("net");
    let dir = common::scratch_dir("net");
    let blob = dir.join("blob");
    write_blob(&blob, 4 << 20);
    let host_md5 = md5(&blob);
    let _httpd = ns.serve(&dir);

    let script = [
        format!("ip addr add {GUEST_IP}/24 dev eth0"),
        "ip link set eth0 up".into(),
        format!("ping -c 3 -W 10 {HOST_IP} >/dev/null && echo EMBER-TEST ping=ok"),
        format!("wget -q -O /tmp/fromhost http://{HOST_IP}:8080/blob"),
        "echo EMBER-TEST fromhost=$(md5sum /tmp/fromhost | cut -c1-32)".into(),
        "rm /tmp/fromhost; mkdir /tmp/www".into(),
        // 4 MiB made in user space: the kernel's random generator runs emulated on software
        // KVM (4 MiB of /dev/urandom took minutes on a busy host and timed the test out).
        "seq 1000000 | head -c 4194304 >/tmp/www/blob".into(),
        "echo EMBER-TEST toguest=$(md5sum /tmp/www/blob | cut -c1-32)".into(),
        "httpd -p 8080 -h /tmp/www".into(),
        "echo EMBER-TEST serving".into(),
        "sleep 600".into(),
    ]
    .join("; ");
    let mut args = linux_args(&format!("ember.cmd=\"{script}\""));
    args.extend(["--memory", "256M", "--net", "tap=tap0"].map(String::from));
    let mut ember_cmd = ns.command(&[]);
    ember_cmd
        .arg(common::ember())
        .args(&args[..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (child, before) =
        common::spawn_command_until(ember_cmd, "EMBER-TEST serving", LINUX_TIMEOUT);

    // While the VM holds tap0, a second ember cannot attach to it.
    let hang = micro_guest("exit-hang");
    let second = ns
        .command(&[])
        .arg(common::ember())
        .args([
            "run",
            "--kernel",
            hang.to_str().unwrap(),
            "--net",
            "tap=tap0",
        ])
        .output()
        .unwrap();
    let second_err = String::from_utf8_lossy(&second.stderr).into_owned();

    // Guest -> host: fetch the guest's file from its httpd.
    let fetched = dir.join("fromguest");
    let started = Instant::now();
    let wget = ns
        .command(&["busybox", "wget", "-q", "-O"])
        .arg(&fetched)
        .arg(format!("http://{GUEST_IP}:8080/blob"))
        .status()
        .unwrap();
    let guest_to_host = started.elapsed();
    common::send_signal(&child, libc::SIGTERM);
    let mut r = common::finish(child, Duration::from_secs(30));
    r.stdout.insert_str(0, &before);

    let tag = |key: &str| r.lines_with(&format!("EMBER-TEST {key}=")).join("");
    assert_eq!(tag("ping"), "ok", "{r:?}");
    assert_eq!(tag("fromhost"), host_md5, "host -> guest data differs");
    assert!(wget.success(), "fetching from the guest failed");
    assert_eq!(md5(&fetched), tag("toguest"), "guest -> host data differs");
    assert_eq!(r.code(), 143, "{r:?}");
    assert_eq!(second.status.code(), Some(125), "{second_err}");
    assert!(second_err.contains("busy"), "{second_err}");
    eprintln!("guest -> host 4 MiB in {guest_to_host:?}");
    std::fs::remove_dir_all(dir).ok();
}
