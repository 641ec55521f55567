//! Virtio devices over the virtio-mmio transport (virtio 1.2, "modern" only).
//!
//! [`VirtioDevice`] is what a device model implements; [`mmio::MmioTransport`] is the register
//! file the guest drives, and owns the device. Queue notifications normally arrive through an
//! ioeventfd and are handled on the device event-loop thread, which calls
//! [`VirtioDevice::process_queue`]; the device signals the guest through [`Interrupt`].

pub mod block;
mod device_queue;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_support;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::interrupt::InterruptLine;
use vm_memory::GuestMemoryMmap;

pub use virtio_queue::{Queue, QueueT};

/// VIRTIO_F_VERSION_1 (feature bit 32): this is a modern device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// VIRTIO_RING_F_EVENT_IDX (feature bit 29): used/avail event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bits (virtio 1.2, 4.2.2).
pub const INTERRUPT_USED_BUFFER: u32 = 1;
/// The device configuration changed (or the device needs a reset).
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// The device's interrupt: the InterruptStatus register plus the line it raises.
pub struct Interrupt {
    status: AtomicU32,
    line: Box<dyn InterruptLine>,
}

impl Interrupt {
    pub fn new(line: impl InterruptLine + 'static) -> Self {
        Self {
            status: AtomicU32::new(0),
            line: Box::new(line),
        }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(INTERRUPT_USED_BUFFER);
    }

    /// Tells the driver the configuration (or the device status) changed.
    pub fn signal_config_change(&self) {
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::warn!("virtio: cannot raise the interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Copies device configuration space `config` at `offset` into `data`; bytes past its end (or an
/// offset past it) read as zero.
pub fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let field = usize::try_from(offset)
        .ok()
        .and_then(|start| config.get(start..))
        .unwrap_or_default();
    for (byte, value) in data.iter_mut().zip(field) {
        *byte = *value;
    }
}

/// A request the guest made that the device cannot recover from; the transport then sets
/// DEVICE_NEEDS_RESET and tells the driver.
#[derive(Debug, thiserror::Error)]
#[error("virtio device broken: {0}")]
pub struct DeviceBroken(pub String);

/// How far a pass over a queue got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Everything the driver made available was served.
    Done,
    /// The pass stopped at the device's cap with more available. The transport notifies the
    /// queue again, so the rest is served after the thread's other ready events: one busy queue
    /// holds neither the device model's lock nor its thread for long.
    MoreWork,
}

/// A virtio device model, driven by [`mmio::MmioTransport`].
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 = block, 1 = network).
    fn device_type(&self) -> u32;
    /// The largest size each queue supports; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers (including VIRTIO_F_VERSION_1).
    fn available_features(&self) -> u64;
    /// Reads device configuration space at `offset`; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space; read-only fields ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// DRIVER_OK: the driver accepted `features` (a subset of what was offered) and set up
    /// `queues` (validated by the transport). From now on the device may process them.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), DeviceBroken>;
    /// The guest notified queue `index`: handle what it made available, or as much of it as
    /// one pass may (see [`Progress`]).
    fn process_queue(&mut self, index: usize) -> Result<Progress, DeviceBroken>;
    /// Device reset (status written 0): drop queues and memory, back to the pre-activation state.
    fn reset(&mut self);
    /// Host-side file descriptors the device wants watched (a TAP, say), in the order
    /// [`VirtioDevice::process_host_event`] numbers them. They are polled edge-triggered: the
    /// device must drain what it can, and may leave the rest until its next queue notification
    /// (for example when the guest has posted no receive buffers).
    fn host_event_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// Host descriptor `index` became readable (or writable).
    fn process_host_event(&mut self, _index: usize) -> Result<(), DeviceBroken> {
        Ok(())
    }
    /// The VM is ending: finish or fail in-flight work and make written data durable.
    fn shutdown(&mut self) {}
    /// Stops the device for a snapshot or a pause and hands its queues back, as they stand:
    /// every chain the device took off an avail ring is either returned to the driver (in the
    /// used ring) or given back to the ring (`next_avail` moved back over it), so that each
    /// queue's `next_used` equals its `next_avail` and a [`VirtioDevice::wake`] with these
    /// queues, here or in a restored VM, neither loses nor repeats a request. What the device
    /// keeps besides (a frame read from the host and not yet delivered, say) stays in it, and in
    /// its saved state. Written data is made durable.
    ///
    /// `Ok(None)` when the device is not active: there are no queues to hand back. On an error
    /// the device stays as it was, active if it was.
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, DeviceBroken>;
    /// Resumes a device that [`VirtioDevice::sleep`] stopped, or that
    /// `VirtioDevice::restore_state` left asleep, with `queues` as sleep handed them back (or a
    /// snapshot kept them) and the features the driver accepted at activation. Unlike
    /// [`VirtioDevice::activate`], what the device kept while asleep is served first.
    ///
    /// Fails when the device is not asleep, or `queues` are not its queues.
    fn wake(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: std::sync::Arc<Interrupt>,
    ) -> Result<(), DeviceBroken>;
}
