//! virtio-block (virtio 1.2, 5.2): a raw disk image file as one of the guest's `/dev/vdX`.
//!
//! One request queue, served synchronously on the device's thread with positioned I/O on the
//! image. Everything in a request comes from the guest and may be hostile: descriptor addresses
//! and lengths, directions, sector numbers and segment counts are all checked before any byte
//! moves, guest memory is only reached through vm-memory's checked accessors, and a malformed
//! request completes with an error status instead of stopping the device. Only a queue that
//! cannot be walked at all (a broken avail ring) makes the device [`DeviceBroken`].
//!
//! The image is `flock`ed for as long as the device exists: exclusively when writable, shared when
//! read-only, so two VMs can never write the same image behind each other's back.
//!
//! This file is the device as the transport sees it: identity, features, configuration space,
//! activation. `request.rs` turns one descriptor chain into a checked request and answers it,
//! `image.rs` does the I/O on the image file, and `queue.rs` drains the ring.

use std::io;
use std::mem::offset_of;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use vm_memory::GuestMemoryMmap;

use super::{
    DeviceBroken, Interrupt, Progress, Queue, QueueT, VirtioDevice, VirtioDeviceState,
    VirtioDeviceStateError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use image::Disk;
use queue::ActiveQueue;
pub use state::{BlockState, BlockStateError};

mod image;
mod queue;
mod request;
mod state;
#[cfg(test)]
mod test_driver;

/// The virtio device ID of a block device (virtio 1.2, 5).
pub(crate) const DEVICE_TYPE_BLOCK: u32 = 2;
/// One request queue of up to 256 entries.
const QUEUE_MAX_SIZES: [u16; 1] = [256];

/// Sector size of the virtio-block protocol: `sector` fields always count 512-byte units, and the
/// image size must be a whole number of them.
pub const SECTOR_SIZE: u64 = 512;
/// Largest number of data segments in one request. We do not offer indirect descriptors, so a
/// request (header + data + status) must fit in the ring; 126 + 2 fits even a driver that shrinks
/// the queue to 128 entries, and matches the block layer's default of 128 segments.
const SEG_MAX: u32 = 126;
/// Discard and write-zeroes take one segment per request; its 32-bit sector count is the only
/// size limit.
const MAX_DISCARD_SEG: u32 = 1;
const MAX_WRITE_ZEROES_SEG: u32 = 1;
const MAX_DISCARD_SECTORS: u32 = u32::MAX;
const MAX_WRITE_ZEROES_SECTORS: u32 = u32::MAX;
/// Discards are best aligned to 4 KiB, the block size of the host filesystems that punch holes.
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
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
    /// The image cannot be opened.
    #[error("cannot open disk image {}", .path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another open file description holds the image's lock.
    #[error(
        "disk image {} is in use: another ember (or another --disk of this one) holds its lock",
        .path.display()
    )]
    ImageLocked {
        /// The image.
        path: PathBuf,
    },
    /// flock failed for another reason than the lock being held.
    #[error("cannot lock disk image {}", .path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Seeking to the image's end failed.
    #[error("cannot find the size of disk image {}", .path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image is not a whole number of sectors.
    #[error(
        "disk image {} is {size} bytes, not a whole number of 512-byte sectors",
        .path.display()
    )]
    SizeNotSectorAligned {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
}

/// A virtio-block device backed by a raw image file.
pub struct Block {
    disk: Disk,
    available_features: u64,
    config_space: [u8; CONFIG_SPACE_LEN],
    phase: Phase,
}

/// Where the device is in its life, as the driver and the VMM moved it.
enum Phase {
    /// Before activation, or reset since.
    Reset,
    /// Activated with these features: the driver's queue is being served.
    Active { features: u64, queue: ActiveQueue },
    /// Activated with these features, then put to sleep: the queue went back to the transport.
    Asleep { features: u64 },
}

impl Block {
    /// Opens and locks the image described by `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let BlockConfig {
            path,
            read_only,
            id,
        } = config;
        let serial = serial_number(id.as_deref(), &path);
        let disk = Disk::open(path, read_only, serial)?;
        Ok(Self {
            available_features: available_features(read_only),
            config_space: config_space(disk.size / SECTOR_SIZE),
            disk,
            phase: Phase::Reset,
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
        self.start(mem, features, queues, interrupt)
    }

    fn process_queue(&mut self, index: usize) -> Result<Progress, DeviceBroken> {
        if index != 0 {
            return Err(DeviceBroken(format!(
                "virtio-block has one queue; the guest notified queue {index}"
            )));
        }
        match &mut self.phase {
            Phase::Active { queue, .. } => queue.process(&self.disk),
            Phase::Reset | Phase::Asleep { .. } => {
                log::debug!("virtio-block: queue notified while not active; ignored");
                Ok(Progress::Done)
            }
        }
    }

    fn reset(&mut self) {
        // The image stays open, and so locked: the VM still owns it.
        self.phase = Phase::Reset;
    }

    fn shutdown(&mut self) {
        if self.disk.read_only {
            return;
        }
        if let Err(e) = self.disk.flush() {
            log::error!(
                "virtio-block: cannot flush {} at exit, guest writes may be lost: {e}",
                self.disk.path.display()
            );
        }
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, DeviceBroken> {
        // Requests are served synchronously within a pass, under the device model's lock, which
        // the caller holds: none is in flight, every chain taken was completed and returned.
        // What remains is making the completed writes durable, whatever the phase: a writeback
        // guest may have written and reset since its last flush.
        if !self.disk.read_only {
            self.disk.flush().map_err(|e| {
                DeviceBroken(format!(
                    "virtio-block: cannot flush {} before sleeping: {e}",
                    self.disk.path.display()
                ))
            })?;
        }
        match std::mem::replace(&mut self.phase, Phase::Reset) {
            Phase::Active { features, queue } => {
                self.phase = Phase::Asleep { features };
                Ok(Some(vec![queue.into_queue()]))
            }
            phase => {
                self.phase = phase;
                Ok(None)
            }
        }
    }

    fn wake(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        let Phase::Asleep { features } = self.phase else {
            return Err(DeviceBroken("virtio-block: woken while not asleep".into()));
        };
        self.start(mem, features, queues, interrupt)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let c = &self.disk.counters;
        vec![
            ("requests", c.requests.load(Relaxed)),
            ("request_errors", c.errors.load(Relaxed)),
            ("read_bytes", c.read_bytes.load(Relaxed)),
            ("written_bytes", c.written_bytes.load(Relaxed)),
        ]
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioDeviceStateError> {
        self.restore(state)
    }
}

impl Block {
    /// Serves `queues` with `features`: activation and wake alike.
    fn start(
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
        let writeback = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        let queue = ActiveQueue::new(mem, queue, interrupt, writeback);
        self.phase = Phase::Active { features, queue };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN};

    use super::test_driver::*;
    use super::*;

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
    fn get_id_defaults_to_the_file_name_cut_to_20_bytes() {
        let mem = guest_memory();
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let path = dir.as_path().join("a-rather-long-image-name.img");
        File::create(&path).unwrap().set_len(4096).unwrap();
        let block = Block::new(BlockConfig {
            path,
            read_only: true,
            id: None,
        })
        .unwrap();
        let mut driver = Driver::new(&mem, block);
        let (len, status) = driver.request(VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 64)]);
        assert_eq!((len, status), (21, OK));
        assert_eq!(driver.guest_bytes(DATA, 20), b"a-rather-long-image-");
        let long = "x".repeat(40);
        assert_eq!(serial_number(Some(&long), Path::new("/d.img")), [b'x'; 20]);
    }

    #[test]
    fn reset_then_reactivate_serves_again() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
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
    fn sleep_hands_the_queue_back_and_wake_serves_on() {
        let mem = guest_memory();
        let image = image(8);
        let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH;
        let mut driver = Driver::with_features(&mem, open(&image, false, None).unwrap(), features);
        assert_eq!(driver.write(1, &[7; 512]), (1, OK));
        let queues = driver.block.sleep().unwrap().unwrap();
        // Nothing in flight: every request taken was answered.
        assert_eq!((queues[0].next_avail(), queues[0].next_used()), (1, 1));
        assert!(driver.block.sleep().unwrap().is_none());
        // Asleep, a notification does nothing.
        driver.write_header(VIRTIO_BLK_T_IN, 1);
        let head = driver.push(&[
            readable(HEADER, 16),
            writable(DATA, 512),
            writable(STATUS, 1),
        ]);
        driver.process();
        assert_eq!(driver.used_idx(), 1);

        let interrupt = driver.irq.interrupt();
        driver.block.wake(mem.clone(), queues, interrupt).unwrap();
        driver.process();
        assert_eq!(driver.used_idx(), 2);
        assert_eq!(driver.used(1), (u32::from(head), 513));
        assert_eq!(driver.guest_bytes(DATA, 512), vec![7; 512]);
        assert!(driver.interrupted());
        // Still with FLUSH: writeback, where a flush is a request of its own.
        assert_eq!(driver.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (1, OK));
    }

    #[test]
    fn only_a_sleeping_device_wakes() {
        let mem = guest_memory();
        let image = image(8);
        let mut block = open(&image, false, None).unwrap();
        assert!(block.sleep().unwrap().is_none());
        let queue = DriverQueue::new(&mem, 0x1000).queue();
        let interrupt = Irq::new().interrupt();
        assert!(block.wake(mem.clone(), vec![queue], interrupt).is_err());
        let mut driver = Driver::new(&mem, block);
        let queues = driver.block.sleep().unwrap().unwrap();
        driver.block.reset();
        let interrupt = driver.irq.interrupt();
        assert!(driver.block.wake(mem.clone(), queues, interrupt).is_err());
    }

    #[test]
    fn queue_bookkeeping_errors() {
        let image = image(8);
        let mut block = open(&image, false, None).unwrap();
        // Not activated yet: nothing to do.
        block.process_queue(0).unwrap();
        assert!(block.process_queue(1).is_err());
        let interrupt = Irq::new().interrupt();
        assert!(block
            .activate(guest_memory(), 0, vec![], interrupt)
            .is_err());
    }

    /// Random requests from a hostile driver: headers of any type and sector, chains of any
    /// shape (addresses in and past guest memory, lengths at the edges, flags either way, loops
    /// and indirect flags written by hand, avail index jumps). The device answers or breaks,
    /// never panics, and the image never changes size.
    #[test]
    fn fuzz_block_requests() {
        use virtio_bindings::virtio_blk::{
            VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
        };
        use virtio_queue::desc::split::Descriptor;
        use vm_memory::{Bytes, GuestAddress};
        const SECTORS: u64 = 64;
        let image = image(SECTORS);
        crate::fuzz::run("block_requests", |rng| {
            let block = open(&image, rng.one_in(4), None).unwrap();
            let features = block.available_features() & rng.next_u64() | 1 << VIRTIO_F_VERSION_1;
            let mem = guest_memory();
            let mut driver = Driver::with_features(&mem, block, features);
            let places = [HEADER, STATUS, SEGMENT, DATA, MEM_SIZE as u64 - 8];
            for _ in 0..1 + rng.below(8) {
                let any_type = rng.next_u64() as u32;
                let request_type = rng.pick(&[
                    VIRTIO_BLK_T_IN,
                    VIRTIO_BLK_T_OUT,
                    VIRTIO_BLK_T_FLUSH,
                    VIRTIO_BLK_T_GET_ID,
                    VIRTIO_BLK_T_DISCARD,
                    VIRTIO_BLK_T_WRITE_ZEROES,
                    any_type,
                ]);
                let sector = if rng.one_in(2) {
                    rng.below(SECTORS + 2)
                } else {
                    rng.edgy_u64()
                };
                driver.write_header(request_type, sector);
                if rng.one_in(3) {
                    let segment = rng.bytes(16);
                    mem.write_slice(&segment, GuestAddress(SEGMENT)).unwrap();
                }
                let mut chain = Vec::new();
                for _ in 0..1 + rng.below(5) {
                    let addr = if rng.one_in(5) {
                        rng.edgy_u64()
                    } else {
                        rng.pick(&places)
                    };
                    let len = if rng.one_in(4) {
                        rng.edgy_u64() as u32
                    } else {
                        rng.below(3 * 512) as u32
                    };
                    chain.push((addr, len, rng.one_in(2)));
                }
                let head = driver.push(&chain);
                if rng.one_in(6) {
                    // A descriptor rewritten by hand: any flags (indirect, a loop), any next.
                    let index = head.wrapping_add(rng.below(4) as u16) % QUEUE_SIZE;
                    driver.write_descriptor(
                        index,
                        Descriptor::new(
                            rng.edgy_u64(),
                            rng.edgy_u64() as u32,
                            rng.below(8) as u16,
                            rng.below(u64::from(QUEUE_SIZE) + 4) as u16,
                        ),
                    );
                }
                if rng.one_in(10) {
                    driver.set_avail_idx(rng.next_u64() as u16);
                }
                if driver.block.process_queue(0).is_err() {
                    // A broken device needs a reset: the case is over.
                    break;
                }
            }
            assert_eq!(
                image.as_file().metadata().unwrap().len(),
                SECTORS * SECTOR_SIZE
            );
        });
    }
}
