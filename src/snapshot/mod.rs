//! Snapshots: a paused VM's state as data, written to a directory and read back.
//!
//! Built up in steps (the snapshot issue): [`vcpu_state`] reads and restores one vCPU's
//! architectural state, [`file`] writes and checks the state file, [`memory`] writes guest RAM
//! sparse; `PUT /vm/snapshot` puts them together. `--restore` comes next.

pub mod file;
pub mod memory;
pub mod vcpu_state;
