//! The transport's snapshot state: [`MmioTransport::pause`] and [`MmioTransport::resume`],
//! [`MmioTransport::save`] into a [`MmioTransportState`] (registers, [`QueueSnapshot`]s and the
//! device's own state), and [`MmioTransport::from_state`], which checks a saved state before it
//! builds a transport from it.

use std::sync::atomic::Ordering;

use virtio_queue::QueueState;
use vm_memory::GuestMemoryMmap;

use super::MmioTransport;
use crate::bus::lock;
use crate::interrupt::InterruptLine;
use crate::virtio::{
    check_acked_features, status, DeviceBroken, FeaturesError, Queue, QueueT, VirtioDevice,
    VirtioDeviceState, VirtioDeviceStateError, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER,
    VIRTIO_RING_F_EVENT_IDX,
};

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

impl MmioTransport {
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
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::super::reg;
    use super::super::test_support::{
        driver_ok, negotiate, read32, set_up_queue, transport, write32, FakeDevice, Seen,
    };
    use super::*;

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
}
