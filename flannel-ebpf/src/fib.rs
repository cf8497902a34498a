//! Forwarding out of a device with the kernel's neighbour resolution.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_REDIRECT, bpf_fib_lookup as FibLookup, bpf_redir_neigh,
        bpf_redir_neigh__bindgen_ty_1,
    },
    helpers::{bpf_fib_lookup, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    programs::TcContext,
};
use core::mem::MaybeUninit;

use flannel_ebpf_common::reason;
use network_types::ip::Ipv4Hdr;

use crate::parse::{decrement_ttl, eth, set_macs};

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

/// Forwards an IPv4 packet (Ethernet header at 0, `ip` its IPv4 header, `ports` its L4 ports)
/// the way the kernel would route it if it arrived on `in_ifindex`, provided that route leaves
/// through `out_ifindex`: the kernel's FIB answers (policy rules, routes, forwarding enabled,
/// the neighbour's address, the device MTU), the TTL is decremented, the Ethernet header
/// written from the answer, and the packet redirected to the egress of `out_ifindex`. `None`,
/// the packet untouched, whenever the stack must do it: another way out, no resolved neighbour,
/// a TTL or MTU that calls for an ICMP error, anything but a unicast route.
#[inline(always)]
pub fn forward_through(
    ctx: &TcContext,
    ip: *mut Ipv4Hdr,
    ports: ([u8; 2], [u8; 2]),
    in_ifindex: u32,
    out_ifindex: u32,
) -> Result<Option<i32>, u32> {
    // SAFETY: `ip` came from `ptr_at`.
    let (ttl, proto, tos, src, dst) = unsafe {
        (
            (*ip).ttl,
            (*ip).proto,
            (*ip).tos,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    if ttl <= 1 {
        return Ok(None);
    }
    // Zeroed word by word with volatile stores: LLVM would merge plain ones into a `memset`,
    // which the BPF backend leaves as a call to a subprogram that stores byte by byte.
    let mut fib = MaybeUninit::<FibLookup>::uninit();
    let words = fib.as_mut_ptr().cast::<u32>();
    for i in 0..size_of::<FibLookup>() / 4 {
        // SAFETY: within `fib`, which is 4-byte aligned and a multiple of 4 bytes long.
        unsafe { words.add(i).write_volatile(0) };
    }
    // SAFETY: all zeroes is a valid `bpf_fib_lookup` (a C struct of integers).
    let fib = unsafe { fib.assume_init_mut() };
    fib.family = AF_INET as u8;
    fib.l4_protocol = proto;
    fib.sport = u16::from_ne_bytes(ports.0);
    fib.dport = u16::from_ne_bytes(ports.1);
    // `tot_len` stays 0: the helper then checks the skb itself against the device's MTU
    // (`is_skb_forwardable`, GSO included).
    fib.ifindex = in_ifindex;
    fib.__bindgen_anon_2.tos = tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `fib` lives on the stack for the call and its size is passed with it; the helper
    // does not change the packet.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            &raw mut *fib,
            size_of::<FibLookup>() as i32,
            0,
        )
    };
    if rc != i64::from(BPF_FIB_LKUP_RET_SUCCESS) || fib.ifindex != out_ifindex {
        return Ok(None);
    }
    decrement_ttl(ip)?;
    set_macs(eth(ctx)?, Some(fib.dmac), Some(fib.smac));
    redirect(out_ifindex).map(Some)
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
