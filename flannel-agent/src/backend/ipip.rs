//! The ipip backend (pkg/backend/ipip): IPv4 in IPv4 (protocol 4), `DirectRouting` optional. The
//! lease's `BackendData` is null.
use flannel_ebpf_common::ipip::MTU_OVERHEAD;

/// The pod MTU: the uplink's minus the outer IPv4 header.
#[must_use]
pub fn mtu(uplink_mtu: u32) -> u32 {
    uplink_mtu.saturating_sub(MTU_OVERHEAD)
}
