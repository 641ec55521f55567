//! A stand-in for the guest's virtio-net driver and for the far end of the TAP, shared by the
//! network device's tests: it drives both queues (see `virtio::test_support`), and a socket pair
//! plays the TAP.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    Net, NetBackend, MAX_BUFFER_LEN, NUM_BUFFERS_OFFSET, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN,
};
pub(super) use crate::virtio::test_support::*;
use crate::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// Where each queue lives: its descriptor table, then the avail and used rings 4 KiB apart.
pub(super) const RX_RING: u64 = 0x1000;
pub(super) const TX_RING: u64 = 0x4000;
/// Frames and buffers, 64 KiB apart at most.
pub(super) const BUF: u64 = 0x10000;
pub(super) const BUF2: u64 = 0x20000;
pub(super) const BUF3: u64 = 0x30000;

pub(super) const BASE_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1;
pub(super) const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

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

/// Plays the guest driver (drives both queues) and the far end of the TAP.
pub(super) struct Driver<'m> {
    pub(super) mem: &'m GuestMemoryMmap,
    pub(super) net: Net,
    pub(super) irq: Irq,
    pub(super) rings: [DriverQueue<'m>; 2],
    pub(super) peer: UnixDatagram,
    pub(super) offloads: Arc<Mutex<Vec<u32>>>,
}

impl<'m> Driver<'m> {
    pub(super) fn new(mem: &'m GuestMemoryMmap, features: u64) -> Self {
        let (ours, peer) = socket_pair();
        let offloads = Arc::new(Mutex::new(Vec::new()));
        let backend = SocketBackend {
            socket: ours,
            offloads: offloads.clone(),
        };
        let net = Net::with_backend(Box::new(backend), [2, 0, 0, 0, 0, 1]);
        Self::with_net(mem, net, peer, offloads, features)
    }

    pub(super) fn with_net(
        mem: &'m GuestMemoryMmap,
        net: Net,
        peer: UnixDatagram,
        offloads: Arc<Mutex<Vec<u32>>>,
        features: u64,
    ) -> Self {
        let mut driver = Driver {
            mem,
            net,
            irq: Irq::new(),
            rings: [
                DriverQueue::new(mem, RX_RING),
                DriverQueue::new(mem, TX_RING),
            ],
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
        self.rings = [
            DriverQueue::new(self.mem, RX_RING),
            DriverQueue::new(self.mem, TX_RING),
        ];
    }

    /// DRIVER_OK: the rings as they are go to the device.
    pub(super) fn hand_over(&mut self, features: u64) {
        let queues = vec![self.rings[0].queue(), self.rings[1].queue()];
        self.net
            .activate(self.mem.clone(), features, queues, self.irq.interrupt())
            .unwrap();
    }

    pub(super) fn write_descriptor(&self, q: usize, index: u16, descriptor: Descriptor) {
        self.rings[q].write_descriptor(index, descriptor);
    }

    /// Puts a chain head in queue `q`'s avail ring and publishes it.
    pub(super) fn offer(&mut self, q: usize, head: u16) {
        self.rings[q].offer(head);
    }

    pub(super) fn set_avail_idx(&self, q: usize, idx: u16) {
        self.rings[q].set_avail_idx(idx);
    }

    pub(super) fn push(&mut self, q: usize, chain: &[Buf]) -> u16 {
        self.rings[q].push(chain)
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
        self.rings[q].used_idx()
    }

    /// Used element `n` of queue `q`: (id, len).
    pub(super) fn used(&self, q: usize, n: u16) -> (u32, u32) {
        self.rings[q].used(n)
    }

    /// The avail_event field at the end of queue `q`'s used ring (EVENT_IDX).
    pub(super) fn avail_event(&self, q: usize) -> u16 {
        self.rings[q].avail_event()
    }

    pub(super) fn interrupted(&self) -> bool {
        self.irq.fired()
    }

    pub(super) fn guest_bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        guest_bytes(self.mem, addr, len)
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
