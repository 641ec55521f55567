//! virtio-net (virtio 1.2, 5.1): a guest network interface whose frames go to and come from a
//! host TAP interface.
//!
//! One receive queue (0) and one transmit queue (1), served on the device's thread. Frames
//! keep the 12-byte `virtio_net_hdr_v1` in front on both sides, so the guest's checksum and
//! segmentation offloads pass through the TAP unchanged; at activation the TAP is told which
//! offloads the guest accepts on receive.
//!
//! Receive is driven from two sides: the TAP becoming readable (polled edge-triggered, so each
//! pass reads until the TAP is empty) and the guest posting buffers. The device only takes a
//! frame off the TAP when it holds a guest buffer for it; without one it stops, leaves the frames
//! queued in the kernel, and asks the guest for a notification, which starts the next pass. A
//! frame already read that does not fit in the buffers at hand is kept (one at most) and goes
//! first on the next pass; receive buffers taken off the ring but not yet filled are kept too,
//! so that with VIRTIO_NET_F_MRG_RXBUF a frame can wait for enough of them.
//!
//! Everything in a descriptor chain comes from the guest and may be hostile: a chain with the
//! wrong direction, outside guest memory, too short for the header or too long for any frame is
//! returned unused (length 0) and its frame, if any, dropped. Only a ring that cannot be walked
//! makes the device [`DeviceBroken`].
//!
//! This file is the device as the transport sees it: identity, features, configuration space,
//! activation, and what both directions share. `rx.rs` is the receive path, `tx.rs` the
//! transmit path, `mac.rs` the guest's MAC address, and [`tap`] the TAP backend.

use std::collections::VecDeque;
use std::io;
use std::mem::offset_of;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use vm_memory::{GuestMemoryError, GuestMemoryMmap};

use super::device_queue::DeviceQueue;
use super::{
    DeviceBroken, Interrupt, Progress, Queue, QueueT, VirtioDevice, VirtioDeviceState,
    VirtioDeviceStateError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use mac::guest_mac;
pub use mac::{mac_for_tap, parse_mac};
use rx::RxBuffer;
pub use state::{NetState, NetStateError};
use tap::{Tap, TapError, VNET_HDR_LEN};

mod mac;
mod rx;
mod state;
pub mod tap;
#[cfg(test)]
mod test_driver;
mod tx;

/// The virtio device ID of a network device (virtio 1.2, 5).
pub(crate) const DEVICE_TYPE_NET: u32 = 1;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_MAX_SIZES: [u16; 2] = [256, 256];
/// The largest Ethernet frame after the vnet header: a 64 KiB TSO/UFO packet plus its Ethernet
/// header, the bound Linux's virtio-net driver sizes its receive buffers for.
const MAX_FRAME_LEN: usize = 65550;
/// One frame as it crosses the device: vnet header, then the Ethernet frame.
const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Where `num_buffers` sits in the header; the device fills it in on receive.
const NUM_BUFFERS_OFFSET: usize = offset_of!(virtio_net_hdr_v1, num_buffers);
/// The configuration space is the MAC alone: VIRTIO_NET_F_STATUS is not offered, so the driver
/// takes the link as always up, and the fields after `status` belong to features not offered.
const CONFIG_SPACE_LEN: usize = 6;

/// How to build a virtio-net device: the TAP it uses and the guest's MAC address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetDeviceConfig {
    /// The host TAP interface, normally made beforehand with `ip tuntap add NAME mode tap`.
    pub tap: String,
    /// The guest's MAC address; when absent, a locally administered one derived from `tap`.
    pub mac: Option<[u8; 6]>,
}

/// Why a virtio-net device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP cannot be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The configured MAC is no NIC's own address.
    #[error("invalid MAC address {text:?}: {reason}")]
    InvalidMac {
        /// The MAC as given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The host side of the device: where transmitted frames go and received ones come from. Each
/// frame starts with a 12-byte `virtio_net_hdr_v1`. The descriptor must be non-blocking: reads
/// and writes return `WouldBlock` instead of waiting.
pub trait NetBackend: AsRawFd + Send {
    /// Reads one frame into `buf` (cut short if longer).
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Sets the `TUN_F_*` offloads frames read from the backend may carry.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// Frame counters since the device was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the backend the guest had no room for (too big for its buffers) or that were
    /// malformed.
    pub rx_dropped: u64,
    /// Frames the backend accepted.
    pub tx_frames: u64,
    /// Guest frames not sent: malformed chains, or the backend full or failing.
    pub tx_dropped: u64,
}

/// A virtio-net device attached to a TAP (or, in tests, any [`NetBackend`]).
pub struct Net {
    host: HostSide,
    mac: [u8; 6],
    phase: Phase,
}

/// Where the device is in its life, as the driver and the VMM moved it.
enum Phase {
    /// Before activation, or reset since.
    Reset,
    /// Activated: the driver's queues are being served.
    Active(Active),
    /// Activated with `features`, then put to sleep: the queues went back to the transport. A
    /// frame read from the backend and not yet delivered stays in `HostSide::rx_frame`, this long.
    Asleep {
        features: u64,
        deferred: Option<usize>,
    },
}

/// The backend and the host memory frames pass through; kept across guest resets.
struct HostSide {
    backend: Box<dyn NetBackend>,
    /// The frame being received, allocated once.
    rx_frame: Box<[u8]>,
    /// The frame being transmitted, allocated once: a TX flood never grows memory.
    tx_frame: Box<[u8]>,
    stats: NetStats,
    rx_errors: ErrorLog,
    tx_errors: ErrorLog,
}

/// What the driver handed over at DRIVER_OK.
struct Active {
    /// What the driver accepted at DRIVER_OK.
    features: u64,
    mem: GuestMemoryMmap,
    rx: DeviceQueue,
    tx: DeviceQueue,
    interrupt: Arc<Interrupt>,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may fill several receive buffers.
    mrg_rxbuf: bool,
    /// Receive buffers taken off the avail ring and not yet used, in ring order. At most a ring's
    /// worth: more are only taken while the frame in hand does not fit.
    rx_buffers: VecDeque<RxBuffer>,
    /// The length of a frame in `HostSide::rx_frame` read from the backend and not yet delivered.
    deferred: Option<usize>,
}

impl Net {
    /// Attaches to the TAP interface named in `config`.
    pub fn new(config: NetDeviceConfig) -> Result<Self, NetError> {
        let mac = guest_mac(&config)?;
        let tap = Tap::open(&config.tap)?;
        Ok(Self::with_backend(Box::new(tap), mac))
    }

    /// A device over any backend (tests use a socket pair), with the given MAC address.
    pub fn with_backend(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> Self {
        Self {
            host: HostSide {
                backend,
                rx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
                tx_frame: vec![0; MAX_BUFFER_LEN].into_boxed_slice(),
                stats: NetStats::default(),
                rx_errors: ErrorLog::default(),
                tx_errors: ErrorLog::default(),
            },
            mac,
            phase: Phase::Reset,
        }
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Frame counters.
    pub fn stats(&self) -> NetStats {
        self.host.stats
    }
}

fn available_features() -> u64 {
    [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
    ]
    .into_iter()
    .fold(0, |features, bit| features | 1 << bit)
}

/// The TAP offloads matching what the driver accepts on receive. The TAP takes TSO and UFO
/// only together with checksum offload, as virtio requires GUEST_CSUM for the GUEST_TSO/UFO
/// features (virtio 1.2, 5.1.3.1).
fn tap_offloads(features: u64) -> u32 {
    let acked = |bit: u32| features & (1 << bit) != 0;
    if !acked(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
    ] {
        if acked(bit) {
            flags |= flag;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn available_features(&self) -> u64 {
        available_features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config: [u8; CONFIG_SPACE_LEN] = self.mac;
        super::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is read-only for a VERSION_1 driver (virtio 1.2, 5.1.4.2).
        log::debug!(
            "virtio-net: ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        self.start(mem, features, queues, interrupt, None)
    }

    fn process_queue(&mut self, index: usize) -> Result<Progress, DeviceBroken> {
        let Phase::Active(active) = &mut self.phase else {
            log::debug!("virtio-net: queue notified while not active; ignored");
            return Ok(Progress::Done);
        };
        match index {
            RX_QUEUE => active.receive(&mut self.host)?,
            TX_QUEUE => active.transmit(&mut self.host)?,
            _ => {
                return Err(DeviceBroken(format!(
                    "virtio-net has two queues; the guest notified queue {index}"
                )))
            }
        }
        // Every pass finishes: receive when the TAP or the guest's buffers run out, transmit
        // when the ring is empty.
        Ok(Progress::Done)
    }

    fn reset(&mut self) {
        // The TAP stays attached: the VM still owns it. A deferred frame and the receive buffers
        // in hand belonged to the old rings and go with them.
        self.phase = Phase::Reset;
    }

    fn host_event_fds(&self) -> Vec<RawFd> {
        vec![self.host.backend.as_raw_fd()]
    }

    fn process_host_event(&mut self, index: usize) -> Result<(), DeviceBroken> {
        match (index, &mut self.phase) {
            (0, Phase::Active(active)) => active.receive(&mut self.host),
            (0, _) => Ok(()),
            _ => {
                log::debug!("virtio-net: event on unknown host descriptor {index}");
                Ok(())
            }
        }
    }

    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, DeviceBroken> {
        // Frames are sent synchronously within a TX pass, under the device model's lock, which
        // the caller holds: the transmit ring has nothing in flight. The receive side may hold
        // buffers taken off the ring and a frame read from the backend.
        match std::mem::replace(&mut self.phase, Phase::Reset) {
            Phase::Active(mut active) => {
                if let Err(e) = active.give_back_rx_buffers() {
                    self.phase = Phase::Active(active);
                    return Err(e);
                }
                self.phase = Phase::Asleep {
                    features: active.features,
                    deferred: active.deferred,
                };
                Ok(Some(vec![active.rx.into_queue(), active.tx.into_queue()]))
            }
            phase => {
                self.phase = phase;
                Ok(None)
            }
        }
    }

    fn wake(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        let Phase::Asleep { features, deferred } = self.phase else {
            return Err(DeviceBroken("virtio-net: woken while not asleep".into()));
        };
        self.start(mem, features, queues, interrupt, deferred)
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let stats = &self.host.stats;
        vec![
            ("rx_frames", stats.rx_frames),
            ("rx_dropped", stats.rx_dropped),
            ("tx_frames", stats.tx_frames),
            ("tx_dropped", stats.tx_dropped),
        ]
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Net(self.state())
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioDeviceStateError> {
        self.restore(state)
    }
}

impl Net {
    /// Serves `queues` with `features`, `deferred` bytes of `HostSide::rx_frame` first:
    /// activation (with nothing deferred) and wake alike.
    fn start(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        deferred: Option<usize>,
    ) -> Result<(), DeviceBroken> {
        let [mut rx, mut tx] = <[Queue; 2]>::try_from(queues).map_err(|queues| {
            DeviceBroken(format!(
                "virtio-net has two queues, but was given {}",
                queues.len()
            ))
        })?;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        // Again on wake: the backend may be a new TAP, in a restored VM.
        self.host.mirror_offloads(features);
        let active = Active {
            features,
            mem,
            rx: DeviceQueue::new(rx, "virtio-net RX"),
            tx: DeviceQueue::new(tx, "virtio-net TX"),
            interrupt,
            mrg_rxbuf: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_buffers: VecDeque::new(),
            deferred,
        };
        // Frames may be waiting since before the driver was ready, their edge long gone, and a
        // woken device may hold one: the transport kicks every queue once after activation and
        // wake, and the RX pass picks them up on the device's thread.
        self.phase = Phase::Active(active);
        Ok(())
    }
}

/// Why a descriptor chain carries no frame; the guest sees only a used length of 0.
#[derive(Debug, thiserror::Error)]
enum ChainError {
    #[error("a device-readable descriptor in a receive buffer")]
    ReadOnlyRxDescriptor,
    #[error("a device-writable descriptor in a transmit chain")]
    WritableTxDescriptor,
    #[error("a buffer at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("{0} bytes, less than the 12-byte vnet header")]
    TooShort(usize),
    #[error("more than the {MAX_BUFFER_LEN} bytes of the largest frame")]
    TooLong,
    #[error("cannot read guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

impl HostSide {
    /// Tells the backend which offloads the driver accepts on receive. Without them the backend
    /// still works, checksumming and segmenting itself, so a failure is only worth a warning.
    fn mirror_offloads(&mut self, features: u64) {
        let flags = tap_offloads(features);
        if let Err(e) = self.backend.set_offload(flags) {
            log::warn!("virtio-net: cannot set TAP offloads {flags:#x}, continuing without: {e}");
            if let Err(e) = self.backend.set_offload(0) {
                log::warn!("virtio-net: cannot clear TAP offloads either: {e}");
            }
        }
    }
}

/// Logs backend errors without flooding: a warning when the error changes, debug otherwise.
#[derive(Default)]
struct ErrorLog {
    last: Option<i32>,
}

impl ErrorLog {
    fn report(&mut self, what: &str, error: &io::Error) {
        let code = error.raw_os_error();
        let hint = if code == Some(libc::EIO) {
            " (is the interface up? `ip link set NAME up`)"
        } else {
            ""
        };
        if code.is_some() && code == self.last {
            log::debug!("virtio-net: {what}: {error}");
        } else {
            log::warn!("virtio-net: {what}: {error}{hint}; frames are dropped meanwhile");
            self.last = code;
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::test_driver::*;
    use super::*;

    fn config_bytes(net: &Net, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0xff; len];
        net.read_config(offset, &mut bytes);
        bytes
    }

    /// Runs `ip` with `args`.
    fn ip(args: &[&str]) {
        let status = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "ip {args:?}");
    }

    /// Receives frames until one has `ethertype`; returns it without its vnet header.
    fn receive_ethertype(driver: &mut Driver<'_>, ethertype: [u8; 2]) -> Vec<u8> {
        for _ in 0..200 {
            driver.post_rx(BUF, 4096);
            driver.net.process_host_event(0).unwrap();
            let idx = driver.used_idx(RX_QUEUE);
            if idx > 0 {
                let (_, len) = driver.used(RX_QUEUE, idx - 1);
                let frame = driver.guest_bytes(BUF, len as usize);
                if frame[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14] == ethertype {
                    return frame[VNET_HDR_LEN..].to_vec();
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no frame of type {ethertype:x?}");
    }

    #[test]
    fn identity_and_features() {
        let mem = guest_memory();
        let driver = Driver::new(&mem, BASE_FEATURES);
        let net = &driver.net;
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        let features = net.available_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
        ] {
            assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
        }
        // No STATUS, control queue or multiqueue.
        for bit in [16, 17, 22] {
            assert_eq!(features & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(net.host_event_fds().len(), 1);
    }

    #[test]
    fn config_space_holds_the_mac() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        assert_eq!(driver.net.mac(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(config_bytes(&driver.net, 0, 6), [2, 0, 0, 0, 0, 1]);
        assert_eq!(config_bytes(&driver.net, 4, 4), [0, 1, 0, 0]);
        assert_eq!(config_bytes(&driver.net, 6, 2), [0, 0]);
        assert_eq!(config_bytes(&driver.net, u64::MAX, 4), [0; 4]);
        driver.net.write_config(0, &[0xff; 6]);
        assert_eq!(config_bytes(&driver.net, 0, 6), [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn offloads_mirror_the_guest_receive_features() {
        let mem = guest_memory();
        use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};
        let guest = |bits: &[u32]| bits.iter().fold(BASE_FEATURES, |f, b| f | 1 << b);
        let driver = Driver::new(
            &mem,
            guest(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_HOST_TSO6,
            ]),
        );
        assert_eq!(*driver.offloads.lock().unwrap(), [TUN_F_CSUM | TUN_F_TSO4]);
        let all = guest(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_UFO,
        ]);
        assert_eq!(
            tap_offloads(all),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO
        );
        // TSO without checksum offload is not valid; the TAP gets nothing.
        assert_eq!(tap_offloads(guest(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(tap_offloads(BASE_FEATURES), 0);
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX);
        // used_event = 1: interrupt when the used index passes 1, i.e. at the second frame.
        driver.rings[TX_QUEUE].set_used_event(1);
        for expected in [false, true, false] {
            driver.queue_tx([0; 12], b"frame");
            driver.net.process_queue(TX_QUEUE).unwrap();
            assert_eq!(driver.interrupted(), expected);
        }
        // The device asks to be notified at the next TX avail entry...
        assert_eq!(driver.avail_event(TX_QUEUE), 3);
        // ...and, when receive buffers run out, at the next RX one.
        driver.post_rx(BUF, 2048);
        driver.post_rx(BUF2, 2048);
        driver.inject(&frame(10, 1));
        driver.net.process_queue(RX_QUEUE).unwrap();
        driver.inject(&frame(10, 2));
        driver.inject(&frame(10, 3));
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.avail_event(RX_QUEUE), 2);
    }

    #[test]
    fn reset_drops_the_deferred_frame_and_keeps_the_backend() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | MRG);
        driver.post_rx(BUF, 64);
        driver.inject(&frame(200, 1));
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        driver.net.reset();
        // After a reset, notifications and host events do nothing.
        driver.inject(&frame(20, 2));
        driver.net.process_host_event(0).unwrap();
        driver.net.process_queue(TX_QUEUE).unwrap();

        driver.activate(BASE_FEATURES | MRG);
        driver.post_rx(BUF, 2048);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.guest_bytes(BUF, 32), received(&frame(20, 2), 1));
        assert_eq!(driver.used(RX_QUEUE, 0), (0, 32));
    }

    #[test]
    fn a_broken_ring_breaks_the_device() {
        let mem = guest_memory();
        let mem2 = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        driver.set_avail_idx(TX_QUEUE, QUEUE_SIZE + 1);
        let error = driver.net.process_queue(TX_QUEUE).unwrap_err();
        assert!(error.to_string().contains("ahead"), "{error}");

        let mut driver = Driver::new(&mem2, BASE_FEATURES);
        driver.offer(RX_QUEUE, QUEUE_SIZE + 3);
        driver.inject(&frame(10, 0));
        assert!(driver.net.process_host_event(0).is_err());
    }

    #[test]
    fn queue_bookkeeping_errors() {
        let mem = guest_memory();
        let (ours, _peer) = socket_pair();
        let backend = SocketBackend {
            socket: ours,
            offloads: Arc::default(),
        };
        let mut net = Net::with_backend(Box::new(backend), [2, 0, 0, 0, 0, 1]);
        // Not activated yet: nothing to do.
        net.process_queue(RX_QUEUE).unwrap();
        net.process_queue(TX_QUEUE).unwrap();
        net.process_host_event(0).unwrap();
        let one = vec![DriverQueue::new(&mem, RX_RING).queue()];
        let interrupt = Irq::new().interrupt();
        assert!(net
            .activate(mem.clone(), BASE_FEATURES, one, interrupt)
            .is_err());

        let mut driver = Driver::new(&mem, BASE_FEATURES);
        assert!(driver.net.process_queue(2).is_err());
        driver.net.process_host_event(5).unwrap();
    }

    /// The host ARPs for a guest address through a real TAP, the "guest" answers, and the UDP
    /// datagram the host held back arrives. Needs CAP_NET_ADMIN and creates an interface: run
    /// it in a network namespace of its own,
    /// `unshare -rn cargo test -p ember-devices virtio::net -- --ignored`.
    #[test]
    #[ignore]
    fn a_real_tap_carries_arp_and_udp() {
        let mem = guest_memory();
        let net = Net::new(NetDeviceConfig {
            tap: "embertest1".to_string(),
            mac: None,
        })
        .unwrap();
        let mac = net.mac();
        let (_, peer) = socket_pair();
        let features = BASE_FEATURES | MRG | 1 << VIRTIO_NET_F_GUEST_CSUM;
        let mut driver = Driver::with_net(&mem, net, peer, Arc::default(), features);
        ip(&["addr", "add", "10.9.0.1/24", "dev", "embertest1"]);
        ip(&["link", "set", "embertest1", "up"]);
        let socket = std::net::UdpSocket::bind("10.9.0.1:0").unwrap();
        socket.send_to(b"hello guest", "10.9.0.2:9").unwrap();

        let request = receive_ethertype(&mut driver, [0x08, 0x06]);
        let host_mac: [u8; 6] = request[6..12].try_into().unwrap();
        assert_eq!(&request[38..42], &[10, 9, 0, 2], "ARP target");
        let mut reply = vec![0u8; VNET_HDR_LEN];
        reply.extend_from_slice(&host_mac);
        reply.extend_from_slice(&mac);
        reply.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&mac);
        reply.extend_from_slice(&[10, 9, 0, 2]);
        reply.extend_from_slice(&host_mac);
        reply.extend_from_slice(&[10, 9, 0, 1]);
        driver.mem.write_slice(&reply, GuestAddress(BUF2)).unwrap();
        driver.push(TX_QUEUE, &[readable(BUF2, reply.len() as u32)]);
        driver.net.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.net.stats().tx_frames, 1);

        let datagram = receive_ethertype(&mut driver, [0x08, 0x00]);
        assert_eq!(&datagram[..6], &mac);
        assert!(datagram.ends_with(b"hello guest"), "{datagram:x?}");
        // The monitor's metrics see the same totals.
        let counters: std::collections::HashMap<_, _> =
            VirtioDevice::counters(&driver.net).into_iter().collect();
        assert_eq!(counters["tx_frames"], driver.net.stats().tx_frames);
        assert_eq!(counters["rx_frames"], driver.net.stats().rx_frames);
        assert!(counters["rx_frames"] >= 1, "{counters:?}");
        assert_eq!(counters["tx_dropped"], 0);
    }

    /// A hostile guest driver and a hostile network: transmit chains of any shape (headers
    /// short, device-writable or past guest memory, any offload flags and sizes), receive
    /// buffers of any size and place, frames from the TAP side of any length and content, any
    /// accepted feature set. The device answers or breaks, never panics.
    #[test]
    fn fuzz_net_frames() {
        use std::os::unix::net::UnixDatagram;
        const PLACES: [u64; 4] = [0x8000, 0x9000, 0x2_0000, MEM_SIZE as u64 - 64];
        crate::fuzz::run("net_frames", |rng| {
            let mem = guest_memory();
            let features = rng.next_u64() | 1 << crate::virtio::VIRTIO_F_VERSION_1;
            let (ours, peer) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            peer.set_nonblocking(true).unwrap();
            let backend = SocketBackend {
                socket: ours,
                offloads: Default::default(),
            };
            let net = Net::with_backend(Box::new(backend), [2, 0, 0, 0, 0, 1]);
            let features = features & net.available_features();
            let mut driver = Driver::with_net(&mem, net, peer, Default::default(), features);
            for _ in 0..1 + rng.below(10) {
                let place = rng.pick(&PLACES);
                let addr = if rng.one_in(6) { rng.edgy_u64() } else { place };
                let len = if rng.one_in(4) {
                    rng.edgy_u64() as u32
                } else {
                    rng.below(2048) as u32
                };
                if rng.one_in(2) {
                    let header_len = rng.pick(&[12u32, 10, 0, 64]);
                    let header = rng.bytes(12);
                    mem.write_slice(&header, vm_memory::GuestAddress(place))
                        .unwrap();
                    driver.push(
                        TX_QUEUE,
                        &[
                            (place, header_len, rng.one_in(10)),
                            (addr, len, rng.one_in(10)),
                        ],
                    );
                    if driver.net.process_queue(TX_QUEUE).is_err() {
                        break;
                    }
                } else {
                    driver.push(RX_QUEUE, &[(addr, len, !rng.one_in(10))]);
                    let frame_len = rng.pick(&[0, 14, 60, 1514, 9000, 65535]);
                    let frame = rng.bytes(frame_len);
                    let _ = driver.peer.send(&frame);
                    if driver.net.process_queue(RX_QUEUE).is_err() {
                        break;
                    }
                    for index in 0..driver.net.host_event_fds().len() {
                        if driver.net.process_host_event(index).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}
