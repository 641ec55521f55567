//! A private network namespace with one TAP for the tests that use virtio-net: nothing the
//! guest sends leaves it, and it is deleted when the test ends.

use std::path::Path;
use std::process::{Child, Command};

/// The host's end of the guest's network, on `tap0` inside the namespace.
pub const HOST_IP: &str = "10.0.2.1";
/// The address the guest gives its eth0.
pub const GUEST_IP: &str = "10.0.2.2";

/// A network namespace with one TAP (`tap0`, [`HOST_IP`]/24, up), deleted on drop.
pub struct Namespace {
    name: String,
}

impl Namespace {
    /// `tag` keeps test binaries that run at once apart (the process ID is added).
    pub fn new(tag: &str) -> Self {
        let name = format!("ember-{tag}-{}", std::process::id());
        let ns = Namespace { name };
        let status = Command::new("ip")
            .args(["netns", "add", &ns.name])
            .status()
            .expect("ip (iproute2)");
        assert!(status.success(), "ip netns add {}", ns.name);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns.exec_ok(&["ip", "tuntap", "add", "tap0", "mode", "tap"]);
        ns.exec_ok(&["ip", "addr", "add", &format!("{HOST_IP}/24"), "dev", "tap0"]);
        ns.exec_ok(&["ip", "link", "set", "tap0", "up"]);
        ns
    }

    /// `args` as a command run inside the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// The namespace's file, for `nsenter --net=`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `args` run in the namespace's network only: unlike `ip netns exec`, which mounts a /sys
    /// of its own (hiding the cgroup hierarchies), the mounts stay the host's.
    pub fn command_network_only(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.name))
            .args(args);
        cmd
    }

    fn exec_ok(&self, args: &[&str]) {
        let status = self.command(args).status().expect("ip netns exec");
        assert!(status.success(), "{args:?} in {}", self.name);
    }

    /// Serves `dir` over HTTP at [`HOST_IP`]:8080 (busybox httpd) until the result is dropped.
    pub fn serve(&self, dir: &Path) -> KillOnDrop {
        KillOnDrop(
            self.command(&[
                "busybox",
                "httpd",
                "-f",
                "-p",
                &format!("{HOST_IP}:8080"),
                "-h",
            ])
            .arg(dir)
            .spawn()
            .expect("busybox httpd"),
        )
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Writes `len` bytes of a fixed pseudo-random pattern to `path`: data for the guest to fetch.
pub fn write_blob(path: &Path, len: u32) {
    let data: Vec<u8> = (0..len)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::write(path, data).unwrap();
}

/// The MD5 sum of a file, as hex (what the guest's `md5sum` prints).
pub fn md5(path: &Path) -> String {
    let out = Command::new("md5sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)[..32].to_string()
}

/// A child process killed (and reaped) when this is dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
