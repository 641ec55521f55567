//! The guest's MAC address: given by the user (checked to be a NIC's own, unicast address) or
//! derived from the TAP name.

use super::{NetDeviceConfig, NetError};

/// The MAC the guest gets for `config`: the configured one, which must be unicast, or the one
/// derived from the TAP name.
pub(super) fn guest_mac(config: &NetDeviceConfig) -> Result<[u8; 6], NetError> {
    match config.mac {
        Some(mac) => {
            check_unicast(&mac).map_err(|reason| NetError::InvalidMac {
                text: format_mac(&mac),
                reason,
            })?;
            Ok(mac)
        }
        None => Ok(mac_for_tap(&config.tap)),
    }
}

/// A MAC address for the guest on TAP `name`: locally administered, unicast, and the same every
/// time for the same name, so the guest keeps its DHCP lease and neighbours their ARP entries
/// across restarts. Hashed with 64-bit FNV-1a; two TAPs on one host have different names, so
/// their VMs differ unless the hash collides in 46 bits.
pub fn mac_for_tap(name: &str) -> [u8; 6] {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = name.bytes().fold(FNV_OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    });
    // The high bytes: FNV's multiply carries every input bit upwards.
    let [a, b, c, d, e, f, _, _] = hash.to_be_bytes();
    // Bit 0 of the first byte is the group (multicast) bit, bit 1 the locally administered bit.
    [a & 0xfe | 0x02, b, c, d, e, f]
}

/// Parses `xx:xx:xx:xx:xx:xx` (hex, either case) into a unicast MAC address.
pub fn parse_mac(text: &str) -> Result<[u8; 6], NetError> {
    let invalid = |reason| NetError::InvalidMac {
        text: text.to_string(),
        reason,
    };
    let mut mac = [0; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(|| invalid(FORMAT))?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid(FORMAT));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid(FORMAT))?;
    }
    if parts.next().is_some() {
        return Err(invalid(FORMAT));
    }
    check_unicast(&mac).map_err(invalid)?;
    Ok(mac)
}

const FORMAT: &str = "expected six two-digit hex bytes separated by colons, like 02:00:00:00:00:01";

/// A NIC's own address must be unicast and not all zeros.
pub(super) fn check_unicast(mac: &[u8; 6]) -> Result<(), &'static str> {
    if mac[0] & 1 != 0 {
        return Err(
            "it is a multicast address (the first byte is odd); use a unicast one, \
                    like 02:00:00:00:00:01",
        );
    }
    if mac == &[0; 6] {
        return Err("the all-zero address is not a valid NIC address");
    }
    Ok(())
}

fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_mac_is_stable_local_and_unicast() {
        let config = |tap: &str, mac| NetDeviceConfig {
            tap: tap.to_string(),
            mac,
        };
        let mac = guest_mac(&config("tap0", None)).unwrap();
        assert_eq!(mac, mac_for_tap("tap0"));
        assert_eq!(mac, guest_mac(&config("tap0", None)).unwrap());
        assert_ne!(mac, mac_for_tap("tap1"));
        for name in ["tap0", "tap1", "", "vm-42", "x"] {
            let mac = mac_for_tap(name);
            assert_eq!(mac[0] & 0x03, 0x02, "{name}: {}", format_mac(&mac));
        }
        let given = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        assert_eq!(guest_mac(&config("tap0", Some(given))).unwrap(), given);
        let multicast = guest_mac(&config("tap0", Some([1, 0, 0x5e, 0, 0, 1])));
        assert!(matches!(multicast, Err(NetError::InvalidMac { .. })));
    }

    #[test]
    fn parse_mac_accepts_only_unicast_colon_hex() {
        assert_eq!(
            parse_mac("02:aB:cd:EF:00:9f").unwrap(),
            [0x02, 0xab, 0xcd, 0xef, 0x00, 0x9f]
        );
        for bad in [
            "",
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "02:00:00:00:00:1",
            "02:00:00:00:00:001",
            "02-00-00-00-00-01",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:+1",
            "02:00:00:00:00:01:",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            let error = parse_mac(bad).unwrap_err();
            assert!(matches!(error, NetError::InvalidMac { .. }), "{bad:?}");
            assert!(error.to_string().contains(bad), "{error}");
        }
    }
}
