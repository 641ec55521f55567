//! The host side of the device: the connections, the Unix sockets behind them, and what the
//! guest is owed.
//!
//! Host programs reach the guest as with Firecracker's hybrid vsock: they connect to the
//! listening socket at `PATH` and write `CONNECT <guest port>\n`; the guest gets a REQUEST from a
//! host port ember allocates (from 2^30 up), and once it answers RESPONSE the program reads
//! `OK <host port>\n` and the stream is the connection. A guest connecting to host port P
//! reaches the program listening at `PATH_P`; nobody there means RST.
//!
//! Every host descriptor (the listener, streams waiting for their CONNECT line, connections) is
//! in one epoll set of our own, edge-triggered, whose descriptor is the device's single host
//! event: connections come and go without the device thread re-registering anything.
//!
//! Memory is bounded whatever the guest or the host programs do: at most [`MAX_CONNECTIONS`]
//! streams (connected or still sending their CONNECT line), each holding at most the credit it
//! advertised (see `connection.rs`); one queue of connections with packets for the guest, each
//! in it once; and a queue of RSTs for packets that match no connection, of at most
//! [`RST_QUEUE_LEN`]: while it is full the device takes no more transmit chains, so a flood of
//! REQUESTs waits in the guest's own ring until the guest takes the answers.
//!
//! Local programs that connect and say nothing cannot take the streams' places either: at most
//! [`MAX_AWAITING`] streams wait for their CONNECT line, a newcomer closing the oldest when
//! they are that many (or when all the places are taken), and one still without its line
//! [`CONNECT_DEADLINE`] after it connected is closed at the next host event or queue
//! notification (the device has no timer of its own).

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::Connection;
use super::packet::{Op, TxPacket, VsockHeader, HOST_CID, TYPE_STREAM};
use super::VsockError;

/// The most host streams at once, connected or still sending their CONNECT line.
pub(super) const MAX_CONNECTIONS: usize = 1024;
/// The most RSTs waiting for the guest's receive buffers; the transmit queue waits while full.
pub(super) const RST_QUEUE_LEN: usize = 256;
/// The most streams still sending their CONNECT line; a new one closes the oldest.
pub(super) const MAX_AWAITING: usize = 64;
/// How long a stream has to send its whole CONNECT line (18 bytes at most) after connecting.
pub(super) const CONNECT_DEADLINE: Duration = Duration::from_secs(5);
/// `CONNECT 4294967295` is 18 bytes: a longer line is not a CONNECT line.
const MAX_CONNECT_LINE: usize = 32;
/// Host ports for host-initiated connections are allocated from here up, as in Firecracker, far
/// from the ports host services listen on.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// The listener's epoll token; other descriptors get fresh ones, never reused.
const LISTENER_TOKEN: u64 = 0;
/// Events fetched per `epoll_wait`.
const EVENT_BATCH: usize = 64;

/// A connection's identity from the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    /// The host-side port.
    pub local_port: u32,
    /// The guest-side port.
    pub peer_port: u32,
}

/// What an epoll token stands for.
enum Endpoint {
    Listener,
    /// A host program that connected and has not finished its CONNECT line.
    Awaiting {
        stream: UnixStream,
        line: Vec<u8>,
    },
    Connection(ConnKey),
}

/// A connection and what the muxer keeps beside it.
struct Live {
    token: u64,
    /// Its local port came from the allocator and goes back there.
    host_initiated: bool,
    connection: Connection,
}

/// All connections of one device, and the host sockets behind them.
pub(super) struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    endpoints: HashMap<u64, Endpoint>,
    next_token: u64,
    /// The tokens of the streams in `endpoints` still sending their CONNECT line, oldest first,
    /// with when each connected: at most [`MAX_AWAITING`].
    awaiting: VecDeque<(u64, Instant)>,
    connections: HashMap<ConnKey, Live>,
    /// Connections that may have a packet for the guest, each at most once, in turn: only live
    /// ones, so never more than [`MAX_CONNECTIONS`].
    ready: VecDeque<ConnKey>,
    /// RSTs for guest packets that match no connection.
    rsts: VecDeque<VsockHeader>,
    /// Local ports of host-initiated connections.
    host_ports: HashSet<u32>,
    next_host_port: u32,
    /// Connections set up so far, either way (for the monitor's metrics).
    opened: u64,
}

impl Muxer {
    /// The host port the next host-initiated connection tries first.
    pub(super) fn next_host_port(&self) -> u32 {
        self.next_host_port
    }

    /// Goes on allocating host ports from `port` (a restored device: see
    /// `VirtioDeviceState::Vsock`); one below the range starts the range again.
    pub(super) fn continue_host_ports_from(&mut self, port: u32) {
        self.next_host_port = port.max(FIRST_HOST_PORT);
    }

    /// Connections set up so far, either way.
    pub(super) fn connections_opened(&self) -> u64 {
        self.opened
    }

    /// Listens at `uds_path` for host programs; the guest is `guest_cid`.
    pub(super) fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, VsockError> {
        // Before the socket file exists, so that no error leaves it behind.
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let listener = UnixListener::bind(&uds_path).map_err(|source| {
            if source.kind() == io::ErrorKind::AddrInUse {
                VsockError::SocketExists(uds_path.clone())
            } else {
                VsockError::Listen {
                    path: uds_path.clone(),
                    source,
                }
            }
        })?;
        // From here on the socket file is ours: dropping `muxer` on an error removes it.
        let muxer = Self {
            guest_cid,
            uds_path,
            listener,
            epoll,
            endpoints: HashMap::from([(LISTENER_TOKEN, Endpoint::Listener)]),
            next_token: LISTENER_TOKEN + 1,
            awaiting: VecDeque::new(),
            connections: HashMap::new(),
            ready: VecDeque::new(),
            rsts: VecDeque::new(),
            host_ports: HashSet::new(),
            next_host_port: FIRST_HOST_PORT,
            opened: 0,
        };
        muxer
            .listener
            .set_nonblocking(true)
            .map_err(|source| VsockError::Listen {
                path: muxer.uds_path.clone(),
                source,
            })?;
        muxer
            .epoll
            .ctl(
                ControlOperation::Add,
                muxer.listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(muxer)
    }

    /// The descriptor that becomes readable when any host socket is ready.
    pub(super) fn host_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Whether the device may take another transmit chain: its packet may need an RST queued.
    pub(super) fn accepts_guest_packets(&self) -> bool {
        self.rsts.len() < RST_QUEUE_LEN
    }

    /// Whether [`Muxer::next_packet`] may have something.
    pub(super) fn has_packet_for_guest(&self) -> bool {
        !self.rsts.is_empty() || !self.ready.is_empty()
    }

    /// Handles everything the host sockets have to report, until epoll has nothing more: the
    /// set is edge-triggered, and so is the device's watch on it.
    pub(super) fn handle_host_events(&mut self) {
        self.expire_awaiting(Instant::now());
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        loop {
            let count = match self.epoll.wait(0, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("vsock: cannot wait for host sockets: {e}");
                    return;
                }
            };
            if count == 0 {
                return;
            }
            // Not done after a short batch: a stream accepted in it may already be readable,
            // and epoll reports that only to the next wait.
            for event in &events[..count] {
                self.on_host_event(event.data(), event.event_set());
            }
        }
    }

    fn on_host_event(&mut self, token: u64, events: EventSet) {
        match self.endpoints.get(&token) {
            // Gone since epoll reported it.
            None => {}
            Some(Endpoint::Listener) => self.accept(),
            Some(Endpoint::Awaiting { .. }) => self.read_connect_line(token),
            Some(&Endpoint::Connection(key)) => {
                if let Some(live) = self.connections.get_mut(&key) {
                    live.connection.on_host_event(events);
                }
                self.update(key);
            }
        }
    }

    /// Takes every host program waiting at the listener.
    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors, say: the program waits in the backlog until the next
                    // one connects.
                    log::warn!("vsock: cannot accept a connection: {e}");
                    return;
                }
            };
            if self.awaiting.len() >= MAX_AWAITING || self.stream_count() >= MAX_CONNECTIONS {
                // A program that has not sent its line yet is the one to go: otherwise enough
                // idle ones would lock every other out. Real ones send it at once.
                if let Some((token, _)) = self.awaiting.pop_front() {
                    log::debug!("vsock: too many streams; closing the oldest without CONNECT");
                    self.endpoints.remove(&token);
                } else {
                    log::debug!("vsock: {MAX_CONNECTIONS} connections already; closing a new one");
                    continue;
                }
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("vsock: cannot make an accepted stream non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            let endpoint = Endpoint::Awaiting {
                stream,
                line: Vec::with_capacity(MAX_CONNECT_LINE),
            };
            if let Some(token) = self.register(fd, EventSet::IN | EventSet::READ_HANG_UP, endpoint)
            {
                self.awaiting.push_back((token, Instant::now()));
            }
        }
    }

    /// Adds `fd` to the epoll set for `events` (edge-triggered) as `endpoint`; None (and the
    /// endpoint dropped) if epoll refuses it.
    fn register(&mut self, fd: RawFd, events: EventSet, endpoint: Endpoint) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        // Readiness that came before this call is reported too: no edge is lost.
        let event = EpollEvent::new(events | EventSet::EDGE_TRIGGERED, token);
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, event) {
            log::warn!("vsock: cannot watch a host stream: {e}");
            return None;
        }
        self.endpoints.insert(token, endpoint);
        Some(token)
    }

    /// Reads what has come of a CONNECT line; once it is whole, asks the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(Endpoint::Awaiting { stream, line }) = self.endpoints.get_mut(&token) else {
            return;
        };
        // Byte by byte: what follows the line is the connection's data, for the guest.
        let outcome = loop {
            let mut byte = [0u8];
            match stream.read(&mut byte) {
                Ok(0) => break Err("closed before the end of its CONNECT line".to_string()),
                Ok(_) if byte[0] == b'\n' => break parse_connect(line),
                Ok(_) if line.len() >= MAX_CONNECT_LINE => {
                    break Err(format!("no CONNECT line in {MAX_CONNECT_LINE} bytes"))
                }
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => break Err(e.to_string()),
            }
        };
        let Some(Endpoint::Awaiting { stream, .. }) = self.endpoints.remove(&token) else {
            return;
        };
        // At most MAX_AWAITING to look at.
        if let Some(at) = self.awaiting.iter().position(|&(t, _)| t == token) {
            self.awaiting.remove(at);
        }
        match outcome {
            Ok(peer_port) => self.connect_guest(token, stream, peer_port),
            // Closing the stream tells the program; the descriptor leaves epoll with it.
            Err(why) => log::debug!("vsock: host connection refused: {why}"),
        }
    }

    /// A host program asked for guest port `peer_port` over `stream` (epoll token `token`).
    fn connect_guest(&mut self, token: u64, stream: UnixStream, peer_port: u32) {
        let Some(local_port) = self.allocate_host_port(peer_port) else {
            log::warn!("vsock: no host port free for a connection to guest port {peer_port}");
            return;
        };
        // From now on guest data may be written to the stream: watch for room too.
        let event = EpollEvent::new(
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED,
            token,
        );
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Modify, stream.as_raw_fd(), event)
        {
            log::warn!("vsock: cannot watch a host stream: {e}");
            self.host_ports.remove(&local_port);
            return;
        }
        let key = ConnKey {
            local_port,
            peer_port,
        };
        self.endpoints.insert(token, Endpoint::Connection(key));
        let connection = Connection::host_initiated(stream, self.guest_cid, local_port, peer_port);
        self.opened += 1;
        self.connections.insert(
            key,
            Live {
                token,
                host_initiated: true,
                connection,
            },
        );
        self.update(key);
    }

    /// A free host port for a connection to guest port `peer_port`: the next from 2^30 up,
    /// wrapping, that no host-initiated connection holds and no guest connection uses with
    /// `peer_port`.
    fn allocate_host_port(&mut self, peer_port: u32) -> Option<u32> {
        // Each connection blocks at most one port: among MAX_CONNECTIONS + 1 one is free.
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            let key = ConnKey {
                local_port: port,
                peer_port,
            };
            if !self.host_ports.contains(&port) && !self.connections.contains_key(&key) {
                self.host_ports.insert(port);
                return Some(port);
            }
        }
        None
    }

    /// Closes the streams that have not sent their CONNECT line within [`CONNECT_DEADLINE`].
    fn expire_awaiting(&mut self, now: Instant) {
        while let Some(&(token, since)) = self.awaiting.front() {
            if now.saturating_duration_since(since) < CONNECT_DEADLINE {
                return;
            }
            log::debug!("vsock: no CONNECT line within {CONNECT_DEADLINE:?}; closing the stream");
            self.awaiting.pop_front();
            // Closing the stream tells the program; the descriptor leaves epoll with it.
            self.endpoints.remove(&token);
        }
    }

    fn stream_count(&self) -> usize {
        self.connections.len() + self.awaiting.len()
    }

    /// A packet from the guest (checked by `packet.rs`); `payload` is its data.
    pub(super) fn on_guest_packet(&mut self, packet: &TxPacket, payload: &[u8]) {
        let header = &packet.header;
        let key = ConnKey {
            local_port: header.dst_port,
            peer_port: header.src_port,
        };
        if let Some(live) = self.connections.get_mut(&key) {
            live.connection.on_guest_packet(packet, payload);
            self.update(key);
            return;
        }
        match packet.op {
            Op::Request => self.connect_host(header),
            // An RST is never answered, or two confused ends could trade them forever.
            Op::Rst => {}
            _ => self.queue_rst(header),
        }
    }

    /// The guest connects to host port `request.dst_port`: ember connects to `PATH_<port>`.
    fn connect_host(&mut self, request: &VsockHeader) {
        if self.stream_count() >= MAX_CONNECTIONS {
            log::debug!("vsock: {MAX_CONNECTIONS} connections already; refusing the guest's");
            self.queue_rst(request);
            return;
        }
        let path = port_path(&self.uds_path, request.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("vsock: guest connection to {}: {e}", path.display());
                self.queue_rst(request);
                return;
            }
        };
        let key = ConnKey {
            local_port: request.dst_port,
            peer_port: request.src_port,
        };
        let events = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP;
        let Some(token) = self.register(stream.as_raw_fd(), events, Endpoint::Connection(key))
        else {
            self.queue_rst(request);
            return;
        };
        let connection = Connection::guest_initiated(stream, request);
        self.opened += 1;
        self.connections.insert(
            key,
            Live {
                token,
                host_initiated: false,
                connection,
            },
        );
        self.update(key);
    }

    /// Answers `to` (from the guest, matching no connection) with an RST, if there is room.
    fn queue_rst(&mut self, to: &VsockHeader) {
        if self.rsts.len() >= RST_QUEUE_LEN {
            // The device stops taking transmit chains before this can happen.
            log::debug!("vsock: RST queue full; dropping one");
            return;
        }
        self.rsts.push_back(VsockHeader {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            kind: TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// After anything happened to connection `key`: forgets it if it is over, or queues it for
    /// the guest if it has something to send.
    fn update(&mut self, key: ConnKey) {
        let Some(live) = self.connections.get_mut(&key) else {
            return;
        };
        if live.connection.is_closed() {
            self.remove(key);
        } else if !live.connection.scheduled && live.connection.has_packet_for_guest() {
            live.connection.scheduled = true;
            self.ready.push_back(key);
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(live) = self.connections.remove(&key) {
            if live.connection.scheduled {
                // Its place in line goes with it: otherwise a guest that takes no packets and
                // keeps opening and resetting connections grows the queue without end, and a
                // later connection with the same key would be in line twice. The queue holds
                // at most one key per connection, so the search is bounded.
                if let Some(at) = self.ready.iter().position(|&queued| queued == key) {
                    self.ready.remove(at);
                }
            }
            // Its stream, if still open, closes here and leaves the epoll set with it.
            self.endpoints.remove(&live.token);
            if live.host_initiated {
                self.host_ports.remove(&key.local_port);
            }
        }
    }

    /// The next packet for the guest, its payload (if any) read into `payload`, which holds as
    /// much as the receive buffer at hand; None when nothing can be sent now.
    pub(super) fn next_packet(&mut self, payload: &mut [u8]) -> Option<(VsockHeader, usize)> {
        if let Some(rst) = self.rsts.pop_front() {
            return Some((rst, 0));
        }
        // One turn over the queue at most: a connection with work it cannot do into this
        // buffer (host data, and a buffer with no room past the header) goes back in line, and
        // would otherwise come round again forever.
        for _ in 0..self.ready.len() {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(live) = self.connections.get_mut(&key) else {
                continue;
            };
            live.connection.scheduled = false;
            let packet = live.connection.next_packet(payload);
            // Back in line, behind the others, if it has more.
            self.update(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// Device reset: the guest's sockets are gone, and so are the connections. Host programs
    /// still sending their CONNECT line stay: the guest has not heard of them.
    pub(super) fn reset(&mut self) {
        for (_, live) in self.connections.drain() {
            self.endpoints.remove(&live.token);
        }
        self.ready.clear();
        self.rsts.clear();
        self.host_ports.clear();
    }

    /// How many RSTs wait for the guest.
    #[cfg(test)]
    pub(super) fn queued_rsts(&self) -> usize {
        self.rsts.len()
    }

    /// How many connections wait to send to the guest.
    #[cfg(test)]
    pub(super) fn queued_connections(&self) -> usize {
        self.ready.len()
    }

    /// How many connections there are.
    #[cfg(test)]
    pub(super) fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Guest bytes waiting for host streams, for the connection that holds the most.
    #[cfg(test)]
    pub(super) fn most_buffered(&self) -> usize {
        self.connections
            .values()
            .map(|live| live.connection.buffered())
            .max()
            .unwrap_or(0)
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file outlives the listener; a later run could not bind it.
        if let Err(e) = std::fs::remove_file(&self.uds_path) {
            log::warn!("vsock: cannot remove {}: {e}", self.uds_path.display());
        }
    }
}

/// The guest port in a `CONNECT <port>` line (without its newline).
fn parse_connect(line: &[u8]) -> Result<u32, String> {
    let text = std::str::from_utf8(line).map_err(|_| "a CONNECT line that is not text")?;
    let port = text
        .trim_end_matches('\r')
        .strip_prefix("CONNECT ")
        .and_then(|port| port.trim().parse().ok());
    port.ok_or_else(|| format!("{text:?} is not `CONNECT <port>`"))
}

/// Where the host program for host port `port` listens: `PATH_<port>`.
pub(super) fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

/// Connects to the Unix stream socket at `path` without blocking: a listener whose backlog is
/// full fails at once (EAGAIN) rather than stall the device's thread. std's `connect` blocks.
fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data, for which all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    // The last byte stays NUL.
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not usable as a Unix socket path (too long, or a NUL byte)",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (to, from) in addr.sun_path.iter_mut().zip(bytes) {
        *to = *from as libc::c_char;
    }
    // SAFETY: a plain socket(2) call; the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un that outlives the call, and `len` (the path and its
    // NUL) is within its size.
    let ret = unsafe {
        libc::connect(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(socket))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::net::Shutdown;
    use std::time::Duration;

    use super::super::connection::BUF_ALLOC;
    use super::super::packet::{SHUTDOWN_BOTH, SHUTDOWN_SEND};
    use super::super::test_driver::*;
    use super::super::TX_QUEUE;
    use super::*;
    use crate::virtio::VirtioDevice;

    /// A host program connecting to guest port `port`.
    fn connect_host(driver: &Driver<'_>, port: u32) -> UnixStream {
        let mut stream = UnixStream::connect(driver.socket_path()).unwrap();
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    /// Reads one line, byte by byte, as a host program reads `OK <port>`.
    fn read_line(stream: &mut UnixStream) -> String {
        let mut line = Vec::new();
        let mut byte = [0];
        while line.last() != Some(&b'\n') {
            assert_eq!(stream.read(&mut byte).unwrap(), 1, "EOF after {line:?}");
            line.push(byte[0]);
        }
        String::from_utf8(line).unwrap()
    }

    /// What is left on `stream` until it is closed: EOF, or ECONNRESET when ember closed it
    /// with bytes unread.
    fn read_to_eof(stream: &mut UnixStream) -> Vec<u8> {
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("not closed: {e}"),
        }
        rest
    }

    /// The guest accepts the REQUEST a host program's CONNECT made.
    fn accept_in_guest(driver: &mut Driver<'_>, request: &VsockHeader) -> GuestSocket {
        assert_eq!(request.op, Op::Request as u16);
        assert!(request.src_port >= FIRST_HOST_PORT);
        let mut guest = GuestSocket::new(request.dst_port, request.src_port);
        guest.learn(request);
        let response = guest.header(Op::Response, 0);
        driver.send(&response, &[]);
        guest
    }

    /// A host program connects to guest port `port` and the guest accepts.
    fn open_from_host(driver: &mut Driver<'_>, port: u32) -> (UnixStream, GuestSocket) {
        let mut host = connect_host(driver, port);
        let packets = driver.pump();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0.dst_port, port);
        let guest = accept_in_guest(driver, &packets[0].0);
        assert_eq!(read_line(&mut host), format!("OK {}\n", guest.host_port));
        host.set_nonblocking(true).unwrap();
        (host, guest)
    }

    /// The guest connects to host port `port`, where `listener` waits.
    fn open_from_guest(
        driver: &mut Driver<'_>,
        listener: &UnixListener,
        guest_port: u32,
        port: u32,
    ) -> (UnixStream, GuestSocket) {
        let mut guest = GuestSocket::new(guest_port, port);
        let request = guest.header(Op::Request, 0);
        driver.send(&request, &[]);
        let packets = driver.received();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let (response, _) = &packets[0];
        assert_eq!(response.op, Op::Response as u16);
        guest.learn(response);
        assert_eq!(guest.credit(), BUF_ALLOC);
        let (host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        (host, guest)
    }

    /// The host program writes `data`; the guest reads it, giving credit back as it goes.
    fn host_to_guest(
        driver: &mut Driver<'_>,
        host: &mut UnixStream,
        guest: &mut GuestSocket,
        data: &[u8],
    ) {
        let (mut written, mut got) = (0, Vec::new());
        for _ in 0..100_000 {
            if got.len() >= data.len() {
                break;
            }
            if written < data.len() {
                match host.write(&data[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            for (header, payload) in driver.pump() {
                guest.learn(&header);
                assert!(header.len <= guest.buf_alloc);
                match Op::from_test(header.op) {
                    Op::Rw => got.extend(payload),
                    Op::CreditRequest => {
                        let update = guest.header(Op::CreditUpdate, 0);
                        driver.send(&update, &[]);
                    }
                    op => panic!("{op:?} while receiving"),
                }
            }
            // Like Linux, the guest gives credit back once it has consumed a good part.
            if guest.fwd_cnt.wrapping_sub(guest.fwd_cnt_told) >= 64 * 1024 {
                let update = guest.header(Op::CreditUpdate, 0);
                driver.send(&update, &[]);
            }
        }
        assert_eq!(got.len(), data.len());
        assert!(got == data, "host to guest data differs");
    }

    /// The guest sends `data` within its credit; the host program reads it.
    fn guest_to_host(
        driver: &mut Driver<'_>,
        host: &mut UnixStream,
        guest: &mut GuestSocket,
        data: &[u8],
    ) {
        let (mut sent, mut got) = (0, Vec::new());
        let mut buf = vec![0; 64 * 1024];
        for _ in 0..100_000 {
            if got.len() >= data.len() {
                break;
            }
            let credit = guest.credit() as usize;
            if sent < data.len() && credit > 0 {
                let len = credit.min(32 * 1024).min(data.len() - sent);
                let header = guest.header(Op::Rw, len as u32);
                driver.send(&header, &data[sent..sent + len]);
                sent += len;
            }
            match host.read(&mut buf) {
                Ok(0) => panic!("EOF after {} bytes", got.len()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            for (header, _) in driver.pump() {
                guest.learn(&header);
                assert_eq!(header.op, Op::CreditUpdate as u16);
            }
        }
        assert_eq!(got.len(), data.len());
        assert!(got == data, "guest to host data differs");
    }

    impl Op {
        fn from_test(op: u16) -> Op {
            Op::from_wire(op).unwrap()
        }
    }

    #[test]
    fn a_host_program_connects_and_data_flows_both_ways() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(64);
        let (mut host, mut guest) = open_from_host(&mut driver, 52);
        host_to_guest(&mut driver, &mut host, &mut guest, &pattern(300 * 1024, 1));
        guest_to_host(&mut driver, &mut host, &mut guest, &pattern(300 * 1024, 2));
        // Once more, now that the counters are past a few credit windows.
        host_to_guest(&mut driver, &mut host, &mut guest, &pattern(200 * 1024, 3));

        // The host program closes its writing half: the guest hears SHUTDOWN(SEND).
        host.shutdown(Shutdown::Write).unwrap();
        let packets = driver.pump();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0.op, Op::Shutdown as u16);
        assert_eq!(packets[0].0.flags, SHUTDOWN_SEND);
        // The guest can still answer, then closes: RST ends it, the host program reads EOF.
        guest_to_host(&mut driver, &mut host, &mut guest, b"last words");
        let mut shutdown = guest.header(Op::Shutdown, 0);
        shutdown.flags = SHUTDOWN_BOTH;
        driver.send(&shutdown, &[]);
        let packets = driver.received();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0.op, Op::Rst as u16);
        assert!(read_to_eof(&mut host).is_empty());
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
    }

    #[test]
    fn a_guest_port_nobody_listens_on_closes_the_host_stream() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(8);
        let mut host = connect_host(&driver, 99);
        let packets = driver.pump();
        let (request, _) = &packets[0];
        assert_eq!(request.op, Op::Request as u16);
        // The guest's answer to a port without a listener.
        let rst = header(Op::Rst, 99, request.src_port, 0, 0, 0);
        driver.send(&rst, &[]);
        assert!(read_to_eof(&mut host).is_empty(), "no OK line");
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
        assert!(driver.received().is_empty(), "an RST is not answered");
    }

    #[test]
    fn a_guest_request_with_nobody_at_the_host_port_gets_rst() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(8);
        let mut guest = GuestSocket::new(1000, 5000);
        let request = guest.header(Op::Request, 0);
        driver.send(&request, &[]);
        let packets = driver.received();
        assert_eq!(packets.len(), 1);
        let (rst, _) = &packets[0];
        assert_eq!(rst.op, Op::Rst as u16);
        assert_eq!((rst.src_port, rst.dst_port), (5000, 1000));
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
        // A socket file nobody listens on refuses too.
        let path = port_path(&driver.socket_path(), 5001);
        drop(UnixListener::bind(&path).unwrap());
        let mut guest = GuestSocket::new(1001, 5001);
        let request = guest.header(Op::Request, 0);
        driver.send(&request, &[]);
        assert_eq!(driver.received()[0].0.op, Op::Rst as u16);
    }

    #[test]
    fn the_guest_connects_to_a_host_listener() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(64);
        let listener = UnixListener::bind(port_path(&driver.socket_path(), 5000)).unwrap();
        let (mut host, mut guest) = open_from_guest(&mut driver, &listener, 1000, 5000);
        guest_to_host(&mut driver, &mut host, &mut guest, &pattern(150 * 1024, 4));
        host_to_guest(&mut driver, &mut host, &mut guest, &pattern(150 * 1024, 5));
        // The host program goes away entirely: SHUTDOWN of both directions, the guest resets.
        drop(host);
        let packets = driver.pump();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0.op, Op::Shutdown as u16);
        assert_eq!(packets[0].0.flags, SHUTDOWN_BOTH);
        let rst = guest.header(Op::Rst, 0);
        driver.send(&rst, &[]);
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
    }

    #[test]
    fn data_written_with_the_connect_line_reaches_the_guest() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(8);
        let mut host = UnixStream::connect(driver.socket_path()).unwrap();
        host.write_all(b"CONNECT 7\r\nearly bird").unwrap();
        let packets = driver.pump();
        let mut guest = accept_in_guest(&mut driver, &packets[0].0);
        let packets = driver.received();
        assert_eq!(packets.len(), 1, "{packets:?}");
        guest.learn(&packets[0].0);
        assert_eq!(packets[0].1, b"early bird");
    }

    #[test]
    fn a_host_program_that_closes_before_the_response_still_delivers_its_data() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(64);
        // The program says all it has to say, and goes, before the guest has even answered:
        // there is nobody to read `OK <port>` any more.
        let data = pattern(10 * 1024, 7);
        let mut host = UnixStream::connect(driver.socket_path()).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        host.write_all(&data).unwrap();
        drop(host);
        let packets = driver.pump();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let mut guest = accept_in_guest(&mut driver, &packets[0].0);
        let mut packets = driver.received();
        for _ in 0..10 {
            packets.extend(driver.pump());
        }
        let mut got = Vec::new();
        let mut shutdowns = Vec::new();
        for (header, payload) in packets {
            guest.learn(&header);
            match Op::from_test(header.op) {
                Op::Rw => {
                    assert!(shutdowns.is_empty(), "data after SHUTDOWN");
                    got.extend(payload);
                }
                Op::Shutdown => shutdowns.push(header.flags),
                op => panic!("{op:?} instead of the data and a SHUTDOWN"),
            }
        }
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the data arrived intact");
        assert_eq!(shutdowns, [SHUTDOWN_BOTH]);
        // The guest closes its end: nothing is left.
        let rst = guest.header(Op::Rst, 0);
        driver.send(&rst, &[]);
        assert!(driver.received().is_empty());
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
    }

    #[test]
    fn bad_connect_lines_close_the_stream() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(8);
        let long = [b'7'; 40];
        let lines: [&[u8]; 5] = [
            b"HELLO 52\n",
            b"CONNECT 4294967296\n",
            b"CONNECT -1\n",
            b"CONNECT \xff\n",
            &long,
        ];
        for line in lines {
            let mut host = UnixStream::connect(driver.socket_path()).unwrap();
            host.write_all(line).unwrap();
            assert!(driver.pump().is_empty());
            assert!(read_to_eof(&mut host).is_empty(), "{line:?}");
        }
        // A program that goes away mid-line costs nothing either.
        let mut host = UnixStream::connect(driver.socket_path()).unwrap();
        host.write_all(b"CONN").unwrap();
        assert!(driver.pump().is_empty());
        drop(host);
        assert!(driver.pump().is_empty());
        assert!(driver.vsock.muxer.awaiting.is_empty());
        assert_eq!(driver.vsock.muxer.endpoints.len(), 1, "only the listener");
    }

    #[test]
    fn a_request_flood_waits_in_the_guest_ring() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        let mut pushed = 0u32;
        let push = |driver: &mut Driver<'_>, pushed: &mut u32| {
            // REQUESTs to a port with no listener and RWs for connections that do not exist.
            let op = if pushed.is_multiple_of(2) {
                Op::Request
            } else {
                Op::Rw
            };
            let flood = header(op, 10_000 + *pushed, 7, 0, 4096, 0);
            driver.queue_tx(&flood, &[]);
            *pushed += 1;
        };
        // No receive buffers: the device takes chains until its RST queue is full, then leaves
        // the rest in the ring.
        loop {
            let before = driver.used_idx(TX_QUEUE);
            while driver.tx_outstanding() < QUEUE_SIZE {
                push(&mut driver, &mut pushed);
            }
            driver.vsock.process_queue(TX_QUEUE).unwrap();
            assert!(driver.vsock.muxer.queued_rsts() <= RST_QUEUE_LEN);
            if driver.used_idx(TX_QUEUE) == before {
                break;
            }
        }
        assert_eq!(driver.vsock.muxer.queued_rsts(), RST_QUEUE_LEN);
        assert_eq!(driver.tx_outstanding(), QUEUE_SIZE);
        assert_eq!(pushed, RST_QUEUE_LEN as u32 + u32::from(QUEUE_SIZE));
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
        driver.vsock.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.tx_outstanding(), QUEUE_SIZE);

        // The guest posts buffers and takes its answers: the flood goes on, to 100 000 packets,
        // with the device's queue never longer.
        driver.post_rx(128);
        let mut rsts = 0;
        while pushed < 100_000
            || driver.tx_outstanding() > 0
            || driver.vsock.muxer.queued_rsts() > 0
        {
            while pushed < 100_000 && driver.tx_outstanding() < QUEUE_SIZE {
                push(&mut driver, &mut pushed);
            }
            driver.vsock.process_queue(TX_QUEUE).unwrap();
            let mut answers = driver.received();
            answers.extend(driver.kick_rx());
            for (answer, _) in answers {
                assert_eq!(answer.op, Op::Rst as u16);
                assert_eq!(answer.dst_port, 10_000 + rsts);
                rsts += 1;
            }
            assert!(driver.vsock.muxer.queued_rsts() <= RST_QUEUE_LEN);
            assert_eq!(driver.vsock.muxer.connection_count(), 0);
        }
        assert_eq!(rsts, 100_000);
        assert_eq!(driver.vsock.muxer.queued_rsts(), 0);
    }

    /// Lets this process hold the thousands of descriptors a test needs.
    fn raise_descriptor_limit(wanted: u64) {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(got, 0);
        if limit.rlim_cur < wanted {
            limit.rlim_cur = wanted.min(limit.rlim_max);
            // SAFETY: setrlimit only reads the struct it is given.
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        }
    }

    #[test]
    fn a_thousand_connections_at_once() {
        const COUNT: u32 = 1000;
        raise_descriptor_limit(4 * u64::from(COUNT) + 256);
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(256);
        let mut hosts = Vec::new();
        let mut guests: HashMap<u32, GuestSocket> = HashMap::new();
        for batch in 0..COUNT / 50 {
            // In batches, so that the listener's backlog never fills.
            for i in 0..50 {
                hosts.push(connect_host(&driver, 2000 + batch * 50 + i));
            }
            for _ in 0..100 {
                for (request, _) in driver.pump() {
                    let guest = accept_in_guest(&mut driver, &request);
                    assert!(guests.insert(request.dst_port, guest).is_none());
                }
                if guests.len() == hosts.len() {
                    break;
                }
            }
        }
        assert_eq!(guests.len(), COUNT as usize);
        assert_eq!(driver.vsock.muxer.connection_count(), COUNT as usize);
        // Every program got its own host port, and every connection carries its own data.
        for (i, host) in hosts.iter_mut().enumerate() {
            let guest = &guests[&(2000 + i as u32)];
            assert_eq!(read_line(host), format!("OK {}\n", guest.host_port));
            host.write_all(&(i as u32).to_le_bytes()).unwrap();
        }
        let mut delivered = 0;
        for _ in 0..1000 {
            for (packet, payload) in driver.pump() {
                let guest = guests.get_mut(&packet.dst_port).unwrap();
                guest.learn(&packet);
                assert_eq!(packet.op, Op::Rw as u16);
                assert_eq!(payload, (guest.port - 2000).to_le_bytes());
                delivered += 1;
            }
            if delivered == COUNT {
                break;
            }
        }
        assert_eq!(delivered, COUNT);
        assert_eq!(driver.vsock.muxer.queued_connections(), 0);
    }

    #[test]
    fn idle_host_peers_do_not_lock_out_a_connect() {
        let count = MAX_CONNECTIONS as u32;
        raise_descriptor_limit(4 * u64::from(count) + 256);
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(8);
        // As many local programs as there may be streams connect and never say a word.
        let mut idle = Vec::new();
        for _ in 0..count / 64 {
            // In batches, so that the listener's backlog never fills.
            for _ in 0..64 {
                idle.push(UnixStream::connect(driver.socket_path()).unwrap());
            }
            assert!(driver.pump().is_empty());
            assert!(driver.vsock.muxer.awaiting.len() <= MAX_AWAITING);
        }
        // A real program still gets through to the guest.
        let mut host = connect_host(&driver, 52);
        let packets = driver.pump();
        assert_eq!(packets.len(), 1, "{packets:?}");
        let guest = accept_in_guest(&mut driver, &packets[0].0);
        assert_eq!(read_line(&mut host), format!("OK {}\n", guest.host_port));
        assert_eq!(driver.vsock.muxer.connection_count(), 1);
        // The oldest idle ones made room: they were closed, at most the newest still wait
        // (fewer on a machine so slow that the deadline passed meanwhile).
        assert!(driver.vsock.muxer.awaiting.len() < MAX_AWAITING);
        let closed = idle.len() - (MAX_AWAITING - 1);
        for stream in &mut idle[..closed] {
            assert!(read_to_eof(stream).is_empty());
        }
        assert!(driver.vsock.muxer.endpoints.len() <= 1 + MAX_AWAITING);
    }

    #[test]
    fn host_peers_without_a_connect_line_by_the_deadline_are_closed() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(8);
        let mut silent: Vec<_> = (0..10)
            .map(|_| UnixStream::connect(driver.socket_path()).unwrap())
            .collect();
        // One says half its line and stops.
        silent[0].write_all(b"CONN").unwrap();
        assert!(driver.pump().is_empty());
        assert_eq!(driver.vsock.muxer.awaiting.len(), 10);
        // Not yet late: the next event closes nothing.
        assert!(driver.pump().is_empty());
        assert_eq!(driver.vsock.muxer.awaiting.len(), 10);
        // Time passes.
        let late = CONNECT_DEADLINE + Duration::from_secs(1);
        for (_, since) in &mut driver.vsock.muxer.awaiting {
            *since = since.checked_sub(late).unwrap();
        }
        // The next host event, a real program connecting, closes them; the newcomer is served.
        let mut host = connect_host(&driver, 52);
        let packets = driver.pump();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0.op, Op::Request as u16);
        for stream in &mut silent {
            assert!(read_to_eof(stream).is_empty());
        }
        assert!(driver.vsock.muxer.awaiting.is_empty());
        assert_eq!(
            driver.vsock.muxer.endpoints.len(),
            2,
            "the listener and the connection"
        );
        let guest = accept_in_guest(&mut driver, &packets[0].0);
        assert_eq!(read_line(&mut host), format!("OK {}\n", guest.host_port));
    }

    #[test]
    fn a_slow_host_reader_stops_the_guest_not_memory() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(64);
        let listener = UnixListener::bind(port_path(&driver.socket_path(), 6000)).unwrap();
        let (mut host, mut guest) = open_from_guest(&mut driver, &listener, 1000, 6000);
        // The host program reads nothing; the guest sends while its credit lasts.
        let mut expected = Vec::new();
        for round in 0..1000u32 {
            let credit = guest.credit() as usize;
            if credit == 0 {
                break;
            }
            let chunk = pattern(credit.min(32 * 1024), round);
            let header = guest.header(Op::Rw, chunk.len() as u32);
            driver.send(&header, &chunk);
            expected.extend(chunk);
            for (packet, _) in driver.pump() {
                guest.learn(&packet);
            }
            assert!(driver.vsock.muxer.most_buffered() <= BUF_ALLOC as usize);
            assert_eq!(driver.vsock.muxer.connection_count(), 1, "no RST");
        }
        assert_eq!(guest.credit(), 0, "the credit ran out");
        // The kernel's socket buffer is full, and ember holds exactly what it advertised.
        assert_eq!(driver.vsock.muxer.most_buffered(), BUF_ALLOC as usize);
        // More kicks, more host events: nothing changes until the program reads.
        for _ in 0..10 {
            assert!(driver.pump().is_empty());
        }
        let mut got = Vec::new();
        let mut buf = vec![0; 64 * 1024];
        for _ in 0..100_000 {
            if got.len() >= expected.len() {
                break;
            }
            match host.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            for (packet, _) in driver.pump() {
                guest.learn(&packet);
            }
        }
        assert!(got == expected, "the data arrived intact");
        assert_eq!(driver.vsock.muxer.most_buffered(), 0);
        assert_eq!(guest.credit(), BUF_ALLOC, "all the credit came back");
    }

    #[test]
    fn closed_connections_leave_the_ready_queue() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        let listener = UnixListener::bind(port_path(&driver.socket_path(), 6002)).unwrap();
        listener.set_nonblocking(true).unwrap();
        // A guest that posts no receive buffers: every RESPONSE it is owed waits in the queue.
        // It resets each connection before taking the answer, and opens the next.
        for i in 0..20_000u32 {
            let mut guest = GuestSocket::new(10_000 + i % 3, 6002);
            let request = guest.header(Op::Request, 0);
            driver.send(&request, &[]);
            assert_eq!(driver.vsock.muxer.connection_count(), 1);
            // The host program takes the stream, so the listener's backlog never fills.
            drop(listener.accept().unwrap());
            let rst = guest.header(Op::Rst, 0);
            driver.send(&rst, &[]);
            assert_eq!(driver.vsock.muxer.connection_count(), 0);
            assert!(
                driver.vsock.muxer.queued_connections() <= driver.vsock.muxer.connection_count(),
                "{} queued after {} cycles",
                driver.vsock.muxer.queued_connections(),
                i + 1
            );
        }
        assert!(!driver.vsock.muxer.has_packet_for_guest());
        // The queue still works: a live connection gets its RESPONSE once buffers come.
        let mut guest = GuestSocket::new(9000, 6002);
        let request = guest.header(Op::Request, 0);
        driver.send(&request, &[]);
        assert_eq!(driver.vsock.muxer.queued_connections(), 1);
        driver.post_rx(4);
        let packets = driver.kick_rx();
        assert_eq!(packets.len(), 1, "{packets:?}");
        assert_eq!(packets[0].0.op, Op::Response as u16);
        assert_eq!(packets[0].0.dst_port, 9000);
        assert_eq!(driver.vsock.muxer.queued_connections(), 0);
    }

    #[test]
    fn guest_data_beyond_the_credit_resets_the_connection() {
        let mem = memory();
        let mut driver = Driver::new(&mem);
        driver.post_rx(64);
        let listener = UnixListener::bind(port_path(&driver.socket_path(), 6001)).unwrap();
        let (mut host, mut guest) = open_from_guest(&mut driver, &listener, 1000, 6001);
        // A guest that ignores its credit, with a host program that reads nothing.
        let chunk = vec![0x5a; 64 * 1024];
        let mut reset = false;
        for _ in 0..100 {
            let header = guest.header(Op::Rw, chunk.len() as u32);
            driver.send(&header, &chunk);
            assert!(driver.vsock.muxer.most_buffered() <= BUF_ALLOC as usize);
            if driver
                .received()
                .iter()
                .any(|(p, _)| p.op == Op::Rst as u16)
            {
                reset = true;
                break;
            }
        }
        assert!(reset);
        assert_eq!(driver.vsock.muxer.connection_count(), 0);
        let rest = read_to_eof(&mut host);
        assert!(rest.iter().all(|&b| b == 0x5a));
    }
}
