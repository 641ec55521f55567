//! The debug-exit port: the guest writes its own exit status and the VM ends with it.
//!
//! One byte written at offset 0 is the status; Ember exits with exactly that byte. This is how a
//! CI job inside the guest hands its exit code to the host (QEMU's `isa-debug-exit` does the same
//! job, but encodes the status as `(v << 1) | 1`; Ember passes it through unchanged).

use crate::{BusDevice, VmRequest};

/// The debug-exit device (one write-only byte).
///
/// Stateless, so nothing to snapshot: a write ends the VM at once and reads are 0. A restored VM
/// gets a new one.
#[derive(Debug, Default)]
pub struct DebugExit;

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        // A wider OUT (outw/outl) still carries the status in its low byte.
        match (offset, data.first()) {
            (0, Some(&status)) => Some(VmRequest::Exit(status)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_the_exit_status() {
        let mut dev = DebugExit;
        assert_eq!(dev.write(0, &[42]), Some(VmRequest::Exit(42)));
        assert_eq!(dev.write(0, &[0, 1]), Some(VmRequest::Exit(0)));
        assert_eq!(dev.write(0, &[]), None);
        let mut data = [0xff];
        dev.read(0, &mut data);
        assert_eq!(data, [0]);
    }
}
