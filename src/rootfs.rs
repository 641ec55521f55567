//! `--image` and `--scratch`: what the guest's root is made of.
//!
//! The image becomes a read-only ext4 file once (`crate::image`, cached by content) and is
//! attached as the last virtio-blk disk, read-only, so that every VM of the image shares it and
//! none can change it. The default guest's init mounts it as the lower layer of an overlay whose
//! upper layer is a tmpfs, or with `--scratch SIZE` a sparse ext4 disk of its own, deleted at
//! exit; commands run chrooted into that overlay (`ember.image=`, `ember.scratch=`).

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{DiskConfig, VmConfig};
use crate::image::ext4::find_mke2fs;
use crate::image::{self, ImageConfig, ImageError, ImageRef};
use crate::job::{JobSpec, PrivateDir};

/// Why the guest's root could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("no cache directory for images: set HOME or XDG_CACHE_HOME")]
    NoCache,
    #[error("cannot make the scratch disk")]
    Scratch(#[source] io::Error),
    #[error("mke2fs failed on the scratch disk: {0}")]
    ScratchFormat(String),
    #[error("--image and a volume at / both make the guest's root: use one of them")]
    TwoRoots,
    #[error("more than one volume at /: the guest has one root")]
    TwoRootVolumes,
}

/// What was prepared, kept until the VM is gone (the scratch disk is deleted with it).
pub struct Rootfs {
    /// The image's config, to apply to a job's command.
    pub image: Option<ImageConfig>,
    _scratch_dir: Option<PrivateDir>,
}

impl Rootfs {
    /// Prepares `image` and `scratch_bytes` and adds their disks and command-line options to
    /// `config`.
    pub fn prepare(
        config: &mut VmConfig,
        image: Option<&Path>,
        scratch_bytes: Option<u64>,
    ) -> Result<Self, RootfsError> {
        // A volume at / is the root for commands (a host directory, shared live).
        let root_volumes = config.volumes.iter().filter(|v| v.guest == "/").count();
        if root_volumes > 1 {
            return Err(RootfsError::TwoRootVolumes);
        }
        if root_volumes == 1 && image.is_some() {
            return Err(RootfsError::TwoRoots);
        }
        let Some(image) = image else {
            return Ok(Self {
                image: None,
                _scratch_dir: None,
            });
        };
        let cache = image::default_cache_dir().ok_or(RootfsError::NoCache)?;
        let prepared = image::prepare(&ImageRef::detect(image)?, &cache)?;
        log::info!(
            "image {} -> {} ({})",
            image.display(),
            prepared.ext4.display(),
            if prepared.cached { "cached" } else { "built" }
        );
        let image_disk = disk_name(config.disks.len());
        config.disks.push(DiskConfig {
            path: prepared.ext4.clone(),
            read_only: true,
            id: Some("image".into()),
        });
        config
            .cmdline
            .push_str(&format!(" ember.image={image_disk}"));
        let mut scratch_dir = None;
        if let Some(bytes) = scratch_bytes {
            let dir = PrivateDir::create().map_err(RootfsError::Scratch)?;
            let path = dir.path().join("scratch.ext4");
            make_scratch(&path, bytes)?;
            let scratch_disk = disk_name(config.disks.len());
            config.disks.push(DiskConfig {
                path,
                read_only: false,
                id: Some("scratch".into()),
            });
            config
                .cmdline
                .push_str(&format!(" ember.scratch={scratch_disk}"));
            scratch_dir = Some(dir);
        }
        Ok(Self {
            image: Some(prepared.config),
            _scratch_dir: scratch_dir,
        })
    }

    /// `job` as `docker run IMAGE` would run it: the image's entrypoint and default command,
    /// its environment under the job's, its working directory and user unless the job names
    /// its own.
    pub fn apply(&self, mut job: JobSpec) -> JobSpec {
        let Some(image) = &self.image else {
            return job;
        };
        job.argv = image.command(&job.argv);
        let mut env = image.env.clone();
        env.append(&mut job.env);
        job.env = env;
        if job.cwd.is_none() {
            job.cwd = image.working_dir.clone().filter(|dir| !dir.is_empty());
        }
        if job.user.is_none() {
            job.user = image.user.clone().filter(|user| !user.is_empty());
        }
        job
    }
}

/// The guest's name for virtio-blk disk `index`: vda, vdb, … vdz, vdaa, …
fn disk_name(index: usize) -> String {
    let mut name = String::new();
    let mut n = index;
    loop {
        name.insert(0, (b'a' + (n % 26) as u8) as char);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    format!("/dev/vd{name}")
}

/// A sparse file of `bytes` holding an empty ext4 (no journal: it lives for one VM).
fn make_scratch(path: &PathBuf, bytes: u64) -> Result<(), RootfsError> {
    let file = std::fs::File::create(path).map_err(RootfsError::Scratch)?;
    file.set_len(bytes).map_err(RootfsError::Scratch)?;
    drop(file);
    let out = Command::new(find_mke2fs()?)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-O",
            "^has_journal",
            "-L",
            "scratch",
        ])
        .arg(path)
        .output()
        .map_err(RootfsError::Scratch)?;
    if !out.status.success() {
        return Err(RootfsError::ScratchFormat(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_names_follow_linux() {
        assert_eq!(disk_name(0), "/dev/vda");
        assert_eq!(disk_name(2), "/dev/vdc");
        assert_eq!(disk_name(25), "/dev/vdz");
        assert_eq!(disk_name(26), "/dev/vdaa");
        assert_eq!(disk_name(27), "/dev/vdab");
    }

    #[test]
    fn a_job_runs_as_docker_run_would() {
        let rootfs = Rootfs {
            image: Some(ImageConfig {
                env: vec![("PATH".into(), "/usr/bin".into()), ("A".into(), "1".into())],
                working_dir: Some("/app".into()),
                user: Some("app:staff".into()),
                entrypoint: vec!["/entry".into()],
                cmd: vec!["default".into()],
            }),
            _scratch_dir: None,
        };
        let job = JobSpec {
            argv: vec![],
            env: vec![("A".into(), "2".into())],
            cwd: None,
            user: None,
            stdin: false,
            tty: false,
            timeout: None,
            limits: Default::default(),
        };
        let applied = rootfs.apply(job.clone());
        assert_eq!(applied.argv, ["/entry", "default"]);
        assert_eq!(
            applied.env.last(),
            Some(&("A".to_string(), "2".to_string()))
        );
        assert_eq!(applied.cwd.as_deref(), Some("/app"));
        assert_eq!(applied.user.as_deref(), Some("app:staff"));
        let applied = rootfs.apply(JobSpec {
            argv: vec!["x".into()],
            cwd: Some("/w".into()),
            user: Some("0".into()),
            ..job
        });
        assert_eq!(applied.argv, ["/entry", "x"]);
        assert_eq!(applied.cwd.as_deref(), Some("/w"));
        assert_eq!(applied.user.as_deref(), Some("0"));
    }
}
