//! The network device's own state for a snapshot ([`NetState`]): what the driver negotiated,
//! the MAC the guest knows, and a frame read from the backend the guest has not had yet. The
//! TAP is the host's: a restored device is made over one as before.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_MRG_RXBUF,
};

use super::mac::check_unicast;
use super::{Net, Phase, DEVICE_TYPE_NET, MAX_BUFFER_LEN, VNET_HDR_LEN};
use crate::virtio::{
    check_acked_features, VirtioDevice, VirtioDeviceState, VirtioDeviceStateError,
};

/// The receive offloads among the features: what the TAP is told the guest accepts.
const GUEST_OFFLOADS: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM
    | 1 << VIRTIO_NET_F_GUEST_TSO4
    | 1 << VIRTIO_NET_F_GUEST_TSO6
    | 1 << VIRTIO_NET_F_GUEST_UFO;

/// What a virtio-net device keeps, as plain data for a snapshot.
///
/// Comes back from a file, so [`VirtioDevice::restore_state`] checks it against what a driver
/// could have negotiated and the device could have held.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct NetState {
    /// The MAC address in configuration space, which the guest's interface carries. A restore
    /// puts it back whatever MAC the device was made with.
    pub mac: [u8; 6],
    /// The features the driver accepted at DRIVER_OK; `None` when the device was not activated.
    pub acked_features: Option<u64>,
    /// The receive offloads in effect, as VIRTIO_NET_F_GUEST_* feature bits; the TAP is set to
    /// them on wake. Today they are the GUEST_* bits of the accepted features (0 when not
    /// activated); with a control queue (VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) the driver could
    /// change them, so they are kept on their own.
    pub guest_offloads: u64,
    /// A frame read from the backend that did not fit the receive buffers in hand, vnet header
    /// first: the next one the guest gets.
    pub deferred_frame: Option<Vec<u8>>,
}

/// Why a saved network state is not one the device could have been in.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetStateError {
    /// The MAC is no NIC's own address.
    #[error("MAC {mac:02x?}: {reason}")]
    Mac {
        /// The saved MAC.
        mac: [u8; 6],
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The offloads are not the ones the accepted features give.
    #[error("receive offloads {saved:#x}, where the accepted features give {expected:#x}")]
    GuestOffloads {
        /// The saved offloads.
        saved: u64,
        /// The GUEST_* bits of the accepted features.
        expected: u64,
    },
    /// A frame is deferred by a device that was not activated.
    #[error("a frame is deferred, but the device was not activated")]
    DeferredWithoutActivation,
    /// A frame is deferred without MRG_RXBUF, where a frame is delivered or dropped at once.
    #[error("a frame is deferred, but MRG_RXBUF was not accepted")]
    DeferredWithoutMergeableBuffers,
    /// The deferred frame is shorter than a vnet header or longer than the largest frame.
    #[error("a deferred frame of {0} bytes, not between {VNET_HDR_LEN} and {MAX_BUFFER_LEN}")]
    DeferredFrameLength(usize),
}

impl Net {
    pub(super) fn state(&self) -> NetState {
        let (acked_features, deferred) = match &self.phase {
            Phase::Reset => (None, None),
            Phase::Active(active) => (Some(active.features), active.deferred),
            Phase::Asleep { features, deferred } => (Some(*features), *deferred),
        };
        NetState {
            mac: self.mac,
            acked_features,
            guest_offloads: acked_features.unwrap_or(0) & GUEST_OFFLOADS,
            // Never out of bounds: a deferred length is one read_frame returned.
            deferred_frame: deferred
                .and_then(|len| self.host.rx_frame.get(..len).map(<[u8]>::to_vec)),
        }
    }

    pub(super) fn restore(
        &mut self,
        state: &VirtioDeviceState,
    ) -> Result<(), VirtioDeviceStateError> {
        let VirtioDeviceState::Net(state) = state else {
            return Err(VirtioDeviceStateError::WrongDevice {
                saved: state.device_type(),
                device: DEVICE_TYPE_NET,
            });
        };
        state.check(self.available_features())?;
        let deferred = match &state.deferred_frame {
            Some(frame) => {
                // Checked to fit: at most MAX_BUFFER_LEN, the length of rx_frame.
                let slot = self
                    .host
                    .rx_frame
                    .get_mut(..frame.len())
                    .ok_or(NetStateError::DeferredFrameLength(frame.len()))?;
                slot.copy_from_slice(frame);
                Some(frame.len())
            }
            None => None,
        };
        self.mac = state.mac;
        self.phase = match state.acked_features {
            Some(features) => Phase::Asleep { features, deferred },
            None => Phase::Reset,
        };
        Ok(())
    }
}

impl NetState {
    /// Accepts exactly what the device can reach: a unicast MAC, features a driver may accept
    /// of `offered`, the offloads they give, and a deferred frame only where one can be.
    fn check(&self, offered: u64) -> Result<(), VirtioDeviceStateError> {
        check_unicast(&self.mac).map_err(|reason| NetStateError::Mac {
            mac: self.mac,
            reason,
        })?;
        if let Some(features) = self.acked_features {
            check_acked_features(features, offered)?;
        }
        let expected = self.acked_features.unwrap_or(0) & GUEST_OFFLOADS;
        if self.guest_offloads != expected {
            return Err(NetStateError::GuestOffloads {
                saved: self.guest_offloads,
                expected,
            }
            .into());
        }
        if let Some(frame) = &self.deferred_frame {
            let Some(features) = self.acked_features else {
                return Err(NetStateError::DeferredWithoutActivation.into());
            };
            // Without mergeable buffers a frame meets one buffer in hand, which holds it whole
            // or never will (see `Active::fit`): it is never kept.
            if features & (1 << VIRTIO_NET_F_MRG_RXBUF) == 0 {
                return Err(NetStateError::DeferredWithoutMergeableBuffers.into());
            }
            // What read_frame takes from the backend.
            if !(VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&frame.len()) {
                return Err(NetStateError::DeferredFrameLength(frame.len()).into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use virtio_queue::Queue;

    use super::super::test_driver::*;
    use super::super::RX_QUEUE;
    use super::*;
    use crate::virtio::block::BlockState;
    use crate::virtio::{FeaturesError, QueueT, VIRTIO_F_VERSION_1};

    const FEATURES: u64 = BASE_FEATURES | MRG | 1 << VIRTIO_NET_F_GUEST_CSUM;

    /// A device over a fresh socket pair, made with another MAC than the tests' drivers use.
    fn fresh_net() -> (Net, std::os::unix::net::UnixDatagram, Arc<Mutex<Vec<u32>>>) {
        let (ours, peer) = socket_pair();
        let offloads = Arc::new(Mutex::new(Vec::new()));
        let backend = SocketBackend {
            socket: ours,
            offloads: offloads.clone(),
        };
        let net = Net::with_backend(Box::new(backend), [2, 0, 0, 0, 0, 9]);
        (net, peer, offloads)
    }

    fn good_state() -> NetState {
        NetState {
            mac: [2, 0, 0, 0, 0, 1],
            acked_features: Some(FEATURES),
            guest_offloads: 1 << VIRTIO_NET_F_GUEST_CSUM,
            deferred_frame: Some(frame(200, 5)),
        }
    }

    #[test]
    fn a_restored_device_delivers_the_deferred_frame_once() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, FEATURES);
        driver.post_rx(BUF, 64);
        driver.post_rx(BUF2, 64);
        let big = frame(200, 5);
        driver.inject(&big);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 0);

        let queues = driver.net.sleep().unwrap().unwrap();
        // The two buffers went back to the ring; the frame stayed in the device.
        let rx = &queues[RX_QUEUE];
        assert_eq!((rx.next_avail(), rx.next_used()), (0, 0));
        let state = driver.net.save_state();
        assert_eq!(state, VirtioDeviceState::Net(good_state()));
        let saved_queues: Vec<_> = queues.iter().map(Queue::state).collect();
        let Driver {
            mem, irq, rings, ..
        } = driver;

        let (mut net, peer, offloads) = fresh_net();
        net.restore_state(&state).unwrap();
        assert_eq!(net.save_state(), state);
        assert_eq!(net.mac(), [2, 0, 0, 0, 0, 1]);
        let queues = saved_queues
            .into_iter()
            .map(|q| Queue::try_from(q).unwrap())
            .collect();
        net.wake(mem.clone(), queues, irq.interrupt()).unwrap();
        // The new TAP is told the offloads the guest accepted.
        assert_eq!(*offloads.lock().unwrap(), [libc::TUN_F_CSUM]);
        let mut driver = Driver {
            mem,
            net,
            irq,
            rings,
            peer,
            offloads,
        };
        driver.post_rx(BUF3, 64);
        driver.post_rx(BUF3 + 0x1000, 64);
        // The transport kicks every queue after a wake.
        driver.net.process_queue(RX_QUEUE).unwrap();
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 4);
        let expected = received(&big, 4);
        assert_eq!(driver.guest_bytes(BUF, 64), expected[..64]);
        assert_eq!(driver.guest_bytes(BUF2, 64), expected[64..128]);
        assert_eq!(driver.guest_bytes(BUF3, 64), expected[128..192]);
        assert_eq!(driver.guest_bytes(BUF3 + 0x1000, 20), expected[192..]);
        assert!(driver.interrupted());
        // Once: the device holds nothing more, and the new backend carries the next frame.
        driver.post_rx(BUF, 64);
        driver.net.process_queue(RX_QUEUE).unwrap();
        assert_eq!(driver.used_idx(RX_QUEUE), 4);
        let next = frame(10, 6);
        driver.inject(&next);
        driver.net.process_host_event(0).unwrap();
        assert_eq!(driver.used(RX_QUEUE, 4), (4, 22));
        assert_eq!(driver.guest_bytes(BUF, 22), received(&next, 1));
        assert_eq!(driver.net.stats().rx_frames, 2);
    }

    #[test]
    fn a_reset_device_restores_reset() {
        let (net, _peer, _) = fresh_net();
        let state = net.save_state();
        assert_eq!(
            state,
            VirtioDeviceState::Net(NetState {
                mac: [2, 0, 0, 0, 0, 9],
                acked_features: None,
                guest_offloads: 0,
                deferred_frame: None,
            })
        );
        let (mut net, _peer, _) = fresh_net();
        net.restore_state(&state).unwrap();
        assert!(net.sleep().unwrap().is_none());
        assert_eq!(net.save_state(), state);
    }

    #[test]
    fn a_state_the_device_could_not_reach_is_refused() {
        use NetStateError as N;
        use VirtioDeviceStateError as E;
        let (mut net, _peer, _) = fresh_net();
        let mut refused = |change: &dyn Fn(&mut NetState)| {
            let mut state = good_state();
            change(&mut state);
            net.restore_state(&VirtioDeviceState::Net(state))
                .unwrap_err()
        };
        for mac in [[3, 0, 0, 0, 0, 1], [0; 6]] {
            assert!(matches!(
                refused(&|s| s.mac = mac),
                E::Net(N::Mac { mac: m, .. }) if m == mac
            ));
        }
        // No control queue (17) is offered.
        assert_eq!(
            refused(&|s| s.acked_features = Some(FEATURES | 1 << 17)),
            E::Features(FeaturesError::NotOffered(1 << 17))
        );
        assert_eq!(
            refused(&|s| s.acked_features = Some(FEATURES & !(1 << VIRTIO_F_VERSION_1))),
            E::Features(FeaturesError::NoVersion1)
        );
        assert_eq!(
            refused(&|s| s.guest_offloads = 0),
            E::Net(N::GuestOffloads {
                saved: 0,
                expected: 1 << VIRTIO_NET_F_GUEST_CSUM
            })
        );
        assert_eq!(
            refused(&|s| {
                s.acked_features = None;
                s.guest_offloads = 0;
            }),
            E::Net(N::DeferredWithoutActivation)
        );
        assert_eq!(
            refused(&|s| s.acked_features = Some(FEATURES & !MRG)),
            E::Net(N::DeferredWithoutMergeableBuffers)
        );
        for len in [VNET_HDR_LEN - 1, MAX_BUFFER_LEN + 1] {
            assert_eq!(
                refused(&|s| s.deferred_frame = Some(vec![0; len])),
                E::Net(N::DeferredFrameLength(len))
            );
        }
        let block = VirtioDeviceState::Block(BlockState {
            capacity: 8,
            read_only: false,
            acked_features: None,
            writeback: false,
        });
        assert_eq!(
            net.restore_state(&block).unwrap_err(),
            E::WrongDevice {
                saved: 2,
                device: 1
            }
        );
        // Nothing changed; the good state itself goes through, at both length bounds.
        assert_eq!(net.save_state().acked_features(), None);
        for len in [VNET_HDR_LEN, MAX_BUFFER_LEN] {
            let mut state = good_state();
            state.deferred_frame = Some(vec![0; len]);
            net.restore_state(&VirtioDeviceState::Net(state.clone()))
                .unwrap();
            assert_eq!(net.save_state(), VirtioDeviceState::Net(state));
        }
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_saved_net_device_round_trips_through_json() {
        let state = VirtioDeviceState::Net(good_state());
        let json = serde_json::to_string(&state).unwrap();
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, state);
        let (mut net, _peer, _) = fresh_net();
        net.restore_state(&back).unwrap();
        assert_eq!(net.save_state(), state);
    }
}
