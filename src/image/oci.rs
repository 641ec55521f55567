//! OCI and Docker images: the image layout (a directory, or its tar, `oci-archive`) and
//! `docker save`'s `docker-archive`, read as far as their layers and run configuration.
//!
//! Layout: `index.json` lists manifests (or nested indexes, as multi-platform images have);
//! the one for linux/amd64 (or the only one) names a config and layers, each a blob stored
//! under `blobs/sha256/<hex>`. Every blob's sha256 is checked against the digest that names it
//! before anything in it is used ([`ImageError::DigestMismatch`]). A `docker-archive` has no
//! digests for its files; there each uncompressed layer is checked against the config's
//! `rootfs.diff_ids`, and the config's own sha256 (Docker's image ID) keys the cache.
//!
//! The archives are read in place, without extracting them first: an uncompressed tar's
//! members are contiguous byte ranges, so [`TarIndex`] notes where each one starts and reads
//! it with a seek. That saves a copy of every layer on the cache's disk.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::digest::{check_digest, hex, sha256_reader};
use super::unpack;
use super::{ImageConfig, ImageError};

/// A JSON document in an image is small; more than this is not an image's metadata.
const MAX_JSON_BYTES: u64 = 16 << 20;
/// Nested indexes and symlinked archive members followed at most this deep.
const MAX_INDIRECTIONS: usize = 8;

/// The architecture and OS Ember runs guests of, as OCI platforms name them.
const PLATFORM_ARCH: &str = "amd64";
const PLATFORM_OS: &str = "linux";

/// Where a member of an uncompressed tar file lies, by normalised name.
#[derive(Debug)]
pub struct TarIndex {
    path: PathBuf,
    members: HashMap<String, Member>,
}

#[derive(Debug)]
enum Member {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link; old `docker save` links a repeated layer to its first copy.
    Link(String),
    Other,
}

impl TarIndex {
    /// Reads the headers of the tar file at `path`, seeking past the content.
    pub fn build(path: &Path) -> Result<TarIndex, ImageError> {
        let shown = path.display().to_string();
        let corrupt = |e| ImageError::corrupt(shown.clone(), e);
        let file = fs::File::open(path).map_err(|e| ImageError::io("open", path, e))?;
        let length = file
            .metadata()
            .map_err(|e| ImageError::io("read", path, e))?
            .len();
        let mut archive = tar::Archive::new(file);
        let mut members = HashMap::new();
        for entry in archive.entries_with_seek().map_err(corrupt)? {
            let entry = entry.map_err(corrupt)?;
            let offset = entry.raw_file_position();
            let size = entry.size();
            // Seeking past the end succeeds; the end shows here instead.
            if offset.saturating_add(size) > length {
                return Err(corrupt(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the archive ends inside a member",
                )));
            }
            let Some(name) = member_name(&entry.path().map_err(corrupt)?) else {
                continue;
            };
            let member = match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    Member::File { offset, size }
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name().map_err(corrupt)?.unwrap_or_default();
                    // A symlink's target is relative to its own directory.
                    let base = Path::new(&name).parent().unwrap_or(Path::new(""));
                    match member_name(&base.join(target)) {
                        Some(target) => Member::Link(target),
                        None => Member::Other,
                    }
                }
                tar::EntryType::Link => {
                    let target = entry.link_name().map_err(corrupt)?.unwrap_or_default();
                    match member_name(&target) {
                        Some(target) => Member::Link(target),
                        None => Member::Other,
                    }
                }
                _ => Member::Other,
            };
            members.insert(name, member);
        }
        Ok(TarIndex {
            path: path.to_path_buf(),
            members,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.members.contains_key(name)
    }

    /// Opens the regular file `name`, following links between members.
    fn open(&self, name: &str) -> Result<Box<dyn Read>, ImageError> {
        let mut name = name.to_string();
        for _ in 0..MAX_INDIRECTIONS {
            match self.members.get(&name) {
                Some(Member::File { offset, size }) => {
                    let mut file = fs::File::open(&self.path)
                        .map_err(|e| ImageError::io("open", &self.path, e))?;
                    file.seek(SeekFrom::Start(*offset))
                        .map_err(|e| ImageError::io("read", &self.path, e))?;
                    return Ok(Box::new(file.take(*size)));
                }
                Some(Member::Link(target)) => name = target.clone(),
                Some(Member::Other) | None => break,
            }
        }
        Err(ImageError::NotAnImage {
            path: self.path.clone(),
            reason: format!("it names {name}, which it does not hold as a file"),
        })
    }
}

/// A member's name as a relative path with `/` separators, `./` and `.` dropped and `..`
/// resolved; `None` for one that climbs out of the archive.
fn member_name(path: &Path) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in path.components() {
        match component {
            std::path::Component::Normal(name) => parts.push(name.to_str()?),
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                parts.pop()?;
            }
            _ => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// Where an image's files are: a directory or a tar file.
enum Blobs {
    Dir(PathBuf),
    Tar(TarIndex),
}

impl Blobs {
    fn path(&self) -> &Path {
        match self {
            Blobs::Dir(path) => path,
            Blobs::Tar(index) => &index.path,
        }
    }

    /// Opens `name` (relative, already checked) for reading.
    fn open(&self, name: &str) -> Result<Box<dyn Read>, ImageError> {
        match self {
            Blobs::Dir(dir) => {
                let path = dir.join(name);
                match fs::File::open(&path) {
                    Ok(file) => Ok(Box::new(file)),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ImageError::NotAnImage {
                        path: dir.clone(),
                        reason: format!("it names {name}, which it does not hold"),
                    }),
                    Err(e) => Err(ImageError::io("read", &path, e)),
                }
            }
            Blobs::Tar(index) => index.open(name),
        }
    }

    /// Reads a small file whole.
    fn read(&self, name: &str) -> Result<Vec<u8>, ImageError> {
        let mut bytes = Vec::new();
        self.open(name)?
            .take(MAX_JSON_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| ImageError::corrupt(name, e))?;
        if bytes.len() as u64 > MAX_JSON_BYTES {
            return Err(self.not_an_image(format!("{name} is too big for image metadata")));
        }
        Ok(bytes)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T, ImageError> {
        let bytes = self.read(name)?;
        serde_json::from_slice(&bytes).map_err(|e| ImageError::corrupt(name, io::Error::other(e)))
    }

    fn not_an_image(&self, reason: String) -> ImageError {
        ImageError::NotAnImage {
            path: self.path().to_path_buf(),
            reason,
        }
    }

    /// The blob a descriptor names, read whole and checked against its digest.
    fn read_verified(&self, descriptor: &Descriptor) -> Result<Vec<u8>, ImageError> {
        let name = self.blob_name(&descriptor.digest)?;
        let bytes = self.read(&name)?;
        let actual = hex(&Sha256::digest(&bytes));
        check_digest(&descriptor.digest, &actual)?;
        Ok(bytes)
    }

    /// The path of the blob `digest` names; only sha256 digests are accepted, and only as 64 hex
    /// digits, so a digest cannot name a path outside `blobs/`.
    fn blob_name(&self, digest: &str) -> Result<String, ImageError> {
        match digest.strip_prefix("sha256:") {
            Some(hex) if is_sha256_hex(hex) => Ok(format!("blobs/sha256/{hex}")),
            _ => Err(self.not_an_image(format!("unsupported digest {digest:?}"))),
        }
    }
}

fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// An OCI content descriptor, as far as Ember reads one.
#[derive(Clone, Debug, Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Clone, Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

/// An index or a manifest: OCI allows a descriptor without a media type, so both are read
/// as one shape and told apart by which lists they have.
#[derive(Debug, Deserialize)]
struct IndexOrManifest {
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// An image config (OCI and Docker share the fields Ember reads).
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

/// One entry of a `docker-archive`'s `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifest {
    config: String,
    layers: Vec<String>,
}

/// A layer to apply: where it is, the digest of its blob when the format has one, and the
/// digest its uncompressed tar must have when the config lists one.
#[derive(Debug)]
struct LayerRef {
    name: String,
    blob_digest: Option<String>,
    diff_id: Option<String>,
}

/// An OCI or Docker image opened as far as its config: enough to key the cache and to say how
/// to run it; [`OciImage::unpack`] reads the layers.
pub struct OciImage {
    blobs: Blobs,
    layers: Vec<LayerRef>,
    pub config: ImageConfig,
    /// `oci-<manifest digest>` or `docker-<image ID>`.
    pub key: String,
}

impl OciImage {
    /// An image layout directory.
    pub fn open_layout(dir: &Path) -> Result<OciImage, ImageError> {
        Self::from_layout(Blobs::Dir(dir.to_path_buf()))
    }

    /// An `oci-archive`: a tar of an image layout.
    pub fn open_oci_archive(path: &Path) -> Result<OciImage, ImageError> {
        Self::from_layout(Blobs::Tar(TarIndex::build(path)?))
    }

    /// A `docker-archive`.
    pub fn open_docker_archive(path: &Path) -> Result<OciImage, ImageError> {
        let blobs = Blobs::Tar(TarIndex::build(path)?);
        let manifests: Vec<DockerManifest> = blobs.read_json("manifest.json")?;
        let manifest = match manifests.as_slice() {
            [manifest] => manifest,
            [] => return Err(blobs.not_an_image("manifest.json lists no image".into())),
            _ => {
                return Err(blobs.not_an_image(format!(
                    "it holds {} images; save one image per archive",
                    manifests.len()
                )))
            }
        };
        let config_name = archive_path(&manifest.config)?;
        let config_bytes = blobs.read(&config_name)?;
        let image_id = hex(&Sha256::digest(&config_bytes));
        let (config, diff_ids) = parse_config(&blobs, &config_bytes, &config_name)?;
        let layers = manifest
            .layers
            .iter()
            .map(|layer| archive_path(layer))
            .collect::<Result<Vec<_>, _>>()?;
        let layers = with_diff_ids(&blobs, layers, None, diff_ids)?;
        Ok(OciImage {
            blobs,
            layers,
            config,
            key: format!("docker-{image_id}"),
        })
    }

    fn from_layout(blobs: Blobs) -> Result<OciImage, ImageError> {
        let index: IndexOrManifest = blobs.read_json("index.json")?;
        let mut manifests = index.manifests.unwrap_or_default();
        let mut depth = 0;
        let (descriptor, manifest) = loop {
            let descriptor = choose_manifest(&blobs, &manifests)?;
            let manifest: IndexOrManifest =
                serde_json::from_slice(&blobs.read_verified(&descriptor)?).map_err(|e| {
                    ImageError::corrupt(descriptor.digest.clone(), io::Error::other(e))
                })?;
            match manifest.manifests {
                // A nested index: a multi-platform image.
                Some(nested) if manifest.layers.is_none() => {
                    depth += 1;
                    if depth > MAX_INDIRECTIONS {
                        return Err(blobs.not_an_image("indexes nest too deep".into()));
                    }
                    manifests = nested;
                }
                _ => break (descriptor, manifest),
            }
        };
        let (Some(config_descriptor), Some(layer_descriptors)) = (manifest.config, manifest.layers)
        else {
            return Err(blobs.not_an_image(format!(
                "manifest {} has no config or no layers",
                descriptor.digest
            )));
        };
        let config_bytes = blobs.read_verified(&config_descriptor)?;
        let (config, diff_ids) = parse_config(&blobs, &config_bytes, &config_descriptor.digest)?;
        let mut names = Vec::new();
        let mut digests = Vec::new();
        for layer in &layer_descriptors {
            if layer.media_type.contains("encrypted") {
                return Err(blobs.not_an_image("its layers are encrypted".into()));
            }
            names.push(blobs.blob_name(&layer.digest)?);
            digests.push(layer.digest.clone());
        }
        let layers = with_diff_ids(&blobs, names, Some(digests), diff_ids)?;
        let key = format!("oci-{}", descriptor.digest.trim_start_matches("sha256:"));
        Ok(OciImage {
            blobs,
            layers,
            config,
            key,
        })
    }

    /// Applies the layers in order onto `root`, checking each blob's digest before reading it
    /// as a tar (nothing unverified is parsed) and each uncompressed stream against its DiffID.
    pub fn unpack(&self, root: &Path) -> Result<(), ImageError> {
        for layer in &self.layers {
            if let Some(expected) = &layer.blob_digest {
                let actual = sha256_reader(self.blobs.open(&layer.name)?)
                    .map_err(|e| ImageError::corrupt(layer.name.clone(), e))?;
                check_digest(expected, &actual)?;
            }
            let diff_id = unpack::apply_layer(self.blobs.open(&layer.name)?, root, &layer.name)?;
            if let Some(expected) = &layer.diff_id {
                check_digest(expected, &diff_id).map_err(|e| match e {
                    ImageError::DigestMismatch {
                        expected, actual, ..
                    } => ImageError::DigestMismatch {
                        blob: layer.name.clone(),
                        expected,
                        actual,
                    },
                    other => other,
                })?;
            }
        }
        Ok(())
    }
}

/// The manifest to use: the only one, or the one for linux/amd64.
fn choose_manifest(blobs: &Blobs, manifests: &[Descriptor]) -> Result<Descriptor, ImageError> {
    if let [only] = manifests {
        return Ok(only.clone());
    }
    manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| p.os == PLATFORM_OS && p.architecture == PLATFORM_ARCH)
        })
        .cloned()
        .ok_or_else(|| {
            blobs.not_an_image(if manifests.is_empty() {
                "its index lists no manifest".to_string()
            } else {
                format!("it has no manifest for {PLATFORM_OS}/{PLATFORM_ARCH}")
            })
        })
}

/// A `docker-archive` member named in `manifest.json`: relative, inside the archive.
fn archive_path(name: &str) -> Result<String, ImageError> {
    let rel = unpack::normalise(Path::new(name), name)?;
    member_name(&rel).ok_or_else(|| ImageError::PathTraversal {
        entry: name.to_string(),
    })
}

fn with_diff_ids(
    blobs: &Blobs,
    names: Vec<String>,
    digests: Option<Vec<String>>,
    diff_ids: Vec<String>,
) -> Result<Vec<LayerRef>, ImageError> {
    // A config whose DiffIDs do not match the layers in number describes another image.
    if !diff_ids.is_empty() && diff_ids.len() != names.len() {
        return Err(blobs.not_an_image(format!(
            "its config lists {} layers and its manifest {}",
            diff_ids.len(),
            names.len()
        )));
    }
    let mut digests = digests.map(Vec::into_iter);
    let mut diff_ids = diff_ids.into_iter();
    Ok(names
        .into_iter()
        .map(|name| LayerRef {
            name,
            blob_digest: digests.as_mut().and_then(Iterator::next),
            diff_id: diff_ids.next(),
        })
        .collect())
}

/// The run configuration and the layers' DiffIDs, from a config blob.
fn parse_config(
    blobs: &Blobs,
    bytes: &[u8],
    name: &str,
) -> Result<(ImageConfig, Vec<String>), ImageError> {
    let file: ConfigFile = serde_json::from_slice(bytes)
        .map_err(|e| ImageError::corrupt(name, io::Error::other(e)))?;
    if let Some(arch) = file.architecture.as_deref().filter(|a| *a != PLATFORM_ARCH) {
        return Err(blobs.not_an_image(format!("it is built for {arch}, not {PLATFORM_ARCH}")));
    }
    if let Some(os) = file.os.as_deref().filter(|os| *os != PLATFORM_OS) {
        return Err(blobs.not_an_image(format!("it is built for {os}, not {PLATFORM_OS}")));
    }
    let run = file.config.unwrap_or_default();
    let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let config = ImageConfig {
        env: run
            .env
            .unwrap_or_default()
            .into_iter()
            .map(|var| match var.split_once('=') {
                Some((name, value)) => (name.to_string(), value.to_string()),
                None => (var, String::new()),
            })
            .collect(),
        working_dir: non_empty(run.working_dir),
        user: non_empty(run.user),
        entrypoint: run.entrypoint.unwrap_or_default(),
        cmd: run.cmd.unwrap_or_default(),
    };
    Ok((config, file.rootfs.unwrap_or_default().diff_ids))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::test_support::*;
    use crate::image::{prepare, ImageRef};

    fn run_config() -> serde_json::Value {
        serde_json::json!({
            "Env": ["PATH=/usr/bin:/bin", "GREETING=a=b"],
            "WorkingDir": "/srv",
            "User": "1000:1000",
            "Entrypoint": ["/bin/greet"],
            "Cmd": ["--loud"],
        })
    }

    /// Two layers: the upper deletes a file and hides a directory's lower content.
    fn two_layers() -> (Vec<u8>, Vec<u8>) {
        let lower = Layer::new()
            .file("bin/greet", b"#!/bin/sh")
            .file("etc/old", b"old")
            .file("srv/data/a", b"a")
            .tar();
        let upper = Layer::new()
            .file("etc/.wh.old", b"")
            .file("srv/data/.wh..wh..opq", b"")
            .file("srv/data/b", b"b")
            .tar();
        (lower, upper)
    }

    fn check_image(ext4: &Path) {
        assert_eq!(ext4_ls(ext4, "/etc"), Vec::<String>::new());
        assert_eq!(ext4_ls(ext4, "/srv/data"), ["b"]);
        assert_eq!(ext4_cat(ext4, "/bin/greet"), "#!/bin/sh");
    }

    fn expected_config() -> ImageConfig {
        ImageConfig {
            env: vec![
                ("PATH".into(), "/usr/bin:/bin".into()),
                ("GREETING".into(), "a=b".into()),
            ],
            working_dir: Some("/srv".into()),
            user: Some("1000:1000".into()),
            entrypoint: vec!["/bin/greet".into()],
            cmd: vec!["--loud".into()],
        }
    }

    fn gzip(tar: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut encoder, tar).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn an_oci_layout_and_its_archive_become_the_same_image() {
        let tmp = temp_dir();
        let (lower, upper) = two_layers();
        let layout = tmp.as_path().join("layout");
        let manifest = write_layout(
            &layout,
            &config_json(run_config(), &[&lower, &upper]),
            &[
                (gzip(&lower), "application/vnd.oci.image.layer.v1.tar+gzip"),
                (upper.clone(), "application/vnd.oci.image.layer.v1.tar"),
            ],
        );
        let cache = tmp.as_path().join("cache");
        let prepared = prepare(&ImageRef::detect(&layout).unwrap(), &cache).unwrap();
        assert_eq!(
            prepared.key,
            format!("oci-{}", manifest.trim_start_matches("sha256:"))
        );
        assert_eq!(prepared.config, expected_config());
        check_image(&prepared.ext4);

        let archive = write(&tmp.as_path().join("image.oci.tar"), &tar_of_dir(&layout));
        let from_archive = prepare(&ImageRef::detect(&archive).unwrap(), &cache).unwrap();
        assert!(from_archive.cached, "the same manifest is the same image");
        assert_eq!(from_archive.ext4, prepared.ext4);
        assert_eq!(from_archive.config, expected_config());

        // Built afresh from the archive, too.
        let other_cache = tmp.as_path().join("cache2");
        let built = prepare(&ImageRef::detect(&archive).unwrap(), &other_cache).unwrap();
        assert!(!built.cached);
        check_image(&built.ext4);
    }

    #[test]
    fn a_tampered_blob_is_a_digest_mismatch() {
        let tmp = temp_dir();
        let (lower, upper) = two_layers();
        let layout = tmp.as_path().join("layout");
        write_layout(
            &layout,
            &config_json(run_config(), &[&lower, &upper]),
            &[(lower.clone(), ""), (upper.clone(), "")],
        );
        let upper_blob = layout.join("blobs/sha256").join(sha256(&upper));
        let mut tampered = upper.clone();
        tampered[600] ^= 1;
        fs::write(&upper_blob, &tampered).unwrap();
        let cache = tmp.as_path().join("cache");
        match prepare(&ImageRef::detect(&layout).unwrap(), &cache) {
            Err(ImageError::DigestMismatch { expected, .. }) => {
                assert_eq!(expected, format!("sha256:{}", sha256(&upper)))
            }
            other => panic!("expected a digest mismatch, got {other:?}"),
        }
        assert_eq!(fs::read_dir(cache.join("images")).unwrap().count(), 0);

        // A tampered index entry's manifest is caught before anything else is read.
        let manifest_blob = fs::read_dir(layout.join("blobs/sha256"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| fs::read(p).unwrap().starts_with(b"{\"config\""))
            .unwrap();
        let mut manifest = fs::read(&manifest_blob).unwrap();
        manifest.push(b' ');
        fs::write(&manifest_blob, manifest).unwrap();
        assert!(matches!(
            prepare(&ImageRef::detect(&layout).unwrap(), &cache),
            Err(ImageError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn a_multi_platform_index_picks_linux_amd64() {
        let tmp = temp_dir();
        let layer = Layer::new().file("amd64", b"yes").tar();
        let inner = tmp.as_path().join("inner");
        let manifest = write_layout(
            &inner,
            &config_json(run_config(), &[&layer]),
            &[(layer, "")],
        );
        let manifest_size = fs::read(inner.join("blobs/sha256").join(&manifest[7..]))
            .unwrap()
            .len();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                { "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "digest": format!("sha256:{}", "0".repeat(64)), "size": 1,
                  "platform": { "architecture": "arm64", "os": "linux" } },
                { "mediaType": "application/vnd.oci.image.manifest.v1+json",
                  "digest": manifest, "size": manifest_size,
                  "platform": { "architecture": "amd64", "os": "linux" } },
            ],
        });
        fs::write(
            inner.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
        let prepared = prepare(&ImageRef::OciLayout(inner), &tmp.as_path().join("c")).unwrap();
        assert_eq!(ext4_cat(&prepared.ext4, "/amd64"), "yes");
    }

    /// A `docker save` archive in the classic layout: `<id>/layer.tar`, `<id>.json`.
    fn docker_archive(layers: &[&[u8]], diff_ids_of: &[&[u8]]) -> Vec<u8> {
        let config = config_json(run_config(), diff_ids_of);
        let config_name = format!("{}.json", sha256(&config));
        let layer_names: Vec<String> = layers
            .iter()
            .map(|layer| format!("{}/layer.tar", sha256(layer)))
            .collect();
        let manifest = serde_json::to_vec(&serde_json::json!([{
            "Config": config_name,
            "RepoTags": ["example:latest"],
            "Layers": layer_names,
        }]))
        .unwrap();
        let mut files: Vec<(&str, &[u8])> = vec![(&config_name, &config)];
        for (name, layer) in layer_names.iter().zip(layers) {
            files.push((name, layer));
        }
        files.push(("manifest.json", &manifest));
        tar_of_files(&files)
    }

    #[test]
    fn a_docker_archive_becomes_an_image_and_its_diff_ids_are_checked() {
        let tmp = temp_dir();
        let (lower, upper) = two_layers();
        let archive = write(
            &tmp.as_path().join("saved.tar"),
            &docker_archive(&[&lower, &upper], &[&lower, &upper]),
        );
        let image = ImageRef::detect(&archive).unwrap();
        assert_eq!(image, ImageRef::DockerArchive(archive.clone()));
        let prepared = prepare(&image, &tmp.as_path().join("cache")).unwrap();
        assert!(prepared.key.starts_with("docker-"));
        assert_eq!(prepared.config, expected_config());
        check_image(&prepared.ext4);

        // A layer that is not the one the config names. (A fresh cache: the image ID, which
        // keys the cache, is the config's digest, so the cache holds the genuine image.)
        let other = Layer::new().file("x", b"x").tar();
        let swapped = write(
            &tmp.as_path().join("swapped.tar"),
            &docker_archive(&[&lower, &other], &[&lower, &upper]),
        );
        assert!(matches!(
            prepare(
                &ImageRef::detect(&swapped).unwrap(),
                &tmp.as_path().join("cache2")
            ),
            Err(ImageError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn a_truncated_archive_or_a_climbing_layer_path_is_refused() {
        let tmp = temp_dir();
        let (lower, upper) = two_layers();
        let whole = docker_archive(&[&lower, &upper], &[&lower, &upper]);
        let cut = write(&tmp.as_path().join("cut.tar"), &whole[..whole.len() - 3000]);
        assert!(matches!(
            OciImage::open_docker_archive(&cut),
            Err(ImageError::Corrupt { .. })
        ));

        let manifest = br#"[{"Config":"c.json","Layers":["../../etc/passwd"]}]"#;
        let climbing = write(
            &tmp.as_path().join("climb.tar"),
            &tar_of_files(&[("c.json", b"{}"), ("manifest.json", manifest)]),
        );
        assert!(matches!(
            OciImage::open_docker_archive(&climbing),
            Err(ImageError::PathTraversal { .. })
        ));
    }
}
