//! `--jail`: the monitor in an empty root, as an unprivileged user, without capabilities, in
//! namespaces and cgroup limits of its own (what Firecracker's `jailer` does, without a second
//! binary).
//!
//! Two steps, because of two constraints:
//! 1. [`enter`], first thing in `ember run --jail`, while ember is one thread and has opened
//!    nothing: a PID namespace only takes the processes created after `unshare`, and a KVM VM
//!    belongs to the process that made it, so ember forks here and the child (PID 1 of the new
//!    namespace) becomes the monitor. The parent stays outside: it puts the child in its cgroup,
//!    forwards signals, and when the child is gone removes the cgroup and the jail directory
//!    (which nothing inside the jail could) and exits with the child's status. The child closes
//!    every descriptor it inherited beyond stdin, stdout and stderr.
//! 2. [`Jail::lock_down`], once the child has opened everything the VM needs (/dev/kvm, kernel,
//!    initrd, disks, TAPs, the vsock and control sockets) and before it starts any thread
//!    (mount namespaces, roots and capabilities are per thread; threads inherit them): new
//!    mount, IPC, UTS (and, without a TAP, network) namespaces; an empty read-only tmpfs as the
//!    root (`pivot_root`, the old root detached); rlimits; no capability in any set; the user
//!    and group `--uid`/`--gid`; `no_new_privs`.

use std::ffi::CString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::sandbox::seccomp::{self, SeccompMode, ThreadKind};

/// What `--jail` and its options ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JailConfig {
    pub uid: u32,
    pub gid: u32,
    /// `--cpu-quota`: percent of one CPU (150 = one and a half).
    pub cpu_quota_percent: Option<u32>,
    /// `--memory-limit`, bytes.
    pub memory_limit: Option<u64>,
    /// The Unix sockets the monitor makes (control, vsock): it cannot remove them from inside
    /// the jail, so the parent removes them afterwards (when nothing answers on them).
    pub sockets: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error(
        "--jail needs root (it makes namespaces, changes the root and the user); run ember as \
         root, or without --jail"
    )]
    NotRoot,
    #[error("--jail: cannot {what}: {source}")]
    Step {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "--jail: no cgroup hierarchy has the {0} controller (looked in /proc/self/mountinfo); \
         drop --cpu-quota/--memory-limit or mount it"
    )]
    NoController(&'static str),
    #[error(
        "--jail: cannot enable the {1} controller for cgroups under {0} (cgroup v2); run ember \
         in a cgroup delegated to it (e.g. systemd-run --scope -p Delegate=yes) or drop the limit"
    )]
    Delegation(PathBuf, &'static str),
}

fn step(what: &'static str) -> impl FnOnce(io::Error) -> JailError {
    move |source| JailError::Step { what, source }
}

/// -1 from a libc call → the error.
fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Where [`enter`] left this process.
pub enum Entered {
    /// The monitor-to-be, inside the PID namespace.
    Monitor(Jail),
    /// The parent, after the monitor ended: exit with this.
    Done(u8),
}

/// The monitor's side of the jail, for [`Jail::lock_down`].
pub struct Jail {
    config: JailConfig,
    root: PathBuf,
}

/// Step 1: see the module's documentation.
pub fn enter(config: &JailConfig, seccomp: SeccompMode) -> Result<Entered, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    let cgroups = match (config.cpu_quota_percent, config.memory_limit) {
        (None, None) => Vec::new(),
        _ => CgroupPlan::find(config)?,
    };
    let root = empty_directory().map_err(step("make the jail's root directory"))?;
    let forked = fork_into_pid_namespace();
    let (pid, go) = match forked {
        Ok(forked) => forked,
        Err(e) => {
            let _ = fs::remove_dir(&root);
            return Err(e);
        }
    };
    if pid == 0 {
        // The monitor is PID 1 of its namespace, where a signal with the default action is
        // dropped: the main loop's signals wait, blocked, for its signalfd.
        crate::main_loop::block_termination_signals();
        // The monitor ends with its parent (which holds its cgroups and status).
        die_with_parent();
        // SAFETY: our copy of the write end.
        unsafe { libc::close(go[1]) };
        let mut byte = [0u8; 1];
        // SAFETY: a one-byte read into `byte` from the pipe's read end.
        let read = unsafe { libc::read(go[0], byte.as_mut_ptr().cast(), 1) };
        if read != 1 {
            // The parent could not set the cgroups up and said so: end quietly.
            // SAFETY: _exit ends this process at once.
            unsafe { libc::_exit(i32::from(crate::outcome::EXIT_SETUP_FAILED)) };
        }
        // Nothing inherited beyond stdio reaches the guest's side (the pipe goes too).
        // SAFETY: close_range closes descriptors only.
        unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
        return Ok(Entered::Monitor(Jail {
            config: config.clone(),
            root,
        }));
    }
    // SAFETY: our copy of the read end.
    unsafe { libc::close(go[0]) };
    // A monitor killed outright cannot restore the terminal: its parent does.
    let terminal = saved_terminal();
    let placed = cgroups
        .iter()
        .try_for_each(|cgroup| cgroup.create_with(pid as u32));
    let status = match placed {
        Ok(()) => {
            // SAFETY: a one-byte write from a local to the pipe's write end.
            unsafe { libc::write(go[1], b"g".as_ptr().cast(), 1) };
            // SAFETY: closing our write end.
            unsafe { libc::close(go[1]) };
            forward_signals_to(pid);
            // From here the parent only waits, forwards signals and removes directories.
            if let Err(e) = seccomp::confine_alone(ThreadKind::JailParent, seccomp) {
                log::warn!("jail: the parent runs without its seccomp filter: {e}");
            }
            Ok(wait_for(pid))
        }
        Err(e) => {
            // SAFETY: closing the write end without a byte tells the child to end.
            unsafe { libc::close(go[1]) };
            wait_for(pid);
            Err(e)
        }
    };
    if let Some(saved) = terminal {
        // SAFETY: settings tcgetattr gave for the same descriptor.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &saved) };
    }
    for cgroup in &cgroups {
        cgroup.remove();
    }
    let _ = fs::remove_dir(&root);
    for socket in &config.sockets {
        remove_dead_socket(socket);
    }
    status.map(Entered::Done)
}

/// unshare(CLONE_NEWPID), then fork: the child is PID 1 of the new namespace. Also returns the
/// pipe the parent says "go" through.
fn fork_into_pid_namespace() -> Result<(libc::pid_t, [libc::c_int; 2]), JailError> {
    // SAFETY: unshare with a namespace flag; it affects the processes forked from here on.
    check(unsafe { libc::unshare(libc::CLONE_NEWPID) }).map_err(step("make a PID namespace"))?;
    // The monitor waits until its parent has placed it in its cgroups.
    let mut go = [0; 2];
    // SAFETY: `go` has room for the two descriptors pipe2 returns.
    check(unsafe { libc::pipe2(go.as_mut_ptr(), libc::O_CLOEXEC) }).map_err(step("make a pipe"))?;
    // SAFETY: ember is one thread here (nothing has started any), so the child may go on
    // running Rust code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: both ends are ours.
        unsafe {
            libc::close(go[0]);
            libc::close(go[1]);
        }
        return Err(step("fork")(e));
    }
    Ok((pid, go))
}

/// SIGKILL when the parent dies. Armed right after the fork (a parent that died before that
/// never says "go": the monitor sees the pipe's end and exits) and again after the user changes,
/// which clears it (getppid cannot tell from inside the namespace whether the parent went in
/// the microseconds between; the guest then runs unwatched until it ends).
fn die_with_parent() {
    // SAFETY: a prctl without pointers.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
}

/// Removes `path` if it is a Unix socket nobody answers on (a live one belongs to another ember).
fn remove_dead_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_socket());
    if is_socket && std::os::unix::net::UnixStream::connect(path).is_err() {
        let _ = fs::remove_file(path);
    }
}

/// Stdin's terminal settings, when it is a terminal.
fn saved_terminal() -> Option<libc::termios> {
    // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `saved` is a valid termios to fill in.
    (unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } == 0).then_some(saved)
}

/// A fresh empty directory, the mount point of the jail's root.
fn empty_directory() -> io::Result<PathBuf> {
    let base = std::env::temp_dir();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    for attempt in 0..100u32 {
        let dir = base.join(format!("ember-jail-{pid}-{attempt}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free name for the jail directory",
    ))
}

/// The child whose signals the parent forwards (from its handler).
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe; `child` is our child, not yet reaped.
        unsafe { libc::kill(child, signal) };
    }
}

/// From now on the signals meant for ember go to the monitor.
fn forward_signals_to(pid: libc::pid_t) {
    CHILD.store(pid, std::sync::atomic::Ordering::SeqCst);
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH] {
        // SAFETY: an all-zero sigaction is valid; the handler only calls kill.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = forward_signal as *const () as usize;
        action.sa_flags = libc::SA_RESTART;
        // SAFETY: installing a handler for a catchable signal.
        unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) };
    }
}

/// Waits for the monitor; its exit status, 128+N for a signal, as a shell would show it.
fn wait_for(pid: libc::pid_t) -> u8 {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child into a local.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid {
            break;
        }
        if rc < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return crate::outcome::EXIT_MONITOR_FAILED;
        }
    }
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status) as u8
    } else {
        crate::outcome::EXIT_SIGNAL_BASE.saturating_add(libc::WTERMSIG(status) as u8)
    }
}

/// The monitor's jail between [`enter`] and the moment the VM has opened everything.
static ARMED: std::sync::Mutex<Option<Jail>> = std::sync::Mutex::new(None);

impl Jail {
    /// Keeps the jail for [`lock_down_if_armed`], which building the VM calls.
    pub fn arm(self) {
        *crate::sandbox::lock(&ARMED) = Some(self);
    }

    /// Step 2: see the module's documentation. `keep_network`: a TAP is in use (it belongs to
    /// the current network namespace). `largest_file`: the largest size a file ember writes may
    /// reach (its disks).
    pub fn lock_down(
        &self,
        keep_network: bool,
        largest_file: Option<u64>,
    ) -> Result<(), JailError> {
        let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if !keep_network {
            flags |= libc::CLONE_NEWNET;
        }
        // SAFETY: unshare with namespace flags; ember is one thread here.
        check(unsafe { libc::unshare(flags) }).map_err(step("make namespaces"))?;
        let hostname = b"ember";
        // SAFETY: a buffer of the given length; the UTS namespace is ours alone.
        check(unsafe { libc::sethostname(hostname.as_ptr().cast(), hostname.len()) })
            .map_err(step("set the hostname"))?;
        self.pivot_to_empty_root()?;
        set_rlimits(largest_file)?;
        drop_privileges(self.config.uid, self.config.gid)?;
        // Changing the user cleared it.
        die_with_parent();
        Ok(())
    }

    fn pivot_to_empty_root(&self) -> Result<(), JailError> {
        // Nothing done below reaches the host's mount table.
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REC | libc::MS_PRIVATE,
            None,
        )
        .map_err(step("make the mounts private"))?;
        let root_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        mount(
            Some("tmpfs"),
            &self.root,
            Some("tmpfs"),
            root_flags,
            Some("size=4k,nr_inodes=4,mode=0555"),
        )
        .map_err(step("mount the jail's root"))?;
        let root = cstring(&self.root).map_err(step("use the jail's path"))?;
        // SAFETY: a NUL-terminated path.
        check(unsafe { libc::chdir(root.as_ptr()) }).map_err(step("enter the jail's root"))?;
        // pivot_root(".", "."): the old root ends up stacked under the new one at "/", and is
        // then detached: nothing of it stays reachable.
        let dot = c".";
        // SAFETY: two NUL-terminated paths.
        check(unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as i32)
            .map_err(step("pivot_root into the jail"))?;
        // SAFETY: a NUL-terminated path.
        check(unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) })
            .map_err(step("detach the host's root"))?;
        let slash = c"/";
        // SAFETY: a NUL-terminated path.
        check(unsafe { libc::chdir(slash.as_ptr()) }).map_err(step("enter the new root"))?;
        mount(
            None,
            Path::new("/"),
            None,
            libc::MS_REMOUNT | libc::MS_RDONLY | root_flags,
            None,
        )
        .map_err(step("make the jail's root read-only"))?;
        Ok(())
    }
}

/// [`Jail::lock_down`] of the armed jail, if any (once).
pub fn lock_down_if_armed(
    keep_network: bool,
    largest_file: impl FnOnce() -> Option<u64>,
) -> Result<(), JailError> {
    let jail = crate::sandbox::lock(&ARMED).take();
    match jail {
        Some(jail) => {
            jail.lock_down(keep_network, largest_file())?;
            log::info!(
                "jail: in an empty root as {}:{}, no capabilities",
                jail.config.uid,
                jail.config.gid
            );
            Ok(())
        }
        None => Ok(()),
    }
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let to_c =
        |s: &str| CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL"));
    let source = source.map(to_c).transpose()?;
    let fstype = fstype.map(to_c).transpose()?;
    let data = data.map(to_c).transpose()?;
    let target = cstring(target)?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
}

/// Open files (ember's own and the vsock connections'), file sizes (the disks; none when a file
/// grows without bound, the console's), no core dumps (guest memory would be in them).
fn set_rlimits(largest_file: Option<u64>) -> Result<(), JailError> {
    let file_size = largest_file.map_or(libc::RLIM_INFINITY, |size| size.max(1 << 20));
    let limits = [
        (libc::RLIMIT_NOFILE, 1024),
        (libc::RLIMIT_FSIZE, file_size),
        (libc::RLIMIT_CORE, 0),
    ];
    for (resource, value) in limits {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: a fully initialised rlimit.
        check(unsafe { libc::setrlimit(resource, &limit) }).map_err(step("set rlimits"))?;
    }
    Ok(())
}

/// No capability can come back: the bounding set is emptied, then the user changes (which
/// clears the permitted and effective sets), the ambient set is cleared, and no_new_privs keeps
/// exec from granting any.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    for cap in 0..=63 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number; past the last one it fails
        // (EINVAL), which ends the loop.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } < 0 {
            break;
        }
    }
    // SAFETY: setgroups with an empty list.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }).map_err(step("drop the groups"))?;
    // SAFETY: plain ID changes.
    check(unsafe { libc::setresgid(gid, gid, gid) }).map_err(step("change the group"))?;
    // SAFETY: plain ID changes.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map_err(step("change the user"))?;
    // SAFETY: a prctl without pointers.
    check(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })
    .map_err(step("clear the ambient capabilities"))?;
    // Also for --uid 0: no capability stays in any set.
    let header = CapHeader {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset with a v3 header and the two data words v3 takes.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } as i32)
        .map_err(step("drop the capabilities"))?;
    // SAFETY: a prctl without pointers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .map_err(step("set no_new_privs"))?;
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// One cgroup directory ember makes for its monitor, with the limits written into it.
#[derive(Debug)]
struct CgroupPlan {
    /// The parent directory (ember's own cgroup in that hierarchy).
    parent: PathBuf,
    /// (file, value) to write after creating it.
    limits: Vec<(&'static str, String)>,
    dir: std::cell::RefCell<Option<PathBuf>>,
}

impl CgroupPlan {
    /// v2 where its root offers the controllers, v1 hierarchies otherwise.
    fn find(config: &JailConfig) -> Result<Vec<CgroupPlan>, JailError> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")
            .map_err(step("read /proc/self/mountinfo"))?;
        let own =
            fs::read_to_string("/proc/self/cgroup").map_err(step("read /proc/self/cgroup"))?;
        let cpu = config.cpu_quota_percent.map(|percent| {
            let period = 100_000u64;
            (period, u64::from(percent) * period / 100)
        });
        let mut wanted: Vec<&'static str> = Vec::new();
        if cpu.is_some() {
            wanted.push("cpu");
        }
        if config.memory_limit.is_some() {
            wanted.push("memory");
        }
        // cgroup v2, when its root has every controller asked for.
        if let Some((mount, path)) = v2_location(&mountinfo, &own) {
            let controllers =
                fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            if wanted
                .iter()
                .all(|w| controllers.split_whitespace().any(|c| c == *w))
            {
                let parent = mount.join(&path);
                enable_controllers(&parent, &wanted)?;
                let mut limits = Vec::new();
                if let Some((period, quota)) = cpu {
                    limits.push(("cpu.max", format!("{quota} {period}")));
                }
                if let Some(bytes) = config.memory_limit {
                    limits.push(("memory.max", bytes.to_string()));
                    limits.push(("memory.swap.max", "0".into()));
                }
                return Ok(vec![CgroupPlan::new(parent, limits)]);
            }
        }
        let mut plans = Vec::new();
        for controller in wanted {
            let (mount, path) = v1_location(&mountinfo, &own, controller)
                .ok_or(JailError::NoController(controller))?;
            let limits = match controller {
                "cpu" => {
                    let (period, quota) = cpu.unwrap_or_default();
                    vec![
                        ("cpu.cfs_period_us", period.to_string()),
                        ("cpu.cfs_quota_us", quota.to_string()),
                    ]
                }
                _ => vec![(
                    "memory.limit_in_bytes",
                    config.memory_limit.unwrap_or_default().to_string(),
                )],
            };
            plans.push(CgroupPlan::new(mount.join(path), limits));
        }
        Ok(plans)
    }

    fn new(parent: PathBuf, limits: Vec<(&'static str, String)>) -> Self {
        Self {
            parent,
            limits,
            dir: std::cell::RefCell::new(None),
        }
    }

    /// Makes `ember-PID` under the parent, writes the limits, moves `pid` in.
    fn create_with(&self, pid: u32) -> Result<(), JailError> {
        let dir = self.parent.join(format!("ember-{pid}"));
        fs::create_dir(&dir).map_err(step("create the cgroup"))?;
        *self.dir.borrow_mut() = Some(dir.clone());
        for (file, value) in &self.limits {
            write_file(&dir.join(file), value).map_err(step("write a cgroup limit"))?;
        }
        write_file(&dir.join("cgroup.procs"), &pid.to_string())
            .map_err(step("move the monitor into its cgroup"))?;
        Ok(())
    }

    /// Removes the directory (the monitor is gone; the kernel may take a moment to notice).
    fn remove(&self) {
        let Some(dir) = self.dir.borrow_mut().take() else {
            return;
        };
        for _ in 0..100 {
            match fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => {
                    log::warn!("cannot remove the cgroup {}: {e}", dir.display());
                    return;
                }
            }
        }
        log::warn!("cannot remove the cgroup {}: still busy", dir.display());
    }
}

/// cgroup v2 gives a child cgroup only the controllers its parent's `cgroup.subtree_control`
/// names: enables the missing ones, or says how.
fn enable_controllers(parent: &Path, wanted: &[&'static str]) -> Result<(), JailError> {
    let control = parent.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control).unwrap_or_default();
    for controller in wanted {
        if enabled.split_whitespace().any(|c| c == *controller) {
            continue;
        }
        // Refused when ember's own cgroup has processes in it (the no-internal-process rule):
        // the fix is a cgroup delegated to ember's caller, e.g. a systemd scope.
        write_file(&control, &format!("+{controller}"))
            .map_err(|_| JailError::Delegation(parent.to_owned(), controller))?;
    }
    Ok(())
}

fn write_file(path: &Path, value: &str) -> io::Result<()> {
    let mut file = fs::OpenOptions::new().write(true).open(path)?;
    file.write_all(value.as_bytes())
}

/// The cgroup2 mount and ember's path in it ("0::/path" in /proc/self/cgroup).
fn v2_location(mountinfo: &str, own: &str) -> Option<(PathBuf, PathBuf)> {
    let mount = mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let fstype = after.split_whitespace().next()?;
        (fstype == "cgroup2").then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some((mount, PathBuf::from(path.trim_start_matches('/'))))
}

/// A v1 hierarchy with `controller`, and ember's path in it.
fn v1_location(mountinfo: &str, own: &str, controller: &str) -> Option<(PathBuf, PathBuf)> {
    let mount = mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut fields = after.split_whitespace();
        if fields.next()? != "cgroup" {
            return None;
        }
        let options = fields.nth(1)?;
        options
            .split(',')
            .any(|o| o == controller)
            .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })?;
    Some((mount, PathBuf::from(path.trim_start_matches('/'))))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
25 1 0:23 / / rw,relatime - overlay overlay rw
30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const OWN: &str = "4:memory:/process_api/abc\n1:cpu:/\n0::/\n";

    #[test]
    fn finds_v1_hierarchies_and_our_place_in_them() {
        assert_eq!(
            v1_location(MOUNTINFO, OWN, "memory"),
            Some((
                PathBuf::from("/sys/fs/cgroup/memory"),
                PathBuf::from("process_api/abc")
            ))
        );
        assert_eq!(
            v1_location(MOUNTINFO, OWN, "cpu"),
            Some((PathBuf::from("/sys/fs/cgroup/cpu"), PathBuf::new()))
        );
        assert_eq!(v1_location(MOUNTINFO, OWN, "pids"), None);
    }

    #[test]
    fn finds_the_v2_mount() {
        assert_eq!(
            v2_location(MOUNTINFO, OWN),
            Some((PathBuf::from("/sys/fs/cgroup/unified"), PathBuf::new()))
        );
    }
}
