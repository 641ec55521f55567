//! The guest console on the host side: where COM1's output goes, and the thread that feeds host
//! input into COM1 without ever dropping a byte when the 64-byte FIFO is full.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use ember_devices::bus::lock;
use ember_devices::serial::SerialConsole;
use vmm_sys_util::eventfd::EventFd;

use crate::outcome::VmOutcome;
use crate::vcpu::VmControl;

const ESCAPE: u8 = 0x01; // Ctrl-A

/// QEMU-style console escapes on a terminal: Ctrl-A x quits, Ctrl-A Ctrl-A sends one Ctrl-A.
#[derive(Debug, Default)]
pub struct EscapeFilter {
    pending: bool,
}

impl EscapeFilter {
    /// Appends to `out` what `input` sends to the guest; returns true if the user asked to quit.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &byte in input {
            if self.pending {
                self.pending = false;
                match byte {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if byte == ESCAPE {
                self.pending = true;
            } else {
                out.push(byte);
            }
        }
        false
    }
}

/// Host input read ahead of the guest is held here, up to this much; past it, stdin is left
/// unread (the pipe or tty holds the rest), so memory stays bounded and nothing is dropped.
const MAX_PENDING_INPUT: usize = 1 << 20;

/// Forwards `input` (stdin) into `serial` until `input` ends or the VM stops.
///
/// Bytes the 64-byte FIFO cannot take wait in a bounded buffer until the guest drains it
/// (`fifo_drained`). Meanwhile `input` is still read, so Ctrl-A x works even when the guest is not
/// reading its console.
pub fn forward_input(
    input: &mut (impl Read + AsRawFd),
    serial: &Mutex<SerialConsole>,
    fifo_drained: &EventFd,
    control: &VmControl,
    escapes: bool,
) -> io::Result<()> {
    let mut filter = EscapeFilter::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut input_open = true;
    while !control.is_stopping() {
        if !pending.is_empty() {
            let taken = lock(serial).push_input(&pending);
            pending.drain(..taken);
        }
        if !input_open && pending.is_empty() {
            return Ok(());
        }
        let want_input = input_open && pending.len() < MAX_PENDING_INPUT;
        let mut fds = [
            libc::pollfd {
                fd: if want_input { input.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if pending.is_empty() {
                    -1
                } else {
                    fifo_drained.as_raw_fd()
                },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the duration of the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            // The guest read the FIFO empty: clear the event and push more on the next turn.
            fifo_drained.read()?;
        }
        if fds[0].revents != 0 {
            let n = match input.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                input_open = false;
            } else if !escapes {
                pending.extend_from_slice(&buf[..n]);
            } else if filter.feed(&buf[..n], &mut pending) {
                control.request_stop(VmOutcome::ConsoleQuit);
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Starts the thread that reads host stdin into the guest's COM1.
pub fn spawn_input_thread(
    serial: Arc<Mutex<SerialConsole>>,
    fifo_drained: EventFd,
    control: Arc<VmControl>,
    escapes: bool,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            crate::sandbox::seccomp::confine_or_exit(
                crate::sandbox::seccomp::ThreadKind::ConsoleIn,
            );
            let mut stdin = io::stdin();
            if let Err(e) = forward_input(&mut stdin, &serial, &fifo_drained, &control, escapes) {
                log::warn!("console: {e}");
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::FromRawFd;

    #[test]
    fn escape_sequences() {
        let mut f = EscapeFilter::default();
        let mut out = Vec::new();
        assert!(!f.feed(b"ab\x01\x01c\x01d", &mut out));
        assert_eq!(out, b"ab\x01c\x01d");
        out.clear();
        // Split across reads.
        assert!(!f.feed(b"q\x01", &mut out));
        assert!(f.feed(b"x", &mut out));
        assert_eq!(out, b"q");
    }

    /// A pipe with `bytes` written into it and its write end closed.
    fn pipe_with(bytes: &[u8]) -> File {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) returns.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (read, mut write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let bytes = bytes.to_vec();
        std::thread::spawn(move || write.write_all(&bytes).unwrap());
        read
    }

    fn serial() -> (Arc<Mutex<SerialConsole>>, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(0).unwrap();
        let serial = SerialConsole::new(irq, drained.try_clone().unwrap(), Box::new(io::sink()));
        (Arc::new(Mutex::new(serial)), drained)
    }

    #[test]
    fn input_waits_for_the_guest_and_loses_nothing() {
        let (serial, drained) = serial();
        let control = Arc::new(VmControl::new().unwrap());
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut pipe = pipe_with(&input);

        // A "guest" that drains the FIFO by polling LSR, like the echo micro-guest.
        let guest_serial = serial.clone();
        let guest = std::thread::spawn(move || {
            use ember_devices::BusDevice;
            let mut got = Vec::new();
            while got.len() < 1000 {
                let mut lsr = [0u8];
                lock(&guest_serial).read(5, &mut lsr);
                if lsr[0] & 1 == 1 {
                    let mut b = [0u8];
                    lock(&guest_serial).read(0, &mut b);
                    got.push(b[0]);
                } else {
                    std::thread::yield_now();
                }
            }
            got
        });
        forward_input(&mut pipe, &serial, &drained, &control, false).unwrap();
        assert_eq!(guest.join().unwrap(), input);
    }

    #[test]
    fn escape_is_seen_while_the_guest_reads_nothing() {
        let (serial, drained) = serial();
        let control = Arc::new(VmControl::new().unwrap());
        // Far more than the FIFO holds, then Ctrl-A x; the guest never reads.
        let mut input = vec![b'a'; 5000];
        input.extend_from_slice(b"\x01x");
        let mut pipe = pipe_with(&input);
        forward_input(&mut pipe, &serial, &drained, &control, true).unwrap();
        assert_eq!(control.take_outcome(), Some(VmOutcome::ConsoleQuit));
    }
}
