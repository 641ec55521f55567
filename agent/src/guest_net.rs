//! Gives the guest the identity its host asked for before the agent says it is ready: each
//! interface's MTU, address and default route (`--net`), and the host name (`--hostname`).
//!
//! The classic interface ioctls on a UDP socket rather than `ip` from busybox: every process
//! costs ~0.5 s of emulated kernel code on software KVM, and these are four system calls.

use std::io;
use std::mem;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use ember_agent::interface::{self, InterfaceConfig};

/// `struct rtentry` of `<net/route.h>` (glibc's libc crate has no binding for it).
#[repr(C)]
struct RouteEntry {
    pad1: libc::c_ulong,
    destination: libc::sockaddr,
    gateway: libc::sockaddr,
    genmask: libc::sockaddr,
    flags: libc::c_ushort,
    pad2: libc::c_short,
    pad3: libc::c_ulong,
    tos: libc::c_uchar,
    class: libc::c_uchar,
    pad4: [libc::c_short; 3],
    metric: libc::c_short,
    device: *mut libc::c_char,
    mtu: libc::c_ulong,
    window: libc::c_ulong,
    irtt: libc::c_ushort,
}

/// Configures `config`'s interface: MTU, address and netmask, up, then the default route.
pub fn configure(config: &InterfaceConfig) -> io::Result<()> {
    // SAFETY: socket() has no memory arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = &config.name;
    let request = || -> libc::ifreq {
        // SAFETY: ifreq is plain data (a name and a union of integers, addresses and a pointer
        // the kernel only reads for requests not made here); all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        request
    };
    if let Some(mtu) = config.mtu {
        let mut req = request();
        req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        interface_ioctl(&socket, libc::SIOCSIFMTU, &mut req, "MTU")?;
    }
    if let Some((address, prefix)) = config.address {
        let mut req = request();
        req.ifr_ifru.ifru_addr = sockaddr(address);
        interface_ioctl(&socket, libc::SIOCSIFADDR, &mut req, "address")?;
        let mut req = request();
        req.ifr_ifru.ifru_netmask = sockaddr(interface::netmask(prefix));
        interface_ioctl(&socket, libc::SIOCSIFNETMASK, &mut req, "netmask")?;
    }
    let mut req = request();
    interface_ioctl(&socket, libc::SIOCGIFFLAGS, &mut req, "flags")?;
    // SAFETY: SIOCGIFFLAGS just filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    interface_ioctl(&socket, libc::SIOCSIFFLAGS, &mut req, "flags")?;
    if let Some(gateway) = config.gateway {
        let mut device = [0 as libc::c_char; libc::IFNAMSIZ];
        for (slot, byte) in device.iter_mut().zip(name.bytes()) {
            *slot = byte as libc::c_char;
        }
        let mut route = RouteEntry {
            pad1: 0,
            destination: sockaddr(Ipv4Addr::UNSPECIFIED),
            gateway: sockaddr(gateway),
            genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            flags: libc::RTF_UP | libc::RTF_GATEWAY,
            pad2: 0,
            pad3: 0,
            tos: 0,
            class: 0,
            pad4: [0; 3],
            metric: 0,
            device: device.as_mut_ptr(),
            mtu: 0,
            window: 0,
            irtt: 0,
        };
        // SAFETY: SIOCADDRT reads one rtentry, whose device name is a NUL-terminated buffer
        // that outlives the call.
        let result =
            unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCADDRT, &mut route as *mut _) };
        if result < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("{name}: default route via {gateway}: {e}"),
            ));
        }
    }
    Ok(())
}

/// Sets the guest's host name.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the kernel reads `len` bytes from a live buffer.
    if unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn interface_ioctl(
    socket: &OwnedFd,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
    what: &str,
) -> io::Result<()> {
    // SAFETY: each of these requests reads or writes one ifreq, which `req` is.
    if unsafe { libc::ioctl(socket.as_raw_fd(), request, req as *mut libc::ifreq) } < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: the name is the NUL-terminated name request() wrote.
        let name = unsafe { std::ffi::CStr::from_ptr(req.ifr_name.as_ptr()) };
        return Err(io::Error::new(
            e.kind(),
            format!("{}: {what}: {e}", name.to_string_lossy()),
        ));
    }
    Ok(())
}

fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes); the bytes of one are a
    // valid value of the other, as the socket API intends.
    unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}
