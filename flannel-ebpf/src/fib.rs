//! Forwarding out of a device with the kernel's neighbour resolution.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_redirect_neigh},
};
use flannel_ebpf_common::reason;

/// Redirects the packet to the egress of `ifindex`; the kernel looks up the route and neighbour
/// of the IPv4 destination and writes the Ethernet header (ARP included), bypassing the routing
/// decision, netfilter and any tunnel device of this node.
#[inline(always)]
pub fn redirect_neigh(ifindex: u32) -> Result<i32, u32> {
    // SAFETY: a NULL `params` with size 0 asks the kernel to do the FIB lookup itself.
    let action = unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) } as i32;
    if action == TC_ACT_REDIRECT {
        Ok(action)
    } else {
        Err(reason::DROP_REDIRECT)
    }
}

/// Redirects the packet, Ethernet header already written, to the egress of `ifindex`.
#[inline(always)]
pub fn redirect(ifindex: u32) -> Result<i32, u32> {
    // SAFETY: plain helper call; flags 0 means egress.
    let action = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if action == TC_ACT_REDIRECT {
        Ok(action)
    } else {
        Err(reason::DROP_REDIRECT)
    }
}
