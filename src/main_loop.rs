//! The main thread's loop: it sleeps in one `epoll_wait` until something needs it, and names each
//! reason with a [`Wakeup`].
//!
//! The reasons: a stop request (from a vCPU, the console or a device), a termination signal, a
//! volume's daemon exiting, a control-socket request, and job mode asking for a warm-start
//! snapshot. Each is one variant here and one arm in the loop in `vmm.rs`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Why the main thread woke up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wakeup {
    /// Something asked the VM to stop (`VmControl::request_stop`).
    StopRequested,
    /// SIGINT, SIGTERM, SIGHUP or SIGWINCH arrived.
    Signal,
    /// A process a device depends on (a volume's virtiofsd) exited.
    BackendExited,
    /// The control socket has a request for the main thread.
    Api,
    /// Job mode asks for the snapshot later runs will warm-start from.
    SnapshotRequested,
}

impl Wakeup {
    const ALL: [Wakeup; 5] = [
        Wakeup::StopRequested,
        Wakeup::Signal,
        Wakeup::BackendExited,
        Wakeup::Api,
        Wakeup::SnapshotRequested,
    ];

    /// The epoll token: the variant's position.
    fn token(self) -> u64 {
        self as u64
    }

    fn from_token(token: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.token() == token)
    }
}

/// The main thread's epoll set and the termination signals it reads.
pub struct MainLoop {
    epoll: Epoll,
    signals: TerminationSignals,
    events: Vec<EpollEvent>,
}

impl MainLoop {
    /// Blocks the termination signals (call before starting any thread, so that every thread
    /// inherits the mask and none is interrupted by them) and watches `stop_event`.
    pub fn new(stop_event: RawFd) -> io::Result<Self> {
        let signals = TerminationSignals::block()?;
        let epoll = Epoll::new()?;
        let main_loop = Self {
            epoll,
            signals,
            events: vec![EpollEvent::default(); Wakeup::ALL.len()],
        };
        main_loop.watch(stop_event, Wakeup::StopRequested)?;
        main_loop.watch(main_loop.signals.fd.as_raw_fd(), Wakeup::Signal)?;
        Ok(main_loop)
    }

    /// Adds `fd` (readable) as the source of `wakeup`.
    pub fn watch(&self, fd: RawFd, wakeup: Wakeup) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, wakeup.token()),
        )
    }

    /// Sleeps until at least one source is ready; returns which.
    pub fn wait(&mut self) -> io::Result<Vec<Wakeup>> {
        loop {
            match self.epoll.wait(-1, &mut self.events) {
                Ok(ready) => {
                    return Ok(self.events[..ready]
                        .iter()
                        .filter_map(|event| Wakeup::from_token(event.data()))
                        .collect())
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The next pending termination signal, if any.
    pub fn read_signal(&self) -> Option<i32> {
        self.signals.read()
    }
}

/// Runs `spawn` with the main loop's signals (SIGINT, SIGTERM, SIGHUP, SIGWINCH) blocked on the
/// calling thread, then restores its mask: a thread started inside inherits the blocked set from
/// its first instruction. For threads started before [`MainLoop::new`] blocks them for good: the
/// main thread reads them from a signalfd, and one the kernel hands to a thread that does not
/// block them ends the process on the spot.
/// Blocks the main loop's signals on the calling thread, for good: until the main loop's
/// signalfd exists they stay pending instead of taking their default action (or, for PID 1 of a
/// namespace, being dropped).
pub fn block_termination_signals() {
    let set = main_loop_sigset();
    // SAFETY: `set` is a valid sigset_t; no old mask is asked for.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

pub fn with_termination_signals_blocked<T>(spawn: impl FnOnce() -> T) -> T {
    let set = main_loop_sigset();
    // SAFETY: an all-zero sigset_t is valid for pthread_sigmask to overwrite.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: pthread_sigmask reads `set` and writes the previous mask into `old`, which is
    // restored (also only read) below.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if rc != 0 {
        log::warn!(
            "cannot block termination signals: {}",
            io::Error::from_raw_os_error(rc)
        );
    }
    let result = spawn();
    if rc == 0 {
        // SAFETY: `old` is the mask pthread_sigmask returned above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    }
    result
}

/// What the main thread reads from its signalfd: the termination signals, and SIGWINCH, which job
/// mode forwards to a command's terminal (elsewhere it is read and ignored, as by default).
const MAIN_LOOP_SIGNALS: [libc::c_int; 4] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGWINCH];

/// The set of [`MAIN_LOOP_SIGNALS`].
fn main_loop_sigset() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is valid; sigemptyset/sigaddset only fill this local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in MAIN_LOOP_SIGNALS {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// SIGINT, SIGTERM, SIGHUP and SIGWINCH, blocked and read from a signalfd.
struct TerminationSignals {
    fd: OwnedFd,
}

impl TerminationSignals {
    fn block() -> io::Result<Self> {
        let set = main_loop_sigset();
        // SAFETY: pthread_sigmask and signalfd only read `set`; the new descriptor is owned right
        // away.
        unsafe {
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    fn read(&self) -> Option<i32> {
        // SAFETY: an all-zero signalfd_siginfo is valid; read fills at most its size.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of `size` bytes.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeup_tokens_round_trip() {
        for wakeup in Wakeup::ALL {
            assert_eq!(Wakeup::from_token(wakeup.token()), Some(wakeup));
        }
        assert_eq!(Wakeup::from_token(99), None);
    }

    #[test]
    fn a_stop_event_wakes_the_loop() {
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut main_loop = MainLoop::new(stop.as_raw_fd()).unwrap();
        stop.write(1).unwrap();
        assert_eq!(main_loop.wait().unwrap(), vec![Wakeup::StopRequested]);
        assert_eq!(main_loop.read_signal(), None);
    }
}
