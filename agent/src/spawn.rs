//! Starting a command: environment, working directory, pipes or a pseudo-terminal, and telling
//! "not found" from "not executable" when it fails.

use std::ffi::CString;
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use ember_agent::wire::{ExecRequest, FailureKind, WinSize};

use crate::net::set_nonblocking;
use crate::user;

/// The `PATH` every command starts with (Debian's default for root).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A running command and the agent's ends of its standard I/O, all non-blocking.
pub struct Spawned {
    /// The command, to wait for.
    pub child: Child,
    /// Where its stdin goes: a pipe, or (with a tty) the pty master; `None` for `/dev/null`.
    pub stdin: Option<OwnedFd>,
    /// Its stdout pipe, or the pty master (all output, with a tty).
    pub stdout: Option<OwnedFd>,
    /// Its stderr pipe; `None` with a tty.
    pub stderr: Option<OwnedFd>,
    /// The pty master, for resizes and the end-of-file character.
    pub pty: Option<OwnedFd>,
}

/// Why a command did not start: what the host is told in `Failed`.
#[derive(Debug)]
pub struct SpawnError {
    /// Which exit status the host should report.
    pub kind: FailureKind,
    /// What went wrong, naming the program.
    pub message: String,
}

impl SpawnError {
    fn other(message: String) -> Self {
        SpawnError {
            kind: FailureKind::Other,
            message,
        }
    }
}

/// Starts the command as the leader of a new session (so a signal to its process group reaches
/// everything it started, and a tty can become its controlling terminal).
pub fn spawn(request: &ExecRequest) -> Result<Spawned, SpawnError> {
    let Some((program, args)) = request.argv.split_first() else {
        return Err(SpawnError::other("empty argv".into()));
    };
    let cwd = request.cwd.as_deref().unwrap_or("/");
    let root = ROOT.get();
    let host_cwd = match root {
        Some(root) => root.join(cwd.trim_start_matches('/')),
        None => PathBuf::from(cwd),
    };
    // std reports a failed chdir with the same errno as a failed exec (ENOENT for a missing
    // directory), which would read as "command not found": check it first.
    if !host_cwd.is_dir() {
        return Err(SpawnError::other(format!(
            "working directory {cwd:?} is not a directory"
        )));
    }

    let path = request
        .env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map_or(DEFAULT_PATH, |(_, value)| value.as_str());
    let mut command = match busybox_applet(root, program, path) {
        Some(busybox) => {
            let mut command = Command::new(busybox);
            command.arg0(program);
            command
        }
        None => Command::new(program),
    };
    command.args(args).env_clear();
    let identity = match &request.user {
        Some(spec) => Some(
            user::resolve(spec, root.map_or(Path::new("/"), PathBuf::as_path))
                .map_err(SpawnError::other)?,
        ),
        None => None,
    };
    let limits = &request.limits;
    let mut switch = identity.as_ref().map(user::Switch::new);
    if !limits.extra_groups.is_empty() {
        switch
            .get_or_insert_with(user::Switch::root)
            .add_groups(&limits.extra_groups);
    }
    let rlimits: Vec<(u32, libc::rlimit)> = limits
        .rlimits
        .iter()
        .map(|limit| {
            let value = |v: u64| {
                if v == u64::MAX {
                    libc::RLIM_INFINITY
                } else {
                    v
                }
            };
            (
                limit.resource,
                libc::rlimit {
                    rlim_cur: value(limit.soft),
                    rlim_max: value(limit.hard),
                },
            )
        })
        .collect();
    let no_new_privileges = limits.no_new_privileges;
    let new_root = match root {
        Some(root) => {
            Some(user::c_path(root).ok_or_else(|| SpawnError::other("root holds a NUL".into()))?)
        }
        None => None,
    };
    let cwd_c = CString::new(cwd).map_err(|_| SpawnError::other("cwd holds a NUL".into()))?;
    // SAFETY: the closure runs in the child between fork and exec and only makes
    // async-signal-safe system calls (chroot, setrlimit, setgroups, setgid, setuid, chdir,
    // prctl) on values made before the fork. Order: into the root and the limits while still
    // root (raising a hard limit needs it), then the user, then the directory, whose
    // permissions are then checked as that user (as Docker does), then no_new_privs. The
    // program is then looked up on PATH inside the root.
    unsafe {
        command.pre_exec(move || {
            if let Some(root) = &new_root {
                if libc::chroot(root.as_ptr()) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (resource, limit) in &rlimits {
                if libc::setrlimit(*resource as _, limit) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(switch) = &switch {
                switch.apply()?;
            }
            if libc::chdir(cwd_c.as_ptr()) < 0 {
                return Err(io::Error::last_os_error());
            }
            if no_new_privileges && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The PATH set here is also the one std searches for `program` (it honours a PATH given to
    // the command), so a request's own PATH works as it would in a shell.
    let home = identity.as_ref().map_or("/root", |i| i.home.as_str());
    command.env("PATH", DEFAULT_PATH).env("HOME", home);
    if request.tty.is_some() {
        command.env("TERM", "xterm-256color");
    }
    command.envs(request.env.iter().map(|(k, v)| (k, v)));

    let mut pty = None;
    match &request.tty {
        Some(size) => {
            let (master, slave) =
                open_pty(size).map_err(|e| SpawnError::other(format!("pty: {e}")))?;
            if let Some(identity) = &identity {
                // The terminal is the user's, as login gives it: a command that reopens its tty
                // by name (sudo, ssh, vim's :!) must be allowed to.
                // SAFETY: fchown on the slave's descriptor, open for this call.
                if unsafe { libc::fchown(slave.as_raw_fd(), identity.uid, identity.gid) } < 0 {
                    let e = io::Error::last_os_error();
                    return Err(SpawnError::other(format!("pty: {e}")));
                }
            }
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| SpawnError::other(format!("pty: {e}")))
            };
            command
                .stdin(Stdio::from(dup(&slave)?))
                .stdout(Stdio::from(dup(&slave)?))
                .stderr(Stdio::from(slave));
            // SAFETY: the closure runs in the child between fork and exec, and only makes
            // async-signal-safe system calls (setsid, ioctl), touching no memory of the parent.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // stdin is the slave by now (std sets up the fds before this closure);
                    // as a new session leader, the child takes it as its controlling tty.
                    if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            pty = Some(master);
        }
        None => {
            command
                .stdin(if request.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // SAFETY: the closure runs in the child between fork and exec, and only calls
            // setsid, which is async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
    }

    let mut child = command.spawn().map_err(|e| exec_error(program, &e))?;
    // Dropping the command closes our copies of the pty slave: the master then reads EOF (EIO)
    // once the command and everything it started have closed theirs.
    drop(command);

    let io = (|| -> io::Result<(Option<OwnedFd>, Option<OwnedFd>, Option<OwnedFd>)> {
        match &pty {
            Some(master) => {
                set_nonblocking(master.as_raw_fd(), true)?;
                Ok((Some(master.try_clone()?), Some(master.try_clone()?), None))
            }
            None => {
                let stdin = child.stdin.take().map(OwnedFd::from);
                let stdout = child.stdout.take().map(OwnedFd::from);
                let stderr = child.stderr.take().map(OwnedFd::from);
                for fd in [&stdin, &stdout, &stderr].into_iter().flatten() {
                    set_nonblocking(fd.as_raw_fd(), true)?;
                }
                Ok((stdin, stdout, stderr))
            }
        }
    })();
    match io {
        Ok((stdin, stdout, stderr)) => Ok(Spawned {
            child,
            stdin,
            stdout,
            stderr,
            pty,
        }),
        Err(e) => {
            // It started but we cannot serve it: do not leave it running unattended.
            let _ = kill_group(child.id() as i32, libc::SIGKILL, true);
            let _ = child.wait();
            Err(SpawnError::other(format!("setting up I/O: {e}")))
        }
    }
}

/// Where busybox is, in Ember's default guest.
const BUSYBOX: &str = "/bin/busybox";

/// The default guest's static busybox runs its applets without a link per applet (the links cost
/// seconds of boot time to unpack on software KVM; its shell finds the applets by itself). So a
/// bare command name found nowhere on `path` runs through busybox, which picks the applet from
/// argv[0], as the guest's shell would. Busybox answers an unknown applet with status 127, as a
/// missing command would be. Any other guest, or a name with a slash, is left alone.
fn busybox_applet(root: Option<&PathBuf>, program: &str, path: &str) -> Option<&'static str> {
    // Inside an image the image's own commands are the ones to run.
    if root.is_some() {
        return None;
    }
    busybox_applet_at(BUSYBOX, program, path)
}

/// The directory commands run in (`--root`), set once at start.
static ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Makes every command run chrooted into `root`.
pub fn set_root(root: PathBuf) {
    let _ = ROOT.set(root);
}

fn busybox_applet_at<'a>(busybox: &'a str, program: &str, path: &str) -> Option<&'a str> {
    if program.is_empty() || program.contains('/') || !Path::new(busybox).is_file() {
        return None;
    }
    let on_path = path
        .split(':')
        .filter(|dir| !dir.is_empty())
        .any(|dir| Path::new(dir).join(program).exists());
    (!on_path && is_applet(busybox, program)).then_some(busybox)
}

/// Whether `busybox` has an applet called `program`: a name it does not know stays "not found"
/// (127 from the agent itself, with the usual message) rather than busybox's own complaint. The
/// list costs one run of busybox, once, and only when a name is not on PATH.
fn is_applet(busybox: &str, program: &str) -> bool {
    static APPLETS: OnceLock<Vec<String>> = OnceLock::new();
    let applets = APPLETS.get_or_init(|| {
        Command::new(busybox)
            .arg("--list")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    });
    applets.iter().any(|applet| applet == program)
}

/// Maps an exec failure the way a shell does: 127 for a missing program, 126 for one that
/// cannot be run.
fn exec_error(program: &str, error: &io::Error) -> SpawnError {
    let kind = match error.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => FailureKind::NotFound,
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::EISDIR) | Some(libc::EPERM) => {
            FailureKind::NotExecutable
        }
        _ => FailureKind::Other,
    };
    SpawnError {
        kind,
        message: format!("{program}: {error}"),
    }
}

/// Opens a pseudo-terminal of the given size: (master, slave), both close-on-exec.
///
/// By hand rather than `openpty(3)`, which lives in libutil on older glibc and would need an
/// extra static library.
fn open_pty(size: &WinSize) -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: posix_openpt just returned this fd, open and owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt/unlockpt on the master we own; no memory is passed.
    unsafe {
        if libc::grantpt(master.as_raw_fd()) < 0 || libc::unlockpt(master.as_raw_fd()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // TIOCGPTPEER (Linux 4.13) opens the slave without a path lookup in /dev/pts.
    // SAFETY: the ioctl takes open(2) flags as its argument and returns a new fd or -1.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    let slave = if slave >= 0 {
        // SAFETY: the ioctl just returned this fd, open and owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(slave) }
    } else {
        // Older kernels: look the slave up by name.
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: `name` is valid for writes of its length, which is what is passed.
        let r = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated path.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path)?;
        OwnedFd::from(file)
    };
    set_winsize(&master, size)?;
    Ok((master, slave))
}

/// Sets a pty's window size (the kernel signals SIGWINCH to its foreground process group).
pub fn set_winsize(pty: &OwnedFd, size: &WinSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which `ws` is; the fd is an open pty master.
    if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What to write to a pty for "end of input": its VEOF character (^D by default), twice when
/// the current line is not empty (in canonical mode the first only ends the line) and once in
/// raw mode, where it is just a byte for the program to interpret.
pub fn tty_eof(pty: &OwnedFd, line_empty: bool) -> Vec<u8> {
    // SAFETY: termios is plain old data, for which all-zero bytes are valid.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios into `t`; on a master fd it reports the slave's.
    let (veof, canonical) = if unsafe { libc::tcgetattr(pty.as_raw_fd(), &mut t) } == 0 {
        (t.c_cc[libc::VEOF], t.c_lflag & libc::ICANON != 0)
    } else {
        (4, true)
    };
    if canonical && !line_empty {
        vec![veof, veof]
    } else {
        vec![veof]
    }
}

/// Sends a signal to a command's process group; if that fails (the command moved itself to
/// another group) and `leader_alive` says its pid cannot have been reused yet (it is not
/// reaped), to the command itself.
pub fn kill_group(pid: i32, signal: i32, leader_alive: bool) -> io::Result<()> {
    // SAFETY: plain syscall; a negative pid names the process group.
    if unsafe { libc::kill(-pid, signal) } == 0 {
        return Ok(());
    }
    let group_err = io::Error::last_os_error();
    if leader_alive && group_err.raw_os_error() == Some(libc::ESRCH) {
        // SAFETY: plain syscall; the pid is our unreaped child, so it is still ours.
        if unsafe { libc::kill(pid, signal) } == 0 {
            return Ok(());
        }
        return Err(io::Error::last_os_error());
    }
    Err(group_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_off_path_go_to_busybox() {
        let dir = std::env::temp_dir().join(format!("ember-agent-bb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A stand-in busybox whose --list names one applet.
        let busybox = dir.join("busybox");
        std::fs::write(&busybox, b"#!/bin/sh\necho head\n").unwrap();
        std::fs::set_permissions(
            &busybox,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::write(dir.join("ls"), b"").unwrap();
        let (bb, path) = (busybox.to_str().unwrap(), dir.to_str().unwrap());
        assert_eq!(busybox_applet_at(bb, "head", path), Some(bb));
        // Not an applet: left alone, so it is "not found" as usual.
        assert_eq!(busybox_applet_at(bb, "nosuchapplet", path), None);
        // On PATH, a path, or no busybox: left alone.
        assert_eq!(busybox_applet_at(bb, "ls", path), None);
        assert_eq!(busybox_applet_at(bb, "./head", path), None);
        assert_eq!(
            busybox_applet_at("/nonexistent/busybox", "head", path),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
