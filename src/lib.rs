//! Ember: a microVM monitor on Linux KVM.
//!
//! `ember run` boots a Linux kernel (or any kernel speaking the Linux 64-bit or PVH boot
//! protocols) in a KVM virtual machine with a serial console, one thread per vCPU, and exits
//! with a code that says how the guest ended.

#[cfg(not(target_arch = "x86_64"))]
compile_error!("Ember supports x86_64 hosts only");

pub mod api;
pub mod arch;
pub mod cli;
pub mod config;
pub mod console;
pub mod console_output;
pub mod device_manager;
pub mod device_threads;
pub mod image;
pub mod irqchip;
pub mod job;
pub mod kvm;
pub mod main_loop;
pub mod outcome;
pub mod rootfs;
pub mod runtime;
pub mod sandbox;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod vmm;
pub mod volumes;
