//! Snapshots: a paused VM's state as data, written to a directory and read back.
//!
//! Built up in steps (the snapshot issue): [`vcpu_state`] reads and restores one vCPU's
//! architectural state, [`file`] writes and checks the state file; taking a running VM's
//! snapshot, the memory file and `--restore` come next.

pub mod file;
pub mod vcpu_state;
