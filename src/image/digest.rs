//! Content digests: sha256 in lower-case hex, as OCI names blobs (`sha256:<hex>`).

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use super::ImageError;

/// Lower-case hex, as digests are written.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of everything `reader` yields, in hex.
pub fn sha256_reader(mut reader: impl Read) -> io::Result<String> {
    let mut hasher = HashingReader::new(&mut reader);
    io::copy(&mut hasher, &mut io::sink())?;
    Ok(hasher.finish())
}

/// Hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
        }
    }

    /// The sha256 of what was read, in hex.
    pub fn finish(self) -> String {
        hex(&self.hasher.finalize())
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Compares a descriptor's `sha256:<hex>` digest with the hex digest of what was read.
pub fn check_digest(expected: &str, actual_hex: &str) -> Result<(), ImageError> {
    let actual = format!("sha256:{actual_hex}");
    if expected != actual {
        return Err(ImageError::DigestMismatch {
            blob: expected.to_string(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}
