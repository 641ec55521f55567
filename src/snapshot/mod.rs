//! Snapshots: a paused VM's state as data, written to a directory and read back.
//!
//! [`vcpu_state`] reads and restores one vCPU's architectural state, [`file`] writes and checks
//! the state file, [`memory`] writes guest RAM sparse and maps it back copy-on-write; `vmm.rs`
//! puts them together for `PUT /vm/snapshot` and `--restore`. [`cache`] keeps job mode's
//! warm-start snapshots.

pub mod cache;
pub mod file;
pub mod memory;
pub mod vcpu_state;
