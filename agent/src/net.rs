//! Addresses and sockets: vsock in the guest, Unix sockets for tests on the host.
//!
//! Both families are plain stream sockets once connected, so one fd-owning [`Stream`] and
//! [`Listener`] serve both; std has no vsock, and the few calls needed are simpler through libc
//! than through a crate.

use std::io::{self, Read, Write};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use ember_agent::wire::{AGENT_PORT, READY_PORT};

/// Where the agent listens for exec connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// `vsock:PORT`, on any CID (the guest's own).
    Vsock {
        /// The port.
        port: u32,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// Where the agent says it is ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadyAddr {
    /// `vsock:CID:PORT`.
    Vsock {
        /// The peer's context id: 2 is the host.
        cid: u32,
        /// The port.
        port: u32,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `none`: tell nobody.
    None,
}

impl Default for ListenAddr {
    fn default() -> Self {
        ListenAddr::Vsock { port: AGENT_PORT }
    }
}

impl Default for ReadyAddr {
    fn default() -> Self {
        ReadyAddr::Vsock {
            cid: libc::VMADDR_CID_HOST,
            port: READY_PORT,
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(port) = s.strip_prefix("vsock:") {
            Ok(ListenAddr::Vsock {
                port: parse_u32(port)?,
            })
        } else if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(ListenAddr::Unix(path.into()))
        } else {
            Err(format!(
                "bad listen address {s:?}: want vsock:PORT or unix:PATH"
            ))
        }
    }
}

impl std::str::FromStr for ReadyAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "none" {
            Ok(ReadyAddr::None)
        } else if let Some(rest) = s.strip_prefix("vsock:") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| format!("bad ready address {s:?}: want vsock:CID:PORT"))?;
            Ok(ReadyAddr::Vsock {
                cid: parse_u32(cid)?,
                port: parse_u32(port)?,
            })
        } else if let Some(path) = s.strip_prefix("unix:").filter(|p| !p.is_empty()) {
            Ok(ReadyAddr::Unix(path.into()))
        } else {
            Err(format!(
                "bad ready address {s:?}: want vsock:CID:PORT, unix:PATH or none"
            ))
        }
    }
}

fn parse_u32(s: &str) -> Result<u32, String> {
    s.parse().map_err(|_| format!("bad number {s:?}"))
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Vsock { port } => write!(f, "vsock:{port}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl std::fmt::Display for ReadyAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadyAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            ReadyAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ReadyAddr::None => write!(f, "none"),
        }
    }
}

/// A connected stream socket of either family.
#[derive(Debug)]
pub struct Stream(OwnedFd);

impl Stream {
    /// Connects to the ready address (`None` for [`ReadyAddr::None`]).
    pub fn connect(addr: &ReadyAddr) -> io::Result<Option<Stream>> {
        match addr {
            ReadyAddr::None => Ok(None),
            ReadyAddr::Unix(path) => Ok(Some(Stream(UnixStream::connect(path)?.into()))),
            ReadyAddr::Vsock { cid, port } => {
                let fd = vsock_socket()?;
                let sa = sockaddr_vm(*cid, *port);
                // SAFETY: `sa` is a valid, initialised sockaddr_vm and the length passed is its
                // size; `fd` is an open socket we own.
                let r = unsafe {
                    libc::connect(
                        fd.as_raw_fd(),
                        (&sa as *const libc::sockaddr_vm).cast(),
                        mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(Some(Stream(fd)))
            }
        }
    }

    /// Switches the socket between blocking (the handshake) and non-blocking (the poll loop).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        set_nonblocking(self.0.as_raw_fd(), on)
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the fd is ours and open.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // MSG_NOSIGNAL: a host that went away is an EPIPE to handle, not a signal (Rust ignores
        // SIGPIPE already, but this does not rely on it).
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes; the fd is ours and open.
        let n = unsafe {
            libc::send(
                self.0.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket of either family.
#[derive(Debug)]
pub struct Listener(OwnedFd);

impl Listener {
    /// Binds and listens.
    pub fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Unix(path) => Ok(Listener(UnixListener::bind(path)?.into())),
            ListenAddr::Vsock { port } => {
                let fd = vsock_socket()?;
                let sa = sockaddr_vm(libc::VMADDR_CID_ANY, *port);
                // SAFETY: `sa` is a valid, initialised sockaddr_vm and the length passed is its
                // size; `fd` is an open socket we own.
                let r = unsafe {
                    libc::bind(
                        fd.as_raw_fd(),
                        (&sa as *const libc::sockaddr_vm).cast(),
                        mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
                    )
                };
                if r < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: plain syscall on a socket we own.
                if unsafe { libc::listen(fd.as_raw_fd(), 128) } < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(Listener(fd))
            }
        }
    }

    /// Waits for the next connection. The new socket is close-on-exec, so commands never
    /// inherit another connection.
    pub fn accept(&self) -> io::Result<Stream> {
        // SAFETY: null address pointers are allowed (we do not want the peer's address); the
        // listening fd is ours and open.
        let fd = unsafe {
            libc::accept4(
                self.0.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: accept4 just returned this fd, open and owned by nobody else.
        Ok(Stream(unsafe { OwnedFd::from_raw_fd(fd) }))
    }
}

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket just returned this fd, open and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr_vm(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data, for which all-zero bytes are valid (and the kernel
    // requires the reserved and zero fields to be zero).
    let mut sa: libc::sockaddr_vm = unsafe { mem::zeroed() };
    sa.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    sa.svm_cid = cid;
    sa.svm_port = port;
    sa
}

/// Sets or clears `O_NONBLOCK` on an fd.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd the caller owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if libc::fcntl(fd, libc::F_SETFL, flags) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>(),
            Ok(ListenAddr::Vsock { port: 1024 })
        );
        assert_eq!(
            "unix:/tmp/a.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/a.sock".into()))
        );
        assert!("vsock:x".parse::<ListenAddr>().is_err());
        assert!("unix:".parse::<ListenAddr>().is_err());
        assert!("tcp:1".parse::<ListenAddr>().is_err());
        assert_eq!(
            "vsock:2:1023".parse::<ReadyAddr>(),
            Ok(ReadyAddr::Vsock { cid: 2, port: 1023 })
        );
        assert_eq!("none".parse::<ReadyAddr>(), Ok(ReadyAddr::None));
        assert!("vsock:1023".parse::<ReadyAddr>().is_err());
        assert_eq!(ReadyAddr::default().to_string(), "vsock:2:1023");
        assert_eq!(ListenAddr::default().to_string(), "vsock:1024");
    }
}
