//! The control loop: validate everything, then program the dataplane, then follow changes.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::programs::TcAttachType;
use flannel_ebpf_common::{
    MAX_ENDPOINTS, MAX_NODES, MAX_ROUTES, NodeConfig, RemoteNode, RemoteSubnet, backend, prog_name,
};
use ipnet::Ipv4Net;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{debug, error, info, warn};

use crate::{
    Error,
    backend::{self as backends, Mac, vxlan, wireguard},
    cli::{Args, DataplaneKind, SubnetMgr},
    config::{self, Backend, NetConf},
    dataplane::{
        Desired, SyncReport,
        ebpf::{self, EbpfDataplane, NatTimeouts},
        masq::{self, Masquerade},
        netlink::{self as kernel, KernelDataplane},
        routes::{self, Route},
        slowpath,
        wireguard::{Peer, WireguardDevice},
    },
    health,
    iface::{self, ExtIface, Link, Netlink, RouteTable},
    lease::{
        Lease,
        etcd::{EtcdClient, EtcdManager, EtcdOptions},
        kube::{self, Annotations, KubeClient, KubeManager, retry},
        static_file,
    },
    metrics,
    subnet_env::SubnetEnv,
    trafficmngr::{self, Engine, RuleSet},
};

/// This node's lease and what the dataplane should hold, derived from a lease set.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub own: Lease,
    /// This node's VTEP MAC (vxlan), or a placeholder standing for the node.
    pub vtep_mac: Mac,
    pub desired: Desired,
    /// WireGuard peers (wireguard backend only).
    pub wg_peers: BTreeMap<Ipv4Net, Peer>,
    /// host-gw peers whose public IP is not on this node's segment: not routed.
    pub unreachable: BTreeMap<Ipv4Net, Ipv4Addr>,
}

impl Plan {
    /// Finds this node's lease (the one with its public IP), checks it advertises what this node
    /// is, and turns the others into dataplane entries. Leases of another backend are skipped
    /// with a warning, as flanneld does. `direct` tells which public IPs are on this node's L2
    /// segment (host-gw, DirectRouting); `wg_key` is this node's WireGuard public key.
    pub fn new(
        leases: &[Lease],
        backend: &Backend,
        public_ip: Ipv4Addr,
        direct: &RouteTable,
        wg_key: Option<&wireguard::Key>,
        source: &Path,
    ) -> Result<Self, Error> {
        let own = leases
            .iter()
            .find(|l| l.public_ip == public_ip)
            .ok_or_else(|| {
                Error::config(
                    source,
                    "leases",
                    format!("no lease has PublicIP {public_ip} (this node's public IP)"),
                )
            })?;
        let lease_type = backend.lease_type();
        if own.backend_type != lease_type {
            return Err(Error::config(
                source,
                format!("lease of {public_ip}: BackendType"),
                format!(
                    "{:?}, but net-conf.json's backend {} has leases of type {lease_type:?}",
                    own.backend_type,
                    backend.name()
                ),
            ));
        }
        let vtep_mac = own_mac(backend, own, wg_key, source)?;
        let mut plan = Self {
            own: own.clone(),
            vtep_mac,
            desired: Desired::default(),
            wg_peers: BTreeMap::new(),
            unreachable: BTreeMap::new(),
        };
        for lease in leases.iter().filter(|l| l.public_ip != public_ip) {
            if lease.backend_type != lease_type {
                warn!(subnet = %lease.subnet, backend = %lease.backend_type, "ignoring a lease of another backend type");
                continue;
            }
            let ip = lease.public_ip;
            let data = &lease.backend_data;
            // As flanneld: a peer whose backend data does not decode is skipped, not fatal; so
            // is one whose public IP no node can have.
            let peering = backends::check_public_ip(ip)
                .and_then(|()| peer_route(backend, data, direct.is_direct(ip), ip));
            let peering = match peering {
                Ok(p) => p,
                Err(e) => {
                    warn!(subnet = %lease.subnet, public_ip = %ip, "ignoring a lease: {e}");
                    continue;
                }
            };
            let (kind, mac) = match peering {
                Peering::Route(kind, mac) => (kind, mac),
                Peering::Unreachable => {
                    plan.unreachable.insert(lease.subnet, ip);
                    continue;
                }
                Peering::Wireguard(peer) => {
                    plan.wg_peers.insert(lease.subnet, peer);
                    continue;
                }
                Peering::None => continue,
            };
            plan.desired.routes.insert(
                lease.subnet,
                RemoteSubnet {
                    public_ip: ip.octets(),
                    vtep_mac: mac.0,
                    backend: kind,
                    _pad0: 0,
                },
            );
            plan.desired.nodes.insert(
                ip,
                RemoteNode {
                    vtep_mac: mac.0,
                    backend: kind,
                    _pad0: 0,
                },
            );
        }
        Ok(plan)
    }

    /// Logs the host-gw peers that cannot be routed (once per change of the set).
    fn report_unreachable(&self, before: Option<&Self>) {
        for (subnet, ip) in &self.unreachable {
            if before.is_some_and(|b| b.unreachable.get(subnet) == Some(ip)) {
                continue;
            }
            error!(
                %subnet, public_ip = %ip,
                "host-gw: this lease's public IP is not on this node's network segment (its route has a gateway); \
                 its pods are unreachable until the nodes share a segment (or use vxlan with DirectRouting)"
            );
        }
    }
}

/// This node's MAC as its own lease says (vxlan's VtepMAC; a placeholder for the other backends),
/// after checking the lease advertises what this node is.
fn own_mac(
    backend: &Backend,
    own: &Lease,
    wg_key: Option<&wireguard::Key>,
    source: &Path,
) -> Result<Mac, Error> {
    let public_ip = own.public_ip;
    let lease_err = |m: String| Error::config(source, format!("lease of {public_ip}"), m);
    Ok(match backend {
        Backend::Vxlan(vx) => {
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
        Backend::Wireguard(wg) => {
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
            backends::placeholder_mac(public_ip)
        }
        _ => backends::placeholder_mac(public_ip),
    })
}

/// How this node reaches one peer.
enum Peering {
    /// A map route of this backend kind, with the MAC standing for the peer.
    Route(u8, Mac),
    /// A host-gw peer off this node's segment.
    Unreachable,
    Wireguard(Peer),
    None,
}

/// Decides how to reach a peer with lease data `data`, on this node's segment if `direct`.
fn peer_route(
    backend: &Backend,
    data: &serde_json::Value,
    direct: bool,
    ip: Ipv4Addr,
) -> Result<Peering, String> {
    Ok(match backend {
        Backend::Vxlan(vx) => {
            let mac = vxlan::lease_data(data)?.vtep_mac;
            if vx.direct_routing && direct {
                Peering::Route(backend::HOST_GW, mac)
            } else {
                Peering::Route(backend::VXLAN, mac)
            }
        }
        Backend::HostGw if !direct => Peering::Unreachable,
        Backend::HostGw => Peering::Route(backend::HOST_GW, backends::placeholder_mac(ip)),
        Backend::Ipip(cfg) => {
            let kind = if cfg.direct_routing && direct {
                backend::HOST_GW
            } else {
                backend::IPIP
            };
            Peering::Route(kind, backends::placeholder_mac(ip))
        }
        Backend::Udp(_) => Peering::Route(backend::UDP, backends::placeholder_mac(ip)),
        Backend::Wireguard(_) => {
            let data = wireguard::lease_data(data)?;
            Peering::Wireguard(Peer {
                public_key: data.public_key,
                endpoint: SocketAddrV4::new(ip, data.port),
            })
        }
        Backend::Other(_) => Peering::None,
    })
}

/// The configuration map entry for this node (`masq`: the eBPF masquerade, if on).
#[must_use]
pub fn node_config(
    netconf: &NetConf,
    plan: &Plan,
    ext: &ExtIface,
    public_ip: Ipv4Addr,
    cni: Option<&Link>,
    masq: Option<&Masquerade>,
) -> NodeConfig {
    let cni_ifindex = cni.map_or(0, |l| l.index);
    let subnet = plan.own.subnet;
    let (kind, vni, port) = match &netconf.backend {
        Backend::Vxlan(vx) => (backend::VXLAN, vx.vni, vx.port),
        Backend::Ipip(_) => (backend::IPIP, 0, 0),
        Backend::Udp(u) => (backend::UDP, 0, u.port),
        _ => (backend::HOST_GW, 0, 0),
    };
    NodeConfig {
        enabled: 1,
        backend: u32::from(kind),
        public_ip: public_ip.octets(),
        subnet_addr: subnet.network().octets(),
        subnet_mask: subnet.netmask().octets(),
        network_addr: netconf.network.network().octets(),
        network_mask: netconf.network.netmask().octets(),
        gateway_ip: gateway(subnet).octets(),
        vni,
        port,
        _pad0: 0,
        uplink_mtu: ext.link.mtu,
        uplink_ifindex: ext.link.index,
        cni_ifindex,
        vtep_mac: plan.vtep_mac.0,
        uplink_mac: ext.link.mac,
        cni_mac: cni.map_or([0; 6], |l| l.mac),
        _pad1: [0; 2],
        route_index_shift: ebpf::route_index_shift(netconf.network, subnet.prefix_len()),
        masq_ip: masq.map_or([0; 4], |m| m.addr.octets()),
        nat_port_min: masq.map_or(0, |m| m.ports.0),
        nat_port_max: masq.map_or(0, |m| m.ports.1),
        nat_flags: masq.map_or(0, Masquerade::flags),
    }
}

/// The first address of a subnet: the `cni0` gateway.
#[must_use]
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Everything fixed for the agent's lifetime.
struct Node<'a> {
    args: &'a Args,
    netconf: NetConf,
    ext: ExtIface,
    public_ip: Ipv4Addr,
    pod_mtu: u32,
    /// The eBPF masquerade's settings (`--ip-masq`); used where the eBPF dataplane runs.
    masq: Option<Masquerade>,
}

/// The dataplane in use.
enum Active {
    Ebpf(Box<EbpfNode>),
    Kernel(KernelDataplane),
    Wireguard(WireguardDevice),
}

impl Active {
    fn name(&self) -> &'static str {
        match self {
            Self::Ebpf(_) => "ebpf",
            Self::Kernel(_) => "netlink",
            Self::Wireguard(_) => "wireguard",
        }
    }

    /// True if this dataplane masquerades itself (so the kernel's rules must not).
    fn masquerades(&self) -> bool {
        matches!(self, Self::Ebpf(_))
    }

    /// Brings the dataplane to `plan` (only the difference is applied).
    async fn apply(
        &mut self,
        nl: &Netlink,
        node: &Node<'_>,
        plan: &Plan,
    ) -> Result<SyncReport, Error> {
        match self {
            Self::Ebpf(e) => e.apply(node, plan),
            Self::Kernel(k) => k.sync(nl, &plan.desired).await,
            Self::Wireguard(w) => w.sync(&plan.wg_peers).await,
        }
    }

    /// Once a second and on neighbour changes: follow the bridge, learn pods; repair kernel state
    /// every 10 s.
    async fn tick(&mut self, nl: &Netlink, node: &Node<'_>, plan: &Plan, repair: bool) {
        let result = match self {
            Self::Ebpf(e) => e.tick(nl, node, plan, repair).await,
            Self::Kernel(k) if repair => k.sync(nl, &plan.desired).await.map(|_| ()),
            Self::Wireguard(w) if repair => w.sync(&plan.wg_peers).await.map(|_| ()),
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!("{e}");
        }
    }
}

/// The eBPF dataplane and what the agent follows for it.
struct EbpfNode {
    dp: EbpfDataplane,
    cfg: NodeConfig,
    cni: Option<Link>,
    routes_synced: Option<Instant>,
}

impl EbpfNode {
    /// Opens (or adopts) the pinned dataplane, fills the maps and attaches the programs.
    async fn start(nl: &Netlink, node: &Node<'_>, plan: &Plan) -> Result<Self, Error> {
        let args = node.args;
        let mut dp = EbpfDataplane::open(&args.pin_dir, args.ip_masq_table_size)?;
        if dp.config()?.enabled != 0 {
            info!(pins = %dp.pins().dir.display(), "adopting the pinned dataplane (no flush)");
        }
        let report = dp.sync(&plan.desired)?;
        info!(%report, "synced remote subnets");
        let cni = nl.link_by_name(&args.cni_bridge).await?;
        let cfg = node_config(
            &node.netconf,
            plan,
            &node.ext,
            node.public_ip,
            cni.as_ref(),
            node.masq.as_ref(),
        );
        dp.set_config(&cfg)?;
        // Again, now that the configuration says how subnets are indexed (fills FLANNEL_SUBNETS).
        dp.sync(&plan.desired)?;
        dp.attach_tc(prog_name::FROM_WIRE, &node.ext.link, TcAttachType::Ingress)?;
        let xdp = dp.attach_xdp(&node.ext.link, args.decap)?;
        if let Some(m) = &node.masq {
            masq::reserve_ports(m.ports)?;
            dp.attach_tc(prog_name::TO_WIRE, &node.ext.link, TcAttachType::Egress)?;
            masq::spawn_collector(args.pin_dir.clone(), m.timeouts);
            info!(address = %m.addr, ports = ?m.ports, fully_random = m.fully_random, "masquerade in eBPF");
        } else if dp.detach(prog_name::TO_WIRE) {
            info!("masquerade off: detached the eBPF masquerade");
            if let Err(e) = masq::release_ports(args.ip_masq_port_range) {
                warn!("{e}");
            }
        }
        if let Some(cni) = &cni {
            attach_cni(&mut dp, cni)?;
        } else {
            warn!(bridge = %args.cni_bridge, "bridge not there yet (the CNI plugin creates it with the first pod); waiting for it");
        }
        info!(
            decap = xdp.map_or("tc".to_string(), |m| format!("xdp ({m})")),
            pins = %dp.pins().dir.display(), "eBPF programs attached"
        );
        // Last: nothing after it can fail over to the netlink dataplane, whose VXLAN device
        // needs the port.
        if matches!(
            cfg.backend as u8,
            backend::VXLAN | backend::UDP | backend::IPIP
        ) && let Err(e) = slowpath::spawn(&args.pin_dir, cfg.backend as u8, cfg.port)
        {
            warn!(
                "{e}: fragmented tunnel traffic and tunnel traffic with IP options will not be delivered"
            );
        }
        Ok(Self {
            dp,
            cfg,
            cni,
            routes_synced: None,
        })
    }

    fn apply(&mut self, node: &Node<'_>, plan: &Plan) -> Result<SyncReport, Error> {
        let report = self.dp.sync(&plan.desired)?;
        let cfg = node_config(
            &node.netconf,
            plan,
            &node.ext,
            node.public_ip,
            self.cni.as_ref(),
            node.masq.as_ref(),
        );
        if cfg != self.cfg {
            self.dp.set_config(&cfg)?;
            if cfg.route_index_shift != self.cfg.route_index_shift {
                self.dp.sync(&plan.desired)?;
            }
            self.cfg = cfg;
        }
        self.routes_synced = None;
        Ok(report)
    }

    async fn tick(
        &mut self,
        nl: &Netlink,
        node: &Node<'_>,
        plan: &Plan,
        repair: bool,
    ) -> Result<(), Error> {
        if repair {
            // The maps against the plan in force, as the kernel holds them: whatever drifted (a
            // failed apply, a hand edit) is put back.
            let report = self.dp.sync(&plan.desired)?;
            if !report.is_empty() {
                warn!(%report, "repaired the maps of remote subnets");
            }
        }
        let bridge = &node.args.cni_bridge;
        // The bridge appears with the first pod and may be recreated.
        match nl.link_by_name(bridge).await? {
            Some(link) if self.cni.as_ref() != Some(&link) => {
                attach_cni(&mut self.dp, &link)?;
                self.cfg.cni_ifindex = link.index;
                self.cfg.cni_mac = link.mac;
                self.dp.set_config(&self.cfg)?;
                self.cni = Some(link);
                self.routes_synced = None;
            }
            None if self.cni.is_some() => {
                warn!(%bridge, "bridge disappeared; decapsulated packets go to the stack until it is back");
                self.cfg.cni_ifindex = 0;
                self.dp.set_config(&self.cfg)?;
                self.cni = None;
            }
            _ => {}
        }
        let Some(link) = self.cni.clone() else {
            return Ok(());
        };
        // Local pods behind the bridge: learnt so that their packets skip it.
        match nl
            .endpoints(link.index, plan.own.subnet)
            .await
            .and_then(|e| {
                metrics::METRICS
                    .map_entries
                    .get_or_create(&metrics::label("map", "endpoints"))
                    .set(i64::try_from(e.len()).unwrap_or(i64::MAX));
                self.dp.sync_endpoints(&e)
            }) {
            Ok(report) if !report.is_empty() => debug!(%report, "local endpoints"),
            Ok(_) => {}
            Err(e) => warn!("learning local endpoints: {e}"),
        }
        // The node's own routes into cni0: on every change, and every 10 s to repair them.
        if self
            .routes_synced
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.routes_synced = Some(Instant::now());
            let (want, neighbours) = host_routes(plan, link.index, node.pod_mtu);
            routes::sync_neighbours(
                nl,
                link.index,
                node.netconf.network,
                plan.own.subnet,
                &neighbours,
            )
            .await?;
            let report = routes::sync(nl, &want).await?;
            if !report.is_empty() {
                info!(%report, "routes of remote subnets");
            }
        }
        Ok(())
    }
}

/// Starts the dataplane `args.dataplane` asks for, falling back from eBPF to netlink where eBPF
/// cannot be loaded and the backend has a kernel dataplane. `wg_private`: this node's WireGuard
/// private key (wireguard backend).
async fn start_dataplane(
    nl: &Netlink,
    node: &Node<'_>,
    plan: &Plan,
    wg_private: Option<&wireguard::Key>,
) -> Result<Active, Error> {
    let backend = &node.netconf.backend;
    if let Backend::Wireguard(wg) = backend {
        let key = wg_private.expect("the key is loaded for the wireguard backend");
        let dev = WireguardDevice::ensure(
            nl,
            wg,
            key,
            plan.own.subnet,
            node.netconf.network,
            node.pod_mtu,
        )
        .await?;
        return Ok(Active::Wireguard(dev));
    }
    let kernel_ok = matches!(backend, Backend::Vxlan(_) | Backend::HostGw);
    match node.args.dataplane {
        DataplaneKind::Netlink if kernel_ok => start_kernel(nl, node, plan).await,
        DataplaneKind::Netlink => Err(Error::Unsupported(format!(
            "backend {}: no netlink dataplane (flannel's uses a kernel tunnel module or a userspace proxy); use --dataplane=ebpf",
            backend.name()
        ))),
        DataplaneKind::Ebpf => Ok(Active::Ebpf(Box::new(
            EbpfNode::start(nl, node, plan).await?,
        ))),
        DataplaneKind::Auto => match EbpfNode::start(nl, node, plan).await {
            Ok(e) => Ok(Active::Ebpf(Box::new(e))),
            Err(e) if kernel_ok && e.is_ebpf_unavailable() => {
                warn!(
                    "eBPF cannot be used here ({e}); falling back to the kernel dataplane flanneld uses"
                );
                start_kernel(nl, node, plan).await
            }
            Err(e) => Err(e),
        },
    }
}

async fn start_kernel(nl: &Netlink, node: &Node<'_>, plan: &Plan) -> Result<Active, Error> {
    let dp = match &node.netconf.backend {
        Backend::Vxlan(vx) => {
            KernelDataplane::vxlan(
                nl,
                vx,
                &node.ext,
                node.public_ip,
                node.netconf.network,
                plan.own.subnet,
                plan.vtep_mac,
                node.pod_mtu,
            )
            .await?
        }
        _ => KernelDataplane::host_gw(&node.ext, node.netconf.network, plan.own.subnet),
    };
    Ok(Active::Kernel(dp))
}

/// Joins the cluster through the Kubernetes API: this node's subnet from its podCIDR, its lease
/// published in its annotations, and all nodes watched into `tx`. Waits (with back-off, saying so)
/// while the API is unreachable. Returns the manager and the public IP this node's lease carries
/// (`public-ip-overwrite` if set); `public_ip` becomes `node-public-ip` if that is set.
async fn start_kube(
    args: &Args,
    netconf: &NetConf,
    public_ip: &mut Ipv4Addr,
    ext: &ExtIface,
    wg_key: Option<&wireguard::Key>,
    tx: watch::Sender<Vec<Lease>>,
) -> Result<(KubeManager, Ipv4Addr), Error> {
    let name = args.node_name.clone().ok_or_else(|| {
        Error::Unsupported("--kube-subnet-mgr needs --node-name (or NODE_NAME)".into())
    })?;
    let client = KubeClient::new(
        args.kube_api_url.as_deref(),
        args.kubeconfig_file.as_deref(),
    )?;
    let mgr = KubeManager {
        client,
        node: name,
        annotations: Annotations::new(&args.kube_annotation_prefix)?,
    };
    let what = format!(
        "the Kubernetes API at {} (node {})",
        mgr.client.server(),
        mgr.node
    );
    let node = retry(&what, || async {
        let node = mgr.client.get_node(&mgr.node).await?;
        if kube::pod_cidr(&node).is_none() {
            return Err(Error::Api {
                context: format!("node {}", mgr.node),
                message: "no podCIDR assigned yet".into(),
            });
        }
        Ok(node)
    })
    .await;
    let subnet = kube::pod_cidr(&node).expect("checked above");
    if !netconf.network.contains(&subnet) {
        return Err(Error::Unsupported(format!(
            "node {}: podCIDR {subnet} is outside the Network {}",
            mgr.node, netconf.network
        )));
    }
    let annotation = |key: &str| {
        node["metadata"]["annotations"][key]
            .as_str()
            .filter(|s| !s.is_empty())
            .and_then(|s| s.parse::<Ipv4Addr>().ok())
    };
    if let Some(ip) = annotation(&mgr.annotations.node_public_ip) {
        info!(%ip, "public IP from the node-public-ip annotation");
        *public_ip = ip;
        // Validated before anything is published.
        check_own_public_ip(&netconf.backend, ip, ext)?;
    }
    let lease_ip = annotation(&mgr.annotations.public_ip_overwrite).unwrap_or(*public_ip);
    let backend = &netconf.backend;
    let existing = kube::node_lease(&node, &mgr.annotations).ok();
    let backend_data = advertised_data(backend, existing.as_ref(), wg_key, random_mac()?);
    let want = kube::Publish {
        backend_type: backend.lease_type().to_string(),
        backend_data,
        public_ip: *public_ip,
    };
    retry(&what, || async {
        let node = mgr.client.get_node(&mgr.node).await?;
        mgr.publish(&node, &want).await
    })
    .await;
    mgr.watch(tx);
    Ok((mgr, lease_ip))
}

/// Checks this node's public IP before it is published: an address a node can have and, for
/// host-gw (as flanneld: peers route to the public IP), the uplink's own.
fn check_own_public_ip(
    backend: &Backend,
    public_ip: Ipv4Addr,
    ext: &ExtIface,
) -> Result<(), Error> {
    backends::check_public_ip(public_ip)
        .map_err(|e| Error::Unsupported(format!("this node: {e}")))?;
    if *backend == Backend::HostGw && public_ip != ext.addr {
        return Err(Error::Unsupported(format!(
            "host-gw: the public IP {public_ip} is not the address of {} ({}); host-gw needs them equal",
            ext.link.name, ext.addr
        )));
    }
    Ok(())
}

/// Acquires this node's subnet in etcd (waiting, with back-off, while etcd is unreachable) and
/// follows every lease into `tx`.
async fn start_etcd(
    args: &Args,
    client: EtcdClient,
    netconf: &NetConf,
    public_ip: Ipv4Addr,
    wg_key: Option<&wireguard::Key>,
    fresh_mac: Mac,
    tx: watch::Sender<Vec<Lease>>,
) {
    let backend = &netconf.backend;
    let data = |existing: Option<&Lease>| advertised_data(backend, existing, wg_key, fresh_mac);
    // After a lapse, flanneld tries the subnet it had (from subnet.env) first.
    let previous = crate::file::read_to_string(&args.subnet_file)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
                .and_then(|s| s.parse::<Ipv4Net>().ok())
                .map(|n| n.trunc())
        });
    let what = format!("etcd at {} (this node's subnet lease)", client.endpoints());
    let margin = Duration::from_secs(args.subnet_lease_renew_margin * 60);
    let (mgr, own) = retry(&what, || {
        EtcdManager::acquire(
            client.clone(),
            &args.etcd_prefix,
            netconf,
            public_ip,
            backend.lease_type(),
            data,
            previous,
            margin,
        )
    })
    .await;
    info!(subnet = %own.subnet, key = %mgr.key, "this node's lease in etcd");
    mgr.run(tx);
}

/// The `BackendData` this node publishes: vxlan's VNI and VTEP MAC (the one `existing` already
/// advertises survives restarts; else a new one), wireguard's public key and port, else null.
fn advertised_data(
    backend: &Backend,
    existing: Option<&Lease>,
    wg_key: Option<&wireguard::Key>,
    fresh_mac: Mac,
) -> serde_json::Value {
    match backend {
        Backend::Vxlan(vx) => {
            let mac = existing
                .filter(|l| l.backend_type == "vxlan")
                .and_then(|l| vxlan::lease_data(&l.backend_data).ok())
                .map_or(fresh_mac, |d| d.vtep_mac);
            serde_json::json!({"VNI": vx.vni, "VtepMAC": mac.to_string()})
        }
        Backend::Wireguard(wg) => wireguard::advertised(
            wg_key.expect("the key is loaded for the wireguard backend"),
            wg.listen_port,
        ),
        _ => serde_json::Value::Null,
    }
}

/// A random locally administered unicast MAC (a new VTEP), from the OS's random source: a failed
/// read is an error, never a MAC every node would share.
fn random_mac() -> Result<Mac, Error> {
    let mut mac = [0u8; 6];
    getrandom::fill(&mut mac)
        .map_err(|e| Error::Unsupported(format!("reading the OS's random source: {e}")))?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(Mac(mac))
}

/// Removes everything the agent created (`--cleanup`).
async fn cleanup(args: &Args) -> Result<(), Error> {
    let nl = Netlink::connect()?;
    let removed = routes::remove_all(&nl).await?;
    info!(routes = removed, "removed the routes of remote subnets");
    let devices = kernel::remove_devices(&nl).await?;
    if devices > 0 {
        info!(devices, "removed the flannel.<VNI> VXLAN devices");
    }
    if WireguardDevice::remove(&nl).await? {
        info!("removed the flannel-wg device");
    }
    for engine in [Engine::Iptables, Engine::Nftables] {
        match trafficmngr::manager(engine).cleanup() {
            Ok(()) => info!(%engine, "removed flanneld's masquerade and forward rules (if any)"),
            Err(e @ trafficmngr::RulesError::MissingBinary { .. }) => {
                info!(%engine, "no rules to remove: {e}");
            }
            Err(e) => {
                return Err(Error::Unsupported(format!(
                    "removing the {engine} rules: {e}"
                )));
            }
        }
    }
    if let Err(e) = masq::release_ports(args.ip_masq_port_range) {
        warn!("{e}");
    }
    ebpf::cleanup(&args.pin_dir, &args.subnet_file)
}

/// Runs the agent until SIGTERM/SIGINT (or performs `--cleanup` / `--stats` /
/// `--print-backend-data`).
#[expect(
    clippy::too_many_lines,
    reason = "one linear start-up sequence and its loop; splitting would only pass its locals around"
)]
pub async fn run(args: &Args) -> Result<(), Error> {
    if args.cleanup {
        return cleanup(args).await;
    }
    if args.stats {
        let by_program = ebpf::read_stats_by_program(&args.pin_dir)?;
        for (name, c) in ebpf::totals(&by_program) {
            println!("{name:<26} {:>12} packets {:>16} bytes", c.packets, c.bytes);
        }
        println!("by program:");
        for c in by_program.iter().filter(|c| c.counter.packets > 0) {
            let name = format!("{}/{}", c.program, c.reason);
            println!(
                "{name:<40} {:>12} packets {:>16} bytes",
                c.counter.packets, c.counter.bytes
            );
        }
        let nat = ebpf::nat_occupancy(&args.pin_dir)?;
        println!(
            "masquerade table: {} of {} entries ({} flows, {} node ports claimed)",
            nat.entries, nat.capacity, nat.flows, nat.host_claims
        );
        return Ok(());
    }

    if args.print_backend_data {
        // What a static lease file needs: from net-conf.json, without any lease source.
        let netconf = config::load(&args.net_config_path)?;
        let data = match &netconf.backend {
            Backend::Wireguard(wg) => {
                let (key, _) = wireguard::load_or_generate(&args.wg_key_file)?;
                wireguard::advertised(&key.public(), wg.listen_port)
            }
            Backend::Vxlan(_) => {
                return Err(Error::Unsupported(
                    "vxlan: the VtepMAC is this node's lease's own (static leases: pick a unique MAC)".into(),
                ));
            }
            _ => serde_json::Value::Null,
        };
        println!("{data}");
        return Ok(());
    }
    if args.healthz_port != 0 {
        // Up before the lease source is reached: /healthz answers while the agent waits for it.
        health::serve(SocketAddr::new(args.healthz_ip, args.healthz_port)).await?;
    }
    let subnet_mgr = if args.kube_subnet_mgr {
        SubnetMgr::Kube
    } else {
        args.subnet_mgr.unwrap_or(if args.leases.is_some() {
            SubnetMgr::Static
        } else {
            // flanneld's default.
            SubnetMgr::Etcd
        })
    };
    // Validate every input before touching the kernel: bad input leaves nothing half-programmed.
    let etcd = match subnet_mgr {
        SubnetMgr::Etcd => Some(EtcdClient::new(&EtcdOptions {
            endpoints: args.etcd_endpoints.clone(),
            cafile: args.etcd_cafile.clone(),
            certfile: args.etcd_certfile.clone(),
            keyfile: args.etcd_keyfile.clone(),
            username: args.etcd_username.clone(),
            password: args.etcd_password.clone(),
        })?),
        _ => None,
    };
    let (netconf, source) = match &etcd {
        // With etcd, the network configuration is flannel's `<prefix>/config`.
        Some(client) => {
            let what = format!(
                "{}/config in etcd at {}",
                args.etcd_prefix,
                client.endpoints()
            );
            let netconf = retry(&what, || EtcdManager::config(client, &args.etcd_prefix)).await;
            (netconf, format!("etcd:{}/config", args.etcd_prefix))
        }
        None => (
            config::load(&args.net_config_path)?,
            args.net_config_path.display().to_string(),
        ),
    };
    match &netconf.backend {
        Backend::Other(kind) => {
            return Err(Error::Unsupported(format!(
                "{source}: Backend.Type {kind:?} is not implemented by flannel-agent (it implements vxlan, host-gw, ipip, udp and wireguard)"
            )));
        }
        Backend::Vxlan(vx) if vx.gbp => {
            return Err(Error::Unsupported(format!(
                "{source}: Backend.GBP is not implemented by flannel-agent"
            )));
        }
        _ => {}
    }
    // The private key stays in `wg_private`; plans and leases only see the public one.
    let wg_private = match &netconf.backend {
        Backend::Wireguard(_) => {
            let (key, generated) = wireguard::load_or_generate(&args.wg_key_file)?;
            if generated {
                info!(path = %args.wg_key_file.display(), "generated this node's WireGuard key");
            }
            Some(key)
        }
        _ => None,
    };
    let wg_key = wg_private.as_ref().map(wireguard::Key::public);

    // The subnet file must be writable before anything is programmed.
    SubnetEnv::prepare(&args.subnet_file)?;

    let nl = Netlink::connect()?;
    let ext = iface::select(&nl, &args.iface, &args.iface_regex).await?;
    let mut public_ip = args.public_ip.unwrap_or(ext.addr);
    check_own_public_ip(&netconf.backend, public_ip, &ext)?;
    // The lease source: the current lease set on a watch channel.
    let (tx, mut leases_rx) = watch::channel(Vec::new());
    let (source, lease_ip, kube) = match subnet_mgr {
        SubnetMgr::Static => {
            let path = args.leases.clone().ok_or_else(|| {
                Error::Unsupported("--subnet-mgr static needs --leases FILE".into())
            })?;
            tx.send_replace(static_file::read(&path, &netconf)?);
            static_file::follow(path.clone(), netconf.clone(), tx);
            (path, public_ip, None)
        }
        SubnetMgr::Kube => {
            let (mgr, lease_ip) =
                start_kube(args, &netconf, &mut public_ip, &ext, wg_key.as_ref(), tx).await?;
            let source = PathBuf::from(format!("node {}", mgr.node));
            (source, lease_ip, Some(mgr))
        }
        SubnetMgr::Etcd => {
            let client = etcd.expect("an etcd client for the etcd subnet manager");
            start_etcd(
                args,
                client,
                &netconf,
                public_ip,
                wg_key.as_ref(),
                random_mac()?,
                tx,
            )
            .await;
            let source = PathBuf::from(format!("etcd:{}/subnets", args.etcd_prefix));
            (source, public_ip, None)
        }
    };
    // A static file must hold this node's lease now; a control plane gets it once our own
    // write comes back through the watch.
    let leases = if subnet_mgr == SubnetMgr::Static {
        leases_rx.borrow_and_update().clone()
    } else {
        leases_rx
            .wait_for(|l| l.iter().any(|l| l.public_ip == lease_ip))
            .await
            .map_err(|_| Error::Unsupported("the lease source stopped".into()))?
            .clone()
    };
    let mut table = nl.route_table().await?;
    let mut plan = Plan::new(
        &leases,
        &netconf.backend,
        lease_ip,
        &table,
        wg_key.as_ref(),
        &source,
    )?;
    plan.report_unreachable(None);
    if args.dataplane != DataplaneKind::Netlink && !matches!(netconf.backend, Backend::Wireguard(_))
    {
        // Before anything is programmed.
        ebpf::check_capacity(&plan.desired).map_err(|e| Error::config(&source, "leases", e))?;
    }
    let pod_mtu = backends::mtu(&netconf.backend, ext.link.mtu);
    let masq = args.ip_masq.then(|| Masquerade {
        addr: ext.addr,
        ports: args.ip_masq_port_range,
        fully_random: !args.ip_masq_fully_random_disable,
        timeouts: NatTimeouts {
            tcp_established: Duration::from_secs(args.ip_masq_tcp_timeout),
            udp_replied: Duration::from_secs(args.ip_masq_udp_timeout),
            other: Duration::from_secs(args.ip_masq_other_timeout),
        },
    });
    let node = Node {
        args,
        netconf,
        ext,
        public_ip,
        pod_mtu,
        masq,
    };
    info!(
        interface = %node.ext.link.name, %public_ip, subnet = %plan.own.subnet, backend = node.netconf.backend.name(),
        mtu = pod_mtu, "this node"
    );

    let mut active = start_dataplane(&nl, &node, &plan, wg_private.as_ref()).await?;
    let report = active.apply(&nl, &node, &plan).await?;
    // flanneld's masquerade rules where the kernel forwards pod traffic (the eBPF dataplane
    // masquerades itself), its forward rules everywhere.
    let kernel_masquerades = args.ip_masq && !active.masquerades();
    let rule_set = |plan: &Plan| RuleSet {
        cluster: node.netconf.network,
        pod: plan.own.subnet,
        masquerade: kernel_masquerades,
        fully_random: !args.ip_masq_fully_random_disable,
        forward: args.iptables_forward_rules,
    };
    let engine = if node.netconf.enable_nftables {
        Engine::Nftables
    } else {
        Engine::Iptables
    };
    let resync = Duration::from_secs(args.iptables_resync);
    let mut rules = start_rules(engine, rule_set(&plan), resync).await?;
    let subnet_env = |plan: &Plan| SubnetEnv {
        network: node.netconf.network,
        subnet: plan.own.subnet,
        mtu: pod_mtu,
        ipmasq: args.ip_masq,
    };
    subnet_env(&plan).write(&args.subnet_file)?;
    if matches!(active, Active::Ebpf(_)) {
        metrics::export_datapath(args.pin_dir.clone());
    }
    record(&plan, leases.len(), args.ip_masq_table_size);
    metrics::set_ready(true);
    info!(
        dataplane = active.name(), backend = node.netconf.backend.name(), %report,
        subnet_file = %args.subnet_file.display(), "dataplane active"
    );

    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::NetlinkIo {
        context: "installing the SIGTERM handler".into(),
        source,
    })?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| Error::NetlinkIo {
        context: "installing the SIGINT handler".into(),
        source,
    })?;
    if let Some(mgr) = kube {
        // As flanneld once it is up; in the background, so that forwarding never waits for it.
        tokio::spawn(async move {
            retry("the Kubernetes API (node condition)", || {
                mgr.set_network_available()
            })
            .await;
            info!(node = %mgr.node, "node condition NetworkUnavailable=False (FlannelIsUp)");
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut repaired = Instant::now();
    let mut table_read = Instant::now();
    // Neighbour changes wake the loop at once (the eBPF dataplane learns a new pod from its first
    // ARP exchange); without the subscription the 1 s tick still learns it.
    let mut neighbours = match Netlink::neighbour_events() {
        Ok(events) => Some(events),
        Err(e) => {
            warn!("{e}; local pods are learnt by polling once a second");
            None
        }
    };
    loop {
        let mut changed = false;
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            r = leases_rx.changed() => {
                if r.is_err() {
                    return Err(Error::Unsupported("the lease source stopped".into()));
                }
                changed = true;
            }
            _ = tick.tick() => {}
            burst = async {
                match neighbours.as_mut() {
                    Some(events) => events.next_burst(Duration::from_millis(5)).await,
                    None => std::future::pending().await,
                }
            } => {
                if burst.is_none() {
                    warn!("neighbour notifications ended; local pods are learnt by polling once a second");
                    neighbours = None;
                }
            }
        }
        let repair = repaired.elapsed() >= Duration::from_secs(10);
        if repair {
            repaired = Instant::now();
        }
        if !changed {
            active.tick(&nl, &node, &plan, repair).await;
        }
        // The leases changed (or, every 10 s, the routes that decide which peers are direct):
        // plan again, apply only the difference.
        let reread_table = table_read.elapsed() >= Duration::from_secs(10);
        if !changed && !reread_table {
            continue;
        }
        if reread_table {
            table_read = Instant::now();
            match nl.route_table().await {
                Ok(t) => table = t,
                Err(e) => warn!("{e}"),
            }
        }
        let leases = leases_rx.borrow_and_update().clone();
        match Plan::new(
            &leases,
            &node.netconf.backend,
            lease_ip,
            &table,
            wg_key.as_ref(),
            &source,
        ) {
            Err(e) => warn!("{e}; keeping the current leases"),
            Ok(next) if next == plan => {}
            Ok(next) => {
                next.report_unreachable(Some(&plan));
                let started = Instant::now();
                let applied = active.apply(&nl, &node, &next).await;
                metrics::METRICS
                    .reconcile_seconds
                    .observe(started.elapsed().as_secs_f64());
                let report = match applied {
                    Ok(r) => r,
                    Err(e) => {
                        metrics::METRICS.reconcile_errors.inc();
                        // Transient (e.g. netlink): keep the plan we had, retry on the next change
                        // or repair pass.
                        warn!(
                            "applying the leases of {}: {e}; will retry",
                            source.display()
                        );
                        continue;
                    }
                };
                if next.own != plan.own {
                    info!(subnet = %next.own.subnet, "this node's lease changed");
                    rules.abort();
                    rules = start_rules(engine, rule_set(&next), resync).await?;
                    subnet_env(&next).write(&args.subnet_file)?;
                }
                info!(%report, leases = leases.len(), took = ?started.elapsed(), "leases changed");
                record(&next, leases.len(), args.ip_masq_table_size);
                plan = next;
            }
        }
    }
    info!(
        dataplane = active.name(),
        "stopping; the dataplane stays and keeps forwarding (`flannel-agent --cleanup` removes it)"
    );
    Ok(())
}

/// Publishes what `plan` (from `leases` leases) holds as metrics.
fn record(plan: &Plan, leases: usize, nat_entries: u32) {
    let m = &metrics::METRICS;
    m.leases.set(i64::try_from(leases).unwrap_or(i64::MAX));
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    for (kind, n) in [
        ("route", plan.desired.routes.len()),
        ("unreachable", plan.unreachable.len()),
        ("wireguard", plan.wg_peers.len()),
    ] {
        m.peers
            .get_or_create(&metrics::label("kind", kind))
            .set(count(n));
    }
    // Endpoints and NAT entries are counted where they are synced and collected.
    for (map, n) in [
        ("routes", plan.desired.routes.len()),
        ("nodes", plan.desired.nodes.len()),
    ] {
        m.map_entries
            .get_or_create(&metrics::label("map", map))
            .set(count(n));
    }
    for (map, capacity) in [
        ("routes", MAX_ROUTES),
        ("nodes", MAX_NODES),
        ("endpoints", MAX_ENDPOINTS),
        ("nat", nat_entries),
    ] {
        m.map_capacity
            .get_or_create(&metrics::label("map", map))
            .set(i64::from(capacity));
    }
}

/// Installs flanneld's masquerade/forward rules with `engine` (removing the other engine's) and
/// keeps them in place every `resync` in the background; the handle stops that.
async fn start_rules(
    engine: Engine,
    rules: RuleSet,
    resync: Duration,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let first = rules.clone();
    tokio::task::spawn_blocking(move || trafficmngr::setup(engine, &first))
        .await
        .map_err(|e| Error::Unsupported(format!("installing the {engine} rules: {e}")))?
        .map_err(|e| Error::Unsupported(format!("installing the {engine} rules: {e}")))?;
    Ok(tokio::spawn(async move {
        let Err(e) = trafficmngr::ensure_and_resync(engine, rules, resync).await;
        warn!("keeping the {engine} rules in place: {e}");
    }))
}

/// Attaches the programs of the bridge: pods' traffic at ingress, the node's own at egress.
fn attach_cni(dp: &mut EbpfDataplane, cni: &Link) -> Result<(), Error> {
    dp.attach_tc(prog_name::FROM_PODS, cni, TcAttachType::Ingress)?;
    dp.attach_tc(prog_name::FROM_HOST, cni, TcAttachType::Egress)
}

/// The routes that steer the node's own traffic for remote subnets into `cni0`, shaped as
/// flanneld's on `flannel.1` (`<subnet> via <subnet>.0 onlink`), and their gateways' neighbours.
#[must_use]
pub fn host_routes(
    plan: &Plan,
    cni: u32,
    mtu: u32,
) -> (BTreeMap<Ipv4Net, Route>, BTreeMap<Ipv4Addr, [u8; 6]>) {
    let mut routes = BTreeMap::new();
    let mut neighbours = BTreeMap::new();
    for (net, r) in &plan.desired.routes {
        routes.insert(
            *net,
            Route {
                gateway: net.network(),
                oif: cni,
                onlink: true,
                mtu: Some(mtu),
            },
        );
        neighbours.insert(net.network(), r.vtep_mac);
    }
    (routes, neighbours)
}
