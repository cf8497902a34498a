//! `BPF_PROG_TEST_RUN` tests of every program: crafted packets checked byte for byte and field by
//! field, drops checked against their counted reason, and fuzzing with malformed packets.
//! Needs root (`CAP_BPF` and `CAP_NET_ADMIN`) and a kernel with BPF; `cargo xtask test` runs it so.
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use std::time::Duration;

use flannel_agent::dataplane::{
    Desired,
    ebpf::{EbpfDataplane, NatTimeouts, monotonic_ns, sum_stats, sum_stats_by_program},
};
use flannel_ebpf_common::{
    Endpoint, NatEntry, NatKey, NodeConfig, RemoteNode, RemoteSubnet, backend, nat, prog_name,
    reason,
};
use flannel_tests::packet::{
    CNI_MAC, NAT_PORTS, NODE_A, NODE_B, OUTSIDE, POD_A, POD_B, POD_MAC, PORT, UDP_PORT,
    UPLINK_MAC_B, VNI, VTEP_A, VTEP_B, config, config_for, csum, eth, fix_ipv4_csum, icmp,
    ipip_frame, ipv4, l4_csum_ok, masq_config, payload, pod_frame, tcp, udp, udp_checked,
    udp_frame, vxlan_around, vxlan_frame, wire_frame,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

// ---- dataplane fixtures ----

/// A node with one peer, programmed through the agent's own map code.
fn node(
    cfg: &NodeConfig,
    peer_subnet: &str,
    peer_ip: [u8; 4],
    peer_vtep: [u8; 6],
) -> EbpfDataplane {
    node_via(cfg, peer_subnet, peer_ip, peer_vtep, backend::VXLAN)
}

/// A node with one peer reached by backend `kind`.
fn node_via(
    cfg: &NodeConfig,
    peer_subnet: &str,
    peer_ip: [u8; 4],
    peer_vtep: [u8; 6],
    kind: u8,
) -> EbpfDataplane {
    let dp = EbpfDataplane::unpinned().expect("load and verify the programs (run as root)");
    node_in(dp, cfg, peer_subnet, peer_ip, peer_vtep, kind)
}

/// Programs `dp` as a node with one peer reached by backend `kind`.
fn node_in(
    mut dp: EbpfDataplane,
    cfg: &NodeConfig,
    peer_subnet: &str,
    peer_ip: [u8; 4],
    peer_vtep: [u8; 6],
    kind: u8,
) -> EbpfDataplane {
    dp.set_config(cfg).unwrap();
    let mut d = Desired::default();
    d.routes.insert(
        peer_subnet.parse().unwrap(),
        RemoteSubnet {
            public_ip: peer_ip,
            vtep_mac: peer_vtep,
            backend: kind,
            _pad0: 0,
        },
    );
    d.nodes.insert(
        peer_ip.into(),
        RemoteNode {
            vtep_mac: peer_vtep,
            backend: kind,
            _pad0: 0,
        },
    );
    dp.sync(&d).unwrap();
    dp
}

/// Node A (10.244.1.0/24) with node B as its one peer.
fn node_a() -> EbpfDataplane {
    let cfg = config(NODE_A, [10, 244, 1, 0], VTEP_A, [0x02, 0, 0, 0, 0, 0xa1]);
    node(&cfg, "10.244.2.0/24", NODE_B, VTEP_B)
}

/// Node B (10.244.2.0/24) with node A as its one peer.
fn node_b() -> EbpfDataplane {
    node(
        &config(NODE_B, [10, 244, 2, 0], VTEP_B, UPLINK_MAC_B),
        "10.244.1.0/24",
        NODE_A,
        VTEP_A,
    )
}

/// Node A of backend `kind`, its peer B reached by `route` (host-gw for DirectRouting).
fn node_a_of(kind: u8, route: u8) -> EbpfDataplane {
    let cfg = config_for(
        kind,
        NODE_A,
        [10, 244, 1, 0],
        VTEP_A,
        [0x02, 0, 0, 0, 0, 0xa1],
    );
    node_via(&cfg, "10.244.2.0/24", NODE_B, VTEP_B, route)
}

/// Node B of backend `kind`, with node A as its one peer.
fn node_b_of(kind: u8) -> EbpfDataplane {
    let cfg = config_for(kind, NODE_B, [10, 244, 2, 0], VTEP_B, UPLINK_MAC_B);
    node_via(&cfg, "10.244.1.0/24", NODE_A, VTEP_A, kind)
}

fn run_tc(dp: &mut EbpfDataplane, prog: &str, input: &[u8]) -> (i32, Vec<u8>) {
    let p: &mut SchedClassifier = dp.ebpf_mut().program_mut(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; input.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test_run {prog} on {} bytes: {e}", input.len()));
    out.truncate(r.data_size_out as usize);
    (r.return_value.cast_signed(), out)
}

fn run_xdp(dp: &mut EbpfDataplane, input: &[u8]) -> (u32, Vec<u8>) {
    let p: &mut Xdp = dp
        .ebpf_mut()
        .program_mut(prog_name::FROM_WIRE_XDP)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; input.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test_run xdp on {} bytes: {e}", input.len()));
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn counted(dp: &EbpfDataplane, why: u32) -> u64 {
    // SAFETY-free read through the public API.
    let stats = sum_stats(dp_ref(dp)).unwrap();
    stats[why as usize].1.packets
}

fn total_counted(dp: &EbpfDataplane) -> u64 {
    sum_stats(dp_ref(dp))
        .unwrap()
        .iter()
        .map(|(_, c)| c.packets)
        .sum()
}

fn dp_ref(dp: &EbpfDataplane) -> &aya::Ebpf {
    dp.ebpf()
}

// ---- from_pods: encapsulation ----

#[test]
fn from_pods_encapsulates_like_the_kernel_vxlan_device() {
    let mut a = node_a();
    let input = pod_frame(POD_B, 64, 1000);
    let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &input);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(out.len(), input.len() + 50);
    // Outer Ethernet: left for bpf_redirect_neigh to fill; the EtherType is IPv4.
    assert_eq!(&out[0..12], &input[0..12]);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    // Outer IPv4.
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45, "version 4, no options");
    assert_eq!(ip[1], 0, "TOS");
    assert_eq!(
        u16::from_be_bytes([ip[2], ip[3]]) as usize,
        out.len() - 14,
        "total length"
    );
    assert_eq!(
        u16::from_be_bytes([ip[6], ip[7]]),
        0,
        "DF clear, no fragment offset, as the kernel VXLAN device"
    );
    assert_eq!(ip[8], 64, "outer TTL");
    assert_eq!(ip[9], 17, "UDP");
    assert_eq!(csum(ip), 0, "outer header checksum valid");
    assert_eq!(&ip[12..16], &NODE_A, "outer source = our public IP");
    assert_eq!(&ip[16..20], &NODE_B, "outer destination = remote public IP");
    // UDP.
    let u = &out[34..42];
    let sport = u16::from_be_bytes([u[0], u[1]]);
    assert!(
        (32768..61000).contains(&sport),
        "source port {sport} in the ephemeral range"
    );
    assert_eq!(u16::from_be_bytes([u[2], u[3]]), PORT);
    assert_eq!(
        u16::from_be_bytes([u[4], u[5]]) as usize,
        out.len() - 34,
        "UDP length"
    );
    assert_eq!(
        &u[6..8],
        &[0, 0],
        "no UDP checksum (legal for IPv4, the kernel's default)"
    );
    // VXLAN.
    assert_eq!(&out[42..50], &[0x08, 0, 0, 0, 0, 0, 1, 0], "I flag, VNI 1");
    // Inner Ethernet: to the remote VTEP MAC, from ours.
    assert_eq!(&out[50..56], &VTEP_B);
    assert_eq!(&out[56..62], &VTEP_A);
    assert_eq!(&out[62..64], &[0x08, 0x00]);
    // Inner IPv4: forwarded (TTL 63, checksum updated), payload untouched.
    let inner = &out[64..];
    let mut expected = input[14..].to_vec();
    expected[8] = 63;
    assert_eq!(
        csum(&inner[..20]),
        0,
        "inner checksum valid after the TTL decrement"
    );
    expected[10..12].copy_from_slice(&inner[10..12]);
    assert_eq!(inner, &expected[..]);
    assert_eq!(counted(&a, reason::ENCAP_VXLAN), 1);
}

#[test]
fn from_host_encapsulates_the_nodes_own_packets_without_a_router_hop() {
    let mut a = node_a();
    // What the node's stack sends into cni0 on the route `10.244.2.0/24 via 10.244.2.0 onlink`.
    let input = eth(
        VTEP_B,
        CNI_MAC,
        0x0800,
        &ipv4([10, 244, 1, 1], POD_B, 64, 6, &payload(600)),
    );
    let (ret, out) = run_tc(&mut a, prog_name::FROM_HOST, &input);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(out.len(), input.len() + 50);
    assert_eq!(&out[30..34], &NODE_B, "outer destination");
    assert_eq!(&out[50..56], &VTEP_B);
    assert_eq!(
        &out[64..],
        &input[14..],
        "inner packet untouched: TTL stays 64"
    );
    assert_eq!(counted(&a, reason::ENCAP_VXLAN_HOST), 1);
    // The node's packets to its own pods pass.
    let local = eth(
        POD_MAC,
        CNI_MAC,
        0x0800,
        &ipv4([10, 244, 1, 1], POD_A, 64, 6, &payload(60)),
    );
    assert_eq!(
        run_tc(&mut a, prog_name::FROM_HOST, &local),
        (TC_ACT_OK, local.clone())
    );
}

#[test]
fn outer_ip_ids_differ_between_packets_of_a_flow() {
    // VXLAN and IPIP send DF-clear outer packets (as the kernel devices): should the underlay
    // fragment them, reassembly needs IDs that differ between packets in flight.
    for kind in [backend::VXLAN, backend::IPIP] {
        let mut a = node_a_of(kind, kind);
        let frame = pod_frame(POD_B, 64, 200);
        let ids: std::collections::BTreeSet<u16> = (0..64)
            .map(|_| {
                let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &frame);
                assert_eq!(ret, TC_ACT_REDIRECT);
                assert_eq!(csum(&out[14..34]), 0, "outer checksum covers the ID");
                u16::from_be_bytes([out[18], out[19]])
            })
            .collect();
        assert_eq!(ids.len(), 64, "backend {kind}: an ID per packet: {ids:?}");
    }
}

/// Runs `prog` on `input` with `__sk_buff.gso_size` and `gso_segs` set through the test run's
/// context; the verdict and the output.
fn run_tc_segments(
    dp: &mut EbpfDataplane,
    prog: &str,
    input: &[u8],
    gso_size: u32,
    gso_segs: u32,
) -> (i32, Vec<u8>) {
    // `struct __sk_buff` (192 bytes on 6.18): `gso_segs` at 164, `gso_size` at 176.
    let mut ctx = [0u8; 192];
    ctx[164..168].copy_from_slice(&gso_segs.to_ne_bytes());
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    let p: &mut SchedClassifier = dp.ebpf_mut().program_mut(prog).unwrap().try_into().unwrap();
    let mut out = vec![0u8; input.len() + 256];
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test_run {prog} gso {gso_size}x{gso_segs}: {e}"));
    out.truncate(r.data_size_out as usize);
    (r.return_value.cast_signed(), out)
}

#[test]
fn a_gso_packet_takes_an_outer_ip_id_per_segment() {
    // The kernel numbers the segments of a GSO packet from its outer ID up, so the next packet
    // must start past them or two segments in flight share an ID. The counter is per CPU: stay
    // on one.
    let mut cpus = nix::sched::CpuSet::new();
    cpus.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus).unwrap();
    // The test run cannot encapsulate a GSO packet (its skb has no GSO type, which
    // `bpf_skb_adjust_room` refuses), but the IDs are reserved before that: a plain packet sent
    // after a GSO packet of n segments has an ID n + 1 past the plain packet before it.
    let id = |out: &[u8]| u16::from_be_bytes([out[18], out[19]]);
    for kind in [backend::VXLAN, backend::IPIP] {
        let mut a = node_a_of(kind, kind);
        let plain = pod_frame(POD_B, 64, 200);
        let gso = pod_frame(POD_B, 64, 1400);
        // (gso_segs, IDs taken): without a segment count (a GSO packet from an untrusted
        // source), an upper bound from the length: 1,434 bytes in 400-byte segments.
        for (segs, taken) in [(10u32, 10u16), (3, 3), (1, 1), (7, 7), (0, 4)] {
            let (ret, before) = run_tc(&mut a, prog_name::FROM_PODS, &plain);
            assert_eq!(ret, TC_ACT_REDIRECT);
            run_tc_segments(&mut a, prog_name::FROM_PODS, &gso, 400, segs);
            let (_, after) = run_tc(&mut a, prog_name::FROM_PODS, &plain);
            assert_eq!(
                id(&after).wrapping_sub(id(&before)),
                1 + taken,
                "backend {kind}: {segs} segments"
            );
        }
    }
}

/// The `FLANNEL_SUBNETS` slot `i`.
fn slot(dp: &EbpfDataplane, i: u32) -> RemoteSubnet {
    let array: aya::maps::Array<_, RemoteSubnet> = dp
        .ebpf()
        .map(flannel_ebpf_common::map_name::SUBNETS)
        .unwrap()
        .try_into()
        .unwrap();
    array.get(&i, 0).unwrap()
}

/// The outer destination `from_pods` sends a pod packet for `dst` to, or the drop reason.
fn outer_destination(dp: &mut EbpfDataplane, dst: [u8; 4]) -> Result<[u8; 4], u32> {
    let before: Vec<u64> = (0..reason::COUNT).map(|r| counted(dp, r)).collect();
    let (ret, out) = run_tc(dp, prog_name::FROM_PODS, &pod_frame(dst, 64, 100));
    if ret == TC_ACT_REDIRECT {
        return Ok(out[30..34].try_into().unwrap());
    }
    Err((0..reason::COUNT)
        .find(|&r| counted(dp, r) > before[r as usize])
        .unwrap())
}

#[test]
fn routes_are_found_through_the_subnet_index_and_the_trie_alike() {
    let cfg = config(NODE_A, [10, 244, 1, 0], VTEP_A, [0x02, 0, 0, 0, 0, 0xa1]);
    let route = |ip: [u8; 4]| RemoteSubnet {
        public_ip: ip,
        vtep_mac: VTEP_B,
        backend: backend::VXLAN,
        _pad0: 0,
    };
    let (c, d) = ([198, 18, 0, 13], [198, 18, 0, 14]);
    let desired = |routes: &[(&str, [u8; 4])]| {
        let mut want = Desired::default();
        for (net, ip) in routes {
            want.routes.insert(net.parse().unwrap(), route(*ip));
        }
        want
    };
    for shift in [8, 0] {
        let mut a = EbpfDataplane::unpinned().unwrap();
        a.set_config(&NodeConfig {
            route_index_shift: shift,
            ..cfg
        })
        .unwrap();
        // A /24 as this node's (indexed when shift is 8) and a /23 (always the trie's).
        a.sync(&desired(&[("10.244.2.0/24", NODE_B), ("10.244.8.0/23", c)]))
            .unwrap();
        let indexed = if shift == 8 {
            route(NODE_B)
        } else {
            RemoteSubnet::default()
        };
        assert_eq!(slot(&a, 2), indexed, "shift {shift}: slot of 10.244.2.0/24");
        assert_eq!(slot(&a, 8), RemoteSubnet::default(), "a /23 has no slot");
        assert_eq!(outer_destination(&mut a, POD_B), Ok(NODE_B));
        assert_eq!(outer_destination(&mut a, [10, 244, 9, 7]), Ok(c));
        assert_eq!(
            outer_destination(&mut a, [10, 244, 3, 7]),
            Err(reason::DROP_NO_ROUTE)
        );
        // A lease moving to another node, and one going away.
        a.sync(&desired(&[("10.244.2.0/24", d)])).unwrap();
        if shift == 8 {
            assert_eq!(slot(&a, 2), route(d));
        }
        assert_eq!(outer_destination(&mut a, POD_B), Ok(d));
        assert_eq!(
            outer_destination(&mut a, [10, 244, 9, 7]),
            Err(reason::DROP_NO_ROUTE)
        );
        a.sync(&desired(&[])).unwrap();
        assert_eq!(slot(&a, 2), RemoteSubnet::default(), "slot emptied");
        assert_eq!(outer_destination(&mut a, POD_B), Err(reason::DROP_NO_ROUTE));
    }
    // A stale slot (left by an earlier agent, whose trie entry is gone) is found and emptied by
    // the first sync of a new one, which reads the whole array once.
    let mut a = EbpfDataplane::unpinned().unwrap();
    a.set_config(&cfg).unwrap();
    {
        let mut array: aya::maps::Array<_, RemoteSubnet> = a
            .ebpf_mut()
            .map_mut(flannel_ebpf_common::map_name::SUBNETS)
            .unwrap()
            .try_into()
            .unwrap();
        array.set(77, route(c), 0).unwrap();
    }
    assert_eq!(
        outer_destination(&mut a, [10, 244, 77, 1]),
        Ok(c),
        "the slot is used"
    );
    a.sync(&desired(&[])).unwrap();
    assert_eq!(slot(&a, 77), RemoteSubnet::default());
}

#[test]
fn from_pods_source_port_follows_the_flow() {
    let mut a = node_a();
    let mut ports = std::collections::BTreeSet::new();
    for i in 0..32u8 {
        let mut frame = pod_frame(POD_B, 64, 64);
        // Different TCP source ports (first payload bytes): different flows.
        frame[34] = i;
        let (_, out1) = run_tc(&mut a, prog_name::FROM_PODS, &frame);
        let (_, out2) = run_tc(&mut a, prog_name::FROM_PODS, &frame);
        assert_eq!(out1[34..36], out2[34..36], "same flow, same source port");
        ports.insert(u16::from_be_bytes([out1[34], out1[35]]));
    }
    assert!(
        ports.len() > 16,
        "flows spread over source ports: {ports:?}"
    );
}

#[test]
fn from_pods_passes_what_is_not_for_another_node() {
    let mut a = node_a();
    let arp = eth([0xff; 6], POD_MAC, 0x0806, &[0u8; 28]);
    let outside = pod_frame([8, 8, 8, 8], 64, 100);
    let local = pod_frame([10, 244, 1, 20], 64, 100);
    for (input, why) in [
        (&arp, reason::PASS_NOT_IPV4),
        (&outside, reason::PASS_NOT_OVERLAY),
        (&local, reason::PASS_LOCAL_SUBNET),
    ] {
        let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, input);
        assert_eq!(ret, TC_ACT_OK);
        assert_eq!(&out, input, "untouched");
        assert_eq!(counted(&a, why), 1, "{}", reason::NAMES[why as usize]);
    }
}

#[test]
fn from_pods_drops_with_a_reason() {
    let mut a = node_a();
    let mut bad_ihl = pod_frame(POD_B, 64, 100);
    bad_ihl[14] = 0x44;
    let mut not_v4 = pod_frame(POD_B, 64, 100);
    not_v4[14] = 0x65;
    let cases = [
        (pod_frame([10, 244, 99, 1], 64, 100), reason::DROP_NO_ROUTE),
        (pod_frame(POD_B, 1, 100), reason::DROP_TTL_EXCEEDED),
        (bad_ihl, reason::DROP_BAD_IPV4),
        (not_v4, reason::DROP_BAD_IPV4),
    ];
    let mut bad_csum = pod_frame(POD_B, 64, 100);
    bad_csum[24] ^= 0x01;
    cases_push(&mut a, &cases);
    cases_push(&mut a, &[(bad_csum, reason::DROP_BAD_IPV4)]);
    // The largest packet that fits the uplink MTU once encapsulated goes through.
    let (ret, _) = run_tc(
        &mut a,
        prog_name::FROM_PODS,
        &pod_frame(POD_B, 64, 1500 - 20 - 50),
    );
    assert_eq!(ret, TC_ACT_REDIRECT);
}

/// Runs `prog` on `input` as a GSO packet of `gso_size` (`__sk_buff.gso_size` through the
/// test run's context).
fn run_tc_gso(dp: &mut EbpfDataplane, prog: &str, input: &[u8], gso_size: u32) -> i32 {
    run_tc_segments(dp, prog, input, gso_size, 0).0
}

#[test]
fn too_big_pod_packets_go_to_the_kernel_for_fragmentation_needed() {
    let mut a = node_a();
    // One byte over the pod MTU (a pod whose own MTU is 1500): to the kernel, untouched.
    let big = pod_frame(POD_B, 64, 1500 - 20 - 50 + 1);
    assert_eq!(
        run_tc(&mut a, prog_name::FROM_PODS, &big),
        (TC_ACT_OK, big.clone())
    );
    assert_eq!(counted(&a, reason::PASS_TOO_BIG), 1);
    // The node's own packet was routed by the same MTU already: dropped, counted.
    let mut own = big.clone();
    own[26..30].copy_from_slice(&[10, 244, 1, 1]);
    fix_ipv4_csum(&mut own, 14);
    assert_eq!(run_tc(&mut a, prog_name::FROM_HOST, &own).0, TC_ACT_SHOT);
    assert_eq!(counted(&a, reason::DROP_TOO_BIG), 1);
    // GSO packets are judged by their segments: 20 + 20 + 1420 + 50 > 1500 goes to the kernel
    // (which answers DF segments with fragmentation-needed); 1410-byte segments fit.
    let gso = pod_frame(POD_B, 64, 2000);
    assert_eq!(
        run_tc_gso(&mut a, prog_name::FROM_PODS, &gso, 1420),
        TC_ACT_OK
    );
    assert_eq!(counted(&a, reason::PASS_TOO_BIG), 2);
    run_tc_gso(&mut a, prog_name::FROM_PODS, &gso, 1410);
    assert_eq!(
        counted(&a, reason::PASS_TOO_BIG),
        2,
        "fitting segments are not too big"
    );
}

fn cases_push(a: &mut EbpfDataplane, cases: &[(Vec<u8>, u32)]) {
    for (input, why) in cases {
        let before = counted(a, *why);
        let (ret, _) = run_tc(a, prog_name::FROM_PODS, input);
        assert_eq!(ret, TC_ACT_SHOT, "{}", reason::NAMES[*why as usize]);
        assert_eq!(
            counted(a, *why),
            before + 1,
            "{}",
            reason::NAMES[*why as usize]
        );
    }
}

#[test]
fn unconfigured_programs_pass_everything() {
    let mut dp = EbpfDataplane::unpinned().unwrap();
    let input = pod_frame(POD_B, 64, 100);
    assert_eq!(
        run_tc(&mut dp, prog_name::FROM_PODS, &input),
        (TC_ACT_OK, input.clone())
    );
    let wire = vxlan_frame(
        NODE_A,
        VNI,
        VTEP_B,
        &ipv4(POD_A, POD_B, 64, 6, &payload(100)),
    );
    assert_eq!(
        run_tc(&mut dp, prog_name::FROM_WIRE, &wire),
        (TC_ACT_OK, wire.clone())
    );
    assert_eq!(run_xdp(&mut dp, &wire), (XDP_PASS, wire.clone()));
    assert_eq!(counted(&dp, reason::PASS_NOT_CONFIGURED), 2);
}

// ---- from_wire: decapsulation ----

#[test]
fn from_wire_tc_decapsulates_and_delivers_to_cni0() {
    let mut b = node_b();
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(1000));
    let input = vxlan_frame(NODE_A, VNI, VTEP_B, &inner);
    let (ret, out) = run_tc(&mut b, prog_name::FROM_WIRE, &input);
    assert_eq!(ret, TC_ACT_REDIRECT, "redirected to cni0");
    assert_eq!(out.len(), input.len() - 50);
    assert_eq!(
        &out[..14],
        &input[..14],
        "outer Ethernet kept for bpf_redirect_neigh"
    );
    let mut expected = inner.clone();
    expected[8] = 62;
    assert_eq!(csum(&out[14..34]), 0);
    expected[10..12].copy_from_slice(&out[24..26]);
    assert_eq!(&out[14..], &expected[..], "inner packet, TTL decremented");
    assert_eq!(
        counted(&b, reason::DECAP_BRIDGE),
        1,
        "pod not learnt: via cni0"
    );
}

#[test]
fn from_wire_delivers_learnt_pods_straight_to_their_veth() {
    let mut b = node_b();
    let pod_mac = [0x02, 0, 0, 0, 0, 0x22];
    let endpoints = [(
        POD_B.into(),
        Endpoint {
            ifindex: 42,
            mac: pod_mac,
            flags: 0,
            _pad0: 0,
        },
    )]
    .into();
    b.sync_endpoints(&endpoints).unwrap();
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(1000));
    let (ret, out) = run_tc(
        &mut b,
        prog_name::FROM_WIRE,
        &vxlan_frame(NODE_A, VNI, VTEP_B, &inner),
    );
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(&out[0..6], &pod_mac, "to the pod's MAC");
    assert_eq!(
        &out[6..12],
        &CNI_MAC,
        "from the gateway's MAC, as the bridge would deliver it"
    );
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(out[14 + 8], 62);
    assert_eq!(&out[34..], &inner[20..]);
    assert_eq!(counted(&b, reason::DECAP_VXLAN), 1);
    // Other local addresses still go through the bridge; the sync removes what is gone.
    let other = ipv4(POD_A, [10, 244, 2, 99], 63, 6, &payload(10));
    let (ret, _) = run_tc(
        &mut b,
        prog_name::FROM_WIRE,
        &vxlan_frame(NODE_A, VNI, VTEP_B, &other),
    );
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(counted(&b, reason::DECAP_BRIDGE), 1);
    let report = b
        .sync_endpoints(&std::collections::BTreeMap::new())
        .unwrap();
    assert_eq!(report.removed, 1);
}

#[test]
fn our_encapsulation_is_accepted_by_our_decapsulation() {
    let mut a = node_a();
    let mut b = node_b();
    let input = pod_frame(POD_B, 64, 500);
    let (_, mut wire) = run_tc(&mut a, prog_name::FROM_PODS, &input);
    wire[0..6].copy_from_slice(&UPLINK_MAC_B); // what bpf_redirect_neigh writes
    let (ret, out) = run_tc(&mut b, prog_name::FROM_WIRE, &wire);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(
        out[14 + 8],
        62,
        "two router hops, as with flannel's kernel path"
    );
    assert_eq!(&out[14 + 20..], &input[14 + 20..], "payload intact");
}

#[test]
fn from_wire_xdp_decapsulates() {
    let mut b = node_b();
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(1000));
    let input = vxlan_frame(NODE_A, VNI, VTEP_B, &inner);
    let (ret, out) = run_xdp(&mut b, &input);
    assert_eq!(ret, XDP_PASS);
    assert_eq!(
        &out[0..6],
        &UPLINK_MAC_B,
        "addressed to the uplink so the stack takes it"
    );
    assert_eq!(&out[6..12], &VTEP_A);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(
        &out[14..],
        &inner[..],
        "inner packet untouched (tc forwards it)"
    );
    assert_eq!(counted(&b, reason::DECAP_VXLAN_XDP), 1);
    // tc then hands the decapsulated packet to cni0.
    let (ret, delivered) = run_tc(&mut b, prog_name::FROM_WIRE, &out);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(delivered[14 + 8], 62);
    assert_eq!(counted(&b, reason::DELIVER_LOCAL_BRIDGE), 1);
}

/// `frame` with four bytes of outer IPv4 options (three NOPs and an end of list) after its outer
/// IPv4 header at 14, lengths and checksum fixed.
fn with_outer_options(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..34].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]);
    f.extend_from_slice(&frame[34..]);
    f[14] = 0x46;
    let tot = u16::from_be_bytes([f[16], f[17]]) + 4;
    f[16..18].copy_from_slice(&tot.to_be_bytes());
    f[24..26].copy_from_slice(&[0, 0]);
    let c = csum(&f[14..38]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f
}

#[test]
fn from_wire_passes_what_is_not_our_vxlan() {
    let mut b = node_b();
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(100));
    let other_port = {
        let mut f = vxlan_frame(NODE_A, VNI, VTEP_B, &inner);
        f[36..38].copy_from_slice(&4789u16.to_be_bytes());
        f
    };
    let not_to_us = {
        let mut f = vxlan_frame(NODE_A, VNI, VTEP_B, &inner);
        f[30..34].copy_from_slice(&[198, 18, 0, 99]);
        fix_ipv4_csum(&mut f, 14);
        f
    };
    let tcp_to_node = eth(
        UPLINK_MAC_B,
        POD_MAC,
        0x0800,
        &ipv4(NODE_A, NODE_B, 64, 6, &payload(100)),
    );
    let arp = eth([0xff; 6], POD_MAC, 0x0806, &[0u8; 28]);
    let fragment = {
        let mut f = vxlan_frame(NODE_A, VNI, VTEP_B, &inner);
        f[20] = 0x20; // MF
        f
    };
    let with_options = with_outer_options(&vxlan_frame(NODE_A, VNI, VTEP_B, &inner));
    let other_port_with_options = {
        let mut f = with_outer_options(&vxlan_frame(NODE_A, VNI, VTEP_B, &inner));
        f[40..42].copy_from_slice(&4789u16.to_be_bytes());
        f
    };
    for (input, why) in [
        (with_options, reason::PASS_IP_OPTIONS),
        (other_port_with_options, reason::PASS_NOT_OVERLAY),
        (other_port, reason::PASS_NOT_OVERLAY),
        (not_to_us, reason::PASS_NOT_OVERLAY),
        (tcp_to_node, reason::PASS_NOT_OVERLAY),
        (arp, reason::PASS_NOT_IPV4),
        (fragment, reason::PASS_FRAGMENT),
    ] {
        let before = counted(&b, why);
        let (ret, out) = run_tc(&mut b, prog_name::FROM_WIRE, &input);
        assert_eq!(
            (ret, &out),
            (TC_ACT_OK, &input),
            "{} untouched",
            reason::NAMES[why as usize]
        );
        assert_eq!(counted(&b, why), before + 1);
        let (ret, out) = run_xdp(&mut b, &input);
        assert_eq!((ret, &out), (XDP_PASS, &input));
    }
}

#[test]
fn from_wire_drops_bad_vxlan_with_a_reason() {
    let mut b = node_b();
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(100));
    let good = vxlan_frame(NODE_A, VNI, VTEP_B, &inner);
    let mut no_i_flag = good.clone();
    no_i_flag[42] = 0;
    let mut bad_inner_ihl = good.clone();
    bad_inner_ihl[64] = 0x42;
    let mut inner_len_lies = good.clone();
    inner_len_lies[66..68].copy_from_slice(&2000u16.to_be_bytes());
    let not_local = vxlan_frame(
        NODE_A,
        VNI,
        VTEP_B,
        &ipv4(POD_A, [10, 244, 3, 3], 63, 6, &payload(100)),
    );
    let inner_arp = vxlan_around(NODE_A, VNI, &eth(VTEP_B, VTEP_A, 0x0806, &[0u8; 28]));
    let cases = [
        (
            vxlan_frame(NODE_A, 2, VTEP_B, &inner),
            reason::DROP_UNKNOWN_VNI,
        ),
        (
            vxlan_frame([198, 18, 0, 66], VNI, VTEP_B, &inner),
            reason::DROP_UNKNOWN_SOURCE,
        ),
        (
            vxlan_frame(NODE_A, VNI, [0xff; 6], &inner),
            reason::DROP_BAD_INNER_MAC,
        ),
        (no_i_flag, reason::DROP_VXLAN_FLAGS),
        (bad_inner_ihl, reason::DROP_BAD_IPV4),
        (inner_len_lies, reason::DROP_BAD_IPV4),
        (not_local, reason::DROP_INNER_NOT_LOCAL),
        (inner_arp, reason::DROP_INNER_NOT_IPV4),
        // Cut short: the outer total length claims more than arrived.
        (good[..60].to_vec(), reason::DROP_BAD_OUTER),
        (good[..70].to_vec(), reason::DROP_BAD_OUTER),
    ];
    for (input, why) in cases {
        let name = reason::NAMES[why as usize];
        let before = counted(&b, why);
        let (ret, _) = run_tc(&mut b, prog_name::FROM_WIRE, &input);
        assert_eq!(ret, TC_ACT_SHOT, "tc: {name}");
        assert_eq!(counted(&b, why), before + 1, "tc counted {name}");
        let (ret, _) = run_xdp(&mut b, &input);
        assert_eq!(ret, XDP_DROP, "xdp: {name}");
        assert_eq!(counted(&b, why), before + 2, "xdp counted {name}");
    }
}

#[test]
fn xdp_handles_runts_that_tc_test_run_rejects() {
    let mut b = node_b();
    let good = vxlan_frame(
        NODE_A,
        VNI,
        VTEP_B,
        &ipv4(POD_A, POD_B, 63, 6, &payload(10)),
    );
    for len in 14..good.len() {
        let (ret, _) = run_xdp(&mut b, &good[..len]);
        // Headers before the UDP port say nothing about us: pass; after it, truncation drops.
        let expected = if len < 14 + 20 + 8 {
            XDP_PASS
        } else {
            XDP_DROP
        };
        assert_eq!(ret, expected, "length {len}");
    }
}

// ---- fuzzing ----

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut p = seed.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..=rng.below(4) {
                let i = rng.below(p.len());
                p[i] = rng.next() as u8;
            }
        }
        1 => {
            // Headers only: flip bytes in the first 80.
            let i = rng.below(p.len().min(80));
            p[i] ^= 1 << rng.below(8);
        }
        2 => p.truncate(34 + rng.below(p.len() - 34)),
        _ => {
            for b in p.iter_mut().skip(14) {
                *b = rng.next() as u8;
            }
        }
    }
    p
}

/// What may reach a pod: IPv4 with a sane header length and, without options, a valid checksum
/// (headers with options are checked by the receiving stack, as the programs document).
fn ipv4_header_ok(h: &[u8]) -> bool {
    let ihl = usize::from(h.first().map_or(0, |b| b & 0xf)) * 4;
    h.len() >= 20 && h[0] >> 4 == 4 && ihl >= 20 && (ihl > 20 || csum(&h[..20]) == 0)
}

/// Feeds `runs` mutations of `seed` to `from_wire` (tc and XDP) of node `b`, whose tunnel adds
/// `overhead` bytes: every packet counted exactly once by tc, passes untouched, and only valid
/// IPv4 reaches a pod or leaves XDP decapsulated.
fn fuzz_wire(b: &mut EbpfDataplane, rng: &mut Rng, seed: &[u8], overhead: usize, runs: u64) {
    for i in 0..runs {
        let input = mutate(rng, seed);
        let before = total_counted(b);
        let (ret, out) = run_tc(b, prog_name::FROM_WIRE, &input);
        assert_eq!(
            total_counted(b),
            before + 1,
            "run {i}: every packet counted exactly once"
        );
        match ret {
            // Decapsulated for the node itself (its gateway address): to the stack.
            TC_ACT_OK => assert!(
                out == input || out.len() + overhead == input.len(),
                "run {i}: pass modifies nothing"
            ),
            TC_ACT_SHOT => {}
            TC_ACT_REDIRECT => {
                assert!(
                    out.len() == input.len() || out.len() + overhead == input.len(),
                    "run {i}"
                );
                assert!(
                    ipv4_header_ok(&out[14..]),
                    "run {i}: only a valid IPv4 packet reaches a pod"
                );
            }
            other => panic!("run {i}: verdict {other}"),
        }
        let (ret, out) = run_xdp(b, &input);
        match ret {
            XDP_PASS if out == input => {}
            XDP_PASS => {
                assert_eq!(out.len() + overhead, input.len(), "run {i}");
                assert_eq!(&out[0..6], &UPLINK_MAC_B);
                assert!(
                    ipv4_header_ok(&out[14..]),
                    "run {i}: decapsulated packet is valid IPv4"
                );
            }
            XDP_DROP => {}
            other => panic!("run {i}: xdp verdict {other}"),
        }
    }
}

#[test]
fn fuzz_from_wire_never_misdelivers_and_counts_every_packet() {
    let mut b = node_b();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seed = vxlan_frame(
        NODE_A,
        VNI,
        VTEP_B,
        &ipv4(POD_A, POD_B, 63, 6, &payload(200)),
    );
    fuzz_wire(&mut b, &mut rng, &seed, 50, 3000);
}

#[test]
fn fuzz_from_pods_encapsulates_only_valid_packets() {
    let mut a = node_a();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let seed = pod_frame(POD_B, 64, 300);
    for i in 0..3000u64 {
        let input = mutate(&mut rng, &seed);
        let before = total_counted(&a);
        let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &input);
        assert_eq!(
            total_counted(&a),
            before + 1,
            "run {i}: every packet counted exactly once"
        );
        match ret {
            TC_ACT_OK => assert_eq!(out, input, "run {i}: pass modifies nothing"),
            TC_ACT_SHOT => {}
            TC_ACT_REDIRECT => {
                assert_eq!(out.len(), input.len() + 50, "run {i}");
                assert!(ipv4_header_ok(&out[14..]), "run {i}: outer header valid");
                assert!(ipv4_header_ok(&out[64..]), "run {i}: inner header valid");
            }
            other => panic!("run {i}: verdict {other}"),
        }
    }
}

// ---- host-gw, DirectRouting, IPIP and udp ----

/// The inner packet as forwarded: TTL lowered by `hops`, checksum valid, everything else equal.
fn assert_forwarded(out: &[u8], inner: &[u8], hops: u8, what: &str) {
    assert_eq!(out.len(), inner.len(), "{what}: length");
    assert_eq!(out[8], inner[8] - hops, "{what}: TTL");
    assert_eq!(csum(&out[..20]), 0, "{what}: header checksum valid");
    let mut expected = inner.to_vec();
    expected[8] = out[8];
    expected[10..12].copy_from_slice(&out[10..12]);
    assert_eq!(out, &expected[..], "{what}: otherwise untouched");
}

#[test]
fn host_gw_forwards_unencapsulated_and_the_node_is_no_extra_hop() {
    for (kind, what) in [
        (backend::HOST_GW, "host-gw"),
        (backend::VXLAN, "vxlan DirectRouting"),
        (backend::IPIP, "ipip DirectRouting"),
    ] {
        let mut a = node_a_of(kind, backend::HOST_GW);
        let input = pod_frame(POD_B, 64, 1000);
        let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &input);
        assert_eq!(ret, TC_ACT_REDIRECT, "{what}");
        assert_forwarded(&out[14..], &input[14..], 1, what);
        assert_eq!(counted(&a, reason::DIRECT), 1, "{what}");
        // The node's own packet: no router hop.
        let own = eth(
            VTEP_B,
            CNI_MAC,
            0x0800,
            &ipv4([10, 244, 1, 1], POD_B, 64, 6, &payload(100)),
        );
        let (ret, out) = run_tc(&mut a, prog_name::FROM_HOST, &own);
        assert_eq!(ret, TC_ACT_REDIRECT);
        assert_eq!(&out[14..], &own[14..], "{what}: own packet untouched");
        assert_eq!(counted(&a, reason::DIRECT_HOST), 1, "{what}");
        // host-gw has no overhead: a full uplink-MTU packet goes, one more byte does not.
        let (ret, _) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 1480));
        assert_eq!(ret, TC_ACT_REDIRECT);
        let (ret, _) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 1481));
        assert_eq!(ret, TC_ACT_OK);
        assert_eq!(counted(&a, reason::PASS_TOO_BIG), 1);
    }
    // The receiving side delivers plain packets for its pods, whatever its backend.
    for kind in [
        backend::HOST_GW,
        backend::VXLAN,
        backend::IPIP,
        backend::UDP,
    ] {
        let mut b = node_b_of(kind);
        let inner = ipv4(POD_A, POD_B, 63, 6, &payload(500));
        let input = eth(UPLINK_MAC_B, [0x02, 0, 0, 0, 0, 0xa1], 0x0800, &inner);
        let (ret, out) = run_tc(&mut b, prog_name::FROM_WIRE, &input);
        assert_eq!(ret, TC_ACT_REDIRECT);
        assert_forwarded(&out[14..], &inner, 1, "host-gw receive");
        assert_eq!(counted(&b, reason::DELIVER_LOCAL_BRIDGE), 1);
    }
}

#[test]
fn ipip_encapsulates_like_the_kernel_ipip_device() {
    let mut a = node_a_of(backend::IPIP, backend::IPIP);
    let mut input = pod_frame(POD_B, 64, 1000);
    // DSCP 46 with ECT(1): only the ECN field is carried to the outer header.
    input[15] = 0xb9;
    fix_ipv4_csum(&mut input, 14);
    let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &input);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(out.len(), input.len() + 20);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[1], 0x01, "outer TOS: the inner ECN only (tos 0 device)");
    assert_eq!(
        usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        out.len() - 14
    );
    assert_eq!(
        &ip[6..8],
        &[0x40, 0],
        "DF set (pmtudisc), no fragment offset"
    );
    assert_eq!(
        ip[8], 63,
        "outer TTL inherited from the forwarded inner packet"
    );
    assert_eq!(ip[9], 4, "IPv4 in IPv4");
    assert_eq!(csum(ip), 0);
    assert_eq!(&ip[12..16], &NODE_A);
    assert_eq!(&ip[16..20], &NODE_B);
    assert_forwarded(&out[34..], &input[14..], 1, "ipip inner");
    assert_eq!(counted(&a, reason::ENCAP_IPIP), 1);
    // A CE-marked packet leaves as ECT(0) outside.
    let mut ce = input.clone();
    ce[15] = 0x03;
    fix_ipv4_csum(&mut ce, 14);
    let (_, out) = run_tc(&mut a, prog_name::FROM_PODS, &ce);
    assert_eq!(out[15], 0x02);
    // Without DF inside, none outside.
    let mut no_df = pod_frame(POD_B, 64, 100);
    no_df[20] = 0;
    fix_ipv4_csum(&mut no_df, 14);
    let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &no_df);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(&out[20..22], &[0, 0], "DF clear outside");
    // MTU: 20 bytes of overhead.
    let (ret, _) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 1460));
    assert_eq!(ret, TC_ACT_REDIRECT);
    let (ret, _) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 1461));
    assert_eq!(ret, TC_ACT_OK, "too big: to the kernel");
    assert_eq!(counted(&a, reason::PASS_TOO_BIG), 1);
}

#[test]
fn udp_encapsulates_like_flanneld_udp_backend() {
    let mut a = node_a_of(backend::UDP, backend::UDP);
    let input = pod_frame(POD_B, 64, 1000);
    let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &input);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(out.len(), input.len() + 28);
    let ip = &out[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(ip[1], 0);
    assert_eq!(
        usize::from(u16::from_be_bytes([ip[2], ip[3]])),
        out.len() - 14
    );
    assert_eq!(
        &ip[4..6],
        &[0, 0],
        "IP ID 0, as an unconnected socket's DF datagram"
    );
    assert_eq!(&ip[6..8], &[0x40, 0], "DF set");
    assert_eq!(ip[8], 64, "the socket's default TTL");
    assert_eq!(ip[9], 17);
    assert_eq!(csum(ip), 0);
    assert_eq!(&ip[12..16], &NODE_A);
    assert_eq!(&ip[16..20], &NODE_B);
    let u = &out[34..42];
    assert_eq!(
        u16::from_be_bytes([u[0], u[1]]),
        UDP_PORT,
        "from flanneld's port"
    );
    assert_eq!(
        u16::from_be_bytes([u[2], u[3]]),
        UDP_PORT,
        "to flanneld's port"
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([u[4], u[5]])),
        out.len() - 34
    );
    assert_eq!(&u[6..8], &[0, 0], "no UDP checksum");
    // The payload is the inner packet: routed by this node (1) and through the tunnel end (1).
    assert_forwarded(&out[42..], &input[14..], 2, "udp inner");
    assert_eq!(counted(&a, reason::ENCAP_UDP), 1);
    // The node's own packet: only the tunnel end's decrement.
    let own = eth(
        VTEP_B,
        CNI_MAC,
        0x0800,
        &ipv4([10, 244, 1, 1], POD_B, 64, 6, &payload(100)),
    );
    let (ret, out) = run_tc(&mut a, prog_name::FROM_HOST, &own);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_forwarded(&out[42..], &own[14..], 1, "udp own");
    assert_eq!(counted(&a, reason::ENCAP_UDP_HOST), 1);
    // TTL 2 from a pod cannot cross both hops.
    let (ret, _) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 2, 100));
    assert_eq!(ret, TC_ACT_SHOT);
    assert_eq!(counted(&a, reason::DROP_TTL_EXCEEDED), 1);
    // MTU: 28 bytes of overhead.
    let (ret, _) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 1452));
    assert_eq!(ret, TC_ACT_REDIRECT);
    let (ret, _) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 1453));
    assert_eq!(ret, TC_ACT_OK, "too big: to the kernel");
    assert_eq!(counted(&a, reason::PASS_TOO_BIG), 1);
}

/// Decapsulation of `frame` (around `inner`) on node B of backend `kind`: tc, learnt pod, XDP.
fn check_decap(kind: u8, frame: &[u8], inner: &[u8], overhead: usize, tunnel_hops: u8) {
    let (tc_verdict, xdp_verdict) = match kind {
        backend::IPIP => (reason::DECAP_IPIP, reason::DECAP_IPIP_XDP),
        _ => (reason::DECAP_UDP, reason::DECAP_UDP_XDP),
    };
    let mut b = node_b_of(kind);
    // tc, pod not learnt: to cni0, outer Ethernet kept for bpf_redirect_neigh.
    let (ret, out) = run_tc(&mut b, prog_name::FROM_WIRE, frame);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(out.len(), frame.len() - overhead);
    assert_eq!(&out[..14], &frame[..14]);
    assert_forwarded(&out[14..], inner, tunnel_hops + 1, "tc decap");
    assert_eq!(counted(&b, reason::DECAP_BRIDGE), 1);
    // tc, learnt pod: straight to its veth.
    let pod_mac = [0x02, 0, 0, 0, 0, 0x22];
    b.sync_endpoints(
        &[(
            POD_B.into(),
            Endpoint {
                ifindex: 42,
                mac: pod_mac,
                flags: 0,
                _pad0: 0,
            },
        )]
        .into(),
    )
    .unwrap();
    let (ret, out) = run_tc(&mut b, prog_name::FROM_WIRE, frame);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(&out[..6], &pod_mac);
    assert_eq!(&out[6..12], &CNI_MAC);
    assert_forwarded(&out[14..], inner, tunnel_hops + 1, "tc decap, direct");
    assert_eq!(counted(&b, tc_verdict), 1);
    // XDP: a new Ethernet header to the uplink from the peer; tc then forwards.
    let (ret, out) = run_xdp(&mut b, frame);
    assert_eq!(ret, XDP_PASS);
    assert_eq!(out.len(), frame.len() - overhead);
    assert_eq!(&out[0..6], &UPLINK_MAC_B);
    assert_eq!(&out[6..12], &frame[6..12], "source: the peer's MAC");
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_forwarded(&out[14..], inner, tunnel_hops, "xdp decap");
    assert_eq!(counted(&b, xdp_verdict), 1);
    let (ret, delivered) = run_tc(&mut b, prog_name::FROM_WIRE, &out);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_forwarded(&delivered[14..], inner, tunnel_hops + 1, "xdp then tc");
    assert_eq!(counted(&b, reason::DELIVER_LOCAL), 1);
}

#[test]
fn ipip_and_udp_are_decapsulated_by_tc_and_xdp_without_a_tunnel_device() {
    let inner = ipv4(POD_A, POD_B, 62, 6, &payload(1000));
    check_decap(backend::IPIP, &ipip_frame(NODE_A, &inner), &inner, 20, 0);
    check_decap(backend::UDP, &udp_frame(NODE_A, &inner), &inner, 28, 1);
}

#[test]
fn ipip_and_udp_round_trip_between_our_nodes() {
    for (kind, hops) in [(backend::IPIP, 2), (backend::UDP, 4)] {
        let mut a = node_a_of(kind, kind);
        let mut b = node_b_of(kind);
        let input = pod_frame(POD_B, 64, 700);
        let (_, mut wire) = run_tc(&mut a, prog_name::FROM_PODS, &input);
        wire[0..6].copy_from_slice(&UPLINK_MAC_B);
        let (ret, out) = run_tc(&mut b, prog_name::FROM_WIRE, &wire);
        assert_eq!(ret, TC_ACT_REDIRECT);
        assert_forwarded(&out[14..], &input[14..], hops, "round trip");
    }
}

#[test]
fn ipip_and_udp_drop_bad_tunnel_traffic_with_a_reason() {
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(100));
    for (kind, frame, off) in [
        (
            backend::IPIP,
            ipip_frame as fn([u8; 4], &[u8]) -> Vec<u8>,
            34,
        ),
        (backend::UDP, udp_frame, 42),
    ] {
        let mut b = node_b_of(kind);
        let good = frame(NODE_A, &inner);
        let mut bad_inner_csum = good.clone();
        bad_inner_csum[off + 12] ^= 1;
        let mut inner_len_lies = good.clone();
        inner_len_lies[off + 2..off + 4].copy_from_slice(&2000u16.to_be_bytes());
        let mut not_v4 = good.clone();
        not_v4[off] = 0x65;
        let cases = [
            (frame([198, 18, 0, 66], &inner), reason::DROP_UNKNOWN_SOURCE),
            (
                frame(NODE_A, &ipv4(POD_A, [10, 244, 3, 3], 63, 6, &payload(100))),
                reason::DROP_INNER_NOT_LOCAL,
            ),
            (bad_inner_csum, reason::DROP_BAD_IPV4),
            (inner_len_lies, reason::DROP_BAD_IPV4),
            (not_v4, reason::DROP_BAD_IPV4),
            (good[..off + 10].to_vec(), reason::DROP_BAD_OUTER),
        ];
        for (input, why) in cases {
            let name = reason::NAMES[why as usize];
            let before = counted(&b, why);
            let (ret, _) = run_tc(&mut b, prog_name::FROM_WIRE, &input);
            assert_eq!(ret, TC_ACT_SHOT, "tc: {name}");
            let (ret, _) = run_xdp(&mut b, &input);
            assert_eq!(ret, XDP_DROP, "xdp: {name}");
            assert_eq!(counted(&b, why), before + 2, "{name} counted by both");
        }
        // TTL 1 inside the udp tunnel: its tunnel end may not forward it.
        if kind == backend::UDP {
            let (ret, _) = run_tc(
                &mut b,
                prog_name::FROM_WIRE,
                &udp_frame(NODE_A, &ipv4(POD_A, POD_B, 1, 6, &payload(10))),
            );
            assert_eq!(ret, TC_ACT_SHOT);
        }
    }
    // Another node's tunnel traffic is not ours: IPIP at a vxlan node, udp on another port,
    // VXLAN at a udp node.
    let mut vx = node_b_of(backend::VXLAN);
    let ipip = ipip_frame(NODE_A, &inner);
    assert_eq!(
        run_tc(&mut vx, prog_name::FROM_WIRE, &ipip),
        (TC_ACT_OK, ipip)
    );
    let mut u = node_b_of(backend::UDP);
    let vxlan = vxlan_frame(NODE_A, VNI, VTEP_B, &inner);
    assert_eq!(
        run_tc(&mut u, prog_name::FROM_WIRE, &vxlan),
        (TC_ACT_OK, vxlan)
    );
    assert_eq!(counted(&u, reason::PASS_NOT_OVERLAY), 1);
}

#[test]
fn fuzz_every_backend_never_misdelivers_and_counts_every_packet() {
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(200));
    for (kind, seed, overhead) in [
        (backend::IPIP, ipip_frame(NODE_A, &inner), 20),
        (backend::UDP, udp_frame(NODE_A, &inner), 28),
    ] {
        let mut rng = Rng(0x1234_5678_9abc_def1 ^ u64::from(kind));
        fuzz_wire(&mut node_b_of(kind), &mut rng, &seed, overhead, 1500);
        // Malformed pod packets: encapsulated only if valid.
        let mut a = node_a_of(kind, kind);
        let pod_seed = pod_frame(POD_B, 64, 300);
        for i in 0..1500u64 {
            let from_pod = mutate(&mut rng, &pod_seed);
            let before = total_counted(&a);
            let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &from_pod);
            assert_eq!(total_counted(&a), before + 1, "run {i}: counted once");
            if ret == TC_ACT_REDIRECT {
                assert_eq!(out.len(), from_pod.len() + overhead, "run {i}");
                assert!(ipv4_header_ok(&out[14..]), "run {i}: outer valid");
                assert!(
                    ipv4_header_ok(&out[14 + overhead..]),
                    "run {i}: inner valid"
                );
            }
        }
    }
}

// ---- masquerade (to_wire at the uplink's egress, reverse translation in from_wire) ----

const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const POD_PORT: u16 = 40_000;

/// Node A with the eBPF masquerade on and a table of `entries`.
fn masq_node(entries: u32, fully_random: bool) -> EbpfDataplane {
    let cfg = masq_config(
        config(NODE_A, [10, 244, 1, 0], VTEP_A, [0x02, 0, 0, 0, 0, 0xa1]),
        fully_random,
    );
    let dp = EbpfDataplane::unpinned_with(entries).expect("load and verify the programs");
    node_in(dp, &cfg, "10.244.2.0/24", NODE_B, VTEP_B, backend::VXLAN)
}

/// Offset of the translated port (or ICMP echo identifier) in an L4 header.
fn port_offset(proto: u8, destination: bool) -> usize {
    match (proto, destination) {
        (ICMP, _) => 4,
        (_, false) => 0,
        (_, true) => 2,
    }
}

fn port_at(ip: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([ip[20 + off], ip[21 + off]])
}

/// Checks that `out` is `input` with the source (or, `destination`, the destination) address and
/// port rewritten to `addr` (and a port for which `port_ok` holds), every checksum valid and
/// nothing else changed; returns the new port.
fn assert_translated(
    input: &[u8],
    out: &[u8],
    destination: bool,
    addr: [u8; 4],
    port_ok: impl Fn(u16) -> bool,
) -> u16 {
    let ip = &out[14..];
    let proto = ip[9];
    let (a, p) = (
        if destination { 16 } else { 12 },
        port_offset(proto, destination),
    );
    assert_eq!(ip[a..a + 4], addr, "address rewritten");
    let port = port_at(ip, p);
    assert!(port_ok(port), "port {port}");
    assert_eq!(csum(&ip[..20]), 0, "IPv4 checksum valid");
    if proto == ICMP {
        assert_eq!(csum(&ip[20..]), 0, "ICMP checksum valid");
    } else {
        assert!(l4_csum_ok(ip), "L4 checksum valid");
    }
    let mut expected = input.to_vec();
    expected[14 + a..14 + a + 4].copy_from_slice(&addr);
    expected[24..26].copy_from_slice(&ip[10..12]);
    expected[34 + p..36 + p].copy_from_slice(&port.to_be_bytes());
    let c = match proto {
        ICMP => 2,
        UDP => 6,
        _ => 16,
    };
    expected[34 + c..36 + c].copy_from_slice(&ip[20 + c..22 + c]);
    assert_eq!(out, &expected[..], "nothing else changed");
    port
}

/// A pod's packet to the outside host as it leaves the uplink.
fn pod_out(proto: u8, seg: &[u8]) -> Vec<u8> {
    wire_frame(&ipv4(POD_A, OUTSIDE, 63, proto, seg))
}

/// The outside host's reply to the node, on `port`.
fn reply_in(proto: u8, port: u16, data: &[u8]) -> Vec<u8> {
    let seg = match proto {
        TCP => tcp(OUTSIDE, NODE_A, 80, port, 0x12, data),
        UDP => udp_checked(OUTSIDE, NODE_A, 53, port, data),
        _ => icmp(0, 0, [(port >> 8) as u8, port as u8, 0, 7], data),
    };
    wire_frame(&ipv4(OUTSIDE, NODE_A, 60, proto, &seg))
}

fn in_range(p: u16) -> bool {
    (NAT_PORTS.0..=NAT_PORTS.1).contains(&p)
}

#[test]
fn masquerade_rewrites_tcp_udp_and_icmp_echo_both_ways() {
    let mut a = masq_node(1024, true);
    let data = payload(120);
    let cases = [
        (TCP, tcp(POD_A, OUTSIDE, POD_PORT, 80, 0x02, &data)),
        (UDP, udp_checked(POD_A, OUTSIDE, POD_PORT, 53, &data)),
        // A UDP checksum of zero (none) stays zero.
        (UDP, udp(POD_PORT + 1, 53, &data)),
        (
            ICMP,
            icmp(8, 0, [(POD_PORT >> 8) as u8, POD_PORT as u8, 0, 7], &data),
        ),
    ];
    for (i, (proto, seg)) in cases.iter().enumerate() {
        let input = pod_out(*proto, seg);
        let (ret, out) = run_tc(&mut a, prog_name::TO_WIRE, &input);
        assert_eq!(ret, TC_ACT_OK, "case {i}");
        let port = assert_translated(&input, &out, false, NODE_A, in_range);
        if seg[6..8] == [0, 0] && *proto == UDP {
            assert_eq!(out[40..42], [0, 0], "case {i}: no UDP checksum stays none");
        }
        // The same flow keeps its port.
        let (_, again) = run_tc(&mut a, prog_name::TO_WIRE, &input);
        assert_eq!(again, out, "case {i}: same flow, same translation");
        // The reply goes back to the pod.
        let reply = reply_in(*proto, port, &data);
        let (ret, back) = run_tc(&mut a, prog_name::FROM_WIRE, &reply);
        assert_eq!(ret, TC_ACT_OK, "case {i}");
        let pod_port = u16::from_be_bytes([seg[0], seg[1]]);
        let want = if *proto == ICMP { POD_PORT } else { pod_port };
        assert_translated(&reply, &back, true, POD_A, |p| p == want);
    }
    assert_eq!(counted(&a, reason::NAT_SNAT), 8);
    assert_eq!(counted(&a, reason::NAT_REVERSE), 4);
    let entries = a.nat_entries().unwrap();
    assert_eq!(entries.len(), 8, "two entries per flow");
    for (k, e) in &entries {
        if k.dir == nat::INGRESS {
            assert_ne!(e.flags & nat::SEEN_REPLY, 0, "{k:?}: reply seen");
            assert_eq!(e.addr, POD_A);
        } else {
            assert_eq!(e.addr, NODE_A);
        }
    }
}

/// The outside host's port that `reply_in` answers from.
fn remote_port(proto: u8) -> u16 {
    if proto == TCP { 80 } else { 53 }
}

/// The one's complement sum of `a` and `b`, folded.
fn ones_add(a: u16, b: u16) -> u16 {
    let s = u32::from(a) + u32::from(b);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// The sum (not complemented) of the pseudo-header of the L4 segment of `ip`: what a stack that
/// leaves its checksum to the device puts in the checksum field.
fn pseudo_sum(ip: &[u8]) -> u16 {
    let len = u16::from_be_bytes([ip[2], ip[3]]) - 20;
    [
        u16::from_be_bytes([ip[12], ip[13]]),
        u16::from_be_bytes([ip[14], ip[15]]),
        u16::from_be_bytes([ip[16], ip[17]]),
        u16::from_be_bytes([ip[18], ip[19]]),
        u16::from(ip[9]),
        len,
    ]
    .into_iter()
    .fold(0, ones_add)
}

/// A pod's segment of `proto` to the outside whose valid checksum equals its pseudo-header's sum,
/// as a partially offloaded one would hold: two payload bytes are chosen for it.
fn looks_partial(proto: u8, sport: u16) -> Vec<u8> {
    let build = |w: [u8; 2]| {
        let mut data = payload(64);
        data[..2].copy_from_slice(&w);
        let seg = if proto == TCP {
            tcp(POD_A, OUTSIDE, sport, remote_port(proto), 0x10, &data)
        } else {
            udp_checked(POD_A, OUTSIDE, sport, remote_port(proto), &data)
        };
        ipv4(POD_A, OUTSIDE, 63, proto, &seg)
    };
    let c = if proto == TCP { 16 } else { 6 };
    let zero = build([0; 2]);
    // The checksum is ~(S + w): for it to be the pseudo-header's sum P, w = ~P - S = ~P + ~S.
    let not_s = u16::from_be_bytes([zero[20 + c], zero[21 + c]]);
    let w = ones_add(!pseudo_sum(&zero), not_s);
    let ip = build(w.to_be_bytes());
    assert!(l4_csum_ok(&ip));
    // One's complement has two zeros: 0x0000 and 0xffff.
    let zero = |x: u16| if x == 0xffff { 0 } else { x };
    let (field, pseudo) = (
        u16::from_be_bytes([ip[20 + c], ip[21 + c]]),
        pseudo_sum(&ip),
    );
    assert_eq!(
        zero(field),
        zero(pseudo),
        "the crafted checksum field is the pseudo-header's sum"
    );
    wire_frame(&ip)
}

/// TCP and UDP checksums are updated right whichever way the programs take: without a helper
/// (a complete checksum at the egress), with one helper whose result tells complete from partial
/// (a field that looks partial, a GSO packet, every reply at the ingress). Test runs' skbs hold
/// complete checksums; the e2e test `masqueraded_checksums_hold_with_and_without_offload` covers
/// partial ones.
#[test]
fn masquerade_updates_checksums_on_every_path() {
    let mut a = masq_node(1024, true);
    let data = payload(200);
    for (i, proto) in [TCP, UDP].into_iter().enumerate() {
        let sport = POD_PORT + 10 * i as u16;
        let cases = [
            (
                "complete",
                pod_out(
                    proto,
                    &if proto == TCP {
                        tcp(POD_A, OUTSIDE, sport, remote_port(proto), 0x10, &data)
                    } else {
                        udp_checked(POD_A, OUTSIDE, sport, remote_port(proto), &data)
                    },
                ),
                0,
            ),
            ("looks partial", looks_partial(proto, sport + 1), 0),
            (
                "GSO",
                pod_out(
                    proto,
                    &if proto == TCP {
                        tcp(POD_A, OUTSIDE, sport + 2, remote_port(proto), 0x10, &data)
                    } else {
                        udp_checked(POD_A, OUTSIDE, sport + 2, remote_port(proto), &data)
                    },
                ),
                100,
            ),
        ];
        for (what, input, gso) in cases {
            let (ret, out) = if gso == 0 {
                run_tc(&mut a, prog_name::TO_WIRE, &input)
            } else {
                run_tc_segments(&mut a, prog_name::TO_WIRE, &input, gso, 2)
            };
            assert_eq!(ret, TC_ACT_OK, "{proto} {what}");
            let port = assert_translated(&input, &out, false, NODE_A, in_range);
            // The reply, whose checksum also looks partial once it is translated back.
            let reply = reply_in(proto, port, &data);
            let (ret, back) = run_tc(&mut a, prog_name::FROM_WIRE, &reply);
            assert_eq!(ret, TC_ACT_OK, "{proto} {what}: reply");
            let pod_port = u16::from_be_bytes([input[34], input[35]]);
            assert_translated(&reply, &back, true, POD_A, |p| p == pod_port);
        }
    }
    assert_eq!(counted(&a, reason::NAT_SNAT), 6);
    assert_eq!(counted(&a, reason::NAT_REVERSE), 6);
}

/// At a pod's veth, a pod's packet leaving the Network goes on to the bridge untouched
/// (`pass_not_overlay`) unless the shortcut can take it: UDP, its flow masqueraded already, and
/// the kernel's FIB routing it out of the uplink. In test-run the FIB never routes to the
/// configured uplink, so even an established UDP flow's packet must come out unchanged (its TTL
/// too: decremented only once the shortcut is taken); the other cases are refused before.
#[test]
fn the_pod_veth_shortcut_leaves_what_it_does_not_take_untouched() {
    let mut a = masq_node(1024, true);
    let data = payload(64);
    let udp_flow = pod_out(UDP, &udp_checked(POD_A, OUTSIDE, POD_PORT, 53, &data));
    let tcp_flow = pod_out(TCP, &tcp(POD_A, OUTSIDE, POD_PORT, 80, 0x10, &data));
    let expiring = wire_frame(&ipv4(
        POD_A,
        OUTSIDE,
        1,
        UDP,
        &udp_checked(POD_A, OUTSIDE, POD_PORT, 53, &data),
    ));
    let new_flow = pod_out(UDP, &udp_checked(POD_A, OUTSIDE, POD_PORT + 1, 53, &data));
    // Both flows masqueraded once, as the stack's path does.
    for input in [&udp_flow, &tcp_flow] {
        assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, input).0, TC_ACT_OK);
    }
    assert_eq!(counted(&a, reason::NAT_SNAT), 2);
    for (what, input) in [
        ("established UDP", &udp_flow),
        ("TCP", &tcp_flow),
        ("TTL 1", &expiring),
        ("no flow yet", &new_flow),
    ] {
        let before = counted(&a, reason::PASS_NOT_OVERLAY);
        let (ret, out) = run_tc(&mut a, prog_name::FROM_POD_VETH, input);
        assert_eq!(ret, TC_ACT_OK, "{what}");
        assert_eq!(&out, input, "{what}: unchanged");
        assert_eq!(counted(&a, reason::PASS_NOT_OVERLAY), before + 1, "{what}");
    }
    assert_eq!(counted(&a, reason::NAT_FORWARD), 0);
}

/// Flows are stamped with `CLOCK_MONOTONIC` (coarse, read once per tick and CPU through
/// `FLANNEL_CLOCK`), and a packet more than [`nat::TOUCH_NS`] later refreshes the stamp.
#[test]
fn masquerade_stamps_flows_with_the_monotonic_clock() {
    let mut a = masq_node(1024, true);
    let input = pod_out(
        UDP,
        &udp_checked(POD_A, OUTSIDE, POD_PORT, 53, &payload(40)),
    );
    let stamp = |a: &EbpfDataplane| {
        a.nat_entries()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.dir == nat::EGRESS)
            .map(|(_, e)| e.last_seen)
            .max()
            .unwrap()
    };
    // The coarse clock is up to a tick behind, a CPU's cached reading up to one more.
    let lag = Duration::from_millis(25).as_nanos() as u64;
    let mut last = 0;
    for round in 0..2 {
        let before = monotonic_ns();
        let (ret, _) = run_tc(&mut a, prog_name::TO_WIRE, &input);
        let after = monotonic_ns();
        assert_eq!(ret, TC_ACT_OK);
        let t = stamp(&a);
        assert!(
            t <= after && t + lag >= before && t > last,
            "round {round}: stamped {t}, between {before} and {after}, after {last}"
        );
        last = t;
        std::thread::sleep(Duration::from_nanos(nat::TOUCH_NS) + Duration::from_millis(200));
    }
}

#[test]
fn masquerade_leaves_flanneld_return_cases_alone() {
    let mut a = masq_node(1024, true);
    let data = payload(40);
    let untouched = [
        // Pod to a pod of another node (rules 2, 3): inside the Network.
        ipv4(POD_A, POD_B, 63, TCP, &tcp(POD_A, POD_B, 1, 2, 0x10, &data)),
        // To multicast (rule 5's exception).
        ipv4(POD_A, [239, 1, 2, 3], 63, UDP, &udp(1, 2, &data)),
        // Not from the Network: the node's own and forwarded traffic.
        ipv4(
            [198, 18, 0, 99],
            OUTSIDE,
            63,
            TCP,
            &tcp([198, 18, 0, 99], OUTSIDE, 1, 2, 0x10, &data),
        ),
    ];
    for (i, ip) in untouched.iter().enumerate() {
        let input = wire_frame(ip);
        let (ret, out) = run_tc(&mut a, prog_name::TO_WIRE, &input);
        assert_eq!((ret, out), (TC_ACT_OK, input), "case {i}");
    }
    assert_eq!(counted(&a, reason::PASS_NO_MASQ), 3);
    // The node's own flow on a port outside the range: untouched, not claimed.
    let own = wire_frame(&ipv4(
        NODE_A,
        OUTSIDE,
        64,
        TCP,
        &tcp(NODE_A, OUTSIDE, 40_000, 80, 0x10, &data),
    ));
    assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &own), (TC_ACT_OK, own));
    // A reply for no flow of ours: untouched.
    let stray = reply_in(TCP, NAT_PORTS.0 + 5, &data);
    assert_eq!(
        run_tc(&mut a, prog_name::FROM_WIRE, &stray),
        (TC_ACT_OK, stray)
    );
    assert!(a.nat_entries().unwrap().is_empty());
    // Without masquerade nothing is rewritten, even from a pod to the outside.
    let mut plain = node_a();
    let input = pod_out(TCP, &tcp(POD_A, OUTSIDE, POD_PORT, 80, 0x02, &data));
    assert_eq!(
        run_tc(&mut plain, prog_name::TO_WIRE, &input),
        (TC_ACT_OK, input)
    );
}

#[test]
fn masquerade_drops_what_it_cannot_translate_with_a_reason() {
    let mut a = masq_node(1024, true);
    let data = payload(40);
    // GRE from a pod: no port to translate; sending it with the pod's address would leak it.
    let gre = pod_out(47, &data);
    assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &gre).0, TC_ACT_SHOT);
    assert_eq!(counted(&a, reason::DROP_NAT_PROTO), 1);
    // A fragment.
    let mut frag = pod_out(UDP, &udp_checked(POD_A, OUTSIDE, POD_PORT, 53, &data));
    frag[20] = 0x20; // MF
    fix_ipv4_csum(&mut frag, 14);
    assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &frag).0, TC_ACT_SHOT);
    assert_eq!(counted(&a, reason::DROP_NAT_FRAGMENT), 1);
    // An echo reply of the pod's own (no flow starts with a reply).
    let reply = pod_out(ICMP, &icmp(0, 0, [0, 9, 0, 1], &data));
    assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &reply).0, TC_ACT_SHOT);
    assert_eq!(counted(&a, reason::DROP_NAT_PROTO), 2);
    assert!(a.nat_entries().unwrap().is_empty());
}

/// An ICMP error from the outside host to the node about `quoted` (an IPv4 packet the node sent).
fn icmp_error_in(kind: u8, code: u8, rest: [u8; 4], quoted: &[u8]) -> Vec<u8> {
    wire_frame(&ipv4(
        OUTSIDE,
        NODE_A,
        60,
        ICMP,
        &icmp(kind, code, rest, quoted),
    ))
}

#[test]
fn icmp_errors_about_masqueraded_flows_are_rewritten_both_ways() {
    let mut a = masq_node(1024, true);
    let data = payload(64);
    // A UDP flow and a TCP flow leave masqueraded.
    let udp_seg = udp_checked(POD_A, OUTSIDE, POD_PORT, 53, &data);
    let (_, udp_out) = run_tc(&mut a, prog_name::TO_WIRE, &pod_out(UDP, &udp_seg));
    let tcp_seg = tcp(POD_A, OUTSIDE, POD_PORT + 1, 80, 0x10, &data);
    let (_, tcp_out) = run_tc(&mut a, prog_name::TO_WIRE, &pod_out(TCP, &tcp_seg));
    let udp_port = port_at(&udp_out[14..], 0);
    let tcp_port = port_at(&tcp_out[14..], 0);
    // Port unreachable quoting the whole translated datagram, and fragmentation-needed quoting
    // the TCP header (28 bytes: past TCP's checksum).
    let cases = [
        (3, 3, [0; 4], udp_out[14..].to_vec(), POD_PORT, udp_seg, UDP),
        (
            3,
            4,
            [0, 0, 0x05, 0xaa],
            tcp_out[14..14 + 20 + 28].to_vec(),
            POD_PORT + 1,
            tcp_seg,
            TCP,
        ),
    ];
    for (kind, code, rest, quoted, pod_port, seg, proto) in cases {
        let input = icmp_error_in(kind, code, rest, &quoted);
        let (ret, out) = run_tc(&mut a, prog_name::FROM_WIRE, &input);
        assert_eq!(ret, TC_ACT_OK);
        let ip = &out[14..];
        assert_eq!(ip[16..20], POD_A, "outer destination: the pod");
        assert_eq!(csum(&ip[..20]), 0, "outer IPv4 checksum");
        assert_eq!(csum(&ip[20..]), 0, "ICMP checksum over the rewritten quote");
        assert_eq!(
            ip[20..28],
            input[34..42][..8]
                .iter()
                .copied()
                .enumerate()
                .map(|(i, b)| if (2..4).contains(&i) { ip[20 + i] } else { b })
                .collect::<Vec<_>>()[..],
            "type, code, rest kept"
        );
        let emb = &ip[28..];
        assert_eq!(emb[12..16], POD_A, "quoted source: the pod");
        assert_eq!(csum(&emb[..20]), 0, "quoted IPv4 checksum");
        assert_eq!(port_at(emb, 0), pod_port, "quoted source port: the pod's");
        // The quoted L4 checksum is the one the pod's original packet carried.
        let c = if proto == UDP { 6 } else { 16 };
        assert_eq!(
            emb[20 + c..22 + c],
            seg[c..c + 2],
            "quoted L4 checksum restored"
        );
    }
    assert_eq!(counted(&a, reason::NAT_ICMP_ERROR), 2);
    let _ = (udp_port, tcp_port);

    // The other way: the pod reports port unreachable about the outside's reply.
    let reply = reply_in(UDP, udp_port, &data);
    let (_, reply_to_pod) = run_tc(&mut a, prog_name::FROM_WIRE, &reply);
    let quoted = reply_to_pod[14..].to_vec();
    let err = wire_frame(&ipv4(
        POD_A,
        OUTSIDE,
        63,
        ICMP,
        &icmp(3, 3, [0; 4], &quoted),
    ));
    let (ret, out) = run_tc(&mut a, prog_name::TO_WIRE, &err);
    assert_eq!(ret, TC_ACT_OK);
    let ip = &out[14..];
    assert_eq!(ip[12..16], NODE_A, "outer source: the node");
    assert_eq!(csum(&ip[..20]), 0);
    assert_eq!(csum(&ip[20..]), 0);
    let emb = &ip[28..];
    assert_eq!(emb[16..20], NODE_A, "quoted destination: the node");
    assert_eq!(
        port_at(emb, 2),
        udp_port,
        "quoted destination port: the allocated one"
    );
    assert!(
        l4_csum_ok(emb),
        "the quote is the outside's packet as it sent it"
    );
    assert_eq!(emb, &reply[14..], "byte for byte");
    // An error about no flow of ours is left to the node.
    let stranger = icmp_error_in(
        3,
        3,
        [0; 4],
        &ipv4(NODE_A, OUTSIDE, 64, UDP, &udp(NAT_PORTS.1, 53, &data)),
    );
    assert_eq!(
        run_tc(&mut a, prog_name::FROM_WIRE, &stranger),
        (TC_ACT_OK, stranger)
    );
}

#[test]
fn masquerade_table_full_and_port_exhaustion_fail_closed() {
    // 8 entries: four flows.
    let mut a = masq_node(8, true);
    let data = payload(10);
    let flow = |sport: u16| pod_out(UDP, &udp_checked(POD_A, OUTSIDE, sport, 53, &data));
    let mut established = Vec::new();
    for sport in 0..4 {
        let (ret, out) = run_tc(&mut a, prog_name::TO_WIRE, &flow(1000 + sport));
        assert_eq!(ret, TC_ACT_OK);
        established.push(out);
    }
    let (ret, _) = run_tc(&mut a, prog_name::TO_WIRE, &flow(2000));
    assert_eq!(ret, TC_ACT_SHOT, "a new flow fails when the table is full");
    assert_eq!(counted(&a, reason::DROP_NAT_TABLE_FULL), 1);
    for (sport, out) in established.iter().enumerate() {
        let (ret, again) = run_tc(&mut a, prog_name::TO_WIRE, &flow(1000 + sport as u16));
        assert_eq!(
            (ret, &again),
            (TC_ACT_OK, out),
            "established flows keep working"
        );
    }
    assert_eq!(a.nat_entries().unwrap().len(), 8);

    // Ports: 100 in the range; the 101st flow to the same endpoint finds none, while another
    // endpoint still gets ports (they are unique per remote endpoint).
    let mut b = masq_node(1024, false);
    let mut seen = std::collections::BTreeSet::new();
    for sport in 0..100u16 {
        let (ret, out) = run_tc(&mut b, prog_name::TO_WIRE, &flow(1000 + sport));
        assert_eq!(ret, TC_ACT_OK, "flow {sport}");
        assert!(
            seen.insert(port_at(&out[14..], 0)),
            "no two flows share a port"
        );
    }
    assert_eq!(seen.len(), 100);
    let (ret, _) = run_tc(&mut b, prog_name::TO_WIRE, &flow(5000));
    assert_eq!(ret, TC_ACT_SHOT);
    assert_eq!(counted(&b, reason::DROP_NAT_NO_PORT), 1);
    let other = pod_out(UDP, &udp_checked(POD_A, OUTSIDE, 5000, 54, &data));
    assert_eq!(run_tc(&mut b, prog_name::TO_WIRE, &other).0, TC_ACT_OK);
}

#[test]
fn the_nodes_own_ports_in_the_range_are_never_given_to_pods() {
    let mut a = masq_node(1024, false);
    let data = payload(10);
    // The node itself talks to OUTSIDE:80 from every port of the range but the last.
    for port in NAT_PORTS.0..NAT_PORTS.1 {
        let own = wire_frame(&ipv4(
            NODE_A,
            OUTSIDE,
            64,
            TCP,
            &tcp(NODE_A, OUTSIDE, port, 80, 0x10, &data),
        ));
        assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &own), (TC_ACT_OK, own));
    }
    assert_eq!(
        counted(&a, reason::PASS_NAT_HOST),
        u64::from(NAT_PORTS.1 - NAT_PORTS.0)
    );
    // A pod's flow to the same endpoint gets the one port left.
    let input = pod_out(TCP, &tcp(POD_A, OUTSIDE, POD_PORT, 80, 0x02, &data));
    let (ret, out) = run_tc(&mut a, prog_name::TO_WIRE, &input);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(port_at(&out[14..], 0), NAT_PORTS.1);
    // Replies to the node's own ports reach the node untouched.
    let to_node = reply_in(TCP, NAT_PORTS.0, &data);
    assert_eq!(
        run_tc(&mut a, prog_name::FROM_WIRE, &to_node),
        (TC_ACT_OK, to_node)
    );
}

#[test]
fn expired_masquerade_flows_are_collected() {
    let mut a = masq_node(1024, true);
    let data = payload(10);
    let timeouts = NatTimeouts {
        tcp_established: Duration::from_hours(1),
        udp_replied: Duration::from_mins(2),
        other: Duration::from_secs(30),
    };
    // An established TCP flow, a TCP flow reset by the outside, and a one-way UDP flow.
    let (_, est) = run_tc(
        &mut a,
        prog_name::TO_WIRE,
        &pod_out(TCP, &tcp(POD_A, OUTSIDE, 1, 80, 0x02, &data)),
    );
    run_tc(
        &mut a,
        prog_name::FROM_WIRE,
        &reply_in(TCP, port_at(&est[14..], 0), &data),
    );
    let (_, rst) = run_tc(
        &mut a,
        prog_name::TO_WIRE,
        &pod_out(TCP, &tcp(POD_A, OUTSIDE, 2, 80, 0x02, &data)),
    );
    let rst_port = port_at(&rst[14..], 0);
    let reset = wire_frame(&ipv4(
        OUTSIDE,
        NODE_A,
        60,
        TCP,
        &tcp(OUTSIDE, NODE_A, 80, rst_port, 0x14, &[]),
    ));
    run_tc(&mut a, prog_name::FROM_WIRE, &reset);
    run_tc(
        &mut a,
        prog_name::TO_WIRE,
        &pod_out(UDP, &udp_checked(POD_A, OUTSIDE, 3, 53, &data)),
    );
    assert_eq!(a.nat_entries().unwrap().len(), 6);
    let newest = a
        .nat_entries()
        .unwrap()
        .iter()
        .map(|(_, e)| e.last_seen)
        .max()
        .unwrap();
    let at = |secs: u64| newest + secs * 1_000_000_000;
    // 5 s later nothing has expired.
    assert_eq!(a.collect_nat(&timeouts, at(5)).unwrap().removed, 0);
    // After 11 s the reset flow is gone (10 s), after 31 s the one-way UDP flow (30 s).
    assert_eq!(a.collect_nat(&timeouts, at(11)).unwrap().removed, 2);
    assert_eq!(a.collect_nat(&timeouts, at(31)).unwrap().removed, 2);
    let left: Vec<(NatKey, NatEntry)> = a.nat_entries().unwrap();
    assert_eq!(left.len(), 2);
    assert!(
        left.iter()
            .all(|(k, _)| k.proto == TCP && k.dst != NODE_A || k.sport == [0, 80])
    );
    // The established one lasts its timeout.
    assert_eq!(a.collect_nat(&timeouts, at(3599)).unwrap().removed, 0);
    assert_eq!(a.collect_nat(&timeouts, at(3601)).unwrap().removed, 2);
    assert!(a.nat_entries().unwrap().is_empty());
}

#[test]
fn fuzz_masquerade_counts_every_packet_and_keeps_checksums_valid() {
    let mut a = masq_node(4096, true);
    let mut rng = Rng(0x7f4a_7c15_9e37_79b9);
    let data = payload(80);
    let seeds = [
        pod_out(TCP, &tcp(POD_A, OUTSIDE, POD_PORT, 80, 0x02, &data)),
        pod_out(UDP, &udp_checked(POD_A, OUTSIDE, POD_PORT, 53, &data)),
        pod_out(ICMP, &icmp(8, 0, [0, 1, 0, 1], &data)),
        icmp_error_in(
            3,
            4,
            [0, 0, 5, 0xaa],
            &ipv4(
                NODE_A,
                OUTSIDE,
                64,
                TCP,
                &tcp(NODE_A, OUTSIDE, NAT_PORTS.0, 80, 0x10, &[]),
            ),
        ),
    ];
    for i in 0..4000u64 {
        let seed = &seeds[(i % 4) as usize];
        let input = if i % 8 < 4 {
            seed.clone()
        } else {
            mutate(&mut rng, seed)
        };
        for prog in [prog_name::TO_WIRE, prog_name::FROM_WIRE] {
            let before = total_counted(&a);
            let (ret, out) = run_tc(&mut a, prog, &input);
            assert_eq!(
                total_counted(&a),
                before + 1,
                "run {i} {prog}: counted once"
            );
            let valid_in = input.len() > 34 && csum(&input[14..34]) == 0;
            match ret {
                TC_ACT_OK if out == input => {}
                TC_ACT_OK => {
                    assert_eq!(
                        out.len(),
                        input.len(),
                        "run {i} {prog}: NAT keeps the length"
                    );
                    if valid_in {
                        assert_eq!(csum(&out[14..34]), 0, "run {i} {prog}: IPv4 checksum");
                    }
                    let ip = &out[14..];
                    if valid_in && ip[9] != ICMP && (ip[0] == 0x45) && l4_csum_ok(&input[14..]) {
                        assert!(l4_csum_ok(ip), "run {i} {prog}: L4 checksum");
                    }
                }
                TC_ACT_SHOT | TC_ACT_REDIRECT => {}
                other => panic!("run {i} {prog}: verdict {other}"),
            }
        }
    }
}

#[test]
fn counters_tell_the_programs_apart() {
    let mut a = node_b();
    // The same malformed IPv4 header (version 6 in an IPv4 frame) from a pod and off the wire.
    let mut bad = pod_frame(POD_A, 64, 100);
    bad[14] = 0x65;
    assert_eq!(run_tc(&mut a, prog_name::FROM_PODS, &bad).0, TC_ACT_SHOT);
    let mut bad_wire = vxlan_frame(
        NODE_A,
        VNI,
        VTEP_B,
        &ipv4(POD_A, POD_B, 64, 6, &payload(10)),
    );
    bad_wire[14 + 50 + 14] = 0x65;
    assert_eq!(
        run_tc(&mut a, prog_name::FROM_WIRE, &bad_wire).0,
        TC_ACT_SHOT
    );
    let by_program = sum_stats_by_program(a.ebpf()).unwrap();
    let packets = |program: &str, reason: &str| {
        by_program
            .iter()
            .find(|c| c.program == program && c.reason == reason)
            .map_or(0, |c| c.counter.packets)
    };
    assert_eq!(packets("from_pods", "drop_bad_ipv4"), 1);
    assert_eq!(packets("from_wire", "drop_bad_ipv4"), 1);
    assert_eq!(packets("from_host", "drop_bad_ipv4"), 0);
    assert_eq!(
        counted(&a, reason::DROP_BAD_IPV4),
        2,
        "totals sum the programs"
    );
}

#[test]
fn configuration_changes_are_double_buffered() {
    let mut a = node_a();
    let first = a.config().unwrap();
    let slot = a.config_slot().unwrap();
    // A new configuration (another public IP) lands in the other slot and is then in force:
    // the programs encapsulate from the new address at once.
    let mut next = first;
    next.public_ip = [198, 18, 0, 99];
    a.set_config(&next).unwrap();
    assert_eq!(
        a.config_slot().unwrap(),
        1 - slot,
        "the other slot is selected"
    );
    assert_eq!(a.config().unwrap(), next);
    let (ret, out) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 100));
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(
        out[26..30],
        [198, 18, 0, 99],
        "outer source from the new configuration"
    );
    // And back: the selector flips again, the slot written last is the one in force.
    a.set_config(&first).unwrap();
    assert_eq!(a.config_slot().unwrap(), slot);
    let (_, out) = run_tc(&mut a, prog_name::FROM_PODS, &pod_frame(POD_B, 64, 100));
    assert_eq!(out[26..30], NODE_A);
}

#[test]
fn outer_lengths_are_checked_before_decapsulation() {
    let mut b = node_b();
    let good = vxlan_frame(
        NODE_A,
        VNI,
        VTEP_B,
        &ipv4(POD_A, POD_B, 63, 6, &payload(100)),
    );
    // Ethernet padding after a valid packet is fine.
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 10]);
    assert_eq!(
        run_tc(&mut b, prog_name::FROM_WIRE, &padded).0,
        TC_ACT_REDIRECT
    );
    let with_tot_len = |tot: u16| {
        let mut f = good.clone();
        f[16..18].copy_from_slice(&tot.to_be_bytes());
        fix_ipv4_csum(&mut f, 14);
        f
    };
    let with_udp_len = |len: u16| {
        let mut f = good.clone();
        f[38..40].copy_from_slice(&len.to_be_bytes());
        f
    };
    let actual = (good.len() - 14) as u16;
    let cases = [
        ("total length beyond the packet", with_tot_len(actual + 1)),
        (
            "total length without room for the headers",
            with_tot_len(20 + 8 + 8 + 14 + 19),
        ),
        (
            "UDP length beyond the IP payload",
            with_udp_len(actual - 20 + 1),
        ),
        (
            "UDP length without room for the headers",
            with_udp_len(8 + 8 + 14 + 19),
        ),
    ];
    for (what, frame) in &cases {
        let before = counted(&b, reason::DROP_BAD_OUTER);
        assert_eq!(
            run_tc(&mut b, prog_name::FROM_WIRE, frame).0,
            TC_ACT_SHOT,
            "{what}"
        );
        assert_eq!(counted(&b, reason::DROP_BAD_OUTER), before + 1, "{what}");
        assert_eq!(run_xdp(&mut b, frame).0, XDP_DROP, "{what} (XDP)");
    }
}

#[test]
fn a_closed_or_long_idle_flow_gives_its_port_to_a_new_flow() {
    let mut a = masq_node(1024, true);
    // One port in the range: every flow to OUTSIDE:80 competes for it.
    let mut cfg = a.config().unwrap();
    cfg.nat_port_max = cfg.nat_port_min;
    a.set_config(&cfg).unwrap();
    let data = payload(10);
    let syn = |sport: u16| pod_out(TCP, &tcp(POD_A, OUTSIDE, sport, 80, 0x02, &data));
    let reply = |flags: u8| {
        wire_frame(&ipv4(
            OUTSIDE,
            NODE_A,
            60,
            TCP,
            &tcp(OUTSIDE, NODE_A, 80, NAT_PORTS.0, flags, &[]),
        ))
    };
    assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &syn(1)).0, TC_ACT_OK);
    run_tc(&mut a, prog_name::FROM_WIRE, &reply(0x12));
    // An open flow keeps its port.
    assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &syn(2)).0, TC_ACT_SHOT);
    assert_eq!(counted(&a, reason::DROP_NAT_NO_PORT), 1);
    // Closed by a FIN each way: the port is free again once the remote end's TIME_WAIT (60 s)
    // is over.
    let fin = pod_out(TCP, &tcp(POD_A, OUTSIDE, 1, 80, 0x11, &[]));
    run_tc(&mut a, prog_name::TO_WIRE, &fin);
    run_tc(&mut a, prog_name::FROM_WIRE, &reply(0x11));
    assert_eq!(
        run_tc(&mut a, prog_name::TO_WIRE, &syn(2)).0,
        TC_ACT_SHOT,
        "not at once"
    );
    age_nat_entries(&mut a, 50);
    assert_eq!(
        run_tc(&mut a, prog_name::TO_WIRE, &syn(2)).0,
        TC_ACT_SHOT,
        "not within 60 s"
    );
    age_nat_entries(&mut a, 11);
    let (ret, out) = run_tc(&mut a, prog_name::TO_WIRE, &syn(2));
    assert_eq!(ret, TC_ACT_OK, "the closed flow's port is taken over");
    assert_eq!(port_at(&out[14..], 0), NAT_PORTS.0);
    let entries = a.nat_entries().unwrap();
    assert_eq!(entries.len(), 2, "the old flow is gone: {entries:?}");
    assert!(
        entries
            .iter()
            .all(|(k, e)| k.sport == 2u16.to_be_bytes() || e.port == 2u16.to_be_bytes())
    );
    // The reply now reaches the new flow's pod port.
    let (_, back) = run_tc(&mut a, prog_name::FROM_WIRE, &reply(0x12));
    assert_eq!(port_at(&back[14..], 2), 2);
    // Reset by the outside: free at once.
    run_tc(&mut a, prog_name::FROM_WIRE, &reply(0x14));
    assert_eq!(run_tc(&mut a, prog_name::TO_WIRE, &syn(3)).0, TC_ACT_OK);
    // A UDP flow idle for 30 s gives its port up; one idle for less keeps it.
    let udp_flow = |sport: u16| pod_out(UDP, &udp_checked(POD_A, OUTSIDE, sport, 53, &data));
    assert_eq!(
        run_tc(&mut a, prog_name::TO_WIRE, &udp_flow(10)).0,
        TC_ACT_OK
    );
    assert_eq!(
        run_tc(&mut a, prog_name::TO_WIRE, &udp_flow(11)).0,
        TC_ACT_SHOT
    );
    age_nat_entries(&mut a, 31);
    assert_eq!(
        run_tc(&mut a, prog_name::TO_WIRE, &udp_flow(11)).0,
        TC_ACT_OK
    );
}

/// Makes every masquerade entry `secs` older.
fn age_nat_entries(dp: &mut EbpfDataplane, secs: u64) {
    let entries = dp.nat_entries().unwrap();
    let map = dp.ebpf_mut().map_mut("FLANNEL_NAT").unwrap();
    let mut table: aya::maps::HashMap<_, NatKey, NatEntry> =
        aya::maps::HashMap::try_from(map).unwrap();
    for (k, mut e) in entries {
        e.last_seen = e.last_seen.saturating_sub(secs * 1_000_000_000);
        table.insert(k, e, 0).unwrap();
    }
}

#[test]
fn the_backends_own_port_is_never_allocated() {
    let mut a = masq_node(1024, false);
    // A range of two ports, one of them VXLAN's: every flow gets the other one or none.
    let mut cfg = a.config().unwrap();
    (cfg.nat_port_min, cfg.nat_port_max) = (PORT, PORT + 1);
    a.set_config(&cfg).unwrap();
    let data = payload(10);
    let (ret, out) = run_tc(
        &mut a,
        prog_name::TO_WIRE,
        &pod_out(UDP, &udp_checked(POD_A, OUTSIDE, 1, 53, &data)),
    );
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(port_at(&out[14..], 0), PORT + 1);
    let (ret, _) = run_tc(
        &mut a,
        prog_name::TO_WIRE,
        &pod_out(UDP, &udp_checked(POD_A, OUTSIDE, 2, 53, &data)),
    );
    assert_eq!(ret, TC_ACT_SHOT, "VXLAN's port is not handed out");
    assert_eq!(counted(&a, reason::DROP_NAT_NO_PORT), 1);
}
