//! Programming the kernel: the eBPF dataplane (and, later, the netlink fallback).
pub mod ebpf;
pub mod masq;
pub mod netlink;
pub mod routes;
pub mod slowpath;
pub mod wireguard;

use std::{collections::BTreeMap, net::Ipv4Addr};

use flannel_ebpf_common::{RemoteNode, RemoteSubnet};
use ipnet::Ipv4Net;

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
