//! The ipip backend (pkg/backend/ipip): IPv4 in IPv4 (protocol 4), `DirectRouting` optional. The
//! lease's `BackendData` is null.
use std::path::Path;

use flannel_ebpf_common::ipip::MTU_OVERHEAD;
use serde_json::{Map, Value};

use crate::{Error, json::bool_field};

/// `Backend` options of the ipip backend (pkg/backend/ipip/ipip.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpipConfig {
    pub direct_routing: bool,
}

impl IpipConfig {
    /// The ipip options of a `Backend` object.
    pub fn parse(path: &Path, obj: &Map<String, Value>) -> Result<Self, Error> {
        Ok(Self {
            direct_routing: bool_field(path, obj, "DirectRouting")?.unwrap_or(false),
        })
    }
}

/// The pod MTU: the uplink's minus the outer IPv4 header.
#[must_use]
pub fn mtu(uplink_mtu: u32) -> u32 {
    uplink_mtu.saturating_sub(MTU_OVERHEAD)
}
