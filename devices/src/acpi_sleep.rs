//! The ACPI hardware-reduced sleep control and status registers (ACPI 6.5, section 4.8.3.7).
//!
//! The FADT points the guest here. Linux powers off by writing `SLP_TYPx << 2 | SLP_EN` with the
//! S5 sleep type from the DSDT's `\_S5` package; Ember's DSDT declares S5 as [`S5_SLEEP_TYPE`].

use crate::{BusDevice, VmRequest};

/// Offset of the sleep control register from the device base.
pub const CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register from the device base.
pub const STATUS_OFFSET: u64 = 1;
/// Size of the range the device answers.
pub const RANGE_LEN: u64 = 2;
/// The SLP_TYP value that means S5 (soft off) on this machine.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The sleep control/status register pair.
///
/// Stateless, so nothing to snapshot: the status register always reads 0 and a control write
/// acts at once. A restored VM gets a new one.
#[derive(Debug, Default)]
pub struct AcpiSleep;

impl BusDevice for AcpiSleep {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // WAK_STS is never set: the guest never wakes from a state we would have entered.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let value = *data.first()?;
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        (offset == CONTROL_OFFSET && value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE)
            .then_some(VmRequest::PowerOff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let mut dev = AcpiSleep;
        let s5 = (S5_SLEEP_TYPE << 2) | SLP_EN;
        assert_eq!(dev.write(CONTROL_OFFSET, &[s5]), Some(VmRequest::PowerOff));
        // Without SLP_EN, or another sleep type, or on the status register: nothing happens.
        assert_eq!(dev.write(CONTROL_OFFSET, &[S5_SLEEP_TYPE << 2]), None);
        assert_eq!(dev.write(CONTROL_OFFSET, &[(3 << 2) | SLP_EN]), None);
        assert_eq!(dev.write(STATUS_OFFSET, &[s5]), None);
        assert_eq!(dev.write(CONTROL_OFFSET, &[]), None);
    }
}
