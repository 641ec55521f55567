//! The device's side of the transport: a [`DeviceWorker`] runs the queues and the host I/O on
//! the device's own thread, under the device model's lock only (see the lock order in the
//! parent module).

use std::os::fd::RawFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::{mark_broken, Activity, MmioTransport, SharedDevice};
use crate::bus::lock;
use crate::virtio::{DeviceBroken, Interrupt, Progress, VirtioDevice};

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

impl MmioTransport {
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
}

#[cfg(test)]
mod tests {
    use super::super::reg;
    use super::super::test_support::{
        driver_ok, negotiate, read32, set_up_queue, transport, write32,
    };
    use crate::virtio::status;

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
}
