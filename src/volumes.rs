//! `--volume HOST_DIR:GUEST_DIR[:ro]`: host directories shared live with the guest through
//! virtio-fs, each served by its own `virtiofsd` (the Rust daemon from crates.io) over vhost-user.
//!
//! Ember starts one virtiofsd per share on a socket in a private directory, attaches a virtio-fs
//! device (tag `volN`) that hands its queues to it, and tells the default guest's init where to
//! mount each tag (`ember.volumes=vol0=/src,vol1=/data:ro`). Guest RAM must then be a shared
//! memfd mapping: virtiofsd maps it to reach the queues and the data buffers.
//!
//! A volume may also be a single file (`--volume ./hosts:/etc/hosts`, as container engines bind
//! /etc/hosts and /etc/resolv.conf): virtio-fs shares directories, so the file's directory is
//! shared (once for all the files of one directory), mounted out of sight by the guest's init,
//! and the file bound over its guest path (`ember.files=vol1/hosts=/etc/hosts,…`).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::config::VolumeConfig;
use crate::job::PrivateDir;

/// Why the volumes could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(
        "virtiofsd is not installed (needed for --volume): install it with \
         `cargo install virtiofsd --locked` (it needs libseccomp-dev and libcap-ng-dev), \
         or run resources/install-deps.sh"
    )]
    NoVirtiofsd,
    #[error("--volume {0}: not a directory or a file")]
    NotADirectory(PathBuf),
    #[error(
        "--volume {0}: the file name cannot travel on the kernel command line \
         (no spaces, commas, '=' or quotes)"
    )]
    BadFileName(PathBuf),
    #[error("cannot make a private directory for the volumes' sockets")]
    SocketDir(#[source] io::Error),
    #[error("cannot start virtiofsd for {dir}")]
    Spawn {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A running virtiofsd for one share.
pub struct Volume {
    /// The virtio-fs tag the guest mounts: `volN`.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// The host directory served.
    pub host: PathBuf,
    pub read_only: bool,
    pub guest: GuestUse,
    daemon: Child,
}

/// What the guest makes of a share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestUse {
    /// Mounted at this guest path.
    Directory(String),
    /// Files in it, each bound over a guest path: (file name, guest path).
    Files(Vec<(String, String)>),
}

/// The shares the volumes need: one per directory volume, one per directory (and mode) holding
/// file volumes.
fn plan_shares(configs: &[VolumeConfig]) -> Result<Vec<(PathBuf, bool, GuestUse)>, VolumeError> {
    let mut shares: Vec<(PathBuf, bool, GuestUse)> = Vec::new();
    for config in configs {
        if config.host.is_dir() {
            shares.push((
                config.host.clone(),
                config.read_only,
                GuestUse::Directory(config.guest.clone()),
            ));
            continue;
        }
        if !config.host.is_file() {
            return Err(VolumeError::NotADirectory(config.host.clone()));
        }
        let name = config
            .host
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.contains([',', '=', ' ', '\t', '"', '\\', ':']))
            .ok_or_else(|| VolumeError::BadFileName(config.host.clone()))?
            .to_string();
        let dir = config
            .host
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let file = (name, config.guest.clone());
        let existing = shares
            .iter_mut()
            .find_map(|(host, read_only, guest)| match guest {
                GuestUse::Files(files) if *host == dir && *read_only == config.read_only => {
                    Some(files)
                }
                _ => None,
            });
        match existing {
            Some(files) => files.push(file),
            None => shares.push((dir, config.read_only, GuestUse::Files(vec![file]))),
        }
    }
    Ok(shares)
}

/// Every volume's daemon, and the directory their sockets live in; both go when dropped.
pub struct Volumes {
    pub volumes: Vec<Volume>,
    _dir: PrivateDir,
}

impl Volumes {
    /// Starts one virtiofsd per volume. They listen before this returns (the devices connect
    /// with a short retry while they come up).
    pub fn start(configs: &[VolumeConfig]) -> Result<Self, VolumeError> {
        let virtiofsd = find_virtiofsd().ok_or(VolumeError::NoVirtiofsd)?;
        let dir = PrivateDir::create().map_err(VolumeError::SocketDir)?;
        // SAFETY: geteuid only reads the process's credentials.
        let root = unsafe { libc::geteuid() } == 0;
        let mut volumes = Volumes {
            volumes: Vec::new(),
            _dir: dir,
        };
        for (index, (host, read_only, guest)) in plan_shares(configs)?.into_iter().enumerate() {
            let tag = format!("vol{index}");
            let socket = volumes._dir.path().join(format!("{tag}.sock"));
            let log = std::fs::File::create(volumes._dir.path().join(format!("{tag}.log")))
                .map_err(|source| VolumeError::Spawn {
                    dir: host.clone(),
                    source,
                })?;
            let mut command = Command::new(&virtiofsd);
            command
                .arg("--socket-path")
                .arg(&socket)
                .arg("--shared-dir")
                .arg(&host)
                .args(["--cache", "auto"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                // Ember's stderr is a job's stderr: the daemon's log goes beside its socket.
                .stderr(log);
            if read_only {
                command.arg("--readonly");
            }
            // Without root, virtiofsd's namespace sandbox cannot be set up; it then serves the
            // directory with the caller's rights only.
            if !root {
                command.args(["--sandbox", "none"]);
            }
            // No daemon outlives Ember, even one killed with SIGKILL: the kernel signals the
            // daemon when the thread that started it exits.
            // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
            // which is async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let daemon = command.spawn().map_err(|source| VolumeError::Spawn {
                dir: host.clone(),
                source,
            })?;
            volumes.volumes.push(Volume {
                tag,
                socket,
                host,
                read_only,
                guest,
                daemon,
            });
        }
        Ok(volumes)
    }

    /// The kernel command-line options that tell the default guest's init where to mount the
    /// shares (`ember.volumes=`) and bind the files (`ember.files=`).
    pub fn cmdline(&self) -> Option<String> {
        let mut directories = Vec::new();
        let mut files = Vec::new();
        for volume in &self.volumes {
            let ro = if volume.read_only { ":ro" } else { "" };
            match &volume.guest {
                GuestUse::Directory(guest) => {
                    directories.push(format!("{}={guest}{ro}", volume.tag))
                }
                GuestUse::Files(list) => files.extend(
                    list.iter()
                        .map(|(name, guest)| format!("{}/{name}={guest}{ro}", volume.tag)),
                ),
            }
        }
        let mut options = Vec::new();
        if !directories.is_empty() {
            options.push(format!("ember.volumes={}", directories.join(",")));
        }
        if !files.is_empty() {
            options.push(format!("ember.files={}", files.join(",")));
        }
        (!options.is_empty()).then(|| options.join(" "))
    }
}

impl Volumes {
    /// A descriptor per daemon that becomes readable when it exits (pidfd), for the main loop.
    pub fn exit_fds(&self) -> io::Result<Vec<OwnedFd>> {
        self.volumes
            .iter()
            .map(|volume| {
                // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
                let fd = unsafe {
                    libc::syscall(libc::SYS_pidfd_open, volume.daemon.id() as libc::pid_t, 0)
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: a fresh descriptor that nobody else owns.
                Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
            })
            .collect()
    }

    /// The host directory of a volume whose daemon has exited, if any.
    pub fn exited(&mut self) -> Option<PathBuf> {
        self.volumes.iter_mut().find_map(|volume| {
            matches!(volume.daemon.try_wait(), Ok(Some(_))).then(|| volume.host.clone())
        })
    }
}

impl Drop for Volumes {
    fn drop(&mut self) {
        for volume in &mut self.volumes {
            // virtiofsd ends when its socket closes; make sure, and reap it.
            let _ = volume.daemon.kill();
            let _ = volume.daemon.wait();
        }
    }
}

/// virtiofsd on PATH, or where `cargo install` puts it.
fn find_virtiofsd() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("virtiofsd"))
            .find(|candidate| is_executable(candidate))
    });
    on_path.or_else(|| {
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
        let candidate = cargo_home.join("bin").join("virtiofsd");
        is_executable(&candidate).then_some(candidate)
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_of_one_directory_share_it() {
        let dir = std::env::temp_dir().join(format!("ember-volumes-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        for file in ["hosts", "resolv.conf", "bad name"] {
            std::fs::write(dir.join(file), "x").unwrap();
        }
        let volume = |text: String| text.parse::<VolumeConfig>().unwrap();
        let d = dir.display();
        let shares = plan_shares(&[
            volume(format!("{d}/hosts:/etc/hosts")),
            volume(format!("{d}/data:/data")),
            volume(format!("{d}/resolv.conf:/etc/resolv.conf")),
            volume(format!("{d}/hosts:/etc/hosts.ro:ro")),
        ])
        .unwrap();
        assert_eq!(
            shares,
            [
                (
                    dir.clone(),
                    false,
                    GuestUse::Files(vec![
                        ("hosts".into(), "/etc/hosts".into()),
                        ("resolv.conf".into(), "/etc/resolv.conf".into())
                    ])
                ),
                (dir.join("data"), false, GuestUse::Directory("/data".into())),
                (
                    dir.clone(),
                    true,
                    GuestUse::Files(vec![("hosts".into(), "/etc/hosts.ro".into())])
                ),
            ]
        );
        assert!(matches!(
            plan_shares(&[volume(format!("{d}/bad name:/x"))]),
            Err(VolumeError::BadFileName(_))
        ));
        assert!(matches!(
            plan_shares(&[volume(format!("{d}/missing:/x"))]),
            Err(VolumeError::NotADirectory(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
