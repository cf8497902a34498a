//! Programming the kernel (flannel's backends' `RegisterNetwork` and their `Run` loops): one
//! [`Dataplane`] trait, implemented by the eBPF dataplane ([`ebpf_node`]), flanneld's kernel
//! objects ([`netlink`]) and the WireGuard device ([`wireguard`]). The agent starts one with
//! [`start`] and then only hands it plans.
pub mod ebpf;
pub mod ebpf_node;
pub mod headroom;
pub mod masq;
pub mod netlink;
pub mod routes;
pub mod slowpath;
pub mod wireguard;

use std::{collections::BTreeMap, net::Ipv4Addr};

use flannel_ebpf_common::{RemoteNode, RemoteSubnet};
use futures::future::LocalBoxFuture;
use ipnet::Ipv4Net;
use tracing::{info, warn};

use crate::{
    Error,
    backend::wireguard::Key,
    cli::{Args, DataplaneKind},
    config::{Backend, NetConf},
    iface::{ExtIface, Netlink},
    plan::Plan,
};

/// An rtnetlink failure, with what was being done.
pub(crate) fn nl_err(context: String) -> impl FnOnce(rtnetlink::Error) -> Error {
    move |source| Error::Netlink { context, source }
}

/// What the dataplane should hold for the remote nodes: the same for every lease source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Remote pod subnet → remote node.
    pub routes: BTreeMap<Ipv4Net, RemoteSubnet>,
    /// Remote node public IP → node.
    pub nodes: BTreeMap<Ipv4Addr, RemoteNode>,
}

/// What a sync changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl SyncReport {
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.added + self.updated + self.removed == 0
    }
}

impl std::fmt::Display for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} added, {} updated, {} removed",
            self.added, self.updated, self.removed
        )
    }
}

/// Everything about this node that is fixed for the agent's lifetime.
pub struct Node<'a> {
    pub args: &'a Args,
    pub netconf: NetConf,
    pub ext: ExtIface,
    pub public_ip: Ipv4Addr,
    pub pod_mtu: u32,
    /// The eBPF masquerade's settings (`--ip-masq`); used where the eBPF dataplane runs.
    pub masq: Option<masq::Masquerade>,
}

/// A dataplane: brings the kernel to a plan, and keeps it there.
pub trait Dataplane {
    /// Its name in logs and metrics (`ebpf`, `netlink`, `wireguard`).
    fn name(&self) -> &'static str;

    /// True if this dataplane masquerades itself (so the kernel's rules must not).
    fn masquerades(&self) -> bool {
        false
    }

    /// Brings the dataplane to `plan` (only the difference is applied).
    fn apply<'a>(
        &'a mut self,
        nl: &'a Netlink,
        node: &'a Node<'a>,
        plan: &'a Plan,
    ) -> LocalBoxFuture<'a, Result<SyncReport, Error>>;

    /// Once a second and on neighbour changes, with `repair` every 10 s: follows what changes
    /// without a new plan (the bridge, local pods) and repairs kernel state that drifted. By
    /// default: the plan applied again on a repair pass (a sync compares with the kernel).
    fn tick<'a>(
        &'a mut self,
        nl: &'a Netlink,
        node: &'a Node<'a>,
        plan: &'a Plan,
        repair: bool,
    ) -> LocalBoxFuture<'a, Result<(), Error>> {
        Box::pin(async move {
            if repair {
                self.apply(nl, node, plan).await?;
            }
            Ok(())
        })
    }

    /// The agent stops and leaves the dataplane forwarding: state only a running agent keeps
    /// current is put back to what holds without it. Nothing, by default.
    fn stop(&mut self) -> Result<(), Error> {
        Ok(())
    }
}

/// Starts the dataplane `--dataplane` asks for, falling back from eBPF to netlink where eBPF
/// cannot be loaded and the backend has a kernel dataplane. `wg_private`: this node's WireGuard
/// private key (wireguard backend).
pub async fn start(
    nl: &Netlink,
    node: &Node<'_>,
    plan: &Plan,
    wg_private: Option<&Key>,
) -> Result<Box<dyn Dataplane>, Error> {
    let backend = &node.netconf.backend;
    if let Backend::Wireguard(wg) = backend {
        let key = wg_private.expect("the key is loaded for the wireguard backend");
        let dev = wireguard::WireguardDevice::ensure(
            nl,
            wg,
            key,
            plan.own.subnet,
            node.netconf.network,
            node.pod_mtu,
        )
        .await?;
        headroom::remove_or_warn(nl).await;
        return Ok(Box::new(dev));
    }
    let kernel_ok = backend.has_kernel_dataplane();
    match node.args.dataplane {
        DataplaneKind::Netlink if kernel_ok => start_kernel(nl, node, plan).await,
        DataplaneKind::Netlink => Err(Error::Unsupported(format!(
            "backend {}: no netlink dataplane (flannel's uses a kernel tunnel module or a userspace proxy); use --dataplane=ebpf",
            backend.name()
        ))),
        DataplaneKind::Ebpf => Ok(Box::new(ebpf_node::EbpfNode::start(nl, node, plan).await?)),
        DataplaneKind::Auto => match ebpf_node::EbpfNode::start(nl, node, plan).await {
            Ok(e) => Ok(Box::new(e)),
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

async fn start_kernel(
    nl: &Netlink,
    node: &Node<'_>,
    plan: &Plan,
) -> Result<Box<dyn Dataplane>, Error> {
    // flanneld's objects only: the kernel's tunnel reallocates heads anyway.
    headroom::remove_or_warn(nl).await;
    let dp = match &node.netconf.backend {
        Backend::Vxlan(vx) => {
            netlink::KernelDataplane::vxlan(
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
        _ => netlink::KernelDataplane::host_gw(&node.ext, node.netconf.network, plan.own.subnet),
    };
    Ok(Box::new(dp))
}

/// Removes what every dataplane leaves in the kernel (`--cleanup`): our routes and their
/// neighbours, flanneld's `flannel.<VNI>` devices, the WireGuard device, the headroom device, the masquerade's
/// reserved ports, the pinned programs, links and maps, and the subnet file.
pub async fn remove_all(nl: &Netlink, args: &Args) -> Result<(), Error> {
    let removed = routes::remove_all(nl).await?;
    info!(routes = removed, "removed the routes of remote subnets");
    let devices = netlink::remove_devices(nl).await?;
    if devices > 0 {
        info!(devices, "removed the flannel.<VNI> VXLAN devices");
    }
    if wireguard::WireguardDevice::remove(nl).await? {
        info!("removed the flannel-wg device");
    }
    if headroom::remove(nl).await? {
        info!(device = headroom::DEVICE, "removed");
    }
    if let Err(e) = masq::release_ports(args.ip_masq_port_range) {
        warn!("{e}");
    }
    ebpf::cleanup(&args.pin_dir, &args.subnet_file)
}
