//! The COM1 console: a 16550A UART (vm-superio) wired to an interrupt line.
//!
//! Output goes straight to the console writer. Input is pushed in by the console pump, which must
//! respect the 64-byte receive FIFO: [`SerialConsole::push_input`] says how much it took, and
//! `fifo_drained` fires once the guest has read the FIFO empty, so the pump can retry without
//! ever dropping a byte.
//!
//! Its state ([`SerialConsoleState`]) is the UART's registers and the unread receive FIFO, as
//! vm-superio's `Serial::state()` gives them; the console writer and the eventfds are the host's.

use std::io::{self, Write};

use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::InterruptLine;
use crate::{BusDevice, VmRequest};

/// Number of registers the UART answers (one I/O port each).
pub const RANGE_LEN: u64 = 8;

// What vm-superio 0.8's UART can hold, for judging a saved state (its own constants are private).
/// Size of the receive FIFO.
const FIFO_SIZE: usize = 64;
/// IER bits a 16550A has; vm-superio drops the others on a write.
const IER_VALID: u8 = 0x0f;
/// IIR: no interrupt pending, THR empty, received data available.
const IIR_NONE: u8 = 0x01;
const IIR_THR_EMPTY: u8 = 0x02;
const IIR_RECEIVED_DATA: u8 = 0x04;
/// LSR: THR empty and transmitter idle are always set; data ready follows the receive FIFO.
const LSR_ALWAYS: u8 = 0x60;
const LSR_DATA_READY: u8 = 0x01;
/// MSR: CTS, DSR and DCD, fixed (no guest write reaches it).
const MSR_FIXED: u8 = 0xb0;

/// What COM1 holds, as plain data for a snapshot: vm-superio's `SerialState`, field for field.
///
/// Ember's own type, so that serde can be derived for it and a vm-superio upgrade cannot change
/// the snapshot format unseen. Comes back from a file, so [`SerialConsole::from_state`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct SerialConsoleState {
    /// Divisor latch, low byte (DLL).
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte (DLM).
    pub baud_divisor_high: u8,
    /// Interrupt enable register (IER).
    pub interrupt_enable: u8,
    /// Interrupt identification register (IIR), without the FIFO bits a read adds.
    pub interrupt_identification: u8,
    /// Line control register (LCR).
    pub line_control: u8,
    /// Line status register (LSR).
    pub line_status: u8,
    /// Modem control register (MCR).
    pub modem_control: u8,
    /// Modem status register (MSR).
    pub modem_status: u8,
    /// Scratch register (SCR).
    pub scratch: u8,
    /// Received bytes the guest has not read yet, oldest first.
    pub receive_fifo: Vec<u8>,
}

/// Why a saved serial state was refused, or could not be brought back.
#[derive(Debug, thiserror::Error)]
pub enum SerialConsoleStateError {
    /// More bytes than the receive FIFO holds.
    #[error("the receive FIFO holds {0} bytes, at most {FIFO_SIZE} fit")]
    FifoOverflow(usize),
    /// IER enables interrupts a 16550A does not have.
    #[error("IER {0:#04x} sets bits past the four a 16550A has")]
    InterruptEnable(u8),
    /// IIR names no combination of the interrupts the UART raises.
    #[error("IIR {0:#04x} is not an interrupt state of the UART")]
    InterruptIdentification(u8),
    /// IIR says data is waiting while the receive FIFO is empty.
    #[error("IIR says data was received but the receive FIFO is empty")]
    ReceivedDataWithoutData,
    /// LSR does not match the receive FIFO (data ready iff bytes are waiting).
    #[error("LSR {line_status:#04x} does not match a receive FIFO of {fifo_len} bytes")]
    LineStatus {
        /// The saved LSR.
        line_status: u8,
        /// Bytes in the saved receive FIFO.
        fifo_len: usize,
    },
    /// MSR is not the fixed modem status.
    #[error("MSR {0:#04x} is not the fixed modem status {MSR_FIXED:#04x}")]
    ModemStatus(u8),
    /// The state is good, but its pending interrupt could not be raised again.
    #[error("cannot raise the restored UART's pending interrupt")]
    Interrupt(#[source] io::Error),
}

impl SerialConsoleState {
    /// Accepts exactly what vm-superio's UART can reach through guest accesses and host input:
    /// the divisor, LCR, MCR and SCR take any value a guest writes; the rest follow the model.
    fn check(&self) -> Result<(), SerialConsoleStateError> {
        use SerialConsoleStateError as E;
        let fifo_len = self.receive_fifo.len();
        if fifo_len > FIFO_SIZE {
            return Err(E::FifoOverflow(fifo_len));
        }
        if self.interrupt_enable & !IER_VALID != 0 {
            return Err(E::InterruptEnable(self.interrupt_enable));
        }
        let iir = self.interrupt_identification;
        // Interrupts are added with NONE cleared, and NONE comes back only when none is left.
        let reachable = [
            IIR_NONE,
            IIR_THR_EMPTY,
            IIR_RECEIVED_DATA,
            IIR_THR_EMPTY | IIR_RECEIVED_DATA,
        ];
        if !reachable.contains(&iir) {
            return Err(E::InterruptIdentification(iir));
        }
        // Received data is announced after bytes arrive, and any read of RBR withdraws it.
        if iir & IIR_RECEIVED_DATA != 0 && fifo_len == 0 {
            return Err(E::ReceivedDataWithoutData);
        }
        let data_ready = if fifo_len == 0 { 0 } else { LSR_DATA_READY };
        if self.line_status != LSR_ALWAYS | data_ready {
            return Err(E::LineStatus {
                line_status: self.line_status,
                fifo_len,
            });
        }
        if self.modem_status != MSR_FIXED {
            return Err(E::ModemStatus(self.modem_status));
        }
        Ok(())
    }
}

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

    /// The state a snapshot keeps.
    pub fn save(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            receive_fifo: s.in_buffer,
        }
    }

    /// A UART in `state` (which [`SerialConsole::save`] gave), wired as [`SerialConsole::new`]
    /// wires one.
    ///
    /// Refuses a state vm-superio's UART could not have reached (see the error's variants). Like
    /// vm-superio, raises `irq` again when IIR holds an interrupt IER enables: the guest has not
    /// taken it yet. So restore the interrupt controller behind `irq` first.
    pub fn from_state(
        state: &SerialConsoleState,
        irq: impl InterruptLine + 'static,
        fifo_drained: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, SerialConsoleStateError> {
        state.check()?;
        let uart_state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.receive_fifo.clone(),
        };
        let uart = Serial::from_state(
            &uart_state,
            IrqTrigger(Box::new(irq)),
            FifoDrained(fifo_drained),
            out,
        )
        .map_err(|e| match e {
            vm_superio::serial::Error::FullFifo => {
                SerialConsoleStateError::FifoOverflow(state.receive_fifo.len())
            }
            // from_state writes no output: only raising the interrupt can fail.
            vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                SerialConsoleStateError::Interrupt(e)
            }
        })?;
        Ok(Self { uart })
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

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    fn restored(
        state: &SerialConsoleState,
    ) -> Result<(SerialConsole, EventFd, EventFd, SharedBuf), SerialConsoleStateError> {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let dev = SerialConsole::from_state(
            state,
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            Box::new(out.clone()),
        )?;
        Ok((dev, irq, drained, out))
    }

    fn read(dev: &mut SerialConsole, offset: u64) -> u8 {
        let mut data = [0];
        dev.read(offset, &mut data);
        data[0]
    }

    /// What a driver sees next: every register, then the divisor latch, then the FIFO drained.
    fn next_reads(dev: &mut SerialConsole) -> Vec<u8> {
        let mut seen: Vec<u8> = (1..8).map(|offset| read(dev, offset)).collect();
        let lcr = read(dev, LCR);
        dev.write(LCR, &[lcr | 0x80]);
        seen.extend([read(dev, 0), read(dev, 1)]);
        dev.write(LCR, &[lcr]);
        while read(dev, LSR) & 1 != 0 {
            seen.push(read(dev, DATA));
        }
        seen
    }

    /// A driver's setup (divisor 1, 8N1, OUT2|RTS|DTR, scratch, RX and TX interrupts on), input
    /// of which the guest read one byte, then more input: IIR holds both interrupts, the FIFO
    /// "bcde".
    fn programmed() -> (SerialConsole, EventFd, EventFd, SharedBuf) {
        let (mut dev, irq, drained, out) = console();
        dev.write(LCR, &[0x83]);
        dev.write(DATA, &[0x01]);
        dev.write(IER, &[0x00]);
        dev.write(LCR, &[0x03]);
        dev.write(MCR, &[0x0b]);
        dev.write(SCR, &[0x5a]);
        dev.write(IER, &[0x03]);
        assert_eq!(dev.push_input(b"abc"), 3);
        assert_eq!(read(&mut dev, DATA), b'a');
        assert_eq!(dev.push_input(b"de"), 2);
        irq.read().unwrap();
        (dev, irq, drained, out)
    }

    #[test]
    fn a_restored_uart_behaves_as_the_saved_one() {
        let reset = console().0.save();
        assert_eq!(restored(&reset).unwrap().0.save(), reset);

        let (mut saved, _saved_irq, saved_drained, _) = programmed();
        let state = saved.save();
        assert_eq!(state.receive_fifo, b"bcde");
        assert_eq!(
            state.interrupt_identification,
            IIR_THR_EMPTY | IIR_RECEIVED_DATA
        );
        let (mut dev, irq, drained, out) = restored(&state).unwrap();
        assert_eq!(dev.save(), state);
        // The guest had taken neither interrupt: both are raised again.
        assert_eq!(irq.read().unwrap(), 2);

        let seen = next_reads(&mut saved);
        assert_eq!(next_reads(&mut dev), seen);
        assert_eq!(seen[1], 0xc0 | IIR_THR_EMPTY | IIR_RECEIVED_DATA);
        assert_eq!(&seen[seen.len() - 4..], b"bcde");
        assert_eq!(drained.read().unwrap(), 1);
        assert_eq!(saved_drained.read().unwrap(), 1);
        dev.write(DATA, b"!");
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
        assert_eq!(dev.push_input(&[0; 100]), 64);
    }

    #[test]
    fn a_state_the_uart_could_not_reach_is_refused() {
        use SerialConsoleStateError as E;
        let good = programmed().0.save();
        let refused = |change: &dyn Fn(&mut SerialConsoleState)| {
            let mut state = good.clone();
            change(&mut state);
            restored(&state).err().unwrap()
        };
        assert!(matches!(
            refused(&|s| s.receive_fifo = vec![0; 65]),
            E::FifoOverflow(65)
        ));
        assert!(matches!(
            refused(&|s| s.interrupt_enable = 0x10),
            E::InterruptEnable(0x10)
        ));
        for iir in [0x00, 0x03, 0x08, 0xc1] {
            assert!(matches!(
                refused(&|s| s.interrupt_identification = iir),
                E::InterruptIdentification(v) if v == iir
            ));
        }
        assert!(matches!(
            refused(&|s| {
                s.receive_fifo.clear();
                s.line_status = LSR_ALWAYS;
            }),
            E::ReceivedDataWithoutData
        ));
        for (lsr, fifo) in [(0x60, 4), (0xff, 4), (0x61, 0)] {
            assert!(matches!(
                refused(&|s| {
                    s.interrupt_identification = IIR_NONE;
                    s.line_status = lsr;
                    s.receive_fifo.truncate(fifo);
                }),
                E::LineStatus { line_status, fifo_len } if line_status == lsr && fifo_len == fifo
            ));
        }
        assert!(matches!(
            refused(&|s| s.modem_status = 0),
            E::ModemStatus(0)
        ));
        // Registers a guest writes freely take any value.
        let mut state = good.clone();
        state.baud_divisor_low = 0xff;
        state.baud_divisor_high = 0xff;
        state.line_control = 0xff;
        state.modem_control = 0xff;
        state.scratch = 0xff;
        assert!(restored(&state).is_ok());
    }

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

    #[cfg(feature = "serde")]
    #[test]
    fn a_saved_uart_round_trips_through_json() {
        let state = programmed().0.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: SerialConsoleState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        assert_eq!(restored(&back).unwrap().0.save(), state);
    }

    #[test]
    fn fuzz_serial_registers() {
        crate::fuzz::run("serial_registers", |rng| {
            let (mut dev, _irq, _drained, out) = console();
            let steps = 1 + rng.below(64) as usize;
            for _ in 0..steps {
                crate::fuzz::poke_registers(rng, &mut dev, 8, &[], 1);
                if rng.one_in(8) {
                    let len = rng.below(80) as usize;
                    let input = rng.bytes(len);
                    dev.push_input(&input);
                }
            }
            // Output is bounded by what was written to the data register.
            assert!(out.0.lock().unwrap().len() <= steps * 8);
            let state = dev.save();
            let (back, ..) = restored(&state).unwrap();
            assert_eq!(back.save(), state);
        });
    }
}
