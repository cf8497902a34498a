//! The wireguard backend's device, `flannel-wg`, as flanneld programs it: this node's private
//! key and `ListenPort`, MTU, the lease subnet's address as /32, one route for the whole Network on
//! the device, and one peer per remote lease (endpoint = its public IP and port, allowed IPs = its
//! subnet, `PSK` and `PersistentKeepaliveInterval` from net-conf.json).
//!
//! The device is served by `wireguard-go` (Debian's userspace WireGuard over a TUN device) and
//! configured through WireGuard's cross-platform configuration protocol on its socket
//! `/var/run/wireguard/flannel-wg.sock`. That is the path on kernels without the WireGuard module,
//! such as the one this project is tested on; where the module exists the agent says so and still
//! uses the userspace device (configuring the kernel's over generic netlink is not implemented).
//! A running device is adopted by a restarted agent rather than recreated (flanneld recreates it),
//! so an agent restart does not interrupt traffic.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        route::{RouteScope, RouteType},
    },
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

use super::{SyncReport, routes::PROTO};
use crate::{
    Error,
    backend::wireguard::Key,
    config::WireguardConfig,
    iface::{Link, Netlink},
};

/// flanneld's device name (IPv4).
pub const DEVICE: &str = "flannel-wg";
/// Where userspace WireGuard implementations serve their configuration sockets.
const SOCKET_DIR: &str = "/var/run/wireguard";
/// The userspace implementation started where there is no running device.
const USERSPACE: &str = "wireguard-go";

/// One remote node as a WireGuard peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub public_key: Key,
    pub endpoint: SocketAddrV4,
}

/// The `flannel-wg` device.
pub struct WireguardDevice {
    cfg: WireguardConfig,
    psk: Option<Key>,
}

fn wg_err(context: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::Wireguard {
        context: context.into(),
        message: message.to_string(),
    }
}

fn socket_path() -> PathBuf {
    PathBuf::from(SOCKET_DIR).join(format!("{DEVICE}.sock"))
}

/// One request on the configuration socket; returns the response's key/value lines (without
/// the final `errno`), or the error the device reported.
async fn uapi(request: &str) -> Result<Vec<(String, String)>, Error> {
    let path = socket_path();
    let exchange = async {
        let mut sock = tokio::net::UnixStream::connect(&path).await?;
        sock.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buf[..n]);
            if response.ends_with(b"\n\n") {
                break;
            }
        }
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| wg_err(path.display().to_string(), "no answer within 5 s"))?
        .map_err(|e| wg_err(path.display().to_string(), e))?;
    parse_response(&response).map_err(|m| wg_err(path.display().to_string(), m))
}

/// Splits a configuration-protocol response into key/value pairs and checks its `errno`.
fn parse_response(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    let mut errno = None;
    for line in text.lines().filter(|l| !l.is_empty()) {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("unexpected line {line:?}"))?;
        if k == "errno" {
            errno = Some(v.to_string());
        } else {
            pairs.push((k.to_string(), v.to_string()));
        }
    }
    match errno.as_deref() {
        Some("0") => Ok(pairs),
        Some(e) => Err(format!("the device refused the configuration (errno {e})")),
        None => Err("incomplete response".into()),
    }
}

/// A peer as the device reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DevicePeer {
    endpoint: Option<String>,
    allowed_ips: Vec<String>,
    psk: Option<String>,
    keepalive: u16,
}

/// The device's listen port and peers from a `get` response.
fn parse_device(pairs: &[(String, String)]) -> (Option<u16>, BTreeMap<String, DevicePeer>) {
    let mut port = None;
    let mut peers: BTreeMap<String, DevicePeer> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (k, v) in pairs {
        match (k.as_str(), &current) {
            ("listen_port", None) => port = v.parse().ok(),
            ("public_key", _) => {
                peers.entry(v.clone()).or_default();
                current = Some(v.clone());
            }
            ("endpoint", Some(p)) => peers.entry(p.clone()).or_default().endpoint = Some(v.clone()),
            ("allowed_ip", Some(p)) => peers
                .entry(p.clone())
                .or_default()
                .allowed_ips
                .push(v.clone()),
            ("preshared_key", Some(p)) if v.chars().any(|c| c != '0') => {
                peers.entry(p.clone()).or_default().psk = Some(v.clone());
            }
            ("persistent_keepalive_interval", Some(p)) => {
                peers.entry(p.clone()).or_default().keepalive = v.parse().unwrap_or(0);
            }
            _ => {}
        }
    }
    (port, peers)
}

impl WireguardDevice {
    /// Makes `flannel-wg` exist and carry this node's key, port, MTU, address and route: adopts a
    /// running device, or starts the userspace implementation.
    pub async fn ensure(
        nl: &Netlink,
        cfg: &WireguardConfig,
        key: &Key,
        own: Ipv4Net,
        network: Ipv4Net,
        mtu: u32,
    ) -> Result<Self, Error> {
        let psk = cfg
            .psk
            .as_deref()
            .map(Key::from_base64)
            .transpose()
            .map_err(|e| wg_err("PSK", e))?;
        let running = nl.link_by_name(DEVICE).await?.is_some() && uapi("get=1\n\n").await.is_ok();
        if running {
            info!(
                device = DEVICE,
                implementation = "userspace (wireguard-go)",
                "adopting the running WireGuard device"
            );
        } else {
            if std::path::Path::new("/sys/module/wireguard").exists() {
                warn!(
                    "the kernel has a WireGuard module, but this version configures WireGuard through the userspace implementation"
                );
            }
            if let Some(stale) = nl.link_by_name(DEVICE).await? {
                // A device nobody serves (its process died): replace it.
                nl.handle()
                    .link()
                    .del(stale.index)
                    .execute()
                    .await
                    .map_err(|source| Error::Netlink {
                        context: format!("removing the unserved {DEVICE}"),
                        source,
                    })?;
            }
            start_userspace().await?;
            info!(
                device = DEVICE,
                implementation = "userspace (wireguard-go over TUN)",
                "started the WireGuard device"
            );
        }
        let (port, _) = parse_device(&uapi("get=1\n\n").await?);
        let mut set = format!("set=1\nprivate_key={}\n", key.to_hex());
        if port != Some(cfg.listen_port) {
            let _ = writeln!(set, "listen_port={}", cfg.listen_port);
        }
        set.push('\n');
        uapi(&set).await?;
        let link = nl
            .link_by_name(DEVICE)
            .await?
            .ok_or_else(|| wg_err(DEVICE, "the device disappeared"))?;
        configure_link(nl, &link, own, network, mtu).await?;
        Ok(Self {
            cfg: cfg.clone(),
            psk,
        })
    }

    /// Makes the device's peers exactly `peers` (remote subnet → peer): only the difference is
    /// written, so established sessions of unchanged peers are left alone.
    pub async fn sync(&mut self, peers: &BTreeMap<Ipv4Net, Peer>) -> Result<SyncReport, Error> {
        let (_, current) = parse_device(&uapi("get=1\n\n").await?);
        let mut want: BTreeMap<String, (DevicePeer, Vec<Ipv4Net>)> = BTreeMap::new();
        for (subnet, peer) in peers {
            let entry = want.entry(peer.public_key.to_hex()).or_insert_with(|| {
                (
                    DevicePeer {
                        endpoint: Some(peer.endpoint.to_string()),
                        allowed_ips: Vec::new(),
                        psk: self.psk.map(|k| k.to_hex()),
                        keepalive: self.cfg.persistent_keepalive,
                    },
                    Vec::new(),
                )
            });
            entry.0.allowed_ips.push(subnet.to_string());
            entry.1.push(*subnet);
        }
        let mut report = SyncReport::default();
        let mut set = String::from("set=1\n");
        for (key, (peer, subnets)) in &want {
            let mut have = current.get(key).cloned();
            if let Some(h) = &mut have {
                h.allowed_ips.sort();
            }
            let mut wanted = peer.clone();
            wanted.allowed_ips.sort();
            match have {
                Some(h) if h == wanted => continue,
                Some(_) => report.updated += 1,
                None => report.added += 1,
            }
            let _ = writeln!(set, "public_key={key}");
            if let Some(endpoint) = &peer.endpoint {
                let _ = writeln!(set, "endpoint={endpoint}");
            }
            let _ = write!(
                set,
                "preshared_key={}\npersistent_keepalive_interval={}\nreplace_allowed_ips=true\n",
                peer.psk.clone().unwrap_or_else(|| "0".repeat(64)),
                peer.keepalive
            );
            for subnet in subnets {
                let _ = writeln!(set, "allowed_ip={subnet}");
            }
        }
        for key in current.keys().filter(|k| !want.contains_key(*k)) {
            let _ = writeln!(set, "public_key={key}\nremove=true");
            report.removed += 1;
        }
        if !report.is_empty() {
            set.push('\n');
            uapi(&set).await?;
        }
        Ok(report)
    }

    /// Removes `flannel-wg` (its userspace process exits with it); false if there was none.
    pub async fn remove(nl: &Netlink) -> Result<bool, Error> {
        let Some(link) = nl.link_by_name(DEVICE).await? else {
            return Ok(false);
        };
        nl.handle()
            .link()
            .del(link.index)
            .execute()
            .await
            .map_err(|source| Error::Netlink {
                context: format!("removing {DEVICE}"),
                source,
            })?;
        Ok(true)
    }
}

/// Starts `wireguard-go flannel-wg` (it daemonizes) and waits until its socket answers.
async fn start_userspace() -> Result<(), Error> {
    let out = tokio::process::Command::new(USERSPACE)
        .arg(DEVICE)
        // wireguard-go refuses to run on Linux unless told that userspace is wanted.
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            wg_err(
                format!("starting {USERSPACE}"),
                format!(
                    "{e} (the kernel has no WireGuard device here; install Debian's wireguard-go)"
                ),
            )
        })?;
    if !out.status.success() {
        return Err(wg_err(
            format!("starting {USERSPACE}"),
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    for _ in 0..100 {
        if uapi("get=1\n\n").await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(wg_err(
        format!("starting {USERSPACE}"),
        format!("{} did not answer within 5 s", socket_path().display()),
    ))
}

/// MTU, the lease subnet's address as /32 (other addresses inside the Network removed, as
/// flanneld's `EnsureV4AddressOnLink`), link up, and the Network routed onto the device.
async fn configure_link(
    nl: &Netlink,
    link: &Link,
    own: Ipv4Net,
    network: Ipv4Net,
    mtu: u32,
) -> Result<(), Error> {
    let nl_err = |context: String| move |source| Error::Netlink { context, source };
    nl.handle()
        .link()
        .set(
            rtnetlink::LinkUnspec::new_with_index(link.index)
                .mtu(mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl_err(format!("setting {DEVICE} up with mtu {mtu}")))?;
    let addr = own.network();
    let msgs: Vec<AddressMessage> = nl
        .handle()
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(nl_err(format!("listing the addresses of {DEVICE}")))?;
    let mut has = false;
    for msg in msgs {
        let Some(a) = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(a)) | AddressAttribute::Address(IpAddr::V4(a)) => {
                Some(*a)
            }
            _ => None,
        }) else {
            continue;
        };
        if a == addr && msg.header.prefix_len == 32 {
            has = true;
        } else if network.contains(&a) {
            nl.handle()
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(nl_err(format!("removing {a} from {DEVICE}")))?;
            info!(address = %a, "removed another address of the Network from {DEVICE}");
        }
    }
    if !has {
        nl.handle()
            .address()
            .add(link.index, addr.into(), 32)
            .execute()
            .await
            .map_err(nl_err(format!("adding {addr}/32 to {DEVICE}")))?;
    }
    let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(network.network(), network.prefix_len())
        .output_interface(link.index)
        .scope(RouteScope::Link)
        .protocol(PROTO)
        .build();
    route.header.kind = RouteType::Unicast;
    nl.handle()
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(nl_err(format!("routing {network} onto {DEVICE}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_get_response() {
        let text = "private_key=aa\nlisten_port=51820\npublic_key=01\nendpoint=198.18.0.12:51820\n\
                    preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n\
                    persistent_keepalive_interval=25\nallowed_ip=10.244.2.0/24\n\
                    public_key=02\nallowed_ip=10.244.3.0/24\nallowed_ip=10.244.4.0/24\nerrno=0\n\n";
        let (port, peers) = parse_device(&parse_response(text).unwrap());
        assert_eq!(port, Some(51820));
        assert_eq!(
            peers["01"],
            DevicePeer {
                endpoint: Some("198.18.0.12:51820".into()),
                allowed_ips: vec!["10.244.2.0/24".into()],
                psk: None,
                keepalive: 25,
            }
        );
        assert_eq!(peers["02"].allowed_ips.len(), 2);
        assert!(parse_response("errno=22\n\n").unwrap_err().contains("22"));
        assert!(parse_response("listen_port=1\n").is_err());
    }
}
