//! The part of an OCI bundle's `config.json` (runtime-spec 1.x) that Ember reads, and what it
//! makes of it: the monitor's command line.
//!
//! Every field is read as the spec defines it; what a VM cannot honour is refused with the field
//! named, never ignored quietly, except what the VM boundary already gives (namespaces, the
//! container's own seccomp/AppArmor/capability profile, masked and read-only paths: the process
//! is alone in a guest kernel of its own). Bind mounts of directories and of single files
//! (/etc/hosts, /etc/resolv.conf) become volumes; other sources (sockets, devices) cannot cross
//! into a VM and are logged as skipped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::network::Namespace;

/// vCPUs and RAM when the spec sets no limits.
pub const DEFAULT_CPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// The smallest guest that boots the default kernel comfortably.
const MIN_MEMORY_MIB: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a valid OCI config: {1}")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("config.json: {0} is not supported by ember-runtime")]
    Unsupported(String),
    #[error("config.json: {0}")]
    Invalid(String),
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub oci_version: String,
    pub process: Option<Process>,
    pub root: Option<Root>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub linux: Option<Linux>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub rlimits: Vec<ProcessRlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessRlimit {
    #[serde(rename = "type")]
    pub kind: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Root {
    pub path: PathBuf,
    #[serde(default)]
    pub readonly: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub destination: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub source: Option<PathBuf>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceEntry>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceEntry {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default)]
    pub cpu: Option<Cpu>,
    #[serde(default)]
    pub memory: Option<Memory>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    pub quota: Option<i64>,
    pub period: Option<u64>,
    pub cpus: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    pub limit: Option<i64>,
}

impl Spec {
    /// Where the container's network is: a namespace the engine prepared, or a new one. Without
    /// a network namespace the container would share the host's network, which a VM cannot.
    pub fn network_namespace(&self) -> Result<Namespace, SpecError> {
        let entry = self
            .linux
            .iter()
            .flat_map(|l| &l.namespaces)
            .find(|n| n.kind == "network");
        match entry {
            Some(NamespaceEntry {
                path: Some(path), ..
            }) if !path.as_os_str().is_empty() => Ok(Namespace::Join(path.clone())),
            Some(_) => Ok(Namespace::New),
            None => Err(SpecError::Unsupported(
                "the host's network (linux.namespaces has no network namespace; \
                 a VM has a network of its own)"
                    .into(),
            )),
        }
    }

    /// Reads `BUNDLE/config.json`.
    pub fn load(bundle: &Path) -> Result<Self, SpecError> {
        let path = bundle.join("config.json");
        let text = std::fs::read(&path).map_err(|e| SpecError::Read(path.clone(), e))?;
        serde_json::from_slice(&text).map_err(|e| SpecError::Parse(path, e))
    }
}

/// What the monitor is started with.
#[derive(Debug, PartialEq, Eq)]
pub struct MonitorPlan {
    /// `ember run` arguments, up to and including the command after `--`.
    pub args: Vec<String>,
    /// Why some mounts were not shared (logged by the caller).
    pub skipped: Vec<String>,
}

/// The `ember run` command line for `spec` in `bundle` (the gate and ready descriptor are the
/// caller's to add before `--`).
pub fn monitor_plan(spec: &Spec, bundle: &Path) -> Result<MonitorPlan, SpecError> {
    let process = spec
        .process
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("no process".into()))?;
    if process.args.is_empty() {
        return Err(SpecError::Invalid("process.args is empty".into()));
    }
    let root = spec
        .root
        .as_ref()
        .ok_or_else(|| SpecError::Invalid("no root".into()))?;
    // root.path is relative to the bundle unless absolute.
    let root_path = if root.path.is_absolute() {
        root.path.clone()
    } else {
        bundle.join(&root.path)
    };
    if !root_path.is_dir() {
        return Err(SpecError::Invalid(format!(
            "root.path {} is not a directory",
            root_path.display()
        )));
    }
    let mut args = vec!["run".to_string()];
    let ro = if root.readonly { ":ro" } else { "" };
    args.extend(["--volume".into(), format!("{}:/{ro}", root_path.display())]);
    let mut skipped = Vec::new();
    for mount in &spec.mounts {
        match mount.kind.as_deref() {
            // Made by the guest's own init, or not needed in a VM of its own.
            Some("proc" | "sysfs" | "tmpfs" | "devpts" | "mqueue" | "cgroup" | "cgroup2") => {}
            Some("bind") | None if mount.options.iter().any(|o| o == "bind" || o == "rbind") => {
                let Some(source) = &mount.source else {
                    return Err(SpecError::Invalid(format!(
                        "the bind mount at {} has no source",
                        mount.destination
                    )));
                };
                if !source.is_dir() && !source.is_file() {
                    skipped.push(format!(
                        "the bind mount at {} (its source is neither a directory nor a file)",
                        mount.destination
                    ));
                    continue;
                }
                let ro = if mount.options.iter().any(|o| o == "ro") {
                    ":ro"
                } else {
                    ""
                };
                args.extend([
                    "--volume".into(),
                    format!("{}:{}{ro}", source.display(), mount.destination),
                ]);
            }
            Some("bind") => {
                return Err(SpecError::Invalid(format!(
                    "the bind mount at {} has no bind option",
                    mount.destination
                )))
            }
            Some(other) => {
                return Err(SpecError::Unsupported(format!(
                    "a mount of type {other} (at {})",
                    mount.destination
                )))
            }
            None => {
                return Err(SpecError::Unsupported(format!(
                    "a mount without a type (at {})",
                    mount.destination
                )))
            }
        }
    }
    if let Some(name) = spec.hostname.as_deref().filter(|name| !name.is_empty()) {
        let name = crate::config::parse_hostname(name)
            .map_err(|e| SpecError::Invalid(format!("hostname: {e}")))?;
        args.extend(["--hostname".into(), name]);
    }
    let (cpus, memory_mib) = size(spec.linux.as_ref().and_then(|l| l.resources.as_ref()))?;
    args.extend([
        "--cpus".into(),
        cpus.to_string(),
        "--memory".into(),
        format!("{memory_mib}M"),
    ]);
    // The container's stdin is whatever the caller gave `create` (often /dev/null), or the
    // terminal ember-runtime makes (console.rs).
    args.push("-i".into());
    if process.terminal {
        args.push("-t".into());
    }
    args.extend(process_flags(process)?);
    args.push("--".into());
    args.extend(process.args.iter().cloned());
    Ok(MonitorPlan { args, skipped })
}

/// The job options for `process` (shared by `create` and `exec`): environment, working
/// directory, user and further groups, resource limits, no_new_privs.
pub fn process_flags(process: &Process) -> Result<Vec<String>, SpecError> {
    let mut args: Vec<String> = Vec::new();
    for variable in &process.env {
        if !variable.contains('=') {
            return Err(SpecError::Invalid(format!(
                "process.env entry {variable:?} has no '='"
            )));
        }
        args.extend(["-e".into(), variable.clone()]);
    }
    if !process.cwd.is_empty() {
        args.extend(["-w".into(), process.cwd.clone()]);
    }
    args.extend([
        "-u".into(),
        format!("{}:{}", process.user.uid, process.user.gid),
    ]);
    for gid in &process.user.additional_gids {
        args.extend(["--group-add".into(), gid.to_string()]);
    }
    for limit in &process.rlimits {
        if crate::job::rlimit_resource(&limit.kind).is_none() {
            return Err(SpecError::Unsupported(format!(
                "the resource limit {}",
                limit.kind
            )));
        }
        let name = limit.kind.to_ascii_lowercase();
        let name = name.strip_prefix("rlimit_").unwrap_or(&name);
        let value = |v: u64| match v {
            u64::MAX => "unlimited".to_string(),
            v => v.to_string(),
        };
        args.extend([
            "--ulimit".into(),
            format!("{name}={}:{}", value(limit.soft), value(limit.hard)),
        ]);
    }
    if process.no_new_privileges {
        args.push("--no-new-privileges".into());
    }
    Ok(args)
}

/// vCPUs and MiB of RAM from the spec's limits, within sane bounds.
fn size(resources: Option<&Resources>) -> Result<(u32, u64), SpecError> {
    let max_cpus = u32::from(crate::config::MAX_CPUS);
    let cpus = match resources.and_then(|r| r.cpu.as_ref()) {
        Some(Cpu {
            quota: Some(quota),
            period,
            ..
        }) if *quota > 0 => {
            let period = period.filter(|p| *p > 0).unwrap_or(100_000);
            (*quota as u64).div_ceil(period) as u32
        }
        Some(Cpu {
            cpus: Some(list), ..
        }) if !list.is_empty() => cpu_count(list)?,
        _ => DEFAULT_CPUS,
    };
    let memory_mib = match resources
        .and_then(|r| r.memory.as_ref())
        .and_then(|m| m.limit)
    {
        Some(limit) if limit > 0 => (limit as u64 >> 20).max(MIN_MEMORY_MIB),
        _ => DEFAULT_MEMORY_MIB,
    };
    Ok((cpus.clamp(1, max_cpus), memory_mib))
}

/// The number of CPUs in a cpuset list such as `0-3,6`.
fn cpu_count(list: &str) -> Result<u32, SpecError> {
    let invalid = || SpecError::Invalid(format!("linux.resources.cpu.cpus {list:?}"));
    let mut count = 0u32;
    for part in list.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u32 = a.parse().map_err(|_| invalid())?;
                let b: u32 = b.parse().map_err(|_| invalid())?;
                if b < a {
                    return Err(invalid());
                }
                count = count.saturating_add(b - a + 1);
            }
            None => {
                part.parse::<u32>().map_err(|_| invalid())?;
                count = count.saturating_add(1);
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-spec-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        dir
    }

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_podman_like_spec_becomes_a_monitor_command_line() {
        let dir = bundle();
        let data = dir.join("data");
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let s = spec(&format!(
            r#"{{"ociVersion":"1.0.2",
            "process":{{"terminal":false,"user":{{"uid":1000,"gid":1000,"additionalGids":[10]}},
              "args":["sh","-c","echo hi"],"env":["PATH=/bin","A=b"],"cwd":"/work",
              "rlimits":[{{"type":"RLIMIT_NOFILE","hard":2048,"soft":1024}}],
              "noNewPrivileges":true}},
            "root":{{"path":"rootfs","readonly":true}},
            "hostname":"c1",
            "mounts":[{{"destination":"/proc","type":"proc","source":"proc"}},
              {{"destination":"/data","type":"bind","source":"{}","options":["rbind","ro"]}},
              {{"destination":"/etc/hosts","type":"bind","source":"{}","options":["bind"]}}],
            "linux":{{"resources":{{"cpu":{{"quota":150000,"period":100000}},
              "memory":{{"limit":268435456}}}},
              "namespaces":[{{"type":"pid"}}]}}}}"#,
            data.display(),
            hosts.display()
        ));
        let plan = monitor_plan(&s, &dir).unwrap();
        let expected: Vec<String> = [
            "run".to_string(),
            "--volume".into(),
            format!("{}:/:ro", dir.join("rootfs").display()),
            "--volume".into(),
            format!("{}:/data:ro", data.display()),
            "--volume".into(),
            format!("{}:/etc/hosts", hosts.display()),
            "--hostname".into(),
            "c1".into(),
            "--cpus".into(),
            "2".into(),
            "--memory".into(),
            "256M".into(),
            "-i".into(),
            "-e".into(),
            "PATH=/bin".into(),
            "-e".into(),
            "A=b".into(),
            "-w".into(),
            "/work".into(),
            "-u".into(),
            "1000:1000".into(),
            "--group-add".into(),
            "10".into(),
            "--ulimit".into(),
            "nofile=1024:2048".into(),
            "--no-new-privileges".into(),
            "--".into(),
            "sh".into(),
            "-c".into(),
            "echo hi".into(),
        ]
        .into();
        assert_eq!(plan.args, expected);
        assert!(plan.skipped.is_empty(), "{:?}", plan.skipped);
    }

    #[test]
    fn what_a_vm_cannot_do_is_refused_with_the_field() {
        let dir = bundle();
        for (json, field) in [
            (
                r#"{"process":{"args":["sh"]},"root":{"path":"rootfs"},
                   "mounts":[{"destination":"/x","type":"nfs","source":"h:/x"}]}"#,
                "nfs",
            ),
            (
                r#"{"process":{"args":[]},"root":{"path":"rootfs"}}"#,
                "args",
            ),
            (
                r#"{"process":{"args":["sh"],"rlimits":[{"type":"RLIMIT_BOGUS","hard":1,"soft":1}]},
                   "root":{"path":"rootfs"}}"#,
                "RLIMIT_BOGUS",
            ),
            (
                r#"{"process":{"args":["sh"]},"root":{"path":"nope"}}"#,
                "root.path",
            ),
        ] {
            let e = monitor_plan(&spec(json), &dir).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn the_network_is_a_namespace_of_the_containers() {
        let network = |json: &str| spec(json).network_namespace();
        assert_eq!(
            network(r#"{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/run/netns/a"}]}}"#)
                .unwrap(),
            Namespace::Join("/run/netns/a".into())
        );
        assert_eq!(
            network(r#"{"linux":{"namespaces":[{"type":"network"}]}}"#).unwrap(),
            Namespace::New
        );
        let e = network(r#"{"linux":{"namespaces":[{"type":"pid"}]}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("host's network"), "{e}");
    }

    #[test]
    fn sizes_follow_the_limits_within_bounds() {
        let r = |json: &str| -> Resources { serde_json::from_str(json).unwrap() };
        assert_eq!(size(None).unwrap(), (1, 512));
        assert_eq!(
            size(Some(&r(r#"{"cpu":{"cpus":"0-3,6"}}"#))).unwrap(),
            (5, 512)
        );
        assert_eq!(
            size(Some(&r(r#"{"cpu":{"quota":50000}}"#))).unwrap(),
            (1, 512)
        );
        assert_eq!(
            size(Some(&r(r#"{"memory":{"limit":1048576}}"#))).unwrap(),
            (1, 128)
        );
        assert_eq!(size(Some(&r(r#"{"cpu":{"quota":-1}}"#))).unwrap(), (1, 512));
        assert!(size(Some(&r(r#"{"cpu":{"cpus":"3-1"}}"#))).is_err());
    }
}
