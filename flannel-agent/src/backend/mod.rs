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
