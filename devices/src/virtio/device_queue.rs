//! A queue as a device serves it once the driver has handed it over: taking the chains the
//! driver made available, returning them, and interrupting the driver when it asked to be told.
//! Every device does these the same way, so they live here once; a ring that cannot be walked
//! becomes [`DeviceBroken`], named after the queue.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, QueueOwnedT};
use vm_memory::GuestMemoryMmap;

use super::{DeviceBroken, Interrupt, Progress, Queue, QueueT};

/// One of a device's queues, from DRIVER_OK until reset.
pub(crate) struct DeviceQueue {
    queue: Queue,
    /// How errors name the queue: "virtio-block", "virtio-net RX".
    name: &'static str,
    /// Chains returned since the driver was last considered for an interrupt.
    returned: bool,
}

impl DeviceQueue {
    pub(crate) fn new(queue: Queue, name: &'static str) -> Self {
        Self {
            queue,
            name,
            returned: false,
        }
    }

    /// Whether the driver made the queue ready; a queue it left unused is never walked.
    pub(crate) fn ready(&self) -> bool {
        self.queue.ready()
    }

    /// The ring size the driver chose.
    pub(crate) fn size(&self) -> u16 {
        self.queue.size()
    }

    /// Where the next chain comes from in the avail ring (a free-running index).
    pub(crate) fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Gives the last `count` chains taken back to the avail ring, unused: [`DeviceQueue::pop`]
    /// takes them again, in the same order. Only for chains the device took last and neither
    /// returned nor wrote into.
    pub(crate) fn unpop(&mut self, count: u16) {
        let next_avail = self.queue.next_avail().wrapping_sub(count);
        self.queue.set_next_avail(next_avail);
    }

    /// The queue itself, for the transport to keep while the device sleeps.
    pub(crate) fn into_queue(self) -> Queue {
        self.queue
    }

    /// The next chain the driver made available, if any.
    pub(crate) fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, DeviceBroken> {
        let avail_idx = self
            .queue
            .avail_idx(mem, Ordering::Acquire)
            .map_err(|e| self.broken("cannot read the avail ring index", e))?;
        let next_avail = self.queue.next_avail();
        if avail_idx.0 == next_avail {
            return Ok(None);
        }
        let (name, size) = (self.name, self.queue.size());
        // The driver can only be ahead by at most a ring's worth of entries (virtio 1.2, 2.7.6);
        // `iter` refuses more, where a plain pop would only log it and look like an empty ring.
        let mut chains = self.queue.iter(mem).map_err(|e| match e {
            virtio_queue::Error::InvalidAvailRingIndex => DeviceBroken(format!(
                "{name}: the avail ring index is {} entries ahead, in a queue of {size}",
                avail_idx.0.wrapping_sub(next_avail)
            )),
            e => DeviceBroken(format!("{name}: cannot walk the avail ring: {e}")),
        })?;
        match chains.next() {
            Some(chain) => Ok(Some(chain)),
            None => Err(DeviceBroken(format!("{name}: cannot read the avail ring"))),
        }
    }

    /// Returns chain `head` to the driver, `len` bytes of it written by the device.
    pub(crate) fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), DeviceBroken> {
        // Fails when the head index is outside the queue: such a chain cannot be returned, and
        // the driver would wait for it forever.
        self.queue
            .add_used(mem, head, len)
            .map_err(|e| self.broken(&format!("cannot return descriptor chain {head}"), e))?;
        self.returned = true;
        Ok(())
    }

    /// Serves the available chains in ring order with `serve`, which says how many bytes it
    /// wrote into the chain, and returns each; at most `limit` of them. Ends when the ring is
    /// empty with notifications re-enabled, so that a chain the driver adds while notifications
    /// are off is never missed; or at `limit` with chains left, which the caller must come back
    /// for ([`Progress::MoreWork`]).
    pub(crate) fn drain<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        limit: usize,
        mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
    ) -> Result<Progress, DeviceBroken> {
        let mut served = 0;
        loop {
            self.disable_notification(mem)?;
            while served < limit {
                let Some(chain) = self.pop(mem)? else {
                    break;
                };
                let head = chain.head_index();
                let used_len = serve(chain);
                self.add_used(mem, head, used_len)?;
                served += 1;
            }
            // Notifications go back on even when chains are left: should the pass asked for
            // never come, the driver's next notification still resumes the queue.
            if !self.enable_notification(mem)? {
                return Ok(Progress::Done);
            }
            if served >= limit {
                return Ok(Progress::MoreWork);
            }
        }
    }

    /// Asks the driver not to notify the queue: the device is busy with it anyway.
    pub(crate) fn disable_notification(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceBroken> {
        self.queue
            .disable_notification(mem)
            .map_err(|e| self.broken("cannot disable notifications", e))
    }

    /// Asks the driver to notify the queue when it makes more chains available; true if it
    /// made some available meanwhile (no notification will come for those).
    pub(crate) fn enable_notification(
        &mut self,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceBroken> {
        self.queue
            .enable_notification(mem)
            .map_err(|e| self.broken("cannot enable notifications", e))
    }

    /// Interrupts the driver if chains were returned since the last call and it wants to be told
    /// (with EVENT_IDX, only once the used index passes its used_event).
    pub(crate) fn signal_used(
        &mut self,
        mem: &GuestMemoryMmap,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceBroken> {
        if !std::mem::take(&mut self.returned) {
            return Ok(());
        }
        if self
            .queue
            .needs_notification(mem)
            .map_err(|e| self.broken("cannot read used_event", e))?
        {
            interrupt.signal_used_queue();
        }
        Ok(())
    }

    fn broken(&self, what: &str, error: virtio_queue::Error) -> DeviceBroken {
        DeviceBroken(format!("{}: {what}: {error}", self.name))
    }
}
