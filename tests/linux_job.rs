//! Job mode on the default Linux guest: `ember run -- CMD` and `ember exec`, through the guest
//! agent over virtio-vsock. Boots are slow here, so one VM serves most checks through `ember exec`.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{ember, kvm_available, linux_args, scratch_dir, Run, LINUX_TIMEOUT};
use ember_agent::wire::{self, Message};

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn run_gives_the_commands_streams_and_status() {
    if !kvm_available() {
        return;
    }
    let mut args = linux_args("");
    args.extend(
        ["--", "sh", "-c", "echo out; echo err >&2; exit 7"]
            .iter()
            .map(|s| s.to_string()),
    );
    let r = common::run(&strs(&args), LINUX_TIMEOUT);
    assert_eq!(r.code(), 7, "{r:?}");
    assert_eq!(r.stdout, "out\n", "{r:?}");
    assert_eq!(r.stderr, "err\n", "{r:?}");
}

#[test]
fn an_agent_that_dies_ends_ember_with_125() {
    if !kvm_available() {
        return;
    }
    let mut args = linux_args("");
    // The command's parent is the agent.
    args.extend(
        ["--", "sh", "-c", "kill -9 $PPID; sleep 600"]
            .iter()
            .map(|s| s.to_string()),
    );
    let r = common::run(&strs(&args), LINUX_TIMEOUT);
    assert_eq!(r.code(), 125, "{r:?}");
    assert!(r.stderr.contains("agent"), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "one line: {r:?}");
}

/// `ember exec --vsock SOCKET [args] -- command`, with `input` on its stdin.
fn exec(socket: &Path, args: &[&str], input: &[u8]) -> Run {
    let mut all = vec!["exec", "--vsock", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    common::run_with_input(&all, input, Duration::from_secs(300))
}

/// Waits until the guest agent answers (the guest boots meanwhile).
fn wait_for_agent(socket: &Path, vm: &mut std::process::Child) {
    let deadline = Instant::now() + LINUX_TIMEOUT;
    loop {
        assert!(
            vm.try_wait().unwrap().is_none(),
            "the VM ended before its agent answered"
        );
        if socket.exists() {
            let r = exec(socket, &["--", "true"], b"");
            if r.code() == 0 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the guest agent never answered");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn exec_runs_many_commands_in_one_vm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("job-exec");
    let socket = dir.join("v.sock");
    // A host listener where the guest's connections to host port 1023 arrive: the agent says
    // Hello and Ready there once it listens (guest -> host over the hybrid socket).
    let ready = UnixListener::bind(format!("{}_{}", socket.display(), wire::READY_PORT)).unwrap();
    let console = dir.join("console.log");
    let mut args = linux_args("ember.cmd=\"sleep 3600\"");
    args.extend([
        "--vsock".into(),
        format!("cid=3,socket={}", socket.display()),
        "--console".into(),
        format!("file={}", console.display()),
    ]);
    let mut vm = common::spawn(&strs(&args), Stdio::null());
    let guard = KillOnDrop(&mut vm, console.clone());

    let (mut greeting, _) = ready.accept().unwrap();
    assert_eq!(
        wire::read_message(&mut greeting).unwrap(),
        Some(Message::Hello {
            version: wire::VERSION
        })
    );
    assert_eq!(
        wire::read_message(&mut greeting).unwrap(),
        Some(Message::Ready)
    );
    wait_for_agent(&socket, guard.0);

    // Streams apart, the status back.
    let r = exec(
        &socket,
        &["--", "sh", "-c", "echo out; echo err >&2; exit 7"],
        b"",
    );
    assert_eq!(
        (r.code(), r.stdout.as_str(), r.stderr.as_str()),
        (7, "out\n", "err\n")
    );
    // Exit codes as docker run gives them.
    assert_eq!(exec(&socket, &["--", "/nonexistent"], b"").code(), 127);
    assert_eq!(exec(&socket, &["--", "/etc/passwd"], b"").code(), 126);
    assert_eq!(
        exec(&socket, &["--", "sh", "-c", "kill -9 $$"], b"").code(),
        137
    );
    let r = exec(&socket, &["--timeout", "3", "--", "sleep", "600"], b"");
    assert_eq!(r.code(), 124, "{r:?}");
    // Environment and working directory.
    let r = exec(
        &socket,
        &[
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\" $PWD",
        ],
        b"",
    );
    assert_eq!(r.stdout, "hi there /tmp\n", "{r:?}");

    // 1 MiB of binary stdin, echoed byte for byte.
    let input: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut child = Command::new(ember())
        .args([
            "exec",
            "--vsock",
            socket.to_str().unwrap(),
            "-i",
            "--",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let sent = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&sent).unwrap());
    let mut echoed = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut echoed)
        .unwrap();
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(echoed.len(), input.len());
    assert!(echoed == input, "stdin came back changed");

    // Ten commands at once.
    let runs: Vec<_> = (0..10)
        .map(|n| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                exec(
                    &socket,
                    &["--", "sh", "-c", &format!("sleep 1; echo {n}")],
                    b"",
                )
            })
        })
        .collect();
    for (n, run) in runs.into_iter().enumerate() {
        let r = run.join().unwrap();
        assert_eq!((r.code(), r.stdout.clone()), (0, format!("{n}\n")), "{r:?}");
    }

    // By hand, as another host program would: CONNECT to the agent's port, read OK and then the
    // agent's own first frame, its Hello.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(format!("CONNECT {}\n", wire::AGENT_PORT).as_bytes())
        .unwrap();
    let mut ok = Vec::new();
    let mut byte = [0u8];
    while byte[0] != b'\n' {
        stream.read_exact(&mut byte).unwrap();
        ok.push(byte[0]);
    }
    assert!(ok.starts_with(b"OK "), "{}", String::from_utf8_lossy(&ok));
    assert_eq!(
        wire::read_message(&mut stream).unwrap(),
        Some(Message::Hello {
            version: wire::VERSION
        })
    );
    drop(stream);
    // A guest port nobody listens on is closed.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(b"CONNECT 5555\n").unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));

    // A terminal: the command has one, sees the host's size and its changes, and the host
    // terminal comes back as it was.
    tty_session(&socket);

    drop(greeting);
    common::send_signal(guard.0, libc::SIGTERM);
    let status = guard.0.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    std::mem::forget(guard);
    std::fs::remove_dir_all(&dir).ok();
}

fn tty_session(socket: &Path) {
    // Inside a pty made by script(1): the size is set, then changed while the command runs (the
    // kernel sends ember SIGWINCH), and the settings are compared before and after. The
    // background stty reads /dev/tty itself: a non-interactive shell gives background jobs
    // /dev/null for stdin. The resize comes 8 s in: on a loaded host the command's first
    // `stty size` has been seen more than 3 s after the exec started.
    let inner = format!(
        "stty rows 30 cols 100; stty -g; (sleep 8; stty rows 40 cols 120 </dev/tty) & \
         {} exec --vsock {} -t -- sh -c 'tty; stty size; sleep 20; stty size'; \
         echo \"ember-exit=$?\"; wait; stty -g",
        ember().display(),
        socket.display()
    );
    let child = common::in_pty(&inner);
    let r = common::finish(child, Duration::from_secs(300));
    let out = r.stdout.replace('\r', "");
    assert!(out.contains("/dev/pts/"), "{out}");
    assert!(out.contains("30 100\n"), "{out}");
    assert!(out.contains("40 120\n"), "{out}");
    assert!(out.contains("ember-exit=0"), "{out}");
    let settings: Vec<&str> = out.lines().filter(|l| l.split(':').count() > 10).collect();
    assert_eq!(settings.len(), 2, "{out}");
    assert_eq!(settings[0], settings[1], "terminal settings changed");
}

/// Kills the VM if a check fails, and shows its console.
struct KillOnDrop<'a>(&'a mut std::process::Child, PathBuf);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if std::thread::panicking() {
            let console = std::fs::read_to_string(&self.1).unwrap_or_default();
            eprintln!("guest console:\n{console}");
        }
    }
}
