//! Device models for the Ember microVM monitor.
//!
//! Every device here is reached through a [`Bus`]: the vCPU threads translate a port-I/O or MMIO
//! exit into a bus access, and a device only ever sees offsets inside its own range. A device
//! that needs the whole VM to change state (reset, power off, exit with a status) says so in the
//! return value of its write, so that the vCPU exit handler stays a plain function.

pub mod acpi_sleep;
pub mod boot_timer;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod interrupt;
pub mod ioapic;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

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
