//! Leases: which node owns which pod subnet (flannel's `pkg/lease`), from one of the lease
//! sources (`static_file`, `kube`, `etcd`) behind one trait, [`LeaseSource`] (flannel's
//! `subnet.Manager`). Each source publishes the whole current lease set on a
//! `tokio::sync::watch` channel; the agent's one reconciler turns every set into dataplane state.
pub mod etcd;
pub mod kube;
pub mod static_file;

use std::{net::Ipv4Addr, path::PathBuf};

use futures::future::LocalBoxFuture;
use ipnet::Ipv4Net;
use serde_json::Value;
use tokio::sync::watch;

use crate::{
    Error,
    cli::{Args, SubnetMgr},
    config::NetConf,
};

/// What this node brings when it joins the cluster.
pub struct Join<'a> {
    pub netconf: &'a NetConf,
    /// This node's public IP (the Kubernetes source may take `node-public-ip` instead).
    pub public_ip: Ipv4Addr,
    /// The `BackendData` this node advertises, given the lease it already holds (if any): a
    /// vxlan node keeps its VTEP MAC across restarts.
    pub backend_data: &'a dyn Fn(Option<&Lease>) -> Value,
    /// Checks a public IP before anything carrying it is published.
    pub check_public_ip: &'a dyn Fn(Ipv4Addr) -> Result<(), Error>,
}

/// This node, joined.
pub struct Joined {
    /// This node's public IP (after the source's own settings, e.g. `node-public-ip`).
    pub public_ip: Ipv4Addr,
    /// The public IP this node's lease carries (`public-ip-overwrite`), by which the agent finds
    /// its own lease in the set.
    pub lease_ip: Ipv4Addr,
    /// The whole lease set, now and as it changes. A control plane's holds this node's lease
    /// already; a static file's is as written (the plan says if this node's is missing).
    pub leases: watch::Receiver<Vec<Lease>>,
}

/// A lease source (flannel's `subnet.Manager`): the network configuration, this node's lease,
/// and a watch of every lease.
pub trait LeaseSource {
    /// Names the lease set in errors and logs (a file, `node <name>`, `etcd:<prefix>/subnets`).
    fn name(&self) -> PathBuf;

    /// Names the network configuration in errors (net-conf.json, or etcd's `<prefix>/config`).
    fn config_name(&self) -> String;

    /// The network configuration; waits (with back-off, saying so) for a control plane.
    fn network_config(&self) -> LocalBoxFuture<'_, Result<NetConf, Error>>;

    /// Acquires and publishes this node's lease and follows the whole lease set in the
    /// background; returns once the set holds this node's lease (a static file: at once).
    fn join<'a>(&'a mut self, join: Join<'a>) -> LocalBoxFuture<'a, Result<Joined, Error>>;

    /// The dataplane is up: tell the control plane (Kubernetes: `NetworkUnavailable=False`, in
    /// the background, so that forwarding never waits for it).
    fn complete(&self) {}
}

/// The lease source the flags choose (`--kube-subnet-mgr`, `--subnet-mgr`, `--leases`; etcd as
/// flanneld's default), its settings checked before anything is programmed.
pub async fn open(args: &Args) -> Result<Box<dyn LeaseSource>, Error> {
    let mgr = if args.kube_subnet_mgr {
        SubnetMgr::Kube
    } else {
        args.subnet_mgr.unwrap_or(if args.leases.is_some() {
            SubnetMgr::Static
        } else {
            SubnetMgr::Etcd
        })
    };
    Ok(match mgr {
        SubnetMgr::Static => Box::new(static_file::StaticSource::new(args)?),
        SubnetMgr::Kube => Box::new(kube::KubeSource::new(args).await?),
        SubnetMgr::Etcd => Box::new(etcd::EtcdSource::new(args)?),
    })
}

/// Waits until `rx` holds the lease of `lease_ip` (a control plane's own write, come back through
/// its watch).
async fn own_lease_seen(
    rx: &mut watch::Receiver<Vec<Lease>>,
    lease_ip: Ipv4Addr,
) -> Result<(), Error> {
    rx.wait_for(|l| l.iter().any(|l| l.public_ip == lease_ip))
        .await
        .map(|_| ())
        .map_err(|_| Error::Unsupported("the lease source stopped".into()))
}

/// One node's lease, as flannel stores it (`Subnet`, `PublicIP`, `BackendType`, `BackendData`).
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    /// flannel's backend type string; empty for the udp backend.
    pub backend_type: String,
    /// Backend-specific data (vxlan: `{"VNI":1,"VtepMAC":"…"}`), `Value::Null` if absent.
    pub backend_data: Value,
}
