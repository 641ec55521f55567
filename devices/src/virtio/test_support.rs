//! What the device tests share: a small guest memory, the driver's side of a split virtqueue,
//! and the interrupt line as an eventfd the test can read.
//!
//! The rings are virtio-queue's own mock pieces (`DescriptorTable`, `AvailRing`, `UsedRing`),
//! each at an address of our choosing. `MockSplitQueue` itself is not used: in virtio-queue 0.18
//! its `create` places the used ring at `AvailRing::end()`, which counts ring entries as bytes,
//! so with 256 entries the used ring starts 260 bytes into the 518-byte avail ring: avail entries
//! from the 129th on, and used_event, share memory with the used ring (a fix is proposed upstream
//! in rust-vmm/vm-virtio#400). Its `add_chain`/`add_desc_chains` also wrap neither the avail ring
//! nor the descriptor table, which the tests that cycle a ring many times need.

use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{AvailRing, DescriptorTable, UsedRing};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Interrupt, Queue, QueueT};

/// Guest RAM in every test: 1 MiB from address 0.
pub(crate) const MEM_SIZE: usize = 1 << 20;
/// Every test queue has the largest size the devices offer.
pub(crate) const QUEUE_SIZE: u16 = 256;
/// Room for each part of a test queue: the descriptor table is exactly this big, the rings less.
const RING_SPACING: u64 = 0x1000;

pub(crate) fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// `len` bytes of guest memory at `addr`.
pub(crate) fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
    bytes
}

/// A descriptor as the driver writes it: (guest address, length, device-writable).
pub(crate) type Buf = (u64, u32, bool);

pub(crate) fn readable(addr: u64, len: u32) -> Buf {
    (addr, len, false)
}

pub(crate) fn writable(addr: u64, len: u32) -> Buf {
    (addr, len, true)
}

/// The device's interrupt line, as an eventfd that counts the interrupts raised.
pub(crate) struct Irq(EventFd);

impl Irq {
    pub(crate) fn new() -> Self {
        Self(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    /// An [`Interrupt`] for the device, raising this line.
    pub(crate) fn interrupt(&self) -> Arc<Interrupt> {
        Arc::new(Interrupt::new(self.0.try_clone().unwrap()))
    }

    /// How many interrupts were raised since the last look; fails when there were none.
    pub(crate) fn read(&self) -> std::io::Result<u64> {
        self.0.read()
    }

    /// Whether any interrupt was raised since the last look.
    pub(crate) fn fired(&self) -> bool {
        self.read().is_ok()
    }
}

/// One split virtqueue (virtio 1.2, 2.7) as the driver sees it: the descriptor table at `base`,
/// the avail ring and the used ring in the next two 4 KiB pages.
pub(crate) struct DriverQueue<'m> {
    mem: &'m GuestMemoryMmap,
    desc_table: DescriptorTable<'m, GuestMemoryMmap>,
    avail: AvailRing<'m, GuestMemoryMmap>,
    used: UsedRing<'m, GuestMemoryMmap>,
    base: u64,
    /// Where the next chain's first descriptor goes; chains are laid out one after another and
    /// wrap around the table.
    next_desc: u16,
}

impl<'m> DriverQueue<'m> {
    /// Fresh, empty rings, as a driver sets them up after a reset.
    pub(crate) fn new(mem: &'m GuestMemoryMmap, base: u64) -> Self {
        // The mock clears only the ring headers and event fields; a reset driver's rings hold
        // nothing from before at all.
        mem.write_slice(&[0; 3 * RING_SPACING as usize], GuestAddress(base))
            .unwrap();
        Self {
            mem,
            desc_table: DescriptorTable::new(mem, GuestAddress(base), QUEUE_SIZE),
            avail: AvailRing::new(mem, GuestAddress(base + RING_SPACING), QUEUE_SIZE),
            used: UsedRing::new(mem, GuestAddress(base + 2 * RING_SPACING), QUEUE_SIZE),
            base,
            next_desc: 0,
        }
    }

    fn avail_addr(&self) -> u64 {
        self.base + RING_SPACING
    }

    fn used_addr(&self) -> u64 {
        self.base + 2 * RING_SPACING
    }

    /// Where the rings are: (descriptor table, avail ring, used ring), as the driver tells the
    /// transport.
    pub(crate) fn addresses(&self) -> (u64, u64, u64) {
        (self.base, self.avail_addr(), self.used_addr())
    }

    /// The queue as the transport hands it to the device at DRIVER_OK.
    pub(crate) fn queue(&self) -> Queue {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(self.base as u32), Some(0));
        queue.set_avail_ring_address(Some(self.avail_addr() as u32), Some(0));
        queue.set_used_ring_address(Some(self.used_addr() as u32), Some(0));
        queue.set_ready(true);
        queue
    }

    /// Writes `chain` into the descriptor table; returns its head.
    pub(crate) fn write_chain(&mut self, chain: &[Buf]) -> u16 {
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

    /// Writes one descriptor as it is, however hostile (a loop, a `next` outside the table).
    pub(crate) fn write_descriptor(&self, index: u16, descriptor: Descriptor) {
        self.desc_table
            .store(index, RawDescriptor::from(descriptor))
            .unwrap();
    }

    /// Puts a chain head in the avail ring and publishes it.
    pub(crate) fn offer(&mut self, head: u16) {
        let idx = self.avail.idx().load();
        self.avail
            .ring()
            .ref_at(usize::from(idx % QUEUE_SIZE))
            .unwrap()
            .store(head);
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Writes and offers a chain; returns its head.
    pub(crate) fn push(&mut self, chain: &[Buf]) -> u16 {
        let head = self.write_chain(chain);
        self.offer(head);
        head
    }

    /// Sets the avail index to anything, as a broken driver might.
    pub(crate) fn set_avail_idx(&self, idx: u16) {
        self.avail.idx().store(idx);
    }

    pub(crate) fn used_idx(&self) -> u16 {
        self.used.idx().load()
    }

    /// Used element `n`: (id, len).
    pub(crate) fn used(&self, n: u16) -> (u32, u32) {
        let elem = self
            .used
            .ring()
            .ref_at(usize::from(n % QUEUE_SIZE))
            .unwrap()
            .load();
        (elem.id(), elem.len())
    }

    // The mock rings have no accessors for the flags and event fields (and put the used ring's
    // event field in the wrong place), so these three are found by hand (virtio 1.2, 2.7.6-8).

    /// Sets used_event, at the end of the avail ring (EVENT_IDX).
    pub(crate) fn set_used_event(&self, idx: u16) {
        let addr = self.avail_addr() + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(idx, GuestAddress(addr)).unwrap();
    }

    /// The avail_event field at the end of the used ring (EVENT_IDX).
    pub(crate) fn avail_event(&self) -> u16 {
        let addr = self.used_addr() + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// The used ring's flags: 1 (VRING_USED_F_NO_NOTIFY) while the device wants no notifications.
    pub(crate) fn used_flags(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used_addr())).unwrap()
    }
}
