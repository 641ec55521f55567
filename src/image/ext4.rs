//! Building the ext4 file: a private staging directory in the cache, the file's size, the check
//! that the cache's disk has room for it, and e2fsprogs' `mke2fs -d`, which copies a directory
//! tree (owners, modes, device nodes, xattrs, hard links) into a new filesystem without
//! mounting anything.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ImageError;

/// The block size Ember's images use (and the size estimate counts in).
const BLOCK_SIZE: u64 = 4096;
/// An ext4 inode with room for small xattrs in it (mke2fs's default).
const INODE_SIZE: u64 = 256;
/// Headroom on top of the content: group descriptors, bitmaps, directory blocks that grow as
/// entries are added, xattr blocks.
const SLACK_PERCENT: u64 = 20;
const SLACK_FIXED: u64 = 16 << 20;
/// Image sizes are rounded to this, so that near-equal contents get equal sizes.
const SIZE_ROUNDING: u64 = 4 << 20;
/// Symlink targets up to this long live in the inode itself ("fast symlinks").
const FAST_SYMLINK_MAX: u64 = 59;

/// A directory under the cache where one image is built, removed with everything in it when
/// dropped (a crash leaves it behind; the next [`Staging::create`] removes it).
pub struct Staging {
    path: PathBuf,
}

const STAGING_PREFIX: &str = ".staging-";

impl Staging {
    /// Creates `.staging-<pid>-<n>` under `images`, mode 0700: unpacking relies on no other
    /// user reaching into it (see [`super::unpack`]). Staging directories of processes that no
    /// longer exist are removed first.
    pub fn create(images: &Path) -> Result<Staging, ImageError> {
        remove_stale(images);
        let pid = std::process::id();
        for n in 0..1000 {
            let path = images.join(format!("{STAGING_PREFIX}{pid}-{n}"));
            match fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Staging { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ImageError::io("create", &path, e)),
            }
        }
        Err(ImageError::io(
            "create a staging directory in",
            images,
            io::Error::from(io::ErrorKind::AlreadyExists),
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory layers are unpacked into.
    pub fn root(&self) -> Result<PathBuf, ImageError> {
        let root = self.path.join("root");
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&root)
            .map_err(|e| ImageError::io("create", &root, e))?;
        Ok(root)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Removes `.staging-<pid>-<n>` directories whose process is gone.
fn remove_stale(images: &Path) {
    let Ok(entries) = fs::read_dir(images) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(STAGING_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// What a tree needs in an ext4 filesystem.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSize {
    /// Data and directory blocks, and inode table space, in bytes.
    pub bytes: u64,
    pub inodes: u64,
}

impl TreeSize {
    /// The filesystem size to ask mke2fs for: the content plus 20% plus 16 MiB, rounded up to
    /// 4 MiB.
    pub fn image_bytes(&self) -> u64 {
        let padded = self.bytes + self.bytes * SLACK_PERCENT / 100 + SLACK_FIXED;
        padded.div_ceil(SIZE_ROUNDING) * SIZE_ROUNDING
    }

    /// Inodes to ask for: mke2fs's default ratio (one per 16 KiB) runs out on trees of many
    /// small files.
    pub fn image_inodes(&self) -> u64 {
        self.inodes + self.inodes * SLACK_PERCENT / 100 + 256
    }
}

/// Measures the tree under `root` without following symlinks; hard links count once.
pub fn measure(root: &Path) -> Result<TreeSize, ImageError> {
    let mut size = TreeSize::default();
    let mut seen = HashSet::new();
    measure_dir(root, &mut size, &mut seen)?;
    // The root directory itself.
    size.bytes += BLOCK_SIZE + INODE_SIZE;
    size.inodes += 1;
    Ok(size)
}

fn measure_dir(
    dir: &Path,
    size: &mut TreeSize,
    seen: &mut HashSet<(u64, u64)>,
) -> Result<(), ImageError> {
    for entry in fs::read_dir(dir).map_err(|e| ImageError::io("read", dir, e))? {
        let entry = entry.map_err(|e| ImageError::io("read", dir, e))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(|e| ImageError::io("read", &path, e))?;
        if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        size.inodes += 1;
        size.bytes += INODE_SIZE;
        let file_type = meta.file_type();
        if file_type.is_dir() {
            size.bytes += meta.size().max(BLOCK_SIZE).next_multiple_of(BLOCK_SIZE);
            measure_dir(&path, size, seen)?;
        } else if file_type.is_file() {
            size.bytes += meta.size().next_multiple_of(BLOCK_SIZE);
        } else if file_type.is_symlink() && meta.size() > FAST_SYMLINK_MAX {
            size.bytes += BLOCK_SIZE;
        }
    }
    Ok(())
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
pub fn available_bytes(dir: &Path) -> Result<u64, ImageError> {
    let c_dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| ImageError::io("inspect", dir, io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: an all-zero statvfs is a valid value of a plain C struct of integers.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_dir` is NUL-terminated and `stats` is a statvfs that statvfs(3) fills; both
    // outlive the call.
    if unsafe { libc::statvfs(c_dir.as_ptr(), &mut stats) } != 0 {
        return Err(ImageError::io("inspect", dir, io::Error::last_os_error()));
    }
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// Builds a read-only ext4 image of `root` at `file`, after checking that the filesystem
/// holding `cache` has room for it.
pub fn build(root: &Path, file: &Path, cache: &Path) -> Result<(), ImageError> {
    let tree = measure(root)?;
    let size = tree.image_bytes();
    let available = available_bytes(cache)?;
    if size > available {
        return Err(ImageError::NoSpace {
            dir: cache.to_path_buf(),
            detail: format!(
                "the image needs {} MiB and {} MiB are free",
                size >> 20,
                available >> 20
            ),
        });
    }
    let mke2fs = find_mke2fs()?;
    let output = Command::new(&mke2fs)
        .args(["-q", "-t", "ext4", "-b", "4096"])
        // Read-only: a journal and blocks reserved for root would be space never used.
        .args(["-O", "^has_journal", "-m", "0"])
        .arg("-N")
        .arg(tree.image_inodes().to_string())
        .arg("-d")
        .arg(root)
        // The staging root belongs to whoever unpacked it; the image's root is root's.
        .args(["-E", "root_owner=0:0", "-L", "ember-image"])
        .arg(file)
        .arg(format!("{}k", size >> 10))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| ImageError::Mke2fs {
            detail: format!("cannot run {}: {e}", mke2fs.display()),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        return Err(ImageError::Mke2fs {
            detail: format!(
                "{} ({})",
                last.unwrap_or("no message").trim(),
                output.status
            ),
        });
    }
    Ok(())
}

/// mke2fs lives in /usr/sbin (/sbin), which an unprivileged user's PATH often lacks.
pub(crate) fn find_mke2fs() -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("mke2fs"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| ImageError::Mke2fs {
            detail: "mke2fs not found; install e2fsprogs".to_string(),
        })
}
