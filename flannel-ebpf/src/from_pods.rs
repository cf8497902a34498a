//! tc ingress on `cni0` (and on each pod's host-side veth, before the bridge): packets
//! from local pods addressed (through the gateway) to pods on other nodes leave straight out of
//! the uplink, encapsulated as the remote subnet's route says (VXLAN,
//! IPIP, udp) or unencapsulated to the remote node (host-gw, DirectRouting). [`to_remote`] is
//! shared with `from_host`.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    btf_maps::lpm_trie::Key,
    programs::TcContext,
};
use flannel_ebpf_common::{NodeConfig, backend, ipip, program, reason, udp, vxlan};

use crate::{
    drop::tc_counted,
    encap::{self, IP_DF, Outer},
    fib,
    maps::{FLANNEL_ROUTES, indexed_route, next_hop},
    nat,
    parse::{
        ETH_HLEN, IPPROTO_TCP, UDP_HLEN, decrement_ttl, eth, in_subnet, ipv4_checked_at, is_ipv4,
        ptr_at,
    },
};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header length, for GSO.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Room for a VXLAN encapsulation with GSO kept intact (SKB_GSO_UDP_TUNNEL, inner headers set).
/// `FIXED_GSO`: pods already use an MTU reduced by the overhead (FLANNEL_MTU), so segments keep
/// their size and the outer packets are exactly uplink-MTU sized.
const VXLAN_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | encap_l2(ETH_HLEN as u64);
/// IPIP: SKB_GSO_IPXIP4; the inner packet starts with its IPv4 header.
const IPIP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64;
/// udp backend: SKB_GSO_UDP_TUNNEL with an IPv4 inner packet and no inner L2 (as FOU).
const UDP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64;

/// Outer TTL of flanneld's udp socket (the kernel's default TTL).
const UDP_OUTER_TTL: u8 = 64;

pub fn run(ctx: &TcContext) -> i32 {
    tc_counted(ctx, program::FROM_PODS, |ctx, cfg| {
        to_remote(ctx, cfg, false)
    })
}

/// The same at a pod's host-side veth (tc ingress), before the bridge: what it sends on leaves
/// the node without entering `cni0`; what it passes goes on into the bridge (and is seen again
/// by [`run`], counted under its own program). Here too, a packet of an established
/// masqueraded UDP flow goes straight to the uplink ([`nat::forward_established`]).
pub fn run_veth(ctx: &TcContext) -> i32 {
    tc_counted(ctx, program::FROM_POD_VETH, |ctx, cfg| {
        let verdict = to_remote(ctx, cfg, false)?;
        if verdict.1 == reason::PASS_NOT_OVERLAY
            && let Some(action) = nat::forward_established(ctx, cfg)?
        {
            return Ok((action, reason::NAT_FORWARD));
        }
        Ok(verdict)
    })
}

/// The length of the IPv4 packets that will leave: the packet itself, or for a GSO packet each
/// segment (its headers plus `gso_size`).
#[inline(always)]
fn inner_packet_len(ctx: &TcContext, ip: *const network_types::ip::Ipv4Hdr, len: u32) -> u32 {
    // SAFETY: reading fields of the program's own context and of a header from `ptr_at`.
    let (gso_size, vihl, proto) = unsafe { ((*ctx.skb.skb).gso_size, (*ip).vihl, (*ip).proto) };
    if gso_size == 0 {
        return len;
    }
    let l4 = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
    let l4_len = match proto {
        IPPROTO_TCP => match ptr_at::<[u8; 2]>(ctx, l4 + 12) {
            // SAFETY: bounds checked by `ptr_at`.
            Ok(off) => u32::from(unsafe { (*off)[0] } >> 4) * 4,
            Err(_) => 20,
        },
        _ => UDP_HLEN as u32,
    };
    (l4 - ETH_HLEN) as u32 + l4_len + gso_size
}

/// How many packets this skb leaves as: its GSO segment count (if the stack left it unset, an upper
/// bound from the length), else 1.
#[inline(always)]
fn segments(ctx: &TcContext) -> u32 {
    // SAFETY: reading fields of the program's own context.
    let (gso_size, gso_segs) = unsafe { ((*ctx.skb.skb).gso_size, (*ctx.skb.skb).gso_segs) };
    match (gso_size, gso_segs) {
        (0, _) => 1,
        (size, 0) => ctx.len() / size + 1,
        (_, segs) => segs,
    }
}

/// Sends an IPv4 packet for a pod on another node out of the uplink; passes what is not for
/// another node. `host`: the node's own packet (or one its stack already forwarded), whose TTL
/// this hop does not decrement; a pod's packet crosses this node as a router hop and does.
#[inline(always)]
pub fn to_remote(ctx: &TcContext, cfg: &NodeConfig, host: bool) -> Result<(i32, u32), u32> {
    let eth = eth(ctx)?;
    if !is_ipv4(eth) {
        return Ok((TC_ACT_OK, reason::PASS_NOT_IPV4));
    }
    let ip = ipv4_checked_at(ctx, ETH_HLEN)?;
    // SAFETY: `ip` came from `ptr_at`.
    let dst = unsafe { (*ip).dst_addr };
    if !in_subnet(dst, cfg.network_addr, cfg.network_mask) {
        return Ok((TC_ACT_OK, reason::PASS_NOT_OVERLAY));
    }
    if in_subnet(dst, cfg.subnet_addr, cfg.subnet_mask) {
        return Ok((TC_ACT_OK, reason::PASS_LOCAL_SUBNET));
    }
    let (remote, slot) = match indexed_route(cfg, dst) {
        Some((remote, slot)) => (remote, Some(slot)),
        None => (
            *FLANNEL_ROUTES
                .get(&Key::new(32, dst))
                .ok_or(reason::DROP_NO_ROUTE)?,
            None,
        ),
    };
    let (overhead, verdict) = match remote.backend {
        backend::VXLAN => (vxlan::MTU_OVERHEAD, reason::ENCAP_VXLAN),
        backend::IPIP => (ipip::MTU_OVERHEAD, reason::ENCAP_IPIP),
        backend::UDP => (udp::MTU_OVERHEAD, reason::ENCAP_UDP),
        backend::HOST_GW => (0, reason::DIRECT),
        _ => return Err(reason::DROP_UNSUPPORTED_BACKEND),
    };
    // Each `_HOST` verdict follows its pod verdict.
    let verdict = verdict + u32::from(host);
    let inner_len = ctx.len() - ETH_HLEN as u32;
    if inner_packet_len(ctx, ip, inner_len) + overhead > cfg.uplink_mtu {
        if host {
            // The kernel routed it already, by the same MTU.
            return Err(reason::DROP_TOO_BIG);
        }
        // The kernel's route for remote subnets carries the pod MTU: it answers a DF packet
        // with fragmentation-needed and fragments the others, which come back through cni0's
        // egress to `from_host`. flannel.1 does the same by its device MTU.
        return Ok((TC_ACT_OK, reason::PASS_TOO_BIG));
    }
    if overhead != 0 && inner_len + overhead > u32::from(u16::MAX) {
        // A BIG TCP super-packet: an outer IPv4 header cannot describe it (its length would
        // wrap), and segmenting it here is not possible.
        return Err(reason::DROP_TOO_BIG);
    }
    if !host {
        decrement_ttl(ip)?;
    }
    if remote.backend == backend::UDP {
        // flanneld's proxy decrements the TTL once more at each tunnel end (proxy_amd64.c).
        decrement_ttl(ip)?;
    }
    // SAFETY: `ip` came from `ptr_at`; read before the packet is resized.
    let (tos, ttl, frags) = unsafe { ((*ip).tos, (*ip).ttl, (*ip).frags) };
    match remote.backend {
        backend::HOST_GW => {
            return fib::redirect_neigh_via(cfg.uplink_ifindex, remote.public_ip)
                .map(|action| (action, verdict));
        }
        backend::VXLAN => {
            // The flow hash as the kernel's `udp_flow_src_port` takes it (`skb_get_hash`): the one
            // the skb already carries (a pod's TCP socket sets it); without one, a hash of the
            // addresses, protocol and ports, which costs a few ns where the kernel's flow
            // dissector (`bpf_get_hash_recalc`) costs ~150 ns here.
            // SAFETY: reading a field of the program's own context.
            let hash = match unsafe { (*ctx.skb.skb).hash } {
                0 => encap::flow_hash(ctx)?,
                h => h,
            };
            let ip_id = encap::ip_id(segments(ctx));
            ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, VXLAN_FLAGS)
                .map_err(|_| reason::DROP_ADJUST_ROOM)?;
            encap::write_vxlan(
                ctx,
                cfg,
                &remote,
                inner_len,
                hash,
                ip_id,
                encap::ecn_encap(tos),
            )?;
        }
        _ => {
            let ipip = remote.backend == backend::IPIP;
            let (flags, outer) = if ipip {
                // As `flannel.ipip` (ttl inherit, tos 0, nopmtudisc: flannel leaves PMTUDISC 0):
                // the inner TTL, the inner ECN, the inner DF bit.
                (
                    IPIP_FLAGS,
                    Outer {
                        tot_len: (inner_len + overhead) as u16,
                        id: encap::ip_id(segments(ctx)),
                        frag_off: [frags[0] & IP_DF[0], 0],
                        ttl,
                        tos: encap::ecn_encap(tos),
                        proto: ipip::PROTO,
                    },
                )
            } else {
                // As flanneld's unconnected UDP socket: DF set (path MTU discovery), so IP ID 0,
                // default TTL and TOS.
                (
                    UDP_FLAGS,
                    Outer {
                        tot_len: (inner_len + overhead) as u16,
                        id: 0,
                        frag_off: IP_DF,
                        ttl: UDP_OUTER_TTL,
                        tos: 0,
                        proto: crate::parse::IPPROTO_UDP,
                    },
                )
            };
            ctx.adjust_room(overhead as i32, BPF_ADJ_ROOM_MAC, flags)
                .map_err(|_| reason::DROP_ADJUST_ROOM)?;
            if ipip {
                encap::write_ipip(ctx, cfg, &remote, &outer)?;
            } else {
                encap::write_udp(ctx, cfg, &remote, &outer)?;
            }
        }
    }
    // The next hop the agent keeps for the node, else the kernel's route lookup per packet.
    match slot.and_then(|slot| next_hop(slot, remote.public_ip)) {
        Some(via) => fib::redirect_neigh_via(cfg.uplink_ifindex, via),
        None => fib::redirect_neigh(cfg.uplink_ifindex),
    }
    .map(|action| (action, verdict))
}
