//! Shared helpers for the integration tests: find or build the guests, run the real `ember`
//! binary with a deadline, and capture what the guest printed.

#![allow(dead_code)]

pub mod netns;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `ember` binary Cargo built for these tests.
pub fn ember() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ember"))
}

/// A fresh, empty scratch directory for one test: `ember-<name>-<pid>` under the temp directory
/// (the process ID keeps test binaries that run at once apart).
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether KVM tests can run here. With /dev/kvm they always run; without it they skip, and say
/// so in `target/ember-kvm-tests-skipped`, which `.ci/run` checks.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    record_skip("no /dev/kvm");
    false
}

/// Notes a skipped KVM test where `.ci/run` looks for it.
pub fn record_skip(why: &str) {
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("unknown test");
    eprintln!("SKIPPED {test}: {why}");
    let marker = workspace_root()
        .join("target")
        .join("ember-kvm-tests-skipped");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(marker)
    {
        let _ = writeln!(f, "{test}: {why}");
    }
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the micro-guests (once per test binary) and returns the directory they are in.
pub fn micro_guests_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = workspace_root().join("target").join("guests");
        // flock serialises the test binaries that build at the same time.
        let status = Command::new("flock")
            .arg(workspace_root().join("target").join(".guests.lock"))
            .args(["make", "-s", "-C"])
            .arg(workspace_root().join("resources").join("guests"))
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("run make for the micro-guests (is 'make' installed?)");
        assert!(status.success(), "building the micro-guests failed");
        out
    })
}

/// Path of micro-guest `name`.
pub fn micro_guest(name: &str) -> PathBuf {
    let dir = micro_guests_dir();
    for candidate in [
        name.to_string(),
        format!("{name}.elf"),
        format!("{name}.bzImage"),
    ] {
        let path = dir.join(&candidate);
        if path.exists() {
            return path;
        }
    }
    panic!("micro-guest {name} not found in {}", dir.display());
}

/// What one `ember` run produced.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// A failing test shows what the guest printed: any assertion that fails while a `Run` is alive
/// prints its console output and ember's stderr on the way out.
impl Drop for Run {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- guest console ({:?}, {:.1} s) ----\n{}\n---- ember stderr ----\n{}\n----",
                self.status,
                self.elapsed.as_secs_f64(),
                self.stdout,
                self.stderr
            );
        }
    }
}

impl Run {
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }

    /// Asserts the guest printed `line` as a whole line.
    pub fn assert_line(&self, line: &str) {
        assert!(
            self.stdout
                .lines()
                .any(|l| l.trim_end_matches('\r') == line),
            "expected the line {line:?} in the guest output:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
    }

    /// Lines of guest output starting with `prefix`, without it.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
            .map(str::to_string)
            .collect()
    }
}

/// A running ember that is killed and reaped when dropped, unless taken: a test that fails
/// half-way must not leave a VM running (and loading the host) after it.
pub struct Reaper(pub Option<Child>);

impl Reaper {
    pub fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child was taken")
    }

    /// The child, no longer killed on drop.
    pub fn take(&mut self) -> Child {
        self.0.take().expect("the child was taken")
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `ember` with `args`, stdout/stderr piped.
pub fn spawn(args: &[&str], stdin: Stdio) -> Child {
    Command::new(ember())
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ember")
}

/// Waits for `child` with a deadline (killing it past that) and collects its output.
pub fn finish(mut child: Child, timeout: Duration) -> Run {
    let start = Instant::now();
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stderr.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ember") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ember did not exit within {timeout:?}; output so far:\n{}",
                out_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    Run {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed,
    }
}

/// Runs `ember` with no stdin and waits for it.
pub fn run(args: &[&str], timeout: Duration) -> Run {
    finish(spawn(args, Stdio::null()), timeout)
}

/// Runs `ember` with `input` piped to its stdin.
pub fn run_with_input(args: &[&str], input: &[u8], timeout: Duration) -> Run {
    let mut child = spawn(args, Stdio::piped());
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let run = finish(child, timeout);
    let _ = writer.join();
    run
}

/// Starts `ember` and waits until the guest has printed `marker`; returns the running child
/// (its stdout handed back, so [`finish`] can collect the rest).
pub fn spawn_until(args: &[&str], marker: &str) -> Child {
    let mut child = spawn(args, Stdio::null());
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains(marker) {
        let n = stdout.read(&mut buf).expect("read guest output");
        assert!(
            n > 0,
            "guest ended before printing {marker:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    child.stdout = Some(stdout);
    child
}

/// Runs the shell command `inner` on a pseudo-terminal of its own, made by script(1), with every
/// stream piped.
pub fn in_pty(inner: &str) -> Child {
    Command::new("script")
        .args(["-q", "-e", "-c", inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script(1)")
}

/// Sends `signal` to a child process.
pub fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on the pid of a child we own and have not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, signal) };
    assert_eq!(rc, 0, "kill({signal})");
}

/// The default Linux guest (kernel, initramfs), built by `resources/build-guest.sh` if the cache
/// does not hold it yet (a few minutes, once).
pub fn linux_guest() -> &'static (PathBuf, PathBuf) {
    static GUEST: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    GUEST.get_or_init(|| {
        let script = workspace_root().join("resources").join("build-guest.sh");
        let status = Command::new("flock")
            .arg(workspace_root().join("target").join(".linux-guest.lock"))
            .arg(&script)
            .stdout(Stdio::null())
            .status()
            .expect("run resources/build-guest.sh");
        assert!(
            status.success(),
            "building the Linux guest failed; run {} to see why",
            script.display()
        );
        let dir = cache_dir().join("default");
        // Resolved now: default/ follows the newest build, and another checkout building a
        // different guest meanwhile must not change the one this test binary boots.
        let resolve = |name: &str| std::fs::canonicalize(dir.join(name)).unwrap_or(dir.join(name));
        let guest = (resolve("vmlinux"), resolve("initramfs.cpio"));
        assert!(
            guest.0.exists() && guest.1.exists(),
            "no guest in {}",
            dir.display()
        );
        guest
    })
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache"))
        .join("ember")
}

/// A Linux boot on software KVM takes tens of seconds (30-60 s seen), and the net test moves
/// megabytes through emulated TCP code: allow for a slow or loaded machine.
pub const LINUX_TIMEOUT: Duration = Duration::from_secs(600);

/// Command-line arguments that boot the Linux guest with `cmdline` appended to the usual one.
pub fn linux_args(extra_cmdline: &str) -> Vec<String> {
    let (kernel, initrd) = linux_guest();
    vec![
        "run".into(),
        "--kernel".into(),
        kernel.display().to_string(),
        "--initrd".into(),
        initrd.display().to_string(),
        "--cmdline".into(),
        format!("{TEST_CMDLINE} {extra_cmdline}"),
    ]
}

/// The kernel command line of every Linux test: the default guest's, plus a report on the
/// console of any process killed by a signal (its registers and code bytes: loglevel=5 shows
/// the kernel's warning-level messages, which that report is made of).
pub const TEST_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet tsc=reliable print-fatal-signals=1 loglevel=5";

/// Like [`spawn_until`], for a prepared command (e.g. one run inside a network namespace); also
/// returns the output read so far.
pub fn spawn_command_until(
    mut command: Command,
    marker: &str,
    timeout: Duration,
) -> (Child, String) {
    let mut child = command.spawn().expect("start ember");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let marker = marker.to_string();
    // Read on a thread so a guest that never prints the marker cannot hang the test.
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
            if String::from_utf8_lossy(&seen).contains(&marker) {
                let _ = tx.send(());
                break;
            }
        }
        (stdout, seen)
    });
    if rx.recv_timeout(timeout).is_err() {
        let _ = child.kill();
        let (_, seen) = reader.join().expect("reader thread");
        panic!(
            "guest never printed the marker:\n{}",
            String::from_utf8_lossy(&seen)
        );
    }
    let (stdout, seen) = reader.join().expect("reader thread");
    child.stdout = Some(stdout);
    (child, String::from_utf8_lossy(&seen).into_owned())
}

/// Everything read so far from a child's stdout, gathered by a thread as it arrives, so a test can
/// wait for a line while the child keeps running.
pub struct OutputCollector {
    pub output: std::sync::Arc<std::sync::Mutex<String>>,
    thread: std::thread::JoinHandle<()>,
}

impl OutputCollector {
    pub fn start(mut stdout: impl Read + Send + 'static) -> Self {
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let thread = std::thread::spawn({
            let output = output.clone();
            move || {
                let mut buf = [0u8; 512];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        });
        Self { output, thread }
    }

    /// What has arrived so far.
    pub fn text(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for the end of the stream (the child closed it).
    pub fn join(self) {
        self.thread.join().unwrap();
    }
}

/// Each thread of process `pid`: its name and its `Seccomp:` mode (0 none, 2 filter), sorted.
pub fn thread_seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return threads;
    };
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((field("Name:"), field("Seccomp:")));
    }
    threads.sort();
    threads
}

/// Asserts that `threads` ([`thread_seccomp_modes`]) has every one of `names` and that every
/// thread has a seccomp filter.
pub fn assert_threads_filtered(threads: &[(String, String)], names: &[&str]) {
    for expected in names {
        assert!(
            threads.iter().any(|(name, _)| name == expected),
            "no thread {expected}: {threads:?}"
        );
    }
    assert!(
        threads.iter().all(|(_, mode)| mode == "2"),
        "a thread without a filter: {threads:?}"
    );
}

/// The first child process of `pid`, if it has one.
pub fn first_child(pid: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `DIR/rootfs.tar`: a root of busybox (from the host's busybox-static) and links for `applets`
/// in /bin, for container engines to import as an image (there is no registry).
pub fn busybox_rootfs_tar(dir: &Path, applets: &[&str]) -> PathBuf {
    let root = dir.join("rootfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    for applet in applets {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    let tar = dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success(), "tar of {}", root.display());
    tar
}
