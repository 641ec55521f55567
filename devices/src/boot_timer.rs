//! The boot timer: a guest marks a point of its boot (say, "/init reached") by writing one byte
//! to an I/O port, and Ember logs how long after its own start that happened.
//!
//! Serial output is a poor clock for this: the console may be quiet, buffered or slow. A single
//! OUT is one VM exit with no driver in between. Cloud Hypervisor uses port 0x80 for the same job
//! (Firecracker an MMIO byte); Ember uses port 0x80 too, so one guest image can mark its boot under
//! either. The byte written is logged with the time: the guest chooses what each value means
//! (Ember's default guest writes 0x60 when /init starts).
//!
//! Port 0x80 is also the PC's "POST code" port, which some drivers write to as a short delay
//! (`outb_p`); Ember's guest kernel writes nothing there while it boots (with `ember -v`, the only
//! mark logged is the one /init writes). A guest that writes it in a loop fills the log only up to
//! a bound.
//!
//! Across a snapshot ([`BootTimerState`]) only the number of marks logged is kept, so the bound
//! holds for the guest's whole life: a guest that filled it stays quiet after a restore instead
//! of getting a fresh allowance each time. The clock is not kept: an `Instant` means nothing in
//! another process, and a restored timer measures from the start of the ember that restored it,
//! so a mark the guest writes after a restore tells how long the restore took to get it there.

use std::time::{Duration, Instant};

use crate::{BusDevice, VmRequest};

/// Marks logged before the timer goes quiet: enough for any boot, and a guest writing the port in
/// a loop cannot flood the host's log.
const MAX_LOGGED_MARKS: u32 = 64;

/// One mark: what the guest wrote and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootMark {
    /// The byte the guest wrote.
    pub value: u8,
    /// When, measured from ember's start.
    pub since_start: Duration,
}

/// What a boot timer keeps across a snapshot, as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BootTimerState {
    /// Marks logged so far, up to the bound (64).
    pub marks_logged: u32,
}

/// Why a saved boot-timer state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BootTimerStateError {
    /// More marks than the timer ever logs.
    #[error("{0} boot marks logged, the timer stops at {MAX_LOGGED_MARKS}")]
    MarksLogged(u32),
}

/// The boot-timer device (one write-only byte; reads as 0xff, like a port with nothing on it).
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    logged: u32,
}

impl BootTimer {
    /// A boot timer that measures from `start` (Ember takes it first thing in `main`).
    pub fn new(start: Instant) -> Self {
        BootTimer { start, logged: 0 }
    }

    /// The state a snapshot keeps.
    pub fn save(&self) -> BootTimerState {
        BootTimerState {
            marks_logged: self.logged,
        }
    }

    /// A boot timer that has logged what `state` says and measures from `start`, the restoring
    /// ember's own start (see the module comment). Refuses more marks than the bound.
    pub fn from_state(state: &BootTimerState, start: Instant) -> Result<Self, BootTimerStateError> {
        if state.marks_logged > MAX_LOGGED_MARKS {
            return Err(BootTimerStateError::MarksLogged(state.marks_logged));
        }
        Ok(BootTimer {
            start,
            logged: state.marks_logged,
        })
    }

    /// Records a mark and returns it, or `None` once the log bound is reached.
    fn mark(&mut self, value: u8, now: Instant) -> Option<BootMark> {
        if self.logged >= MAX_LOGGED_MARKS {
            return None;
        }
        self.logged += 1;
        if self.logged == MAX_LOGGED_MARKS {
            log::info!("boot timer: {MAX_LOGGED_MARKS} marks logged, ignoring further writes");
        }
        Some(BootMark {
            value,
            since_start: now.saturating_duration_since(self.start),
        })
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) -> Option<VmRequest> {
        // A wider OUT still carries the mark in its low byte.
        let value = *data.first()?;
        if let Some(mark) = self.mark(value, Instant::now()) {
            log::info!(
                "boot timer: guest wrote 0x{:02x} at {:.3} ms",
                mark.value,
                mark.since_start.as_secs_f64() * 1000.0
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_the_value_and_the_time_since_start() {
        let start = Instant::now();
        let mut timer = BootTimer::new(start);
        let mark = timer.mark(0x60, start + Duration::from_millis(12));
        assert_eq!(
            mark,
            Some(BootMark {
                value: 0x60,
                since_start: Duration::from_millis(12)
            })
        );
        assert_eq!(timer.write(0, &[0x41, 0]), None);
        assert_eq!(timer.write(0, &[]), None);
        let mut data = [0; 2];
        timer.read(0, &mut data);
        assert_eq!(data, [0xff, 0xff]);
    }

    #[test]
    fn a_restored_timer_keeps_its_count_and_measures_from_the_new_start() {
        let start = Instant::now();
        let mut saved = BootTimer::new(start);
        for value in 0..3 {
            saved.mark(value, start);
        }
        let state = saved.save();
        assert_eq!(state, BootTimerState { marks_logged: 3 });
        let restart = start + Duration::from_secs(60);
        let mut restored = BootTimer::from_state(&state, restart).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(
            restored.mark(0x61, restart + Duration::from_millis(5)),
            Some(BootMark {
                value: 0x61,
                since_start: Duration::from_millis(5)
            })
        );
        // The bound counts the marks from before the snapshot.
        let more = (0..1000).filter_map(|_| restored.mark(0, restart)).count();
        assert_eq!(more, MAX_LOGGED_MARKS as usize - 4);
        let mut full = BootTimer::from_state(&restored.save(), restart).unwrap();
        assert_eq!(full.mark(0, restart), None);
    }

    #[test]
    fn more_marks_than_the_bound_are_refused() {
        let state = BootTimerState {
            marks_logged: MAX_LOGGED_MARKS + 1,
        };
        assert_eq!(
            BootTimer::from_state(&state, Instant::now()).unwrap_err(),
            BootTimerStateError::MarksLogged(MAX_LOGGED_MARKS + 1)
        );
        let state = BootTimerState {
            marks_logged: u32::MAX,
        };
        assert!(BootTimer::from_state(&state, Instant::now()).is_err());
    }

    #[test]
    fn a_guest_writing_in_a_loop_is_logged_a_bounded_number_of_times() {
        let start = Instant::now();
        let mut timer = BootTimer::new(start);
        let logged = (0..1000).filter_map(|i| timer.mark(i as u8, start)).count();
        assert_eq!(logged, MAX_LOGGED_MARKS as usize);
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_saved_timer_round_trips_through_json() {
        let start = Instant::now();
        let mut timer = BootTimer::new(start);
        for value in 0..5 {
            timer.mark(value, start);
        }
        let state = timer.save();
        let json = serde_json::to_string(&state).unwrap();
        let back: BootTimerState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, BootTimerState { marks_logged: 5 });
        assert_eq!(BootTimer::from_state(&back, start).unwrap().save(), state);
    }
}
