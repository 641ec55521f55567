//! An address bus that maps ranges to devices, one for port I/O and one for MMIO.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a guest write asked of the whole VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmRequest {
    /// The guest pulsed the reset line (i8042 command 0xFE).
    Reset,
    /// The guest entered ACPI sleep state S5 (soft off).
    PowerOff,
    /// The guest wrote its own exit status to the debug-exit port.
    Exit(u8),
}

/// A device that answers reads and writes at offsets inside its own bus range.
pub trait BusDevice: Send {
    /// Fills `data` with what the device returns at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Takes `data` written at `offset`; returns what the write asked of the VM, if anything.
    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest>;
}

/// Errors while assembling a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    InvalidRange {
        /// Start of the new range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The new range overlaps a device already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already at {existing:#x}")]
    Overlap {
        /// Start of the new range.
        base: u64,
        /// Its length.
        len: u64,
        /// Start of the range it overlaps.
        existing: u64,
    },
}

struct BusRange {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Maps non-overlapping address ranges to devices.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, BusRange>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        // The only candidates for an overlap are the last range starting below `end`.
        if let Some((&existing, range)) = self.ranges.range(..end).next_back() {
            if existing + range.len > base {
                return Err(BusError::Overlap {
                    base,
                    len,
                    existing,
                });
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, access_len: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device: a guest straddling two ranges gets
        // nothing rather than a device reading past its own registers.
        let last = offset.checked_add(access_len as u64)?;
        (last <= range.len).then_some((offset, &range.device))
    }

    /// Reads from the device at `addr`. Returns false (and leaves `data` alone) when no device
    /// covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`. `Err(())` when no device covers the whole access.
    #[allow(clippy::result_unit_err)]
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<Option<VmRequest>, ()> {
        let (offset, device) = self.resolve(addr, data.len()).ok_or(())?;
        Ok(lock(device).write(offset, data))
    }
}

/// Locks a device even if another thread panicked while holding it: a device model's state stays
/// consistent register by register, and one failed access must not take every vCPU down.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
            self.last_write = Some((offset, data.to_vec()));
            None
        }
    }

    #[test]
    fn routes_offsets_inside_the_range() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert_eq!(bus.write(0x3f9, &[7]), Ok(None));
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![7])));
    }

    #[test]
    fn misses_outside_and_across_ranges() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 4)
            .unwrap();
        let mut data = [0xaau8; 2];
        assert!(!bus.read(0xff, &mut data[..1]));
        assert!(!bus.read(0x104, &mut data[..1]));
        // Starts inside, ends outside.
        assert!(!bus.read(0x103, &mut data));
        assert_eq!(data, [0xaa, 0xaa]);
        assert_eq!(bus.write(0x103, &[1, 2]), Err(()));
        assert_eq!(bus.write(u64::MAX, &[1, 2]), Err(()));
    }

    #[test]
    fn rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(dev.clone(), 0x10f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf8, 0x9),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0x200, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert(dev.clone(), 0x110, 1).unwrap();
        bus.insert(dev, 0xf0, 0x10).unwrap();
    }
}
