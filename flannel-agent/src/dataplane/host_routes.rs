//! Routes that steer the node's own traffic for remote pod subnets into `cni0`, where the
//! `from_host` program (tc egress) encapsulates it — the same shape flanneld gives `flannel.1`:
//! per remote lease `<subnet> via <subnet>.0 dev cni0 onlink mtu <pod MTU>` and a permanent
//! neighbour `<subnet>.0 lladdr <VtepMAC>`. Our routes carry protocol [`PROTO`], so that only they
//! are ever changed or removed.
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
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteMetric, RouteProtocol},
    },
};

use super::SyncReport;
use crate::{Error, iface::Netlink};

/// `proto 102` in `ip route`: flannel-ebpf's routes.
pub const PROTO: RouteProtocol = RouteProtocol::Other(102);

/// One remote subnet as the node's routing table should see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRoute {
    pub gateway: Ipv4Addr,
    pub vtep_mac: [u8; 6],
}

fn nl_err(context: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |source| Error::Netlink { context, source }
}

/// Our routes in the main table: destination → (gateway, output interface).
async fn current_routes(
    nl: &Netlink,
) -> Result<BTreeMap<Ipv4Net, (Option<Ipv4Addr>, u32, RouteMessage)>, Error> {
    let msgs: Vec<RouteMessage> = nl
        .handle()
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(nl_err("listing routes".into()))?;
    let mut out = BTreeMap::new();
    for m in msgs.into_iter().filter(|m| m.header.protocol == PROTO) {
        let mut dst = None;
        let mut gw = None;
        let mut oif = 0;
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                RouteAttribute::Oif(i) => oif = *i,
                _ => {}
            }
        }
        if let Some(net) =
            dst.and_then(|d| Ipv4Net::new(d, m.header.destination_prefix_length).ok())
        {
            out.insert(net, (gw, oif, m));
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

/// Makes the routing table and `cni0`'s neighbours hold exactly `desired` (remote subnet → its
/// gateway and VTEP MAC), with route MTU `mtu`. `network` bounds which neighbours are ours.
pub async fn sync(
    nl: &Netlink,
    cni: u32,
    network: Ipv4Net,
    own: Ipv4Net,
    mtu: u32,
    desired: &BTreeMap<Ipv4Net, HostRoute>,
) -> Result<SyncReport, Error> {
    let mut report = SyncReport::default();
    let routes = current_routes(nl).await?;
    let neighbours = permanent_neighbours(nl, cni).await?;
    for (net, want) in desired {
        if neighbours
            .get(&want.gateway)
            .is_none_or(|mac| mac[..] != want.vtep_mac[..])
        {
            nl.handle()
                .neighbours()
                .add(cni, IpAddr::V4(want.gateway))
                .link_layer_address(&want.vtep_mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(nl_err(format!("adding neighbour {} on cni0", want.gateway)))?;
        }
        match routes.get(net) {
            Some((Some(gw), oif, _)) if *gw == want.gateway && *oif == cni => continue,
            Some(_) => report.updated += 1,
            None => report.added += 1,
        }
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.network(), net.prefix_len())
            .gateway(want.gateway)
            .output_interface(cni)
            .protocol(PROTO)
            .onlink()
            .build();
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        nl.handle()
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl_err(format!(
                "adding route {net} via {} dev cni0",
                want.gateway
            )))?;
    }
    for (net, (_, _, msg)) in routes {
        if !desired.contains_key(&net) {
            delete_route(nl, net, msg).await?;
            report.removed += 1;
        }
    }
    let gateways: Vec<Ipv4Addr> = desired.values().map(|r| r.gateway).collect();
    for ip in neighbours.keys() {
        if network.contains(ip) && !own.contains(ip) && !gateways.contains(ip) {
            remove_neighbour(nl, cni, *ip).await?;
        }
    }
    Ok(report)
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
    let mut msg = rtnetlink::packet_route::neighbour::NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
    nl.handle()
        .neighbours()
        .del(msg)
        .execute()
        .await
        .map_err(nl_err(format!("removing neighbour {ip}")))
}

/// Removes every route of ours and its gateway's neighbour (for `--cleanup`).
pub async fn remove_all(nl: &Netlink) -> Result<usize, Error> {
    let routes = current_routes(nl).await?;
    let count = routes.len();
    for (net, (gw, oif, msg)) in routes {
        delete_route(nl, net, msg).await?;
        if let Some(gw) = gw {
            // Best effort: the neighbour may already be gone with its device.
            let _ = remove_neighbour(nl, oif, gw).await;
        }
    }
    Ok(count)
}
