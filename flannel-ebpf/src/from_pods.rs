//! tc ingress on `cni0`: packets from local pods addressed (through the gateway) to pods on other
//! nodes are VXLAN-encapsulated and sent straight out of the uplink. [`encap_to_remote`] is shared
//! with `from_host`.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_hash_recalc, bpf_get_prandom_u32},
    programs::TcContext,
};
use flannel_ebpf_common::{NodeConfig, backend, reason, vxlan};

use crate::{
    drop::tc_counted,
    encap, fib,
    maps::FLANNEL_ROUTES,
    parse::{ETH_HLEN, decrement_ttl, eth, in_subnet, ipv4_checked_at, is_ipv4},
};

/// `BPF_F_ADJ_ROOM_ENCAP_L2(len)`: the inner L2 header length, for GSO.
const fn encap_l2(len: u64) -> u64 {
    (len & 0xff) << 56
}

/// Room for a VXLAN encapsulation with GSO kept intact (SKB_GSO_UDP_TUNNEL, inner headers set).
/// `FIXED_GSO`: pods already use an MTU reduced by the overhead (FLANNEL_MTU), so segments keep
/// their size and the outer packets are exactly uplink-MTU sized.
const ENCAP_FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | encap_l2(ETH_HLEN as u64);

pub fn run(ctx: &TcContext) -> i32 {
    tc_counted(ctx, |ctx, cfg| {
        encap_to_remote(ctx, cfg, true, reason::ENCAP_VXLAN)
    })
}

/// Encapsulates an IPv4 packet for a pod on another node and sends it out of the uplink; passes
/// what is not for another node. `forwarded`: the packet crosses this node as a router hop (from
/// a pod), so its TTL is decremented; the node's own packets (and those its stack already
/// forwarded) are not.
#[inline(always)]
pub fn encap_to_remote(
    ctx: &TcContext,
    cfg: &NodeConfig,
    forwarded: bool,
    why: u32,
) -> Result<(i32, u32), u32> {
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
    let remote = *FLANNEL_ROUTES
        .get(&Key::new(32, dst))
        .ok_or(reason::DROP_NO_ROUTE)?;
    if remote.backend != backend::VXLAN {
        return Err(reason::DROP_UNSUPPORTED_BACKEND);
    }
    let inner_len = ctx.len() - ETH_HLEN as u32;
    // SAFETY: reading a field of the program's own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 && inner_len + vxlan::MTU_OVERHEAD > cfg.uplink_mtu {
        return Err(reason::DROP_TOO_BIG);
    }
    if forwarded {
        decrement_ttl(ip)?;
    }
    // SAFETY: helpers called with the program's own context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) } as u32;
    // SAFETY: no arguments.
    let ip_id = unsafe { bpf_get_prandom_u32() } as u16;
    ctx.adjust_room(vxlan::MTU_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, ENCAP_FLAGS)
        .map_err(|_| reason::DROP_ADJUST_ROOM)?;
    encap::write_vxlan(ctx, cfg, &remote, inner_len, hash, ip_id)?;
    fib::redirect_neigh(cfg.uplink_ifindex).map(|action| (action, why))
}
