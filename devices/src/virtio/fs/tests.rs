use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use vhost::vhost_user::message::FrontendReq;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::test_backend::{FakeBackend, Msg, Script, NEED_REPLY};
use super::*;
use crate::virtio::test_support::{guest_memory, DriverQueue, Irq, QUEUE_SIZE};
use crate::virtio::INTERRUPT_USED_BUFFER;

const MIB: usize = 1 << 20;
/// Guest RAM in these tests: 1 MiB at 0 and 1 MiB at 2 MiB, both in one file (at offsets 0 and
/// 1 MiB), mapped shared, as the monitor maps a memfd.
const LOW: (u64, usize, u64) = (0, MIB, 0);
const HIGH: (u64, usize, u64) = (2 * MIB as u64, MIB, MIB as u64);
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const PROTOCOL_FEATURES: u64 = 1 << 30;

fn config(tag: &str, backend: &FakeBackend) -> FsDeviceConfig {
    FsDeviceConfig {
        tag: tag.into(),
        socket: backend.path.clone(),
    }
}

/// A device connected to a stand-in virtiofsd, with the handshake's requests taken.
fn device(script: Script) -> (FakeBackend, Fs, Vec<Msg>) {
    let backend = FakeBackend::start(script);
    let fs = Fs::new(config("shared", &backend)).unwrap();
    let handshake = backend.take();
    (backend, fs, handshake)
}

fn file_memory() -> (GuestMemoryMmap, TempFile) {
    let file = TempFile::new_with_prefix("/tmp/ember-fs-mem-").unwrap();
    file.as_file().set_len(2 * MIB as u64).unwrap();
    let region = |(gpa, size, offset): (u64, usize, u64)| {
        let fd = file.as_file().try_clone().unwrap();
        (GuestAddress(gpa), size, Some(FileOffset::new(fd, offset)))
    };
    let mem = GuestMemoryMmap::from_ranges_with_files([region(LOW), region(HIGH)]).unwrap();
    (mem, file)
}

fn host_address(mem: &GuestMemoryMmap, addr: u64) -> u64 {
    mem.get_host_address(GuestAddress(addr)).unwrap() as u64
}

fn same_file(a: &File, b: &File) -> bool {
    let (a, b) = (a.metadata().unwrap(), b.metadata().unwrap());
    (a.dev(), a.ino()) == (b.dev(), b.ino())
}

fn codes(msgs: &[Msg]) -> Vec<FrontendReq> {
    msgs.iter().map(Msg::req).collect()
}

/// The driver's two queues: hiprio at 64 KiB, requests at 128 KiB.
fn driver_queues(mem: &GuestMemoryMmap) -> [DriverQueue<'_>; 2] {
    [
        DriverQueue::new(mem, 0x1_0000),
        DriverQueue::new(mem, 0x2_0000),
    ]
}

#[test]
fn identity_and_config_space() {
    let (_backend, mut fs, _) = device(Script::default());
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), &[1024, 1024]);
    assert_eq!(fs.tag(), "shared");
    let mut config = [0xff; 40];
    fs.read_config(0, &mut config);
    let mut expected = [0; 40];
    expected[..6].copy_from_slice(b"shared");
    expected[36] = 1;
    assert_eq!(config, expected);
    let mut queues = [0xff; 4];
    fs.read_config(36, &mut queues);
    assert_eq!(queues, [1, 0, 0, 0]);
    let mut past = [0xff; 8];
    fs.read_config(38, &mut past);
    assert_eq!(past, [0, 0, 0, 0, 0, 0, 0, 0]);
    // Read-only.
    fs.write_config(0, b"other");
    fs.read_config(0, &mut config);
    assert_eq!(config, expected);
}

#[test]
fn a_36_byte_tag_fills_the_field_unterminated() {
    let backend = FakeBackend::start(Script::default());
    let tag = "é".repeat(18);
    let fs = Fs::new(config(&tag, &backend)).unwrap();
    let mut config = [0; 40];
    fs.read_config(0, &mut config);
    assert_eq!(&config[..36], tag.as_bytes());
    assert_eq!(config[36..], [1, 0, 0, 0]);
}

#[test]
fn bad_tags_are_refused_before_connecting() {
    let missing = |tag: &str| FsDeviceConfig {
        tag: tag.into(),
        socket: "/nonexistent/vfsd.sock".into(),
    };
    assert!(matches!(Fs::new(missing("")), Err(FsError::EmptyTag)));
    let long = "é".repeat(19);
    let error = Fs::new(missing(&long)).err().unwrap();
    assert!(
        matches!(error, FsError::TagTooLong { len: 38, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("at most 36"));
    assert!(matches!(
        Fs::new(missing(&"a".repeat(37))),
        Err(FsError::TagTooLong { len: 37, .. })
    ));
    assert!(matches!(
        Fs::new(missing("a\0b")),
        Err(FsError::TagHasNul(_))
    ));
}

#[test]
fn connecting_waits_for_virtiofsd_then_gives_up() {
    let late = FakeBackend::start(Script {
        listen_after: Duration::from_millis(300),
        ..Script::default()
    });
    Fs::new(config("late", &late)).unwrap();
    let error = Fs::with_connect_timeout(
        FsDeviceConfig {
            tag: "gone".into(),
            socket: "/nonexistent/vfsd.sock".into(),
        },
        Duration::from_millis(100),
    )
    .err()
    .unwrap();
    assert!(matches!(error, FsError::Connect { .. }), "{error}");
    assert!(error.to_string().contains("/nonexistent/vfsd.sock"));
}

#[test]
fn the_handshake_agrees_on_features() {
    let (_backend, fs, handshake) = device(Script::default());
    assert_eq!(
        codes(&handshake),
        [
            FrontendReq::SET_OWNER,
            FrontendReq::GET_FEATURES,
            FrontendReq::GET_PROTOCOL_FEATURES,
            FrontendReq::SET_PROTOCOL_FEATURES,
            FrontendReq::GET_QUEUE_NUM,
        ]
    );
    // MQ, REPLY_ACK and RESET_DEVICE, of the eight virtiofsd offers.
    assert_eq!(handshake[3].u64_at(0), 0x1 | 0x8 | 0x2000);
    // Asked with NEED_REPLY once REPLY_ACK is agreed.
    assert_eq!(handshake[3].flags & NEED_REPLY, 0);
    assert_ne!(handshake[4].flags & NEED_REPLY, 0);
    // The ring features, not the vhost-user ones (PROTOCOL_FEATURES, LOG_ALL).
    assert_eq!(fs.available_features(), VERSION_1 | (1 << 28) | EVENT_IDX);
}

#[test]
fn unusable_backends_are_refused() {
    let backend = FakeBackend::start(Script {
        features: 1 << 28,
        ..Script::default()
    });
    let error = Fs::new(config("fs", &backend)).err().unwrap();
    assert!(error.to_string().contains("VIRTIO_F_VERSION_1"), "{error}");
    let backend = FakeBackend::start(Script {
        queue_num: 1,
        ..Script::default()
    });
    let error = Fs::new(config("fs", &backend)).err().unwrap();
    assert!(matches!(error, FsError::Backend { .. }), "{error}");
    assert!(error.to_string().contains("1 queues"), "{error}");
    let mut backend = FakeBackend::start(Script::default());
    let path = backend.path.clone();
    // Dies right after accepting.
    let dying = std::thread::spawn(move || {
        while backend.take().is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        backend.die();
    });
    let result = Fs::new(FsDeviceConfig {
        tag: "fs".into(),
        socket: path,
    });
    dying.join().unwrap();
    if let Err(error) = result {
        assert!(matches!(error, FsError::Handshake { .. }), "{error}");
    }
}

#[test]
fn with_irqfds_the_backend_interrupts_the_guest_without_the_device() {
    let (backend, mut fs, _) = device(Script::default());
    let calls = fs.call_eventfds_for_irqfd().unwrap();
    assert_eq!(calls.len(), 2);
    // Only the socket is left for the device thread to watch.
    assert_eq!(fs.host_event_fds(), [fs.frontend.as_raw_fd()]);
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let irq = Irq::new();
    let interrupt = irq.interrupt();
    assert_eq!(interrupt.status(), 0);
    fs.activate(
        mem.clone(),
        VERSION_1,
        vec![hiprio.queue(), request.queue()],
        interrupt.clone(),
    )
    .unwrap();
    let msgs = backend.take();
    // virtiofsd was given the very eventfds KVM watches.
    let given: Vec<&Msg> = msgs
        .iter()
        .filter(|m| m.req() == FrontendReq::SET_VRING_CALL)
        .collect();
    assert_eq!(given.len(), 2);
    for (msg, call) in given.iter().zip(&calls) {
        let file = msg.files.first().unwrap();
        // SAFETY: `call` owns its descriptor for the duration of the borrow.
        let call = unsafe { std::os::fd::BorrowedFd::borrow_raw(call.as_raw_fd()) };
        let call = File::from(call.try_clone_to_owned().unwrap());
        assert!(same_file(file, &call));
    }
    // The register never sees those interrupts, so it always reports used buffers, even after
    // the driver acknowledged them; a reset ends that.
    assert_eq!(interrupt.status(), INTERRUPT_USED_BUFFER);
    interrupt.acknowledge(INTERRUPT_USED_BUFFER);
    assert_eq!(interrupt.status(), INTERRUPT_USED_BUFFER);
    // A write to a call eventfd is KVM's to read: the device ignores a stray wake-up.
    calls[1].write(1).unwrap();
    fs.process_host_event(2).unwrap();
    assert!(!irq.fired());
    assert_eq!(calls[1].read().unwrap(), 1);
    interrupt.reset();
    assert_eq!(interrupt.status(), 0);
}

#[test]
fn activation_hands_memory_and_rings_to_the_backend() {
    let (backend, mut fs, _) = device(Script::default());
    let (mem, file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let mut request_queue = request.queue();
    request_queue.set_next_avail(5);
    let irq = Irq::new();
    let acked = VERSION_1 | EVENT_IDX;
    fs.activate(
        mem.clone(),
        acked,
        vec![hiprio.queue(), request_queue],
        irq.interrupt(),
    )
    .unwrap();
    let msgs = backend.take();
    use FrontendReq as R;
    let mut expected = vec![R::SET_FEATURES, R::SET_MEM_TABLE];
    for _ in 0..2 {
        expected.extend([
            R::SET_VRING_NUM,
            R::SET_VRING_ADDR,
            R::SET_VRING_BASE,
            R::SET_VRING_CALL,
            R::SET_VRING_KICK,
            R::SET_VRING_ENABLE,
        ]);
    }
    assert_eq!(codes(&msgs), expected);
    assert!(msgs.iter().all(|m| m.flags & NEED_REPLY != 0));
    // The driver's features, and PROTOCOL_FEATURES for ember and virtiofsd.
    assert_eq!(msgs[0].u64_at(0), acked | PROTOCOL_FEATURES);

    // struct VhostUserMemory: num_regions, padding, then per region: guest address, size,
    // ember's address, file offset; one descriptor per region.
    let table = &msgs[1];
    assert_eq!(table.u32_at(0), 2);
    assert_eq!(table.body.len(), 8 + 2 * 32);
    for (n, (gpa, size, offset)) in [LOW, HIGH].into_iter().enumerate() {
        let at = 8 + 32 * n;
        assert_eq!(table.u64_at(at), gpa);
        assert_eq!(table.u64_at(at + 8), size as u64);
        assert_eq!(table.u64_at(at + 16), host_address(&mem, gpa));
        assert_eq!(table.u64_at(at + 24), offset);
    }
    assert_eq!(table.files.len(), 2);
    assert!(table.files.iter().all(|f| same_file(f, file.as_file())));

    for (queue, driver) in [&hiprio, &request].into_iter().enumerate() {
        let ring = &msgs[2 + 6 * queue..][..6];
        // struct vhost_vring_state: index, num.
        assert_eq!((ring[0].u32_at(0), ring[0].u32_at(4)), (queue as u32, 256));
        // struct vhost_vring_addr: index, flags, then ember's addresses of the descriptor
        // table, the used ring, the avail ring, and the log.
        let (desc, avail, used) = driver.addresses();
        assert_eq!(ring[1].u32_at(0), queue as u32);
        assert_eq!(ring[1].u32_at(4), 0);
        assert_eq!(ring[1].u64_at(8), host_address(&mem, desc));
        assert_eq!(ring[1].u64_at(16), host_address(&mem, used));
        assert_eq!(ring[1].u64_at(24), host_address(&mem, avail));
        assert_eq!(ring[1].u64_at(32), 0);
        let next_avail = if queue == 1 { 5 } else { 0 };
        assert_eq!(
            (ring[2].u32_at(0), ring[2].u32_at(4)),
            (queue as u32, next_avail)
        );
        // The call and kick eventfds come along (bit 8, "no descriptor", clear).
        for fd_msg in &ring[3..5] {
            assert_eq!(fd_msg.u64_at(0), queue as u64);
            assert_eq!(fd_msg.files.len(), 1);
        }
        assert_eq!((ring[5].u32_at(0), ring[5].u32_at(4)), (queue as u32, 1));
    }

    // The guest notifies the request queue: virtiofsd's kick eventfd counts it.
    let mut kick = msgs[2 + 6 + 4].files.first().unwrap().try_clone().unwrap();
    assert_eq!(fs.process_queue(1).unwrap(), Progress::Done);
    let mut count = [0; 8];
    kick.read_exact(&mut count).unwrap();
    assert_eq!(u64::from_ne_bytes(count), 1);
    // virtiofsd used buffers on the request queue: the guest is interrupted, once.
    let mut call = msgs[2 + 6 + 3].files.first().unwrap().try_clone().unwrap();
    call.write_all(&1u64.to_ne_bytes()).unwrap();
    assert!(!irq.fired());
    fs.process_host_event(2).unwrap();
    assert!(irq.fired());
    fs.process_host_event(2).unwrap();
    assert!(!irq.fired(), "a spurious wake-up raises nothing");
    // The device thread watches both call eventfds and the socket.
    assert_eq!(fs.host_event_fds().len(), 3);
    fs.process_host_event(SOCKET_EVENT).unwrap();
    // A queue that does not exist.
    assert!(fs.process_queue(2).is_err());
    assert!(fs.process_host_event(7).is_ok());
}

#[test]
fn reset_stops_the_rings_and_activation_starts_them_again() {
    let (backend, mut fs, _) = device(Script::default());
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let irq = Irq::new();
    let activate = |fs: &mut Fs| {
        fs.activate(
            mem.clone(),
            VERSION_1,
            vec![hiprio.queue(), request.queue()],
            irq.interrupt(),
        )
    };
    activate(&mut fs).unwrap();
    let kick = backend.take().swap_remove(2 + 4).files.remove(0);
    fs.reset();
    let msgs = backend.take();
    use FrontendReq as R;
    assert_eq!(
        codes(&msgs),
        [
            R::SET_VRING_ENABLE,
            R::GET_VRING_BASE,
            R::SET_VRING_ENABLE,
            R::GET_VRING_BASE,
            R::RESET_DEVICE,
        ]
    );
    assert_eq!((msgs[0].u32_at(0), msgs[0].u32_at(4)), (0, 0));
    assert_eq!(msgs[3].u32_at(0), 1);
    // Reset: notifications go nowhere.
    fs.process_queue(0).unwrap();
    let mut count = [0; 8];
    let mut kick = kick;
    assert!(kick.read(&mut count).is_err(), "no kick after reset");
    assert!(matches!(fs.sleep(), Ok(None)));
    activate(&mut fs).unwrap();
    assert_eq!(backend.take().len(), 2 + 2 * 6);
}

#[test]
fn a_queue_the_driver_did_not_set_up_is_not_handed_over() {
    let (backend, mut fs, _) = device(Script::default());
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let mut unused = hiprio.queue();
    unused.set_ready(false);
    fs.activate(
        mem.clone(),
        VERSION_1,
        vec![unused, request.queue()],
        Irq::new().interrupt(),
    )
    .unwrap();
    let msgs = backend.take();
    assert_eq!(msgs.len(), 2 + 6);
    assert!(msgs[2..].iter().all(|m| m.u32_at(0) == 1));
    // Its notifications are ignored.
    fs.process_queue(0).unwrap();
    fs.reset();
    let stopped = backend.take();
    assert_eq!(stopped.len(), 3);
    assert!(stopped[..2].iter().all(|m| m.u32_at(0) == 1));
}

#[test]
fn anonymous_guest_memory_is_refused_before_anything_is_sent() {
    let (backend, mut fs, _) = device(Script::default());
    let mem = guest_memory();
    let [hiprio, request] = driver_queues(&mem);
    let error = fs
        .activate(
            mem.clone(),
            VERSION_1,
            vec![hiprio.queue(), request.queue()],
            Irq::new().interrupt(),
        )
        .unwrap_err();
    assert!(error.0.contains("memfd"), "{error}");
    assert!(backend.take().is_empty());
    assert!(matches!(fs.sleep(), Ok(None)), "not active");
}

#[test]
fn rings_outside_guest_memory_are_refused_before_anything_is_sent() {
    let (backend, mut fs, _) = device(Script::default());
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let interrupt = Irq::new().interrupt();
    let mut queue_at = |desc: u64, avail: u64, used: u64| {
        let mut queue = Queue::new(QUEUE_SIZE).unwrap();
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        fs.activate(
            mem.clone(),
            VERSION_1,
            vec![hiprio.queue(), queue],
            interrupt.clone(),
        )
    };
    let (desc, avail, used) = request.addresses();
    // In the hole between the regions, across the end of one, past the end of memory.
    for bad in [
        queue_at(MIB as u64 + 0x1000, avail, used),
        queue_at(desc, MIB as u64 - 0x100, used),
        queue_at(desc, avail, 3 * MIB as u64 - 0x10),
        queue_at(desc, avail, u64::MAX - 0xfff),
    ] {
        let error = bad.unwrap_err();
        assert!(error.0.contains("queue 1"), "{error}");
    }
    assert!(backend.take().is_empty());
    // A ring in the high region is fine.
    queue_at(desc, avail, 2 * MIB as u64).unwrap();
}

#[test]
fn a_request_the_backend_refuses_breaks_activation() {
    let (backend, mut fs, _) = device(Script {
        refuse: Some(FrontendReq::SET_MEM_TABLE),
        ..Script::default()
    });
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let error = fs
        .activate(
            mem.clone(),
            VERSION_1,
            vec![hiprio.queue(), request.queue()],
            Irq::new().interrupt(),
        )
        .unwrap_err();
    assert!(error.0.contains("SET_MEM_TABLE"), "{error}");
    // Nothing was started; the device state is reset all the same.
    assert_eq!(
        codes(&backend.take()),
        [
            FrontendReq::SET_FEATURES,
            FrontendReq::SET_MEM_TABLE,
            FrontendReq::RESET_DEVICE
        ]
    );
    assert!(matches!(fs.sleep(), Ok(None)), "not active");
}

#[test]
fn a_backend_that_dies_breaks_the_device_without_a_panic() {
    let (mut backend, mut fs, _) = device(Script::default());
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let irq = Irq::new();
    let activate = |fs: &mut Fs| {
        fs.activate(
            mem.clone(),
            VERSION_1,
            vec![hiprio.queue(), request.queue()],
            irq.interrupt(),
        )
    };
    activate(&mut fs).unwrap();
    fs.process_host_event(SOCKET_EVENT).unwrap();
    backend.die();
    let error = fs.process_host_event(SOCKET_EVENT).unwrap_err();
    assert!(error.0.contains("closed its socket"), "{error}");
    // The transport resets a broken device; the backend is gone, which is only logged.
    fs.reset();
    let error = activate(&mut fs).unwrap_err();
    assert!(error.0.contains("SET_FEATURES"), "{error}");
    // Inactive, the socket is not looked at.
    fs.process_host_event(SOCKET_EVENT).unwrap();
}

#[test]
fn without_protocol_features_rings_start_with_their_kick() {
    let backend = FakeBackend::start(Script {
        features: VERSION_1 | EVENT_IDX,
        ..Script::default()
    });
    let mut fs = Fs::new(config("old", &backend)).unwrap();
    assert_eq!(
        codes(&backend.take_at_least(2)),
        [FrontendReq::SET_OWNER, FrontendReq::GET_FEATURES]
    );
    assert_eq!(fs.available_features(), VERSION_1 | EVENT_IDX);
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    fs.activate(
        mem.clone(),
        VERSION_1,
        vec![hiprio.queue(), request.queue()],
        Irq::new().interrupt(),
    )
    .unwrap();
    let msgs = backend.take_at_least(2 + 2 * 5);
    assert_eq!(msgs.len(), 2 + 2 * 5);
    assert_eq!(msgs[0].u64_at(0), VERSION_1);
    assert!(msgs.iter().all(|m| m.flags & NEED_REPLY == 0));
    assert!(!codes(&msgs).contains(&FrontendReq::SET_VRING_ENABLE));
    fs.reset();
    assert_eq!(
        codes(&backend.take()),
        [FrontendReq::GET_VRING_BASE, FrontendReq::GET_VRING_BASE]
    );
}

#[test]
fn an_active_device_refuses_to_sleep_and_state_keeps_the_tag() {
    let (_backend, mut fs, _) = device(Script::default());
    let (mem, _file) = file_memory();
    let [hiprio, request] = driver_queues(&mem);
    let irq = Irq::new();
    fs.activate(
        mem.clone(),
        VERSION_1,
        vec![hiprio.queue(), request.queue()],
        irq.interrupt(),
    )
    .unwrap();
    let error = fs.sleep().unwrap_err();
    assert!(error.0.contains("not supported yet"), "{error}");
    // Still active: notifications still go through.
    fs.process_queue(1).unwrap();
    let state = fs.save_state();
    assert_eq!(
        state,
        VirtioDeviceState::Fs {
            tag: "shared".into()
        }
    );
    assert_eq!(state.device_type(), 26);
    assert_eq!(state.acked_features(), None);
    fs.restore_state(&state).unwrap();
    assert!(matches!(fs.sleep(), Ok(None)), "restored as reset");
    assert!(matches!(
        fs.restore_state(&VirtioDeviceState::Fs {
            tag: "other".into()
        }),
        Err(VirtioDeviceStateError::FsTag { .. })
    ));
    assert!(matches!(
        fs.restore_state(&VirtioDeviceState::Vsock {
            guest_cid: 3,
            acked_features: None,
            next_host_port: None,
        }),
        Err(VirtioDeviceStateError::WrongDevice {
            saved: 19,
            device: 26
        })
    ));
    assert!(fs.wake(mem.clone(), Vec::new(), irq.interrupt()).is_err());
}

/// The real thing: virtiofsd serves a FUSE_INIT the guest put on the request queue. Needs
/// `virtiofsd` on PATH (`cargo install virtiofsd --locked`), so it only runs when asked:
/// `cargo test -p ember-devices virtiofsd -- --ignored`.
#[test]
#[ignore = "needs virtiofsd on PATH"]
fn virtiofsd_answers_fuse_init() {
    use std::process::{Command, Stdio};
    use vm_memory::Bytes;
    use vmm_sys_util::tempdir::TempDir;

    let dir = TempDir::new_with_prefix("/tmp/ember-virtiofsd-").unwrap();
    let shared = dir.as_path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let socket = dir.as_path().join("vfsd.sock");
    let mut daemon = Command::new("virtiofsd")
        .arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&shared)
        .args(["--cache", "auto", "--sandbox", "none"])
        .stdin(Stdio::null())
        .spawn()
        .expect("virtiofsd on PATH");
    let result = std::panic::catch_unwind(|| {
        let mut fs = Fs::new(FsDeviceConfig {
            tag: "shared".into(),
            socket: socket.clone(),
        })
        .unwrap();
        let features = fs.available_features();
        assert_ne!(features & VERSION_1, 0);
        let (mem, _file) = file_memory();
        let irq = Irq::new();
        // Twice: after a guest reset, a new driver starts over.
        for unique in 1..=2u64 {
            let [hiprio, mut request] = driver_queues(&mem);
            fs.activate(
                mem.clone(),
                VERSION_1,
                vec![hiprio.queue(), request.queue()],
                irq.interrupt(),
            )
            .unwrap();
            // FUSE_INIT (opcode 26): fuse_in_header (40 bytes), fuse_init_in 7.31 (16 bytes).
            let (input, output) = (0x4_0000u64, 0x4_1000u64);
            let mut init = Vec::new();
            init.extend(56u32.to_le_bytes());
            init.extend(26u32.to_le_bytes());
            init.extend(unique.to_le_bytes());
            init.extend([0; 24]); // nodeid, uid, gid, pid, extlen, padding
            init.extend(7u32.to_le_bytes());
            init.extend(31u32.to_le_bytes());
            init.extend(0x2_0000u32.to_le_bytes()); // max_readahead
            init.extend(0u32.to_le_bytes()); // flags
            mem.write_slice(&init, GuestAddress(input)).unwrap();
            mem.write_slice(&[0; 24], GuestAddress(output)).unwrap();
            request.push(&[(input, 56, false), (output, 256, true)]);
            fs.process_queue(1).unwrap();
            let mut poll = libc::pollfd {
                fd: fs.host_event_fds()[2],
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, which lives across the call.
            let ready = unsafe { libc::poll(&mut poll, 1, 10_000) };
            assert_eq!(ready, 1, "virtiofsd did not answer");
            fs.process_host_event(2).unwrap();
            assert!(irq.fired());
            assert_eq!(request.used_idx(), 1);
            let (head, len) = request.used(0);
            assert_eq!(head, 0);
            let mut out = [0u8; 24];
            mem.read_slice(&mut out, GuestAddress(output)).unwrap();
            let word = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
            // fuse_out_header: len, error, unique; then fuse_init_out: major, minor.
            assert_eq!(word(0), len);
            assert_eq!(word(4), 0, "FUSE_INIT failed");
            assert_eq!(u64::from_le_bytes(out[8..16].try_into().unwrap()), unique);
            assert_eq!(word(16), 7);
            fs.reset();
        }
        fs.process_host_event(SOCKET_EVENT).unwrap();
    });
    let _ = daemon.kill();
    let _ = daemon.wait();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
