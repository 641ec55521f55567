//! The snapshot's state file: everything but guest RAM, versioned and checksummed.
//!
//! ```text
//! b"EMBERSNP" | u32 LE format version | u64 LE body length | SHA-256 of the body | body (JSON)
//! ```
//!
//! JSON because the state is small next to the memory file (a vCPU is a few KiB) and a person
//! can read it; the header makes a truncated or altered file, a file of another format version
//! and a file that is not a snapshot each fail with a line naming which. The body also records
//! what the state depends on ([`HostFacts`]): a snapshot restored by another Ember version, or
//! on a CPU of another vendor or with other features, would resume a guest into registers and
//! instructions that are not there, so it is refused rather than tried.

use std::io::{Read, Write};
use std::path::Path;

use ember_devices::ioapic::IoapicState;
use ember_devices::serial::SerialConsoleState;
use ember_devices::virtio::mmio::MmioTransportState;
use kvm_bindings::kvm_clock_data;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::memory::MemoryRegionEntry;
use super::vcpu_state::VcpuState;
use crate::config::VmConfig;

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"EMBERSNP";
/// This format's version: bumped whenever a field changes meaning or is added.
/// 2: `disks`, each disk's identity.
pub const FORMAT_VERSION: u32 = 2;
/// The longest body read back (a VM of 255 vCPUs is ~5 MiB of JSON).
const MAX_BODY: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 32;

/// What a snapshot's state depends on, of the host that took it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Ember's version (`CARGO_PKG_VERSION`).
    pub ember_version: String,
    /// CPUID leaf 0's vendor string.
    pub cpu_vendor: String,
    /// CPUID leaf 1 ECX and EDX, leaf 7 EBX and ECX: the instruction sets a guest may be using.
    pub cpu_features: [u32; 4],
    /// Whether KVM was the software one (kvm_pvm): the guest kernel's workarounds differ.
    pub software_kvm: bool,
}

impl HostFacts {
    /// This host, now.
    pub fn current(software_kvm: bool) -> Self {
        let (leaf0, leaf1, leaf7) = (
            std::arch::x86_64::__cpuid(0),
            std::arch::x86_64::__cpuid(1),
            std::arch::x86_64::__cpuid_count(7, 0),
        );
        let vendor: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        Self {
            ember_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu_vendor: String::from_utf8_lossy(&vendor).into_owned(),
            cpu_features: [leaf1.ecx, leaf1.edx, leaf7.ebx, leaf7.ecx],
            software_kvm,
        }
    }

    /// Why a snapshot taken on `self` cannot resume on `here`, if it cannot.
    pub fn check_restorable_on(&self, here: &HostFacts) -> Result<(), StateFileError> {
        if self.ember_version != here.ember_version {
            return Err(StateFileError::Mismatch(format!(
                "it was taken by Ember {}, this is Ember {}",
                self.ember_version, here.ember_version
            )));
        }
        if self.cpu_vendor != here.cpu_vendor {
            return Err(StateFileError::Mismatch(format!(
                "it was taken on a {} CPU, this one is {}",
                self.cpu_vendor, here.cpu_vendor
            )));
        }
        // Leaf 1 EBX-like fields (APIC ID, counts) are not compared: only feature bits are kept.
        // A feature the guest may use must still be there; extra ones do no harm.
        let missing: Vec<String> = self
            .cpu_features
            .iter()
            .zip(&here.cpu_features)
            .zip(["1.ecx", "1.edx", "7.ebx", "7.ecx"])
            .filter(|((saved, now), _)| *saved & !*now != 0)
            .map(|((saved, now), reg)| format!("CPUID {reg} bits {:#x}", saved & !now))
            .collect();
        if !missing.is_empty() {
            return Err(StateFileError::Mismatch(format!(
                "this CPU lacks features the guest may use: {}",
                missing.join(", ")
            )));
        }
        if self.software_kvm != here.software_kvm {
            return Err(StateFileError::Mismatch(
                "it was taken on another kind of KVM (software vs hardware)".into(),
            ));
        }
        Ok(())
    }
}

/// Which file a disk was when the snapshot was taken: the guest's caches hold its blocks, so a
/// restore must find the same file, the same size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    /// The disk's path.
    pub path: std::path::PathBuf,
    /// The file system it is on, and its inode there.
    pub dev: u64,
    pub ino: u64,
    /// Its size in bytes.
    pub size: u64,
}

impl DiskIdentity {
    /// The file at `path` now.
    pub fn of(path: &Path) -> std::io::Result<Self> {
        Ok(Self::from_metadata(path, &std::fs::metadata(path)?))
    }

    /// The file at `path`, whose metadata the caller has already read.
    pub fn from_metadata(path: &Path, meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
        }
    }

    /// Why the file at this path now is not the disk the snapshot saw, if it is not.
    pub fn check(&self) -> Result<(), StateFileError> {
        let now = Self::of(&self.path).map_err(|e| {
            StateFileError::Mismatch(format!("its disk {}: {e}", self.path.display()))
        })?;
        if (now.dev, now.ino) != (self.dev, self.ino) {
            return Err(StateFileError::Mismatch(format!(
                "its disk {} is another file than the one it was taken with",
                self.path.display()
            )));
        }
        if now.size != self.size {
            return Err(StateFileError::Mismatch(format!(
                "its disk {} is {} bytes, it was {}",
                self.path.display(),
                now.size,
                self.size
            )));
        }
        Ok(())
    }
}

/// One virtio device's saved transport and device state, by its stable slot id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDevice {
    /// The slot's id (`block0`, `net0`, …).
    pub id: String,
    /// The transport's registers and the device's own state.
    pub state: MmioTransportState,
}

/// Everything a snapshot keeps besides guest RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// The host it was taken on.
    pub host: HostFacts,
    /// The VM as configured (the restore rebuilds it from this).
    pub config: VmConfig,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// kvm-clock.
    pub clock: kvm_clock_data,
    /// The userspace IOAPIC.
    pub ioapic: IoapicState,
    /// COM1.
    pub serial: SerialConsoleState,
    /// The virtio devices.
    pub devices: Vec<SavedDevice>,
    /// Guest RAM's regions in the memory file.
    pub memory: Vec<MemoryRegionEntry>,
    /// The disks, in the configuration's order.
    pub disks: Vec<DiskIdentity>,
}

/// Why a state file cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// Reading or writing the file failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Not a snapshot state file.
    #[error("not an Ember snapshot (wrong magic)")]
    NotASnapshot,
    /// Another format version.
    #[error("snapshot format version {found}, this Ember reads version {FORMAT_VERSION}")]
    Version {
        /// The file's version.
        found: u32,
    },
    /// Shorter than its header says, or longer than any snapshot.
    #[error("the state file is truncated or oversized ({0})")]
    Truncated(String),
    /// The body does not match its checksum.
    #[error("the state file is corrupt (checksum mismatch)")]
    Checksum,
    /// The body is not the state this Ember writes.
    #[error("the state file's contents do not parse: {0}")]
    Parse(#[from] serde_json::Error),
    /// It cannot resume on this host.
    #[error("the snapshot cannot be restored here: {0}")]
    Mismatch(String),
}

/// Writes `state` to `path` (a new file, synced).
pub fn write(path: &Path, state: &SnapshotState) -> Result<(), StateFileError> {
    let body = serde_json::to_vec(state)?;
    let mut file = std::fs::File::create(path)?;
    file.write_all(MAGIC)?;
    file.write_all(&FORMAT_VERSION.to_le_bytes())?;
    file.write_all(&(body.len() as u64).to_le_bytes())?;
    file.write_all(&Sha256::digest(&body))?;
    file.write_all(&body)?;
    file.sync_all()?;
    Ok(())
}

/// Reads a state file and checks that it can resume on `here`.
pub fn read(path: &Path, here: &HostFacts) -> Result<SnapshotState, StateFileError> {
    let state = read_unchecked(path)?;
    state.host.check_restorable_on(here)?;
    Ok(state)
}

/// Reads a state file (format, length, checksum), leaving the host check to the caller, which
/// may need the state's own configuration to know what this host is for it.
pub fn read_unchecked(path: &Path) -> Result<SnapshotState, StateFileError> {
    parse(&mut std::fs::File::open(path)?)
}

fn parse(reader: &mut impl Read) -> Result<SnapshotState, StateFileError> {
    let mut header = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(|_| StateFileError::Truncated("no complete header".into()))?;
    if &header[..8] != MAGIC {
        return Err(StateFileError::NotASnapshot);
    }
    let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(StateFileError::Version { found: version });
    }
    let length = u64::from_le_bytes(header[12..20].try_into().unwrap_or_default());
    if length > MAX_BODY {
        return Err(StateFileError::Truncated(format!(
            "a body of {length} bytes"
        )));
    }
    let mut body = Vec::new();
    reader.take(length + 1).read_to_end(&mut body)?;
    if body.len() as u64 != length {
        return Err(StateFileError::Truncated(format!(
            "{} body bytes where the header says {length}",
            body.len()
        )));
    }
    if Sha256::digest(&body).as_slice() != &header[20..] {
        return Err(StateFileError::Checksum);
    }
    Ok(serde_json::from_slice(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_devices::ioapic::{Ioapic, MsiSink};

    struct NoSink;
    impl MsiSink for NoSink {
        fn send(&self, _: u64, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn state() -> SnapshotState {
        SnapshotState {
            host: HostFacts::current(false),
            config: serde_json::from_value(serde_json::json!({
                "kernel": "/k", "initrd": null, "cmdline": "console=ttyS0", "cpus": 1,
                "memory_bytes": 134217728, "console": "stdio", "software_kvm": "auto",
                "disks": [], "nets": []
            }))
            .unwrap(),
            vcpus: Vec::new(),
            clock: kvm_clock_data {
                clock: 123_456,
                ..Default::default()
            },
            ioapic: Ioapic::new(Box::new(NoSink)).save(),
            serial: ember_devices::serial::SerialConsole::new(
                vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
                vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
                Box::new(std::io::sink()),
            )
            .save(),
            devices: Vec::new(),
            memory: Vec::new(),
            disks: Vec::new(),
        }
    }

    fn encoded() -> Vec<u8> {
        // A directory per call: the tests that use it run in parallel.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ember-state-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        write(&path, &state()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
        bytes
    }

    #[test]
    fn a_state_file_round_trips() {
        let bytes = encoded();
        assert_eq!(&bytes[..8], MAGIC);
        let back = parse(&mut &bytes[..]).unwrap();
        assert_eq!(back.clock.clock, 123_456);
        assert_eq!(back.host, HostFacts::current(false));
        assert_eq!(back.ioapic, state().ioapic);
    }

    #[test]
    fn a_disk_must_be_the_same_file_of_the_same_size() {
        let dir = std::env::temp_dir().join(format!("ember-disk-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let saved = DiskIdentity::of(&path).unwrap();
        saved.check().unwrap();
        // Written in place: still the same disk.
        std::fs::write(&path, [1u8; 512]).unwrap();
        saved.check().unwrap();
        std::fs::write(&path, [0u8; 1024]).unwrap();
        let resized = saved.check().unwrap_err().to_string();
        assert!(resized.contains("1024 bytes, it was 512"), "{resized}");
        // Replaced by another file of the same size (kept alive so its inode is not reused).
        let old = dir.join("old.img");
        std::fs::rename(&path, &old).unwrap();
        std::fs::write(&path, [0u8; 512]).unwrap();
        let replaced = saved.check().unwrap_err().to_string();
        assert!(replaced.contains("another file"), "{replaced}");
        std::fs::remove_file(&path).unwrap();
        assert!(saved.check().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_damage_is_named() {
        let good = encoded();
        let fails = |bytes: &[u8]| parse(&mut &bytes[..]).unwrap_err();

        assert!(matches!(fails(&good[..10]), StateFileError::Truncated(_)));
        assert!(matches!(
            fails(&good[..good.len() - 1]),
            StateFileError::Truncated(_)
        ));
        let mut longer = good.clone();
        longer.push(b' ');
        assert!(matches!(fails(&longer), StateFileError::Truncated(_)));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(matches!(fails(&magic), StateFileError::NotASnapshot));
        let mut version = good.clone();
        version[8] = 9;
        assert!(matches!(
            fails(&version),
            StateFileError::Version { found: 9 }
        ));
        let mut huge = good.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(fails(&huge), StateFileError::Truncated(_)));
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 1;
        assert!(matches!(fails(&flipped), StateFileError::Checksum));
        // A checksum that matches a body that is not a state.
        let mut alien = good[..HEADER_LEN].to_vec();
        let body = b"{\"not\":\"a state\"}";
        alien[12..20].copy_from_slice(&(body.len() as u64).to_le_bytes());
        alien[20..].copy_from_slice(&Sha256::digest(body));
        alien.extend_from_slice(body);
        assert!(matches!(fails(&alien), StateFileError::Parse(_)));
    }

    #[test]
    fn another_host_or_version_is_refused_by_name() {
        let here = HostFacts::current(false);
        let mut other = here.clone();
        other.ember_version = "0.0.1".into();
        let e = other.check_restorable_on(&here).unwrap_err().to_string();
        assert!(e.contains("Ember 0.0.1"), "{e}");
        let mut other = here.clone();
        let vendor = if here.cpu_vendor == "AuthenticAMD" {
            "GenuineIntel"
        } else {
            "AuthenticAMD"
        };
        other.cpu_vendor = vendor.into();
        assert!(other
            .check_restorable_on(&here)
            .unwrap_err()
            .to_string()
            .contains(vendor));
        let mut other = here.clone();
        other.cpu_features[2] = !0;
        assert!(other
            .check_restorable_on(&here)
            .unwrap_err()
            .to_string()
            .contains("7.ebx"));
        // Fewer features than the host has is fine.
        let mut fewer = here.clone();
        fewer.cpu_features = [0; 4];
        fewer.check_restorable_on(&here).unwrap();
        let mut other = here.clone();
        other.software_kvm = true;
        assert!(other.check_restorable_on(&here).is_err());
        here.check_restorable_on(&here).unwrap();
    }
}
