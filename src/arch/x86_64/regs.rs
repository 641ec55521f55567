//! The register state a vCPU starts in: segments, control registers and page tables for the
//! chosen entry protocol, plus the FPU, MSR and local-APIC defaults Linux expects.

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDPT_START, PD_START, PML4_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

const PAGE_PRESENT_RW: u64 = 0x3;
const PAGE_SIZE_2M: u64 = 0x80;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux x86 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64 { entry: u64, zero_page: u64 },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh { entry: u64, start_info: u64 },
}

/// A GDT descriptor from its flags (access byte + granularity nibble), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// Flat segments. Index 1 = code, 2 = data, 3 = TSS (selectors 0x8, 0x10, 0x18).
fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Linux64 { .. } => 0xa09b, // 64-bit (L), present, exec/read, 4K granular
        EntryMode::Pvh { .. } => 0xc09b,     // 32-bit (D), present, exec/read, 4K granular
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// The `kvm_segment` KVM wants for GDT entry `index`.
fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let granular = (entry >> 55) & 1;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if granular == 1 {
            ((raw_limit << 12) | 0xfff) as u32
        } else {
            raw_limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT/IDT (and, for long mode, identity page tables for the first 1 GiB) and
/// fills `sregs` for `mode`.
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    mode: EntryMode,
    sregs: &mut kvm_sregs,
) -> Result<(), GuestMemoryError> {
    let gdt = boot_gdt(mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + 8 * i as u64))?;
    }
    // An empty IDT: an exception before the kernel installs its own triple-faults cleanly.
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);

    match mode {
        EntryMode::Linux64 { .. } => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh { .. } => {
            // The PVH ABI: protected mode, paging off, CR4 clear.
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// PML4[0] -> PDPT[0] -> one PD of 512 x 2 MiB pages: the first 1 GiB, identity mapped.
fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), GuestMemoryError> {
    mem.write_obj(PDPT_START | PAGE_PRESENT_RW, GuestAddress(PML4_START))?;
    mem.write_obj(PD_START | PAGE_PRESENT_RW, GuestAddress(PDPT_START))?;
    let mut pd = [0u8; 4096];
    for (i, slot) in pd.chunks_exact_mut(8).enumerate() {
        let entry = ((i as u64) << 21) | PAGE_PRESENT_RW | PAGE_SIZE_2M;
        slot.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PD_START))
}

/// General registers for the boot vCPU.
pub fn boot_regs(mode: EntryMode) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match mode {
        EntryMode::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        EntryMode::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
    }
    regs
}

/// x87 control word and MXCSR at their reset values (masked exceptions).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// MSRs every vCPU starts with: syscall MSRs cleared, TSC at zero, fast strings, and write-back
/// memory by default (without it Linux maps all RAM uncached).
pub fn boot_msrs() -> Msrs {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    // A fixed handful of entries, far below the FAM limit: this cannot fail.
    Msrs::from_entries(&entries).expect("boot MSR list fits in kvm_msrs")
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = byte as _;
    }
}

/// LINT0 delivers the 8259's ExtINT and LINT1 the NMI, as on a PC: Linux relies on it (the MP
/// table says the same).
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = lapic_reg(lapic, offset);
        set_lapic_reg(lapic, offset, (value & !0x700) | (mode << 8));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_entry() {
        let mem = mem();
        let mode = EntryMode::Linux64 {
            entry: 0x100_0000,
            zero_page: 0x7000,
        };
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, mode, &mut sregs).unwrap();
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.cs.selector, 0x8);
        assert_eq!(sregs.ds.selector, 0x10);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_eq!(sregs.cr3, PML4_START);
        // PD entry 1 maps 2 MiB..4 MiB.
        let pde1: u64 = mem.read_obj(GuestAddress(PD_START + 8)).unwrap();
        assert_eq!(pde1, (1 << 21) | 0x83);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, 0x00af_9b00_0000_ffff);

        let regs = boot_regs(mode);
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, 0x7000));
        assert_eq!(regs.rflags, 2);
    }

    #[test]
    fn pvh_entry() {
        let mem = mem();
        let mode = EntryMode::Pvh {
            entry: 0x10_0040,
            start_info: 0x6000,
        };
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        setup_sregs(&mem, mode, &mut sregs).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cs.l, sregs.cs.db), (0, 1));
        assert_eq!(sregs.efer, 0);
        let regs = boot_regs(mode);
        assert_eq!((regs.rip, regs.rbx), (0x10_0040, 0x6000));
    }

    #[test]
    fn lint_modes() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0700);
        set_lint_modes(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x400);
    }

    #[test]
    fn msrs_include_mtrr_default_type() {
        let msrs = boot_msrs();
        assert!(msrs
            .as_slice()
            .iter()
            .any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == MTRR_DEF_TYPE_ENABLED_WB));
    }
}
