//! Packets and node configurations for `BPF_PROG_TEST_RUN` tests and micro-benchmarks: a node A
//! (198.18.0.11, 10.244.1.0/24) and a node B (198.18.0.12, 10.244.2.0/24) with fixed MACs.
#![allow(
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    reason = "test fixtures"
)]
use flannel_ebpf_common::{NodeConfig, backend};

pub const NODE_A: [u8; 4] = [198, 18, 0, 11];
pub const NODE_B: [u8; 4] = [198, 18, 0, 12];
pub const VTEP_A: [u8; 6] = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x01];
pub const VTEP_B: [u8; 6] = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x02];
pub const UPLINK_MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
pub const CNI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
pub const POD_A: [u8; 4] = [10, 244, 1, 10];
pub const POD_B: [u8; 4] = [10, 244, 2, 10];
pub const VNI: u32 = 1;
pub const PORT: u16 = 8472;

/// The Internet checksum of `bytes`.
#[must_use]
pub fn csum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in bytes.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Recomputes the checksum of the 20-byte IPv4 header at `off` in `frame` after a test edited it.
pub fn fix_ipv4_csum(frame: &mut [u8], off: usize) {
    frame[off + 10..off + 12].copy_from_slice(&[0, 0]);
    let c = csum(&frame[off..off + 20]);
    frame[off + 10..off + 12].copy_from_slice(&c.to_be_bytes());
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], ttl: u8, proto: u8, payload: &[u8]) -> Vec<u8> {
    let tot = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, ttl, proto, 0, 0];
    h[2..4].copy_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn vxlan_hdr(flags: u8, vni: u32, payload: &[u8]) -> Vec<u8> {
    let v = vni.to_be_bytes();
    let mut x = vec![flags, 0, 0, 0, v[1], v[2], v[3], 0];
    x.extend_from_slice(payload);
    x
}

/// A TCP-like payload: not parsed by the programs, compared byte for byte.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

/// A pod's frame to the gateway MAC, for a pod on node B.
pub fn pod_frame(dst: [u8; 4], ttl: u8, len: usize) -> Vec<u8> {
    eth(
        CNI_MAC,
        POD_MAC,
        0x0800,
        &ipv4(POD_A, dst, ttl, 6, &payload(len)),
    )
}

/// VXLAN as node A's kernel device (or our encap) sends it to node B, around an IPv4 packet.
pub fn vxlan_frame(outer_src: [u8; 4], vni: u32, inner_dst_mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    vxlan_around(outer_src, vni, &eth(inner_dst_mac, VTEP_A, 0x0800, inner))
}

/// VXLAN from `outer_src` to node B around a whole inner Ethernet frame.
pub fn vxlan_around(outer_src: [u8; 4], vni: u32, inner_eth: &[u8]) -> Vec<u8> {
    let outer = ipv4(
        outer_src,
        NODE_B,
        64,
        17,
        &udp(40000, PORT, &vxlan_hdr(0x08, vni, inner_eth)),
    );
    eth(UPLINK_MAC_B, [0x02, 0, 0, 0, 0, 0xa1], 0x0800, &outer)
}

/// flannel's udp backend port.
pub const UDP_PORT: u16 = 8285;

/// IPIP as node A's `flannel.ipip` (or our encap) sends it to node B, around an IPv4 packet.
pub fn ipip_frame(outer_src: [u8; 4], inner: &[u8]) -> Vec<u8> {
    let outer = ipv4(outer_src, NODE_B, 63, 4, inner);
    eth(UPLINK_MAC_B, [0x02, 0, 0, 0, 0, 0xa1], 0x0800, &outer)
}

/// flannel's udp backend as node A's flanneld sends it to node B: the IPv4 packet is the payload.
pub fn udp_frame(outer_src: [u8; 4], inner: &[u8]) -> Vec<u8> {
    let outer = ipv4(outer_src, NODE_B, 64, 17, &udp(UDP_PORT, UDP_PORT, inner));
    eth(UPLINK_MAC_B, [0x02, 0, 0, 0, 0, 0xa1], 0x0800, &outer)
}

/// As [`config`], for another backend ([`backend`] constant), with that backend's port.
#[must_use]
pub fn config_for(
    kind: u8,
    public_ip: [u8; 4],
    subnet: [u8; 4],
    vtep: [u8; 6],
    uplink_mac: [u8; 6],
) -> NodeConfig {
    let mut cfg = config(public_ip, subnet, vtep, uplink_mac);
    cfg.backend = u32::from(kind);
    cfg.port = match kind {
        backend::VXLAN => PORT,
        backend::UDP => UDP_PORT,
        _ => 0,
    };
    if kind != backend::VXLAN {
        cfg.vni = 0;
    }
    cfg
}

/// This node's configuration as the agent writes it.
#[must_use]
pub fn config(
    public_ip: [u8; 4],
    subnet: [u8; 4],
    vtep: [u8; 6],
    uplink_mac: [u8; 6],
) -> NodeConfig {
    NodeConfig {
        enabled: 1,
        backend: u32::from(backend::VXLAN),
        public_ip,
        subnet_addr: subnet,
        subnet_mask: [255, 255, 255, 0],
        network_addr: [10, 244, 0, 0],
        network_mask: [255, 255, 0, 0],
        gateway_ip: [subnet[0], subnet[1], subnet[2], 1],
        vni: VNI,
        port: PORT,
        _pad0: 0,
        uplink_mtu: 1500,
        uplink_ifindex: 3,
        cni_ifindex: 5,
        vtep_mac: vtep,
        uplink_mac,
        cni_mac: CNI_MAC,
        _pad1: [0; 2],
        // /24 subnets in a /16: indexed in FLANNEL_SUBNETS as the agent configures it.
        route_index_shift: 8,
        // Masquerade off unless a test turns it on (`masq_config`).
        masq_ip: [0; 4],
        nat_port_min: 0,
        nat_port_max: 0,
        nat_flags: 0,
    }
}

/// A host outside the pod network (in the testbed: an address in the underlay namespace).
pub const OUTSIDE: [u8; 4] = [198, 18, 0, 200];
/// The masquerade port range of the NAT fixtures.
pub const NAT_PORTS: (u16, u16) = (61_000, 61_099);

/// The TCP/UDP checksum of `segment` (its checksum field zero) between `src` and `dst`.
pub fn l4_csum(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + segment.len());
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(segment.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(segment);
    csum(&pseudo)
}

/// True if the TCP/UDP segment of the IPv4 packet `ip` (header without options) checks out.
pub fn l4_csum_ok(ip: &[u8]) -> bool {
    let (src, dst, proto) = (
        [ip[12], ip[13], ip[14], ip[15]],
        [ip[16], ip[17], ip[18], ip[19]],
        ip[9],
    );
    let seg = &ip[20..];
    // A UDP checksum of zero means none; otherwise the whole segment sums to all ones.
    (proto == 17 && seg[6..8] == [0, 0]) || l4_csum(src, dst, proto, seg) == 0
}

/// A TCP segment (20-byte header, `flags`) with a valid checksum.
pub fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8, data: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + data.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&[0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(data);
    let c = l4_csum(src, dst, 6, &t);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

/// A UDP datagram with a valid checksum.
pub fn udp_checked(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = udp(sport, dport, data);
    let c = l4_csum(src, dst, 17, &u);
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An ICMP message: type, code, the 4 bytes after the checksum, and its body.
pub fn icmp(kind: u8, code: u8, rest: [u8; 4], body: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(body);
    let c = csum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An Ethernet frame around an IPv4 packet, as it crosses the uplink.
pub fn wire_frame(ip: &[u8]) -> Vec<u8> {
    eth(UPLINK_MAC_B, [0x02, 0, 0, 0, 0, 0xa1], 0x0800, ip)
}

/// `cfg` with the eBPF masquerade on: to its public IP, ports [`NAT_PORTS`].
#[must_use]
pub fn masq_config(mut cfg: NodeConfig, fully_random: bool) -> NodeConfig {
    cfg.masq_ip = cfg.public_ip;
    cfg.nat_port_min = NAT_PORTS.0;
    cfg.nat_port_max = NAT_PORTS.1;
    cfg.nat_flags = u32::from(fully_random);
    cfg
}

/// As [`ipv4`], with `options` (a multiple of 4 bytes, at most 40) after the fixed header: the
/// header length, total length and checksum cover them.
pub fn ipv4_with_options(
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    proto: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    assert!(
        options.len().is_multiple_of(4) && options.len() <= 40,
        "IPv4 options are whole words, at most 40 bytes"
    );
    let mut p = ipv4(src, dst, ttl, proto, payload);
    p.splice(20..20, options.iter().copied());
    let hlen = 20 + options.len();
    p[0] = 0x40 | (hlen / 4) as u8;
    let tot = p.len() as u16;
    p[2..4].copy_from_slice(&tot.to_be_bytes());
    p[10..12].copy_from_slice(&[0, 0]);
    let c = csum(&p[..hlen]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p
}

/// An ICMP error (`kind`, `code`) from `src` to `dst` quoting `quoted` (the start of an IPv4
/// packet that `dst` sent).
pub fn icmp_error(src: [u8; 4], dst: [u8; 4], kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let rest = if kind == 3 && code == 4 {
        // Fragmentation needed: the next-hop MTU.
        [0, 0, 0x05, 0xaa]
    } else {
        [0; 4]
    };
    ipv4(src, dst, 60, 1, &icmp(kind, code, rest, quoted))
}
