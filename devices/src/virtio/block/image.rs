//! The raw disk image behind a virtio-block device: opening and locking it, and the positioned
//! I/O that moves sectors between it and guest memory.
//!
//! Everything here trusts its caller ([`super::request`]) to have checked the request first:
//! offsets and lengths inside the disk, buffers inside guest memory, the disk writable.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestMemoryBackend, GuestMemoryMmap, ReadVolatile, VolatileMemoryError, VolatileSlice,
    WriteVolatile,
};

use super::request::RequestError;
use super::{BlockError, SECTOR_SIZE, SERIAL_LEN};

/// The backing image and what the guest is told about it.
pub(super) struct Disk {
    /// Open (and locked) for the device's whole life, across guest resets.
    image: File,
    pub(super) path: PathBuf,
    /// In bytes; a multiple of [`SECTOR_SIZE`].
    pub(super) size: u64,
    pub(super) read_only: bool,
    pub(super) serial: [u8; SERIAL_LEN],
    /// What the guest asked of the disk, for the monitor's metrics.
    pub(super) counters: DiskCounters,
}

/// Requests and bytes served, counted as they complete (relaxed: read for metrics only).
#[derive(Default)]
pub(super) struct DiskCounters {
    pub(super) requests: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) read_bytes: AtomicU64,
    pub(super) written_bytes: AtomicU64,
}

impl DiskCounters {
    pub(super) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl Disk {
    /// Opens and locks the image at `path`, and checks its size.
    pub(super) fn open(
        path: PathBuf,
        read_only: bool,
        serial: [u8; SERIAL_LEN],
    ) -> Result<Self, BlockError> {
        let mut image = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        match lock_image(&image, read_only) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                return Err(BlockError::ImageLocked { path })
            }
            Err(source) => return Err(BlockError::Lock { path, source }),
        }
        // Seeking to the end sizes block devices too, whose metadata length is 0. The file
        // position is never used afterwards: all I/O is positioned.
        let size = match image.seek(SeekFrom::End(0)) {
            Ok(size) => size,
            Err(source) => return Err(BlockError::Size { path, source }),
        };
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::SizeNotSectorAligned { path, size });
        }
        Ok(Self {
            image,
            path,
            size,
            read_only,
            serial,
            counters: DiskCounters::default(),
        })
    }

    /// IN: copies the image from `offset` on into the guest's buffers; returns how many bytes.
    pub(super) fn read_into(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buffers: &[Descriptor],
    ) -> Result<u32, RequestError> {
        let mut image = ImageCursor {
            image: &self.image,
            offset,
        };
        let mut copied = 0u32;
        for buffer in buffers {
            for slice in mem.get_slices(buffer.addr(), buffer.len() as usize) {
                let mut slice = slice.map_err(RequestError::GuestMemory)?;
                image
                    .read_exact_volatile(&mut slice)
                    .map_err(RequestError::ImageTransfer)?;
            }
            // Cannot saturate: the chain iterator stops before 4 GiB in total.
            copied = copied.saturating_add(buffer.len());
        }
        Ok(copied)
    }

    /// OUT: copies the guest's buffers into the image from `offset` on.
    pub(super) fn write_from(
        &self,
        mem: &GuestMemoryMmap,
        offset: u64,
        buffers: &[Descriptor],
    ) -> Result<(), RequestError> {
        let mut image = ImageCursor {
            image: &self.image,
            offset,
        };
        for buffer in buffers {
            for slice in mem.get_slices(buffer.addr(), buffer.len() as usize) {
                let slice = slice.map_err(RequestError::GuestMemory)?;
                image
                    .write_all_volatile(&slice)
                    .map_err(RequestError::ImageTransfer)?;
            }
        }
        let written: u64 = buffers.iter().map(|b| u64::from(b.len())).sum();
        DiskCounters::add(&self.counters.written_bytes, written);
        Ok(())
    }

    /// fdatasync: every write completed so far reaches the disk under the image.
    pub(super) fn flush(&self) -> io::Result<()> {
        self.image.sync_data()
    }

    /// Deallocates the range. A discard is only a hint (virtio 1.2, 5.2.6.2: the device MAY
    /// deallocate), so an image that cannot punch holes just keeps its data.
    pub(super) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.image, libc::FALLOC_FL_PUNCH_HOLE, offset, len) {
            Err(e) if is_unsupported(&e) => Ok(()),
            result => result,
        }
    }

    /// Makes the range read as zeros: deallocated if the driver allows unmapping, else
    /// allocated zeros; written by hand where the image cannot do either.
    pub(super) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let modes: &[libc::c_int] = if unmap {
            &[libc::FALLOC_FL_PUNCH_HOLE, libc::FALLOC_FL_ZERO_RANGE]
        } else {
            &[libc::FALLOC_FL_ZERO_RANGE]
        };
        for &mode in modes {
            match fallocate(&self.image, mode, offset, len) {
                Err(e) if is_unsupported(&e) => continue,
                result => return result,
            }
        }
        const CHUNK: u64 = 64 * 1024;
        let zeros = vec![0; CHUNK as usize];
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let n = (end - at).min(CHUNK);
            self.image.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    /// Without a negotiated FLUSH the device is write-through (virtio 1.2, 5.2.6.2): a write
    /// is durable before it completes.
    pub(super) fn write_through(&self, writeback: bool) -> Result<(), RequestError> {
        if writeback {
            return Ok(());
        }
        self.flush().map_err(RequestError::Image)
    }
}

/// `flock`s the image so that no other process opens it writable meanwhile. The lock belongs
/// to this open file description and goes away when the device (and so the file) is dropped.
fn lock_image(image: &File, read_only: bool) -> io::Result<()> {
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock only takes integers; `image` keeps the descriptor open during the call.
    let ret = unsafe { libc::flock(image.as_raw_fd(), mode | libc::LOCK_NB) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// fallocate(2) on the image, keeping its size.
fn fallocate(image: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let invalid = |_| io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(offset).map_err(invalid)?;
    let len = libc::off_t::try_from(len).map_err(invalid)?;
    // SAFETY: fallocate only takes integers; `image` keeps the descriptor open during the call.
    let ret = unsafe {
        libc::fallocate(
            image.as_raw_fd(),
            mode | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether fallocate failed because the filesystem (or the file type) lacks that mode.
fn is_unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENODEV)
    )
}

/// The image from `offset` on, as a source or sink for guest memory. It uses pread/pwrite, so
/// requests never depend on a shared file position (vm-memory's `File` impls use read/write).
struct ImageCursor<'a> {
    image: &'a File,
    offset: u64,
}

impl ImageCursor<'_> {
    fn file_offset(&self) -> Result<libc::off_t, VolatileMemoryError> {
        libc::off_t::try_from(self.offset)
            .map_err(|_| VolatileMemoryError::IOError(io::ErrorKind::InvalidInput.into()))
    }

    /// Moves past the bytes a pread/pwrite returned, or turns its -1 into the error.
    fn advance(&mut self, done: isize) -> Result<usize, VolatileMemoryError> {
        let Ok(done) = usize::try_from(done) else {
            return Err(VolatileMemoryError::IOError(io::Error::last_os_error()));
        };
        self.offset = self.offset.saturating_add(done as u64);
        Ok(done)
    }
}

impl ReadVolatile for ImageCursor<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.file_offset()?;
        let guard = buf.ptr_guard_mut();
        // SAFETY: `guard` points to `buf.len()` bytes of mapped guest memory that the
        // VolatileSlice (built by vm-memory from a checked guest range) lets us write, and pread
        // writes at most that many; `self.image` keeps the descriptor open during the call.
        let done = unsafe {
            libc::pread(
                self.image.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        let done = self.advance(done);
        // Dirty-page tracking (for live migration) must see what the host wrote into the guest;
        // after an error we cannot tell how much, so all of it.
        buf.bitmap()
            .mark_dirty(0, *done.as_ref().unwrap_or(&buf.len()));
        done
    }
}

impl WriteVolatile for ImageCursor<'_> {
    fn write_volatile<B: BitmapSlice>(
        &mut self,
        buf: &VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let offset = self.file_offset()?;
        let guard = buf.ptr_guard();
        // SAFETY: `guard` points to `buf.len()` bytes of mapped guest memory that the
        // VolatileSlice lets us read, and pwrite reads at most that many; `self.image` keeps the
        // descriptor open during the call.
        let done = unsafe {
            libc::pwrite(
                self.image.as_raw_fd(),
                guard.as_ptr().cast(),
                buf.len(),
                offset,
            )
        };
        self.advance(done)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use vmm_sys_util::tempfile::TempFile;

    use super::super::test_driver::*;
    use super::super::{Block, BlockConfig};
    use super::*;
    use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

    #[test]
    fn read_copies_the_image_into_split_buffers() {
        let mem = guest_memory();
        let image = image(16);
        let content = pattern(2048, 3);
        image.as_file().write_all_at(&content, 4 * 512).unwrap();
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        let (len, status) = driver.request(
            VIRTIO_BLK_T_IN,
            4,
            &[writable(DATA, 1536), writable(DATA + 0x4000, 512)],
        );
        assert_eq!((len, status), (2048 + 1, OK));
        assert_eq!(driver.guest_bytes(DATA, 1536), content[..1536]);
        assert_eq!(driver.guest_bytes(DATA + 0x4000, 512), content[1536..]);
        assert!(driver.interrupted());
    }

    #[test]
    fn write_reaches_the_image_and_flush_completes() {
        let mem = guest_memory();
        let image = image(16);
        let mut driver = Driver::with_features(
            &mem,
            open(&image, false, None).unwrap(),
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH,
        );
        let content = pattern(1024, 9);
        assert_eq!(driver.write(3, &content), (1, OK));
        assert_eq!(image_bytes(&image, 3 * 512, 1024), content);
        assert_eq!(image_bytes(&image, 2 * 512, 512), vec![0; 512]);
        assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
        // What was written reads back.
        assert_eq!(driver.read(3, 1024), (1025, OK));
        assert_eq!(driver.guest_bytes(DATA, 1024), content);
    }

    #[test]
    fn discard_frees_blocks_and_reads_as_zeros() {
        let mem = guest_memory();
        let image = image(1024);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        assert_eq!(driver.write(128, &[0x5a; 65536]), (1, OK));
        let allocated = image.as_file().metadata().unwrap().blocks();
        assert!(allocated >= 128, "{allocated} blocks after a 64 KiB write");

        assert_eq!(driver.erase(VIRTIO_BLK_T_DISCARD, 128, 128, 0), OK);
        let after = image.as_file().metadata().unwrap().blocks();
        assert!(after < allocated, "{after} blocks, was {allocated}");
        assert_eq!(image_bytes(&image, 128 * 512, 65536), vec![0; 65536]);
        assert_eq!(driver.read(128, 4096), (4097, OK));
        assert_eq!(driver.guest_bytes(DATA, 4096), vec![0; 4096]);
    }

    #[test]
    fn write_zeroes_zeroes_with_or_without_unmap() {
        let mem = guest_memory();
        let image = image(64);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        assert_eq!(driver.write(0, &[0x77; 64 * 512]), (1, OK));
        assert_eq!(driver.erase(VIRTIO_BLK_T_WRITE_ZEROES, 8, 8, 0), OK);
        assert_eq!(driver.erase(VIRTIO_BLK_T_WRITE_ZEROES, 33, 3, unmap), OK);
        let bytes = image_bytes(&image, 0, 64 * 512);
        for (sector, data) in bytes.chunks(512).enumerate() {
            let zeroed = (8..16).contains(&sector) || (33..36).contains(&sector);
            let expected = if zeroed { 0 } else { 0x77 };
            assert!(data.iter().all(|&b| b == expected), "sector {sector}");
        }
        // Zero sectors is a no-op that succeeds; past the end is an error.
        assert_eq!(driver.erase(VIRTIO_BLK_T_WRITE_ZEROES, 64, 0, 0), OK);
        assert_eq!(driver.erase(VIRTIO_BLK_T_WRITE_ZEROES, 60, 5, 0), IOERR);
        assert_eq!(driver.erase(VIRTIO_BLK_T_DISCARD, 63, 2, 0), IOERR);
        assert_eq!(driver.erase(VIRTIO_BLK_T_DISCARD, u64::MAX, 1, 0), IOERR);
    }

    #[test]
    fn read_only_disk_refuses_to_change() {
        let mem = guest_memory();
        let image = image(8);
        image.as_file().write_all_at(&[0x42; 4096], 0).unwrap();
        let mut driver = Driver::new(&mem, open(&image, true, None).unwrap());
        assert_eq!(driver.write(0, &[0; 512]), (1, IOERR));
        let discard = driver.erase(VIRTIO_BLK_T_DISCARD, 0, 8, 0);
        assert_eq!(discard, IOERR);
        let zeroes = driver.erase(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
        assert_eq!(zeroes, IOERR);
        assert_eq!(image_bytes(&image, 0, 4096), vec![0x42; 4096]);
        assert_eq!(driver.read(0, 512), (513, OK));
        assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
        driver.block.shutdown();
    }

    #[test]
    fn image_size_must_be_whole_sectors() {
        let image = TempFile::new().unwrap();
        image.as_file().set_len(1000).unwrap();
        let error = open(&image, false, None).err().unwrap();
        assert!(
            matches!(error, BlockError::SizeNotSectorAligned { size: 1000, .. }),
            "{error:?}"
        );
        let missing = Block::new(BlockConfig {
            path: "/nonexistent/ember.img".into(),
            read_only: false,
            id: None,
        });
        assert!(matches!(missing, Err(BlockError::Open { .. })));
    }

    #[test]
    fn a_locked_image_cannot_be_opened_again() {
        let image = image(8);
        let first = open(&image, false, None).unwrap();
        let error = open(&image, false, None).err().unwrap();
        assert!(matches!(error, BlockError::ImageLocked { .. }), "{error:?}");
        assert!(error.to_string().contains("in use"));
        assert!(matches!(
            open(&image, true, None),
            Err(BlockError::ImageLocked { .. })
        ));
        drop(first);

        // Readers share; a writer is kept out while any reader is there.
        let reader = open(&image, true, None).unwrap();
        let second_reader = open(&image, true, None).unwrap();
        assert!(matches!(
            open(&image, false, None),
            Err(BlockError::ImageLocked { .. })
        ));
        drop((reader, second_reader));
        open(&image, false, None).unwrap();
    }
}
