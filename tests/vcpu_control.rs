//! vCPU threads driven through their handles, on hand-assembled 64-bit micro-guests: a paused
//! guest makes no progress and a resumed one continues; a string I/O instruction reaches the
//! device as one access per element.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember::arch::x86_64::regs::{self, EntryMode};
use ember::outcome::VmOutcome;
use ember::snapshot::vcpu_state::{self, VcpuState};
use ember::vcpu::{self, IoBuses, VcpuHandle, VmControl};
use ember_devices::debug_exit::DebugExit;
use ember_devices::{Bus, BusDevice, VmRequest};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const CODE: u64 = 0x10000;
const DATA: u64 = 0x11000;
const COUNTER: u64 = 0x30000;
const RECORDER_PORT: u16 = 0x500;
const TIMEOUT: Duration = Duration::from_secs(10);

/// Gives `vm` the 2 MiB of `memory` as its RAM, at guest address 0.
fn register(vm: &VmFd, memory: &GuestMemoryMmap) {
    let host = memory.get_host_address(GuestAddress(0)).unwrap();
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 2 << 20,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping belongs to `memory`, which the caller keeps until the VM is gone.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
}

/// A VM with 2 MiB of RAM, `code` at [`CODE`] and `data` at [`DATA`], and one vCPU in long mode
/// about to run it.
fn micro_vm(code: &[u8], data: &[u8]) -> (VmFd, GuestMemoryMmap, VcpuFd) {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    register(&vm, &memory);
    memory.write_slice(code, GuestAddress(CODE)).unwrap();
    memory.write_slice(data, GuestAddress(DATA)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let entry = EntryMode::Linux64 {
        entry: CODE,
        zero_page: 0,
    };
    let mut sregs = vcpu.get_sregs().unwrap();
    regs::setup_sregs(&memory, entry, &mut sregs).unwrap();
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&regs::boot_regs(entry)).unwrap();
    (vm, memory, vcpu)
}

fn counter(memory: &GuestMemoryMmap) -> u64 {
    memory.read_obj(GuestAddress(COUNTER)).unwrap()
}

/// Waits until `counter` passes `above`, or panics after [`TIMEOUT`].
fn wait_for_progress(memory: &GuestMemoryMmap, above: u64) -> u64 {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let now = counter(memory);
        if now > above {
            return now;
        }
        assert!(Instant::now() < deadline, "the guest made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_paused_vcpu_makes_no_progress_and_a_resumed_one_continues() {
    if !common::kvm_available() {
        return;
    }
    // inc qword [COUNTER]; jmp back to it
    let mut code = vec![0x48, 0xff, 0x04, 0x25];
    code.extend_from_slice(&(COUNTER as u32).to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf6]);
    let (_vm, memory, vcpu) = micro_vm(&code, &[]);
    vcpu::install_kick_handler().unwrap();
    let control = Arc::new(VmControl::new().unwrap());
    let buses = Arc::new(IoBuses {
        pio: Bus::new(),
        mmio: Bus::new(),
    });
    let handle = VcpuHandle::spawn(0, vcpu, buses, None, control.clone()).unwrap();

    let running = wait_for_progress(&memory, 0);
    handle.pause(TIMEOUT).unwrap();
    let paused = counter(&memory);
    assert!(paused >= running);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(counter(&memory), paused, "a paused guest ran");
    // Pausing twice is fine, and still no progress.
    handle.pause(TIMEOUT).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(counter(&memory), paused, "a paused guest ran");

    handle.resume(TIMEOUT).unwrap();
    wait_for_progress(&memory, paused);
    // Resuming a running vCPU is answered too.
    handle.resume(TIMEOUT).unwrap();
    handle.finish();
    assert!(!control.is_stopping(), "nothing asked the VM to stop");
}

/// Records every write on its port, one entry per access; reads count up from 1, one number per
/// access.
#[derive(Default)]
struct Recorder(Vec<Vec<u8>>, u8);

impl BusDevice for Recorder {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        self.1 += 1;
        data.fill(self.1);
    }
    fn write(&mut self, _: u64, data: &[u8]) -> Option<VmRequest> {
        self.0.push(data.to_vec());
        None
    }
}

/// Runs `code` (with `data` at [`DATA`]) on one vCPU with a [`Recorder`] at [`RECORDER_PORT`] and
/// the debug-exit port, until the guest writes its exit status; returns the recorder and memory.
fn run_until_exit(code: &[u8], data: &[u8]) -> (Recorder, GuestMemoryMmap) {
    let (_vm, memory, vcpu) = micro_vm(code, data);
    vcpu::install_kick_handler().unwrap();
    let recorder = Arc::new(Mutex::new(Recorder::default()));
    let mut pio = Bus::new();
    pio.insert(recorder.clone(), u64::from(RECORDER_PORT), 1)
        .unwrap();
    pio.insert(Arc::new(Mutex::new(DebugExit)), 0xf4, 1)
        .unwrap();
    let buses = Arc::new(IoBuses {
        pio,
        mmio: Bus::new(),
    });
    let control = Arc::new(VmControl::new().unwrap());
    let handle = VcpuHandle::spawn(0, vcpu, buses, None, control.clone()).unwrap();
    let deadline = Instant::now() + TIMEOUT;
    while !control.is_stopping() {
        assert!(Instant::now() < deadline, "the guest never exited");
        std::thread::sleep(Duration::from_millis(5));
    }
    handle.finish();
    assert_eq!(control.take_outcome(), Some(VmOutcome::GuestExit(7)));
    let recorder = std::mem::take(&mut *recorder.lock().unwrap());
    (recorder, memory)
}

/// `mov al, 7; out 0xf4, al; hlt; jmp back to the hlt`: the micro-guest's exit.
const EXIT_7: [u8; 7] = [0xb0, 7, 0xe6, 0xf4, 0xf4, 0xeb, 0xfd];

#[test]
fn rep_outsb_reaches_the_device_one_byte_at_a_time() {
    if !common::kvm_available() {
        return;
    }
    let mut code = Vec::new();
    code.push(0xbe); // mov esi, DATA
    code.extend_from_slice(&(DATA as u32).to_le_bytes());
    code.extend_from_slice(&[0xb9, 5, 0, 0, 0]); // mov ecx, 5
    code.extend_from_slice(&[0x66, 0xba]); // mov dx, RECORDER_PORT
    code.extend_from_slice(&RECORDER_PORT.to_le_bytes());
    code.extend_from_slice(&[0xf3, 0x6e]); // rep outsb
    code.extend_from_slice(&EXIT_7);
    let (recorder, _) = run_until_exit(&code, b"hello");
    let writes = &recorder.0;
    let expected: Vec<Vec<u8>> = b"hello".iter().map(|b| vec![*b]).collect();
    assert_eq!(*writes, expected);
}

#[test]
fn rep_insb_reads_the_device_once_per_byte() {
    if !common::kvm_available() {
        return;
    }
    let mut code = Vec::new();
    code.push(0xbf); // mov edi, DATA
    code.extend_from_slice(&(DATA as u32).to_le_bytes());
    code.extend_from_slice(&[0xb9, 4, 0, 0, 0]); // mov ecx, 4
    code.extend_from_slice(&[0x66, 0xba]); // mov dx, RECORDER_PORT
    code.extend_from_slice(&RECORDER_PORT.to_le_bytes());
    code.extend_from_slice(&[0xf3, 0x6c]); // rep insb
    code.extend_from_slice(&EXIT_7);
    let (_, memory) = run_until_exit(&code, &[0; 8]);
    let mut got = [0u8; 8];
    memory.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [1, 2, 3, 4, 0, 0, 0, 0]);
}

/// A VM like [`micro_vm`]'s, but with Ember's split irqchip (a local APIC to save) and `memory`
/// as its RAM; its vCPU is created and left as KVM made it.
fn vm_with_irqchip(memory: &GuestMemoryMmap) -> (VmFd, VcpuFd) {
    let vm = Kvm::new().unwrap().create_vm().unwrap();
    register(&vm, memory);
    ember::irqchip::create(&vm).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    (vm, vcpu)
}

/// Runs `vcpu` until the guest has written its port `outs` times, then finishes that last
/// instruction (its RIP moves past the `out` on the next KVM_RUN, here one that returns at once).
fn run_outs(vcpu: &mut VcpuFd, outs: u64) {
    let mut seen = 0;
    while seen < outs {
        match vcpu.run().unwrap() {
            kvm_ioctls::VcpuExit::IoOut(port, _) if port == RECORDER_PORT => seen += 1,
            other => panic!("unexpected exit {other:?}"),
        }
    }
    vcpu.set_kvm_immediate_exit(1);
    assert_eq!(vcpu.run().unwrap_err().errno(), libc::EINTR);
    vcpu.set_kvm_immediate_exit(0);
}

#[test]
fn a_saved_vcpu_continues_exactly_in_a_new_vm() {
    if !common::kvm_available() {
        return;
    }
    // loop: inc rbx; mov [COUNTER], rbx; mov dx, RECORDER_PORT; out dx, al; jmp loop
    let mut code = vec![0x48, 0xff, 0xc3, 0x48, 0x89, 0x1c, 0x25];
    code.extend_from_slice(&(COUNTER as u32).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba]);
    code.extend_from_slice(&RECORDER_PORT.to_le_bytes());
    code.extend_from_slice(&[0xee, 0xeb, 0xee]);
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    memory.write_slice(&code, GuestAddress(CODE)).unwrap();
    let (_vm, mut vcpu) = vm_with_irqchip(&memory);
    let entry = EntryMode::Linux64 {
        entry: CODE,
        zero_page: 0,
    };
    let mut sregs = vcpu.get_sregs().unwrap();
    regs::setup_sregs(&memory, entry, &mut sregs).unwrap();
    vcpu.set_sregs(&sregs).unwrap();
    let mut boot = regs::boot_regs(entry);
    boot.rax = 0x5a;
    vcpu.set_regs(&boot).unwrap();
    run_outs(&mut vcpu, 100);

    let kvm = Kvm::new().unwrap();
    let msrs = vcpu_state::msrs_to_save(kvm.get_msr_index_list().unwrap().as_slice());
    let saved = VcpuState::save(&vcpu, &msrs).unwrap();
    assert_eq!(saved.regs.rbx, 100);
    assert_eq!(counter(&memory), 100);
    // Through the state file's format and back.
    let saved: VcpuState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();

    // A new VM on a copy of the memory, as a restore maps the memory file.
    let copy = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
    let mut bytes = vec![0u8; 2 << 20];
    memory.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    copy.write_slice(&bytes, GuestAddress(0)).unwrap();
    let (_vm2, mut restored) = vm_with_irqchip(&copy);
    saved.restore(&restored).unwrap();
    run_outs(&mut restored, 50);
    let regs = restored.get_regs().unwrap();
    assert_eq!(regs.rbx, 150, "the counter register went on from 100");
    assert_eq!(regs.rax, 0x5a);
    assert_eq!(counter(&copy), 150);
    // The original, untouched since, still stands at 100 and goes on by itself.
    assert_eq!(counter(&memory), 100);
    run_outs(&mut vcpu, 1);
    assert_eq!(counter(&memory), 101);
    // The restored vCPU's control state is the saved one.
    let sregs = restored.get_sregs().unwrap();
    assert_eq!((sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer), {
        let s = &saved.sregs;
        (s.cr0, s.cr3, s.cr4, s.efer)
    });
}
