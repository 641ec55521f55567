//! virtio-net (virtio 1.2, 5.1): a guest network interface whose frames go to and come from a
//! host TAP interface.
//!
//! One receive queue (0) and one transmit queue (1), served on the device event loop. Frames
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

use std::collections::VecDeque;
use std::io;
use std::mem::offset_of;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    virtio_net_hdr_v1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap};

use super::{
    DeviceBroken, Interrupt, Queue, QueueT, VirtioDevice, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::tap::{Tap, TapError, VNET_HDR_LEN};

/// The virtio device ID of a network device (virtio 1.2, 5).
const DEVICE_TYPE_NET: u32 = 1;
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
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("invalid MAC address {text:?}: {reason}")]
    InvalidMac { text: String, reason: &'static str },
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

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.write(frame)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }
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
    /// Present between activation and reset.
    active: Option<Active>,
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
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
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
            active: None,
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

/// The MAC the guest gets for `config`: the configured one, which must be unicast, or the one
/// derived from the TAP name.
fn guest_mac(config: &NetDeviceConfig) -> Result<[u8; 6], NetError> {
    match config.mac {
        Some(mac) => {
            check_unicast(&mac).map_err(|reason| NetError::InvalidMac {
                text: format_mac(&mac),
                reason,
            })?;
            Ok(mac)
        }
        None => Ok(mac_for_tap(&config.tap)),
    }
}

/// A MAC address for the guest on TAP `name`: locally administered, unicast, and the same every
/// time for the same name, so the guest keeps its DHCP lease and neighbours their ARP entries
/// across restarts. Hashed with 64-bit FNV-1a; two TAPs on one host have different names, so
/// their VMs differ unless the hash collides in 46 bits.
pub fn mac_for_tap(name: &str) -> [u8; 6] {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = name.bytes().fold(FNV_OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    });
    // The high bytes: FNV's multiply carries every input bit upwards.
    let [a, b, c, d, e, f, _, _] = hash.to_be_bytes();
    // Bit 0 of the first byte is the group (multicast) bit, bit 1 the locally administered bit.
    [a & 0xfe | 0x02, b, c, d, e, f]
}

/// Parses `xx:xx:xx:xx:xx:xx` (hex, either case) into a unicast MAC address.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let invalid = |reason| NetError::InvalidMac {
        text: text.to_string(),
        reason,
    };
    let mut mac = [0; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| invalid(FORMAT))?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(FORMAT));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid(FORMAT))?;
    }
    if parts.next().is_some() {
        return Err(invalid(FORMAT));
    }
    check_unicast(&mac).map_err(invalid)?;
    Ok(mac)
}

const FORMAT: &str = "expected six two-digit hex bytes separated by colons, like 02:00:00:00:00:01";

/// A NIC's own address must be unicast and not all zeros.
fn check_unicast(mac: &[u8; 6]) -> Result<(), &'static str> {
    if mac[0] & 1 != 0 {
        return Err(
            "it is a multicast address (the first byte is odd); use a unicast one, \
                    like 02:00:00:00:00:01",
        );
    }
    if mac == &[0; 6] {
        return Err("the all-zero address is not a valid NIC address");
    }
    Ok(())
}

fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
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
        let [mut rx, mut tx] = <[Queue; 2]>::try_from(queues).map_err(|queues| {
            DeviceBroken(format!(
                "virtio-net has two queues, but was given {}",
                queues.len()
            ))
        })?;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        self.host.mirror_offloads(features);
        let active = Active {
            mem,
            rx,
            tx,
            interrupt,
            mrg_rxbuf: features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_buffers: VecDeque::new(),
            deferred: None,
        };
        // Frames may be waiting since before the driver was ready, their edge long gone: the
        // transport kicks every queue once after activation, and the RX pass picks them up on
        // the device event loop.
        self.active = Some(active);
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceBroken> {
        let Some(active) = self.active.as_mut() else {
            log::debug!("virtio-net: queue notified before activation; ignored");
            return Ok(());
        };
        match index {
            RX_QUEUE => active.receive(&mut self.host),
            TX_QUEUE => active.transmit(&mut self.host),
            _ => Err(DeviceBroken(format!(
                "virtio-net has two queues; the guest notified queue {index}"
            ))),
        }
    }

    fn reset(&mut self) {
        // The TAP stays attached: the VM still owns it. A deferred frame and the receive buffers
        // in hand belonged to the old rings and go with them.
        self.active = None;
    }

    fn host_event_fds(&self) -> Vec<RawFd> {
        vec![self.host.backend.as_raw_fd()]
    }

    fn process_host_event(&mut self, index: usize) -> Result<(), DeviceBroken> {
        match (index, self.active.as_mut()) {
            (0, Some(active)) => active.receive(&mut self.host),
            (0, None) => Ok(()),
            _ => {
                log::debug!("virtio-net: event on unknown host descriptor {index}");
                Ok(())
            }
        }
    }
}

fn broken(what: &str, error: virtio_queue::Error) -> DeviceBroken {
    DeviceBroken(format!("virtio-net: {what}: {error}"))
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

/// What became of the frame in hand.
enum Delivery {
    Delivered,
    /// It can never fit the guest's buffers.
    Dropped,
    /// It needs more buffers than the guest has posted so far.
    NeedBuffers,
}

/// How the frame in hand fits the receive buffers held.
enum Fit {
    /// In the first this many.
    Buffers(usize),
    /// Not yet: more buffers may make it fit.
    Short,
    /// Never.
    TooBig,
}

/// A receive buffer: one device-writable descriptor chain, checked to lie in guest memory.
struct RxBuffer {
    head: u16,
    /// (address, length) of each non-empty descriptor, in chain order.
    segments: Vec<(GuestAddress, u32)>,
    capacity: usize,
}

impl RxBuffer {
    fn new(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, ChainError> {
        let head = chain.head_index();
        let mut segments = Vec::new();
        let mut capacity = 0usize;
        // The iterator ends after a queue's worth of descriptors: looping chains end too.
        for descriptor in chain {
            if !descriptor.is_write_only() {
                return Err(ChainError::ReadOnlyRxDescriptor);
            }
            let (addr, len) = (descriptor.addr(), descriptor.len());
            if len == 0 {
                continue;
            }
            if !mem.check_range(addr, len as usize) {
                return Err(ChainError::OutsideMemory { addr: addr.0, len });
            }
            segments.push((addr, len));
            // At most 256 u32 lengths: no overflow on 64-bit hosts, saturating elsewhere.
            capacity = capacity.saturating_add(len as usize);
        }
        if capacity < VNET_HDR_LEN {
            return Err(ChainError::TooShort(capacity));
        }
        Ok(Self {
            head,
            segments,
            capacity,
        })
    }

    /// Copies as much of `data` as fits; returns how many bytes that was.
    fn fill(&self, mem: &GuestMemoryMmap, data: &[u8]) -> usize {
        let mut written = 0;
        for &(addr, len) in &self.segments {
            let Some(part) = data.get(written..).filter(|rest| !rest.is_empty()) else {
                break;
            };
            let part = &part[..part.len().min(len as usize)];
            // The range was checked when the buffer was taken; guest memory does not shrink.
            if let Err(e) = mem.write_slice(part, addr) {
                log::debug!("virtio-net: cannot write a receive buffer: {e}");
                break;
            }
            written += part.len();
        }
        written
    }
}

impl Active {
    /// Moves frames from the backend into receive buffers until the backend is empty or the guest
    /// has no room left, then interrupts the guest if it asked to be told.
    fn receive(&mut self, host: &mut HostSide) -> Result<(), DeviceBroken> {
        if !self.rx.ready() {
            log::debug!("virtio-net: the receive queue is not ready");
            return Ok(());
        }
        let mut used = 0;
        let received = self.receive_frames(host, &mut used);
        // Buffers returned before the ring broke still deserve their interrupt.
        let signalled = signal_used(&mut self.rx, &self.mem, &self.interrupt, used);
        received.and(signalled)
    }

    fn receive_frames(
        &mut self,
        host: &mut HostSide,
        used: &mut usize,
    ) -> Result<(), DeviceBroken> {
        loop {
            let len = match self.deferred {
                Some(len) => len,
                None => {
                    // Never take a frame off the backend without a buffer for it: it would have
                    // to be held or dropped, while the kernel queue holds it for free.
                    if self.rx_buffers.is_empty() && !self.take_rx_buffer(used)? {
                        if self.want_rx_notification()? {
                            continue;
                        }
                        return Ok(());
                    }
                    match host.read_frame() {
                        Some(len) => len,
                        None => {
                            // The next frame comes with an edge on the backend descriptor; guest
                            // notifications are not needed until the buffers run out.
                            self.rx
                                .disable_notification(&self.mem)
                                .map_err(|e| broken("cannot disable RX notifications", e))?;
                            return Ok(());
                        }
                    }
                }
            };
            // Never out of bounds: read_frame returns at most the buffer's length.
            let frame = &mut host.rx_frame[..len];
            match self.deliver(frame, used)? {
                Delivery::Delivered => {
                    self.deferred = None;
                    host.stats.rx_frames += 1;
                }
                Delivery::Dropped => {
                    log::debug!("virtio-net: a {len}-byte frame does not fit the RX buffers");
                    self.deferred = None;
                    host.stats.rx_dropped += 1;
                }
                Delivery::NeedBuffers => {
                    self.deferred = Some(len);
                    if !self.want_rx_notification()? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Asks the driver to notify the receive queue when it adds buffers; true if it added some
    /// meanwhile (so no notification will come for those).
    fn want_rx_notification(&mut self) -> Result<bool, DeviceBroken> {
        self.rx
            .enable_notification(&self.mem)
            .map_err(|e| broken("cannot enable RX notifications", e))
    }

    /// Copies `frame` (vnet header first) into the receive buffers held, taking more off the
    /// ring as needed, and returns those it filled to the guest.
    fn deliver(&mut self, frame: &mut [u8], used: &mut usize) -> Result<Delivery, DeviceBroken> {
        let count = loop {
            match self.fit(frame.len()) {
                Fit::Buffers(count) => break count,
                Fit::TooBig => return Ok(Delivery::Dropped),
                Fit::Short => {
                    if !self.take_rx_buffer(used)? {
                        return Ok(Delivery::NeedBuffers);
                    }
                }
            }
        };
        // Set even without MRG_RXBUF, where it must be 1 (virtio 1.2, 5.1.6.4). `count` is at
        // most a queue's worth, and the buffers hold at least the header.
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        if let Some(field) = frame.get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2) {
            field.copy_from_slice(&num_buffers.to_le_bytes());
        }
        let mut rest: &[u8] = frame;
        // Consecutive used entries: the driver gathers a merged frame's buffers in used order.
        for buffer in self.rx_buffers.drain(..count) {
            let written = buffer.fill(&self.mem, rest);
            rest = &rest[written..];
            // At most MAX_BUFFER_LEN.
            let used_len = u32::try_from(written).unwrap_or(u32::MAX);
            self.rx
                .add_used(&self.mem, buffer.head, used_len)
                .map_err(|e| broken(&format!("cannot return RX buffer {}", buffer.head), e))?;
            *used += 1;
        }
        Ok(Delivery::Delivered)
    }

    /// How a frame of `len` bytes fits the buffers held.
    fn fit(&self, len: usize) -> Fit {
        if !self.mrg_rxbuf {
            // Each buffer must hold a whole frame. Buffers all have the size the driver chose
            // for its MTU and offloads, so a frame too big for one is too big for any.
            return match self.rx_buffers.front() {
                None => Fit::Short,
                Some(buffer) if buffer.capacity >= len => Fit::Buffers(1),
                Some(_) => Fit::TooBig,
            };
        }
        let mut capacity = 0usize;
        for (index, buffer) in self.rx_buffers.iter().enumerate() {
            capacity = capacity.saturating_add(buffer.capacity);
            if capacity >= len {
                return Fit::Buffers(index + 1);
            }
        }
        // With a ring's worth in hand the driver cannot post more before some come back.
        if self.rx_buffers.len() >= usize::from(self.rx.size()) {
            Fit::TooBig
        } else {
            Fit::Short
        }
    }

    /// Takes the next usable receive buffer off the avail ring, returning the unusable ones it
    /// meets with length 0. False when the ring has no more.
    fn take_rx_buffer(&mut self, used: &mut usize) -> Result<bool, DeviceBroken> {
        while let Some(chain) = pop_chain(&mut self.rx, &self.mem, "RX")? {
            let head = chain.head_index();
            match RxBuffer::new(&self.mem, chain) {
                Ok(buffer) => {
                    self.rx_buffers.push_back(buffer);
                    return Ok(true);
                }
                Err(e) => {
                    log::debug!("virtio-net: RX buffer {head} refused: {e}");
                    // Fails when the head index is outside the queue: such a chain cannot be
                    // returned, and the driver would wait for it forever.
                    self.rx
                        .add_used(&self.mem, head, 0)
                        .map_err(|e| broken(&format!("cannot return RX buffer {head}"), e))?;
                    *used += 1;
                }
            }
        }
        Ok(false)
    }

    /// Sends every frame on the transmit ring, then interrupts the guest if it asked to be told.
    fn transmit(&mut self, host: &mut HostSide) -> Result<(), DeviceBroken> {
        if !self.tx.ready() {
            log::debug!("virtio-net: the transmit queue is not ready");
            return Ok(());
        }
        let mut used = 0;
        let sent = self.transmit_frames(host, &mut used);
        let signalled = signal_used(&mut self.tx, &self.mem, &self.interrupt, used);
        sent.and(signalled)
    }

    /// Serves chains until the avail ring is empty with notifications re-enabled, so that a frame
    /// the driver adds while notifications are off is never missed. Each chain completes before
    /// the next is looked at: whatever the guest queues, only one frame is in host memory.
    fn transmit_frames(
        &mut self,
        host: &mut HostSide,
        used: &mut usize,
    ) -> Result<(), DeviceBroken> {
        loop {
            self.tx
                .disable_notification(&self.mem)
                .map_err(|e| broken("cannot disable TX notifications", e))?;
            while let Some(chain) = pop_chain(&mut self.tx, &self.mem, "TX")? {
                let head = chain.head_index();
                match gather(&self.mem, chain, &mut host.tx_frame) {
                    Ok(len) => host.send(len),
                    Err(e) => {
                        log::debug!("virtio-net: TX chain {head} dropped: {e}");
                        host.stats.tx_dropped += 1;
                    }
                }
                // The device writes nothing into a transmit chain.
                self.tx
                    .add_used(&self.mem, head, 0)
                    .map_err(|e| broken(&format!("cannot return TX chain {head}"), e))?;
                *used += 1;
            }
            let more = self
                .tx
                .enable_notification(&self.mem)
                .map_err(|e| broken("cannot enable TX notifications", e))?;
            if !more {
                return Ok(());
            }
        }
    }
}

/// Copies a transmit chain (vnet header, then the frame, device-readable) into `frame`;
/// returns its length.
fn gather(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for descriptor in chain {
        if descriptor.is_write_only() {
            return Err(ChainError::WritableTxDescriptor);
        }
        let (addr, part_len) = (descriptor.addr(), descriptor.len());
        let Some(part) = len
            .checked_add(part_len as usize)
            .and_then(|end| frame.get_mut(len..end))
        else {
            return Err(ChainError::TooLong);
        };
        if part.is_empty() {
            // An empty descriptor carries nothing, wherever it points.
            continue;
        }
        if !mem.check_range(addr, part.len()) {
            return Err(ChainError::OutsideMemory {
                addr: addr.0,
                len: part_len,
            });
        }
        mem.read_slice(part, addr)
            .map_err(ChainError::GuestMemory)?;
        len += part.len();
    }
    if len < VNET_HDR_LEN {
        return Err(ChainError::TooShort(len));
    }
    Ok(len)
}

/// The next chain on the avail ring, if any.
fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    name: &str,
) -> Result<Option<DescriptorChain<&'a GuestMemoryMmap>>, DeviceBroken> {
    let avail_idx = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| broken(&format!("cannot read the {name} avail ring index"), e))?;
    let next_avail = Wrapping(queue.next_avail());
    if avail_idx == next_avail {
        return Ok(None);
    }
    // The driver can only be ahead by at most a ring's worth of entries (virtio 1.2, 2.7.6).
    let pending = (avail_idx - next_avail).0;
    if pending > queue.size() {
        return Err(DeviceBroken(format!(
            "virtio-net: the {name} avail ring index is {pending} entries ahead, in a queue of {}",
            queue.size()
        )));
    }
    queue
        .pop_descriptor_chain(mem)
        .map(Some)
        .ok_or_else(|| DeviceBroken(format!("virtio-net: cannot read the {name} avail ring")))
}

/// Interrupts the guest after `used` returned chains, if it wants to be told (EVENT_IDX).
fn signal_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    used: usize,
) -> Result<(), DeviceBroken> {
    if used == 0 {
        return Ok(());
    }
    match queue.needs_notification(mem) {
        Ok(true) => interrupt.signal_used_queue(),
        Ok(false) => {}
        Err(e) => return Err(broken("cannot read used_event", e)),
    }
    Ok(())
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

    /// Reads the next frame into `rx_frame`; None when the backend has none (or fails).
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            match self.backend.read_frame(&mut self.rx_frame) {
                // 0 is not a frame: end of file on a socket backend, nothing on a TAP.
                Ok(0) => return None,
                Ok(len) if len < VNET_HDR_LEN => {
                    log::debug!("virtio-net: a {len}-byte frame from the backend, no header");
                    self.stats.rx_dropped += 1;
                }
                Ok(len) => return Some(len.min(self.rx_frame.len())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    self.rx_errors.report("cannot read from the TAP", &e);
                    return None;
                }
            }
        }
    }

    /// Writes the `len`-byte frame in `tx_frame`. A full backend drops it, as a NIC with a full
    /// queue would; TCP in the guest retransmits.
    fn send(&mut self, len: usize) {
        let frame = &self.tx_frame[..len.min(self.tx_frame.len())];
        let written = loop {
            match self.backend.write_frame(frame) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                written => break written,
            }
        };
        match written {
            Ok(_) => self.stats.tx_frames += 1,
            Err(e) => {
                self.stats.tx_dropped += 1;
                if e.kind() == io::ErrorKind::WouldBlock {
                    log::debug!("virtio-net: the TAP queue is full; frame dropped");
                } else {
                    self.tx_errors.report("cannot write to the TAP", &e);
                }
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
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixDatagram;
    use std::sync::Mutex;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    const MEM_SIZE: usize = 1 << 20;
    const QUEUE_SIZE: u16 = 256;
    /// Where a split virtqueue lives (virtio 1.2, 2.7): descriptor table, avail ring, used ring.
    const RX_RING: [u64; 3] = [0x1000, 0x2000, 0x3000];
    const TX_RING: [u64; 3] = [0x4000, 0x5000, 0x6000];
    /// Frames and buffers, 64 KiB apart at most.
    const BUF: u64 = 0x10000;
    const BUF2: u64 = 0x20000;
    const BUF3: u64 = 0x30000;

    const BASE_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
    const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

    /// A descriptor as the driver writes it: (guest address, length, device-writable).
    type Buf = (u64, u32, bool);

    fn readable(addr: u64, len: u32) -> Buf {
        (addr, len, false)
    }

    fn writable(addr: u64, len: u32) -> Buf {
        (addr, len, true)
    }

    /// A connected, non-blocking AF_UNIX SOCK_SEQPACKET pair: it keeps frame boundaries, as a TAP
    /// does. std's UnixDatagram serves as a handle for its send/recv.
    fn socket_pair() -> (UnixDatagram, UnixDatagram) {
        let mut fds = [0; 2];
        let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: socketpair writes two descriptors into `fds`, which has room for both.
        let ret = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
        assert_eq!(ret, 0, "{}", io::Error::last_os_error());
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (ours, theirs) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (UnixDatagram::from(ours), UnixDatagram::from(theirs))
    }

    struct SocketBackend {
        socket: UnixDatagram,
        offloads: Arc<Mutex<Vec<u32>>>,
    }

    impl AsRawFd for SocketBackend {
        fn as_raw_fd(&self) -> RawFd {
            self.socket.as_raw_fd()
        }
    }

    impl NetBackend for SocketBackend {
        fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.socket.recv(buf)
        }

        fn write_frame(&mut self, frame: &[u8]) -> io::Result<usize> {
            self.socket.send(frame)
        }

        fn set_offload(&mut self, flags: u32) -> io::Result<()> {
            self.offloads.lock().unwrap().push(flags);
            Ok(())
        }
    }

    /// One split virtqueue as the driver sees it.
    struct Ring {
        desc: u64,
        avail: u64,
        used: u64,
        next_desc: u16,
        avail_idx: u16,
    }

    impl Ring {
        fn new([desc, avail, used]: [u64; 3]) -> Self {
            Self {
                desc,
                avail,
                used,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        fn queue(&self) -> Queue {
            let mut queue = Queue::new(QUEUE_SIZE).unwrap();
            queue.set_size(QUEUE_SIZE);
            queue.set_desc_table_address(Some(self.desc as u32), Some(0));
            queue.set_avail_ring_address(Some(self.avail as u32), Some(0));
            queue.set_used_ring_address(Some(self.used as u32), Some(0));
            queue.set_ready(true);
            queue
        }
    }

    /// Plays the guest driver (owns guest memory and both rings) and the far end of the TAP.
    struct Driver {
        mem: GuestMemoryMmap,
        net: Net,
        irq: EventFd,
        rings: [Ring; 2],
        peer: UnixDatagram,
        offloads: Arc<Mutex<Vec<u32>>>,
    }

    impl Driver {
        fn new(features: u64) -> Self {
            let (ours, peer) = socket_pair();
            let offloads = Arc::new(Mutex::new(Vec::new()));
            let backend = SocketBackend {
                socket: ours,
                offloads: offloads.clone(),
            };
            let net = Net::with_backend(Box::new(backend), [2, 0, 0, 0, 0, 1]);
            Self::with_net(net, peer, offloads, features)
        }

        fn with_net(
            net: Net,
            peer: UnixDatagram,
            offloads: Arc<Mutex<Vec<u32>>>,
            features: u64,
        ) -> Self {
            let mut driver = Driver {
                mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
                net,
                irq: EventFd::new(EFD_NONBLOCK).unwrap(),
                rings: [Ring::new(RX_RING), Ring::new(TX_RING)],
                peer,
                offloads,
            };
            driver.activate(features);
            driver
        }

        /// Sets up fresh rings and hands them to the device, as after a reset.
        fn activate(&mut self, features: u64) {
            self.clear_rings();
            self.hand_over(features);
        }

        fn clear_rings(&mut self) {
            for ring in &mut self.rings {
                for addr in [ring.avail, ring.used] {
                    self.mem
                        .write_slice(&[0; 0x1000], GuestAddress(addr))
                        .unwrap();
                }
                ring.next_desc = 0;
                ring.avail_idx = 0;
            }
        }

        /// DRIVER_OK: the rings as they are go to the device.
        fn hand_over(&mut self, features: u64) {
            let queues = vec![self.rings[0].queue(), self.rings[1].queue()];
            let interrupt = Arc::new(Interrupt::new(self.irq.try_clone().unwrap()));
            self.net
                .activate(self.mem.clone(), features, queues, interrupt)
                .unwrap();
        }

        /// Writes `chain` into queue `q`'s descriptor table; returns its head.
        fn write_chain(&mut self, q: usize, chain: &[Buf]) -> u16 {
            let head = self.rings[q].next_desc;
            for (i, &(addr, len, device_writes)) in chain.iter().enumerate() {
                let index = self.rings[q].next_desc;
                let next = (index + 1) % QUEUE_SIZE;
                let mut flags = 0;
                if device_writes {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if i + 1 < chain.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                self.write_descriptor(q, index, Descriptor::new(addr, len, flags, next));
                self.rings[q].next_desc = next;
            }
            head
        }

        fn write_descriptor(&self, q: usize, index: u16, descriptor: Descriptor) {
            let addr = self.rings[q].desc + 16 * u64::from(index);
            self.mem.write_obj(descriptor, GuestAddress(addr)).unwrap();
        }

        /// Puts a chain head in queue `q`'s avail ring and publishes it.
        fn offer(&mut self, q: usize, head: u16) {
            let ring = &mut self.rings[q];
            let slot = ring.avail + 4 + 2 * u64::from(ring.avail_idx % QUEUE_SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            ring.avail_idx = ring.avail_idx.wrapping_add(1);
            let idx = ring.avail_idx;
            self.set_avail_idx(q, idx);
        }

        fn set_avail_idx(&self, q: usize, idx: u16) {
            let addr = self.rings[q].avail + 2;
            self.mem.write_obj(idx, GuestAddress(addr)).unwrap();
        }

        fn push(&mut self, q: usize, chain: &[Buf]) -> u16 {
            let head = self.write_chain(q, chain);
            self.offer(q, head);
            head
        }

        /// Posts a one-descriptor receive buffer.
        fn post_rx(&mut self, addr: u64, len: u32) -> u16 {
            self.push(RX_QUEUE, &[writable(addr, len)])
        }

        /// Queues one frame (header + payload, one descriptor each) for transmission.
        fn queue_tx(&mut self, header: [u8; 12], payload: &[u8]) -> u16 {
            self.mem.write_slice(&header, GuestAddress(BUF)).unwrap();
            self.mem
                .write_slice(payload, GuestAddress(BUF + 12))
                .unwrap();
            self.push(
                TX_QUEUE,
                &[readable(BUF, 12), readable(BUF + 12, payload.len() as u32)],
            )
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.mem
                .read_obj(GuestAddress(self.rings[q].used + 2))
                .unwrap()
        }

        /// Used element `n` of queue `q`: (id, len).
        fn used(&self, q: usize, n: u16) -> (u32, u32) {
            let elem = self.rings[q].used + 4 + 8 * u64::from(n % QUEUE_SIZE);
            let id = self.mem.read_obj(GuestAddress(elem)).unwrap();
            let len = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
            (id, len)
        }

        /// The avail_event field at the end of queue `q`'s used ring (EVENT_IDX).
        fn avail_event(&self, q: usize) -> u16 {
            let addr = self.rings[q].used + 4 + 8 * u64::from(QUEUE_SIZE);
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        fn interrupted(&self) -> bool {
            self.irq.read().is_ok()
        }

        fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0; len];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            bytes
        }

        /// The next frame the device sent, if any.
        fn sent(&self) -> Option<Vec<u8>> {
            let mut frame = vec![0; MAX_BUFFER_LEN + 1];
            match self.peer.recv(&mut frame) {
                Ok(len) => {
                    frame.truncate(len);
                    Some(frame)
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                Err(e) => panic!("{e}"),
            }
        }

        /// Sends a frame from the TAP side.
        fn inject(&self, frame: &[u8]) {
            assert_eq!(self.peer.send(frame).unwrap(), frame.len());
        }
    }

    /// A frame as the TAP gives it: a header with `num_buffers` garbage, then a payload.
    fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
        let mut frame: Vec<u8> = (0..VNET_HDR_LEN + payload_len)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect();
        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&[0xaa, 0xbb]);
        frame
    }

    /// `frame` as the guest should see it: `num_buffers` filled in.
    fn received(frame: &[u8], num_buffers: u16) -> Vec<u8> {
        let mut frame = frame.to_vec();
        frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&num_buffers.to_le_bytes());
        frame
    }

    fn config_bytes(net: &Net, offset: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0xff; len];
        net.read_config(offset, &mut bytes);
        bytes
    }

    #[test]
    fn identity_and_features() {
        let driver = Driver::new(BASE_FEATURES);
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
        let mut driver = Driver::new(BASE_FEATURES);
        assert_eq!(driver.net.mac(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(config_bytes(&driver.net, 0, 6), [2, 0, 0, 0, 0, 1]);
        assert_eq!(config_bytes(&driver.net, 4, 4), [0, 1, 0, 0]);
        assert_eq!(config_bytes(&driver.net, 6, 2), [0, 0]);
        assert_eq!(config_bytes(&driver.net, u64::MAX, 4), [0; 4]);
        driver.net.write_config(0, &[0xff; 6]);
        assert_eq!(config_bytes(&driver.net, 0, 6), [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn default_mac_is_stable_local_and_unicast() {
        let config = |tap: &str, mac| NetDeviceConfig {
            tap: tap.to_string(),
            mac,
        };
        let mac = guest_mac(&config("tap0", None)).unwrap();
        assert_eq!(mac, mac_for_tap("tap0"));
        assert_eq!(mac, guest_mac(&config("tap0", None)).unwrap());
        assert_ne!(mac, mac_for_tap("tap1"));
        for name in ["tap0", "tap1", "", "vm-42", "x"] {
            let mac = mac_for_tap(name);
            assert_eq!(mac[0] & 0x03, 0x02, "{name}: {}", format_mac(&mac));
        }
        let given = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert_eq!(guest_mac(&config("tap0", Some(given))).unwrap(), given);
        let multicast = guest_mac(&config("tap0", Some([1, 0, 0x5e, 0, 0, 1])));
        assert!(matches!(multicast, Err(NetError::InvalidMac { .. })));
    }

    #[test]
    fn parse_mac_accepts_only_unicast_colon_hex() {
        assert_eq!(
            parse_mac("02:aB:cd:EF:00:9f").unwrap(),
            [0x02, 0xab, 0xcd, 0xef, 0x00, 0x9f]
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:1",
            "02:00:00:00:00:001",
            "02-00-00-00-00-01",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:+1",
            "02:00:00:00:00:01:",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            let error = parse_mac(bad).unwrap_err();
            assert!(matches!(error, NetError::InvalidMac { .. }), "{bad:?}");
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn offloads_mirror_the_guest_receive_features() {
        use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_UFO};
        let guest = |bits: &[u32]| bits.iter().fold(BASE_FEATURES, |f, b| f | 1 << b);
        let driver = Driver::new(guest(&[
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
        ]));
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
    fn transmit_sends_header_and_payload_intact() {
        let mut driver = Driver::new(BASE_FEATURES);
        let header = [1, 4, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0];
        let payload: Vec<u8> = (0..1500).map(|i| i as u8).collect();
        let head = driver.queue_tx(header, &payload);
        driver.net.process_queue(TX_QUEUE).unwrap();
        let mut expected = header.to_vec();
        expected.extend_from_slice(&payload);
        assert_eq!(driver.sent(), Some(expected));
        assert_eq!(driver.sent(), None);
        assert_eq!(driver.used_idx(TX_QUEUE), 1);
        assert_eq!(driver.used(TX_QUEUE, 0), (u32::from(head), 0));
        assert!(driver.interrupted());
        assert_eq!(driver.net.stats().tx_frames, 1);
    }

    #[test]
    fn receive_fills_a_posted_buffer() {
        let mut driver = Driver::new(BASE_FEATURES);
        let head = driver.post_rx(BUF, 2048);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        assert!(!driver.interrupted());

        let frame = frame(60, 1);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(head), 72));
        assert_eq!(driver.guest_bytes(BUF, 72), received(&frame, 1));
        assert!(driver.interrupted());
        assert_eq!(driver.net.stats().rx_frames, 1);
    }

    #[test]
    fn mergeable_buffers_carry_one_frame_across_two() {
        let mut driver = Driver::new(BASE_FEATURES | MRG);
        let first = driver.post_rx(BUF, 64);
        let second = driver.post_rx(BUF2, 64);
        let third = driver.post_rx(BUF3, 64);
        let frame = frame(100, 2);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(first), 64));
        assert_eq!(driver.used(RX_QUEUE, 1), (u32::from(second), 48));
        let expected = received(&frame, 2);
        assert_eq!(driver.guest_bytes(BUF, 64), expected[..64]);
        assert_eq!(driver.guest_bytes(BUF2, 48), expected[64..]);

        // The third buffer is still there for the next frame.
        let small = self::frame(20, 3);
        driver.inject(&small);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used(RX_QUEUE, 2), (u32::from(third), 32));
        assert_eq!(driver.guest_bytes(BUF3, 32), received(&small, 1));
    }

    #[test]
    fn a_largest_frame_spreads_over_many_buffers() {
        let mut driver = Driver::new(BASE_FEATURES | MRG);
        for i in 0..20 {
            driver.post_rx(BUF + i * 0x1000, 4096);
        }
        let frame = frame(MAX_FRAME_LEN, 4);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        // 65562 bytes in 4 KiB buffers: 17 of them.
        assert_eq!(driver.used_idx(RX_QUEUE), 17);
        assert_eq!(driver.used(RX_QUEUE, 16), (16, 65562 - 16 * 4096));
        assert_eq!(driver.guest_bytes(BUF, 65562), received(&frame, 17));
    }

    #[test]
    fn without_buffers_frames_wait_and_nothing_is_lost() {
        let mut driver = Driver::new(BASE_FEATURES);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
        for frame in &frames {
            driver.inject(frame);
        }
        // The TAP is readable, but the guest posted nothing: the frames stay in the socket.
        driver.net.process_host_event(0).unwrap();
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        // Notifications are on, so the guest will say when it posts buffers.
        let flags: u16 = driver.mem.read_obj(GuestAddress(RX_RING[2])).unwrap();
        assert_eq!(flags, 0);

        for i in 0..4 {
            driver.post_rx(BUF + i * 0x1000, 2048);
        }
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 3);
        for (i, frame) in frames.iter().enumerate() {
            let (id, len) = driver.used(RX_QUEUE, i as u16);
            assert_eq!((id, len as usize), (i as u32, frame.len()));
            let addr = BUF + i as u64 * 0x1000;
            assert_eq!(driver.guest_bytes(addr, frame.len()), received(frame, 1));
        }
        // The TAP is empty with a buffer to spare: guest notifications are off.
        let flags: u16 = driver.mem.read_obj(GuestAddress(RX_RING[2])).unwrap();
        assert_eq!(flags, 1);
    }

    #[test]
    fn a_frame_bigger_than_the_buffers_waits_for_more() {
        let mut driver = Driver::new(BASE_FEATURES | MRG);
        driver.post_rx(BUF, 64);
        let big = frame(200, 5);
        let next = frame(10, 6);
        driver.inject(&big);
        driver.inject(&next);
        driver.net.process_host_event(0).unwrap();
        // Read, but not delivered: it waits, holding the one buffer.
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        driver.post_rx(BUF2, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        driver.post_rx(BUF3, 64);
        driver.post_rx(BUF3 + 0x1000, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        // 212 bytes in four 64-byte buffers, then the next frame alone.
        assert_eq!(driver.used_idx(RX_QUEUE), 4);
        assert_eq!(driver.used(RX_QUEUE, 3), (3, 212 - 3 * 64));
        let expected = received(&big, 4);
        assert_eq!(driver.guest_bytes(BUF, 64), expected[..64]);
        assert_eq!(driver.guest_bytes(BUF3 + 0x1000, 20), expected[192..]);
        driver.post_rx(BUF, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used(RX_QUEUE, 4), (4, 22));
        assert_eq!(driver.guest_bytes(BUF, 22), received(&next, 1));
        assert_eq!(driver.net.stats().rx_dropped, 0);
    }

    #[test]
    fn without_mergeable_buffers_an_oversized_frame_is_dropped() {
        let mut driver = Driver::new(BASE_FEATURES);
        let head = driver.post_rx(BUF, 100);
        driver.inject(&frame(200, 7));
        let fits = frame(50, 8);
        driver.inject(&fits);
        driver.net.process_host_event(0).unwrap();
        // The big frame is gone; the buffer took the next one.
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(head), 62));
        assert_eq!(driver.guest_bytes(BUF, 62), received(&fits, 1));
        assert_eq!(driver.net.stats().rx_dropped, 1);
    }

    #[test]
    fn a_frame_no_ring_could_hold_is_dropped() {
        let mut driver = Driver::new(BASE_FEATURES | MRG);
        for i in 0..u64::from(QUEUE_SIZE) {
            driver.post_rx(BUF + i * 16, 16);
        }
        driver.inject(&frame(5000, 9));
        let fits = frame(20, 10);
        driver.inject(&fits);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.net.stats().rx_dropped, 1);
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.used(RX_QUEUE, 0), (0, 16));
        assert_eq!(driver.used(RX_QUEUE, 1), (1, 16));
        assert_eq!(driver.guest_bytes(BUF, 32), received(&fits, 2));
    }

    #[test]
    fn hostile_receive_buffers_come_back_unused() {
        let mut driver = Driver::new(BASE_FEATURES);
        let bad = [
            vec![readable(BUF, 2048)],                       // device-readable
            vec![writable(BUF, 1024), readable(BUF2, 1024)], // partly readable
            vec![writable(MEM_SIZE as u64 - 16, 2048)],      // beyond RAM
            vec![writable(u64::MAX - 15, 2048)],             // wraps around
            vec![writable(BUF, 8)],                          // smaller than the header
            vec![writable(BUF, 0)],                          // empty
        ];
        let heads: Vec<u16> = bad
            .iter()
            .map(|chain| driver.push(RX_QUEUE, chain))
            .collect();
        let good = driver.post_rx(BUF3, 2048);
        let frame = frame(100, 11);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 7);
        for (n, head) in heads.into_iter().enumerate() {
            assert_eq!(driver.used(RX_QUEUE, n as u16), (u32::from(head), 0));
        }
        assert_eq!(driver.used(RX_QUEUE, 6), (u32::from(good), 112));
        assert_eq!(driver.guest_bytes(BUF3, 112), received(&frame, 1));
        assert_eq!(driver.guest_bytes(BUF, 16), [0; 16]);
    }

    #[test]
    fn hostile_transmit_chains_are_dropped() {
        let mut driver = Driver::new(BASE_FEATURES);
        let chains = [
            vec![readable(BUF, 12), writable(BUF2, 100)], // device-writable part
            vec![readable(MEM_SIZE as u64 - 50, 100)],    // beyond RAM
            vec![readable(u64::MAX - 15, 100)],           // wraps around
            vec![readable(BUF, 40000), readable(BUF, 40000)], // bigger than any frame
            vec![readable(0, u32::MAX)],                  // far bigger
            vec![readable(BUF, 8)],                       // no full header
            vec![readable(BUF, 0)],                       // empty
        ];
        for chain in &chains {
            driver.push(TX_QUEUE, chain);
        }
        driver.net.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(TX_QUEUE), chains.len() as u16);
        for n in 0..chains.len() as u16 {
            assert_eq!(driver.used(TX_QUEUE, n), (head_of(n, &chains), 0));
        }
        assert_eq!(driver.sent(), None);
        assert_eq!(driver.net.stats().tx_dropped, chains.len() as u64);
        // The device still works.
        driver.queue_tx([0; 12], b"fine");
        driver.net.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.sent().unwrap().len(), 16);
    }

    /// The head of the `n`th chain when `chains` were written one after another from index 0.
    fn head_of(n: u16, chains: &[Vec<Buf>]) -> u32 {
        chains[..usize::from(n)]
            .iter()
            .map(|c| c.len() as u32)
            .sum()
    }

    #[test]
    fn a_looping_transmit_chain_ends() {
        let mut driver = Driver::new(BASE_FEATURES);
        let next = VRING_DESC_F_NEXT as u16;
        // A descriptor that is its own successor: 256 × 12 bytes, sent as one frame.
        driver.write_descriptor(TX_QUEUE, 7, Descriptor::new(BUF, 12, next, 7));
        driver.offer(TX_QUEUE, 7);
        // A self loop of big descriptors is too long for a frame.
        driver.write_descriptor(TX_QUEUE, 8, Descriptor::new(BUF, 4096, next, 8));
        driver.offer(TX_QUEUE, 8);
        // A `next` outside the table ends the chain.
        driver.write_descriptor(TX_QUEUE, 9, Descriptor::new(BUF, 12, next, 999));
        driver.offer(TX_QUEUE, 9);
        driver.net.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(TX_QUEUE), 3);
        assert_eq!(driver.sent().map(|f| f.len()), Some(256 * 12));
        assert_eq!(driver.sent().map(|f| f.len()), Some(12));
        assert_eq!(driver.net.stats().tx_dropped, 1);
    }

    #[test]
    fn a_transmit_flood_completes_without_growing() {
        let mut driver = Driver::new(BASE_FEATURES);
        driver
            .mem
            .write_slice(&[0x5a; 1024], GuestAddress(BUF))
            .unwrap();
        // The peer never reads: the socket fills and the rest is dropped, never queued by us.
        for round in 1..=8u16 {
            for _ in 0..QUEUE_SIZE {
                driver.push(TX_QUEUE, &[readable(BUF, 12), readable(BUF + 12, 1000)]);
            }
            driver.net.process_queue(TX_QUEUE).unwrap();
            assert_eq!(driver.used_idx(TX_QUEUE), round.wrapping_mul(QUEUE_SIZE));
        }
        let stats = driver.net.stats();
        assert_eq!(stats.tx_frames + stats.tx_dropped, 8 * 256);
        assert!(stats.tx_dropped > 0, "{stats:?}");
        assert!(driver.interrupted());
    }

    #[test]
    fn event_idx_interrupts_only_when_the_driver_asks() {
        let mut driver = Driver::new(BASE_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX);
        // used_event = 1: interrupt when the used index passes 1, i.e. at the second frame.
        let used_event = TX_RING[1] + 4 + 2 * u64::from(QUEUE_SIZE);
        driver
            .mem
            .write_obj(1u16, GuestAddress(used_event))
            .unwrap();
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
        let mut driver = Driver::new(BASE_FEATURES | MRG);
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
    fn frames_waiting_at_activation_are_received() {
        let mut driver = Driver::new(BASE_FEATURES);
        driver.net.reset();
        let frame = frame(30, 3);
        driver.inject(&frame);
        // The driver posts buffers before DRIVER_OK; its notification went unheard.
        driver.clear_rings();
        driver.post_rx(BUF, 2048);
        driver.hand_over(BASE_FEATURES);
        // The transport kicks every queue once after activation.
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.guest_bytes(BUF, 42), received(&frame, 1));
        assert!(driver.interrupted());
    }

    #[test]
    fn a_broken_ring_breaks_the_device() {
        let mut driver = Driver::new(BASE_FEATURES);
        driver.set_avail_idx(TX_QUEUE, QUEUE_SIZE + 1);
        let error = driver.net.process_queue(TX_QUEUE).unwrap_err();
        assert!(error.to_string().contains("ahead"), "{error}");

        let mut driver = Driver::new(BASE_FEATURES);
        driver.offer(RX_QUEUE, QUEUE_SIZE + 3);
        driver.inject(&frame(10, 0));
        assert!(driver.net.process_host_event(0).is_err());
    }

    #[test]
    fn queue_bookkeeping_errors() {
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
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let one = vec![Ring::new(RX_RING).queue()];
        assert!(net.activate(mem, BASE_FEATURES, one, interrupt).is_err());

        let mut driver = Driver::new(BASE_FEATURES);
        assert!(driver.net.process_queue(2).is_err());
        driver.net.process_host_event(5).unwrap();
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
    fn receive_ethertype(driver: &mut Driver, ethertype: [u8; 2]) -> Vec<u8> {
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

    /// The host ARPs for a guest address through a real TAP, the "guest" answers, and the UDP
    /// datagram the host held back arrives. Needs CAP_NET_ADMIN and creates an interface: run
    /// it in a network namespace of its own,
    /// `unshare -rn cargo test -p ember-devices virtio::net -- --ignored`.
    #[test]
    #[ignore]
    fn a_real_tap_carries_arp_and_udp() {
        let net = Net::new(NetDeviceConfig {
            tap: "embertest1".to_string(),
            mac: None,
        })
        .unwrap();
        let mac = net.mac();
        let (_, peer) = socket_pair();
        let features = BASE_FEATURES | MRG | 1 << VIRTIO_NET_F_GUEST_CSUM;
        let mut driver = Driver::with_net(net, peer, Arc::default(), features);
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
    }
}
