//! Leases: which node owns which pod subnet (flannel's `pkg/lease`), from one of the lease
//! sources (`static_file`, `kube`, `etcd`). Each source publishes the whole current lease set on a
//! `tokio::sync::watch` channel; the agent's one reconciler turns every set into dataplane state.
pub mod etcd;
pub mod kube;
pub mod static_file;

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::Value;

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
