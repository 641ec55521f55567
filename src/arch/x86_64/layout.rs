//! The machine Ember builds: where everything sits in guest-physical memory and in port space.
//!
//! Every other module refers to these names; no guest address appears anywhere else.

/// Boot GDT (the 64-bit Linux protocol and PVH entry both need flat code/data segments).
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT: an empty one, so an early exception is a clean triple fault, not a wild jump.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after `hvm_start_info`.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Room for PVH memory-map entries (24 bytes each) before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = 0x80;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry: PML4, PDPT and one PD of 2 MiB pages,
/// which maps the first 1 GiB as the Linux boot protocol expects.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_START: u64 = 0xa000;
/// Page directory (512 x 2 MiB).
pub const PD_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line (with its NUL): Linux's x86 COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area: the MP table lives here and RAM below 1 MiB ends here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP must be in 0xe0000..0x100000 for Linux to find it by scanning.
pub const ACPI_START: u64 = 0xe0000;
/// End of the legacy area reserved for firmware tables.
pub const LEGACY_END: u64 = 0x10_0000;
/// Where the kernel is loaded (and where "high memory" starts for the loaders).
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: device windows, IOAPIC, LAPIC. RAM that does not fit below it
/// continues at 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one 4 KiB page each, from here up.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// An MMIO address with nothing behind it (in the hole, below the virtio devices) where Ember
/// briefly registers an ioeventfd at start-up to settle KVM's grace periods (see
/// `vmm::settle_grace_periods`). A guest write there is ignored either way.
pub const GRACE_PERIOD_PROBE_ADDRESS: u64 = 0xcfff_f000;
/// The end of the virtio-mmio area.
pub const VIRTIO_MMIO_END: u64 = 0xe000_0000;
/// The IOAPIC (emulated in userspace, `ember_devices::ioapic`).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The in-kernel local APICs.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (three pages) for real-mode emulation on Intel; placed at the top of the hole,
/// clear of everything else, as Firecracker and Cloud Hypervisor do.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// COM1 (0x3f8..0x3ff).
pub const COM1_PORT: u64 = 0x3f8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u32 = 4;
/// The i8042 controller (0x60 data, 0x64 command/status).
pub const I8042_PORT: u64 = 0x60;
/// The debug-exit port: a one-byte OUT here ends the VM with that byte as exit status.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// The boot timer: a one-byte OUT here logs the time since ember started (the "POST code" port,
/// as Cloud Hypervisor uses it).
pub const BOOT_TIMER_PORT: u64 = 0x80;
/// ACPI sleep control (this port) and sleep status (the next) registers.
pub const ACPI_SLEEP_PORT: u64 = 0x600;
/// The extended-state switch on software KVM (`xstate`): a 32-bit OUT here saves the vCPU's
/// AVX/AVX-512 state into a guest task's image; to the restore port, 4 above, loads it. Named to
/// the guest kernel as `ember.xstate_port=`; handled on the vCPU thread, not on the bus.
pub const XSTATE_SAVE_PORT: u64 = 0x5e0;
/// See [`XSTATE_SAVE_PORT`].
pub const XSTATE_RESTORE_PORT: u64 = XSTATE_SAVE_PORT + 4;

/// First interrupt line for virtio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_FIRST: u32 = 5;
/// Number of IOAPIC pins: the device model's own count ([`ember_devices::ioapic::PINS`]), so the
/// firmware tables can never describe pins the IOAPIC does not have. A byte, because an MP table
/// entry names its pin in one.
pub const IOAPIC_PINS: u8 = {
    assert!(ember_devices::ioapic::PINS <= u8::MAX as usize);
    ember_devices::ioapic::PINS as u8
};
