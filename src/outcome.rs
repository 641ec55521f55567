//! How a VM ended, and the process exit code that says so.

use std::fmt;

use ember_devices::VmRequest;

use crate::job::JobOutcome;

/// Exit code: the command line is wrong (as clap and most tools use).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the guest crashed (triple fault, KVM_EXIT_SHUTDOWN, failed VM entry).
pub const EXIT_GUEST_CRASHED: u8 = 121;
/// Exit code: KVM reported an internal error (including instruction emulation failure).
pub const EXIT_KVM_INTERNAL_ERROR: u8 = 122;
/// Exit code: Ember failed while the VM was running (a KVM_RUN error, an exit it cannot handle).
pub const EXIT_MONITOR_FAILED: u8 = 123;
/// Exit code: Ember could not start the VM (a host-side problem: /dev/kvm, kernel, memory, …).
pub const EXIT_SETUP_FAILED: u8 = 125;
/// Exit codes for signals are 128 + the signal number, as a shell reports them.
pub const EXIT_SIGNAL_BASE: u8 = 128;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest reset the machine (i8042).
    Reset,
    /// The guest powered off through ACPI.
    PowerOff,
    /// The guest wrote its exit status to the debug-exit port.
    GuestExit(u8),
    /// Triple fault / KVM_EXIT_SHUTDOWN.
    TripleFault { cpu: u8, rip: u64 },
    /// VM entry failed (KVM_EXIT_FAIL_ENTRY).
    FailedEntry { cpu: u8, rip: u64, reason: u64 },
    /// KVM_EXIT_INTERNAL_ERROR; `instruction` holds the bytes KVM could not emulate, if known.
    InternalError {
        cpu: u8,
        rip: u64,
        suberror: u32,
        instruction: Vec<u8>,
    },
    /// An exit Ember does not handle, or KVM_RUN itself failed.
    MonitorFailed { cpu: u8, what: String },
    /// A signal (SIGINT, SIGTERM, SIGHUP) ended the VM.
    Signal(i32),
    /// The user typed the console escape (Ctrl-A x).
    ConsoleQuit,
    /// Job mode: the command ended (or could not run).
    Job(JobOutcome),
    /// A host process a device depends on died while the VM ran (a volume's virtiofsd).
    BackendFailed(String),
    /// A client of the control socket asked the VM to end (`PUT /vm/shutdown`).
    ShutdownRequested,
}

impl From<VmRequest> for VmOutcome {
    fn from(request: VmRequest) -> Self {
        match request {
            VmRequest::Reset => VmOutcome::Reset,
            VmRequest::PowerOff => VmOutcome::PowerOff,
            VmRequest::Exit(status) => VmOutcome::GuestExit(status),
        }
    }
}

/// An error and its causes on one line, `error: cause: cause…`: how Ember reports a failure.
pub fn error_line(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    line
}

const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

impl VmOutcome {
    /// The process exit code for this outcome (documented in the README).
    pub fn exit_code(&self) -> u8 {
        match self {
            VmOutcome::Reset | VmOutcome::PowerOff | VmOutcome::ShutdownRequested => 0,
            VmOutcome::GuestExit(status) => *status,
            VmOutcome::TripleFault { .. } | VmOutcome::FailedEntry { .. } => EXIT_GUEST_CRASHED,
            VmOutcome::InternalError { .. } => EXIT_KVM_INTERNAL_ERROR,
            VmOutcome::MonitorFailed { .. } => EXIT_MONITOR_FAILED,
            VmOutcome::Signal(signal) => EXIT_SIGNAL_BASE.saturating_add(*signal as u8),
            VmOutcome::ConsoleQuit => EXIT_SIGNAL_BASE + libc::SIGINT as u8,
            VmOutcome::Job(job) => job.exit_code(),
            VmOutcome::BackendFailed(_) => EXIT_SETUP_FAILED,
        }
    }

    /// Whether the guest ended on its own terms (nothing to report as an error).
    pub fn is_clean(&self) -> bool {
        match self {
            VmOutcome::Reset
            | VmOutcome::PowerOff
            | VmOutcome::GuestExit(_)
            | VmOutcome::ShutdownRequested => true,
            VmOutcome::Job(job) => job.is_clean(),
            _ => false,
        }
    }
}

impl fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmOutcome::Reset => write!(f, "guest reset the VM"),
            VmOutcome::PowerOff => write!(f, "guest powered off"),
            VmOutcome::GuestExit(status) => write!(f, "guest exited with status {status}"),
            VmOutcome::TripleFault { cpu, rip } => {
                write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN) on vCPU {cpu} at RIP {rip:#x}")
            }
            VmOutcome::FailedEntry { cpu, rip, reason } => write!(
                f,
                "VM entry failed (KVM_EXIT_FAIL_ENTRY, reason {reason:#x}) on vCPU {cpu} at RIP {rip:#x}"
            ),
            VmOutcome::InternalError {
                cpu,
                rip,
                suberror,
                instruction,
            } => {
                if *suberror == KVM_INTERNAL_ERROR_EMULATION {
                    write!(f, "KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR, emulation failure) on vCPU {cpu} at RIP {rip:#x}")?;
                } else {
                    write!(f, "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}) on vCPU {cpu} at RIP {rip:#x}")?;
                }
                if !instruction.is_empty() {
                    write!(f, ", instruction bytes")?;
                    for byte in instruction {
                        write!(f, " {byte:02x}")?;
                    }
                }
                Ok(())
            }
            VmOutcome::MonitorFailed { cpu, what } => write!(f, "vCPU {cpu}: {what}"),
            VmOutcome::Signal(signal) => write!(f, "stopped by signal {signal}"),
            VmOutcome::ConsoleQuit => write!(f, "stopped from the console (Ctrl-A x)"),
            VmOutcome::Job(job) => write!(f, "{job}"),
            VmOutcome::BackendFailed(what) => write!(f, "{what}"),
            VmOutcome::ShutdownRequested => write!(f, "shut down through the API socket"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_kind() {
        assert_eq!(VmOutcome::Reset.exit_code(), 0);
        assert_eq!(VmOutcome::PowerOff.exit_code(), 0);
        assert_eq!(VmOutcome::GuestExit(42).exit_code(), 42);
        assert_eq!(VmOutcome::TripleFault { cpu: 0, rip: 0 }.exit_code(), 121);
        let internal = VmOutcome::InternalError {
            cpu: 1,
            rip: 0xffff_ffff_8100_0000,
            suberror: 1,
            instruction: vec![0x0f, 0x01, 0xd0],
        };
        assert_eq!(internal.exit_code(), 122);
        assert_eq!(
            internal.to_string(),
            "KVM could not emulate an instruction (KVM_EXIT_INTERNAL_ERROR, emulation failure) \
             on vCPU 1 at RIP 0xffffffff81000000, instruction bytes 0f 01 d0"
        );
        assert_eq!(VmOutcome::Signal(libc::SIGTERM).exit_code(), 143);
        assert_eq!(VmOutcome::Signal(libc::SIGINT).exit_code(), 130);
        assert_eq!(VmOutcome::ConsoleQuit.exit_code(), 130);
        assert!(!VmOutcome::ConsoleQuit.is_clean());
        assert!(VmOutcome::GuestExit(3).is_clean());
    }
}
