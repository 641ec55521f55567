//! A container's network, given to its VM (Kata Containers' "tcfilter" model).
//!
//! The engine (podman's netavark/CNI, containerd's CNI) prepares a network namespace with a veth
//! in it, its addresses and routes set, and names it in `linux.namespaces`. ember-runtime joins
//! that namespace before it starts the monitor (which thus runs in it too), and for each veth:
//! makes a TAP beside it, redirects every frame arriving on one to the other with tc (ingress
//! qdisc, u32 match-all, mirred egress redirect), and has the guest's interface take the veth's
//! MAC, IPv4 address, default route and MTU (through the monitor's `--net …,ip=,gw=,mtu=`, which
//! the guest agent applies). The guest then answers for the container's address on the
//! container's network: the bridge, the other containers and the host see no difference. The
//! veth keeps its address; its own stack never sees a frame, tc takes them all first.
//!
//! iproute2's `ip` and `tc`, not netlink by hand: this runs once per container in a short-lived
//! process, every host an engine runs on has iproute2, and tc's actions over raw netlink would
//! be hundreds of lines of attribute encoding. Their JSON output (`ip -j`) is parsed, not text.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// The TAPs ember-runtime makes: `ember-tap0`, … (IFNAMSIZ allows 15 characters).
const TAP_PREFIX: &str = "ember-tap";

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot open the network namespace {0}: {1}")]
    Open(PathBuf, #[source] io::Error),
    #[error("cannot join the network namespace {0}: {1}")]
    Join(PathBuf, #[source] io::Error),
    #[error("cannot make a network namespace for the VM: {0}")]
    Unshare(#[source] io::Error),
    #[error("cannot run {0} (install iproute2): {1}")]
    Spawn(String, #[source] io::Error),
    #[error("`{0}` failed: {1}")]
    Command(String, String),
    #[error("cannot read the output of `{0}`: {1}")]
    Parse(String, #[source] serde_json::Error),
}

/// Where the container's network is, from `linux.namespaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Namespace {
    /// A namespace the engine prepared (`{"type":"network","path":…}`).
    Join(PathBuf),
    /// A new, empty one (`{"type":"network"}`): the VM has no network.
    New,
}

/// Puts this process (single-threaded: the runtime, before it starts the monitor) into the
/// container's network namespace; the monitor inherits it.
pub fn enter(namespace: &Namespace) -> Result<(), NetworkError> {
    match namespace {
        Namespace::Join(path) => {
            let file = File::open(path).map_err(|e| NetworkError::Open(path.clone(), e))?;
            // SAFETY: setns on a descriptor we own; it changes this thread's namespace only.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(NetworkError::Join(path.clone(), io::Error::last_os_error()));
            }
        }
        Namespace::New => {
            // SAFETY: unshare has no memory arguments.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } < 0 {
                return Err(NetworkError::Unshare(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    link_type: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    mtu: u32,
}

#[derive(Debug, Deserialize)]
struct LinkAddresses {
    #[serde(default)]
    addr_info: Vec<Address>,
}

#[derive(Debug, Deserialize)]
struct Address {
    family: String,
    local: String,
    prefixlen: u8,
    #[serde(default)]
    scope: String,
}

#[derive(Debug, Deserialize)]
struct Route {
    dst: String,
    #[serde(default)]
    gateway: Option<String>,
}

/// Gives each Ethernet interface of the current namespace (the veths the engine made) a TAP and
/// the tc redirects; returns the monitor's `--net` values. Adds to `skipped` what could not be
/// carried over (the caller logs it), and to `taps` each TAP as it is made (the caller removes
/// them should anything later fail).
pub fn plumb(
    skipped: &mut Vec<String>,
    taps: &mut Vec<String>,
) -> Result<Vec<String>, NetworkError> {
    let links: Vec<Link> = ip_json(&["link", "show"])?;
    let mut plumbed = Vec::new();
    for link in links
        .iter()
        .filter(|l| l.link_type == "ether" && !l.ifname.starts_with(TAP_PREFIX))
    {
        let tap = format!("{TAP_PREFIX}{}", plumbed.len());
        let addresses: Vec<LinkAddresses> = ip_json(&["addr", "show", "dev", &link.ifname])?;
        let mut ipv4 = None;
        for address in addresses.iter().flat_map(|a| &a.addr_info) {
            match (address.family.as_str(), address.scope.as_str()) {
                ("inet", _) if ipv4.is_none() => {
                    ipv4 = address
                        .local
                        .parse::<Ipv4Addr>()
                        .ok()
                        .map(|a| (a, address.prefixlen))
                }
                ("inet", _) => skipped.push(format!(
                    "{}: the address {}/{} (the guest takes one IPv4 address)",
                    link.ifname, address.local, address.prefixlen
                )),
                ("inet6", "global") => skipped.push(format!(
                    "{}: the IPv6 address {}/{} (the guest kernel has no IPv6)",
                    link.ifname, address.local, address.prefixlen
                )),
                _ => {}
            }
        }
        let routes: Vec<Route> = ip_json(&["-4", "route", "show", "dev", &link.ifname])?;
        let mut gateway = None;
        for route in &routes {
            match (route.dst.as_str(), &route.gateway) {
                ("default", Some(via)) if gateway.is_none() => {
                    gateway = via.parse::<Ipv4Addr>().ok()
                }
                // The subnet's own route comes with the address.
                (_, None) => {}
                (dst, Some(via)) => skipped.push(format!(
                    "{}: the route to {dst} via {via} (the guest takes a default route only)",
                    link.ifname
                )),
            }
        }
        let mtu = link.mtu.to_string();
        run("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        taps.push(tap.clone());
        run("ip", &["link", "set", "dev", &tap, "mtu", &mtu, "up"])?;
        redirect(&link.ifname, &tap)?;
        redirect(&tap, &link.ifname)?;
        let mut net_arg = format!("tap={tap},mac={},mtu={mtu}", link.address);
        if let Some((address, prefix)) = ipv4 {
            net_arg.push_str(&format!(",ip={address}/{prefix}"));
        }
        if let Some(gateway) = gateway {
            net_arg.push_str(&format!(",gw={gateway}"));
        }
        plumbed.push(net_arg);
    }
    Ok(plumbed)
}

/// Every frame that arrives on `from` leaves through `to`.
fn redirect(from: &str, to: &str) -> Result<(), NetworkError> {
    run("tc", &["qdisc", "add", "dev", from, "ingress"])?;
    run(
        "tc",
        &[
            "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32", "match",
            "u8", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
        ],
    )
}

/// Removes the TAPs `create` made, if their namespace is still there (an engine that destroys the
/// namespace takes them with it). Best effort: `delete` must not fail on a network already gone.
pub fn unplumb(namespace: &Path, taps: &[String]) {
    if taps.is_empty() || enter(&Namespace::Join(namespace.to_path_buf())).is_err() {
        return;
    }
    for tap in taps {
        let _ = run("ip", &["link", "del", "dev", tap]);
    }
}

fn ip_json<T: serde::de::DeserializeOwned>(args: &[&str]) -> Result<T, NetworkError> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let output = run_for_output("ip", &full)?;
    serde_json::from_slice(&output).map_err(|e| NetworkError::Parse(describe("ip", &full), e))
}

fn run(program: &str, args: &[&str]) -> Result<(), NetworkError> {
    run_for_output(program, args).map(drop)
}

fn run_for_output(program: &str, args: &[&str]) -> Result<Vec<u8>, NetworkError> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| NetworkError::Spawn(program.to_string(), e))?;
    if !output.status.success() {
        return Err(NetworkError::Command(
            describe(program, args),
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    Ok(output.stdout)
}

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iproute2_json_is_read() {
        let links: Vec<Link> = serde_json::from_str(
            r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK"],"mtu":65536,
                 "link_type":"loopback","address":"00:00:00:00:00:00"},
                {"ifindex":2,"link_index":4,"ifname":"eth0","mtu":1500,"link_type":"ether",
                 "address":"9e:4c:ea:7b:8c:ff","link_netnsid":0}]"#,
        )
        .unwrap();
        assert_eq!(links[1].ifname, "eth0");
        assert_eq!(links[1].mtu, 1500);
        let addresses: Vec<LinkAddresses> = serde_json::from_str(
            r#"[{"ifindex":2,"ifname":"eth0","addr_info":[
                {"family":"inet","local":"10.88.0.3","prefixlen":16,"scope":"global"},
                {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#,
        )
        .unwrap();
        assert_eq!(addresses[0].addr_info[0].local, "10.88.0.3");
        let routes: Vec<Route> = serde_json::from_str(
            r#"[{"dst":"default","gateway":"10.88.0.1","dev":"eth0","flags":[]},
                {"dst":"10.88.0.0/16","dev":"eth0","scope":"link","prefsrc":"10.88.0.3"}]"#,
        )
        .unwrap();
        assert_eq!(routes[0].gateway.as_deref(), Some("10.88.0.1"));
        assert_eq!(routes[1].gateway, None);
    }
}
