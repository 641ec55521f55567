//! One vsock stream connection between a guest socket and a host Unix stream: its state and its
//! credit accounting (virtio 1.2, 5.10.6.3).
//!
//! Each side tells the other, in every packet header, how big its receive buffer is
//! (`buf_alloc`) and how many bytes it has consumed so far (`fwd_cnt`); a sender may have at most
//! `buf_alloc - (sent - fwd_cnt)` bytes in flight. Both directions are bounded that way here:
//!
//! - host → guest: bytes are read from the Unix stream only into a guest receive buffer the
//!   device holds, and only as many as the guest's credit allows. Nothing is kept in host memory;
//!   what the guest cannot take yet stays in the kernel's socket buffer, which slows the host
//!   writer.
//! - guest → host: bytes are written straight to the Unix stream; what it does not take is kept,
//!   but never more than [`BUF_ALLOC`], the credit we advertise. A guest that sends beyond that
//!   breaks the protocol and gets RST. A slow host reader thus stops our `fwd_cnt`, the guest
//!   runs out of credit and waits: ember's memory does not grow.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::packet::{
    Op, TxPacket, VsockHeader, HOST_CID, SHUTDOWN_BOTH, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// The receive buffer we advertise for each connection: the most guest data ember holds for one
/// connection whose host reader is slow.
pub(super) const BUF_ALLOC: u32 = 128 * 1024;
/// When the guest's idea of our free space falls to this, we tell it what we have forwarded
/// since, so a sender never waits for a credit update it did not ask for.
const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 2;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated: REQUEST sent (or about to be), waiting for the guest's RESPONSE.
    AwaitingResponse,
    /// Data may flow.
    Established,
    /// Over: the muxer forgets it.
    Closed,
}

/// Control packets owed to the guest, sent in this order before or between data.
#[derive(Clone, Copy, Debug, Default)]
struct Owed {
    request: bool,
    response: bool,
    /// SHUTDOWN flags to send.
    shutdown: u32,
    credit_update: bool,
    /// The connection is over: RST is the last packet it sends.
    rst: bool,
}

/// One connection. The muxer keys it by (`local_port`, `peer_port`).
pub(super) struct Connection {
    /// None once the connection is being reset: the host peer is let go at once.
    stream: Option<UnixStream>,
    guest_cid: u64,
    /// The host-side port: the guest's destination port (guest-initiated) or the port ember
    /// allocated (host-initiated).
    local_port: u32,
    /// The guest-side port.
    peer_port: u32,
    state: State,
    owed: Owed,

    // Host → guest.
    /// The guest's receive buffer for this connection.
    peer_buf_alloc: u32,
    /// What the guest says it has consumed.
    peer_fwd_cnt: Wrapping<u32>,
    /// What we have sent the guest.
    tx_cnt: Wrapping<u32>,
    /// A CREDIT_REQUEST went out since the guest last told us its credit.
    credit_requested: bool,
    /// The stream may have data (or EOF) to read: set on a readiness edge, cleared on WouldBlock.
    host_readable: bool,
    /// The host peer takes no more data: it closed its socket entirely (EPOLLHUP), not only its
    /// writing half, or writing it the OK line failed with EPIPE.
    host_hung_up: bool,
    /// The stream reached EOF: the host will send no more.
    host_eof: bool,

    // Guest → host.
    /// What the guest has sent us.
    rx_cnt: Wrapping<u32>,
    /// What we have written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    fwd_cnt_told: Wrapping<u32>,
    /// `OK <port>\n`, owed to a host-initiated stream before any data.
    greeting: Vec<u8>,
    /// Guest data the host stream has not taken yet: at most [`BUF_ALLOC`] bytes.
    pending: VecDeque<u8>,
    /// SHUTDOWN flags the guest sent.
    peer_shutdown: u32,
    /// The stream's writing half is shut, after the guest's SHUTDOWN(SEND).
    write_shut: bool,

    /// Queued in the muxer's list of connections with packets for the guest.
    pub(super) scheduled: bool,
}

impl Connection {
    fn new(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        Self {
            stream: Some(stream),
            guest_cid,
            local_port,
            peer_port,
            state: State::AwaitingResponse,
            owed: Owed::default(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            credit_requested: false,
            // The stream may hold data from before it was ours to watch (written right after a
            // CONNECT line, say); its readiness edge is gone.
            host_readable: true,
            host_hung_up: false,
            host_eof: false,
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            greeting: Vec::new(),
            pending: VecDeque::new(),
            peer_shutdown: 0,
            write_shut: false,
            scheduled: false,
        }
    }

    /// A host program asked, through `CONNECT <peer_port>`, for the guest's `peer_port`; ember
    /// gave it `local_port`. The guest gets a REQUEST.
    pub(super) fn host_initiated(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
    ) -> Self {
        let mut connection = Self::new(stream, guest_cid, local_port, peer_port);
        connection.owed.request = true;
        connection
    }

    /// The guest's `request` reached a host listener over `stream`. The guest gets a RESPONSE.
    pub(super) fn guest_initiated(stream: UnixStream, request: &VsockHeader) -> Self {
        let mut connection = Self::new(stream, request.src_cid, request.dst_port, request.src_port);
        connection.state = State::Established;
        connection.owed.response = true;
        connection.learn_peer_credit(request);
        connection
    }

    /// The connection is over and can be forgotten.
    pub(super) fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Guest bytes waiting for the host stream.
    #[cfg(test)]
    pub(super) fn buffered(&self) -> usize {
        self.pending.len()
    }

    /// Whether [`Connection::next_packet`] may have something for the guest.
    pub(super) fn has_packet_for_guest(&self) -> bool {
        let owed = self.owed;
        if owed.rst || owed.request {
            return true;
        }
        if self.state != State::Established {
            return false;
        }
        owed.response
            || owed.shutdown != 0
            || owed.credit_update
            || (self.reads_host() && (self.peer_credit() > 0 || !self.credit_requested))
    }

    /// Whether host data is to be read and sent to the guest.
    fn reads_host(&self) -> bool {
        self.host_readable && !self.host_eof && self.peer_shutdown & SHUTDOWN_RCV == 0
    }

    /// How many bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        // A guest claiming to have consumed more than it was sent makes this wrap to a huge
        // number, and so its credit zero: it only hurts itself.
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn learn_peer_credit(&mut self, header: &VsockHeader) {
        let fwd_cnt = Wrapping(header.fwd_cnt);
        if header.buf_alloc != self.peer_buf_alloc || fwd_cnt != self.peer_fwd_cnt {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// A packet from the guest for this connection; `payload` is its data (RW only).
    pub(super) fn on_guest_packet(&mut self, packet: &TxPacket, payload: &[u8]) {
        if self.state == State::Closed || self.owed.rst {
            return;
        }
        self.learn_peer_credit(&packet.header);
        match (self.state, packet.op) {
            // An RST needs no answer, whatever the state.
            (_, Op::Rst) => self.close(),
            (State::AwaitingResponse, Op::Response) => {
                self.state = State::Established;
                self.greeting = format!("OK {}\n", self.local_port).into_bytes();
                self.flush();
            }
            // Before the RESPONSE the guest may only answer; after it, a REQUEST or a RESPONSE
            // on a live connection means the two sides disagree about it.
            (State::AwaitingResponse, _) | (_, Op::Request | Op::Response) => self.reset(),
            (_, Op::Rw) => self.on_guest_data(payload),
            (_, Op::Shutdown) => {
                self.peer_shutdown |= packet.header.flags & SHUTDOWN_BOTH;
                self.flush();
            }
            (_, Op::CreditUpdate) => {}
            (_, Op::CreditRequest) => self.owed.credit_update = true,
        }
    }

    fn on_guest_data(&mut self, payload: &[u8]) {
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            log::debug!("vsock: data after the guest's SHUTDOWN(SEND); resetting");
            self.reset();
            return;
        }
        let buffered_after = self.pending.len().saturating_add(payload.len());
        if buffered_after > BUF_ALLOC as usize {
            log::debug!(
                "vsock: the guest sent {} bytes beyond the credit of port {}; resetting",
                buffered_after - BUF_ALLOC as usize,
                self.local_port
            );
            self.reset();
            return;
        }
        // Never more than 64 KiB: no truncation.
        self.rx_cnt += Wrapping(payload.len() as u32);
        let mut rest = payload;
        if self.greeting.is_empty() && self.pending.is_empty() {
            match self.write_some(payload) {
                Some(written) => {
                    self.fwd_cnt += Wrapping(written as u32);
                    rest = &payload[written..];
                }
                None => return,
            }
        }
        if !rest.is_empty() {
            if self.pending.capacity() == 0 {
                // Once, the whole advertised buffer: the check above keeps the contents within
                // it, so the deque never reallocates past it.
                self.pending.reserve_exact(BUF_ALLOC as usize);
            }
            self.pending.extend(rest);
        }
        self.after_forwarding();
    }

    /// Writes as much of `bytes` as the stream takes; None if the connection was reset.
    fn write_some(&mut self, bytes: &[u8]) -> Option<usize> {
        let written = write_nonblocking(self.stream.as_mut()?, bytes);
        self.written_or_reset(written)
    }

    fn written_or_reset(&mut self, written: io::Result<usize>) -> Option<usize> {
        match written {
            Ok(written) => Some(written),
            Err(e) => {
                // EPIPE and the like: the host peer is gone.
                log::debug!("vsock: host stream of port {}: {e}", self.local_port);
                self.reset();
                None
            }
        }
    }

    /// Writes what the host stream is owed, then acts on the guest's shutdown once it is all out.
    fn flush(&mut self) {
        if !self.greeting.is_empty() {
            let greeting = std::mem::take(&mut self.greeting);
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            match write_nonblocking(stream, &greeting) {
                Ok(written) => {
                    self.greeting = greeting[written..].to_vec();
                    if !self.greeting.is_empty() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                    // The program went (or shut its reading half) before the guest answered:
                    // nobody reads the OK line, but what it wrote before going is still in the
                    // stream and is the guest's. The line is dropped, the data is read as
                    // usual, and EOF ends the connection with SHUTDOWN of both directions,
                    // the host taking nothing more.
                    log::debug!(
                        "vsock: host stream of port {} closed before its OK line",
                        self.local_port
                    );
                    self.host_hung_up = true;
                }
                Err(e) => {
                    self.written_or_reset(Err(e));
                    return;
                }
            }
        }
        while !self.pending.is_empty() {
            let Some(stream) = self.stream.as_mut() else {
                return;
            };
            let (front, _) = self.pending.as_slices();
            let front_len = front.len();
            let written = write_nonblocking(stream, front);
            let Some(written) = self.written_or_reset(written) else {
                return;
            };
            self.pending.drain(..written);
            self.fwd_cnt += Wrapping(written as u32);
            if written < front_len {
                break;
            }
        }
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            // An idle connection holds no buffer.
            self.pending = VecDeque::new();
        }
        self.after_forwarding();
    }

    /// After guest data moved to the host: acts on the guest's shutdown once nothing is left,
    /// and tells the guest about freed space when it may be running short.
    fn after_forwarding(&mut self) {
        if self.state != State::Established || self.owed.rst {
            return;
        }
        let drained = self.greeting.is_empty() && self.pending.is_empty();
        if drained && self.peer_shutdown == SHUTDOWN_BOTH {
            // The guest is closing and everything it sent is out: RST ends the connection
            // (virtio 1.2, 5.10.6.6).
            self.reset();
            return;
        }
        if drained && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            self.write_shut = true;
            if let Some(stream) = &self.stream {
                // The host reader sees EOF; it may still write its answer.
                let _ = stream.shutdown(Shutdown::Write);
            }
        }
        let told_free = BUF_ALLOC.saturating_sub((self.rx_cnt - self.fwd_cnt_told).0);
        if self.fwd_cnt != self.fwd_cnt_told && told_free <= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
    }

    /// The host stream is ready (`events` from epoll, edge-triggered).
    pub(super) fn on_host_event(&mut self, events: EventSet) {
        if self.stream.is_none() {
            return;
        }
        if events.contains(EventSet::ERROR) {
            log::debug!(
                "vsock: error on the host stream of port {}",
                self.local_port
            );
            self.reset();
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            self.host_hung_up = true;
        }
        if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) {
            self.host_readable = true;
        }
        if events.contains(EventSet::OUT) && self.state == State::Established {
            self.flush();
        }
    }

    /// The next packet for the guest, its payload (if any) read into `payload`, which holds as
    /// much as the guest's receive buffer does; None when there is nothing to send now.
    pub(super) fn next_packet(&mut self, payload: &mut [u8]) -> Option<(VsockHeader, usize)> {
        if std::mem::take(&mut self.owed.rst) {
            self.state = State::Closed;
            return Some((self.header(Op::Rst, 0, 0), 0));
        }
        if self.state == State::Closed {
            return None;
        }
        if std::mem::take(&mut self.owed.request) {
            return Some((self.header(Op::Request, 0, 0), 0));
        }
        if self.state != State::Established {
            return None;
        }
        if std::mem::take(&mut self.owed.response) {
            return Some((self.header(Op::Response, 0, 0), 0));
        }
        if let Some(packet) = self.read_host(payload) {
            return Some(packet);
        }
        if self.owed.rst {
            // Reading failed.
            return self.next_packet(payload);
        }
        if self.owed.shutdown != 0 {
            let flags = std::mem::take(&mut self.owed.shutdown);
            return Some((self.header(Op::Shutdown, flags, 0), 0));
        }
        if std::mem::take(&mut self.owed.credit_update) {
            return Some((self.header(Op::CreditUpdate, 0, 0), 0));
        }
        None
    }

    /// Reads host data for the guest, as much as `payload` and the guest's credit allow.
    fn read_host(&mut self, payload: &mut [u8]) -> Option<(VsockHeader, usize)> {
        if !self.reads_host() {
            return None;
        }
        let credit = self.peer_credit();
        if credit == 0 {
            if self.credit_requested {
                return None;
            }
            self.credit_requested = true;
            return Some((self.header(Op::CreditRequest, 0, 0), 0));
        }
        let room = payload.len().min(credit as usize);
        if room == 0 {
            // A receive buffer with no room past the header: a read of 0 bytes would look like
            // EOF. Control packets still fit.
            return None;
        }
        let stream = self.stream.as_mut()?;
        loop {
            match stream.read(&mut payload[..room]) {
                Ok(0) => {
                    self.host_eof = true;
                    // A half-closed host stream may still take the guest's data; a closed one
                    // cannot.
                    self.owed.shutdown |= if self.host_hung_up {
                        SHUTDOWN_BOTH
                    } else {
                        SHUTDOWN_SEND
                    };
                    return None;
                }
                Ok(n) => {
                    // At most 64 KiB.
                    self.tx_cnt += Wrapping(n as u32);
                    // The header carries our fwd_cnt, which is what an update would say.
                    self.owed.credit_update = false;
                    return Some((self.header(Op::Rw, 0, n as u32), n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return None;
                }
                Err(e) => {
                    log::debug!("vsock: host stream of port {}: {e}", self.local_port);
                    self.reset();
                    return None;
                }
            }
        }
    }

    /// A header from this connection's host end to its guest end; what it says of our credit
    /// counts as told.
    fn header(&mut self, op: Op, flags: u32, len: u32) -> VsockHeader {
        self.fwd_cnt_told = self.fwd_cnt;
        VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            kind: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// Tears the connection down from our side: the host peer is let go now, and the guest gets
    /// an RST (all other packets owed are dropped).
    pub(super) fn reset(&mut self) {
        self.stream = None;
        self.pending = VecDeque::new();
        self.greeting = Vec::new();
        self.owed = Owed {
            rst: true,
            ..Owed::default()
        };
    }

    /// The guest ended the connection (RST): nothing more to send.
    fn close(&mut self) {
        self.stream = None;
        self.pending = VecDeque::new();
        self.state = State::Closed;
    }
}

/// Writes as much of `bytes` as `stream` takes without blocking.
fn write_nonblocking(stream: &mut UnixStream, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match stream.write(&bytes[written..]) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::super::packet::MAX_PKT_BUF;
    use super::*;

    const GUEST_CID: u64 = 3;

    fn guest_header(op: Op, len: u32, buf_alloc: u32, fwd_cnt: u32) -> TxPacket {
        TxPacket {
            header: VsockHeader {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: 1000,
                dst_port: 52,
                len,
                kind: TYPE_STREAM,
                op: op as u16,
                flags: 0,
                buf_alloc,
                fwd_cnt,
            },
            op,
        }
    }

    /// A guest-initiated connection whose guest advertises `buf_alloc`; the RESPONSE is taken.
    fn established(buf_alloc: u32) -> (Connection, UnixStream) {
        let (ours, host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_nonblocking(true).unwrap();
        let request = guest_header(Op::Request, 0, buf_alloc, 0).header;
        let mut connection = Connection::guest_initiated(ours, &request);
        let mut payload = vec![0; MAX_PKT_BUF];
        let (response, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(response.op, Op::Response as u16);
        assert_eq!((response.src_port, response.dst_port), (52, 1000));
        assert_eq!(response.buf_alloc, BUF_ALLOC);
        (connection, host)
    }

    #[test]
    fn host_data_never_exceeds_the_guest_credit() {
        let (mut connection, mut host) = established(10_000);
        host.write_all(&[7; 30_000]).unwrap();
        let mut payload = vec![0; 4096];
        let mut sent = 0;
        while let Some((header, len)) = connection.next_packet(&mut payload) {
            if header.op == Op::CreditRequest as u16 {
                break;
            }
            assert_eq!(header.op, Op::Rw as u16);
            sent += len;
        }
        assert_eq!(sent, 10_000, "exactly the credit");
        // One CREDIT_REQUEST, then silence until the guest says more.
        assert!(connection.next_packet(&mut payload).is_none());
        assert!(!connection.has_packet_for_guest());
        // The guest consumed 6000 bytes.
        connection.on_guest_packet(&guest_header(Op::CreditUpdate, 0, 10_000, 6000), &[]);
        assert!(connection.has_packet_for_guest());
        let mut more = 0;
        while let Some((header, len)) = connection.next_packet(&mut payload) {
            if header.op != Op::Rw as u16 {
                break;
            }
            more += len;
        }
        assert_eq!(more, 6000);
    }

    #[test]
    fn guest_data_is_forwarded_and_credit_updates_follow_consumption() {
        let (mut connection, mut host) = established(64 * 1024);
        let data: Vec<u8> = (0..40_000).map(|i| (i % 251) as u8).collect();
        let mut payload = vec![0; 4096];
        connection.on_guest_packet(&guest_header(Op::Rw, 40_000, 64 * 1024, 0), &data);
        // Half our buffer is still believed free by the guest: no update yet.
        assert!(connection.next_packet(&mut payload).is_none());
        connection.on_guest_packet(&guest_header(Op::Rw, 40_000, 64 * 1024, 0), &data);
        // 80000 forwarded, the guest believes 80000 in flight out of 128 KiB: time to tell it.
        let (update, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(update.op, Op::CreditUpdate as u16);
        assert_eq!(update.fwd_cnt, 80_000);
        let mut received = vec![0; 80_000];
        host.read_exact(&mut received).unwrap();
        assert_eq!(received[..40_000], data[..]);
        assert_eq!(received[40_000..], data[..]);
        // A CREDIT_REQUEST is answered.
        connection.on_guest_packet(&guest_header(Op::CreditRequest, 0, 64 * 1024, 0), &[]);
        let (update, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(update.op, Op::CreditUpdate as u16);
    }

    #[test]
    fn a_slow_host_reader_keeps_at_most_buf_alloc_and_data_beyond_credit_resets() {
        let (mut connection, mut host) = established(64 * 1024);
        let chunk = vec![0xab; MAX_PKT_BUF];
        let mut payload = vec![0; 4096];
        // The guest sends while it has credit, as it learns it from our headers.
        let (mut sent, mut told_fwd) = (0u64, 0u32);
        loop {
            let credit = u64::from(BUF_ALLOC) - (sent - u64::from(told_fwd));
            if credit == 0 {
                break;
            }
            let len = credit.min(chunk.len() as u64) as usize;
            connection.on_guest_packet(
                &guest_header(Op::Rw, len as u32, 64 * 1024, 0),
                &chunk[..len],
            );
            sent += len as u64;
            while let Some((header, _)) = connection.next_packet(&mut payload) {
                told_fwd = header.fwd_cnt;
            }
            assert!(connection.buffered() <= BUF_ALLOC as usize);
            assert!(connection.pending.capacity() <= BUF_ALLOC as usize);
        }
        assert_eq!(connection.buffered(), BUF_ALLOC as usize);
        // One byte more than the credit: RST, and the buffer is gone.
        connection.on_guest_packet(&guest_header(Op::Rw, 1, 64 * 1024, 0), &[1]);
        assert_eq!(connection.buffered(), 0);
        let (rst, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(rst.op, Op::Rst as u16);
        assert!(connection.is_closed());
        // The host peer was let go: it reads what got through, then EOF.
        host.set_nonblocking(false).unwrap();
        let mut all = Vec::new();
        host.read_to_end(&mut all).unwrap();
        assert!(all.iter().all(|&b| b == 0xab));
    }

    #[test]
    fn shutdowns_in_each_direction() {
        let (mut connection, mut host) = established(64 * 1024);
        let mut payload = vec![0; 4096];
        // The host half-closes: the guest gets SHUTDOWN(SEND) and may still send.
        host.shutdown(Shutdown::Write).unwrap();
        connection.on_host_event(EventSet::IN | EventSet::READ_HANG_UP);
        let (shutdown, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(shutdown.op, Op::Shutdown as u16);
        assert_eq!(shutdown.flags, SHUTDOWN_SEND);
        connection.on_guest_packet(&guest_header(Op::Rw, 5, 64 * 1024, 0), b"reply");
        // The guest is done sending: the host reads EOF after the data.
        let mut shutdown = guest_header(Op::Shutdown, 0, 64 * 1024, 0);
        shutdown.header.flags = SHUTDOWN_SEND;
        connection.on_guest_packet(&shutdown, &[]);
        let mut all = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"reply");
        // Full shutdown from the guest: we answer RST.
        shutdown.header.flags = SHUTDOWN_BOTH;
        connection.on_guest_packet(&shutdown, &[]);
        let (rst, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(rst.op, Op::Rst as u16);
        assert!(connection.is_closed());
    }

    #[test]
    fn a_host_initiated_connection_greets_after_the_response() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut connection = Connection::host_initiated(ours, GUEST_CID, 1 << 30, 52);
        let mut payload = vec![0; 4096];
        let (request, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(request.op, Op::Request as u16);
        assert_eq!((request.src_port, request.dst_port), (1 << 30, 52));
        assert_eq!(request.dst_cid, GUEST_CID);
        // Nothing flows before the guest answers, and data from it then is a violation.
        assert!(connection.next_packet(&mut payload).is_none());
        let mut response = guest_header(Op::Response, 0, 4096, 0);
        response.header.src_port = 52;
        response.header.dst_port = 1 << 30;
        connection.on_guest_packet(&response, &[]);
        connection.on_guest_packet(&guest_header(Op::Rw, 2, 4096, 0), b"hi");
        let mut greeting = [0; 16];
        host.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"OK 1073741824\nhi");
        // A second RESPONSE is a violation.
        connection.on_guest_packet(&response, &[]);
        let (rst, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(rst.op, Op::Rst as u16);
    }

    #[test]
    fn a_host_peer_gone_before_the_response_still_delivers_its_data() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut connection = Connection::host_initiated(ours, GUEST_CID, 1 << 30, 52);
        let mut payload = vec![0; 4096];
        let (request, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(request.op, Op::Request as u16);
        host.write_all(b"last words").unwrap();
        drop(host);
        // No epoll event told us: writing the OK line is what finds the peer gone.
        let mut response = guest_header(Op::Response, 0, 4096, 0);
        response.header.src_port = 52;
        response.header.dst_port = 1 << 30;
        connection.on_guest_packet(&response, &[]);
        let (data, len) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(data.op, Op::Rw as u16);
        assert_eq!(&payload[..len], b"last words");
        let (shutdown, _) = connection.next_packet(&mut payload).unwrap();
        assert_eq!(shutdown.op, Op::Shutdown as u16);
        assert_eq!(shutdown.flags, SHUTDOWN_BOTH);
        assert!(connection.next_packet(&mut payload).is_none());
    }

    #[test]
    fn an_rst_from_the_guest_closes_without_answer() {
        let (mut connection, mut host) = established(4096);
        connection.on_guest_packet(&guest_header(Op::Rst, 0, 4096, 0), &[]);
        assert!(connection.is_closed());
        assert!(connection.next_packet(&mut [0; 64]).is_none());
        let mut all = Vec::new();
        host.set_nonblocking(false).unwrap();
        host.read_to_end(&mut all).unwrap();
        assert!(all.is_empty());
    }
}
