//! Backends (flannel's `pkg/backend`): each owns its options (parsed from its `Backend` JSON),
//! its MTU overhead, the `BackendData` it advertises and how it reaches a peer (a tunnel, a
//! direct route with `DirectRouting` on the same segment, a WireGuard peer). [`Backend`] is the
//! backend object net-conf.json's parser hands over.
pub mod hostgw;
pub mod ipip;
pub mod key;
pub mod udp;
pub mod vxlan;
pub mod wireguard;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
};

use flannel_ebpf_common::backend as kind;
use serde_json::{Map, Value};
use tracing::warn;

pub use self::key::Key;
use crate::{
    Error,
    dataplane::wireguard::Peer,
    json::{str_field, u64_field},
    lease::Lease,
};

/// Backend types flannel accepts.
pub const KNOWN_BACKENDS: [&str; 6] = ["vxlan", "host-gw", "udp", "ipip", "wireguard", "alloc"];

/// The `Backend` section of net-conf.json: the backend with its own options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Vxlan(vxlan::VxlanConfig),
    HostGw,
    Ipip(ipip::IpipConfig),
    Udp(udp::UdpConfig),
    Wireguard(wireguard::WireguardConfig),
    /// A backend type flannel knows that this version does not implement (`alloc`).
    Other(String),
}

impl Backend {
    /// The backend's name in net-conf.json.
    #[must_use]
    pub fn name(&self) -> &str {
        match self {
            Self::Vxlan(_) => "vxlan",
            Self::HostGw => "host-gw",
            Self::Ipip(_) => "ipip",
            Self::Udp(_) => "udp",
            Self::Wireguard(_) => "wireguard",
            Self::Other(kind) => kind,
        }
    }

    /// The `BackendType` of this backend's leases (flannel's udp backend leaves it empty).
    #[must_use]
    pub fn lease_type(&self) -> &str {
        match self {
            Self::Udp(_) => "",
            other => other.name(),
        }
    }

    /// Parses net-conf.json's `Backend` object (`path` names the file in errors).
    pub fn parse(path: &Path, backend: Option<&Value>) -> Result<Self, Error> {
        // As flannel's parseBackendType: no Backend at all means udp (the docs say vxlan; the code wins).
        let Some(backend) = backend else {
            return Ok(Self::Udp(udp::UdpConfig {
                port: flannel_ebpf_common::udp::DEFAULT_PORT,
            }));
        };
        let obj = backend
            .as_object()
            .ok_or_else(|| Error::config(path, "Backend", "expected a JSON object"))?;
        let kind = str_field(path, obj, "Type")?
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "vxlan" => Ok(Self::Vxlan(vxlan::VxlanConfig::parse(path, obj)?)),
            "host-gw" => Ok(Self::HostGw),
            "ipip" => Ok(Self::Ipip(ipip::IpipConfig::parse(path, obj)?)),
            "udp" => Ok(Self::Udp(udp::UdpConfig::parse(path, obj)?)),
            "wireguard" => Ok(Self::Wireguard(wireguard::WireguardConfig::parse(
                path, obj,
            )?)),
            "" => Err(Error::config(
                path,
                "Backend.Type",
                "missing (e.g. \"vxlan\")",
            )),
            other if KNOWN_BACKENDS.contains(&other) => Ok(Self::Other(other.into())),
            other => Err(Error::config(
                path,
                "Backend.Type",
                format!(
                    "unknown backend type {other:?} (flannel knows {})",
                    KNOWN_BACKENDS.join(", ")
                ),
            )),
        }
    }

    /// The pod MTU flannel writes to subnet.env (`FLANNEL_MTU`) for an uplink MTU.
    #[must_use]
    pub fn mtu(&self, uplink_mtu: u32) -> u32 {
        match self {
            Self::Vxlan(cfg) => vxlan::mtu(cfg, uplink_mtu),
            Self::HostGw | Self::Other(_) => hostgw::mtu(uplink_mtu),
            Self::Ipip(_) => ipip::mtu(uplink_mtu),
            Self::Udp(_) => udp::mtu(uplink_mtu),
            Self::Wireguard(cfg) => wireguard::mtu(cfg, uplink_mtu),
        }
    }

    /// True if flanneld's kernel objects can carry this backend (the netlink dataplane).
    #[must_use]
    pub fn has_kernel_dataplane(&self) -> bool {
        matches!(self, Self::Vxlan(_) | Self::HostGw)
    }

    /// The `BackendData` this node publishes: vxlan's VNI and VTEP MAC (the one `existing`
    /// already advertises survives restarts; else `fresh_mac`), wireguard's public key and port,
    /// else null.
    #[must_use]
    pub fn advertised(
        &self,
        existing: Option<&Lease>,
        wg_key: Option<&Key>,
        fresh_mac: Mac,
    ) -> Value {
        match self {
            Self::Vxlan(vx) => {
                let mac = existing
                    .filter(|l| l.backend_type == "vxlan")
                    .and_then(|l| vxlan::lease_data(&l.backend_data).ok())
                    .map_or(fresh_mac, |d| d.vtep_mac);
                serde_json::json!({"VNI": vx.vni, "VtepMAC": mac.to_string()})
            }
            Self::Wireguard(wg) => wireguard::advertised(
                wg_key.expect("the key is loaded for the wireguard backend"),
                wg.listen_port,
            ),
            _ => Value::Null,
        }
    }

    /// This node's MAC as its own lease says (vxlan's VtepMAC; a placeholder for the other backends),
    /// after checking the lease advertises what this node is.
    pub fn own_mac(&self, own: &Lease, wg_key: Option<&Key>, source: &Path) -> Result<Mac, Error> {
        let public_ip = own.public_ip;
        let lease_err = |m: String| Error::config(source, format!("lease of {public_ip}"), m);
        Ok(match self {
            Self::Vxlan(vx) => {
                let own_data = vxlan::lease_data(&own.backend_data).map_err(lease_err)?;
                if own_data.vni != vx.vni {
                    warn!(
                        lease_vni = own_data.vni,
                        vni = vx.vni,
                        "this node's lease advertises another VNI than net-conf.json"
                    );
                }
                own_data.vtep_mac
            }
            Self::Wireguard(wg) => {
                let own_data = wireguard::lease_data(&own.backend_data).map_err(lease_err)?;
                if let Some(key) = wg_key
                    && (own_data.public_key != *key || own_data.port != wg.listen_port)
                {
                    return Err(Error::config(
                        source,
                        format!("lease of {public_ip}: BackendData"),
                        format!(
                            "does not match this node: it must be {}",
                            wireguard::advertised(key, wg.listen_port)
                        ),
                    ));
                }
                placeholder_mac(public_ip)
            }
            _ => placeholder_mac(public_ip),
        })
    }

    /// Decides how to reach a peer with lease data `data`, on this node's segment if `direct`.
    pub fn peer(&self, data: &Value, direct: bool, ip: Ipv4Addr) -> Result<Peering, String> {
        Ok(match self {
            Self::Vxlan(vx) => {
                let mac = vxlan::lease_data(data)?.vtep_mac;
                if vx.direct_routing && direct {
                    Peering::Route(kind::HOST_GW, mac)
                } else {
                    Peering::Route(kind::VXLAN, mac)
                }
            }
            Self::HostGw if !direct => Peering::Unreachable,
            Self::HostGw => Peering::Route(kind::HOST_GW, placeholder_mac(ip)),
            Self::Ipip(cfg) => {
                let kind = if cfg.direct_routing && direct {
                    kind::HOST_GW
                } else {
                    kind::IPIP
                };
                Peering::Route(kind, placeholder_mac(ip))
            }
            Self::Udp(_) => Peering::Route(kind::UDP, placeholder_mac(ip)),
            Self::Wireguard(_) => {
                let data = wireguard::lease_data(data)?;
                Peering::Wireguard(Peer {
                    public_key: data.public_key,
                    endpoint: SocketAddrV4::new(ip, data.port),
                })
            }
            Self::Other(_) => Peering::None,
        })
    }
}

/// How this node reaches one peer.
pub enum Peering {
    /// A map route of this backend kind, with the MAC standing for the peer.
    Route(u8, Mac),
    /// A host-gw peer off this node's segment.
    Unreachable,
    Wireguard(Peer),
    None,
}

/// A `Backend.Port`: `default` when absent or 0.
fn port_field(path: &Path, obj: &Map<String, Value>, default: u16) -> Result<u16, Error> {
    let port = u64_field(path, obj, "Port")?.unwrap_or(0);
    match u16::try_from(port) {
        Ok(0) => Ok(default),
        Ok(port) => Ok(port),
        Err(_) => Err(Error::config(
            path,
            "Backend.Port",
            format!("{port} is not a UDP port"),
        )),
    }
}

/// A `Backend.MTU`: 0 (the uplink's) or 68 to 65535.
fn mtu_field(path: &Path, obj: &Map<String, Value>) -> Result<u32, Error> {
    let mtu = u64_field(path, obj, "MTU")?.unwrap_or(0);
    u32::try_from(mtu)
        .ok()
        .filter(|m| *m == 0 || (68..=65_535).contains(m))
        .ok_or_else(|| Error::config(path, "Backend.MTU", format!("{mtu} is not an MTU")))
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
