//! flannel's `net-conf.json` (pkg/subnet/config.go), read with flannel's defaults and checks.
use std::{net::Ipv4Addr, path::Path};

use ipnet::Ipv4Net;
use serde_json::Value;

pub use crate::backend::{
    Backend, KNOWN_BACKENDS, ipip::IpipConfig, udp::UdpConfig, vxlan::VxlanConfig,
    wireguard::WireguardConfig,
};
use crate::{
    Error,
    json::{addr_field, bool_field, field, str_field, u64_field},
};

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
    let backend = Backend::parse(path, field(obj, "Backend"))?;
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
