//! Finding the uplink the way flanneld does (`--iface`, `--iface-regex`, else the interface of
//! the default route), through rtnetlink.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use flannel_ebpf_common::{Endpoint, endpoint};
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use regex::Regex;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        address::AddressAttribute,
        link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
    },
};

use crate::Error;

/// A network interface of this namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    pub mac: [u8; 6],
    pub up: bool,
    /// The bridge (or bond) this interface is a port of: a pod's veth behind `cni0`, say.
    pub controller: Option<u32>,
    pub loopback: bool,
    /// A veth whose peer is in another network namespace (a pod's, for a `cni0` port).
    pub veth_to_other_netns: bool,
}

/// The chosen uplink and its IPv4 address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtIface {
    pub link: Link,
    pub addr: Ipv4Addr,
}

/// A stream of rtnetlink notifications.
pub struct Events(
    futures::channel::mpsc::UnboundedReceiver<(
        rtnetlink::packet_core::NetlinkMessage<rtnetlink::packet_route::RouteNetlinkMessage>,
        rtnetlink::sys::SocketAddr,
    )>,
);

impl Events {
    /// Waits for a notification, then takes every one that arrives within `settle`, so that a
    /// burst (a pod's ARP exchange, a bridge learning its MAC) is handled once. `None` if the
    /// subscription ended.
    pub async fn next_burst(&mut self, settle: std::time::Duration) -> Option<usize> {
        use futures::StreamExt as _;
        self.0.next().await?;
        tokio::time::sleep(settle).await;
        Some(1 + self.drain().unwrap_or(0))
    }

    /// Takes every notification that has arrived, without waiting: how many (`None` if the
    /// subscription ended and none was left).
    pub fn drain(&mut self) -> Option<usize> {
        let mut n = 0;
        loop {
            match self.0.try_recv() {
                Ok(_) => n += 1,
                Err(e) if e.is_closed() && n == 0 => return None,
                Err(_) => return Some(n),
            }
        }
    }
}

/// An rtnetlink connection.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a connection; its driver task runs on the current tokio runtime.
    pub fn connect() -> Result<Self, Error> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| Error::NetlinkIo {
            context: "opening a socket".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Notifications of neighbour and bridge-FDB changes in this namespace (`ip monitor neigh`):
    /// a pod's first ARP exchange through the bridge shows up here at once, so its endpoint can
    /// be learnt without waiting for the next poll. With `routes`, IPv4 route and rule changes
    /// too (`ip monitor route rule`), which move the underlay next hops.
    pub fn neighbour_events(routes: bool) -> Result<Events, Error> {
        use rtnetlink::MulticastGroup::{Ipv4Route, Ipv4Rule, Neigh};
        let groups: &[rtnetlink::MulticastGroup] = if routes {
            &[Neigh, Ipv4Route, Ipv4Rule]
        } else {
            &[Neigh]
        };
        Self::events(groups, "neighbour")
    }

    /// Notifications of IPv4 route and rule changes (`ip monitor route rule`), and of links and
    /// addresses, whose removal flushes routes without a route notification.
    pub fn route_events() -> Result<Events, Error> {
        use rtnetlink::MulticastGroup::{Ipv4Ifaddr, Ipv4Route, Ipv4Rule, Link};
        Self::events(&[Ipv4Route, Ipv4Rule, Link, Ipv4Ifaddr], "route")
    }

    fn events(groups: &[rtnetlink::MulticastGroup], what: &str) -> Result<Events, Error> {
        let (conn, _, messages) =
            rtnetlink::new_multicast_connection(groups).map_err(|source| Error::NetlinkIo {
                context: format!("subscribing to {what} notifications"),
                source,
            })?;
        tokio::spawn(conn);
        Ok(Events(messages))
    }

    /// The raw rtnetlink handle, for the dataplane's own requests.
    #[must_use]
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn links(&self) -> Result<Vec<Link>, Error> {
        let msgs: Vec<_> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| Error::Netlink {
                context: "listing links".into(),
                source,
            })?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut link = Link {
                    name: String::new(),
                    index: m.header.index,
                    mtu: 0,
                    mac: [0; 6],
                    up: m.header.flags.contains(LinkFlags::Up),
                    controller: None,
                    loopback: m.header.flags.contains(LinkFlags::Loopback),
                    veth_to_other_netns: false,
                };
                let (mut veth, mut peer_netns) = (false, false);
                for attr in m.attributes {
                    match attr {
                        LinkAttribute::LinkInfo(infos) => {
                            veth = infos
                                .iter()
                                .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                        }
                        // Present when the link's peer lives in another namespace.
                        LinkAttribute::LinkNetNsId(_) => peer_netns = true,
                        LinkAttribute::IfName(name) => link.name = name,
                        LinkAttribute::Controller(c) => link.controller = Some(c),
                        LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                        LinkAttribute::Address(a) if a.len() == 6 => link.mac.copy_from_slice(&a),
                        _ => {}
                    }
                }
                link.veth_to_other_netns = veth && peer_netns;
                link
            })
            .collect())
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>, Error> {
        Ok(self.links().await?.into_iter().find(|l| l.name == name))
    }

    /// Every IPv4 address of this namespace, with its interface index, in kernel order.
    pub async fn ipv4_addrs(&self) -> Result<Vec<(u32, Ipv4Addr)>, Error> {
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| Error::Netlink {
                context: "listing addresses".into(),
                source,
            })?;
        let mut out = Vec::new();
        for m in msgs {
            for attr in &m.attributes {
                if let AddressAttribute::Local(IpAddr::V4(a))
                | AddressAttribute::Address(IpAddr::V4(a)) = attr
                {
                    if !out.contains(&(m.header.index, *a)) {
                        out.push((m.header.index, *a));
                    }
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Every IPv4 route of the main table (a dump returns every table's: policy-routing tables,
    /// `local`, VRFs must not decide which peers are direct or which routes are ours).
    async fn routes(&self) -> Result<Vec<RouteMessage>, Error> {
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|source| Error::Netlink {
                context: "listing routes".into(),
                source,
            })?;
        Ok(all
            .into_iter()
            .filter(|m| route_table_id(m) == RT_TABLE_MAIN)
            .collect())
    }

    /// The output interface of the IPv4 default route, if there is one.
    pub async fn default_route_oif(&self) -> Result<Option<u32>, Error> {
        let msgs = self.routes().await?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.destination_prefix_length == 0)
            .find_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
    }
}

/// Where the kernel's route lookup would send an encapsulated packet for each remote node.
impl Netlink {
    /// The underlay next hop of each of `nodes` (public IPs) out of `uplink`, as `ip route get
    /// <node> oif <uplink>` answers: the gateway, or the node itself
    /// where it is on the uplink's segment. Nodes without such a unicast route (unreachable,
    /// another way out, an IPv6 gateway, a lightweight tunnel) are left out. `Err(why)` when no
    /// answer holds for every packet: policy routing rules (a packet's mark or addresses may
    /// choose another table) or multipath routes (the kernel spreads flows by their hash).
    /// Without rules the packets' source address (ours, possibly a `--public-ip` behind NAT that is
    /// not local) cannot change the answer, so the query leaves it out.
    pub async fn underlay_next_hops(
        &self,
        uplink: u32,
        nodes: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Result<BTreeMap<Ipv4Addr, Ipv4Addr>, String>, Error> {
        use futures::StreamExt as _;
        let rules: Vec<RuleMessage> = self
            .handle
            .rule()
            .get(rtnetlink::IpVersion::V4)
            .execute()
            .try_collect()
            .await
            .map_err(|source| Error::Netlink {
                context: "listing routing rules".into(),
                source,
            })?;
        if let Some(rule) = rules.iter().find(|r| !is_default_rule(r)) {
            return Ok(Err(format!(
                "policy routing rules (priority {})",
                rule_priority(rule)
            )));
        }
        if self.routes().await?.iter().any(|m| {
            m.attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::MultiPath(_) | RouteAttribute::NhId(_)))
        }) {
            return Ok(Err("multipath or nexthop-object routes".into()));
        }
        let answers: Vec<Option<(Ipv4Addr, Ipv4Addr)>> = futures::stream::iter(nodes)
            .map(|node| async move {
                let query = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(node, 32)
                    .output_interface(uplink)
                    .build();
                let mut answer = self.handle.route().get(query).execute();
                // An error (no route: `ENETUNREACH`) leaves the node to the kernel.
                match answer.try_next().await {
                    Ok(Some(m)) => next_hop_of(&m, uplink, node).map(|via| (node, via)),
                    _ => None,
                }
            })
            .buffer_unordered(32)
            .collect()
            .await;
        Ok(Ok(answers.into_iter().flatten().collect()))
    }
}

/// One of the kernel's three rules (`local`, `main`, `default`), selecting nothing.
fn is_default_rule(r: &RuleMessage) -> bool {
    let h = &r.header;
    let plain = h.action == RuleAction::ToTable && h.dst_len == 0 && h.src_len == 0 && h.tos == 0;
    // The kernel reports an unset suppressor as all ones.
    let only_table = r.attributes.iter().all(|a| {
        matches!(
            a,
            RuleAttribute::Table(_)
                | RuleAttribute::Priority(_)
                | RuleAttribute::Protocol(_)
                | RuleAttribute::SuppressPrefixLen(u32::MAX)
                | RuleAttribute::SuppressIfGroup(u32::MAX)
        )
    });
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(h.table));
    plain
        && only_table
        && matches!(
            (rule_priority(r), table),
            (0, 255) | (32_766, RT_TABLE_MAIN) | (32_767, 253)
        )
}

fn rule_priority(r: &RuleMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0)
}

/// The next hop of a route lookup's answer for `dst`, if it is a plain unicast route out of
/// `uplink`: its IPv4 gateway, or `dst` itself.
fn next_hop_of(m: &RouteMessage, uplink: u32, dst: Ipv4Addr) -> Option<Ipv4Addr> {
    if m.header.kind != RouteType::Unicast {
        return None;
    }
    let (mut oif, mut via) = (None, dst);
    for a in &m.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = *g,
            RouteAttribute::Gateway(_)
            | RouteAttribute::Via(_)
            | RouteAttribute::MultiPath(_)
            | RouteAttribute::Encap(_) => return None,
            _ => {}
        }
    }
    (oif == Some(uplink)).then_some(via)
}

/// The kernel's main routing table.
pub const RT_TABLE_MAIN: u32 = 254;

/// The table a route belongs to (the attribute holds ids above 255, the header the rest).
#[must_use]
pub fn route_table_id(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// The main routing table, for flannel's "directly reachable" test (pkg/ip `DirectRouting`: the
/// route to a peer's public IP has no gateway, so it is on this node's L2 segment).
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// (destination, gateway) of each IPv4 unicast route of the main table.
    routes: Vec<(Ipv4Net, Option<Ipv4Addr>)>,
}

impl RouteTable {
    #[must_use]
    pub fn new(routes: Vec<(Ipv4Net, Option<Ipv4Addr>)>) -> Self {
        Self { routes }
    }

    /// True if the longest-prefix route to `ip` exists and has no gateway.
    #[must_use]
    pub fn is_direct(&self, ip: Ipv4Addr) -> bool {
        self.routes
            .iter()
            .filter(|(net, _)| net.contains(&ip))
            .max_by_key(|(net, _)| net.prefix_len())
            .is_some_and(|(_, gw)| gw.is_none())
    }
}

impl Netlink {
    /// A snapshot of the main table's IPv4 unicast routes.
    pub async fn route_table(&self) -> Result<RouteTable, Error> {
        use rtnetlink::packet_route::route::{RouteAddress, RouteType};
        let msgs = self.routes().await?;
        let mut routes = Vec::new();
        for m in msgs {
            if m.header.kind != RouteType::Unicast {
                continue;
            }
            let mut dst = Ipv4Addr::UNSPECIFIED;
            let mut gw = None;
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = *d,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                    _ => {}
                }
            }
            if let Ok(net) = Ipv4Net::new(dst, m.header.destination_prefix_length) {
                routes.push((net, gw));
            }
        }
        Ok(RouteTable { routes })
    }
}

/// One neighbour (ARP) or bridge forwarding-database entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub state: NeighbourState,
    pub ip: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
    /// For fdb entries: the bridge the port belongs to.
    pub controller: Option<u32>,
}

impl Netlink {
    /// The neighbour table of `family` (`Inet` for ARP, `Bridge` for the bridges' fdb).
    pub async fn neighbours(&self, family: AddressFamily) -> Result<Vec<Neighbour>, Error> {
        let msgs: Vec<_> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_collect()
            .await
            .map_err(|source| Error::Netlink {
                context: format!("listing {family:?} neighbours"),
                source,
            })?;
        Ok(msgs
            .into_iter()
            .map(|m| {
                let mut n = Neighbour {
                    ifindex: m.header.ifindex,
                    state: m.header.state,
                    ip: None,
                    mac: None,
                    controller: None,
                };
                for a in m.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                            n.ip = Some(ip);
                        }
                        NeighbourAttribute::LinkLayerAddress(m) if m.len() == 6 => {
                            let mut mac = [0u8; 6];
                            mac.copy_from_slice(&m);
                            n.mac = Some(mac);
                        }
                        NeighbourAttribute::Controller(c) => n.controller = Some(c),
                        _ => {}
                    }
                }
                n
            })
            .collect())
    }

    /// Local pods behind bridge `bridge`: each IPv4 neighbour of the bridge within `subnet` whose
    /// MAC the bridge's forwarding database places on one of its ports, and each pod of
    /// `previous` (what was learnt before) that [`still_learnt`] keeps. `links`: the node's links,
    /// as the caller listed them.
    pub async fn endpoints(
        &self,
        bridge: u32,
        subnet: Ipv4Net,
        links: &[Link],
        previous: &BTreeMap<Ipv4Addr, Endpoint>,
    ) -> Result<BTreeMap<Ipv4Addr, Endpoint>, Error> {
        let arp = self.neighbours(AddressFamily::Inet).await?;
        let fdb = self.neighbours(AddressFamily::Bridge).await?;
        Ok(learn_endpoints(bridge, subnet, links, &arp, &fdb, previous))
    }
}

/// [`Netlink::endpoints`] from the listings.
fn learn_endpoints(
    bridge: u32,
    subnet: Ipv4Net,
    links: &[Link],
    arp: &[Neighbour],
    fdb: &[Neighbour],
    previous: &BTreeMap<Ipv4Addr, Endpoint>,
) -> BTreeMap<Ipv4Addr, Endpoint> {
    // Ports that are veths to another namespace take `bpf_redirect_peer`.
    let peer_ports: HashSet<u32> = links
        .iter()
        .filter(|l| l.veth_to_other_netns && l.controller == Some(bridge))
        .map(|l| l.index)
        .collect();
    let endpoint = |ifindex: u32, mac: [u8; 6]| Endpoint {
        ifindex,
        mac,
        flags: if peer_ports.contains(&ifindex) {
            endpoint::PEER
        } else {
            0
        },
        _pad0: 0,
    };
    // Learnt (not permanent) entries of the bridge's ports: MAC → port.
    let ports: HashMap<[u8; 6], u32> = fdb
        .iter()
        .filter(|n| n.state != NeighbourState::Permanent && n.controller == Some(bridge))
        .filter_map(|n| Some((n.mac?, n.ifindex)))
        .collect();
    let usable = |n: &&Neighbour| {
        n.ifindex == bridge
            && !matches!(
                n.state,
                NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
            )
    };
    let mut out: BTreeMap<Ipv4Addr, Endpoint> = arp
        .iter()
        .filter(usable)
        .filter_map(|n| {
            let (ip, mac) = (n.ip?, n.mac?);
            let ifindex = *ports.get(&mac)?;
            subnet.contains(&ip).then(|| (ip, endpoint(ifindex, mac)))
        })
        .collect();
    let bridge_ports: HashSet<u32> = links
        .iter()
        .filter(|l| l.controller == Some(bridge))
        .map(|l| l.index)
        .collect();
    let arp_macs: HashMap<Ipv4Addr, [u8; 6]> = arp
        .iter()
        .filter(usable)
        .filter_map(|n| Some((n.ip?, n.mac?)))
        .collect();
    for (ip, old) in previous {
        if out.contains_key(ip) || !subnet.contains(ip) {
            continue;
        }
        let (arp_mac, fdb_port) = (arp_macs.get(ip).copied(), ports.get(&old.mac).copied());
        if still_learnt(old, arp_mac, fdb_port, &bridge_ports) {
            out.insert(*ip, endpoint(old.ifindex, old.mac));
        }
    }
    out
}

/// Whether a pod learnt before stays learnt now that its ARP or forwarding-database entry is gone.
/// The bridge forgets a MAC `ageing_time` (300 s) after the last frame from it crossed the
/// bridge, and a pod whose packets all leave by `from_pod_veth` (say, a TCP receiver that only
/// sends ACKs to other nodes) sends none across it; the node's ARP entry for it may be collected
/// too. Forgetting the pod would send its traffic through `cni0` again — flooded to every port
/// while the bridge does not know the MAC, and segmented in software — until the stack's next
/// ARP exchange with it. So it is kept while its port is still a port of the bridge (a pod that
/// goes takes its veth with it), no ARP entry gives its address another MAC (`arp_mac`), and the
/// forwarding database does not place its MAC on another port (`fdb_port`).
fn still_learnt(
    old: &Endpoint,
    arp_mac: Option<[u8; 6]>,
    fdb_port: Option<u32>,
    bridge_ports: &HashSet<u32>,
) -> bool {
    bridge_ports.contains(&old.ifindex)
        && arp_mac.is_none_or(|mac| mac == old.mac)
        && fdb_port.is_none_or(|port| port == old.ifindex)
}

/// Chooses the uplink as flanneld does: the first `--iface` (a name or an address) that exists;
/// else the first interface whose address or name matches an `--iface-regex` (see
/// [`choose_by_regex`]); else the interface of the default route.
pub async fn select(
    nl: &Netlink,
    ifaces: &[String],
    regexes: &[String],
) -> Result<ExtIface, Error> {
    let links = nl.links().await?;
    let addrs = nl.ipv4_addrs().await?;
    let first_addr = |index: u32| addrs.iter().find(|(i, _)| *i == index).map(|(_, a)| *a);
    let with_addr = |link: &Link| -> Result<ExtIface, Error> {
        let addr = first_addr(link.index)
            .ok_or_else(|| Error::Interface(format!("{} has no IPv4 address", link.name)))?;
        Ok(ExtIface {
            link: link.clone(),
            addr,
        })
    };

    if !ifaces.is_empty() {
        for spec in ifaces {
            let found = match spec.parse::<Ipv4Addr>() {
                Ok(ip) => addrs
                    .iter()
                    .find(|(_, a)| *a == ip)
                    .and_then(|(i, _)| links.iter().find(|l| l.index == *i)),
                Err(_) => links.iter().find(|l| &l.name == spec),
            };
            if let Some(link) = found {
                let ext = with_addr(link)?;
                tracing::info!(interface = %ext.link.name, address = %ext.addr, "uplink: --iface {spec}");
                return Ok(ext);
            }
        }
        return Err(Error::Interface(format!(
            "no interface matches --iface {} (interfaces here: {})",
            ifaces.join(", "),
            links
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }

    if !regexes.is_empty() {
        let (ext, why) = choose_by_regex(&links, &addrs, regexes)?;
        tracing::info!(interface = %ext.link.name, address = %ext.addr, "uplink: {why}");
        return Ok(ext);
    }

    let oif = nl.default_route_oif().await?.ok_or_else(|| {
        Error::Interface("no IPv4 default route to pick an interface from: use --iface".into())
    })?;
    let link = links
        .iter()
        .find(|l| l.index == oif)
        .ok_or_else(|| Error::Interface(format!("default route via unknown ifindex {oif}")))?;
    let ext = with_addr(link)?;
    tracing::info!(interface = %ext.link.name, address = %ext.addr, "uplink: the interface of the default route");
    Ok(ext)
}

/// Why an interface cannot be an uplink, if it cannot.
fn not_an_uplink(link: &Link, has_ipv4: bool) -> Option<&'static str> {
    if link.loopback {
        Some("loopback")
    } else if link.controller.is_some() {
        Some("a bridge or bond port (a pod's veth behind cni0, say)")
    } else if !has_ipv4 {
        Some("no IPv4 address")
    } else {
        None
    }
}

/// `--iface-regex` as flanneld applies it (Go's `MatchString`: a match anywhere in the text):
/// for each regex in turn, the first interface with an IPv4 address it matches, else the first
/// interface whose name it matches. Beyond flanneld, interfaces that cannot be an uplink
/// (loopback, bridge ports such as pods' veths, no IPv4 address) are never chosen: `eth` picks
/// `eth0`, not `veth3a9c…`. Returns the interface and why it was chosen.
pub fn choose_by_regex(
    links: &[Link],
    addrs: &[(u32, Ipv4Addr)],
    regexes: &[String],
) -> Result<(ExtIface, String), Error> {
    let first_addr = |index: u32| addrs.iter().find(|(i, _)| *i == index).map(|(_, a)| *a);
    let mut skipped = Vec::new();
    for re in regexes {
        let regex =
            Regex::new(re).map_err(|e| Error::Interface(format!("--iface-regex {re:?}: {e}")))?;
        let mut usable = |link: &Link| match not_an_uplink(link, first_addr(link.index).is_some()) {
            None => true,
            Some(why) => {
                skipped.push(format!("{} ({why})", link.name));
                false
            }
        };
        for (index, addr) in addrs {
            if regex.is_match(&addr.to_string())
                && let Some(link) = links.iter().find(|l| l.index == *index)
                && usable(link)
            {
                let ext = ExtIface {
                    link: link.clone(),
                    addr: *addr,
                };
                return Ok((
                    ext,
                    format!("its address {addr} matches --iface-regex {re}"),
                ));
            }
        }
        for link in links {
            if regex.is_match(&link.name) && usable(link) {
                let addr = first_addr(link.index).expect("usable links have an address");
                let ext = ExtIface {
                    link: link.clone(),
                    addr,
                };
                return Ok((ext, format!("its name matches --iface-regex {re}")));
            }
        }
    }
    skipped.dedup();
    let skipped = if skipped.is_empty() {
        String::new()
    } else {
        format!(" (matched but cannot be an uplink: {})", skipped.join(", "))
    };
    Err(Error::Interface(format!(
        "no interface name or IPv4 address matches --iface-regex {}{skipped}",
        regexes.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(priority: u32, table: u32, extra: Vec<RuleAttribute>) -> RuleMessage {
        let mut r = RuleMessage::default();
        r.header.action = RuleAction::ToTable;
        r.header.table = u8::try_from(table).unwrap_or(252);
        r.attributes = vec![
            RuleAttribute::Table(table),
            RuleAttribute::SuppressPrefixLen(u32::MAX),
        ];
        if priority != 0 {
            r.attributes.push(RuleAttribute::Priority(priority));
        }
        r.attributes.extend(extra);
        r
    }

    #[test]
    fn only_the_kernels_three_rules_are_default() {
        for (p, t) in [(0, 255), (32_766, 254), (32_767, 253)] {
            assert!(is_default_rule(&rule(p, t, vec![])), "{p} {t}");
        }
        assert!(!is_default_rule(&rule(100, 77, vec![])));
        assert!(!is_default_rule(&rule(
            32_766,
            254,
            vec![RuleAttribute::FwMark(0x77)]
        )));
        assert!(!is_default_rule(&rule(
            32_766,
            254,
            vec![RuleAttribute::SuppressPrefixLen(0)]
        )));
        let mut from = rule(0, 255, vec![]);
        from.header.src_len = 24;
        assert!(!is_default_rule(&from));
        let mut l3mdev = rule(1000, 0, vec![RuleAttribute::L3MDev(true)]);
        l3mdev.header.table = 0;
        assert!(!is_default_rule(&l3mdev));
    }

    #[test]
    fn a_route_answer_gives_its_gateway_or_the_destination() {
        let dst = Ipv4Addr::new(198, 18, 1, 13);
        let gw = Ipv4Addr::new(198, 18, 0, 1);
        let answer = |attrs: Vec<RouteAttribute>| {
            let mut m = RouteMessage::default();
            m.header.kind = RouteType::Unicast;
            m.attributes = attrs;
            m
        };
        let on_link = answer(vec![RouteAttribute::Oif(2)]);
        assert_eq!(next_hop_of(&on_link, 2, dst), Some(dst));
        let routed = answer(vec![
            RouteAttribute::Oif(2),
            RouteAttribute::Gateway(RouteAddress::Inet(gw)),
        ]);
        assert_eq!(next_hop_of(&routed, 2, dst), Some(gw));
        assert_eq!(next_hop_of(&routed, 3, dst), None, "another way out");
        let mut local = on_link.clone();
        local.header.kind = RouteType::Local;
        assert_eq!(next_hop_of(&local, 2, dst), None);
        let v6 = answer(vec![
            RouteAttribute::Oif(2),
            RouteAttribute::Gateway(RouteAddress::Inet6(std::net::Ipv6Addr::LOCALHOST)),
        ]);
        assert_eq!(next_hop_of(&v6, 2, dst), None);
    }

    fn link(index: u32, name: &str, controller: Option<u32>) -> Link {
        Link {
            name: name.into(),
            index,
            mtu: 1500,
            mac: [2, 0, 0, 0, 0, index as u8],
            up: true,
            controller,
            loopback: name == "lo",
            veth_to_other_netns: false,
        }
    }

    fn choose(regex: &str) -> Result<(String, Ipv4Addr), String> {
        // A veth behind cni0 listed before the uplink, a bridge with an address, loopback.
        let links = [
            link(1, "lo", None),
            link(2, "veth3a9c", Some(4)),
            link(3, "eth0", None),
            link(4, "cni0", None),
            link(5, "eth1", None),
        ];
        let addrs = [
            (1, Ipv4Addr::LOCALHOST),
            (3, Ipv4Addr::new(10, 0, 0, 5)),
            (4, Ipv4Addr::new(10, 244, 1, 1)),
        ];
        choose_by_regex(&links, &addrs, &[regex.to_string()])
            .map(|(e, _)| (e.link.name, e.addr))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn iface_regex_matches_anywhere_as_flanneld_and_skips_what_cannot_be_an_uplink() {
        let eth0 = Ok(("eth0".to_string(), Ipv4Addr::new(10, 0, 0, 5)));
        // Go's MatchString: "eth" matches anywhere; the veth (a cni0 port) is skipped.
        assert_eq!(choose("eth"), eth0);
        assert_eq!(choose("eth[0-9]+"), eth0);
        // Addresses first, unanchored.
        assert_eq!(choose(r"10\.0\."), eth0);
        assert_eq!(
            choose(r"10\.244\."),
            Ok(("cni0".to_string(), Ipv4Addr::new(10, 244, 1, 1)))
        );
        // eth1 has no IPv4 address, lo is loopback: neither is chosen.
        let e = choose("eth1").unwrap_err();
        assert!(e.contains("eth1 (no IPv4 address)"), "{e}");
        let e = choose("^lo$").unwrap_err();
        assert!(e.contains("lo (loopback)"), "{e}");
        assert!(choose("(").is_err());
    }

    /// cni0 (4) with two pod veths (10, 11); pod A 10.244.1.10 on 10, pod B 10.244.1.11 on 11.
    mod endpoints {
        use super::*;

        const BRIDGE: u32 = 4;
        const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
        const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
        const MAC_A: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x0a];
        const MAC_B: [u8; 6] = [0x0a, 0, 0, 0, 0, 0x0b];

        fn subnet() -> Ipv4Net {
            "10.244.1.0/24".parse().unwrap()
        }

        fn links() -> Vec<Link> {
            let mut pod_a = link(10, "veth-a", Some(BRIDGE));
            pod_a.veth_to_other_netns = true;
            vec![
                link(3, "eth0", None),
                link(BRIDGE, "cni0", None),
                pod_a,
                link(11, "veth-b", Some(BRIDGE)),
            ]
        }

        fn arp(ip: Ipv4Addr, mac: [u8; 6], state: NeighbourState) -> Neighbour {
            Neighbour {
                ifindex: BRIDGE,
                state,
                ip: Some(ip),
                mac: Some(mac),
                controller: None,
            }
        }

        fn fdb(mac: [u8; 6], port: u32) -> Neighbour {
            Neighbour {
                ifindex: port,
                state: NeighbourState::Reachable,
                ip: None,
                mac: Some(mac),
                controller: Some(BRIDGE),
            }
        }

        fn ep(ifindex: u32, mac: [u8; 6], flags: u8) -> Endpoint {
            Endpoint {
                ifindex,
                mac,
                flags,
                _pad0: 0,
            }
        }

        fn learn(
            links: &[Link],
            arp: &[Neighbour],
            fdb: &[Neighbour],
            previous: &[(Ipv4Addr, Endpoint)],
        ) -> Vec<(Ipv4Addr, Endpoint)> {
            let previous: BTreeMap<_, _> = previous.iter().copied().collect();
            learn_endpoints(BRIDGE, subnet(), links, arp, fdb, &previous)
                .into_iter()
                .collect()
        }

        #[test]
        fn a_pod_is_learnt_from_its_arp_and_fdb_entries() {
            let got = learn(
                &links(),
                &[
                    arp(A, MAC_A, NeighbourState::Stale),
                    arp(B, MAC_B, NeighbourState::Reachable),
                    // Not a pod: outside the subnet; and an unresolved one.
                    arp(
                        Ipv4Addr::new(10, 244, 2, 5),
                        MAC_B,
                        NeighbourState::Reachable,
                    ),
                    arp(Ipv4Addr::new(10, 244, 1, 99), MAC_B, NeighbourState::Failed),
                ],
                &[fdb(MAC_A, 10), fdb(MAC_B, 11)],
                &[],
            );
            assert_eq!(
                got,
                [(A, ep(10, MAC_A, endpoint::PEER)), (B, ep(11, MAC_B, 0))]
            );
        }

        #[test]
        fn a_pod_whose_entries_aged_out_stays_learnt_while_its_port_is_there() {
            // The bridge forgot A's MAC and the node's ARP entry for A was collected: A's
            // frames all leave by from_pod_veth. B's entries are there.
            let previous = [(A, ep(10, MAC_A, 0))];
            let got = learn(
                &links(),
                &[arp(B, MAC_B, NeighbourState::Stale)],
                &[fdb(MAC_B, 11)],
                &previous,
            );
            // Kept, with its flags as the port is now (a veth to a pod's namespace).
            assert_eq!(
                got,
                [(A, ep(10, MAC_A, endpoint::PEER)), (B, ep(11, MAC_B, 0))]
            );
            // Only the fdb entry gone, the ARP entry there (the usual case): kept.
            let got = learn(
                &links(),
                &[arp(A, MAC_A, NeighbourState::Stale)],
                &[],
                &previous,
            );
            assert_eq!(got, [(A, ep(10, MAC_A, endpoint::PEER))]);
        }

        #[test]
        fn a_pod_is_forgotten_when_its_port_goes_or_its_address_or_mac_moves() {
            let previous = [(A, ep(10, MAC_A, endpoint::PEER))];
            // The pod went, and its veth with it.
            let without_a: Vec<Link> = links().into_iter().filter(|l| l.index != 10).collect();
            assert_eq!(learn(&without_a, &[], &[], &previous), []);
            // The veth left the bridge.
            let mut detached = links();
            detached[2].controller = None;
            assert_eq!(learn(&detached, &[], &[], &previous), []);
            // The address now answers with another MAC, whose port the bridge does not know yet.
            let other_mac = [0x0a, 0, 0, 0, 0, 0x0c];
            assert_eq!(
                learn(
                    &links(),
                    &[arp(A, other_mac, NeighbourState::Reachable)],
                    &[],
                    &previous
                ),
                []
            );
            // The bridge saw the MAC on another port.
            assert_eq!(learn(&links(), &[], &[fdb(MAC_A, 11)], &previous), []);
            // A new lease: the old subnet's pods are not this node's any more.
            let moved: BTreeMap<_, _> = previous.into_iter().collect();
            assert!(
                learn_endpoints(
                    BRIDGE,
                    "10.244.7.0/24".parse().unwrap(),
                    &links(),
                    &[],
                    &[],
                    &moved
                )
                .is_empty()
            );
        }

        #[test]
        fn fresh_entries_win_over_what_was_learnt_before() {
            // The address moved to pod B's veth and MAC (a new pod with the old address).
            let got = learn(
                &links(),
                &[arp(A, MAC_B, NeighbourState::Reachable)],
                &[fdb(MAC_B, 11)],
                &[(A, ep(10, MAC_A, endpoint::PEER))],
            );
            assert_eq!(got, [(A, ep(11, MAC_B, 0))]);
        }
    }
}
