//! Who a command runs as: `docker run --user USER[:GROUP]`, resolved in the command's root.
//!
//! The rules are Docker's (runc's): USER is a name from the root's `/etc/passwd` or a number
//! (which need not be there); its primary group is the passwd entry's, or 0 without an entry;
//! GROUP, when given, replaces it (a name from `/etc/group` or a number); the supplementary
//! groups are the `/etc/group` entries that list the user's name; `HOME` is the entry's home
//! directory, or `/`. A name that is not in the files is an error: nothing runs as a guess.
//!
//! The files belong to the image, which is not trusted: they are opened with
//! `RESOLVE_IN_ROOT`, so a symlink in them resolves inside the image, never into the agent's own
//! root, and a line that does not parse is skipped.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The longest `/etc/passwd` or `/etc/group` read; a bigger one is cut there.
const MAX_FILE: u64 = 4 << 20;

/// The identity a command gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The user ID (real, effective and saved).
    pub uid: u32,
    /// The group ID (real, effective and saved).
    pub gid: u32,
    /// The supplementary groups.
    pub groups: Vec<u32>,
    /// `HOME` for the command.
    pub home: String,
}

/// `USER[:GROUP]` resolved against the files under `root` (`/` when the commands have no root of
/// their own). The error names what was not found.
pub fn resolve(spec: &str, root: &Path) -> Result<Identity, String> {
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    if user.is_empty() || group == Some("") {
        return Err(format!("user {spec:?}: empty user or group"));
    }
    let passwd = read_in_root(root, "etc/passwd");
    let group_file = read_in_root(root, "etc/group");
    let entry = passwd
        .lines()
        .filter_map(PasswdEntry::parse)
        .find(|e| e.name == user)
        .or_else(|| {
            let uid = number(user)?;
            passwd
                .lines()
                .filter_map(PasswdEntry::parse)
                .find(|e| e.uid == uid)
        });
    let (uid, mut gid, name, home) = match (&entry, number(user)) {
        (Some(e), _) => (e.uid, e.gid, Some(e.name), e.home),
        (None, Some(uid)) => (uid, 0, None, "/"),
        (None, None) => {
            return Err(format!(
                "unable to find user {user}: no matching entries in the image's /etc/passwd"
            ))
        }
    };
    let groups: Vec<GroupEntry> = group_file.lines().filter_map(GroupEntry::parse).collect();
    if let Some(group) = group {
        gid = match groups.iter().find(|g| g.name == group) {
            Some(g) => g.gid,
            None => number(group).ok_or_else(|| {
                format!(
                    "unable to find group {group}: no matching entries in the image's /etc/group"
                )
            })?,
        };
    }
    let mut supplementary: Vec<u32> = match name {
        Some(name) => groups
            .iter()
            .filter(|g| g.members.split(',').any(|m| m == name))
            .map(|g| g.gid)
            .collect(),
        None => Vec::new(),
    };
    supplementary.sort_unstable();
    supplementary.dedup();
    Ok(Identity {
        uid,
        gid,
        groups: supplementary,
        home: if home.is_empty() { "/" } else { home }.to_string(),
    })
}

/// A decimal ID; -1 (`u32::MAX`) means "unchanged" to the kernel and is refused.
fn number(text: &str) -> Option<u32> {
    text.parse().ok().filter(|&id| id != u32::MAX)
}

/// `name:password:uid:gid:gecos:home:shell`.
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

impl<'a> PasswdEntry<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.split(':');
        let name = fields.next().filter(|n| !n.is_empty())?;
        let _password = fields.next()?;
        let uid = number(fields.next()?)?;
        let gid = number(fields.next()?)?;
        let _gecos = fields.next();
        let home = fields.next().unwrap_or("");
        Some(Self {
            name,
            uid,
            gid,
            home,
        })
    }
}

/// `name:password:gid:member,member,…`.
struct GroupEntry<'a> {
    name: &'a str,
    gid: u32,
    members: &'a str,
}

impl<'a> GroupEntry<'a> {
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.split(':');
        let name = fields.next().filter(|n| !n.is_empty())?;
        let _password = fields.next()?;
        let gid = number(fields.next()?)?;
        let members = fields.next().unwrap_or("");
        Some(Self { name, gid, members })
    }
}

/// The file at `relative` inside `root`, symlinks resolved inside it; empty when it is missing or
/// unreadable (an image without `/etc/passwd` still runs numeric users). Bytes that are not UTF-8
/// spoil only their own lines.
fn read_in_root(root: &Path, relative: &str) -> String {
    let mut bytes = Vec::new();
    if let Ok(file) = open_in_root(root, relative) {
        let _ = file.take(MAX_FILE).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn open_in_root(root: &Path, relative: &str) -> io::Result<File> {
    let root = File::open(root)?;
    let path = CString::new(relative).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: open_how is plain integers, for which all zeroes is valid ("no flags").
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads `how` (its size passed with it) and the NUL-terminated `path`, both
    // alive across the call, and opens relative to `root`, which is open.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&root),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

/// What the child needs to become `identity`, made before the fork (no allocation after it).
pub struct Switch {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl Switch {
    /// Prepares the switch to `identity`.
    pub fn new(identity: &Identity) -> Self {
        Self {
            uid: identity.uid,
            gid: identity.gid,
            groups: identity.groups.clone(),
        }
    }

    /// Root with no supplementary groups: for a request that adds groups without naming a user.
    pub fn root() -> Self {
        Self {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        }
    }

    /// Adds supplementary groups (an OCI process's `additionalGids`).
    pub fn add_groups(&mut self, extra: &[u32]) {
        for group in extra {
            if !self.groups.contains(group) {
                self.groups.push(*group);
            }
        }
    }

    /// Drops root for the identity: groups first, the user last (after `setuid` nothing else
    /// may change). Only for a child between fork and exec.
    pub fn apply(&self) -> io::Result<()> {
        // SAFETY: setgroups reads `groups.len()` IDs from the vector, alive across the call;
        // setgid and setuid take plain integers. All three are async-signal-safe system calls,
        // and the forked child has a single thread, so they apply to the whole process.
        unsafe {
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) < 0
                || libc::setgid(self.gid) < 0
                || libc::setuid(self.uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// `root` as a C string for chroot, or `None` if it holds a NUL.
pub fn c_path(root: &Path) -> Option<CString> {
    CString::new(root.as_os_str().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(passwd: &str, group: &str) -> std::path::PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ember-agent-user-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("etc")).unwrap();
        std::fs::write(dir.join("etc/passwd"), passwd).unwrap();
        std::fs::write(dir.join("etc/group"), group).unwrap();
        dir
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1001:App:/home/app:/bin/sh\n\
                          garbage line\n\
                          nohome:x:1002:1002::\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,other\napp:x:1001:\ndev:x:60:app\n";

    #[test]
    fn names_and_numbers_resolve_as_docker_does() {
        let dir = root(PASSWD, GROUP);
        let app = resolve("app", &dir).unwrap();
        assert_eq!(
            app,
            Identity {
                uid: 1000,
                gid: 1001,
                groups: vec![50, 60],
                home: "/home/app".into()
            }
        );
        // A number with an entry takes the entry's group and home.
        assert_eq!(resolve("1000", &dir).unwrap(), app);
        // A number without one: group 0, home /.
        let anon = resolve("4242", &dir).unwrap();
        assert_eq!((anon.uid, anon.gid, &anon.home[..]), (4242, 0, "/"));
        assert!(anon.groups.is_empty());
        // GROUP replaces the primary group, by name or number.
        assert_eq!(resolve("app:staff", &dir).unwrap().gid, 50);
        assert_eq!(resolve("app:7", &dir).unwrap().gid, 7);
        assert_eq!(resolve("4242:4243", &dir).unwrap().gid, 4243);
        assert_eq!(resolve("nohome", &dir).unwrap().home, "/");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn what_is_not_there_is_refused() {
        let dir = root(PASSWD, GROUP);
        for spec in ["nobody", "app:nogroup", "", ":", "app:", "4294967295"] {
            assert!(resolve(spec, &dir).is_err(), "{spec:?}");
        }
        assert!(resolve("nobody", &dir).unwrap_err().contains("nobody"));
        // No files at all: numbers still work.
        let empty = std::env::temp_dir().join(format!("ember-agent-nouser-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        assert_eq!(resolve("5:6", &empty).unwrap().gid, 6);
        assert!(resolve("app", &empty).is_err());
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_dir_all(empty).unwrap();
    }

    #[test]
    fn symlinks_in_the_image_resolve_inside_it() {
        // /etc/passwd -> /evil/passwd must be the image's /evil/passwd, not the agent's.
        let dir = root("", GROUP);
        std::fs::remove_file(dir.join("etc/passwd")).unwrap();
        std::fs::create_dir_all(dir.join("evil")).unwrap();
        std::fs::write(dir.join("evil/passwd"), "inside:x:7:7::/in:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/evil/passwd", dir.join("etc/passwd")).unwrap();
        assert_eq!(resolve("inside", &dir).unwrap().uid, 7);
        // And `..` cannot climb out of it.
        std::fs::remove_file(dir.join("etc/passwd")).unwrap();
        std::os::unix::fs::symlink("../../../../../../etc/passwd", dir.join("etc/passwd")).unwrap();
        assert!(resolve("root", &dir).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
