//! vCPU threads: the KVM_RUN loop, the exit handler, and how other threads pause, resume and
//! stop a vCPU.
//!
//! Turning a KVM exit into an action is [`handle_exit`], a plain function over the I/O buses, so
//! unit tests feed it synthetic exits. The loop holds no device lock while the guest runs: a
//! device is locked only for the duration of one register access.
//!
//! Each vCPU thread is a small state machine (running → paused → running, → finished) driven by
//! [`VcpuEvent`]s sent through its [`VcpuHandle`], in the manner of Firecracker's
//! `vstate/vcpu.rs`. Sending an event also kicks the thread (a real-time signal that makes
//! KVM_RUN return), so a guest spinning in a loop sees it at once.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ember_devices::{Bus, VmRequest};
use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::xstate::{XstateRequest, XstateSwitch};
use crate::outcome::VmOutcome;
use crate::snapshot::vcpu_state::VcpuState as SavedVcpuState;

/// The port-I/O and MMIO buses every vCPU dispatches to.
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

/// Why a vCPU stops, before the loop adds what only the vCPU knows (its RIP, the bytes KVM
/// could not emulate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopCause {
    Guest(VmRequest),
    TripleFault,
    FailedEntry(u64),
    InternalError,
    Unhandled(String),
}

/// What the loop does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    Continue,
    /// The guest kernel asked for its task's extended state to be switched (software KVM); the
    /// loop does it on this vCPU before it runs again.
    SwitchXstate(XstateRequest),
    Stop(StopCause),
}

// Linux `KVM_SYSTEM_EVENT_*` types.
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Turns one KVM exit into what the vCPU loop does next.
pub fn handle_exit(exit: VcpuExit, buses: &IoBuses) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            // Nothing on a port reads as all ones, as on a PC with a floating bus.
            if !buses.pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) if XstateRequest::is_switch_port(u64::from(port)) => {
            match XstateRequest::decode(u64::from(port), data) {
                Some(request) => ExitAction::SwitchXstate(request),
                None => {
                    log::trace!("{}-byte write to the xstate port {port:#x}", data.len());
                    ExitAction::Continue
                }
            }
        }
        VcpuExit::IoOut(port, data) => bus_write(&buses.pio, u64::from(port), data),
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => bus_write(&buses.mmio, addr, data),
        // With in-kernel local APICs HLT stays in KVM; a stray one just means "run again". The
        // userspace IOAPIC delivers every pin as an edge, so there is no EOI to act on either.
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => {
            ExitAction::Continue
        }
        VcpuExit::Shutdown => ExitAction::Stop(StopCause::TripleFault),
        VcpuExit::FailEntry(reason, _) => ExitAction::Stop(StopCause::FailedEntry(reason)),
        VcpuExit::InternalError => ExitAction::Stop(StopCause::InternalError),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => {
            ExitAction::Stop(StopCause::Guest(VmRequest::PowerOff))
        }
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => {
            ExitAction::Stop(StopCause::Guest(VmRequest::Reset))
        }
        other => ExitAction::Stop(StopCause::Unhandled(format!(
            "unhandled KVM exit {other:?}"
        ))),
    }
}

/// Handles an exit whose port I/O may be a string instruction: `rep outsb`, `rep insw`… reach
/// Ember as one exit carrying `count` accesses of `access_size` bytes each. They are handled as
/// that many accesses in order, as a PC's bus would see them; a device never sees a
/// wider access than the instruction made. Other exits go to [`handle_exit`] unchanged.
pub fn handle_exit_in_accesses(exit: VcpuExit, access_size: usize, buses: &IoBuses) -> ExitAction {
    match exit {
        VcpuExit::IoOut(port, data) if access_size > 0 && data.len() > access_size => {
            for access in data.chunks(access_size) {
                let action = handle_exit(VcpuExit::IoOut(port, access), buses);
                if action != ExitAction::Continue {
                    return action;
                }
            }
            ExitAction::Continue
        }
        VcpuExit::IoIn(port, data) if access_size > 0 && data.len() > access_size => {
            for access in data.chunks_mut(access_size) {
                // A read never stops the VM.
                handle_exit(VcpuExit::IoIn(port, access), buses);
            }
            ExitAction::Continue
        }
        other => handle_exit(other, buses),
    }
}

fn bus_write(bus: &Bus, addr: u64, data: &[u8]) -> ExitAction {
    match bus.write(addr, data) {
        Ok(Some(request)) => ExitAction::Stop(StopCause::Guest(request)),
        Ok(None) => ExitAction::Continue,
        Err(()) => {
            log::trace!(
                "write of {} bytes to unassigned address {addr:#x}",
                data.len()
            );
            ExitAction::Continue
        }
    }
}

/// How many exits of each kind the vCPUs took, for `GET /metrics`. Relaxed atomic adds: one
/// costs nanoseconds, an exit microseconds.
#[derive(Default)]
pub struct ExitCounters {
    counts: [AtomicU64; EXIT_KINDS.len()],
}

/// The kinds counted, as `GET /metrics` names them.
pub const EXIT_KINDS: [&str; 8] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "hlt",
    "intr",
    "system_event",
    "other",
];

impl ExitCounters {
    fn count(&self, exit: &VcpuExit) {
        let kind = match exit {
            VcpuExit::IoIn(..) => 0,
            VcpuExit::IoOut(..) => 1,
            VcpuExit::MmioRead(..) => 2,
            VcpuExit::MmioWrite(..) => 3,
            VcpuExit::Hlt => 4,
            VcpuExit::Intr => 5,
            VcpuExit::SystemEvent(..) => 6,
            _ => 7,
        };
        self.counts[kind].fetch_add(1, Ordering::Relaxed);
    }

    /// Each kind and its count so far.
    pub fn snapshot(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        EXIT_KINDS
            .iter()
            .zip(&self.counts)
            .map(|(kind, count)| (*kind, count.load(Ordering::Relaxed)))
    }
}

/// Shared between the vCPUs and the thread that waits for the VM to end.
pub struct VmControl {
    /// Every vCPU's exits, by kind.
    pub exits: ExitCounters,
    stopping: AtomicBool,
    outcome: Mutex<Option<VmOutcome>>,
    /// Signalled once, when the first stop is requested.
    pub stop_event: EventFd,
}

impl VmControl {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            exits: ExitCounters::default(),
            stopping: AtomicBool::new(false),
            outcome: Mutex::new(None),
            stop_event: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records why the VM stops (the first reason wins) and wakes the waiting thread.
    pub fn request_stop(&self, outcome: VmOutcome) {
        let mut slot = ember_devices::bus::lock(&self.outcome);
        if slot.is_none() {
            *slot = Some(outcome);
            self.stopping.store(true, Ordering::SeqCst);
            if let Err(e) = self.stop_event.write(1) {
                log::error!("cannot wake the VM's main thread: {e}");
            }
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn take_outcome(&self) -> Option<VmOutcome> {
        ember_devices::bus::lock(&self.outcome).take()
    }
}

thread_local! {
    /// This thread's `kvm_run`, so the kick signal handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // If the thread is between its stop check and KVM_RUN, setting immediate_exit makes that
    // KVM_RUN return EINTR at once instead of running the guest (KVM API, "immediate_exit").
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set while the VcpuFd is
            // alive on this thread and cleared before it is dropped; a byte store is
            // async-signal-safe.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// Installs the kick handler. Call once, before any vCPU thread starts.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), on_kick)
}

/// What another thread asks of a vCPU.
#[derive(Clone, Debug)]
pub enum VcpuEvent {
    /// Stop running the guest and wait for the next event (the vCPU's state stays in KVM).
    Pause,
    /// Run the guest again.
    Resume,
    /// End the thread.
    Finish,
    /// A paused vCPU: read its state (these MSRs) and send it on the state channel.
    SaveState(Arc<[u32]>),
}

/// What a vCPU answers to [`VcpuEvent::Pause`] and [`VcpuEvent::Resume`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    Paused,
    Resumed,
}

/// Where a vCPU thread is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VcpuState {
    Running,
    Paused,
    Finished,
}

/// Why a vCPU did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("the vCPU thread has ended")]
    Gone,
    #[error("the vCPU did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the vCPU answered {0:?}")]
    Unexpected(VcpuResponse),
    #[error("cannot save its state: {0}")]
    Save(String),
}

/// A vCPU thread and the channel that drives it.
pub struct VcpuHandle {
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    /// Answers to [`VcpuEvent::SaveState`].
    states: Receiver<Result<SavedVcpuState, String>>,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Starts the KVM_RUN loop for `vcpu` on its own thread, running. `xstate` is the
    /// extended-state switch, when the guest is offered one (software KVM).
    pub fn spawn(
        index: u8,
        vcpu: VcpuFd,
        buses: Arc<IoBuses>,
        xstate: Option<XstateSwitch>,
        control: Arc<VmControl>,
    ) -> std::io::Result<Self> {
        let (events, event_receiver) = mpsc::channel();
        let (response_sender, responses) = mpsc::channel();
        let (state_sender, states) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                crate::sandbox::seccomp::confine_or_exit(crate::sandbox::seccomp::ThreadKind::Vcpu);
                let mut vcpu = Vcpu {
                    index,
                    fd: vcpu,
                    buses: &buses,
                    xstate: xstate.as_ref(),
                    control: &control,
                    events: event_receiver,
                    responses: response_sender,
                    states: state_sender,
                    xstate_failed: false,
                };
                vcpu.run();
            })?;
        Ok(Self {
            events,
            responses,
            states,
            thread,
        })
    }

    /// Sends `event` and kicks the thread out of KVM_RUN so that it sees it.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events.send(event).map_err(|_| VcpuError::Gone)?;
        self.kick();
        Ok(())
    }

    /// Pauses the vCPU and waits until it has left KVM_RUN.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.request(VcpuEvent::Pause, VcpuResponse::Paused, timeout)
    }

    /// Resumes a paused vCPU.
    pub fn resume(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.request(VcpuEvent::Resume, VcpuResponse::Resumed, timeout)
    }

    /// The state of a paused vCPU, with `msrs` (see `snapshot::vcpu_state::msrs_to_save`).
    pub fn save_state(
        &self,
        msrs: Arc<[u32]>,
        timeout: Duration,
    ) -> Result<SavedVcpuState, VcpuError> {
        while self.states.try_recv().is_ok() {}
        self.send(VcpuEvent::SaveState(msrs))?;
        match self.states.recv_timeout(timeout) {
            Ok(Ok(state)) => Ok(state),
            Ok(Err(why)) => Err(VcpuError::Save(why)),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone),
        }
    }

    fn request(
        &self,
        event: VcpuEvent,
        expected: VcpuResponse,
        timeout: Duration,
    ) -> Result<(), VcpuError> {
        // An answer that came after an earlier request timed out, or to a plain `send`, belongs
        // to nobody now: drop it, or this request would read it as its own.
        while self.responses.try_recv().is_ok() {}
        self.send(event)?;
        match self.responses.recv_timeout(timeout) {
            Ok(response) if response == expected => Ok(()),
            Ok(other) => Err(VcpuError::Unexpected(other)),
            Err(RecvTimeoutError::Timeout) => Err(VcpuError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(VcpuError::Gone),
        }
    }

    /// Interrupts KVM_RUN so the thread looks at its events and the VM's stop flag.
    pub fn kick(&self) {
        if self.thread.is_finished() {
            return;
        }
        if let Err(e) = self.thread.kill(kick_signal()) {
            log::warn!("cannot kick a vCPU thread: {e}");
        }
    }

    /// Tells the thread to finish (whatever its state) and waits for it.
    pub fn finish(self) {
        // A thread that already ended has dropped its receiver: nothing to tell it.
        let _ = self.send(VcpuEvent::Finish);
        if self.thread.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
}

/// Stops the VM if a vCPU thread ends without having asked to (a panic): the main thread must
/// never wait for a vCPU that is gone.
struct StopOnUnwind<'a> {
    cpu: u8,
    control: &'a VmControl,
}

impl Drop for StopOnUnwind<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.control.request_stop(VmOutcome::MonitorFailed {
                cpu: self.cpu,
                what: "its thread panicked".into(),
            });
        }
    }
}

/// A vCPU thread's own state: what it runs, and how it talks to the rest of Ember.
struct Vcpu<'a> {
    index: u8,
    fd: VcpuFd,
    buses: &'a IoBuses,
    xstate: Option<&'a XstateSwitch>,
    control: &'a VmControl,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
    states: Sender<Result<SavedVcpuState, String>>,
    /// A failed extended-state switch is reported once per vCPU, not once per context switch.
    xstate_failed: bool,
}

impl Vcpu<'_> {
    fn run(&mut self) {
        let _stop_on_unwind = StopOnUnwind {
            cpu: self.index,
            control: self.control,
        };
        let _kvm_run = KvmRunForKicks::set(&mut self.fd);
        let mut state = VcpuState::Running;
        while state != VcpuState::Finished {
            state = match state {
                VcpuState::Running => self.running(),
                VcpuState::Paused => self.paused(),
                VcpuState::Finished => VcpuState::Finished,
            };
        }
    }

    /// Runs the guest until an event or a stop changes the state.
    fn running(&mut self) -> VcpuState {
        loop {
            match self.events.try_recv() {
                Ok(VcpuEvent::Pause) => {
                    self.complete_pending_io();
                    return self.respond(VcpuResponse::Paused);
                }
                Ok(VcpuEvent::Resume) => {
                    self.respond(VcpuResponse::Resumed);
                }
                Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => {
                    return VcpuState::Finished
                }
                Ok(VcpuEvent::SaveState(_)) => {
                    // Its registers change under KVM_RUN: only a paused vCPU has a state.
                    let _ = self
                        .states
                        .send(Err("the vCPU is running, not paused".into()));
                }
                Err(TryRecvError::Empty) => {}
            }
            if self.control.is_stopping() {
                return VcpuState::Finished;
            }
            if let Err(cause) = self.run_once() {
                let outcome = describe_stop(self.index, &mut self.fd, cause);
                self.control.request_stop(outcome);
                return VcpuState::Finished;
            }
        }
    }

    /// Waits, out of KVM_RUN, for the next event.
    fn paused(&mut self) -> VcpuState {
        match self.events.recv() {
            Ok(VcpuEvent::Resume) => {
                // A kick that arrived while paused left immediate_exit set: KVM_RUN would
                // return at once, harmlessly, but clearing it saves that round trip.
                self.fd.set_kvm_immediate_exit(0);
                self.respond(VcpuResponse::Resumed)
            }
            Ok(VcpuEvent::Pause) => self.respond(VcpuResponse::Paused),
            Ok(VcpuEvent::SaveState(msrs)) => {
                let state = SavedVcpuState::save(&self.fd, &msrs).map_err(|e| e.to_string());
                let _ = self.states.send(state);
                VcpuState::Paused
            }
            Ok(VcpuEvent::Finish) | Err(_) => VcpuState::Finished,
        }
    }

    /// Finishes the exit just handled inside KVM. An I/O or MMIO read's result reaches the
    /// guest's registers only on the next KVM_RUN (KVM API, "KVM_RUN"), so a vCPU paused right
    /// after one would be saved halfway through an instruction. KVM_RUN with immediate_exit set
    /// completes it and returns EINTR without running the guest.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => log::warn!("vCPU {}: completing its last exit: {e}", self.index),
            Ok(exit) => log::warn!(
                "vCPU {}: unexpected exit {exit:?} while pausing",
                self.index
            ),
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    fn respond(&self, response: VcpuResponse) -> VcpuState {
        // Nobody waiting for the answer is not an error: a kick-only sender does not wait.
        let _ = self.responses.send(response);
        match response {
            VcpuResponse::Paused => VcpuState::Paused,
            VcpuResponse::Resumed => VcpuState::Running,
        }
    }

    /// One KVM_RUN and its exit. `Err` is why the VM must stop.
    fn run_once(&mut self) -> Result<(), StopCause> {
        let action = match self.fd.run() {
            Ok(exit) => {
                self.control.exits.count(&exit);
                handle_exit_in_accesses(exit, port_access_size(), self.buses)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(());
            }
            Err(e) => ExitAction::Stop(StopCause::Unhandled(format!("KVM_RUN failed: {e}"))),
        };
        match action {
            ExitAction::Continue => Ok(()),
            ExitAction::SwitchXstate(request) => {
                // Without a switch (hardware KVM) the port is not offered: a write is ignored.
                // A failed request only leaves the guest's own task with stale registers; say
                // so once per vCPU rather than let a guest flood the log.
                let result = self.xstate.map(|switch| switch.handle(&self.fd, request));
                if let Some(Err(e)) = result {
                    if !self.xstate_failed {
                        log::warn!(
                            "vCPU {}: extended-state switch {request:?} failed: {e}",
                            self.index
                        );
                        self.xstate_failed = true;
                    }
                }
                Ok(())
            }
            ExitAction::Stop(cause) => Err(cause),
        }
    }
}

/// Publishes this thread's `kvm_run` to the kick handler, and takes it back however the thread
/// ends: after a panic, a kick sent to the unwinding thread must not write into a mapping that
/// is about to be unmapped with its `VcpuFd`.
struct KvmRunForKicks;

impl KvmRunForKicks {
    fn set(fd: &mut VcpuFd) -> Self {
        KVM_RUN.with(|run| run.set(fd.get_kvm_run() as *mut kvm_run));
        Self
    }
}

impl Drop for KvmRunForKicks {
    fn drop(&mut self) {
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
    }
}

/// The width of one access in the port-I/O exit being handled on this thread: `kvm_run.io.size`.
/// Any other exit reads whatever the union holds, which [`handle_exit_in_accesses`] ignores.
fn port_access_size() -> usize {
    KVM_RUN.with(|run| {
        let run = run.get();
        if run.is_null() {
            return 0;
        }
        // SAFETY: `run` is this thread's kvm_run mapping, valid while its VcpuFd lives (the
        // pointer is cleared before that). KVM wrote it before KVM_RUN returned and nothing
        // writes it until the next KVM_RUN; the exit being handled borrows only the data area
        // at `io.data_offset`, never the `io` header read here. Reading a u8 out of a union of
        // plain integers is valid whatever the exit reason was.
        usize::from(unsafe { (*run).__bindgen_anon_1.io.size })
    })
}

/// Adds the vCPU's own state to a stop cause.
fn describe_stop(cpu: u8, vcpu: &mut VcpuFd, cause: StopCause) -> VmOutcome {
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
    match cause {
        StopCause::Guest(request) => request.into(),
        StopCause::TripleFault => VmOutcome::TripleFault { cpu, rip },
        StopCause::FailedEntry(reason) => VmOutcome::FailedEntry { cpu, rip, reason },
        StopCause::InternalError => {
            let (suberror, instruction) = internal_error_details(vcpu.get_kvm_run());
            VmOutcome::InternalError {
                cpu,
                rip,
                suberror,
                instruction,
            }
        }
        StopCause::Unhandled(what) => VmOutcome::MonitorFailed { cpu, what },
    }
}

/// The suberror and, for an emulation failure that carries them, the instruction bytes.
fn internal_error_details(run: &kvm_run) -> (u32, Vec<u8>) {
    // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills `internal`; the
    // `emulation_failure` view shares its first fields and KVM sets `flags` only for it.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    if internal.suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION {
        return (internal.suberror, Vec::new());
    }
    // SAFETY: as above; for suberror EMULATION the union holds `emulation_failure`.
    let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
    let has_bytes = failure.ndata >= 3
        && failure.flags
            & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            != 0;
    if !has_bytes {
        return (internal.suberror, Vec::new());
    }
    // SAFETY: the flag above says the instruction bytes are valid.
    let bytes = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
    let len = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
    (internal.suberror, bytes.insn_bytes[..len].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_devices::{debug_exit::DebugExit, i8042::I8042, BusDevice};

    struct Constant(u8);
    impl BusDevice for Constant {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _: u64, _: &[u8]) -> Option<VmRequest> {
            None
        }
    }

    fn buses() -> IoBuses {
        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(I8042)), 0x60, 5).unwrap();
        pio.insert(Arc::new(Mutex::new(DebugExit)), 0xf4, 1)
            .unwrap();
        let mut mmio = Bus::new();
        mmio.insert(Arc::new(Mutex::new(Constant(0x5a))), 0xd000_0000, 0x1000)
            .unwrap();
        IoBuses { pio, mmio }
    }

    #[test]
    fn port_writes_that_end_the_vm() {
        let b = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x64, &[0xfe]), &b),
            ExitAction::Stop(StopCause::Guest(VmRequest::Reset))
        );
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0xf4, &[7]), &b),
            ExitAction::Stop(StopCause::Guest(VmRequest::Exit(7)))
        );
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x80, &[1]), &b),
            ExitAction::Continue
        );
    }

    #[test]
    fn xstate_port_writes_become_switch_requests() {
        use crate::arch::x86_64::layout::{XSTATE_RESTORE_PORT, XSTATE_SAVE_PORT};
        use crate::arch::x86_64::xstate::XstateOp;
        let b = buses();
        let frame = 0x40u32.to_le_bytes();
        for (port, op) in [
            (XSTATE_SAVE_PORT, XstateOp::Save),
            (XSTATE_RESTORE_PORT, XstateOp::Restore),
        ] {
            assert_eq!(
                handle_exit(VcpuExit::IoOut(port as u16, &frame), &b),
                ExitAction::SwitchXstate(XstateRequest {
                    op,
                    image: vm_memory::GuestAddress(0x1000)
                })
            );
        }
        // Any other width is not a request: ignored, the guest runs on.
        assert_eq!(
            handle_exit(VcpuExit::IoOut(XSTATE_SAVE_PORT as u16, &[1]), &b),
            ExitAction::Continue
        );
    }

    #[test]
    fn unassigned_reads_float_high() {
        let b = buses();
        let mut data = [0u8; 2];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x2f8, &mut data), &b),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff, 0xff]);
        let mut data = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xd000_0010, &mut data), &b);
        assert_eq!(data, [0x5a; 4]);
        handle_exit(VcpuExit::MmioRead(0xe000_0000, &mut data), &b);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(
            handle_exit(VcpuExit::MmioWrite(0xe000_0000, &[1]), &b),
            ExitAction::Continue
        );
    }

    #[test]
    fn fatal_exits() {
        let b = buses();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &b),
            ExitAction::Stop(StopCause::TripleFault)
        );
        assert_eq!(
            handle_exit(VcpuExit::InternalError, &b),
            ExitAction::Stop(StopCause::InternalError)
        );
        assert_eq!(
            handle_exit(VcpuExit::FailEntry(0x21, 0), &b),
            ExitAction::Stop(StopCause::FailedEntry(0x21))
        );
        assert_eq!(handle_exit(VcpuExit::Hlt, &b), ExitAction::Continue);
        assert!(matches!(
            handle_exit(VcpuExit::Hyperv, &b),
            ExitAction::Stop(StopCause::Unhandled(_))
        ));
        assert_eq!(
            handle_exit(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]), &b),
            ExitAction::Stop(StopCause::Guest(VmRequest::Reset))
        );
    }

    #[test]
    fn first_stop_reason_wins() {
        let control = VmControl::new().unwrap();
        assert!(!control.is_stopping());
        control.request_stop(VmOutcome::GuestExit(3));
        control.request_stop(VmOutcome::Reset);
        assert!(control.is_stopping());
        assert_eq!(control.stop_event.read().unwrap(), 1);
        assert_eq!(control.take_outcome(), Some(VmOutcome::GuestExit(3)));
    }

    #[test]
    fn emulation_failure_bytes_are_extracted() {
        let mut run = kvm_run::default();
        // SAFETY: plain-old-data union fields written for the test.
        unsafe {
            let f = &mut run.__bindgen_anon_1.emulation_failure;
            f.suberror = kvm_bindings::KVM_INTERNAL_ERROR_EMULATION;
            f.ndata = 3;
            f.flags = u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
            f.__bindgen_anon_1.__bindgen_anon_1.insn_size = 3;
            f.__bindgen_anon_1.__bindgen_anon_1.insn_bytes[..3]
                .copy_from_slice(&[0x0f, 0x01, 0xd0]);
        }
        assert_eq!(internal_error_details(&run), (1, vec![0x0f, 0x01, 0xd0]));
        let mut run = kvm_run::default();
        run.__bindgen_anon_1.internal.suberror = 3;
        assert_eq!(internal_error_details(&run), (3, vec![]));
    }
}
