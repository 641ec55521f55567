//! The monitor's second wall, behind the VM boundary: what a guest that breaks a device model
//! would still be inside of.
//!
//! - [`seccomp`]: one system-call allow-list per kind of thread, on by default.

pub mod seccomp;
