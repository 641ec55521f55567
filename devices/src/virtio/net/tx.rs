//! The transmit path: each chain the guest queues becomes one frame, copied whole into host
//! memory and written to the backend before the next chain is looked at.

use std::io;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::{Active, ChainError, HostSide, VNET_HDR_LEN};
use crate::virtio::DeviceBroken;

impl Active {
    /// Sends every frame on the transmit ring, then interrupts the guest if it asked to be told.
    /// Each chain completes before the next is looked at: whatever the guest queues, only one
    /// frame is in host memory.
    pub(super) fn transmit(&mut self, host: &mut HostSide) -> Result<(), DeviceBroken> {
        if !self.tx.ready() {
            log::debug!("virtio-net: the transmit queue is not ready");
            return Ok(());
        }
        let mem = &self.mem;
        // Uncapped, unlike block requests: a frame costs one copy and one non-blocking write,
        // which a full TAP refuses at once.
        let sent = self.tx.drain(mem, usize::MAX, |chain| {
            let head = chain.head_index();
            match gather(mem, chain, &mut host.tx_frame) {
                Ok(len) => host.send(len),
                Err(e) => {
                    log::debug!("virtio-net: TX chain {head} dropped: {e}");
                    host.stats.tx_dropped += 1;
                }
            }
            // The device writes nothing into a transmit chain.
            0
        });
        let signalled = self.tx.signal_used(mem, &self.interrupt);
        sent.and(signalled)
    }
}

/// Copies a transmit chain (vnet header, then the frame, device-readable) into `frame`;
/// returns its length.
fn gather(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> Result<usize, ChainError> {
    let mut len = 0usize;
    for descriptor in chain {
        if descriptor.is_write_only() {
            return Err(ChainError::WritableTxDescriptor);
        }
        let (addr, part_len) = (descriptor.addr(), descriptor.len());
        let Some(part) = len
            .checked_add(part_len as usize)
            .and_then(|end| frame.get_mut(len..end))
        else {
            return Err(ChainError::TooLong);
        };
        if part.is_empty() {
            // An empty descriptor carries nothing, wherever it points.
            continue;
        }
        if !mem.check_range(addr, part.len()) {
            return Err(ChainError::OutsideMemory {
                addr: addr.0,
                len: part_len,
            });
        }
        mem.read_slice(part, addr)
            .map_err(ChainError::GuestMemory)?;
        len += part.len();
    }
    if len < VNET_HDR_LEN {
        return Err(ChainError::TooShort(len));
    }
    Ok(len)
}

impl HostSide {
    /// Writes the `len`-byte frame in `tx_frame`. A full backend drops it, as a NIC with a full
    /// queue would; TCP in the guest retransmits.
    fn send(&mut self, len: usize) {
        let frame = &self.tx_frame[..len.min(self.tx_frame.len())];
        let written = loop {
            match self.backend.write_frame(frame) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                written => break written,
            }
        };
        match written {
            Ok(_) => self.stats.tx_frames += 1,
            Err(e) => {
                self.stats.tx_dropped += 1;
                if e.kind() == io::ErrorKind::WouldBlock {
                    log::debug!("virtio-net: the TAP queue is full; frame dropped");
                } else {
                    self.tx_errors.report("cannot write to the TAP", &e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::desc::split::Descriptor;
    use vm_memory::GuestAddress;

    use super::super::test_driver::*;
    use super::super::TX_QUEUE;
    use super::*;
    use crate::virtio::VirtioDevice;

    /// The head of the `n`th chain when `chains` were written one after another from index 0.
    fn head_of(n: u16, chains: &[Vec<Buf>]) -> u32 {
        chains[..usize::from(n)]
            .iter()
            .map(|c| c.len() as u32)
            .sum()
    }

    #[test]
    fn transmit_sends_header_and_payload_intact() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let header = [1, 4, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0];
        let payload: Vec<u8> = (0..1500).map(|i| i as u8).collect();
        let head = driver.queue_tx(header, &payload);
        driver.net.process_queue(TX_QUEUE).unwrap();
        let mut expected = header.to_vec();
        expected.extend_from_slice(&payload);
        assert_eq!(driver.sent(), Some(expected));
        assert_eq!(driver.sent(), None);
        assert_eq!(driver.used_idx(TX_QUEUE), 1);
        assert_eq!(driver.used(TX_QUEUE, 0), (u32::from(head), 0));
        assert!(driver.interrupted());
        assert_eq!(driver.net.stats().tx_frames, 1);
    }

    #[test]
    fn hostile_transmit_chains_are_dropped() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let chains = [
            vec![readable(BUF, 12), writable(BUF2, 100)], // device-writable part
            vec![readable(MEM_SIZE as u64 - 50, 100)],    // beyond RAM
            vec![readable(u64::MAX - 15, 100)],           // wraps around
            vec![readable(BUF, 40000), readable(BUF, 40000)], // bigger than any frame
            vec![readable(0, u32::MAX)],                  // far bigger
            vec![readable(BUF, 8)],                       // no full header
            vec![readable(BUF, 0)],                       // empty
        ];
        for chain in &chains {
            driver.push(TX_QUEUE, chain);
        }
        driver.net.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(TX_QUEUE), chains.len() as u16);
        for n in 0..chains.len() as u16 {
            assert_eq!(driver.used(TX_QUEUE, n), (head_of(n, &chains), 0));
        }
        assert_eq!(driver.sent(), None);
        assert_eq!(driver.net.stats().tx_dropped, chains.len() as u64);
        // The device still works.
        driver.queue_tx([0; 12], b"fine");
        driver.net.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.sent().unwrap().len(), 16);
    }

    #[test]
    fn a_looping_transmit_chain_ends() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        let next = VRING_DESC_F_NEXT as u16;
        // A descriptor that is its own successor: 256 × 12 bytes, sent as one frame.
        driver.write_descriptor(TX_QUEUE, 7, Descriptor::new(BUF, 12, next, 7));
        driver.offer(TX_QUEUE, 7);
        // A self loop of big descriptors is too long for a frame.
        driver.write_descriptor(TX_QUEUE, 8, Descriptor::new(BUF, 4096, next, 8));
        driver.offer(TX_QUEUE, 8);
        // A `next` outside the table ends the chain.
        driver.write_descriptor(TX_QUEUE, 9, Descriptor::new(BUF, 12, next, 999));
        driver.offer(TX_QUEUE, 9);
        driver.net.process_queue(TX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(TX_QUEUE), 3);
        assert_eq!(driver.sent().map(|f| f.len()), Some(256 * 12));
        assert_eq!(driver.sent().map(|f| f.len()), Some(12));
        assert_eq!(driver.net.stats().tx_dropped, 1);
    }

    #[test]
    fn a_transmit_flood_completes_without_growing() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, BASE_FEATURES);
        driver
            .mem
            .write_slice(&[0x5a; 1024], GuestAddress(BUF))
            .unwrap();
        // The peer never reads: the socket fills and the rest is dropped, never queued by us.
        for round in 1..=8u16 {
            for _ in 0..QUEUE_SIZE {
                driver.push(TX_QUEUE, &[readable(BUF, 12), readable(BUF + 12, 1000)]);
            }
            driver.net.process_queue(TX_QUEUE).unwrap();
            assert_eq!(driver.used_idx(TX_QUEUE), round.wrapping_mul(QUEUE_SIZE));
        }
        let stats = driver.net.stats();
        assert_eq!(stats.tx_frames + stats.tx_dropped, 8 * 256);
        assert!(stats.tx_dropped > 0, "{stats:?}");
        assert!(driver.interrupted());
    }
}
