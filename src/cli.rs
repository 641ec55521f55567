//! The `ember` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    parse_hostname, parse_memory_size, ConsoleConfig, DiskConfig, NetConfig, SoftwareKvmMode,
    VmConfig, VolumeConfig, VsockConfig, MAX_CPUS,
};
use crate::job::{parse_env, parse_ulimit, JobSpec};
use crate::sandbox::jail::JailConfig;
use crate::sandbox::seccomp::SeccompMode;
use ember_agent::wire::{ProcessLimits, Rlimit};

/// Command line used when `--cmdline` is not given: console on COM1, reboot through the i8042
/// (which ends the VM), reboot on panic, and a quiet boot (every console byte is a VM exit).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet tsc=reliable";

#[derive(Debug, Parser)]
#[command(name = "ember", version, about = "A microVM monitor on Linux KVM")]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest kernel and run it until it powers off, resets or exits; with `-- CMD`, run CMD
    /// in it through the guest agent and exit with CMD's status.
    Run(Box<RunArgs>),
    /// Run a command in a VM already running with --vsock, through its guest agent.
    Exec(ExecArgs),
    /// Control a VM running with --api-socket: info, pause, resume, shutdown, metrics.
    Ctl(CtlArgs),
}

/// `ember ctl PATH ACTION`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VM's API socket (its --api-socket)
    #[arg(value_name = "PATH")]
    pub socket: PathBuf,
    /// What to do
    #[arg(value_enum)]
    pub action: CtlAction,
    /// For `snapshot`: the directory to write it into
    #[arg(value_name = "DIR", required_if_eq("action", "snapshot"))]
    pub dir: Option<PathBuf>,
}

/// What `ember ctl` asks of the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CtlAction {
    /// GET /vm: state, configuration, uptime, devices (JSON)
    Info,
    /// PUT /vm/pause: stop every vCPU
    Pause,
    /// PUT /vm/resume
    Resume,
    /// PUT /vm/shutdown: end the VM
    Shutdown,
    /// GET /metrics (Prometheus text)
    Metrics,
    /// PUT /vm/snapshot: the VM's state and RAM into DIR, then on as before
    Snapshot,
}

/// How a command runs in the guest (job mode).
#[derive(Debug, Args)]
pub struct JobArgs {
    /// Connect ember's stdin to the command's
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a pseudo-terminal (the host terminal goes to raw mode meanwhile)
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable for the command (repeatable)
    #[arg(short, long = "env", value_name = "KEY=VAL", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// The command's working directory [default: /]
    #[arg(short, long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run the command as USER[:GROUP], names or numbers, as `docker run -u` [default: root, or
    /// the image's User]
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Kill the command after SECS seconds; ember then exits 124
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// A further group for the command (repeatable), as `docker run --group-add`
    #[arg(long = "group-add", value_name = "GID")]
    pub group_add: Vec<u32>,
    /// A resource limit for the command (repeatable): NAME=SOFT[:HARD], as `docker run --ulimit`
    #[arg(long = "ulimit", value_name = "NAME=SOFT[:HARD]", value_parser = parse_ulimit)]
    pub ulimits: Vec<Rlimit>,
    /// The command cannot gain privileges (setuid programs, file capabilities): no_new_privs
    #[arg(long)]
    pub no_new_privileges: bool,
}

impl JobArgs {
    /// The job for `argv`.
    pub fn spec(&self, argv: Vec<String>) -> Result<JobSpec, CliError> {
        let timeout = match self.timeout {
            None => None,
            Some(secs) => Some(
                Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or(CliError::Timeout(secs))?,
            ),
        };
        Ok(JobSpec {
            argv,
            env: self.env.clone(),
            cwd: self.workdir.clone(),
            user: self.user.clone(),
            stdin: self.interactive,
            tty: self.tty,
            timeout,
            limits: ProcessLimits {
                extra_groups: self.group_add.clone(),
                rlimits: self.ulimits.clone(),
                no_new_privileges: self.no_new_privileges,
            },
        })
    }

    fn is_default(&self) -> bool {
        !self.interactive
            && !self.tty
            && self.env.is_empty()
            && self.workdir.is_none()
            && self.user.is_none()
            && self.timeout.is_none()
            && self.group_add.is_empty()
            && self.ulimits.is_empty()
            && !self.no_new_privileges
    }
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The VM's vsock socket (the socket= of its --vsock)
    #[arg(long, value_name = "PATH")]
    pub vsock: PathBuf,
    #[command(flatten)]
    pub job: JobArgs,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel: ELF vmlinux (PVH or 64-bit Linux entry) or bzImage [default: the default guest]
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk [default: the default guest's, when booting the default guest]
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Number of vCPUs
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=i64::from(MAX_CPUS)))]
    pub cpus: u8,
    /// Guest RAM: 128M, 2G, or a number of MiB
    #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = parse_memory_size)]
    pub memory: u64,
    /// Where the serial console goes: stdio, off, or file=PATH [default: stdio; with -- CMD, a
    /// buffer shown only if the VM fails before CMD runs]
    #[arg(long, value_name = "WHERE")]
    pub console: Option<ConsoleConfig>,
    /// A virtio block device (repeatable): path=FILE[,readonly=on][,id=NAME]; the first is /dev/vda
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<DiskConfig>,
    /// A virtio network device on a host TAP (repeatable): tap=NAME[,mac=MAC]; with
    /// ip=ADDR/PREFIX, gw=ADDR, mtu=N the default guest's agent configures it (job mode, --agent)
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<NetConfig>,
    /// Root filesystem image: the first disk, with root=/dev/vda rw on the command line
    #[arg(long, value_name = "FILE")]
    pub rootfs: Option<PathBuf>,
    /// The guest's root: a directory, a rootfs tarball (.tar, .tar.gz, .tar.zst) or an OCI image
    /// (layout directory, oci-archive, docker-archive), read-only below a writable layer
    #[arg(long, value_name = "REF")]
    pub image: Option<PathBuf>,
    /// With --image: the writable layer on a sparse disk of SIZE (deleted at exit) instead of RAM
    #[arg(long, value_name = "SIZE", value_parser = parse_memory_size, requires = "image")]
    pub scratch: Option<u64>,
    /// Share a host directory with the guest over virtio-fs (repeatable): HOST_DIR:GUEST_DIR[:ro];
    /// a single file (HOST_FILE:GUEST_FILE) is bound over the guest's file
    #[arg(long = "volume", value_name = "HOST:GUEST[:ro]")]
    pub volumes: Vec<VolumeConfig>,
    /// A virtio-vsock device (cid=N,socket=PATH): host programs reach guest port P by connecting
    /// to PATH and writing "CONNECT P"; the guest reaches host port P at PATH_P
    #[arg(long, value_name = "SPEC")]
    pub vsock: Option<VsockConfig>,
    /// A control socket (HTTP/1.1 + JSON, as `curl --unix-socket PATH` speaks): GET /vm,
    /// PUT /vm/pause, /vm/resume, /vm/shutdown, GET /metrics; `ember ctl PATH` is its client
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// The guest's host name, set by the default guest's agent (job mode, --agent)
    #[arg(long, value_name = "NAME", value_parser = parse_hostname)]
    pub hostname: Option<String>,
    /// Resume the snapshot in DIR (made with `ember ctl PATH snapshot DIR`) instead of booting:
    /// the VM is the snapshot's; --console and --api-socket are this run's
    #[arg(long, value_name = "DIR", conflicts_with_all = [
        "kernel", "initrd", "cmdline", "cpus", "memory", "disks", "nets", "rootfs", "image",
        "scratch", "volumes", "vsock", "command", "cold", "hostname",
    ])]
    pub restore: Option<PathBuf>,
    /// With -- CMD: boot the guest even if the warm-start cache has a snapshot of it, and do
    /// not save one
    #[arg(long, requires = "command")]
    pub cold: bool,
    /// Workarounds for software KVM (kvm_pvm): auto applies them when it is detected
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SoftwareKvmMode::Auto)]
    pub software_kvm: SoftwareKvmMode,
    /// System-call filters, one per kind of thread: on (a forbidden call ends ember with 159 and
    /// a line naming it), log (the kernel logs it, see dmesg), off
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SeccompMode::On, env = "EMBER_SECCOMP")]
    pub seccomp: SeccompMode,
    /// Run the monitor jailed: its own namespaces, an empty root, --uid/--gid, no capabilities
    /// (needs root; see the README's Sandbox section for what it cannot be combined with)
    #[arg(long)]
    pub jail: bool,
    /// The jailed monitor's user
    #[arg(long, value_name = "UID", default_value_t = 65534, requires = "jail")]
    pub uid: u32,
    /// The jailed monitor's group
    #[arg(long, value_name = "GID", default_value_t = 65534, requires = "jail")]
    pub gid: u32,
    /// The jailed monitor's CPU limit, in percent of one CPU (cgroup cpu quota)
    #[arg(long, value_name = "PCT", requires = "jail",
          value_parser = clap::value_parser!(u32).range(1..=100 * MAX_CPUS as i64))]
    pub cpu_quota: Option<u32>,
    /// The jailed monitor's memory limit, guest RAM included (cgroup memory limit)
    #[arg(long, value_name = "SIZE", requires = "jail", value_parser = parse_memory_size)]
    pub memory_limit: Option<u64>,
    /// Hold the command until `start` arrives on this Unix socket (made here; used by
    /// ember-runtime, the OCI runtime)
    #[arg(long, value_name = "PATH", requires = "command", hide = true)]
    pub start_gate: Option<PathBuf>,
    /// With --start-gate: write "created" on this descriptor once the guest agent is ready
    #[arg(long, value_name = "FD", requires = "start_gate", hide = true)]
    pub ready_fd: Option<i32>,
    #[command(flatten)]
    pub job: JobArgs,
    /// Run this command in the guest (job mode) and exit with its status
    #[arg(last = true, value_name = "CMD")]
    pub command: Vec<String>,
}

/// Problems with the command line that clap cannot see.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no --kernel given and the default guest is not built (looked for {0}); build it with resources/build-guest.sh")]
    NoDefaultGuest(PathBuf),
    #[error("--jail cannot be combined with {0}")]
    JailIncompatible(&'static str),
    #[error("--timeout {0} is not a positive number of seconds")]
    Timeout(f64),
    #[error("-i, -t, -e, -w, -u and --timeout are for a command: add -- CMD")]
    JobOptionsWithoutCommand,
}

/// Where the default guest (built by `resources/build-guest.sh`) is cached.
pub fn default_guest_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("ember").join("default")
}

impl RunArgs {
    /// The command to run in the guest, if any (job mode).
    pub fn job_spec(&self) -> Result<Option<JobSpec>, CliError> {
        if self.command.is_empty() {
            if !self.job.is_default() {
                return Err(CliError::JobOptionsWithoutCommand);
            }
            return Ok(None);
        }
        self.job.spec(self.command.clone()).map(Some)
    }

    /// The VM to boot; without `--kernel`, the default guest and its initramfs.
    /// `--jail`'s settings, or why this run cannot be jailed.
    pub fn jail_config(&self) -> Result<Option<JailConfig>, CliError> {
        if !self.jail {
            return Ok(None);
        }
        let incompatible = if !self.command.is_empty() {
            Some("a job (-- CMD): the job reaches the guest agent through the vsock socket's path, which the jail hides")
        } else if !self.volumes.is_empty() {
            Some("--volume: virtiofsd would run outside the jail")
        } else if self.scratch.is_some() {
            Some("--scratch: its file is removed at exit, from a root the jail hides")
        } else {
            None
        };
        if let Some(why) = incompatible {
            return Err(CliError::JailIncompatible(why));
        }
        Ok(Some(JailConfig {
            uid: self.uid,
            gid: self.gid,
            cpu_quota_percent: self.cpu_quota,
            memory_limit: self.memory_limit,
            sockets: self
                .api_socket
                .iter()
                .chain(self.vsock.iter().map(|vsock| &vsock.socket))
                .cloned()
                .collect(),
        }))
    }

    pub fn into_config(self) -> Result<VmConfig, CliError> {
        let job_mode = !self.command.is_empty();
        let (kernel, initrd) = match self.kernel {
            Some(kernel) => (kernel, self.initrd),
            None => {
                let dir = default_guest_dir();
                let kernel = dir.join("vmlinux");
                if !kernel.exists() {
                    return Err(CliError::NoDefaultGuest(kernel));
                }
                let initrd = self
                    .initrd
                    .or_else(|| Some(dir.join("initramfs.cpio")).filter(|p| p.exists()));
                (kernel, initrd)
            }
        };
        let mut cmdline = self.cmdline;
        let mut disks = self.disks;
        if let Some(rootfs) = self.rootfs {
            disks.insert(
                0,
                DiskConfig {
                    path: rootfs,
                    read_only: false,
                    id: Some("rootfs".into()),
                },
            );
            cmdline.push_str(" root=/dev/vda rw");
        }
        Ok(VmConfig {
            kernel,
            initrd,
            cmdline,
            disks,
            nets: self.nets,
            vsock: self.vsock,
            volumes: self.volumes,
            api_socket: self.api_socket,
            hostname: self.hostname,
            cpus: self.cpus,
            memory_bytes: self.memory,
            // In job mode the console is not mixed into the command's output.
            console: self.console.unwrap_or(if job_mode {
                ConsoleConfig::Memory
            } else {
                ConsoleConfig::Stdio
            }),
            software_kvm: self.software_kvm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("ember").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults() {
        let cli = parse(&["run", "--kernel", "/k"]).unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.cpus, 1);
        assert_eq!(args.memory, 128 << 20);
        assert_eq!(args.console, None);
        assert_eq!(args.cmdline, DEFAULT_CMDLINE);
        assert_eq!(args.job_spec().unwrap(), None);
        let config = args.into_config().unwrap();
        assert_eq!(config.kernel, PathBuf::from("/k"));
        assert_eq!(config.initrd, None);
        assert_eq!(config.console, ConsoleConfig::Stdio);
    }

    #[test]
    fn job_mode() {
        let cli = parse(&[
            "run",
            "--kernel",
            "/k",
            "-i",
            "-e",
            "A=1",
            "-w",
            "/src",
            "--timeout",
            "1.5",
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("not run")
        };
        let spec = args.job_spec().unwrap().unwrap();
        assert_eq!(spec.argv, ["sh", "-c", "exit 7"]);
        assert!(spec.stdin && !spec.tty);
        assert_eq!(spec.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(spec.cwd.as_deref(), Some("/src"));
        assert_eq!(spec.timeout, Some(Duration::from_millis(1500)));
        assert_eq!(args.into_config().unwrap().console, ConsoleConfig::Memory);
        // Job options without a command are a mistake, not ignored.
        let Command::Run(args) = parse(&["run", "-i"]).unwrap().command else {
            panic!("not run")
        };
        assert!(args.job_spec().is_err());
        let Command::Run(args) = parse(&["run", "--timeout", "0", "--", "true"])
            .unwrap()
            .command
        else {
            panic!("not run")
        };
        assert!(args.job_spec().is_err());
        let cli = parse(&["exec", "--vsock", "/v.sock", "-t", "--", "sh"]).unwrap();
        let Command::Exec(exec) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(exec.vsock, PathBuf::from("/v.sock"));
        assert!(exec.job.tty);
        assert!(parse(&["exec", "--vsock", "/v.sock"]).is_err());
    }

    #[test]
    fn bad_values_are_rejected() {
        for bad in [
            &["run", "--cpus", "0"][..],
            &["run", "--cpus", "255"],
            &["run", "--cpus", "x"],
            &["run", "--memory", "0"],
            &["run", "--memory", "lots"],
            &["run", "--console", "tty"],
            &["run", "--software-kvm", "maybe"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let cli = parse(&["-vv", "run", "--cpus", "32", "--memory", "5G"]).unwrap();
        assert_eq!(cli.verbose, 2);
    }
}
