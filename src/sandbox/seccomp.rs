//! seccomp-bpf: one system-call allow-list per kind of thread, installed by each thread on
//! itself before it touches anything the guest controls.
//!
//! A guest that finds a bug in a device model lands in a thread that can make only the calls its
//! job needs: a vCPU can run KVM_RUN and a few state ioctls but cannot open a file, a disk's
//! thread can read and write its image but cannot make a socket. The lists below are the
//! inventory of what each thread really calls (taken with `strace -f` over every mode: boots,
//! jobs, warm starts, snapshots, the control socket, volumes, the network), each with who needs
//! it; the README repeats them.
//!
//! **What a violation does.** With `--seccomp on` (the default) a call outside the list gets
//! `SECCOMP_RET_TRAP`: the kernel sends SIGSYS to the thread, whose handler writes one line
//! naming the thread and the call's number, puts the terminal back and ends ember with 159
//! (128 + SIGSYS). Chosen over `SECCOMP_RET_KILL_PROCESS` because killing leaves the user a bare
//! "Bad system call" and the terminal in raw mode, and the kernel's audit record is not readable
//! everywhere; the handler makes only calls every list allows (write, ioctl TCSETS and TCGETS,
//! exit_group).
//! With `--seccomp log` the call goes through and the kernel logs it (`dmesg`: `audit:
//! type=1326 … comm="vcpu0" … syscall=N`): how a missing entry is found without breaking a run.
//!
//! **Filters stack.** A thread starts under the filter of the thread that created it, and its own
//! filter adds to it (the stricter answer wins). So a thread that starts others after confining
//! itself (the main thread: the graceful-shutdown thread; the job thread: its stream threads)
//! must allow what those need before they confine themselves, and what starting a thread costs.
//! Both are marked below. The main thread confines itself last, just before its event loop, after
//! the VM is built and the vCPU, device and console threads run under their own lists.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use crate::config::VmConfig;
use crate::device_manager::DeviceKind;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

/// Exit code of a violation: 128 + SIGSYS, what a shell shows for a process SIGSYS killed.
pub const EXIT_SECCOMP_VIOLATION: i32 = 128 + libc::SIGSYS;

/// `--seccomp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// A forbidden call ends ember (exit 159) with a line naming the thread and the call
    #[default]
    On,
    /// A forbidden call goes through and the kernel logs it (see dmesg)
    Log,
    /// No filters
    Off,
}

/// The kinds of thread, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The event loop: signals, the control socket's requests, snapshots, teardown.
    Main,
    /// A vCPU's KVM_RUN loop and the port/MMIO exits it emulates.
    Vcpu,
    /// A virtio-block device's queues and its image file.
    Block,
    /// A virtio-net device's queues and its TAP.
    Net,
    /// A virtio-vsock device's queues and its Unix sockets.
    Vsock,
    /// A virtio-fs device: kicks and calls between the guest and virtiofsd.
    Fs,
    /// Host stdin into the guest's serial port.
    ConsoleIn,
    /// The guest's serial output to the host.
    ConsoleOut,
    /// The control socket's listener (`--api-socket`).
    Api,
    /// Job mode's driver: waits for the agent, keeps the warm-start cache, runs the command.
    Job,
    /// A job's stream threads: the agent's output to stdout/stderr, stdin to the agent, the
    /// timeout.
    JobStream,
    /// A short-lived thread that asks the guest agent something (the fresh entropy and time after
    /// a restore, a graceful power-off).
    AgentClient,
    /// `--jail`'s parent process, outside the jail: waits for the monitor, forwards signals,
    /// removes the cgroups and the jail directory.
    JailParent,
}

/// What the VM has, where it changes what a thread needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct VmShape {
    /// Volumes: a vCPU's MMIO write that starts a virtio-fs device talks vhost-user to virtiofsd.
    pub volumes: bool,
    /// Network devices: a vCPU's MMIO write that starts a virtio-net device sets the TAP's
    /// offloads to the features the guest took.
    pub nets: bool,
}

impl VmShape {
    pub fn of(config: &VmConfig) -> Self {
        Self {
            volumes: !config.volumes.is_empty(),
            nets: !config.nets.is_empty(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the {0:?} thread's seccomp filter: {1}")]
    Build(ThreadKind, seccompiler::BackendError),
    #[error("cannot install the seccomp filter of thread {0}: {1}")]
    Install(String, seccompiler::Error),
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// The compiled filters of this process, set once by [`configure`].
struct Filters {
    programs: HashMap<ThreadKind, BpfProgram>,
}

static FILTERS: OnceLock<Option<Filters>> = OnceLock::new();

thread_local! {
    /// The confined thread's name, for the SIGSYS handler (which may not allocate or lock).
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
    /// Whether this thread has a filter (which it keeps until it ends).
    static CONFINED: Cell<bool> = const { Cell::new(false) };
}

/// Compiles every thread kind's filter for `mode` and, with `on`, installs the SIGSYS handler.
/// Called once, on the main thread, before any thread starts. Without it (or with `off`),
/// [`confine`] does nothing.
pub fn configure(mode: SeccompMode, shape: VmShape) -> Result<(), SeccompError> {
    let filters = match mode {
        SeccompMode::Off => None,
        SeccompMode::On | SeccompMode::Log => {
            let mismatch = if mode == SeccompMode::On {
                install_sigsys_handler()?;
                SeccompAction::Trap
            } else {
                SeccompAction::Log
            };
            let mut programs = HashMap::new();
            for kind in ThreadKind::ALL {
                let program = compile(kind, shape, mismatch.clone())
                    .map_err(|e| SeccompError::Build(kind, e))?;
                programs.insert(kind, program);
            }
            Some(Filters { programs })
        }
    };
    // A second call (tests in one process) keeps the first: filters are per process anyway.
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread, for good. A no-op unless [`configure`] ran
/// with `on` or `log`.
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(Some(filters)) = FILTERS.get() else {
        return Ok(());
    };
    let Some(program) = filters.programs.get(&kind) else {
        return Ok(());
    };
    let name = std::thread::current()
        .name()
        .map_or_else(|| format!("{kind:?}"), str::to_owned);
    let mut stored = [0u8; 16];
    let len = name.len().min(stored.len());
    stored[..len].copy_from_slice(&name.as_bytes()[..len]);
    THREAD_NAME.with(|slot| slot.set(stored));
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(name, e))?;
    CONFINED.with(|confined| confined.set(true));
    test_hooks::violate_if_asked();
    Ok(())
}

/// Installs `kind`'s filter for `mode` on the calling thread, without [`configure`]: for a
/// process that will never start a VM (the jail's parent).
pub fn confine_alone(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(()),
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::On => {
            install_sigsys_handler()?;
            SeccompAction::Trap
        }
    };
    let program =
        compile(kind, VmShape::default(), mismatch).map_err(|e| SeccompError::Build(kind, e))?;
    let name = "jail-parent";
    let mut stored = [0u8; 16];
    stored[..name.len()].copy_from_slice(name.as_bytes());
    THREAD_NAME.with(|slot| slot.set(stored));
    seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install(name.into(), e))?;
    CONFINED.with(|confined| confined.set(true));
    Ok(())
}

/// [`confine`], or end ember with one line: a thread that cannot be confined must not go on
/// (the filter is the only thing between it and the guest's input).
pub fn confine_or_exit(kind: ThreadKind) {
    if let Err(e) = confine(kind) {
        crate::terminal::restore();
        eprintln!("ember: error: {e}");
        std::process::exit(i32::from(crate::outcome::EXIT_SETUP_FAILED));
    }
}

/// Whether the calling thread has a filter: it can no longer do what its list leaves out
/// (build another VM, for one).
pub fn is_confined() -> bool {
    CONFINED.with(Cell::get)
}

impl ThreadKind {
    const ALL: [ThreadKind; 13] = [
        ThreadKind::Main,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Net,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::ConsoleIn,
        ThreadKind::ConsoleOut,
        ThreadKind::Api,
        ThreadKind::Job,
        ThreadKind::JobStream,
        ThreadKind::AgentClient,
        ThreadKind::JailParent,
    ];

    /// The kind of a virtio device's thread.
    pub fn of_device(kind: DeviceKind) -> ThreadKind {
        match kind {
            DeviceKind::Block => ThreadKind::Block,
            DeviceKind::Net => ThreadKind::Net,
            DeviceKind::Vsock => ThreadKind::Vsock,
            DeviceKind::Fs => ThreadKind::Fs,
        }
    }
}

// KVM's ioctl numbers (linux/kvm.h), as kvm-ioctls computes them (its table is private).
const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(
    KVM_GET_MSR_INDEX_LIST,
    KVMIO,
    0x02,
    kvm_bindings::kvm_msr_list
);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_bindings::kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_bindings::kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_bindings::kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_bindings::kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_bindings::kvm_mp_state);
ioctl_ior_nr!(
    KVM_GET_VCPU_EVENTS,
    KVMIO,
    0x9f,
    kvm_bindings::kvm_vcpu_events
);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_bindings::kvm_debugregs);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_bindings::kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_bindings::kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_bindings::kvm_xcrs);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_bindings::kvm_msi);
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_bindings::kvm_irq_level);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_bindings::kvm_clock_data);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_bindings::kvm_irqfd);
ioctl_iow_nr!(
    KVM_SET_GSI_ROUTING,
    KVMIO,
    0x6a,
    kvm_bindings::kvm_irq_routing
);

/// An allow-list being built: per system call, no rule (any arguments) or the argument rules
/// one of which must match.
#[derive(Default)]
struct AllowList(BTreeMap<i64, Vec<SeccompRule>>);

impl AllowList {
    /// `syscall` with any arguments.
    fn any(&mut self, syscall: libc::c_long) -> &mut Self {
        self.0.insert(syscall, Vec::new());
        self
    }

    /// `syscall` when argument `arg` equals one of `values`.
    fn when_arg_in(
        &mut self,
        syscall: libc::c_long,
        arg: u8,
        values: &[u64],
    ) -> Result<&mut Self, seccompiler::BackendError> {
        let mut rules = Vec::new();
        for &value in values {
            rules.push(SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])?);
        }
        self.add_rules(syscall, rules);
        Ok(self)
    }

    /// `syscall` when argument `arg` has none of the bits of `mask` set.
    fn when_arg_lacks(
        &mut self,
        syscall: libc::c_long,
        arg: u8,
        mask: u64,
    ) -> Result<&mut Self, seccompiler::BackendError> {
        let rule = SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            0,
        )?])?;
        self.add_rules(syscall, vec![rule]);
        Ok(self)
    }

    /// ioctl with one of `requests` (the request is the second argument).
    fn ioctls(&mut self, requests: &[u64]) -> Result<&mut Self, seccompiler::BackendError> {
        self.when_arg_in(libc::SYS_ioctl, 1, requests)
    }

    fn add_rules(&mut self, syscall: libc::c_long, rules: Vec<SeccompRule>) {
        match self.0.get_mut(&syscall) {
            // Already allowed with any arguments: nothing narrower to add.
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(rules),
            None => {
                self.0.insert(syscall, rules);
            }
        }
    }
}

/// The program for `kind`.
fn compile(
    kind: ThreadKind,
    shape: VmShape,
    mismatch: SeccompAction,
) -> Result<BpfProgram, seccompiler::BackendError> {
    let list = allow_list(kind, shape)?;
    SeccompFilter::new(list.0, mismatch, SeccompAction::Allow, TargetArch::x86_64)?.try_into()
}

/// What every thread needs: to allocate, lock, sleep, log, end, and what the SIGSYS handler
/// calls.
fn every_thread(list: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    list
        // The allocator (glibc's arenas grow with mmap + mprotect, shrink with madvise and
        // munmap; realloc of a large block is mremap); never executable memory.
        .when_arg_lacks(libc::SYS_mmap, 2, libc::PROT_EXEC as u64)?
        .when_arg_lacks(libc::SYS_mprotect, 2, libc::PROT_EXEC as u64)?
        .any(libc::SYS_munmap)
        .any(libc::SYS_mremap)
        .any(libc::SYS_madvise)
        .any(libc::SYS_brk)
        // Mutexes, condition variables, channels, joins.
        .any(libc::SYS_futex)
        // Sleeps and yields (retries, timeouts, spin-waits).
        .any(libc::SYS_nanosleep)
        .any(libc::SYS_clock_nanosleep)
        .any(libc::SYS_sched_yield)
        // The vDSO's fallbacks.
        .any(libc::SYS_clock_gettime)
        .any(libc::SYS_gettimeofday)
        // std's HashMap seeds, once per thread.
        .any(libc::SYS_getrandom)
        // Log lines on stderr, eventfd signals, the SIGSYS handler's line.
        .any(libc::SYS_write)
        .any(libc::SYS_close)
        // Signal handlers return through it (the vCPU kick); glibc masks signals around thread
        // exit; Rust's stack-overflow guard stack is removed at thread exit.
        .any(libc::SYS_rt_sigreturn)
        .any(libc::SYS_rt_sigprocmask)
        .any(libc::SYS_sigaltstack)
        .any(libc::SYS_restart_syscall)
        // A thread ends; the process ends (also from the SIGSYS handler).
        .any(libc::SYS_exit)
        .any(libc::SYS_exit_group);
    // The terminal is put back on every way out, the SIGSYS handler's and a panic's from any
    // thread included (glibc's tcsetattr reads the settings back: TCGETS).
    list.ioctls(&[libc::TCSETS, libc::TCGETS])?;
    Ok(())
}

/// What a thread needs to start threads: the clone itself and what the new thread does under
/// this thread's filter before it installs its own (glibc's robust list and rseq, Rust's guard
/// page lookup, stack-overflow handler and name, then the filter).
fn starts_threads(list: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    list.any(libc::SYS_clone3)
        .any(libc::SYS_clone)
        .any(libc::SYS_set_robust_list)
        .any(libc::SYS_rseq)
        .any(libc::SYS_sched_getaffinity)
        .any(libc::SYS_gettid)
        // A filter can only narrow what a thread may do.
        .any(libc::SYS_seccomp)
        .when_arg_in(
            libc::SYS_prctl,
            0,
            &[
                libc::PR_SET_NAME as u64,
                libc::PR_GET_NAME as u64,
                libc::PR_SET_NO_NEW_PRIVS as u64,
            ],
        )?;
    Ok(())
}

/// Talking to the guest agent through the vsock device's Unix socket.
fn agent_client(list: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    list.when_arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?
        .any(libc::SYS_connect)
        // Timeouts on the connection.
        .when_arg_in(libc::SYS_setsockopt, 1, &[libc::SOL_SOCKET as u64])?
        .any(libc::SYS_read)
        .any(libc::SYS_recvfrom)
        .any(libc::SYS_sendto)
        .any(libc::SYS_poll)
        .any(libc::SYS_ppoll)
        .any(libc::SYS_shutdown)
        // try_clone of the connection.
        .when_arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64])?;
    Ok(())
}

/// Files: snapshots, the warm-start cache, the scratch disk and private directories removed at
/// exit.
fn files(list: &mut AllowList) {
    list.any(libc::SYS_openat)
        .any(libc::SYS_mkdir)
        .any(libc::SYS_mkdirat)
        .any(libc::SYS_newfstatat)
        .any(libc::SYS_fstat)
        .any(libc::SYS_statx)
        .any(libc::SYS_lseek)
        .any(libc::SYS_pwrite64)
        .any(libc::SYS_ftruncate)
        .any(libc::SYS_fsync)
        .any(libc::SYS_fdatasync)
        .any(libc::SYS_rename)
        .any(libc::SYS_renameat)
        .any(libc::SYS_renameat2)
        .any(libc::SYS_unlink)
        .any(libc::SYS_unlinkat)
        .any(libc::SYS_rmdir)
        .any(libc::SYS_getdents64)
        .any(libc::SYS_flock)
        .any(libc::SYS_utimensat)
        .any(libc::SYS_readlink)
        .any(libc::SYS_fcntl);
}

/// The allow-list of `kind`, with who needs each call.
fn allow_list(kind: ThreadKind, shape: VmShape) -> Result<AllowList, seccompiler::BackendError> {
    let mut list = AllowList::default();
    every_thread(&mut list)?;
    // An interrupt from userspace: the serial port, the IOAPIC's lines, virtio's used buffers.
    let interrupts = [KVM_SIGNAL_MSI(), KVM_IRQ_LINE()];
    match kind {
        ThreadKind::Main => {
            // The event loop: its epoll set, eventfds and signalfd.
            list.any(libc::SYS_epoll_wait)
                .any(libc::SYS_epoll_pwait)
                .any(libc::SYS_epoll_ctl)
                .any(libc::SYS_read)
                // Kicking vCPUs out of KVM_RUN to pause them (pthread_kill).
                .any(libc::SYS_tgkill)
                .any(libc::SYS_getpid)
                // Stopping virtiofsd at exit and reaping it.
                .any(libc::SYS_kill)
                .any(libc::SYS_wait4)
                .any(libc::SYS_waitid)
                .any(libc::SYS_pidfd_send_signal);
            // Snapshots (PUT /vm/snapshot, the warm-start save), the scratch disk and the
            // private socket directory removed at exit, the cache entry touched.
            files(&mut list);
            // The graceful-shutdown thread: started from the loop, it talks to the agent.
            starts_threads(&mut list)?;
            agent_client(&mut list)?;
            if shape.nets {
                // A virtio-net device woken after a snapshot sets the TAP's offloads again.
                list.ioctls(&[libc::TUNSETOFFLOAD])?;
            }
            list.ioctls(&interrupts)?.ioctls(&[
                // The VM clock and which MSRs to save, for a snapshot.
                KVM_GET_CLOCK(),
                KVM_GET_MSR_INDEX_LIST(),
                // The terminal: restored at exit; the window size for a job's -t on SIGWINCH.
                libc::TCGETS,
                libc::TIOCGWINSZ,
                libc::FIONBIO,
            ])?;
        }
        ThreadKind::Vcpu => {
            list.ioctls(&interrupts)?.ioctls(&[
                KVM_RUN(),
                // The extended-state switch (software KVM) and a snapshot's state, read on
                // the vCPU's own thread.
                KVM_GET_XSAVE(),
                KVM_SET_XSAVE(),
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
                KVM_GET_MSRS(),
                KVM_GET_LAPIC(),
                KVM_GET_MP_STATE(),
                KVM_GET_VCPU_EVENTS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_XCRS(),
            ])?;
            // Eventfds: the VM's stop, a device's queue notify when no ioeventfd took it.
            list.any(libc::SYS_read).any(libc::SYS_gettid);
            if shape.volumes {
                // Starting or resetting a virtio-fs device talks vhost-user (with fds) and
                // routes virtiofsd's call eventfds to the guest's interrupt (irqfd).
                list.any(libc::SYS_sendmsg)
                    .any(libc::SYS_recvmsg)
                    .ioctls(&[KVM_IRQFD(), KVM_SET_GSI_ROUTING()])?;
            }
            if shape.nets {
                // Starting a virtio-net device: the TAP's offloads follow the guest's features.
                list.ioctls(&[libc::TUNSETOFFLOAD])?;
            }
        }
        ThreadKind::Block => {
            list.any(libc::SYS_epoll_wait)
                .any(libc::SYS_epoll_pwait)
                // Queue notifies and the stop eventfd.
                .any(libc::SYS_read)
                // The image: requests, flushes, discard and write-zeroes.
                .any(libc::SYS_pread64)
                .any(libc::SYS_pwrite64)
                .any(libc::SYS_preadv)
                .any(libc::SYS_pwritev)
                .any(libc::SYS_fdatasync)
                .any(libc::SYS_fsync)
                .any(libc::SYS_fallocate)
                .ioctls(&interrupts)?;
        }
        ThreadKind::Net => {
            list.any(libc::SYS_epoll_wait)
                .any(libc::SYS_epoll_pwait)
                // Frames to and from the TAP; queue notifies.
                .any(libc::SYS_read)
                .any(libc::SYS_readv)
                .any(libc::SYS_writev)
                .ioctls(&interrupts)?;
        }
        ThreadKind::Vsock => {
            list.any(libc::SYS_epoll_wait)
                .any(libc::SYS_epoll_pwait)
                // Each connection's socket joins and leaves the device's epoll set.
                .any(libc::SYS_epoll_ctl)
                .any(libc::SYS_read)
                // Host connections come in on the listener; guest connections go out to
                // PATH_PORT.
                .any(libc::SYS_accept4)
                .when_arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?
                .any(libc::SYS_connect)
                .any(libc::SYS_getsockopt)
                .any(libc::SYS_recvfrom)
                .any(libc::SYS_sendto)
                .any(libc::SYS_readv)
                .any(libc::SYS_writev)
                .any(libc::SYS_shutdown)
                .when_arg_in(
                    libc::SYS_fcntl,
                    1,
                    &[libc::F_GETFL as u64, libc::F_SETFL as u64],
                )?
                .ioctls(&interrupts)?
                .ioctls(&[libc::FIONBIO])?;
        }
        ThreadKind::Fs => {
            list.any(libc::SYS_epoll_wait)
                .any(libc::SYS_epoll_pwait)
                // Kick and call eventfds; virtiofsd's socket (vhost-user, with fds) on reset.
                .any(libc::SYS_read)
                .any(libc::SYS_sendmsg)
                .any(libc::SYS_recvmsg)
                .any(libc::SYS_recvfrom)
                .any(libc::SYS_poll)
                .ioctls(&interrupts)?;
        }
        ThreadKind::ConsoleIn => {
            // Host stdin; the serial port's interrupt.
            list.any(libc::SYS_read)
                .any(libc::SYS_poll)
                .ioctls(&interrupts)?;
        }
        ThreadKind::ConsoleOut => {
            list.any(libc::SYS_writev).any(libc::SYS_poll);
        }
        ThreadKind::Api => {
            // Clients of the control socket.
            list.any(libc::SYS_accept4)
                .any(libc::SYS_read)
                .any(libc::SYS_recvfrom)
                .any(libc::SYS_sendto)
                .any(libc::SYS_poll)
                .any(libc::SYS_shutdown)
                .when_arg_in(libc::SYS_setsockopt, 1, &[libc::SOL_SOCKET as u64])?
                .when_arg_in(
                    libc::SYS_fcntl,
                    1,
                    &[libc::F_GETFL as u64, libc::F_SETFL as u64],
                )?
                .ioctls(&[libc::FIONBIO])?;
        }
        ThreadKind::Job => {
            agent_client(&mut list)?;
            // The agent's Ready comes in on the job socket's listener.
            list.any(libc::SYS_accept4);
            // Its stream threads.
            starts_threads(&mut list)?;
            // The warm-start cache: the staging directory renamed into place, old entries
            // evicted.
            files(&mut list);
            list.any(libc::SYS_getpid)
                // Raw mode for -it; the window size for -t.
                .ioctls(&[libc::TCGETS, libc::TIOCGWINSZ, libc::FIONBIO])?;
        }
        ThreadKind::JobStream => {
            // The agent's connection, stdin, stdout and stderr.
            list.any(libc::SYS_read)
                .any(libc::SYS_recvfrom)
                .any(libc::SYS_sendto)
                .any(libc::SYS_poll)
                .any(libc::SYS_ppoll)
                .any(libc::SYS_shutdown)
                .ioctls(&[libc::TIOCGWINSZ])?;
        }
        ThreadKind::AgentClient => {
            agent_client(&mut list)?;
        }
        ThreadKind::JailParent => {
            // The monitor: waited for, handed signals; then its cgroups and the jail's
            // directory removed.
            list.any(libc::SYS_wait4)
                .any(libc::SYS_kill)
                .any(libc::SYS_rmdir)
                // The sockets the monitor could not remove: one that nobody answers on goes.
                .any(libc::SYS_newfstatat)
                .any(libc::SYS_statx)
                .when_arg_in(libc::SYS_socket, 0, &[libc::AF_UNIX as u64])?
                .any(libc::SYS_connect)
                .any(libc::SYS_unlink);
        }
    }
    Ok(list)
}

/// SIGSYS (SECCOMP_RET_TRAP): one line, the terminal back, exit 159.
fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is fully initialised and `on_sigsys` only makes async-signal-safe calls
    // that every filter allows.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(SeccompError::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

extern "C" fn on_sigsys(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // The kernel fills in siginfo's SIGSYS fields: after si_signo, si_errno, si_code (and 4
    // bytes of padding) come the call's address (8 bytes) and its number (an int), at offset 24
    // (`struct { void *_call_addr; int _syscall; unsigned _arch; } _sigsys`).
    // SAFETY: with SA_SIGINFO, `info` points at the kernel's siginfo for this SIGSYS, which is
    // 128 bytes long; offset 24 holds an aligned int.
    let syscall = unsafe { std::ptr::read((info as *const u8).add(24).cast::<libc::c_int>()) };
    let mut line = LineBuf::default();
    line.push(b"ember: seccomp: thread '");
    let name = THREAD_NAME.with(Cell::get);
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(&name[..len]);
    line.push(b"' made system call ");
    line.push_number(i64::from(syscall));
    if i64::from(syscall) == libc::SYS_ioctl {
        // Which ioctl: the request is the call's second argument, in RSI at the trap.
        // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext.
        let request = unsafe {
            (*context.cast::<libc::ucontext_t>()).uc_mcontext.gregs[libc::REG_RSI as usize]
        };
        line.push(b" (ioctl request ");
        line.push_hex(request as u64);
        line.push(b")");
    }
    line.push(b", which its filter does not allow; ending (exit 159; --seccomp log lets it through and logs it)\n");
    // SAFETY: write(2) on stderr with a buffer of `line.len` initialised bytes.
    unsafe { libc::write(libc::STDERR_FILENO, line.bytes.as_ptr().cast(), line.len) };
    crate::terminal::restore_from_signal_handler();
    // SAFETY: _exit ends the process at once; nothing of Rust's state is used after it.
    unsafe { libc::_exit(EXIT_SECCOMP_VIOLATION) };
}

/// A line built without allocating (inside a signal handler).
struct LineBuf {
    bytes: [u8; 256],
    len: usize,
}

impl Default for LineBuf {
    fn default() -> Self {
        Self {
            bytes: [0; 256],
            len: 0,
        }
    }
}

impl LineBuf {
    fn push(&mut self, text: &[u8]) {
        let room = self.bytes.len() - self.len;
        let n = text.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&text[..n]);
        self.len += n;
    }

    fn push_number(&mut self, number: i64) {
        if number < 0 {
            self.push(b"-");
        }
        self.push_digits(number.unsigned_abs(), 10);
    }

    fn push_hex(&mut self, number: u64) {
        self.push(b"0x");
        self.push_digits(number, 16);
    }

    fn push_digits(&mut self, mut rest: u64, base: u64) {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b"0123456789abcdef"[(rest % base) as usize];
            rest /= base;
            if rest == 0 {
                break;
            }
        }
        self.push(&digits[at..]);
    }
}

/// The test-only trigger: with the `test-hooks` feature, `EMBER_TEST_SECCOMP_VIOLATION=NAME`
/// makes the thread named NAME make a call no filter allows right after confining itself.
mod test_hooks {
    #[cfg(feature = "test-hooks")]
    pub fn violate_if_asked() {
        let Ok(wanted) = std::env::var("EMBER_TEST_SECCOMP_VIOLATION") else {
            return;
        };
        if std::thread::current().name() == Some(wanted.as_str()) {
            // personality(2) with 0xffffffff only reads the persona; no thread may call it.
            // SAFETY: a query without side effects.
            unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) };
        }
    }

    #[cfg(not(feature = "test-hooks"))]
    pub fn violate_if_asked() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_every_shape() {
        for kind in ThreadKind::ALL {
            for (volumes, nets) in [(false, false), (true, true)] {
                let shape = VmShape { volumes, nets };
                let program = compile(kind, shape, SeccompAction::Trap).unwrap();
                assert!(!program.is_empty(), "{kind:?}");
            }
        }
    }

    #[test]
    fn threads_started_under_a_filter_can_confine_themselves() {
        // A thread starts under its creator's filter: the creator must allow what the new
        // thread's start and confinement call.
        for creator in [ThreadKind::Main, ThreadKind::Job] {
            let list = allow_list(creator, VmShape::default()).unwrap();
            for syscall in [
                libc::SYS_clone3,
                libc::SYS_set_robust_list,
                libc::SYS_rseq,
                libc::SYS_seccomp,
                libc::SYS_prctl,
                libc::SYS_sigaltstack,
            ] {
                assert!(list.0.contains_key(&syscall), "{creator:?}: {syscall}");
            }
        }
    }

    #[test]
    fn what_later_threads_need_is_in_their_creators_list() {
        // Stacked filters: a thread's calls pass only if its creator's list has them too.
        let pairs = [
            (ThreadKind::Main, ThreadKind::AgentClient),
            (ThreadKind::Job, ThreadKind::JobStream),
        ];
        for (creator, created) in pairs {
            let outer = allow_list(creator, VmShape::default()).unwrap();
            let inner = allow_list(created, VmShape::default()).unwrap();
            for syscall in inner.0.keys() {
                assert!(
                    outer.0.contains_key(syscall),
                    "{created:?} needs system call {syscall}, which {creator:?} does not allow"
                );
            }
        }
    }

    #[test]
    fn vcpus_cannot_open_files_or_make_sockets() {
        let list = allow_list(ThreadKind::Vcpu, VmShape::default()).unwrap();
        for syscall in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone3,
            libc::SYS_ptrace,
        ] {
            assert!(!list.0.contains_key(&syscall), "{syscall}");
        }
    }

    #[test]
    fn sigsys_line_numbers() {
        let mut line = LineBuf::default();
        line.push_number(0);
        line.push(b" ");
        line.push_number(135);
        line.push(b" ");
        line.push_number(-1);
        line.push(b" ");
        line.push_hex(0xae80);
        assert_eq!(&line.bytes[..line.len], b"0 135 -1 0xae80");
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values from linux/kvm.h on x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_SIGNAL_MSI(), 0x4020_aea5);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_aea4);
        assert_eq!(KVM_GET_MSRS(), 0xc008_ae88);
    }
}
