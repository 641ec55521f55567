//! `--volume HOST_DIR:GUEST_DIR[:ro]`: host directories shared live with the guest through
//! virtio-fs, each served by its own `virtiofsd` (the Rust daemon from crates.io) over vhost-user.
//!
//! Ember starts one virtiofsd per volume on a socket in a private directory, attaches a virtio-fs
//! device (tag `volN`) that hands its queues to it, and tells the default guest's init where to
//! mount each tag (`ember.volumes=vol0=/src,vol1=/data:ro`). Guest RAM must then be a shared
//! memfd mapping: virtiofsd maps it to reach the queues and the data buffers.

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
    #[error("--volume {0}: not a directory")]
    NotADirectory(PathBuf),
    #[error("cannot make a private directory for the volumes' sockets")]
    SocketDir(#[source] io::Error),
    #[error("cannot start virtiofsd for {dir}")]
    Spawn {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A running virtiofsd for one volume.
pub struct Volume {
    /// The virtio-fs tag the guest mounts: `volN`.
    pub tag: String,
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    pub config: VolumeConfig,
    daemon: Child,
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
        for (index, config) in configs.iter().enumerate() {
            if !config.host.is_dir() {
                return Err(VolumeError::NotADirectory(config.host.clone()));
            }
            let tag = format!("vol{index}");
            let socket = volumes._dir.path().join(format!("{tag}.sock"));
            let log = std::fs::File::create(volumes._dir.path().join(format!("{tag}.log")))
                .map_err(|source| VolumeError::Spawn {
                    dir: config.host.clone(),
                    source,
                })?;
            let mut command = Command::new(&virtiofsd);
            command
                .arg("--socket-path")
                .arg(&socket)
                .arg("--shared-dir")
                .arg(&config.host)
                .args(["--cache", "auto"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                // Ember's stderr is a job's stderr: the daemon's log goes beside its socket.
                .stderr(log);
            if config.read_only {
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
                dir: config.host.clone(),
                source,
            })?;
            volumes.volumes.push(Volume {
                tag,
                socket,
                config: config.clone(),
                daemon,
            });
        }
        Ok(volumes)
    }

    /// The kernel command-line option that tells the default guest's init where to mount them.
    pub fn cmdline(&self) -> Option<String> {
        if self.volumes.is_empty() {
            return None;
        }
        let list: Vec<String> = self
            .volumes
            .iter()
            .map(|v| {
                let ro = if v.config.read_only { ":ro" } else { "" };
                format!("{}={}{ro}", v.tag, v.config.guest)
            })
            .collect();
        Some(format!("ember.volumes={}", list.join(",")))
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
            matches!(volume.daemon.try_wait(), Ok(Some(_))).then(|| volume.config.host.clone())
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
