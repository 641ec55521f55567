//! Guest RAM in a snapshot: one file, the regions end to end, written sparse.
//!
//! Pages the guest never touched read as zero; they are not written, so they stay holes in the
//! file and cost no disk (and, mapped back `MAP_PRIVATE` on restore, no memory until used).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress, MmapRegion,
};

/// The unit of "touched": a page.
const PAGE: usize = 4096;
/// How much is copied out of guest RAM at a time.
const CHUNK: usize = 64 * PAGE;

/// One guest RAM region and where it is in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionEntry {
    /// Its guest physical address.
    pub guest_address: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its offset in the memory file.
    pub file_offset: u64,
}

/// What writing the memory file did.
#[derive(Debug)]
pub struct WrittenMemory {
    /// The regions, as a restore maps them.
    pub regions: Vec<MemoryRegionEntry>,
    /// The bytes actually written (non-zero pages).
    pub written: u64,
}

/// Writes every region of `memory` into `file`, skipping zero pages, and sizes the file to the
/// whole of guest RAM.
pub fn write_sparse(memory: &GuestMemoryMmap, file: &File) -> io::Result<WrittenMemory> {
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    let mut buffer = vec![0u8; CHUNK];
    for region in memory.iter() {
        let size = region.len();
        let mut at = 0u64;
        while at < size {
            let n = CHUNK.min((size - at) as usize);
            let chunk = &mut buffer[..n];
            region
                .read_slice(chunk, MemoryRegionAddress(at))
                .map_err(|e| io::Error::other(format!("reading guest RAM: {e}")))?;
            for (index, page) in chunk.chunks(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, offset + at + (index * PAGE) as u64)?;
                    written += page.len() as u64;
                }
            }
            at += n as u64;
        }
        regions.push(MemoryRegionEntry {
            guest_address: region.start_addr().0,
            size,
            file_offset: offset,
        });
        offset += size;
    }
    file.set_len(offset)?;
    file.sync_all()?;
    Ok(WrittenMemory { regions, written })
}

/// Maps the memory file at `path` as guest RAM, `MAP_PRIVATE`: pages are read from the file when
/// the guest first touches them, and what the guest writes stays in this process (the file, and
/// every other VM restored from it, never see it). `regions` comes from the state file, so it is
/// checked against the file and against `expected` (the regions the VM's configuration gives).
pub fn map_private(
    path: &std::path::Path,
    regions: &[MemoryRegionEntry],
    expected: &[(u64, u64)],
) -> io::Result<GuestMemoryMmap> {
    let invalid = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let layout: Vec<(u64, u64)> = regions.iter().map(|r| (r.guest_address, r.size)).collect();
    if layout != expected {
        return Err(invalid(format!(
            "its RAM regions {layout:x?} are not the configuration's {expected:x?}"
        )));
    }
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut mapped = Vec::with_capacity(regions.len());
    for region in regions {
        let end = region.file_offset.checked_add(region.size);
        if end.is_none_or(|end| end > file_len) || region.file_offset % PAGE as u64 != 0 {
            return Err(invalid(format!(
                "the memory file ({file_len} bytes) does not hold the region at {:#x}",
                region.guest_address
            )));
        }
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file.try_clone()?, region.file_offset)),
            region.size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| io::Error::other(format!("mapping the memory file: {e}")))?;
        prefault_data(&file, region.file_offset, mapping.as_ptr(), region.size);
        let guest_region = GuestRegionMmap::new(mapping, GuestAddress(region.guest_address))
            .ok_or_else(|| invalid("a region wraps around the address space".into()))?;
        mapped.push(guest_region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| invalid(format!("{e}")))
}

/// `MADV_POPULATE_READ` (Linux 5.14): map the pages now, as a read fault would.
const MADV_POPULATE_READ: libc::c_int = 22;

/// Maps the pages of the file's data extents (not its holes) into `base`, a private mapping of
/// `len` bytes of `file` from `offset`, before the guest runs. The guest touches most of them
/// at once when it resumes (its kernel, the agent), and one host fault per page then costs more
/// than populating them all here; the holes would only fill the page cache with zeros.
/// Best effort: where the kernel cannot, the pages come on first touch, as they would anyway.
fn prefault_data(file: &File, offset: u64, base: *mut u8, len: u64) {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        // SAFETY: lseek on a descriptor this function borrows; no memory is involved.
        let data = unsafe { libc::lseek(file.as_raw_fd(), at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            return;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        let start = data as u64 & !(PAGE as u64 - 1);
        // SAFETY: [start, hole) lies within [offset, end), so the range is inside the mapping of
        // `len` bytes at `base`; populating reads pages in and changes no contents.
        let done = unsafe {
            libc::madvise(
                base.add((start - offset) as usize).cast(),
                (hole - start) as usize,
                MADV_POPULATE_READ,
            )
        };
        if done != 0 {
            return;
        }
        at = hole;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn only_touched_pages_are_written_at_their_place() {
        let mib = 1u64 << 20;
        let memory = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), mib as usize),
            (GuestAddress(4 * mib), 2 * mib as usize),
        ])
        .unwrap();
        memory.write_obj(0xabu8, GuestAddress(0x1234)).unwrap();
        memory
            .write_slice(&[7u8; 10], GuestAddress(4 * mib + PAGE as u64 * 3))
            .unwrap();
        let path = std::env::temp_dir().join(format!("ember-mem-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let out = write_sparse(&memory, &file).unwrap();
        assert_eq!(out.written, 2 * PAGE as u64);
        assert_eq!(
            out.regions,
            [
                MemoryRegionEntry {
                    guest_address: 0,
                    size: mib,
                    file_offset: 0
                },
                MemoryRegionEntry {
                    guest_address: 4 * mib,
                    size: 2 * mib,
                    file_offset: mib
                },
            ]
        );
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 3 * mib);
        // Two pages of data; the rest are holes (a file system may round up a little).
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes[0x1234], 0xab);
        assert_eq!(&bytes[(mib + 3 * PAGE as u64) as usize..][..10], &[7u8; 10]);
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 11);

        // Mapped back privately: the same bytes, and writes stay in the mapping.
        let layout = [(0, mib), (4 * mib, 2 * mib)];
        let back = map_private(&path, &out.regions, &layout).unwrap();
        assert_eq!(back.read_obj::<u8>(GuestAddress(0x1234)).unwrap(), 0xab);
        back.write_obj(0x55u8, GuestAddress(0x1234)).unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[0x1234], 0xab);
        // A layout other than the configuration's, or a file too short for it, is refused.
        assert!(map_private(&path, &out.regions, &[(0, mib)]).is_err());
        let mut beyond = out.regions.clone();
        beyond[1].file_offset = 2 * mib;
        assert!(map_private(&path, &beyond, &layout).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
