//! Building a microVM from a [`VmConfig`] and running it until it ends.
//!
//! [`Vm::build`] reads like the boot sequence: open KVM, create the VM and its interrupt
//! controller, map RAM, load the kernel, describe the machine to it, attach devices, create the
//! vCPUs. [`Vm::run`] starts them and waits for the first reason to stop.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_devices::acpi_sleep::{self, AcpiSleep};
use ember_devices::boot_timer::BootTimer;
use ember_devices::debug_exit::DebugExit;
use ember_devices::i8042::{self, I8042};
use ember_devices::ioapic::{self, Ioapic, IoapicPin};
use ember_devices::serial::{self, SerialConsole, SerialConsoleState};
use ember_devices::virtio::block::{Block, BlockError};
use ember_devices::virtio::fs::{Fs, FsDeviceConfig, FsError};
use ember_devices::virtio::net::{Net, NetError};
use ember_devices::virtio::vsock::{Vsock, VsockError};
use ember_devices::{Bus, BusError};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiListener, ApiReply, ApiRequest, ApiServer, PROMETHEUS_TEXT};
use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::cpuid::{self, CpuidTopology};
use crate::arch::x86_64::layout::{
    ACPI_SLEEP_PORT, ACPI_START, BOOT_TIMER_PORT, COM1_IRQ, COM1_PORT, DEBUG_EXIT_PORT, EBDA_START,
    GRACE_PERIOD_PROBE_ADDRESS, I8042_PORT, IOAPIC_START, XSTATE_SAVE_PORT,
};
use crate::arch::x86_64::memory::{self, MIN_RAM_BYTES};
use crate::arch::x86_64::regs::{self, EntryMode};
use crate::arch::x86_64::xstate::{XstateLayout, XstateSwitch};
use crate::arch::x86_64::{acpi, mptable};
use crate::config::{
    ConsoleConfig, NetConfig, SoftwareKvmMode, VmConfig, VsockConfig, MAX_CPUS, MIN_GUEST_CID,
};
use crate::console;
use crate::console_output::{ConsoleOutput, ConsoleRing};
use crate::device_manager::{DeviceKind, DeviceManager, VirtioError, VmWiring};
use crate::device_threads::DeviceThreads;
use crate::irqchip::{self, IrqfdRouter, KvmMsi};
use crate::job::gate::StartGate;
use crate::job::ready::ReadyError;
use crate::job::{JobOutcome, JobRunner, JobSpec, JobThread, PrivateDir};
use crate::kvm::{self, KvmError};
use crate::main_loop::{MainLoop, Wakeup};
use crate::outcome::{error_line, VmOutcome};
use crate::snapshot::{
    self,
    cache::{CacheEntry, Plan},
    file::{DiskIdentity, HostFacts, SavedDevice, SnapshotState},
};
use crate::terminal;
use crate::vcpu::{self, IoBuses, VcpuEvent, VcpuHandle, VmControl};
use crate::volumes::{VolumeError, Volumes};
use ember_devices::bus::lock;

/// Kernel command-line options that keep Linux away from what software KVM cannot emulate at
/// CPL0: XSAVE (noxsave) and, by feature bit, POPCNT (151), RDTSCP (59), SMAP (308),
/// INVPCID (298) and RDPID (534). This KVM ignores most CPUID masks, so Linux must be told.
/// Also ERMS (297) and FSRM (580): with them Linux copies and clears memory with `rep movsb` /
/// `rep stosb`, which the emulator steps one byte at a time; without, eight bytes at a time
/// (the effect on unpacking the initramfs is in the README, "Software KVM").
pub const SOFTWARE_KVM_CMDLINE: &str = "noxsave clearcpuid=151,59,308,298,534,297,580";

/// How Ember's guest kernel learns of the extended-state switch (see `arch::x86_64::xstate`):
/// with `noxsave` it cannot switch the AVX/AVX-512 registers its user space uses, so Ember does.
fn xstate_cmdline() -> String {
    format!("ember.xstate_port={XSTATE_SAVE_PORT:#x}")
}

/// `ember.net=eth0:ADDR/PREFIX:GATEWAY:MTU,…` for the network devices whose guest side Ember
/// configures (eth0 is the first device, whether configured or not).
fn guest_interfaces_cmdline(nets: &[NetConfig]) -> Option<String> {
    let interfaces: Vec<String> = nets
        .iter()
        .enumerate()
        .filter(|(_, net)| net.configures_guest())
        .map(|(index, net)| {
            ember_agent::interface::InterfaceConfig {
                name: format!("eth{index}"),
                address: net.address,
                gateway: net.gateway,
                mtu: net.mtu,
            }
            .to_string()
        })
        .collect();
    (!interfaces.is_empty()).then(|| format!("ember.net={}", interfaces.join(",")))
}

/// How the default guest's init starts `ember-agent`, told by `ember.agent=` on the kernel command
/// line (other kernels ignore it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    /// Beside the console (a VM with `--vsock`): `ember exec` can reach it.
    Background,
    /// Job mode: the agent is all the guest runs; the console shows no shell.
    Job,
}

impl AgentMode {
    fn cmdline(self) -> &'static str {
        match self {
            AgentMode::Background => "ember.agent=1",
            AgentMode::Job => "ember.agent=job",
        }
    }
}

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(
        "the warm-start snapshot {0} could not be resumed ({1}); removed it: run again to boot \
         cold (this run cannot, its threads are confined by seccomp already)"
    )]
    WarmStartFailed(PathBuf, String),
    #[error(transparent)]
    Jail(#[from] crate::sandbox::jail::JailError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("--cpus must be at least 1")]
    NoCpus,
    #[error("--cpus {requested} is more than this host's KVM supports ({max})")]
    TooManyCpus { requested: u8, max: usize },
    #[error(
        "--memory {requested_mib} MiB is more than the host's {host_mib} MiB of RAM; ask for less"
    )]
    MemoryTooLarge { requested_mib: u64, host_mib: u64 },
    #[error("--memory must be at least {} MiB", MIN_RAM_BYTES >> 20)]
    MemoryTooSmall,
    #[error("cannot map {mib} MiB of guest memory; ask for less --memory")]
    MapMemory {
        mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory with KVM")]
    RegisterMemory(#[source] kvm_ioctls::Error),
    #[error("cannot set up the interrupt controllers")]
    Irqchip(#[source] kvm_ioctls::Error),
    #[error("cannot open kernel {path}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("kernel {path}")]
    Kernel {
        path: PathBuf,
        #[source]
        source: BootError,
    },
    #[error("cannot open initrd {path}")]
    OpenInitrd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initrd {path}")]
    Initrd {
        path: PathBuf,
        #[source]
        source: BootError,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot write firmware tables to guest memory")]
    FirmwareTables(#[source] GuestMemoryError),
    #[error("cannot build ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    #[error("cannot set up vCPU {cpu}")]
    Vcpu {
        cpu: u8,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot attach devices")]
    Bus(#[from] BusError),
    #[error("cannot attach a disk")]
    Disk(#[source] BlockError),
    #[error("cannot attach a network device")]
    Net(#[source] NetError),
    #[error("cannot attach the vsock device")]
    Vsock(#[source] VsockError),
    #[error(transparent)]
    Volumes(#[from] VolumeError),
    #[error("--volume {dir}: cannot reach its virtiofsd")]
    Volume {
        dir: PathBuf,
        #[source]
        source: FsError,
    },
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
    #[error("cannot create the shared memory file guest RAM needs with --volume")]
    SharedMemory(#[source] io::Error),
    #[error("cannot make a private directory for the job's vsock socket")]
    JobSocket(#[source] io::Error),
    #[error(transparent)]
    Job(#[from] ReadyError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
    #[error("cannot wire a device interrupt")]
    Irq(#[source] io::Error),
    #[error("cannot open the console output")]
    ConsoleOutput(#[source] io::Error),
    #[error("cannot set up the event loop")]
    EventLoop(#[source] io::Error),
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
}

/// A VM ready to run.
pub struct Vm {
    /// Kept open for the VM's lifetime: the vCPU and device file descriptors belong to it (the
    /// IOAPIC holds it too, to send its interrupts).
    vm_fd: Arc<VmFd>,
    /// Must outlive the vCPUs: KVM maps guest RAM from these host mappings.
    guest_memory: GuestMemoryMmap,
    /// The control socket, bound; served once the VM runs.
    api: Option<ApiListener>,
    vcpus: Vec<VcpuFd>,
    /// What the extended-state switch carries, when the guest is offered one (software KVM).
    xstate: Option<XstateLayout>,
    buses: Arc<IoBuses>,
    serial: Arc<Mutex<SerialConsole>>,
    serial_fifo_drained: EventFd,
    console: ConsoleConfig,
    console_output: Option<ConsoleOutput>,
    /// Job mode's console, kept aside.
    console_ring: Option<ConsoleRing>,
    devices: DeviceManager,
    /// The volumes' virtiofsd daemons, stopped when the VM is gone.
    volumes: Option<Volumes>,
    /// What the user asked for, for the control socket's `GET /vm`.
    config: VmConfig,
    /// Kept for snapshots: the IOAPIC's state is the VM's.
    ioapic: Arc<Mutex<Ioapic>>,
    /// Whether KVM is the software one (a snapshot records it).
    software_kvm: bool,
}

impl Vm {
    /// Builds the VM `config` describes, up to the point where its vCPUs could run.
    /// `started` is when ember started: the boot timer measures from it.
    /// `agent` says how the default guest's init starts its agent (with a vsock device).
    /// With `restore`, the VM resumes that snapshot instead of booting: RAM is its memory file,
    /// and the vCPUs, the IOAPIC, COM1 and the virtio devices take its state.
    pub fn build(
        config: &VmConfig,
        started: Instant,
        agent: Option<AgentMode>,
        restore: Option<&Restore>,
    ) -> Result<Self, VmmError> {
        let kvm = kvm::open()?;
        check_resources(&kvm, config)?;
        let software_kvm = software_kvm_workarounds(config.software_kvm);
        if software_kvm {
            log::info!(
                "software KVM (kvm_pvm): hiding CX16 and the PV_UNHALT/PV_SEND_IPI/PV_SCHED_YIELD \
                 hypercall features, appending '{SOFTWARE_KVM_CMDLINE}' to the kernel command line"
            );
        }

        let vm_fd = Arc::new(kvm.create_vm().map_err(KvmError::CreateVm)?);
        // Guest RAM is registered before any device reaches KVM's I/O buses: a memory slot waits
        // for any SRCU grace period such a registration left in flight (README, "Start-up").
        // virtiofsd must map guest RAM too: with volumes it is a shared memfd.
        let guest_memory = match restore {
            Some(restore) => restore.map_memory(config)?,
            None => map_guest_memory(config.memory_bytes, !config.volumes.is_empty())?,
        };
        let volumes = if config.volumes.is_empty() {
            None
        } else {
            Some(Volumes::start(&config.volumes)?)
        };
        register_guest_memory(&vm_fd, &guest_memory)?;
        irqchip::create(&vm_fd).map_err(VmmError::Irqchip)?;
        let msi = Box::new(KvmMsi(vm_fd.clone()));
        let ioapic = Arc::new(Mutex::new(match restore {
            Some(restore) => Ioapic::from_state(&restore.state.ioapic, msi)
                .map_err(|e| VmmError::Restore(format!("its IOAPIC: {e}")))?,
            None => Ioapic::new(msi),
        }));
        // A restored guest is past its boot: nothing is loaded into its RAM.
        let boot = match restore {
            Some(_) => None,
            None => Some(load_kernel_and_initrd(&guest_memory, config)?),
        };

        let supported_cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmmError::Vcpu { cpu: 0, source })?;
        // A restored VM gets its vCPUs, in their saved state, before its devices: a device built
        // from its state raises the interrupts the guest had not taken yet, and those need the
        // local APICs to be there, and restored, to land in.
        let restored_vcpus = match restore {
            Some(restore) => {
                let vcpus = create_vcpus(
                    &vm_fd,
                    &guest_memory,
                    &supported_cpuid,
                    config.cpus,
                    software_kvm,
                    None,
                )?;
                restore.restore_vcpus_and_clock(&vm_fd, &vcpus)?;
                Some(vcpus)
            }
            None => None,
        };
        // On hardware KVM the guest kernel has XSAVE and switches every register itself.
        let xstate = software_kvm
            .then(|| XstateLayout::from_cpuid(supported_cpuid.as_slice()))
            .filter(XstateLayout::has_extended_state);
        let mut extra: Vec<String> = Vec::new();
        if software_kvm {
            extra.push(SOFTWARE_KVM_CMDLINE.to_string());
        }
        if let Some(layout) = &xstate {
            log::info!(
                "software KVM: Ember switches the guest's extended state (XSAVE features {:#x})",
                layout.features
            );
            extra.push(xstate_cmdline());
        }
        if let Some(agent) = agent {
            extra.push(agent.cmdline().to_string());
        }
        if let Some(volumes) = volumes.as_ref().and_then(Volumes::cmdline) {
            extra.push(volumes);
        }
        if let Some(interfaces) = guest_interfaces_cmdline(&config.nets) {
            extra.push(interfaces);
        }
        if let Some(name) = &config.hostname {
            extra.push(format!("ember.hostname={name}"));
        }
        let mut cmdline = boot::build_cmdline(&config.cmdline, &extra)?;
        let mut mmio = Bus::new();
        mmio.insert(ioapic.clone(), IOAPIC_START, ioapic::MMIO_LEN)?;
        let devices = attach_virtio_devices(
            config,
            volumes.as_ref(),
            &mut VmWiring {
                vm_fd: &vm_fd,
                ioapic: &ioapic,
                guest_memory: &guest_memory,
                mmio: &mut mmio,
                cmdline: &mut cmdline,
                saved_devices: restore.map(|r| &r.state.devices[..]),
            },
        )?;
        log::info!(
            "cmdline: {}",
            cmdline
                .as_cstring()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_default()
        );

        let entry = match boot {
            Some((kernel, initrd)) => {
                let memory_map = memory::memory_map(&memory::ram_regions(config.memory_bytes));
                let entry =
                    boot::write_boot_info(&guest_memory, &kernel, &cmdline, initrd, &memory_map)?;
                write_firmware_tables(&guest_memory, config.cpus)?;
                Some(entry)
            }
            None => None,
        };

        // Opened before a jail closes (see sandbox::jail): the console's file, the control
        // socket. Every other thing the VM needs is open by now, and no thread runs yet.
        let console_target =
            ConsoleOutput::open(&config.console).map_err(VmmError::ConsoleOutput)?;
        // A bad path is one line and nothing started.
        let api = config
            .api_socket
            .as_deref()
            .map(ApiServer::bind)
            .transpose()?;
        // A console file grows without bound: no file-size limit then. Worked out (a stat per
        // disk) only when there is a jail to close.
        let largest_file = || match config.console {
            ConsoleConfig::File(_) => None,
            _ => Some(largest_disk(config)),
        };
        crate::sandbox::jail::lock_down_if_armed(!config.nets.is_empty(), largest_file)?;
        let console = console_target.start().map_err(VmmError::ConsoleOutput)?;
        let (pio, serial, serial_fifo_drained) = legacy_devices(
            &ioapic,
            console.writer,
            started,
            restore.map(|r| &r.state.serial),
        )?;
        let buses = Arc::new(IoBuses { pio, mmio });
        let vcpus = match restored_vcpus {
            Some(vcpus) => vcpus,
            None => create_vcpus(
                &vm_fd,
                &guest_memory,
                &supported_cpuid,
                config.cpus,
                software_kvm,
                entry,
            )?,
        };

        Ok(Vm {
            vm_fd,
            guest_memory,
            api,
            vcpus,
            xstate,
            buses,
            serial,
            serial_fifo_drained,
            console: config.console.clone(),
            console_output: console.output,
            console_ring: console.ring,
            devices,
            volumes,
            config: config.clone(),
            ioapic,
            software_kvm,
        })
    }

    /// Runs the VM until the guest stops it, a vCPU fails, a signal arrives or, with `job`, the
    /// job's command ends. Every vCPU thread has been joined and the terminal restored when this
    /// returns.
    pub fn run(mut self, mut job: Option<JobRunner>) -> Result<VmOutcome, VmmError> {
        let control = Arc::new(VmControl::new().map_err(VmmError::EventLoop)?);
        // Before any thread starts: see MainLoop::new.
        let mut main_loop =
            MainLoop::new(control.stop_event.as_raw_fd()).map_err(VmmError::EventLoop)?;
        vcpu::install_kick_handler()
            .map_err(|e| VmmError::EventLoop(io::Error::from_raw_os_error(e.errno())))?;
        let vm_fd = self.vm_fd.clone();
        let console_ring = self.console_ring.clone();
        let job_mode = job.is_some();
        // A volume's daemon dying is a reason to stop: the guest's mounts would hang.
        let backend_exits = match &self.volumes {
            Some(volumes) => volumes.exit_fds().map_err(VmmError::EventLoop)?,
            None => Vec::new(),
        };
        for fd in &backend_exits {
            main_loop
                .watch(fd.as_raw_fd(), Wakeup::BackendExited)
                .map_err(VmmError::EventLoop)?;
        }
        let api = match self.api.take() {
            Some(bound) => Some(ApiServer::serve(bound)?),
            None => None,
        };
        if let Some(api) = &api {
            main_loop
                .watch(api.wake.as_raw_fd(), Wakeup::Api)
                .map_err(VmmError::EventLoop)?;
        }
        let mut snapshot_requests = job.as_mut().and_then(JobRunner::take_snapshot_requests);
        if let Some(requests) = &snapshot_requests {
            main_loop
                .watch(requests.wake.as_raw_fd(), Wakeup::SnapshotRequested)
                .map_err(VmmError::EventLoop)?;
        }
        let config = self.config.clone();
        let mut running = self.start(&control)?;
        let running_since = Instant::now();
        if let Some(job) = job {
            let spawned = control
                .stop_event
                .try_clone()
                .and_then(|stopped| job.spawn(control.clone(), stopped));
            match spawned {
                Ok(thread) => running.job = Some(thread),
                Err(e) => control.request_stop(VmOutcome::Job(JobOutcome::Failed(format!(
                    "cannot start the job thread: {e}"
                )))),
            }
        }

        // Only the virtio devices' ioeventfds leave grace periods in flight (the split irqchip
        // leaves none): without them, settling would start one of its own.
        if !running.devices.is_empty() {
            settle_grace_periods(&vm_fd);
        }
        // Last: every thread that builds or starts something has done it; from here on this
        // thread answers the guest's devices, the control socket and the job.
        crate::sandbox::seccomp::confine_or_exit(crate::sandbox::seccomp::ThreadKind::Main);
        while !control.is_stopping() {
            let wakeups = match main_loop.wait() {
                Ok(wakeups) => wakeups,
                Err(e) => {
                    control.request_stop(VmOutcome::MonitorFailed {
                        cpu: 0,
                        what: format!("event loop failed: {e}"),
                    });
                    break;
                }
            };
            for wakeup in wakeups {
                match wakeup {
                    // The loop condition sees it.
                    Wakeup::StopRequested => {}
                    Wakeup::BackendExited => {
                        let dir = running
                            ._volumes
                            .as_mut()
                            .and_then(Volumes::exited)
                            .map_or_else(String::new, |dir| format!(" for {}", dir.display()));
                        control.request_stop(VmOutcome::BackendFailed(format!(
                            "virtiofsd{dir} exited while the VM ran (its volume is gone)"
                        )));
                    }
                    Wakeup::Api => {
                        let Some(api) = &api else { continue };
                        let _ = api.wake.read();
                        while let Ok(call) = api.calls.try_recv() {
                            let reply =
                                running.answer(&call.request, &control, &config, running_since);
                            // A client that gave up is not an error.
                            let _ = call.reply.send(reply);
                        }
                    }
                    Wakeup::SnapshotRequested => {
                        let Some(requests) = &snapshot_requests else {
                            continue;
                        };
                        let _ = requests.wake.read();
                        while let Ok(request) = requests.requests.try_recv() {
                            let saved = running
                                .snapshot(&request.dir, &config)
                                .map(|_| ())
                                .map_err(|(_, why)| why);
                            // The job thread waits for this answer.
                            let _ = request.reply.send(saved);
                        }
                    }
                    Wakeup::Signal => {
                        while let Some(signal) = main_loop.read_signal() {
                            // A job's command gets the signal first; it ending stops the VM.
                            let forwarded = running
                                .job
                                .as_ref()
                                .is_some_and(|job| job.on_signal(signal));
                            if !forwarded && signal != libc::SIGWINCH {
                                control.request_stop(VmOutcome::Signal(signal));
                            }
                        }
                    }
                }
            }
        }

        // Before the job thread is joined: a request it is waiting on is answered (as refused)
        // by the channel closing.
        snapshot_requests.take();
        running.stop();
        drop(api);
        let outcome = control.take_outcome().unwrap_or(VmOutcome::MonitorFailed {
            cpu: 0,
            what: "stopped without a reason".into(),
        });
        Ok(match outcome {
            VmOutcome::Job(_) => outcome,
            // The VM ended before its command did: say why, with the console that was kept
            // aside, so that a broken guest is still diagnosable.
            // A signal before the command ran ends Ember as it always does (128+N).
            other @ VmOutcome::Signal(_) => other,
            // Not the guest's doing: its console has nothing to say about it.
            other @ VmOutcome::BackendFailed(_) => other,
            other if job_mode => {
                if let Some(ring) = console_ring {
                    let mut stderr = io::stderr().lock();
                    let _ = stderr.write_all(b"ember: the guest's console:\n");
                    let _ = stderr.write_all(&ring.contents());
                    let _ = stderr.write_all(b"\n");
                }
                VmOutcome::Job(JobOutcome::Failed(format!(
                    "the VM ended before the command did: {other}"
                )))
            }
            other => other,
        })
    }

    /// Starts the threads: device loop, vCPUs, console input. A thread that cannot start stops
    /// the VM through `control`; what did start is returned, to be stopped.
    fn start(self, control: &Arc<VmControl>) -> Result<RunningVm, VmmError> {
        let interactive =
            self.console == ConsoleConfig::Stdio && terminal::is_tty(libc::STDIN_FILENO);
        if interactive {
            if let Err(e) = terminal::enter_raw_mode() {
                log::warn!("cannot put the terminal in raw mode: {e}");
            }
        }

        let device_threads = DeviceThreads::spawn(&self.devices)?;

        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.into_iter().enumerate() {
            let xstate = self
                .xstate
                .map(|layout| XstateSwitch::new(layout, self.guest_memory.clone()));
            match VcpuHandle::spawn(
                index as u8,
                vcpu,
                self.buses.clone(),
                xstate,
                control.clone(),
            ) {
                Ok(handle) => vcpus.push(handle),
                Err(e) => {
                    control.request_stop(VmOutcome::MonitorFailed {
                        cpu: index as u8,
                        what: format!("cannot start its thread: {e}"),
                    });
                    break;
                }
            }
        }

        // The console's input thread after the vCPUs: the guest's first instructions need not wait
        // for it, and input written before it runs stays in the pipe or terminal until it does.
        if self.console == ConsoleConfig::Stdio {
            if let Err(e) = console::spawn_input_thread(
                self.serial.clone(),
                self.serial_fifo_drained,
                control.clone(),
                interactive,
            ) {
                control.request_stop(VmOutcome::MonitorFailed {
                    cpu: 0,
                    what: format!("cannot start the console input thread: {e}"),
                });
            }
        }
        Ok(RunningVm {
            job: None,
            paused: false,
            vm_fd: self.vm_fd,
            ioapic: self.ioapic,
            serial: self.serial,
            software_kvm: self.software_kvm,
            vcpus,
            device_threads,
            devices: self.devices,
            _volumes: self.volumes,
            console_output: self.console_output,
            guest_memory: self.guest_memory,
        })
    }
}

/// How long, at exit, the console's host output may take no bytes before the rest of the guest's
/// output is given up: a reader that keeps reading gets everything.
const CONSOLE_PATIENCE: Duration = Duration::from_millis(500);

/// The threads of a running VM.
struct RunningVm {
    job: Option<JobThread>,
    /// Paused through the control socket.
    paused: bool,
    /// For snapshots: the VM clock.
    vm_fd: Arc<VmFd>,
    /// For snapshots.
    ioapic: Arc<Mutex<Ioapic>>,
    /// For snapshots.
    serial: Arc<Mutex<SerialConsole>>,
    software_kvm: bool,
    vcpus: Vec<VcpuHandle>,
    device_threads: DeviceThreads,
    /// The devices stay attached (their transports on the MMIO bus) until the VM is gone.
    devices: DeviceManager,
    /// Dropped after the devices' threads: virtiofsd ends with the VM.
    _volumes: Option<Volumes>,
    console_output: Option<ConsoleOutput>,
    /// Must outlive the vCPUs: KVM maps guest RAM from these host mappings.
    guest_memory: GuestMemoryMmap,
}

/// Starts a graceful shutdown: a thread asks the guest agent behind `vsock_socket` to power the
/// guest off, and ends the VM itself if the guest is not off after `grace` (or could not be
/// asked). False when no thread could start (the caller ends the VM).
fn shut_down_gracefully(vsock_socket: &Path, grace: Duration, control: Arc<VmControl>) -> bool {
    let socket = vsock_socket.to_owned();
    let spawned = std::thread::Builder::new()
        .name("shutdown".into())
        .spawn(move || {
            crate::sandbox::seccomp::confine_or_exit(
                crate::sandbox::seccomp::ThreadKind::AgentClient,
            );
            let deadline = Instant::now() + grace;
            match crate::job::ask_guest_to_power_off(&socket) {
                Ok(()) => log::info!("API: asked the guest to power off; waiting {grace:?}"),
                Err(e) => {
                    log::warn!("graceful shutdown: {e}; ending the VM");
                    control.request_stop(VmOutcome::ShutdownRequested);
                    return;
                }
            }
            while !control.is_stopping() {
                if Instant::now() >= deadline {
                    log::warn!("the guest was not off after {grace:?}: ending the VM");
                    control.request_stop(VmOutcome::ShutdownRequested);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    match spawned {
        Ok(_) => true,
        Err(e) => {
            log::warn!("graceful shutdown: no thread ({e}); ending the VM");
            false
        }
    }
}

/// What a snapshot cost.
struct SnapshotReport {
    /// How long the vCPUs stood still.
    paused_for: Duration,
    /// Guest RAM bytes written (the rest are holes).
    memory_bytes_written: u64,
}

/// A snapshot step that failed on Ember's side: HTTP 500 and what failed.
fn internal(what: &str, e: impl std::fmt::Display) -> (u16, String) {
    (500, format!("{what}: {e}"))
}

/// How long the control socket's pause and resume wait for each vCPU.
const VCPU_ANSWER: Duration = Duration::from_secs(5);

impl RunningVm {
    /// Answers a control-socket request (on the main thread, which owns the vCPUs).
    fn answer(
        &mut self,
        request: &ApiRequest,
        control: &Arc<VmControl>,
        config: &VmConfig,
        running_since: Instant,
    ) -> ApiReply {
        match request {
            ApiRequest::Info => ApiReply::json(&serde_json::json!({
                "state": self.state_name(),
                "uptime_seconds": running_since.elapsed().as_secs_f64(),
                "ember_version": env!("CARGO_PKG_VERSION"),
                "config": config,
                "devices": self.devices.devices().iter().map(|d| serde_json::json!({
                    "id": d.slot.id,
                    "kind": d.slot.kind.name(),
                    "mmio_base": d.slot.mmio_base,
                    "irq": d.slot.irq,
                    "counters": lock(&d.transport)
                        .device_counters()
                        .into_iter()
                        .map(|(name, count)| (name.to_string(), count.into()))
                        .collect::<serde_json::Map<String, serde_json::Value>>(),
                })).collect::<Vec<_>>(),
            })),
            ApiRequest::Pause | ApiRequest::Resume => {
                let pause = *request == ApiRequest::Pause;
                if self.paused != pause {
                    let started = Instant::now();
                    if let Err(e) = self.set_vcpus_paused(pause) {
                        return ApiReply::error(500, e);
                    }
                    self.paused = pause;
                    log::info!(
                        "API: {} in {:?}",
                        if pause { "paused" } else { "resumed" },
                        started.elapsed()
                    );
                }
                ApiReply::json(&serde_json::json!({ "state": self.state_name() }))
            }
            ApiRequest::Snapshot(dir) => match self.snapshot(dir, config) {
                Ok(report) => ApiReply::json(&serde_json::json!({
                    "dir": dir,
                    "pause_ms": report.paused_for.as_secs_f64() * 1e3,
                    "memory_bytes_written": report.memory_bytes_written,
                })),
                Err((status, why)) => ApiReply::error(status, why),
            },
            ApiRequest::Shutdown { grace } => {
                // The guest is asked through its agent when it may have one (a vsock device);
                // without, or with no grace, the VM ends now.
                let graceful = match &config.vsock {
                    Some(vsock) if !grace.is_zero() => {
                        shut_down_gracefully(&vsock.socket, *grace, control.clone())
                    }
                    _ => false,
                };
                if !graceful {
                    control.request_stop(VmOutcome::ShutdownRequested);
                }
                ApiReply::json(&serde_json::json!({
                    "state": "stopping",
                    "graceful": graceful,
                }))
            }
            ApiRequest::Metrics => {
                let mut text = String::from(
                    "# HELP ember_vcpu_exits_total VM exits to ember, by reason.\n\
                     # TYPE ember_vcpu_exits_total counter\n",
                );
                for (reason, count) in control.exits.snapshot() {
                    text.push_str(&format!(
                        "ember_vcpu_exits_total{{reason=\"{reason}\"}} {count}\n"
                    ));
                }
                // One family per counter name, every device's sample in it.
                let mut families: std::collections::BTreeMap<&str, String> = Default::default();
                for attached in self.devices.devices() {
                    for (name, count) in lock(&attached.transport).device_counters() {
                        families.entry(name).or_default().push_str(&format!(
                            "ember_device_{name}_total{{device=\"{}\",kind=\"{}\"}} {count}\n",
                            attached.slot.id,
                            attached.slot.kind.name()
                        ));
                    }
                }
                for (name, samples) in families {
                    text.push_str(&format!(
                        "# TYPE ember_device_{name}_total counter\n{samples}"
                    ));
                }
                text.push_str(&format!(
                    "# HELP ember_uptime_seconds Time since the vCPUs started.\n\
                     # TYPE ember_uptime_seconds gauge\nember_uptime_seconds {}\n\
                     # HELP ember_vm_paused Whether the vCPUs are paused.\n\
                     # TYPE ember_vm_paused gauge\nember_vm_paused {}\n",
                    running_since.elapsed().as_secs_f64(),
                    u8::from(self.paused)
                ));
                ApiReply {
                    status: 200,
                    content_type: PROMETHEUS_TEXT,
                    body: text.into_bytes(),
                }
            }
        }
    }

    /// Pauses (or resumes) every vCPU; on a failure, puts back the ones already done.
    fn set_vcpus_paused(&self, pause: bool) -> Result<(), String> {
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let done = if pause {
                vcpu.pause(VCPU_ANSWER)
            } else {
                vcpu.resume(VCPU_ANSWER)
            };
            if let Err(e) = done {
                // One that timed out may still act on the request later: the opposite one,
                // sent after it, wins then. Not waited for: it did not answer the first.
                let _ = vcpu.send(if pause {
                    VcpuEvent::Resume
                } else {
                    VcpuEvent::Pause
                });
                for vcpu in &self.vcpus[..index] {
                    let _ = if pause {
                        vcpu.resume(VCPU_ANSWER)
                    } else {
                        vcpu.pause(VCPU_ANSWER)
                    };
                }
                return Err(format!("vCPU {index}: {e}"));
            }
        }
        Ok(())
    }

    /// Pauses the VM (if it runs), saves it into `dir`, and lets it go on: `PUT /vm/snapshot`,
    /// and job mode's warm-start snapshot. An error is an HTTP status and why.
    fn snapshot(&mut self, dir: &Path, config: &VmConfig) -> Result<SnapshotReport, (u16, String)> {
        // virtiofsd maps guest RAM itself and holds the guest's FUSE state: neither can be in a
        // snapshot, even before the guest mounts the volume.
        if !config.volumes.is_empty() {
            return Err((409, "a VM with volumes cannot be snapshotted".into()));
        }
        let started = Instant::now();
        let was_running = !self.paused;
        if was_running {
            self.set_vcpus_paused(true).map_err(|e| (500, e))?;
        }
        let saved = self.save_into(dir, config);
        let paused_for = started.elapsed();
        if was_running {
            if let Err(e) = self.set_vcpus_paused(false) {
                // They are paused again (see set_vcpus_paused): say so, for a resume to retry.
                log::error!("after the snapshot: {e}");
                self.paused = true;
            }
        }
        let written = saved?;
        log::info!(
            "snapshot in {} (the VM paused {paused_for:?}, {written} bytes of RAM written)",
            dir.display()
        );
        Ok(SnapshotReport {
            paused_for,
            memory_bytes_written: written,
        })
    }

    /// Saves devices, vCPUs, clock, IOAPIC and RAM into `dir` (vCPUs paused). The devices sleep
    /// until RAM is written (a device thread could write guest RAM meanwhile) and wake after.
    /// Returns the RAM bytes written, or the status and reason of a refusal.
    fn save_into(&self, dir: &Path, config: &VmConfig) -> Result<u64, (u16, String)> {
        let mut devices = Vec::new();
        let mut outcome = Ok(());
        for attached in self.devices.devices() {
            match lock(&attached.transport).pause_and_save() {
                Ok(state) => devices.push(SavedDevice {
                    id: attached.slot.id.clone(),
                    state,
                }),
                Err(e) => {
                    // A device that cannot sleep (vsock, virtio-fs while active) refuses the
                    // snapshot; the VM goes on as before.
                    outcome = Err((409, format!("{}: {e}", attached.slot.id)));
                    break;
                }
            }
        }
        let written = outcome.and_then(|()| self.save_vcpus_and_ram(dir, config, devices));
        if written.is_err() {
            // What a failed snapshot wrote is of no use (and the memory file may be large).
            let _ = std::fs::remove_file(dir.join("memory.partial"));
            let _ = std::fs::remove_file(dir.join("state.partial"));
        }
        for attached in self.devices.devices() {
            if let Err(e) = lock(&attached.transport).resume() {
                log::error!("{} after the snapshot: {e}", attached.slot.id);
            }
        }
        written
    }

    fn save_vcpus_and_ram(
        &self,
        dir: &Path,
        config: &VmConfig,
        devices: Vec<SavedDevice>,
    ) -> Result<u64, (u16, String)> {
        let disks = config
            .disks
            .iter()
            .map(|disk| DiskIdentity::of(&disk.path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| internal("a disk's identity", e))?;
        let kvm = kvm_ioctls::Kvm::new().map_err(|e| internal("opening /dev/kvm", e))?;
        let list = kvm
            .get_msr_index_list()
            .map_err(|e| internal("KVM_GET_MSR_INDEX_LIST", e))?;
        let msrs: Arc<[u32]> = snapshot::vcpu_state::msrs_to_save(list.as_slice()).into();
        // The interrupt sources before the vCPUs: an interrupt COM1 raises in between (console
        // input keeps coming) then lands in a saved local APIC, at worst a spurious one after the
        // restore, instead of being in the saved FIFO with no interrupt to say so.
        let ioapic = lock(&self.ioapic).save();
        let serial = lock(&self.serial).save();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for (index, vcpu) in self.vcpus.iter().enumerate() {
            let state = vcpu
                .save_state(msrs.clone(), VCPU_ANSWER)
                .map_err(|e| internal(&format!("vCPU {index}"), e))?;
            vcpus.push(state);
        }
        let clock = self
            .vm_fd
            .get_clock()
            .map_err(|e| internal("KVM_GET_CLOCK", e))?;
        std::fs::create_dir_all(dir).map_err(|e| internal(&dir.display().to_string(), e))?;
        // Written under temporary names and renamed: a directory never holds half a snapshot
        // under the final names.
        let memory_path = dir.join("memory.partial");
        let memory_file =
            std::fs::File::create(&memory_path).map_err(|e| internal("the memory file", e))?;
        let memory = snapshot::memory::write_sparse(&self.guest_memory, &memory_file)
            .map_err(|e| internal("the memory file", e))?;
        let state = SnapshotState {
            host: HostFacts::current(self.software_kvm),
            config: config.clone(),
            vcpus,
            clock,
            ioapic,
            serial,
            devices,
            memory: memory.regions,
            disks,
        };
        let state_path = dir.join("state.partial");
        snapshot::file::write(&state_path, &state).map_err(|e| internal("the state file", e))?;
        // An older snapshot's state goes first: its memory must never stand beside a new state,
        // nor its state beside new memory. The state file is renamed last: it is what makes the
        // directory a snapshot.
        let replaced = match std::fs::remove_file(dir.join("state")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
        replaced
            .and_then(|()| std::fs::rename(&memory_path, dir.join("memory")))
            .and_then(|()| std::fs::rename(&state_path, dir.join("state")))
            .and_then(|()| std::fs::File::open(dir)?.sync_all())
            .map_err(|e| internal("putting the snapshot's files in place", e))?;
        Ok(memory.written)
    }

    fn state_name(&self) -> &'static str {
        if self.paused {
            "paused"
        } else {
            "running"
        }
    }

    /// Finishes every vCPU, then the devices (which flush their data), then restores the
    /// terminal.
    fn stop(self) {
        if let Some(job) = self.job {
            job.stop();
        }
        // A vCPU waiting for room in the console buffer must not wait any more to be joined.
        if let Some(output) = &self.console_output {
            output.stop_waiting();
        }
        for vcpu in &self.vcpus {
            // A vCPU already gone has nothing to be told.
            let _ = vcpu.send(VcpuEvent::Finish);
        }
        for vcpu in self.vcpus {
            vcpu.finish();
        }
        // After the vCPUs: nothing can queue new work now, and every device flushes its data.
        self.device_threads.stop();
        if let Some(output) = self.console_output {
            output.finish(CONSOLE_PATIENCE);
        }
        terminal::restore();
    }
}

/// Waits, while the guest runs, for the SRCU grace periods that setting up the VM left in flight.
///
/// On recent host kernels, putting a device on one of KVM's I/O buses (each virtio queue's
/// ioeventfd) frees the old bus after a grace period instead of waiting for one. Nothing waits
/// for those grace periods while the VM runs, but destroying the VM does: a guest that ends soon
/// after start-up made ember's exit wait in the final close of the VM (README, "Start-up").
/// Taking a device off a bus waits for an expedited grace period, which also ends the ones in
/// flight. So the main thread, idle once the vCPUs run, adds and removes an ioeventfd
/// at an address with nothing behind it; by the time the guest stops, nothing is left to wait for.
/// Elsewhere this costs one quick grace period of the otherwise idle main thread. Meanwhile a stop
/// request or signal waits for the main thread: at most that grace period.
fn settle_grace_periods(vm_fd: &VmFd) {
    let probe = IoEventAddress::Mmio(GRACE_PERIOD_PROBE_ADDRESS);
    let settled = EventFd::new(libc::EFD_NONBLOCK).and_then(|event| {
        vm_fd.register_ioevent(&event, &probe, NoDatamatch)?;
        vm_fd.unregister_ioevent(&event, &probe, NoDatamatch)?;
        Ok(())
    });
    if let Err(e) = settled {
        log::debug!("cannot settle KVM's grace periods early (the VM's teardown may wait): {e}");
    }
}

/// Builds and runs the VM `config` describes; `started` is when ember started (see
/// [`Vm::build`]).
pub fn run(config: &VmConfig, started: Instant) -> Result<VmOutcome, VmmError> {
    let agent = config.vsock.as_ref().map(|_| AgentMode::Background);
    let vm = Vm::build(config, started, agent, None);
    // Building may have put nothing on the terminal, but restore anyway on every error path.
    let outcome = vm.and_then(|vm| vm.run(None));
    terminal::restore();
    outcome
}

/// Whether the software-KVM workarounds apply under `mode`: one answer for booting a VM and for
/// checking a snapshot against this host.
fn software_kvm_workarounds(mode: SoftwareKvmMode) -> bool {
    match mode {
        SoftwareKvmMode::Auto => kvm::is_software_kvm(),
        SoftwareKvmMode::On => true,
        SoftwareKvmMode::Off => false,
    }
}

/// A snapshot to resume: its checked state and the directory its memory file is in.
pub struct Restore {
    /// The state file's contents.
    pub state: SnapshotState,
    /// The snapshot directory.
    pub dir: PathBuf,
}

impl Restore {
    /// Reads the snapshot in `dir`, checked against this host.
    pub fn open(dir: &Path) -> Result<Self, VmmError> {
        let state = snapshot::file::read_unchecked(&dir.join("state"))
            .and_then(|state| {
                // The facts this run would record, under the snapshot's own --software-kvm mode.
                let here = HostFacts::current(software_kvm_workarounds(state.config.software_kvm));
                state.host.check_restorable_on(&here)?;
                // The disks it will re-open, by path: the same files, the same sizes.
                state.disks.iter().try_for_each(DiskIdentity::check)?;
                Ok(state)
            })
            .map_err(|e| VmmError::Restore(format!("{}: {e}", dir.join("state").display())))?;
        if !state.config.volumes.is_empty() {
            return Err(VmmError::Restore(
                "it has volumes, which a snapshot cannot carry".into(),
            ));
        }
        Ok(Self {
            state,
            dir: dir.to_owned(),
        })
    }

    fn map_memory(&self, config: &VmConfig) -> Result<GuestMemoryMmap, VmmError> {
        let layout: Vec<(u64, u64)> = memory::ram_regions(config.memory_bytes)
            .iter()
            .map(|r| (r.start, r.size))
            .collect();
        let path = self.dir.join("memory");
        snapshot::memory::map_private(&path, &self.state.memory, &layout)
            .map_err(|e| VmmError::Restore(format!("{}: {e}", path.display())))
    }

    fn restore_vcpus_and_clock(&self, vm_fd: &VmFd, vcpus: &[VcpuFd]) -> Result<(), VmmError> {
        if self.state.vcpus.len() != vcpus.len() {
            return Err(VmmError::Restore(format!(
                "it has {} vCPUs, the configuration {}",
                self.state.vcpus.len(),
                vcpus.len()
            )));
        }
        for (index, (vcpu, state)) in vcpus.iter().zip(&self.state.vcpus).enumerate() {
            state
                .restore(vcpu)
                .map_err(|e| VmmError::Restore(format!("vCPU {index}: {e}")))?;
        }
        // KVM refuses a clock whose flags claim a stable TSC it did not measure itself.
        let mut clock = self.state.clock;
        clock.flags &= !kvm_bindings::KVM_CLOCK_TSC_STABLE;
        vm_fd
            .set_clock(&clock)
            .map_err(|e| VmmError::Restore(format!("KVM_SET_CLOCK: {e}")))
    }
}

/// How many times a restore tries to give the guest agent the host's entropy and time.
const REFRESH_ATTEMPTS: u32 = 10;

/// Resumes the snapshot `restore` with `config` (the snapshot's, with this run's console and
/// control socket), until it ends as any VM does.
pub fn restore(
    config: &VmConfig,
    restore: &Restore,
    started: Instant,
) -> Result<VmOutcome, VmmError> {
    let vm = Vm::build(config, started, None, Some(restore));
    // A guest agent (the snapshot has a vsock device) gets the host's entropy and time as soon as
    // the guest runs: this clone must not go on with the RNG state and clock of every other.
    if let (Ok(_), Some(vsock)) = (&vm, &config.vsock) {
        let socket = vsock.socket.clone();
        let spawned = std::thread::Builder::new()
            .name("refresh".into())
            .spawn(move || {
                crate::sandbox::seccomp::confine_or_exit(
                    crate::sandbox::seccomp::ThreadKind::AgentClient,
                );
                // A connection made before the guest has taken the vsock device's transport
                // reset is reset with the others: try again a few times.
                let mut outcome = Err(String::new());
                for attempt in 0..REFRESH_ATTEMPTS {
                    if attempt > 0 {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    outcome = crate::job::refresh_guest(&socket);
                    if outcome.is_ok() {
                        break;
                    }
                }
                match outcome {
                    Ok(()) => {
                        log::info!("restore: the guest agent took the host's entropy and time")
                    }
                    Err(e) => log::info!("restore: cannot refresh the guest's RNG and clock: {e}"),
                }
            });
        if let Err(e) = spawned {
            log::warn!("restore: no thread to refresh the guest: {e}");
        }
    }
    let outcome = vm.and_then(|vm| vm.run(None));
    terminal::restore();
    outcome
}

/// How long a resumed guest's agent may take to announce itself before the snapshot is taken
/// as unusable. It takes milliseconds; the margin is for a host that is very busy.
const WARM_READY_WITHIN: Duration = Duration::from_secs(30);

/// Job mode: runs `job` in the VM `config` describes, with a vsock device (a private one unless
/// the configuration names one) and the guest agent, and returns when it ends.
///
/// Unless `cold` (`--cold`) or the VM cannot have one (see [`snapshot::cache`]), the guest is
/// resumed from the warm-start cache's snapshot of it; without one it boots, and is saved there
/// the moment its agent is ready. A cached snapshot that cannot be resumed (corrupt, truncated,
/// from another host, or a guest whose agent does not come back) is removed, with a warning,
/// and the guest boots cold — unless the failure came after the VM ran (the agent never came
/// back): by then the main thread is confined by its seccomp filter and cannot build another
/// VM, so the snapshot is removed and the error says to run again.
pub fn run_job(
    config: &VmConfig,
    job: JobSpec,
    started: Instant,
    cold: bool,
    gate: Option<StartGate>,
) -> Result<VmOutcome, VmmError> {
    // Nothing else on the host can reach the agent through a socket in a directory of its own.
    let mut private_dir = None;
    let mut config = config.clone();
    if config.vsock.is_none() {
        let dir = PrivateDir::create().map_err(VmmError::JobSocket)?;
        config.vsock = Some(VsockConfig {
            cid: MIN_GUEST_CID,
            socket: dir.path().join("vsock.sock"),
        });
        private_dir = Some(dir);
    }
    // A held job (an OCI runtime's container) boots cold: its VM is its own.
    let plan = match gate {
        Some(_) => Plan::Cold("the command waits for a start gate".into()),
        None => snapshot::cache::plan(&config, cold),
    };
    let mut gate = gate;
    let outcome = match plan {
        Plan::Hit(entry) => match run_warm_job(&config, &job, started, &entry) {
            Ok(outcome) => {
                entry.touch();
                Ok(outcome)
            }
            // The main thread is confined once the VM runs: building another is not in its
            // list, so the cold boot is left to the next run.
            Err(why) if crate::sandbox::seccomp::is_confined() => {
                entry.discard();
                Err(VmmError::WarmStartFailed(entry.dir.clone(), why))
            }
            Err(why) => {
                eprintln!(
                    "ember: warning: the warm-start snapshot {} cannot be resumed ({why}); \
                     removed it, booting cold",
                    entry.dir.display()
                );
                entry.discard();
                // A socket of its own: the failed attempt's may not be gone yet.
                if let (Some(dir), Some(vsock)) = (&private_dir, config.vsock.as_mut()) {
                    vsock.socket = dir.path().join("vsock-cold.sock");
                }
                run_cold_job(&config, job, started, Some(entry), None)
            }
        },
        Plan::Miss(entry) => {
            log::info!(
                "warm start: no snapshot of this guest yet: booting cold, saving one in {} when \
                 its agent is ready",
                entry.dir.display()
            );
            run_cold_job(&config, job, started, Some(entry), None)
        }
        Plan::Cold(why) => {
            log::info!("warm start: not used ({why}): booting cold");
            run_cold_job(&config, job, started, None, gate.take())
        }
    };
    terminal::restore();
    drop(private_dir);
    outcome
}

/// Boots `config` and runs `job`; with `save`, saves the VM there when its agent is ready.
fn run_cold_job(
    config: &VmConfig,
    job: JobSpec,
    started: Instant,
    save: Option<CacheEntry>,
    gate: Option<StartGate>,
) -> Result<VmOutcome, VmmError> {
    let mut runner = JobRunner::prepare(job, &job_socket(config)).map_err(VmmError::Job)?;
    if let Some(gate) = gate {
        runner.hold_until_started(gate);
    }
    if let Some(entry) = save {
        if let Err(e) = runner.save_at_ready(entry) {
            log::warn!("warm start: cannot arrange the snapshot: {e}");
        }
    }
    let vm = Vm::build(config, started, Some(AgentMode::Job), None)?;
    vm.run(Some(runner))
}

/// Resumes `entry`'s snapshot with `config` (this run's sockets and console) and runs `job`.
/// `Err` says why the snapshot is of no use: nothing of the job has happened then.
fn run_warm_job(
    config: &VmConfig,
    job: &JobSpec,
    started: Instant,
    entry: &CacheEntry,
) -> Result<VmOutcome, String> {
    let restore = Restore::open(&entry.dir).map_err(|e| error_line(&e))?;
    log::info!("warm start: resuming {}", entry.dir.display());
    let mut runner =
        JobRunner::prepare(job.clone(), &job_socket(config)).map_err(|e| error_line(&e))?;
    runner.expect_restored(WARM_READY_WITHIN);
    let agent_was_ready = runner.agent_was_ready();
    let vm = Vm::build(config, started, Some(AgentMode::Job), Some(&restore))
        .map_err(|e| error_line(&e))?;
    let outcome = vm.run(Some(runner)).map_err(|e| error_line(&e))?;
    // Ctrl-C while resuming ends Ember as it would a cold boot.
    if agent_was_ready.load(std::sync::atomic::Ordering::SeqCst)
        || matches!(outcome, VmOutcome::Signal(_))
    {
        Ok(outcome)
    } else {
        Err(outcome.to_string())
    }
}

/// The largest disk image, in bytes: the biggest file a jailed ember may write to.
fn largest_disk(config: &VmConfig) -> u64 {
    config
        .disks
        .iter()
        .filter_map(|disk| std::fs::metadata(&disk.path).ok())
        .map(|meta| meta.len())
        .max()
        .unwrap_or(0)
}

/// Job mode's vsock socket.
fn job_socket(config: &VmConfig) -> PathBuf {
    config
        .vsock
        .as_ref()
        .map(|vsock| vsock.socket.clone())
        .unwrap_or_default()
}

fn check_resources(kvm: &Kvm, config: &VmConfig) -> Result<(), VmmError> {
    // A configuration may come from elsewhere than the command line (JSON, later): check it all.
    if config.cpus == 0 {
        return Err(VmmError::NoCpus);
    }
    let max_cpus = kvm.get_max_vcpus().min(usize::from(MAX_CPUS));
    if usize::from(config.cpus) > max_cpus {
        return Err(VmmError::TooManyCpus {
            requested: config.cpus,
            max: max_cpus,
        });
    }
    if config.memory_bytes < MIN_RAM_BYTES {
        return Err(VmmError::MemoryTooSmall);
    }
    if let Some(host) = host_memory_bytes() {
        if config.memory_bytes > host {
            return Err(VmmError::MemoryTooLarge {
                requested_mib: config.memory_bytes >> 20,
                host_mib: host >> 20,
            });
        }
    }
    Ok(())
}

/// The host's RAM (MemTotal), from one sysinfo() call rather than parsing /proc/meminfo.
fn host_memory_bytes() -> Option<u64> {
    // SAFETY: sysinfo() only writes the struct it is given, which is plain old data.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable struct sysinfo.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    info.totalram.checked_mul(u64::from(info.mem_unit))
}

/// Maps guest RAM (lazily: MAP_NORESERVE, so the host commits only what the guest touches):
/// anonymous memory, or with `shared` a memfd mapped shared, which another process (virtiofsd)
/// can map too.
fn map_guest_memory(size: u64, shared: bool) -> Result<GuestMemoryMmap, VmmError> {
    let regions = memory::ram_regions(size);
    let memfd = if shared {
        Some(Arc::new(memfd(size).map_err(VmmError::SharedMemory)?))
    } else {
        None
    };
    let mut offset = 0;
    let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = regions
        .iter()
        .map(|r| {
            let file = memfd
                .as_ref()
                .map(|file| FileOffset::from_arc(file.clone(), offset));
            offset += r.size;
            (GuestAddress(r.start), r.size as usize, file)
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).map_err(|source| VmmError::MapMemory {
        mib: size >> 20,
        source,
    })
}

/// An anonymous memory file of `size` bytes (sparse: nothing is committed until touched).
fn memfd(size: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the returned descriptor is owned right away.
    let fd = unsafe { libc::memfd_create(c"ember-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

/// Tells KVM where guest RAM lives in this process, one memory slot per region.
fn register_guest_memory(vm_fd: &VmFd, guest_memory: &GuestMemoryMmap) -> Result<(), VmmError> {
    for (slot, region) in guest_memory.iter().enumerate() {
        let host_address = guest_memory
            .get_host_address(region.start_addr())
            .map_err(VmmError::FirmwareTables)?;
        let slot_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_address as u64,
        };
        // SAFETY: the host range is a live mapping owned by `guest_memory`, which the returned
        // value carries and the VM keeps until every vCPU has been joined.
        unsafe { vm_fd.set_user_memory_region(slot_region) }.map_err(VmmError::RegisterMemory)?;
    }
    Ok(())
}

fn load_kernel_and_initrd(
    guest_memory: &GuestMemoryMmap,
    config: &VmConfig,
) -> Result<(boot::LoadedKernel, Option<boot::InitrdPlacement>), VmmError> {
    let mut kernel_file = File::open(&config.kernel).map_err(|source| VmmError::OpenKernel {
        path: config.kernel.clone(),
        source,
    })?;
    let kernel =
        boot::load_kernel(guest_memory, &mut kernel_file).map_err(|source| VmmError::Kernel {
            path: config.kernel.clone(),
            source,
        })?;
    log::info!(
        "kernel {} ({:?}, entry {:#x})",
        config.kernel.display(),
        kernel.format,
        kernel.entry
    );
    let Some(path) = &config.initrd else {
        return Ok((kernel, None));
    };
    let mut file = File::open(path).map_err(|source| VmmError::OpenInitrd {
        path: path.clone(),
        source,
    })?;
    let placed = boot::load_initrd(guest_memory, &mut file, &kernel, config.memory_bytes).map_err(
        |source| VmmError::Initrd {
            path: path.clone(),
            source,
        },
    )?;
    log::info!(
        "initrd {} ({} bytes at {:#x})",
        path.display(),
        placed.size,
        placed.address
    );
    Ok((kernel, Some(placed)))
}

/// One virtio-blk device per `--disk`, in order (/dev/vda, /dev/vdb, …), then one virtio-net
/// device per `--net` (eth0, eth1, …), one virtio-fs device per volume, then the vsock device.
fn attach_virtio_devices(
    config: &VmConfig,
    volumes: Option<&Volumes>,
    vm: &mut VmWiring,
) -> Result<DeviceManager, VmmError> {
    let mut devices = DeviceManager::default();
    for disk in &config.disks {
        let block = Block::new(disk.into()).map_err(VmmError::Disk)?;
        devices.attach(DeviceKind::Block, Box::new(block), vm)?;
    }
    for net in &config.nets {
        let net = Net::new(net.into()).map_err(VmmError::Net)?;
        devices.attach(DeviceKind::Net, Box::new(net), vm)?;
    }
    let volumes = volumes.map_or(&[][..], |v| &v.volumes[..]);
    // virtiofsd interrupts the guest through KVM irqfds where this KVM has them (README,
    // "Volumes"): no hop through the device thread for every completion.
    let irqfds = (!volumes.is_empty())
        .then(|| IrqfdRouter::probe(vm.vm_fd.clone()))
        .flatten();
    for volume in volumes {
        let volume_error = |source| VmmError::Volume {
            dir: volume.host.clone(),
            source,
        };
        let mut fs = Fs::new(FsDeviceConfig {
            tag: volume.tag.clone(),
            socket: volume.socket.clone(),
        })
        .map_err(volume_error)?;
        let calls = match &irqfds {
            Some(_) => Some(
                fs.call_eventfds_for_irqfd()
                    .map_err(|e| volume_error(FsError::EventFd(e)))?,
            ),
            None => None,
        };
        let slot = devices.attach(DeviceKind::Fs, Box::new(fs), vm)?;
        match (&irqfds, calls) {
            (Some(router), Some(calls)) => {
                let gsis = router.route_pin(vm.ioapic, slot.irq as usize, calls);
                log::info!(
                    "virtio-fs {}: virtiofsd interrupts the guest through KVM irqfds (GSIs \
                     {gsis:?}, following IOAPIC pin {})",
                    volume.tag,
                    slot.irq
                );
            }
            _ => log::info!(
                "virtio-fs {}: virtiofsd's interrupts are relayed by the device thread",
                volume.tag
            ),
        }
    }
    if let Some(vsock) = &config.vsock {
        let vsock = Vsock::new(vsock.into()).map_err(VmmError::Vsock)?;
        devices.attach(DeviceKind::Vsock, Box::new(vsock), vm)?;
    }
    Ok(devices)
}

/// The MP table and ACPI tables that tell the guest about its CPUs, interrupt routing and power
/// button.
fn write_firmware_tables(guest_memory: &GuestMemoryMmap, cpus: u8) -> Result<(), VmmError> {
    guest_memory
        .write_slice(
            &mptable::build(EBDA_START as u32, cpus),
            GuestAddress(EBDA_START),
        )
        .map_err(VmmError::FirmwareTables)?;
    for table in acpi::build(ACPI_START, cpus)? {
        guest_memory
            .write_slice(&table.bytes, GuestAddress(table.address))
            .map_err(VmmError::FirmwareTables)?;
    }
    Ok(())
}

/// The port-I/O devices: COM1 (its interrupt on an IOAPIC pin), the i8042, the debug-exit port,
/// the boot timer and the ACPI sleep registers.
fn legacy_devices(
    ioapic: &Arc<Mutex<Ioapic>>,
    console_writer: Box<dyn std::io::Write + Send>,
    started: Instant,
    saved_serial: Option<&SerialConsoleState>,
) -> Result<(Bus, Arc<Mutex<SerialConsole>>, EventFd), VmmError> {
    let serial_irq = IoapicPin::new(ioapic.clone(), COM1_IRQ as usize);
    let serial_fifo_drained = EventFd::new(0).map_err(VmmError::Irq)?;
    let fifo_drained = serial_fifo_drained.try_clone().map_err(VmmError::Irq)?;
    let serial = Arc::new(Mutex::new(match saved_serial {
        Some(state) => SerialConsole::from_state(state, serial_irq, fifo_drained, console_writer)
            .map_err(|e| VmmError::Restore(format!("its serial port: {e}")))?,
        None => SerialConsole::new(serial_irq, fifo_drained, console_writer),
    }));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), COM1_PORT, serial::RANGE_LEN)?;
    pio.insert(Arc::new(Mutex::new(I8042)), I8042_PORT, i8042::RANGE_LEN)?;
    pio.insert(Arc::new(Mutex::new(DebugExit)), DEBUG_EXIT_PORT, 1)?;
    pio.insert(
        Arc::new(Mutex::new(BootTimer::new(started))),
        BOOT_TIMER_PORT,
        1,
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiSleep)),
        ACPI_SLEEP_PORT,
        acpi_sleep::RANGE_LEN,
    )?;
    Ok((pio, serial, serial_fifo_drained))
}

fn create_vcpus(
    vm_fd: &VmFd,
    guest_memory: &GuestMemoryMmap,
    supported_cpuid: &kvm_bindings::CpuId,
    cpus: u8,
    software_kvm: bool,
    entry: Option<EntryMode>,
) -> Result<Vec<VcpuFd>, VmmError> {
    (0..cpus)
        .map(|cpu| {
            let vcpu = vm_fd.create_vcpu(u64::from(cpu))?;
            let topology = CpuidTopology {
                cpu,
                cpus,
                software_kvm,
            };
            configure_vcpu(&vcpu, guest_memory, supported_cpuid, topology, entry)?;
            Ok(vcpu)
        })
        .enumerate()
        .map(|(cpu, result)| {
            result.map_err(|source| VmmError::Vcpu {
                cpu: cpu as u8,
                source,
            })
        })
        .collect()
}

/// CPUID, MSRs, FPU and LAPIC for every vCPU; registers for the boot vCPU only (the others wait
/// for INIT/SIPI from the guest, in KVM's in-kernel LAPIC).
fn configure_vcpu(
    vcpu: &VcpuFd,
    guest_memory: &GuestMemoryMmap,
    supported_cpuid: &kvm_bindings::CpuId,
    topology: CpuidTopology,
    entry: Option<EntryMode>,
) -> Result<(), kvm_ioctls::Error> {
    let mut cpuid = supported_cpuid.clone();
    cpuid::normalize(cpuid.as_mut_slice(), topology);
    vcpu.set_cpuid2(&cpuid)?;
    // A vCPU being restored takes everything else from the snapshot; its boot set-up would also
    // write page tables into guest RAM that the guest has long reused.
    let Some(entry) = entry else {
        return Ok(());
    };

    let msrs = regs::boot_msrs();
    let written = vcpu.set_msrs(&msrs)?;
    if written != msrs.as_slice().len() {
        // Software KVM does not implement every MSR; the rest are defaults Linux can live with.
        log::debug!(
            "KVM accepted {written} of {} boot MSRs",
            msrs.as_slice().len()
        );
    }
    vcpu.set_fpu(&regs::boot_fpu())?;
    let mut lapic = vcpu.get_lapic()?;
    regs::set_lint_modes(&mut lapic);
    vcpu.set_lapic(&lapic)?;

    if topology.cpu == 0 {
        let mut sregs = vcpu.get_sregs()?;
        regs::setup_sregs(guest_memory, entry, &mut sregs)
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        vcpu.set_sregs(&sregs)?;
        vcpu.set_regs(&regs::boot_regs(entry))?;
    }
    Ok(())
}
