//! The block device's own state for a snapshot ([`BlockState`]): what the driver negotiated and
//! what the guest was told about the disk. The image itself is the host's: a restored device is
//! made over it with [`Block::new`] as before, and the state is checked against it.

use virtio_bindings::virtio_blk::VIRTIO_BLK_F_FLUSH;

use super::{Block, Phase, DEVICE_TYPE_BLOCK, SECTOR_SIZE};
use crate::virtio::{
    check_acked_features, VirtioDevice, VirtioDeviceState, VirtioDeviceStateError,
};

/// What a virtio-block device keeps, as plain data for a snapshot.
///
/// Comes back from a file, so [`VirtioDevice::restore_state`] checks it against the image the
/// device was made over and against what a driver could have negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct BlockState {
    /// The disk size in 512-byte sectors the guest was told; the image must still have it.
    pub capacity: u64,
    /// Whether the guest was told the disk is read-only; the image must be opened so again.
    pub read_only: bool,
    /// The features the driver accepted at DRIVER_OK; `None` when the device was not activated.
    pub acked_features: Option<u64>,
    /// Writeback (completed writes become durable at a flush request) rather than
    /// write-through. Today this follows VIRTIO_BLK_F_FLUSH (virtio 1.2, 5.2.6.2); with
    /// VIRTIO_BLK_F_CONFIG_WCE the driver could toggle it, so it is kept on its own.
    pub writeback: bool,
}

/// Why a saved block state does not fit the device restored from it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockStateError {
    /// The image has another size than the guest was told.
    #[error("the guest knows a disk of {saved} sectors, the image has {image}")]
    Capacity {
        /// Sectors in the state.
        saved: u64,
        /// Sectors in the image.
        image: u64,
    },
    /// The image is opened writable where the guest was told read-only, or the other way round.
    #[error("the guest knows a disk with read_only={saved}, the image is opened with {image}")]
    ReadOnly {
        /// read_only in the state.
        saved: bool,
        /// read_only of the device.
        image: bool,
    },
    /// The cache mode is not the one the accepted features give.
    #[error("writeback={writeback} does not follow the accepted features (FLUSH: {flush})")]
    Writeback {
        /// The saved mode.
        writeback: bool,
        /// Whether VIRTIO_BLK_F_FLUSH was accepted.
        flush: bool,
    },
}

impl Block {
    pub(super) fn state(&self) -> BlockState {
        let acked_features = match self.phase {
            Phase::Reset => None,
            Phase::Active { features, .. } | Phase::Asleep { features } => Some(features),
        };
        BlockState {
            capacity: self.capacity(),
            read_only: self.disk.read_only,
            acked_features,
            writeback: writeback(acked_features),
        }
    }

    pub(super) fn restore(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), VirtioDeviceStateError> {
        let VirtioDeviceState::Block(state) = state else {
            return Err(VirtioDeviceStateError::WrongDevice {
                saved: state.device_type(),
                device: DEVICE_TYPE_BLOCK,
            });
        };
        let image = self.disk.size / SECTOR_SIZE;
        if state.capacity != image {
            return Err(BlockStateError::Capacity {
                saved: state.capacity,
                image,
            }
            .into());
        }
        if state.read_only != self.disk.read_only {
            return Err(BlockStateError::ReadOnly {
                saved: state.read_only,
                image: self.disk.read_only,
            }
            .into());
        }
        if let Some(features) = state.acked_features {
            check_acked_features(features, self.available_features())?;
        }
        if state.writeback != writeback(state.acked_features) {
            return Err(BlockStateError::Writeback {
                writeback: state.writeback,
                flush: writeback(state.acked_features),
            }
            .into());
        }
        self.phase = match state.acked_features {
            Some(features) => Phase::Asleep { features },
            None => Phase::Reset,
        };
        Ok(())
    }
}

/// The cache mode `acked_features` give: writeback with FLUSH (virtio 1.2, 5.2.6.2).
fn writeback(acked_features: Option<u64>) -> bool {
    acked_features.is_some_and(|features| features & (1 << VIRTIO_BLK_F_FLUSH) != 0)
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_RO, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};

    use super::super::test_driver::*;
    use super::*;
    use crate::virtio::mmio::{bring_up, MmioTransport};
    use crate::virtio::net::NetState;
    use crate::virtio::{FeaturesError, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

    const FEATURES: u64 =
        1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_RING_F_EVENT_IDX;

    #[test]
    fn a_restored_device_serves_the_next_request_where_the_saved_one_stopped() {
        let mem = guest_memory();
        let image = image(8);
        let mut driver = Driver::with_features(&mem, open(&image, false, None).unwrap(), FEATURES);
        driver.queue.set_used_event(10);
        assert_eq!(driver.write(2, &pattern(1024, 1)), (1, OK));
        assert_eq!(driver.read(0, 512), (513, OK));
        let queues = driver.block.sleep().unwrap().unwrap();
        let state = driver.block.save_state();
        assert_eq!(
            state,
            VirtioDeviceState::Block(BlockState {
                capacity: 8,
                read_only: false,
                acked_features: Some(FEATURES),
                writeback: true,
            })
        );
        // As a snapshot keeps them: plain data.
        let saved_queues: Vec<_> = queues.iter().map(Queue::state).collect();
        let Driver {
            mem,
            block,
            irq,
            queue,
            ..
        } = driver;
        // The image is free again only once the saved device is gone.
        drop(block);

        let mut block = open(&image, false, None).unwrap();
        block.restore_state(&state).unwrap();
        assert_eq!(block.save_state(), state);
        let queues = saved_queues
            .into_iter()
            .map(|q| Queue::try_from(q).unwrap())
            .collect();
        block.wake(mem.clone(), queues, irq.interrupt()).unwrap();
        let mut driver = Driver {
            mem,
            block,
            irq,
            queue,
        };
        let (len, status) = driver.request(VIRTIO_BLK_T_IN, 2, &[writable(DATA, 1024)]);
        assert_eq!((len, status), (1025, OK));
        assert_eq!(driver.guest_bytes(DATA, 1024), pattern(1024, 1));
        // The used index went on from 2, and EVENT_IDX is still on: no interrupt until 11.
        assert_eq!(driver.used_idx(), 3);
        assert!(!driver.interrupted());
        assert_eq!(driver.queue.avail_event(), 3);
    }

    /// The same through the transport, as a snapshot takes it: registers and queue saved with
    /// the device, and a new transport around a new device over the same image.
    #[test]
    fn a_restored_transport_serves_the_next_request() {
        let mem = guest_memory();
        let image = image(8);
        let block = open(&image, false, None).unwrap();
        let line = || vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut transport = MmioTransport::new(Box::new(block), mem.clone(), line()).unwrap();
        let mut ring = DriverQueue::new(&mem, 0x1000);
        bring_up(&mut transport, FEATURES, &[ring.addresses()]);
        let request = |ring: &mut DriverQueue<'_>, request_type: u32, data: Buf| {
            let mut header = [0; 16];
            header[..4].copy_from_slice(&request_type.to_le_bytes());
            header[8..].copy_from_slice(&2u64.to_le_bytes());
            mem.write_slice(&header, GuestAddress(HEADER)).unwrap();
            mem.write_obj(NO_STATUS, GuestAddress(STATUS)).unwrap();
            ring.push(&[readable(HEADER, 16), data, writable(STATUS, 1)])
        };
        mem.write_slice(&pattern(512, 4), GuestAddress(DATA))
            .unwrap();
        request(&mut ring, VIRTIO_BLK_T_OUT, readable(DATA, 512));
        transport.worker().unwrap().process_queue(0);
        assert_eq!(ring.used_idx(), 1);

        let state = transport.pause_and_save().unwrap();
        assert_eq!(state.queues[0].next_avail, 1);
        // The image is free again only once the saved device is gone.
        drop(transport);

        let block = open(&image, false, None).unwrap();
        let mut transport =
            MmioTransport::from_state(Box::new(block), mem.clone(), line(), &state).unwrap();
        let head = request(&mut ring, VIRTIO_BLK_T_IN, writable(DATA + 0x1000, 512));
        transport.worker().unwrap().process_queue(0);
        assert_eq!(ring.used_idx(), 2);
        assert_eq!(ring.used(1), (u32::from(head), 513));
        assert_eq!(guest_bytes(&mem, STATUS, 1), [OK]);
        assert_eq!(guest_bytes(&mem, DATA + 0x1000, 512), pattern(512, 4));
        let again = transport.pause_and_save().unwrap();
        assert_eq!(
            (again.queues[0].next_avail, again.queues[0].next_used),
            (2, 2)
        );
        assert_eq!(again.status, state.status);
    }

    #[test]
    fn a_reset_device_restores_reset() {
        let image = image(8);
        let block = open(&image, true, None).unwrap();
        let state = block.save_state();
        assert_eq!(state.acked_features(), None);
        drop(block);
        let mut block = open(&image, true, None).unwrap();
        block.restore_state(&state).unwrap();
        assert!(block.sleep().unwrap().is_none());
        assert_eq!(block.save_state(), state);
    }

    #[test]
    fn a_state_that_does_not_fit_is_refused() {
        let image = image(8);
        let mut block = open(&image, false, None).unwrap();
        let good = BlockState {
            capacity: 8,
            read_only: false,
            acked_features: Some(FEATURES),
            writeback: true,
        };
        let refused = |block: &mut Block, change: &dyn Fn(&mut BlockState)| {
            let mut state = good.clone();
            change(&mut state);
            block
                .restore_state(&VirtioDeviceState::Block(state))
                .unwrap_err()
        };
        use VirtioDeviceStateError as E;
        assert_eq!(
            refused(&mut block, &|s| s.capacity = 16),
            E::Block(BlockStateError::Capacity {
                saved: 16,
                image: 8
            })
        );
        assert_eq!(
            refused(&mut block, &|s| s.read_only = true),
            E::Block(BlockStateError::ReadOnly {
                saved: true,
                image: false
            })
        );
        // RO is offered only for a read-only image.
        let ro = 1 << VIRTIO_BLK_F_RO;
        assert_eq!(
            refused(&mut block, &|s| s.acked_features = Some(FEATURES | ro)),
            E::Features(FeaturesError::NotOffered(ro))
        );
        assert_eq!(
            refused(&mut block, &|s| s.acked_features =
                Some(1 << VIRTIO_BLK_F_FLUSH)),
            E::Features(FeaturesError::NoVersion1)
        );
        assert_eq!(
            refused(&mut block, &|s| s.writeback = false),
            E::Block(BlockStateError::Writeback {
                writeback: false,
                flush: true
            })
        );
        assert_eq!(
            refused(&mut block, &|s| s.acked_features = None),
            E::Block(BlockStateError::Writeback {
                writeback: true,
                flush: false
            })
        );
        let net = VirtioDeviceState::Net(NetState {
            mac: [2, 0, 0, 0, 0, 1],
            acked_features: None,
            guest_offloads: 0,
            deferred_frame: None,
        });
        assert_eq!(
            block.restore_state(&net).unwrap_err(),
            E::WrongDevice {
                saved: 1,
                device: 2
            }
        );
        // Nothing changed: still reset.
        assert_eq!(block.save_state().acked_features(), None);
        block
            .restore_state(&VirtioDeviceState::Block(good))
            .unwrap();
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_saved_block_device_round_trips_through_json() {
        let state = VirtioDeviceState::Block(BlockState {
            capacity: 8,
            read_only: false,
            acked_features: Some(FEATURES),
            writeback: true,
        });
        let json = serde_json::to_string(&state).unwrap();
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let image = image(8);
        let mut block = open(&image, false, None).unwrap();
        block.restore_state(&back).unwrap();
        assert_eq!(block.save_state(), state);
    }
}
