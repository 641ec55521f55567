//! virtio-fs (virtio 1.2, 5.11): a host directory shared with the guest, served by virtiofsd
//! over vhost-user.
//!
//! The guest's FUSE requests never pass through ember: virtiofsd maps guest memory itself and
//! walks the rings. This device only
//! - presents the configuration space (the tag the guest mounts by, one request queue);
//! - on DRIVER_OK, tells virtiofsd (over the vhost-user socket, with rust-vmm's `vhost` crate)
//!   the features, the guest memory (each region's file descriptor: guest RAM must be a shared
//!   file mapping, a memfd) and where each ring is;
//! - relays notifications both ways: a guest QueueNotify reaches this device's thread through the
//!   transport's ioeventfd, and [`Fs`] writes the queue's kick eventfd, which virtiofsd polls; when
//!   virtiofsd uses buffers it writes the queue's call eventfd. Where KVM allows, the VMM makes
//!   the call eventfds KVM irqfds ([`Fs::call_eventfds_for_irqfd`]) routed to the device's
//!   IOAPIC pin, so virtiofsd interrupts the guest without ember; otherwise the device thread
//!   watches them ([`VirtioDevice::host_event_fds`]) and raises the guest's interrupt.
//!
//! The kick relay costs one hop through the device thread. Giving virtiofsd the transport's own
//! queue eventfds would save it, but those are also the device thread's wake-ups: two readers
//! would race for one counter. That needs a transport that does not poll a vhost-user device's
//! queues, which can come later.
//!
//! The guest's only inputs here are the ring addresses and sizes, checked against guest memory
//! before they go to virtiofsd. A virtiofsd that dies (its socket closes, a request fails or is
//! refused) makes the device [`DeviceBroken`]; ember never panics for it. A virtiofsd that hangs
//! without closing its socket blocks the caller of the request it does not answer.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    DeviceBroken, Interrupt, Progress, Queue, QueueT, VirtioDevice, VirtioDeviceState,
    VirtioDeviceStateError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

#[cfg(test)]
mod test_backend;
#[cfg(test)]
mod tests;

/// The virtio device ID of a file system device (virtio 1.2, 5).
pub(crate) const DEVICE_TYPE_FS: u32 = 26;
/// The longest tag: `u8 tag[36]` in the configuration space (virtio 1.2, 5.11.4).
pub const MAX_TAG_LEN: usize = 36;
/// Queue 0 is the high-priority queue (FUSE_INTERRUPT, FUSE_FORGET), 1 the only request queue.
const NUM_QUEUES: usize = 2;
/// FUSE requests carry up to a megabyte or so of pages each: bigger rings keep more in flight.
/// virtiofsd takes up to 32768.
const QUEUE_MAX_SIZES: [u16; NUM_QUEUES] = [1024; NUM_QUEUES];
/// VIRTIO_RING_F_INDIRECT_DESC (feature bit 28): virtiofsd walks indirect tables itself.
const VIRTIO_RING_F_INDIRECT_DESC: u32 = 28;
/// What the guest may be offered, of what virtiofsd supports: the ring features, which virtiofsd
/// implements and this device only passes on. Not VIRTIO_FS_F_NOTIFICATION (bit 0): there is no
/// notification queue; nor the vhost-user bits (PROTOCOL_FEATURES, LOG_ALL), which are between
/// ember and virtiofsd.
const GUEST_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);
/// The vhost-user protocol features ember uses, when virtiofsd has them:
/// - REPLY_ACK: virtiofsd answers every request, so one it refuses fails right there;
/// - MQ: virtiofsd says how many queues it has (two are needed);
/// - RESET_DEVICE: a guest reset also drops virtiofsd's FUSE state (open files, inodes).
///
/// Not CONFIG (ember presents the configuration space), BACKEND_REQ (DAX mappings: there is no
/// shared memory window), LOG_SHMFD or DEVICE_STATE (migration and snapshots are not supported).
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::RESET_DEVICE
}
/// How long [`Fs::new`] waits for virtiofsd's socket to appear and accept.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_RETRY: Duration = Duration::from_millis(20);
/// Index of the vhost-user socket in [`VirtioDevice::host_event_fds`], before the call eventfds
/// (which are there only when the device thread relays them).
const SOCKET_EVENT: usize = 0;

/// How to build a virtio-fs device (one `--volume`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsDeviceConfig {
    /// The tag the guest mounts by (`mount -t virtiofs TAG DIR`): 1 to 36 bytes of UTF-8, no NUL.
    pub tag: String,
    /// The vhost-user socket virtiofsd listens on (its `--socket-path`).
    pub socket: PathBuf,
}

/// Why a virtio-fs device cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty (the guest driver refuses such a device).
    #[error("the virtio-fs tag is empty")]
    EmptyTag,
    /// The tag does not fit the configuration space.
    #[error("the virtio-fs tag {tag:?} is {len} bytes long; at most {MAX_TAG_LEN} fit")]
    TagTooLong {
        /// The tag.
        tag: String,
        /// Its length in bytes (UTF-8).
        len: usize,
    },
    /// The tag has a NUL byte, which would end it early in the guest.
    #[error("the virtio-fs tag {0:?} contains a NUL byte")]
    TagHasNul(String),
    /// virtiofsd's socket cannot be connected to.
    #[error("cannot connect to virtiofsd at {} (is it running?)", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The last failure.
        #[source]
        source: std::io::Error,
    },
    /// A vhost-user request failed while setting up the connection.
    #[error("vhost-user handshake with virtiofsd at {} failed: {what}", path.display())]
    Handshake {
        /// The socket path.
        path: PathBuf,
        /// The request.
        what: &'static str,
        /// What went wrong.
        #[source]
        source: vhost::Error,
    },
    /// The kick or call eventfds cannot be made.
    #[error("cannot create the virtio-fs eventfds")]
    EventFd(#[source] std::io::Error),
    /// The backend lacks something a virtio-fs device needs.
    #[error("virtiofsd at {} is unusable: {why}", path.display())]
    Backend {
        /// The socket path.
        path: PathBuf,
        /// What it lacks.
        why: String,
    },
}

/// A virtio-fs device whose queues virtiofsd serves.
pub struct Fs {
    tag: String,
    /// `struct virtio_fs_config` (virtio 1.2, 5.11.4): the tag, NUL-padded, then
    /// `le32 num_request_queues`.
    config_space: [u8; MAX_TAG_LEN + 4],
    socket: PathBuf,
    frontend: Frontend,
    /// Offered to the guest: [`GUEST_FEATURES`] that virtiofsd has.
    avail_features: u64,
    /// Whether virtiofsd has VHOST_USER_F_PROTOCOL_FEATURES: then rings start disabled and are
    /// enabled with SET_VRING_ENABLE.
    protocol_features: bool,
    /// The protocol features agreed on.
    acked_protocol_features: VhostUserProtocolFeatures,
    /// Written by this device when the guest notifies a queue; virtiofsd reads them.
    kick: [EventFd; NUM_QUEUES],
    /// Written by virtiofsd when it used buffers; KVM irqfds or the device thread watch them.
    call: [EventFd; NUM_QUEUES],
    /// The call eventfds are KVM irqfds: virtiofsd's interrupts reach the guest without ember.
    calls_through_irqfd: bool,
    /// Present between activation and reset.
    active: Option<Active>,
}

/// A ring the driver set up, as virtiofsd is told about it.
struct Ring {
    index: usize,
    config: VringConfigData,
    next_avail: u16,
}

/// What the driver handed over at DRIVER_OK.
struct Active {
    interrupt: Arc<Interrupt>,
    /// The queues handed to virtiofsd (the ones the driver made ready).
    started: Vec<usize>,
}

impl Fs {
    /// Checks the tag, connects to virtiofsd at `config.socket` (waiting a few seconds for it to
    /// listen) and agrees on the features.
    pub fn new(config: FsDeviceConfig) -> Result<Self, FsError> {
        Self::with_connect_timeout(config, CONNECT_TIMEOUT)
    }

    fn with_connect_timeout(config: FsDeviceConfig, timeout: Duration) -> Result<Self, FsError> {
        let config_space = config_space(&config.tag)?;
        let stream = connect(&config.socket, timeout)?;
        let handshake = |what| {
            let path = config.socket.clone();
            move |source| FsError::Handshake { path, what, source }
        };
        let mut frontend = Frontend::from_stream(stream, NUM_QUEUES as u64);
        frontend.set_owner().map_err(handshake("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(handshake("GET_FEATURES"))?;
        if backend_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(FsError::Backend {
                path: config.socket,
                why: format!(
                    "it does not offer VIRTIO_F_VERSION_1 (features {backend_features:#x})"
                ),
            });
        }
        let protocol_features =
            backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let mut acked_protocol_features = VhostUserProtocolFeatures::empty();
        if protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(handshake("GET_PROTOCOL_FEATURES"))?;
            acked_protocol_features = offered & wanted_protocol_features();
            frontend
                .set_protocol_features(acked_protocol_features)
                .map_err(handshake("SET_PROTOCOL_FEATURES"))?;
            if acked_protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // From now on every request waits for virtiofsd's verdict.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked_protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                let queues = frontend
                    .get_queue_num()
                    .map_err(handshake("GET_QUEUE_NUM"))?;
                if queues < NUM_QUEUES as u64 {
                    return Err(FsError::Backend {
                        path: config.socket,
                        why: format!("it has {queues} queues, virtio-fs needs {NUM_QUEUES}"),
                    });
                }
            }
        }
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(Self {
            tag: config.tag,
            config_space,
            socket: config.socket.clone(),
            frontend,
            avail_features: backend_features & GUEST_FEATURES,
            protocol_features,
            acked_protocol_features,
            kick: [eventfd()?, eventfd()?],
            call: [eventfd()?, eventfd()?],
            calls_through_irqfd: false,
            active: None,
        })
    }

    /// Hands the call eventfds over to the VMM, which makes them KVM irqfds routed to this
    /// device's interrupt pin: from then on the device thread no longer reads them (two readers
    /// would race for one counter) and the InterruptStatus register always reports used buffers,
    /// as it never sees those interrupts. Call before the device starts running.
    pub fn call_eventfds_for_irqfd(&mut self) -> std::io::Result<Vec<EventFd>> {
        let fds = self
            .call
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<_, _>>()?;
        self.calls_through_irqfd = true;
        Ok(fds)
    }

    /// The tag the guest mounts by.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// A vhost-user request failed: the device is broken until virtiofsd is back (it is not:
    /// ember does not restart it).
    fn broken(&self, what: &str, e: vhost::Error) -> DeviceBroken {
        DeviceBroken(format!(
            "virtio-fs {:?}: virtiofsd at {} failed {what}: {e}",
            self.tag,
            self.socket.display()
        ))
    }

    /// Hands the rings to virtiofsd: everything the vhost-user protocol wants before a ring
    /// runs. `started` collects the queues as they are handed over, so that a failure halfway
    /// can stop them.
    fn start(
        &mut self,
        features: u64,
        regions: &[VhostUserMemoryRegionInfo],
        rings: &[Ring],
        started: &mut Vec<usize>,
    ) -> Result<(), DeviceBroken> {
        for event in self.kick.iter().chain(&self.call) {
            // Counts left from before a reset mean nothing now.
            let _ = event.read();
        }
        let mut backend_features = features;
        if self.protocol_features {
            backend_features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(backend_features)
            .map_err(|e| self.broken("SET_FEATURES", e))?;
        self.frontend
            .set_mem_table(regions)
            .map_err(|e| self.broken("SET_MEM_TABLE", e))?;
        for ring in rings {
            let index = ring.index;
            started.push(index);
            self.frontend
                .set_vring_num(index, ring.config.queue_size)
                .map_err(|e| self.broken("SET_VRING_NUM", e))?;
            self.frontend
                .set_vring_addr(index, &ring.config)
                .map_err(|e| self.broken("SET_VRING_ADDR", e))?;
            self.frontend
                .set_vring_base(index, ring.next_avail)
                .map_err(|e| self.broken("SET_VRING_BASE", e))?;
            self.frontend
                .set_vring_call(index, &self.call[index])
                .map_err(|e| self.broken("SET_VRING_CALL", e))?;
            // Without PROTOCOL_FEATURES, the ring starts with its kick descriptor.
            self.frontend
                .set_vring_kick(index, &self.kick[index])
                .map_err(|e| self.broken("SET_VRING_KICK", e))?;
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(|e| self.broken("SET_VRING_ENABLE", e))?;
            }
        }
        Ok(())
    }

    /// Stops the rings virtiofsd runs and, where it can, its FUSE state with them: the guest
    /// driver that held them is gone.
    fn stop(&mut self, started: &[usize]) -> Result<(), DeviceBroken> {
        for &index in started {
            if self.protocol_features {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(|e| self.broken("SET_VRING_ENABLE", e))?;
            }
            // GET_VRING_BASE stops the ring (and says where virtiofsd got to, which a reset
            // does not need).
            self.frontend
                .get_vring_base(index)
                .map_err(|e| self.broken("GET_VRING_BASE", e))?;
        }
        if self
            .acked_protocol_features
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.frontend
                .reset_device()
                .map_err(|e| self.broken("RESET_DEVICE", e))?;
        }
        for event in &self.call {
            let _ = event.read();
        }
        Ok(())
    }

    /// The vhost-user socket became readable or hung up while the device is active. virtiofsd
    /// sends nothing unasked (ember takes no backend requests), and every answer is read by the
    /// request that asked for it, under the device's lock: so readable here means it closed.
    fn check_socket(&self) -> Result<(), DeviceBroken> {
        let mut byte = [0u8; 1];
        // SAFETY: `recv` writes at most one byte into `byte`, which lives across the call; the
        // descriptor is the frontend's socket, open as long as `self.frontend`. MSG_DONTWAIT
        // keeps this from blocking without changing the socket's own (blocking) mode.
        let n = unsafe {
            libc::recv(
                self.frontend.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => Err(DeviceBroken(format!(
                "virtio-fs {:?}: virtiofsd at {} closed its socket",
                self.tag,
                self.socket.display()
            ))),
            n if n > 0 => {
                log::warn!(
                    "virtio-fs {:?}: virtiofsd sent a message nobody asked for",
                    self.tag
                );
                Ok(())
            }
            _ => {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    ErrorKind::WouldBlock | ErrorKind::Interrupted => Ok(()),
                    _ => Err(DeviceBroken(format!(
                        "virtio-fs {:?}: the socket to virtiofsd at {} failed: {e}",
                        self.tag,
                        self.socket.display()
                    ))),
                }
            }
        }
    }
}

/// The configuration space for `tag`, once it is checked.
fn config_space(tag: &str) -> Result<[u8; MAX_TAG_LEN + 4], FsError> {
    if tag.is_empty() {
        return Err(FsError::EmptyTag);
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(FsError::TagTooLong {
            tag: tag.to_owned(),
            len: tag.len(),
        });
    }
    if tag.contains('\0') {
        return Err(FsError::TagHasNul(tag.to_owned()));
    }
    let mut config = [0; MAX_TAG_LEN + 4];
    config[..tag.len()].copy_from_slice(tag.as_bytes());
    // num_request_queues.
    config[MAX_TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
    Ok(config)
}

/// Connects to `path`, retrying while virtiofsd has not created or is not yet listening on it.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, FsError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused)
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(CONNECT_RETRY);
            }
            Err(source) => {
                return Err(FsError::Connect {
                    path: path.to_owned(),
                    source,
                })
            }
        }
    }
}

/// Guest memory as vhost-user's memory table: each region's guest address, size, address in
/// ember, and file and offset, which virtiofsd maps.
fn memory_regions(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, DeviceBroken> {
    mem.iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|_| {
                DeviceBroken(format!(
                    "virtio-fs: guest memory at {:#x} is not backed by a file, so virtiofsd \
                     cannot map it: a VM with volumes needs shared, file-backed (memfd) RAM",
                    region.start_addr().raw_value()
                ))
            })
        })
        .collect()
}

/// Where a ring the driver set up is, as vhost-user wants it: in ember's own virtual addresses,
/// which virtiofsd translates through the memory table (vhost-user, VHOST_USER_SET_VRING_ADDR).
/// The ring is checked to lie in guest memory first.
fn vring_config(
    mem: &GuestMemoryMmap,
    queue: &Queue,
    index: usize,
) -> Result<VringConfigData, DeviceBroken> {
    let invalid = || {
        DeviceBroken(format!(
            "virtio-fs: queue {index} (size {}) does not lie in guest memory",
            queue.size()
        ))
    };
    if !queue.is_valid(mem) {
        return Err(invalid());
    }
    let host = |addr: u64| {
        mem.get_host_address(GuestAddress(addr))
            .map(|ptr| ptr as u64)
            .map_err(|_| invalid())
    };
    Ok(VringConfigData {
        queue_max_size: queue.max_size(),
        queue_size: queue.size(),
        flags: 0,
        desc_table_addr: host(queue.desc_table())?,
        used_ring_addr: host(queue.used_ring())?,
        avail_ring_addr: host(queue.avail_ring())?,
        log_addr: None,
    })
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn available_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Both fields are read-only.
        log::debug!(
            "virtio-fs: ignoring a {}-byte config write at {offset:#x}",
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
        if queues.len() != NUM_QUEUES {
            return Err(DeviceBroken(format!(
                "virtio-fs has {NUM_QUEUES} queues, but was given {}",
                queues.len()
            )));
        }
        // Everything from the guest is checked before any of it goes to virtiofsd.
        let regions = memory_regions(&mem)?;
        let mut rings = Vec::new();
        for (index, queue) in queues.iter().enumerate() {
            // A queue the driver did not set up is not handed over.
            if queue.ready() {
                rings.push(Ring {
                    index,
                    config: vring_config(&mem, queue, index)?,
                    next_avail: queue.next_avail(),
                });
            }
        }
        let mut started = Vec::new();
        if let Err(e) = self.start(features, &regions, &rings, &mut started) {
            // Leave virtiofsd as before, as far as it still answers.
            if let Err(stop) = self.stop(&started) {
                log::warn!("{stop}");
            }
            return Err(e);
        }
        interrupt.set_used_buffers_signalled_elsewhere(self.calls_through_irqfd);
        // virtiofsd has its own mappings of guest memory (and its own copies of the files).
        self.active = Some(Active { interrupt, started });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) -> Result<Progress, DeviceBroken> {
        let Some(active) = &self.active else {
            log::debug!("virtio-fs: queue notified before activation; ignored");
            return Ok(Progress::Done);
        };
        let Some(kick) = self.kick.get(index) else {
            return Err(DeviceBroken(format!(
                "virtio-fs has {NUM_QUEUES} queues; the guest notified queue {index}"
            )));
        };
        if active.started.contains(&index) {
            kick.write(1).map_err(|e| {
                DeviceBroken(format!(
                    "virtio-fs: cannot kick virtiofsd's queue {index}: {e}"
                ))
            })?;
        }
        Ok(Progress::Done)
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            if let Err(e) = self.stop(&active.started) {
                // The next activation finds out whether virtiofsd is still there.
                log::warn!("{e}");
            }
        }
    }

    fn host_event_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.frontend.as_raw_fd()];
        if !self.calls_through_irqfd {
            fds.extend(self.call.iter().map(AsRawFd::as_raw_fd));
        }
        fds
    }

    fn process_host_event(&mut self, index: usize) -> Result<(), DeviceBroken> {
        if index == SOCKET_EVENT {
            return match self.active {
                Some(_) => self.check_socket(),
                // Not running: the next activation finds out.
                None => Ok(()),
            };
        }
        let queue = index - 1;
        let Some(call) = self.call.get(queue).filter(|_| !self.calls_through_irqfd) else {
            log::debug!("virtio-fs: event on unknown host descriptor {index}");
            return Ok(());
        };
        match call.read() {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => {
                return Err(DeviceBroken(format!(
                    "virtio-fs: cannot read virtiofsd's call eventfd {queue}: {e}"
                )))
            }
        }
        if let Some(active) = &self.active {
            // virtiofsd decided whether the driver wants the interrupt (EVENT_IDX and the
            // NO_INTERRUPT flag are for the one who uses the buffers).
            active.interrupt.signal_used_queue();
        }
        Ok(())
    }

    /// An active virtio-fs device cannot sleep: virtiofsd holds the queues (and the FUSE state
    /// of the guest's open files), so a snapshot of a VM with volumes is not supported yet.
    /// Refusing leaves it running, as the contract asks.
    fn sleep(&mut self) -> Result<Option<Vec<Queue>>, DeviceBroken> {
        match self.active {
            None => Ok(None),
            Some(_) => Err(DeviceBroken(
                "virtio-fs cannot be paused for a snapshot: virtiofsd holds the queues; a \
                 snapshot of a VM with volumes is not supported yet"
                    .into(),
            )),
        }
    }

    fn wake(
        &mut self,
        _mem: GuestMemoryMmap,
        _queues: Vec<Queue>,
        _interrupt: Arc<Interrupt>,
    ) -> Result<(), DeviceBroken> {
        Err(DeviceBroken("virtio-fs is not asleep".into()))
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Fs {
            tag: self.tag.clone(),
        }
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), VirtioDeviceStateError> {
        match state {
            VirtioDeviceState::Fs { tag } if *tag == self.tag => {
                self.reset();
                Ok(())
            }
            VirtioDeviceState::Fs { tag } => Err(VirtioDeviceStateError::FsTag {
                saved: tag.clone(),
                device: self.tag.clone(),
            }),
            other => Err(VirtioDeviceStateError::WrongDevice {
                saved: other.device_type(),
                device: DEVICE_TYPE_FS,
            }),
        }
    }
}
