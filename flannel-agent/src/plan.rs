//! The plan: from a lease set, this node's lease and what the dataplane should hold for every
//! peer (flannel's backends decide how a peer is reached: a tunnel route of the backend's kind, a
//! direct route, a WireGuard peer, or not at all).
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use flannel_ebpf_common::{RemoteNode, RemoteSubnet};
use ipnet::Ipv4Net;
use tracing::{error, warn};

use crate::{
    Error,
    backend::{self as backends, Mac, Peering, wireguard},
    config::Backend,
    dataplane::{Desired, wireguard::Peer},
    iface::RouteTable,
    lease::Lease,
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
        let vtep_mac = backend.own_mac(own, wg_key, source)?;
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
                .and_then(|()| backend.peer(data, direct.is_direct(ip), ip));
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
    pub fn report_unreachable(&self, before: Option<&Self>) {
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

/// The first address of a subnet: the `cni0` gateway.
#[must_use]
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}
