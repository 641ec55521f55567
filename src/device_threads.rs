//! One thread per virtio device, running its queues and host-side I/O.
//!
//! Each thread sleeps in its own epoll set over the device's queue eventfds (which KVM signals on
//! the guest's QueueNotify writes), its host descriptors (a TAP) and a stop eventfd. A thread per
//! device, rather than one shared by all, is what keeps a disk's `fdatasync` from stalling the
//! network: each device waits only for its own host I/O. The work runs through the transport's
//! [`DeviceWorker`], which never takes the transport's lock, so vCPUs reading the device's
//! registers never wait for it either.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use ember_devices::virtio::mmio::DeviceWorker;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::{DeviceManager, DeviceSlot, VirtioError};
use crate::sandbox::seccomp::ThreadKind;

/// What a device thread's wake-up is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wakeup {
    Stop,
    /// The guest notified queue `n`.
    Queue(usize),
    /// Host descriptor `n` is ready.
    Host(usize),
}

impl Wakeup {
    // The epoll token: the kind in the top bits, the index below.
    fn token(self) -> u64 {
        match self {
            Wakeup::Stop => 0,
            Wakeup::Queue(queue) => (1 << 62) | queue as u64,
            Wakeup::Host(index) => (2 << 62) | index as u64,
        }
    }

    fn from_token(token: u64) -> Self {
        let index = (token & 0xffff_ffff) as usize;
        match token >> 62 {
            1 => Wakeup::Queue(index),
            2 => Wakeup::Host(index),
            _ => Wakeup::Stop,
        }
    }
}

/// A running device thread.
struct DeviceThread {
    id: String,
    stop: EventFd,
    handle: JoinHandle<()>,
}

/// The threads of every virtio device of a VM.
pub struct DeviceThreads {
    threads: Vec<DeviceThread>,
}

impl DeviceThreads {
    /// Starts one thread per device of `devices`.
    pub fn spawn(devices: &DeviceManager) -> Result<Self, VirtioError> {
        let mut threads = Vec::new();
        for device in devices.devices() {
            let worker = ember_devices::bus::lock(&device.transport)
                .worker()
                .map_err(VirtioError::EventFd)?;
            match spawn_one(&device.slot, worker) {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // Those already running get their shutdown (and flush) all the same.
                    DeviceThreads { threads }.stop();
                    return Err(e);
                }
            }
        }
        Ok(Self { threads })
    }

    /// Stops every thread after the work in hand, then shuts each device down (flushing its
    /// data).
    pub fn stop(self) {
        for thread in &self.threads {
            if let Err(e) = thread.stop.write(1) {
                log::error!("cannot stop device {}'s thread: {e}", thread.id);
            }
        }
        for thread in self.threads {
            if thread.handle.join().is_err() {
                log::error!("device {}'s thread panicked", thread.id);
            }
        }
    }
}

fn spawn_one(slot: &DeviceSlot, worker: DeviceWorker) -> Result<DeviceThread, VirtioError> {
    let failed = |e| VirtioError::Thread(slot.id.clone(), e);
    let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(failed)?;
    let epoll = Epoll::new().map_err(failed)?;
    let watch = |fd: i32, events: EventSet, wakeup: Wakeup| {
        epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, wakeup.token()),
        )
    };
    watch(stop.as_raw_fd(), EventSet::IN, Wakeup::Stop).map_err(failed)?;
    for (queue, event) in worker.queue_events().iter().enumerate() {
        watch(event.as_raw_fd(), EventSet::IN, Wakeup::Queue(queue)).map_err(failed)?;
    }
    for (index, fd) in worker.host_event_fds().into_iter().enumerate() {
        watch(
            fd,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
            Wakeup::Host(index),
        )
        .map_err(failed)?;
    }
    let thread_stop = stop.try_clone().map_err(failed)?;
    let kind = slot.kind;
    let handle = std::thread::Builder::new()
        // Linux keeps 15 bytes of a thread name: "virtio-block0" fits.
        .name(format!("virtio-{}", slot.id))
        .spawn(move || {
            crate::sandbox::seccomp::confine_or_exit(ThreadKind::of_device(kind));
            run(&epoll, &thread_stop, &worker)
        })
        .map_err(failed)?;
    Ok(DeviceThread {
        id: slot.id.clone(),
        stop,
        handle,
    })
}

fn run(epoll: &Epoll, stop: &EventFd, worker: &DeviceWorker) {
    // Even if the device panics below, it still gets to flush its data on the way out.
    let _shutdown = ShutdownOnExit(worker);
    let mut events = vec![EpollEvent::default(); 8];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("virtio device {}: {e}", worker.device_type());
                return;
            }
        };
        for event in &events[..ready] {
            match Wakeup::from_token(event.data()) {
                Wakeup::Stop => {
                    let _ = stop.read();
                    return;
                }
                Wakeup::Queue(queue) => {
                    if let Some(notify) = worker.queue_events().get(queue) {
                        // Reading resets the counter: several notifies since are one pass.
                        let _ = notify.read();
                    }
                    worker.process_queue(queue);
                }
                Wakeup::Host(index) => worker.process_host_event(index),
            }
        }
    }
}

/// Shuts the device down when its thread ends, however it ends.
struct ShutdownOnExit<'a>(&'a DeviceWorker);

impl Drop for ShutdownOnExit<'_> {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeup_tokens_round_trip() {
        for wakeup in [
            Wakeup::Stop,
            Wakeup::Queue(0),
            Wakeup::Queue(1),
            Wakeup::Host(2),
        ] {
            assert_eq!(Wakeup::from_token(wakeup.token()), wakeup);
        }
    }
}
