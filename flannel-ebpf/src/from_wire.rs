//! The uplink's receive path.
//!
//! Encapsulated traffic addressed to this node (its public IP) in this node's backend — VXLAN on
//! the configured port and VNI, IPIP, or flannel's udp backend on its port — from a known node,
//! carrying IPv4 for a local pod, is decapsulated: by XDP (`from_wire_xdp`) before the stack sees
//! it, or by tc (`from_wire`) where XDP is not attached. tc then hands every IPv4 packet for a
//! local pod (decapsulated, or sent unencapsulated by a host-gw or DirectRouting peer) straight to
//! the pod. Everything else passes untouched; anything that claims to be our tunnel traffic but is
//! malformed is dropped and counted. Nothing here needs a tunnel device or module.
use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_OK,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_DROP, XDP_PASS},
    },
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use flannel_ebpf_common::{NodeConfig, backend, endpoint, ipip, program, reason, udp, vxlan};
use network_types::eth::EthHdr;

use crate::{
    drop::{count, tc_counted},
    fib,
    maps::{FLANNEL_ENDPTS, FLANNEL_NODES, config},
    nat,
    parse::{
        ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, IPV4_VIHL_NO_OPTIONS, Packet, UDP_HLEN,
        VXLAN_HLEN, VxlanHdr, decrement_ttl, eth, in_subnet, ipv4_at, ipv4_checked_at, is_fragment,
        is_ipv4, ptr_at, set_macs, udp_at,
    },
};

/// Offsets of the encapsulated headers.
const VXLAN_OFF: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN;
const INNER_ETH_OFF: usize = VXLAN_OFF + VXLAN_HLEN;
const VXLAN_INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
const IPIP_INNER_IP_OFF: usize = ETH_HLEN + IPV4_HLEN;
const UDP_INNER_IP_OFF: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN;
/// Bytes that must be linear for classification (the deepest: VXLAN's inner IPv4 header).
const PARSE_LEN: u32 = (VXLAN_INNER_IP_OFF + IPV4_HLEN) as u32;

/// The encapsulations this node decapsulates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tunnel {
    Vxlan,
    Ipip,
    Udp,
}

impl Tunnel {
    /// Bytes between the outer Ethernet header and the inner IPv4 header.
    #[inline(always)]
    fn overhead(self) -> u32 {
        match self {
            Self::Vxlan => vxlan::MTU_OVERHEAD,
            Self::Ipip => ipip::MTU_OVERHEAD,
            Self::Udp => udp::MTU_OVERHEAD,
        }
    }
    #[inline(always)]
    fn tc_verdict(self) -> u32 {
        match self {
            Self::Vxlan => reason::DECAP_VXLAN,
            Self::Ipip => reason::DECAP_IPIP,
            Self::Udp => reason::DECAP_UDP,
        }
    }
    #[inline(always)]
    fn xdp_verdict(self) -> u32 {
        match self {
            Self::Vxlan => reason::DECAP_VXLAN_XDP,
            Self::Ipip => reason::DECAP_IPIP_XDP,
            Self::Udp => reason::DECAP_UDP_XDP,
        }
    }
}

/// What arrived on the wire.
enum Wire {
    /// Not ours: let it go on, counted under this reason.
    Pass(u32),
    /// Valid tunnel traffic for a local pod: decapsulate.
    Decap(Tunnel),
    /// Plain IPv4 for a local pod (already decapsulated by XDP, or unencapsulated).
    Local,
}

/// Classifies a packet; `Err` is a drop reason for our tunnel traffic that cannot be delivered.
#[inline(always)]
fn classify(pkt: &impl Packet, cfg: &NodeConfig) -> Result<Wire, u32> {
    let Ok(eth) = eth(pkt) else {
        return Ok(Wire::Pass(reason::PASS_UNPARSED));
    };
    if !is_ipv4(eth) {
        return Ok(Wire::Pass(reason::PASS_NOT_IPV4));
    }
    let Ok(ip) = ptr_at::<network_types::ip::Ipv4Hdr>(pkt, ETH_HLEN) else {
        return Ok(Wire::Pass(reason::PASS_UNPARSED));
    };
    // SAFETY: `ip` came from `ptr_at`.
    let (vihl, proto, src, dst) =
        unsafe { ((*ip).vihl, (*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
    if dst != cfg.public_ip {
        if vihl >> 4 == 4
            && in_subnet(dst, cfg.subnet_addr, cfg.subnet_mask)
            && dst != cfg.gateway_ip
        {
            return Ok(Wire::Local);
        }
        return Ok(Wire::Pass(reason::PASS_NOT_OVERLAY));
    }
    // Addressed to this node. What the fast path does not parse (outer IP options, fragments)
    // goes to the stack, which reassembles fragments; the agent's slow-path receiver (a socket on
    // the tunnel's port or protocol) then delivers our tunnel traffic among it.
    let ours = match cfg.backend as u8 {
        backend::VXLAN | backend::UDP => proto == IPPROTO_UDP,
        backend::IPIP => proto == ipip::PROTO,
        _ => false,
    };
    if !ours {
        return Ok(Wire::Pass(reason::PASS_NOT_OVERLAY));
    }
    if is_fragment(ip) {
        return Ok(Wire::Pass(reason::PASS_FRAGMENT));
    }
    if vihl != IPV4_VIHL_NO_OPTIONS {
        return Ok(Wire::Pass(options_verdict(pkt, cfg, vihl)));
    }
    if cfg.backend as u8 == backend::IPIP {
        // Our IPIP from here on: whatever is wrong is a counted drop.
        check_outer::<IPIP_INNER_IP_OFF>(pkt, ip, None)?;
        known_source(src)?;
        check_inner::<IPIP_INNER_IP_OFF>(pkt, cfg)?;
        return Ok(Wire::Decap(Tunnel::Ipip));
    }
    let Ok(udp) = udp_at(pkt, ETH_HLEN + IPV4_HLEN) else {
        return Ok(Wire::Pass(reason::PASS_UNPARSED));
    };
    // SAFETY: `udp` came from `ptr_at`.
    if u16::from_be_bytes(unsafe { (*udp).dst }) != cfg.port {
        return Ok(Wire::Pass(reason::PASS_NOT_OVERLAY));
    }
    if cfg.backend as u8 == backend::UDP {
        // flannel's udp backend: the payload is the inner IPv4 packet.
        check_outer::<UDP_INNER_IP_OFF>(pkt, ip, Some(udp))?;
        known_source(src)?;
        check_inner::<UDP_INNER_IP_OFF>(pkt, cfg)?;
        return Ok(Wire::Decap(Tunnel::Udp));
    }

    // Our VXLAN from here on: whatever is wrong is a counted drop.
    check_outer::<VXLAN_INNER_IP_OFF>(pkt, ip, Some(udp))?;
    let vx = ptr_at::<VxlanHdr>(pkt, VXLAN_OFF)?;
    // SAFETY: `vx` came from `ptr_at`.
    let (flags, vni) = unsafe { ((*vx).flags, (*vx).vni) };
    if flags & vxlan::FLAG_VNI == 0 {
        return Err(reason::DROP_VXLAN_FLAGS);
    }
    if u32::from_be_bytes([0, vni[0], vni[1], vni[2]]) != cfg.vni {
        return Err(reason::DROP_UNKNOWN_VNI);
    }
    known_source(src)?;
    let inner_eth = ptr_at::<EthHdr>(pkt, INNER_ETH_OFF)?;
    // SAFETY: `inner_eth` came from `ptr_at`.
    if unsafe { (*inner_eth).dst_addr } != cfg.vtep_mac {
        return Err(reason::DROP_BAD_INNER_MAC);
    }
    if !is_ipv4(inner_eth) {
        return Err(reason::DROP_INNER_NOT_IPV4);
    }
    check_inner::<VXLAN_INNER_IP_OFF>(pkt, cfg)?;
    Ok(Wire::Decap(Tunnel::Vxlan))
}

/// The verdict for a packet to this node, of the tunnel's protocol, whose IPv4 header carries
/// options: ours (IPIP, or UDP to the tunnel's port) goes to the slow path, anything else (a
/// masquerade reply, say) on as not ours.
#[inline(always)]
fn options_verdict(pkt: &impl Packet, cfg: &NodeConfig, vihl: u8) -> u32 {
    if cfg.backend as u8 == backend::IPIP {
        return reason::PASS_IP_OPTIONS;
    }
    // The UDP destination port, behind a header of 24 to 60 bytes.
    let off = ETH_HLEN + usize::from(vihl & 0x0f) * 4 + 2;
    match ptr_at::<[u8; 2]>(pkt, off) {
        // SAFETY: bounds checked by `ptr_at`.
        Ok(port) if u16::from_be_bytes(unsafe { *port }) == cfg.port => reason::PASS_IP_OPTIONS,
        _ => reason::PASS_NOT_OVERLAY,
    }
}

/// Checks the outer IPv4 total length (and UDP length) of our tunnel traffic whose inner IPv4
/// header starts at `INNER`: it must hold the tunnel headers and an inner IPv4 header, and fit
/// what arrived (Ethernet padding may follow it).
#[inline(always)]
fn check_outer<const INNER: usize>(
    pkt: &impl Packet,
    ip: *const network_types::ip::Ipv4Hdr,
    udp: Option<*const network_types::udp::UdpHdr>,
) -> Result<(), u32> {
    let min = (INNER + IPV4_HLEN - ETH_HLEN) as u32;
    let room = pkt.len().saturating_sub(ETH_HLEN as u32);
    // SAFETY: `ip` came from `ptr_at`.
    let tot = u32::from(u16::from_be_bytes(unsafe { (*ip).tot_len }));
    if tot < min || tot > room {
        return Err(reason::DROP_BAD_OUTER);
    }
    if let Some(udp) = udp {
        // SAFETY: `udp` came from `ptr_at`.
        let len = u32::from(u16::from_be_bytes(unsafe { (*udp).len }));
        if len < min - IPV4_HLEN as u32 || len > tot - IPV4_HLEN as u32 {
            return Err(reason::DROP_BAD_OUTER);
        }
    }
    Ok(())
}

/// Tunnel traffic is accepted only from nodes with a lease.
#[inline(always)]
fn known_source(src: [u8; 4]) -> Result<(), u32> {
    if FLANNEL_NODES.get_ptr(src).is_none() {
        return Err(reason::DROP_UNKNOWN_SOURCE);
    }
    Ok(())
}

/// Checks the inner IPv4 header at `OFF` as a router would, that its length fits what arrived,
/// and that it is for this node's subnet.
#[inline(always)]
fn check_inner<const OFF: usize>(pkt: &impl Packet, cfg: &NodeConfig) -> Result<(), u32> {
    let inner = ipv4_checked_at(pkt, OFF)?;
    // SAFETY: `inner` came from `ptr_at`.
    let (inner_vihl, inner_len, inner_dst) = unsafe {
        (
            (*inner).vihl,
            u16::from_be_bytes((*inner).tot_len),
            (*inner).dst_addr,
        )
    };
    let header_len = u32::from(inner_vihl & 0x0f) * 4;
    let room = pkt.len().saturating_sub(OFF as u32);
    if u32::from(inner_len) < header_len || u32::from(inner_len) > room {
        return Err(reason::DROP_BAD_IPV4);
    }
    if !in_subnet(inner_dst, cfg.subnet_addr, cfg.subnet_mask) {
        return Err(reason::DROP_INNER_NOT_LOCAL);
    }
    Ok(())
}

pub fn run_tc(ctx: &TcContext) -> i32 {
    tc_counted(ctx, program::FROM_WIRE, try_from_wire_tc)
}

#[inline(always)]
fn try_from_wire_tc(ctx: &TcContext, cfg: &NodeConfig) -> Result<(i32, u32), u32> {
    // Headers of a non-linear skb may not all be in the linear area yet.
    let want = if ctx.len() < PARSE_LEN {
        ctx.len()
    } else {
        PARSE_LEN
    };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
    match classify(ctx, cfg)? {
        Wire::Pass(why) => {
            // A reply to a masqueraded flow: back to the pod's address, then on through the
            // stack, whose conntrack saw the flow leave.
            if cfg.masq_ip != [0; 4]
                && why == reason::PASS_NOT_OVERLAY
                && let Some(verdict) = nat::reverse(ctx, cfg)?
            {
                return Ok((TC_ACT_OK, verdict));
            }
            Ok((TC_ACT_OK, why))
        }
        Wire::Local => {
            // Not checked by classify (it may come from anywhere): check it as a router would.
            ipv4_checked_at(ctx, ETH_HLEN)?;
            deliver_local(
                ctx,
                cfg,
                reason::DELIVER_LOCAL,
                reason::DELIVER_LOCAL_BRIDGE,
            )
        }
        Wire::Decap(tunnel) => {
            ctx.adjust_room(
                -(tunnel.overhead() as i32),
                BPF_ADJ_ROOM_MAC,
                // FIXED_GSO: segments keep the size the sender's pod chose (it fits the pod MTU).
                u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4),
            )
            .map_err(|_| reason::DROP_ADJUST_ROOM)?;
            if tunnel == Tunnel::Udp {
                // flanneld's proxy decrements the TTL at each tunnel end (proxy_amd64.c).
                decrement_ttl(ipv4_at(ctx, ETH_HLEN)?)?;
            }
            deliver_local(ctx, cfg, tunnel.tc_verdict(), reason::DECAP_BRIDGE)
        }
    }
}

/// Delivers an IPv4 packet (behind an Ethernet header) for a local pod as the kernel's forwarding
/// would, minus the routing decision and netfilter of this hop: straight to the pod's veth when
/// the agent has learnt the pod (`direct`), else to `cni0` (`bridged`).
///
/// Why not always `cni0`: a decapsulated GSO skb keeps `skb->encapsulation` and its UDP-tunnel GSO
/// type (6.18 cannot clear them from BPF), and the bridge has no `hw_enc_features`, so it would
/// segment every super-packet in software; a veth accepts tunnel GSO and passes it whole.
#[inline(always)]
fn deliver_local(
    ctx: &TcContext,
    cfg: &NodeConfig,
    direct: u32,
    bridged: u32,
) -> Result<(i32, u32), u32> {
    let ip = ipv4_at(ctx, ETH_HLEN)?;
    // SAFETY: `ip` came from `ptr_at`.
    let dst = unsafe { (*ip).dst_addr };
    if dst == cfg.gateway_ip || cfg.cni_ifindex == 0 {
        // For the node itself, or no bridge yet: the stack takes it from here.
        return Ok((TC_ACT_OK, bridged));
    }
    decrement_ttl(ip)?;
    if let Some(ep) = FLANNEL_ENDPTS.get_ptr(dst) {
        // SAFETY: the pointer came from a successful lookup; the value is copied at once.
        let ep = unsafe { *ep };
        set_macs(eth(ctx)?, Some(ep.mac), Some(cfg.cni_mac));
        // Straight into the pod's namespace where the port is a veth to another one; else out
        // of the port.
        let redirected = if ep.flags & endpoint::PEER != 0 {
            fib::redirect_peer(ep.ifindex)
        } else {
            fib::redirect(ep.ifindex)
        };
        return redirected.map(|action| (action, direct));
    }
    fib::redirect_neigh(cfg.cni_ifindex).map(|action| (action, bridged))
}

pub fn run_xdp(ctx: &XdpContext) -> u32 {
    let Some(cfg) = config() else {
        // Counted once, by the tc program that sees the same packet.
        return XDP_PASS;
    };
    let len = ctx.len();
    match try_from_wire_xdp(ctx, cfg) {
        // Passes are counted by tc, which sees every packet XDP passes.
        Ok(None) => XDP_PASS,
        Ok(Some(why)) => {
            count(program::FROM_WIRE_XDP, why, len);
            XDP_PASS
        }
        Err(why) => {
            count(program::FROM_WIRE_XDP, why, len);
            XDP_DROP
        }
    }
}

#[inline(always)]
fn try_from_wire_xdp(ctx: &XdpContext, cfg: &NodeConfig) -> Result<Option<u32>, u32> {
    let tunnel = match classify(ctx, cfg)? {
        Wire::Pass(_) | Wire::Local => return Ok(None),
        Wire::Decap(tunnel) => tunnel,
    };
    let outer_eth = eth(ctx)?;
    // SAFETY: `outer_eth` came from `ptr_at`; read before the head moves.
    let peer_mac = unsafe { (*outer_eth).src_addr };
    // SAFETY: the program's own context; shrinking by headers we have bounds-checked.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, tunnel.overhead() as i32) } != 0 {
        return Err(reason::DROP_ADJUST_ROOM);
    }
    // The frame now starts 14 bytes before the inner IPv4 header: with VXLAN that is the inner
    // Ethernet header, otherwise bytes of the outer headers that become a new Ethernet header.
    // Either way it is addressed to the uplink, so the stack takes it as PACKET_HOST and tc then
    // delivers it to the pod.
    let eth = eth(ctx)?;
    set_macs(
        eth,
        Some(cfg.uplink_mac),
        (tunnel != Tunnel::Vxlan).then_some(peer_mac),
    );
    if tunnel != Tunnel::Vxlan {
        // SAFETY: `eth` came from `ptr_at`.
        unsafe {
            core::ptr::addr_of_mut!((*eth).ether_type)
                .cast::<[u8; 2]>()
                .write(ETH_P_IP);
        }
    }
    if tunnel == Tunnel::Udp {
        // As the tc path: flanneld's proxy decrements the TTL at each tunnel end.
        decrement_ttl(ipv4_at(ctx, ETH_HLEN)?)?;
    }
    Ok(Some(tunnel.xdp_verdict()))
}
