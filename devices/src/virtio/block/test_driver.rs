//! A stand-in for the guest's virtio-block driver, shared by the block device's tests: it drives
//! the request queue (see `virtio::test_support`), builds requests and reads back what the device
//! answered.

use std::os::unix::fs::FileExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::{Block, BlockConfig, BlockError, SECTOR_SIZE};
pub(super) use crate::virtio::test_support::*;
use crate::virtio::{Progress, VirtioDevice, VIRTIO_F_VERSION_1};

/// Where the request queue lives.
const QUEUE_BASE: u64 = 0x1000;
pub(super) const HEADER: u64 = 0x8000;
pub(super) const STATUS: u64 = 0x9000;
pub(super) const SEGMENT: u64 = 0xa000;
pub(super) const DATA: u64 = 0x10000;

pub(super) const NO_STATUS: u8 = 0xee;
pub(super) const OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(super) const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

pub(super) fn image(sectors: u64) -> TempFile {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(sectors * SECTOR_SIZE).unwrap();
    image
}

pub(super) fn open(
    image: &TempFile,
    read_only: bool,
    id: Option<&str>,
) -> Result<Block, BlockError> {
    Block::new(BlockConfig {
        path: image.as_path().to_path_buf(),
        read_only,
        id: id.map(str::to_string),
    })
}

pub(super) fn image_bytes(image: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    image.as_file().read_exact_at(&mut bytes, offset).unwrap();
    bytes
}

pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

/// Plays the guest driver: owns the request queue, and drives the device.
pub(super) struct Driver<'m> {
    pub(super) mem: &'m GuestMemoryMmap,
    pub(super) block: Block,
    pub(super) irq: Irq,
    pub(super) queue: DriverQueue<'m>,
}

impl<'m> Driver<'m> {
    pub(super) fn new(mem: &'m GuestMemoryMmap, block: Block) -> Self {
        Self::with_features(mem, block, 1 << VIRTIO_F_VERSION_1)
    }

    pub(super) fn with_features(mem: &'m GuestMemoryMmap, block: Block, features: u64) -> Self {
        let mut driver = Driver {
            mem,
            block,
            irq: Irq::new(),
            queue: DriverQueue::new(mem, QUEUE_BASE),
        };
        driver.activate(features);
        driver
    }

    /// Sets up fresh rings and hands them to the device, as after a reset.
    pub(super) fn activate(&mut self, features: u64) {
        self.queue = DriverQueue::new(self.mem, QUEUE_BASE);
        self.block
            .activate(
                self.mem.clone(),
                features,
                vec![self.queue.queue()],
                self.irq.interrupt(),
            )
            .unwrap();
    }

    pub(super) fn write_descriptor(&self, index: u16, descriptor: Descriptor) {
        self.queue.write_descriptor(index, descriptor);
    }

    pub(super) fn offer(&mut self, head: u16) {
        self.queue.offer(head);
    }

    pub(super) fn set_avail_idx(&self, idx: u16) {
        self.queue.set_avail_idx(idx);
    }

    pub(super) fn push(&mut self, chain: &[Buf]) -> u16 {
        self.queue.push(chain)
    }

    /// One pass over the queue, as after one notification.
    pub(super) fn process(&mut self) -> Progress {
        self.block.process_queue(0).unwrap()
    }

    pub(super) fn used_idx(&self) -> u16 {
        self.queue.used_idx()
    }

    /// The used element `n` (id, len).
    pub(super) fn used(&self, n: u16) -> (u32, u32) {
        self.queue.used(n)
    }

    pub(super) fn interrupted(&self) -> bool {
        self.irq.fired()
    }

    pub(super) fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    pub(super) fn write_header(&self, request_type: u32, sector: u64) {
        let mut header = [0; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
    }

    /// Submits `chain` alone and returns (used len, status byte); checks it came back.
    pub(super) fn submit(&mut self, chain: &[Buf]) -> (u32, u8) {
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
    pub(super) fn request(&mut self, request_type: u32, sector: u64, data: &[Buf]) -> (u32, u8) {
        self.write_header(request_type, sector);
        let mut chain = vec![readable(HEADER, 16)];
        chain.extend_from_slice(data);
        chain.push(writable(STATUS, 1));
        self.submit(&chain)
    }

    pub(super) fn read(&mut self, sector: u64, len: u32) -> (u32, u8) {
        self.request(VIRTIO_BLK_T_IN, sector, &[writable(DATA, len)])
    }

    pub(super) fn write(&mut self, sector: u64, bytes: &[u8]) -> (u32, u8) {
        self.mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
        self.request(
            VIRTIO_BLK_T_OUT,
            sector,
            &[readable(DATA, bytes.len() as u32)],
        )
    }

    pub(super) fn erase(&mut self, request_type: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
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

    pub(super) fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        guest_bytes(self.mem, addr, len)
    }
}
