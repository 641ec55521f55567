//! The VM's interrupt controllers: KVM's "split irqchip" (a local APIC per vCPU in the kernel, the
//! I/O APIC in userspace, no 8259 PIC) and the path from the userspace IOAPIC to the local APICs.
//!
//! Why split: KVM's in-kernel PIC and IOAPIC put devices on KVM's I/O buses, which on recent host
//! kernels leaves an SRCU grace period in flight that the VM's destruction waits out, which
//! showed in a short-lived VM's exit time (the figures are in the README, "Start-up"; measured
//! with resources/bench/startup.py). Ember's interrupt sources (the
//! UART, the virtio devices) all live in userspace, so nothing is lost by raising their pins there.
//!
//! No i8254 PIT either: a Linux guest with kvm-clock and the TSC-deadline local APIC timer never
//! uses it (`apic_needs_pit()` is false), and KVM's PIT costs a kernel worker thread whose start
//! and stop showed in every run (README, "Start-up").

use std::io;
use std::sync::Arc;

use ember_devices::ioapic::{self, MsiSink};
use kvm_bindings::{kvm_enable_cap, kvm_msi, KVM_CAP_SPLIT_IRQCHIP};
use kvm_ioctls::VmFd;

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Gives the VM in-kernel local APICs and leaves the IOAPIC's pins to userspace. Must come before
/// the vCPUs are created (they get their local APICs then).
pub fn create(vm_fd: &VmFd) -> Result<(), kvm_ioctls::Error> {
    vm_fd.set_tss_address(KVM_TSS_ADDRESS as usize)?;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    // The number of IOAPIC routes KVM reserves (for EOIs of level-triggered pins).
    cap.args[0] = ioapic::PINS as u64;
    vm_fd.enable_cap(&cap)
}

/// Delivers the IOAPIC's messages to the local APICs (KVM_SIGNAL_MSI).
pub struct KvmMsi(pub Arc<VmFd>);

impl MsiSink for KvmMsi {
    fn send(&self, address: u64, data: u32) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // 1: delivered; 0: the guest blocked it (e.g. no APIC accepts it), as on hardware.
        self.0
            .signal_msi(msi)
            .map(drop)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}
