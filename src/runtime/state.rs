//! What ember-runtime keeps per container under `--root` (default `/run/ember-runtime`):
//! `ROOT/ID/state.json`, written whole to a temporary file and renamed into place, so that a
//! reader (or a crashed runtime) never sees half of one; and `ROOT/ID/start.sock`, the monitor's
//! start gate. The status is never stored as "running": it is worked out from the monitor's
//! process each time, so a monitor that crashed reads as `stopped`.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The runtime-spec version the state answers with.
pub const OCI_VERSION: &str = "1.0.2";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("container {0} does not exist")]
    NotFound(String),
    #[error("container {0} exists already")]
    Exists(String),
    #[error(
        "{0:?} is not a valid container ID (letters, digits, '_', '-', '.', not starting with '.')"
    )]
    BadId(String),
    #[error("the state of container {0}: {1}")]
    Io(String, #[source] io::Error),
    #[error("the state of container {0} is damaged: {1}")]
    Damaged(String, #[source] serde_json::Error),
}

/// What is stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub id: String,
    pub bundle: PathBuf,
    /// The monitor's PID, once it said the VM is ready.
    pub pid: Option<i32>,
    /// The monitor's start time (field 22 of /proc/PID/stat), so a reused PID is not taken for
    /// it.
    pub start_time: Option<u64>,
    /// `start` has run.
    pub started: bool,
    #[serde(default)]
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The container's network namespace, when the engine prepared one, and the TAPs made in it
    /// (`delete` removes them if the namespace outlives the container).
    #[serde(default)]
    pub network_namespace: Option<PathBuf>,
    #[serde(default)]
    pub taps: Vec<String>,
    /// Where the monitor's sockets are when the container's directory is too deep for them (a
    /// Unix socket path has at most 107 bytes; containerd's roots and 64-character IDs pass
    /// that): a short private directory under the temporary directory.
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
}

/// The longest socket path the monitor makes in the socket directory: the vsock socket's
/// guest-to-host listeners (`vsock.sock_PORT`, PORT up to 10 digits).
const LONGEST_SOCKET_NAME: usize = "/vsock.sock_4294967295".len();
/// A Unix socket path's limit (sun_path less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The OCI state, as `ember-runtime state` prints it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState<'a> {
    pub oci_version: &'static str,
    pub id: &'a str,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    pub bundle: &'a Path,
    pub annotations: &'a std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Stopped => "stopped",
        })
    }
}

/// One container's directory.
pub struct Container {
    pub dir: PathBuf,
    pub stored: Stored,
}

/// Checks an ID before it becomes a directory name.
pub fn check_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id.len() <= 1024
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(StateError::BadId(id.into()))
    }
}

impl Container {
    /// Makes `ROOT/ID` (refused if it exists) with its first state.
    pub fn create(root: &Path, stored: Stored) -> Result<Self, StateError> {
        check_id(&stored.id)?;
        let id = stored.id.clone();
        fs::create_dir_all(root).map_err(|e| StateError::Io(id.clone(), e))?;
        let dir = root.join(&id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists(id))
            }
            Err(e) => return Err(StateError::Io(id, e)),
        }
        let mut container = Self { dir, stored };
        if container.dir.as_os_str().len() + LONGEST_SOCKET_NAME > MAX_SOCKET_PATH {
            container.stored.socket_dir =
                Some(short_socket_dir(&container.dir).map_err(|e| StateError::Io(id.clone(), e))?);
        }
        container.save()?;
        Ok(container)
    }

    /// Reads `ROOT/ID`.
    pub fn open(root: &Path, id: &str) -> Result<Self, StateError> {
        check_id(id)?;
        let dir = root.join(id);
        let text = match fs::read(dir.join("state.json")) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id.into()))
            }
            Err(e) => return Err(StateError::Io(id.into(), e)),
        };
        let stored =
            serde_json::from_slice(&text).map_err(|e| StateError::Damaged(id.into(), e))?;
        Ok(Self { dir, stored })
    }

    /// Writes the state whole, then renames it into place.
    pub fn save(&self) -> Result<(), StateError> {
        let id = &self.stored.id;
        let io = |e| StateError::Io(id.clone(), e);
        let temporary = self.dir.join("state.json.tmp");
        let mut file = fs::File::create(&temporary).map_err(io)?;
        let json = serde_json::to_vec_pretty(&self.stored)
            .map_err(|e| StateError::Damaged(id.clone(), e))?;
        file.write_all(&json).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&temporary, self.dir.join("state.json")).map_err(io)
    }

    fn sockets(&self) -> &Path {
        self.stored.socket_dir.as_deref().unwrap_or(&self.dir)
    }

    /// The monitor's start gate.
    pub fn gate(&self) -> PathBuf {
        self.sockets().join("start.sock")
    }

    /// The monitor's vsock socket (`exec` reaches the guest agent through it).
    pub fn vsock(&self) -> PathBuf {
        self.sockets().join("vsock.sock")
    }

    /// Worked out from the monitor's process.
    pub fn status(&self) -> Status {
        match (self.stored.pid, self.monitor_alive()) {
            (None, _) => Status::Creating,
            (Some(_), false) => Status::Stopped,
            (Some(_), true) if self.stored.started => Status::Running,
            (Some(_), true) => Status::Created,
        }
    }

    /// The monitor runs (not a zombie, and the same process as recorded).
    pub fn monitor_alive(&self) -> bool {
        let Some(pid) = self.stored.pid else {
            return false;
        };
        match process_start(pid) {
            Some((state, start)) => state != 'Z' && Some(start) == self.stored.start_time,
            None => false,
        }
    }

    pub fn oci_state(&self) -> OciState<'_> {
        let status = self.status();
        OciState {
            oci_version: OCI_VERSION,
            id: &self.stored.id,
            status,
            pid: self.stored.pid.filter(|_| status != Status::Stopped),
            bundle: &self.stored.bundle,
            annotations: &self.stored.annotations,
        }
    }

    /// Removes the container's directory (and its socket directory).
    pub fn remove(self) -> Result<(), StateError> {
        if let Some(dir) = &self.stored.socket_dir {
            let _ = fs::remove_dir_all(dir);
        }
        fs::remove_dir_all(&self.dir).map_err(|e| StateError::Io(self.stored.id.clone(), e))
    }
}

/// `TMPDIR/ember-rt-HASH` (mode 0700), named after the container's directory.
fn short_socket_dir(container_dir: &Path) -> io::Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::DirBuilderExt;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    container_dir.hash(&mut hasher);
    let dir = std::env::temp_dir().join(format!("ember-rt-{:016x}", hasher.finish()));
    // A leftover of a container of the same directory that was never deleted goes first.
    let _ = fs::remove_dir_all(&dir);
    fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// A process's state letter and start time, from /proc/PID/stat.
pub fn process_start(pid: i32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name (field 2) is in parentheses and may hold spaces: fields after the last ')'.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 overall is the 20th after the name.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        std::env::temp_dir().join(format!("ember-runtime-state-{}", std::process::id()))
    }

    fn stored(id: &str) -> Stored {
        Stored {
            id: id.into(),
            bundle: "/b".into(),
            pid: None,
            start_time: None,
            started: false,
            annotations: Default::default(),
            network_namespace: None,
            taps: Vec::new(),
            socket_dir: None,
        }
    }

    #[test]
    fn a_deep_container_directory_gets_short_sockets() {
        // A root of this test's own: the other tests remove theirs.
        let base = std::env::temp_dir().join(format!("ember-rt-deep-{}", std::process::id()));
        let root = base.join("x".repeat(60));
        let id = "a".repeat(64);
        let c = Container::create(&root, stored(&id)).unwrap();
        let short = c
            .stored
            .socket_dir
            .clone()
            .expect("a short socket directory");
        assert!(c.vsock().starts_with(&short));
        assert!(c.vsock().as_os_str().len() + "_4294967295".len() <= MAX_SOCKET_PATH);
        assert_eq!(Container::open(&root, &id).unwrap().vsock(), c.vsock());
        c.remove().unwrap();
        assert!(!short.exists());
        let shallow = Container::create(&base, stored("b")).unwrap();
        assert_eq!(shallow.stored.socket_dir, None);
        shallow.remove().unwrap();
        fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn lifecycle_of_the_stored_state() {
        let root = root();
        let mut c = Container::create(&root, stored("c1")).unwrap();
        assert_eq!(c.status(), Status::Creating);
        assert!(matches!(
            Container::create(&root, stored("c1")),
            Err(StateError::Exists(_))
        ));
        // This test process stands in for a live monitor.
        let me = std::process::id() as i32;
        c.stored.pid = Some(me);
        c.stored.start_time = process_start(me).map(|(_, start)| start);
        c.save().unwrap();
        let c = Container::open(&root, "c1").unwrap();
        assert_eq!(c.status(), Status::Created);
        let json = serde_json::to_value(c.oci_state()).unwrap();
        assert_eq!(json["status"], "created");
        assert_eq!(json["pid"], me);
        assert_eq!(json["ociVersion"], OCI_VERSION);
        // Another start time: the PID was reused, the monitor is gone.
        let mut c = c;
        c.stored.start_time = Some(1);
        assert_eq!(c.status(), Status::Stopped);
        assert!(c.oci_state().pid.is_none());
        c.remove().unwrap();
        assert!(matches!(
            Container::open(&root, "c1"),
            Err(StateError::NotFound(_))
        ));
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn ids_that_would_escape_the_root_are_refused() {
        for id in ["", "..", "../x", "a/b", ".hidden", "a b"] {
            assert!(check_id(id).is_err(), "{id:?}");
        }
        check_id("abc-1.2_3").unwrap();
    }

    #[test]
    fn a_damaged_state_is_an_error_not_a_panic() {
        let root = root().join("damaged");
        std::fs::create_dir_all(root.join("c2")).unwrap();
        std::fs::write(root.join("c2/state.json"), b"{not json").unwrap();
        assert!(matches!(
            Container::open(&root, "c2"),
            Err(StateError::Damaged(..))
        ));
        std::fs::remove_dir_all(root).ok();
    }
}
