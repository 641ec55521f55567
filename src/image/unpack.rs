//! Applying tar layers onto a directory, as a container runtime stacks an image's layers, without
//! letting any entry land outside it.
//!
//! Paths are normalised first: `.` components go, and a `..` component or an absolute path
//! refuses the whole image ([`ImageError::PathTraversal`]). No symlink is ever followed while
//! entries are created: every directory on the way to an entry is checked with `lstat` (a
//! missing one is created, a symlink refuses the image, again as path traversal), the entry's
//! own name is unlinked before it is created, and files are opened with `O_CREAT | O_EXCL |
//! O_NOFOLLOW`. Checking by path is enough because the staging directory is private to this
//! process (mode 0700, made by [`super::ext4::Staging`]): nothing else swaps a directory for a
//! symlink between the check and the use. Docker's own layer diffs never write through a
//! symlink (they are taken from overlayfs upper directories, where every path is real), so
//! refusing one costs real images nothing.
//!
//! Layer semantics are the OCI image spec's ("Representing Changes"): a `.wh.NAME` entry deletes
//! NAME as the lower layers left it, `.wh..wh..opq` in a directory hides everything the lower
//! layers put there, and a directory over a directory merges while anything else replaces.
//! Hard links may only name entries already inside the root.
//!
//! # Privilege
//!
//! Owners, set-id bits, device nodes and xattrs are kept, which needs root: a root filesystem is
//! owned by root and by system users, and `mke2fs -d` copies each file's owner from the staging
//! directory as it finds it, so a file that could not be given its owner would be wrong in the
//! image. Ember does not silently leave files owned by the caller: when `chown` or `mknod` is
//! refused the image fails with [`ImageError::NeedsRoot`] naming the entry. A user namespace
//! whose ID map covers every owner the image uses (`podman unshare`, `unshare --map-auto
//! --map-root-user`) is enough for owners, since `mke2fs` then sees the namespace's IDs; it is
//! not enough for character and block devices, which the kernel lets no user namespace create.
//! FIFOs need no privilege. An xattr the staging filesystem refuses (an unprivileged `trusted.*`,
//! a filesystem without `user.*` support) is dropped with a warning: the image stays usable.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::ImageError;

/// The whiteout prefix and the opaque-directory marker of the OCI image spec (after AUFS).
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// The pax header prefix under which GNU tar, Docker and Podman record extended attributes.
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// A tar block: headers and the end-of-archive marker are this long.
const BLOCK: usize = 512;

/// Applies one layer (a plain, gzip or zstd tar stream; told by its magic) onto `root`. `name`
/// says which layer in errors. Returns the sha256 of the uncompressed tar stream (the layer's
/// "DiffID" in an image config), read to its very end.
pub fn apply_layer(reader: impl Read, root: &Path, name: &str) -> Result<String, ImageError> {
    let corrupt = |e| ImageError::corrupt(name, e);
    let stream = super::Compression::open(reader).map_err(corrupt)?;
    let mut tracker = EndTracker::new(super::digest::HashingReader::new(stream));
    let mut layer = Layer::new(root);
    {
        let mut archive = tar::Archive::new(&mut tracker);
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            layer.apply(&mut entry, name)?;
        }
    }
    // The tar crate takes an end of input at a header boundary for the end of the archive; a
    // real end is marked by a block of zeros (two, but one is what the crate reads). Without
    // it the stream was cut short.
    if !tracker.ended_on_zero_block() {
        return Err(corrupt(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the tar archive ends without its end-of-archive marker",
        )));
    }
    // Read the rest (the second zero block, record padding, the gzip trailer whose CRC is
    // checked only there) so that a damaged tail is noticed and the DiffID covers everything.
    io::copy(&mut tracker, &mut io::sink()).map_err(corrupt)?;
    layer.finish()?;
    Ok(tracker.inner.finish())
}

/// Remembers whether the last block read was all zeros: how a tar archive ends.
struct EndTracker<R> {
    inner: R,
    tail: Vec<u8>,
}

impl<R: Read> EndTracker<R> {
    fn new(inner: R) -> Self {
        EndTracker {
            inner,
            tail: Vec::with_capacity(2 * BLOCK),
        }
    }

    fn ended_on_zero_block(&self) -> bool {
        self.tail.len() == BLOCK && self.tail.iter().all(|&b| b == 0)
    }
}

impl<R: Read> Read for EndTracker<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n >= BLOCK {
            self.tail.clear();
            self.tail.extend_from_slice(&buf[n - BLOCK..n]);
        } else {
            self.tail.extend_from_slice(&buf[..n]);
            let excess = self.tail.len().saturating_sub(BLOCK);
            self.tail.drain(..excess);
        }
        Ok(n)
    }
}

/// A layer being applied.
struct Layer<'a> {
    root: &'a Path,
    /// Every path this layer created, and their parents: what an opaque marker or a whiteout in
    /// this same layer leaves alone, whatever the order of the entries.
    written: HashSet<PathBuf>,
    /// Directories whose mode and mtime are set once the layer is done: creating entries in
    /// them changes their mtime, and a read-only mode would stop an unprivileged caller.
    dirs: Vec<(PathBuf, u32, u64)>,
}

/// What an entry's header and pax records say about its metadata.
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<'a> Layer<'a> {
    fn new(root: &'a Path) -> Self {
        Layer {
            root,
            written: HashSet::new(),
            dirs: Vec::new(),
        }
    }

    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<R>, layer: &str) -> Result<(), ImageError> {
        let corrupt = |e| ImageError::corrupt(layer, e);
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(());
        }
        let raw = entry.path().map_err(corrupt)?.into_owned();
        let shown = raw.display().to_string();
        let rel = normalise(&raw, &shown)?;

        if let Some(file_name) = rel.file_name() {
            if file_name.as_bytes() == OPAQUE_MARKER {
                let dir = rel.parent().unwrap_or(Path::new(""));
                self.ensure_parents(&rel, &shown)?;
                self.mark_written(dir);
                return self.clear_lower(dir);
            }
            if let Some(hidden) = file_name.as_bytes().strip_prefix(WHITEOUT_PREFIX) {
                if hidden.is_empty() || hidden == b"." || hidden == b".." {
                    return Err(ImageError::PathTraversal { entry: shown });
                }
                let target = rel.with_file_name(OsStr::from_bytes(hidden));
                if self.parents_exist(&target, &shown)? && !self.written.contains(&target) {
                    remove_any(&self.root.join(&target))?;
                }
                return Ok(());
            }
        }

        let meta = Meta::read(entry, layer)?;
        if rel.as_os_str().is_empty() {
            // `./`: the root itself, whose metadata a tarball may carry.
            if kind != EntryType::Directory {
                return Err(ImageError::PathTraversal { entry: shown });
            }
            self.set_owner_and_xattrs(self.root, &meta, &shown)?;
            self.dirs
                .push((self.root.to_path_buf(), meta.mode, meta.mtime));
            return Ok(());
        }

        self.ensure_parents(&rel, &shown)?;
        let path = self.root.join(&rel);
        let existing = match fs::symlink_metadata(&path) {
            Ok(existing) => Some(existing),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(ImageError::io("inspect", &path, e)),
        };
        // A directory over a directory merges (the lower layers' entries stay); anything else
        // replaces what was there, unlinking it rather than writing through it.
        let keep_dir =
            kind == EntryType::Directory && existing.as_ref().is_some_and(|m| m.is_dir());
        if existing.is_some() && !keep_dir {
            remove_any(&path)?;
        }

        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(|e| ImageError::io("create", &path, e))?;
                copy_content(entry, &mut file, &path, layer)?;
            }
            EntryType::Directory => {
                if !keep_dir {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(|e| ImageError::io("create", &path, e))?;
                }
            }
            EntryType::Symlink => {
                // The target is data, stored as it is: it is never followed here, and in the
                // guest it resolves against the guest's root.
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| corrupt(invalid("a symlink without a target")))?;
                std::os::unix::fs::symlink(&target, &path)
                    .map_err(|e| ImageError::io("create", &path, e))?;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(corrupt)?
                    .ok_or_else(|| corrupt(invalid("a hard link without a target")))?;
                let target = normalise(&target, &shown)?;
                if !self.parents_exist(&target, &shown)?
                    || fs::symlink_metadata(self.root.join(&target)).is_err()
                {
                    return Err(corrupt(invalid(&format!(
                        "hard link {shown:?} to a missing entry"
                    ))));
                }
                // linkat(2) without AT_SYMLINK_FOLLOW: a link to a symlink links the symlink.
                fs::hard_link(self.root.join(&target), &path)
                    .map_err(|e| ImageError::io("link", &path, e))?;
                // The inode already has its metadata; a link's header repeats or contradicts it.
                self.mark_written(&rel);
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                make_node(entry, kind, &meta, &path, &shown, layer)?;
            }
            other => {
                return Err(corrupt(invalid(&format!(
                    "entry {shown:?} has unsupported type {other:?}"
                ))))
            }
        }
        self.mark_written(&rel);

        self.set_owner_and_xattrs(&path, &meta, &shown)?;
        if kind == EntryType::Directory {
            self.dirs.push((path, meta.mode, meta.mtime));
        } else {
            if kind != EntryType::Symlink {
                set_mode(&path, meta.mode)?;
            }
            set_mtime(&path, meta.mtime)?;
        }
        Ok(())
    }

    /// Owner first: `chown` clears set-id bits, so the mode is set after it.
    fn set_owner_and_xattrs(
        &self,
        path: &Path,
        meta: &Meta,
        entry: &str,
    ) -> Result<(), ImageError> {
        let (Ok(uid), Ok(gid)) = (u32::try_from(meta.uid), u32::try_from(meta.gid)) else {
            return Err(ImageError::corrupt(
                entry,
                invalid("an owner ID beyond 32 bits"),
            ));
        };
        match std::os::unix::fs::lchown(path, Some(uid), Some(gid)) {
            Ok(()) => {}
            // EPERM without CAP_CHOWN; EINVAL in a user namespace that does not map the ID.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EINVAL)) => {
                return Err(ImageError::NeedsRoot {
                    entry: entry.to_string(),
                })
            }
            Err(e) => return Err(ImageError::io("chown", path, e)),
        }
        for (name, value) in &meta.xattrs {
            set_xattr(path, name, value, entry)?;
        }
        Ok(())
    }

    /// Checks the directories above `rel`, creating missing ones; a symlink among them refuses
    /// the entry.
    fn ensure_parents(&mut self, rel: &Path, entry: &str) -> Result<(), ImageError> {
        let Some(parent) = rel.parent() else {
            return Ok(());
        };
        let mut path = self.root.to_path_buf();
        for component in parent.components() {
            path.push(component);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(ImageError::PathTraversal {
                        entry: entry.to_string(),
                    })
                }
                Ok(_) => {
                    return Err(ImageError::corrupt(
                        entry,
                        invalid(&format!("entry {entry:?} is below a non-directory")),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // Implied directories get the mode a runtime gives them.
                    fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&path)
                        .map_err(|e| ImageError::io("create", &path, e))?;
                }
                Err(e) => return Err(ImageError::io("inspect", &path, e)),
            }
        }
        Ok(())
    }

    /// Whether every directory above `rel` exists; a symlink among them refuses the entry.
    fn parents_exist(&self, rel: &Path, entry: &str) -> Result<bool, ImageError> {
        let mut path = self.root.to_path_buf();
        for component in rel.parent().unwrap_or(Path::new("")).components() {
            path.push(component);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(ImageError::PathTraversal {
                        entry: entry.to_string(),
                    })
                }
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(e) => return Err(ImageError::io("inspect", &path, e)),
            }
        }
        Ok(true)
    }

    fn mark_written(&mut self, rel: &Path) {
        let mut cur = rel;
        while self.written.insert(cur.to_path_buf()) {
            match cur.parent() {
                Some(parent) => cur = parent,
                None => break,
            }
        }
    }

    /// Removes what the lower layers left in directory `rel`, keeping what this layer wrote.
    fn clear_lower(&self, rel: &Path) -> Result<(), ImageError> {
        let dir = self.root.join(rel);
        let children = fs::read_dir(&dir).map_err(|e| ImageError::io("read", &dir, e))?;
        for child in children {
            let child = child.map_err(|e| ImageError::io("read", &dir, e))?;
            let child_rel = rel.join(child.file_name());
            let child_path = child.path();
            if !self.written.contains(&child_rel) {
                remove_any(&child_path)?;
            } else if child
                .file_type()
                .map_err(|e| ImageError::io("inspect", &child_path, e))?
                .is_dir()
            {
                self.clear_lower(&child_rel)?;
            }
        }
        Ok(())
    }

    /// Directory modes and times, deepest first.
    fn finish(self) -> Result<(), ImageError> {
        for (path, mode, mtime) in self.dirs.iter().rev() {
            set_mode(path, *mode)?;
            set_mtime(path, *mtime)?;
        }
        Ok(())
    }
}

impl Meta {
    fn read<R: Read>(entry: &mut tar::Entry<R>, layer: &str) -> Result<Meta, ImageError> {
        let corrupt = |e| ImageError::corrupt(layer, e);
        let header = entry.header();
        let mut meta = Meta {
            mode: header.mode().map_err(corrupt)? & 0o7777,
            uid: header.uid().map_err(corrupt)?,
            gid: header.gid().map_err(corrupt)?,
            mtime: header.mtime().map_err(corrupt)?,
            xattrs: Vec::new(),
        };
        if let Some(extensions) = entry.pax_extensions().map_err(corrupt)? {
            for extension in extensions {
                let extension = extension.map_err(corrupt)?;
                let Ok(key) = extension.key() else { continue };
                // The tar crate applies a pax `uid` to the header but not `gid`.
                match key {
                    "gid" => meta.gid = parse_pax_id(extension.value_bytes(), layer)?,
                    "uid" => meta.uid = parse_pax_id(extension.value_bytes(), layer)?,
                    _ => {
                        if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                            meta.xattrs
                                .push((name.as_bytes().to_vec(), extension.value_bytes().to_vec()));
                        }
                    }
                }
            }
        }
        Ok(meta)
    }
}

fn parse_pax_id(value: &[u8], layer: &str) -> Result<u64, ImageError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ImageError::corrupt(layer, invalid("a pax uid or gid that is not a number")))
}

/// Turns a tar entry's name into a path relative to the root: `.` components and a leading
/// `./` go; `..`, an absolute path or an empty name refuse the image.
pub fn normalise(raw: &Path, shown: &str) -> Result<PathBuf, ImageError> {
    let mut rel = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(name) => rel.push(name),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(ImageError::PathTraversal {
                    entry: shown.to_string(),
                })
            }
        }
    }
    Ok(rel)
}

/// Copies an entry's content, refusing one that ends early: the tar crate hands out whatever
/// a cut-short archive still has without an error.
fn copy_content(
    entry: &mut impl Read,
    file: &mut fs::File,
    path: &Path,
    layer: &str,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = entry
            .read(&mut buf)
            .map_err(|e| ImageError::corrupt(layer, e))?;
        if n == 0 {
            return Ok(());
        }
        file.write_all(&buf[..n])
            .map_err(|e| ImageError::io("write", path, e))?;
    }
}

fn make_node<R: Read>(
    entry: &tar::Entry<R>,
    kind: EntryType,
    meta: &Meta,
    path: &Path,
    shown: &str,
    layer: &str,
) -> Result<(), ImageError> {
    let corrupt = |e| ImageError::corrupt(layer, e);
    let (file_type, dev) = match kind {
        EntryType::Fifo => (libc::S_IFIFO, 0),
        _ => {
            let major = entry.header().device_major().map_err(corrupt)?.unwrap_or(0);
            let minor = entry.header().device_minor().map_err(corrupt)?.unwrap_or(0);
            let file_type = if kind == EntryType::Char {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            (file_type, libc::makedev(major, minor))
        }
    };
    let c_path = c_path(path)?;
    // SAFETY: `c_path` is a NUL-terminated string that outlives the call; mknod reads nothing
    // else of ours and writes nothing.
    let rc = unsafe { libc::mknod(c_path.as_ptr(), file_type | (meta.mode & 0o777), dev) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EPERM) {
            return Err(ImageError::NeedsRoot {
                entry: shown.to_string(),
            });
        }
        return Err(ImageError::io("create", path, e));
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io("chmod", path, e))
}

/// Sets the modification (and access) time without following a symlink.
fn set_mtime(path: &Path, mtime: u64) -> Result<(), ImageError> {
    let c_path = c_path(path)?;
    let time = libc::timespec {
        tv_sec: mtime.min(i64::MAX as u64) as libc::time_t,
        tv_nsec: 0,
    };
    let times = [time, time];
    // SAFETY: `c_path` is NUL-terminated and `times` is an array of two timespecs, as
    // utimensat(2) reads; both outlive the call.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(ImageError::io(
            "set the time of",
            path,
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Sets one extended attribute on `path` itself (not a symlink's target), dropping it with a
/// warning when the staging filesystem or the caller's privilege does not allow it.
fn set_xattr(path: &Path, name: &[u8], value: &[u8], entry: &str) -> Result<(), ImageError> {
    let c_path = c_path(path)?;
    let Ok(c_name) = CString::new(name) else {
        return Err(ImageError::corrupt(
            entry,
            invalid("an xattr name with a NUL"),
        ));
    };
    // SAFETY: both strings are NUL-terminated, `value` is valid for `value.len()` bytes, and
    // all three outlive the call; lsetxattr(2) only reads them.
    let rc = unsafe {
        libc::lsetxattr(
            c_path.as_ptr(),
            c_name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOTSUP | libc::EPERM | libc::EACCES) => log::warn!(
                "image entry {entry:?}: xattr {} dropped: {e}",
                String::from_utf8_lossy(name)
            ),
            _ => return Err(ImageError::io("set an xattr on", path, e)),
        }
    }
    Ok(())
}

/// Removes a file, a symlink (not its target) or a whole directory tree; nothing there is fine.
fn remove_any(path: &Path) -> Result<(), ImageError> {
    let result = match fs::symlink_metadata(path) {
        // remove_dir_all does not follow symlinks inside the tree.
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| ImageError::io("remove", path, e))
}

fn c_path(path: &Path) -> Result<CString, ImageError> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| ImageError::io("use", path, invalid("a path with a NUL")))
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    use super::*;
    use crate::image::test_support::{temp_dir, Layer};

    fn apply(root: &Path, tar: &[u8]) -> Result<String, ImageError> {
        apply_layer(tar, root, "layer")
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn keeps_modes_owners_links_nodes_and_xattrs() {
        let tmp = temp_dir();
        let root = tmp.as_path();
        let tar = Layer::new()
            .dir("./", 0o755)
            .dir("./etc/", 0o755)
            .file_owned("./etc/shadow", b"secret", 0o640, 0, 42)
            .file_owned("usr/bin/sudo", b"#!", 0o4755, 0, 0)
            .file_owned("home/user/notes", b"hi", 0o600, 1000, 1000)
            .symlink("bin", "usr/bin")
            .symlink("etc/localtime", "/usr/share/zoneinfo/UTC")
            .hardlink("usr/bin/sudoedit", "usr/bin/sudo")
            .device("dev/null", EntryType::Char, 1, 3)
            .device("dev/fifo", EntryType::Fifo, 0, 0)
            .pax(&[("SCHILY.xattr.user.note", b"kept")])
            .file("tagged", b"x")
            .tar();
        apply(root, &tar).unwrap();

        let shadow = fs::metadata(root.join("etc/shadow")).unwrap();
        assert_eq!(
            (shadow.mode() & 0o7777, shadow.uid(), shadow.gid()),
            (0o640, 0, 42)
        );
        assert_eq!(fs::read(root.join("etc/shadow")).unwrap(), b"secret");
        assert_eq!(
            fs::metadata(root.join("usr/bin/sudo")).unwrap().mode() & 0o7777,
            0o4755
        );
        let notes = fs::metadata(root.join("home/user/notes")).unwrap();
        assert_eq!((notes.uid(), notes.gid()), (1000, 1000));
        assert_eq!(
            fs::read_link(root.join("bin")).unwrap(),
            Path::new("usr/bin")
        );
        assert_eq!(
            fs::read_link(root.join("etc/localtime")).unwrap(),
            Path::new("/usr/share/zoneinfo/UTC")
        );
        assert_eq!(
            fs::metadata(root.join("usr/bin/sudoedit")).unwrap().ino(),
            fs::metadata(root.join("usr/bin/sudo")).unwrap().ino()
        );
        let null = fs::metadata(root.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device());
        assert_eq!(null.rdev(), libc::makedev(1, 3));
        assert!(fs::metadata(root.join("dev/fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        assert_eq!(
            fs::metadata(root.join("tagged")).unwrap().mtime(),
            1_700_000_000
        );
        // Directories get their times once the layer is done, so that later entries don't
        // move them.
        assert_eq!(
            fs::metadata(root.join("etc")).unwrap().mtime(),
            1_700_000_000
        );
        let mut value = [0u8; 16];
        let c_path = c_path(&root.join("tagged")).unwrap();
        // SAFETY: NUL-terminated strings and a buffer of the length passed, all outliving the
        // call.
        let len = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                c"user.note".as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        // tmpfs before Linux 6.6 has no user.* xattrs; the layer still applies.
        if len >= 0 {
            assert_eq!(&value[..len as usize], b"kept");
        }
    }

    #[test]
    fn whiteouts_and_opaque_directories_hide_lower_layers() {
        let tmp = temp_dir();
        let root = tmp.as_path();
        let lower = Layer::new()
            .file("etc/keep", b"1")
            .file("etc/gone", b"1")
            .file("var/cache/a", b"1")
            .file("var/cache/sub/b", b"1")
            .file("opt/tree/deep/c", b"1")
            .tar();
        let upper = Layer::new()
            .file("etc/.wh.gone", b"")
            .file("opt/.wh.tree", b"")
            // The upper layer's own entry, before and after the marker, stays.
            .file("var/cache/new", b"2")
            .file("var/cache/.wh..wh..opq", b"")
            .file("var/cache/later", b"2")
            .tar();
        apply(root, &lower).unwrap();
        apply(root, &upper).unwrap();
        assert_eq!(names(&root.join("etc")), ["keep"]);
        assert!(names(&root.join("opt")).is_empty());
        assert_eq!(names(&root.join("var/cache")), ["later", "new"]);
    }

    #[test]
    fn a_later_layer_replaces_files_and_merges_directories() {
        let tmp = temp_dir();
        let root = tmp.as_path();
        apply(
            root,
            &Layer::new().file("a/x", b"1").file("b", b"old").tar(),
        )
        .unwrap();
        apply(
            root,
            &Layer::new()
                .dir("a", 0o700)
                .file("a/y", b"2")
                .dir("b", 0o755)
                .tar(),
        )
        .unwrap();
        assert_eq!(names(&root.join("a")), ["x", "y"]);
        assert_eq!(fs::metadata(root.join("a")).unwrap().mode() & 0o777, 0o700);
        assert!(root.join("b").is_dir());
    }

    fn assert_traversal(tar: &[u8], entry: &str) {
        let tmp = temp_dir();
        let root = tmp.as_path().join("root");
        fs::create_dir(&root).unwrap();
        match apply(&root, tar) {
            Err(ImageError::PathTraversal { entry: refused }) => assert_eq!(refused, entry),
            other => panic!("expected traversal of {entry}, got {other:?}"),
        }
        // Nothing landed beside the root.
        assert_eq!(names(tmp.as_path()), ["root"]);
    }

    #[test]
    fn refuses_entries_outside_the_root() {
        assert_traversal(&Layer::new().file("../x", b"evil").tar(), "../x");
        assert_traversal(&Layer::new().file("a/../../x", b"evil").tar(), "a/../../x");
        assert_traversal(&Layer::new().file("/abs", b"evil").tar(), "/abs");
        assert_traversal(&Layer::new().hardlink("x", "../outside").tar(), "x");
        assert_traversal(&Layer::new().file("etc/.wh...", b"").tar(), "etc/.wh...");
    }

    #[test]
    fn refuses_writing_through_a_symlink() {
        let escape = Layer::new()
            .symlink("a", "/")
            .file("a/etc/passwd", b"root::0:0::/:/bin/sh")
            .tar();
        assert_traversal(&escape, "a/etc/passwd");
        let relative = Layer::new().symlink("a", "..").file("a/x", b"evil").tar();
        assert_traversal(&relative, "a/x");
        // A whiteout reached through a symlink would delete outside the root.
        let whiteout = Layer::new()
            .symlink("a", "/")
            .file("a/etc/.wh.passwd", b"")
            .tar();
        assert_traversal(&whiteout, "a/etc/.wh.passwd");
    }

    #[test]
    fn replaces_a_symlink_instead_of_writing_through_it() {
        let tmp = temp_dir();
        let root = tmp.as_path().join("root");
        fs::create_dir(&root).unwrap();
        let outside = tmp.as_path().join("outside");
        fs::write(&outside, b"untouched").unwrap();
        let tar = Layer::new()
            .symlink("f", outside.to_str().unwrap())
            .file("f", b"new")
            .tar();
        apply(&root, &tar).unwrap();
        assert_eq!(fs::read(&outside).unwrap(), b"untouched");
        assert_eq!(fs::read(root.join("f")).unwrap(), b"new");
    }

    #[test]
    fn refuses_truncated_layers() {
        let tar = Layer::new().file("a", &[7u8; 3000]).file("b", b"bb").tar();
        // Cut inside a file's content, at a header boundary (no end marker), and in a header.
        for cut in [1024, 512 * 7, 512 * 8, 512 * 8 + 100] {
            let tmp = temp_dir();
            match apply(tmp.as_path(), &tar[..cut]) {
                Err(ImageError::Corrupt { .. }) => {}
                other => panic!("a tar cut at {cut} gave {other:?}"),
            }
        }
        let gz = Layer::new().file("a", &[7u8; 3000]).gzip();
        let tmp = temp_dir();
        assert!(matches!(
            apply(tmp.as_path(), &gz[..gz.len() - 6]),
            Err(ImageError::Corrupt { .. })
        ));
        let tmp = temp_dir();
        assert!(matches!(
            apply(tmp.as_path(), b""),
            Err(ImageError::Corrupt { .. })
        ));
    }

    #[test]
    fn reads_gzip_and_zstd_layers_and_returns_the_diff_id() {
        let mut layer = Layer::new();
        layer.file("hello", b"world");
        let tar = layer.tar();
        let mut layer = Layer::new();
        layer.file("hello", b"world");
        for blob in [
            layer.gzip(),
            layer.file("hello", b"world").zstd(),
            tar.clone(),
        ] {
            let tmp = temp_dir();
            let diff_id = apply(tmp.as_path(), &blob).unwrap();
            assert_eq!(diff_id, crate::image::test_support::sha256(&tar));
            assert_eq!(fs::read(tmp.as_path().join("hello")).unwrap(), b"world");
        }
    }
}
