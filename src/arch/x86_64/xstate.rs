//! The extended-state switch: Ember saves and restores a guest task's AVX / AVX-512 registers
//! when the guest kernel cannot.
//!
//! On software KVM (`kvm_pvm`) the guest kernel must run with `noxsave`: XSAVE, XRSTOR and every
//! VEX/EVEX instruction end the VM when run in kernel mode. Guest user mode, though, runs
//! natively and sees the host's CPUID and XCR0, so programs use AVX, AVX-512 and the opmask
//! registers, and FXSAVE (all the kernel can switch) covers only x87 and xmm0-15. Without help,
//! the upper halves of ymm0-15, all of zmm/ymm16-31 and k0-7 would be shared by every guest
//! process: they corrupt each other and can read each other's data.
//!
//! Ember's guest kernel (patch 0004 in `resources/linux/patches`) asks for help through two I/O
//! ports that Ember names on its command line (`ember.xstate_port=`): a 32-bit OUT of the
//! guest-physical address / 64 of a task's 4 KiB XSAVE image to [`XSTATE_SAVE_PORT`] stores the
//! vCPU's XSAVE header and extended components in that image (standard format, bytes 512 up to
//! [`XstateLayout::end`]); to [`XSTATE_RESTORE_PORT`], loads them from it. The kernel keeps the
//! legacy region (x87, SSE) itself with FXSAVE/FXRSTOR, so Ember never changes it. Ember does the
//! work with KVM_GET_XSAVE / KVM_SET_XSAVE on the vCPU's own exit: when the OUT returns, the
//! registers are switched, and the saved state lives in kernel memory, out of user space's reach.
//!
//! The image is guest memory, so a restore treats it as hostile: only the components this switch
//! carries are taken from it, the header's other fields are rebuilt, and an address outside guest
//! RAM is refused.

use kvm_bindings::{kvm_cpuid_entry2, kvm_xsave};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{XSTATE_RESTORE_PORT, XSTATE_SAVE_PORT};

/// The XSAVE image KVM_GET_XSAVE returns and the room the guest kernel keeps per task.
pub const XSAVE_IMAGE_SIZE: usize = 4096;
/// The legacy (FXSAVE) region, which the guest kernel saves and restores itself.
const LEGACY_SIZE: usize = 512;
/// The XSAVE header, right after the legacy region.
const HEADER_SIZE: usize = 64;
/// Header fields: XSTATE_BV (which components are not in their initial state), then XCOMP_BV
/// (0: standard format); the rest is reserved and must be zero.
const XSTATE_BV: usize = LEGACY_SIZE;
const XCOMP_BV: usize = LEGACY_SIZE + 8;
/// State components 0 and 1 (x87, SSE): the legacy region's.
const LEGACY_FEATURES: u64 = 0b11;
/// The CPUID leaf that enumerates XSAVE state components.
const LEAF_XSAVE: u32 = 0xd;
/// State component 9: the protection-key rights register of user mode.
const PKRU_COMPONENT: u32 = 9;
/// AMX tile configuration and data (17, 18): a VM gets them only after asking the host kernel
/// for permission (ARCH_REQ_XCOMP_GUEST_PERM), which Ember does not.
const DYNAMIC_FEATURES: u64 = (1 << 17) | (1 << 18);
/// Guest images are 64-byte aligned, so the port carries their address / 64: 32 bits reach
/// 256 GiB of guest RAM.
const IMAGE_ALIGN_SHIFT: u32 = 6;

/// Why a switch request could not be carried out. It only ever hurts the guest that made it.
#[derive(Debug, thiserror::Error)]
pub enum XstateError {
    #[error("XSAVE image at {address:#x} is not in guest RAM")]
    OutOfGuestMemory {
        address: u64,
        #[source]
        source: GuestMemoryError,
    },
    #[error("KVM refused the vCPU's XSAVE state")]
    Kvm(#[source] kvm_ioctls::Error),
}

/// What the guest kernel asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XstateOp {
    /// Store the vCPU's extended state in the task's image.
    Save,
    /// Load the task's image into the vCPU.
    Restore,
}

/// One request: an operation on the image at `image` (guest-physical).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XstateRequest {
    pub op: XstateOp,
    pub image: GuestAddress,
}

impl XstateRequest {
    /// The request a port write makes, if `port` is the switch's and the write is 32 bits wide.
    pub fn decode(port: u64, data: &[u8]) -> Option<Self> {
        let op = match port {
            XSTATE_SAVE_PORT => XstateOp::Save,
            XSTATE_RESTORE_PORT => XstateOp::Restore,
            _ => return None,
        };
        let frame = u32::from_le_bytes(data.try_into().ok()?);
        Some(Self {
            op,
            image: GuestAddress(u64::from(frame) << IMAGE_ALIGN_SHIFT),
        })
    }

    /// Whether `port` belongs to the switch (even if a write there is malformed).
    pub fn is_switch_port(port: u64) -> bool {
        port == XSTATE_SAVE_PORT || port == XSTATE_RESTORE_PORT
    }
}

/// Which state components the switch carries, and where in the image the last one ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XstateLayout {
    /// XSAVE feature bits (x87 and SSE included: they stay with the kernel's FXSAVE).
    pub features: u64,
    /// End of the last carried component in the standard-format image.
    pub end: usize,
    /// Where PKRU sits in the image, when it is carried.
    pub pkru_offset: Option<usize>,
}

impl XstateLayout {
    /// The user state components KVM supports (CPUID leaf 0xD) whose standard-format location
    /// fits the 4 KiB image; the AMX ones are left out (see [`DYNAMIC_FEATURES`]).
    pub fn from_cpuid(entries: &[kvm_cpuid_entry2]) -> Self {
        let leaf = |index: u32| {
            entries
                .iter()
                .find(|e| e.function == LEAF_XSAVE && e.index == index)
        };
        let supported = leaf(0)
            .map(|e| u64::from(e.eax) | (u64::from(e.edx) << 32))
            .unwrap_or(0)
            & !DYNAMIC_FEATURES;
        let mut layout = Self {
            features: LEGACY_FEATURES,
            end: LEGACY_SIZE + HEADER_SIZE,
            pkru_offset: None,
        };
        for component in 2..64u32 {
            if supported & (1 << component) == 0 {
                continue;
            }
            let Some(entry) = leaf(component) else {
                continue;
            };
            // ECX bit 0: a supervisor component (XSAVES only), never in user state.
            let supervisor = entry.ecx & 1 != 0;
            let (size, offset) = (entry.eax as usize, entry.ebx as usize);
            if supervisor || size == 0 || offset < LEGACY_SIZE + HEADER_SIZE {
                continue;
            }
            if offset + size <= XSAVE_IMAGE_SIZE {
                layout.features |= 1 << component;
                layout.end = layout.end.max(offset + size);
                if component == PKRU_COMPONENT && size >= 4 {
                    layout.pkru_offset = Some(offset);
                }
            }
        }
        layout
    }

    /// Whether there is anything beyond x87 and SSE to switch.
    pub fn has_extended_state(&self) -> bool {
        self.features & !LEGACY_FEATURES != 0
    }

    /// Copies the header and extended components of `image` (the vCPU's, as KVM_GET_XSAVE gives
    /// it) into the guest's image at `at`.
    pub fn save(
        &self,
        image: &[u8; XSAVE_IMAGE_SIZE],
        memory: &GuestMemoryMmap,
        at: GuestAddress,
    ) -> Result<(), XstateError> {
        // On the stack: this runs at every guest context switch.
        let mut buffer = [0u8; XSAVE_IMAGE_SIZE - LEGACY_SIZE];
        let part = &mut buffer[..self.end - LEGACY_SIZE];
        part.copy_from_slice(&image[LEGACY_SIZE..self.end]);
        let header = &mut part[..HEADER_SIZE];
        let xstate_bv = read_u64(header, 0) & self.features;
        header.fill(0);
        header[..8].copy_from_slice(&xstate_bv.to_le_bytes());
        memory
            .write_slice(part, extended_part(at)?)
            .map_err(|source| XstateError::OutOfGuestMemory {
                address: at.0,
                source,
            })
    }

    /// Loads the carried components from the guest's image at `at` into `image` (the vCPU's),
    /// leaving its legacy region and everything the switch does not carry as they are.
    pub fn restore(
        &self,
        image: &mut [u8; XSAVE_IMAGE_SIZE],
        memory: &GuestMemoryMmap,
        at: GuestAddress,
    ) -> Result<(), XstateError> {
        let mut buffer = [0u8; XSAVE_IMAGE_SIZE - LEGACY_SIZE];
        let part = &mut buffer[..self.end - LEGACY_SIZE];
        memory
            .read_slice(part, extended_part(at)?)
            .map_err(|source| XstateError::OutOfGuestMemory {
                address: at.0,
                source,
            })?;
        let current_bv = read_u64(image, XSTATE_BV);
        let saved_bv = read_u64(part, 0);
        let carried = self.features & !LEGACY_FEATURES;
        let mut xstate_bv = (current_bv & !carried) | (saved_bv & carried);
        image[LEGACY_SIZE + HEADER_SIZE..self.end].copy_from_slice(&part[HEADER_SIZE..]);
        // KVM_SET_XSAVE leaves the vCPU's PKRU alone when the image has it in its initial state
        // (its bit clear): a new program would inherit the last task's keys. Spell the initial
        // value (0: every key open) out instead.
        if let Some(offset) = self.pkru_offset {
            if saved_bv & (1 << PKRU_COMPONENT) == 0 {
                image[offset..offset + 4].fill(0);
                xstate_bv |= 1 << PKRU_COMPONENT;
            }
        }
        image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&xstate_bv.to_le_bytes());
        image[XCOMP_BV..LEGACY_SIZE + HEADER_SIZE].fill(0);
        Ok(())
    }
}

/// Where the header starts in the guest's image.
fn extended_part(image: GuestAddress) -> Result<GuestAddress, XstateError> {
    image
        .0
        .checked_add(LEGACY_SIZE as u64)
        .map(GuestAddress)
        .ok_or(XstateError::OutOfGuestMemory {
            address: image.0,
            source: GuestMemoryError::InvalidGuestAddress(image),
        })
}

fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

/// A vCPU thread's end of the switch.
pub struct XstateSwitch {
    layout: XstateLayout,
    memory: GuestMemoryMmap,
}

impl XstateSwitch {
    pub fn new(layout: XstateLayout, memory: GuestMemoryMmap) -> Self {
        Self { layout, memory }
    }

    /// Carries out `request` on `vcpu`, which has just exited for it.
    pub fn handle(&self, vcpu: &VcpuFd, request: XstateRequest) -> Result<(), XstateError> {
        let mut xsave = vcpu.get_xsave().map_err(XstateError::Kvm)?;
        let mut image = image_bytes(&xsave);
        match request.op {
            XstateOp::Save => self.layout.save(&image, &self.memory, request.image),
            XstateOp::Restore => {
                self.layout
                    .restore(&mut image, &self.memory, request.image)?;
                set_image_bytes(&mut xsave, &image);
                // SAFETY: KVM_SET_XSAVE copies the guest's XSAVE state size from `xsave`; that
                // size exceeds the 4096 bytes of `kvm_xsave` only with dynamically enabled
                // components (AMX), which need ARCH_REQ_XCOMP_GUEST_PERM, and Ember never asks
                // for them.
                unsafe { vcpu.set_xsave(&xsave) }.map_err(XstateError::Kvm)
            }
        }
    }
}

fn image_bytes(xsave: &kvm_xsave) -> [u8; XSAVE_IMAGE_SIZE] {
    let mut bytes = [0u8; XSAVE_IMAGE_SIZE];
    for (chunk, word) in bytes.chunks_exact_mut(4).zip(xsave.region.iter()) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    bytes
}

fn set_image_bytes(xsave: &mut kvm_xsave, bytes: &[u8; XSAVE_IMAGE_SIZE]) {
    for (word, chunk) in xsave.region.iter_mut().zip(bytes.chunks_exact(4)) {
        *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CPUID leaf 0xD of a host with AVX-512, PKRU and AMX tiles (17, 18) that do not fit.
    fn avx512_cpuid() -> Vec<kvm_cpuid_entry2> {
        let entry = |index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function: LEAF_XSAVE,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        vec![
            entry(0, 0x6_02e7, 0xa88, 0x2b00, 0),
            entry(1, 0xf, 0, 0, 0),
            entry(2, 256, 576, 0, 0),
            entry(5, 64, 1088, 0, 0),
            entry(6, 512, 1152, 0, 0),
            entry(7, 1024, 1664, 0, 0),
            entry(9, 8, 2688, 0, 0),
            entry(17, 64, 2752, 2, 0),
            entry(18, 8192, 2816, 6, 0),
        ]
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn filled_image(seed: u8) -> [u8; XSAVE_IMAGE_SIZE] {
        let mut image = [0u8; XSAVE_IMAGE_SIZE];
        for (i, b) in image.iter_mut().enumerate() {
            *b = seed.wrapping_add(i as u8);
        }
        image
    }

    #[test]
    fn layout_takes_the_components_that_fit() {
        let layout = XstateLayout::from_cpuid(&avx512_cpuid());
        assert_eq!(layout.features, 0x2e7);
        assert_eq!(layout.end, 2696);
        assert_eq!(layout.pkru_offset, Some(2688));
        assert!(layout.has_extended_state());
        let none = XstateLayout::from_cpuid(&[]);
        assert_eq!(none.features, LEGACY_FEATURES);
        assert!(!none.has_extended_state());
    }

    #[test]
    fn port_writes_decode_to_requests() {
        assert_eq!(
            XstateRequest::decode(XSTATE_SAVE_PORT, &0x1234u32.to_le_bytes()),
            Some(XstateRequest {
                op: XstateOp::Save,
                image: GuestAddress(0x1234 << 6)
            })
        );
        assert_eq!(
            XstateRequest::decode(XSTATE_RESTORE_PORT, &u32::MAX.to_le_bytes()),
            Some(XstateRequest {
                op: XstateOp::Restore,
                image: GuestAddress(u64::from(u32::MAX) << 6)
            })
        );
        assert_eq!(XstateRequest::decode(XSTATE_SAVE_PORT, &[1]), None);
        assert_eq!(XstateRequest::decode(0x3f8, &[0; 4]), None);
        assert!(XstateRequest::is_switch_port(XSTATE_RESTORE_PORT));
    }

    #[test]
    fn save_then_restore_round_trips_the_extended_state() {
        let layout = XstateLayout::from_cpuid(&avx512_cpuid());
        let memory = memory();
        let at = GuestAddress(0x2000);
        let mut task = filled_image(7);
        task[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&0x2e7u64.to_le_bytes());
        task[XCOMP_BV..XCOMP_BV + 8].fill(0);
        task[XCOMP_BV + 8..LEGACY_SIZE + HEADER_SIZE].fill(0);
        layout.save(&task, &memory, at).unwrap();

        // The legacy region in guest memory is the kernel's: untouched.
        let mut legacy = [0u8; LEGACY_SIZE];
        memory.read_slice(&mut legacy, at).unwrap();
        assert_eq!(legacy, [0u8; LEGACY_SIZE]);

        // Another task ran meanwhile, with its own legacy and extended state.
        let mut vcpu = filled_image(99);
        vcpu[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&0x3u64.to_le_bytes());
        let other_legacy = vcpu[..LEGACY_SIZE].to_vec();
        layout.restore(&mut vcpu, &memory, at).unwrap();
        assert_eq!(&vcpu[..LEGACY_SIZE], &other_legacy[..], "legacy kept");
        assert_eq!(read_u64(&vcpu, XSTATE_BV), 0x2e7);
        assert_eq!(
            &vcpu[LEGACY_SIZE + HEADER_SIZE..layout.end],
            &task[LEGACY_SIZE + HEADER_SIZE..layout.end]
        );
        // Past the carried components nothing changes.
        assert_eq!(&vcpu[layout.end..], &filled_image(99)[layout.end..]);
    }

    #[test]
    fn a_zeroed_image_restores_the_initial_state() {
        // A new program's image (exec copies init_fpstate): XSTATE_BV 0 puts AVX and AVX-512
        // in their initial state, whatever the previous task left.
        let layout = XstateLayout::from_cpuid(&avx512_cpuid());
        let memory = memory();
        let mut vcpu = filled_image(1);
        vcpu[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&0x2e7u64.to_le_bytes());
        layout
            .restore(&mut vcpu, &memory, GuestAddress(0x4000))
            .unwrap();
        // PKRU is spelled out as 0 (KVM would keep the last task's otherwise); the rest is in
        // its initial state.
        assert_eq!(read_u64(&vcpu, XSTATE_BV), 0x203);
        assert_eq!(&vcpu[2688..2692], &[0u8; 4]);
    }

    #[test]
    fn a_hostile_header_is_rebuilt() {
        let layout = XstateLayout::from_cpuid(&avx512_cpuid());
        let memory = memory();
        let at = GuestAddress(0x6000);
        // Every bit of the header set: unsupported components, compacted format, reserved bytes.
        memory
            .write_slice(
                &[0xff; HEADER_SIZE],
                GuestAddress(at.0 + LEGACY_SIZE as u64),
            )
            .unwrap();
        let mut vcpu = [0u8; XSAVE_IMAGE_SIZE];
        layout.restore(&mut vcpu, &memory, at).unwrap();
        assert_eq!(read_u64(&vcpu, XSTATE_BV), 0x2e4, "carried components only");
        assert_eq!(&vcpu[XCOMP_BV..LEGACY_SIZE + HEADER_SIZE], &[0u8; 56][..]);

        // Saving never copies a bit the switch does not carry either.
        let mut image = [0u8; XSAVE_IMAGE_SIZE];
        image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        image[XCOMP_BV..XCOMP_BV + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        layout.save(&image, &memory, at).unwrap();
        let mut header = [0u8; HEADER_SIZE];
        memory
            .read_slice(&mut header, GuestAddress(at.0 + LEGACY_SIZE as u64))
            .unwrap();
        assert_eq!(read_u64(&header, 0), 0x2e7);
        assert_eq!(&header[8..], &[0u8; 56][..]);
    }

    #[test]
    fn images_outside_guest_ram_are_refused() {
        let layout = XstateLayout::from_cpuid(&avx512_cpuid());
        let memory = memory();
        let mut image = [0u8; XSAVE_IMAGE_SIZE];
        // Straddling the end of RAM, past it, and at the largest address the port can name.
        for at in [0xf800, 0x10000, u64::from(u32::MAX) << 6] {
            assert!(matches!(
                layout.save(&image, &memory, GuestAddress(at)),
                Err(XstateError::OutOfGuestMemory { .. })
            ));
            assert!(matches!(
                layout.restore(&mut image, &memory, GuestAddress(at)),
                Err(XstateError::OutOfGuestMemory { .. })
            ));
        }
        assert!(extended_part(GuestAddress(u64::MAX)).is_err());
    }

    #[test]
    fn image_bytes_round_trip_through_kvm_xsave() {
        let image = filled_image(3);
        let mut xsave = kvm_xsave::default();
        set_image_bytes(&mut xsave, &image);
        assert_eq!(image_bytes(&xsave), image);
    }
}
