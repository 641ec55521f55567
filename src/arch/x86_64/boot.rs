//! Loading the kernel and initrd and writing what the kernel reads at entry: the zero page for
//! the Linux 64-bit protocol, or `hvm_start_info` for PVH.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{
    CMDLINE_START, HIMEM_START, MMIO_HOLE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES,
    PVH_MEMMAP_START, PVH_MODLIST_START, ZERO_PAGE_START,
};
use super::memory::MemoryMapEntry;
use super::regs::EntryMode;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const PVH_START_MAGIC: u32 = 0x336e_c578;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader ID (boot protocol, type_of_loader).
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Oldest protocol with a 64-bit entry point we can rely on (xloadflags, 2.12).
const MIN_BZIMAGE_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Alignment the Linux 64-bit protocol wants for a relocatable kernel when the image says nothing.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;
const E820_MAX_ENTRIES: usize = 128;
const PAGE_SIZE: u64 = 4096;

/// Errors loading a kernel or initrd, or writing boot parameters.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read the kernel image")]
    ReadKernel(#[source] std::io::Error),
    #[error("not a kernel Ember can boot (expected an ELF vmlinux or a bzImage)")]
    NotAKernel,
    #[error("invalid ELF kernel")]
    InvalidElf(#[source] linux_loader::loader::Error),
    #[error("invalid bzImage kernel")]
    InvalidBzImage(#[source] linux_loader::loader::Error),
    #[error("bzImage boot protocol {version:#06x} is too old or has no 64-bit entry (need 2.12+ with XLF_KERNEL_64)")]
    UnsupportedBzImage { version: u16 },
    #[error("kernel command line is too long or invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    #[error("cannot read the initrd")]
    ReadInitrd(#[source] std::io::Error),
    #[error("initrd of {size} bytes does not fit in guest RAM between the kernel and {limit:#x}; give the VM more --memory")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("memory map has {0} entries, more than the boot protocol can carry")]
    TooManyMemoryMapEntries(usize),
}

/// The kernel formats Ember boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux entered through the Linux 64-bit boot protocol.
    Elf,
    /// ELF with a PVH entry note.
    ElfPvh,
    /// bzImage, entered at its 64-bit entry point.
    BzImage,
}

/// Where a loaded kernel ended up and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: u64,
    /// First byte after the kernel image.
    pub end: u64,
    /// The image's own setup header (bzImage only).
    pub setup_header: Option<setup_header>,
}

/// Loads the kernel, detecting its format from its contents.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<LoadedKernel, BootError> {
    let mut magic = [0u8; 4];
    kernel
        .read_exact(&mut magic)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Ok(()),
            _ => Err(e),
        })
        .map_err(BootError::ReadKernel)?;
    kernel
        .seek(SeekFrom::Start(0))
        .map_err(BootError::ReadKernel)?;

    if magic == ELF_MAGIC {
        let loaded = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
            .map_err(BootError::InvalidElf)?;
        let (format, entry) = match loaded.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => (KernelFormat::ElfPvh, entry.0),
            _ => (KernelFormat::Elf, loaded.kernel_load.0),
        };
        return Ok(LoadedKernel {
            format,
            entry,
            end: loaded.kernel_end,
            setup_header: None,
        });
    }

    let loaded = match BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START))) {
        Ok(loaded) => loaded,
        Err(linux_loader::loader::Error::Bzimage(
            linux_loader::loader::bzimage::Error::InvalidBzImage,
        )) => return Err(BootError::NotAKernel),
        Err(e) => return Err(BootError::InvalidBzImage(e)),
    };
    let header = loaded.setup_header.ok_or(BootError::NotAKernel)?;
    if header.version < MIN_BZIMAGE_PROTOCOL || header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::UnsupportedBzImage {
            version: header.version,
        });
    }
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
        end: loaded.kernel_end,
        setup_header: Some(header),
    })
}

/// Where the initrd went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    pub address: u64,
    pub size: u64,
}

/// Chooses the highest page-aligned spot for `size` bytes that ends below `limit` and starts at
/// or after `kernel_end` (as high as possible, like a boot loader, so the kernel can grow).
pub fn place_initrd(size: u64, kernel_end: u64, limit: u64) -> Result<InitrdPlacement, BootError> {
    let too_large = BootError::InitrdTooLarge { size, limit };
    let address = limit.checked_sub(size).ok_or(too_large)? / PAGE_SIZE * PAGE_SIZE;
    if address < kernel_end.next_multiple_of(PAGE_SIZE) {
        return Err(BootError::InitrdTooLarge { size, limit });
    }
    Ok(InitrdPlacement { address, size })
}

/// Loads the initrd at the top of the RAM below the MMIO hole (and below the kernel's own limit).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel: &LoadedKernel,
    ram_size: u64,
) -> Result<InitrdPlacement, BootError> {
    let size = initrd.metadata().map_err(BootError::ReadInitrd)?.len();
    let mut limit = ram_size.min(MMIO_HOLE_START);
    if let Some(header) = kernel.setup_header {
        if header.initrd_addr_max != 0 {
            limit = limit.min(u64::from(header.initrd_addr_max) + 1);
        }
    }
    let placement = place_initrd(size, kernel.end, limit)?;
    let count = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, limit })?;
    mem.read_exact_volatile_from(GuestAddress(placement.address), initrd, count)
        .map_err(|e| match e {
            GuestMemoryError::IOError(io) => BootError::ReadInitrd(io),
            other => BootError::GuestMemory(other),
        })?;
    Ok(placement)
}

/// Builds the command line: the user's, then what Ember must add.
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let max = super::layout::CMDLINE_MAX_SIZE;
    let mut cmdline = Cmdline::try_from(user.trim(), max).map_err(BootError::Cmdline)?;
    for item in extra {
        cmdline.insert_str(item).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line and the boot information for `kernel`; returns how the boot vCPU
/// enters it.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<InitrdPlacement>,
    memory_map: &[MemoryMapEntry],
) -> Result<EntryMode, BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::LoadCmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len();
    match kernel.format {
        KernelFormat::ElfPvh => {
            write_pvh_start_info(mem, initrd, memory_map)?;
            Ok(EntryMode::Pvh {
                entry: kernel.entry,
                start_info: PVH_INFO_START,
            })
        }
        KernelFormat::Elf | KernelFormat::BzImage => {
            let params = zero_page(kernel.setup_header, cmdline_len, initrd, memory_map)?;
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
                .map_err(BootError::GuestMemory)?;
            Ok(EntryMode::Linux64 {
                entry: kernel.entry,
                zero_page: ZERO_PAGE_START,
            })
        }
    }
}

/// The zero page for the Linux 64-bit boot protocol.
pub fn zero_page(
    image_header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<InitrdPlacement>,
    memory_map: &[MemoryMapEntry],
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    match image_header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.address >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    if memory_map.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryMapEntries(memory_map.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(memory_map) {
        *slot = boot_e820_entry {
            addr: entry.start,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = memory_map.len() as u8;
    Ok(params)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    initrd: Option<InitrdPlacement>,
    memory_map: &[MemoryMapEntry],
) -> Result<(), BootError> {
    if memory_map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::TooManyMemoryMapEntries(memory_map.len()));
    }
    let mut info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memory_map.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.address,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(BootError::GuestMemory)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, entry) in memory_map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: entry.start,
            size: entry.size,
            type_: entry.kind as u32,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(BootError::GuestMemory)?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::super::memory::{memory_map, ram_regions};
    use super::*;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn temp_file(bytes: &[u8]) -> File {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(bytes).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let p = place_initrd(5000, 2 * MIB, 64 * MIB).unwrap();
        assert_eq!(p.address % PAGE_SIZE, 0);
        assert!(p.address + 5000 <= 64 * MIB);
        assert_eq!(p.address, 64 * MIB - 8192);
        assert!(matches!(
            place_initrd(63 * MIB, 2 * MIB, 64 * MIB),
            Err(BootError::InitrdTooLarge { .. })
        ));
        assert!(matches!(
            place_initrd(u64::MAX, 0, 64 * MIB),
            Err(BootError::InitrdTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let m = mem(16 * MIB);
        let mut f = temp_file(&[0x55; 4096]);
        assert!(matches!(
            load_kernel(&m, &mut f),
            Err(BootError::NotAKernel)
        ));
        let mut empty = temp_file(&[]);
        assert!(load_kernel(&m, &mut empty).is_err());
        let mut bad_elf = temp_file(b"\x7fELF\x02\x01\x01\0garbage");
        assert!(matches!(
            load_kernel(&m, &mut bad_elf),
            Err(BootError::InvalidElf(_))
        ));
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let map = memory_map(&ram_regions(5 << 30));
        let initrd = InitrdPlacement {
            address: 0x3000_0000,
            size: 1234,
        };
        let params = zero_page(None, 42, Some(initrd), &map).unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x3000_0000);
        assert_eq!({ hdr.ramdisk_size }, 1234);
        assert_eq!(usize::from(params.e820_entries), map.len());
        let last = params.e820_table[map.len() - 1];
        assert_eq!((last.addr, last.size, last.r#type), (1 << 32, 2 << 30, 1));
    }

    #[test]
    fn pvh_start_info_is_written() {
        let m = mem(64 * MIB);
        let map = memory_map(&ram_regions(64 * MIB));
        let kernel = LoadedKernel {
            format: KernelFormat::ElfPvh,
            entry: 0x100_0040,
            end: 0x110_0000,
            setup_header: None,
        };
        let cmdline = build_cmdline("console=ttyS0", &["extra=1".into()]).unwrap();
        let initrd = InitrdPlacement {
            address: 0x300_0000,
            size: 77,
        };
        let mode = write_boot_info(&m, &kernel, &cmdline, Some(initrd), &map).unwrap();
        assert_eq!(
            mode,
            EntryMode::Pvh {
                entry: 0x100_0040,
                start_info: PVH_INFO_START
            }
        );
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, PVH_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries as usize, map.len());
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 77));
        let first: hvm_memmap_table_entry = m.read_obj(GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!((first.addr, first.type_), (0, 1));
        let mut text = [0u8; 23];
        m.read_slice(&mut text, GuestAddress(info.cmdline_paddr))
            .unwrap();
        assert_eq!(&text, b"console=ttyS0 extra=1\0\0");
    }

    #[test]
    fn cmdline_too_long_is_an_error() {
        let long = "x".repeat(4096);
        assert!(matches!(
            build_cmdline(&long, &[]),
            Err(BootError::Cmdline(_))
        ));
    }
}
