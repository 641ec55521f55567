//! The VM's interrupt controllers: KVM's "split irqchip" (a local APIC per vCPU in the kernel, the
//! I/O APIC in userspace, no 8259 PIC) and the path from the userspace IOAPIC to the local APICs.
//!
//! Why split: KVM's in-kernel PIC and IOAPIC put devices on KVM's I/O buses, which on recent host
//! kernels leaves an SRCU grace period in flight that the VM's destruction waits out, which
//! showed in a short-lived VM's exit time (the figures are in the README, "Start-up"; measured
//! with resources/bench/startup.py). Ember's interrupt sources (the
//! UART, the virtio devices) all live in userspace, so nothing is lost by raising their pins there.
//!
//! No i8254 PIT either: a Linux guest with kvm-clock and the TSC-deadline local APIC timer never
//! uses it (`apic_needs_pit()` is false), and KVM's PIT costs a kernel worker thread whose start
//! and stop showed in every run (README, "Start-up").

use std::io;
use std::sync::{Arc, Mutex};

use ember_devices::bus::lock;
use ember_devices::ioapic::{self, DirectRoute, Ioapic, Msi, MsiSink};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_irq_routing_msi, kvm_msi, KvmIrqRouting,
    KVM_CAP_SPLIT_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Cap, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Gives the VM in-kernel local APICs and leaves the IOAPIC's pins to userspace. Must come before
/// the vCPUs are created (they get their local APICs then).
pub fn create(vm_fd: &VmFd) -> Result<(), kvm_ioctls::Error> {
    vm_fd.set_tss_address(KVM_TSS_ADDRESS as usize)?;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_SPLIT_IRQCHIP,
        ..Default::default()
    };
    // The number of IOAPIC routes KVM reserves (for EOIs of level-triggered pins).
    cap.args[0] = ioapic::PINS as u64;
    vm_fd.enable_cap(&cap)
}

/// Delivers the IOAPIC's messages to the local APICs (KVM_SIGNAL_MSI).
pub struct KvmMsi(pub Arc<VmFd>);

impl MsiSink for KvmMsi {
    fn send(&self, address: u64, data: u32) -> io::Result<()> {
        let msi = kvm_msi {
            address_lo: address as u32,
            address_hi: (address >> 32) as u32,
            data,
            ..Default::default()
        };
        // 1: delivered; 0: the guest blocked it (e.g. no APIC accepts it), as on hardware.
        self.0
            .signal_msi(msi)
            .map(drop)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// GSIs for irqfds start past the IOAPIC's pins: with the split irqchip, KVM reads the routes
/// of GSIs below the reserved pin count as the IOAPIC's (for EOI exits), which these are not.
const FIRST_IRQFD_GSI: u32 = ioapic::PINS as u32;

/// KVM irqfds that raise IOAPIC pins without ember: a backend outside the process (virtiofsd)
/// writes an eventfd, and KVM sends the MSI the pin's redirection entry names, in the kernel.
/// Each irqfd has its own GSI with an MSI route, which [`PinRoute`] keeps in step with the entry
/// the guest programs: rewritten when the entry changes, and the irqfd detached while the pin is
/// masked, so that writes wait in the eventfd's counter (KVM delivers them when the irqfd is
/// attached again, as the IOAPIC's IRR would on unmask).
pub struct IrqfdRouter {
    vm_fd: Arc<VmFd>,
    table: Mutex<Vec<IrqfdRoute>>,
}

struct IrqfdRoute {
    gsi: u32,
    eventfd: EventFd,
    /// Where the pin's interrupt goes; `None` while it is masked.
    msi: Option<Msi>,
    /// Whether the irqfd is attached to `gsi`.
    attached: bool,
}

/// Why the pins cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum IrqfdError {
    /// KVM refused an irqfd or its route.
    #[error("KVM refused an irqfd route: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    /// The probe's eventfd cannot be made.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
}

impl IrqfdRouter {
    /// A router, if this KVM has irqfds and GSI routing and an MSI route with an irqfd on it can
    /// actually be set up (tried once, then removed); `None` otherwise, and the devices relay
    /// their backends' interrupts through their threads.
    pub fn probe(vm_fd: Arc<VmFd>) -> Option<Arc<Self>> {
        if vm_fd.check_extension(Cap::Irqfd) && vm_fd.check_extension(Cap::IrqRouting) {
            let router = Self {
                vm_fd,
                table: Mutex::new(Vec::new()),
            };
            match router.try_once() {
                Ok(()) => return Some(Arc::new(router)),
                Err(e) => log::info!("irqfds unusable ({e}); backends' interrupts are relayed"),
            }
        } else {
            log::info!("KVM has no irqfds or GSI routing; backends' interrupts are relayed");
        }
        None
    }

    fn try_once(&self) -> Result<(), IrqfdError> {
        let eventfd = EventFd::new(EFD_NONBLOCK).map_err(IrqfdError::EventFd)?;
        let probe = IrqfdRoute {
            gsi: FIRST_IRQFD_GSI,
            eventfd,
            // Nobody reads an MSI to APIC 0 with vector 0: it is never sent.
            msi: Some(Msi {
                address: 0xfee0_0000,
                data: 0,
            }),
            attached: false,
        };
        self.set_routes(std::slice::from_ref(&probe))?;
        self.vm_fd
            .register_irqfd(&probe.eventfd, probe.gsi)
            .map_err(IrqfdError::Kvm)?;
        self.vm_fd
            .unregister_irqfd(&probe.eventfd, probe.gsi)
            .map_err(IrqfdError::Kvm)?;
        self.set_routes(&[])
    }

    /// Makes `eventfds` raise IOAPIC pin `pin` of `ioapic` from now on, following its entry.
    pub fn route_pin(
        self: &Arc<Self>,
        ioapic: &Mutex<Ioapic>,
        pin: usize,
        eventfds: Vec<EventFd>,
    ) -> Vec<u32> {
        let gsis = {
            let mut table = lock(&self.table);
            let first = FIRST_IRQFD_GSI + table.len() as u32;
            let gsis: Vec<u32> = (first..).take(eventfds.len()).collect();
            table.extend(gsis.iter().zip(eventfds).map(|(&gsi, eventfd)| IrqfdRoute {
                gsi,
                eventfd,
                msi: None,
                attached: false,
            }));
            gsis
        };
        let route = PinRoute {
            router: self.clone(),
            gsis: gsis.clone(),
        };
        lock(ioapic).add_direct_route(pin, Box::new(route));
        gsis
    }

    /// Points the irqfds on `gsis` at `msi`, or detaches them for `None`.
    fn retarget(&self, gsis: &[u32], msi: Option<Msi>) -> Result<(), IrqfdError> {
        let mut table = lock(&self.table);
        for route in table.iter_mut().filter(|r| gsis.contains(&r.gsi)) {
            if msi.is_none() && route.attached {
                self.vm_fd
                    .unregister_irqfd(&route.eventfd, route.gsi)
                    .map_err(IrqfdError::Kvm)?;
                route.attached = false;
            }
            route.msi = msi;
        }
        self.set_routes(&table)?;
        for route in table.iter_mut().filter(|r| gsis.contains(&r.gsi)) {
            if route.msi.is_some() && !route.attached {
                self.vm_fd
                    .register_irqfd(&route.eventfd, route.gsi)
                    .map_err(IrqfdError::Kvm)?;
                route.attached = true;
            }
        }
        Ok(())
    }

    /// KVM_SET_GSI_ROUTING replaces the whole table: every route with a destination.
    fn set_routes(&self, routes: &[IrqfdRoute]) -> Result<(), IrqfdError> {
        let entries: Vec<kvm_irq_routing_entry> = routes
            .iter()
            .filter_map(|route| {
                let msi = route.msi?;
                let mut entry = kvm_irq_routing_entry {
                    gsi: route.gsi,
                    type_: KVM_IRQ_ROUTING_MSI,
                    ..Default::default()
                };
                entry.u.msi = kvm_irq_routing_msi {
                    address_lo: msi.address as u32,
                    address_hi: (msi.address >> 32) as u32,
                    data: msi.data,
                    ..Default::default()
                };
                Some(entry)
            })
            .collect();
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| IrqfdError::Kvm(kvm_ioctls::Error::new(libc::EINVAL)))?;
        self.vm_fd
            .set_gsi_routing(&routing)
            .map_err(IrqfdError::Kvm)
    }
}

/// The irqfds of one pin, told by the IOAPIC when the guest reprograms the pin.
struct PinRoute {
    router: Arc<IrqfdRouter>,
    gsis: Vec<u32>,
}

impl DirectRoute for PinRoute {
    fn retarget(&self, msi: Option<Msi>) {
        if let Err(e) = self.router.retarget(&self.gsis, msi) {
            // The backend's interrupts would be lost, or sent where the guest no longer wants
            // them; the guest's I/O on that device stalls, and this line says why.
            log::error!("cannot route IRQ GSIs {:?} to {msi:?}: {e}", self.gsis);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_devices::BusDevice;
    use kvm_ioctls::{Kvm, VcpuFd};

    /// Programs pin `pin`'s redirection entry (low half) through the IOAPIC's registers.
    fn program(ioapic: &Mutex<Ioapic>, pin: u32, low: u32) {
        let mut ioapic = lock(ioapic);
        ioapic.write(0x00, &(0x10 + 2 * pin).to_le_bytes());
        ioapic.write(0x10, &low.to_le_bytes());
    }

    /// Whether vector `vector` is pending in the local APIC's IRR (waited for a little: KVM may
    /// deliver from a worker).
    fn pending_in_irr(vcpu: &VcpuFd, vector: usize) -> bool {
        for _ in 0..100 {
            let lapic = vcpu.get_lapic().unwrap();
            let word = 0x200 + 0x10 * (vector / 32);
            let irr = u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[word + i] as u8));
            if irr & (1 << (vector % 32)) != 0 {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        false
    }

    #[test]
    fn an_irqfd_follows_its_pin_and_holds_interrupts_while_masked() {
        let vm_fd = Arc::new(Kvm::new().unwrap().create_vm().unwrap());
        create(&vm_fd).unwrap();
        // APIC 0, enabled in software (SVR bit 8) so that it accepts fixed interrupts.
        let vcpu = vm_fd.create_vcpu(0).unwrap();
        let mut lapic = vcpu.get_lapic().unwrap();
        lapic.regs[0xf1] |= 1;
        vcpu.set_lapic(&lapic).unwrap();
        let router = IrqfdRouter::probe(vm_fd.clone()).expect("this KVM has irqfds");
        let ioapic = Mutex::new(Ioapic::new(Box::new(KvmMsi(vm_fd.clone()))));
        let backend = EventFd::new(EFD_NONBLOCK).unwrap();
        let gsis = router.route_pin(&ioapic, 5, vec![backend.try_clone().unwrap()]);
        assert_eq!(gsis, [FIRST_IRQFD_GSI]);
        let attached = || lock(&router.table)[0].attached;

        // Masked (the reset state): the backend's write waits in the eventfd.
        assert!(!attached());
        backend.write(1).unwrap();
        assert_eq!(backend.read().unwrap(), 1);
        // Unmasked: KVM takes the write at once and sends the MSI to vector 0x25 of APIC 0.
        program(&ioapic, 5, 0x25);
        assert!(attached());
        backend.write(1).unwrap();
        assert!(backend.read().is_err(), "KVM did not take the write");
        assert!(pending_in_irr(&vcpu, 0x25));
        // Masked again with a new vector: what the backend writes now is held ...
        program(&ioapic, 5, 0x26 | (1 << 16));
        assert!(!attached());
        backend.write(1).unwrap();
        assert!(!pending_in_irr(&vcpu, 0x26));
        // ... and delivered, to the new vector, when the guest unmasks the pin (KVM looks at
        // the eventfd when the irqfd is attached).
        program(&ioapic, 5, 0x26);
        assert!(attached());
        assert!(pending_in_irr(&vcpu, 0x26), "the held interrupt was lost");
        // Another pin's entry leaves this route alone.
        program(&ioapic, 6, 0x30 | (1 << 16));
        assert!(attached());
    }
}
