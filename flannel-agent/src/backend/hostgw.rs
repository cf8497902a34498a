//! The host-gw backend (pkg/backend/hostgw): no encapsulation, each remote subnet routed via its
//! node's public IP, which must be on this node's L2 segment. The lease's `BackendData` is null.

/// host-gw adds no header: the pod MTU is the uplink's.
#[must_use]
pub fn mtu(uplink_mtu: u32) -> u32 {
    uplink_mtu
}
