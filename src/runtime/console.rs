//! A container's terminal (`process.terminal`), the way runc makes it: a new pseudo-terminal
//! whose master goes to the caller over `--console-socket` (SCM_RIGHTS), and whose slave is the
//! monitor's stdio and controlling terminal. The monitor, run with `-t`, puts the slave in raw
//! mode and hands the bytes and window size (SIGWINCH, when the caller resizes the master) to
//! the pseudo-terminal the guest agent made for the process.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("process.terminal needs --console-socket (where the terminal's master is sent)")]
    NoSocket,
    #[error("cannot make a pseudo-terminal: {0}")]
    Open(#[source] io::Error),
    #[error("cannot send the terminal to the console socket {0}: {1}")]
    Send(String, #[source] io::Error),
}

/// A pseudo-terminal pair.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: File,
    /// The slave's path (`/dev/pts/N`), sent with the master as runc does.
    pub name: String,
}

/// Opens a new pseudo-terminal.
pub fn open() -> Result<Pty, ConsoleError> {
    let error = || ConsoleError::Open(io::Error::last_os_error());
    // SAFETY: posix_openpt has no memory arguments.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: grantpt and unlockpt take the master descriptor only.
    if unsafe { libc::grantpt(fd) } < 0 || unsafe { libc::unlockpt(fd) } < 0 {
        return Err(error());
    }
    let mut buffer = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `buffer.len()` bytes.
    if unsafe { libc::ptsname_r(fd, buffer.as_mut_ptr(), buffer.len()) } != 0 {
        return Err(error());
    }
    // SAFETY: ptsname_r succeeded, so the buffer holds a NUL-terminated string.
    let name = unsafe { std::ffi::CStr::from_ptr(buffer.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)
        .map_err(ConsoleError::Open)?;
    Ok(Pty {
        master,
        slave,
        name,
    })
}

/// Sends the master to whoever listens on `socket` (conmon, containerd's shim), with the slave's
/// name as the message, as runc does.
pub fn send_master(socket: &Path, pty: &Pty) -> Result<(), ConsoleError> {
    let failed = |e| ConsoleError::Send(socket.display().to_string(), e);
    let stream = UnixStream::connect(socket).map_err(failed)?;
    let mut payload = pty.name.clone().into_bytes();
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the sendmsg call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.as_mut_ptr().cast();
    message.msg_controllen = space;
    // SAFETY: the control buffer has room for one header and one descriptor (CMSG_SPACE), so
    // CMSG_FIRSTHDR is non-null and CMSG_DATA points inside the buffer.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(
            libc::CMSG_DATA(header).cast::<libc::c_int>(),
            pty.master.as_raw_fd(),
        );
    }
    // SAFETY: `message` points at live buffers for the duration of the call.
    if unsafe { libc::sendmsg(stream.as_raw_fd(), &message, 0) } < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    Ok(())
}

/// Makes `slave` the command's stdio and controlling terminal (in a session of its own, as a
/// container process is).
pub fn attach(command: &mut Command, slave: &File) -> io::Result<()> {
    command
        .stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: the closure runs between fork and exec and makes two async-signal-safe calls.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(libc::STDIN_FILENO, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;

    #[test]
    fn the_master_reaches_the_console_socket() {
        let dir = std::env::temp_dir().join(format!("ember-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let pty = open().unwrap();
        assert!(pty.name.starts_with("/dev/pts/"), "{}", pty.name);
        send_master(&path, &pty).unwrap();
        let (stream, _) = listener.accept().unwrap();
        // Receive the descriptor, as conmon does.
        let mut payload = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        };
        let mut control = [0u8; 64];
        // SAFETY: an all-zero msghdr is valid.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.as_mut_ptr().cast();
        message.msg_controllen = control.len();
        // SAFETY: `message` points at live buffers for the duration of the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut message, 0) };
        assert_eq!(&payload[..n as usize], pty.name.as_bytes());
        // SAFETY: recvmsg filled in one SCM_RIGHTS header within `control`; its descriptor is
        // new and ours.
        let received = unsafe {
            let header = libc::CMSG_FIRSTHDR(&message);
            assert_eq!((*header).cmsg_type, libc::SCM_RIGHTS);
            File::from_raw_fd(std::ptr::read_unaligned(
                libc::CMSG_DATA(header).cast::<libc::c_int>(),
            ))
        };
        // What the received master writes, the slave reads.
        let mut master = received;
        master.write_all(b"hi\n").unwrap();
        let mut slave = pty.slave;
        let mut line = [0u8; 3];
        slave.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"hi\n");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
