//! The interrupt lines devices raise.
//!
//! A device does not know where its line goes: in Ember it is a pin of the userspace IOAPIC
//! ([`crate::ioapic::IoapicPin`]); in the unit tests, an eventfd that counts the edges.

use std::io;

use vmm_sys_util::eventfd::EventFd;

/// An edge-triggered interrupt input.
pub trait InterruptLine: Send + Sync {
    /// Raises the line once.
    fn trigger(&self) -> io::Result<()>;
}

/// An eventfd as an interrupt line: each edge adds one to its counter.
impl InterruptLine for EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}
