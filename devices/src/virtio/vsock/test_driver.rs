//! A stand-in for the guest's virtio-vsock driver, shared by the vsock tests: it drives the
//! three queues (see `virtio::test_support`) and keeps the guest side of connections' credit.
//! The host side is real Unix sockets in a temporary directory.

use std::collections::HashMap;
use std::path::PathBuf;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempdir::TempDir;

use super::packet::{Op, VsockHeader, HDR_LEN, HOST_CID, TYPE_STREAM};
use super::{Vsock, VsockDeviceConfig, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
pub(super) use crate::virtio::test_support::*;
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

pub(super) const GUEST_CID: u64 = 3;
/// Guest RAM for vsock tests: room for a ring's worth of receive buffers.
pub(super) const MEMORY_SIZE: usize = 4 << 20;
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x4000;
const EVENT_RING: u64 = 0x7000;
/// Transmit headers, one 64-byte slot per ring entry.
const TX_HEADERS: u64 = 0x1_0000;
/// The payload of the one data packet in flight.
const TX_PAYLOAD: u64 = 0x2_0000;
/// Receive buffers, as Linux posts them: a header and 4 KiB in one descriptor.
const RX_BUFFERS: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const RX_SLOTS: u64 = 256;
pub(super) const RX_BUFFER_LEN: u32 = HDR_LEN as u32 + 4096;

pub(super) const BASE_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;

pub(super) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY_SIZE)]).unwrap()
}

/// A packet the device put in a receive buffer.
pub(super) type Received = (VsockHeader, Vec<u8>);

/// Plays the guest driver.
pub(super) struct Driver<'m> {
    pub(super) mem: &'m GuestMemoryMmap,
    pub(super) vsock: Vsock,
    pub(super) irq: Irq,
    rings: [DriverQueue<'m>; 3],
    /// Receive buffers the device holds, by head index.
    rx_posted: HashMap<u16, u64>,
    free_rx: Vec<u64>,
    rx_seen: u16,
    tx_pushed: u16,
    /// Keeps the socket directory for the test's life.
    pub(super) dir: TempDir,
}

impl<'m> Driver<'m> {
    pub(super) fn new(mem: &'m GuestMemoryMmap) -> Self {
        let dir = TempDir::new_with_prefix("/tmp/ember-vsock-").unwrap();
        let config = VsockDeviceConfig {
            guest_cid: GUEST_CID,
            uds_path: dir.as_path().join("v.sock"),
        };
        let vsock = Vsock::new(config).unwrap();
        let mut driver = Self {
            mem,
            vsock,
            irq: Irq::new(),
            rings: [
                DriverQueue::new(mem, RX_RING),
                DriverQueue::new(mem, TX_RING),
                DriverQueue::new(mem, EVENT_RING),
            ],
            rx_posted: HashMap::new(),
            free_rx: (0..RX_SLOTS)
                .rev()
                .map(|i| RX_BUFFERS + i * RX_SLOT)
                .collect(),
            rx_seen: 0,
            tx_pushed: 0,
            dir,
        };
        driver.activate(BASE_FEATURES);
        driver
    }

    /// DRIVER_OK with fresh rings.
    pub(super) fn activate(&mut self, features: u64) {
        self.rings = [
            DriverQueue::new(self.mem, RX_RING),
            DriverQueue::new(self.mem, TX_RING),
            DriverQueue::new(self.mem, EVENT_RING),
        ];
        self.rx_posted.clear();
        self.free_rx = (0..RX_SLOTS)
            .rev()
            .map(|i| RX_BUFFERS + i * RX_SLOT)
            .collect();
        self.rx_seen = 0;
        self.tx_pushed = 0;
        let queues = self.rings.iter().map(DriverQueue::queue).collect();
        self.vsock
            .activate(self.mem.clone(), features, queues, self.irq.interrupt())
            .unwrap();
    }

    /// The listening socket host programs connect to.
    pub(super) fn socket_path(&self) -> PathBuf {
        self.dir.as_path().join("v.sock")
    }

    /// Posts `count` receive buffers (without notifying).
    pub(super) fn post_rx(&mut self, count: usize) {
        for _ in 0..count {
            let addr = self.free_rx.pop().expect("a free receive slot");
            let head = self.rings[RX_QUEUE].push(&[writable(addr, RX_BUFFER_LEN)]);
            self.rx_posted.insert(head, addr);
        }
    }

    /// Receive buffers the device holds.
    pub(super) fn rx_posted(&self) -> usize {
        self.rx_posted.len()
    }

    /// Pushes raw descriptors on queue `q`, however hostile.
    pub(super) fn push(&mut self, q: usize, chain: &[Buf]) -> u16 {
        if q == TX_QUEUE {
            self.tx_pushed = self.tx_pushed.wrapping_add(1);
        }
        self.rings[q].push(chain)
    }

    /// Queues a packet on the transmit ring without notifying: its header in the slot of its
    /// ring entry, its payload (if any) in the one payload area.
    pub(super) fn queue_tx(&mut self, header: &VsockHeader, payload: &[u8]) {
        let slot = TX_HEADERS + u64::from(self.tx_pushed % QUEUE_SIZE) * 64;
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(slot))
            .unwrap();
        if payload.is_empty() {
            self.push(TX_QUEUE, &[readable(slot, HDR_LEN as u32)]);
        } else {
            assert_eq!(self.tx_outstanding(), 0, "one payload in flight at a time");
            self.mem
                .write_slice(payload, GuestAddress(TX_PAYLOAD))
                .unwrap();
            self.push(
                TX_QUEUE,
                &[
                    readable(slot, HDR_LEN as u32),
                    readable(TX_PAYLOAD, payload.len() as u32),
                ],
            );
        }
    }

    /// Transmit chains the device has not returned.
    pub(super) fn tx_outstanding(&self) -> u16 {
        self.tx_pushed.wrapping_sub(self.used_idx(TX_QUEUE))
    }

    /// Sends one packet and lets the device process the transmit queue.
    pub(super) fn send(&mut self, header: &VsockHeader, payload: &[u8]) {
        self.queue_tx(header, payload);
        self.vsock.process_queue(TX_QUEUE).unwrap();
    }

    pub(super) fn used_idx(&self, q: usize) -> u16 {
        self.rings[q].used_idx()
    }

    pub(super) fn used(&self, q: usize, n: u16) -> (u32, u32) {
        self.rings[q].used(n)
    }

    /// The packets the device delivered since the last call; their buffers are posted again.
    pub(super) fn received(&mut self) -> Vec<Received> {
        let mut packets = Vec::new();
        let used_idx = self.used_idx(RX_QUEUE);
        while self.rx_seen != used_idx {
            let (head, len) = self.used(RX_QUEUE, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let addr = self
                .rx_posted
                .remove(&(head as u16))
                .expect("a posted buffer");
            self.free_rx.push(addr);
            let len = len as usize;
            assert!(len >= HDR_LEN, "a used length of {len}");
            let mut header = [0; HDR_LEN];
            header.copy_from_slice(&guest_bytes(self.mem, addr, HDR_LEN));
            let header = VsockHeader::from_bytes(&header);
            assert_eq!(header.len as usize, len - HDR_LEN);
            assert_eq!((header.src_cid, header.dst_cid), (HOST_CID, GUEST_CID));
            assert_eq!(header.kind, TYPE_STREAM);
            let payload = guest_bytes(self.mem, addr + HDR_LEN as u64, len - HDR_LEN);
            packets.push((header, payload));
            self.post_rx(1);
        }
        packets
    }

    /// What a device thread does on a host event, then what the guest finds.
    pub(super) fn pump(&mut self) -> Vec<Received> {
        self.vsock.process_host_event(0).unwrap();
        self.received()
    }

    /// As a receive-queue notification would, then what the guest finds.
    pub(super) fn kick_rx(&mut self) -> Vec<Received> {
        self.vsock.process_queue(RX_QUEUE).unwrap();
        self.received()
    }

    /// Lets the device look at the event queue.
    pub(super) fn kick_event(&mut self) {
        self.vsock.process_queue(EVENT_QUEUE).unwrap();
    }
}

/// The guest's end of one connection, keeping its side of the credit accounting.
#[derive(Clone, Copy, Debug)]
pub(super) struct GuestSocket {
    pub(super) port: u32,
    pub(super) host_port: u32,
    /// Our receive buffer, as advertised.
    pub(super) buf_alloc: u32,
    /// Bytes we have consumed.
    pub(super) fwd_cnt: u32,
    /// The fwd_cnt the device last heard.
    pub(super) fwd_cnt_told: u32,
    /// Bytes we have sent.
    pub(super) tx_cnt: u32,
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: u32,
}

impl GuestSocket {
    pub(super) fn new(port: u32, host_port: u32) -> Self {
        Self {
            port,
            host_port,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
        }
    }

    pub(super) fn header(&mut self, op: Op, len: u32) -> VsockHeader {
        self.fwd_cnt_told = self.fwd_cnt;
        if op == Op::Rw {
            self.tx_cnt = self.tx_cnt.wrapping_add(len);
        }
        header(
            op,
            self.port,
            self.host_port,
            len,
            self.buf_alloc,
            self.fwd_cnt,
        )
    }

    /// Takes in a packet from the device on this connection.
    pub(super) fn learn(&mut self, header: &VsockHeader) {
        assert_eq!(
            (header.src_port, header.dst_port),
            (self.host_port, self.port)
        );
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
        if header.op == Op::Rw as u16 {
            self.fwd_cnt = self.fwd_cnt.wrapping_add(header.len);
        }
    }

    /// How much the device can take from us now.
    pub(super) fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A packet from the guest.
pub(super) fn header(
    op: Op,
    src_port: u32,
    dst_port: u32,
    len: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
) -> VsockHeader {
    VsockHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        kind: TYPE_STREAM,
        op: op as u16,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

/// `len` bytes of a pattern that repeats rarely.
pub(super) fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 13) as u8)
        .collect()
}
