//! The agent binary on the host: Unix sockets stand in for vsock, and the commands are the
//! host's own `sh`, `cat`, `sleep`, `tty` and `stty`.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ember_agent::wire::{
    read_message, write_message, ExecRequest, FailureKind, Message, ProcessLimits, Rlimit, WinSize,
    WireError, MAX_CHUNK, VERSION,
};

/// Long enough for a loaded 2-core machine, short enough that a hang fails the test.
const TIMEOUT: Duration = Duration::from_secs(30);

/// A running agent listening on a Unix socket in its own directory, with its ready connection.
struct Agent {
    child: Child,
    dir: PathBuf,
    ready: Option<UnixStream>,
    /// Where the agent says Hello and Ready.
    ready_listener: UnixListener,
}

impl Agent {
    fn start() -> Agent {
        Self::start_with(&[])
    }

    /// An agent with `extra` arguments.
    fn start_with(extra: &[&str]) -> Agent {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ember-agent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let ready_path = dir.join("ready.sock");
        let listener = UnixListener::bind(&ready_path).unwrap();
        let log = File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ember-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", dir.join("agent.sock").display()))
            .arg("--ready")
            .arg(format!("unix:{}", ready_path.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let ready = accept_announcement(&listener);
        Agent {
            child,
            dir,
            ready: Some(ready),
            ready_listener: listener,
        }
    }

    /// A raw connection to the agent, before any frame.
    fn raw(&self) -> UnixStream {
        let s = UnixStream::connect(self.dir.join("agent.sock")).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s
    }

    /// A connection past the Hello exchange.
    fn connect(&self) -> Conn {
        let mut conn = Conn(self.raw());
        assert_eq!(conn.recv(), Message::Hello { version: VERSION });
        conn.send(&Message::Hello { version: VERSION });
        conn
    }

    fn run(&self, request: ExecRequest) -> Outcome {
        let mut conn = self.connect();
        conn.send(&Message::Exec(request));
        conn.collect()
    }

    fn still_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            // The agent's log is the first thing to read when a test fails.
            if let Ok(log) = fs::read_to_string(self.dir.join("agent.log")) {
                eprintln!("--- agent log ---\n{log}-----------------");
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

struct Conn(UnixStream);

#[derive(Debug, Default)]
struct Outcome {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// Exited, Signaled or Failed.
    last: Option<Message>,
}

impl Outcome {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl Conn {
    fn send(&mut self, m: &Message) {
        write_message(&mut self.0, m).unwrap();
    }

    fn recv(&mut self) -> Message {
        read_message(&mut self.0)
            .unwrap()
            .expect("the agent closed the connection")
    }

    /// Reads until `Started`, returning the pid.
    fn started(&mut self) -> u32 {
        match self.recv() {
            Message::Started { pid } => pid,
            other => panic!("expected Started, got {other:?}"),
        }
    }

    /// Reads output until it contains `needle` (returning all of it so far).
    fn output_until(&mut self, out: &mut Outcome, needle: &str) {
        while !out.stdout().contains(needle) {
            match self.recv() {
                Message::Stdout(d) => out.stdout.extend(d),
                Message::Stderr(d) => out.stderr.extend(d),
                other => panic!("waiting for {needle:?} in {:?}: {other:?}", out.stdout()),
            }
        }
    }

    /// Reads everything to the last frame, then checks that the agent closes.
    fn collect(&mut self) -> Outcome {
        let mut out = Outcome::default();
        self.collect_into(&mut out);
        out
    }

    fn collect_into(&mut self, out: &mut Outcome) {
        loop {
            match self.recv() {
                Message::Started { pid } => out.pid = Some(pid),
                Message::Stdout(d) => {
                    assert!(d.len() <= MAX_CHUNK);
                    out.stdout.extend(d)
                }
                Message::Stderr(d) => {
                    assert!(d.len() <= MAX_CHUNK);
                    out.stderr.extend(d)
                }
                last @ (Message::Exited { .. }
                | Message::Signaled { .. }
                | Message::Failed { .. }) => {
                    out.last = Some(last);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(
            read_message(&mut self.0).unwrap().is_none(),
            "the agent closes after the last frame"
        );
    }
}

/// The agent closed the connection with no further frame. Closing a socket with unread input
/// (the rest of the garbage) resets it, so a reset counts as closed too.
fn assert_closed(conn: &mut Conn) {
    match read_message(&mut conn.0) {
        Ok(None) => {}
        Err(WireError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection closed, got {other:?}"),
    }
}

/// Accepts the agent's ready connection (with a deadline, so an agent that never connects fails
/// the test) and reads its Hello and Ready.
fn accept_announcement(listener: &UnixListener) -> UnixStream {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    let ready = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the agent never connected");
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    };
    ready.set_nonblocking(false).unwrap();
    ready.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut r = &ready;
    assert_eq!(
        read_message(&mut r).unwrap(),
        Some(Message::Hello { version: VERSION })
    );
    assert_eq!(read_message(&mut r).unwrap(), Some(Message::Ready));
    ready
}

fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec![],
        cwd: None,
        stdin: false,
        tty: None,
        user: None,
        limits: ProcessLimits::default(),
    }
}

fn sh(script: &str) -> ExecRequest {
    request(&["sh", "-c", script])
}

/// Whether a process group has any member left.
fn group_alive(pgid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence; nothing is delivered.
    unsafe { libc::kill(-(pgid as i32), 0) == 0 }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stdout_stderr_and_exit_code() {
    let agent = Agent::start();
    let out = agent.run(sh("echo out; echo err >&2; exit 7"));
    assert!(out.pid.is_some());
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.last, Some(Message::Exited { code: 7 }));
}

#[test]
fn a_refresh_before_exec_is_taken_and_the_command_runs() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    // On a host the agent leaves the host's clock and RNG alone: a time far off changes nothing.
    conn.send(&Message::Refresh {
        realtime_ns: 0,
        entropy: vec![1; 32],
    });
    conn.send(&Message::Exec(sh("echo refreshed")));
    let out = conn.collect();
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
    assert_eq!(out.stdout, b"refreshed\n");
    // A refresh alone, then the end of the connection (what a restore sends): nothing to run.
    let mut conn = agent.connect();
    conn.send(&Message::Refresh {
        realtime_ns: 0,
        entropy: vec![2; 32],
    });
    drop(conn);
    // A Refresh where Exec belongs (a second one) is a protocol error.
    let mut conn = agent.connect();
    conn.send(&Message::Refresh {
        realtime_ns: 0,
        entropy: vec![],
    });
    conn.send(&Message::Refresh {
        realtime_ns: 0,
        entropy: vec![],
    });
    assert!(matches!(conn.recv(), Message::Failed { .. }));
    // Asked to power off on a host, the agent refuses (and goes on serving).
    let mut conn = agent.connect();
    conn.send(&Message::Shutdown);
    assert!(
        matches!(conn.recv(), Message::Failed { message, .. } if message.contains("not in a guest"))
    );
    assert_eq!(agent.run(sh("echo still")).stdout, b"still\n");
}

#[test]
fn environment_and_working_directory() {
    let agent = Agent::start();
    let mut req = sh("echo \"$PATH|$HOME|${TERM-unset}|$FOO\"; pwd");
    req.env = vec![("FOO".into(), "bar".into())];
    req.cwd = Some("/tmp".into());
    let out = agent.run(req);
    assert_eq!(
        out.stdout(),
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/root|unset|bar\n/tmp\n"
    );
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));

    let out = agent.run(request(&["pwd"]));
    assert_eq!(out.stdout(), "/\n", "the default cwd is /");

    let mut req = request(&["true"]);
    req.cwd = Some("/nonexistent-dir".into());
    let out = agent.run(req);
    assert!(
        matches!(
            out.last,
            Some(Message::Failed {
                kind: FailureKind::Other,
                ..
            })
        ),
        "a missing cwd is not 'command not found': {:?}",
        out.last
    );
}

#[test]
fn a_user_runs_the_command_with_its_ids_and_home() {
    let agent = Agent::start();
    // The host's /etc/passwd has nobody (65534) on Debian, as the agent's own root here.
    let mut req =
        sh("echo \"$(id -u) $(id -g) $(id -G) $HOME\"; touch /root/x 2>/dev/null || echo denied");
    req.user = Some("nobody".into());
    let out = agent.run(req.clone());
    assert_eq!(out.stdout(), "65534 65534 65534 /nonexistent\ndenied\n");
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
    // Numbers, with a group that exists nowhere.
    req.user = Some("4242:4343".into());
    let out = agent.run(req.clone());
    assert_eq!(out.stdout(), "4242 4343 4343 /\ndenied\n");
    // With a terminal, the terminal is the user's.
    let mut tty = sh("stat -c %u:%g $(tty)");
    tty.user = Some("4242:4343".into());
    tty.tty = Some(WinSize { rows: 24, cols: 80 });
    let out = agent.run(tty);
    assert_eq!(out.stdout().trim_end(), "4242:4343");
    // A name that is not there: nothing runs, 125.
    req.user = Some("no-such-user".into());
    let out = agent.run(req);
    match out.last {
        Some(Message::Failed {
            kind: FailureKind::Other,
            message,
        }) => assert!(message.contains("no-such-user"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn further_groups_limits_and_no_new_privileges() {
    let agent = Agent::start();
    let script = "echo \"$(id -u) $(id -g) $(id -G)\"; ulimit -n; ulimit -Hn; \
                  grep NoNewPrivs /proc/self/status";
    let mut req = sh(script);
    req.user = Some("4242:4343".into());
    req.limits = ProcessLimits {
        extra_groups: vec![10, 20],
        rlimits: vec![Rlimit {
            resource: libc::RLIMIT_NOFILE,
            soft: 100,
            hard: 200,
        }],
        no_new_privileges: true,
    };
    let out = agent.run(req.clone());
    assert_eq!(
        out.stdout(),
        "4242 4343 4343 10 20\n100\n200\nNoNewPrivs:\t1\n"
    );
    // Groups without a user: root with them.
    req.user = None;
    req.limits.rlimits.clear();
    req.limits.no_new_privileges = false;
    let out = agent.run(req);
    assert!(
        out.stdout().starts_with("0 0 0 10 20\n"),
        "{}",
        out.stdout()
    );
    assert!(
        out.stdout().ends_with("NoNewPrivs:\t0\n"),
        "{}",
        out.stdout()
    );
}

#[test]
fn a_broken_ready_connection_is_announced_again() {
    // As when a snapshot of the guest is restored: the vsock transport resets the connection,
    // and the new host waits for the agent's Ready.
    let mut agent = Agent::start();
    drop(agent.ready.take());
    agent.ready = Some(accept_announcement(&agent.ready_listener));
    // And it still serves.
    let out = agent.run(sh("echo still here"));
    assert_eq!(out.stdout(), "still here\n");
}

#[test]
fn cat_echoes_a_mebibyte_of_binary_stdin() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let mut req = request(&["cat"]);
    req.stdin = true;
    conn.send(&Message::Exec(req));
    // Every byte value, in an order no two chunks share.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    // Write from another thread, as a real host would: the agent streams cat's output back
    // while stdin is still arriving.
    let mut writer = Conn(conn.0.try_clone().unwrap());
    let input = data.clone();
    let feeder = thread::spawn(move || {
        for chunk in input.chunks(MAX_CHUNK) {
            writer.send(&Message::Stdin(chunk.to_vec()));
        }
        writer.send(&Message::StdinEof);
    });
    let out = conn.collect();
    feeder.join().unwrap();
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
    assert!(out.stdout == data, "stdout differs from stdin");
    assert!(out.stderr.is_empty());
}

#[test]
fn without_stdin_the_command_reads_dev_null() {
    let agent = Agent::start();
    let out = agent.run(request(&["cat"]));
    assert_eq!(out.stdout, b"");
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
}

#[test]
fn a_missing_command_is_not_found() {
    let agent = Agent::start();
    for argv in [&["no-such-command-ember"][..], &["/nonexistent/bin/x"][..]] {
        let out = agent.run(request(argv));
        match out.last {
            Some(Message::Failed {
                kind: FailureKind::NotFound,
                message,
            }) => assert!(message.contains(argv[0]), "{message}"),
            other => panic!("{argv:?}: {other:?}"),
        }
        assert_eq!(out.pid, None, "never started");
    }
}

#[test]
fn a_non_executable_file_is_not_executable() {
    let agent = Agent::start();
    let path = agent.dir.join("not-executable");
    fs::write(&path, "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    // A directory cannot be executed either.
    for target in [path.as_path(), Path::new("/tmp")] {
        let out = agent.run(request(&[target.to_str().unwrap()]));
        assert!(
            matches!(
                out.last,
                Some(Message::Failed {
                    kind: FailureKind::NotExecutable,
                    ..
                })
            ),
            "{target:?}: {:?}",
            out.last
        );
    }
}

#[test]
fn signal_kills_the_command() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    conn.send(&Message::Exec(request(&["sleep", "100"])));
    let pid = conn.started();
    conn.send(&Message::Signal(9));
    let out = conn.collect();
    assert_eq!(out.last, Some(Message::Signaled { signal: 9 }));
    assert!(!group_alive(pid));
}

#[test]
fn signal_reaches_the_whole_process_group() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    // A background child the command waits for.
    conn.send(&Message::Exec(sh("sleep 100 & echo started; wait")));
    let pid = conn.started();
    let mut out = Outcome::default();
    conn.output_until(&mut out, "started");
    conn.send(&Message::Signal(libc::SIGTERM));
    conn.collect_into(&mut out);
    assert_eq!(
        out.last,
        Some(Message::Signaled {
            signal: libc::SIGTERM
        })
    );
    // The background sleep got it too (it may linger a moment as a zombie of init).
    wait_until("the group dies", || !group_alive(pid));
}

#[test]
fn the_command_s_end_ends_the_job() {
    // As with `docker run`: the background sleep still holds stdout, but the command's exit
    // ends the job, and what the command left in its process group is killed.
    let agent = Agent::start();
    let mut conn = agent.connect();
    let started = Instant::now();
    conn.send(&Message::Exec(sh("echo hi; sleep 100 & exit 3")));
    let out = conn.collect();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.stdout(), "hi\n");
    assert_eq!(out.last, Some(Message::Exited { code: 3 }));
    wait_until("the background sleep dies", || {
        !group_alive(out.pid.unwrap())
    });

    // The same on a tty, where the background job holds the pty's slave.
    let mut req = sh("echo hi; sleep 100 & exit 3");
    req.tty = Some(WinSize { rows: 24, cols: 80 });
    let started = Instant::now();
    let out = agent.run(req);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.stdout(), "hi\r\n");
    assert_eq!(out.last, Some(Message::Exited { code: 3 }));
    wait_until("the background sleep dies", || {
        !group_alive(out.pid.unwrap())
    });
}

/// Kills a process that escaped the agent's kill, when the test is done with it.
struct KillOnDrop(Option<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: plain syscall on a pid this test started (through the agent).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

fn escaped_pid(out: &Outcome) -> i32 {
    let line = out.stdout();
    line.trim()
        .parse()
        .unwrap_or_else(|_| panic!("expected a pid, got {line:?}"))
}

#[test]
fn a_process_that_left_the_group_cannot_hold_the_job_open() {
    // It prints its pid, then keeps stdout open for a long time, out of reach of the group's
    // SIGKILL: the job still ends a grace time after the command does.
    const ESCAPE: &str = "setsid sh -c 'echo $$; exec sleep 1000' &";
    let agent = Agent::start();
    let started = Instant::now();
    let out = agent.run(sh(&format!("{ESCAPE} exec sleep 0.2")));
    let escaped = KillOnDrop(Some(escaped_pid(&out)));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
    // SAFETY: signal 0 only checks for existence; nothing is delivered.
    let alive = unsafe { libc::kill(escaped.0.unwrap(), 0) } == 0;
    assert!(
        alive,
        "the process left the group, so the group's kill missed it"
    );
    drop(escaped);

    // The same when the host kills the command's group.
    let mut conn = agent.connect();
    conn.send(&Message::Exec(sh(&format!("{ESCAPE} wait"))));
    conn.started();
    let mut out = Outcome::default();
    conn.output_until(&mut out, "\n");
    let _escaped = KillOnDrop(Some(escaped_pid(&out)));
    let killed = Instant::now();
    conn.send(&Message::Signal(libc::SIGKILL));
    conn.collect_into(&mut out);
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(
        out.last,
        Some(Message::Signaled {
            signal: libc::SIGKILL
        })
    );
}

#[test]
fn a_dropped_connection_kills_the_process_group() {
    let mut agent = Agent::start();
    let mut conn = agent.connect();
    conn.send(&Message::Exec(sh("sleep 100 & sleep 100")));
    let pid = conn.started();
    assert!(group_alive(pid));
    drop(conn);
    wait_until("the process group dies", || !group_alive(pid));
    assert!(agent.still_running());
}

#[test]
fn tty_output_size_and_resize() {
    let agent = Agent::start();
    let size = WinSize {
        rows: 33,
        cols: 101,
    };

    let mut req = request(&["tty"]);
    req.tty = Some(size.clone());
    let out = agent.run(req);
    assert!(out.stdout().starts_with("/dev/pts/"), "{:?}", out.stdout());
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));

    // Everything is Stdout on a tty, stderr included; TERM is set.
    let mut req = sh("echo to-stderr >&2; echo $TERM");
    req.tty = Some(size.clone());
    let out = agent.run(req);
    assert_eq!(out.stdout(), "to-stderr\r\nxterm-256color\r\n");
    assert!(out.stderr.is_empty());

    let mut conn = agent.connect();
    let mut req = sh("stty size; read line; stty size");
    req.tty = Some(size);
    req.stdin = true;
    conn.send(&Message::Exec(req));
    conn.started();
    let mut out = Outcome::default();
    conn.output_until(&mut out, "33 101\r\n");
    conn.send(&Message::Resize(WinSize {
        rows: 50,
        cols: 120,
    }));
    conn.send(&Message::Stdin(b"\n".to_vec()));
    conn.collect_into(&mut out);
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
    assert!(out.stdout().ends_with("50 120\r\n"), "{:?}", out.stdout());
}

#[test]
fn tty_stdin_eof_ends_input_even_mid_line() {
    let agent = Agent::start();
    let mut conn = agent.connect();
    let mut req = request(&["cat"]);
    req.tty = Some(WinSize { rows: 24, cols: 80 });
    req.stdin = true;
    conn.send(&Message::Exec(req));
    conn.started();
    conn.send(&Message::Stdin(b"line\npartial".to_vec()));
    conn.send(&Message::StdinEof);
    let out = conn.collect();
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
    // The tty echoes the input, and cat writes it back: each twice, the partial line too.
    let stdout = out.stdout();
    assert_eq!(stdout.matches("line\r\n").count(), 2, "{stdout:?}");
    assert_eq!(stdout.matches("partial").count(), 2, "{stdout:?}");
}

#[test]
fn ten_commands_at_once() {
    let agent = Agent::start();
    // A rendezvous, not a stopwatch: each command marks its arrival, then waits for all ten
    // marks. Run one after another, the first would wait for the others in vain (exit 99).
    let marks = std::env::temp_dir().join(format!("ember-agent-ten-{}", std::process::id()));
    std::fs::create_dir_all(&marks).unwrap();
    thread::scope(|s| {
        let runs: Vec<_> = (0..10)
            .map(|i| {
                let agent = &agent;
                let marks = marks.display().to_string();
                s.spawn(move || {
                    let mut req = sh("touch \"$D/$N\"; i=0; \
                         while [ \"$(ls \"$D\" | wc -l)\" -lt 10 ]; do \
                           i=$((i+1)); [ $i -gt 1200 ] && exit 99; sleep 0.1; \
                         done; echo $N; exit $N");
                    req.env = vec![("N".into(), i.to_string()), ("D".into(), marks)];
                    (i, agent.run(req))
                })
            })
            .collect();
        for run in runs {
            let (i, out) = run.join().unwrap();
            assert_eq!(
                out.stdout(),
                format!("{i}\n"),
                "command {i}: {:?}",
                out.last
            );
            assert_eq!(out.last, Some(Message::Exited { code: i }));
        }
    });
    std::fs::remove_dir_all(&marks).unwrap();
}

#[test]
fn a_garbage_frame_closes_only_its_connection() {
    let mut agent = Agent::start();

    // Garbage instead of Hello: refused with Failed, then closed.
    let mut raw = agent.raw();
    let mut conn = Conn(raw.try_clone().unwrap());
    assert_eq!(conn.recv(), Message::Hello { version: VERSION });
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).unwrap();
    let last = conn.recv();
    assert!(
        matches!(
            last,
            Message::Failed {
                kind: FailureKind::Other,
                ..
            }
        ),
        "{last:?}"
    );
    assert_closed(&mut conn);

    // Garbage while a command runs: the connection closes and the command dies.
    let mut conn = agent.connect();
    conn.send(&Message::Exec(request(&["sleep", "100"])));
    let pid = conn.started();
    conn.0.write_all(&[2, 0, 0, 0, 0xee, 0]).unwrap();
    assert_closed(&mut conn);
    wait_until("the command dies", || !group_alive(pid));

    // A message only the agent sends, from the host: also a protocol error.
    let mut conn = agent.connect();
    conn.send(&Message::Exec(request(&["sleep", "100"])));
    let pid = conn.started();
    conn.send(&Message::Exited { code: 0 });
    assert_closed(&mut conn);
    wait_until("the command dies", || !group_alive(pid));

    // The agent still serves.
    assert!(agent.still_running());
    let out = agent.run(sh("echo still here"));
    assert_eq!(out.stdout(), "still here\n");
}

#[test]
fn a_wrong_version_is_refused() {
    let agent = Agent::start();
    let mut conn = Conn(agent.raw());
    assert_eq!(conn.recv(), Message::Hello { version: VERSION });
    conn.send(&Message::Hello {
        version: VERSION + 1,
    });
    let out = conn.collect();
    match out.last {
        Some(Message::Failed {
            kind: FailureKind::Other,
            message,
        }) => assert!(message.contains("wire version"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn large_output_arrives_in_order_in_bounded_chunks() {
    let agent = Agent::start();
    // 4 MiB on stdout and 1 MiB on stderr, interleaved by the kernel as it likes: each stream
    // must still arrive whole and in order (collect checks the chunk size).
    let out = agent.run(sh(
        "head -c 1048576 /dev/zero | tr '\\0' e >&2 & seq 1 600000; wait",
    ));
    assert_eq!(out.last, Some(Message::Exited { code: 0 }));
    let expected: String = (1..=600000).map(|i| format!("{i}\n")).collect();
    assert!(out.stdout() == expected, "stdout out of order or cut");
    assert_eq!(out.stderr.len(), 1 << 20);
    assert!(out.stderr.iter().all(|&b| b == b'e'));
}

#[test]
fn with_a_root_commands_run_inside_it() {
    // chroot needs root; the image here is a directory with a static busybox.
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/bin/busybox").exists() {
        eprintln!("SKIPPED: needs root and /bin/busybox (busybox-static)");
        return;
    }
    let image = std::env::temp_dir().join(format!("ember-agent-root-{}", std::process::id()));
    let _ = fs::remove_dir_all(&image);
    for dir in ["bin", "tmp", "work"] {
        fs::create_dir_all(image.join(dir)).unwrap();
    }
    fs::copy("/bin/busybox", image.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", image.join("bin/sh")).unwrap();
    let agent = Agent::start_with(&["--root", image.to_str().unwrap()]);
    let mut req = sh("pwd; ls /; echo written > /tmp/x");
    req.cwd = Some("/work".into());
    let out = agent.run(req);
    assert_eq!(
        out.last,
        Some(Message::Exited { code: 0 }),
        "{}",
        out.stdout()
    );
    assert_eq!(out.stdout(), "/work\nbin\ntmp\nwork\n");
    assert_eq!(
        fs::read_to_string(image.join("tmp/x")).unwrap(),
        "written\n"
    );
    // A working directory outside the image is refused before anything runs.
    let mut req = sh("true");
    req.cwd = Some("/nonexistent".into());
    assert!(matches!(agent.run(req).last, Some(Message::Failed { .. })));
    drop(agent);
    fs::remove_dir_all(&image).unwrap();
}
