//! Job mode inside `ember run -- CMD`: the thread that waits for the guest agent, runs the command
//! and stops the VM with the command's outcome, and the private directory its vsock socket lives
//! in.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_agent::wire;
use vmm_sys_util::eventfd::EventFd;

use super::ready::{ReadyError, ReadyListener};
use super::session::{terminal_size, JobHandle, Session};
use super::{hybrid, JobOutcome, JobSpec};
use crate::job::gate::StartGate;
use crate::outcome::{error_line, VmOutcome};
use crate::snapshot::cache::CacheEntry;
use crate::vcpu::VmControl;

/// A directory only this user can enter, removed with everything in it when dropped: where job
/// mode's vsock socket lives, so that nothing else on the host can reach the agent.
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `ember-<pid>-<n>` (mode 0700) under `$XDG_RUNTIME_DIR`, or the temp directory.
    pub fn create() -> io::Result<Self> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        for n in 0..1000 {
            let path = base.join(format!("ember-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free name for a private directory",
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The job thread asks the main thread, which owns the vCPUs, to save the VM into `dir`.
pub struct SnapshotRequest {
    /// An empty directory to save into.
    pub dir: PathBuf,
    /// `Err(why)` when the snapshot could not be taken (the VM goes on either way).
    pub reply: Sender<Result<(), String>>,
}

/// The main thread's end of the snapshot requests: an eventfd its loop watches, and the
/// requests. Dropping it answers every pending request with a disconnection.
pub struct SnapshotRequests {
    /// Readable when a request is queued.
    pub wake: EventFd,
    /// The requests.
    pub requests: Receiver<SnapshotRequest>,
}

/// What the job thread does for warm starts.
enum WarmRole {
    /// A cold boot: save the VM into this cache entry once the agent is ready, before the
    /// command runs, so that later runs resume it there.
    SaveAtReady {
        entry: CacheEntry,
        wake: EventFd,
        requests: Sender<SnapshotRequest>,
    },
    /// A resumed snapshot: its agent must announce itself again within this long, or the
    /// snapshot is taken as unusable.
    Restored { within: Duration },
}

/// A job waiting for its VM: the ready listener is bound before the guest runs.
pub struct JobRunner {
    spec: JobSpec,
    socket: PathBuf,
    ready: ReadyListener,
    warm: Option<WarmRole>,
    /// The main thread's end of `warm`'s requests, until the VM takes it.
    snapshot_requests: Option<SnapshotRequests>,
    /// Set once the agent said it was ready.
    agent_was_ready: Arc<AtomicBool>,
    /// Hold the command until told to start (an OCI runtime's `create` then `start`).
    gate: Option<StartGate>,
}

impl JobRunner {
    /// Prepares to run `spec` through the vsock device at `socket`.
    pub fn prepare(spec: JobSpec, socket: &Path) -> Result<Self, ReadyError> {
        Ok(Self {
            spec,
            socket: socket.to_path_buf(),
            ready: ReadyListener::bind(socket)?,
            warm: None,
            snapshot_requests: None,
            agent_was_ready: Arc::default(),
            gate: None,
        })
    }

    /// Once the agent is ready, announce it and run the command only when `gate` is told to.
    pub fn hold_until_started(&mut self, gate: StartGate) {
        self.gate = Some(gate);
    }

    /// Once the agent is ready, and before the command runs, have the VM saved into `entry`
    /// (see [`take_snapshot_requests`](Self::take_snapshot_requests)).
    pub fn save_at_ready(&mut self, entry: CacheEntry) -> io::Result<()> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let (requests, received) = mpsc::channel();
        self.snapshot_requests = Some(SnapshotRequests {
            wake: wake.try_clone()?,
            requests: received,
        });
        self.warm = Some(WarmRole::SaveAtReady {
            entry,
            wake,
            requests,
        });
        Ok(())
    }

    /// The VM was resumed from a snapshot: give up (as the job's failure) if its agent does not
    /// announce itself within `within`.
    pub fn expect_restored(&mut self, within: Duration) {
        self.warm = Some(WarmRole::Restored { within });
    }

    /// For the VM's main loop: the requests [`save_at_ready`](Self::save_at_ready) will send.
    pub fn take_snapshot_requests(&mut self) -> Option<SnapshotRequests> {
        self.snapshot_requests.take()
    }

    /// Becomes true once the agent has said it is ready: a resumed VM that ends without it
    /// was not a usable snapshot.
    pub fn agent_was_ready(&self) -> Arc<AtomicBool> {
        self.agent_was_ready.clone()
    }

    /// Starts the job's thread: it waits for the agent, runs the command, and stops the VM
    /// through `control` with the command's outcome. `stopped` becomes readable when the VM
    /// stops (for whatever reason), which ends the wait for the agent.
    pub fn spawn(self, control: Arc<VmControl>, stopped: EventFd) -> io::Result<JobThread> {
        let handle: Arc<Mutex<Slot>> = Arc::default();
        let slot = handle.clone();
        let thread = std::thread::Builder::new()
            .name("job".into())
            .spawn(move || {
                crate::sandbox::seccomp::confine_or_exit(crate::sandbox::seccomp::ThreadKind::Job);
                if let Some(outcome) = self.run(&stopped, &slot) {
                    control.request_stop(VmOutcome::Job(outcome));
                }
            })?;
        Ok(JobThread { handle, thread })
    }

    /// `None` when the VM stopped before the agent was ready: the VM's own outcome stands.
    fn run(self, stopped: &EventFd, slot: &Mutex<Slot>) -> Option<JobOutcome> {
        let deadline = match &self.warm {
            Some(WarmRole::Restored { within }) => Some(Instant::now() + *within),
            _ => None,
        };
        let ready = match self.ready.wait(stopped, deadline) {
            Ok(ready) => ready,
            Err(ReadyError::Stopped) => return None,
            Err(e) => return Some(JobOutcome::Failed(error_line(&e))),
        };
        self.agent_was_ready.store(true, Ordering::SeqCst);
        log::info!("job: the guest agent is ready");
        if let Some(WarmRole::SaveAtReady {
            entry,
            wake,
            requests,
        }) = &self.warm
        {
            warm_up_the_agent(&self.socket);
            save_for_warm_starts(entry, wake, requests);
        }
        if let Some(gate) = self.gate {
            log::info!("job: waiting for the start gate");
            match gate.wait(stopped) {
                Ok(true) => log::info!("job: started"),
                Ok(false) => return None,
                Err(e) => return Some(JobOutcome::Failed(error_line(&e))),
            }
        }
        let stream = match hybrid::connect(&self.socket, wire::AGENT_PORT) {
            Ok(stream) => stream,
            Err(e) => {
                return Some(JobOutcome::Failed(format!(
                    "cannot reach the guest agent: {e}"
                )))
            }
        };
        let session = match Session::start(stream, &self.spec) {
            Ok(session) => session,
            Err(e) => {
                return Some(JobOutcome::Failed(format!(
                    "cannot send the command to the guest agent: {e}"
                )))
            }
        };
        let handle = session.handle();
        {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            // The VM began stopping while the command was being sent: nobody will wait for it.
            if slot.stopping {
                handle.abort("the VM stopped before the command ended");
            }
            slot.handle = Some(handle.clone());
        }
        watch_agent(ready, handle);
        Some(session.run())
    }
}

/// Runs `true` through the agent before the snapshot: the guest's first command pays for what
/// the agent and the guest kernel do only once (code paged in, the first reseed of the RNG), and
/// a snapshot taken after it spares every warm run that cost.
fn warm_up_the_agent(socket: &Path) {
    let started = Instant::now();
    let spec = JobSpec {
        argv: vec!["true".into()],
        env: Vec::new(),
        cwd: None,
        user: None,
        stdin: false,
        tty: false,
        timeout: Some(Duration::from_secs(60)),
        limits: Default::default(),
    };
    let outcome = hybrid::connect(socket, wire::AGENT_PORT)
        .map_err(|e| e.to_string())
        .and_then(|stream| Session::start(stream, &spec).map_err(|e| e.to_string()))
        .map(Session::run);
    log::info!(
        "warm start: warmed the agent up in {:?} ({})",
        started.elapsed(),
        match outcome {
            Ok(outcome) => outcome.to_string(),
            Err(e) => e,
        }
    );
}

/// Has the main thread save the VM into `entry`'s staging directory and puts it in place. A
/// failure costs later runs their warm start, not this run its command: it is a warning.
fn save_for_warm_starts(entry: &CacheEntry, wake: &EventFd, requests: &Sender<SnapshotRequest>) {
    let started = Instant::now();
    let staging = match entry.staging() {
        Ok(staging) => staging,
        Err(e) => {
            log::warn!("warm start: cannot make a directory for the snapshot: {e}");
            return;
        }
    };
    let (reply, answer) = mpsc::channel();
    let asked = requests
        .send(SnapshotRequest {
            dir: staging.clone(),
            reply,
        })
        .map_err(|_| "the VM is stopping".to_string())
        .and_then(|()| wake.write(1).map_err(|e| e.to_string()));
    // The main thread drops unanswered requests when the VM stops: no answer is a refusal.
    let saved = asked.and_then(|()| {
        answer
            .recv()
            .unwrap_or_else(|_| Err("the VM is stopping".into()))
    });
    let committed = saved.and_then(|()| entry.commit(&staging).map_err(|e| e.to_string()));
    match committed {
        Ok(_) => log::info!(
            "warm start: saved {} in {:?}; later runs of this guest resume it",
            entry.dir.display(),
            started.elapsed()
        ),
        Err(why) => {
            let _ = std::fs::remove_dir_all(&staging);
            log::warn!("warm start: no snapshot saved: {why}");
        }
    }
}

/// The agent's ready connection stays open while it lives: its end aborts the session, so a
/// command whose agent died is not waited for forever.
fn watch_agent(mut ready: UnixStream, handle: JobHandle) {
    let spawned = std::thread::Builder::new()
        .name("job-agent".into())
        .spawn(move || {
            crate::sandbox::seccomp::confine_or_exit(
                crate::sandbox::seccomp::ThreadKind::JobStream,
            );
            let mut buf = [0u8; 64];
            loop {
                match io::Read::read(&mut ready, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            handle.abort("the guest agent died before the command ended");
        });
    if let Err(e) = spawned {
        log::warn!("job: cannot watch the guest agent: {e}");
    }
}

/// What the main thread and the job thread share about the session.
#[derive(Default)]
struct Slot {
    /// The session, once the command has been sent.
    handle: Option<JobHandle>,
    /// The VM is stopping: a session that starts now is aborted at once.
    stopping: bool,
    /// Termination signals forwarded to the command so far.
    signals: u32,
}

/// The running job, as the main thread sees it.
pub struct JobThread {
    handle: Arc<Mutex<Slot>>,
    thread: JoinHandle<()>,
}

impl JobThread {
    /// Handles a signal Ember received: SIGWINCH resizes the command's terminal, others go to the
    /// command once it runs. False when the signal is Ember's to act on (no command yet).
    /// A second termination signal is Ember's: a command that ignores the first cannot keep
    /// the VM up.
    pub fn on_signal(&self, signal: i32) -> bool {
        let mut slot = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        let Some(handle) = slot.handle.clone() else {
            return signal == libc::SIGWINCH;
        };
        if signal == libc::SIGWINCH {
            handle.resize(terminal_size());
            return true;
        }
        slot.signals += 1;
        slot.signals == 1 && handle.forward_signal(signal)
    }

    /// The VM is stopping: a session still running ends now, and one about to start does not.
    pub fn stop(self) {
        {
            let mut slot = self.handle.lock().unwrap_or_else(|e| e.into_inner());
            slot.stopping = true;
            if let Some(handle) = &slot.handle {
                handle.abort("the VM stopped before the command ended");
            }
        }
        if self.thread.join().is_err() {
            log::error!("the job thread panicked");
        }
    }
}
