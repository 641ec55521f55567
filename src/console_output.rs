//! Guest console output on its way to the host: a bounded buffer that the UART (on a vCPU thread)
//! writes into, and a `console-out` thread that drains it into stdout or a file.
//!
//! Writing to a pipe nobody reads blocks in `write()`. Done on a vCPU thread, that froze the
//! guest and, worse, kept Ember from ending on a signal: the vCPU could not be joined. Now a
//! vCPU waits only while the buffer is full (so a slow reader slows the guest down rather than
//! losing output or growing memory), [`ConsoleOutput::stop_waiting`] releases it at once when the
//! VM stops, and [`ConsoleOutput::finish`] gives a stuck reader a bounded time to take the rest.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::ConsoleConfig;

/// How much output may wait for the host: enough for a burst of kernel messages.
const BUFFER_BYTES: usize = 64 << 10;
/// The largest piece the drain thread writes at once.
const CHUNK_BYTES: usize = 4096;

struct Buffer {
    bytes: VecDeque<u8>,
    /// The VM is stopping: writers no longer wait for room (what does not fit is dropped).
    no_waiting: bool,
    /// No more output will come: the drain thread ends once the buffer is empty.
    closed: bool,
    /// Bytes dropped because the buffer was full after `no_waiting`, or the host output failed.
    dropped: u64,
}

struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled whenever bytes are added or removed, or a flag changes.
    changed: Condvar,
    /// Bytes the host output has taken so far: how `finish` tells a slow reader from a stuck one.
    written: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panic elsewhere cannot leave the queue inconsistent: keep going with it.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer the UART gets: appends to the buffer.
pub struct BufferedWriter(Arc<Shared>);

impl Write for BufferedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if data.is_empty() {
            return Ok(0);
        }
        let mut buffer = self.0.lock();
        while buffer.bytes.len() >= BUFFER_BYTES && !buffer.no_waiting {
            buffer = self
                .0
                .changed
                .wait(buffer)
                .unwrap_or_else(|e| e.into_inner());
        }
        let room = BUFFER_BYTES.saturating_sub(buffer.bytes.len());
        if room == 0 {
            // Only once the VM is stopping: the guest must not be held up any more.
            buffer.dropped += data.len() as u64;
            return Ok(data.len());
        }
        let taken = room.min(data.len());
        buffer.bytes.extend(&data[..taken]);
        self.0.changed.notify_all();
        Ok(taken)
    }

    /// The drain thread writes as soon as bytes arrive; there is nothing to push here.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Where the UART writes, and what Ember keeps to finish or show it later.
pub struct ConsoleSink {
    /// The UART's writer.
    pub writer: Box<dyn Write + Send>,
    /// The drain thread, when output goes to stdout or a file.
    pub output: Option<ConsoleOutput>,
    /// The kept output, when the console goes to memory.
    pub ring: Option<ConsoleRing>,
}

/// How much of an unwatched console is kept: the end of a boot log, enough to see why it failed.
const RING_BYTES: usize = 64 << 10;

/// The last [`RING_BYTES`] of a console nobody watches (job mode), shown when the VM fails before
/// its command runs.
#[derive(Clone, Default)]
pub struct ConsoleRing(Arc<Mutex<VecDeque<u8>>>);

impl ConsoleRing {
    /// What is kept, oldest byte first.
    pub fn contents(&self) -> Vec<u8> {
        let ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().copied().collect()
    }
}

impl Write for ConsoleRing {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut ring = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let keep = data.len().min(RING_BYTES);
        let overflow = (ring.len() + keep).saturating_sub(RING_BYTES);
        ring.drain(..overflow);
        ring.extend(&data[data.len() - keep..]);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The drain thread and the buffer it drains.
pub struct ConsoleOutput {
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
    /// Taken by `finish`; a `ConsoleOutput` dropped without it (a VM that failed to build or
    /// start) still closes the buffer, so the thread ends instead of waiting forever.
    thread: Option<JoinHandle<()>>,
}

impl ConsoleOutput {
    /// Opens where `config` sends the console and starts draining into it.
    pub fn start(config: &ConsoleConfig) -> io::Result<ConsoleSink> {
        Self::open(config)?.start()
    }

    /// Opens where `config` sends the console, without starting to drain into it: a jail closes
    /// between the two.
    pub fn open(config: &ConsoleConfig) -> io::Result<ConsoleTarget> {
        Ok(match config {
            ConsoleConfig::Off => ConsoleTarget::Off,
            ConsoleConfig::Memory => ConsoleTarget::Memory,
            ConsoleConfig::Stdio => ConsoleTarget::Drained(Box::new(io::stdout())),
            ConsoleConfig::File(path) => ConsoleTarget::Drained(Box::new(File::create(path)?)),
        })
    }
}

/// Where the console goes, opened ([`ConsoleOutput::open`]).
pub enum ConsoleTarget {
    Off,
    Memory,
    Drained(Box<dyn Write + Send>),
}

impl ConsoleTarget {
    /// Starts draining into the target (a thread, unless it never blocks).
    pub fn start(self) -> io::Result<ConsoleSink> {
        let out: Box<dyn Write + Send> = match self {
            ConsoleTarget::Off => {
                return Ok(ConsoleSink {
                    writer: Box::new(io::sink()),
                    output: None,
                    ring: None,
                })
            }
            // Memory never blocks: no thread needed.
            ConsoleTarget::Memory => {
                let ring = ConsoleRing::default();
                return Ok(ConsoleSink {
                    writer: Box::new(ring.clone()),
                    output: None,
                    ring: Some(ring),
                });
            }
            ConsoleTarget::Drained(out) => out,
        };
        let (output, writer) = ConsoleOutput::spawn(out)?;
        Ok(ConsoleSink {
            writer: Box::new(writer),
            output: Some(output),
            ring: None,
        })
    }
}

impl ConsoleOutput {
    /// Starts draining into `out`; returns the writer that feeds it.
    pub fn spawn(out: Box<dyn Write + Send>) -> io::Result<(Self, BufferedWriter)> {
        let shared = Arc::new(Shared {
            buffer: Mutex::new(Buffer {
                bytes: VecDeque::with_capacity(CHUNK_BYTES),
                no_waiting: false,
                closed: false,
                dropped: 0,
            }),
            changed: Condvar::new(),
            written: AtomicU64::new(0),
        });
        let (done_sender, done) = mpsc::channel();
        let drain_shared = shared.clone();
        // This thread starts before the main loop blocks SIGINT/SIGTERM/SIGHUP for every thread,
        // and must never be the one they are delivered to: it is born with them blocked.
        let thread = crate::main_loop::with_termination_signals_blocked(|| {
            std::thread::Builder::new()
                .name("console-out".into())
                .spawn(move || {
                    crate::sandbox::seccomp::confine_or_exit(
                        crate::sandbox::seccomp::ThreadKind::ConsoleOut,
                    );
                    drain(&drain_shared, out);
                    let _ = done_sender.send(());
                })
        })?;
        let writer = BufferedWriter(shared.clone());
        Ok((
            Self {
                shared,
                done,
                thread: Some(thread),
            },
            writer,
        ))
    }

    /// The VM is stopping: a vCPU waiting for room goes on at once (its output may be dropped),
    /// so that it can be joined.
    pub fn stop_waiting(&self) {
        self.shared.lock().no_waiting = true;
        self.shared.changed.notify_all();
    }

    /// Lets the drain thread write what is left, for as long as the host output keeps taking
    /// bytes; gives up once it has taken nothing for `patience` (a pipe nobody reads).
    pub fn finish(mut self, patience: Duration) {
        self.close();
        let mut written = self.shared.written.load(Ordering::SeqCst);
        loop {
            match self.done.recv_timeout(patience) {
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    let now = self.shared.written.load(Ordering::SeqCst);
                    if now == written {
                        log::warn!(
                            "console: the host output took nothing for {patience:?}; \
                             the rest of the guest's output is lost"
                        );
                        // The thread stays blocked in write(); the process ends without it.
                        self.thread = None;
                        return;
                    }
                    written = now;
                }
            }
        }
        let dropped = self.shared.lock().dropped;
        if dropped > 0 {
            log::warn!("console: {dropped} bytes of guest output were dropped");
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the console output thread panicked");
            }
        }
    }

    /// No more output will come: writers stop waiting, and the thread ends once it has written
    /// what is left.
    fn close(&self) {
        let mut buffer = self.shared.lock();
        buffer.no_waiting = true;
        buffer.closed = true;
        drop(buffer);
        self.shared.changed.notify_all();
    }
}

impl Drop for ConsoleOutput {
    fn drop(&mut self) {
        self.close();
    }
}

/// The `console-out` thread: writes the buffer out until it is closed and empty.
fn drain(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK_BYTES);
    let mut failed = false;
    loop {
        {
            let mut buffer = shared.lock();
            while buffer.bytes.is_empty() && !buffer.closed {
                buffer = shared
                    .changed
                    .wait(buffer)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if buffer.bytes.is_empty() {
                return;
            }
            let take = buffer.bytes.len().min(CHUNK_BYTES);
            chunk.clear();
            chunk.extend(buffer.bytes.drain(..take));
            if failed {
                buffer.dropped += take as u64;
            }
        }
        // Room for the writers before the (possibly slow) host write.
        shared.changed.notify_all();
        if failed {
            continue;
        }
        if let Err(e) = write_out(&mut *out, &chunk, &shared.written) {
            // A closed pipe or a full disk: keep draining so the guest never waits, and say so
            // once.
            log::warn!("console: cannot write the guest's output: {e}");
            shared.lock().dropped += chunk.len() as u64;
            failed = true;
        }
    }
}

/// Writes `chunk` to `out`, counting every byte taken in `written`. A descriptor someone made
/// non-blocking (a terminal or pipe shared with another program) says WouldBlock when full: that
/// is a slow reader, not a failure, so wait a little and go on.
fn write_out(out: &mut dyn Write, mut chunk: &[u8], written: &AtomicU64) -> io::Result<()> {
    while !chunk.is_empty() {
        match out.write(chunk) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                written.fetch_add(n as u64, Ordering::SeqCst);
                chunk = &chunk[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;
    use std::time::Instant;

    /// A writer that collects into a shared vector.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl Write for Collect {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_ring_keeps_the_end() {
        let mut ring = ConsoleRing::default();
        for i in 0..(2 * RING_BYTES) {
            ring.write_all(&[(i % 251) as u8]).unwrap();
        }
        let kept = ring.contents();
        assert_eq!(kept.len(), RING_BYTES);
        assert_eq!(kept[RING_BYTES - 1], ((2 * RING_BYTES - 1) % 251) as u8);
        ring.write_all(&vec![7; 3 * RING_BYTES]).unwrap();
        assert_eq!(ring.contents(), vec![7; RING_BYTES]);
    }

    #[test]
    fn everything_written_arrives_in_order() {
        let sink = Collect::default();
        let (output, mut writer) = ConsoleOutput::spawn(Box::new(sink.clone())).unwrap();
        let data: Vec<u8> = (0..(3 * BUFFER_BYTES)).map(|i| (i % 253) as u8).collect();
        for byte in &data {
            // One byte at a time, as the UART writes.
            writer.write_all(std::slice::from_ref(byte)).unwrap();
        }
        output.finish(Duration::from_secs(5));
        assert_eq!(*sink.0.lock().unwrap(), data);
    }

    /// A pipe whose read end is returned and whose write end feeds the console.
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn an_unread_pipe_holds_the_writer_until_the_vm_stops() {
        let (mut read_end, write_end) = pipe();
        let (output, mut writer) = ConsoleOutput::spawn(Box::new(write_end)).unwrap();
        // Far more than the pipe (64 KiB) and the buffer hold: the writer must wait.
        let vcpu = std::thread::spawn(move || {
            let data = vec![b'x'; 4 * BUFFER_BYTES];
            writer.write_all(&data).unwrap();
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!vcpu.is_finished(), "a full buffer must hold the writer");
        // The VM stops: the writer is released at once.
        output.stop_waiting();
        vcpu.join().unwrap();
        // Nobody reads: finishing gives up after its patience instead of hanging.
        let started = Instant::now();
        output.finish(Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_secs(5));
        // What the pipe took is intact.
        let mut got = vec![0u8; 1024];
        read_end.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|b| *b == b'x'));
    }
}
