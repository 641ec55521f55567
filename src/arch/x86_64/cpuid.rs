//! CPUID as each vCPU sees it: KVM's supported set, normalised to this VM's topology (one socket,
//! one thread per core, APIC ID = vCPU index), with the hypervisor leaves in place.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
/// KVM's paravirtual feature leaf.
pub const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const ECX_CX16: u32 = 1 << 13;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// KVM PV features that are hypercalls; a hypercall never returns on software KVM (`kvm_pvm`).
/// PV_SEND_IPI alone hangs a 2-vCPU Linux at SMP bring-up there.
const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
/// PV features that must be hidden on software KVM.
pub const SOFTWARE_KVM_HIDDEN_PV_FEATURES: u32 =
    KVM_FEATURE_PV_UNHALT | KVM_FEATURE_PV_SEND_IPI | KVM_FEATURE_PV_SCHED_YIELD;

const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// What shapes the CPUID of one vCPU.
#[derive(Clone, Copy, Debug)]
pub struct CpuidTopology {
    /// This vCPU's index, which is also its APIC ID.
    pub cpu: u8,
    /// vCPUs in the VM.
    pub cpus: u8,
    /// Hide what software KVM cannot do (CX16, hypercall-based PV features).
    pub software_kvm: bool,
}

/// Bits needed to hold `count` distinct IDs.
fn id_bits(count: u32) -> u32 {
    count.max(1).next_power_of_two().trailing_zeros()
}

/// Rewrites `entries` (from KVM_GET_SUPPORTED_CPUID) for one vCPU.
pub fn normalize(entries: &mut [kvm_cpuid_entry2], topo: CpuidTopology) {
    let apic_id = u32::from(topo.cpu);
    let cpus = u32::from(topo.cpus);
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC ID, [23:16] addressable logical CPUs, [15:8] CLFLUSH
                // line size in quadwords.
                entry.ebx = (apic_id << 24) | (cpus.next_power_of_two() << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if topo.software_kvm {
                    entry.ecx &= !ECX_CX16;
                }
                if cpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX [31:26]: cores per package - 1; [25:14]: logical CPUs sharing this cache - 1.
                // L1/L2 are per core; the last level is shared by the whole socket.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { cpus - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((cpus - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                entry.edx = apic_id;
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (TOPOLOGY_LEVEL_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = id_bits(cpus);
                        entry.ebx = cpus;
                        entry.ecx = (TOPOLOGY_LEVEL_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_KVM_FEATURES if topo.software_kvm => {
                entry.eax &= !SOFTWARE_KVM_HIDDEN_PV_FEATURES;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        let mut l4 = entry(4, 0);
        l4.eax = (1 << 5) | 1; // L1 data cache
        let mut l4_3 = entry(4, 3);
        l4_3.eax = (3 << 5) | 3; // L3 unified
        vec![
            entry(1, 0),
            l4,
            l4_3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(LEAF_KVM_FEATURES, 0),
        ]
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu() {
        let mut entries = sample();
        normalize(
            &mut entries,
            CpuidTopology {
                cpu: 5,
                cpus: 6,
                software_kvm: false,
            },
        );
        let l1 = find(&entries, 1, 0);
        assert_eq!(l1.ebx >> 24, 5);
        assert_eq!((l1.ebx >> 16) & 0xff, 8);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & ECX_CX16, 0, "kept on hardware KVM");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_eq!(find(&entries, 0xb, 0).edx, 5);
        assert_eq!(find(&entries, 0xb, 0).ebx, 1);
        let core = find(&entries, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (3, 6, 2));
        assert_eq!(find(&entries, 0xb, 2).ebx, 0);
        assert_eq!(find(&entries, 4, 0).eax >> 26, 5);
        assert_eq!((find(&entries, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&entries, 4, 3).eax >> 14) & 0xfff, 5);
        assert_eq!(
            find(&entries, LEAF_KVM_FEATURES, 0).eax,
            0xffff_ffff,
            "PV features kept on hardware KVM"
        );
    }

    #[test]
    fn software_kvm_hides_cx16_and_hypercall_features() {
        let mut entries = sample();
        normalize(
            &mut entries,
            CpuidTopology {
                cpu: 0,
                cpus: 1,
                software_kvm: true,
            },
        );
        let l1 = find(&entries, 1, 0);
        assert_eq!(l1.ecx & ECX_CX16, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        let kvm = find(&entries, LEAF_KVM_FEATURES, 0).eax;
        assert_eq!(kvm & SOFTWARE_KVM_HIDDEN_PV_FEATURES, 0);
        // kvm-clock (bits 0 and 3) stays.
        assert_eq!(kvm & 0b1001, 0b1001);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(8), 3);
        assert_eq!(id_bits(9), 4);
    }
}
