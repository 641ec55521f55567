//! Applying the host's `Refresh`: fresh randomness into the kernel's RNG and the host's wall-clock
//! time into the guest's clock.
//!
//! Both matter after a snapshot is restored: every clone of one snapshot wakes with the same RNG
//! state (so the same "random" UUIDs, keys and TCP sequence numbers) and with the clock of the
//! moment the snapshot was taken. A cold-booted guest has no battery-backed clock either (Ember
//! emulates no RTC), so the first command of every VM sets it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// The clock is stepped only when it is off by more than this. A restored clone is off by as
/// long as its snapshot waited (minutes, days); a running guest on this software KVM drifts by a
/// fraction of a second between commands, and stepping it back and forth for that on every
/// command would only make its time go backwards now and then.
const CLOCK_TOLERANCE_NS: i64 = 1_000_000_000;

/// What a refresh did, for the agent's log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Refreshed {
    /// Bytes mixed into the RNG, credited as entropy.
    pub entropy_bytes: usize,
    /// How far the clock was stepped, in nanoseconds (0: it was close enough).
    pub clock_step_ns: i64,
}

/// Mixes `entropy` into the kernel's RNG (crediting it: it comes from the host kernel's RNG),
/// forces the RNG to reseed from it at once, and sets `CLOCK_REALTIME` to `realtime_ns` if it is
/// off. Needs CAP_SYS_ADMIN (the agent runs as root in the guest).
pub fn apply(realtime_ns: i64, entropy: &[u8]) -> io::Result<Refreshed> {
    let mut done = Refreshed::default();
    if !entropy.is_empty() {
        add_entropy(entropy)?;
        done.entropy_bytes = entropy.len();
    }
    let now = now_ns()?;
    let step = realtime_ns.saturating_sub(now);
    if step.abs() > CLOCK_TOLERANCE_NS {
        let time = libc::timespec {
            tv_sec: realtime_ns.div_euclid(1_000_000_000),
            tv_nsec: realtime_ns.rem_euclid(1_000_000_000),
        };
        // SAFETY: `time` is a valid timespec for the duration of the call.
        if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } != 0 {
            return Err(io::Error::last_os_error());
        }
        done.clock_step_ns = step;
    }
    Ok(done)
}

fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    let urandom = OpenOptions::new().write(true).open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    let bits = i32::try_from(entropy.len() * 8).unwrap_or(i32::MAX);
    let len = i32::try_from(entropy.len()).unwrap_or(i32::MAX);
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // The kernel reads the header and `buf_size` bytes after it: all within `info`.
    // SAFETY: `info` holds the header and `buf_size` bytes and lives across the call; the ioctl
    // only reads it.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn now_ns() -> io::Result<i64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec the call writes.
    if unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(now
        .tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clock_that_is_close_enough_is_left_alone() {
        // Runs on the host: no entropy (that needs root and changes nothing observable), and a
        // time within the tolerance, so nothing is stepped.
        let done = apply(now_ns().unwrap(), &[]).unwrap();
        assert_eq!(done, Refreshed::default());
    }
}
