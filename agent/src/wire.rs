//! The wire format between Ember (the host) and the guest agent.
//!
//! Every connection carries a stream of frames in both directions. A frame is
//!
//! ```text
//! u32 LE length of what follows | u8 message type | payload
//! ```
//!
//! and the length (type byte included) is at most [`MAX_FRAME`]. Payload fields are little-endian
//! and laid end to end with no padding:
//!
//! - integers: `u16`/`u32`/`i32` little-endian;
//! - a flag: one byte, 0 or 1 (anything else is [`WireError::Invalid`]);
//! - a string: `u32` byte count, then that many bytes of UTF-8;
//! - a list: `u32` item count, then the items;
//! - an option: a flag, then the value if the flag is 1;
//! - a data chunk ([`Message::Stdout`], [`Message::Stderr`], [`Message::Stdin`]): the whole
//!   payload, since the frame length already delimits it.
//!
//! A payload must be used up exactly: bytes left over are an error, as are counts that claim more
//! than the frame holds. Decoding never allocates by a count it read: everything it allocates is
//! bounded by the bytes it actually has, so a hostile peer costs at most one [`MAX_FRAME`].
//!
//! The conversation on an exec connection (the host connects to the agent's [`AGENT_PORT`]):
//!
//! ```text
//! agent -> host   Hello
//! host  -> agent  Hello, [Refresh], Exec | Shutdown
//! agent -> host   Started | Failed
//! host  -> agent  Stdin*, StdinEof, Signal*, Resize*   (any order, any time after Exec)
//! agent -> host   Stdout*, Stderr*, then Exited | Signaled (the last frame, then the agent closes)
//! ```
//!
//! `Refresh` (version 3) carries the host's entropy and wall-clock time: a guest restored from a
//! snapshot shares its RNG state with every other clone of that snapshot and wakes with the clock
//! of the moment it was taken, so the agent reseeds the kernel's RNG and sets the clock from it
//! before it runs anything. A host may also send only `Refresh` and close the connection (done
//! right after a restore).
//!
//! `Exec` (version 4) may end with further groups, resource limits and no_new_privs; one without
//! them (version 3) has none.
//!
//! `Shutdown` (version 3) in place of `Exec` asks the guest to end cleanly: the agent syncs the
//! file systems and powers the machine off (or restarts it, without ACPI), which ends the VM; it
//! answers nothing.
//!
//! The command's exit ends the conversation, as with `docker run`: the agent then kills what the
//! command left running in its process group, sends the output still buffered (reading it for
//! 2 s at most, so a process that escaped the group cannot hold the connection open), and sends
//! the last frame.
//!
//! The host keeps its side open until it has the last frame: the agent takes end-of-file (or any
//! error) on the connection as the host having gone away, and kills the command's process group.
//! A malformed frame closes that connection (and kills its command) and nothing else.
//!
//! Once listening, the agent also connects to the host's [`READY_PORT`] and sends `Hello` then
//! `Ready` there, and keeps that connection open for its whole life, so the host notices its
//! death by the connection closing.

use std::io::{self, Read, Write};

/// The version of this wire format, exchanged in [`Message::Hello`].
pub const VERSION: u32 = 4;
/// The vsock port the agent listens on for exec connections.
pub const AGENT_PORT: u32 = 1024;
/// The host's vsock port the agent connects to, once listening, to say it is ready.
pub const READY_PORT: u32 = 1023;
/// The largest frame length (type byte + payload); a longer one is refused before anything is
/// allocated for it.
pub const MAX_FRAME: usize = 1 << 20;
/// The largest data chunk ([`Message::Stdout`], [`Message::Stderr`], [`Message::Stdin`]) a sender
/// should put in one frame. Receivers accept anything up to [`MAX_FRAME`]: the limit is there so
/// that output and control frames interleave finely, not for memory safety.
pub const MAX_CHUNK: usize = 64 << 10;

/// A terminal size, in character cells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WinSize {
    /// Rows (lines).
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// What to run: the one request of an exec connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments; the program is looked up in `PATH` unless it has a `/`.
    pub argv: Vec<String>,
    /// Environment variables, added (in order, later ones win) to the agent's clean default
    /// environment (`PATH`, `HOME`, and `TERM` with a tty).
    pub env: Vec<(String, String)>,
    /// The working directory; `/` when `None`.
    pub cwd: Option<String>,
    /// Whether the host will send stdin; without it the command's stdin is `/dev/null` (with a
    /// tty, stdin is the tty either way).
    pub stdin: bool,
    /// Run on a new pseudo-terminal of this size, as the controlling terminal of a new session;
    /// all output then comes back as [`Message::Stdout`].
    pub tty: Option<WinSize>,
    /// Run as this user, as `docker run --user` takes it: `USER[:GROUP]`, each a name (looked up
    /// in the root's `/etc/passwd` and `/etc/group`) or a number; root when `None`. Added in
    /// version 2.
    pub user: Option<String>,
    /// Further groups, resource limits and no_new_privs, as an OCI process spec gives them.
    /// Added in version 4, after everything else; a version-3 request without them decodes to
    /// the defaults.
    pub limits: ProcessLimits,
}

/// What else the command is started with (an OCI process's `user.additionalGids`, `rlimits`,
/// `noNewPrivileges`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Supplementary groups added to the user's.
    pub extra_groups: Vec<u32>,
    /// Resource limits set before the program runs.
    pub rlimits: Vec<Rlimit>,
    /// The program and its children cannot gain privileges (setuid bits, file capabilities).
    pub no_new_privileges: bool,
}

/// One resource limit: an `RLIMIT_*` number and its soft and hard values
/// (`u64::MAX` is unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// The most entropy one [`Message::Refresh`] carries: the kernel's RNG needs 32 bytes to be
/// seeded; more adds nothing.
pub const MAX_ENTROPY: usize = 256;

/// Why a command could not be started. Each has the exit status a shell would give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The program does not exist (`ENOENT`): a shell's 127.
    NotFound,
    /// The program exists but cannot be executed (`EACCES`, `ENOEXEC`, `EISDIR`): a shell's 126.
    NotExecutable,
    /// Anything else (bad request, wire version mismatch, resources): 125, as `docker run` uses.
    Other,
}

impl FailureKind {
    /// The exit status a shell (or `docker run`) reports for this failure.
    pub fn exit_code(self) -> i32 {
        match self {
            FailureKind::NotFound => 127,
            FailureKind::NotExecutable => 126,
            FailureKind::Other => 125,
        }
    }
}

/// One frame's message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Both directions, the first frame of every connection.
    Hello {
        /// The sender's [`VERSION`].
        version: u32,
    },
    /// Agent to host, on the [`READY_PORT`] connection: the agent is listening.
    Ready,
    /// Host to agent, at most once, between `Hello` and `Exec` (added in version 3): fresh
    /// randomness for the guest kernel's RNG and the host's wall-clock time.
    Refresh {
        /// `CLOCK_REALTIME` on the host, in nanoseconds since the Unix epoch.
        realtime_ns: i64,
        /// Random bytes from the host's kernel, at most [`MAX_ENTROPY`].
        entropy: Vec<u8>,
    },
    /// Host to agent, once per connection, after `Hello` (and `Refresh`).
    Exec(ExecRequest),
    /// Host to agent, in place of `Exec` (added in version 3): sync and power the guest off (or
    /// restart it, without ACPI): either ends an Ember VM.
    Shutdown,
    /// Agent to host: the command runs, as this pid (also its process group and session).
    Started {
        /// The command's pid in the guest.
        pid: u32,
    },
    /// Agent to host: the command's standard output (everything, with a tty), at most
    /// [`MAX_CHUNK`] bytes.
    Stdout(Vec<u8>),
    /// Agent to host: the command's standard error, at most [`MAX_CHUNK`] bytes.
    Stderr(Vec<u8>),
    /// Host to agent: bytes for the command's standard input.
    Stdin(Vec<u8>),
    /// Host to agent: no more stdin; the agent closes the command's stdin (or, on a tty, sends
    /// the terminal's end-of-file character) once everything before it is written.
    StdinEof,
    /// Host to agent: deliver this signal to the command's process group.
    Signal(i32),
    /// Host to agent: resize the command's tty (ignored without one).
    Resize(WinSize),
    /// Agent to host, the last frame: the command exited normally with this status.
    Exited {
        /// The exit status (0 to 255).
        code: i32,
    },
    /// Agent to host, the last frame: the command was killed by this signal.
    Signaled {
        /// The signal number.
        signal: i32,
    },
    /// Agent to host, the last frame: the command could not be started (or the request was
    /// refused).
    Failed {
        /// What went wrong, to choose an exit status.
        kind: FailureKind,
        /// A human-readable explanation.
        message: String,
    },
}

impl Message {
    /// The message's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::Ready => "Ready",
            Message::Refresh { .. } => "Refresh",
            Message::Exec(_) => "Exec",
            Message::Shutdown => "Shutdown",
            Message::Started { .. } => "Started",
            Message::Stdout(_) => "Stdout",
            Message::Stderr(_) => "Stderr",
            Message::Stdin(_) => "Stdin",
            Message::StdinEof => "StdinEof",
            Message::Signal(_) => "Signal",
            Message::Resize(_) => "Resize",
            Message::Exited { .. } => "Exited",
            Message::Signaled { .. } => "Signaled",
            Message::Failed { .. } => "Failed",
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Message::Hello { .. } => tag::HELLO,
            Message::Ready => tag::READY,
            Message::Refresh { .. } => tag::REFRESH,
            Message::Exec(_) => tag::EXEC,
            Message::Shutdown => tag::SHUTDOWN,
            Message::Started { .. } => tag::STARTED,
            Message::Stdout(_) => tag::STDOUT,
            Message::Stderr(_) => tag::STDERR,
            Message::Stdin(_) => tag::STDIN,
            Message::StdinEof => tag::STDIN_EOF,
            Message::Signal(_) => tag::SIGNAL,
            Message::Resize(_) => tag::RESIZE,
            Message::Exited { .. } => tag::EXITED,
            Message::Signaled { .. } => tag::SIGNALED,
            Message::Failed { .. } => tag::FAILED,
        }
    }
}

/// The message type bytes. Fixed forever for a given [`VERSION`].
mod tag {
    pub const HELLO: u8 = 1;
    pub const READY: u8 = 2;
    pub const EXEC: u8 = 3;
    pub const STARTED: u8 = 4;
    pub const STDOUT: u8 = 5;
    pub const STDERR: u8 = 6;
    pub const STDIN: u8 = 7;
    pub const STDIN_EOF: u8 = 8;
    pub const SIGNAL: u8 = 9;
    pub const RESIZE: u8 = 10;
    pub const EXITED: u8 = 11;
    pub const SIGNALED: u8 = 12;
    pub const FAILED: u8 = 13;
    pub const REFRESH: u8 = 14;
    pub const SHUTDOWN: u8 = 15;
}

/// Why a frame could not be read, written or decoded. After any of these the stream is out of
/// step and the connection should be closed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The underlying reader or writer failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A frame length over [`MAX_FRAME`] (read, or about to be written).
    #[error("frame of {len} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge {
        /// The length announced (or that the message would encode to).
        len: usize,
    },
    /// A message type byte this version does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The stream ended inside a frame, or a payload is shorter than its fields (or counts) say.
    #[error("truncated frame")]
    Truncated,
    /// A string field is not UTF-8.
    #[error("string is not UTF-8")]
    BadUtf8,
    /// A payload has bytes left over after its last field.
    #[error("{count} unexpected bytes after the message")]
    TrailingBytes {
        /// How many bytes were left.
        count: usize,
    },
    /// A field holds a value out of its range (a flag that is not 0 or 1, an unknown failure
    /// kind), or the frame is empty (no type byte).
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Encodes a message as one whole frame, length header included.
///
/// This does not check [`MAX_FRAME`] (an `Exec` could exceed it): [`write_message`] does, and a
/// reader refuses such a frame. A length that does not fit in the header is written as
/// `u32::MAX`, which every reader refuses too.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut buf = vec![0u8; 4];
    buf.push(message.type_byte());
    match message {
        Message::Hello { version } => put_u32(&mut buf, *version),
        Message::Ready | Message::StdinEof | Message::Shutdown => {}
        Message::Refresh {
            realtime_ns,
            entropy,
        } => {
            buf.extend_from_slice(&realtime_ns.to_le_bytes());
            buf.extend_from_slice(entropy);
        }
        Message::Exec(request) => {
            put_count(&mut buf, request.argv.len());
            for arg in &request.argv {
                put_str(&mut buf, arg);
            }
            put_count(&mut buf, request.env.len());
            for (name, value) in &request.env {
                put_str(&mut buf, name);
                put_str(&mut buf, value);
            }
            match &request.cwd {
                Some(cwd) => {
                    buf.push(1);
                    put_str(&mut buf, cwd);
                }
                None => buf.push(0),
            }
            buf.push(u8::from(request.stdin));
            match &request.tty {
                Some(size) => {
                    buf.push(1);
                    put_winsize(&mut buf, size);
                }
                None => buf.push(0),
            }
            match &request.user {
                Some(user) => {
                    buf.push(1);
                    put_str(&mut buf, user);
                }
                None => buf.push(0),
            }
            let limits = &request.limits;
            put_count(&mut buf, limits.extra_groups.len());
            for group in &limits.extra_groups {
                put_u32(&mut buf, *group);
            }
            put_count(&mut buf, limits.rlimits.len());
            for limit in &limits.rlimits {
                put_u32(&mut buf, limit.resource);
                buf.extend_from_slice(&limit.soft.to_le_bytes());
                buf.extend_from_slice(&limit.hard.to_le_bytes());
            }
            buf.push(u8::from(limits.no_new_privileges));
        }
        Message::Started { pid } => put_u32(&mut buf, *pid),
        Message::Stdout(data) | Message::Stderr(data) | Message::Stdin(data) => {
            buf.extend_from_slice(data)
        }
        Message::Signal(signal) => buf.extend_from_slice(&signal.to_le_bytes()),
        Message::Resize(size) => put_winsize(&mut buf, size),
        Message::Exited { code } => buf.extend_from_slice(&code.to_le_bytes()),
        Message::Signaled { signal } => buf.extend_from_slice(&signal.to_le_bytes()),
        Message::Failed { kind, message } => {
            buf.push(match kind {
                FailureKind::NotFound => 0,
                FailureKind::NotExecutable => 1,
                FailureKind::Other => 2,
            });
            put_str(&mut buf, message);
        }
    }
    let len = u32::try_from(buf.len() - 4).unwrap_or(u32::MAX);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf
}

/// Writes one message as a frame and flushes the writer.
///
/// Fails with [`WireError::TooLarge`] (writing nothing) if the frame would be over
/// [`MAX_FRAME`].
pub fn write_message(w: &mut impl Write, message: &Message) -> Result<(), WireError> {
    let frame = encode(message);
    let len = frame.len() - 4;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge { len });
    }
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame from a blocking reader.
///
/// Returns `Ok(None)` on end-of-file before the first byte of a frame (a clean close), and
/// [`WireError::Truncated`] on end-of-file inside one. Reads exactly the frame's bytes, so the
/// reader can be handed to a [`Decoder`] or read further afterwards.
pub fn read_message(r: &mut impl Read) -> Result<Option<Message>, WireError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(header)?;
    // Grow with the bytes that actually arrive rather than trusting the header for the whole
    // allocation: a peer that announces 1 MiB and sends 5 bytes costs 5 bytes (plus the first
    // chunk of capacity).
    let mut body = Vec::with_capacity(len.min(MAX_CHUNK + 1));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(WireError::Truncated);
    }
    decode_frame(&body).map(Some)
}

/// An incremental decoder for non-blocking readers: [`push`](Decoder::push) whatever bytes
/// arrived, then call [`next`](Decoder::next) until it returns `Ok(None)`.
///
/// It buffers at most one incomplete frame beyond what was pushed: a header announcing more than
/// [`MAX_FRAME`] is an error as soon as its four bytes are in, before anything is allocated for
/// it.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Where the unconsumed bytes of `buf` start: consumed frames are dropped lazily, so a push of
    /// many small frames is not a quadratic series of shifts.
    start: usize,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes received from the stream.
    pub fn push(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After an error the stream
    /// is out of step: drop the decoder (and the connection).
    // Not `Iterator`: the item would be a `Result` and "no more for now" is not the end.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>, WireError> {
        let avail = &self.buf[self.start..];
        let Some(header) = avail.first_chunk::<4>() else {
            return Ok(None);
        };
        let len = frame_len(*header)?;
        let Some(body) = avail.get(4..4 + len) else {
            return Ok(None);
        };
        let message = decode_frame(body);
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        message.map(Some)
    }

    /// Bytes pushed but not yet returned as messages: non-zero at end-of-file means the stream
    /// was cut inside a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Checks a frame header's length: at least the type byte, at most [`MAX_FRAME`].
fn frame_len(header: [u8; 4]) -> Result<usize, WireError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge { len });
    }
    if len == 0 {
        return Err(WireError::Invalid("empty frame"));
    }
    Ok(len)
}

/// Decodes a frame's body (type byte + payload).
fn decode_frame(body: &[u8]) -> Result<Message, WireError> {
    let (&type_byte, payload) = body
        .split_first()
        .ok_or(WireError::Invalid("empty frame"))?;
    let mut p = Payload(payload);
    let message = match type_byte {
        tag::HELLO => Message::Hello { version: p.u32()? },
        tag::READY => Message::Ready,
        tag::SHUTDOWN => Message::Shutdown,
        tag::REFRESH => {
            let realtime_ns = i64::from_le_bytes(p.array()?);
            let entropy = p.rest();
            if entropy.len() > MAX_ENTROPY {
                return Err(WireError::Invalid("entropy length"));
            }
            Message::Refresh {
                realtime_ns,
                entropy: entropy.to_vec(),
            }
        }
        tag::EXEC => {
            // Each argument is at least its 4-byte length.
            let argc = p.count(4)?;
            let mut argv = Vec::new();
            for _ in 0..argc {
                argv.push(p.string()?);
            }
            // Each variable is at least two 4-byte lengths.
            let envc = p.count(8)?;
            let mut env = Vec::new();
            for _ in 0..envc {
                let name = p.string()?;
                let value = p.string()?;
                env.push((name, value));
            }
            let cwd = if p.flag("cwd flag")? {
                Some(p.string()?)
            } else {
                None
            };
            let stdin = p.flag("stdin flag")?;
            let tty = if p.flag("tty flag")? {
                Some(p.winsize()?)
            } else {
                None
            };
            let user = if p.flag("user flag")? {
                Some(p.string()?)
            } else {
                None
            };
            let mut limits = ProcessLimits::default();
            if !p.0.is_empty() {
                for _ in 0..p.count(4)? {
                    limits.extra_groups.push(p.u32()?);
                }
                for _ in 0..p.count(20)? {
                    limits.rlimits.push(Rlimit {
                        resource: p.u32()?,
                        soft: p.u64()?,
                        hard: p.u64()?,
                    });
                }
                limits.no_new_privileges = p.flag("no_new_privileges flag")?;
            }
            Message::Exec(ExecRequest {
                argv,
                env,
                cwd,
                stdin,
                tty,
                user,
                limits,
            })
        }
        tag::STARTED => Message::Started { pid: p.u32()? },
        tag::STDOUT => Message::Stdout(p.rest().to_vec()),
        tag::STDERR => Message::Stderr(p.rest().to_vec()),
        tag::STDIN => Message::Stdin(p.rest().to_vec()),
        tag::STDIN_EOF => Message::StdinEof,
        tag::SIGNAL => Message::Signal(p.i32()?),
        tag::RESIZE => Message::Resize(p.winsize()?),
        tag::EXITED => Message::Exited { code: p.i32()? },
        tag::SIGNALED => Message::Signaled { signal: p.i32()? },
        tag::FAILED => {
            let kind = match p.u8()? {
                0 => FailureKind::NotFound,
                1 => FailureKind::NotExecutable,
                2 => FailureKind::Other,
                _ => return Err(WireError::Invalid("failure kind")),
            };
            Message::Failed {
                kind,
                message: p.string()?,
            }
        }
        other => return Err(WireError::UnknownType(other)),
    };
    p.finish()?;
    Ok(message)
}

fn put_u32(buf: &mut Vec<u8>, value: u32) {
    buf.extend_from_slice(&value.to_le_bytes());
}

/// A count or byte length; one over `u32::MAX` cannot be sent anyway (the frame would be far over
/// [`MAX_FRAME`], which [`write_message`] refuses), so saturating keeps `encode` infallible.
fn put_count(buf: &mut Vec<u8>, count: usize) {
    put_u32(buf, u32::try_from(count).unwrap_or(u32::MAX));
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    put_count(buf, s.len());
    buf.extend_from_slice(s.as_bytes());
}

fn put_winsize(buf: &mut Vec<u8>, size: &WinSize) {
    buf.extend_from_slice(&size.rows.to_le_bytes());
    buf.extend_from_slice(&size.cols.to_le_bytes());
}

/// The unread part of a payload; every read is checked against what is left.
struct Payload<'a>(&'a [u8]);

impl<'a> Payload<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.0.len() {
            return Err(WireError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, WireError> {
        Ok(i32::from_le_bytes(self.array()?))
    }

    fn flag(&mut self, what: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(WireError::Invalid(what)),
        }
    }

    /// A list count, refused at once if the rest of the payload cannot hold that many items of
    /// at least `min_item_len` bytes each.
    fn count(&mut self, min_item_len: usize) -> Result<usize, WireError> {
        let count = self.u32()? as usize;
        match count.checked_mul(min_item_len) {
            Some(need) if need <= self.0.len() => Ok(count),
            _ => Err(WireError::Truncated),
        }
    }

    fn string(&mut self) -> Result<String, WireError> {
        let len = self.u32()? as usize;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::BadUtf8)
    }

    fn winsize(&mut self) -> Result<WinSize, WireError> {
        Ok(WinSize {
            rows: self.u16()?,
            cols: self.u16()?,
        })
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }

    fn finish(self) -> Result<(), WireError> {
        match self.0.len() {
            0 => Ok(()),
            count => Err(WireError::TrailingBytes { count }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_3_exec_has_the_default_limits() {
        let request = ExecRequest {
            argv: vec!["true".into()],
            env: vec![],
            cwd: None,
            stdin: false,
            tty: None,
            user: Some("1:1".into()),
            limits: ProcessLimits {
                extra_groups: vec![5],
                rlimits: vec![],
                no_new_privileges: true,
            },
        };
        let mut frame = Vec::new();
        write_message(&mut frame, &Message::Exec(request.clone())).unwrap();
        // Version 3 ended after the user: drop the limits (4 + 4 + 4 + 1 bytes) and fix the length.
        frame.truncate(frame.len() - 13);
        let len = (frame.len() - 4) as u32;
        frame[..4].copy_from_slice(&len.to_le_bytes());
        let decoded = read_message(&mut frame.as_slice()).unwrap();
        assert_eq!(
            decoded,
            Some(Message::Exec(ExecRequest {
                limits: ProcessLimits::default(),
                ..request
            }))
        );
    }

    fn samples() -> Vec<Message> {
        vec![
            Message::Hello { version: VERSION },
            Message::Hello { version: u32::MAX },
            Message::Ready,
            Message::Refresh {
                realtime_ns: 1_764_000_000_123_456_789,
                entropy: vec![7; 32],
            },
            Message::Refresh {
                realtime_ns: -1,
                entropy: vec![],
            },
            Message::Shutdown,
            Message::Exec(ExecRequest {
                argv: vec!["sh".into(), "-c".into(), "echo héllo".into(), String::new()],
                env: vec![("A".into(), "1".into()), ("EMPTY".into(), String::new())],
                cwd: Some("/tmp".into()),
                stdin: true,
                tty: Some(WinSize { rows: 24, cols: 80 }),
                user: Some("nobody:nogroup".into()),
                limits: ProcessLimits {
                    extra_groups: vec![10, 4294967295],
                    rlimits: vec![Rlimit {
                        resource: 7,
                        soft: 1024,
                        hard: u64::MAX,
                    }],
                    no_new_privileges: true,
                },
            }),
            Message::Exec(ExecRequest {
                argv: vec![],
                env: vec![],
                cwd: None,
                stdin: false,
                tty: None,
                user: None,
                limits: ProcessLimits::default(),
            }),
            Message::Started { pid: 4242 },
            Message::Stdout(b"out\n".to_vec()),
            Message::Stdout(vec![]),
            Message::Stderr((0..=255).collect()),
            Message::Stdin(vec![0xff; MAX_CHUNK]),
            Message::StdinEof,
            Message::Signal(9),
            Message::Signal(-1),
            Message::Resize(WinSize {
                rows: u16::MAX,
                cols: 0,
            }),
            Message::Exited { code: 7 },
            Message::Exited { code: -1 },
            Message::Signaled { signal: 15 },
            Message::Failed {
                kind: FailureKind::NotFound,
                message: "no such file".into(),
            },
            Message::Failed {
                kind: FailureKind::NotExecutable,
                message: String::new(),
            },
            Message::Failed {
                kind: FailureKind::Other,
                message: "wire version 2".into(),
            },
        ]
    }

    /// A frame by hand: header, type, payload.
    fn frame(type_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = ((payload.len() + 1) as u32).to_le_bytes().to_vec();
        f.push(type_byte);
        f.extend_from_slice(payload);
        f
    }

    /// A tiny xorshift64 so the fuzz loops need no crate and are reproducible.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn every_message_round_trips_through_read_message() {
        let all = samples();
        let mut stream = Vec::new();
        for m in &all {
            write_message(&mut stream, m).unwrap();
        }
        let mut r = stream.as_slice();
        for m in &all {
            assert_eq!(read_message(&mut r).unwrap().as_ref(), Some(m));
        }
        assert!(read_message(&mut r).unwrap().is_none(), "clean EOF");
    }

    #[test]
    fn every_message_round_trips_through_decoder_byte_by_byte() {
        let all = samples();
        let stream: Vec<u8> = all.iter().flat_map(encode).collect();
        let mut decoder = Decoder::new();
        let mut got = Vec::new();
        for b in stream {
            decoder.push(&[b]);
            while let Some(m) = decoder.next().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all);
        assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn decoder_takes_many_frames_in_one_push() {
        let all = samples();
        let stream: Vec<u8> = all.iter().flat_map(encode).collect();
        let mut decoder = Decoder::new();
        // Two halves, split mid-frame.
        let (a, b) = stream.split_at(stream.len() / 2 + 3);
        let mut got = Vec::new();
        for part in [a, b] {
            decoder.push(part);
            while let Some(m) = decoder.next().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, all);
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let header = ((MAX_FRAME + 1) as u32).to_le_bytes();
        let mut decoder = Decoder::new();
        decoder.push(&header);
        assert!(matches!(
            decoder.next(),
            Err(WireError::TooLarge { len }) if len == MAX_FRAME + 1
        ));
        let mut r = &u32::MAX.to_le_bytes()[..];
        assert!(matches!(
            read_message(&mut r),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn max_frame_is_accepted_and_one_more_is_not_written() {
        let ok = Message::Stdout(vec![1; MAX_FRAME - 1]);
        let mut out = Vec::new();
        write_message(&mut out, &ok).unwrap();
        assert_eq!(read_message(&mut out.as_slice()).unwrap(), Some(ok));
        let big = Message::Stdout(vec![1; MAX_FRAME]);
        let mut out = Vec::new();
        assert!(matches!(
            write_message(&mut out, &big),
            Err(WireError::TooLarge { len }) if len == MAX_FRAME + 1
        ));
        assert!(out.is_empty(), "nothing written");
    }

    #[test]
    fn unknown_type_and_empty_frame() {
        let mut r = &frame(0, &[])[..];
        assert!(matches!(
            read_message(&mut r),
            Err(WireError::UnknownType(0))
        ));
        let mut r = &frame(200, b"xx")[..];
        assert!(matches!(
            read_message(&mut r),
            Err(WireError::UnknownType(200))
        ));
        let mut r = &[0u8, 0, 0, 0][..];
        assert!(matches!(read_message(&mut r), Err(WireError::Invalid(_))));
    }

    #[test]
    fn truncation_anywhere_is_an_error() {
        for m in samples() {
            let f = encode(&m);
            for cut in 1..f.len() {
                let mut r = &f[..cut];
                assert!(
                    matches!(read_message(&mut r), Err(WireError::Truncated)),
                    "{} cut at {cut}",
                    m.name()
                );
                // The decoder just waits for more.
                let mut d = Decoder::new();
                d.push(&f[..cut]);
                assert!(d.next().unwrap().is_none());
                assert_eq!(d.buffered(), cut);
            }
        }
    }

    #[test]
    fn short_payloads_are_truncated_and_long_ones_have_trailing_bytes() {
        // Hello with 3 bytes of version.
        let mut r = &frame(tag::HELLO, &[1, 0, 0])[..];
        assert!(matches!(read_message(&mut r), Err(WireError::Truncated)));
        // Hello with 5.
        let mut r = &frame(tag::HELLO, &[1, 0, 0, 0, 9])[..];
        assert!(matches!(
            read_message(&mut r),
            Err(WireError::TrailingBytes { count: 1 })
        ));
        let mut r = &frame(tag::READY, &[0])[..];
        assert!(matches!(
            read_message(&mut r),
            Err(WireError::TrailingBytes { count: 1 })
        ));
        // A string whose length runs past the frame.
        let mut payload = vec![2];
        payload.extend_from_slice(&100u32.to_le_bytes());
        payload.extend_from_slice(b"short");
        let mut r = &frame(tag::FAILED, &payload)[..];
        assert!(matches!(read_message(&mut r), Err(WireError::Truncated)));
    }

    #[test]
    fn bad_utf8_and_bad_flags() {
        let mut payload = vec![0];
        payload.extend_from_slice(&2u32.to_le_bytes());
        payload.extend_from_slice(&[0xc3, 0x28]);
        let mut r = &frame(tag::FAILED, &payload)[..];
        assert!(matches!(read_message(&mut r), Err(WireError::BadUtf8)));

        let mut payload = vec![3];
        payload.extend_from_slice(&0u32.to_le_bytes());
        let mut r = &frame(tag::FAILED, &payload)[..];
        assert!(matches!(read_message(&mut r), Err(WireError::Invalid(_))));

        // Exec: no argv, no env, cwd flag 2.
        let mut payload = Vec::new();
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&0u32.to_le_bytes());
        payload.extend_from_slice(&[2, 0, 0]);
        let mut r = &frame(tag::EXEC, &payload)[..];
        assert!(matches!(read_message(&mut r), Err(WireError::Invalid(_))));

        // Refresh: a clock cut short, and more entropy than any refresh carries.
        let mut r = &frame(tag::REFRESH, &[1, 2, 3])[..];
        assert!(matches!(read_message(&mut r), Err(WireError::Truncated)));
        let mut payload = 0i64.to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; MAX_ENTROPY + 1]);
        let mut r = &frame(tag::REFRESH, &payload)[..];
        assert!(matches!(
            read_message(&mut r),
            Err(WireError::Invalid("entropy length"))
        ));
    }

    #[test]
    fn huge_counts_fail_without_allocating() {
        // argv count u32::MAX with an empty rest: refused by the count check, not by running
        // out of bytes four billion pushes later.
        for count in [u32::MAX, 1 << 30, 2] {
            let mut payload = count.to_le_bytes().to_vec();
            payload.extend_from_slice(&[0; 4]);
            let mut r = &frame(tag::EXEC, &payload)[..];
            assert!(matches!(read_message(&mut r), Err(WireError::Truncated)));
        }
        // env count that argv's bytes cannot hold.
        let mut payload = 0u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut r = &frame(tag::EXEC, &payload)[..];
        assert!(matches!(read_message(&mut r), Err(WireError::Truncated)));
        // A header claiming MAX_FRAME with five bytes behind it is truncated, having allocated
        // for what arrived, not for the claim.
        let mut f = (MAX_FRAME as u32).to_le_bytes().to_vec();
        f.extend_from_slice(&[tag::STDOUT, 1, 2, 3, 4]);
        let mut r = &f[..];
        assert!(matches!(read_message(&mut r), Err(WireError::Truncated)));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut buf = Vec::new();
        for round in 0..20_000 {
            buf.clear();
            let len = rng.below(64);
            for _ in 0..len {
                buf.push(rng.next() as u8);
            }
            // Half the rounds: a plausible header and type so the payload decoders are reached.
            if round % 2 == 0 && buf.len() >= 5 {
                let body = (buf.len() - 4) as u32;
                buf[..4].copy_from_slice(&body.to_le_bytes());
                buf[4] = 1 + rng.below(14) as u8;
            }
            let mut r = buf.as_slice();
            while let Ok(Some(_)) = read_message(&mut r) {}
            let mut d = Decoder::new();
            for chunk in buf.chunks(1 + rng.below(8)) {
                d.push(chunk);
                while let Ok(Some(_)) = d.next() {}
            }
        }
    }

    #[test]
    fn mutated_frames_never_panic() {
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        let frames: Vec<Vec<u8>> = samples()
            .iter()
            .map(encode)
            .filter(|f| f.len() < 4096)
            .collect();
        for _ in 0..20_000 {
            let mut f = frames[rng.below(frames.len())].clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(f.len());
                f[i] = rng.next() as u8;
            }
            // Decoding may succeed with other values or fail: it must not panic, and a
            // success re-encodes to the same bytes (the format has one spelling per message).
            let mut r = f.as_slice();
            if let Ok(Some(m)) = read_message(&mut r) {
                let consumed = f.len() - r.len();
                assert_eq!(encode(&m), f[..consumed]);
            }
        }
    }

    /// Hostile frames: every sample message encoded, then bytes flipped, cut or added, lengths
    /// rewritten, or nothing but noise; fed whole to `read_message` and in random chunks to the
    /// `Decoder`. Nothing panics, and whatever decodes encodes back to itself. Runs
    /// `EMBER_FUZZ_CASES` cases (2000 by default; resources/fuzz.sh runs a million).
    #[test]
    fn fuzz_wire_frames() {
        // xorshift64*: enough to pick bytes and positions.
        struct Noise(u64);
        impl Noise {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 >> 12;
                self.0 ^= self.0 << 25;
                self.0 ^= self.0 >> 27;
                self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
            }
            fn below(&mut self, n: usize) -> usize {
                (self.next() % n.max(1) as u64) as usize
            }
        }
        let cases: u64 = std::env::var("EMBER_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000);
        let seed: u64 = std::env::var("EMBER_FUZZ_SEED")
            .ok()
            .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
            .unwrap_or(0x5749_5245_5f46_5a5a);
        let samples: Vec<Vec<u8>> = samples().iter().map(encode).collect();
        let mut noise = Noise(seed | 1);
        let started = std::time::Instant::now();
        for _ in 0..cases {
            let mut frame = samples[noise.below(samples.len())].clone();
            match noise.below(5) {
                0 => {
                    for _ in 0..1 + noise.below(4) {
                        let at = noise.below(frame.len());
                        frame[at] = noise.next() as u8;
                    }
                }
                1 => frame.truncate(noise.below(frame.len())),
                2 => frame.extend((0..noise.below(16)).map(|_| noise.next() as u8)),
                3 => {
                    // A length that lies, with the type byte and payload kept.
                    let len =
                        [0, 1, frame.len() as u32, u32::MAX, noise.next() as u32][noise.below(5)];
                    frame[..4].copy_from_slice(&len.to_le_bytes());
                }
                _ => frame = (0..noise.below(64)).map(|_| noise.next() as u8).collect(),
            }
            let mut reader = &frame[..];
            if let Ok(Some(message)) = read_message(&mut reader) {
                let again = encode(&message);
                assert_eq!(read_message(&mut &again[..]).unwrap(), Some(message));
            }
            let mut decoder = Decoder::new();
            let mut rest = &frame[..];
            'feed: while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(1 + noise.below(rest.len()));
                rest = tail;
                decoder.push(chunk);
                loop {
                    match decoder.next() {
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(_) => break 'feed,
                    }
                }
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        println!(
            "fuzz wire_frames: {cases} cases in {elapsed:.1} s, {:.0} cases/s, seed {seed:#x}",
            cases as f64 / elapsed.max(1e-9)
        );
    }
}
