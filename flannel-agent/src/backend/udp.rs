//! flannel's udp backend (pkg/backend/udp): the inner IPv4 packet is the whole payload of a UDP
//! datagram from and to `Backend.Port` (8285). Its lease has an empty `BackendType`.
use std::path::Path;

use flannel_ebpf_common::udp::{DEFAULT_PORT, MTU_OVERHEAD};
use serde_json::{Map, Value};

use crate::Error;

/// `Backend` options of the udp backend (pkg/backend/udp/udp.go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpConfig {
    /// UDP port, source and destination (default 8285).
    pub port: u16,
}

impl UdpConfig {
    /// The udp options of a `Backend` object.
    pub fn parse(path: &Path, obj: &Map<String, Value>) -> Result<Self, Error> {
        Ok(Self {
            port: super::port_field(path, obj, DEFAULT_PORT)?,
        })
    }
}

/// The pod MTU: the uplink's minus the outer IPv4 and UDP headers.
#[must_use]
pub fn mtu(uplink_mtu: u32) -> u32 {
    uplink_mtu.saturating_sub(MTU_OVERHEAD)
}
