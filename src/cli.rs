//! The `ember` command line.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{
    parse_memory_size, ConsoleConfig, DiskConfig, NetConfig, SoftwareKvmMode, VmConfig, MAX_CPUS,
};

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
    /// Boot a guest kernel and run it until it powers off, resets or exits.
    Run(RunArgs),
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
    /// Where the serial console goes: stdio, off, or file=PATH
    #[arg(long, value_name = "WHERE", default_value = "stdio")]
    pub console: ConsoleConfig,
    /// A virtio block device (repeatable): path=FILE[,readonly=on][,id=NAME]; the first is /dev/vda
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<DiskConfig>,
    /// A virtio network device on a host TAP (repeatable): tap=NAME[,mac=MAC]
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<NetConfig>,
    /// Root filesystem image: the first disk, with root=/dev/vda rw on the command line
    #[arg(long, value_name = "FILE")]
    pub rootfs: Option<PathBuf>,
    /// Workarounds for software KVM (kvm_pvm): auto applies them when it is detected
    #[arg(long, value_name = "MODE", value_enum, default_value_t = SoftwareKvmMode::Auto)]
    pub software_kvm: SoftwareKvmMode,
}

/// Problems with the command line that clap cannot see.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("no --kernel given and the default guest is not built (looked for {0}); build it with resources/build-guest.sh")]
    NoDefaultGuest(PathBuf),
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
    /// The VM to boot; without `--kernel`, the default guest and its initramfs.
    pub fn into_config(self) -> Result<VmConfig, CliError> {
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
            cpus: self.cpus,
            memory_bytes: self.memory,
            console: self.console,
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
        let Command::Run(args) = cli.command;
        assert_eq!(args.cpus, 1);
        assert_eq!(args.memory, 128 << 20);
        assert_eq!(args.console, ConsoleConfig::Stdio);
        assert_eq!(args.cmdline, DEFAULT_CMDLINE);
        let config = args.into_config().unwrap();
        assert_eq!(config.kernel, PathBuf::from("/k"));
        assert_eq!(config.initrd, None);
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
