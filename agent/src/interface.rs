//! How the host describes a guest network interface to the agent: `NAME:ADDRESS/PREFIX:GATEWAY:MTU`
//! (the address, gateway and MTU may each be empty), several joined by commas.
//!
//! The monitor writes it on the kernel command line (`ember.net=`), the guest's init hands it to
//! the agent (`--net`), and the agent configures the interfaces before it says it is ready. Both
//! sides link this one definition, so they agree on the format. IPv4 only: the default guest
//! kernel has no IPv6.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Longest interface name the kernel takes (IFNAMSIZ less the terminating NUL).
pub const MAX_NAME_LEN: usize = 15;

/// One interface's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceConfig {
    /// `eth0`, `eth1`, … in the order of the VM's network devices.
    pub name: String,
    /// The address and its prefix length.
    pub address: Option<(Ipv4Addr, u8)>,
    /// The default route's next hop.
    pub gateway: Option<Ipv4Addr>,
    /// The interface's MTU.
    pub mtu: Option<u32>,
}

impl fmt::Display for InterfaceConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.name)?;
        if let Some((address, prefix)) = self.address {
            write!(f, "{address}/{prefix}")?;
        }
        f.write_str(":")?;
        if let Some(gateway) = self.gateway {
            write!(f, "{gateway}")?;
        }
        f.write_str(":")?;
        if let Some(mtu) = self.mtu {
            write!(f, "{mtu}")?;
        }
        Ok(())
    }
}

impl FromStr for InterfaceConfig {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("bad interface {text:?}: {why} (want NAME:ADDRESS/PREFIX:GATEWAY:MTU)")
        };
        let [name, address, gateway, mtu] = text.split(':').collect::<Vec<_>>()[..] else {
            return Err(bad("not four fields"));
        };
        if name.is_empty()
            || name.len() > MAX_NAME_LEN
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("bad name"));
        }
        let address = match address {
            "" => None,
            _ => Some(parse_cidr(address).ok_or_else(|| bad("bad address"))?),
        };
        let gateway = match gateway {
            "" => None,
            _ => Some(gateway.parse().map_err(|_| bad("bad gateway"))?),
        };
        let mtu = match mtu {
            "" => None,
            _ => Some(
                mtu.parse()
                    .ok()
                    .filter(|m| (68..=65535).contains(m))
                    .ok_or_else(|| bad("bad MTU"))?,
            ),
        };
        Ok(InterfaceConfig {
            name: name.to_string(),
            address,
            gateway,
            mtu,
        })
    }
}

/// `10.88.0.5/16` → the address and the prefix length.
pub fn parse_cidr(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (address, prefix) = text.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some((address.parse().ok()?, prefix))
}

/// A comma-separated list of interfaces.
pub fn parse_list(text: &str) -> Result<Vec<InterfaceConfig>, String> {
    text.split(',')
        .filter(|item| !item.is_empty())
        .map(str::parse)
        .collect()
}

/// The netmask of a prefix length: 16 → 255.255.0.0.
pub fn netmask(prefix: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_its_text() {
        let full = InterfaceConfig {
            name: "eth0".into(),
            address: Some((Ipv4Addr::new(10, 88, 0, 5), 16)),
            gateway: Some(Ipv4Addr::new(10, 88, 0, 1)),
            mtu: Some(1500),
        };
        assert_eq!(full.to_string(), "eth0:10.88.0.5/16:10.88.0.1:1500");
        let bare = InterfaceConfig {
            name: "eth1".into(),
            address: None,
            gateway: None,
            mtu: None,
        };
        assert_eq!(bare.to_string(), "eth1:::");
        let list = parse_list(&format!("{full},{bare}")).unwrap();
        assert_eq!(list, [full, bare]);
    }

    #[test]
    fn bad_fields_are_refused() {
        for text in [
            "eth0",
            "eth0:10.88.0.5:10.88.0.1:1500",
            "eth0:10.88.0.5/33::",
            "eth0::gw:",
            "eth0:::70000",
            "eth0:::10",
            ":::",
            "a-very-long-interface-name:::",
            "eth/0:::",
            "eth0:1::2/64::",
        ] {
            assert!(text.parse::<InterfaceConfig>().is_err(), "{text}");
        }
    }

    #[test]
    fn netmasks_of_prefixes() {
        assert_eq!(netmask(16), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(netmask(23), Ipv4Addr::new(255, 255, 254, 0));
    }
}
