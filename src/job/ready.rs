//! Waiting for the guest agent: once it listens, it connects to the host's vsock port
//! `READY_PORT` (which the hybrid vsock device turns into a connection to `<socket>_<port>`) and
//! says Hello and Ready. The connection then stays open for the agent's lifetime: its end tells
//! the host the agent is gone.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_agent::wire::{self, Message};

/// The Unix socket the guest's connections to host port `port` arrive at.
pub fn host_port_path(socket: &Path, port: u32) -> PathBuf {
    let mut path = socket.as_os_str().to_owned();
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Why the agent did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    #[error("cannot listen for the guest agent at {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("waiting for the guest agent")]
    Wait(#[source] io::Error),
    #[error("the guest agent's greeting")]
    Greeting(#[source] wire::WireError),
    #[error("the guest agent speaks wire version {0}, Ember {ver}", ver = wire::VERSION)]
    Version(u32),
    #[error("the guest agent sent {0:?} instead of Hello and Ready")]
    Unexpected(Box<Message>),
    #[error("the VM stopped before its agent was ready")]
    Stopped,
    #[error("the guest agent did not say it was ready within {0:?}")]
    TimedOut(Duration),
}

/// The listener for the agent's ready connection; removed when dropped.
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Listens where the agent's ready connection will arrive for the vsock device at `socket`.
    /// Call before the guest runs.
    pub fn bind(socket: &Path) -> Result<Self, ReadyError> {
        let path = host_port_path(socket, wire::READY_PORT);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| ReadyError::Bind {
            path: path.clone(),
            source,
        })?;
        Ok(Self { listener, path })
    }

    /// Waits for the agent's Hello and Ready, or until `stopped` (a descriptor that becomes
    /// readable when the VM stops) says there is no point any more, or `deadline` passes.
    pub fn wait(
        &self,
        stopped: &impl AsRawFd,
        deadline: Option<Instant>,
    ) -> Result<UnixStream, ReadyError> {
        let waited = Instant::now();
        let timed_out = |e| match e {
            ReadyError::TimedOut(_) => ReadyError::TimedOut(waited.elapsed()),
            e => e,
        };
        wait_readable(&self.listener, stopped, deadline).map_err(timed_out)?;
        let (stream, _) = self.listener.accept().map_err(ReadyError::Wait)?;
        greet(&stream, stopped, deadline).map_err(timed_out)?;
        Ok(stream)
    }
}

/// Waits until `fd` is readable, or `stopped` is (then `Err(Stopped)`), or `deadline` passes.
/// Also the start gate's wait (`gate.rs`).
pub(crate) fn wait_readable(
    fd: &impl AsRawFd,
    stopped: &impl AsRawFd,
    deadline: Option<Instant>,
) -> Result<(), ReadyError> {
    loop {
        let timeout_ms = match deadline {
            None => -1,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(ReadyError::TimedOut(Duration::ZERO));
                }
                // Rounded up: a poll that wakes a hair early just goes round again.
                i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX)
            }
        };
        let mut fds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stopped.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ReadyError::Wait(e));
        }
        if fds[1].revents != 0 {
            return Err(ReadyError::Stopped);
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// Reads the agent's Hello (checking the wire version) and Ready, a chunk at a time as they
/// come, watching `stopped` meanwhile: a guest that connects and says nothing must not hold a
/// stopping Ember.
fn greet(
    stream: &UnixStream,
    stopped: &impl AsRawFd,
    deadline: Option<Instant>,
) -> Result<(), ReadyError> {
    let mut decoder = wire::Decoder::new();
    let mut messages = Vec::new();
    let mut buf = [0u8; 256];
    while messages.len() < 2 {
        wait_readable(stream, stopped, deadline)?;
        let n = match (&*stream).read(&mut buf) {
            Ok(0) => return Err(ReadyError::Greeting(wire::WireError::Truncated)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadyError::Wait(e)),
        };
        decoder.push(&buf[..n]);
        while let Some(message) = decoder.next().map_err(ReadyError::Greeting)? {
            messages.push(message);
        }
    }
    let mut messages = messages.into_iter();
    match messages.next() {
        Some(Message::Hello { version }) if version == wire::VERSION => {}
        Some(Message::Hello { version }) => return Err(ReadyError::Version(version)),
        other => {
            return Err(ReadyError::Unexpected(Box::new(
                other.unwrap_or(Message::Ready),
            )))
        }
    }
    match messages.next() {
        Some(Message::Ready) => Ok(()),
        other => Err(ReadyError::Unexpected(Box::new(
            other.unwrap_or(Message::StdinEof),
        ))),
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn port_paths_follow_the_hybrid_convention() {
        assert_eq!(
            host_port_path(Path::new("/run/v.sock"), 1023),
            PathBuf::from("/run/v.sock_1023")
        );
    }

    #[test]
    fn the_agent_greets_or_the_wait_ends_with_the_vm() {
        let dir = std::env::temp_dir().join(format!("ember-ready-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("v.sock");
        let listener = ReadyListener::bind(&socket).unwrap();
        let stopped = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let agent_path = host_port_path(&socket, wire::READY_PORT);
        let agent = std::thread::spawn(move || {
            let mut stream = UnixStream::connect(agent_path).unwrap();
            wire::write_message(
                &mut stream,
                &Message::Hello {
                    version: wire::VERSION,
                },
            )
            .unwrap();
            wire::write_message(&mut stream, &Message::Ready).unwrap();
            stream
        });
        listener.wait(&stopped, None).unwrap();
        drop(agent.join().unwrap());
        // A guest that connects and says nothing does not hold a stopping VM.
        let agent_path = host_port_path(&socket, wire::READY_PORT);
        let silent = UnixStream::connect(agent_path).unwrap();
        let waiter = std::thread::spawn({
            let stopped = stopped.try_clone().unwrap();
            let socket = socket.clone();
            move || {
                let listener = listener;
                let result = listener.wait(&stopped, None);
                drop(socket);
                (listener, result)
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        stopped.write(1).unwrap();
        let (listener, result) = waiter.join().unwrap();
        assert!(matches!(result, Err(ReadyError::Stopped)), "{result:?}");
        drop(silent);
        stopped.read().unwrap();
        stopped.write(1).unwrap();
        assert!(matches!(
            listener.wait(&stopped, None),
            Err(ReadyError::Stopped)
        ));
        stopped.read().unwrap();
        // A restored guest whose agent never speaks: the wait ends at its deadline.
        let started = Instant::now();
        let result = listener.wait(&stopped, Some(started + Duration::from_millis(200)));
        assert!(matches!(result, Err(ReadyError::TimedOut(_))), "{result:?}");
        assert!(started.elapsed() >= Duration::from_millis(200));
        drop(listener);
        assert!(!host_port_path(&socket, wire::READY_PORT).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
