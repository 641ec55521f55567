//! A TAP network interface, the host side of a virtio-net device.
//!
//! The usual setup is a persistent TAP made beforehand (`ip tuntap add tap0 mode tap user $USER`)
//! that ember attaches to without any privilege; with CAP_NET_ADMIN, attaching to a name that does
//! not exist creates the interface for as long as ember holds it.
//!
//! The TAP is opened with `IFF_VNET_HDR` and a 12-byte vnet header, i.e. `virtio_net_hdr_v1`
//! (with `num_buffers`) as a VIRTIO_F_VERSION_1 driver lays it out: every frame read or written
//! starts with that header, so frames pass between guest and TAP without any translation. The
//! kernel reads the header in native byte order, which is virtio's little-endian on the hosts
//! ember runs on (x86_64).
//!
//! Every error names the problem and its fix in one line, since that is all a user sees.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::NetBackend;

/// The clone device every TAP is attached through.
const TUN_DEVICE: &str = "/dev/net/tun";
/// `sizeof(struct virtio_net_hdr_v1)`: the header VIRTIO_F_VERSION_1 drivers use, with or
/// without VIRTIO_NET_F_MRG_RXBUF.
pub const VNET_HDR_LEN: usize = 12;
/// Interface names are at most IFNAMSIZ - 1 bytes (the kernel keeps a NUL).
const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Why a TAP interface cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("invalid TAP interface name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// /dev/net/tun is missing.
    #[error(
        "{TUN_DEVICE} does not exist: load the tun module (`modprobe tun`), or create the device \
         node (`mknod {TUN_DEVICE} c 10 200`)"
    )]
    TunMissing,
    /// /dev/net/tun cannot be opened for want of permission.
    #[error(
        "no permission to open {TUN_DEVICE}: it is normally world read-writable (mode 0666); \
         restore that with `chmod 0666 {TUN_DEVICE}`"
    )]
    TunAccess,
    /// /dev/net/tun cannot be opened for another reason.
    #[error("cannot open {TUN_DEVICE}")]
    TunOpen(#[source] io::Error),
    /// TUNSETIFF was refused for want of permission.
    #[error(
        "no permission to attach TAP interface {name}: create it for your user with \
         `ip tuntap add {name} mode tap user $USER`, or run ember with CAP_NET_ADMIN"
    )]
    PermissionDenied {
        /// The interface.
        name: String,
    },
    /// Another process has the TAP attached.
    #[error(
        "TAP interface {name} is busy: another process has it open, and a single-queue TAP can \
         be attached only once; stop that process or give this VM another TAP"
    )]
    Busy {
        /// The interface.
        name: String,
    },
    /// The interface exists but is not a single-queue TAP.
    #[error(
        "{name} is not a single-queue TAP interface (it is a TUN, a multi-queue TAP, or not a \
         tun/tap interface at all): recreate it with `ip tuntap add {name} mode tap`"
    )]
    NotATap {
        /// The interface.
        name: String,
    },
    /// A setup ioctl on the attached TAP failed.
    #[error("cannot {what} on TAP interface {name}")]
    Setup {
        /// The interface.
        name: String,
        /// What was being set up.
        what: &'static str,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union that follows.
/// The union is 24 bytes on 64-bit hosts; the padding keeps the kernel's 40-byte copy inside
/// this struct.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

/// An attached TAP interface, non-blocking; detached when dropped (a persistent TAP stays).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to TAP interface `name` (creating it if it does not exist and we may).
    pub fn open(name: &str) -> Result<Self, TapError> {
        let request_name = interface_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            // std adds O_CLOEXEC. Non-blocking: the device event loop must never wait on a read
            // (RX) or a full queue (TX).
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_DEVICE)
            .map_err(open_error)?;
        let mut request = InterfaceRequest {
            name: request_name,
            // IFF_NO_PI: frames without the 4-byte packet-information prefix; IFF_VNET_HDR:
            // with a virtio-net header instead.
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _union_rest: [0; 22],
        };
        // SAFETY: TUNSETIFF reads (and writes back) one `struct ifreq`; `request` is a live,
        // writable value of the same layout and size, and `file` is an open tun descriptor.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
        if ret < 0 {
            return Err(attach_error(name, io::Error::last_os_error()));
        }
        let header_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which points at `header_len`.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &header_len) };
        if ret < 0 {
            return Err(TapError::Setup {
                name: name.to_string(),
                what: "set the vnet header size",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets which offloads (`TUN_F_CSUM`, `TUN_F_TSO4`, `TUN_F_TSO6`, `TUN_F_UFO`) frames read
    /// from the TAP may use: partial checksums and segmentation left to the reader. TSO and UFO
    /// need TUN_F_CSUM as well, or the kernel refuses them.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value, no memory is involved; `file` is an
        // open tun descriptor.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Reads one frame (vnet header first) into `buf`; a frame longer than `buf` is cut short.
    /// `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header first). `WouldBlock` when the interface's queue is full;
    /// `EIO` while the interface is down.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        (&self.file).write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Checks `name` the way the kernel's `dev_valid_name` does and returns it NUL-padded. A `%`
/// is refused too: the kernel would take the name as a pattern and make up a new interface.
fn interface_name(name: &str) -> Result<[u8; libc::IFNAMSIZ], TapError> {
    let invalid = |reason| TapError::InvalidName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid(
            "it is empty; give the name of a TAP interface, such as tap0",
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid(
            "interface names are at most 15 bytes; choose a shorter one",
        ));
    }
    if name == "." || name == ".." {
        return Err(invalid(
            "`.` and `..` cannot name an interface; choose another name",
        ));
    }
    if name
        .bytes()
        .any(|b| matches!(b, b'/' | b':' | b'%' | b'\0') || b.is_ascii_whitespace())
    {
        return Err(invalid(
            "interface names cannot hold '/', ':', '%', NUL or whitespace; choose another name",
        ));
    }
    let mut bytes = [0; libc::IFNAMSIZ];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    Ok(bytes)
}

/// What a failed open of /dev/net/tun means for the user.
fn open_error(source: io::Error) -> TapError {
    match source.raw_os_error() {
        // ENODEV/ENXIO: the node exists but no driver is behind it (module not loaded).
        Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => TapError::TunMissing,
        Some(libc::EACCES | libc::EPERM) => TapError::TunAccess,
        _ => TapError::TunOpen(source),
    }
}

/// What a failed TUNSETIFF on interface `name` means for the user (see `tun_set_iff` in the
/// kernel's drivers/net/tun.c).
fn attach_error(name: &str, source: io::Error) -> TapError {
    let name = name.to_string();
    match source.raw_os_error() {
        // Not the interface's owner or group, or no CAP_NET_ADMIN to create it.
        Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { name },
        // Another file is attached to a TAP without IFF_MULTI_QUEUE.
        Some(libc::EBUSY) => TapError::Busy { name },
        // The name belongs to a TUN, a multi-queue TAP, or an interface of another kind.
        Some(libc::EINVAL) => TapError::NotATap { name },
        _ => TapError::Setup {
            name,
            what: "attach",
            source,
        },
    }
}

/// The TAP is the backend every `--net` device uses.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(code: i32) -> io::Error {
        io::Error::from_raw_os_error(code)
    }

    #[test]
    fn open_errors_map_to_their_fix() {
        assert!(matches!(
            open_error(errno(libc::ENOENT)),
            TapError::TunMissing
        ));
        assert!(matches!(
            open_error(errno(libc::ENODEV)),
            TapError::TunMissing
        ));
        assert!(matches!(
            open_error(errno(libc::EACCES)),
            TapError::TunAccess
        ));
        assert!(matches!(
            open_error(errno(libc::EMFILE)),
            TapError::TunOpen(_)
        ));
        assert!(TapError::TunMissing.to_string().contains("modprobe tun"));
    }

    #[test]
    fn attach_errors_map_to_their_fix() {
        let denied = attach_error("tap7", errno(libc::EPERM));
        assert!(
            matches!(denied, TapError::PermissionDenied { .. }),
            "{denied:?}"
        );
        let message = denied.to_string();
        assert!(
            message.contains("ip tuntap add tap7 mode tap user $USER"),
            "{message}"
        );
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");

        let busy = attach_error("tap7", errno(libc::EBUSY));
        assert!(matches!(busy, TapError::Busy { .. }), "{busy:?}");
        assert!(busy.to_string().contains("another process"));

        let not_tap = attach_error("eth0", errno(libc::EINVAL));
        assert!(matches!(not_tap, TapError::NotATap { .. }), "{not_tap:?}");
        assert!(not_tap.to_string().contains("ip tuntap add eth0 mode tap"));

        let other = attach_error("tap7", errno(libc::ENOMEM));
        assert!(
            matches!(other, TapError::Setup { what: "attach", .. }),
            "{other:?}"
        );
    }

    #[test]
    fn interface_names_are_checked_before_the_kernel_sees_them() {
        let name = interface_name("tap0").unwrap();
        assert_eq!(&name[..5], b"tap0\0");
        assert!(interface_name(&"t".repeat(15)).is_ok());
        for bad in [
            "",
            &"t".repeat(16),
            ".",
            "..",
            "tap/0",
            "tap:0",
            "tap%d",
            "tap 0",
            "a\0b",
        ] {
            let error = Tap::open(bad).unwrap_err();
            assert!(
                matches!(error, TapError::InvalidName { .. }),
                "{bad:?}: {error:?}"
            );
        }
        let long = Tap::open("a-very-long-tap-name").unwrap_err().to_string();
        assert!(long.contains("at most 15 bytes"), "{long}");
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn the_request_matches_the_kernel_ifreq() {
        // struct ifreq is 40 bytes on 64-bit Linux, with the flags right after the name.
        assert_eq!(std::mem::size_of::<InterfaceRequest>(), 40);
        assert_eq!(
            std::mem::offset_of!(InterfaceRequest, flags),
            libc::IFNAMSIZ
        );
    }

    /// Needs CAP_NET_ADMIN, and creates an interface: run it in a network namespace of its own,
    /// `unshare -rn cargo test -p ember-devices tap -- --ignored`.
    #[test]
    #[ignore]
    fn a_real_tap_attaches_once_and_takes_offloads() {
        let tap = Tap::open("embertest0").unwrap();
        assert_eq!(tap.name(), "embertest0");
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        // TSO without checksum offload is refused by the kernel.
        assert!(tap.set_offload(libc::TUN_F_TSO4).is_err());
        tap.set_offload(0).unwrap();
        let again = Tap::open("embertest0").unwrap_err();
        assert!(matches!(again, TapError::Busy { .. }), "{again:?}");
        // Nothing to read; writing while the interface is down fails with EIO.
        let mut buf = [0; 2048];
        let read = tap.read(&mut buf).unwrap_err();
        assert_eq!(read.kind(), io::ErrorKind::WouldBlock);
        let mut frame = [0u8; VNET_HDR_LEN + 60];
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].fill(0xff);
        let write = tap.write(&frame).unwrap_err();
        assert_eq!(write.raw_os_error(), Some(libc::EIO));
    }
}
