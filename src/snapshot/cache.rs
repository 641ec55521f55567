//! The warm-start cache: snapshots of guests taken the moment their agent was ready, kept under
//! `${XDG_CACHE_HOME:-~/.cache}/ember/snapshots/KEY/`, so that `ember run -- CMD` resumes one
//! instead of booting (README, "Warm starts").
//!
//! The key is a hash of everything that shapes the guest up to that moment: the Ember binary, the
//! kernel, the initrd, the read-only disks (the image among them), the command line, vCPUs,
//! memory, the vsock CID and the software-KVM mode. Files count by identity (device, inode,
//! size, modification and change times), not content: hashing a kernel would cost more than the
//! warm start saves, and rebuilding any of them changes its identity.
//!
//! Some VMs never get a warm start, for a reason [`plan`] names: a writable disk (the snapshot's
//! page cache would disagree with what later runs wrote to it), a network device (its TAP and
//! the guest's connections belong to one VM) and volumes (virtiofsd's state cannot be in a
//! snapshot).
//!
//! An entry appears whole or not at all: it is written in a staging directory and renamed into
//! place; when two first runs race, the first rename wins and the other's staging copy goes.
//! At most [`MAX_ENTRIES`] entries stay, the least recently used going first.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::file::DiskIdentity;
use crate::config::{SoftwareKvmMode, VmConfig};

/// Entries kept; each is a guest's touched RAM (tens of MiB for the default guest).
pub const MAX_ENTRIES: usize = 8;
/// A staging directory this old belongs to a run that died before renaming it.
const STALE_STAGING: Duration = Duration::from_secs(3600);
const STAGING_PREFIX: &str = ".staging-";

/// What a run should do.
#[derive(Debug)]
pub enum Plan {
    /// Resume this entry's snapshot.
    Hit(CacheEntry),
    /// Boot cold, and save the snapshot into this entry when the agent is ready.
    Miss(CacheEntry),
    /// Boot cold, without the cache, for this reason.
    Cold(String),
}

/// One key's place in the cache.
#[derive(Clone, Debug)]
pub struct CacheEntry {
    /// The snapshot directory (`state` and `memory`), present or not.
    pub dir: PathBuf,
}

/// Decides between the cache and a cold boot for `config` (job mode's, vsock included);
/// `cold` is `--cold`.
pub fn plan(config: &VmConfig, cold: bool) -> Plan {
    if cold {
        return Plan::Cold("--cold".into());
    }
    let Some(root) = crate::image::default_cache_dir() else {
        return Plan::Cold("no cache directory: set HOME or XDG_CACHE_HOME".into());
    };
    plan_in(&root.join("snapshots"), config)
}

fn plan_in(cache: &Path, config: &VmConfig) -> Plan {
    let key = match key(config) {
        Ok(key) => key,
        Err(why) => return Plan::Cold(why),
    };
    let entry = CacheEntry {
        dir: cache.join(key),
    };
    if entry.dir.join("state").is_file() {
        Plan::Hit(entry)
    } else {
        Plan::Miss(entry)
    }
}

/// A file as the key sees it: which file it is (as a snapshot records a disk) and when it last
/// changed.
#[derive(Serialize)]
struct FileIdentity {
    #[serde(flatten)]
    file: DiskIdentity,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    fn of(what: &str, path: &Path) -> Result<Self, String> {
        let cannot = |e: io::Error| format!("cannot identify the {what} {}: {e}", path.display());
        let path = path.canonicalize().map_err(cannot)?;
        let meta = std::fs::metadata(&path).map_err(cannot)?;
        Ok(Self {
            file: DiskIdentity::from_metadata(&path, &meta),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        })
    }
}

/// Everything the key hashes.
#[derive(Serialize)]
struct KeyMaterial<'a> {
    snapshot_format: u32,
    ember: FileIdentity,
    kernel: FileIdentity,
    initrd: Option<FileIdentity>,
    /// Read-only disks, in order, with the serial the guest sees.
    disks: Vec<(FileIdentity, Option<&'a str>)>,
    cmdline: &'a str,
    cpus: u8,
    memory_bytes: u64,
    vsock_cid: Option<u32>,
    software_kvm: SoftwareKvmMode,
}

/// The cache key for `config`, or why it has none.
fn key(config: &VmConfig) -> Result<String, String> {
    if !config.volumes.is_empty() {
        return Err("the VM has volumes, which virtiofsd serves live".into());
    }
    if !config.nets.is_empty() {
        return Err("the VM has a network device, whose TAP is this VM's alone".into());
    }
    if let Some(disk) = config.disks.iter().find(|d| !d.read_only) {
        return Err(format!(
            "{} is a writable disk, which later runs could change under a snapshot",
            disk.path.display()
        ));
    }
    let ember = std::env::current_exe()
        .map_err(|e| format!("cannot find ember's own executable: {e}"))
        .and_then(|exe| FileIdentity::of("ember executable", &exe))?;
    let material = KeyMaterial {
        snapshot_format: super::file::FORMAT_VERSION,
        ember,
        kernel: FileIdentity::of("kernel", &config.kernel)?,
        initrd: config
            .initrd
            .as_deref()
            .map(|initrd| FileIdentity::of("initrd", initrd))
            .transpose()?,
        disks: config
            .disks
            .iter()
            .map(|d| Ok((FileIdentity::of("disk", &d.path)?, d.id.as_deref())))
            .collect::<Result<_, String>>()?,
        cmdline: &config.cmdline,
        cpus: config.cpus,
        memory_bytes: config.memory_bytes,
        vsock_cid: config.vsock.as_ref().map(|v| v.cid),
        software_kvm: config.software_kvm,
    };
    let json = serde_json::to_vec(&material).map_err(|e| format!("cache key: {e}"))?;
    let digest = Sha256::digest(&json);
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

impl CacheEntry {
    fn cache(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("."))
    }

    /// A new directory, beside the entry, to write its snapshot into before
    /// [`commit`](Self::commit).
    pub fn staging(&self) -> io::Result<PathBuf> {
        std::fs::create_dir_all(self.cache())?;
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for n in 0..1000 {
            let path = self
                .cache()
                .join(format!("{STAGING_PREFIX}{name}-{}-{n}", std::process::id()));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free name for a staging directory",
        ))
    }

    /// Puts the snapshot written in `staging` in place. False when another run's snapshot got
    /// there first (it is as good: the staging copy is removed).
    pub fn commit(&self, staging: &Path) -> io::Result<bool> {
        match std::fs::rename(staging, &self.dir) {
            Ok(()) => {
                std::fs::File::open(self.cache())?.sync_all()?;
                evict(self.cache(), MAX_ENTRIES);
                Ok(true)
            }
            // rename(2) onto a non-empty directory: ENOTEMPTY (or EEXIST).
            Err(e) if self.dir.join("state").is_file() => {
                log::debug!("warm start: another run saved this snapshot first ({e})");
                let _ = std::fs::remove_dir_all(staging);
                Ok(false)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(staging);
                Err(e)
            }
        }
    }

    /// Marks the entry as just used, for eviction.
    pub fn touch(&self) {
        let touched =
            std::fs::File::open(&self.dir).and_then(|d| d.set_modified(SystemTime::now()));
        if let Err(e) = touched {
            log::debug!("warm start: cannot mark {} used: {e}", self.dir.display());
        }
    }

    /// Removes the entry (it could not be used). A VM resuming it meanwhile keeps its mapping.
    pub fn discard(&self) {
        // Renamed away first, so that no other run finds a half-removed entry.
        let trash = self
            .cache()
            .join(format!("{STAGING_PREFIX}discarded-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&trash);
        let target = match std::fs::rename(&self.dir, &trash) {
            Ok(()) => &trash,
            Err(_) => &self.dir,
        };
        if let Err(e) = std::fs::remove_dir_all(target) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("cannot remove {}: {e}", target.display());
            }
        }
    }
}

/// Keeps the `keep` most recently used entries of `cache`, and removes staging directories
/// that runs which died left behind.
fn evict(cache: &Path, keep: usize) {
    let Ok(listing) = std::fs::read_dir(cache) else {
        return;
    };
    let now = SystemTime::now();
    let mut entries = Vec::new();
    for item in listing.flatten() {
        let Ok(modified) = item.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if item
            .file_name()
            .to_string_lossy()
            .starts_with(STAGING_PREFIX)
        {
            if now.duration_since(modified).unwrap_or_default() > STALE_STAGING {
                let _ = std::fs::remove_dir_all(item.path());
            }
            continue;
        }
        entries.push((modified, item.path()));
    }
    // Newest first.
    entries.sort_by_key(|entry| std::cmp::Reverse(entry.0));
    for (_, path) in entries.into_iter().skip(keep) {
        log::info!("warm start: evicting {}", path.display());
        let _ = std::fs::remove_dir_all(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConsoleConfig, DiskConfig, NetConfig, VolumeConfig, VsockConfig};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn config(dir: &Path) -> VmConfig {
        std::fs::write(dir.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(dir.join("initrd"), b"initrd").unwrap();
        VmConfig {
            kernel: dir.join("vmlinux"),
            initrd: Some(dir.join("initrd")),
            cmdline: "console=ttyS0".into(),
            cpus: 1,
            memory_bytes: 128 << 20,
            console: ConsoleConfig::Memory,
            software_kvm: SoftwareKvmMode::Auto,
            disks: vec![],
            nets: vec![],
            vsock: Some(VsockConfig {
                cid: 3,
                socket: dir.join("a.sock"),
            }),
            volumes: vec![],
            api_socket: None,
            hostname: None,
        }
    }

    fn key_of(config: &VmConfig) -> String {
        key(config).unwrap()
    }

    #[test]
    fn the_key_follows_what_shapes_the_guest_and_nothing_else() {
        let dir = scratch("key");
        let base = config(&dir);
        let k = key_of(&base);
        assert_eq!(k.len(), 32);
        // This run's sockets and console are not the guest's shape.
        let mut same = base.clone();
        same.vsock.as_mut().unwrap().socket = dir.join("b.sock");
        same.console = ConsoleConfig::Stdio;
        same.api_socket = Some(dir.join("api.sock"));
        assert_eq!(key_of(&same), k);
        let mut changed = Vec::new();
        let mut c = base.clone();
        c.cmdline.push_str(" quiet");
        changed.push(c);
        let mut c = base.clone();
        c.cpus = 2;
        changed.push(c);
        let mut c = base.clone();
        c.memory_bytes <<= 1;
        changed.push(c);
        let mut c = base.clone();
        c.vsock.as_mut().unwrap().cid = 4;
        changed.push(c);
        let mut c = base.clone();
        c.initrd = None;
        changed.push(c);
        std::fs::write(dir.join("image.ext4"), b"image").unwrap();
        let mut c = base.clone();
        c.disks.push(DiskConfig {
            path: dir.join("image.ext4"),
            read_only: true,
            id: Some("image".into()),
        });
        changed.push(c);
        for c in &changed {
            assert_ne!(key_of(c), k, "{c:?}");
        }
        // A rebuilt kernel is another guest.
        std::fs::write(dir.join("vmlinux"), b"kernel, rebuilt").unwrap();
        assert_ne!(key_of(&base), k);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn some_vms_boot_cold_and_say_why() {
        let dir = scratch("cold");
        let base = config(&dir);
        let mut c = base.clone();
        c.disks.push(DiskConfig {
            path: dir.join("initrd"),
            read_only: false,
            id: None,
        });
        assert!(matches!(plan_in(&dir, &c), Plan::Cold(why) if why.contains("writable disk")));
        let mut c = base.clone();
        c.nets.push("tap=tap0".parse::<NetConfig>().unwrap());
        assert!(matches!(plan_in(&dir, &c), Plan::Cold(why) if why.contains("network")));
        let mut c = base.clone();
        c.volumes.push(VolumeConfig {
            host: dir.clone(),
            guest: "/src".into(),
            read_only: false,
        });
        assert!(matches!(plan_in(&dir, &c), Plan::Cold(why) if why.contains("volumes")));
        let mut c = base.clone();
        c.kernel = dir.join("missing");
        assert!(matches!(plan_in(&dir, &c), Plan::Cold(why) if why.contains("kernel")));
        assert!(matches!(plan(&base, true), Plan::Cold(why) if why == "--cold"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn entries_appear_whole_and_the_first_of_two_racing_runs_wins() {
        let dir = scratch("commit");
        let cache = dir.join("snapshots");
        let base = config(&dir);
        let Plan::Miss(entry) = plan_in(&cache, &base) else {
            panic!("a hit in an empty cache");
        };
        let first = entry.staging().unwrap();
        let second = entry.staging().unwrap();
        assert_ne!(first, second);
        std::fs::write(first.join("state"), b"first").unwrap();
        std::fs::write(second.join("state"), b"second").unwrap();
        assert!(entry.commit(&first).unwrap());
        assert!(!entry.commit(&second).unwrap());
        assert!(!second.exists());
        assert_eq!(std::fs::read(entry.dir.join("state")).unwrap(), b"first");
        let Plan::Hit(hit) = plan_in(&cache, &base) else {
            panic!("no hit after a commit");
        };
        hit.discard();
        assert!(matches!(plan_in(&cache, &base), Plan::Miss(_)));
        // Nothing is left behind.
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn eviction_keeps_the_most_recently_used() {
        let dir = scratch("evict");
        for (n, age) in [("old", 300), ("mid", 200), ("new", 100)] {
            let entry = dir.join(n);
            std::fs::create_dir(&entry).unwrap();
            std::fs::File::open(&entry)
                .unwrap()
                .set_modified(SystemTime::now() - Duration::from_secs(age))
                .unwrap();
        }
        let stale = dir.join(format!("{STAGING_PREFIX}x-1-0"));
        let fresh = dir.join(format!("{STAGING_PREFIX}x-2-0"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::create_dir(&fresh).unwrap();
        std::fs::File::open(&stale)
            .unwrap()
            .set_modified(SystemTime::now() - STALE_STAGING * 2)
            .unwrap();
        // Used just now: "old" becomes the newest.
        CacheEntry {
            dir: dir.join("old"),
        }
        .touch();
        evict(&dir, 2);
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [format!("{STAGING_PREFIX}x-2-0"), "new".into(), "old".into()]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
