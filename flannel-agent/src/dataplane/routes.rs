//! The kernel objects both dataplanes keep in step with the leases: routes for remote pod
//! subnets, permanent neighbours for their gateways and (for the kernel VXLAN device) fdb entries.
//!
//! - eBPF dataplane: the node's own traffic for remote subnets is steered into `cni0`, where
//!   `from_host` (tc egress) sends it on — the shape flanneld gives `flannel.1`: per remote lease
//!   `<subnet> via <subnet>.0 dev cni0 onlink mtu <pod MTU>` and a permanent neighbour
//!   `<subnet>.0 lladdr <MAC>`.
//! - netlink dataplane: exactly flanneld's objects (see `dataplane::netlink`).
//!
//! Our routes carry protocol [`PROTO`], so that only they are ever changed or removed.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
        route::{
            RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteProtocol,
        },
    },
};

use super::{SyncReport, nl_err};
use crate::{
    Error,
    iface::{Netlink, RT_TABLE_MAIN, route_table_id},
};

/// `proto 102` in `ip route`: flannel-ebpf's routes.
pub const PROTO: RouteProtocol = RouteProtocol::Other(102);

/// One remote subnet's route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub gateway: Ipv4Addr,
    pub oif: u32,
    /// `onlink`: the gateway is not in any of the device's subnets (`<subnet>.0`).
    pub onlink: bool,
    /// Route MTU, if any.
    pub mtu: Option<u32>,
}

/// Our routes in the main table: destination → (what the route is, its message).
async fn current_routes(nl: &Netlink) -> Result<BTreeMap<Ipv4Net, (Route, RouteMessage)>, Error> {
    let msgs: Vec<RouteMessage> = nl
        .handle()
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("listing routes".into()))?;
    let mut out = BTreeMap::new();
    let ours = |m: &RouteMessage| m.header.protocol == PROTO && route_table_id(m) == RT_TABLE_MAIN;
    for m in msgs.into_iter().filter(ours) {
        let mut dst = None;
        let mut route = Route {
            gateway: Ipv4Addr::UNSPECIFIED,
            oif: 0,
            onlink: m.header.flags.contains(RouteFlags::Onlink),
            mtu: None,
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = *g,
                RouteAttribute::Oif(i) => route.oif = *i,
                RouteAttribute::Metrics(metrics) => {
                    route.mtu = metrics.iter().find_map(|x| match x {
                        RouteMetric::Mtu(mtu) => Some(*mtu),
                        _ => None,
                    });
                }
                _ => {}
            }
        }
        if let Some(net) =
            dst.and_then(|d| Ipv4Net::new(d, m.header.destination_prefix_length).ok())
        {
            out.insert(net, (route, m));
        }
    }
    Ok(out)
}

/// Permanent IPv4 neighbours of `ifindex`: address → MAC.
async fn permanent_neighbours(
    nl: &Netlink,
    ifindex: u32,
) -> Result<BTreeMap<Ipv4Addr, [u8; 6]>, Error> {
    Ok(nl
        .neighbours(AddressFamily::Inet)
        .await?
        .into_iter()
        .filter(|n| n.ifindex == ifindex && n.state == NeighbourState::Permanent)
        .filter_map(|n| Some((n.ip?, n.mac?)))
        .collect())
}

/// Makes our routes in the main table exactly `desired`.
pub async fn sync(nl: &Netlink, desired: &BTreeMap<Ipv4Net, Route>) -> Result<SyncReport, Error> {
    let mut report = SyncReport::default();
    let routes = current_routes(nl).await?;
    for (net, want) in desired {
        match routes.get(net) {
            // Gateway, device, onlink and MTU: a changed pod MTU is applied too.
            Some((cur, _)) if cur == want => continue,
            Some(_) => report.updated += 1,
            None => report.added += 1,
        }
        let builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .gateway(want.gateway)
            .output_interface(want.oif)
            .protocol(PROTO);
        let mut msg = if want.onlink {
            builder.onlink().build()
        } else {
            builder.build()
        };
        if let Some(mtu) = want.mtu {
            msg.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        }
        nl.handle()
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!(
                "adding route {net} via {} (ifindex {})",
                want.gateway, want.oif
            )))?;
    }
    for (net, (_, msg)) in routes {
        if !desired.contains_key(&net) {
            delete_route(nl, net, msg).await?;
            report.removed += 1;
        }
    }
    Ok(report)
}

/// Makes the permanent neighbours of `ifindex` inside `network` (outside this node's `own`
/// subnet) exactly `desired` (gateway → MAC).
pub async fn sync_neighbours(
    nl: &Netlink,
    ifindex: u32,
    network: Ipv4Net,
    own: Ipv4Net,
    desired: &BTreeMap<Ipv4Addr, [u8; 6]>,
) -> Result<(), Error> {
    let neighbours = permanent_neighbours(nl, ifindex).await?;
    for (ip, mac) in desired {
        if neighbours.get(ip) != Some(mac) {
            nl.handle()
                .neighbours()
                .add(ifindex, IpAddr::V4(*ip))
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl_err(format!("adding neighbour {ip} (ifindex {ifindex})")))?;
        }
    }
    for ip in neighbours.keys() {
        if network.contains(ip) && !own.contains(ip) && !desired.contains_key(ip) {
            remove_neighbour(nl, ifindex, *ip).await?;
        }
    }
    Ok(())
}

/// Makes the permanent forwarding entries of a VXLAN device exactly `desired` (remote VTEP MAC →
/// remote public IP), as `bridge fdb add <mac> dev flannel.<VNI> dst <ip> self permanent`.
pub async fn sync_fdb(
    nl: &Netlink,
    ifindex: u32,
    desired: &BTreeMap<[u8; 6], Ipv4Addr>,
) -> Result<(), Error> {
    let current: BTreeMap<[u8; 6], Option<Ipv4Addr>> = nl
        .neighbours(AddressFamily::Bridge)
        .await?
        .into_iter()
        .filter(|n| n.ifindex == ifindex && n.state == NeighbourState::Permanent)
        .filter_map(|n| Some((n.mac?, n.ip)))
        .collect();
    for (mac, ip) in desired {
        if current.get(mac) == Some(&Some(*ip)) {
            continue;
        }
        nl.handle()
            .neighbours()
            .add_bridge(ifindex, mac)
            .destination(IpAddr::V4(*ip))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!(
                "adding fdb entry {} dst {ip} (ifindex {ifindex})",
                crate::backend::Mac(*mac)
            )))?;
    }
    for (mac, ip) in current {
        // The all-zeros entry is the device's default destination, not a peer.
        if mac == [0; 6] || desired.contains_key(&mac) {
            continue;
        }
        let mut attributes = vec![NeighbourAttribute::LinkLayerAddress(mac.to_vec())];
        attributes.extend(ip.map(|ip| NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))));
        delete_neighbour(
            nl,
            (AddressFamily::Bridge, ifindex, NeighbourFlags::Own),
            attributes,
            format!("removing fdb entry {}", crate::backend::Mac(mac)),
        )
        .await?;
    }
    Ok(())
}

async fn delete_route(nl: &Netlink, net: Ipv4Net, msg: RouteMessage) -> Result<(), Error> {
    nl.handle()
        .route()
        .del(msg)
        .execute()
        .await
        .map_err(nl_err(format!("removing route {net}")))
}

async fn remove_neighbour(nl: &Netlink, ifindex: u32, ip: Ipv4Addr) -> Result<(), Error> {
    delete_neighbour(
        nl,
        (AddressFamily::Inet, ifindex, NeighbourFlags::empty()),
        vec![NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))],
        format!("removing neighbour {ip}"),
    )
    .await
}

/// Deletes the neighbour or fdb entry of (family, ifindex, flags) that `attributes` name.
async fn delete_neighbour(
    nl: &Netlink,
    (family, ifindex, flags): (AddressFamily, u32, NeighbourFlags),
    attributes: Vec<NeighbourAttribute>,
    context: String,
) -> Result<(), Error> {
    let mut msg = rtnetlink::packet_route::neighbour::NeighbourMessage::default();
    msg.header.family = family;
    msg.header.ifindex = ifindex;
    msg.header.flags = flags;
    msg.attributes = attributes;
    nl.handle()
        .neighbours()
        .del(msg)
        .execute()
        .await
        .map_err(nl_err(context))
}

/// Removes every route of ours and its gateway's neighbour (for `--cleanup`).
pub async fn remove_all(nl: &Netlink) -> Result<usize, Error> {
    let routes = current_routes(nl).await?;
    let count = routes.len();
    for (net, (route, msg)) in routes {
        delete_route(nl, net, msg).await?;
        if !route.gateway.is_unspecified() {
            // Best effort: the neighbour may already be gone with its device.
            let _ = remove_neighbour(nl, route.oif, route.gateway).await;
        }
    }
    Ok(count)
}
