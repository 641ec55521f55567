//! The vsock wire format (virtio 1.2, 5.10.6): the 44-byte `virtio_vsock_hdr` and the descriptor
//! chains that carry it.
//!
//! A transmit chain comes from the guest and may be hostile, so [`read_tx_packet`] checks all of
//! it before the muxer sees a byte: the header may be split over several device-readable
//! descriptors, every descriptor it reads must lie in guest memory, the payload must be as long as
//! the header says and no longer than [`MAX_PKT_BUF`], the socket type must be STREAM, the CIDs
//! must be the guest's and the host's, and the op must be one the spec defines. A receive buffer
//! ([`RxBuffer`]) must be device-writable, in guest memory, and big enough for a header.

use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};

/// The size of `struct virtio_vsock_hdr` on the wire (packed, little-endian).
pub(super) const HDR_LEN: usize = 44;
/// The largest payload of one packet, in either direction: the bound Linux's driver uses
/// (`VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`). A header claiming more is refused unread.
pub(super) const MAX_PKT_BUF: usize = 64 * 1024;
/// The host's CID (virtio 1.2, 5.10.4: `VMADDR_CID_HOST`).
pub(super) const HOST_CID: u64 = 2;
/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type offered (SEQPACKET is a feature we do not
/// offer).
pub(super) const TYPE_STREAM: u16 = 1;
/// SHUTDOWN flag: the sender will receive no more data.
pub(super) const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more data.
pub(super) const SHUTDOWN_SEND: u32 = 2;
/// Both SHUTDOWN flags: the sender is closing the connection.
pub(super) const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// The operations of a stream packet (virtio 1.2, 5.10.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Op {
    /// Connect.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Connection refused or torn down.
    Rst = 3,
    /// No more data in one or both directions (see the `SHUTDOWN_*` flags).
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// The sender's `buf_alloc` and `fwd_cnt`, unasked or in answer to a request.
    CreditUpdate = 6,
    /// Asks the peer for a CREDIT_UPDATE.
    CreditRequest = 7,
}

impl Op {
    pub(super) fn from_wire(op: u16) -> Option<Self> {
        Some(match op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, field by field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload bytes after the header (RW only).
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// How many bytes the sender has consumed (freed from that buffer) so far, wrapping.
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Decodes the wire layout.
    pub(super) fn from_bytes(bytes: &[u8; HDR_LEN]) -> Self {
        let u64_at = |at: usize| {
            let mut field = [0; 8];
            field.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(field)
        };
        let u32_at = |at: usize| {
            let mut field = [0; 4];
            field.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(field)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            kind: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the wire layout.
    pub(super) fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut bytes = [0; HDR_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.kind.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }
}

/// A checked packet from the guest; its payload (`header.len` bytes) is in the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TxPacket {
    pub header: VsockHeader,
    pub op: Op,
}

impl TxPacket {
    /// The payload length, at most [`MAX_PKT_BUF`].
    pub(super) fn len(&self) -> usize {
        self.header.len as usize
    }
}

/// Why a chain carries no usable packet; the chain is returned and the packet dropped.
#[derive(Debug, thiserror::Error)]
pub(super) enum PacketError {
    #[error("a device-writable descriptor in a transmit chain")]
    WritableTxDescriptor,
    #[error("a device-readable descriptor in a receive buffer")]
    ReadOnlyRxDescriptor,
    #[error("a buffer at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("{0} bytes, less than the 44-byte header")]
    ShortHeader(usize),
    #[error("a payload of {0} bytes, more than the {MAX_PKT_BUF}-byte maximum")]
    TooLong(u32),
    #[error("the header announces {announced} payload bytes, the chain holds {held}")]
    LenMismatch { announced: u32, held: usize },
    #[error("socket type {0}; only STREAM (1) is supported")]
    BadType(u16),
    #[error("source CID {0}, not the guest's")]
    BadSrcCid(u64),
    #[error("destination CID {0}, not the host's")]
    BadDstCid(u64),
    #[error("unknown op {0}")]
    UnknownOp(u16),
    #[error("op {0:?} carries {1} payload bytes; only RW may")]
    UnexpectedPayload(Op, u32),
    #[error("cannot access guest memory")]
    GuestMemory(#[source] GuestMemoryError),
}

/// Reads and checks the packet in transmit chain `chain` from the guest whose CID is
/// `guest_cid`; its payload goes to the front of `payload`, which holds [`MAX_PKT_BUF`] bytes.
pub(super) fn read_tx_packet(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    guest_cid: u64,
    payload: &mut [u8],
) -> Result<TxPacket, PacketError> {
    let mut header_bytes = [0u8; HDR_LEN];
    let mut header_len = 0;
    let mut packet: Option<TxPacket> = None;
    let mut payload_len = 0usize;
    // The iterator ends after a queue's worth of descriptors: a looping chain ends too.
    for descriptor in chain {
        if descriptor.is_write_only() {
            return Err(PacketError::WritableTxDescriptor);
        }
        let (mut addr, len) = (descriptor.addr(), descriptor.len());
        let mut left = len as usize;
        if left == 0 {
            continue;
        }
        if !mem.check_range(addr, left) {
            return Err(PacketError::OutsideMemory { addr: addr.0, len });
        }
        if header_len < HDR_LEN {
            let part = left.min(HDR_LEN - header_len);
            mem.read_slice(&mut header_bytes[header_len..header_len + part], addr)
                .map_err(PacketError::GuestMemory)?;
            header_len += part;
            left -= part;
            // In range: check_range covered the whole descriptor.
            addr = addr.unchecked_add(part as u64);
            if header_len == HDR_LEN {
                packet = Some(check_header(
                    VsockHeader::from_bytes(&header_bytes),
                    guest_cid,
                )?);
            }
        }
        let Some(packet) = packet else { continue };
        let wanted = packet.len() - payload_len;
        if wanted == 0 {
            // Room past the payload is the guest's business; it is never read.
            break;
        }
        let part = left.min(wanted);
        let Some(target) = payload.get_mut(payload_len..payload_len + part) else {
            return Err(PacketError::TooLong(packet.header.len));
        };
        mem.read_slice(target, addr)
            .map_err(PacketError::GuestMemory)?;
        payload_len += part;
    }
    let Some(packet) = packet else {
        return Err(PacketError::ShortHeader(header_len));
    };
    if payload_len < packet.len() {
        return Err(PacketError::LenMismatch {
            announced: packet.header.len,
            held: payload_len,
        });
    }
    Ok(packet)
}

/// The checks that need only the header, done before any payload is read.
fn check_header(header: VsockHeader, guest_cid: u64) -> Result<TxPacket, PacketError> {
    if header.len as usize > MAX_PKT_BUF {
        return Err(PacketError::TooLong(header.len));
    }
    if header.kind != TYPE_STREAM {
        return Err(PacketError::BadType(header.kind));
    }
    if header.src_cid != guest_cid {
        return Err(PacketError::BadSrcCid(header.src_cid));
    }
    if header.dst_cid != HOST_CID {
        return Err(PacketError::BadDstCid(header.dst_cid));
    }
    let op = Op::from_wire(header.op).ok_or(PacketError::UnknownOp(header.op))?;
    if op != Op::Rw && header.len != 0 {
        return Err(PacketError::UnexpectedPayload(op, header.len));
    }
    Ok(TxPacket { header, op })
}

/// A receive buffer the guest posted: one device-writable descriptor chain, checked to lie in
/// guest memory and to hold at least a header.
pub(super) struct RxBuffer {
    head: u16,
    /// (address, length) of each non-empty descriptor, in chain order.
    segments: Vec<(GuestAddress, usize)>,
    capacity: usize,
}

impl RxBuffer {
    /// Checks receive chain `chain`.
    pub(super) fn new(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let head = chain.head_index();
        let mut segments = Vec::new();
        let mut capacity = 0usize;
        for descriptor in chain {
            if !descriptor.is_write_only() {
                return Err(PacketError::ReadOnlyRxDescriptor);
            }
            let (addr, len) = (descriptor.addr(), descriptor.len());
            if len == 0 {
                continue;
            }
            if !mem.check_range(addr, len as usize) {
                return Err(PacketError::OutsideMemory { addr: addr.0, len });
            }
            segments.push((addr, len as usize));
            // At most a queue's worth of u32 lengths: no overflow on 64-bit hosts.
            capacity = capacity.saturating_add(len as usize);
        }
        if capacity < HDR_LEN {
            return Err(PacketError::ShortHeader(capacity));
        }
        Ok(Self {
            head,
            segments,
            capacity,
        })
    }

    /// The chain's head index, to return it.
    pub(super) fn head(&self) -> u16 {
        self.head
    }

    /// How many payload bytes fit after the header, at most [`MAX_PKT_BUF`].
    pub(super) fn payload_capacity(&self) -> usize {
        (self.capacity - HDR_LEN).min(MAX_PKT_BUF)
    }

    /// Writes `header` and then `payload` (at most [`RxBuffer::payload_capacity`] bytes); returns
    /// the bytes written, for the used ring.
    pub(super) fn write(
        &self,
        mem: &GuestMemoryMmap,
        header: &VsockHeader,
        payload: &[u8],
    ) -> Result<usize, GuestMemoryError> {
        let header = header.to_bytes();
        let mut parts = [&header[..], payload].into_iter().filter(|p| !p.is_empty());
        let mut part = parts.next().unwrap_or_default();
        let mut written = 0;
        for &(addr, len) in &self.segments {
            let mut offset = 0;
            while offset < len && !part.is_empty() {
                let n = part.len().min(len - offset);
                // In range: `new` checked the whole segment.
                mem.write_slice(&part[..n], addr.unchecked_add(offset as u64))?;
                offset += n;
                written += n;
                part = &part[n..];
                if part.is_empty() {
                    part = parts.next().unwrap_or_default();
                }
            }
            if part.is_empty() {
                break;
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::virtio::device_queue::DeviceQueue;
    use crate::virtio::test_support::*;

    const GUEST_CID: u64 = 3;
    const RING: u64 = 0x1000;
    const HDR_AT: u64 = 0x10000;
    const DATA_AT: u64 = 0x20000;

    fn header(op: u16, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 52,
            len,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
    }

    /// Writes `chain` into a fresh queue and parses it as a transmit packet.
    fn parse(mem: &GuestMemoryMmap, chain: &[Buf]) -> (Result<TxPacket, PacketError>, Vec<u8>) {
        let mut ring = DriverQueue::new(mem, RING);
        ring.push(chain);
        let mut queue = DeviceQueue::new(ring.queue(), "test");
        let chain = queue.pop(mem).unwrap().unwrap();
        let mut payload = vec![0; MAX_PKT_BUF];
        let packet = read_tx_packet(mem, chain, GUEST_CID, &mut payload);
        (packet, payload)
    }

    fn store(mem: &GuestMemoryMmap, header: VsockHeader, payload: &[u8]) {
        mem.write_slice(&header.to_bytes(), GuestAddress(HDR_AT))
            .unwrap();
        mem.write_slice(payload, GuestAddress(DATA_AT)).unwrap();
    }

    #[test]
    fn header_round_trips_through_the_wire_layout() {
        let header = VsockHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 7,
            len: 9,
            kind: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1234,
            fwd_cnt: 0x5678,
        };
        let bytes = header.to_bytes();
        assert_eq!(&bytes[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&bytes[28..32], &[1, 0, 5, 0]);
        assert_eq!(VsockHeader::from_bytes(&bytes), header);
    }

    #[test]
    fn a_packet_with_header_and_payload_in_separate_descriptors() {
        let mem = guest_memory();
        let payload: Vec<u8> = (0..3000).map(|i| i as u8).collect();
        store(&mem, header(5, 3000), &payload);
        let (packet, read) = parse(&mem, &[readable(HDR_AT, 44), readable(DATA_AT, 3000)]);
        let packet = packet.unwrap();
        assert_eq!(packet.op, Op::Rw);
        assert_eq!(packet.len(), 3000);
        assert_eq!(read[..3000], payload[..]);
    }

    #[test]
    fn a_header_split_over_descriptors_and_sharing_one_with_the_payload() {
        let mem = guest_memory();
        // Header and payload contiguous at HDR_AT, described as 10 + 30 + (4 + 6) bytes.
        let mut bytes = header(5, 6).to_bytes().to_vec();
        bytes.extend_from_slice(b"abcdef");
        mem.write_slice(&bytes, GuestAddress(HDR_AT)).unwrap();
        let (packet, read) = parse(
            &mem,
            &[
                readable(HDR_AT, 10),
                readable(HDR_AT + 10, 30),
                readable(HDR_AT + 40, 10),
            ],
        );
        assert_eq!(packet.unwrap().len(), 6);
        assert_eq!(&read[..6], b"abcdef");
    }

    #[test]
    fn control_packets_and_extra_room_are_fine() {
        let mem = guest_memory();
        for op in 1..=7u16 {
            if op == 5 {
                continue;
            }
            store(&mem, header(op, 0), &[]);
            // A chain longer than the packet: the rest is never read, even outside memory.
            let (packet, _) = parse(
                &mem,
                &[readable(HDR_AT, 44), readable(MEM_SIZE as u64, 4096)],
            );
            assert_eq!(packet.unwrap().op as u16, op);
        }
    }

    #[test]
    fn malformed_transmit_chains_are_refused() {
        let mem = guest_memory();
        let cases: Vec<(&str, VsockHeader, Vec<Buf>)> = vec![
            ("short header", header(1, 0), vec![readable(HDR_AT, 43)]),
            (
                "short split header",
                header(1, 0),
                vec![readable(HDR_AT, 20), readable(HDR_AT + 20, 20)],
            ),
            ("empty chain", header(1, 0), vec![readable(HDR_AT, 0)]),
            (
                "len beyond the chain",
                header(5, 100),
                vec![readable(HDR_AT, 44), readable(DATA_AT, 99)],
            ),
            (
                "len without payload",
                header(5, 1),
                vec![readable(HDR_AT, 44)],
            ),
            (
                "too long",
                header(5, MAX_PKT_BUF as u32 + 1),
                vec![readable(HDR_AT, 44), readable(DATA_AT, 0x1_0001)],
            ),
            (
                "len u32::MAX",
                header(5, u32::MAX),
                vec![readable(HDR_AT, 44)],
            ),
            (
                "wrong type",
                VsockHeader {
                    kind: 2,
                    ..header(1, 0)
                },
                vec![readable(HDR_AT, 44)],
            ),
            (
                "source CID not the guest's",
                VsockHeader {
                    src_cid: 4,
                    ..header(1, 0)
                },
                vec![readable(HDR_AT, 44)],
            ),
            (
                "source CID the host's",
                VsockHeader {
                    src_cid: HOST_CID,
                    ..header(1, 0)
                },
                vec![readable(HDR_AT, 44)],
            ),
            (
                "destination CID not the host's",
                VsockHeader {
                    dst_cid: 3,
                    ..header(1, 0)
                },
                vec![readable(HDR_AT, 44)],
            ),
            ("op 0", header(0, 0), vec![readable(HDR_AT, 44)]),
            ("op 8", header(8, 0), vec![readable(HDR_AT, 44)]),
            ("op 0xffff", header(0xffff, 0), vec![readable(HDR_AT, 44)]),
            (
                "payload on a REQUEST",
                header(1, 4),
                vec![readable(HDR_AT, 44), readable(DATA_AT, 4)],
            ),
            (
                "device-writable header",
                header(1, 0),
                vec![writable(HDR_AT, 44)],
            ),
            (
                "device-writable payload",
                header(5, 4),
                vec![readable(HDR_AT, 44), writable(DATA_AT, 4)],
            ),
            (
                "header outside memory",
                header(1, 0),
                vec![readable(MEM_SIZE as u64 - 20, 44)],
            ),
            (
                "header wrapping the address space",
                header(1, 0),
                vec![readable(u64::MAX - 10, 44)],
            ),
            (
                "payload outside memory",
                header(5, 100),
                vec![readable(HDR_AT, 44), readable(MEM_SIZE as u64 - 50, 100)],
            ),
            (
                "huge payload descriptor",
                header(5, 100),
                vec![readable(HDR_AT, 44), readable(0, u32::MAX)],
            ),
        ];
        for (what, header, chain) in cases {
            store(&mem, header, &[0x55; 200]);
            let (packet, _) = parse(&mem, &chain);
            assert!(packet.is_err(), "{what}: accepted as {packet:?}");
        }
    }

    #[test]
    fn receive_buffers_are_checked_and_filled_across_descriptors() {
        let mem = guest_memory();
        let mut ring = DriverQueue::new(&mem, RING);
        let bad = [
            vec![readable(HDR_AT, 4096)],
            vec![writable(HDR_AT, 20), readable(DATA_AT, 100)],
            vec![writable(MEM_SIZE as u64 - 10, 100)],
            vec![writable(HDR_AT, 43)],
            vec![writable(HDR_AT, 0)],
        ];
        for chain in &bad {
            ring.push(chain);
        }
        let good = ring.push(&[writable(HDR_AT, 30), writable(DATA_AT, 100)]);
        let mut queue = DeviceQueue::new(ring.queue(), "test");
        for chain in &bad {
            let popped = queue.pop(&mem).unwrap().unwrap();
            assert!(RxBuffer::new(&mem, popped).is_err(), "{chain:?}");
        }
        let buffer = RxBuffer::new(&mem, queue.pop(&mem).unwrap().unwrap()).unwrap();
        assert_eq!(buffer.head(), good);
        assert_eq!(buffer.payload_capacity(), 86);
        let header = header(5, 50);
        let payload: Vec<u8> = (100..150).collect();
        assert_eq!(buffer.write(&mem, &header, &payload).unwrap(), 94);
        let mut bytes = guest_bytes(&mem, HDR_AT, 30);
        bytes.extend(guest_bytes(&mem, DATA_AT, 64));
        assert_eq!(bytes[..HDR_LEN], header.to_bytes());
        assert_eq!(bytes[HDR_LEN..], payload[..]);
    }
}
