//! What the user asked for, as a plain value: the CLI parses into it, the builder reads it.

use std::path::PathBuf;

use ember_devices::virtio::block::BlockConfig;
use ember_devices::virtio::net::NetDeviceConfig;

use crate::console::ConsoleConfig;

/// Whether to apply the workarounds for software KVM (`kvm_pvm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SoftwareKvmMode {
    /// Apply them when `/sys/module/kvm_pvm` exists.
    Auto,
    /// Always apply them.
    On,
    /// Never apply them.
    Off,
}

/// A VM to boot.
#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub console: ConsoleConfig,
    pub software_kvm: SoftwareKvmMode,
    /// virtio block devices, /dev/vda first.
    pub disks: Vec<DiskConfig>,
    /// virtio network devices, eth0 first.
    pub nets: Vec<NetConfig>,
}

const MIB: u64 = 1 << 20;

/// Parses `128M`, `2G`, `512K`… or a plain number of MiB into bytes.
pub fn parse_memory_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, ""),
    };
    let number: u64 = digits.parse().map_err(|_| {
        format!("'{text}' is not a memory size: use e.g. 128M, 2G or a number of MiB")
    })?;
    let scale = match unit.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => MIB,
        "K" | "KB" | "KIB" => 1 << 10,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => {
            return Err(format!(
                "'{text}' has an unknown unit '{unit}': use K, M or G"
            ))
        }
    };
    let bytes = number
        .checked_mul(scale)
        .ok_or_else(|| format!("'{text}' is too large"))?;
    if bytes == 0 {
        return Err("memory size must be more than zero".into());
    }
    if bytes % 4096 != 0 {
        return Err(format!("'{text}' is not a multiple of 4 KiB"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_size("128M"), Ok(128 * MIB));
        assert_eq!(parse_memory_size("128"), Ok(128 * MIB));
        assert_eq!(parse_memory_size("2G"), Ok(2048 * MIB));
        assert_eq!(parse_memory_size("3584m"), Ok(3584 * MIB));
        assert_eq!(parse_memory_size("64MiB"), Ok(64 * MIB));
        assert_eq!(parse_memory_size("8192K"), Ok(8 * MIB));
        assert!(parse_memory_size("0").is_err());
        assert!(parse_memory_size("").is_err());
        assert!(parse_memory_size("-1").is_err());
        assert!(parse_memory_size("12Q").is_err());
        assert!(parse_memory_size("1.5G").is_err());
        assert!(parse_memory_size("99999999999999999G").is_err());
        assert!(parse_memory_size("1K").is_err());
    }
}

/// A virtio block device: `path=FILE[,readonly=on][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
}

/// Parses the `--disk` value.
pub fn parse_disk(text: &str) -> Result<DiskConfig, String> {
    let mut path = None;
    let mut read_only = false;
    let mut id = None;
    for item in text.split(',') {
        match item.split_once('=') {
            Some(("path", value)) if !value.is_empty() => path = Some(PathBuf::from(value)),
            Some(("readonly", "on" | "true" | "yes")) => read_only = true,
            Some(("readonly", "off" | "false" | "no")) => read_only = false,
            Some(("id", value)) if !value.is_empty() => id = Some(value.to_string()),
            _ => {
                return Err(format!(
                    "'{item}' is not a disk option: use path=FILE[,readonly=on][,id=NAME]"
                ))
            }
        }
    }
    let path = path.ok_or("a disk needs path=FILE")?;
    Ok(DiskConfig {
        path,
        read_only,
        id,
    })
}

/// A virtio network device on a host TAP: `tap=NAME[,mac=MAC]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host TAP interface, normally made beforehand with `ip tuntap add NAME mode tap`.
    pub tap: String,
    /// The guest's MAC address; when absent, a locally administered one derived from `tap`.
    pub mac: Option<[u8; 6]>,
}

impl From<&DiskConfig> for BlockConfig {
    fn from(disk: &DiskConfig) -> Self {
        BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            id: disk.id.clone(),
        }
    }
}

impl From<&NetConfig> for NetDeviceConfig {
    fn from(net: &NetConfig) -> Self {
        NetDeviceConfig {
            tap: net.tap.clone(),
            mac: net.mac,
        }
    }
}

/// Parses the `--net` value: `tap=NAME[,mac=MAC]`.
pub fn parse_net(text: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for item in text.split(',') {
        match item.split_once('=') {
            Some(("tap", value)) if !value.is_empty() => tap = Some(value.to_string()),
            Some(("mac", value)) => {
                mac = Some(ember_devices::virtio::net::parse_mac(value).map_err(|e| e.to_string())?)
            }
            _ => {
                return Err(format!(
                    "'{item}' is not a network option: use tap=NAME[,mac=MAC]"
                ))
            }
        }
    }
    let tap = tap.ok_or("a network device needs tap=NAME")?;
    Ok(NetConfig { tap, mac })
}

#[cfg(test)]
mod disk_tests {
    use super::*;

    #[test]
    fn disk_options() {
        assert_eq!(
            parse_disk("path=/a.img"),
            Ok(DiskConfig {
                path: "/a.img".into(),
                read_only: false,
                id: None
            })
        );
        assert_eq!(
            parse_disk("path=/a.img,readonly=on,id=data"),
            Ok(DiskConfig {
                path: "/a.img".into(),
                read_only: true,
                id: Some("data".into())
            })
        );
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=").is_err());
        assert!(parse_disk("path=/a,ro").is_err());
        assert!(parse_disk("path=/a,readonly=maybe").is_err());
    }

    #[test]
    fn net_options() {
        assert_eq!(
            parse_net("tap=tap0"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: None
            })
        );
        assert_eq!(
            parse_net("tap=tap0,mac=02:00:00:00:00:01"),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([2, 0, 0, 0, 0, 1])
            })
        );
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=tap0,mac=zz").is_err());
        assert!(parse_net("tap=tap0,queues=2").is_err());
    }
}
