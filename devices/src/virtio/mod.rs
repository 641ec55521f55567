//! Virtio devices over the virtio-mmio transport (virtio 1.2, "modern" only).
//!
//! [`VirtioDevice`] is what a device model implements; [`mmio::MmioTransport`] is the register
//! file the guest drives, and owns the device. Queue notifications normally arrive through an
//! ioeventfd and are handled on the device event-loop thread, which calls
//! [`VirtioDevice::process_queue`]; the device signals the guest through [`Interrupt`].

pub mod block;
mod device_queue;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(test)]
pub(crate) mod test_support;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use crate::interrupt::InterruptLine;
use vm_memory::GuestMemoryMmap;

pub use virtio_queue::{Queue, QueueT};

/// VIRTIO_F_VERSION_1 (feature bit 32): this is a modern device.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// VIRTIO_RING_F_EVENT_IDX (feature bit 29): used/avail event suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is set up: the device may serve its queues.
    pub const DRIVER_OK: u32 = 4;
    /// The driver has accepted its features; they are fixed from now on.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from; only a reset helps.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
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
    /// Set while a backend outside ember signals used buffers straight to the guest (a vhost-user
    /// daemon through a KVM irqfd): this register never sees those interrupts, so it always
    /// reports used buffers, and the driver looks at its queues on every interrupt of the line
    /// (finding nothing new is harmless). Firecracker's vhost-user block device does the same.
    used_buffers_signalled_elsewhere: AtomicBool,
}

impl Interrupt {
    /// An interrupt with nothing pending, raising `line`.
    pub fn new(line: impl InterruptLine + 'static) -> Self {
        Self {
            status: AtomicU32::new(0),
            line: Box::new(line),
            used_buffers_signalled_elsewhere: AtomicBool::new(false),
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

    /// Says whether used-buffer interrupts reach the guest without this register (see
    /// `used_buffers_signalled_elsewhere`); a reset clears it.
    pub fn set_used_buffers_signalled_elsewhere(&self, elsewhere: bool) {
        self.used_buffers_signalled_elsewhere
            .store(elsewhere, Ordering::SeqCst);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        let mut status = self.status.load(Ordering::SeqCst);
        if self.used_buffers_signalled_elsewhere.load(Ordering::SeqCst) {
            status |= INTERRUPT_USED_BUFFER;
        }
        status
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.used_buffers_signalled_elsewhere
            .store(false, Ordering::SeqCst);
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

/// What a virtio device keeps of its own, beside its queues (which the transport saves), as
/// plain data for a snapshot: one variant per device model. Comes back from a file, so
/// [`VirtioDevice::restore_state`] checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum VirtioDeviceState {
    /// A virtio-block device.
    Block(block::BlockState),
    /// A virtio-net device.
    Net(net::NetState),
    /// A virtio-vsock device: its identity only. Its connections are host sockets a snapshot
    /// cannot carry: a restored device resets them (see `Vsock`'s `wake`).
    Vsock {
        /// The guest's context ID.
        guest_cid: u64,
        /// The features the driver accepted at DRIVER_OK; `None` when not activated.
        #[cfg_attr(feature = "serde", serde(default))]
        acked_features: Option<u64>,
        /// The host port the next host-initiated connection gets: a restored device goes on
        /// from there, since the guest may still hold sockets of connections it closed to the
        /// ports before (a new connection from one of them would be refused).
        #[cfg_attr(feature = "serde", serde(default))]
        next_host_port: Option<u32>,
    },
    /// A virtio-fs device that was never activated (or was reset): its tag only. An active one
    /// cannot sleep (see `Fs`'s `sleep`).
    Fs {
        /// The tag the guest mounts the file system by.
        tag: String,
    },
    /// The transport tests' stand-in device.
    #[cfg(test)]
    Fake {
        /// The features the driver accepted, if it activated the device.
        acked_features: Option<u64>,
    },
}

impl VirtioDeviceState {
    /// The virtio device ID of the device the state was saved from.
    pub fn device_type(&self) -> u32 {
        match self {
            Self::Block(_) => block::DEVICE_TYPE_BLOCK,
            Self::Net(_) => net::DEVICE_TYPE_NET,
            Self::Vsock { .. } => vsock::DEVICE_TYPE_VSOCK,
            Self::Fs { .. } => fs::DEVICE_TYPE_FS,
            #[cfg(test)]
            Self::Fake { .. } => block::DEVICE_TYPE_BLOCK,
        }
    }

    /// The features the driver accepted at DRIVER_OK; `None` when the device was not activated
    /// (or was reset since).
    pub fn acked_features(&self) -> Option<u64> {
        match self {
            Self::Block(state) => state.acked_features,
            Self::Net(state) => state.acked_features,
            Self::Vsock { acked_features, .. } => *acked_features,
            Self::Fs { .. } => None,
            #[cfg(test)]
            Self::Fake { acked_features } => *acked_features,
        }
    }
}

/// Why a device's saved state was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VirtioDeviceStateError {
    /// The state is another kind of device's.
    #[error(
        "a state saved from virtio device type {saved} cannot restore a device of type {device}"
    )]
    WrongDevice {
        /// The device type of the state.
        saved: u32,
        /// The device type of the device being restored.
        device: u32,
    },
    /// The accepted features are not a set the driver could have had accepted.
    #[error(transparent)]
    Features(#[from] FeaturesError),
    /// The block device's own fields are wrong.
    #[error("virtio-block: {0}")]
    Block(#[from] block::BlockStateError),
    /// The network device's own fields are wrong.
    #[error("virtio-net: {0}")]
    Net(#[from] net::NetStateError),
    /// A vsock state for another guest CID.
    #[error("virtio-vsock: the state is for guest CID {saved}, the device has {device}")]
    VsockCid {
        /// The CID in the state.
        saved: u64,
        /// The device's CID.
        device: u64,
    },
    /// A virtio-fs state for another tag.
    #[error("virtio-fs: the state is for tag {saved:?}, the device has {device:?}")]
    FsTag {
        /// The tag in the state.
        saved: String,
        /// The device's tag.
        device: String,
    },
}

/// Why a set of accepted features is not one the transport lets a driver set FEATURES_OK with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeaturesError {
    /// Features the device does not offer.
    #[error("features {0:#x} were accepted but are not offered")]
    NotOffered(u64),
    /// No VIRTIO_F_VERSION_1: only modern drivers are served.
    #[error("VIRTIO_F_VERSION_1 was not accepted")]
    NoVersion1,
}

/// Whether a driver may accept `acked` of the `offered` features: a subset, with VERSION_1.
pub(crate) fn check_acked_features(acked: u64, offered: u64) -> Result<(), FeaturesError> {
    let not_offered = acked & !offered;
    if not_offered != 0 {
        return Err(FeaturesError::NotOffered(not_offered));
    }
    if acked & (1 << VIRTIO_F_VERSION_1) == 0 {
        return Err(FeaturesError::NoVersion1);
    }
    Ok(())
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
    /// What the device keeps of its own, for a snapshot. Take it while the device sleeps (or
    /// was never activated): its queues, which the transport saves, must match it.
    fn save_state(&self) -> VirtioDeviceState;
    /// Running totals of what the device served, by name (`requests`, `read_bytes`, …), for the
    /// monitor's metrics; none by default.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Puts the device in `state` (which [`VirtioDevice::save_state`] gave), replacing whatever
    /// it held as a reset would: asleep with the saved features if the state was taken from an
    /// activated device (a [`VirtioDevice::wake`] with the saved queues resumes it), reset
    /// otherwise. Host-side resources (the image, the TAP) are the ones the device was made with.
    ///
    /// Refuses, changing nothing, a state the device could not have been in.
    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioDeviceStateError>;
}
