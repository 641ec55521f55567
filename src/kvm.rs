//! Opening /dev/kvm and checking it can run an Ember VM, with errors a user can act on.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) or enable virtualization in the host")]
    Missing,
    #[error("no permission to open /dev/kvm: add your user to the 'kvm' group (sudo usermod -aG kvm $USER, then log in again) or run as root")]
    PermissionDenied,
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    #[error("this KVM lacks {0}, which Ember needs; use a newer host kernel")]
    MissingCapability(&'static str),
    #[error("cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
}

const REQUIRED: &[(Cap, &str)] = &[
    (Cap::SplitIrqchip, "KVM_CAP_SPLIT_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Opens /dev/kvm and checks the capabilities Ember relies on.
pub fn open() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
        _ => KvmError::Open(e),
    })?;
    for (cap, name) in REQUIRED {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

/// Whether `/dev/kvm` is software KVM (`kvm_pvm`): every guest CPL0 instruction is emulated, and
/// some instructions and all hypercalls cannot be.
pub fn is_software_kvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
