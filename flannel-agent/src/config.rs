//! flannel's `net-conf.json` (pkg/subnet/config.go), read with flannel's defaults and checks.
use std::{net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use serde_json::{Map, Value};

use crate::{Error, json::field};

/// A parsed and validated network configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// `Network`: the whole pod network.
    pub network: Ipv4Net,
    /// `SubnetLen`: the prefix length of each node's subnet.
    pub subnet_len: u8,
    /// `SubnetMin` / `SubnetMax` (used by the etcd subnet manager).
    pub subnet_min: Ipv4Addr,
    pub subnet_max: Ipv4Addr,
    pub backend: Backend,
    /// `EnableNFTables`: masquerade and forward rules as nftables tables instead of iptables
    /// chains (where the kernel's rules are used).
    pub enable_nftables: bool,
}

/// The `Backend` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Vxlan(VxlanConfig),
    HostGw,
    Ipip(IpipConfig),
    Udp(UdpConfig),
    Wireguard(WireguardConfig),
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
}

/// `Backend` options of the ipip backend (pkg/backend/ipip/ipip.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipConfig {
    pub direct_routing: bool,
}

/// `Backend` options of the udp backend (pkg/backend/udp/udp.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// UDP port, source and destination (default 8285).
    pub port: u16,
}

/// `Backend` options of the wireguard backend (pkg/backend/wireguard/wireguard.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardConfig {
    /// `ListenPort` (default 51820).
    pub listen_port: u16,
    /// `PSK`: a pre-shared key (base64), if any.
    pub psk: Option<String>,
    /// `PersistentKeepaliveInterval` in seconds (0: off).
    pub persistent_keepalive: u16,
    /// `MTU` before the overhead (0: the uplink's); the device gets it minus 80.
    pub mtu: u32,
    /// `Mode`: `separate` (default), `auto` or `ipv4` (IPv6 networks are not supported).
    pub mode: String,
}

/// `Backend` options of the vxlan backend (pkg/backend/vxlan/vxlan.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanConfig {
    pub vni: u32,
    /// UDP port; flannel's 0 means the kernel default, 8472.
    pub port: u16,
    /// Device MTU override; 0 means uplink MTU minus the overhead.
    pub mtu: u32,
    pub gbp: bool,
    pub direct_routing: bool,
}

/// flannel's udp backend port.
pub const UDP_DEFAULT_PORT: u16 = 8285;
/// flannel's wireguard `ListenPort` default.
pub const WIREGUARD_DEFAULT_PORT: u16 = 51_820;

/// Backend types flannel accepts.
pub const KNOWN_BACKENDS: [&str; 6] = ["vxlan", "host-gw", "udp", "ipip", "wireguard", "alloc"];

/// Reads and validates `net-conf.json`.
pub fn load(path: &Path) -> Result<NetConf, Error> {
    let text = crate::file::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    parse(path, &text)
}

/// Parses the text of `net-conf.json` (`path` only names it in errors).
pub fn parse(path: &Path, text: &str) -> Result<NetConf, Error> {
    let value: Value = serde_json::from_str(text).map_err(|source| Error::Json {
        path: path.into(),
        source,
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| Error::config(path, "(top level)", "expected a JSON object"))?;
    if let Some(false) = bool_field(path, obj, "EnableIPv4")? {
        return Err(Error::Unsupported(format!(
            "{}: EnableIPv4 is false: flannel-ebpf supports IPv4 pod networks only",
            path.display()
        )));
    }
    if let Some(true) = bool_field(path, obj, "EnableIPv6")? {
        return Err(Error::Unsupported(format!(
            "{}: EnableIPv6: IPv6 pod networks are not supported by flannel-ebpf",
            path.display()
        )));
    }
    let network: Ipv4Net = str_field(path, obj, "Network")?
        .ok_or_else(|| Error::config(path, "Network", "missing (e.g. \"10.244.0.0/16\")"))?
        .parse()
        .map_err(|e| Error::config(path, "Network", format!("not an IPv4 CIDR: {e}")))?;
    let network = network.trunc();
    if network.prefix_len() > 28 {
        return Err(Error::config(
            path,
            "Network",
            format!("{network} is too small: the minimum useful network prefix is /28"),
        ));
    }
    let subnet_len = match u64_field(path, obj, "SubnetLen")? {
        Some(0) | None => {
            if network.prefix_len() < 23 {
                24
            } else {
                network.prefix_len() + 2
            }
        }
        Some(len) => {
            u8::try_from(len).map_err(|_| Error::config(path, "SubnetLen", "out of range"))?
        }
    };
    if subnet_len < network.prefix_len() {
        return Err(Error::config(
            path,
            "SubnetLen",
            format!("/{subnet_len} is larger than the Network {network}"),
        ));
    }
    if subnet_len > 30 {
        return Err(Error::config(
            path,
            "SubnetLen",
            format!("/{subnet_len} is smaller than /30"),
        ));
    }
    let first = Ipv4Net::new(network.network(), subnet_len).expect("prefix checked above");
    let step = 1u32 << (32 - subnet_len);
    let default_min = Ipv4Addr::from(u32::from(first.network()) + step);
    let last = u32::from(network.broadcast()) & !(step - 1);
    let default_max = Ipv4Addr::from(last);
    let subnet_min = addr_field(path, obj, "SubnetMin")?.unwrap_or(default_min);
    let subnet_max = addr_field(path, obj, "SubnetMax")?.unwrap_or(default_max);
    for (name, addr) in [("SubnetMin", subnet_min), ("SubnetMax", subnet_max)] {
        if !network.contains(&addr) {
            return Err(Error::config(
                path,
                name,
                format!("{addr} is not in Network {network}"),
            ));
        }
    }
    let backend = parse_backend(path, field(obj, "Backend"))?;
    let enable_nftables = bool_field(path, obj, "EnableNFTables")?.unwrap_or(false);
    Ok(NetConf {
        network,
        subnet_len,
        subnet_min,
        subnet_max,
        backend,
        enable_nftables,
    })
}

fn parse_backend(path: &Path, backend: Option<&Value>) -> Result<Backend, Error> {
    // As flannel's parseBackendType: no Backend at all means udp (the docs say vxlan; the code wins).
    let Some(backend) = backend else {
        return Ok(Backend::Udp(UdpConfig {
            port: UDP_DEFAULT_PORT,
        }));
    };
    let obj = backend
        .as_object()
        .ok_or_else(|| Error::config(path, "Backend", "expected a JSON object"))?;
    let kind = str_field(path, obj, "Type")?
        .unwrap_or_default()
        .to_string();
    let port = |default: u16| -> Result<u16, Error> {
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
    };
    let mtu = || -> Result<u32, Error> {
        let mtu = u64_field(path, obj, "MTU")?.unwrap_or(0);
        u32::try_from(mtu)
            .ok()
            .filter(|m| *m == 0 || (68..=65_535).contains(m))
            .ok_or_else(|| Error::config(path, "Backend.MTU", format!("{mtu} is not an MTU")))
    };
    let direct_routing = bool_field(path, obj, "DirectRouting")?.unwrap_or(false);
    match kind.as_str() {
        "vxlan" => {
            let vni = u64_field(path, obj, "VNI")?.unwrap_or(1);
            let vni = u32::try_from(vni)
                .ok()
                .filter(|v| *v < 1 << 24)
                .ok_or_else(|| {
                    Error::config(
                        path,
                        "Backend.VNI",
                        format!("{vni} does not fit in 24 bits"),
                    )
                })?;
            Ok(Backend::Vxlan(VxlanConfig {
                vni,
                port: port(flannel_ebpf_common::vxlan::DEFAULT_PORT)?,
                mtu: mtu()?,
                gbp: bool_field(path, obj, "GBP")?.unwrap_or(false),
                direct_routing,
            }))
        }
        "host-gw" => Ok(Backend::HostGw),
        "ipip" => Ok(Backend::Ipip(IpipConfig { direct_routing })),
        "udp" => Ok(Backend::Udp(UdpConfig {
            port: port(UDP_DEFAULT_PORT)?,
        })),
        "wireguard" => parse_wireguard(path, obj, mtu()?),
        "" => Err(Error::config(
            path,
            "Backend.Type",
            "missing (e.g. \"vxlan\")",
        )),
        other if KNOWN_BACKENDS.contains(&other) => Ok(Backend::Other(other.into())),
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

/// The wireguard backend's options.
fn parse_wireguard(path: &Path, obj: &Map<String, Value>, mtu: u32) -> Result<Backend, Error> {
    let listen_port = u64_field(path, obj, "ListenPort")?.unwrap_or(0);
    let listen_port = match u16::try_from(listen_port) {
        Ok(0) => WIREGUARD_DEFAULT_PORT,
        Ok(p) => p,
        Err(_) => {
            return Err(Error::config(
                path,
                "Backend.ListenPort",
                format!("{listen_port} is not a UDP port"),
            ));
        }
    };
    let psk = str_field(path, obj, "PSK")?
        .filter(|s| !s.is_empty())
        .map(|s| {
            crate::backend::wireguard::Key::from_base64(s)
                .map(|_| s.to_string())
                .map_err(|e| Error::config(path, "Backend.PSK", e))
        })
        .transpose()?;
    let keepalive = u64_field(path, obj, "PersistentKeepaliveInterval")?.unwrap_or(0);
    let persistent_keepalive = u16::try_from(keepalive).map_err(|_| {
        Error::config(
            path,
            "Backend.PersistentKeepaliveInterval",
            format!("{keepalive} s is out of range (at most 65535)"),
        )
    })?;
    let mode = str_field(path, obj, "Mode")?
        .filter(|s| !s.is_empty())
        .unwrap_or("separate")
        .to_string();
    match mode.as_str() {
        "separate" | "auto" | "ipv4" => {}
        "ipv6" => {
            return Err(Error::Unsupported(format!(
                "{}: Backend.Mode \"ipv6\": IPv6 pod networks are not supported by flannel-ebpf",
                path.display()
            )));
        }
        other => {
            return Err(Error::config(
                path,
                "Backend.Mode",
                format!("unknown mode {other:?} (separate, auto, ipv4 or ipv6)"),
            ));
        }
    }
    Ok(Backend::Wireguard(WireguardConfig {
        listen_port,
        psk,
        persistent_keepalive,
        mtu,
        mode,
    }))
}

fn str_field<'a>(
    path: &Path,
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, Error> {
    field(obj, key)
        .map(|v| {
            v.as_str()
                .ok_or_else(|| Error::config(path, key, "expected a string"))
        })
        .transpose()
}

fn u64_field(path: &Path, obj: &Map<String, Value>, key: &str) -> Result<Option<u64>, Error> {
    field(obj, key)
        .map(|v| {
            v.as_u64()
                .ok_or_else(|| Error::config(path, key, "expected a non-negative integer"))
        })
        .transpose()
}

fn bool_field(path: &Path, obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, Error> {
    field(obj, key)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| Error::config(path, key, "expected true or false"))
        })
        .transpose()
}

fn addr_field(path: &Path, obj: &Map<String, Value>, key: &str) -> Result<Option<Ipv4Addr>, Error> {
    str_field(path, obj, key)?
        .map(|s| {
            s.parse()
                .map_err(|_| Error::config(path, key, format!("{s:?} is not an IPv4 address")))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<NetConf, Error> {
        parse(Path::new("net-conf.json"), text)
    }

    #[test]
    fn defaults_as_flannel() {
        let c = p(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(c.subnet_max, Ipv4Addr::new(10, 244, 255, 0));
        assert_eq!(
            c.backend,
            Backend::Vxlan(VxlanConfig {
                vni: 1,
                port: 8472,
                mtu: 0,
                gbp: false,
                direct_routing: false
            })
        );
        // A small network is split into four.
        assert_eq!(
            p(r#"{"Network":"10.0.0.0/24","Backend":{"Type":"vxlan"}}"#)
                .unwrap()
                .subnet_len,
            26
        );
    }

    #[test]
    fn missing_backend_is_udp_and_keys_are_case_insensitive() {
        let c = p(r#"{"network":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(c.backend, Backend::Udp(UdpConfig { port: 8285 }));
        let c = p(r#"{"Network":"10.244.0.0/16","backend":{"type":"vxlan","vni":42,"port":4789}}"#)
            .unwrap();
        let Backend::Vxlan(v) = c.backend else {
            panic!("not vxlan")
        };
        assert_eq!((v.vni, v.port), (42, 4789));
    }

    #[test]
    fn errors_name_the_field() {
        let e = p(r#"{"Backend":{"Type":"vxlan"}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("net-conf.json: Network: missing"), "{e}");
        let e = p(r#"{"Network":"10.244.0.0/30"}"#).unwrap_err().to_string();
        assert!(e.contains("Network") && e.contains("/28"), "{e}");
        let e = p(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"geneve"}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Backend.Type: unknown backend type \"geneve\""),
            "{e}"
        );
        let e = p(r#"{"Network":"10.244.0.0/16","SubnetLen":31}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("SubnetLen"), "{e}");
        let e = p(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":16777216}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Backend.VNI"), "{e}");
        let e = p("{not json").unwrap_err().to_string();
        assert!(e.contains("net-conf.json: invalid JSON"), "{e}");
    }

    #[test]
    fn every_backend_with_flannels_defaults() {
        let b = |json: &str| {
            p(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{json}}}"#
            ))
            .map(|c| c.backend)
        };
        assert_eq!(b(r#"{"Type":"host-gw"}"#).unwrap(), Backend::HostGw);
        assert_eq!(
            b(r#"{"Type":"ipip","DirectRouting":true}"#).unwrap(),
            Backend::Ipip(IpipConfig {
                direct_routing: true
            })
        );
        assert_eq!(
            b(r#"{"Type":"udp"}"#).unwrap(),
            Backend::Udp(UdpConfig { port: 8285 })
        );
        assert_eq!(
            b(r#"{"Type":"udp","Port":9000}"#).unwrap(),
            Backend::Udp(UdpConfig { port: 9000 })
        );
        assert_eq!(
            b(r#"{"Type":"wireguard"}"#).unwrap(),
            Backend::Wireguard(WireguardConfig {
                listen_port: 51820,
                psk: None,
                persistent_keepalive: 0,
                mtu: 0,
                mode: "separate".into(),
            })
        );
        let Backend::Wireguard(wg) = b(
            r#"{"Type":"wireguard","ListenPort":51000,"PersistentKeepaliveInterval":25,"MTU":1400,"Mode":"auto"}"#,
        )
        .unwrap() else {
            panic!("not wireguard")
        };
        assert_eq!(
            (
                wg.listen_port,
                wg.persistent_keepalive,
                wg.mtu,
                wg.mode.as_str()
            ),
            (51000, 25, 1400, "auto")
        );
        let Backend::Vxlan(vx) = b(r#"{"Type":"vxlan","DirectRouting":true}"#).unwrap() else {
            panic!("not vxlan")
        };
        assert!(vx.direct_routing);
        assert_eq!(
            b(r#"{"Type":"alloc"}"#).unwrap(),
            Backend::Other("alloc".into())
        );
        assert_eq!(Backend::Udp(UdpConfig { port: 8285 }).lease_type(), "");
        assert_eq!(Backend::HostGw.lease_type(), "host-gw");
    }

    #[test]
    fn bad_backend_options_are_named() {
        let e = |json: &str| {
            p(&format!(
                r#"{{"Network":"10.244.0.0/16","Backend":{json}}}"#
            ))
            .unwrap_err()
            .to_string()
        };
        assert!(e(r#"{"Type":"udp","Port":70000}"#).contains("Backend.Port"));
        assert!(e(r#"{"Type":"udp","Port":"x"}"#).contains("Port"));
        assert!(e(r#"{"Type":"ipip","DirectRouting":"yes"}"#).contains("DirectRouting"));
        assert!(e(r#"{"Type":"wireguard","ListenPort":65536}"#).contains("Backend.ListenPort"));
        assert!(e(r#"{"Type":"wireguard","PSK":"not base64"}"#).contains("Backend.PSK"));
        assert!(e(r#"{"Type":"wireguard","Mode":"both"}"#).contains("Backend.Mode"));
        assert!(e(r#"{"Type":"wireguard","Mode":"ipv6"}"#).contains("IPv6"));
        assert!(
            e(r#"{"Type":"wireguard","PersistentKeepaliveInterval":70000}"#)
                .contains("PersistentKeepaliveInterval")
        );
        assert!(e(r#"{"Type":"vxlan","MTU":20}"#).contains("Backend.MTU"));
        assert!(e(r#"{"Type":"Vxlan"}"#).contains("unknown backend type"));
        assert!(e(r#"{"Port":1}"#).contains("Backend.Type: missing"));
    }
}
