//! Job mode: run one command in the guest through its agent (`ember-agent`, over vsock) and come
//! back with its output and its exit status, as `docker run` does.
//!
//! The pieces: [`hybrid`] opens a stream to a guest port through Ember's hybrid-vsock socket,
//! [`ready`] waits for the agent to say it is listening, [`session`] runs one command over the
//! wire format `ember_agent::wire` defines (shared with the agent, so both sides agree by
//! construction). `ember run -- CMD` uses them on a VM of its own; `ember exec` on a VM that is
//! already running.

pub mod gate;
pub mod hybrid;
pub mod ready;
pub mod runner;
pub mod session;

use std::fmt;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ember_agent::wire::{ProcessLimits, Rlimit};
use vmm_sys_util::eventfd::EventFd;

use crate::main_loop::{MainLoop, Wakeup};
pub use runner::{JobRunner, JobThread, PrivateDir, SnapshotRequest, SnapshotRequests};
pub use session::{JobHandle, Session};

/// The command to run and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSpec {
    pub argv: Vec<String>,
    /// Added to the agent's clean environment, in order.
    pub env: Vec<(String, String)>,
    /// The working directory; the agent's default (`/`) when absent.
    pub cwd: Option<String>,
    /// `USER[:GROUP]` to run as (names resolved in the guest's root); root when absent.
    pub user: Option<String>,
    /// Connect Ember's stdin to the command's (`-i`).
    pub stdin: bool,
    /// Give the command a pseudo-terminal and put the host's in raw mode (`-t`).
    pub tty: bool,
    /// Kill the command after this long; Ember then exits 124.
    pub timeout: Option<Duration>,
    /// Further groups, resource limits, no_new_privs.
    pub limits: ProcessLimits,
}

/// Exit code: the command ran past `--timeout` and was killed (as `timeout(1)`).
pub const EXIT_TIMED_OUT: u8 = 124;
/// Exit code: the command exists but cannot be executed (as a shell and `docker run`).
pub const EXIT_NOT_EXECUTABLE: u8 = 126;
/// Exit code: the command was not found.
pub const EXIT_NOT_FOUND: u8 = 127;
/// Exit code: Ember, the VM or the agent failed before or around the command.
pub const EXIT_JOB_FAILED: u8 = 125;

/// How a job ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    /// The command exited with this code.
    Exited(i32),
    /// The command was killed by this signal.
    Signaled(i32),
    /// `--timeout` ran out and the command was killed.
    TimedOut,
    /// The agent could not find the command.
    NotFound(String),
    /// The agent found it but could not execute it.
    NotExecutable(String),
    /// The agent, the VM or the connection failed.
    Failed(String),
}

impl JobOutcome {
    /// The process exit code, as `docker run` gives it.
    pub fn exit_code(&self) -> u8 {
        match self {
            // A status outside 0-255 cannot come from a Linux process; keep its low byte as a
            // shell does.
            JobOutcome::Exited(code) => *code as u8,
            JobOutcome::Signaled(signal) => 128u8.saturating_add(*signal as u8),
            JobOutcome::TimedOut => EXIT_TIMED_OUT,
            JobOutcome::NotFound(_) => EXIT_NOT_FOUND,
            JobOutcome::NotExecutable(_) => EXIT_NOT_EXECUTABLE,
            JobOutcome::Failed(_) => EXIT_JOB_FAILED,
        }
    }

    /// Whether the command itself ran to its own end (nothing for Ember to report).
    pub fn is_clean(&self) -> bool {
        matches!(self, JobOutcome::Exited(_) | JobOutcome::Signaled(_))
    }
}

impl fmt::Display for JobOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobOutcome::Exited(code) => write!(f, "the command exited with status {code}"),
            JobOutcome::Signaled(signal) => write!(f, "the command was killed by signal {signal}"),
            JobOutcome::TimedOut => write!(f, "the command ran past --timeout and was killed"),
            JobOutcome::NotFound(why) => write!(f, "command not found: {why}"),
            JobOutcome::NotExecutable(why) => write!(f, "command not executable: {why}"),
            JobOutcome::Failed(why) => write!(f, "{why}"),
        }
    }
}

/// `ember exec`: runs `spec` through the agent of the VM whose vsock socket is `socket`, forwarding
/// Ember's termination signals and terminal resizes to the command.
pub fn exec(socket: &Path, spec: &JobSpec) -> JobOutcome {
    let done = match EventFd::new(libc::EFD_NONBLOCK) {
        Ok(done) => done,
        Err(e) => return JobOutcome::Failed(format!("cannot create an eventfd: {e}")),
    };
    // Before any thread: the signals must reach the signalfd, not kill Ember.
    let mut main_loop = match MainLoop::new(done.as_raw_fd()) {
        Ok(main_loop) => main_loop,
        Err(e) => return JobOutcome::Failed(format!("cannot set up signal handling: {e}")),
    };
    let stream = match hybrid::connect(socket, ember_agent::wire::AGENT_PORT) {
        Ok(stream) => stream,
        Err(e) => {
            return JobOutcome::Failed(format!(
                "cannot reach the guest agent through {}: {e}",
                socket.display()
            ))
        }
    };
    let session = match Session::start(stream, spec) {
        Ok(session) => session,
        Err(e) => return JobOutcome::Failed(format!("cannot send the command: {e}")),
    };
    let handle = session.handle();
    // The thread signals a copy: the original stays open here, because closing the last
    // descriptor of a file takes it out of the epoll set, and the wake-up with it.
    let finished = match done.try_clone() {
        Ok(finished) => finished,
        Err(e) => return JobOutcome::Failed(format!("cannot create an eventfd: {e}")),
    };
    let runner = std::thread::Builder::new()
        .name("job".into())
        .spawn(move || {
            crate::sandbox::seccomp::confine_or_exit(crate::sandbox::seccomp::ThreadKind::Job);
            let outcome = session.run();
            let _ = finished.write(1);
            outcome
        });
    let runner = match runner {
        Ok(runner) => runner,
        Err(e) => return JobOutcome::Failed(format!("cannot start the job thread: {e}")),
    };
    'wait: loop {
        let wakeups = match main_loop.wait() {
            Ok(wakeups) => wakeups,
            Err(e) => {
                handle.abort(&format!("waiting for the command: {e}"));
                break;
            }
        };
        for wakeup in wakeups {
            match wakeup {
                Wakeup::StopRequested => break 'wait,
                // ember exec watches no backend, has no control socket and takes no snapshot.
                Wakeup::BackendExited | Wakeup::Api | Wakeup::SnapshotRequested => {}
                Wakeup::Signal => {
                    while let Some(signal) = main_loop.read_signal() {
                        if signal == libc::SIGWINCH {
                            handle.resize(session::terminal_size());
                        } else if !handle.forward_signal(signal) {
                            handle.abort(&format!("stopped by signal {signal}"));
                        }
                    }
                }
            }
        }
    }
    runner
        .join()
        .unwrap_or_else(|_| JobOutcome::Failed("the job thread panicked".into()))
}

/// A connection to the guest agent behind the vsock socket `socket`, past the Hello exchange;
/// the agent must say Hello within `hello_within`.
fn greeted_agent(socket: &Path, hello_within: Duration) -> Result<UnixStream, String> {
    use ember_agent::wire::{self, Message};
    let mut stream = hybrid::connect(socket, wire::AGENT_PORT)
        .map_err(|e| format!("cannot reach the guest agent: {e}"))?;
    stream
        .set_read_timeout(Some(hello_within))
        .map_err(|e| e.to_string())?;
    match wire::read_message(&mut stream) {
        Ok(Some(Message::Hello { version })) if version == wire::VERSION => {}
        Ok(other) => return Err(format!("the guest agent did not say Hello: {other:?}")),
        Err(e) => return Err(format!("the guest agent's greeting: {e}")),
    }
    let hello = Message::Hello {
        version: wire::VERSION,
    };
    wire::write_message(&mut stream, &hello).map_err(|e| format!("the guest agent: {e}"))?;
    Ok(stream)
}

/// Asks the guest agent behind the vsock socket `socket` to sync and power the guest off
/// (`PUT /vm/shutdown`). Returns once the request is sent; the VM ends when the guest is off.
pub fn ask_guest_to_power_off(socket: &Path) -> Result<(), String> {
    let mut stream = greeted_agent(socket, Duration::from_secs(30))?;
    ember_agent::wire::write_message(&mut stream, &ember_agent::wire::Message::Shutdown)
        .map_err(|e| format!("cannot ask the guest agent: {e}"))
}

/// Sends the guest agent behind `socket` the host's entropy and time and nothing else: what a
/// guest resumed from a snapshot needs before anything in it draws randomness or reads the clock.
///
/// Right after a restore, a connection can be made before the guest takes the vsock device's
/// transport reset, which then drops it on the guest's side without a word to the host: the
/// Hello is waited for briefly, and the caller tries again.
pub fn refresh_guest(socket: &Path) -> Result<(), String> {
    let mut stream = greeted_agent(socket, Duration::from_secs(2))?;
    ember_agent::wire::write_message(&mut stream, &session::refresh_message())
        .map_err(|e| format!("cannot refresh the guest: {e}"))
}

/// Parses `-e KEY=VALUE`.
pub fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("'{text}' is not KEY=VALUE")),
    }
}

/// The resource names `--ulimit` takes (Docker's, which are `RLIMIT_*` lower-cased without the
/// prefix, as OCI specs name them upper-cased with it).
const RLIMITS: [(&str, libc::__rlimit_resource_t); 16] = [
    ("as", libc::RLIMIT_AS),
    ("core", libc::RLIMIT_CORE),
    ("cpu", libc::RLIMIT_CPU),
    ("data", libc::RLIMIT_DATA),
    ("fsize", libc::RLIMIT_FSIZE),
    ("locks", libc::RLIMIT_LOCKS),
    ("memlock", libc::RLIMIT_MEMLOCK),
    ("msgqueue", libc::RLIMIT_MSGQUEUE),
    ("nice", libc::RLIMIT_NICE),
    ("nofile", libc::RLIMIT_NOFILE),
    ("nproc", libc::RLIMIT_NPROC),
    ("rss", libc::RLIMIT_RSS),
    ("rtprio", libc::RLIMIT_RTPRIO),
    ("rttime", libc::RLIMIT_RTTIME),
    ("sigpending", libc::RLIMIT_SIGPENDING),
    ("stack", libc::RLIMIT_STACK),
];

/// The `RLIMIT_*` number of `nofile`, `NOFILE` or `RLIMIT_NOFILE`.
pub fn rlimit_resource(name: &str) -> Option<u32> {
    let name = name.to_ascii_lowercase();
    let name = name.strip_prefix("rlimit_").unwrap_or(&name);
    RLIMITS
        .iter()
        .find(|(known, _)| *known == name)
        .map(|(_, resource)| *resource)
}

/// Parses `--ulimit NAME=SOFT[:HARD]` (numbers, `unlimited` or -1; HARD is SOFT when absent).
pub fn parse_ulimit(text: &str) -> Result<Rlimit, String> {
    let bad = || format!("'{text}' is not NAME=SOFT[:HARD] (e.g. nofile=1024:4096)");
    let (name, values) = text.split_once('=').ok_or_else(bad)?;
    let resource = rlimit_resource(name).ok_or_else(|| {
        format!(
            "'{name}' is not a resource limit: use one of {}",
            RLIMITS.map(|(n, _)| n).join(", ")
        )
    })?;
    let value = |v: &str| match v {
        "unlimited" | "-1" => Some(u64::MAX),
        _ => v.parse().ok(),
    };
    let (soft, hard) = match values.split_once(':') {
        Some((soft, hard)) => (value(soft), value(hard)),
        None => (value(values), value(values)),
    };
    match (soft, hard) {
        (Some(soft), Some(hard)) if soft <= hard => Ok(Rlimit {
            resource,
            soft,
            hard,
        }),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulimits_parse_as_docker_takes_them() {
        assert_eq!(
            parse_ulimit("nofile=1024:4096"),
            Ok(Rlimit {
                resource: libc::RLIMIT_NOFILE,
                soft: 1024,
                hard: 4096
            })
        );
        assert_eq!(
            parse_ulimit("core=unlimited"),
            Ok(Rlimit {
                resource: libc::RLIMIT_CORE,
                soft: u64::MAX,
                hard: u64::MAX
            })
        );
        assert_eq!(rlimit_resource("RLIMIT_NPROC"), Some(libc::RLIMIT_NPROC));
        for bad in ["nofile", "files=1", "nofile=2:1", "nofile=x", "nofile=1:"] {
            assert!(parse_ulimit(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_codes_follow_docker_run() {
        assert_eq!(JobOutcome::Exited(0).exit_code(), 0);
        assert_eq!(JobOutcome::Exited(7).exit_code(), 7);
        assert_eq!(JobOutcome::Signaled(9).exit_code(), 137);
        assert_eq!(JobOutcome::TimedOut.exit_code(), 124);
        assert_eq!(JobOutcome::NotFound("x".into()).exit_code(), 127);
        assert_eq!(JobOutcome::NotExecutable("x".into()).exit_code(), 126);
        assert_eq!(JobOutcome::Failed("x".into()).exit_code(), 125);
    }

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert_eq!(parse_env("A="), Ok(("A".into(), String::new())));
        assert!(parse_env("=x").is_err());
        assert!(parse_env("A").is_err());
    }
}
