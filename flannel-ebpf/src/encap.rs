//! VXLAN encapsulation, byte-compatible with the Linux VXLAN device as flanneld configures it
//! (`vxlan id <VNI> dstport <Port> nolearning`, no UDP checksum, TTL 64, DF clear).
use flannel_ebpf_common::{NodeConfig, RemoteSubnet, vxlan};

use crate::{
    csum,
    parse::{ETH_HLEN, ETH_P_IP, IPPROTO_UDP, IPV4_HLEN, IPV4_VIHL_NO_OPTIONS, Packet, ptr_at},
};

/// Ephemeral port range the kernel draws VXLAN source ports from (ip_local_port_range default).
const SRC_PORT_MIN: u32 = 32_768;
const SRC_PORT_MAX: u32 = 61_000;

/// What `bpf_skb_adjust_room` inserts after the outer Ethernet header.
#[repr(C)]
pub struct VxlanEncapHdr {
    pub ip: [u8; IPV4_HLEN],
    pub udp: [u8; 8],
    pub vxlan: [u8; 8],
    pub inner_dst: [u8; 6],
    pub inner_src: [u8; 6],
    pub inner_type: [u8; 2],
}

const _: () = assert!(size_of::<VxlanEncapHdr>() + ETH_HLEN == vxlan::ENCAP_LEN);

/// The outer UDP source port for a flow hash, spread over the ephemeral range as the kernel's
/// `udp_flow_src_port` does, so ECMP and RSS in the underlay see per-flow entropy.
#[inline(always)]
pub fn source_port(hash: u32) -> u16 {
    let hash = hash ^ (hash << 16);
    let span = u64::from(SRC_PORT_MAX - SRC_PORT_MIN);
    (((u64::from(hash) * span) >> 32) as u32 + SRC_PORT_MIN) as u16
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
) -> Result<(), u32> {
    let hdr = ptr_at::<VxlanEncapHdr>(pkt, ETH_HLEN)?;
    let tot_len = (inner_len + vxlan::MTU_OVERHEAD) as u16;
    let udp_len = tot_len - IPV4_HLEN as u16;
    let [tl0, tl1] = tot_len.to_be_bytes();
    let [id0, id1] = ip_id.to_be_bytes();
    let [s0, s1, s2, s3] = cfg.public_ip;
    let [d0, d1, d2, d3] = remote.public_ip;
    let mut ip = [
        IPV4_VIHL_NO_OPTIONS,
        0,
        tl0,
        tl1,
        id0,
        id1,
        0,
        0,
        vxlan::OUTER_TTL,
        IPPROTO_UDP,
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
