//! The receive path: frames from the backend into the buffers the guest posted on the receive
//! queue, several buffers per frame with VIRTIO_NET_F_MRG_RXBUF.

use std::io;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{Active, ChainError, HostSide, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};
use crate::virtio::DeviceBroken;

/// What became of the frame in hand.
enum Delivery {
    Delivered,
    /// It can never fit the guest's buffers.
    Dropped,
    /// It needs more buffers than the guest has posted so far.
    NeedBuffers,
}

/// How the frame in hand fits the receive buffers held.
enum Fit {
    /// In the first this many.
    Buffers(usize),
    /// Not yet: more buffers may make it fit.
    Short,
    /// Never.
    TooBig,
}

/// A receive buffer: one device-writable descriptor chain, checked to lie in guest memory.
pub(super) struct RxBuffer {
    head: u16,
    /// Where it was in the avail ring (the free-running index it was taken at).
    position: u16,
    /// (address, length) of each non-empty descriptor, in chain order.
    segments: Vec<(GuestAddress, u32)>,
    capacity: usize,
}

impl RxBuffer {
    fn new(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        position: u16,
    ) -> Result<Self, ChainError> {
        let head = chain.head_index();
        let mut segments = Vec::new();
        let mut capacity = 0usize;
        // The iterator ends after a queue's worth of descriptors: looping chains end too.
        for descriptor in chain {
            if !descriptor.is_write_only() {
                return Err(ChainError::ReadOnlyRxDescriptor);
            }
            let (addr, len) = (descriptor.addr(), descriptor.len());
            if len == 0 {
                continue;
            }
            if !mem.check_range(addr, len as usize) {
                return Err(ChainError::OutsideMemory { addr: addr.0, len });
            }
            segments.push((addr, len));
            // At most 256 u32 lengths: no overflow on 64-bit hosts, saturating elsewhere.
            capacity = capacity.saturating_add(len as usize);
        }
        if capacity < VNET_HDR_LEN {
            return Err(ChainError::TooShort(capacity));
        }
        Ok(Self {
            head,
            position,
            segments,
            capacity,
        })
    }

    /// Copies as much of `data` as fits; returns how many bytes that was.
    fn fill(&self, mem: &GuestMemoryMmap, data: &[u8]) -> usize {
        let mut written = 0;
        for &(addr, len) in &self.segments {
            let Some(part) = data.get(written..).filter(|rest| !rest.is_empty()) else {
                break;
            };
            let part = &part[..part.len().min(len as usize)];
            // The range was checked when the buffer was taken; guest memory does not shrink.
            if let Err(e) = mem.write_slice(part, addr) {
                log::debug!("virtio-net: cannot write a receive buffer: {e}");
                break;
            }
            written += part.len();
        }
        written
    }
}

impl Active {
    /// Moves frames from the backend into receive buffers until the backend is empty or the guest
    /// has no room left, then interrupts the guest if it asked to be told.
    pub(super) fn receive(&mut self, host: &mut HostSide) -> Result<(), DeviceBroken> {
        if !self.rx.ready() {
            log::debug!("virtio-net: the receive queue is not ready");
            return Ok(());
        }
        let received = self.receive_frames(host);
        // Buffers returned before the ring broke still deserve their interrupt.
        let signalled = self.rx.signal_used(&self.mem, &self.interrupt);
        received.and(signalled)
    }

    fn receive_frames(&mut self, host: &mut HostSide) -> Result<(), DeviceBroken> {
        loop {
            let len = match self.deferred {
                Some(len) => len,
                None => {
                    // Never take a frame off the backend without a buffer for it: it would have
                    // to be held or dropped, while the kernel queue holds it for free.
                    if self.rx_buffers.is_empty() && !self.take_rx_buffer()? {
                        // Ask for a notification when the driver adds buffers; unless it added
                        // some meanwhile, for which none will come.
                        if self.rx.enable_notification(&self.mem)? {
                            continue;
                        }
                        return Ok(());
                    }
                    match host.read_frame() {
                        Some(len) => len,
                        None => {
                            // The next frame comes with an edge on the backend descriptor; guest
                            // notifications are not needed until the buffers run out.
                            self.rx.disable_notification(&self.mem)?;
                            return Ok(());
                        }
                    }
                }
            };
            // Never out of bounds: read_frame returns at most the buffer's length.
            let frame = &mut host.rx_frame[..len];
            match self.deliver(frame)? {
                Delivery::Delivered => {
                    self.deferred = None;
                    host.stats.rx_frames += 1;
                }
                Delivery::Dropped => {
                    log::debug!("virtio-net: a {len}-byte frame does not fit the RX buffers");
                    self.deferred = None;
                    host.stats.rx_dropped += 1;
                }
                Delivery::NeedBuffers => {
                    self.deferred = Some(len);
                    if !self.rx.enable_notification(&self.mem)? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Copies `frame` (vnet header first) into the receive buffers held, taking more off the
    /// ring as needed, and returns those it filled to the guest.
    fn deliver(&mut self, frame: &mut [u8]) -> Result<Delivery, DeviceBroken> {
        let count = loop {
            match self.fit(frame.len()) {
                Fit::Buffers(count) => break count,
                Fit::TooBig => return Ok(Delivery::Dropped),
                Fit::Short => {
                    if !self.take_rx_buffer()? {
                        return Ok(Delivery::NeedBuffers);
                    }
                }
            }
        };
        // Set even without MRG_RXBUF, where it must be 1 (virtio 1.2, 5.1.6.4). `count` is at
        // most a queue's worth, and the buffers hold at least the header.
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX);
        if let Some(field) = frame.get_mut(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2) {
            field.copy_from_slice(&num_buffers.to_le_bytes());
        }
        let mut rest: &[u8] = frame;
        // Consecutive used entries: the driver gathers a merged frame's buffers in used order.
        for buffer in self.rx_buffers.drain(..count) {
            let written = buffer.fill(&self.mem, rest);
            rest = &rest[written..];
            // At most MAX_BUFFER_LEN.
            let used_len = u32::try_from(written).unwrap_or(u32::MAX);
            self.rx.add_used(&self.mem, buffer.head, used_len)?;
        }
        Ok(Delivery::Delivered)
    }

    /// How a frame of `len` bytes fits the buffers held.
    fn fit(&self, len: usize) -> Fit {
        if !self.mrg_rxbuf {
            // Each buffer must hold a whole frame. Buffers all have the size the driver chose
            // for its MTU and offloads, so a frame too big for one is too big for any.
            return match self.rx_buffers.front() {
                None => Fit::Short,
                Some(buffer) if buffer.capacity >= len => Fit::Buffers(1),
                Some(_) => Fit::TooBig,
            };
        }
        let mut capacity = 0usize;
        for (index, buffer) in self.rx_buffers.iter().enumerate() {
            capacity = capacity.saturating_add(buffer.capacity);
            if capacity >= len {
                return Fit::Buffers(index + 1);
            }
        }
        // With a ring's worth in hand the driver cannot post more before some come back.
        if self.rx_buffers.len() >= usize::from(self.rx.size()) {
            Fit::TooBig
        } else {
            Fit::Short
        }
    }

    /// Takes the next usable receive buffer off the avail ring, returning the unusable ones it
    /// meets with length 0. False when the ring has no more.
    fn take_rx_buffer(&mut self) -> Result<bool, DeviceBroken> {
        loop {
            let position = self.rx.next_avail();
            let Some(chain) = self.rx.pop(&self.mem)? else {
                return Ok(false);
            };
            let head = chain.head_index();
            match RxBuffer::new(&self.mem, chain, position) {
                Ok(buffer) => {
                    self.rx_buffers.push_back(buffer);
                    return Ok(true);
                }
                Err(e) => {
                    log::debug!("virtio-net: RX buffer {head} refused: {e}");
                    self.rx.add_used(&self.mem, head, 0)?;
                }
            }
        }
    }

    /// Before a sleep: gives the receive buffers held back, unused, so that the ring's
    /// `next_used` equals its `next_avail` and a wake takes them again.
    ///
    /// None of them holds any part of a frame: a frame is copied only once all the buffers it
    /// needs are in hand, and returned in the same step, so with MRG_RXBUF too a buffer is
    /// either untouched or used. The buffers are held in the order they were taken; those taken
    /// last, one right after another, go back to the avail ring by moving `next_avail` back
    /// over them. A buffer taken before a chain that was refused (and so already returned, with
    /// length 0) cannot: moving back over it would take the refused chain a second time, and
    /// return it twice. Those are returned now, unused, as a refused chain is; only a driver
    /// that posts chains it should not meets this, and gets its buffer back to post again.
    pub(super) fn give_back_rx_buffers(&mut self) -> Result<(), DeviceBroken> {
        let mut position = self.rx.next_avail();
        let taken_last = self
            .rx_buffers
            .iter()
            .rev()
            .take_while(|buffer| {
                position = position.wrapping_sub(1);
                buffer.position == position
            })
            .count();
        let out_of_order = self.rx_buffers.len() - taken_last;
        for buffer in self.rx_buffers.drain(..out_of_order) {
            self.rx.add_used(&self.mem, buffer.head, 0)?;
        }
        // At most a ring's worth, so at most 32768.
        let taken_last = u16::try_from(taken_last).unwrap_or(u16::MAX);
        self.rx.unpop(taken_last);
        self.rx_buffers.clear();
        self.rx.signal_used(&self.mem, &self.interrupt)
    }
}

impl HostSide {
    /// Reads the next frame into `rx_frame`; None when the backend has none (or fails).
    fn read_frame(&mut self) -> Option<usize> {
        loop {
            match self.backend.read_frame(&mut self.rx_frame) {
                // 0 is not a frame: end of file on a socket backend, nothing on a TAP.
                Ok(0) => return None,
                Ok(len) if len < VNET_HDR_LEN => {
                    log::debug!("virtio-net: a {len}-byte frame from the backend, no header");
                    self.stats.rx_dropped += 1;
                }
                Ok(len) => return Some(len.min(self.rx_frame.len())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => {
                    self.rx_errors.report("cannot read from the TAP", &e);
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_driver::*;
    use super::super::{MAX_FRAME_LEN, RX_QUEUE};
    use crate::virtio::{QueueT, VirtioDevice};

    #[test]
    fn receive_fills_a_posted_buffer() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let head = driver.post_rx(BUF, 2048);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        assert!(!driver.interrupted());

        let frame = frame(60, 1);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(head), 72));
        assert_eq!(driver.guest_bytes(BUF, 72), received(&frame, 1));
        assert!(driver.interrupted());
        assert_eq!(driver.net.stats().rx_frames, 1);
    }

    #[test]
    fn mergeable_buffers_carry_one_frame_across_two() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | MRG);
        let first = driver.post_rx(BUF, 64);
        let second = driver.post_rx(BUF2, 64);
        let third = driver.post_rx(BUF3, 64);
        let frame = frame(100, 2);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(first), 64));
        assert_eq!(driver.used(RX_QUEUE, 1), (u32::from(second), 48));
        let expected = received(&frame, 2);
        assert_eq!(driver.guest_bytes(BUF, 64), expected[..64]);
        assert_eq!(driver.guest_bytes(BUF2, 48), expected[64..]);

        // The third buffer is still there for the next frame.
        let small = self::frame(20, 3);
        driver.inject(&small);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used(RX_QUEUE, 2), (u32::from(third), 32));
        assert_eq!(driver.guest_bytes(BUF3, 32), received(&small, 1));
    }

    #[test]
    fn a_largest_frame_spreads_over_many_buffers() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | MRG);
        for i in 0..20 {
            driver.post_rx(BUF + i * 0x1000, 4096);
        }
        let frame = frame(MAX_FRAME_LEN, 4);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        // 65562 bytes in 4 KiB buffers: 17 of them.
        assert_eq!(driver.used_idx(RX_QUEUE), 17);
        assert_eq!(driver.used(RX_QUEUE, 16), (16, 65562 - 16 * 4096));
        assert_eq!(driver.guest_bytes(BUF, 65562), received(&frame, 17));
    }

    #[test]
    fn without_buffers_frames_wait_and_nothing_is_lost() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(100 + i, i as u8)).collect();
        for frame in &frames {
            driver.inject(frame);
        }
        // The TAP is readable, but the guest posted nothing: the frames stay in the socket.
        driver.net.process_host_event(0).unwrap();
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        // Notifications are on, so the guest will say when it posts buffers.
        let flags = driver.rings[RX_QUEUE].used_flags();
        assert_eq!(flags, 0);

        for i in 0..4 {
            driver.post_rx(BUF + i * 0x1000, 2048);
        }
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 3);
        for (i, frame) in frames.iter().enumerate() {
            let (id, len) = driver.used(RX_QUEUE, i as u16);
            assert_eq!((id, len as usize), (i as u32, frame.len()));
            let addr = BUF + i as u64 * 0x1000;
            assert_eq!(driver.guest_bytes(addr, frame.len()), received(frame, 1));
        }
        // The TAP is empty with a buffer to spare: guest notifications are off.
        let flags = driver.rings[RX_QUEUE].used_flags();
        assert_eq!(flags, 1);
    }

    #[test]
    fn a_frame_bigger_than_the_buffers_waits_for_more() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | MRG);
        driver.post_rx(BUF, 64);
        let big = frame(200, 5);
        let next = frame(10, 6);
        driver.inject(&big);
        driver.inject(&next);
        driver.net.process_host_event(0).unwrap();
        // Read, but not delivered: it waits, holding the one buffer.
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        driver.post_rx(BUF2, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        driver.post_rx(BUF3, 64);
        driver.post_rx(BUF3 + 0x1000, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        // 212 bytes in four 64-byte buffers, then the next frame alone.
        assert_eq!(driver.used_idx(RX_QUEUE), 4);
        assert_eq!(driver.used(RX_QUEUE, 3), (3, 212 - 3 * 64));
        let expected = received(&big, 4);
        assert_eq!(driver.guest_bytes(BUF, 64), expected[..64]);
        assert_eq!(driver.guest_bytes(BUF3 + 0x1000, 20), expected[192..]);
        driver.post_rx(BUF, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used(RX_QUEUE, 4), (4, 22));
        assert_eq!(driver.guest_bytes(BUF, 22), received(&next, 1));
        assert_eq!(driver.net.stats().rx_dropped, 0);
    }

    #[test]
    fn without_mergeable_buffers_an_oversized_frame_is_dropped() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let head = driver.post_rx(BUF, 100);
        driver.inject(&frame(200, 7));
        let fits = frame(50, 8);
        driver.inject(&fits);
        driver.net.process_host_event(0).unwrap();
        // The big frame is gone; the buffer took the next one.
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(head), 62));
        assert_eq!(driver.guest_bytes(BUF, 62), received(&fits, 1));
        assert_eq!(driver.net.stats().rx_dropped, 1);
    }

    #[test]
    fn a_frame_no_ring_could_hold_is_dropped() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | MRG);
        for i in 0..u64::from(QUEUE_SIZE) {
            driver.post_rx(BUF + i * 16, 16);
        }
        driver.inject(&frame(5000, 9));
        let fits = frame(20, 10);
        driver.inject(&fits);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.net.stats().rx_dropped, 1);
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.used(RX_QUEUE, 0), (0, 16));
        assert_eq!(driver.used(RX_QUEUE, 1), (1, 16));
        assert_eq!(driver.guest_bytes(BUF, 32), received(&fits, 2));
    }

    #[test]
    fn hostile_receive_buffers_come_back_unused() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let bad = [
            vec![readable(BUF, 2048)],                       // device-readable
            vec![writable(BUF, 1024), readable(BUF2, 1024)], // partly readable
            vec![writable(MEM_SIZE as u64 - 16, 2048)],      // beyond RAM
            vec![writable(u64::MAX - 15, 2048)],             // wraps around
            vec![writable(BUF, 8)],                          // smaller than the header
            vec![writable(BUF, 0)],                          // empty
        ];
        let heads: Vec<u16> = bad
            .iter()
            .map(|chain| driver.push(RX_QUEUE, chain))
            .collect();
        let good = driver.post_rx(BUF3, 2048);
        let frame = frame(100, 11);
        driver.inject(&frame);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 7);
        for (n, head) in heads.into_iter().enumerate() {
            assert_eq!(driver.used(RX_QUEUE, n as u16), (u32::from(head), 0));
        }
        assert_eq!(driver.used(RX_QUEUE, 6), (u32::from(good), 112));
        assert_eq!(driver.guest_bytes(BUF3, 112), received(&frame, 1));
        assert_eq!(driver.guest_bytes(BUF, 16), [0; 16]);
    }

    /// Puts the device to sleep and wakes it again with the queues it handed back; returns the
    /// RX queue's (next_avail, next_used) as handed back.
    fn sleep_and_wake(driver: &mut Driver<'_>) -> (u16, u16) {
        let queues = driver.net.sleep().unwrap().unwrap();
        let rx = (queues[RX_QUEUE].next_avail(), queues[RX_QUEUE].next_used());
        // Asleep, nothing moves.
        driver.net.process_queue(RX_QUEUE).unwrap();
        driver.net.process_host_event(0).unwrap();
        assert!(driver.net.sleep().unwrap().is_none());
        let interrupt = driver.irq.interrupt();
        driver
            .net
            .wake(driver.mem.clone(), queues, interrupt)
            .unwrap();
        rx
    }

    #[test]
    fn sleep_gives_a_held_buffer_back_to_the_ring() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let head = driver.post_rx(BUF, 2048);
        // The pass takes the buffer, then finds the backend empty: the buffer stays in hand.
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(sleep_and_wake(&mut driver), (0, 0));
        assert!(driver
            .net
            .wake(mem.clone(), vec![], driver.irq.interrupt())
            .is_err());

        let frame = frame(60, 1);
        driver.inject(&frame);
        // The transport kicks the queues after a wake.
        driver.net.process_queue(RX_QUEUE).unwrap();
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(head), 72));
        assert_eq!(driver.guest_bytes(BUF, 72), received(&frame, 1));
    }

    #[test]
    fn sleep_keeps_the_deferred_frame_and_gives_back_its_buffers() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | MRG);
        driver.post_rx(BUF, 64);
        driver.post_rx(BUF2, 64);
        let big = frame(200, 5);
        let next = frame(10, 6);
        driver.inject(&big);
        driver.inject(&next);
        // Read, and waiting for more than the two buffers it holds.
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);
        assert_eq!(sleep_and_wake(&mut driver), (0, 0));

        driver.post_rx(BUF3, 64);
        driver.post_rx(BUF3 + 0x1000, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        // The same buffers, in the same order, then two more: the frame exactly once.
        assert_eq!(driver.used_idx(RX_QUEUE), 4);
        for n in 0..4 {
            assert_eq!(driver.used(RX_QUEUE, n).0, u32::from(n));
        }
        let expected = received(&big, 4);
        assert_eq!(driver.guest_bytes(BUF, 64), expected[..64]);
        assert_eq!(driver.guest_bytes(BUF2, 64), expected[64..128]);
        assert_eq!(driver.guest_bytes(BUF3 + 0x1000, 20), expected[192..]);
        driver.post_rx(BUF, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used(RX_QUEUE, 4), (4, 22));
        assert_eq!(driver.guest_bytes(BUF, 22), received(&next, 1));
        let stats = driver.net.stats();
        assert_eq!((stats.rx_frames, stats.rx_dropped), (2, 0));
    }

    #[test]
    fn sleep_returns_buffers_taken_before_a_refused_chain() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES | MRG);
        let first = driver.post_rx(BUF, 64);
        let big = frame(200, 7);
        driver.inject(&big);
        driver.net.process_host_event(0).unwrap();
        let refused = driver.push(RX_QUEUE, &[readable(BUF2, 64)]);
        let last = driver.post_rx(BUF3, 64);
        // Takes the refused chain (returned at once) and the next buffer: still too few.
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.used(RX_QUEUE, 0), (u32::from(refused), 0));

        // The last buffer goes back to the ring; the first cannot, and comes back unused.
        assert_eq!(sleep_and_wake(&mut driver), (2, 2));
        assert_eq!(driver.used_idx(RX_QUEUE), 2);
        assert_eq!(driver.used(RX_QUEUE, 1), (u32::from(first), 0));

        let more: Vec<u16> = (1..4)
            .map(|i| driver.post_rx(BUF + i * 0x1000, 64))
            .collect();
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 6);
        assert_eq!(driver.used(RX_QUEUE, 2), (u32::from(last), 64));
        for (n, head) in more.iter().enumerate() {
            assert_eq!(driver.used(RX_QUEUE, 3 + n as u16).0, u32::from(*head));
        }
        let expected = received(&big, 4);
        assert_eq!(driver.guest_bytes(BUF3, 64), expected[..64]);
        assert_eq!(driver.guest_bytes(BUF + 0x3000, 20), expected[192..]);
        assert_eq!(driver.net.stats().rx_frames, 1);
    }

    #[test]
    fn frames_waiting_at_activation_are_received() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        driver.net.reset();
        let frame = frame(30, 3);
        driver.inject(&frame);
        // The driver posts buffers before DRIVER_OK; its notification went unheard.
        driver.clear_rings();
        driver.post_rx(BUF, 2048);
        driver.hand_over(BASE_FEATURES);
        // The transport kicks every queue once after activation.
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 1);
        assert_eq!(driver.guest_bytes(BUF, 42), received(&frame, 1));
        assert!(driver.interrupted());
    }
}
