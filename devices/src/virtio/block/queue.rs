//! The request queue once the driver has handed it over: drained on each notification, every
//! request completed in ring order, and the guest interrupted if it asked to be.

use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::image::Disk;
use super::request;
use crate::virtio::device_queue::DeviceQueue;
use crate::virtio::{DeviceBroken, Interrupt, Progress, Queue};

/// The most requests one pass serves. Requests are served synchronously on the device's own
/// thread, holding the device model's lock, so a guest that keeps its queue full would otherwise
/// hold both for as long as it keeps adding (a reset or a configuration read from a vCPU would
/// wait); after this many the rest wait for the next pass, behind the thread's other ready
/// events. A quarter of the largest ring: a full ring takes four passes,
/// each signalled to the guest as it ends.
pub(super) const MAX_REQUESTS_PER_PASS: usize = 64;

/// What the driver handed over at DRIVER_OK.
pub(super) struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: DeviceQueue,
    interrupt: Arc<Interrupt>,
    /// Whether the driver negotiated VIRTIO_BLK_F_FLUSH. Without it the device must be
    /// write-through (virtio 1.2, 5.2.6.2): every completed write is already durable.
    writeback: bool,
}

impl ActiveQueue {
    pub(super) fn new(
        mem: GuestMemoryMmap,
        queue: Queue,
        interrupt: Arc<Interrupt>,
        writeback: bool,
    ) -> Self {
        Self {
            mem,
            queue: DeviceQueue::new(queue, "virtio-block"),
            interrupt,
            writeback,
        }
    }

    /// The queue, handed back to the transport for a sleep. Nothing is in flight: every pass
    /// completes what it took.
    pub(super) fn into_queue(self) -> Queue {
        self.queue.into_queue()
    }

    /// Completes the available requests, up to [`MAX_REQUESTS_PER_PASS`], and interrupts the
    /// guest if it asked to be told.
    pub(super) fn process(&mut self, disk: &Disk) -> Result<Progress, DeviceBroken> {
        if !self.queue.ready() {
            log::debug!("virtio-block: the driver notified a queue it never made ready");
            return Ok(Progress::Done);
        }
        let (mem, writeback) = (&self.mem, self.writeback);
        let drained = self.queue.drain(mem, MAX_REQUESTS_PER_PASS, |chain| {
            request::serve(disk, mem, chain, writeback)
        });
        // Requests completed before the queue broke still deserve their interrupt.
        let signalled = self.queue.signal_used(mem, &self.interrupt);
        let progress = drained?;
        signalled.map(|()| progress)
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN};
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_driver::*;
    use super::{Progress, MAX_REQUESTS_PER_PASS};
    use crate::virtio::{QueueT, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

    #[test]
    fn several_requests_complete_with_one_interrupt() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
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
    fn more_requests_than_a_pass_serves_complete_across_passes() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        driver.write_header(VIRTIO_BLK_T_FLUSH, 0);
        // Two descriptors each: 100 fit the 256-entry table at once.
        let requests = MAX_REQUESTS_PER_PASS + 36;
        let heads: Vec<u16> = (0..requests as u64)
            .map(|i| driver.push(&[readable(HEADER, 16), writable(STATUS + i, 1)]))
            .collect();
        mem.write_slice(&vec![NO_STATUS; requests], GuestAddress(STATUS))
            .unwrap();

        assert_eq!(driver.process(), Progress::MoreWork);
        assert_eq!(usize::from(driver.used_idx()), MAX_REQUESTS_PER_PASS);
        // What the first pass completed is signalled at its end, not after the last request.
        assert!(driver.interrupted());
        assert_eq!(driver.process(), Progress::Done);
        assert_eq!(usize::from(driver.used_idx()), requests);
        assert!(driver.interrupted());
        for (n, head) in heads.into_iter().enumerate() {
            assert_eq!(driver.used(n as u16), (u32::from(head), 1), "request {n}");
        }
        assert_eq!(driver.guest_bytes(STATUS, requests), vec![OK; requests]);

        // Exactly a pass's worth needs no second pass; nothing at all neither.
        let before = driver.used_idx();
        for _ in 0..MAX_REQUESTS_PER_PASS {
            driver.push(&[readable(HEADER, 16), writable(STATUS, 1)]);
        }
        assert_eq!(driver.process(), Progress::Done);
        let served = driver.used_idx().wrapping_sub(before);
        assert_eq!(usize::from(served), MAX_REQUESTS_PER_PASS);
        assert_eq!(driver.process(), Progress::Done);
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks() {
        let mem = guest_memory();
        let image = image(8);
        let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        let mut driver = Driver::with_features(&mem, open(&image, false, None).unwrap(), features);
        // used_event = 1: interrupt when the used index passes 1, i.e. at the second request.
        driver.queue.set_used_event(1);
        assert_eq!(driver.read(0, 512), (513, OK));
        assert!(!driver.interrupted());
        assert_eq!(driver.read(0, 512), (513, OK));
        assert!(driver.interrupted());
        assert_eq!(driver.read(0, 512), (513, OK));
        assert!(!driver.interrupted());
        // The device asks to be notified at the next avail entry (avail_event).
        assert_eq!(driver.queue.avail_event(), 3);
    }

    #[test]
    fn a_head_outside_the_queue_breaks_the_device() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        driver.offer(QUEUE_SIZE + 44);
        assert!(driver.block.process_queue(0).is_err());
    }

    #[test]
    fn an_avail_index_too_far_ahead_breaks_the_device() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::new(&mem, open(&image, false, None).unwrap());
        driver.set_avail_idx(QUEUE_SIZE + 1);
        let error = driver.block.process_queue(0).err().unwrap();
        assert!(error.to_string().contains("ahead"), "{error}");
    }

    #[test]
    fn an_avail_ring_outside_memory_breaks_the_device() {
        let image = image(8);
        let mut block = open(&image, false, None).unwrap();
        let mem = guest_memory();
        // The mock rings are written when made, so they cannot be made outside guest memory: the
        // avail ring is moved there (to 4 GiB) afterwards.
        let mut queue = DriverQueue::new(&mem, 0x1000).queue();
        queue.set_avail_ring_address(Some(0), Some(1));
        block
            .activate(mem.clone(), 0, vec![queue], Irq::new().interrupt())
            .unwrap();
        assert!(block.process_queue(0).is_err());
    }
}
