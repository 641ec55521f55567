//! A stand-in for the guest's virtio-block driver, shared by the block device's tests: it owns
//! guest memory and the request queue's rings, builds requests and reads back what the device
//! answered.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

use super::{Block, BlockConfig, BlockError, SECTOR_SIZE};
use crate::virtio::{Interrupt, Queue, QueueT, VirtioDevice, VIRTIO_F_VERSION_1};

pub(super) const MEM_SIZE: usize = 1 << 20;
pub(super) const QUEUE_SIZE: u16 = 256;
// A split virtqueue laid out by hand (virtio 1.2, 2.7).
pub(super) const DESC_TABLE: u64 = 0x1000;
pub(super) const AVAIL_RING: u64 = 0x2000;
pub(super) const USED_RING: u64 = 0x3000;
pub(super) const USED_EVENT: u64 = AVAIL_RING + 4 + 2 * QUEUE_SIZE as u64;
pub(super) const HEADER: u64 = 0x8000;
pub(super) const STATUS: u64 = 0x9000;
pub(super) const SEGMENT: u64 = 0xa000;
pub(super) const DATA: u64 = 0x10000;

pub(super) const NO_STATUS: u8 = 0xee;
pub(super) const OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(super) const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A descriptor as the driver writes it: (guest address, length, device-writable).
pub(super) type Buf = (u64, u32, bool);

pub(super) fn readable(addr: u64, len: u32) -> Buf {
    (addr, len, false)
}

pub(super) fn writable(addr: u64, len: u32) -> Buf {
    (addr, len, true)
}

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

/// Plays the guest driver: owns guest memory and the rings, and drives the device.
pub(super) struct Driver {
    pub(super) mem: GuestMemoryMmap,
    pub(super) block: Block,
    pub(super) irq: EventFd,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    pub(super) fn new(block: Block) -> Self {
        Self::with_features(block, 1 << VIRTIO_F_VERSION_1)
    }

    pub(super) fn with_features(block: Block, features: u64) -> Self {
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
    pub(super) fn activate(&mut self, features: u64) {
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
    pub(super) fn write_chain(&mut self, chain: &[Buf]) -> u16 {
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

    pub(super) fn write_descriptor(&self, index: u16, descriptor: Descriptor) {
        let addr = DESC_TABLE + 16 * u64::from(index);
        self.mem.write_obj(descriptor, GuestAddress(addr)).unwrap();
    }

    /// Puts a chain head in the avail ring and publishes it.
    pub(super) fn offer(&mut self, head: u16) {
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    pub(super) fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(AVAIL_RING + 2))
            .unwrap();
    }

    pub(super) fn push(&mut self, chain: &[Buf]) -> u16 {
        let head = self.write_chain(chain);
        self.offer(head);
        head
    }

    pub(super) fn process(&mut self) {
        self.block.process_queue(0).unwrap();
    }

    pub(super) fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
    }

    /// The used element `n` (id, len).
    pub(super) fn used(&self, n: u16) -> (u32, u32) {
        let elem = USED_RING + 4 + 8 * u64::from(n % QUEUE_SIZE);
        let id = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        (id, len)
    }

    pub(super) fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
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
        let mut bytes = vec![0; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }
}
