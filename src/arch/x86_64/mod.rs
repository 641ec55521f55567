//! Everything specific to x86_64: the machine layout, boot protocols, CPU state and firmware
//! tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod regs;
pub mod xstate;
