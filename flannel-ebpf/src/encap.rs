//! Outer headers, byte-compatible with the kernel devices flanneld creates: VXLAN as
//! `flannel.<VNI>` (`vxlan id <VNI> dstport <Port> nolearning`: no UDP checksum, TTL 64, DF clear,
//! flow-hash source port), IPIP as `flannel.ipip`, and flannel's udp backend (the inner IPv4 packet
//! as the whole payload of a UDP datagram from and to its port).
use aya_ebpf::{helpers::bpf_get_smp_processor_id, programs::TcContext};
use flannel_ebpf_common::{NodeConfig, RemoteSubnet, ipip, udp, vxlan};
use network_types::ip::Ipv4Hdr;

use crate::{
    csum,
    maps::FLANNEL_IPID,
    parse::{
        ETH_HLEN, ETH_P_IP, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN,
        IPV4_VIHL_NO_OPTIONS, Packet, ptr_at,
    },
};

/// Ephemeral port range the kernel draws VXLAN source ports from (ip_local_port_range default).
const SRC_PORT_MIN: u32 = 32_768;
const SRC_PORT_MAX: u32 = 61_000;
/// The Don't Fragment flag of the IPv4 `frag_off` field (network order bytes).
pub const IP_DF: [u8; 2] = [0x40, 0];

/// What `bpf_skb_adjust_room` inserts after the outer Ethernet header for VXLAN.
#[repr(C)]
pub struct VxlanEncapHdr {
    pub ip: [u8; IPV4_HLEN],
    pub udp: [u8; 8],
    pub vxlan: [u8; 8],
    pub inner_dst: [u8; 6],
    pub inner_src: [u8; 6],
    pub inner_type: [u8; 2],
}

/// What is inserted for the udp backend.
#[repr(C)]
pub struct UdpEncapHdr {
    pub ip: [u8; IPV4_HLEN],
    pub udp: [u8; 8],
}

const _: () = assert!(size_of::<VxlanEncapHdr>() + ETH_HLEN == vxlan::ENCAP_LEN);
const _: () = assert!(size_of::<VxlanEncapHdr>() == vxlan::MTU_OVERHEAD as usize);
const _: () = assert!(size_of::<UdpEncapHdr>() == udp::MTU_OVERHEAD as usize);
const _: () = assert!(IPV4_HLEN == ipip::MTU_OVERHEAD as usize);

/// The outer UDP source port for a flow hash, spread over the ephemeral range as the kernel's
/// `udp_flow_src_port` does, so ECMP and RSS in the underlay see per-flow entropy.
#[inline(always)]
pub fn source_port(hash: u32) -> u16 {
    let hash = hash ^ (hash << 16);
    let span = u64::from(SRC_PORT_MAX - SRC_PORT_MIN);
    (((u64::from(hash) * span) >> 32) as u32 + SRC_PORT_MIN) as u16
}

/// A flow hash of the inner IPv4 packet behind the Ethernet header: addresses and protocol, and
/// for TCP, UDP and SCTP without IP options or fragmentation also the ports, mixed with the
/// multiply-xorshift steps of murmur3's finaliser. Its only job is the kernel's: the same flow
/// always gets the same outer source port, different flows spread over the range. Ports outside
/// the linear area are pulled in first, so a flow hashes alike however its skbs are laid out.
/// Packet pointers the caller holds are invalid afterwards.
#[inline(always)]
pub fn flow_hash(ctx: &TcContext) -> Result<u32, u32> {
    const PORTS_END: usize = ETH_HLEN + IPV4_HLEN + 4;
    if ctx.data_end() - ctx.data() < PORTS_END && ctx.len() as usize >= PORTS_END {
        // A failed pull leaves the ports unread below: the hash is then of the addresses alone.
        let _ = ctx.pull_data(PORTS_END as u32);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    // SAFETY: `ip` came from `ptr_at`.
    let (vihl, proto, frags, src, dst) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            (*ip).frags,
            (*ip).src_addr,
            (*ip).dst_addr,
        )
    };
    let ports = if vihl == IPV4_VIHL_NO_OPTIONS
        && u16::from_be_bytes(frags) & 0x3fff == 0
        && matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
    {
        ptr_at::<[u8; 4]>(ctx, ETH_HLEN + IPV4_HLEN).map_or(0, |p| {
            // SAFETY: `ptr_at` checked the four bytes.
            u32::from_ne_bytes(unsafe { *p })
        })
    } else {
        0
    };
    let mut h = u32::from_ne_bytes(src).wrapping_mul(0x9e37_79b1) ^ u32::from_ne_bytes(dst);
    h = (h ^ (h >> 15)).wrapping_mul(0x85eb_ca77) ^ ports;
    h = (h ^ (h >> 13)).wrapping_mul(0xc2b2_ae3d) ^ u32::from(proto);
    Ok(h ^ (h >> 16))
}

/// The outer IPv4 ID for a packet that leaves as `segments` packets (a GSO packet is cut into
/// segments whose IDs count up from it, as the kernel's segmentation numbers them): this CPU's
/// next ID, advanced by `segments`, offset per CPU. The ID matters only if the underlay fragments
/// an outer packet (DF clear, as the kernel's VXLAN and IPIP devices send them), so it need only
/// differ between packets in flight between two nodes, which a per-CPU counter ensures as well as
/// the kernel's hashed per-destination counter (`ip_select_ident`). `bpf_get_prandom_u32` costs
/// ~30 ns here.
#[inline(always)]
pub fn ip_id(segments: u32) -> u16 {
    let next = match FLANNEL_IPID.get_ptr_mut(0) {
        // SAFETY: this CPU's slot, from a successful lookup; no other program runs on this CPU
        // while this one does.
        Some(next) => unsafe {
            let id = *next;
            *next = id.wrapping_add(segments);
            id
        },
        None => 0,
    };
    // SAFETY: no arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    (next as u16).wrapping_add((cpu as u16).wrapping_mul(0x4000 + 0x0101))
}

/// The outer TOS of a tunnel device with `tos 0` for an inner TOS: only the ECN field is carried
/// over, and CE becomes ECT(0) (the kernel's `INET_ECN_encapsulate`).
#[inline(always)]
pub fn ecn_encap(inner_tos: u8) -> u8 {
    match inner_tos & 0x03 {
        0x03 => 0x02,
        ecn => ecn,
    }
}

/// The fields of an outer IPv4 header that differ between encapsulations.
pub struct Outer {
    /// Length of everything the outer header carries, itself included.
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub tos: u8,
    pub proto: u8,
}

/// An outer IPv4 header without options from this node to the remote node, checksummed.
#[inline(always)]
fn outer_ipv4(cfg: &NodeConfig, remote: &RemoteSubnet, o: &Outer) -> [u8; IPV4_HLEN] {
    let [tl0, tl1] = o.tot_len.to_be_bytes();
    let [id0, id1] = o.id.to_be_bytes();
    let [s0, s1, s2, s3] = cfg.public_ip;
    let [d0, d1, d2, d3] = remote.public_ip;
    let mut ip = [
        IPV4_VIHL_NO_OPTIONS,
        o.tos,
        tl0,
        tl1,
        id0,
        id1,
        o.frag_off[0],
        o.frag_off[1],
        o.ttl,
        o.proto,
        0,
        0,
        s0,
        s1,
        s2,
        s3,
        d0,
        d1,
        d2,
        d3,
    ];
    let [c0, c1] = csum::ipv4_header(&ip);
    ip[10] = c0;
    ip[11] = c1;
    ip
}

/// Writes outer IPv4, UDP, VXLAN and inner Ethernet headers into the room after the Ethernet
/// header. `inner_len` is the length of the inner IPv4 packet.
#[inline(always)]
pub fn write_vxlan(
    pkt: &impl Packet,
    cfg: &NodeConfig,
    remote: &RemoteSubnet,
    inner_len: u32,
    hash: u32,
    ip_id: u16,
    tos: u8,
) -> Result<(), u32> {
    let hdr = ptr_at::<VxlanEncapHdr>(pkt, ETH_HLEN)?;
    let tot_len = (inner_len + vxlan::MTU_OVERHEAD) as u16;
    let udp_len = tot_len - IPV4_HLEN as u16;
    let ip = outer_ipv4(
        cfg,
        remote,
        &Outer {
            tot_len,
            id: ip_id,
            frag_off: [0, 0],
            ttl: vxlan::OUTER_TTL,
            tos,
            proto: IPPROTO_UDP,
        },
    );
    let [sp0, sp1] = source_port(hash).to_be_bytes();
    let [dp0, dp1] = cfg.port.to_be_bytes();
    let [ul0, ul1] = udp_len.to_be_bytes();
    let vni = cfg.vni;
    // SAFETY: `hdr` came from `ptr_at`; every field is a byte array (alignment 1).
    unsafe {
        (*hdr).ip = ip;
        (*hdr).udp = [sp0, sp1, dp0, dp1, ul0, ul1, 0, 0];
        (*hdr).vxlan = [
            vxlan::FLAG_VNI,
            0,
            0,
            0,
            (vni >> 16) as u8,
            (vni >> 8) as u8,
            vni as u8,
            0,
        ];
        (*hdr).inner_dst = remote.vtep_mac;
        (*hdr).inner_src = cfg.vtep_mac;
        (*hdr).inner_type = ETH_P_IP;
    }
    Ok(())
}

/// Writes the outer IPv4 header of an IPIP packet (protocol 4) after the Ethernet header.
#[inline(always)]
pub fn write_ipip(
    pkt: &impl Packet,
    cfg: &NodeConfig,
    remote: &RemoteSubnet,
    outer: &Outer,
) -> Result<(), u32> {
    let hdr = ptr_at::<[u8; IPV4_HLEN]>(pkt, ETH_HLEN)?;
    let ip = outer_ipv4(cfg, remote, outer);
    // SAFETY: `hdr` came from `ptr_at`.
    unsafe { *hdr = ip };
    Ok(())
}

/// Writes the outer IPv4 and UDP headers of flannel's udp backend after the Ethernet header:
/// from and to the configured port, UDP checksum 0 (legal for IPv4, accepted by flanneld's socket).
#[inline(always)]
pub fn write_udp(
    pkt: &impl Packet,
    cfg: &NodeConfig,
    remote: &RemoteSubnet,
    outer: &Outer,
) -> Result<(), u32> {
    let hdr = ptr_at::<UdpEncapHdr>(pkt, ETH_HLEN)?;
    let ip = outer_ipv4(cfg, remote, outer);
    let [p0, p1] = cfg.port.to_be_bytes();
    let [ul0, ul1] = (outer.tot_len - IPV4_HLEN as u16).to_be_bytes();
    // SAFETY: `hdr` came from `ptr_at`; every field is a byte array (alignment 1).
    unsafe {
        (*hdr).ip = ip;
        (*hdr).udp = [p0, p1, p0, p1, ul0, ul1, 0, 0];
    }
    Ok(())
}
