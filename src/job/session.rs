//! One command run through the guest agent: send the request, then pump its output to Ember's
//! stdout and stderr, Ember's stdin to it, and signals, resizes and the timeout, until the agent
//! says how it ended.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use ember_agent::wire::{self, ExecRequest, FailureKind, Message, WinSize};

use super::{JobOutcome, JobSpec};
use crate::terminal;

/// How long a command killed by `--timeout` may take to be reported dead before the session is
/// cut: its SIGKILL can be stuck behind stdin the command never reads.
const TIMEOUT_GRACE: Duration = Duration::from_secs(5);

/// At most this many stdin chunks wait to be written; the stdin thread waits past it, so a
/// command that does not read its stdin holds only that thread, never a signal or a resize.
const MAX_QUEUED_STDIN: usize = 2;

/// What other threads use to reach a running command: the main thread forwards signals and
/// terminal resizes through it, a watcher aborts it when the agent goes away, the timeout kills
/// it. None of them ever blocks on the connection: frames go through an outbox that one writer
/// thread empties, control frames (signals, resizes) ahead of stdin.
#[derive(Clone)]
pub struct JobHandle {
    shared: Arc<Shared>,
}

struct Shared {
    /// A clone of the connection for `abort`: shutting it down needs no lock, so it works
    /// whatever the writer thread is blocked in.
    shutdown: UnixStream,
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox changes.
    outbox_changed: Condvar,
    state: Mutex<JobState>,
}

#[derive(Default)]
struct Outbox {
    control: VecDeque<Message>,
    stdin: VecDeque<Message>,
    /// The session ended: the writer thread stops, queued frames are dropped.
    closed: bool,
}

#[derive(Default)]
struct JobState {
    /// The agent said Started: signals now have a process to go to.
    started: bool,
    /// The agent said how the command ended: a timeout firing now is too late to count.
    finished: bool,
    timed_out: bool,
    /// Why the session was cut short from outside, if it was.
    aborted: Option<String>,
}

impl Shared {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn state(&self) -> MutexGuard<'_, JobState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl JobHandle {
    /// Queues a control frame; never blocks.
    fn send_control(&self, message: Message) {
        let mut outbox = self.shared.outbox();
        if !outbox.closed {
            outbox.control.push_back(message);
            self.shared.outbox_changed.notify_all();
        }
    }

    /// Queues stdin for the command, waiting while enough is already queued. False once the
    /// session is over.
    fn send_stdin(&self, message: Message) -> bool {
        let mut outbox = self.shared.outbox();
        while outbox.stdin.len() >= MAX_QUEUED_STDIN && !outbox.closed {
            outbox = self
                .shared
                .outbox_changed
                .wait(outbox)
                .unwrap_or_else(|e| e.into_inner());
        }
        if outbox.closed {
            return false;
        }
        outbox.stdin.push_back(message);
        self.shared.outbox_changed.notify_all();
        true
    }

    /// Forwards `signal` to the command; false when it has not started yet (or has ended), so
    /// the caller can act on the signal itself.
    pub fn forward_signal(&self, signal: i32) -> bool {
        let state = self.shared.state();
        if !state.started || state.finished {
            return false;
        }
        drop(state);
        self.send_control(Message::Signal(signal));
        true
    }

    /// Tells the command's pseudo-terminal the host terminal's new size.
    pub fn resize(&self, size: WinSize) {
        self.send_control(Message::Resize(size));
    }

    /// Ends the session from outside: the agent or the VM is gone. The session returns
    /// `Failed(why)` (or `TimedOut` after a timeout).
    pub fn abort(&self, why: &str) {
        self.shared
            .state()
            .aborted
            .get_or_insert_with(|| why.to_string());
        // Wakes the session's reader with an end of file, and the writer with an error.
        let _ = self.shared.shutdown.shutdown(Shutdown::Both);
        self.close_outbox();
    }

    fn close_outbox(&self) {
        self.shared.outbox().closed = true;
        self.shared.outbox_changed.notify_all();
    }

    /// The timeout fired: kill the command, and cut the session if its end does not come back
    /// within the grace time (`finished` says when it did).
    fn time_out(&self, finished: &mpsc::Receiver<()>) {
        let mut state = self.shared.state();
        if state.finished {
            return;
        }
        state.timed_out = true;
        let started = state.started;
        drop(state);
        if started {
            self.send_control(Message::Signal(libc::SIGKILL));
            if finished.recv_timeout(TIMEOUT_GRACE) != Err(RecvTimeoutError::Timeout) {
                return;
            }
        }
        self.abort("the command did not end after --timeout");
    }
}

/// The writer thread: empties the outbox into the connection, control frames first.
fn write_outbox(shared: &Shared, mut writer: UnixStream) {
    loop {
        let message = {
            let mut outbox = shared.outbox();
            loop {
                if outbox.closed {
                    return;
                }
                if let Some(message) = outbox.control.pop_front() {
                    break message;
                }
                if let Some(message) = outbox.stdin.pop_front() {
                    break message;
                }
                outbox = shared
                    .outbox_changed
                    .wait(outbox)
                    .unwrap_or_else(|e| e.into_inner());
            }
        };
        // Room in the stdin queue.
        shared.outbox_changed.notify_all();
        if let Err(e) = wire::write_message(&mut writer, &message) {
            log::debug!("job: writing to the agent: {e}");
            let mut outbox = shared.outbox();
            outbox.closed = true;
            shared.outbox_changed.notify_all();
            return;
        }
    }
}

/// A command requested from the agent, not yet pumped.
pub struct Session {
    reader: UnixStream,
    writer: UnixStream,
    handle: JobHandle,
    spec: JobSpec,
}

impl Session {
    /// Greets the agent on `stream` (a connection to its port) and asks it to run `spec`.
    pub fn start(stream: UnixStream, spec: &JobSpec) -> Result<Self, wire::WireError> {
        let mut writer = stream.try_clone()?;
        wire::write_message(
            &mut writer,
            &Message::Hello {
                version: wire::VERSION,
            },
        )?;
        // Every command refreshes the guest: a restored clone must not run anything with the
        // RNG state and clock its snapshot gave every other clone.
        wire::write_message(&mut writer, &refresh_message())?;
        let tty = spec.tty.then(terminal_size);
        wire::write_message(
            &mut writer,
            &Message::Exec(ExecRequest {
                argv: spec.argv.clone(),
                env: spec.env.clone(),
                cwd: spec.cwd.clone(),
                stdin: spec.stdin,
                tty,
                user: spec.user.clone(),
                limits: spec.limits.clone(),
            }),
        )?;
        let handle = JobHandle {
            shared: Arc::new(Shared {
                shutdown: stream.try_clone()?,
                outbox: Mutex::default(),
                outbox_changed: Condvar::new(),
                state: Mutex::default(),
            }),
        };
        Ok(Self {
            reader: stream,
            writer,
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
        let outcome = self.run_threads();
        self.handle.close_outbox();
        let state = self.handle.shared.state();
        match (outcome, state.timed_out, state.aborted.clone()) {
            (_, true, _) => JobOutcome::TimedOut,
            (JobOutcome::Failed(_), false, Some(why)) => JobOutcome::Failed(why),
            (outcome, _, _) => outcome,
        }
    }

    fn run_threads(&mut self) -> JobOutcome {
        let shared = self.handle.shared.clone();
        let writer = match self.writer.try_clone() {
            Ok(writer) => writer,
            Err(e) => return JobOutcome::Failed(format!("cannot clone the connection: {e}")),
        };
        let spawned = std::thread::Builder::new()
            .name("job-writer".into())
            .spawn(move || {
                crate::sandbox::seccomp::confine_or_exit(
                    crate::sandbox::seccomp::ThreadKind::JobStream,
                );
                write_outbox(&shared, writer)
            });
        if let Err(e) = spawned {
            return JobOutcome::Failed(format!("cannot start the writer thread: {e}"));
        }
        // Raw mode only when the terminal's keys go to the command (-i): with -t alone, Ctrl-C
        // must still reach Ember, as with docker run -t.
        let raw_terminal = self.spec.tty && self.spec.stdin && terminal::is_tty(libc::STDIN_FILENO);
        if raw_terminal {
            if let Err(e) = terminal::enter_raw_mode() {
                log::warn!("cannot put the terminal in raw mode: {e}");
            }
        }
        if self.spec.stdin {
            let handle = self.handle.clone();
            let spawned = std::thread::Builder::new()
                .name("job-stdin".into())
                .spawn(move || {
                    crate::sandbox::seccomp::confine_or_exit(
                        crate::sandbox::seccomp::ThreadKind::JobStream,
                    );
                    forward_stdin(&handle)
                });
            if let Err(e) = spawned {
                return JobOutcome::Failed(format!("cannot start the stdin thread: {e}"));
            }
        }
        let (finished, watchdog) = mpsc::channel::<()>();
        if let Some(timeout) = self.spec.timeout {
            let handle = self.handle.clone();
            let spawned = std::thread::Builder::new()
                .name("job-timeout".into())
                .spawn(move || {
                    crate::sandbox::seccomp::confine_or_exit(
                        crate::sandbox::seccomp::ThreadKind::JobStream,
                    );
                    if watchdog.recv_timeout(timeout) == Err(RecvTimeoutError::Timeout) {
                        handle.time_out(&watchdog);
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
        outcome
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
            let end = match message {
                Message::Hello { version } if version == wire::VERSION => {
                    greeted = true;
                    None
                }
                Message::Hello { version } => Some(JobOutcome::Failed(format!(
                    "the guest agent speaks wire version {version}, Ember {}",
                    wire::VERSION
                ))),
                _ if !greeted => Some(JobOutcome::Failed(
                    "the guest agent did not say Hello".into(),
                )),
                Message::Started { pid } => {
                    log::info!("job: the command runs in the guest as pid {pid}");
                    self.handle.shared.state().started = true;
                    None
                }
                Message::Stdout(data) => {
                    stdout_ok = stdout_ok && stdout.write_all(&data).and(stdout.flush()).is_ok();
                    None
                }
                Message::Stderr(data) => {
                    stderr_ok = stderr_ok && stderr.write_all(&data).and(stderr.flush()).is_ok();
                    None
                }
                Message::Exited { code } => Some(JobOutcome::Exited(code)),
                Message::Signaled { signal } => Some(JobOutcome::Signaled(signal)),
                Message::Failed { kind, message } => Some(match kind {
                    FailureKind::NotFound => JobOutcome::NotFound(message),
                    FailureKind::NotExecutable => JobOutcome::NotExecutable(message),
                    FailureKind::Other => JobOutcome::Failed(message),
                }),
                other => {
                    log::debug!("job: ignoring {other:?} from the agent");
                    None
                }
            };
            if let Some(outcome) = end {
                self.handle.shared.state().finished = true;
                return outcome;
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
        if !handle.send_stdin(message) || n == 0 {
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

/// The host's time and 64 bytes from its RNG, for the guest. Without entropy (getrandom failing
/// is not expected) the refresh still sets the clock.
pub(super) fn refresh_message() -> Message {
    let mut entropy = vec![0u8; 64];
    // SAFETY: the buffer is valid for writes of its length.
    let got = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    entropy.truncate(usize::try_from(got).unwrap_or(0));
    let realtime_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Message::Refresh {
        realtime_ns,
        entropy,
    }
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
            let Some(Message::Refresh { entropy, .. }) = wire::read_message(&mut agent).unwrap()
            else {
                panic!("no Refresh");
            };
            assert_eq!(entropy.len(), 64);
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
            user: Some("app".into()),
            stdin: false,
            tty: false,
            timeout: None,
            limits: Default::default(),
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
        assert_eq!(request.user.as_deref(), Some("app"));
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
            // Hello, Refresh, Exec.
            for _ in 0..3 {
                wire::read_message(&mut agent).unwrap();
            }
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
