//! One vCPU's architectural state, as KVM hands it out and takes it back.
//!
//! What is saved, and the order it goes back in, follow what restored a guest exactly on this
//! host's software KVM (a C probe; the facts are in the snapshot issue) and Firecracker's order:
//! MP_STATE, REGS, SREGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS (the TSC deadline last, once the
//! LAPIC's timer mode is back), VCPU_EVENTS. The FPU goes through KVM_SET_XSAVE: KVM_SET_FPU alone
//! loses the XMM registers here. The CPUID is not state: the VM that takes this state is built
//! with the same configuration, which sets it.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// IA32_TSC_DEADLINE: set after the other MSRs, once the LAPIC timer is in TSC-deadline mode
/// again (before that, KVM ignores the write).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's paravirtual MSRs 0x4b564d10–0x4b564d13 read back on this host but are VM-wide and
/// read-only, not vCPU state: writing them back fails.
const KVM_READ_ONLY_MSRS: std::ops::RangeInclusive<u32> = 0x4b56_4d10..=0x4b56_4d13;

/// Why a vCPU's state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM read or wrote fewer MSRs than asked (it stops at the first it refuses).
    #[error("{what}: KVM took {done} of {asked} MSRs (it refused {refused:#x})")]
    Msrs {
        /// Reading or writing.
        what: &'static str,
        /// How many it did.
        done: usize,
        /// How many there were.
        asked: usize,
        /// The first it refused.
        refused: u32,
    },
    /// The MSR list is too long for KVM's buffer.
    #[error("cannot build the MSR buffer")]
    MsrBuffer,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { what, source }
}

/// Everything of one vCPU a snapshot keeps.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// Runnable, halted, waiting for a SIPI, …
    pub mp_state: kvm_mp_state,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, the APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE, AVX… in XSAVE layout.
    pub xsave: kvm_xsave,
    /// XCR0.
    pub xcrs: kvm_xcrs,
    /// DR0–DR3, DR6, DR7.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers (its timer, pending and in-service interrupts).
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists, but the VM-wide read-only ones; the TSC deadline last.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts and NMIs, interrupt shadows.
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs to save, from KVM's list (`KVM_GET_MSR_INDEX_LIST`): without the read-only
/// paravirtual ones, the TSC deadline moved to the end.
pub fn msrs_to_save(kvm_list: &[u32]) -> Vec<u32> {
    let mut list: Vec<u32> = kvm_list
        .iter()
        .copied()
        .filter(|msr| !KVM_READ_ONLY_MSRS.contains(msr) && *msr != MSR_IA32_TSC_DEADLINE)
        .collect();
    if kvm_list.contains(&MSR_IA32_TSC_DEADLINE) {
        list.push(MSR_IA32_TSC_DEADLINE);
    }
    list
}

impl VcpuState {
    /// Reads the state of `vcpu`, which must not be in KVM_RUN (a paused vCPU, with its last
    /// I/O completed). `msrs` comes from [`msrs_to_save`].
    pub fn save(vcpu: &VcpuFd, msrs: &[u32]) -> Result<Self, VcpuStateError> {
        let mut buffer = msr_buffer(msrs.iter().map(|&index| (index, 0)))?;
        let read = vcpu.get_msrs(&mut buffer).map_err(kvm("KVM_GET_MSRS"))?;
        if read != msrs.len() {
            return Err(VcpuStateError::Msrs {
                what: "KVM_GET_MSRS",
                done: read,
                asked: msrs.len(),
                refused: msrs[read],
            });
        }
        Ok(Self {
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            xsave: vcpu.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?,
            xcrs: vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?,
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            lapic: vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?,
            msrs: buffer
                .as_slice()
                .iter()
                .map(|entry| (entry.index, entry.data))
                .collect(),
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Writes the state into `vcpu` (created, its CPUID set, never run), in the order above.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), VcpuStateError> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        // SAFETY: KVM_SET_XSAVE reads the guest's XSAVE size from `xsave`; that exceeds the
        // 4096 bytes of `kvm_xsave` only with dynamically enabled components (AMX), which need
        // ARCH_REQ_XCOMP_GUEST_PERM, and Ember never asks for them.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        let buffer = msr_buffer(self.msrs.iter().copied())?;
        let written = vcpu.set_msrs(&buffer).map_err(kvm("KVM_SET_MSRS"))?;
        if written != self.msrs.len() {
            return Err(VcpuStateError::Msrs {
                what: "KVM_SET_MSRS",
                done: written,
                asked: self.msrs.len(),
                refused: self.msrs[written].0,
            });
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))
    }
}

fn msr_buffer(entries: impl Iterator<Item = (u32, u64)>) -> Result<Msrs, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = entries
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(|_| VcpuStateError::MsrBuffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_msr_list_drops_read_only_ones_and_ends_with_the_deadline() {
        let list = msrs_to_save(&[0x10, MSR_IA32_TSC_DEADLINE, 0x4b56_4d10, 0x4b56_4d13, 0x174]);
        assert_eq!(list, [0x10, 0x174, MSR_IA32_TSC_DEADLINE]);
        assert_eq!(msrs_to_save(&[0x10]), [0x10]);
    }
}
