//! The kernel dataplane: what flanneld itself programs, through rtnetlink. Used with
//! `--dataplane=netlink`, and where eBPF cannot be loaded (old kernel, missing capability).
//!
//! - vxlan (pkg/backend/vxlan): the device `flannel.<VNI>` (`vxlan id <VNI> local <public IP> dev
//!   <uplink> dstport <Port> nolearning`, MAC = the VtepMAC of this node's lease, address
//!   `<subnet>.0/32`), and per remote lease a permanent neighbour `<subnet>.0 lladdr <VtepMAC>`, an
//!   fdb entry `<VtepMAC> dst <PublicIP> self permanent` and a route `<subnet> via <subnet>.0 dev
//!   flannel.<VNI> onlink`. With DirectRouting, a peer on this node's segment gets
//!   `<subnet> via <PublicIP> dev <uplink>` instead.
//! - host-gw (pkg/backend/hostgw): per remote lease `<subnet> via <PublicIP> dev <uplink>`.
use std::{collections::BTreeMap, net::Ipv4Addr};

use flannel_ebpf_common::backend;
use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::{
    LinkVxlan,
    packet_route::link::{InfoData, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage},
};
use tracing::info;

use super::{Desired, SyncReport, nl_err, routes};
use crate::{
    Error,
    backend::Mac,
    config::VxlanConfig,
    iface::{ExtIface, Link, Netlink},
};

/// The VXLAN device flanneld names after the VNI.
#[must_use]
pub fn vxlan_name(vni: u32) -> String {
    format!("flannel.{vni}")
}

/// flanneld's objects for one backend.
pub struct KernelDataplane {
    uplink: u32,
    network: Ipv4Net,
    own: Ipv4Net,
    /// The `flannel.<VNI>` device (vxlan only).
    vxlan: Option<Link>,
}

/// The vxlan attributes of a link message, if it is a VXLAN device.
fn vxlan_info(msg: &LinkMessage) -> Option<&Vec<InfoVxlan>> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|i| match i {
            LinkInfo::Data(InfoData::Vxlan(v)) => Some(v),
            _ => None,
        }),
        _ => None,
    })
}

impl KernelDataplane {
    /// A host-gw dataplane: routes through the uplink only.
    #[must_use]
    pub fn host_gw(ext: &ExtIface, network: Ipv4Net, own: Ipv4Net) -> Self {
        Self {
            uplink: ext.link.index,
            network,
            own,
            vxlan: None,
        }
    }

    /// A vxlan dataplane: creates `flannel.<VNI>` as flanneld does, or adopts an existing one with
    /// the same attributes (an existing one that differs is replaced, as flanneld's `ensureLink`).
    #[expect(
        clippy::too_many_arguments,
        reason = "the device's attributes, each from a different source"
    )]
    pub async fn vxlan(
        nl: &Netlink,
        cfg: &VxlanConfig,
        ext: &ExtIface,
        public_ip: Ipv4Addr,
        network: Ipv4Net,
        own: Ipv4Net,
        vtep_mac: Mac,
        mtu: u32,
    ) -> Result<Self, Error> {
        let name = vxlan_name(cfg.vni);
        let want = [
            InfoVxlan::Id(cfg.vni),
            InfoVxlan::Link(ext.link.index),
            InfoVxlan::Local(public_ip),
            InfoVxlan::Port(cfg.port),
            InfoVxlan::Learning(false),
        ];
        // "No such device" reads as none.
        let existing: Vec<LinkMessage> = nl
            .handle()
            .link()
            .get()
            .match_name(name.clone())
            .execute()
            .try_collect()
            .await
            .unwrap_or_default();
        if let Some(msg) = existing.into_iter().next() {
            let same = vxlan_info(&msg).is_some_and(|have| want.iter().all(|w| have.contains(w)));
            if same {
                info!(device = %name, "adopting the existing VXLAN device");
            } else {
                info!(device = %name, "replacing a VXLAN device with other attributes");
                nl.handle()
                    .link()
                    .del(msg.header.index)
                    .execute()
                    .await
                    .map_err(nl_err(format!("removing {name}")))?;
                Self::create_vxlan(nl, &name, cfg, ext, public_ip, vtep_mac).await?;
            }
        } else {
            Self::create_vxlan(nl, &name, cfg, ext, public_ip, vtep_mac).await?;
        }
        let link = nl
            .link_by_name(&name)
            .await?
            .ok_or_else(|| Error::Interface(format!("{name} disappeared after creation")))?;
        nl.handle()
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(link.index)
                    .address(vtep_mac.0.to_vec())
                    .mtu(mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl_err(format!("setting {name} up (mtu {mtu})")))?;
        let addr = own.network();
        let has_addr = nl.ipv4_addrs().await?.contains(&(link.index, addr));
        if !has_addr {
            nl.handle()
                .address()
                .add(link.index, addr.into(), 32)
                .execute()
                .await
                .map_err(nl_err(format!("adding {addr}/32 to {name}")))?;
        }
        Ok(Self {
            uplink: ext.link.index,
            network,
            own,
            vxlan: Some(link),
        })
    }

    async fn create_vxlan(
        nl: &Netlink,
        name: &str,
        cfg: &VxlanConfig,
        ext: &ExtIface,
        public_ip: Ipv4Addr,
        vtep_mac: Mac,
    ) -> Result<(), Error> {
        let msg = LinkVxlan::new(name, cfg.vni)
            .dev(ext.link.index)
            .local(public_ip)
            .port(cfg.port)
            .learning(false)
            .address(vtep_mac.0.to_vec())
            .build();
        nl.handle()
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(nl_err(format!(
                "creating {name} (vxlan id {} local {public_ip} dev {} dstport {})",
                cfg.vni, ext.link.name, cfg.port
            )))?;
        info!(device = %name, vni = cfg.vni, port = cfg.port, "created the VXLAN device");
        Ok(())
    }

    /// Makes the kernel's routes, neighbours and fdb entries exactly those of `desired`.
    pub async fn sync(&self, nl: &Netlink, desired: &Desired) -> Result<SyncReport, Error> {
        let mut want = BTreeMap::new();
        let mut neighbours = BTreeMap::new();
        let mut fdb = BTreeMap::new();
        for (net, remote) in &desired.routes {
            let public_ip = Ipv4Addr::from(remote.public_ip);
            match (remote.backend, &self.vxlan) {
                (backend::VXLAN, Some(dev)) => {
                    let gateway = net.network();
                    neighbours.insert(gateway, remote.vtep_mac);
                    fdb.insert(remote.vtep_mac, public_ip);
                    want.insert(
                        *net,
                        routes::Route {
                            gateway,
                            oif: dev.index,
                            onlink: true,
                            mtu: None,
                        },
                    );
                }
                (backend::HOST_GW, _) => {
                    want.insert(
                        *net,
                        routes::Route {
                            gateway: public_ip,
                            oif: self.uplink,
                            onlink: false,
                            mtu: None,
                        },
                    );
                }
                (other, _) => {
                    return Err(Error::Unsupported(format!(
                        "the netlink dataplane cannot carry backend {other} for {net}"
                    )));
                }
            }
        }
        if let Some(dev) = &self.vxlan {
            // Neighbours and fdb entries first, so that a new route never points at nothing.
            routes::sync_neighbours(nl, dev.index, self.network, self.own, &neighbours).await?;
            routes::sync_fdb(nl, dev.index, &fdb).await?;
        }
        routes::sync(nl, &want).await
    }
}

/// Removes every `flannel.<VNI>` VXLAN device (for `--cleanup`); returns how many.
pub async fn remove_devices(nl: &Netlink) -> Result<usize, Error> {
    let mut removed = 0;
    for link in nl.links().await? {
        if link.name.starts_with("flannel.") && link.name[8..].parse::<u32>().is_ok() {
            nl.handle()
                .link()
                .del(link.index)
                .execute()
                .await
                .map_err(nl_err(format!("removing {}", link.name)))?;
            removed += 1;
        }
    }
    Ok(removed)
}

impl super::Dataplane for KernelDataplane {
    fn name(&self) -> &'static str {
        "netlink"
    }

    fn apply<'a>(
        &'a mut self,
        nl: &'a Netlink,
        _node: &'a super::Node<'a>,
        plan: &'a crate::plan::Plan,
    ) -> futures::future::LocalBoxFuture<'a, Result<SyncReport, Error>> {
        Box::pin(self.sync(nl, &plan.desired))
    }
}
