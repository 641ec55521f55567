//! A stand-in for the guest's virtio-net driver and for the far end of the TAP, shared by the
//! network device's tests: it owns guest memory and both rings, and a socket pair plays the TAP.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    Net, NetBackend, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN,
};
use crate::virtio::{Interrupt, Queue, QueueT, VirtioDevice, VIRTIO_F_VERSION_1};

pub(super) const MEM_SIZE: usize = 1 << 20;
pub(super) const QUEUE_SIZE: u16 = 256;
/// Where a split virtqueue lives (virtio 1.2, 2.7): descriptor table, avail ring, used ring.
pub(super) const RX_RING: [u64; 3] = [0x1000, 0x2000, 0x3000];
pub(super) const TX_RING: [u64; 3] = [0x4000, 0x5000, 0x6000];
/// Frames and buffers, 64 KiB apart at most.
pub(super) const BUF: u64 = 0x10000;
pub(super) const BUF2: u64 = 0x20000;
pub(super) const BUF3: u64 = 0x30000;

pub(super) const BASE_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
pub(super) const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

/// A descriptor as the driver writes it: (guest address, length, device-writable).
pub(super) type Buf = (u64, u32, bool);

pub(super) fn readable(addr: u64, len: u32) -> Buf {
    (addr, len, false)
}

pub(super) fn writable(addr: u64, len: u32) -> Buf {
    (addr, len, true)
}

/// A connected, non-blocking AF_UNIX SOCK_SEQPACKET pair: it keeps frame boundaries, as a TAP
/// does. std's UnixDatagram serves as a handle for its send/recv.
pub(super) fn socket_pair() -> (UnixDatagram, UnixDatagram) {
    let mut fds = [0; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: socketpair writes two descriptors into `fds`, which has room for both.
    let ret = unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) };
    assert_eq!(ret, 0, "{}", io::Error::last_os_error());
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (UnixDatagram::from(ours), UnixDatagram::from(theirs))
}

pub(super) struct SocketBackend {
    pub(super) socket: UnixDatagram,
    pub(super) offloads: Arc<Mutex<Vec<u32>>>,
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
pub(super) struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
}

impl Ring {
    pub(super) fn new([desc, avail, used]: [u64; 3]) -> Self {
        Self {
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    pub(super) fn queue(&self) -> Queue {
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
pub(super) struct Driver {
    pub(super) mem: GuestMemoryMmap,
    pub(super) net: Net,
    pub(super) irq: EventFd,
    pub(super) rings: [Ring; 2],
    pub(super) peer: UnixDatagram,
    pub(super) offloads: Arc<Mutex<Vec<u32>>>,
}

impl Driver {
    pub(super) fn new(features: u64) -> Self {
        let (ours, peer) = socket_pair();
        let offloads = Arc::new(Mutex::new(Vec::new()));
        let backend = SocketBackend {
            socket: ours,
            offloads: offloads.clone(),
        };
        let net = Net::with_backend(Box::new(backend), [2, 0, 0, 0, 0, 1]);
        Self::with_net(net, peer, offloads, features)
    }

    pub(super) fn with_net(
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
    pub(super) fn activate(&mut self, features: u64) {
        self.clear_rings();
        self.hand_over(features);
    }

    pub(super) fn clear_rings(&mut self) {
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
    pub(super) fn hand_over(&mut self, features: u64) {
        let queues = vec![self.rings[0].queue(), self.rings[1].queue()];
        let interrupt = Arc::new(Interrupt::new(self.irq.try_clone().unwrap()));
        self.net
            .activate(self.mem.clone(), features, queues, interrupt)
            .unwrap();
    }

    /// Writes `chain` into queue `q`'s descriptor table; returns its head.
    pub(super) fn write_chain(&mut self, q: usize, chain: &[Buf]) -> u16 {
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

    pub(super) fn write_descriptor(&self, q: usize, index: u16, descriptor: Descriptor) {
        let addr = self.rings[q].desc + 16 * u64::from(index);
        self.mem.write_obj(descriptor, GuestAddress(addr)).unwrap();
    }

    /// Puts a chain head in queue `q`'s avail ring and publishes it.
    pub(super) fn offer(&mut self, q: usize, head: u16) {
        let ring = &mut self.rings[q];
        let slot = ring.avail + 4 + 2 * u64::from(ring.avail_idx % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        ring.avail_idx = ring.avail_idx.wrapping_add(1);
        let idx = ring.avail_idx;
        self.set_avail_idx(q, idx);
    }

    pub(super) fn set_avail_idx(&self, q: usize, idx: u16) {
        let addr = self.rings[q].avail + 2;
        self.mem.write_obj(idx, GuestAddress(addr)).unwrap();
    }

    pub(super) fn push(&mut self, q: usize, chain: &[Buf]) -> u16 {
        let head = self.write_chain(q, chain);
        self.offer(q, head);
        head
    }

    /// Posts a one-descriptor receive buffer.
    pub(super) fn post_rx(&mut self, addr: u64, len: u32) -> u16 {
        self.push(RX_QUEUE, &[writable(addr, len)])
    }

    /// Queues one frame (header + payload, one descriptor each) for transmission.
    pub(super) fn queue_tx(&mut self, header: [u8; 12], payload: &[u8]) -> u16 {
        self.mem.write_slice(&header, GuestAddress(BUF)).unwrap();
        self.mem
            .write_slice(payload, GuestAddress(BUF + 12))
            .unwrap();
        self.push(
            TX_QUEUE,
            &[readable(BUF, 12), readable(BUF + 12, payload.len() as u32)],
        )
    }

    pub(super) fn used_idx(&self, q: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings[q].used + 2))
            .unwrap()
    }

    /// Used element `n` of queue `q`: (id, len).
    pub(super) fn used(&self, q: usize, n: u16) -> (u32, u32) {
        let elem = self.rings[q].used + 4 + 8 * u64::from(n % QUEUE_SIZE);
        let id = self.mem.read_obj(GuestAddress(elem)).unwrap();
        let len = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
        (id, len)
    }

    /// The avail_event field at the end of queue `q`'s used ring (EVENT_IDX).
    pub(super) fn avail_event(&self, q: usize) -> u16 {
        let addr = self.rings[q].used + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub(super) fn interrupted(&self) -> bool {
        self.irq.read().is_ok()
    }

    pub(super) fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut bytes = vec![0; len];
        self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        bytes
    }

    /// The next frame the device sent, if any.
    pub(super) fn sent(&self) -> Option<Vec<u8>> {
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
    pub(super) fn inject(&self, frame: &[u8]) {
        assert_eq!(self.peer.send(frame).unwrap(), frame.len());
    }
}

/// A frame as the TAP gives it: a header with `num_buffers` garbage, then a payload.
pub(super) fn frame(payload_len: usize, seed: u8) -> Vec<u8> {
    let mut frame: Vec<u8> = (0..VNET_HDR_LEN + payload_len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
        .collect();
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&[0xaa, 0xbb]);
    frame
}

/// `frame` as the guest should see it: `num_buffers` filled in.
pub(super) fn received(frame: &[u8], num_buffers: u16) -> Vec<u8> {
    let mut frame = frame.to_vec();
    frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&num_buffers.to_le_bytes());
    frame
}
