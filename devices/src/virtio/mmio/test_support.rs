//! What the transport's tests share: a fake device that records what it is asked to do, and
//! the driver's side of the registers.

use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{reg, MmioTransport};
use crate::virtio::{
    status, DeviceBroken, Interrupt, Progress, Queue, QueueT, VirtioDevice, VirtioDeviceState,
    VirtioDeviceStateError, VIRTIO_F_VERSION_1,
};
use crate::BusDevice;

/// What the fake device saw.
#[derive(Default)]
pub(super) struct Seen {
    pub(super) activations: usize,
    pub(super) resets: usize,
    pub(super) processed: Vec<usize>,
    pub(super) features: u64,
    pub(super) fail_next: bool,
    /// The next pass stops at its cap with work left.
    pub(super) more_work_next: bool,
    /// The next pass waits for a message here, as a pass blocked in host I/O would.
    pub(super) hold_next: Option<std::sync::mpsc::Receiver<()>>,
    pub(super) sleeps: usize,
    pub(super) wakes: usize,
}

pub(super) struct FakeDevice {
    pub(super) seen: Arc<Mutex<Seen>>,
    pub(super) config: [u8; 8],
    /// The queues while active; each pass serves one chain of its queue, as far as the
    /// queue positions tell.
    pub(super) queues: Option<Vec<Queue>>,
    /// Features while activated (active or asleep).
    pub(super) features: Option<u64>,
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        2
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn available_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << 5)
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(offset as usize + i).copied().unwrap_or(0);
        }
    }
    fn write_config(&mut self, _: u64, _: &[u8]) {}
    fn activate(
        &mut self,
        _: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        _: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        assert_eq!(queues.len(), 2);
        let mut seen = self.seen.lock().unwrap();
        seen.activations += 1;
        seen.features = features;
        self.queues = Some(queues);
        self.features = Some(features);
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<Progress, DeviceBroken> {
        if let Some(queue) = self.queues.as_mut().and_then(|q| q.get_mut(index)) {
            queue.set_next_avail(queue.next_avail().wrapping_add(1));
            queue.set_next_used(queue.next_used().wrapping_add(1));
        }
        let hold = self.seen.lock().unwrap().hold_next.take();
        if let Some(hold) = hold {
            hold.recv().unwrap();
        }
        let mut seen = self.seen.lock().unwrap();
        seen.processed.push(index);
        if std::mem::take(&mut seen.fail_next) {
            return Err(DeviceBroken("bad chain".into()));
        }
        if std::mem::take(&mut seen.more_work_next) {
            return Ok(Progress::MoreWork);
        }
        Ok(Progress::Done)
    }
    fn reset(&mut self) {
        self.seen.lock().unwrap().resets += 1;
        self.queues = None;
        self.features = None;
    }
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, DeviceBroken> {
        let queues = self.queues.take();
        if queues.is_some() {
            self.seen.lock().unwrap().sleeps += 1;
        }
        Ok(queues)
    }
    fn wake(
        &mut self,
        _: GuestMemoryMmap,
        queues: Vec<Queue>,
        _: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        if self.features.is_none() || self.queues.is_some() {
            return Err(DeviceBroken("not asleep".into()));
        }
        self.seen.lock().unwrap().wakes += 1;
        self.queues = Some(queues);
        Ok(())
    }
    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Fake {
            acked_features: self.features,
        }
    }
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioDeviceStateError> {
        let VirtioDeviceState::Fake { acked_features } = state else {
            return Err(VirtioDeviceStateError::WrongDevice {
                saved: state.device_type(),
                device: 2,
            });
        };
        self.queues = None;
        self.features = *acked_features;
        Ok(())
    }
}

pub(super) fn transport() -> (MmioTransport, Arc<Mutex<Seen>>, EventFd) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let device = FakeDevice {
        seen: seen.clone(),
        config: *b"ABCDEFGH",
        queues: None,
        features: None,
    };
    let t = MmioTransport::new(Box::new(device), mem, irq.try_clone().unwrap()).unwrap();
    (t, seen, irq)
}

pub(super) fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.read(offset, &mut data);
    u32::from_le_bytes(data)
}

pub(super) fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

pub(super) fn set_up_queue(t: &mut MmioTransport, index: u32, base: u64) {
    write32(t, reg::QUEUE_SEL, index);
    write32(t, reg::QUEUE_NUM, 8);
    write32(t, reg::QUEUE_DESC_LOW, base as u32);
    write32(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
    write32(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
    write32(t, reg::QUEUE_READY, 1);
}

pub(super) fn negotiate(t: &mut MmioTransport) {
    write32(t, reg::STATUS, status::ACKNOWLEDGE);
    write32(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    write32(t, reg::DRIVER_FEATURES_SEL, 1);
    write32(t, reg::DRIVER_FEATURES, 1);
    write32(t, reg::DRIVER_FEATURES_SEL, 0);
    write32(t, reg::DRIVER_FEATURES, 1 << 5);
    write32(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
}

pub(super) fn driver_ok(t: &mut MmioTransport) {
    write32(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}
