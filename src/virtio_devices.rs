//! Attaching virtio-mmio devices to a VM, and the event loop that runs their queues.
//!
//! Each device gets a 4 KiB MMIO window and an interrupt line from [`DeviceSlots`]; its
//! QueueNotify writes reach an ioeventfd (KVM completes the guest's write without leaving the
//! kernel), and it raises its interrupt on a pin of the userspace IOAPIC. The queue work runs on
//! one event-loop thread, never on a vCPU thread.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use ember_devices::bus::lock;
use ember_devices::ioapic::{Ioapic, IoapicPin};
use ember_devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET, WINDOW_SIZE};
use ember_devices::virtio::VirtioDevice;
use ember_devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{
    IOAPIC_PINS, VIRTIO_IRQ_FIRST, VIRTIO_MMIO_END, VIRTIO_MMIO_START,
};

/// Errors attaching a virtio device.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("too many devices: no MMIO window or interrupt line left")]
    NoSlotLeft,
    #[error("cannot create the device's event file descriptors")]
    EventFd(#[source] std::io::Error),
    #[error("cannot register the device with KVM")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("cannot put the device on the MMIO bus")]
    Bus(#[from] BusError),
    #[error("cannot add the device to the kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot start the device event loop")]
    EventLoop(#[source] std::io::Error),
}

/// Hands out MMIO windows and interrupt lines, one per device.
pub struct DeviceSlots {
    next_address: u64,
    next_irq: u32,
}

impl Default for DeviceSlots {
    fn default() -> Self {
        Self {
            next_address: VIRTIO_MMIO_START,
            next_irq: VIRTIO_IRQ_FIRST,
        }
    }
}

impl DeviceSlots {
    /// The next free (window base, IRQ).
    pub fn allocate(&mut self) -> Result<(u64, u32), VirtioError> {
        if self.next_address + WINDOW_SIZE > VIRTIO_MMIO_END
            || self.next_irq >= u32::from(IOAPIC_PINS)
        {
            return Err(VirtioError::NoSlotLeft);
        }
        let slot = (self.next_address, self.next_irq);
        self.next_address += WINDOW_SIZE;
        self.next_irq += 1;
        Ok(slot)
    }
}

/// Wires `device` into the VM: MMIO window, ioeventfds, interrupt pin, and the kernel command
/// line entry (`virtio_mmio.device=4K@<addr>:<irq>`) that tells Linux where it is.
pub fn attach(
    device: Box<dyn VirtioDevice>,
    vm_fd: &VmFd,
    ioapic: &Arc<Mutex<Ioapic>>,
    mem: &GuestMemoryMmap,
    slots: &mut DeviceSlots,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
) -> Result<Arc<Mutex<MmioTransport>>, VirtioError> {
    let (base, irq) = slots.allocate()?;
    let pin = IoapicPin::new(ioapic.clone(), irq as usize);
    let transport = MmioTransport::new(device, mem.clone(), pin).map_err(VirtioError::EventFd)?;
    for (index, event) in transport.queue_events().iter().enumerate() {
        vm_fd
            .register_ioevent(
                event,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                index as u32,
            )
            .map_err(VirtioError::Kvm)?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), base, WINDOW_SIZE)?;
    cmdline
        .add_virtio_mmio_device(WINDOW_SIZE, vm_memory::GuestAddress(base), irq, None)
        .map_err(VirtioError::Cmdline)?;
    Ok(transport)
}

/// What an event-loop wake-up is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wakeup {
    Stop,
    /// Device `device`'s queue `queue` was notified.
    Queue {
        device: usize,
        queue: usize,
    },
    /// Device `device`'s host descriptor `index` is ready.
    Host {
        device: usize,
        index: usize,
    },
}

impl Wakeup {
    // The epoll token: kind in the top bits, device and index below.
    fn token(self) -> u64 {
        match self {
            Wakeup::Stop => 0,
            Wakeup::Queue { device, queue } => (1 << 62) | ((device as u64) << 16) | queue as u64,
            Wakeup::Host { device, index } => (2 << 62) | ((device as u64) << 16) | index as u64,
        }
    }

    fn from_token(token: u64) -> Self {
        let device = ((token >> 16) & 0xffff_ffff) as usize;
        let index = (token & 0xffff) as usize;
        match token >> 62 {
            1 => Wakeup::Queue {
                device,
                queue: index,
            },
            2 => Wakeup::Host { device, index },
            _ => Wakeup::Stop,
        }
    }
}

/// The thread that runs every device's queues and host-side I/O.
pub struct DeviceEventLoop {
    stop: EventFd,
    handle: JoinHandle<()>,
}

impl DeviceEventLoop {
    /// Starts the loop over `transports`.
    pub fn spawn(transports: Vec<Arc<Mutex<MmioTransport>>>) -> Result<Self, VirtioError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(VirtioError::EventLoop)?;
        let epoll = Epoll::new().map_err(VirtioError::EventLoop)?;
        let watch = |fd: i32, events: EventSet, wakeup: Wakeup| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(events, wakeup.token()),
                )
                .map_err(VirtioError::EventLoop)
        };
        watch(stop.as_raw_fd(), EventSet::IN, Wakeup::Stop)?;
        let mut queue_events = Vec::new();
        for (device, transport) in transports.iter().enumerate() {
            let transport = lock(transport);
            for (queue, event) in transport.queue_events().iter().enumerate() {
                let event = event.try_clone().map_err(VirtioError::EventLoop)?;
                watch(
                    event.as_raw_fd(),
                    EventSet::IN,
                    Wakeup::Queue { device, queue },
                )?;
                queue_events.push(((device, queue), event));
            }
            for (index, fd) in transport.host_event_fds().into_iter().enumerate() {
                watch(
                    fd,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                    Wakeup::Host { device, index },
                )?;
            }
        }
        let stop_copy = stop.try_clone().map_err(VirtioError::EventLoop)?;
        let handle = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || run_loop(epoll, stop_copy, &transports, &queue_events))
            .map_err(VirtioError::EventLoop)?;
        Ok(Self { stop, handle })
    }

    /// Stops the loop after the work in hand, then shuts every device down (flushing its data).
    pub fn stop(self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("cannot stop the device event loop: {e}");
        }
        if self.handle.join().is_err() {
            log::error!("the device event loop panicked");
        }
    }
}

type QueueEvents = [((usize, usize), EventFd)];

fn run_loop(
    epoll: Epoll,
    stop: EventFd,
    transports: &[Arc<Mutex<MmioTransport>>],
    queue_events: &QueueEvents,
) {
    // Even if a device panics below, every device still gets to flush its data on the way out.
    let _shutdown = ShutdownOnExit(transports);
    let mut events = vec![EpollEvent::default(); 32];
    'outer: loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("device event loop: {e}");
                break;
            }
        };
        for event in &events[..ready] {
            match Wakeup::from_token(event.data()) {
                Wakeup::Stop => {
                    let _ = stop.read();
                    break 'outer;
                }
                Wakeup::Queue { device, queue } => {
                    if let Some((_, notify)) =
                        queue_events.iter().find(|(k, _)| *k == (device, queue))
                    {
                        // Reading resets the counter: several notifies since are one pass. It
                        // comes before the pass, so that a device stopping at its cap (the
                        // transport then notifies the queue again) is back on the next wait,
                        // after the other events ready now.
                        let _ = notify.read();
                    }
                    if let Some(transport) = transports.get(device) {
                        lock(transport).process_queue(queue);
                    }
                }
                Wakeup::Host { device, index } => {
                    if let Some(transport) = transports.get(device) {
                        lock(transport).process_host_event(index);
                    }
                }
            }
        }
    }
}

/// Shuts every device down when the event loop ends, however it ends.
struct ShutdownOnExit<'a>(&'a [Arc<Mutex<MmioTransport>>]);

impl Drop for ShutdownOnExit<'_> {
    fn drop(&mut self) {
        for transport in self.0 {
            lock(transport).shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeup_tokens_round_trip() {
        for wakeup in [
            Wakeup::Stop,
            Wakeup::Queue {
                device: 0,
                queue: 0,
            },
            Wakeup::Queue {
                device: 18,
                queue: 1,
            },
            Wakeup::Host {
                device: 3,
                index: 2,
            },
        ] {
            assert_eq!(Wakeup::from_token(wakeup.token()), wakeup);
        }
    }

    #[test]
    fn slots_are_distinct_and_bounded() {
        let mut slots = DeviceSlots::default();
        let first = slots.allocate().unwrap();
        let second = slots.allocate().unwrap();
        assert_eq!(first, (VIRTIO_MMIO_START, VIRTIO_IRQ_FIRST));
        assert_eq!(
            second,
            (VIRTIO_MMIO_START + WINDOW_SIZE, VIRTIO_IRQ_FIRST + 1)
        );
        let mut count = 2;
        while slots.allocate().is_ok() {
            count += 1;
        }
        assert_eq!(count, u32::from(IOAPIC_PINS) - VIRTIO_IRQ_FIRST);
    }
}
