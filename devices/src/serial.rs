//! The COM1 console: a 16550A UART (vm-superio) wired to an interrupt line.
//!
//! Output goes straight to the console writer. Input is pushed in by the console pump, which must
//! respect the 64-byte receive FIFO: [`SerialConsole::push_input`] says how much it took, and
//! `fifo_drained` fires once the guest has read the FIFO empty, so the pump can retry without
//! ever dropping a byte.

use std::io::{self, Write};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::InterruptLine;
use crate::{BusDevice, VmRequest};

/// Number of registers the UART answers (one I/O port each).
pub const RANGE_LEN: u64 = 8;

/// Raises the UART's interrupt line.
pub struct IrqTrigger(Box<dyn InterruptLine>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Tells the input pump the guest has emptied the receive FIFO.
pub struct FifoDrained(pub EventFd);

impl SerialEvents for FifoDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal that the input FIFO drained: {e}");
        }
    }
}

/// COM1 as the guest's console.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, FifoDrained, Box<dyn Write + Send>>,
}

impl SerialConsole {
    /// A UART that raises `irq` and writes the guest's output to `out`.
    pub fn new(
        irq: impl InterruptLine + 'static,
        fifo_drained: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Self {
        Self {
            uart: Serial::with_events(IrqTrigger(Box::new(irq)), FifoDrained(fifo_drained), out),
        }
    }

    /// Queues host input for the guest; returns how many bytes of `input` fit in the FIFO.
    pub fn push_input(&mut self, input: &[u8]) -> usize {
        if self.uart.fifo_capacity() == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(input) {
            Ok(taken) => taken,
            Err(e) => {
                // The bytes are in the FIFO; only the interrupt failed. The guest will still see
                // them the next time it polls LSR.
                log::warn!("serial: cannot raise the receive interrupt: {e:?}");
                input.len().min(self.uart.fifo_capacity())
            }
        }
    }

    /// Whether the receive FIFO has room for at least one byte.
    pub fn has_input_room(&self) -> bool {
        self.uart.fifo_capacity() > 0
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The 8250 has byte-wide registers; a wider access reads the register at `offset`.
        match (u8::try_from(offset), data.first_mut()) {
            (Ok(offset), Some(first)) if u64::from(offset) < RANGE_LEN => {
                *first = self.uart.read(offset)
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(offset, value) {
                // Losing console output is not worth stopping the guest for.
                log::debug!("serial: write at offset {offset}: {e:?}");
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, EventFd, EventFd, SharedBuf) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let dev = SerialConsole::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        (dev, irq, drained, out)
    }

    const LSR: u64 = 5;
    const IER: u64 = 1;

    #[test]
    fn guest_output_reaches_the_writer() {
        let (mut dev, _, _, out) = console();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_respects_the_fifo_and_signals_when_drained() {
        let (mut dev, irq, drained, _) = console();
        // Enable the received-data interrupt as a driver would.
        dev.write(IER, &[0x01]);
        let input: Vec<u8> = (0..100u8).collect();
        let taken = dev.push_input(&input);
        assert_eq!(taken, 64);
        assert!(!dev.has_input_room());
        assert_eq!(dev.push_input(&input[taken..]), 0);
        assert_eq!(irq.read().unwrap(), 1);

        let mut got = Vec::new();
        let mut lsr = [0u8];
        loop {
            dev.read(LSR, &mut lsr);
            if lsr[0] & 1 == 0 {
                break;
            }
            let mut b = [0u8];
            dev.read(0, &mut b);
            got.push(b[0]);
        }
        assert_eq!(got, input[..64]);
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(dev.push_input(&input[taken..]), 36);
    }

    #[test]
    fn out_of_range_accesses_are_harmless() {
        let (mut dev, _, _, _) = console();
        let mut data = [0xffu8; 4];
        dev.read(u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
        assert_eq!(dev.write(1 << 40, &[1]), None);
        assert_eq!(dev.write(0, &[]), None);
    }
}
