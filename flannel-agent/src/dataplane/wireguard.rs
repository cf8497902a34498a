//! The wireguard backend's device, `flannel-wg`, as flanneld programs it: this node's private
//! key and `ListenPort`, MTU, the lease subnet's address as /32, one route for the whole Network on
//! the device, and one peer per remote lease (endpoint = its public IP and port, allowed IPs = its
//! subnet, `PSK` and `PersistentKeepaliveInterval` from net-conf.json).
//!
//! The device is served by `wireguard-go` (Debian's userspace WireGuard over a TUN device) and
//! configured through WireGuard's cross-platform configuration protocol on its socket
//! `/var/run/wireguard/flannel-wg.sock`. That is the only implementation on kernels without the
//! WireGuard module, such as the one this project is tested on. Where the kernel can create a
//! WireGuard device (probed by creating one, which also loads the module), the agent says so and
//! still uses `wireguard-go`: configuring the kernel's device over generic netlink is not
//! implemented, and could not be tested here.
//!
//! A running device is adopted by a restarted agent rather than recreated (flanneld recreates it),
//! so an agent restart does not interrupt traffic; a device that disappeared (its process killed,
//! the link deleted) is recreated by the next [`WireguardDevice::sync`].
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    LinkWireguard, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressMessage},
        route::{RouteScope, RouteType},
    },
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

use super::{SyncReport, nl_err, routes::PROTO};
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
/// The userspace implementation.
const USERSPACE: &str = "wireguard-go";
/// How long a request on the configuration socket, or a start of `wireguard-go`, may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// One remote node as a WireGuard peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub public_key: Key,
    /// The peer's public IP and `ListenPort`; port 0 (a lease of flanneld before v0.26.6, which
    /// advertised no port) stands for this node's `ListenPort`, as flanneld assumes.
    pub endpoint: SocketAddrV4,
}

/// The `flannel-wg` device, and what it was set up with (to recreate it if it disappears).
pub struct WireguardDevice {
    nl: Netlink,
    cfg: WireguardConfig,
    key: Key,
    psk: Option<Key>,
    own: Ipv4Net,
    network: Ipv4Net,
    mtu: u32,
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

/// A failed request on the configuration socket.
#[derive(Debug)]
enum UapiError {
    /// Nothing listens on the socket (no device, or its process is gone).
    Unreachable(io::Error),
    /// The device answered with an error, garbage, or not in time.
    Failed(String),
}

impl From<UapiError> for Error {
    fn from(e: UapiError) -> Self {
        let context = socket_path().display().to_string();
        match e {
            UapiError::Unreachable(e) => {
                wg_err(context, format!("no WireGuard device serves it: {e}"))
            }
            UapiError::Failed(m) => wg_err(context, m),
        }
    }
}

/// One request on the configuration socket; returns the response's key/value lines (without
/// the final `errno`), or the error the device reported.
async fn uapi(request: &str) -> Result<Vec<(String, String)>, UapiError> {
    let mut sock = tokio::net::UnixStream::connect(socket_path())
        .await
        .map_err(UapiError::Unreachable)?;
    let exchange = async {
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
        Ok::<_, io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| UapiError::Failed(format!("no answer within {TIMEOUT:?}")))?
        .map_err(|e| UapiError::Failed(e.to_string()))?;
    parse_response(&response).map_err(UapiError::Failed)
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

/// A peer as the device reports it (keys in hex, as the protocol writes them).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DevicePeer {
    endpoint: Option<String>,
    /// Sorted.
    allowed_ips: Vec<String>,
    psk: Option<String>,
    keepalive: u16,
}

/// The device's listen port and peers (public key in hex → peer) from a `get` response.
fn parse_device(pairs: &[(String, String)]) -> (Option<u16>, BTreeMap<String, DevicePeer>) {
    let mut port = None;
    let mut peers: BTreeMap<String, DevicePeer> = BTreeMap::new();
    let mut current: Option<&mut DevicePeer> = None;
    for (k, v) in pairs {
        if k == "public_key" {
            current = Some(peers.entry(v.clone()).or_default());
            continue;
        }
        let Some(peer) = current.as_deref_mut() else {
            if k == "listen_port" {
                port = v.parse().ok();
            }
            continue;
        };
        match k.as_str() {
            "endpoint" => peer.endpoint = Some(v.clone()),
            "allowed_ip" => peer.allowed_ips.push(v.clone()),
            "preshared_key" if v.chars().any(|c| c != '0') => peer.psk = Some(v.clone()),
            "persistent_keepalive_interval" => peer.keepalive = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    for peer in peers.values_mut() {
        peer.allowed_ips.sort();
    }
    (port, peers)
}

/// The `set` lines that make the device's peers `want` from `current` (both: public key in hex →
/// peer), and what they change.
fn peer_changes(
    current: &BTreeMap<String, DevicePeer>,
    want: &BTreeMap<String, DevicePeer>,
) -> (String, SyncReport) {
    let mut report = SyncReport::default();
    let mut set = String::new();
    for (key, peer) in want {
        match current.get(key) {
            Some(have) if have == peer => continue,
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
        for subnet in &peer.allowed_ips {
            let _ = writeln!(set, "allowed_ip={subnet}");
        }
    }
    for key in current.keys().filter(|k| !want.contains_key(*k)) {
        let _ = writeln!(set, "public_key={key}\nremove=true");
        report.removed += 1;
    }
    (set, report)
}

impl WireguardDevice {
    /// Makes `flannel-wg` exist and carry this node's key, port, MTU, address (`own`'s network
    /// address as /32) and the route of `network`: adopts a running device, or starts the
    /// userspace implementation.
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
        let dev = Self {
            nl: nl.clone(),
            cfg: cfg.clone(),
            key: *key,
            psk,
            own,
            network,
            mtu,
        };
        dev.bring_up().await?;
        Ok(dev)
    }

    async fn bring_up(&self) -> Result<(), Error> {
        let nl = &self.nl;
        let link = nl.link_by_name(DEVICE).await?;
        if link.is_some() && uapi("get=1\n\n").await.is_ok() {
            info!(
                device = DEVICE,
                implementation = "userspace (wireguard-go)",
                "adopting the running WireGuard device"
            );
        } else {
            if let Some(stale) = link {
                // A kernel device (stock flanneld's), or a device whose process is gone.
                warn!(
                    device = DEVICE,
                    "the device exists but no userspace WireGuard serves it: recreating it"
                );
                delete_link(nl, stale.index, "removing the unserved device").await?;
            }
            if kernel_has_wireguard(nl).await? {
                warn!(
                    device = DEVICE,
                    "the kernel can create WireGuard devices, but configuring them over generic netlink is not implemented: using the userspace implementation"
                );
            }
            start_userspace().await?;
            info!(
                device = DEVICE,
                implementation = "userspace (wireguard-go over TUN)",
                "started the WireGuard device"
            );
        }
        let (port, _) = parse_device(&uapi("get=1\n\n").await?);
        // Setting the key it already has leaves the device's sessions alone.
        let mut set = format!("set=1\nprivate_key={}\n", self.key.to_hex());
        if port != Some(self.cfg.listen_port) {
            let _ = writeln!(set, "listen_port={}", self.cfg.listen_port);
        }
        set.push('\n');
        uapi(&set).await?;
        let link = nl
            .link_by_name(DEVICE)
            .await?
            .ok_or_else(|| wg_err(DEVICE, "the device disappeared"))?;
        configure_link(nl, &link, self.own, self.network, self.mtu).await
    }

    /// Makes the device's peers exactly `peers` (remote subnet → peer): only the difference is
    /// written, so established sessions of unchanged peers are left alone. A device that is gone
    /// is recreated first.
    pub async fn sync(&mut self, peers: &BTreeMap<Ipv4Net, Peer>) -> Result<SyncReport, Error> {
        let current = match uapi("get=1\n\n").await {
            Err(UapiError::Unreachable(e)) => {
                warn!(device = DEVICE, error = %e, "the WireGuard device is gone: recreating it");
                self.bring_up().await?;
                uapi("get=1\n\n").await?
            }
            other => other?,
        };
        let (_, current) = parse_device(&current);
        let mut want: BTreeMap<String, DevicePeer> = BTreeMap::new();
        for (subnet, peer) in peers {
            let mut endpoint = peer.endpoint;
            if endpoint.port() == 0 {
                endpoint.set_port(self.cfg.listen_port);
            }
            let entry = want
                .entry(peer.public_key.to_hex())
                .or_insert_with(|| DevicePeer {
                    endpoint: Some(endpoint.to_string()),
                    allowed_ips: Vec::new(),
                    psk: self.psk.map(|k| k.to_hex()),
                    keepalive: self.cfg.persistent_keepalive,
                });
            // The device reports allowed IPs masked to their prefix.
            entry.allowed_ips.push(subnet.trunc().to_string());
        }
        for peer in want.values_mut() {
            peer.allowed_ips.sort();
        }
        let (lines, report) = peer_changes(&current, &want);
        if !report.is_empty() {
            uapi(&format!("set=1\n{lines}\n")).await?;
        }
        Ok(report)
    }

    /// Removes `flannel-wg` (its userspace process exits with it); false if there was none.
    pub async fn remove(nl: &Netlink) -> Result<bool, Error> {
        let Some(link) = nl.link_by_name(DEVICE).await? else {
            return Ok(false);
        };
        delete_link(nl, link.index, "removing the device").await?;
        Ok(true)
    }
}

async fn delete_link(nl: &Netlink, index: u32, what: &str) -> Result<(), Error> {
    nl.handle()
        .link()
        .del(index)
        .execute()
        .await
        .map_err(|source| Error::Netlink {
            context: format!("{DEVICE}: {what}"),
            source,
        })
}

/// Whether the kernel can create a WireGuard device: creates `flannel-wg` as one (which also
/// loads the module where there is one) and removes it again.
async fn kernel_has_wireguard(nl: &Netlink) -> Result<bool, Error> {
    match nl
        .handle()
        .link()
        .add(LinkWireguard::new(DEVICE).build())
        .execute()
        .await
    {
        Ok(()) => {
            let link = nl
                .link_by_name(DEVICE)
                .await?
                .ok_or_else(|| wg_err(DEVICE, "the kernel's device disappeared"))?;
            delete_link(nl, link.index, "removing the kernel's device").await?;
            Ok(true)
        }
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
            info!("the kernel has no WireGuard device type: using the userspace implementation");
            Ok(false)
        }
        Err(source) => Err(Error::Netlink {
            context: format!("{DEVICE}: probing for the kernel's WireGuard"),
            source,
        }),
    }
}

/// Starts `wireguard-go flannel-wg` (it daemonizes) and waits until its socket answers.
async fn start_userspace() -> Result<(), Error> {
    let context = format!("starting {USERSPACE} {DEVICE}");
    // A process whose link was just deleted still answers until it notices; a new one cannot
    // take the socket before it has gone.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while uapi("get=1\n\n").await.is_ok() {
        if tokio::time::Instant::now() > deadline {
            return Err(wg_err(
                context,
                format!(
                    "{} is served by a process without the device",
                    socket_path().display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tokio::process::Command::new(USERSPACE)
        .arg(DEVICE)
        // Old versions refuse to run on Linux unless told that userspace is wanted.
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
        // With LOG_LEVEL set the daemon keeps our stdout/stderr, and waiting for it would hang.
        .env_remove("LOG_LEVEL")
        .env_remove("WG_PROCESS_FOREGROUND")
        .stdin(std::process::Stdio::null())
        .output();
    let out = tokio::time::timeout(TIMEOUT, out)
        .await
        .map_err(|_| wg_err(&context, format!("did not daemonize within {TIMEOUT:?}")))?
        .map_err(|e| {
            wg_err(
                &context,
                format!(
                    "{e} (the agent runs WireGuard through the userspace wireguard-go: install it)"
                ),
            )
        })?;
    if !out.status.success() {
        return Err(wg_err(
            context,
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        match uapi("get=1\n\n").await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(wg_err(context, Error::from(e)));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
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

impl super::Dataplane for WireguardDevice {
    fn name(&self) -> &'static str {
        "wireguard"
    }

    fn apply<'a>(
        &'a mut self,
        _nl: &'a Netlink,
        _node: &'a super::Node<'a>,
        plan: &'a crate::plan::Plan,
    ) -> futures::future::LocalBoxFuture<'a, Result<SyncReport, Error>> {
        Box::pin(self.sync(&plan.wg_peers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_get_response() {
        let text = "private_key=aa\nlisten_port=51820\nfwmark=0\npublic_key=01\n\
                    endpoint=198.18.0.12:51820\nlast_handshake_time_sec=0\n\
                    preshared_key=0000000000000000000000000000000000000000000000000000000000000000\n\
                    persistent_keepalive_interval=25\nallowed_ip=10.244.2.0/24\n\
                    public_key=02\nallowed_ip=10.244.4.0/24\nallowed_ip=10.244.3.0/24\n\
                    preshared_key=1111111111111111111111111111111111111111111111111111111111111111\n\
                    errno=0\n\n";
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
        assert_eq!(
            peers["02"].allowed_ips,
            ["10.244.3.0/24", "10.244.4.0/24"],
            "sorted"
        );
        assert_eq!(peers["02"].psk.as_deref(), Some(&"1".repeat(64)[..]));
        assert!(parse_response("errno=22\n\n").unwrap_err().contains("22"));
        assert!(parse_response("listen_port=1\n").is_err());
        assert!(parse_response("garbage\nerrno=0\n\n").is_err());
    }

    #[test]
    fn writes_only_the_difference() {
        let peer = |endpoint: &str, ips: &[&str]| DevicePeer {
            endpoint: Some(endpoint.into()),
            allowed_ips: ips.iter().map(ToString::to_string).collect(),
            psk: None,
            keepalive: 0,
        };
        let current = BTreeMap::from([
            (
                "01".to_string(),
                peer("198.18.0.12:51820", &["10.244.2.0/24"]),
            ),
            (
                "02".to_string(),
                peer("198.18.0.13:51820", &["10.244.3.0/24"]),
            ),
            (
                "03".to_string(),
                peer("198.18.0.14:51820", &["10.244.4.0/24"]),
            ),
        ]);
        let want = BTreeMap::from([
            (
                "01".to_string(),
                peer("198.18.0.12:51820", &["10.244.2.0/24"]),
            ),
            (
                "02".to_string(),
                peer("198.18.0.13:51821", &["10.244.3.0/24"]),
            ),
            (
                "04".to_string(),
                peer("198.18.0.15:51820", &["10.244.5.0/24"]),
            ),
        ]);
        let (set, report) = peer_changes(&current, &want);
        assert_eq!(
            report,
            SyncReport {
                added: 1,
                updated: 1,
                removed: 1
            }
        );
        let zero = "0".repeat(64);
        assert_eq!(
            set,
            format!(
                "public_key=02\nendpoint=198.18.0.13:51821\npreshared_key={zero}\n\
                 persistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=10.244.3.0/24\n\
                 public_key=04\nendpoint=198.18.0.15:51820\npreshared_key={zero}\n\
                 persistent_keepalive_interval=0\nreplace_allowed_ips=true\nallowed_ip=10.244.5.0/24\n\
                 public_key=03\nremove=true\n"
            )
        );
        let (set, report) = peer_changes(&want, &want);
        assert!(set.is_empty() && report.is_empty());
    }
}
