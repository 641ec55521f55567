//! Small tar layers, image layouts and archives built in the tests, and a look inside ext4
//! files through `debugfs`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use super::digest::hex;

/// A tar stream built entry by entry; names are written raw, so hostile ones (`../x`, `/abs`)
/// can be made, which the tar crate's own path setters refuse.
pub struct Layer {
    builder: tar::Builder<Vec<u8>>,
}

impl Layer {
    pub fn new() -> Self {
        Layer {
            builder: tar::Builder::new(Vec::new()),
        }
    }

    fn header(name: &str, kind: EntryType, mode: u32, size: u64) -> Header {
        let mut header = Header::new_ustar();
        let bytes = name.as_bytes();
        assert!(bytes.len() < 100, "test names are short");
        header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        header.set_entry_type(kind);
        header.set_mode(mode);
        header.set_size(size);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(1_700_000_000);
        header
    }

    fn append(&mut self, mut header: Header, data: &[u8]) -> &mut Self {
        header.set_cksum();
        self.builder.append(&header, data).unwrap();
        self
    }

    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.append(Self::header(name, EntryType::Directory, mode, 0), b"")
    }

    pub fn file(&mut self, name: &str, content: &[u8]) -> &mut Self {
        self.file_owned(name, content, 0o644, 0, 0)
    }

    pub fn file_owned(
        &mut self,
        name: &str,
        content: &[u8],
        mode: u32,
        uid: u64,
        gid: u64,
    ) -> &mut Self {
        let mut header = Self::header(name, EntryType::Regular, mode, content.len() as u64);
        header.set_uid(uid);
        header.set_gid(gid);
        self.append(header, content)
    }

    fn link(&mut self, name: &str, target: &str, kind: EntryType) -> &mut Self {
        let mut header = Self::header(name, kind, 0o777, 0);
        let bytes = target.as_bytes();
        header.as_old_mut().linkname[..bytes.len()].copy_from_slice(bytes);
        self.append(header, b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.link(name, target, EntryType::Symlink)
    }

    pub fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.link(name, target, EntryType::Link)
    }

    pub fn device(&mut self, name: &str, kind: EntryType, major: u32, minor: u32) -> &mut Self {
        let mut header = Self::header(name, kind, 0o666, 0);
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
        self.append(header, b"")
    }

    /// A pax extended header for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut data = Vec::new();
        for (key, value) in records {
            // The length counts the whole record, its own digits included.
            let body = key.len() + value.len() + 3;
            let mut len = body + 1;
            while len != body + len.to_string().len() {
                len = body + len.to_string().len();
            }
            data.extend_from_slice(format!("{len} {key}=").as_bytes());
            data.extend_from_slice(value);
            data.push(b'\n');
        }
        let header = Self::header("pax", EntryType::XHeader, 0o644, data.len() as u64);
        self.append(header, &data)
    }

    /// The finished tar, end-of-archive marker included.
    pub fn tar(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, tar::Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }

    pub fn gzip(&mut self) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&self.tar()).unwrap();
        encoder.finish().unwrap()
    }

    pub fn zstd(&mut self) -> Vec<u8> {
        zstd::encode_all(&self.tar()[..], 1).unwrap()
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// An image config with these run settings and DiffIDs for these uncompressed layers.
pub fn config_json(run: serde_json::Value, uncompressed_layers: &[&[u8]]) -> Vec<u8> {
    let diff_ids: Vec<String> = uncompressed_layers
        .iter()
        .map(|layer| format!("sha256:{}", sha256(layer)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .unwrap()
}

/// Writes an OCI image layout into `dir`: `layers` as (blob, uncompressed tar) pairs. Returns
/// the manifest's digest.
pub fn write_layout(dir: &Path, config: &[u8], layers: &[(Vec<u8>, &str)]) -> String {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let digest = sha256(bytes);
        fs::write(blobs.join(&digest), bytes).unwrap();
        format!("sha256:{digest}")
    };
    let layer_descriptors: Vec<_> = layers
        .iter()
        .map(|(blob, media_type)| {
            serde_json::json!({ "mediaType": media_type, "digest": put(blob), "size": blob.len() })
        })
        .collect();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(config),
            "size": config.len(),
        },
        "layers": layer_descriptors,
    }))
    .unwrap();
    let manifest_digest = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    manifest_digest
}

/// A tar of the files under `dir` (as `podman save` makes of a layout), names relative to it.
pub fn tar_of_dir(dir: &Path) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_dir_all(".", dir).unwrap();
    builder.into_inner().unwrap()
}

/// A tar of named in-memory files.
pub fn tar_of_files(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut layer = Layer::new();
    for (name, content) in files {
        layer.file(name, content);
    }
    layer.tar()
}

/// Runs one debugfs request against an ext4 file.
pub fn debugfs(image: &Path, request: &str) -> String {
    let output = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .expect("debugfs (e2fsprogs) is installed");
    assert!(output.status.success(), "debugfs {request} failed");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `(mode, uid, gid)` of a path in an ext4 file, from `debugfs stat`.
pub fn ext4_stat(image: &Path, path: &str) -> (u32, u32, u32) {
    let out = debugfs(image, &format!("stat {path}"));
    let field = |name: &str| -> String {
        let at = out
            .find(name)
            .unwrap_or_else(|| panic!("no {name} for {path}: {out}"));
        out[at + name.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    (
        u32::from_str_radix(&field("Mode:"), 8).unwrap(),
        field("User:").parse().unwrap(),
        field("Group:").parse().unwrap(),
    )
}

/// The names in a directory of an ext4 file, `.` and `..` left out.
pub fn ext4_ls(image: &Path, dir: &str) -> Vec<String> {
    let mut names: Vec<String> = debugfs(image, &format!("ls -p {dir}"))
        .lines()
        // `/inode/mode/uid/gid/name/size/`
        .filter_map(|line| line.split('/').nth(5).map(str::to_string))
        .filter(|name| name != "." && name != ".." && !name.is_empty())
        .collect();
    names.sort();
    names
}

pub fn ext4_cat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("cat {path}"))
}

/// A fresh temporary directory.
pub fn temp_dir() -> vmm_sys_util::tempdir::TempDir {
    vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/ember-image-").unwrap()
}

pub fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    fs::write(path, bytes).unwrap();
    path.to_path_buf()
}
