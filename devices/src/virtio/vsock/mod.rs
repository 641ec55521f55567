//! virtio-vsock (virtio 1.2, 5.10): stream sockets between the guest and host programs, with
//! the host side over Unix sockets as in Firecracker's hybrid vsock, so the same tools work.
//!
//! - host → guest: a program connects to the socket at `uds_path`, writes `CONNECT <port>\n`,
//!   reads `OK <host port>\n`, and from then on the stream is the guest socket's peer. If nothing
//!   listens on that guest port, the guest answers RST and the stream is closed.
//! - guest → host port P: ember connects to `<uds_path>_P`; if nobody listens there, the guest
//!   gets RST (ECONNRESET).
//!
//! Three queues: receive (0, packets to the guest), transmit (1, packets from the guest) and
//! event (2): after a snapshot is restored, the device puts one VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
//! there, since the connections' host sockets stayed with the process that took the snapshot;
//! the guest then resets every connected socket (listening ones stay), as with Firecracker. Both directions keep to the spec's credit flow control, so
//! ember's memory per connection is bounded by the credit it advertises, whatever the guest or
//! the host program does (see `connection.rs` and `muxer.rs`).
//!
//! Everything in a descriptor chain comes from the guest and may be hostile: a malformed chain
//! is returned unused and its packet dropped (`packet.rs` lists the checks), a packet for no
//! connection is answered with RST, and only a ring that cannot be walked makes the device
//! [`DeviceBroken`].
//!
//! This file is the device as the transport sees it; `packet.rs` is the wire format,
//! `connection.rs` one connection, `muxer.rs` all of them and the host sockets.

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use super::device_queue::DeviceQueue;
use super::{
    DeviceBroken, Interrupt, Progress, Queue, QueueT, VirtioDevice, VirtioDeviceState,
    VirtioDeviceStateError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use muxer::Muxer;
use packet::{read_tx_packet, RxBuffer, MAX_PKT_BUF};

mod connection;
mod muxer;
mod packet;
#[cfg(test)]
mod test_driver;

/// The virtio device ID of a socket device (virtio 1.2, 5).
pub(crate) const DEVICE_TYPE_VSOCK: u32 = 19;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
const QUEUE_MAX_SIZES: [u16; 3] = [256, 256, 256];
/// The smallest CID a guest may have: 0 is the hypervisor, 1 local loopback, 2 the host.
const MIN_GUEST_CID: u64 = 3;
/// Linux keeps CIDs in 32 bits, and `u32::MAX` is `VMADDR_CID_ANY`.
const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// How to build a vsock device (`--vsock cid=N,socket=PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockDeviceConfig {
    /// The guest's context ID, 3 or more.
    pub guest_cid: u64,
    /// Where host programs connect to reach the guest; guest connections to host port P go to
    /// this path with `_P` appended. The device creates the socket and removes it when dropped.
    pub uds_path: PathBuf,
}

/// Why a vsock device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is one of the reserved ones or does not fit Linux's 32 bits.
    #[error("guest CID {0} is reserved or too big: use 3 to 4294967294")]
    InvalidCid(u64),
    /// Something already exists at the socket path.
    #[error(
        "{} already exists: remove it (a socket left by an earlier run?) or choose another path",
        .0.display()
    )]
    SocketExists(PathBuf),
    /// The listening socket cannot be made.
    #[error("cannot listen at {}", path.display())]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The epoll set for host sockets cannot be made.
    #[error("cannot create the epoll set for vsock host sockets")]
    Epoll(#[source] std::io::Error),
}

/// A virtio-vsock device whose host side is Unix sockets.
pub struct Vsock {
    guest_cid: u64,
    muxer: Muxer,
    /// The payload of the packet being transmitted, allocated once: a flood never grows memory.
    tx_payload: Box<[u8]>,
    /// The payload of the packet being received, allocated once.
    rx_payload: Box<[u8]>,
    /// Present between activation and reset.
    active: Option<Active>,
    /// Restored from a snapshot: tell the guest its connections are gone when it next runs.
    reset_on_wake: bool,
    /// The features the driver accepted at DRIVER_OK, until a reset (a snapshot keeps them).
    acked_features: Option<u64>,
}

/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (virtio 1.2, 5.10.6.7): `struct virtio_vsock_event`'s id.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// What the driver handed over at DRIVER_OK.
struct Active {
    mem: GuestMemoryMmap,
    rx: DeviceQueue,
    tx: DeviceQueue,
    event: DeviceQueue,
    interrupt: Arc<Interrupt>,
    /// A receive buffer taken off the ring with nothing to put in it yet.
    rx_buffer: Option<RxBuffer>,
    /// The last transmit pass stopped with chains left, because the muxer could take no more
    /// packets until the guest takes some of its answers.
    tx_waiting: bool,
}

impl Vsock {
    /// Creates the device and its listening socket at `config.uds_path`.
    pub fn new(config: VsockDeviceConfig) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&config.guest_cid) {
            return Err(VsockError::InvalidCid(config.guest_cid));
        }
        Ok(Self {
            guest_cid: config.guest_cid,
            muxer: Muxer::new(config.guest_cid, config.uds_path)?,
            tx_payload: vec![0; MAX_PKT_BUF].into_boxed_slice(),
            rx_payload: vec![0; MAX_PKT_BUF].into_boxed_slice(),
            active: None,
            reset_on_wake: false,
            acked_features: None,
        })
    }

    /// The guest's context ID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Moves packets both ways as far as the rings allow, then interrupts the guest if it asked.
    fn run(&mut self) -> Result<(), DeviceBroken> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        loop {
            active.transmit(&mut self.muxer, self.guest_cid, &mut self.tx_payload)?;
            // After transmitting there is often something to answer (a RESPONSE the guest waits
            // for), and the receive side may make room for a stopped transmit pass.
            active.receive(&mut self.muxer, &mut self.rx_payload)?;
            if !(active.tx_waiting && self.muxer.accepts_guest_packets()) {
                break;
            }
        }
        let tx_signalled = active.tx.signal_used(&active.mem, &active.interrupt);
        let rx_signalled = active.rx.signal_used(&active.mem, &active.interrupt);
        tx_signalled.and(rx_signalled)
    }
}

impl Active {
    fn new(mem: GuestMemoryMmap, [rx, tx, event]: [Queue; 3], interrupt: Arc<Interrupt>) -> Self {
        Self {
            mem,
            rx: DeviceQueue::new(rx, "virtio-vsock RX"),
            tx: DeviceQueue::new(tx, "virtio-vsock TX"),
            event: DeviceQueue::new(event, "virtio-vsock event"),
            interrupt,
            rx_buffer: None,
            tx_waiting: false,
        }
    }

    /// Puts a transport-reset event in the guest's next event buffer. A guest with no event
    /// buffer posted misses it (Linux keeps eight posted); a buffer too small or not writable
    /// is returned unused.
    fn send_transport_reset(&mut self) -> Result<(), DeviceBroken> {
        if !self.event.ready() {
            return Ok(());
        }
        let Some(chain) = self.event.pop(&self.mem)? else {
            log::warn!("virtio-vsock: no event buffer for the transport reset");
            return Ok(());
        };
        let head = chain.head_index();
        let mut written = 0;
        if let Some(desc) = chain
            .into_iter()
            .find(|d| d.is_write_only() && d.len() >= 4)
        {
            match vm_memory::Bytes::write_obj(&self.mem, EVENT_TRANSPORT_RESET.to_le(), desc.addr())
            {
                Ok(()) => written = 4,
                Err(e) => log::debug!("virtio-vsock: event buffer {head} refused: {e}"),
            }
        }
        self.event.add_used(&self.mem, head, written)?;
        self.event.signal_used(&self.mem, &self.interrupt)
    }

    /// Hands the guest's packets to the muxer, until the ring is empty or the muxer is full.
    /// Uncapped, as for virtio-net: a packet costs one copy and a non-blocking write or connect.
    fn transmit(
        &mut self,
        muxer: &mut Muxer,
        guest_cid: u64,
        payload: &mut [u8],
    ) -> Result<(), DeviceBroken> {
        self.tx_waiting = false;
        if !self.tx.ready() {
            return Ok(());
        }
        loop {
            self.tx.disable_notification(&self.mem)?;
            loop {
                if !muxer.accepts_guest_packets() {
                    // The chains stay in the ring: the guest's own memory holds the backlog.
                    self.tx_waiting = true;
                    break;
                }
                let Some(chain) = self.tx.pop(&self.mem)? else {
                    break;
                };
                let head = chain.head_index();
                match read_tx_packet(&self.mem, chain, guest_cid, payload) {
                    Ok(packet) => {
                        let data = payload.get(..packet.len()).unwrap_or_default();
                        muxer.on_guest_packet(&packet, data);
                    }
                    Err(e) => log::debug!("vsock: TX chain {head} dropped: {e}"),
                }
                // The device writes nothing into a transmit chain.
                self.tx.add_used(&self.mem, head, 0)?;
            }
            // Back on even when stopped: a new chain still wakes the device, which then finds
            // whether the muxer has room again.
            let more = self.tx.enable_notification(&self.mem)?;
            if self.tx_waiting || !more {
                return Ok(());
            }
        }
    }

    /// Fills the guest's receive buffers with what the muxer has for it.
    fn receive(&mut self, muxer: &mut Muxer, payload: &mut [u8]) -> Result<(), DeviceBroken> {
        if !self.rx.ready() {
            return Ok(());
        }
        while muxer.has_packet_for_guest() {
            let buffer = match self.rx_buffer.take() {
                Some(buffer) => buffer,
                None => match self.take_rx_buffer()? {
                    Some(buffer) => buffer,
                    None => {
                        // The work waits in the muxer (bounded there) until the guest posts
                        // buffers and says so; unless it posted some meanwhile.
                        if self.rx.enable_notification(&self.mem)? {
                            continue;
                        }
                        return Ok(());
                    }
                },
            };
            let room = buffer.payload_capacity().min(payload.len());
            let Some((header, len)) = muxer.next_packet(&mut payload[..room]) else {
                self.rx_buffer = Some(buffer);
                return Ok(());
            };
            let data = payload.get(..len).unwrap_or_default();
            let used = match buffer.write(&self.mem, &header, data) {
                Ok(written) => written,
                Err(e) => {
                    // Not expected: the buffer was checked to lie in guest memory.
                    log::warn!("vsock: cannot write a packet to the guest: {e}");
                    0
                }
            };
            // At most a header and 64 KiB.
            self.rx.add_used(&self.mem, buffer.head(), used as u32)?;
        }
        Ok(())
    }

    /// The next usable receive buffer on the ring, returning the unusable ones it meets with
    /// length 0; None when the ring has no more.
    fn take_rx_buffer(&mut self) -> Result<Option<RxBuffer>, DeviceBroken> {
        while let Some(chain) = self.rx.pop(&self.mem)? {
            let head = chain.head_index();
            match RxBuffer::new(&self.mem, chain) {
                Ok(buffer) => return Ok(Some(buffer)),
                Err(e) => {
                    log::debug!("vsock: RX buffer {head} refused: {e}");
                    self.rx.add_used(&self.mem, head, 0)?;
                }
            }
        }
        Ok(None)
    }
}

/// The receive, transmit and event queues, in that order.
fn three_queues(queues: Vec<Queue>) -> Result<[Queue; 3], DeviceBroken> {
    <[Queue; 3]>::try_from(queues).map_err(|queues| {
        DeviceBroken(format!(
            "virtio-vsock has three queues, but was given {}",
            queues.len()
        ))
    })
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn available_features(&self) -> u64 {
        // Stream sockets only: without VIRTIO_VSOCK_F_SEQPACKET the driver uses no other type.
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; } (virtio 1.2, 5.10.4).
        super::read_config_space(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The guest CID is read-only.
        log::debug!(
            "virtio-vsock: ignoring a {}-byte config write at {offset:#x}",
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
        let mut queues = three_queues(queues)?;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for queue in &mut queues {
            queue.set_event_idx(event_idx);
        }
        self.active = Some(Active::new(mem, queues, interrupt));
        self.acked_features = Some(features);
        // Host programs may have connected before the driver was ready: the transport kicks
        // every queue once after activation, and that pass sends their REQUESTs.
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<Progress, DeviceBroken> {
        if self.active.is_none() {
            log::debug!("virtio-vsock: queue notified before activation; ignored");
            return Ok(Progress::Done);
        }
        match index {
            RX_QUEUE | TX_QUEUE => {
                // Readiness edges that came before activation, or while the device waited for
                // receive buffers, are picked up here too.
                self.muxer.handle_host_events();
                self.run()?;
            }
            EVENT_QUEUE => {}
            _ => {
                return Err(DeviceBroken(format!(
                    "virtio-vsock has three queues; the guest notified queue {index}"
                )))
            }
        }
        Ok(Progress::Done)
    }

    fn reset(&mut self) {
        // The guest's sockets are gone with its driver: so are the connections. The listener
        // stays for the next driver.
        self.active = None;
        self.acked_features = None;
        self.muxer.reset();
    }

    /// Hands the queues back; the connections stay (this VM goes on with them after a
    /// snapshot). A receive buffer taken off the ring and not yet filled goes back to it: it was
    /// the last one taken, so the ring's next index steps back over it.
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, DeviceBroken> {
        let Some(mut active) = self.active.take() else {
            return Ok(None);
        };
        if active.rx_buffer.take().is_some() {
            active.rx.unpop(1);
        }
        Ok(Some(vec![
            active.rx.into_queue(),
            active.tx.into_queue(),
            active.event.into_queue(),
        ]))
    }

    /// Takes the queues back; restored from a snapshot, tells the guest its connections are
    /// gone (their host sockets were the other process's).
    fn wake(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        let active = self
            .active
            .insert(Active::new(mem, three_queues(queues)?, interrupt));
        if std::mem::take(&mut self.reset_on_wake) {
            self.muxer.reset();
            active.send_transport_reset()?;
        }
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![("connections", self.muxer.connections_opened())]
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Vsock {
            guest_cid: self.guest_cid,
            acked_features: self.acked_features,
            next_host_port: Some(self.muxer.next_host_port()),
        }
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioDeviceStateError> {
        match state {
            VirtioDeviceState::Vsock {
                guest_cid,
                acked_features,
                next_host_port,
            } if *guest_cid == self.guest_cid => {
                self.reset();
                self.acked_features = *acked_features;
                if let Some(port) = next_host_port {
                    self.muxer.continue_host_ports_from(*port);
                }
                // The transport wakes the device with its queues if the driver had it running.
                self.reset_on_wake = true;
                Ok(())
            }
            VirtioDeviceState::Vsock { guest_cid, .. } => Err(VirtioDeviceStateError::VsockCid {
                saved: *guest_cid,
                device: self.guest_cid,
            }),
            other => Err(VirtioDeviceStateError::WrongDevice {
                saved: other.device_type(),
                device: DEVICE_TYPE_VSOCK,
            }),
        }
    }

    fn host_event_fds(&self) -> Vec<RawFd> {
        vec![self.muxer.host_fd()]
    }

    fn process_host_event(&mut self, index: usize) -> Result<(), DeviceBroken> {
        if index != 0 {
            log::debug!("virtio-vsock: event on unknown host descriptor {index}");
            return Ok(());
        }
        // Before activation too: host programs are accepted and their CONNECT lines read; their
        // REQUESTs wait for the guest.
        self.muxer.handle_host_events();
        self.run()
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempdir::TempDir;

    use super::packet::{Op, HDR_LEN};
    use super::test_driver::*;
    use super::*;

    #[test]
    fn identity_features_and_config_space() {
        let mem = memory();
        let driver = Driver::new(&mem);
        let vsock = &driver.vsock;
        assert_eq!(vsock.device_type(), 19);
        assert_eq!(vsock.queue_max_sizes(), &[256, 256, 256]);
        assert_eq!(vsock.available_features(), (1 << 32) | (1 << 29));
        assert_eq!(vsock.guest_cid(), GUEST_CID);
        let mut config = [0xff; 12];
        vsock.read_config(0, &mut config);
        assert_eq!(config, [3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut high = [0xff; 4];
        vsock.read_config(4, &mut high);
        assert_eq!(high, [0; 4]);
    }

    #[test]
    fn an_asleep_device_keeps_its_connections_and_a_restored_one_resets_them() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        let state = driver.vsock.save_state();
        assert_eq!(
            state,
            VirtioDeviceState::Vsock {
                guest_cid: GUEST_CID,
                acked_features: Some(BASE_FEATURES),
                next_host_port: Some(1 << 30),
            }
        );
        assert_eq!(state.device_type(), 19);
        // A guest event buffer, as Linux keeps posted.
        const EVENT_BUFFER: u64 = 0x3f_0000;
        mem.write_obj(0xffff_ffffu32, GuestAddress(EVENT_BUFFER))
            .unwrap();
        driver.push(
            EVENT_QUEUE,
            &[crate::virtio::test_support::writable(EVENT_BUFFER, 8)],
        );

        // Asleep and awake again in the same VM (a snapshot taken): no event.
        let queues = driver
            .vsock
            .sleep()
            .unwrap()
            .expect("an active device's queues");
        assert_eq!(queues.len(), 3);
        assert!(matches!(driver.vsock.sleep(), Ok(None)), "asleep twice");
        driver
            .vsock
            .wake(mem.clone(), queues, driver.irq.interrupt())
            .unwrap();
        assert_eq!(driver.used_idx(EVENT_QUEUE), 0);

        // Restored in another process: the guest hears its transport was reset.
        let queues = driver.vsock.sleep().unwrap().unwrap();
        let dir = TempDir::new_with_prefix("/tmp/ember-vsock-").unwrap();
        let mut restored = Vsock::new(VsockDeviceConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.as_path().join("v.sock"),
        })
        .unwrap();
        assert!(matches!(
            restored.restore_state(&VirtioDeviceState::Vsock {
                guest_cid: 9,
                acked_features: None,
                next_host_port: None,
            }),
            Err(VirtioDeviceStateError::VsockCid { saved: 9, .. })
        ));
        // Connections the host made before the snapshot used ports the guest may still hold:
        // the restored device goes on after them.
        let VirtioDeviceState::Vsock { acked_features, .. } = state else {
            unreachable!()
        };
        let later = VirtioDeviceState::Vsock {
            guest_cid: GUEST_CID,
            acked_features,
            next_host_port: Some((1 << 30) + 5),
        };
        restored.restore_state(&later).unwrap();
        assert_eq!(restored.muxer.next_host_port(), (1 << 30) + 5);
        restored.restore_state(&state).unwrap();
        let irq = crate::virtio::test_support::Irq::new();
        restored.wake(mem.clone(), queues, irq.interrupt()).unwrap();
        assert_eq!(driver.used_idx(EVENT_QUEUE), 1);
        assert_eq!(driver.used(EVENT_QUEUE, 0).1, 4);
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(EVENT_BUFFER)).unwrap(),
            EVENT_TRANSPORT_RESET
        );
        assert!(irq.fired());
        // Once only.
        let queues = restored.sleep().unwrap().unwrap();
        restored.wake(mem.clone(), queues, irq.interrupt()).unwrap();
        assert_eq!(driver.used_idx(EVENT_QUEUE), 1);
    }

    #[test]
    fn the_config_is_checked_and_the_socket_cleaned_up() {
        let dir = TempDir::new_with_prefix("/tmp/ember-vsock-").unwrap();
        let path = dir.as_path().join("v.sock");
        let config = |guest_cid| VsockDeviceConfig {
            guest_cid,
            uds_path: path.clone(),
        };
        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            assert!(matches!(
                Vsock::new(config(cid)),
                Err(VsockError::InvalidCid(c)) if c == cid
            ));
        }
        assert!(!path.exists(), "a refused config leaves no socket");
        let vsock = Vsock::new(config(3)).unwrap();
        assert!(path.exists());
        let taken = Vsock::new(config(4)).err().unwrap();
        assert!(matches!(taken, VsockError::SocketExists(_)), "{taken}");
        assert!(taken.to_string().contains("remove it"));
        drop(vsock);
        assert!(!path.exists(), "the device removes its socket");
        let missing_dir = dir.as_path().join("no/such/dir/v.sock");
        let error = Vsock::new(VsockDeviceConfig {
            guest_cid: 3,
            uds_path: missing_dir,
        });
        assert!(matches!(error, Err(VsockError::Listen { .. })));
    }

    #[test]
    fn hostile_transmit_chains_are_returned_and_dropped() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(16);
        let at = 0x3_0000;
        let good = header(Op::Request, 1000, 9, 0, 4096, 0);
        let with = |f: &dyn Fn(&mut packet::VsockHeader)| {
            let mut header = good;
            f(&mut header);
            header
        };
        let hostile = [
            with(&|h| h.src_cid = 7),
            with(&|h| h.src_cid = 2),
            with(&|h| h.dst_cid = 3),
            with(&|h| h.dst_cid = 99),
            with(&|h| h.kind = 2),
            with(&|h| h.op = 0),
            with(&|h| h.op = 42),
            with(&|h| h.len = 70_000),
            with(&|h| h.len = 10),
        ];
        for (i, header) in hostile.iter().enumerate() {
            let addr = at + i as u64 * 64;
            mem.write_slice(&header.to_bytes(), GuestAddress(addr))
                .unwrap();
            driver.push(TX_QUEUE, &[readable(addr, HDR_LEN as u32)]);
        }
        driver.push(TX_QUEUE, &[readable(at, 20)]);
        driver.push(TX_QUEUE, &[writable(at, 44)]);
        driver.push(TX_QUEUE, &[readable(MEMORY_SIZE as u64 - 8, 44)]);
        driver.push(TX_QUEUE, &[readable(u64::MAX - 4, 44)]);
        driver.vsock.process_queue(TX_QUEUE).unwrap();
        let count = hostile.len() as u16 + 4;
        assert_eq!(driver.used_idx(TX_QUEUE), count);
        for n in 0..count {
            assert_eq!(driver.used(TX_QUEUE, n).1, 0);
        }
        assert!(driver.irq.fired());
        // Dropped without an answer: nothing says who to answer.
        assert!(driver.received().is_empty());
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
        // The device still works: the same REQUEST, well formed, is refused properly.
        driver.send(&good, &[]);
        let answers = driver.received();
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].0.op, Op::Rst as u16);
    }

    #[test]
    fn hostile_receive_buffers_come_back_unused() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        let at = 0x3_0000;
        let bad = [
            vec![readable(at, 4096)],
            vec![writable(at, 20), readable(at + 20, 100)],
            vec![writable(MEMORY_SIZE as u64 - 10, 100)],
            vec![writable(u64::MAX - 10, 100)],
            vec![writable(at, 43)],
            vec![writable(at, 0)],
        ];
        for chain in &bad {
            driver.push(RX_QUEUE, chain);
        }
        // A header split over two descriptors is fine.
        let split = driver.push(RX_QUEUE, &[writable(at, 20), writable(at + 0x100, 24)]);
        let request = header(Op::Request, 1000, 9, 0, 4096, 0);
        driver.send(&request, &[]);
        assert_eq!(driver.used_idx(RX_QUEUE), bad.len() as u16 + 1);
        for n in 0..bad.len() as u16 {
            assert_eq!(driver.used(RX_QUEUE, n).1, 0);
        }
        assert_eq!(
            driver.used(RX_QUEUE, bad.len() as u16),
            (u32::from(split), HDR_LEN as u32)
        );
        let mut bytes = guest_bytes(&mem, at, 20);
        bytes.extend(guest_bytes(&mem, at + 0x100, 24));
        let rst = packet::VsockHeader::from_bytes(&bytes.try_into().unwrap());
        assert_eq!(rst.op, Op::Rst as u16);
        assert_eq!((rst.src_port, rst.dst_port), (9, 1000));
    }

    #[test]
    fn a_host_program_before_activation_is_served_after() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.vsock.reset();
        let mut host = UnixStream::connect(driver.socket_path()).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        // The device thread sees the event before the driver is ready.
        driver.vsock.process_host_event(0).unwrap();
        driver.activate(BASE_FEATURES | (1 << VIRTIO_RING_F_EVENT_IDX));
        driver.post_rx(4);
        // The transport kicks every queue after activation.
        driver.kick_event();
        let packets = driver.kick_rx();
        assert_eq!(packets.len(), 1);
        assert_eq!(packets[0].0.op, Op::Request as u16);
        assert_eq!(packets[0].0.dst_port, 52);
        assert_eq!(driver.rx_posted(), 4, "the buffer was posted again");
        // The driver resets: the connection goes, the program reads EOF, the listener stays.
        driver.vsock.reset();
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        assert_eq!(host.read(&mut [0; 8]).unwrap(), 0);
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
        driver.activate(BASE_FEATURES);
        driver.post_rx(4);
        let mut again = UnixStream::connect(driver.socket_path()).unwrap();
        again.write_all(b"CONNECT 53\n").unwrap();
        let packets = driver.pump();
        assert_eq!(packets[0].0.dst_port, 53);
    }

    #[test]
    fn receive_buffers_with_room_for_a_header_only_carry_no_data() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        let mut host = UnixStream::connect(driver.socket_path()).unwrap();
        host.write_all(b"CONNECT 52\nwaiting data").unwrap();
        let at = 0x3_0000;
        for i in 0..4 {
            driver.push(RX_QUEUE, &[writable(at + i * 64, HDR_LEN as u32)]);
        }
        // The REQUEST fits; once the guest answers, the data does not, and the device waits
        // with the next buffer in hand instead of spinning.
        driver.vsock.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        let request =
            packet::VsockHeader::from_bytes(&guest_bytes(&mem, at, HDR_LEN).try_into().unwrap());
        let response = header(Op::Response, 52, request.src_port, 0, 4096, 0);
        driver.send(&response, &[]);
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        // A CREDIT_REQUEST is a header alone: it goes.
        let credit_request = header(Op::CreditRequest, 52, request.src_port, 0, 4096, 0);
        driver.send(&credit_request, &[]);
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.used(RX_QUEUE, 1).1, HDR_LEN as u32);
        // The guest that posts such buffers only stalls its own data: the buffer in hand stays
        // in hand, and every pass ends.
        for _ in 0..3 {
            driver.vsock.process_queue(RX_QUEUE).unwrap();
            driver.vsock.process_host_event(0).unwrap();
        }
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.vsock.muxer.connection_count(), 1);
    }

    #[test]
    fn notifications_for_a_queue_that_does_not_exist_break_the_device() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        assert!(driver.vsock.process_queue(3).is_err());
        assert!(driver.vsock.process_host_event(1).is_ok());
    }

    /// A hostile guest driver: packets with any addresses, ports, operations, lengths (lying
    /// or not), flags and credit, in chains of any shape (short or device-writable headers,
    /// payloads past guest memory), against a host that sometimes listens; a host program
    /// that sometimes connects and writes. The device answers or breaks, never panics.
    #[test]
    fn fuzz_vsock_packets() {
        use std::os::unix::net::UnixListener;

        use super::packet::{VsockHeader, HOST_CID, TYPE_STREAM};
        const HEADERS: u64 = 0x30_0000;
        const PAYLOAD: u64 = 0x31_0000;
        crate::fuzz::run("vsock_packets", |rng| {
            let mem = memory();
            let mut driver = Driver::new(&mem);
            let port_path = |port: u32| {
                let mut path = driver.socket_path().into_os_string();
                path.push(format!("_{port}"));
                path
            };
            let _listener = rng
                .one_in(2)
                .then(|| UnixListener::bind(port_path(5000)).unwrap());
            let mut host = None;
            if rng.one_in(3) {
                let mut stream = UnixStream::connect(driver.socket_path()).unwrap();
                let line = rng.pick(&["CONNECT 1024\n", "CONNECT 99999999999\n", "BOGUS\n"]);
                let _ = stream.write_all(line.as_bytes());
                host = Some(stream);
            }
            driver.post_rx(rng.below(8) as usize);
            for packet in 0..1 + rng.below(12) {
                let len = if rng.one_in(4) {
                    rng.edgy_u64() as u32
                } else {
                    rng.below(128) as u32
                };
                let any_op = rng.next_u64() as u16;
                let header = VsockHeader {
                    src_cid: if rng.one_in(8) {
                        rng.edgy_u64()
                    } else {
                        GUEST_CID
                    },
                    dst_cid: if rng.one_in(8) {
                        rng.edgy_u64()
                    } else {
                        HOST_CID
                    },
                    src_port: rng.pick(&[1024, 1025, u32::MAX]),
                    dst_port: rng.pick(&[5000, 5001, 0]),
                    len,
                    kind: if rng.one_in(8) {
                        rng.next_u64() as u16
                    } else {
                        TYPE_STREAM
                    },
                    op: rng.pick(&[1, 2, 3, 4, 5, 6, 7, 0, any_op]),
                    flags: rng.below(4) as u32,
                    buf_alloc: rng.edgy_u64() as u32,
                    fwd_cnt: rng.edgy_u64() as u32,
                };
                let slot = HEADERS + (packet % 64) * 64;
                mem.write_slice(&header.to_bytes(), GuestAddress(slot))
                    .unwrap();
                let payload_len = rng.below(128) as usize;
                let payload = rng.bytes(payload_len);
                mem.write_slice(&payload, GuestAddress(PAYLOAD)).unwrap();
                let header_len = if rng.one_in(6) {
                    rng.below(HDR_LEN as u64 * 2) as u32
                } else {
                    HDR_LEN as u32
                };
                let mut chain = vec![(slot, header_len, rng.one_in(10))];
                if rng.one_in(2) {
                    let addr = if rng.one_in(6) {
                        rng.edgy_u64()
                    } else {
                        PAYLOAD
                    };
                    chain.push((addr, payload.len() as u32, rng.one_in(10)));
                }
                driver.push(TX_QUEUE, &chain);
                if driver.vsock.process_queue(TX_QUEUE).is_err()
                    || driver.vsock.process_queue(RX_QUEUE).is_err()
                {
                    break;
                }
                if let Some(stream) = &mut host {
                    if rng.one_in(3) {
                        let _ = stream.write_all(&rng.bytes(32));
                    }
                }
                for index in 0..driver.vsock.host_event_fds().len() {
                    if driver.vsock.process_host_event(index).is_err() {
                        break;
                    }
                }
            }
        });
    }
}
