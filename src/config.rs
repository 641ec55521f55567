//! What the user asked for, as plain data: the command line parses into it, the builder reads
//! it, and (later) the control socket takes it as JSON.
//!
//! Every device option string goes through one parser, [`OptionParser`]: `key=value[,key=value]`
//! checked against the keys the device accepts, in the manner of Cloud Hypervisor's
//! `option_parser`. Device crates take their own constructor arguments, built from these types
//! with `From`, so that nothing user-facing lives in `ember-devices`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

use ember_devices::virtio::block::BlockConfig;
use ember_devices::virtio::net::NetDeviceConfig;
use ember_devices::virtio::vsock::VsockDeviceConfig;
use serde::{Deserialize, Serialize};

/// Largest vCPU count: APIC IDs are 8-bit and 0xff is the broadcast ID.
pub const MAX_CPUS: u8 = 254;

/// A configuration value the user gave that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A `key=value` item whose key the option does not know, or an item without `=`.
    #[error("'{item}' is not {what} option: use {usage}")]
    UnknownOption {
        item: String,
        what: &'static str,
        usage: &'static str,
    },
    /// The same key twice.
    #[error("'{key}' is given twice in {what} option: use {usage}")]
    Repeated {
        key: String,
        what: &'static str,
        usage: &'static str,
    },
    /// `key=` with nothing after it.
    #[error("'{key}=' needs a value: use {usage}")]
    Empty { key: String, usage: &'static str },
    /// A key the option cannot do without.
    #[error("{what} needs {key}=…: use {usage}")]
    Missing {
        key: &'static str,
        what: &'static str,
        usage: &'static str,
    },
    /// A value that does not parse.
    #[error("{key}={value}: {reason}")]
    InvalidValue {
        key: String,
        value: String,
        reason: String,
    },
}

/// Parses a `key=value[,key=value]` option string against the keys one option accepts.
///
/// Values cannot contain commas. Unknown keys, repeated keys, empty values and items without `=`
/// are errors that name the option's usage, so a typo never passes silently.
#[derive(Debug)]
pub struct OptionParser {
    /// "a disk", "a network": what the option describes, for messages.
    what: &'static str,
    /// The syntax, for messages: `path=FILE[,readonly=on][,id=NAME]`.
    usage: &'static str,
    known: &'static [&'static str],
    values: BTreeMap<&'static str, String>,
}

impl OptionParser {
    /// A parser for an option describing `what` with the keys `known`.
    pub fn new(what: &'static str, usage: &'static str, known: &'static [&'static str]) -> Self {
        Self {
            what,
            usage,
            known,
            values: BTreeMap::new(),
        }
    }

    /// Splits `text` into its items and checks each key.
    pub fn parse(mut self, text: &str) -> Result<Self, ConfigError> {
        for item in text.split(',') {
            let key = item
                .split_once('=')
                .and_then(|(key, _)| self.known.iter().find(|known| **known == key));
            let (Some(key), Some((_, value))) = (key, item.split_once('=')) else {
                return Err(self.unknown(item));
            };
            if value.is_empty() {
                return Err(ConfigError::Empty {
                    key: key.to_string(),
                    usage: self.usage,
                });
            }
            if self.values.insert(key, value.to_string()).is_some() {
                return Err(ConfigError::Repeated {
                    key: key.to_string(),
                    what: self.what,
                    usage: self.usage,
                });
            }
        }
        Ok(self)
    }

    fn unknown(&self, item: &str) -> ConfigError {
        ConfigError::UnknownOption {
            item: item.to_string(),
            what: self.what,
            usage: self.usage,
        }
    }

    /// The value of `key` as given, if given.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    /// The value of `key`, which must be there.
    pub fn required(&self, key: &'static str) -> Result<&str, ConfigError> {
        self.get(key).ok_or(ConfigError::Missing {
            key,
            what: self.what,
            usage: self.usage,
        })
    }

    /// The value of `key` converted with `FromStr`, if given.
    pub fn convert<T: FromStr>(&self, key: &str) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        self.get(key)
            .map(|value| {
                value
                    .parse()
                    .map_err(|e: T::Err| ConfigError::InvalidValue {
                        key: key.to_string(),
                        value: value.to_string(),
                        reason: e.to_string(),
                    })
            })
            .transpose()
    }

    /// An on/off switch: `on|true|yes` or `off|false|no`; `default` when absent.
    pub fn toggle(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.values.get(key).map(String::as_str) {
            None => Ok(default),
            Some("on" | "true" | "yes") => Ok(true),
            Some("off" | "false" | "no") => Ok(false),
            Some(other) => Err(ConfigError::InvalidValue {
                key: key.to_string(),
                value: other.to_string(),
                reason: "use on or off".into(),
            }),
        }
    }
}

/// Whether to apply the workarounds for software KVM (`kvm_pvm`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SoftwareKvmMode {
    /// Apply them when `/sys/module/kvm_pvm` exists.
    Auto,
    /// Always apply them.
    On,
    /// Never apply them.
    Off,
}

/// Where the guest console goes: `stdio`, `off` or `file=PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleConfig {
    /// Output to stdout, input from stdin (raw mode when stdin is a terminal).
    Stdio,
    /// No console at all.
    Off,
    /// Output to a file, no input.
    File(PathBuf),
    /// Output kept in a bounded in-memory ring, no input: job mode's default, shown only when the
    /// VM fails before its command runs.
    Memory,
}

impl FromStr for ConsoleConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const USAGE: &str = "stdio, off or file=PATH";
        match text {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "off" => Ok(ConsoleConfig::Off),
            // Not through OptionParser: a file name may hold a comma.
            _ => match text.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(path.into())),
                _ => Err(ConfigError::UnknownOption {
                    item: text.to_string(),
                    what: "a console",
                    usage: USAGE,
                }),
            },
        }
    }
}

/// A VM to boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// ELF vmlinux (PVH or 64-bit Linux entry) or bzImage.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// What the user asked for; Ember appends its own options (devices, software KVM).
    pub cmdline: String,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub console: ConsoleConfig,
    pub software_kvm: SoftwareKvmMode,
    /// virtio block devices, /dev/vda first.
    pub disks: Vec<DiskConfig>,
    /// virtio network devices, eth0 first.
    pub nets: Vec<NetConfig>,
    /// A virtio-vsock device, reached from the host through a Unix socket.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Host directories shared with the guest over virtio-fs.
    #[serde(default)]
    pub volumes: Vec<VolumeConfig>,
    /// The control socket (HTTP/1.1 + JSON), when asked for.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// The guest's host name, set by the default guest's agent (`ember.hostname=`).
    #[serde(default)]
    pub hostname: Option<String>,
}

/// A host directory (or a single file) shared live with the guest: `HOST_DIR:GUEST_DIR[:ro]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeConfig {
    pub host: PathBuf,
    /// Where the default guest mounts it: an absolute path.
    pub guest: String,
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for VolumeConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const USAGE: &str = "HOST_DIR:GUEST_DIR[:ro]";
        let invalid = |reason: &str| ConfigError::InvalidValue {
            key: "volume".into(),
            value: text.to_string(),
            reason: format!("{reason}: use {USAGE}"),
        };
        let (host, guest, read_only) = match text.split(':').collect::<Vec<_>>()[..] {
            [host, guest] => (host, guest, false),
            [host, guest, "ro"] => (host, guest, true),
            [host, guest, "rw"] => (host, guest, false),
            _ => return Err(invalid("not two or three fields")),
        };
        if host.is_empty() {
            return Err(invalid("no host directory"));
        }
        // The guest path travels on the kernel command line (ember.volumes=TAG=PATH,...): it
        // must be absolute and hold nothing that would split it there.
        if !guest.starts_with('/') || guest.contains([',', '=', ' ', '\t', '"', '\\']) {
            return Err(invalid(
                "the guest directory must be an absolute path without spaces, commas, '=' or quotes",
            ));
        }
        Ok(VolumeConfig {
            host: host.into(),
            guest: guest.to_string(),
            read_only,
        })
    }
}

const MIB: u64 = 1 << 20;

/// Checks a guest host name (RFC 1123 labels): it travels on the kernel command line.
pub fn parse_hostname(text: &str) -> Result<String, String> {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if text.len() <= 64 && text.split('.').all(label_ok) {
        Ok(text.to_string())
    } else {
        Err(format!(
            "'{text}' is not a host name: letters, digits and '-', in labels joined by '.', \
             at most 64 characters"
        ))
    }
}

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

/// A virtio block device: `path=FILE[,readonly=on][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The serial number the guest reads (`/sys/block/vdX/serial`); by default the file name.
    #[serde(default)]
    pub id: Option<String>,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const USAGE: &str = "path=FILE[,readonly=on][,id=NAME]";
        let options =
            OptionParser::new("a disk", USAGE, &["path", "readonly", "id"]).parse(text)?;
        Ok(DiskConfig {
            path: options.required("path")?.into(),
            read_only: options.toggle("readonly", false)?,
            id: options.get("id").map(str::to_string),
        })
    }
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

/// A virtio network device on a host TAP: `tap=NAME[,mac=MAC][,ip=ADDR/PREFIX][,gw=ADDR][,mtu=N]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// The host TAP interface, normally made beforehand with `ip tuntap add NAME mode tap`.
    pub tap: String,
    /// The guest's MAC address; when absent, a locally administered one derived from `tap`.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// The guest interface's IPv4 address and prefix length, its default route and MTU: the
    /// default guest's agent sets them before it is ready (`ember.net=` on the command line).
    #[serde(default)]
    pub address: Option<(Ipv4Addr, u8)>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

impl NetConfig {
    /// Whether the guest is told how to configure this interface.
    pub fn configures_guest(&self) -> bool {
        self.address.is_some() || self.gateway.is_some() || self.mtu.is_some()
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const USAGE: &str = "tap=NAME[,mac=MAC][,ip=ADDR/PREFIX][,gw=ADDR][,mtu=N]";
        let options = OptionParser::new("a network", USAGE, &["tap", "mac", "ip", "gw", "mtu"])
            .parse(text)?;
        let invalid = |key: &str, value: &str, reason: &str| ConfigError::InvalidValue {
            key: key.into(),
            value: value.into(),
            reason: reason.into(),
        };
        let mac = options
            .get("mac")
            .map(|value| {
                ember_devices::virtio::net::parse_mac(value)
                    .map_err(|e| invalid("mac", value, &e.to_string()))
            })
            .transpose()?;
        let address = options
            .get("ip")
            .map(|value| {
                ember_agent::interface::parse_cidr(value)
                    .ok_or_else(|| invalid("ip", value, "not an IPv4 address/prefix"))
            })
            .transpose()?;
        let mtu = options
            .convert::<u32>("mtu")?
            .map(|mtu| match mtu {
                68..=65535 => Ok(mtu),
                _ => Err(invalid("mtu", &mtu.to_string(), "outside 68-65535")),
            })
            .transpose()?;
        Ok(NetConfig {
            tap: options.required("tap")?.to_string(),
            mac,
            address,
            gateway: options.convert("gw")?,
            mtu,
        })
    }
}

/// The lowest guest CID: 0-2 are the hypervisor, the local loopback and the host.
pub const MIN_GUEST_CID: u32 = 3;

/// A virtio-vsock device: `cid=N,socket=PATH`. The host reaches the guest's port P by connecting to
/// `PATH` and writing `CONNECT P`; the guest reaches the host's port P at `PATH_P` (Firecracker's
/// hybrid vsock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockConfig {
    /// The guest's context ID, at least [`MIN_GUEST_CID`].
    pub cid: u32,
    /// The Unix socket Ember listens on for host-initiated connections.
    pub socket: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        const USAGE: &str = "cid=N,socket=PATH";
        let options = OptionParser::new("a vsock", USAGE, &["cid", "socket"]).parse(text)?;
        let cid: u32 = options.convert("cid")?.ok_or(ConfigError::Missing {
            key: "cid",
            what: "a vsock",
            usage: USAGE,
        })?;
        if cid < MIN_GUEST_CID {
            return Err(ConfigError::InvalidValue {
                key: "cid".into(),
                value: cid.to_string(),
                reason: format!("guest CIDs start at {MIN_GUEST_CID} (0-2 are reserved)"),
            });
        }
        Ok(VsockConfig {
            cid,
            socket: options.required("socket")?.into(),
        })
    }
}

impl From<&VsockConfig> for VsockDeviceConfig {
    fn from(vsock: &VsockConfig) -> Self {
        VsockDeviceConfig {
            guest_cid: u64::from(vsock.cid),
            uds_path: vsock.socket.clone(),
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

    #[test]
    fn option_parser_checks_every_key() {
        let parse = |text| OptionParser::new("a thing", "a=X[,b=Y]", &["a", "b"]).parse(text);
        let options = parse("a=1,b=two").unwrap();
        assert_eq!(options.get("a"), Some("1"));
        assert_eq!(options.convert::<u32>("a"), Ok(Some(1)));
        assert!(options.convert::<u32>("b").is_err());
        assert_eq!(options.get("c"), None);
        assert_eq!(
            parse("a=1,c=2").unwrap_err(),
            ConfigError::UnknownOption {
                item: "c=2".into(),
                what: "a thing",
                usage: "a=X[,b=Y]"
            }
        );
        assert!(matches!(
            parse("a=1,a=2"),
            Err(ConfigError::Repeated { .. })
        ));
        assert!(matches!(parse("a"), Err(ConfigError::UnknownOption { .. })));
        assert!(matches!(parse(""), Err(ConfigError::UnknownOption { .. })));
        assert!(matches!(parse("a="), Err(ConfigError::Empty { .. })));
        let options = parse("b=1").unwrap();
        assert!(matches!(
            options.required("a"),
            Err(ConfigError::Missing { key: "a", .. })
        ));
    }

    #[test]
    fn console_configs() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!("off".parse(), Ok(ConsoleConfig::Off));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert_eq!(
            "file=/tmp/a,b".parse(),
            Ok(ConsoleConfig::File("/tmp/a,b".into()))
        );
        assert!("file=".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn disk_options() {
        assert_eq!(
            "path=/a.img".parse(),
            Ok(DiskConfig {
                path: "/a.img".into(),
                read_only: false,
                id: None
            })
        );
        assert_eq!(
            "path=/a.img,readonly=on,id=data".parse(),
            Ok(DiskConfig {
                path: "/a.img".into(),
                read_only: true,
                id: Some("data".into())
            })
        );
        for bad in [
            "readonly=on",
            "path=",
            "path=/a,ro",
            "path=/a,readonly=maybe",
            "path=/a,path=/b",
            "path=/a,id=",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_names() {
        for good in ["c1", "a-b.example", "0123456789abcdef"] {
            assert_eq!(parse_hostname(good).as_deref(), Ok(good));
        }
        for bad in ["", "-a", "a b", "a..b", "a,b", "x\"", &"a".repeat(65)] {
            assert!(parse_hostname(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_options() {
        assert_eq!(
            "tap=tap0".parse(),
            Ok(NetConfig {
                tap: "tap0".into(),
                ..NetConfig::default()
            })
        );
        assert_eq!(
            "tap=tap0,mac=02:00:00:00:00:01".parse(),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: Some([2, 0, 0, 0, 0, 1]),
                ..NetConfig::default()
            })
        );
        assert_eq!(
            "tap=tap0,ip=10.88.0.5/16,gw=10.88.0.1,mtu=1400".parse(),
            Ok(NetConfig {
                tap: "tap0".into(),
                address: Some((Ipv4Addr::new(10, 88, 0, 5), 16)),
                gateway: Some(Ipv4Addr::new(10, 88, 0, 1)),
                mtu: Some(1400),
                ..NetConfig::default()
            })
        );
        for bad in [
            "mac=02:00:00:00:00:01",
            "tap=tap0,mac=zz",
            "tap=tap0,mac=",
            "tap=tap0,queues=2",
            "tap=tap0,ip=10.0.0.1",
            "tap=tap0,ip=fd00::1/64",
            "tap=tap0,gw=gateway",
            "tap=tap0,mtu=10",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vsock_options() {
        assert_eq!(
            "cid=3,socket=/run/v.sock".parse(),
            Ok(VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into()
            })
        );
        for bad in ["cid=2,socket=/a", "socket=/a", "cid=3", "cid=x,socket=/a"] {
            assert!(bad.parse::<VsockConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_options() {
        assert_eq!(
            "/home/me/src:/src".parse(),
            Ok(VolumeConfig {
                host: "/home/me/src".into(),
                guest: "/src".into(),
                read_only: false
            })
        );
        assert_eq!(
            "data:/mnt/data:ro"
                .parse::<VolumeConfig>()
                .map(|v| v.read_only),
            Ok(true)
        );
        for bad in [
            "/a",
            "/a:b",
            ":/b",
            "/a:/b:x",
            "/a:/b c",
            "/a:/b,c",
            "/a:/b=c",
            "/a:/b:ro:x",
        ] {
            assert!(bad.parse::<VolumeConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vm_config_round_trips_through_serde() {
        let config = VmConfig {
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            cpus: 2,
            memory_bytes: 256 * MIB,
            console: ConsoleConfig::File("/tmp/console".into()),
            software_kvm: SoftwareKvmMode::Auto,
            disks: vec!["path=/a.img,readonly=on".parse().unwrap()],
            nets: vec!["tap=tap0,mac=02:00:00:00:00:01".parse().unwrap()],
            vsock: Some("cid=3,socket=/tmp/v.sock".parse().unwrap()),
            volumes: vec!["/src:/src:ro".parse().unwrap()],
            api_socket: Some("/tmp/api.sock".into()),
            hostname: Some("c1".into()),
        };
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&json).unwrap(), config);
        // Optional fields may be left out.
        let disk: DiskConfig = serde_json::from_str(r#"{"path": "/b.img"}"#).unwrap();
        assert_eq!(disk, "path=/b.img".parse().unwrap());
    }
}
