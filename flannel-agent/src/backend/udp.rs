//! flannel's udp backend (pkg/backend/udp): the inner IPv4 packet is the whole payload of a UDP
//! datagram from and to `Backend.Port` (8285). Its lease has an empty `BackendType`.
use flannel_ebpf_common::udp::MTU_OVERHEAD;

/// The pod MTU: the uplink's minus the outer IPv4 and UDP headers.
#[must_use]
pub fn mtu(uplink_mtu: u32) -> u32 {
    uplink_mtu.saturating_sub(MTU_OVERHEAD)
}
