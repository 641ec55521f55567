//! Guest root filesystems from images: `--image REF` turns a directory, a rootfs tarball or an
//! OCI/Docker image into a read-only ext4 file, once.
//!
//! The pieces so far: [`unpack`] applies tar layers into a private staging directory
//! (whiteouts, opaque directories, owners, device nodes, xattrs; nothing may land outside it),
//! [`digest`] hashes what it reads.
//!
//! Every failure is one [`ImageError`] that reads as one line; the caller exits 125 on it.

pub mod digest;
pub mod unpack;

use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

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

#[cfg(test)]
mod test_support;
