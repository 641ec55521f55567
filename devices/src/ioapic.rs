//! The I/O APIC, emulated in userspace (KVM's "split irqchip": the local APICs stay in the kernel).
//!
//! Why not KVM's in-kernel IOAPIC and PIC: creating them puts devices on KVM's I/O buses, which on
//! recent host kernels leaves an SRCU grace period in flight that the VM's destruction then waits
//! out (the figures are in the README, "Start-up"; measured with resources/bench/startup.py). The
//! IOAPIC is a small device, and Ember's interrupt sources are all in userspace anyway.
//!
//! The model: 24 pins, each with a redirection entry the guest programs through the indirect
//! IOREGSEL/IOWIN register pair. A raised pin whose entry is unmasked becomes an MSI to the local
//! APICs ([`MsiSink`]); a pin raised while masked is remembered (its IRR bit) and delivered when
//! the guest unmasks it, as the hardware and KVM's IOAPIC do for edges. Ember's devices raise
//! edges and its MP table declares every ISA interrupt edge-triggered, so an entry programmed
//! level-triggered is delivered as an edge too (Remote IRR stays clear; nothing waits for an EOI).
//! Every guest access is checked: unknown registers read as zero, writes to read-only ones and
//! odd-sized accesses are ignored.
//!
//! Its state ([`IoapicState`]) is therefore the ID, IOREGSEL, the redirection table and the IRR:
//! with edges only there are no pin levels and no Remote IRR to keep.
//!
//! A pin may also have a [`DirectRoute`]: a backend outside ember (virtiofsd) signals that pin
//! through a KVM irqfd, which KVM turns into an MSI without ember seeing it. The IOAPIC then tells
//! the route every change of the pin's entry, so the MSI KVM sends is the one this model would
//! send, and nothing goes out while the guest has the pin masked.

use std::io;
use std::sync::{Arc, Mutex};

use crate::bus::lock;
use crate::interrupt::InterruptLine;
use crate::{BusDevice, VmRequest};

/// Number of pins (redirection entries), as on KVM's and QEMU's IOAPIC.
pub const PINS: usize = 24;
// The IRR is a u32 bitmap, one bit per pin.
const _: () = assert!(PINS <= 32);
/// The IRR bits that name a pin.
const PENDING_PINS: u32 = ((1u64 << PINS) - 1) as u32;
/// Size of the MMIO window (registers at 0x00 and 0x10, EOI at 0x40).
pub const MMIO_LEN: u64 = 0x100;

const IOREGSEL: u64 = 0x00;
const IOWIN: u64 = 0x10;

const REG_ID: u32 = 0x00;
const REG_VERSION: u32 = 0x01;
const REG_ARBITRATION: u32 = 0x02;
const REG_REDIRECTION_FIRST: u32 = 0x10;
/// IOAPICID: the ID sits in bits 24-27, the rest is reserved.
const ID_SHIFT: u32 = 24;
const ID_MASK: u32 = 0x0f;
/// Version 0x11 (an 82093AA, like KVM's), highest entry index in bits 16-23.
const VERSION: u32 = 0x11 | ((PINS as u32 - 1) << 16);

/// Redirection entry fields (82093AA datasheet, 3.2.4).
const ENTRY_VECTOR: u64 = 0xff;
const ENTRY_DELIVERY_MODE_SHIFT: u32 = 8;
const ENTRY_DELIVERY_MODE: u64 = 0x7 << ENTRY_DELIVERY_MODE_SHIFT;
const ENTRY_DEST_MODE_LOGICAL: u64 = 1 << 11;
const ENTRY_MASKED: u64 = 1 << 16;
const ENTRY_DEST_SHIFT: u32 = 56;
/// Bits the guest may set: vector, delivery mode, destination mode, polarity, trigger mode, mask,
/// destination. Delivery status (12) and Remote IRR (14) are read-only and stay clear.
const ENTRY_WRITABLE: u64 = 0xff00_0000_0001_afff;
/// Delivery mode ExtINT (the 8259's interrupt): there is no 8259 to ask for a vector.
const DELIVERY_EXTINT: u64 = 7;

/// The local APICs' MSI window; the destination APIC ID goes in bits 12-19, the destination mode
/// in bit 2 (Intel SDM vol. 3, 11.11.1).
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;
const MSI_ADDRESS_DEST_SHIFT: u32 = 12;
const MSI_ADDRESS_DEST_MODE_LOGICAL: u64 = 1 << 2;

/// Where the IOAPIC's messages go: the local APICs (KVM_SIGNAL_MSI in Ember).
pub trait MsiSink: Send {
    /// Sends one message: `data` written at `address` in the local APICs' window.
    fn send(&self, address: u64, data: u32) -> io::Result<()>;
}

/// One message to the local APICs: `data` written at `address` in their window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    /// The address (destination APIC and mode).
    pub address: u64,
    /// The data (vector and delivery mode; edge-triggered).
    pub data: u32,
}

/// A pin that a backend raises without ember (through a KVM irqfd): it must follow the pin's
/// redirection entry.
pub trait DirectRoute: Send {
    /// The pin's entry changed. `Some` is the message a raised pin now sends; `None` means
    /// nothing may go out (masked, or ExtINT, which has no vector): hold raised edges until the
    /// next `Some`, as the IOAPIC's IRR would.
    fn retarget(&self, msi: Option<Msi>);
}

/// What an IOAPIC holds, as plain data for a snapshot.
///
/// Comes back from a file, so [`Ioapic::from_state`] checks every field against what the guest
/// could have programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IoapicState {
    /// The IOAPIC's APIC ID, 0 to 15 (IOAPICID bits 24-27).
    pub id: u8,
    /// The register IOREGSEL selects; any value, as a guest may select one that does not exist.
    pub ioregsel: u8,
    /// One redirection entry per pin, as IOWIN reads them (low half in bits 0-31).
    pub redirection_table: Vec<u64>,
    /// The IRR: bit `n` set when pin `n` was raised while masked and waits for its unmask.
    pub pending: u32,
}

/// Why a saved IOAPIC state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoapicStateError {
    /// The redirection table is not one entry per pin.
    #[error("the saved IOAPIC has {found} pins, this one has {PINS}")]
    PinCount {
        /// Entries in the saved table.
        found: usize,
    },
    /// The ID does not fit the 4 bits of IOAPICID.
    #[error("IOAPIC ID {0} does not fit in 4 bits")]
    Id(u8),
    /// An entry sets bits a guest cannot write (delivery status, Remote IRR or reserved).
    #[error("redirection entry {pin} sets read-only or reserved bits {bits:#x}")]
    EntryBits {
        /// The pin whose entry is wrong.
        pin: usize,
        /// The offending bits.
        bits: u64,
    },
    /// The IRR names pins past the last one.
    #[error("pins {0:#x} are pending but do not exist")]
    PendingPastLastPin(u32),
    /// A pin is pending while unmasked: the live model delivers such a pin at once.
    #[error("pin {pin} is pending but unmasked")]
    PendingUnmasked {
        /// The pin.
        pin: usize,
    },
}

/// The I/O APIC.
pub struct Ioapic {
    selected: u8,
    /// The APIC ID (IOAPICID bits 24-27).
    id: u8,
    entries: [u64; PINS],
    /// Pins raised while masked (the IRR), delivered on unmask.
    pending: u32,
    sink: Box<dyn MsiSink>,
    /// Pins that a backend raises itself, told every change of their entries.
    direct_routes: Vec<(usize, Box<dyn DirectRoute>)>,
}

impl Ioapic {
    /// An IOAPIC with every entry masked (its reset state), sending its messages to `sink`.
    pub fn new(sink: Box<dyn MsiSink>) -> Self {
        Self {
            selected: 0,
            id: 0,
            entries: [ENTRY_MASKED; PINS],
            pending: 0,
            sink,
            direct_routes: Vec::new(),
        }
    }

    /// From now on `route` follows pin `pin`'s entry, starting with the current one. A pin past
    /// the last one is ignored (nothing can program it).
    pub fn add_direct_route(&mut self, pin: usize, route: Box<dyn DirectRoute>) {
        let Some(&entry) = self.entries.get(pin) else {
            return;
        };
        route.retarget(message(entry));
        self.direct_routes.push((pin, route));
    }

    /// The state a snapshot keeps.
    pub fn save(&self) -> IoapicState {
        IoapicState {
            id: self.id,
            ioregsel: self.selected,
            redirection_table: self.entries.to_vec(),
            pending: self.pending,
        }
    }

    /// An IOAPIC in `state` (which [`Ioapic::save`] gave), sending its messages to `sink`.
    ///
    /// Refuses a state the guest could not have programmed: a wrong number of entries, an ID past
    /// 4 bits, read-only or reserved bits set in an entry, and pending pins that do not exist or
    /// are unmasked (the live model delivers those at once). Vectors and delivery modes are not
    /// judged: a guest may program any of them, reserved ones included, and its snapshot must
    /// still restore. Nothing is delivered here; a pending pin waits for its unmask as before.
    pub fn from_state(
        state: &IoapicState,
        sink: Box<dyn MsiSink>,
    ) -> Result<Self, IoapicStateError> {
        let entries: [u64; PINS] = state.redirection_table.as_slice().try_into().map_err(|_| {
            IoapicStateError::PinCount {
                found: state.redirection_table.len(),
            }
        })?;
        if u32::from(state.id) > ID_MASK {
            return Err(IoapicStateError::Id(state.id));
        }
        for (pin, entry) in entries.iter().enumerate() {
            let bits = entry & !ENTRY_WRITABLE;
            if bits != 0 {
                return Err(IoapicStateError::EntryBits { pin, bits });
            }
        }
        let past_last_pin = state.pending & !PENDING_PINS;
        if past_last_pin != 0 {
            return Err(IoapicStateError::PendingPastLastPin(past_last_pin));
        }
        if let Some(pin) = (0..PINS)
            .find(|&pin| state.pending & (1 << pin) != 0 && entries[pin] & ENTRY_MASKED == 0)
        {
            return Err(IoapicStateError::PendingUnmasked { pin });
        }
        Ok(Self {
            selected: state.ioregsel,
            id: state.id,
            entries,
            pending: state.pending,
            sink,
            direct_routes: Vec::new(),
        })
    }

    /// Raises `pin` once. Pins past the last one are ignored.
    pub fn raise(&mut self, pin: usize) -> io::Result<()> {
        let Some(&entry) = self.entries.get(pin) else {
            return Ok(());
        };
        if entry & ENTRY_MASKED != 0 {
            self.pending |= 1 << pin;
            return Ok(());
        }
        self.deliver(entry)
    }

    fn deliver(&self, entry: u64) -> io::Result<()> {
        match message(entry) {
            Some(msi) if entry & ENTRY_MASKED == 0 => self.sink.send(msi.address, msi.data),
            _ => Ok(()),
        }
    }

    fn read_register(&self) -> u32 {
        match u32::from(self.selected) {
            REG_ID | REG_ARBITRATION => u32::from(self.id) << ID_SHIFT,
            REG_VERSION => VERSION,
            reg => match redirection_index(reg) {
                Some((pin, high)) if high => (self.entries[pin] >> 32) as u32,
                Some((pin, _)) => self.entries[pin] as u32,
                None => 0,
            },
        }
    }

    fn write_register(&mut self, value: u32) {
        match u32::from(self.selected) {
            REG_ID => self.id = ((value >> ID_SHIFT) & ID_MASK) as u8,
            reg => {
                let Some((pin, high)) = redirection_index(reg) else {
                    return; // version, arbitration and unknown registers are read-only
                };
                let old = self.entries[pin];
                let new = if high {
                    (old & 0xffff_ffff) | (u64::from(value) << 32)
                } else {
                    (old & !0xffff_ffff) | u64::from(value)
                };
                self.entries[pin] = new & ENTRY_WRITABLE;
                if self.entries[pin] != old {
                    let msi = message(self.entries[pin]);
                    for (_, route) in self.direct_routes.iter().filter(|(p, _)| *p == pin) {
                        route.retarget(msi);
                    }
                }
                let unmasked = self.entries[pin] & ENTRY_MASKED == 0;
                if unmasked && self.pending & (1 << pin) != 0 {
                    self.pending &= !(1 << pin);
                    if let Err(e) = self.deliver(self.entries[pin]) {
                        log::warn!("ioapic: cannot deliver pin {pin}: {e}");
                    }
                }
            }
        }
    }
}

/// The message a raised pin with `entry` sends; `None` when masked or ExtINT (there is no 8259
/// to ask for a vector).
fn message(entry: u64) -> Option<Msi> {
    let delivery_mode = (entry & ENTRY_DELIVERY_MODE) >> ENTRY_DELIVERY_MODE_SHIFT;
    if entry & ENTRY_MASKED != 0 || delivery_mode == DELIVERY_EXTINT {
        return None;
    }
    let dest = (entry >> ENTRY_DEST_SHIFT) & 0xff;
    let mut address = MSI_ADDRESS_BASE | (dest << MSI_ADDRESS_DEST_SHIFT);
    if entry & ENTRY_DEST_MODE_LOGICAL != 0 {
        address |= MSI_ADDRESS_DEST_MODE_LOGICAL;
    }
    // Vector and delivery mode; trigger mode edge (bit 15 clear), see the module comment.
    let data = (entry & (ENTRY_VECTOR | ENTRY_DELIVERY_MODE)) as u32;
    Some(Msi { address, data })
}

/// The pin and half (high = bits 32-63) a redirection register index names.
fn redirection_index(reg: u32) -> Option<(usize, bool)> {
    let index = usize::try_from(reg.checked_sub(REG_REDIRECTION_FIRST)?).ok()?;
    (index < 2 * PINS).then_some((index / 2, index % 2 == 1))
}

impl BusDevice for Ioapic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOREGSEL, 4) => u32::from(self.selected),
            (IOWIN, 4) => self.read_register(),
            _ => 0,
        };
        if data.len() == 4 {
            data.copy_from_slice(&value.to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let value = u32::from_le_bytes(data.try_into().ok()?);
        match offset {
            IOREGSEL => self.selected = value.to_le_bytes()[0],
            IOWIN => self.write_register(value),
            _ => {} // the EOI register (0x40) of newer IOAPICs: every pin is edge here
        }
        None
    }
}

/// One IOAPIC pin as a device's interrupt line.
pub struct IoapicPin {
    ioapic: Arc<Mutex<Ioapic>>,
    pin: usize,
}

impl IoapicPin {
    /// Pin `pin` of `ioapic`; a pin past the last one is a line that goes nowhere.
    pub fn new(ioapic: Arc<Mutex<Ioapic>>, pin: usize) -> Self {
        Self { ioapic, pin }
    }
}

impl InterruptLine for IoapicPin {
    fn trigger(&self) -> io::Result<()> {
        lock(&self.ioapic).raise(self.pin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the messages sent.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(u64, u32)>>>);

    impl MsiSink for Recorder {
        fn send(&self, address: u64, data: u32) -> io::Result<()> {
            self.0.lock().unwrap().push((address, data));
            Ok(())
        }
    }

    fn ioapic() -> (Ioapic, Recorder) {
        let recorder = Recorder::default();
        (Ioapic::new(Box::new(recorder.clone())), recorder)
    }

    fn write_reg(ioapic: &mut Ioapic, reg: u32, value: u32) {
        ioapic.write(IOREGSEL, &reg.to_le_bytes());
        ioapic.write(IOWIN, &value.to_le_bytes());
    }

    fn read_reg(ioapic: &mut Ioapic, reg: u32) -> u32 {
        ioapic.write(IOREGSEL, &reg.to_le_bytes());
        let mut data = [0; 4];
        ioapic.read(IOWIN, &mut data);
        u32::from_le_bytes(data)
    }

    /// Records what a direct route was told.
    #[derive(Clone, Default)]
    struct RouteRecorder(Arc<Mutex<Vec<Option<Msi>>>>);

    impl DirectRoute for RouteRecorder {
        fn retarget(&self, msi: Option<Msi>) {
            self.0.lock().unwrap().push(msi);
        }
    }

    #[test]
    fn a_direct_route_follows_its_pins_entry() {
        let (mut ioapic, sent) = ioapic();
        let route = RouteRecorder::default();
        ioapic.add_direct_route(6, Box::new(route.clone()));
        ioapic.add_direct_route(PINS, Box::new(route.clone())); // ignored
                                                                // Programming another pin does not concern it.
        write_reg(&mut ioapic, 0x10 + 2 * 4, 0x24);
        // Destination APIC 1, then vector 0x26 unmasked, then masked again, then ExtINT.
        write_reg(&mut ioapic, 0x10 + 2 * 6 + 1, 1 << 24);
        write_reg(&mut ioapic, 0x10 + 2 * 6, 0x26);
        write_reg(&mut ioapic, 0x10 + 2 * 6, 0x26); // unchanged: not told again
        write_reg(&mut ioapic, 0x10 + 2 * 6, 0x26 | (1 << 16));
        write_reg(&mut ioapic, 0x10 + 2 * 6, 0x26 | (7 << 8));
        let to_apic_1 = Msi {
            address: 0xfee0_1000,
            data: 0x26,
        };
        assert_eq!(
            *route.0.lock().unwrap(),
            [None, None, Some(to_apic_1), None, None]
        );
        // The route's pin is raised by its backend, not through the IOAPIC.
        assert!(sent.0.lock().unwrap().is_empty());
    }

    #[test]
    fn identifies_itself_and_starts_masked() {
        let (mut ioapic, _) = ioapic();
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), 0x0017_0011);
        write_reg(&mut ioapic, REG_ID, 0x0100_0000);
        assert_eq!(read_reg(&mut ioapic, REG_ID), 0x0100_0000);
        write_reg(&mut ioapic, REG_VERSION, 0);
        assert_eq!(read_reg(&mut ioapic, REG_VERSION), 0x0017_0011);
        for pin in 0..PINS as u32 {
            assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * pin), 1 << 16);
        }
    }

    #[test]
    fn an_unmasked_pin_becomes_an_msi_to_its_destination() {
        let (mut ioapic, sent) = ioapic();
        // Pin 4: vector 0x24, fixed, physical destination APIC 1.
        write_reg(&mut ioapic, 0x10 + 2 * 4 + 1, 1 << 24);
        write_reg(&mut ioapic, 0x10 + 2 * 4, 0x24);
        ioapic.raise(4).unwrap();
        // Pin 5: vector 0x30, lowest priority, logical destination 0x3.
        write_reg(&mut ioapic, 0x10 + 2 * 5 + 1, 3 << 24);
        write_reg(&mut ioapic, 0x10 + 2 * 5, 0x30 | (1 << 8) | (1 << 11));
        ioapic.raise(5).unwrap();
        assert_eq!(
            *sent.0.lock().unwrap(),
            [(0xfee0_1000, 0x24), (0xfee0_3004, 0x130)]
        );
    }

    #[test]
    fn a_pin_raised_while_masked_is_delivered_on_unmask_once() {
        let (mut ioapic, sent) = ioapic();
        write_reg(&mut ioapic, 0x10 + 2 * 7, 0x41 | (1 << 16));
        ioapic.raise(7).unwrap();
        ioapic.raise(7).unwrap();
        assert!(sent.0.lock().unwrap().is_empty());
        write_reg(&mut ioapic, 0x10 + 2 * 7, 0x41);
        write_reg(&mut ioapic, 0x10 + 2 * 7, 0x41);
        assert_eq!(*sent.0.lock().unwrap(), [(0xfee0_0000, 0x41)]);
    }

    #[test]
    fn hostile_accesses_are_ignored() {
        let (mut ioapic, sent) = ioapic();
        // Read-only bits (delivery status, Remote IRR) stay clear; registers past the table are 0.
        write_reg(&mut ioapic, 0x10, 0xffff_ffff);
        assert_eq!(read_reg(&mut ioapic, 0x10), 0x0001_afff);
        write_reg(&mut ioapic, 0x10 + 2 * PINS as u32, 0x55);
        assert_eq!(read_reg(&mut ioapic, 0x10 + 2 * PINS as u32), 0);
        assert_eq!(read_reg(&mut ioapic, 0xff), 0);
        // Odd sizes and offsets.
        ioapic.write(IOREGSEL, &[1, 2]);
        ioapic.write(0x20, &[0; 4]);
        let mut byte = [0xaa];
        ioapic.read(IOWIN, &mut byte);
        assert_eq!(byte, [0]);
        // Pins that do not exist, and ExtINT (no 8259 behind it), send nothing.
        ioapic.raise(PINS).unwrap();
        write_reg(&mut ioapic, 0x10 + 2 * 2, 0x7 << 8);
        ioapic.raise(2).unwrap();
        assert!(sent.0.lock().unwrap().is_empty());
    }

    /// Pin 4 unmasked (vector 0x24 to APIC 1), pin 7 masked with an edge waiting, ID 3, and
    /// IOREGSEL left on pin 4's high half.
    fn programmed(ioapic: &mut Ioapic) {
        write_reg(ioapic, REG_ID, 3 << 24);
        write_reg(ioapic, 0x10 + 2 * 4 + 1, 1 << 24);
        write_reg(ioapic, 0x10 + 2 * 4, 0x24);
        write_reg(ioapic, 0x10 + 2 * 7, 0x41 | ENTRY_MASKED as u32);
        ioapic.raise(7).unwrap();
        ioapic.write(IOREGSEL, &(0x10 + 2 * 4 + 1u32).to_le_bytes());
    }

    #[test]
    fn a_restored_ioapic_behaves_as_the_saved_one() {
        let reset = ioapic().0.save();
        let from_reset = Ioapic::from_state(&reset, Box::new(Recorder::default())).unwrap();
        assert_eq!(from_reset.save(), reset);

        let (mut saved, sent_by_saved) = ioapic();
        programmed(&mut saved);
        let state = saved.save();
        assert_eq!(state.id, 3);
        assert_eq!(state.pending, 1 << 7);
        let sent_by_restored = Recorder::default();
        let mut restored = Ioapic::from_state(&state, Box::new(sent_by_restored.clone())).unwrap();
        assert_eq!(restored.save(), state);
        assert!(sent_by_restored.0.lock().unwrap().is_empty());

        for dev in [&mut saved, &mut restored] {
            // IOREGSEL survived: IOWIN reads pin 4's destination without selecting it again.
            let mut data = [0; 4];
            dev.read(IOWIN, &mut data);
            assert_eq!(u32::from_le_bytes(data), 1 << 24);
            assert_eq!(read_reg(dev, REG_ID), 3 << 24);
            dev.raise(4).unwrap();
            // Unmasking pin 7 delivers the edge raised before the save, once.
            write_reg(dev, 0x10 + 2 * 7, 0x41);
            write_reg(dev, 0x10 + 2 * 7, 0x41);
        }
        let expected = [(0xfee0_1000, 0x24), (0xfee0_0000, 0x41)];
        assert_eq!(*sent_by_restored.0.lock().unwrap(), expected);
        assert_eq!(sent_by_saved.0.lock().unwrap()[..], expected);
    }

    #[test]
    fn a_state_the_guest_could_not_program_is_refused() {
        let (mut dev, _) = ioapic();
        programmed(&mut dev);
        let good = dev.save();
        let refused = |change: &dyn Fn(&mut IoapicState)| {
            let mut state = good.clone();
            change(&mut state);
            Ioapic::from_state(&state, Box::new(Recorder::default()))
                .err()
                .unwrap()
        };
        assert_eq!(
            refused(&|s| s.redirection_table.truncate(PINS - 1)),
            IoapicStateError::PinCount { found: PINS - 1 }
        );
        assert_eq!(
            refused(&|s| s.redirection_table.push(ENTRY_MASKED)),
            IoapicStateError::PinCount { found: PINS + 1 }
        );
        assert_eq!(
            refused(&|s| s.redirection_table.clear()),
            IoapicStateError::PinCount { found: 0 }
        );
        assert_eq!(refused(&|s| s.id = 16), IoapicStateError::Id(16));
        // Delivery status, Remote IRR, and a reserved bit.
        for bit in [12, 14, 17] {
            assert_eq!(
                refused(&|s| s.redirection_table[9] |= 1 << bit),
                IoapicStateError::EntryBits {
                    pin: 9,
                    bits: 1 << bit
                }
            );
        }
        assert_eq!(
            refused(&|s| s.pending |= 1 << PINS),
            IoapicStateError::PendingPastLastPin(1 << PINS)
        );
        assert_eq!(
            refused(&|s| s.pending |= 1 << 4),
            IoapicStateError::PendingUnmasked { pin: 4 }
        );
        // Every IOREGSEL value is one a guest can select.
        let mut state = good.clone();
        state.ioregsel = 0xff;
        assert!(Ioapic::from_state(&state, Box::new(Recorder::default())).is_ok());
    }

    #[test]
    fn a_pin_is_an_interrupt_line() {
        let (ioapic, sent) = ioapic();
        let ioapic = Arc::new(Mutex::new(ioapic));
        write_reg(&mut lock(&ioapic), 0x10 + 2 * 9, 0x59);
        IoapicPin::new(ioapic.clone(), 9).trigger().unwrap();
        assert_eq!(*sent.0.lock().unwrap(), [(0xfee0_0000, 0x59)]);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_saved_ioapic_round_trips_through_json() {
        let (mut dev, _) = ioapic();
        programmed(&mut dev);
        let state = dev.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: IoapicState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let restored = Ioapic::from_state(&back, Box::new(Recorder::default())).unwrap();
        assert_eq!(restored.save(), state);
    }

    #[test]
    fn fuzz_ioapic_registers() {
        crate::fuzz::run("ioapic_registers", |rng| {
            let (mut ioapic, _) = ioapic();
            let writes = 1 + rng.below(64) as usize;
            for _ in 0..writes {
                // Register selects within and past the 0x3f the entries end at.
                if rng.one_in(3) {
                    let reg = rng.below(0x60) as u32;
                    ioapic.write(IOREGSEL, &reg.to_le_bytes());
                }
                crate::fuzz::poke_registers(
                    rng,
                    &mut ioapic,
                    MMIO_LEN,
                    &[IOREGSEL, IOWIN, 0x40],
                    1,
                );
                if rng.one_in(4) {
                    // Pins the guest's devices raise, and some that do not exist.
                    let _ = ioapic.raise(rng.below(PINS as u64 + 4) as usize);
                }
            }
            // Whatever the guest wrote, the state a snapshot keeps comes back as it was.
            let state = ioapic.save();
            let back = Ioapic::from_state(&state, Box::new(Recorder::default())).unwrap();
            assert_eq!(back.save(), state);
        });
    }
}
