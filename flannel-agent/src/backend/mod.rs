//! Backends (flannel's `pkg/backend`): what each puts in its lease and how much MTU it costs.
pub mod hostgw;
pub mod ipip;
pub mod udp;
pub mod vxlan;
pub mod wireguard;

use std::net::Ipv4Addr;

use crate::config::Backend;

/// The pod MTU flannel writes to subnet.env (`FLANNEL_MTU`) for a backend and uplink MTU.
#[must_use]
pub fn mtu(backend: &Backend, uplink_mtu: u32) -> u32 {
    match backend {
        Backend::Vxlan(cfg) => vxlan::mtu(cfg, uplink_mtu),
        Backend::HostGw | Backend::Other(_) => hostgw::mtu(uplink_mtu),
        Backend::Ipip(_) => ipip::mtu(uplink_mtu),
        Backend::Udp(_) => udp::mtu(uplink_mtu),
        Backend::Wireguard(cfg) => wireguard::mtu(cfg, uplink_mtu),
    }
}

/// A locally administered MAC standing for a node without a VTEP (host-gw, ipip, udp): the
/// neighbour entry behind the routes that steer the node's own traffic into `cni0`.
#[must_use]
pub fn placeholder_mac(public_ip: Ipv4Addr) -> Mac {
    let [a, b, c, d] = public_ip.octets();
    Mac([0x0e, 0xfe, a, b, c, d])
}

/// Checks that `ip` can be a node's public IP, the address its peers send tunnel traffic to or
/// route through: not unspecified, broadcast, loopback, multicast or link-local.
pub fn check_public_ip(ip: Ipv4Addr) -> Result<(), String> {
    let what = if ip.is_unspecified() {
        "unspecified"
    } else if ip.is_broadcast() {
        "the broadcast address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip.is_link_local() {
        "a link-local address"
    } else {
        return Ok(());
    };
    Err(format!("PublicIP {ip} is {what}, not a node's address"))
}

/// A MAC address as flannel prints it in leases (`aa:bb:cc:dd:ee:ff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl Mac {
    /// Checks that the MAC can be a VTEP's: a unicast address (bit 0 of the first octet clear),
    /// not all zero.
    pub fn check_unicast(self) -> Result<Self, String> {
        if self.0 == [0; 6] {
            Err(format!("{self} is all zero, not a VTEP's MAC"))
        } else if self.0[0] & 1 != 0 {
            Err(format!("{self} is a multicast MAC, not a VTEP's"))
        } else {
            Ok(self)
        }
    }
}

impl std::str::FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut mac = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut mac {
            let part = parts
                .next()
                .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
            if part.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *byte =
                u8::from_str_radix(part, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        if parts.next().is_some() {
            return Err(format!("{s:?} is not a MAC address"));
        }
        Ok(Self(mac))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_ips_that_cannot_be_a_node_are_refused() {
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "127.0.0.1",
            "224.0.0.1",
            "169.254.1.1",
        ] {
            assert!(check_public_ip(bad.parse().unwrap()).is_err(), "{bad}");
        }
        for good in ["198.18.0.11", "10.0.0.1", "192.168.1.255"] {
            assert!(check_public_ip(good.parse().unwrap()).is_ok(), "{good}");
        }
    }

    #[test]
    fn multicast_and_zero_macs_are_refused() {
        for bad in [
            "00:00:00:00:00:00",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "33:33:00:00:00:01",
        ] {
            assert!(
                bad.parse::<Mac>().unwrap().check_unicast().is_err(),
                "{bad}"
            );
        }
        for good in ["02:00:00:00:00:01", "c6:d2:00:11:22:ff"] {
            assert!(
                good.parse::<Mac>().unwrap().check_unicast().is_ok(),
                "{good}"
            );
        }
    }
}
