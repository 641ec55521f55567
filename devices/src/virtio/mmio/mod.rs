//! The virtio-mmio transport, version 2 register layout (virtio 1.2, section 4.2.2).
//!
//! Register accesses come from vCPU threads through the MMIO bus, under the transport's lock;
//! queue work runs on the device's own thread through a [`DeviceWorker`], which takes only the
//! device model's lock. So a vCPU reading InterruptStatus or writing InterruptACK never waits
//! for the device's host I/O (a disk flush, say). Lock order: transport, then device model;
//! the worker never takes the transport's lock. Whether the device may run its queues and
//! whether it is broken are atomics both sides share.
//!
//! For a snapshot, [`MmioTransport::pause`] puts the device to sleep and takes its queues back,
//! [`MmioTransport::save`] gives the registers, the queues and the device's own state as plain
//! data ([`MmioTransportState`]), and [`MmioTransport::from_state`] builds the transport again
//! around a new device, waking it when the saved driver had it running.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::QueueState;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    check_acked_features, status, DeviceBroken, FeaturesError, Interrupt, Progress, Queue, QueueT,
    VirtioDevice, VirtioDeviceState, VirtioDeviceStateError, INTERRUPT_CONFIG_CHANGE,
    INTERRUPT_USED_BUFFER, VIRTIO_RING_F_EVENT_IDX,
};
use crate::bus::lock;
use crate::interrupt::InterruptLine;
use crate::{BusDevice, VmRequest};

/// Size of one device's MMIO window.
pub const WINDOW_SIZE: u64 = 0x1000;
/// Offset of QueueNotify, where the per-queue ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x050;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"EMBR");
const CONFIG_SPACE_OFFSET: u64 = 0x100;

mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// A device model shared by its transport (vCPU threads: configuration space, activation,
/// reset) and its worker (the device's thread: queues and host I/O).
type SharedDevice = Arc<Mutex<Box<dyn VirtioDevice>>>;

/// What the transport and the worker both see of the device's life, without a lock.
#[derive(Default)]
struct Activity {
    /// Activated and not reset since: the worker may run the queues.
    running: AtomicBool,
    /// DEVICE_NEEDS_RESET: the device hit a guest error it cannot recover from.
    needs_reset: AtomicBool,
}

impl Activity {
    fn may_run(&self) -> bool {
        self.running.load(Ordering::SeqCst) && !self.needs_reset.load(Ordering::SeqCst)
    }
}

/// Sets DEVICE_NEEDS_RESET and tells the driver (virtio 1.2, 2.1.2).
fn mark_broken(activity: &Activity, interrupt: &Interrupt, device_type: u32, why: &str) {
    log::warn!("virtio device {device_type}: {why}; it needs a reset");
    activity.needs_reset.store(true, Ordering::SeqCst);
    interrupt.signal_config_change();
}

/// One queue as a snapshot keeps it: virtio-queue's `QueueState`, field for field.
///
/// Ember's own type, so that serde can be derived for it and a virtio-queue upgrade cannot
/// change the snapshot format unseen. Comes back from a file, so [`MmioTransport::from_state`]
/// checks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct QueueSnapshot {
    /// The largest size the device offers (QueueNumMax).
    pub max_size: u16,
    /// Where the device takes the next chain from the avail ring (free-running).
    pub next_avail: u16,
    /// Where the device puts the next used element (free-running).
    pub next_used: u16,
    /// Whether VIRTIO_RING_F_EVENT_IDX is in use on this queue.
    pub event_idx_enabled: bool,
    /// The size the driver chose (QueueNum).
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the avail (driver) ring.
    pub avail_ring: u64,
    /// Guest address of the used (device) ring.
    pub used_ring: u64,
}

impl From<&Queue> for QueueSnapshot {
    fn from(queue: &Queue) -> Self {
        let q = queue.state();
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// What a virtio-mmio device holds, as plain data for a snapshot: the transport's registers, its
/// queues, and the device's own state.
///
/// Comes back from a file, so [`MmioTransport::from_state`] checks every field against what the
/// driver and the device could have done.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct MmioTransportState {
    /// The Status register as the driver reads it: DEVICE_NEEDS_RESET is set when the device
    /// broke and waits for a reset.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver wrote (DriverFeatures, both halves).
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus: interrupts raised and not acknowledged yet.
    pub interrupt_status: u32,
    /// One per queue of the device, in order.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: VirtioDeviceState,
}

/// Why a transport's state could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// The device is running its queues: [`MmioTransport::pause`] it first.
    #[error("the device is running: pause it before saving")]
    Running,
    /// The device could not be put to sleep (a block image that does not flush, say); it goes
    /// on running.
    #[error("cannot put the device to sleep")]
    Sleep(#[source] DeviceBroken),
}

/// Why a saved transport state was refused, or could not be brought back.
#[derive(Debug, thiserror::Error)]
pub enum MmioTransportStateError {
    /// DRIVER_OK without FEATURES_OK: the transport does not take that order.
    #[error("status {0:#x} has DRIVER_OK without FEATURES_OK")]
    DriverOkWithoutFeaturesOk(u32),
    /// DEVICE_NEEDS_RESET before DRIVER_OK: only a device the driver started can break.
    #[error("status {0:#x} has DEVICE_NEEDS_RESET without DRIVER_OK")]
    NeedsResetWithoutDriverOk(u32),
    /// FEATURES_OK with driver features the transport would have refused.
    #[error("FEATURES_OK with driver features it cannot have")]
    Features(#[source] FeaturesError),
    /// InterruptStatus bits the transport never sets.
    #[error("interrupt status {0:#x} has bits past USED_BUFFER and CONFIG_CHANGE")]
    InterruptStatus(u32),
    /// Not one queue per queue of the device.
    #[error("{saved} saved queues, the device has {device}")]
    QueueCount {
        /// Queues in the state.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A queue's maximum size is not the device's.
    #[error("queue {queue}: maximum size {saved}, the device's is {device}")]
    QueueMaxSize {
        /// The queue.
        queue: usize,
        /// The saved maximum.
        saved: u16,
        /// The device's maximum.
        device: u16,
    },
    /// A queue's size or ring addresses are ones the registers refuse.
    #[error("queue {queue}: not a queue the driver could set up")]
    QueueLayout {
        /// The queue.
        queue: usize,
        /// What virtio-queue refused.
        #[source]
        source: virtio_queue::Error,
    },
    /// A queue the device was never given has moved, or has EVENT_IDX on.
    #[error("queue {queue} was never the device's, yet it has been used")]
    QueueUsedBeforeActivation {
        /// The queue.
        queue: usize,
    },
    /// A queue's EVENT_IDX is not what the negotiated features say.
    #[error("queue {queue}: EVENT_IDX {saved}, the negotiated features say otherwise")]
    EventIdx {
        /// The queue.
        queue: usize,
        /// The saved flag.
        saved: bool,
    },
    /// A queue of a running device has chains taken and not returned: a sleeping device holds
    /// none (see [`VirtioDevice::sleep`]).
    #[error("queue {queue}: next_avail {next_avail} but next_used {next_used}: chains in flight")]
    QueueInFlight {
        /// The queue.
        queue: usize,
        /// Its next_avail.
        next_avail: u16,
        /// Its next_used.
        next_used: u16,
    },
    /// A ready queue of a running device lies outside guest memory.
    #[error("queue {queue} is ready but lies outside guest memory")]
    QueueOutsideMemory {
        /// The queue.
        queue: usize,
    },
    /// DRIVER_OK on a healthy device, but the device state was never activated.
    #[error("the driver set DRIVER_OK, but the device state is not activated")]
    DeviceNotActivated,
    /// The device state is activated without DRIVER_OK.
    #[error("the device state is activated, but the driver never set DRIVER_OK")]
    DeviceActivated,
    /// The device was activated with other features than the driver wrote.
    #[error("the driver wrote features {driver:#x}, the device was activated with {device:#x}")]
    DeviceFeatures {
        /// The transport's driver features.
        driver: u64,
        /// The device state's accepted features.
        device: u64,
    },
    /// The device's own state was refused.
    #[error("the device state was refused")]
    Device(#[from] VirtioDeviceStateError),
    /// The queue eventfds could not be made.
    #[error("cannot create the queue eventfds")]
    EventFd(#[source] std::io::Error),
    /// The state is good, but the device did not take its queues back.
    #[error("cannot wake the device")]
    Wake(#[source] DeviceBroken),
}

/// A virtio device behind its virtio-mmio register window.
pub struct MmioTransport {
    device: SharedDevice,
    /// Fixed for the device's life, read here so that register reads need no device lock.
    device_type: u32,
    available_features: u64,
    queue_max_sizes: Vec<u16>,
    activity: Arc<Activity>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// One per queue: written by KVM (ioeventfd) or by us on a trapped QueueNotify.
    queue_events: Vec<EventFd>,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// The device sleeps and `queues` are the ones it handed back (see [`MmioTransport::pause`]).
    paused: bool,
}

impl MmioTransport {
    /// Wraps `device`, which raises `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: impl InterruptLine + 'static,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("queue size {max}: {e:?}"),
                )
            })?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(Self {
            device_type: device.device_type(),
            available_features: device.available_features(),
            queue_max_sizes: device.queue_max_sizes().to_vec(),
            device: Arc::new(Mutex::new(device)),
            activity: Arc::default(),
            mem,
            interrupt: Arc::new(Interrupt::new(irq)),
            queue_events,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            paused: false,
        })
    }

    /// Stops the device's queue work for a snapshot: the device sleeps (see
    /// [`VirtioDevice::sleep`]) and its queues come back to the transport, as they stand, until
    /// [`MmioTransport::resume`]. Waits for a queue pass in progress. Does nothing when the
    /// device is not running (not activated, broken at activation, or paused already).
    ///
    /// On an error the device goes on running: nothing was saved, and the VM may continue.
    pub fn pause(&mut self) -> Result<(), DeviceBroken> {
        if self.paused || !self.activity.running.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Under the device's lock, as for a reset: a pass that started runs to its end first,
        // and one that waits for the lock finds the device asleep and does nothing.
        let mut device = lock(&self.device);
        let queues = device.sleep()?;
        self.activity.running.store(false, Ordering::SeqCst);
        drop(device);
        if let Some(queues) = queues {
            self.queues = queues;
            self.paused = true;
        }
        Ok(())
    }

    /// Wakes a device [`MmioTransport::pause`] stopped, with its queues; every queue is notified
    /// once, as after activation. Does nothing when not paused. A device that cannot be woken
    /// needs a reset, and the driver is told so.
    pub fn resume(&mut self) -> Result<(), DeviceBroken> {
        if !self.paused {
            return Ok(());
        }
        self.paused = false;
        let (mem, interrupt) = (self.mem.clone(), self.interrupt.clone());
        self.start_device(|device, queues| device.wake(mem, queues, interrupt))
    }

    /// The state a snapshot keeps; refused while the device runs its queues (see
    /// [`MmioTransport::pause`]), since they are the device's then.
    pub fn save(&self) -> Result<MmioTransportState, SaveError> {
        if self.activity.running.load(Ordering::SeqCst) {
            return Err(SaveError::Running);
        }
        let device = lock(&self.device).save_state();
        Ok(MmioTransportState {
            status: self.status(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(QueueSnapshot::from).collect(),
            device,
        })
    }

    /// [`MmioTransport::pause`], then [`MmioTransport::save`]: the device stays paused, for the
    /// caller to [`MmioTransport::resume`] if the VM goes on.
    pub fn pause_and_save(&mut self) -> Result<MmioTransportState, SaveError> {
        self.pause().map_err(SaveError::Sleep)?;
        self.save()
    }

    /// A transport in `state` (which [`MmioTransport::save`] gave) around `device`, made as
    /// [`MmioTransport::new`] makes one (so with new queue eventfds, to register again).
    ///
    /// Refuses a state the driver and the device could not have reached (see the error's
    /// variants): among others, a queue count or maximum size other than the device's, queue
    /// layouts the registers refuse, DRIVER_OK without FEATURES_OK, features not offered, a
    /// device state that does not match the status, and, for a device the driver had running,
    /// ready queues outside `mem` or chains in flight. The device's own state goes through
    /// [`VirtioDevice::restore_state`]. A device the driver had running is woken with its
    /// queues, and every queue notified once; one that had broken stays so until the driver
    /// resets it. Interrupts the driver had not acknowledged are raised again: restore the
    /// interrupt controller behind `irq` first.
    pub fn from_state(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: impl InterruptLine + 'static,
        state: &MmioTransportState,
    ) -> Result<Self, MmioTransportStateError> {
        use MmioTransportStateError as E;
        let mut transport =
            Self::new(device, mem, irq).map_err(MmioTransportStateError::EventFd)?;
        let status = state.status;
        let driver_ok = status & status::DRIVER_OK != 0;
        let needs_reset = status & status::DEVICE_NEEDS_RESET != 0;
        if driver_ok && status & status::FEATURES_OK == 0 {
            return Err(E::DriverOkWithoutFeaturesOk(status));
        }
        if needs_reset && !driver_ok {
            return Err(E::NeedsResetWithoutDriverOk(status));
        }
        if status & status::FEATURES_OK != 0 {
            check_acked_features(state.driver_features, transport.available_features)
                .map_err(E::Features)?;
        }
        let pending = state.interrupt_status;
        if pending & !(INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE) != 0 {
            return Err(E::InterruptStatus(pending));
        }
        let queues = transport.restored_queues(&state.queues)?;

        lock(&transport.device).restore_state(&state.device)?;
        let activated = state.device.acked_features();
        match activated {
            None if driver_ok && !needs_reset => return Err(E::DeviceNotActivated),
            Some(_) if !driver_ok => return Err(E::DeviceActivated),
            Some(device) if device != state.driver_features => {
                return Err(E::DeviceFeatures {
                    driver: state.driver_features,
                    device,
                })
            }
            _ => {}
        }
        let event_idx = activated.is_some_and(|f| f & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let wake = activated.is_some() && !needs_reset;
        for (index, queue) in queues.iter().enumerate() {
            if activated.is_none() && (queue.next_avail() != 0 || queue.next_used() != 0) {
                return Err(E::QueueUsedBeforeActivation { queue: index });
            }
            if queue.event_idx_enabled() != event_idx {
                return Err(E::EventIdx {
                    queue: index,
                    saved: queue.event_idx_enabled(),
                });
            }
            // A broken device is not woken: its queues need not be fit to run.
            if !wake {
                continue;
            }
            if queue.next_avail() != queue.next_used() {
                return Err(E::QueueInFlight {
                    queue: index,
                    next_avail: queue.next_avail(),
                    next_used: queue.next_used(),
                });
            }
            if queue.ready() && !queue.is_valid(&transport.mem) {
                return Err(E::QueueOutsideMemory { queue: index });
            }
        }

        transport.status = status & !status::DEVICE_NEEDS_RESET;
        transport
            .activity
            .needs_reset
            .store(needs_reset, Ordering::SeqCst);
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_sel = state.queue_sel;
        transport.queues = queues;
        if pending != 0 {
            transport.interrupt.signal(pending);
        }
        if wake {
            transport.paused = true;
            transport.resume().map_err(E::Wake)?;
        }
        Ok(transport)
    }

    /// The saved queues, checked against the device's and against what the queue registers
    /// accept.
    fn restored_queues(
        &self,
        saved: &[QueueSnapshot],
    ) -> Result<Vec<Queue>, MmioTransportStateError> {
        use MmioTransportStateError as E;
        if saved.len() != self.queue_max_sizes.len() {
            return Err(E::QueueCount {
                saved: saved.len(),
                device: self.queue_max_sizes.len(),
            });
        }
        saved
            .iter()
            .zip(&self.queue_max_sizes)
            .enumerate()
            .map(|(queue, (snapshot, &device))| {
                if snapshot.max_size != device {
                    return Err(E::QueueMaxSize {
                        queue,
                        saved: snapshot.max_size,
                        device,
                    });
                }
                // Refuses the sizes and ring alignments the registers refuse.
                Queue::try_from(QueueState::from(*snapshot))
                    .map_err(|source| E::QueueLayout { queue, source })
            })
            .collect()
    }

    /// What the device's own thread uses to run its queues (see [`DeviceWorker`]).
    pub fn worker(&self) -> std::io::Result<DeviceWorker> {
        let queue_events = self
            .queue_events
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<_>>()?;
        Ok(DeviceWorker {
            device: self.device.clone(),
            device_type: self.device_type,
            activity: self.activity.clone(),
            interrupt: self.interrupt.clone(),
            queue_events,
        })
    }

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The eventfd for each queue, to register as ioeventfds at QueueNotify with the queue index
    /// as datamatch, and to poll on the device's thread.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        if self.activity.needs_reset.load(Ordering::SeqCst) {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// Notifies queue `index` through its eventfd, as KVM does for the guest's QueueNotify
    /// write: the device's thread then processes the queue.
    fn notify_queue(&self, index: usize) {
        match self.queue_events.get(index) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    log::warn!("virtio: cannot notify queue {index}: {e}");
                }
            }
            None => log::debug!("virtio: notify for queue {index}, which does not exist"),
        }
    }

    fn mark_broken(&self, why: &str) {
        mark_broken(&self.activity, &self.interrupt, self.device_type, why);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK (virtio 1.2, 3.1.1).
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.available_features as u32,
                1 => (self.available_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                // Features are fixed once FEATURES_OK is set.
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if self.queue_setup_allowed() => {
                // A size that does not fit in 16 bits is invalid; leave the queue as it was.
                if let (Some(q), Ok(size)) = (self.selected_queue(), u16::try_from(value)) {
                    q.set_size(size);
                }
            }
            reg::QUEUE_READY if self.queue_setup_allowed() => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if self.queue_setup_allowed() =>
            {
                if let Some(q) = self.selected_queue() {
                    match offset {
                        reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(value), None),
                        reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(value)),
                        reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(value), None),
                        reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(value)),
                        reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(value), None),
                        _ => q.set_used_ring_address(None, Some(value)),
                    }
                }
            }
            // Normally KVM consumes this write through the ioeventfd; a trapped one (no
            // ioeventfd matched) is forwarded to the event loop the same way.
            reg::QUEUE_NOTIFY => self.notify_queue(value as usize),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            _ => {
                log::debug!("virtio: write {value:#x} to read-only or unknown register {offset:#x}")
            }
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // DEVICE_NEEDS_RESET is the device's to set (it lives in `activity`), never the driver's.
        let current = self.status();
        let added = value & !current;
        if value & current != current {
            // The driver may not clear bits except by writing 0 (reset).
            log::debug!("virtio: status {current:#x} -> {value:#x} clears bits; ignored");
            return;
        }
        let value = value & !status::DEVICE_NEEDS_RESET;
        if added & status::FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK unset tells the driver the features were refused; a DRIVER_OK
            // in the same write goes with it (see below).
            self.status = value & !(status::FEATURES_OK | status::DRIVER_OK);
            return;
        }
        if added & status::DRIVER_OK != 0 && value & status::FEATURES_OK == 0 {
            // The driver must not set DRIVER_OK before FEATURES_OK (virtio 1.2, 3.1.1). Taking
            // it would leave a device that says DRIVER_OK yet was never activated, which no
            // later write can activate; refusing it keeps "DRIVER_OK implies FEATURES_OK" true,
            // which a saved state can then be held to.
            log::debug!("virtio: DRIVER_OK without FEATURES_OK; ignored");
            return;
        }
        self.status = value;
        if added & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn features_acceptable(&self) -> bool {
        check_acked_features(self.driver_features, self.available_features).is_ok()
    }

    fn activate(&mut self) {
        if let Some(index) = self
            .queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&self.mem))
        {
            self.mark_broken(&format!(
                "queue {index} is set up outside guest memory or badly"
            ));
            return;
        }
        let (mem, interrupt) = (self.mem.clone(), self.interrupt.clone());
        let features = self.driver_features;
        // A device that refuses its queues is marked broken, which is how the driver learns.
        if self
            .start_device(|device, queues| device.activate(mem, features, queues, interrupt))
            .is_err()
        {
            log::debug!("virtio: activation failed");
        }
    }

    /// Hands the queues to the device with `start` (activation or wake) and lets it run them;
    /// a device that refuses them is marked broken.
    fn start_device(
        &mut self,
        start: impl FnOnce(&mut dyn VirtioDevice, Vec<Queue>) -> Result<(), DeviceBroken>,
    ) -> Result<(), DeviceBroken> {
        let queues = std::mem::take(&mut self.queues);
        // The transport keeps fresh copies so QueueNumMax etc. still answer after activation.
        self.queues = fresh_queues(&self.queue_max_sizes);
        for (fresh, used) in self.queues.iter_mut().zip(&queues) {
            fresh.set_ready(used.ready());
        }
        let mut device = lock(&self.device);
        match start(device.as_mut(), queues) {
            Ok(()) => {
                self.activity.running.store(true, Ordering::SeqCst);
                // One pass over every queue on the event loop: a driver may have made buffers
                // available before DRIVER_OK, and a backend's readiness edge may be long gone.
                for index in 0..self.queue_events.len() {
                    self.notify_queue(index);
                }
                Ok(())
            }
            Err(e) => {
                drop(device);
                self.mark_broken(&e.to_string());
                Err(e)
            }
        }
    }

    fn reset(&mut self) {
        // Under the device's lock: a queue pass in progress ends first, and one that failed
        // marks the device broken before this clears it, never after.
        let mut device = lock(&self.device);
        device.reset();
        self.activity.running.store(false, Ordering::SeqCst);
        self.activity.needs_reset.store(false, Ordering::SeqCst);
        drop(device);
        self.paused = false;
        self.queues = fresh_queues(&self.queue_max_sizes);
        self.interrupt.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
    }
}

/// Unconfigured queues of the given maximum sizes.
fn fresh_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .filter_map(|&max| Queue::new(max).ok())
        .collect()
}

/// What a device's own thread needs to run its queues and host I/O, without the transport's
/// lock: the device model (locked for one pass at a time), the queue eventfds (to requeue a pass
/// that stopped at the device's cap), and the shared activity flags.
pub struct DeviceWorker {
    device: SharedDevice,
    device_type: u32,
    activity: Arc<Activity>,
    interrupt: Arc<Interrupt>,
    queue_events: Vec<EventFd>,
}

impl DeviceWorker {
    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The queue eventfds, in queue order, to poll.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Host-side descriptors the device wants watched (see [`VirtioDevice::host_event_fds`]).
    pub fn host_event_fds(&self) -> Vec<RawFd> {
        lock(&self.device).host_event_fds()
    }

    /// Runs a pass over queue `index` (the caller has consumed its notification). A pass that
    /// stops at the device's cap notifies the queue again, so the rest is served after the
    /// other ready events.
    pub fn process_queue(&self, index: usize) {
        self.run(
            |device| device.process_queue(index),
            |worker| worker.notify(index),
        );
    }

    /// Host descriptor `index` is ready.
    pub fn process_host_event(&self, index: usize) {
        self.run(
            |device| device.process_host_event(index).map(|()| Progress::Done),
            |_| {},
        );
    }

    fn run(
        &self,
        pass: impl FnOnce(&mut dyn VirtioDevice) -> Result<Progress, DeviceBroken>,
        more_work: impl FnOnce(&Self),
    ) {
        if !self.activity.may_run() {
            return;
        }
        let mut device = lock(&self.device);
        match pass(device.as_mut()) {
            Ok(Progress::Done) => {}
            Ok(Progress::MoreWork) => more_work(self),
            // Still under the device's lock: see MmioTransport::reset.
            Err(e) => mark_broken(
                &self.activity,
                &self.interrupt,
                self.device_type,
                &e.to_string(),
            ),
        }
    }

    fn notify(&self, index: usize) {
        if let Some(event) = self.queue_events.get(index) {
            if let Err(e) = event.write(1) {
                log::warn!("virtio: cannot notify queue {index}: {e}");
            }
        }
    }

    /// The VM is ending: let the device finish and make its data durable.
    pub fn shutdown(&self) {
        lock(&self.device).shutdown();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32-bit only (virtio 1.2, 4.2.2.2).
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset.is_multiple_of(4)) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
        None
    }
}

/// Brings `transport` up as a driver would: features, then each queue at its (descriptor table,
/// avail ring, used ring) addresses with the device's largest size, then DRIVER_OK.
#[cfg(test)]
pub(crate) fn bring_up(transport: &mut MmioTransport, features: u64, rings: &[(u64, u64, u64)]) {
    let mut write = |offset, value: u32| {
        transport.write(offset, &value.to_le_bytes());
    };
    let driver = status::ACKNOWLEDGE | status::DRIVER;
    write(reg::STATUS, driver);
    for (sel, half) in [(0, features as u32), (1, (features >> 32) as u32)] {
        write(reg::DRIVER_FEATURES_SEL, sel);
        write(reg::DRIVER_FEATURES, half);
    }
    write(reg::STATUS, driver | status::FEATURES_OK);
    for (index, &(desc, avail, used)) in (0..).zip(rings) {
        write(reg::QUEUE_SEL, index);
        for (low, address) in [
            (reg::QUEUE_DESC_LOW, desc),
            (reg::QUEUE_DRIVER_LOW, avail),
            (reg::QUEUE_DEVICE_LOW, used),
        ] {
            write(low, address as u32);
            write(low + 4, (address >> 32) as u32);
        }
        write(reg::QUEUE_READY, 1);
    }
    write(
        reg::STATUS,
        driver | status::FEATURES_OK | status::DRIVER_OK,
    );
}

#[cfg(test)]
mod tests {
    use super::super::{
        DeviceBroken, FeaturesError, VirtioDeviceState, VirtioDeviceStateError,
        INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER, VIRTIO_F_VERSION_1,
    };
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    /// What the fake device saw.
    #[derive(Default)]
    struct Seen {
        activations: usize,
        resets: usize,
        processed: Vec<usize>,
        features: u64,
        fail_next: bool,
        /// The next pass stops at its cap with work left.
        more_work_next: bool,
        /// The next pass waits for a message here, as a pass blocked in host I/O would.
        hold_next: Option<std::sync::mpsc::Receiver<()>>,
        sleeps: usize,
        wakes: usize,
    }

    struct FakeDevice {
        seen: Arc<Mutex<Seen>>,
        config: [u8; 8],
        /// The queues while active; each pass serves one chain of its queue, as far as the
        /// queue positions tell.
        queues: Option<Vec<Queue>>,
        /// Features while activated (active or asleep).
        features: Option<u64>,
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
        fn restore_state(
            &mut self,
            state: &VirtioDeviceState,
        ) -> Result<(), VirtioDeviceStateError> {
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

    fn transport() -> (MmioTransport, Arc<Mutex<Seen>>, EventFd) {
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

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn set_up_queue(t: &mut MmioTransport, index: u32, base: u64) {
        write32(t, reg::QUEUE_SEL, index);
        write32(t, reg::QUEUE_NUM, 8);
        write32(t, reg::QUEUE_DESC_LOW, base as u32);
        write32(t, reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        write32(t, reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        write32(t, reg::QUEUE_READY, 1);
    }

    fn negotiate(t: &mut MmioTransport) {
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

    fn driver_ok(t: &mut MmioTransport) {
        write32(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn identification_registers() {
        let (mut t, _, _) = transport();
        assert_eq!(read32(&mut t, reg::MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(read32(&mut t, reg::VERSION), 2);
        assert_eq!(read32(&mut t, reg::DEVICE_ID), 2);
        assert_eq!(read32(&mut t, reg::DEVICE_FEATURES), 1 << 5);
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut t, reg::DEVICE_FEATURES), 1);
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(read32(&mut t, reg::DEVICE_FEATURES), 0);
        write32(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 8);
        write32(&mut t, reg::QUEUE_SEL, 9);
        assert_eq!(read32(&mut t, reg::QUEUE_NUM_MAX), 0);
        // Unaligned or narrow register access reads zero.
        let mut narrow = [0xffu8; 2];
        t.read(reg::MAGIC_VALUE, &mut narrow);
        assert_eq!(narrow, [0, 0]);
        let mut config = [0u8; 3];
        t.read(CONFIG_SPACE_OFFSET + 2, &mut config);
        assert_eq!(&config, b"CDE");
    }

    #[test]
    fn full_negotiation_activates_with_the_driver_features() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t);
        assert_eq!(
            read32(&mut t, reg::STATUS) & status::FEATURES_OK,
            status::FEATURES_OK
        );
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0x2_0000);
        driver_ok(&mut t);
        let s = seen.lock().unwrap();
        assert_eq!(s.activations, 1);
        assert_eq!(s.features, (1 << 32) | (1 << 5));
    }

    #[test]
    fn features_the_device_does_not_offer_are_refused() {
        let (mut t, _, _) = transport();
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, reg::DRIVER_FEATURES, 1 << 7);
        write32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(read32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Without VERSION_1 too.
        let (mut t, _, _) = transport();
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        write32(
            &mut t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(read32(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_needs_features_ok() {
        let (mut t, seen, _) = transport();
        write32(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write32(&mut t, reg::DRIVER_FEATURES, 1);
        let early = status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK;
        write32(&mut t, reg::STATUS, early);
        assert_eq!(
            read32(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // Refused features take a DRIVER_OK of the same write with them.
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        write32(&mut t, reg::DRIVER_FEATURES, 1 << 7);
        write32(&mut t, reg::STATUS, early | status::FEATURES_OK);
        assert_eq!(
            read32(&mut t, reg::STATUS),
            status::ACKNOWLEDGE | status::DRIVER
        );
        // Both at once with good features activate.
        write32(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        write32(&mut t, reg::STATUS, early | status::FEATURES_OK);
        assert_eq!(read32(&mut t, reg::STATUS), early | status::FEATURES_OK);
        assert_eq!(seen.lock().unwrap().activations, 1);
    }

    #[test]
    fn queues_outside_memory_mark_the_device_broken() {
        let (mut t, seen, irq) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0xfff_0000);
        driver_ok(&mut t);
        assert_eq!(seen.lock().unwrap().activations, 0);
        assert_ne!(read32(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(irq.read().unwrap(), 1);
    }

    #[test]
    fn queue_registers_are_locked_outside_setup() {
        let (mut t, _, _) = transport();
        // Before FEATURES_OK.
        set_up_queue(&mut t, 0, 0x1_0000);
        assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
    }

    #[test]
    fn reset_returns_to_the_initial_state() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0x1_0000);
        driver_ok(&mut t);
        t.worker().unwrap().process_queue(0);
        write32(&mut t, reg::STATUS, 0);
        assert_eq!(read32(&mut t, reg::STATUS), 0);
        write32(&mut t, reg::QUEUE_SEL, 0);
        assert_eq!(read32(&mut t, reg::QUEUE_READY), 0);
        t.worker().unwrap().process_queue(0);
        let s = seen.lock().unwrap();
        assert_eq!(s.resets, 1);
        assert_eq!(s.processed, vec![0], "no processing after reset");
        drop(s);
        // And it can be brought up again.
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0x1_0000);
        driver_ok(&mut t);
        assert_eq!(seen.lock().unwrap().activations, 2);
    }

    #[test]
    fn a_device_error_needs_reset_and_stops_processing() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0x1_0000);
        driver_ok(&mut t);
        seen.lock().unwrap().fail_next = true;
        t.worker().unwrap().process_queue(0);
        t.worker().unwrap().process_queue(0);
        assert_eq!(seen.lock().unwrap().processed, vec![0]);
        assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
        write32(&mut t, reg::INTERRUPT_ACK, 2);
        assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);
    }

    #[test]
    fn a_pass_with_work_left_notifies_its_queue_again() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0x2_0000);
        driver_ok(&mut t);
        // Activation kicks every queue once; the event loop reads those before processing.
        for event in t.queue_events() {
            assert_eq!(event.read().unwrap(), 1);
        }
        seen.lock().unwrap().more_work_next = true;
        t.worker().unwrap().process_queue(1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert!(t.queue_events()[0].read().is_err());
        // Once done, no more notifications of its own.
        t.worker().unwrap().process_queue(1);
        assert!(t.queue_events()[1].read().is_err());
        assert_eq!(seen.lock().unwrap().processed, vec![1, 1]);
        assert_eq!(t.status() & status::DEVICE_NEEDS_RESET, 0);
    }

    #[test]
    fn registers_answer_while_a_queue_pass_waits_for_host_io() {
        let (mut t, seen, _) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0x1_0000);
        driver_ok(&mut t);
        let (release, hold) = std::sync::mpsc::channel();
        seen.lock().unwrap().hold_next = Some(hold);
        let worker = t.worker().unwrap();
        let pass = std::thread::spawn(move || worker.process_queue(0));
        // The pass is now stuck "in host I/O" holding the device model; the guest's interrupt
        // handler still reads and acknowledges its interrupt.
        while seen.lock().unwrap().hold_next.is_some() {
            std::thread::yield_now();
        }
        assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), 0);
        write32(&mut t, reg::INTERRUPT_ACK, 1);
        assert_ne!(read32(&mut t, reg::STATUS) & status::DRIVER_OK, 0);
        release.send(()).unwrap();
        pass.join().unwrap();
        assert_eq!(seen.lock().unwrap().processed, vec![0]);
    }

    /// Every register a driver reads, under every selector that matters.
    fn registers(t: &mut MmioTransport) -> Vec<u32> {
        // The selectors are write-only: taken from the transport, to be put back.
        let sels = (t.device_features_sel, t.queue_sel);
        let mut seen = Vec::new();
        for offset in [reg::DEVICE_ID, reg::INTERRUPT_STATUS, reg::STATUS] {
            seen.push(read32(t, offset));
        }
        for sel in 0..3 {
            write32(t, reg::DEVICE_FEATURES_SEL, sel);
            seen.push(read32(t, reg::DEVICE_FEATURES));
            write32(t, reg::QUEUE_SEL, sel);
            seen.push(read32(t, reg::QUEUE_NUM_MAX));
            seen.push(read32(t, reg::QUEUE_READY));
        }
        // The selectors as they were, and the driver features, also write-only.
        write32(t, reg::DEVICE_FEATURES_SEL, sels.0);
        write32(t, reg::QUEUE_SEL, sels.1);
        seen.extend([t.device_features_sel, t.driver_features_sel, t.queue_sel]);
        seen.extend([t.driver_features as u32, (t.driver_features >> 32) as u32]);
        seen
    }

    fn restored(
        state: &MmioTransportState,
    ) -> Result<(MmioTransport, Arc<Mutex<Seen>>, EventFd), MmioTransportStateError> {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let device = FakeDevice {
            seen: seen.clone(),
            config: *b"ABCDEFGH",
            queues: None,
            features: None,
        };
        let t = MmioTransport::from_state(Box::new(device), mem, irq.try_clone().unwrap(), state)?;
        Ok((t, seen, irq))
    }

    /// A driver's setup, queue 0 served twice and queue 1 once, a used-buffer interrupt not
    /// acknowledged yet, odd selectors; paused and saved.
    fn running_and_saved() -> (MmioTransport, Arc<Mutex<Seen>>, MmioTransportState) {
        let (mut t, seen, _) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0x1_0000);
        set_up_queue(&mut t, 1, 0x2_0000);
        driver_ok(&mut t);
        let worker = t.worker().unwrap();
        for index in [0, 0, 1] {
            worker.process_queue(index);
        }
        t.interrupt.signal_used_queue();
        write32(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        write32(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        write32(&mut t, reg::QUEUE_SEL, 1);
        assert!(matches!(t.save(), Err(SaveError::Running)));
        let state = t.pause_and_save().unwrap();
        (t, seen, state)
    }

    #[test]
    fn a_restored_transport_reads_back_the_same_registers() {
        let (mut saved, saved_seen, state) = running_and_saved();
        assert_eq!(saved_seen.lock().unwrap().sleeps, 1);
        assert_eq!(state.status, 0xf);
        assert_eq!(state.interrupt_status, INTERRUPT_USED_BUFFER);
        let positions: Vec<_> = state.queues.iter().map(|q| q.next_avail).collect();
        assert_eq!(positions, [2, 1]);
        assert_eq!(
            state.device,
            VirtioDeviceState::Fake {
                acked_features: Some((1 << 32) | (1 << 5))
            }
        );
        // Paused: a queue pass does nothing.
        saved.worker().unwrap().process_queue(0);
        assert_eq!(saved_seen.lock().unwrap().processed.len(), 3);

        let (mut t, seen, irq) = restored(&state).unwrap();
        assert_eq!(registers(&mut t), registers(&mut saved));
        // Woken with its queues, every queue kicked, the unacknowledged interrupt raised again.
        let (wakes, activations) = {
            let seen = seen.lock().unwrap();
            (seen.wakes, seen.activations)
        };
        assert_eq!((wakes, activations), (1, 0));
        for event in t.queue_events() {
            assert_eq!(event.read().unwrap(), 1);
        }
        assert_eq!(irq.read().unwrap(), 1);
        t.worker().unwrap().process_queue(0);
        assert_eq!(seen.lock().unwrap().processed, vec![0]);
        let again = t.pause_and_save().unwrap();
        assert_eq!(again.queues[0].next_avail, 3);
        assert_eq!(again.queues[1], state.queues[1]);
        assert_eq!(read32(&mut t, reg::INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);

        // The saved VM goes on too.
        saved.resume().unwrap();
        assert_eq!(saved_seen.lock().unwrap().wakes, 1);
        saved.worker().unwrap().process_queue(0);
        assert_eq!(saved_seen.lock().unwrap().processed.len(), 4);
        saved.resume().unwrap();
        assert_eq!(saved_seen.lock().unwrap().wakes, 1);
    }

    #[test]
    fn a_transport_saved_during_setup_restores_unactivated() {
        let (mut t, _, _) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 1, 0x2_0000);
        let state = t.pause_and_save().unwrap();
        assert_eq!(state.device.acked_features(), None);
        let (mut restored, seen, _) = restored(&state).unwrap();
        assert_eq!(registers(&mut restored), registers(&mut t));
        assert_eq!(restored.save().unwrap(), state);
        // The driver carries on where it was: DRIVER_OK activates with the queue it set up.
        set_up_queue(&mut restored, 0, 0x1_0000);
        driver_ok(&mut restored);
        assert_eq!(seen.lock().unwrap().activations, 1);
        assert_eq!(seen.lock().unwrap().wakes, 0);
    }

    #[test]
    fn a_broken_device_restores_broken_until_reset() {
        let (mut t, _, _) = transport();
        negotiate(&mut t);
        set_up_queue(&mut t, 0, 0xfff_0000);
        driver_ok(&mut t);
        let state = t.pause_and_save().unwrap();
        assert_ne!(state.status & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(state.interrupt_status, INTERRUPT_CONFIG_CHANGE);
        // Its queue lies outside memory, but it is never woken.
        let (mut restored, seen, _) = restored(&state).unwrap();
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(seen.lock().unwrap().wakes, 0);
        write32(&mut restored, reg::STATUS, 0);
        assert_eq!(read32(&mut restored, reg::STATUS), 0);
        negotiate(&mut restored);
        set_up_queue(&mut restored, 0, 0x1_0000);
        driver_ok(&mut restored);
        assert_eq!(seen.lock().unwrap().activations, 1);
    }

    #[test]
    fn a_state_the_transport_could_not_reach_is_refused() {
        use MmioTransportStateError as E;
        let (_, _, good) = running_and_saved();
        let refused = |change: &dyn Fn(&mut MmioTransportState)| {
            let mut state = good.clone();
            change(&mut state);
            restored(&state).err().unwrap()
        };
        let all = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        assert!(matches!(
            refused(&|s| s.status = all & !status::FEATURES_OK),
            E::DriverOkWithoutFeaturesOk(0x7)
        ));
        assert!(matches!(
            refused(&|s| s.status = status::DEVICE_NEEDS_RESET | status::FEATURES_OK),
            E::NeedsResetWithoutDriverOk(0x48)
        ));
        assert!(matches!(
            refused(&|s| s.driver_features |= 1 << 7),
            E::Features(FeaturesError::NotOffered(0x80))
        ));
        assert!(matches!(
            refused(&|s| s.driver_features = 1 << 5),
            E::Features(FeaturesError::NoVersion1)
        ));
        assert!(matches!(
            refused(&|s| s.interrupt_status = 5),
            E::InterruptStatus(5)
        ));
        assert!(matches!(
            refused(&|s| {
                s.queues.pop();
            }),
            E::QueueCount {
                saved: 1,
                device: 2
            }
        ));
        assert!(matches!(
            refused(&|s| s.queues[1].max_size = 16),
            E::QueueMaxSize {
                queue: 1,
                saved: 16,
                device: 8
            }
        ));
        for size in [0, 6, 16] {
            assert!(matches!(
                refused(&|s| s.queues[1].size = size),
                E::QueueLayout {
                    queue: 1,
                    source: virtio_queue::Error::InvalidSize
                }
            ));
        }
        assert!(matches!(
            refused(&|s| s.queues[0].desc_table += 8),
            E::QueueLayout {
                queue: 0,
                source: virtio_queue::Error::InvalidDescTableAlign
            }
        ));
        assert!(matches!(
            refused(&|s| s.queues[0].used_ring += 2),
            E::QueueLayout {
                queue: 0,
                source: virtio_queue::Error::InvalidUsedRingAlign
            }
        ));
        assert!(matches!(
            refused(&|s| s.device = VirtioDeviceState::Fake {
                acked_features: None
            }),
            E::DeviceNotActivated
        ));
        assert!(matches!(
            refused(&|s| s.status = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
            E::DeviceActivated
        ));
        assert!(matches!(
            refused(&|s| s.driver_features = 1 << 32),
            E::DeviceFeatures {
                driver: 0x1_0000_0000,
                device: 0x1_0000_0020
            }
        ));
        assert!(matches!(
            refused(&|s| s.queues[1].event_idx_enabled = true),
            E::EventIdx {
                queue: 1,
                saved: true
            }
        ));
        assert!(matches!(
            refused(&|s| s.queues[0].next_used = 1),
            E::QueueInFlight {
                queue: 0,
                next_avail: 2,
                next_used: 1
            }
        ));
        assert!(matches!(
            refused(&|s| s.queues[1].used_ring = 0xfff_0000),
            E::QueueOutsideMemory { queue: 1 }
        ));
        let (mut t, _, _) = transport();
        negotiate(&mut t);
        let setup = t.save().unwrap();
        let mut moved = setup.clone();
        moved.queues[1].next_avail = 1;
        assert!(matches!(
            restored(&moved).err().unwrap(),
            E::QueueUsedBeforeActivation { queue: 1 }
        ));
        // Device::restore_state judges the device's part.
        let mut net = setup.clone();
        net.device = VirtioDeviceState::Net(crate::virtio::net::NetState {
            mac: [2, 0, 0, 0, 0, 1],
            acked_features: None,
            guest_offloads: 0,
            deferred_frame: None,
        });
        assert!(matches!(
            restored(&net).err().unwrap(),
            E::Device(VirtioDeviceStateError::WrongDevice {
                saved: 1,
                device: 2
            })
        ));
        // What a guest writes freely takes any value.
        let mut free = setup;
        free.status |= 0x100 | status::FAILED;
        free.device_features_sel = u32::MAX;
        free.queue_sel = 77;
        assert_eq!(restored(&free).unwrap().0.save().unwrap(), free);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_saved_transport_round_trips_through_json() {
        let (_, _, state) = running_and_saved();
        let json = serde_json::to_string(&state).unwrap();
        let back: MmioTransportState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let (mut t, _, _) = restored(&back).unwrap();
        assert_eq!(t.pause_and_save().unwrap(), state);
    }

    #[test]
    fn trapped_notify_is_forwarded_to_the_queue_event() {
        let (mut t, _, _) = transport();
        write32(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        write32(&mut t, reg::QUEUE_NOTIFY, 99);
        assert!(t.queue_events()[0].read().is_err());
    }
}
