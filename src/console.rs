//! The guest console on the host side: where COM1's output goes, and the thread that feeds host
//! input into COM1 without ever dropping a byte when the 64-byte FIFO is full.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ember_devices::bus::lock;
use ember_devices::serial::SerialConsole;
use vmm_sys_util::eventfd::EventFd;

use crate::outcome::VmOutcome;
use crate::vcpu::VmControl;

/// Where the guest console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// Output to stdout, input from stdin (raw mode when stdin is a terminal).
    Stdio,
    /// No console at all.
    Off,
    /// Output to a file, no input.
    File(PathBuf),
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "off" => Ok(ConsoleConfig::Off),
            _ => match s.strip_prefix("file=") {
                Some(path) if !path.is_empty() => Ok(ConsoleConfig::File(PathBuf::from(path))),
                _ => Err(format!(
                    "'{s}' is not a console: use stdio, off or file=PATH"
                )),
            },
        }
    }
}

/// Opens where the guest's console output goes. The UART flushes after every byte, so a guest
/// prompt without a newline still shows up at once.
pub fn output(config: &ConsoleConfig) -> io::Result<Box<dyn Write + Send>> {
    Ok(match config {
        ConsoleConfig::Stdio => Box::new(io::stdout()),
        ConsoleConfig::Off => Box::new(io::sink()),
        ConsoleConfig::File(path) => Box::new(File::create(path)?),
    })
}

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

/// Feeds `input` into `serial`, waiting for the guest to drain the FIFO whenever it is full.
pub fn pump_into_serial(
    mut input: &[u8],
    serial: &Mutex<SerialConsole>,
    fifo_drained: &EventFd,
    control: &VmControl,
) -> io::Result<()> {
    while !input.is_empty() && !control.is_stopping() {
        let taken = lock(serial).push_input(input);
        input = &input[taken..];
        if !input.is_empty() {
            // Blocks until the guest has read the FIFO empty. A drain that happened before this
            // read left the counter non-zero, so no wake-up is lost.
            fifo_drained.read()?;
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
            let mut stdin = io::stdin().lock();
            let mut filter = EscapeFilter::default();
            let mut buf = [0u8; 4096];
            let mut to_guest = Vec::with_capacity(buf.len());
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("console: stdin: {e}");
                        return;
                    }
                };
                to_guest.clear();
                let quit = if escapes {
                    filter.feed(&buf[..n], &mut to_guest)
                } else {
                    to_guest.extend_from_slice(&buf[..n]);
                    false
                };
                if let Err(e) = pump_into_serial(&to_guest, &serial, &fifo_drained, &control) {
                    log::warn!("console: {e}");
                    return;
                }
                if quit {
                    control.request_stop(VmOutcome::ConsoleQuit);
                    return;
                }
            }
        })
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_console_configs() {
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!("off".parse(), Ok(ConsoleConfig::Off));
        assert_eq!(
            "file=/tmp/x".parse(),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert!("file=".parse::<ConsoleConfig>().is_err());
        assert!("tty".parse::<ConsoleConfig>().is_err());
    }

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

    #[test]
    fn pump_waits_for_the_guest_and_loses_nothing() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(0).unwrap();
        let serial = Arc::new(Mutex::new(SerialConsole::new(
            irq,
            drained.try_clone().unwrap(),
            Box::new(io::sink()),
        )));
        let control = Arc::new(VmControl::new().unwrap());
        let input: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();

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
        pump_into_serial(&input, &serial, &drained, &control).unwrap();
        assert_eq!(guest.join().unwrap(), input);
    }
}
