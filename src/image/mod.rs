//! Guest root filesystems from images: `--image REF` turns a directory, a rootfs tarball or an
//! OCI/Docker image into a read-only ext4 file, once, and hands back the file with the image's
//! run configuration.
//!
//! The pieces: [`ImageRef::detect`] says what a path holds (by content, not by name),
//! [`unpack`] applies tar layers into a private staging directory (whiteouts, opaque
//! directories, owners, device nodes, xattrs; nothing may land outside it), [`oci`] reads the
//! OCI image layout, `oci-archive` and `docker-archive` forms and checks every blob's digest,
//! and [`ext4`] sizes the file, checks the cache has room and runs e2fsprogs' `mke2fs -d`.
//! [`prepare`] ties them together and caches the result under a key that names the content, so
//! the second run of the same image costs a stat.
//!
//! Unpacking needs root (see [`unpack`]): images hold files owned by other users and sometimes
//! device nodes, and `mke2fs -d` copies owners from the staging directory as it finds them.
//! A directory image needs no unpacking and so no privilege: it is copied as it is.
//!
//! Every failure is one [`ImageError`] that reads as one line; the caller exits 125 on it.

pub mod digest;
pub mod ext4;
pub mod oci;
pub mod unpack;

use std::fs;
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What can go wrong between `--image REF` and an ext4 file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image {} not found", path.display())]
    NotFound { path: PathBuf },
    #[error("{} is not an image: {reason}", path.display())]
    NotAnImage { path: PathBuf, reason: String },
    /// A tar stream, a compressed layer or a JSON document that cannot be read to its end.
    #[error("corrupt or truncated image: {what}")]
    Corrupt {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("digest mismatch in {blob}: expected {expected}, found {actual}")]
    DigestMismatch {
        blob: String,
        expected: String,
        actual: String,
    },
    /// An entry naming `..` or an absolute path, or reached through a symlink.
    #[error("tar entry {entry:?} points outside the image root")]
    PathTraversal { entry: String },
    #[error("tar entry {entry:?} needs root to keep its owner or device node; run ember as root")]
    NeedsRoot { entry: String },
    #[error("not enough space for the image cache in {}: {detail}", dir.display())]
    NoSpace { dir: PathBuf, detail: String },
    #[error("mke2fs failed: {detail}")]
    Mke2fs { detail: String },
    #[error("cannot {action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ImageError {
    /// Wraps a host-side I/O error (not a bad image), except a full disk, which the user
    /// acts on differently.
    pub(crate) fn io(action: &'static str, path: &Path, source: io::Error) -> Self {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return ImageError::NoSpace {
                dir: path.parent().unwrap_or(path).to_path_buf(),
                detail: format!(
                    "the disk filled while trying to {action} {}",
                    path.display()
                ),
            };
        }
        ImageError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>, source: io::Error) -> Self {
        ImageError::Corrupt {
            what: what.into(),
            source,
        }
    }
}

/// How a rootfs tarball is compressed, told by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// Tells the compression from a stream's first bytes: a layer's media type may be missing
    /// or lie (Docker's `.tar` names say nothing), the magic does not.
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// Wraps `reader` in the matching decoder.
    pub fn decoder<'a>(self, reader: impl io::BufRead + 'a) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(reader),
            // Multi-member, as `gzip` itself reads a concatenation of members.
            Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(reader)?),
        })
    }

    /// Opens a possibly compressed stream, telling the compression by its magic.
    pub fn open<'a>(reader: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        let mut reader = BufReader::with_capacity(1 << 16, reader);
        let head = io::BufRead::fill_buf(&mut reader)?;
        Compression::sniff(head).decoder(reader)
    }
}

/// What `--image REF` names, told by content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// A directory holding a root filesystem.
    Dir(PathBuf),
    /// A tarball of a root filesystem (one layer).
    Tarball {
        path: PathBuf,
        compression: Compression,
    },
    /// An OCI image layout directory (`oci-layout` + `index.json` + `blobs/`).
    OciLayout(PathBuf),
    /// A tar of an OCI image layout (`podman save --format oci-archive`; also `docker save`
    /// from Docker 25 on, which writes both forms into one tar).
    OciArchive(PathBuf),
    /// `docker save` / `podman save`: a tar with `manifest.json` naming a config and layers.
    DockerArchive(PathBuf),
}

/// Bytes read from a file's start to tell what it is: tar's magic sits at offset 257.
const SNIFF_BYTES: usize = 512;

impl ImageRef {
    /// Tells what `path` holds.
    pub fn detect(path: &Path) -> Result<ImageRef, ImageError> {
        let meta = match fs::metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(ImageError::io("read", path, e)),
        };
        let not_an_image = |reason: &str| ImageError::NotAnImage {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if meta.is_dir() {
            if path.join("oci-layout").is_file() && path.join("index.json").is_file() {
                return Ok(ImageRef::OciLayout(path.to_path_buf()));
            }
            return Ok(ImageRef::Dir(path.to_path_buf()));
        }
        if !meta.is_file() {
            return Err(not_an_image("neither a directory nor a regular file"));
        }
        let mut file = fs::File::open(path).map_err(|e| ImageError::io("open", path, e))?;
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        (&mut file)
            .take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| ImageError::io("read", path, e))?;
        match Compression::sniff(&head) {
            Compression::None => {}
            compression => {
                file.rewind().map_err(|e| ImageError::io("read", path, e))?;
                return sniff_compressed_tarball(path, file, compression);
            }
        }
        if head.starts_with(b"BZh") || head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
            return Err(not_an_image(
                "bzip2 and xz tarballs are not supported; recompress with gzip or zstd",
            ));
        }
        if !is_tar_header(&head) {
            return Err(not_an_image(
                "not a directory, a tar archive (plain, gzip or zstd) or an OCI image",
            ));
        }
        let names = oci::TarIndex::build(path)?;
        if names.contains("oci-layout") && names.contains("index.json") {
            Ok(ImageRef::OciArchive(path.to_path_buf()))
        } else if names.contains("manifest.json") {
            Ok(ImageRef::DockerArchive(path.to_path_buf()))
        } else {
            Ok(ImageRef::Tarball {
                path: path.to_path_buf(),
                compression: Compression::None,
            })
        }
    }

    /// The path the user named.
    pub fn path(&self) -> &Path {
        match self {
            ImageRef::Dir(path)
            | ImageRef::OciLayout(path)
            | ImageRef::OciArchive(path)
            | ImageRef::DockerArchive(path)
            | ImageRef::Tarball { path, .. } => path,
        }
    }
}

/// A POSIX (`ustar`) or GNU tar header: its magic at offset 257.
fn is_tar_header(head: &[u8]) -> bool {
    head.len() >= 263 && &head[257..262] == b"ustar"
}

/// A compressed file is taken for a rootfs tarball if it holds a tar; one whose first entry is
/// an image's metadata or blobs is a compressed `docker save`, which needs random access to its
/// entries: say so rather than unpack its blobs as a root filesystem.
fn sniff_compressed_tarball(
    path: &Path,
    file: fs::File,
    compression: Compression,
) -> Result<ImageRef, ImageError> {
    let reader = compression
        .decoder(BufReader::new(file))
        .map_err(|e| ImageError::corrupt(path.display().to_string(), e))?;
    let mut head = Vec::with_capacity(SNIFF_BYTES);
    reader
        .take(SNIFF_BYTES as u64)
        .read_to_end(&mut head)
        .map_err(|e| ImageError::corrupt(path.display().to_string(), e))?;
    if !is_tar_header(&head) {
        return Err(ImageError::NotAnImage {
            path: path.to_path_buf(),
            reason: "a compressed file that does not hold a tar archive".to_string(),
        });
    }
    let name_end = head[..100].iter().position(|&b| b == 0).unwrap_or(100);
    let first = String::from_utf8_lossy(&head[..name_end]);
    let first = first.trim_start_matches("./");
    let image_metadata = ["oci-layout", "index.json", "manifest.json", "repositories"];
    if first.starts_with("blobs/") || image_metadata.contains(&first) || is_layer_dir(first) {
        return Err(ImageError::NotAnImage {
            path: path.to_path_buf(),
            reason: "a compressed image archive; decompress it first".to_string(),
        });
    }
    Ok(ImageRef::Tarball {
        path: path.to_path_buf(),
        compression,
    })
}

/// Old `docker save` archives start with a directory named by a layer's 64-hex-digit ID.
fn is_layer_dir(name: &str) -> bool {
    let id = name.split('/').next().unwrap_or("");
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The parts of an image's config that say how to run it, as `docker run` reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `Env`, in order, split at the first `=`.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, resolved in the guest as `docker run` does.
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

impl ImageConfig {
    /// The command `docker run IMAGE [ARGS…]` runs: the entrypoint followed by the user's
    /// arguments, or by the image's `Cmd` when the user gave none. Empty when the image names
    /// no command and the user gave none either.
    pub fn command(&self, override_argv: &[String]) -> Vec<String> {
        let args = if override_argv.is_empty() {
            &self.cmd
        } else {
            override_argv
        };
        self.entrypoint.iter().chain(args).cloned().collect()
    }
}

/// An image made ready to attach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PreparedImage {
    /// The ext4 file, in the cache; attach it read-only (every run of the image shares it).
    pub ext4: PathBuf,
    pub config: ImageConfig,
    /// The cache key: what the file's name is made of.
    pub key: String,
    /// The file was already in the cache: nothing was unpacked or built.
    pub cached: bool,
}

/// The cache's default home: `${XDG_CACHE_HOME:-~/.cache}/ember`; `None` without a home.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("ember"))
}

/// Turns `image` into a read-only ext4 file under `cache_dir/images/`, or finds the one an
/// earlier call made for the same content.
///
/// Work happens in a staging directory beside the cache (so the final rename is atomic and a
/// crash leaves no half-written image under a real key); two Embers preparing the same image at
/// once both build it and the last rename wins, with identical content.
pub fn prepare(image: &ImageRef, cache_dir: &Path) -> Result<PreparedImage, ImageError> {
    let images = cache_dir.join("images");
    fs::create_dir_all(&images).map_err(|e| ImageError::io("create", &images, e))?;
    let source = Source::open(image)?;
    let key = source.key()?;
    let ext4_path = images.join(format!("{key}.ext4"));
    let config_path = images.join(format!("{key}.json"));
    if let Some(config) = cached_config(&ext4_path, &config_path) {
        return Ok(PreparedImage {
            ext4: ext4_path,
            config,
            key,
            cached: true,
        });
    }

    let staging = ext4::Staging::create(&images)?;
    let (root, config) = match &source {
        Source::Dir(dir) => (dir.clone(), ImageConfig::default()),
        Source::Tarball { path, .. } => {
            let root = staging.root()?;
            let file = fs::File::open(path).map_err(|e| ImageError::io("open", path, e))?;
            let name = path.display().to_string();
            unpack::apply_layer(file, &root, &name)?;
            (root, ImageConfig::default())
        }
        Source::Oci(oci) => {
            let root = staging.root()?;
            oci.unpack(&root)?;
            (root, oci.config.clone())
        }
    };
    let built = staging.path().join("image.ext4");
    ext4::build(&root, &built, &images)?;
    let config_tmp = staging.path().join("config.json");
    let json = serde_json::to_vec(&config).expect("an ImageConfig always serialises");
    fs::write(&config_tmp, json).map_err(|e| ImageError::io("write", &config_tmp, e))?;
    // The config first: a present ext4 file is what says "cached", and it must find its config.
    fs::rename(&config_tmp, &config_path).map_err(|e| ImageError::io("write", &config_path, e))?;
    fs::rename(&built, &ext4_path).map_err(|e| ImageError::io("write", &ext4_path, e))?;
    Ok(PreparedImage {
        ext4: ext4_path,
        config,
        key,
        cached: false,
    })
}

/// A cache entry is whole when both files are there and the config parses; anything else is
/// rebuilt.
fn cached_config(ext4_path: &Path, config_path: &Path) -> Option<ImageConfig> {
    if !ext4_path.is_file() {
        return None;
    }
    serde_json::from_slice(&fs::read(config_path).ok()?).ok()
}

/// An image opened far enough to know its cache key and config.
enum Source {
    Dir(PathBuf),
    Tarball { path: PathBuf },
    // Boxed: it holds a whole archive index while the other variants hold a path.
    Oci(Box<oci::OciImage>),
}

impl Source {
    fn open(image: &ImageRef) -> Result<Source, ImageError> {
        Ok(match image {
            ImageRef::Dir(path) => Source::Dir(path.clone()),
            ImageRef::Tarball { path, .. } => Source::Tarball { path: path.clone() },
            ImageRef::OciLayout(path) => Source::Oci(Box::new(oci::OciImage::open_layout(path)?)),
            ImageRef::OciArchive(path) => {
                Source::Oci(Box::new(oci::OciImage::open_oci_archive(path)?))
            }
            ImageRef::DockerArchive(path) => {
                Source::Oci(Box::new(oci::OciImage::open_docker_archive(path)?))
            }
        })
    }

    /// Names the content, so that a changed image gets a new file and an unchanged one the
    /// old file. Keys are file names: letters, digits and `-` only.
    fn key(&self) -> Result<String, ImageError> {
        Ok(match self {
            Source::Dir(dir) => format!("dir-{}", dir_content_hash(dir)?),
            Source::Tarball { path } => {
                let file = fs::File::open(path).map_err(|e| ImageError::io("open", path, e))?;
                let digest =
                    digest::sha256_reader(file).map_err(|e| ImageError::io("read", path, e))?;
                format!("tar-{digest}")
            }
            Source::Oci(oci) => oci.key.clone(),
        })
    }
}

/// A hash over the directory's tree as `mke2fs -d` would copy it: each entry's relative path,
/// type and mode, owner, size, modification time and symlink target, in sorted order. File
/// contents are not read (that would cost as much as building the image); like `make`, a
/// change that keeps size and mtime goes unseen.
fn dir_content_hash(dir: &Path) -> Result<String, ImageError> {
    let mut hasher = Sha256::new();
    hash_dir(dir, Path::new(""), &mut hasher)?;
    Ok(digest::hex(&hasher.finalize()))
}

fn hash_dir(root: &Path, rel: &Path, hasher: &mut Sha256) -> Result<(), ImageError> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(|e| ImageError::io("read", &dir, e))?
        .map(|entry| entry.map(|entry| entry.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| ImageError::io("read", &dir, e))?;
    names.sort();
    for name in names {
        let rel = rel.join(&name);
        let path = root.join(&rel);
        let meta = fs::symlink_metadata(&path).map_err(|e| ImageError::io("read", &path, e))?;
        let target = if meta.file_type().is_symlink() {
            fs::read_link(&path).map_err(|e| ImageError::io("read", &path, e))?
        } else {
            PathBuf::new()
        };
        // NUL ends each field: it cannot occur in a path, so no two trees hash alike by
        // shifting bytes between fields.
        hasher.update(rel.as_os_str().as_bytes());
        hasher.update(b"\0");
        hasher.update(target.as_os_str().as_bytes());
        let record = format!(
            "\0{:o}\0{}\0{}\0{}\0{}\0{}.{}\0",
            meta.mode(),
            meta.uid(),
            meta.gid(),
            meta.size(),
            meta.rdev(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        hasher.update(record.as_bytes());
        if meta.is_dir() {
            hash_dir(root, &rel, hasher)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::test_support::*;
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_combines_entrypoint_and_cmd_as_docker_run() {
        let config = |entrypoint: &[&str], cmd: &[&str]| ImageConfig {
            entrypoint: strings(entrypoint),
            cmd: strings(cmd),
            ..ImageConfig::default()
        };
        // Cmd alone, replaced by the user's arguments.
        let only_cmd = config(&[], &["/bin/sh", "-c", "echo hi"]);
        assert_eq!(
            only_cmd.command(&[]),
            strings(&["/bin/sh", "-c", "echo hi"])
        );
        assert_eq!(
            only_cmd.command(&strings(&["ls", "/"])),
            strings(&["ls", "/"])
        );
        // Entrypoint with Cmd as its default arguments, which the user's replace.
        let both = config(&["/entry.sh"], &["--serve"]);
        assert_eq!(both.command(&[]), strings(&["/entry.sh", "--serve"]));
        assert_eq!(
            both.command(&strings(&["--once"])),
            strings(&["/entry.sh", "--once"])
        );
        // Entrypoint alone.
        let only_entry = config(&["/bin/tool"], &[]);
        assert_eq!(only_entry.command(&[]), strings(&["/bin/tool"]));
        assert_eq!(
            only_entry.command(&strings(&["-v"])),
            strings(&["/bin/tool", "-v"])
        );
        // Neither: nothing to run unless the user says.
        assert!(config(&[], &[]).command(&[]).is_empty());
        assert_eq!(
            config(&[], &[]).command(&strings(&["true"])),
            strings(&["true"])
        );
    }

    #[test]
    fn detects_each_kind_by_content() {
        let tmp = temp_dir();
        let dir = tmp.as_path();
        let tar = Layer::new().file("etc/hostname", b"ember").tar();
        let plain = write(&dir.join("rootfs.img"), &tar);
        let gz = write(&dir.join("rootfs"), &Layer::new().file("a", b"").gzip());
        let zst = write(&dir.join("r.tar.zst"), &Layer::new().file("a", b"").zstd());
        assert_eq!(
            ImageRef::detect(&plain).unwrap(),
            ImageRef::Tarball {
                path: plain.clone(),
                compression: Compression::None
            }
        );
        assert_eq!(
            ImageRef::detect(&gz).unwrap(),
            ImageRef::Tarball {
                path: gz.clone(),
                compression: Compression::Gzip
            }
        );
        assert_eq!(
            ImageRef::detect(&zst).unwrap(),
            ImageRef::Tarball {
                path: zst.clone(),
                compression: Compression::Zstd
            }
        );

        let layout = dir.join("layout");
        write_layout(
            &layout,
            &config_json(serde_json::json!({}), &[&tar]),
            &[(tar.clone(), "")],
        );
        assert_eq!(
            ImageRef::detect(&layout).unwrap(),
            ImageRef::OciLayout(layout.clone())
        );
        let oci_archive = write(&dir.join("image.oci"), &tar_of_dir(&layout));
        assert_eq!(
            ImageRef::detect(&oci_archive).unwrap(),
            ImageRef::OciArchive(oci_archive.clone())
        );
        let docker = write(
            &dir.join("image.tar"),
            &tar_of_files(&[("manifest.json", b"[]"), ("repositories", b"{}")]),
        );
        assert_eq!(
            ImageRef::detect(&docker).unwrap(),
            ImageRef::DockerArchive(docker.clone())
        );
        let rootfs = dir.join("rootfs-dir");
        fs::create_dir(&rootfs).unwrap();
        assert_eq!(
            ImageRef::detect(&rootfs).unwrap(),
            ImageRef::Dir(rootfs.clone())
        );

        assert!(matches!(
            ImageRef::detect(&dir.join("missing")),
            Err(ImageError::NotFound { .. })
        ));
        let junk = write(&dir.join("junk"), b"this is not an image at all");
        assert!(matches!(
            ImageRef::detect(&junk),
            Err(ImageError::NotAnImage { .. })
        ));
        let mut gz_docker = Layer::new();
        gz_docker.file("manifest.json", b"[]");
        let gz_docker = write(&dir.join("saved.tar.gz"), &gz_docker.gzip());
        assert!(matches!(
            ImageRef::detect(&gz_docker),
            Err(ImageError::NotAnImage { .. })
        ));
    }

    #[test]
    fn a_directory_becomes_an_ext4_file_with_its_modes_and_owners() {
        let tmp = temp_dir();
        let rootfs = tmp.as_path().join("rootfs");
        fs::create_dir_all(rootfs.join("etc")).unwrap();
        fs::write(rootfs.join("etc/hostname"), b"ember\n").unwrap();
        fs::set_permissions(
            rootfs.join("etc/hostname"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        std::os::unix::fs::chown(rootfs.join("etc/hostname"), Some(7), Some(8)).unwrap();
        std::os::unix::fs::symlink("etc/hostname", rootfs.join("name")).unwrap();
        let cache = tmp.as_path().join("cache");

        let image = ImageRef::detect(&rootfs).unwrap();
        let prepared = prepare(&image, &cache).unwrap();
        assert!(!prepared.cached);
        assert!(prepared.key.starts_with("dir-"));
        assert_eq!(
            prepared.ext4,
            cache.join("images").join(format!("{}.ext4", prepared.key))
        );
        assert_eq!(prepared.config, ImageConfig::default());
        assert_eq!(ext4_ls(&prepared.ext4, "/"), ["etc", "lost+found", "name"]);
        assert_eq!(ext4_stat(&prepared.ext4, "/etc/hostname"), (0o640, 7, 8));
        assert_eq!(ext4_cat(&prepared.ext4, "/etc/hostname"), "ember\n");
        let (_, root_uid, root_gid) = ext4_stat(&prepared.ext4, "/");
        assert_eq!((root_uid, root_gid), (0, 0));
        // The staging directory is gone.
        assert_eq!(
            fs::read_dir(cache.join("images")).unwrap().count(),
            2,
            "the image and its config only"
        );

        // A change to the tree is a new key.
        fs::write(rootfs.join("etc/motd"), b"hello").unwrap();
        let changed = prepare(&image, &cache).unwrap();
        assert_ne!(changed.key, prepared.key);
        assert_eq!(ext4_cat(&changed.ext4, "/etc/motd"), "hello");
    }

    #[test]
    fn a_tarball_becomes_an_ext4_file_and_the_second_prepare_is_a_cache_hit() {
        let tmp = temp_dir();
        let tarball = write(
            &tmp.as_path().join("rootfs.tar.gz"),
            &Layer::new()
                .dir("./", 0o755)
                .file_owned("./bin/busybox", b"\x7fELF", 0o4755, 0, 0)
                .file_owned("./home/u/f", b"mine", 0o600, 1000, 100)
                .device("./dev/console", tar::EntryType::Char, 5, 1)
                .gzip(),
        );
        let cache = tmp.as_path().join("cache");
        let image = ImageRef::detect(&tarball).unwrap();
        let first = prepare(&image, &cache).unwrap();
        assert!(!first.cached);
        assert!(first.key.starts_with("tar-"));
        assert_eq!(ext4_stat(&first.ext4, "/bin/busybox"), (0o4755, 0, 0));
        assert_eq!(ext4_stat(&first.ext4, "/home/u/f"), (0o600, 1000, 100));
        assert_eq!(ext4_stat(&first.ext4, "/dev/console").0, 0o666);
        assert!(debugfs(&first.ext4, "stat /dev/console").contains("Type: character special"));
        assert_eq!(ext4_cat(&first.ext4, "/home/u/f"), "mine");

        let built_at = fs::metadata(&first.ext4).unwrap().modified().unwrap();
        let second = prepare(&image, &cache).unwrap();
        assert!(second.cached);
        assert_eq!(second.ext4, first.ext4);
        assert_eq!(second.key, first.key);
        assert_eq!(
            fs::metadata(&second.ext4).unwrap().modified().unwrap(),
            built_at
        );
    }

    #[test]
    fn a_bad_tarball_leaves_nothing_in_the_cache() {
        let tmp = temp_dir();
        let tar = Layer::new().file("a", &[1u8; 5000]).tar();
        let cut = write(&tmp.as_path().join("cut.tar"), &tar[..2048]);
        let cache = tmp.as_path().join("cache");
        assert!(matches!(
            ImageRef::detect(&cut),
            Err(ImageError::Corrupt { .. })
        ));
        let image = ImageRef::Tarball {
            path: cut,
            compression: Compression::None,
        };
        assert!(matches!(
            prepare(&image, &cache),
            Err(ImageError::Corrupt { .. })
        ));
        assert_eq!(fs::read_dir(cache.join("images")).unwrap().count(), 0);

        let evil = write(
            &tmp.as_path().join("evil.tar"),
            &Layer::new()
                .symlink("a", "/")
                .file("a/etc/passwd", b"x")
                .tar(),
        );
        let image = ImageRef::detect(&evil).unwrap();
        assert!(matches!(
            prepare(&image, &cache),
            Err(ImageError::PathTraversal { .. })
        ));
        assert_eq!(fs::read_dir(cache.join("images")).unwrap().count(), 0);
    }

    #[test]
    fn sizes_are_content_plus_a_fifth_plus_16_mib_in_4_mib_steps() {
        let size = |bytes| ext4::TreeSize { bytes, inodes: 0 }.image_bytes();
        assert_eq!(size(0), 16 << 20);
        assert_eq!(size(1), 20 << 20);
        assert_eq!(size(100 << 20), 136 << 20);
    }
}
