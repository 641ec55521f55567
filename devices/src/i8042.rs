//! Just enough of the i8042 keyboard controller for a guest to reset the machine.
//!
//! Linux's `reboot=k` waits for the controller's input buffer to drain (status port bit 1) and
//! then sends command 0xFE, which pulses the CPU reset line. There is no keyboard behind it.

use crate::{BusDevice, VmRequest};

/// Offset of the data port (0x60) from the device base.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port (0x64) from the device base.
pub const COMMAND_OFFSET: u64 = 4;
/// Size of the range the device answers (ports 0x60..=0x64).
pub const RANGE_LEN: u64 = 5;

const CMD_PULSE_RESET: u8 = 0xfe;

/// An i8042 with no keyboard: always empty, always ready, resets on command 0xFE.
///
/// Stateless, so nothing to snapshot: every read is 0 and the reset command needs no history. A
/// restored VM gets a new one.
#[derive(Debug, Default)]
pub struct I8042;

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the guest never waits on us.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        match (offset, data.first()) {
            (COMMAND_OFFSET, Some(&CMD_PULSE_RESET)) => Some(VmRequest::Reset),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pulse_reset_command_resets() {
        let mut dev = I8042;
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xfe]), Some(VmRequest::Reset));
        assert_eq!(dev.write(COMMAND_OFFSET, &[0xad]), None);
        assert_eq!(dev.write(DATA_OFFSET, &[0xfe]), None);
        let mut status = [0xff];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
