//! The eBPF dataplane as the agent runs it: the pinned programs and maps (`ebpf`) brought to the
//! plan, attached to the uplink and to `cni0`, and kept in step with the bridge, the local pods
//! and the node's own routes into `cni0`.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::TcAttachType;
use flannel_ebpf_common::{Endpoint, NodeConfig, backend, prog_name};
use futures::future::LocalBoxFuture;
use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

use super::{
    Dataplane, Node, SyncReport,
    ebpf::{self, EbpfDataplane},
    headroom,
    masq::{self, Masquerade},
    routes::{self, Route},
    slowpath,
};
use crate::{
    Error,
    config::{Backend, NetConf},
    iface::{Events, ExtIface, Link, Netlink},
    metrics,
    plan::{Plan, gateway},
};

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

/// The eBPF dataplane and what the agent follows for it: the bridge, local pods, the node's own
/// routes into `cni0`.
pub struct EbpfNode {
    dp: EbpfDataplane,
    cfg: NodeConfig,
    cni: Option<Link>,
    routes_synced: Option<Instant>,
    /// The headroom device could not be set up (said once; pods' packets still flow).
    headroom_failed: bool,
    /// The underlay next hops kept in `FLANNEL_NEXTHOP`.
    hops: NextHops,
}

/// What the agent follows to keep each remote node's underlay next hop current: IPv4 route and
/// rule notifications, and the remote nodes it looked up.
struct NextHops {
    /// `None` without a subscription: next hops are then looked up again on repair passes.
    events: Option<Events>,
    /// The remote nodes (public IPs) of the last lookup.
    nodes: BTreeSet<Ipv4Addr>,
    /// Something changed since the last lookup, or it failed: look up at the next pass.
    stale: bool,
    /// Why the kernel routes every packet (policy rules, multipath), as last said.
    refused: Option<String>,
    /// When the next hops were last looked up.
    looked_up: Option<Instant>,
}

impl EbpfNode {
    /// Opens (or adopts) the pinned dataplane, fills the maps and attaches the programs.
    pub async fn start(nl: &Netlink, node: &Node<'_>, plan: &Plan) -> Result<Self, Error> {
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
        metrics::export_datapath(args.pin_dir.clone());
        let events = Netlink::route_events()
            .inspect_err(|e| warn!("{e}; underlay next hops are looked up again every 10 s"))
            .ok();
        let mut me = Self {
            dp,
            cfg,
            cni,
            routes_synced: None,
            headroom_failed: false,
            hops: NextHops {
                events,
                nodes: BTreeSet::new(),
                stale: true,
                refused: None,
                looked_up: None,
            },
        };
        me.follow_next_hops(nl, node, plan, true).await;
        Ok(me)
    }

    /// Keeps `FLANNEL_NEXTHOP` at the kernel's answer for each remote node that is reached
    /// through a tunnel: looked up again when a route or rule changed, when the remote nodes
    /// changed, on a repair pass, and after a failed lookup. On failure the map is emptied: the
    /// kernel then routes every packet, as it does for nodes without a next hop.
    async fn follow_next_hops(&mut self, nl: &Netlink, node: &Node<'_>, plan: &Plan, repair: bool) {
        let hops = &mut self.hops;
        let drained = hops.events.as_mut().map(Events::drain);
        if drained == Some(None) {
            warn!("route notifications ended; underlay next hops are looked up again every 10 s");
            hops.events = None;
        }
        let nodes: BTreeSet<Ipv4Addr> = plan
            .desired
            .nodes
            .iter()
            .filter(|(_, n)| n.backend != backend::HOST_GW)
            .map(|(ip, _)| *ip)
            .collect();
        if matches!(drained, Some(Some(n)) if n > 0) || nodes != hops.nodes {
            hops.stale = true;
        }
        // At most once a second (routing daemons may churn), repair passes aside.
        let recent = hops
            .looked_up
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
        if !(repair || (hops.stale && !recent)) {
            return;
        }
        hops.looked_up = Some(Instant::now());
        let answer = nl
            .underlay_next_hops(node.ext.link.index, nodes.iter().copied())
            .await;
        let looked_up = answer.is_ok();
        let vias = match answer {
            Ok(Ok(vias)) => {
                if hops.refused.take().is_some() {
                    info!("underlay next hops kept by the agent again");
                }
                Some(vias)
            }
            Ok(Err(why)) => {
                if hops.refused.as_ref() != Some(&why) {
                    info!("{why}: the kernel routes every encapsulated packet");
                }
                hops.refused = Some(why);
                None
            }
            Err(e) => {
                warn!(
                    "looking up underlay next hops: {e}; the kernel routes every encapsulated packet"
                );
                None
            }
        };
        match self.dp.set_next_hops(vias) {
            Ok(n) => {
                metrics::METRICS
                    .map_entries
                    .get_or_create(&metrics::label("map", "next_hops"))
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
                debug!(next_hops = n, nodes = nodes.len(), "underlay next hops");
                self.hops.stale = !looked_up;
            }
            Err(e) => {
                warn!("writing underlay next hops: {e}");
                self.hops.stale = true;
            }
        }
        self.hops.nodes = nodes;
    }

    fn sync(&mut self, node: &Node<'_>, plan: &Plan) -> Result<SyncReport, Error> {
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

    async fn follow(
        &mut self,
        nl: &Netlink,
        node: &Node<'_>,
        plan: &Plan,
        repair: bool,
    ) -> Result<(), Error> {
        // First: nothing below that fails may keep route changes from being followed.
        self.follow_next_hops(nl, node, plan, repair).await;
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
        // Local pods behind the bridge: learnt so that their packets skip it. One listing of
        // the links serves the endpoints and the pod ports. What the map holds is what was
        // learnt before (also by an agent before a restart).
        let learnt = match (nl.links().await, self.dp.endpoints()) {
            (Ok(links), Ok(previous)) => nl
                .endpoints(link.index, plan.own.subnet, &links, &previous)
                .await
                .and_then(|e| {
                    metrics::METRICS
                        .map_entries
                        .get_or_create(&metrics::label("map", "endpoints"))
                        .set(i64::try_from(e.len()).unwrap_or(i64::MAX));
                    let report = self.dp.sync_endpoints_from(&previous, &e)?;
                    Ok((links, e, report))
                }),
            (Err(e), _) | (_, Err(e)) => Err(e),
        };
        match learnt {
            Ok((links, endpoints, report)) => {
                if !report.is_empty() {
                    debug!(%report, "local endpoints");
                }
                self.sync_pod_ports(&links, link.index, &endpoints);
                self.sync_headroom(nl, &links, &link).await;
            }
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

impl EbpfNode {
    /// `from_pod_veth` on every pod port of the bridge (a veth to another namespace) and on the
    /// port of every learnt pod, so that their traffic to other nodes never enters the bridge;
    /// taken off ports that are gone. Ports, not learnt pods: a pod whose neighbour or bridge-FDB
    /// entry aged out (its frames no longer cross the bridge) keeps its program, and a restarted
    /// agent adopts every pinned link at its first pass.
    fn sync_pod_ports(
        &mut self,
        links: &[Link],
        bridge: u32,
        endpoints: &BTreeMap<Ipv4Addr, Endpoint>,
    ) {
        let learnt: BTreeSet<u32> = endpoints.values().map(|e| e.ifindex).collect();
        let ports: Vec<Link> = links
            .iter()
            .filter(|l| {
                learnt.contains(&l.index) || (l.controller == Some(bridge) && l.veth_to_other_netns)
            })
            .cloned()
            .collect();
        match self.dp.sync_pod_ports(&ports) {
            Ok((attached, removed)) if attached + removed > 0 => {
                info!(
                    attached,
                    removed, "pod ports: from_pod_veth before the bridge"
                );
            }
            Ok(_) => {}
            Err(e) => warn!("attaching to pod ports: {e}; their traffic goes through cni0"),
        }
    }

    /// The headroom device on the bridge where pods' packets are encapsulated (not with
    /// host-gw, which only rewrites Ethernet headers).
    async fn sync_headroom(&mut self, nl: &Netlink, links: &[Link], bridge: &Link) {
        if self.cfg.backend == u32::from(backend::HOST_GW) {
            if links.iter().any(|l| l.name == headroom::DEVICE) {
                headroom::remove_or_warn(nl).await;
            }
            return;
        }
        match headroom::ensure(nl, bridge, links).await {
            Ok(()) => self.headroom_failed = false,
            Err(e) if !self.headroom_failed => {
                self.headroom_failed = true;
                warn!("{e}: pods' packets are encapsulated at the cost of a head reallocation");
            }
            Err(_) => {}
        }
    }
}

impl Dataplane for EbpfNode {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn masquerades(&self) -> bool {
        true
    }

    fn apply<'a>(
        &'a mut self,
        _nl: &'a Netlink,
        node: &'a Node<'a>,
        plan: &'a Plan,
    ) -> LocalBoxFuture<'a, Result<SyncReport, Error>> {
        Box::pin(std::future::ready(self.sync(node, plan)))
    }

    fn tick<'a>(
        &'a mut self,
        nl: &'a Netlink,
        node: &'a Node<'a>,
        plan: &'a Plan,
        repair: bool,
    ) -> LocalBoxFuture<'a, Result<(), Error>> {
        Box::pin(self.follow(nl, node, plan, repair))
    }

    /// Empties `FLANNEL_NEXTHOP`: while no agent follows the routes, the kernel routes every
    /// encapsulated packet.
    fn stop(&mut self) -> Result<(), Error> {
        self.dp.set_next_hops(None)?;
        info!(
            "underlay next hops cleared: the kernel routes each encapsulated packet until an agent keeps them again"
        );
        Ok(())
    }
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
