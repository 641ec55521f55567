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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{check_acked_features, status, DeviceBroken, Interrupt, Queue, QueueT, VirtioDevice};
use crate::bus::lock;
use crate::interrupt::InterruptLine;
use crate::{BusDevice, VmRequest};
pub use state::{MmioTransportState, MmioTransportStateError, QueueSnapshot, SaveError};
pub use worker::DeviceWorker;

mod state;
#[cfg(test)]
mod test_support;
mod worker;

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

    /// The virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The device's running totals ([`VirtioDevice::counters`]); waits for a queue pass the
    /// device thread is in, which is short.
    pub fn device_counters(&self) -> Vec<(&'static str, u64)> {
        lock(&self.device).counters()
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
    use super::test_support::{driver_ok, negotiate, read32, set_up_queue, transport, write32};
    use super::*;

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
    fn trapped_notify_is_forwarded_to_the_queue_event() {
        let (mut t, _, _) = transport();
        write32(&mut t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        write32(&mut t, reg::QUEUE_NOTIFY, 99);
        assert!(t.queue_events()[0].read().is_err());
    }

    /// A hostile driver's register writes: any register (and the config space and past it), any
    /// width, values at the edges, status bits in any order (DRIVER_OK before FEATURES_OK, a
    /// reset in the middle), queues set up half or with addresses past guest memory, snapshots
    /// taken between. The transport answers everything and never panics.
    #[test]
    fn fuzz_mmio_registers() {
        let registers = [
            reg::MAGIC_VALUE,
            reg::DEVICE_FEATURES,
            reg::DEVICE_FEATURES_SEL,
            reg::DRIVER_FEATURES,
            reg::DRIVER_FEATURES_SEL,
            reg::QUEUE_SEL,
            reg::QUEUE_NUM_MAX,
            reg::QUEUE_NUM,
            reg::QUEUE_READY,
            reg::QUEUE_NOTIFY,
            reg::INTERRUPT_STATUS,
            reg::INTERRUPT_ACK,
            reg::STATUS,
            reg::QUEUE_DESC_LOW,
            reg::QUEUE_DESC_HIGH,
            reg::QUEUE_DRIVER_LOW,
            reg::QUEUE_DRIVER_HIGH,
            reg::QUEUE_DEVICE_LOW,
            reg::QUEUE_DEVICE_HIGH,
            reg::CONFIG_GENERATION,
            0x100,
            0x104,
            0x108,
        ];
        crate::fuzz::run("mmio_registers", |rng| {
            let (mut t, _, _) = transport();
            if rng.one_in(2) {
                negotiate(&mut t);
            }
            if rng.one_in(2) {
                // Past guest memory, up to where the helper's arithmetic holds.
                let base = if rng.one_in(3) {
                    rng.edgy_u64() >> 1
                } else {
                    rng.below(0x10) * 0x1000
                };
                set_up_queue(&mut t, rng.below(3) as u32, base);
            }
            for _ in 0..1 + rng.below(48) {
                match rng.below(10) {
                    0 => write32(&mut t, reg::STATUS, rng.below(0x100) as u32),
                    1 if rng.one_in(4) => {
                        if t.pause_and_save().is_ok() {
                            let _ = t.resume();
                        }
                    }
                    _ => crate::fuzz::poke_registers(rng, &mut t, WINDOW_SIZE, &registers, 1),
                }
            }
            let _ = t.device_counters();
        });
    }
}
