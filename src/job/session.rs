//! One command run through the guest agent: send the request, then pump its output to Ember's
//! stdout and stderr, Ember's stdin to it, and signals, resizes and the timeout, until the agent
//! says how it ended.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};

use ember_agent::wire::{self, ExecRequest, FailureKind, Message, WinSize};

use super::{JobOutcome, JobSpec};
use crate::terminal;

/// What other threads use to reach a running command: the main thread forwards signals and
/// terminal resizes through it, a watcher aborts it when the agent goes away.
#[derive(Clone)]
pub struct JobHandle {
    shared: Arc<Shared>,
}

struct Shared {
    /// The write half of the connection (the session's reader owns the read side).
    writer: Mutex<UnixStream>,
    /// The agent said Started: signals now have a process to go to.
    started: AtomicBool,
    timed_out: AtomicBool,
    /// Why the session was cut short from outside, if it was.
    aborted: Mutex<Option<String>>,
}

impl JobHandle {
    fn send(&self, message: &Message) -> Result<(), wire::WireError> {
        let mut writer = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        wire::write_message(&mut *writer, message)
    }

    /// Forwards `signal` to the command; false when it has not started yet (or the agent is gone),
    /// so the caller can act on the signal itself.
    pub fn forward_signal(&self, signal: i32) -> bool {
        self.shared.started.load(Ordering::SeqCst) && self.send(&Message::Signal(signal)).is_ok()
    }

    /// Tells the command's pseudo-terminal the host terminal's new size.
    pub fn resize(&self, size: WinSize) {
        if let Err(e) = self.send(&Message::Resize(size)) {
            log::debug!("job: cannot forward a resize: {e}");
        }
    }

    /// Ends the session from outside: the agent or the VM is gone. The session returns
    /// `Failed(why)`.
    pub fn abort(&self, why: &str) {
        let mut aborted = self
            .shared
            .aborted
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        aborted.get_or_insert_with(|| why.to_string());
        drop(aborted);
        let writer = self.shared.writer.lock().unwrap_or_else(|e| e.into_inner());
        // Wakes the session's reader with an end of file.
        let _ = writer.shutdown(Shutdown::Both);
    }
}

/// A command requested from the agent, not yet pumped.
pub struct Session {
    reader: UnixStream,
    handle: JobHandle,
    spec: JobSpec,
}

impl Session {
    /// Greets the agent on `stream` (a connection to its port) and asks it to run `spec`.
    pub fn start(stream: UnixStream, spec: &JobSpec) -> Result<Self, wire::WireError> {
        let writer = stream.try_clone()?;
        let handle = JobHandle {
            shared: Arc::new(Shared {
                writer: Mutex::new(writer),
                started: AtomicBool::new(false),
                timed_out: AtomicBool::new(false),
                aborted: Mutex::new(None),
            }),
        };
        handle.send(&Message::Hello {
            version: wire::VERSION,
        })?;
        let tty = spec.tty.then(terminal_size);
        handle.send(&Message::Exec(ExecRequest {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            stdin: spec.stdin,
            tty,
        }))?;
        Ok(Self {
            reader: stream,
            handle,
            spec: spec.clone(),
        })
    }

    /// The handle for signals, resizes and aborts.
    pub fn handle(&self) -> JobHandle {
        self.handle.clone()
    }

    /// Pumps the command's streams until it ends; returns how.
    pub fn run(mut self) -> JobOutcome {
        let raw_terminal = self.spec.tty && terminal::is_tty(libc::STDIN_FILENO);
        if raw_terminal {
            if let Err(e) = terminal::enter_raw_mode() {
                log::warn!("cannot put the terminal in raw mode: {e}");
            }
        }
        if self.spec.stdin {
            let handle = self.handle.clone();
            let spawned = std::thread::Builder::new()
                .name("job-stdin".into())
                .spawn(move || forward_stdin(&handle));
            if let Err(e) = spawned {
                return JobOutcome::Failed(format!("cannot start the stdin thread: {e}"));
            }
        }
        let (finished, watchdog) = mpsc::channel::<()>();
        if let Some(timeout) = self.spec.timeout {
            let handle = self.handle.clone();
            // If the thread cannot start, there is no timeout; say so rather than fail the job.
            let spawned = std::thread::Builder::new()
                .name("job-timeout".into())
                .spawn(move || {
                    if watchdog.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) {
                        handle.shared.timed_out.store(true, Ordering::SeqCst);
                        if !handle.forward_signal(libc::SIGKILL) {
                            handle.abort("the command did not start before --timeout");
                        }
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start the timeout thread, --timeout is ignored: {e}");
            }
        }
        let outcome = self.pump();
        drop(finished);
        if raw_terminal {
            terminal::restore();
        }
        let timed_out = self.handle.shared.timed_out.load(Ordering::SeqCst);
        let aborted = self
            .handle
            .shared
            .aborted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match (outcome, timed_out, aborted) {
            (_, true, _) => JobOutcome::TimedOut,
            (JobOutcome::Failed(_), false, Some(why)) => JobOutcome::Failed(why),
            (outcome, _, _) => outcome,
        }
    }

    fn pump(&mut self) -> JobOutcome {
        let mut stdout = io::stdout();
        let mut stderr = io::stderr();
        // A host reader that went away (a closed pipe) loses the rest of that stream; the command
        // still runs to its end and its status still counts, as with `docker run`.
        let mut stdout_ok = true;
        let mut stderr_ok = true;
        let mut greeted = false;
        loop {
            let message = match wire::read_message(&mut self.reader) {
                Ok(Some(message)) => message,
                Ok(None) => {
                    return JobOutcome::Failed(
                        "the guest agent closed the connection before the command ended".into(),
                    )
                }
                Err(e) => return JobOutcome::Failed(format!("talking to the guest agent: {e}")),
            };
            match message {
                Message::Hello { version } if version == wire::VERSION => greeted = true,
                Message::Hello { version } => {
                    return JobOutcome::Failed(format!(
                        "the guest agent speaks wire version {version}, Ember {}",
                        wire::VERSION
                    ))
                }
                _ if !greeted => {
                    return JobOutcome::Failed("the guest agent did not say Hello".into())
                }
                Message::Started { .. } => self.handle.shared.started.store(true, Ordering::SeqCst),
                Message::Stdout(data) => {
                    stdout_ok = stdout_ok && stdout.write_all(&data).and(stdout.flush()).is_ok()
                }
                Message::Stderr(data) => {
                    stderr_ok = stderr_ok && stderr.write_all(&data).and(stderr.flush()).is_ok()
                }
                Message::Exited { code } => return JobOutcome::Exited(code),
                Message::Signaled { signal } => return JobOutcome::Signaled(signal),
                Message::Failed { kind, message } => {
                    return match kind {
                        FailureKind::NotFound => JobOutcome::NotFound(message),
                        FailureKind::NotExecutable => JobOutcome::NotExecutable(message),
                        FailureKind::Other => JobOutcome::Failed(message),
                    }
                }
                other => log::debug!("job: ignoring {other:?} from the agent"),
            }
        }
    }
}

/// Copies Ember's stdin to the command, then says end of file.
fn forward_stdin(handle: &JobHandle) {
    let mut stdin = io::stdin().lock();
    let mut buf = vec![0u8; wire::MAX_CHUNK];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("job: reading stdin: {e}");
                0
            }
        };
        let message = if n == 0 {
            Message::StdinEof
        } else {
            Message::Stdin(buf[..n].to_vec())
        };
        if handle.send(&message).is_err() || n == 0 {
            return;
        }
    }
}

/// The host terminal's size (stdin's, else stdout's), or 24x80 when neither is a terminal.
pub fn terminal_size() -> WinSize {
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        // SAFETY: an all-zero winsize is valid; TIOCGWINSZ writes at most its size into it.
        let mut size: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: `size` is a valid, writable winsize for the duration of the call.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) } == 0 && size.ws_row > 0 {
            return WinSize {
                rows: size.ws_row,
                cols: size.ws_col,
            };
        }
    }
    WinSize { rows: 24, cols: 80 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake agent on the other end of a socket pair: checks the request, answers `script`.
    fn session_against(script: Vec<Message>, spec: JobSpec) -> (JobOutcome, ExecRequest) {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            assert_eq!(
                wire::read_message(&mut agent).unwrap(),
                Some(Message::Hello {
                    version: wire::VERSION
                })
            );
            let Some(Message::Exec(request)) = wire::read_message(&mut agent).unwrap() else {
                panic!("no Exec");
            };
            for message in script {
                wire::write_message(&mut agent, &message).unwrap();
            }
            request
        });
        let outcome = Session::start(host, &spec).unwrap().run();
        (outcome, fake.join().unwrap())
    }

    fn spec(argv: &[&str]) -> JobSpec {
        JobSpec {
            argv: argv.iter().map(|a| a.to_string()).collect(),
            env: vec![("A".into(), "1".into())],
            cwd: Some("/tmp".into()),
            stdin: false,
            tty: false,
            timeout: None,
        }
    }

    #[test]
    fn the_request_carries_the_spec_and_the_status_comes_back() {
        let hello = Message::Hello {
            version: wire::VERSION,
        };
        let (outcome, request) = session_against(
            vec![
                hello.clone(),
                Message::Started { pid: 42 },
                Message::Exited { code: 7 },
            ],
            spec(&["sh", "-c", "exit 7"]),
        );
        assert_eq!(outcome, JobOutcome::Exited(7));
        assert_eq!(request.argv, ["sh", "-c", "exit 7"]);
        assert_eq!(request.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(request.cwd.as_deref(), Some("/tmp"));
        assert!(!request.stdin);
        assert_eq!(request.tty, None);

        let (outcome, _) = session_against(
            vec![
                hello.clone(),
                Message::Failed {
                    kind: FailureKind::NotFound,
                    message: "nope".into(),
                },
            ],
            spec(&["nope"]),
        );
        assert_eq!(outcome.exit_code(), 127);
        let (outcome, _) = session_against(
            vec![hello.clone(), Message::Signaled { signal: 9 }],
            spec(&["x"]),
        );
        assert_eq!(outcome.exit_code(), 137);
        // An agent that hangs up mid-command.
        let (outcome, _) = session_against(vec![hello], spec(&["x"]));
        assert!(matches!(outcome, JobOutcome::Failed(_)), "{outcome:?}");
    }

    #[test]
    fn a_timeout_kills_the_command_and_says_so() {
        let (host, mut agent) = UnixStream::pair().unwrap();
        let fake = std::thread::spawn(move || {
            wire::read_message(&mut agent).unwrap();
            wire::read_message(&mut agent).unwrap();
            for message in [
                Message::Hello {
                    version: wire::VERSION,
                },
                Message::Started { pid: 1 },
            ] {
                wire::write_message(&mut agent, &message).unwrap();
            }
            // The timeout's SIGKILL arrives; the command dies of it.
            assert_eq!(
                wire::read_message(&mut agent).unwrap(),
                Some(Message::Signal(libc::SIGKILL))
            );
            wire::write_message(&mut agent, &Message::Signaled { signal: 9 }).unwrap();
        });
        let mut spec = spec(&["sleep", "100"]);
        spec.timeout = Some(std::time::Duration::from_millis(100));
        assert_eq!(
            Session::start(host, &spec).unwrap().run(),
            JobOutcome::TimedOut
        );
        fake.join().unwrap();
    }
}
