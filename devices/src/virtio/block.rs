//! virtio-block (virtio 1.2, 5.2): a raw disk image file as one of the guest's `/dev/vdX`.
//!
//! One request queue, served synchronously on the device event loop with positioned I/O on the
//! image. Everything in a request comes from the guest and may be hostile: descriptor addresses
//! and lengths, directions, sector numbers and segment counts are all checked before any byte
//! moves, guest memory is only reached through vm-memory's checked accessors, and a malformed
//! request completes with an error status instead of stopping the device. Only a queue that
//! cannot be walked at all (a broken avail ring) makes the device [`DeviceBroken`].
//!
//! The image is `flock`ed for as long as the device exists: exclusively when writable, shared when
//! read-only, so two VMs can never write the same image behind each other's back.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::mem::offset_of;
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    Bytes, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, ReadVolatile,
    VolatileMemoryError, VolatileSlice, WriteVolatile,
};

use super::{
    DeviceBroken, Interrupt, Queue, QueueT, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// The virtio device ID of a block device (virtio 1.2, 5).
const DEVICE_TYPE_BLOCK: u32 = 2;
/// One request queue of up to 256 entries.
const QUEUE_MAX_SIZES: [u16; 1] = [256];

/// Sector size of the virtio-block protocol: `sector` fields always count 512-byte units, and the
/// image size must be a whole number of them.
pub const SECTOR_SIZE: u64 = 512;
/// Largest number of data segments in one request. We do not offer indirect descriptors, so a
/// request (header + data + status) must fit in the ring; 126 + 2 fits even a driver that shrinks
/// the queue to 128 entries, and matches the block layer's default of 128 segments.
const SEG_MAX: u32 = 126;
/// Every request chain has at most this many descriptors; anything longer is refused unread.
const MAX_REQUEST_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// Discard and write-zeroes take one segment per request; its 32-bit sector count is the only
/// size limit.
const MAX_DISCARD_SEG: u32 = 1;
const MAX_WRITE_ZEROES_SEG: u32 = 1;
const MAX_DISCARD_SECTORS: u32 = u32::MAX;
const MAX_WRITE_ZEROES_SECTORS: u32 = u32::MAX;
/// Discards are best aligned to 4 KiB, the block size of the host filesystems that punch holes.
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// `struct virtio_blk_outhdr`: type (le32), reserved (le32), sector (le64).
const REQUEST_HEADER_LEN: usize = 16;
/// `struct virtio_blk_discard_write_zeroes`: sector (le64), num_sectors (le32), flags (le32).
const DISCARD_SEGMENT_LEN: usize = 16;
/// The GET_ID answer: the serial, NUL-padded; not NUL-terminated when it is exactly this long.
const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The configuration space ends after write_zeroes_may_unmap and its padding: the secure-erase
/// and zoned fields that follow belong to features this device does not offer.
const CONFIG_SPACE_LEN: usize = offset_of!(virtio_blk_config, max_secure_erase_sectors);

/// What the user asked for: one `--disk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw disk image (a regular file or a block device).
    pub path: PathBuf,
    /// Open the image read-only and tell the guest so (VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// The serial the guest reads with GET_ID (`/dev/disk/by-id/virtio-<id>`); the image's file
    /// name when absent. At most 20 bytes are used.
    pub id: Option<String>,
}

/// Why a disk image cannot back a virtio-block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {} is in use: another ember (or another --disk of this one) holds its lock",
        .path.display()
    )]
    ImageLocked { path: PathBuf },
    #[error("cannot lock disk image {}", .path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot find the size of disk image {}", .path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "disk image {} is {size} bytes, not a whole number of 512-byte sectors",
        .path.display()
    )]
    SizeNotSectorAligned { path: PathBuf, size: u64 },
}

/// A virtio-block device backed by a raw image file.
pub struct Block {
    disk: Disk,
    available_features: u64,
    config_space: [u8; CONFIG_SPACE_LEN],
    /// Present between activation and reset.
    active: Option<ActiveQueue>,
}

/// The backing image and what the guest is told about it.
struct Disk {
    /// Open (and locked) for the device's whole life, across guest resets.
    image: File,
    path: PathBuf,
    /// In bytes; a multiple of [`SECTOR_SIZE`].
    size: u64,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
}

/// What the driver handed over at DRIVER_OK.
struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    /// Whether the driver negotiated VIRTIO_BLK_F_FLUSH. Without it the device must be
    /// write-through (virtio 1.2, 5.2.6.2): every completed write is already durable.
    writeback: bool,
}

impl Block {
    /// Opens and locks the image described by `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let BlockConfig {
            path,
            read_only,
            id,
        } = config;
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
        if !whole_sectors(size) {
            return Err(BlockError::SizeNotSectorAligned { path, size });
        }
        let serial = serial_number(id.as_deref(), &path);
        Ok(Self {
            available_features: available_features(read_only),
            config_space: config_space(size / SECTOR_SIZE),
            disk: Disk {
                image,
                path,
                size,
                read_only,
                serial,
            },
            active: None,
        })
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size / SECTOR_SIZE
    }

    /// The image this device serves.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }
}

/// Whether `bytes` is a whole number of sectors. A mask rather than `u64::is_multiple_of`, which
/// is newer than the workspace's rust-version (1.80).
fn whole_sectors(bytes: u64) -> bool {
    bytes & (SECTOR_SIZE - 1) == 0
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

/// The GET_ID serial: `id`, or else the image's file name, cut to 20 bytes and NUL-padded.
fn serial_number(id: Option<&str>, path: &Path) -> [u8; SERIAL_LEN] {
    let name = match id {
        Some(id) => id.as_bytes(),
        None => path.file_name().unwrap_or(path.as_os_str()).as_bytes(),
    };
    let mut serial = [0; SERIAL_LEN];
    for (slot, byte) in serial.iter_mut().zip(name) {
        *slot = *byte;
    }
    serial
}

fn available_features(read_only: bool) -> u64 {
    let mut bits = vec![
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
    ];
    if read_only {
        bits.push(VIRTIO_BLK_F_RO);
    } else {
        bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
    }
    bits.into_iter()
        .fold(0, |features, bit| features | 1 << bit)
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), little-endian, at the offsets of the Linux
/// UAPI layout. Fields of features not offered (size_max, geometry, topology, wce, num_queues)
/// stay zero.
fn config_space(capacity: u64) -> [u8; CONFIG_SPACE_LEN] {
    let mut space = [0; CONFIG_SPACE_LEN];
    let mut put = |offset: usize, bytes: &[u8]| {
        space[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    let blk_size = SECTOR_SIZE as u32;
    put(
        offset_of!(virtio_blk_config, blk_size),
        &blk_size.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &MAX_DISCARD_SEG.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
    );
    // Write-zeroes with the unmap flag punches holes.
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    space
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn available_features(&self) -> u64 {
        self.available_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only: writeback toggling (VIRTIO_BLK_F_CONFIG_WCE) is not offered.
        log::debug!(
            "virtio-block: ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        let [mut queue] = <[Queue; 1]>::try_from(queues).map_err(|queues| {
            DeviceBroken(format!(
                "virtio-block has one queue, but was given {}",
                queues.len()
            ))
        })?;
        queue.set_event_idx(features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        self.active = Some(ActiveQueue {
            mem,
            queue,
            interrupt,
            writeback: features & (1 << VIRTIO_BLK_F_FLUSH) != 0,
        });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceBroken> {
        if index != 0 {
            return Err(DeviceBroken(format!(
                "virtio-block has one queue; the guest notified queue {index}"
            )));
        }
        match self.active.as_mut() {
            Some(active) => active.process(&self.disk),
            None => {
                log::debug!("virtio-block: queue notified before activation; ignored");
                Ok(())
            }
        }
    }

    fn reset(&mut self) {
        // The image stays open, and so locked: the VM still owns it.
        self.active = None;
    }

    fn shutdown(&mut self) {
        if self.disk.read_only {
            return;
        }
        if let Err(e) = self.disk.image.sync_data() {
            log::error!(
                "virtio-block: cannot flush {} at exit, guest writes may be lost: {e}",
                self.disk.path.display()
            );
        }
    }
}

fn broken(what: &str, error: virtio_queue::Error) -> DeviceBroken {
    DeviceBroken(format!("virtio-block: {what}: {error}"))
}

impl ActiveQueue {
    /// Completes every available request and interrupts the guest if it asked to be told.
    fn process(&mut self, disk: &Disk) -> Result<(), DeviceBroken> {
        if !self.queue.ready() {
            log::debug!("virtio-block: the driver notified a queue it never made ready");
            return Ok(());
        }
        let mut completed = 0;
        let drained = self.drain(disk, &mut completed);
        // Requests completed before the queue broke still deserve their interrupt.
        if completed > 0 {
            match self.queue.needs_notification(&self.mem) {
                Ok(true) => self.interrupt.signal_used_queue(),
                Ok(false) => {}
                Err(e) => return drained.and(Err(broken("cannot read used_event", e))),
            }
        }
        drained
    }

    /// Serves requests until the avail ring is empty with notifications re-enabled, so that a
    /// request the driver adds while notifications are off is never missed.
    fn drain(&mut self, disk: &Disk, completed: &mut usize) -> Result<(), DeviceBroken> {
        loop {
            self.queue
                .disable_notification(&self.mem)
                .map_err(|e| broken("cannot disable notifications", e))?;
            while self.complete_next(disk)? {
                *completed += 1;
            }
            let more = self
                .queue
                .enable_notification(&self.mem)
                .map_err(|e| broken("cannot enable notifications", e))?;
            if !more {
                return Ok(());
            }
        }
    }

    /// Serves one available request; false when there is none.
    fn complete_next(&mut self, disk: &Disk) -> Result<bool, DeviceBroken> {
        let avail_idx = self
            .queue
            .avail_idx(&self.mem, Ordering::Acquire)
            .map_err(|e| broken("cannot read the avail ring index", e))?;
        let next_avail = Wrapping(self.queue.next_avail());
        if avail_idx == next_avail {
            return Ok(false);
        }
        // The driver can only be ahead by at most a ring's worth of entries (virtio 1.2, 2.7.6).
        let pending = (avail_idx - next_avail).0;
        if pending > self.queue.size() {
            return Err(DeviceBroken(format!(
                "virtio-block: the avail ring index is {pending} entries ahead, in a queue of {}",
                self.queue.size()
            )));
        }
        let Some(chain) = self.queue.pop_descriptor_chain(&self.mem) else {
            return Err(DeviceBroken(
                "virtio-block: cannot read the avail ring".to_string(),
            ));
        };
        let head = chain.head_index();
        let used_len = disk.serve(&self.mem, chain, self.writeback);
        // Fails when the head index is outside the queue: such a chain cannot be returned, and
        // the driver would wait for it forever.
        self.queue
            .add_used(&self.mem, head, used_len)
            .map_err(|e| broken(&format!("cannot return descriptor chain {head}"), e))?;
        Ok(true)
    }
}

/// Why one request fails; the guest sees only the status byte.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("chain of {0} descriptors, more than seg_max allows")]
    ChainTooLong(usize),
    #[error("no request header")]
    MissingHeader,
    #[error("header descriptor of {len} bytes (device-writable: {writable})")]
    BadHeader { len: u32, writable: bool },
    #[error("{0} data segments, more than seg_max")]
    TooManySegments(usize),
    #[error("a data descriptor has the wrong direction for this request")]
    DataDirection,
    #[error("a data buffer at {addr:#x} of {len} bytes is outside guest memory")]
    DataOutsideMemory { addr: u64, len: u32 },
    #[error("data length {0} is not a whole number of sectors")]
    UnalignedLength(u64),
    #[error("{len} bytes at sector {sector} fall outside the disk")]
    OutOfRange { sector: u64, len: u64 },
    #[error("the request needs a data buffer")]
    MissingData,
    #[error("{0} bytes of discard/write-zeroes segments (one 16-byte segment is allowed)")]
    BadSegments(u64),
    #[error("discard/write-zeroes flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("the disk is read-only")]
    ReadOnly,
    #[error("request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("cannot access guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("image I/O failed")]
    ImageTransfer(#[source] VolatileMemoryError),
    #[error("image I/O failed")]
    Image(#[source] io::Error),
}

impl RequestError {
    /// The status byte the guest gets (virtio 1.2, 5.2.6).
    fn status(&self) -> u8 {
        let status = match self {
            Self::UnsupportedType(_) | Self::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }

    /// Errors of the host, worth a warning; the others are the guest's own doing, and a guest
    /// could flood the log with them.
    fn is_host_failure(&self) -> bool {
        matches!(self, Self::ImageTransfer(_) | Self::Image(_))
    }
}

/// What a discard or write-zeroes request asks of the image.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Erase {
    Discard,
    WriteZeroes,
}

impl Disk {
    /// Serves one request chain; returns the used length (bytes written into the chain).
    ///
    /// The chain must end with a device-writable status byte in guest memory; without one the
    /// guest cannot be told anything, so the request is not executed and returns with length 0.
    fn serve(
        &self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        writeback: bool,
    ) -> u32 {
        let head = chain.head_index();
        let mut descriptors = Vec::with_capacity(4);
        let mut count = 0usize;
        let mut last = None;
        // The iterator ends after at most a queue's (or an indirect table's) worth of
        // descriptors, so a looping chain cannot hold us here.
        for descriptor in chain {
            if descriptors.len() < MAX_REQUEST_DESCRIPTORS {
                descriptors.push(descriptor);
            }
            count += 1;
            last = Some(descriptor);
        }
        let Some(status) = last.filter(|status| {
            status.is_write_only() && status.len() >= 1 && mem.address_in_range(status.addr())
        }) else {
            log::debug!("virtio-block: request {head} has no writable status byte; dropped");
            return 0;
        };
        let outcome = match descriptors.get(..count - 1) {
            Some(body) if count <= MAX_REQUEST_DESCRIPTORS => self.execute(mem, body, writeback),
            _ => Err(RequestError::ChainTooLong(count)),
        };
        let (status_byte, data_len) = match outcome {
            Ok(data_len) => (VIRTIO_BLK_S_OK as u8, data_len),
            Err(e) => {
                if e.is_host_failure() {
                    log::warn!("virtio-block: {}: {e}", self.path.display());
                } else {
                    log::debug!("virtio-block: request {head} refused: {e}");
                }
                // Whatever was already copied is not reported: a device may write more than
                // the used length says (virtio 1.2, 2.7.8.2).
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(status_byte, status.addr()) {
            log::debug!("virtio-block: cannot write the status of request {head}: {e}");
            return 0;
        }
        data_len.saturating_add(1)
    }

    /// Executes a request given its descriptors without the status one; returns how many bytes
    /// it wrote into guest buffers.
    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        body: &[Descriptor],
        writeback: bool,
    ) -> Result<u32, RequestError> {
        let (header, data) = body.split_first().ok_or(RequestError::MissingHeader)?;
        if header.is_write_only() || (header.len() as usize) < REQUEST_HEADER_LEN {
            return Err(RequestError::BadHeader {
                len: header.len(),
                writable: header.is_write_only(),
            });
        }
        let mut raw = [0; REQUEST_HEADER_LEN];
        mem.read_slice(&mut raw, header.addr())
            .map_err(RequestError::GuestMemory)?;
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        match request_type {
            VIRTIO_BLK_T_IN => self.read(mem, sector, data),
            VIRTIO_BLK_T_OUT => self.write(mem, sector, data, writeback).map(|()| 0),
            // Writes are durable once they reach the disk under the image: fdatasync, and only
            // then the completion.
            VIRTIO_BLK_T_FLUSH => self
                .image
                .sync_data()
                .map_err(RequestError::Image)
                .map(|()| 0),
            VIRTIO_BLK_T_GET_ID => self.get_id(mem, data),
            VIRTIO_BLK_T_DISCARD => self.erase(mem, data, Erase::Discard, writeback).map(|()| 0),
            VIRTIO_BLK_T_WRITE_ZEROES => self
                .erase(mem, data, Erase::WriteZeroes, writeback)
                .map(|()| 0),
            other => Err(RequestError::UnsupportedType(other)),
        }
    }

    /// IN: copies sectors from the image into the guest's buffers.
    fn read(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Descriptor],
    ) -> Result<u32, RequestError> {
        let mut image = ImageCursor {
            image: &self.image,
            offset: self.data_extent(mem, sector, data, true)?,
        };
        let mut copied = 0u32;
        for buffer in data {
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

    /// OUT: copies the guest's buffers into the image.
    fn write(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Descriptor],
        writeback: bool,
    ) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let mut image = ImageCursor {
            image: &self.image,
            offset: self.data_extent(mem, sector, data, false)?,
        };
        for buffer in data {
            for slice in mem.get_slices(buffer.addr(), buffer.len() as usize) {
                let slice = slice.map_err(RequestError::GuestMemory)?;
                image
                    .write_all_volatile(&slice)
                    .map_err(RequestError::ImageTransfer)?;
            }
        }
        self.write_through(writeback)
    }

    /// Checks the data buffers of an IN (`device_writes`) or OUT request and returns the image
    /// offset they start at. Nothing is copied unless the whole request is valid.
    fn data_extent(
        &self,
        mem: &GuestMemoryMmap,
        sector: u64,
        data: &[Descriptor],
        device_writes: bool,
    ) -> Result<u64, RequestError> {
        if data.len() > SEG_MAX as usize {
            return Err(RequestError::TooManySegments(data.len()));
        }
        let mut len = 0u64;
        for buffer in data {
            if buffer.is_write_only() != device_writes {
                return Err(RequestError::DataDirection);
            }
            if !mem.check_range(buffer.addr(), buffer.len() as usize) {
                return Err(RequestError::DataOutsideMemory {
                    addr: buffer.addr().0,
                    len: buffer.len(),
                });
            }
            // At most SEG_MAX u32 lengths: no overflow.
            len += u64::from(buffer.len());
        }
        if !whole_sectors(len) {
            return Err(RequestError::UnalignedLength(len));
        }
        self.byte_offset(sector, len)
    }

    /// The image offset of `len` bytes at `sector`, if they are all inside the disk.
    fn byte_offset(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        sector
            .checked_mul(SECTOR_SIZE)
            .filter(|offset| offset.checked_add(len).is_some_and(|end| end <= self.size))
            .ok_or(RequestError::OutOfRange { sector, len })
    }

    /// GET_ID: the serial into the guest's buffers, as much of it as they hold.
    fn get_id(&self, mem: &GuestMemoryMmap, data: &[Descriptor]) -> Result<u32, RequestError> {
        if data.is_empty() {
            return Err(RequestError::MissingData);
        }
        if data.iter().any(|buffer| !buffer.is_write_only()) {
            return Err(RequestError::DataDirection);
        }
        let mut serial = &self.serial[..];
        for buffer in data {
            let (part, rest) = serial.split_at(serial.len().min(buffer.len() as usize));
            mem.write_slice(part, buffer.addr())
                .map_err(RequestError::GuestMemory)?;
            serial = rest;
        }
        // At most SERIAL_LEN.
        Ok((SERIAL_LEN - serial.len()) as u32)
    }

    /// DISCARD and WRITE_ZEROES: one segment, whose sectors afterwards read as zeros.
    fn erase(
        &self,
        mem: &GuestMemoryMmap,
        data: &[Descriptor],
        request: Erase,
        writeback: bool,
    ) -> Result<(), RequestError> {
        if self.read_only {
            return Err(RequestError::ReadOnly);
        }
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] =
            read_segment(mem, data)?;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        // Virtio 1.2, 5.2.6.2: unknown flags, and the unmap flag on a discard, are UNSUPP.
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (request == Erase::Discard && unmap)
        {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        // A u32 count of sectors is below 2^41 bytes: no overflow.
        let len = u64::from(num_sectors) * SECTOR_SIZE;
        let offset = self.byte_offset(sector, len)?;
        if len == 0 {
            return Ok(());
        }
        match request {
            Erase::Discard => self.discard(offset, len),
            Erase::WriteZeroes => self.write_zeroes(offset, len, unmap),
        }
        .map_err(RequestError::Image)?;
        self.write_through(writeback)
    }

    /// Deallocates the range. A discard is only a hint (virtio 1.2, 5.2.6.2: the device MAY
    /// deallocate), so an image that cannot punch holes just keeps its data.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match fallocate(&self.image, libc::FALLOC_FL_PUNCH_HOLE, offset, len) {
            Err(e) if is_unsupported(&e) => Ok(()),
            result => result,
        }
    }

    /// Makes the range read as zeros: deallocated if the driver allows unmapping, else
    /// allocated zeros; written by hand where the image cannot do either.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
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
    fn write_through(&self, writeback: bool) -> Result<(), RequestError> {
        if writeback {
            return Ok(());
        }
        self.image.sync_data().map_err(RequestError::Image)
    }
}

/// Reads the one `virtio_blk_discard_write_zeroes` segment of a discard or write-zeroes
/// request, which may be split over several device-readable buffers.
fn read_segment(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
) -> Result<[u8; DISCARD_SEGMENT_LEN], RequestError> {
    if data.iter().any(Descriptor::is_write_only) {
        return Err(RequestError::DataDirection);
    }
    let len: u64 = data.iter().map(|buffer| u64::from(buffer.len())).sum();
    // Exactly max_discard_seg (= max_write_zeroes_seg = 1) segment.
    if len != DISCARD_SEGMENT_LEN as u64 {
        return Err(RequestError::BadSegments(len));
    }
    let mut segment = [0; DISCARD_SEGMENT_LEN];
    let mut filled = 0;
    for buffer in data {
        // `len` above bounds the buffers to the segment's size in total.
        let part = (buffer.len() as usize).min(DISCARD_SEGMENT_LEN - filled);
        mem.read_slice(&mut segment[filled..filled + part], buffer.addr())
            .map_err(RequestError::GuestMemory)?;
        filled += part;
    }
    Ok(segment)
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

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    const MEM_SIZE: usize = 1 << 20;
    const QUEUE_SIZE: u16 = 256;
    // A split virtqueue laid out by hand (virtio 1.2, 2.7).
    const DESC_TABLE: u64 = 0x1000;
    const AVAIL_RING: u64 = 0x2000;
    const USED_RING: u64 = 0x3000;
    const USED_EVENT: u64 = AVAIL_RING + 4 + 2 * QUEUE_SIZE as u64;
    const HEADER: u64 = 0x8000;
    const STATUS: u64 = 0x9000;
    const SEGMENT: u64 = 0xa000;
    const DATA: u64 = 0x10000;

    const NO_STATUS: u8 = 0xee;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    /// A descriptor as the driver writes it: (guest address, length, device-writable).
    type Buf = (u64, u32, bool);

    fn readable(addr: u64, len: u32) -> Buf {
        (addr, len, false)
    }

    fn writable(addr: u64, len: u32) -> Buf {
        (addr, len, true)
    }

    fn image(sectors: u64) -> TempFile {
        let image = TempFile::new().unwrap();
        image.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
        image
    }

    fn open(image: &TempFile, read_only: bool, id: Option<&str>) -> Result<Block, BlockError> {
        Block::new(BlockConfig {
            path: image.as_path().to_path_buf(),
            read_only,
            id: id.map(str::to_string),
        })
    }

    fn image_bytes(image: &TempFile, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        image.as_file().read_exact_at(&mut bytes, offset).unwrap();
        bytes
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    /// Plays the guest driver: owns guest memory and the rings, and drives the device.
    struct Driver {
        mem: GuestMemoryMmap,
        block: Block,
        irq: EventFd,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Driver {
        fn new(block: Block) -> Self {
            Self::with_features(block, 1 << VIRTIO_F_VERSION_1)
        }

        fn with_features(block: Block, features: u64) -> Self {
            let mut driver = Driver {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
                block,
                irq: EventFd::new(EFD_NONBLOCK).unwrap(),
                next_desc: 0,
                avail_idx: 0,
            };
            driver.activate(features);
            driver
        }

        /// Sets up fresh rings and hands them to the device, as after a reset.
        fn activate(&mut self, features: u64) {
            self.mem
                .write_slice(&[0; 0x1000], GuestAddress(AVAIL_RING))
                .unwrap();
            self.mem
                .write_slice(&[0; 0x1000], GuestAddress(USED_RING))
                .unwrap();
            self.next_desc = 0;
            self.avail_idx = 0;
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.set_size(QUEUE_SIZE);
            queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
            queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
            queue.set_ready(true);
            let interrupt = Arc::new(Interrupt::new(self.irq.try_clone().unwrap()));
            self.block
                .activate(self.mem.clone(), features, vec![queue], interrupt)
                .unwrap();
        }

        /// Writes `chain` into the descriptor table; returns its head.
        fn write_chain(&mut self, chain: &[Buf]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, device_writes)) in chain.iter().enumerate() {
                let index = self.next_desc;
                let next = (index + 1) % QUEUE_SIZE;
                let mut flags = 0;
                if device_writes {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if i + 1 < chain.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                self.write_descriptor(index, Descriptor::new(addr, len, flags, next));
                self.next_desc = next;
            }
            head
        }

        fn write_descriptor(&self, index: u16, descriptor: Descriptor) {
            let addr = DESC_TABLE + 16 * u64::from(index);
            self.mem.write_obj(descriptor, GuestAddress(addr)).unwrap();
        }

        /// Puts a chain head in the avail ring and publishes it.
        fn offer(&mut self, head: u16) {
            let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.set_avail_idx(self.avail_idx);
        }

        fn set_avail_idx(&self, idx: u16) {
            self.mem
                .write_obj(idx, GuestAddress(AVAIL_RING + 2))
                .unwrap();
        }

        fn push(&mut self, chain: &[Buf]) -> u16 {
            let head = self.write_chain(chain);
            self.offer(head);
            head
        }

        fn process(&mut self) {
            self.block.process_queue(0).unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
        }

        /// The used element `n` (id, len).
        fn used(&self, n: u16) -> (u32, u32) {
            let elem = USED_RING + 4 + 8 * u64::from(n % QUEUE_SIZE);
            let id = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            (id, len)
        }

        fn interrupted(&self) -> bool {
            self.irq.read().is_ok()
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS)).unwrap()
        }

        fn write_header(&self, request_type: u32, sector: u64) {
            let mut header = [0; 16];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
        }

        /// Submits `chain` alone and returns (used len, status byte); checks it came back.
        fn submit(&mut self, chain: &[Buf]) -> (u32, u8) {
            self.mem.write_obj(NO_STATUS, GuestAddress(STATUS)).unwrap();
            let before = self.used_idx();
            let head = self.push(chain);
            self.process();
            assert_eq!(self.used_idx(), before.wrapping_add(1));
            let (id, len) = self.used(before);
            assert_eq!(id, u32::from(head));
            (len, self.status())
        }

        /// A well-framed request: header, `data`, status.
        fn request(&mut self, request_type: u32, sector: u64, data: &[Buf]) -> (u32, u8) {
            self.write_header(request_type, sector);
            let mut chain = vec![readable(HEADER, 16)];
            chain.extend_from_slice(data);
            chain.push(writable(STATUS, 1));
            self.submit(&chain)
        }

        fn read(&mut self, sector: u64, len: u32) -> (u32, u8) {
            self.request(VIRTIO_BLK_T_IN, sector, &[writable(DATA, len)])
        }

        fn write(&mut self, sector: u64, bytes: &[u8]) -> (u32, u8) {
            self.mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
            self.request(
                VIRTIO_BLK_T_OUT,
                sector,
                &[readable(DATA, bytes.len() as u32)],
            )
        }

        fn erase(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
            let mut segment = [0; 16];
            segment[..8].copy_from_slice(&sector.to_le_bytes());
            segment[8..12].copy_from_slice(&sectors.to_le_bytes());
            segment[12..].copy_from_slice(&flags.to_le_bytes());
            self.mem
                .write_slice(&segment, GuestAddress(SEGMENT))
                .unwrap();
            let (len, status) = self.request(request_type, 0, &[readable(SEGMENT, 16)]);
            assert_eq!(len, 1);
            status
        }

        fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0; len];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            bytes
        }
    }

    fn config_u32(block: &Block, offset: usize) -> u32 {
        let mut bytes = [0; 4];
        block.read_config(offset as u64, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    #[test]
    fn writable_disk_offers_discard_and_write_zeroes() {
        let image = image(64);
        let block = open(&image, false, None).unwrap();
        let features = block.available_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(block.device_type(), 2);
        assert_eq!(block.queue_max_sizes(), &[256]);
        assert_eq!(block.capacity(), 64);
    }

    #[test]
    fn read_only_disk_offers_ro_but_no_discard() {
        let image = image(8);
        let block = open(&image, true, None).unwrap();
        let features = block.available_features();
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_ne!(features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    }

    #[test]
    fn config_space_follows_the_spec_layout() {
        let image = image(0x1_0000_0001);
        let mut block = open(&image, false, None).unwrap();
        let mut capacity = [0; 8];
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 0x1_0000_0001);
        // Virtio 1.2, 5.2.4 offsets.
        assert_eq!(config_u32(&block, 8), 0, "size_max");
        assert_eq!(config_u32(&block, 12), SEG_MAX, "seg_max");
        assert_eq!(config_u32(&block, 16), 0, "geometry");
        assert_eq!(config_u32(&block, 20), 512, "blk_size");
        assert_eq!(config_u32(&block, 36), u32::MAX, "max_discard_sectors");
        assert_eq!(config_u32(&block, 40), 1, "max_discard_seg");
        assert_eq!(config_u32(&block, 44), 8, "discard_sector_alignment");
        assert_eq!(config_u32(&block, 48), u32::MAX, "max_write_zeroes_sectors");
        assert_eq!(config_u32(&block, 52), 1, "max_write_zeroes_seg");
        let mut may_unmap = [0xff];
        block.read_config(56, &mut may_unmap);
        assert_eq!(may_unmap, [1]);

        // Past the end reads zeros, a read straddling the end gets zeros for the missing part.
        let mut tail = [0xff; 8];
        block.read_config(CONFIG_SPACE_LEN as u64 - 4, &mut tail);
        assert_eq!(tail, [1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(config_u32(&block, 0x1000), 0);
        let mut far = [0xff; 4];
        block.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        let mut straddle = [0xff; 8];
        block.read_config(52, &mut straddle);
        assert_eq!(straddle, [1, 0, 0, 0, 1, 0, 0, 0]);

        // Writes are ignored.
        block.write_config(0, &[0xff; 8]);
        block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 0x1_0000_0001);
    }

    #[test]
    fn read_copies_the_image_into_split_buffers() {
        let image = image(16);
        let content = pattern(2048, 3);
        image.as_file().write_all_at(&content, 4 * 512).unwrap();
        let mut driver = Driver::new(open(&image, false, None).unwrap());
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
    fn the_last_sector_is_readable_and_the_next_is_not() {
        let image = image(16);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        assert_eq!(driver.read(15, 512), (513, OK));
        assert_eq!(driver.read(15, 1024), (1, IOERR));
        assert_eq!(driver.read(16, 512), (1, IOERR));
        assert_eq!(driver.read(16, 0), (1, OK));
        assert_eq!(driver.read(u64::MAX, 512), (1, IOERR));
        // sector * 512 overflows u64.
        assert_eq!(driver.read(u64::MAX / 256, 512), (1, IOERR));
        assert_eq!(driver.write(1 << 55, &[1; 512]), (1, IOERR));
    }

    #[test]
    fn write_reaches_the_image_and_flush_completes() {
        let image = image(16);
        let mut driver = Driver::with_features(
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
    fn get_id_answers_the_configured_id() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, Some("data-disk")).unwrap());
        let (len, status) = driver.request(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 20)]);
        assert_eq!((len, status), (21, OK));
        let mut expected = b"data-disk".to_vec();
        expected.resize(20, 0);
        assert_eq!(driver.guest_bytes(DATA, 20), expected);

        // A buffer shorter than 20 bytes gets what fits, and nothing beyond it.
        driver
            .mem
            .write_slice(&[0xaa; 32], GuestAddress(DATA))
            .unwrap();
        let (len, status) = driver.request(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 4)]);
        assert_eq!((len, status), (5, OK));
        assert_eq!(driver.guest_bytes(DATA, 5), b"data\xaa");
    }

    #[test]
    fn get_id_defaults_to_the_file_name_cut_to_20_bytes() {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("a-rather-long-image-name.img");
        File::create(&path).unwrap().set_len(4096).unwrap();
        let block = Block::new(BlockConfig {
            path,
            read_only: true,
            id: None,
        })
        .unwrap();
        let mut driver = Driver::new(block);
        let (len, status) = driver.request(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 64)]);
        assert_eq!((len, status), (21, OK));
        assert_eq!(driver.guest_bytes(DATA, 20), b"a-rather-long-image-");
        let long = "x".repeat(40);
        assert_eq!(serial_number(Some(&long), Path::new("/d.img")), [b'x'; 20]);
    }

    #[test]
    fn discard_frees_blocks_and_reads_as_zeros() {
        let image = image(1024);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
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
        let image = image(64);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
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
    fn erase_flags_the_spec_forbids_are_unsupported() {
        let image = image(64);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        assert_eq!(driver.write(0, &[0x77; 512]), (1, OK));
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        assert_eq!(driver.erase(VIRTIO_BLK_T_DISCARD, 0, 1, unmap), UNSUPP);
        assert_eq!(driver.erase(VIRTIO_BLK_T_WRITE_ZEROES, 0, 1, 2), UNSUPP);
        assert_eq!(
            driver.erase(VIRTIO_BLK_T_DISCARD, 0, 1, 0x8000_0000),
            UNSUPP
        );
        assert_eq!(image_bytes(&image, 0, 512), vec![0x77; 512]);
    }

    #[test]
    fn erase_segments_must_be_exactly_one() {
        let image = image(64);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        assert_eq!(driver.write(0, &[0x77; 512]), (1, OK));
        let mut segment = [0; 16];
        segment[8] = 1; // sector 0, one sector
        driver
            .mem
            .write_slice(&segment, GuestAddress(SEGMENT))
            .unwrap();
        driver
            .mem
            .write_slice(&segment, GuestAddress(SEGMENT + 16))
            .unwrap();
        for data in [
            vec![readable(SEGMENT, 32)],                             // two segments
            vec![readable(SEGMENT, 8)],                              // half a segment
            vec![],                                                  // none
            vec![writable(SEGMENT, 16)],                             // wrong direction
            vec![readable(MEM_SIZE as u64 - 8, 16)],                 // outside memory
            vec![readable(SEGMENT, 16), readable(SEGMENT + 16, 16)], // two in two buffers
        ] {
            for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
                let result = driver.request(request_type, 0, &data);
                assert_eq!(result, (1, IOERR), "{request_type} {data:?}");
            }
        }
        assert_eq!(image_bytes(&image, 0, 512), vec![0x77; 512]);
        // One segment split over two buffers is fine.
        let split = [readable(SEGMENT, 5), readable(SEGMENT + 5, 11)];
        assert_eq!(driver.request(VIRTIO_BLK_T_DISCARD, 0, &split), (1, OK));
        assert_eq!(image_bytes(&image, 0, 512), vec![0; 512]);
    }

    #[test]
    fn unknown_request_types_are_unsupported() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        for request_type in [2, 3, 14, 15, 0x8000_0000, u32::MAX] {
            let result = driver.request(request_type, 0, &[writable(DATA, 512)]);
            assert_eq!(result, (1, UNSUPP), "type {request_type}");
        }
    }

    #[test]
    fn read_only_disk_refuses_to_change() {
        let image = image(8);
        image.as_file().write_all_at(&[0x42; 4096], 0).unwrap();
        let mut driver = Driver::new(open(&image, true, None).unwrap());
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

    #[test]
    fn reset_then_reactivate_serves_again() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        assert_eq!(driver.write(1, &[9; 512]), (1, OK));
        driver.block.reset();
        // After a reset, a notification does nothing.
        driver.push(&[readable(HEADER, 16), writable(STATUS, 1)]);
        driver.process();
        assert_eq!(driver.used_idx(), 1);
        // The image stays locked across the reset.
        assert!(matches!(
            open(&image, false, None),
            Err(BlockError::ImageLocked { .. })
        ));
        driver.activate(1 << VIRTIO_F_VERSION_1);
        assert_eq!(driver.read(1, 512), (513, OK));
        assert_eq!(driver.guest_bytes(DATA, 512), vec![9; 512]);
        assert_eq!(driver.used_idx(), 1);
    }

    #[test]
    fn several_requests_complete_with_one_interrupt() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        driver.write_header(VIRTIO_BLK_T_IN, 0);
        let heads: Vec<u16> = (0..3)
            .map(|i| {
                driver.push(&[
                    readable(HEADER, 16),
                    writable(DATA + i * 512, 512),
                    writable(STATUS + i, 1),
                ])
            })
            .collect();
        driver.process();
        assert_eq!(driver.used_idx(), 3);
        for (n, head) in heads.into_iter().enumerate() {
            assert_eq!(driver.used(n as u16), (u32::from(head), 513));
        }
        assert_eq!(driver.irq.read().unwrap(), 1);
        // Nothing new: no interrupt.
        driver.process();
        assert!(!driver.interrupted());
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks() {
        let image = image(8);
        let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        let mut driver = Driver::with_features(open(&image, false, None).unwrap(), features);
        // used_event = 1: interrupt when the used index passes 1, i.e. at the second request.
        driver
            .mem
            .write_obj(1u16, GuestAddress(USED_EVENT))
            .unwrap();
        assert_eq!(driver.read(0, 512), (513, OK));
        assert!(!driver.interrupted());
        assert_eq!(driver.read(0, 512), (513, OK));
        assert!(driver.interrupted());
        assert_eq!(driver.read(0, 512), (513, OK));
        assert!(!driver.interrupted());
        // The device asks to be notified at the next avail entry (avail_event).
        let avail_event: u16 = driver
            .mem
            .read_obj(GuestAddress(USED_RING + 4 + 8 * u64::from(QUEUE_SIZE)))
            .unwrap();
        assert_eq!(avail_event, 3);
    }

    #[test]
    fn malformed_headers_are_io_errors() {
        let image = image(8);
        image.as_file().write_all_at(&[0x42; 512], 0).unwrap();
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        driver.write_header(VIRTIO_BLK_T_IN, 0);
        let status = writable(STATUS, 1);
        let data = writable(DATA, 512);
        for chain in [
            vec![writable(HEADER, 16), data, status], // header device-writable
            vec![readable(HEADER, 15), data, status], // header too short
            vec![readable(MEM_SIZE as u64 - 8, 16), data, status], // header beyond RAM
            vec![readable(u64::MAX - 7, 16), data, status], // header address wraps
            vec![status],                             // no header at all
        ] {
            assert_eq!(driver.submit(&chain), (1, IOERR), "{chain:?}");
        }
        assert_eq!(driver.guest_bytes(DATA, 512), vec![0; 512]);
    }

    #[test]
    fn malformed_data_buffers_are_io_errors() {
        let image = image(8);
        image.as_file().write_all_at(&[0x42; 4096], 0).unwrap();
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        for (request_type, data) in [
            // IN into a device-readable buffer, OUT from a device-writable one.
            (VIRTIO_BLK_T_IN, vec![readable(DATA, 512)]),
            (
                VIRTIO_BLK_T_IN,
                vec![writable(DATA, 512), readable(DATA + 512, 512)],
            ),
            (VIRTIO_BLK_T_OUT, vec![writable(DATA, 512)]),
            // Not whole sectors.
            (VIRTIO_BLK_T_IN, vec![writable(DATA, 511)]),
            (VIRTIO_BLK_T_OUT, vec![readable(DATA, 513)]),
            (
                VIRTIO_BLK_T_IN,
                vec![writable(DATA, 256), writable(DATA + 512, 512)],
            ),
            // Outside guest memory, straddling its end, wrapping around the address space.
            (VIRTIO_BLK_T_IN, vec![writable(MEM_SIZE as u64, 512)]),
            (VIRTIO_BLK_T_IN, vec![writable(MEM_SIZE as u64 - 256, 512)]),
            (VIRTIO_BLK_T_OUT, vec![readable(MEM_SIZE as u64 - 256, 512)]),
            (VIRTIO_BLK_T_IN, vec![writable(u64::MAX - 255, 512)]),
            (VIRTIO_BLK_T_OUT, vec![readable(1 << 40, u32::MAX - 511)]),
            // GET_ID with nowhere to write, or into a device-readable buffer.
            (VIRTIO_BLK_T_GET_ID, vec![]),
            (VIRTIO_BLK_T_GET_ID, vec![readable(DATA, 20)]),
        ] {
            let result = driver.request(request_type, 0, &data);
            assert_eq!(result, (1, IOERR), "type {request_type} {data:?}");
        }
        assert_eq!(image_bytes(&image, 0, 4096), vec![0x42; 4096]);
        assert_eq!(driver.guest_bytes(DATA, 1024), vec![0; 1024]);
        let tail = driver.guest_bytes(MEM_SIZE as u64 - 256, 256);
        assert_eq!(tail, vec![0; 256]);
    }

    #[test]
    fn requests_without_a_status_byte_return_unanswered() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        driver.write_header(VIRTIO_BLK_T_OUT, 0);
        driver
            .mem
            .write_slice(&[0x33; 512], GuestAddress(DATA))
            .unwrap();
        let header = readable(HEADER, 16);
        let data = readable(DATA, 512);
        for chain in [
            vec![header, data, readable(STATUS, 1)], // status device-readable
            vec![header, data, writable(STATUS, 0)], // status of length 0
            vec![header, data, writable(MEM_SIZE as u64, 1)], // status beyond RAM
            vec![header, data],                      // no status descriptor
            vec![header],
        ] {
            let (len, status) = driver.submit(&chain);
            assert_eq!((len, status), (0, NO_STATUS), "{chain:?}");
        }
        // None of those writes was executed.
        assert_eq!(image_bytes(&image, 0, 512), vec![0; 512]);
        assert!(driver.interrupted());
    }

    #[test]
    fn more_than_seg_max_segments_is_an_io_error() {
        let image = image(256);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        let segments = |count: u64| -> Vec<Buf> {
            (0..count).map(|i| writable(DATA + i * 512, 512)).collect()
        };
        let at_limit = driver.request(VIRTIO_BLK_T_IN, 0, &segments(u64::from(SEG_MAX)));
        assert_eq!(at_limit, (SEG_MAX * 512 + 1, OK));
        let over = driver.request(VIRTIO_BLK_T_IN, 0, &segments(u64::from(SEG_MAX) + 1));
        assert_eq!(over, (1, IOERR));
        let way_over = driver.request(VIRTIO_BLK_T_IN, 0, &segments(250));
        assert_eq!(way_over, (1, IOERR));
    }

    #[test]
    fn looping_chains_end() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        // A descriptor that is its own successor: the walk stops after a queue's worth.
        driver
            .mem
            .write_obj(NO_STATUS, GuestAddress(STATUS))
            .unwrap();
        driver.write_descriptor(7, Descriptor::new(STATUS, 1, next | write, 7));
        driver.offer(7);
        // Two descriptors pointing at each other, the header readable.
        driver.write_header(VIRTIO_BLK_T_IN, 0);
        driver.write_descriptor(8, Descriptor::new(HEADER, 16, next, 9));
        driver.write_descriptor(9, Descriptor::new(HEADER, 16, next, 8));
        driver.offer(8);
        // A `next` index outside the table.
        driver.write_descriptor(10, Descriptor::new(HEADER, 16, next, 999));
        driver.offer(10);
        driver.process();
        assert_eq!(driver.used_idx(), 3);
        // The self-loop ends on a writable byte: it gets IOERR for being too long.
        assert_eq!(driver.used(0), (7, 1));
        assert_eq!(driver.status(), IOERR);
        assert_eq!(driver.used(1), (8, 0));
        assert_eq!(driver.used(2), (10, 0));
    }

    #[test]
    fn a_head_outside_the_queue_breaks_the_device() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        driver.offer(QUEUE_SIZE + 44);
        assert!(driver.block.process_queue(0).is_err());
    }

    #[test]
    fn an_avail_index_too_far_ahead_breaks_the_device() {
        let image = image(8);
        let mut driver = Driver::new(open(&image, false, None).unwrap());
        driver.set_avail_idx(QUEUE_SIZE + 1);
        let error = driver.block.process_queue(0).err().unwrap();
        assert!(error.to_string().contains("ahead"), "{error}");
    }

    #[test]
    fn an_avail_ring_outside_memory_breaks_the_device() {
        let image = image(8);
        let mut block = open(&image, false, None).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(0), Some(1));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq));
        block.activate(mem, 0, vec![queue], interrupt).unwrap();
        assert!(block.process_queue(0).is_err());
    }

    #[test]
    fn queue_bookkeeping_errors() {
        let image = image(8);
        let mut block = open(&image, false, None).unwrap();
        // Not activated yet: nothing to do.
        block.process_queue(0).unwrap();
        assert!(block.process_queue(1).is_err());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq));
        assert!(block.activate(mem, 0, vec![], interrupt).is_err());
    }
}
