//! Forwarding out of a device with the kernel's neighbour resolution.
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, bpf_redir_neigh, bpf_redir_neigh__bindgen_ty_1},
    helpers::{bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
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

/// `AF_INET`.
const AF_INET: u32 = 2;

/// Redirects the packet to the egress of `ifindex` with `next_hop` (an on-link IPv4 address) as
/// its gateway: the kernel resolves the neighbour and writes the Ethernet header, without a route
/// lookup. This is host-gw's forwarding without kernel routes for the pod subnets.
#[inline(always)]
pub fn redirect_neigh_via(ifindex: u32, next_hop: [u8; 4]) -> Result<i32, u32> {
    let mut params = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: bpf_redir_neigh__bindgen_ty_1 {
            ipv4_nh: u32::from_ne_bytes(next_hop),
        },
    };
    // SAFETY: `params` lives on the stack for the call and its size is passed with it.
    let action = unsafe {
        bpf_redirect_neigh(
            ifindex,
            &raw mut params,
            size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    } as i32;
    if action == TC_ACT_REDIRECT {
        Ok(action)
    } else {
        Err(reason::DROP_REDIRECT)
    }
}

/// Redirects the packet into the ingress of the peer of veth `ifindex` (the pod's interface, in
/// the pod's namespace), as if the pod had received it there.
#[inline(always)]
pub fn redirect_peer(ifindex: u32) -> Result<i32, u32> {
    // SAFETY: plain helper call; flags must be 0. Valid at tc ingress only (our caller's hook):
    // the packet enters the peer device of `ifindex` (in its namespace) as received.
    let action = unsafe { bpf_redirect_peer(ifindex, 0) } as i32;
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
