//! Attaching virtio-mmio devices to a VM: each gets a stable slot (a 4 KiB MMIO window, an IOAPIC
//! pin, its kind and an id), its queue notifications become ioeventfds, and Linux learns where it
//! is from the kernel command line.
//!
//! A slot is what identifies a device for the rest of Ember, not its position in a list: the same
//! configuration gives the same slots, which is what lets a restore find every device again.

use std::sync::{Arc, Mutex};

use ember_devices::ioapic::{Ioapic, IoapicPin};
use ember_devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET, WINDOW_SIZE};
use ember_devices::virtio::VirtioDevice;
use ember_devices::{Bus, BusError};
use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestMemoryMmap;

use crate::snapshot::file::SavedDevice;

use crate::arch::x86_64::layout::{
    IOAPIC_PINS, VIRTIO_IRQ_FIRST, VIRTIO_MMIO_END, VIRTIO_MMIO_START,
};

/// Errors attaching a virtio device or running its thread.
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
    #[error("cannot start the thread of device {0}")]
    Thread(String, #[source] std::io::Error),
    #[error("device {0} cannot take its saved state: {1}")]
    Restore(String, String),
}

/// The kinds of virtio device Ember attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Block,
    Net,
    Vsock,
    Fs,
}

impl DeviceKind {
    /// The prefix of the kind's ids: `block0`, `net1`.
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
            DeviceKind::Vsock => "vsock",
            DeviceKind::Fs => "fs",
        }
    }
}

/// Where a device sits in the machine and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSlot {
    pub kind: DeviceKind,
    /// `<kind><n>`, n counting the devices of that kind in the order they were configured.
    pub id: String,
    /// Base of the device's MMIO window.
    pub mmio_base: u64,
    /// Its IOAPIC pin.
    pub irq: u32,
}

/// A device on the MMIO bus, and the slot it occupies.
pub struct AttachedDevice {
    pub slot: DeviceSlot,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The VM's virtio devices and the windows and pins still free.
pub struct DeviceManager {
    next_address: u64,
    next_irq: u32,
    devices: Vec<AttachedDevice>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self {
            next_address: VIRTIO_MMIO_START,
            next_irq: VIRTIO_IRQ_FIRST,
            devices: Vec::new(),
        }
    }
}

/// What a device needs from the VM to be attached.
pub struct VmWiring<'a> {
    pub vm_fd: &'a Arc<VmFd>,
    pub ioapic: &'a Arc<Mutex<Ioapic>>,
    pub guest_memory: &'a GuestMemoryMmap,
    pub mmio: &'a mut Bus,
    pub cmdline: &'a mut Cmdline,
    /// When restoring a snapshot: each device's saved state, by slot id.
    pub saved_devices: Option<&'a [SavedDevice]>,
}

impl DeviceManager {
    /// The next free slot for a device of `kind`.
    fn allocate(&mut self, kind: DeviceKind) -> Result<DeviceSlot, VirtioError> {
        if self.next_address + WINDOW_SIZE > VIRTIO_MMIO_END
            || self.next_irq >= u32::from(IOAPIC_PINS)
        {
            return Err(VirtioError::NoSlotLeft);
        }
        let ordinal = self.devices.iter().filter(|d| d.slot.kind == kind).count();
        let slot = DeviceSlot {
            kind,
            id: format!("{}{ordinal}", kind.name()),
            mmio_base: self.next_address,
            irq: self.next_irq,
        };
        self.next_address += WINDOW_SIZE;
        self.next_irq += 1;
        Ok(slot)
    }

    /// Wires `device` into the VM: MMIO window, ioeventfds, interrupt pin, and the kernel command
    /// line entry (`virtio_mmio.device=4K@<addr>:<irq>`) that tells Linux where it is.
    pub fn attach(
        &mut self,
        kind: DeviceKind,
        device: Box<dyn VirtioDevice>,
        vm: &mut VmWiring,
    ) -> Result<&DeviceSlot, VirtioError> {
        let slot = self.allocate(kind)?;
        let pin = IoapicPin::new(vm.ioapic.clone(), slot.irq as usize);
        let transport = match vm.saved_devices {
            None => MmioTransport::new(device, vm.guest_memory.clone(), pin)
                .map_err(VirtioError::EventFd)?,
            Some(saved) => {
                // The same configuration gives the same slots: a device missing from the
                // snapshot means it was taken of another VM.
                let state = saved.iter().find(|d| d.id == slot.id).ok_or_else(|| {
                    VirtioError::Restore(slot.id.clone(), "not in the snapshot".into())
                })?;
                MmioTransport::from_state(device, vm.guest_memory.clone(), pin, &state.state)
                    .map_err(|e| VirtioError::Restore(slot.id.clone(), e.to_string()))?
            }
        };
        for (index, event) in transport.queue_events().iter().enumerate() {
            vm.vm_fd
                .register_ioevent(
                    event,
                    &IoEventAddress::Mmio(slot.mmio_base + QUEUE_NOTIFY_OFFSET),
                    index as u32,
                )
                .map_err(VirtioError::Kvm)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        vm.mmio
            .insert(transport.clone(), slot.mmio_base, WINDOW_SIZE)?;
        vm.cmdline
            .add_virtio_mmio_device(
                WINDOW_SIZE,
                vm_memory::GuestAddress(slot.mmio_base),
                slot.irq,
                None,
            )
            .map_err(VirtioError::Cmdline)?;
        log::debug!(
            "virtio {}: MMIO {:#x}, IRQ {}",
            slot.id,
            slot.mmio_base,
            slot.irq
        );
        self.devices.push(AttachedDevice { slot, transport });
        Ok(&self.devices[self.devices.len() - 1].slot)
    }

    /// Every attached device, in the order attached.
    pub fn devices(&self) -> &[AttachedDevice] {
        &self.devices
    }

    /// The device with slot id `id`.
    pub fn find(&self, id: &str) -> Option<&AttachedDevice> {
        self.devices.iter().find(|d| d.slot.id == id)
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_distinct_stable_and_bounded() {
        let mut manager = DeviceManager::default();
        let first = manager.allocate(DeviceKind::Block).unwrap();
        let second = manager.allocate(DeviceKind::Net).unwrap();
        assert_eq!(
            first,
            DeviceSlot {
                kind: DeviceKind::Block,
                id: "block0".into(),
                mmio_base: VIRTIO_MMIO_START,
                irq: VIRTIO_IRQ_FIRST
            }
        );
        assert_eq!(second.mmio_base, VIRTIO_MMIO_START + WINDOW_SIZE);
        assert_eq!(second.irq, VIRTIO_IRQ_FIRST + 1);
        assert_eq!(second.id, "net0");
        let mut count = 2;
        while manager.allocate(DeviceKind::Block).is_ok() {
            count += 1;
        }
        assert_eq!(count, u32::from(IOAPIC_PINS) - VIRTIO_IRQ_FIRST);
    }
}
