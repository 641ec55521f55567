//! The guest agent of the Ember microVM monitor.
//!
//! Inside the guest, the `ember-agent` binary listens on vsock and runs the commands the host
//! asks for, streaming their standard I/O back and forth. This library holds what both sides
//! share: the [`wire`] format, and the [`interface`] descriptions the host passes on the kernel
//! command line.

pub mod interface;
pub mod wire;
