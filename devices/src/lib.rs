//! Device models for the Ember microVM monitor.
//!
//! Every device here is reached through a [`Bus`]: the vCPU threads translate a port-I/O or MMIO
//! exit into a bus access, and a device only ever sees offsets inside its own range. A device
//! that needs the whole VM to change state (reset, power off, exit with a status) says so in the
//! return value of its write, so that the vCPU exit handler stays a plain function.
//!
//! A device whose state the guest can observe keeps it as plain data for snapshots: a
//! `…State` type (serialisable with the `serde` feature), `save(&self)` to take it and
//! `from_state(&state, …)` to build the device again, with the same host-side arguments as its
//! `new` (an interrupt line, a writer, a clock: never part of the state). A saved state comes
//! from a file and is untrusted: `from_state` accepts exactly the states the model can reach
//! through guest accesses and refuses any other with a typed error, so a restored device never
//! holds a value it could not have held live. A device with nothing to keep says so in its
//! documentation and has no state type: a restored VM gets a new one.

// Every public item says what it is for: the monitor and, later, other users build on this crate.
#![deny(missing_docs)]

pub mod acpi_sleep;
pub mod boot_timer;
pub mod bus;
pub mod debug_exit;
#[cfg(test)]
mod fuzz;
pub mod i8042;
pub mod interrupt;
pub mod ioapic;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, VmRequest};
