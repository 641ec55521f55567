//! One exec connection: the handshake, then a poll loop that moves bytes between the host and
//! the command until the command has exited and all its output is sent.
//!
//! The command's end is the job's end, as with `docker run`: there the command is PID 1 of the
//! container's pid namespace, and when it exits the kernel SIGKILLs everything else in the
//! namespace, so whatever it left running (a background job still holding stdout, say) cannot
//! keep the container, or `docker run`, going. Here, once the command itself has exited, what it
//! left in its process group is killed with SIGKILL, its output is read for at most
//! [`EXIT_GRACE`] more (or until end-of-file, if sooner), and then the last frame goes out. What
//! the command wrote before it exited sits in the pipes (or the pty), and all of it is still
//! delivered, in order. A process that left the group (`setsid`) escapes the kill: it can hold
//! the job open for the grace time at most, and then loses its stdout and stderr.
//!
//! Everything is non-blocking and bounded: output is read from the command only while less than
//! [`OUT_HIGH`] bytes wait for the host, and the host's socket is read only while less than
//! [`STDIN_HIGH`] bytes wait for the command's stdin. A host that stops reading therefore stalls
//! only its own command (whose pipes fill up), never the agent, and one that floods stdin costs
//! a bounded buffer.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use ember_agent::wire::{
    self, Decoder, ExecRequest, FailureKind, Message, WireError, MAX_CHUNK, VERSION,
};

use crate::net::Stream;
use crate::refresh;
use crate::spawn::{self, Spawned};

/// Encoded output waiting for the host above which the command's output is left unread.
const OUT_HIGH: usize = 256 << 10;
/// Stdin bytes waiting for the command above which the host's socket is left unread.
const STDIN_HIGH: usize = 256 << 10;
/// How often to check on the command without a pidfd (kernels before 5.3).
const WAIT_POLL_MS: libc::c_int = 20;
/// How long output is still read after the command exits, while something it started keeps a
/// stream open: then whatever the stream holds is taken and it is closed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// How much the final read of a stream takes at least, when it cannot tell its capacity (a
/// pty's buffers are far smaller; a pipe says how much it holds): everything it holds.
const DRAIN_FALLBACK: usize = 1 << 20;

/// Serves one connection to its end. Never panics on anything the host sends. Only `in_guest`
/// (the agent of a guest, not one under test on a host) does a `Refresh` reseed the RNG and set
/// the clock, and a `Shutdown` power the machine off.
pub fn serve(id: u64, mut sock: Stream, in_guest: bool) {
    let request = match handshake(&mut sock, id, in_guest) {
        Ok(Request::Exec(request)) => request,
        Ok(Request::Shutdown) if in_guest => {
            log!("[{id}] the host asks the guest to power off");
            power_off();
        }
        Ok(Request::Shutdown) => {
            let message = "not in a guest: the agent powers nothing off".to_string();
            log!("[{id}] refused: {message}");
            let kind = FailureKind::Other;
            let _ = wire::write_message(&mut sock, &Message::Failed { kind, message });
            return;
        }
        Ok(Request::RefreshOnly) => {
            log!("[{id}] took the host's entropy and time");
            return;
        }
        Err(Refusal::Gone(why)) => {
            log!("[{id}] connection closed during handshake: {why}");
            return;
        }
        Err(Refusal::Fail(kind, message)) => {
            log!("[{id}] refused: {message}");
            let _ = wire::write_message(&mut sock, &Message::Failed { kind, message });
            return;
        }
    };
    let spawned = match spawn::spawn(&request) {
        Ok(spawned) => spawned,
        Err(e) => {
            log!("[{id}] {:?} failed to start: {}", request.argv, e.message);
            let _ = wire::write_message(
                &mut sock,
                &Message::Failed {
                    kind: e.kind,
                    message: e.message,
                },
            );
            return;
        }
    };
    let pid = spawned.child.id();
    log!(
        "[{id}] started pid {pid}{}: {:?}",
        if request.tty.is_some() {
            " on a tty"
        } else {
            ""
        },
        request.argv
    );
    let mut session = Session::new(id, sock, spawned);
    session.out.push_message(&Message::Started { pid });
    match session.run() {
        Ok(()) => log!("[{id}] pid {pid} {}", describe(session.status)),
        Err(why) => {
            log!("[{id}] closing: {why}; killing process group {pid}");
            session.kill_and_reap();
        }
    }
}

enum Refusal {
    /// The host closed or broke the connection: nobody to tell.
    Gone(String),
    /// Tell the host why, in `Failed`.
    Fail(FailureKind, String),
}

/// What the host asked for on a connection.
enum Request {
    Exec(ExecRequest),
    Shutdown,
    /// Only the refresh, done in the handshake.
    RefreshOnly,
}

/// Syncs the file systems and ends the machine: a power-off where the kernel can do one (ACPI),
/// otherwise a restart, which ends an Ember VM just the same (the default guest's kernel has no
/// ACPI and restarts through the i8042, `reboot=k`; asked to power off, it would only halt).
/// Processes are not asked to stop first: what they did not write is lost, what the file
/// systems hold is not.
fn power_off() -> ! {
    let how = if std::path::Path::new("/sys/firmware/acpi").exists() {
        libc::RB_POWER_OFF
    } else {
        libc::RB_AUTOBOOT
    };
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(how);
    }
    log!(
        "cannot power off: {}; the host ends the VM when its wait runs out",
        io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Hello both ways, then Refresh if the host sends one, then the one Exec or Shutdown (or the
/// end of the connection, after a Refresh). Blocking: nothing else happens on the connection
/// yet.
fn handshake(sock: &mut Stream, id: u64, apply_refresh: bool) -> Result<Request, Refusal> {
    wire::write_message(sock, &Message::Hello { version: VERSION })
        .map_err(|e| Refusal::Gone(e.to_string()))?;
    match read_or_refuse(sock)? {
        Message::Hello { version: VERSION } => {}
        Message::Hello { version } => {
            return Err(Refusal::Fail(
                FailureKind::Other,
                format!("wire version {version} is not supported: the agent speaks {VERSION}"),
            ))
        }
        other => {
            return Err(Refusal::Fail(
                FailureKind::Other,
                format!("protocol error: expected Hello, got {}", other.name()),
            ))
        }
    }
    let mut next = read_or_refuse(sock)?;
    if let Message::Refresh {
        realtime_ns,
        entropy,
    } = &next
    {
        if apply_refresh {
            // A guest that cannot be refreshed still runs the command: the failure is logged
            // on the console, which a failing job shows.
            match refresh::apply(*realtime_ns, entropy) {
                Ok(done) if done.clock_step_ns != 0 => log!(
                    "[{id}] clock stepped by {:.3} s to the host's",
                    done.clock_step_ns as f64 / 1e9
                ),
                Ok(_) => {}
                Err(e) => log!("[{id}] cannot take the host's entropy and time: {e}"),
            }
        }
        // A host that only refreshes (a guest just restored with nothing to run yet) closes
        // the connection here.
        next = match read_or_refuse(sock) {
            Err(Refusal::Gone(_)) => return Ok(Request::RefreshOnly),
            other => other?,
        };
    }
    match next {
        Message::Exec(request) => Ok(Request::Exec(request)),
        Message::Shutdown => Ok(Request::Shutdown),
        other => Err(Refusal::Fail(
            FailureKind::Other,
            format!("protocol error: expected Exec, got {}", other.name()),
        )),
    }
}

fn read_or_refuse(sock: &mut Stream) -> Result<Message, Refusal> {
    match wire::read_message(sock) {
        Ok(Some(message)) => Ok(message),
        Ok(None) => Err(Refusal::Gone("end of file".into())),
        Err(WireError::Io(e)) => Err(Refusal::Gone(e.to_string())),
        Err(e) => Err(Refusal::Fail(
            FailureKind::Other,
            format!("protocol error: {e}"),
        )),
    }
}

fn describe(status: Option<Outcome>) -> String {
    match status {
        Some(Outcome::Status(s)) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            _ => format!("ended: {s}"),
        },
        Some(Outcome::Lost) => "lost (wait failed)".into(),
        None => "still running".into(),
    }
}

/// How the command ended.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Status(ExitStatus),
    /// waitid failed (only if something else reaped our child, which the agent never does):
    /// reported as exit status 255 rather than hanging.
    Lost,
}

/// A byte queue with cheap consumption from the front.
#[derive(Default)]
struct Queue {
    buf: Vec<u8>,
    start: usize,
}

impl Queue {
    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    fn extend(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    fn push_message(&mut self, message: &Message) {
        self.extend(&wire::encode(message));
    }

    fn clear(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
    }
}

struct Session {
    id: u64,
    sock: Stream,
    decoder: Decoder,
    /// Encoded frames for the host.
    out: Queue,
    child: std::process::Child,
    pid: i32,
    /// Readable when the command exits (Linux 5.3+); without it, the loop polls on a timer.
    pidfd: Option<OwnedFd>,
    status: Option<Outcome>,
    /// Once the command has exited: when to stop waiting for its output to end.
    grace_end: Option<Instant>,
    final_queued: bool,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    stdin: Option<OwnedFd>,
    /// Bytes from the host not yet written to the command's stdin.
    stdin_buf: Queue,
    /// The host sent StdinEof (or the command closed its stdin): take no more.
    stdin_closed: bool,
    pty: Option<OwnedFd>,
    /// On a tty: whether the last byte sent ended a line, to know how many VEOFs end input.
    tty_line_empty: bool,
}

impl Session {
    fn new(id: u64, sock: Stream, spawned: Spawned) -> Session {
        let pid = spawned.child.id() as i32;
        let stdin_closed = spawned.stdin.is_none();
        Session {
            id,
            sock,
            decoder: Decoder::new(),
            out: Queue::default(),
            pidfd: pidfd_open(pid),
            child: spawned.child,
            pid,
            status: None,
            grace_end: None,
            final_queued: false,
            stdout: spawned.stdout,
            stderr: spawned.stderr,
            stdin: spawned.stdin,
            stdin_buf: Queue::default(),
            stdin_closed,
            pty: spawned.pty,
            tty_line_empty: true,
        }
    }

    /// The loop. `Ok` once the last frame is sent; `Err` (saying why) when the connection has
    /// to be dropped with the command still to be killed.
    fn run(&mut self) -> Result<(), String> {
        self.sock
            .set_nonblocking(true)
            .map_err(|e| format!("socket: {e}"))?;
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            if self.grace_end.is_some_and(|end| Instant::now() >= end) && self.output_open() {
                self.drain_output(&mut buf);
            }
            if !self.final_queued
                && self.status.is_some()
                && self.stdout.is_none()
                && self.stderr.is_none()
            {
                let last = match self.status {
                    Some(Outcome::Status(s)) => match (s.code(), s.signal()) {
                        (Some(code), _) => Message::Exited { code },
                        (None, Some(signal)) => Message::Signaled { signal },
                        _ => Message::Exited { code: 255 },
                    },
                    _ => Message::Exited { code: 255 },
                };
                self.out.push_message(&last);
                self.final_queued = true;
            }
            if self.final_queued && self.out.is_empty() {
                return Ok(());
            }

            const SOCK: usize = 0;
            const OUT: usize = 1;
            const ERR: usize = 2;
            const IN: usize = 3;
            const PID: usize = 4;
            // A negative fd is skipped by poll: what we do not want to hear about right now
            // (a full output queue, an empty stdin buffer) is left out, so a hung-up pipe
            // cannot keep waking the loop.
            let mut fds = [libc::pollfd {
                fd: -1,
                events: 0,
                revents: 0,
            }; 5];
            let sock_events = if !self.final_queued && self.stdin_buf.len() < STDIN_HIGH {
                libc::POLLIN
            } else {
                0
            } | if self.out.is_empty() {
                0
            } else {
                libc::POLLOUT
            };
            // The socket is always polled, even for no events: a hang-up or error is reported
            // regardless, and means the host is gone.
            fds[SOCK] = pollfd(self.sock.as_raw_fd(), sock_events);
            if self.out.len() < OUT_HIGH {
                fds[OUT] = pollfd(raw(&self.stdout), libc::POLLIN);
                fds[ERR] = pollfd(raw(&self.stderr), libc::POLLIN);
            }
            if !self.stdin_buf.is_empty() {
                fds[IN] = pollfd(raw(&self.stdin), libc::POLLOUT);
            }
            if self.status.is_none() {
                fds[PID] = pollfd(raw(&self.pidfd), libc::POLLIN);
            }
            let timeout = match self.grace_end {
                None if self.pidfd.is_none() => WAIT_POLL_MS,
                None => -1,
                Some(end) if self.output_open() => {
                    let left = end.saturating_duration_since(Instant::now());
                    left.as_nanos().div_ceil(1_000_000) as libc::c_int
                }
                Some(_) => -1,
            };
            // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("poll: {e}"));
            }

            let sock_rev = fds[SOCK].revents;
            if sock_rev & libc::POLLIN != 0 {
                self.read_host(&mut buf)?;
            } else if sock_rev & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err("host hung up".into());
            }
            if sock_rev & libc::POLLOUT != 0 {
                self.write_host()?;
            }
            if fds[OUT].revents != 0 {
                read_output(
                    self.id,
                    &mut self.stdout,
                    &mut self.out,
                    &mut buf,
                    Message::Stdout,
                );
            }
            if fds[ERR].revents != 0 {
                read_output(
                    self.id,
                    &mut self.stderr,
                    &mut self.out,
                    &mut buf,
                    Message::Stderr,
                );
            }
            if fds[IN].revents != 0 {
                self.write_stdin();
            }
            if self.status.is_none() && (self.pidfd.is_none() || fds[PID].revents != 0) {
                self.check_exit();
            }
        }
    }

    /// Reads what the host sent and acts on every complete frame.
    fn read_host(&mut self, buf: &mut [u8]) -> Result<(), String> {
        match self.sock.read(buf) {
            Ok(0) => return Err("host closed the connection".into()),
            Ok(n) => self.decoder.push(&buf[..n]),
            Err(e) if is_transient(&e) => return Ok(()),
            Err(e) => return Err(format!("reading from host: {e}")),
        }
        loop {
            match self.decoder.next() {
                Ok(Some(message)) => self.handle(message)?,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("protocol error: {e}")),
            }
        }
    }

    fn handle(&mut self, message: Message) -> Result<(), String> {
        match message {
            Message::Stdin(data) => {
                if !self.stdin_closed {
                    if let Some(&last) = data.last() {
                        self.tty_line_empty = last == b'\n' || last == b'\r';
                    }
                    self.stdin_buf.extend(&data);
                }
            }
            Message::StdinEof => {
                if !self.stdin_closed {
                    self.stdin_closed = true;
                    if let Some(pty) = &self.pty {
                        // Closing the master would hang up the terminal: end input the way a
                        // typist would, with the terminal's EOF character.
                        let eof = spawn::tty_eof(pty, self.tty_line_empty);
                        self.stdin_buf.extend(&eof);
                    } else if self.stdin_buf.is_empty() {
                        self.stdin = None;
                    }
                }
            }
            Message::Signal(signal) => {
                let alive = self.status.is_none();
                match spawn::kill_group(self.pid, signal, alive) {
                    Ok(()) => log!("[{}] signal {signal} to group {}", self.id, self.pid),
                    Err(e) => log!("[{}] signal {signal} to group {}: {e}", self.id, self.pid),
                }
            }
            Message::Resize(size) => match &self.pty {
                Some(pty) => {
                    if let Err(e) = spawn::set_winsize(pty, &size) {
                        log!("[{}] resize: {e}", self.id);
                    }
                }
                None => log!("[{}] resize ignored: no tty", self.id),
            },
            other => return Err(format!("protocol error: unexpected {}", other.name())),
        }
        Ok(())
    }

    fn write_host(&mut self) -> Result<(), String> {
        while !self.out.is_empty() {
            match self.sock.write(self.out.bytes()) {
                Ok(n) => self.out.consume(n),
                Err(e) if is_transient(&e) => return Ok(()),
                Err(e) => return Err(format!("writing to host: {e}")),
            }
        }
        Ok(())
    }

    fn write_stdin(&mut self) {
        let Some(fd) = &self.stdin else {
            self.stdin_buf.clear();
            return;
        };
        while !self.stdin_buf.is_empty() {
            match write_fd(fd.as_raw_fd(), self.stdin_buf.bytes()) {
                Ok(n) => self.stdin_buf.consume(n),
                Err(e) if is_transient(&e) => return,
                Err(e) => {
                    // The command closed its stdin (EPIPE) or the tty is gone: what the host
                    // still sends has nowhere to go.
                    log!("[{}] stdin closed: {e}", self.id);
                    self.stdin = None;
                    self.stdin_closed = true;
                    self.stdin_buf.clear();
                    return;
                }
            }
        }
        if self.stdin_closed && self.pty.is_none() {
            // Everything before StdinEof is written: now the command sees end-of-file.
            self.stdin = None;
        }
    }

    /// If the command has exited: kills what is left of its process group, reaps it, and starts
    /// the grace time for its output.
    fn check_exit(&mut self) {
        let status = match exited(self.pid) {
            Ok(false) => return,
            Ok(true) => {
                // The command is a zombie until reaped, and still in its group, so the group's
                // id is still its pid and names nothing else: kill the group first. (As a session
                // leader the command cannot have moved to another group.)
                if let Err(e) = spawn::kill_group(self.pid, libc::SIGKILL, false) {
                    log!(
                        "[{}] killing what is left of group {}: {e}",
                        self.id,
                        self.pid
                    );
                }
                match self.child.wait() {
                    Ok(status) => Outcome::Status(status),
                    Err(e) => {
                        log!("[{}] reaping pid {}: {e}", self.id, self.pid);
                        Outcome::Lost
                    }
                }
            }
            Err(e) => {
                log!("[{}] waiting for pid {}: {e}", self.id, self.pid);
                Outcome::Lost
            }
        };
        self.status = Some(status);
        self.pidfd = None;
        self.grace_end = Some(Instant::now() + EXIT_GRACE);
    }

    fn output_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }

    /// The grace time is over and some stream is still open, held by a process that left the
    /// command's group: takes what the streams hold now (all the command wrote is in there) and
    /// closes them, whatever the host's queue holds already.
    fn drain_output(&mut self, buf: &mut [u8]) {
        log!(
            "[{}] output still open {} s after pid {} ended (held by a process that left its \
             group?): closing it",
            self.id,
            EXIT_GRACE.as_secs(),
            self.pid
        );
        drain(
            self.id,
            &mut self.stdout,
            &mut self.out,
            buf,
            Message::Stdout,
        );
        drain(
            self.id,
            &mut self.stderr,
            &mut self.out,
            buf,
            Message::Stderr,
        );
    }

    /// The host is gone or broke the protocol: nobody will see the command's output, so it and
    /// everything it started are killed, and the command reaped.
    fn kill_and_reap(&mut self) {
        let alive = self.status.is_none();
        if let Err(e) = spawn::kill_group(self.pid, libc::SIGKILL, alive) {
            if e.raw_os_error() != Some(libc::ESRCH) {
                log!("[{}] killing group {}: {e}", self.id, self.pid);
            }
        }
        if alive {
            if let Err(e) = self.child.wait() {
                log!("[{}] waiting for pid {}: {e}", self.id, self.pid);
            }
        }
    }
}

/// Reads one chunk of a command's output into the host's queue, returning its length (0 when
/// there was nothing to read); end-of-file (or, on a pty, EIO once every holder of the slave has
/// closed it) closes the stream.
fn read_output(
    id: u64,
    fd: &mut Option<OwnedFd>,
    out: &mut Queue,
    buf: &mut [u8],
    make: fn(Vec<u8>) -> Message,
) -> usize {
    let Some(raw) = fd.as_ref().map(AsRawFd::as_raw_fd) else {
        return 0;
    };
    // SAFETY: `buf` is valid for writes of its length, at most MAX_CHUNK; the fd is ours.
    let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len().min(MAX_CHUNK)) };
    if n > 0 {
        out.push_message(&make(buf[..n as usize].to_vec()));
        return n as usize;
    }
    if n < 0 {
        let e = io::Error::last_os_error();
        if is_transient(&e) {
            return 0;
        }
        // EIO is how a pty master says "the other side is closed"; anything else is treated
        // the same way, so a broken stream cannot keep the loop spinning.
        if e.raw_os_error() != Some(libc::EIO) {
            log!("[{id}] reading output: {e}");
        }
    }
    *fd = None;
    0
}

/// Reads a stream until it is empty or a whole capacity's worth has been read, whichever comes
/// first, then closes it. Either way everything it held when called is taken, however fast
/// someone still writes to it, and the host's queue grows by about one capacity at most.
fn drain(
    id: u64,
    fd: &mut Option<OwnedFd>,
    out: &mut Queue,
    buf: &mut [u8],
    make: fn(Vec<u8>) -> Message,
) {
    let Some(raw) = fd.as_ref().map(AsRawFd::as_raw_fd) else {
        return;
    };
    // SAFETY: F_GETPIPE_SZ takes no argument and returns the pipe's capacity, or -1 (EBADF) for
    // anything but a pipe; the fd is ours.
    let capacity = match unsafe { libc::fcntl(raw, libc::F_GETPIPE_SZ) } {
        n if n > 0 => n as usize,
        _ => DRAIN_FALLBACK,
    };
    let mut taken = 0;
    while taken < capacity {
        match read_output(id, fd, out, buf, make) {
            0 => break,
            n => taken += n,
        }
    }
    *fd = None;
}

fn write_fd(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: `data` is valid for reads of its length; the fd is ours.
    let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn raw(fd: &Option<OwnedFd>) -> RawFd {
    fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
}

/// Whether our child `pid` has exited, leaving it unreaped (a zombie, so its pid and process
/// group id stay taken until it is reaped).
fn exited(pid: i32) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain old data, for which all-zero bytes are valid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: waitid writes at most one siginfo_t into `info`. WNOWAIT leaves the child
        // waitable, WNOHANG returns at once; the pid is our own unreaped child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    // SAFETY: waitid either filled `info` in for an exited child, whose si_pid is set, or (with
    // WNOHANG and nothing to report) left it as it was: zeroed, so si_pid reads 0.
    Ok(unsafe { info.si_pid() } != 0)
}

/// A pidfd for the child, so the loop sleeps until it exits instead of polling; `None` on
/// kernels without pidfd_open (before 5.3).
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1. The pid is our
    // unreaped child, so it cannot name another process.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall just returned this fd (it fits in an int), owned by nobody else.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two fds into `fds`, which has room for them.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        // SAFETY: pipe2 just returned these fds, owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    /// The bytes of every Stdout frame in `out`, in order.
    fn stdout_of(out: &Queue) -> Vec<u8> {
        let mut decoder = Decoder::new();
        decoder.push(out.bytes());
        let mut data = Vec::new();
        while let Some(message) = decoder.next().unwrap() {
            match message {
                Message::Stdout(chunk) => data.extend(chunk),
                other => panic!("unexpected {other:?}"),
            }
        }
        data
    }

    #[test]
    fn drain_takes_a_full_pipe_even_with_a_writer_still_at_it() {
        let (reader, writer) = pipe();
        // Fill the pipe to capacity with a pattern.
        let mut held = Vec::new();
        let mut i = 0u32;
        loop {
            let chunk: Vec<u8> = (0..4096)
                .map(|j| (i * 4096 + j) as u8 ^ (i as u8))
                .collect();
            match write_fd(writer.as_raw_fd(), &chunk) {
                Ok(n) => held.extend_from_slice(&chunk[..n]),
                Err(e) if is_transient(&e) => break,
                Err(e) => panic!("{e}"),
            }
            i += 1;
        }
        // Then someone keeps writing as fast as the pipe takes it, until it is closed.
        let writer = std::thread::spawn(move || loop {
            if let Err(e) = write_fd(writer.as_raw_fd(), &[b'x'; 4096]) {
                if !is_transient(&e) {
                    return;
                }
            }
        });
        let mut fd = Some(reader);
        let mut out = Queue::default();
        let mut buf = vec![0u8; MAX_CHUNK];
        drain(0, &mut fd, &mut out, &mut buf, Message::Stdout);
        assert!(fd.is_none(), "closed");
        let data = stdout_of(&out);
        assert!(data.starts_with(&held), "what the pipe held comes first");
        assert!(data[held.len()..].iter().all(|&b| b == b'x'));
        // The reader is closed: the writer gets EPIPE (SIGPIPE is ignored in Rust programs).
        writer.join().unwrap();
    }
}
