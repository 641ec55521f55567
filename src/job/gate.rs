//! The start gate: a job that boots to "agent ready", says so, and runs its command only when
//! told to. This is how an OCI runtime's `create` (the VM up, the process not started) and
//! `start` (the process runs) map onto job mode.
//!
//! The gate is a Unix socket bound before the VM starts; the ready notice is a line written on
//! a descriptor the caller passed (`--ready-fd`), then closed. Protocol: the starter connects
//! and writes `start\n`; the job answers `started\n` and runs its command. Anything else is
//! answered `error …\n` and the gate keeps waiting.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::job::ready::{wait_readable, ReadyError};

/// What the starter writes.
pub const START: &str = "start";
/// What the gate answers once the command is about to run.
pub const STARTED: &str = "started";
/// The line written on the ready descriptor.
pub const CREATED: &str = "created";

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("cannot bind the start gate {0}: {1}")]
    Bind(PathBuf, #[source] io::Error),
    #[error("--ready-fd {0} is not an open descriptor")]
    ReadyFd(RawFd),
    #[error("the start gate failed: {0}")]
    Wait(#[source] io::Error),
}

/// A bound gate and the descriptor to announce readiness on.
pub struct StartGate {
    listener: UnixListener,
    path: PathBuf,
    ready: Option<File>,
}

impl StartGate {
    /// Binds the gate at `path` (which must not exist) and takes `ready_fd`.
    pub fn bind(path: &Path, ready_fd: Option<RawFd>) -> Result<Self, GateError> {
        let ready = match ready_fd {
            Some(fd) => {
                // SAFETY: F_GETFD only inspects the descriptor.
                if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                    return Err(GateError::ReadyFd(fd));
                }
                // SAFETY: the caller handed this descriptor to ember for this use alone.
                let file = unsafe { File::from_raw_fd(fd) };
                // Not passed on to anything ember starts (virtiofsd).
                // SAFETY: F_SETFD on a descriptor we own.
                unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
                Some(file)
            }
            None => None,
        };
        let listener = UnixListener::bind(path).map_err(|e| GateError::Bind(path.to_owned(), e))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
            ready,
        })
    }

    /// Says the VM is ready, then waits for `start`. `Ok(false)`: the VM stopped first.
    pub fn wait(mut self, stopped: &EventFd) -> Result<bool, GateError> {
        if let Some(mut ready) = self.ready.take() {
            // A caller that went away does not stop the container.
            let _ = writeln!(ready, "{CREATED}");
        }
        loop {
            match wait_readable(&self.listener, stopped, None) {
                Ok(()) => {}
                Err(ReadyError::Stopped) => return Ok(false),
                Err(ReadyError::Wait(e)) => return Err(GateError::Wait(e)),
                Err(e) => return Err(GateError::Wait(io::Error::other(e.to_string()))),
            }
            let (stream, _) = match self.listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(GateError::Wait(e)),
            };
            if answer(stream) {
                return Ok(true);
            }
        }
    }
}

impl Drop for StartGate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one request; true when it was `start` (and `started` was answered).
fn answer(stream: UnixStream) -> bool {
    // A starter that says nothing does not hold the gate.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return false;
    }
    let mut writer = &stream;
    if line.trim_end() == START {
        let _ = writeln!(writer, "{STARTED}");
        true
    } else {
        let _ = writeln!(writer, "error: expected {START:?}");
        false
    }
}

/// The starter's side: asks the gate at `path` to start the command.
pub fn start(path: &Path) -> io::Result<()> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(stream, "{START}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    if line.trim_end() == STARTED {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "the container's monitor answered {:?}",
            line.trim_end()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announces_then_starts_on_the_word() {
        let dir = std::env::temp_dir().join(format!("ember-gate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("start.sock");
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for two descriptors.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the read end is ours alone.
        let mut notice = BufReader::new(unsafe { File::from_raw_fd(fds[0]) });
        let gate = StartGate::bind(&path, Some(fds[1])).unwrap();
        let stopped = EventFd::new(0).unwrap();
        let waiter = std::thread::spawn(move || gate.wait(&stopped));
        let mut line = String::new();
        notice.read_line(&mut line).unwrap();
        assert_eq!(line, "created\n");
        // A wrong word is refused and the gate keeps waiting.
        let mut wrong = UnixStream::connect(&path).unwrap();
        writeln!(wrong, "go").unwrap();
        let mut answer = String::new();
        BufReader::new(&wrong).read_line(&mut answer).unwrap();
        assert!(answer.starts_with("error"), "{answer}");
        start(&path).unwrap();
        assert!(waiter.join().unwrap().unwrap());
        assert!(!path.exists(), "the gate's socket is removed");
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn a_stopping_vm_ends_the_wait() {
        let dir = std::env::temp_dir().join(format!("ember-gate-stop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let gate = StartGate::bind(&dir.join("start.sock"), None).unwrap();
        let stopped = EventFd::new(0).unwrap();
        stopped.write(1).unwrap();
        assert!(!gate.wait(&stopped).unwrap());
        std::fs::remove_dir_all(dir).ok();
    }
}
