//! Per-packet cost of each program on a representative packet, from `BPF_PROG_TEST_RUN`.
//!
//! `repeat > 1` re-runs a program on the buffer its previous run modified (after one
//! encapsulation the packet is no longer a pod's), so each call runs once and the kernel's own
//! timing of that run is collected; every verdict is checked so that the intended path is timed.
use anyhow::{Result, ensure};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use flannel_agent::dataplane::{Desired, ebpf::EbpfDataplane};
use flannel_ebpf_common::{Endpoint, RemoteNode, RemoteSubnet, backend, prog_name};
use flannel_tests::packet::{
    NODE_A, NODE_B, POD_A, POD_B, UPLINK_MAC_B, VNI, VTEP_A, VTEP_B, config, config_for, eth,
    ipip_frame, ipv4, payload, pod_frame, udp_frame, vxlan_frame,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;

pub struct Cost {
    pub name: &'static str,
    pub median_ns: f64,
    pub p90_ns: f64,
}

fn node(
    cfg: &flannel_ebpf_common::NodeConfig,
    peer_subnet: &str,
    peer: [u8; 4],
    peer_vtep: [u8; 6],
) -> Result<EbpfDataplane> {
    node_via(cfg, peer_subnet, peer, peer_vtep, backend::VXLAN)
}

fn node_via(
    cfg: &flannel_ebpf_common::NodeConfig,
    peer_subnet: &str,
    peer: [u8; 4],
    peer_vtep: [u8; 6],
    kind: u8,
) -> Result<EbpfDataplane> {
    let mut dp = EbpfDataplane::unpinned()?;
    dp.set_config(cfg)?;
    let mut d = Desired::default();
    d.routes.insert(
        peer_subnet.parse()?,
        RemoteSubnet {
            public_ip: peer,
            vtep_mac: peer_vtep,
            backend: kind,
            _pad0: 0,
        },
    );
    d.nodes.insert(
        peer.into(),
        RemoteNode {
            vtep_mac: peer_vtep,
            backend: kind,
            _pad0: 0,
        },
    );
    dp.sync(&d)?;
    Ok(dp)
}

fn time(
    dp: &mut EbpfDataplane,
    prog: &str,
    input: &[u8],
    want: u32,
    calls: usize,
) -> Result<(f64, f64)> {
    let mut out = vec![0u8; input.len() + 256];
    let mut ns = Vec::with_capacity(calls);
    for _ in 0..calls {
        let opts = TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut out),
            ..Default::default()
        };
        let program = dp
            .ebpf_mut()
            .program_mut(prog)
            .ok_or_else(|| anyhow::anyhow!("no {prog}"))?;
        let r = if prog == prog_name::FROM_WIRE_XDP {
            let p: &mut Xdp = program.try_into()?;
            p.test_run(opts)?
        } else {
            let p: &mut SchedClassifier = program.try_into()?;
            p.test_run(opts)?
        };
        ensure!(
            r.return_value == want,
            "{prog}: verdict {} instead of {want}",
            r.return_value
        );
        ns.push(r.duration.as_secs_f64() * 1e9);
    }
    ns.sort_by(f64::total_cmp);
    Ok((ns[ns.len() / 2], ns[ns.len() * 9 / 10]))
}

/// Median and p90 ns per packet for each program on its main path, over `calls` calls.
#[expect(
    clippy::too_many_lines,
    reason = "a table of program × packet cases, one per backend"
)]
pub fn measure(calls: usize) -> Result<Vec<Cost>> {
    let a = node(
        &config(NODE_A, [10, 244, 1, 0], VTEP_A, [0x02, 0, 0, 0, 0, 0xa1]),
        "10.244.2.0/24",
        NODE_B,
        VTEP_B,
    )?;
    let mut b = node(
        &config(NODE_B, [10, 244, 2, 0], VTEP_B, UPLINK_MAC_B),
        "10.244.1.0/24",
        NODE_A,
        VTEP_A,
    )?;
    let pod_b = Endpoint {
        ifindex: 42,
        mac: [0x02, 0, 0, 0, 0, 0x22],
        _pad0: [0; 2],
    };
    b.sync_endpoints(&[(POD_B.into(), pod_b)].into())?;
    // An MTU-sized pod packet and the VXLAN frame carrying it.
    let pod = pod_frame(POD_B, 64, 1400 - 20);
    let wire = vxlan_frame(
        NODE_A,
        VNI,
        VTEP_B,
        &ipv4(POD_A, POD_B, 63, 6, &payload(1400 - 20)),
    );
    let other = eth(
        UPLINK_MAC_B,
        VTEP_A,
        0x0800,
        &ipv4(NODE_A, NODE_B, 64, 6, &payload(1400 - 20)),
    );
    let mut dps = [a, b];
    let mut out = Vec::new();
    for (name, node, prog, input, want) in [
        (
            "from_pods: encapsulate (tc)",
            0,
            prog_name::FROM_PODS,
            &pod,
            TC_ACT_REDIRECT,
        ),
        (
            "from_wire: decapsulate + deliver (tc)",
            1,
            prog_name::FROM_WIRE,
            &wire,
            TC_ACT_REDIRECT,
        ),
        (
            "from_wire_xdp: decapsulate (XDP)",
            1,
            prog_name::FROM_WIRE_XDP,
            &wire,
            XDP_PASS,
        ),
        (
            "from_wire: pass non-overlay (tc)",
            1,
            prog_name::FROM_WIRE,
            &other,
            TC_ACT_OK,
        ),
    ] {
        let (median_ns, p90_ns) = time(&mut dps[node], prog, input, want, calls)?;
        out.push(Cost {
            name,
            median_ns,
            p90_ns,
        });
    }
    // The other backends: encapsulation (or direct forwarding) and decapsulation.
    let inner = ipv4(POD_A, POD_B, 63, 6, &payload(1400 - 20));
    for (kind, names, wire) in [
        (
            backend::IPIP,
            [
                "from_pods: IPIP encapsulate",
                "from_wire: IPIP decapsulate",
                "from_wire_xdp: IPIP decapsulate",
            ],
            Some(ipip_frame(NODE_A, &inner)),
        ),
        (
            backend::UDP,
            [
                "from_pods: udp encapsulate",
                "from_wire: udp decapsulate",
                "from_wire_xdp: udp decapsulate",
            ],
            Some(udp_frame(NODE_A, &inner)),
        ),
        (
            backend::HOST_GW,
            ["from_pods: host-gw forward", "", ""],
            None,
        ),
    ] {
        let mut a = node_via(
            &config_for(
                kind,
                NODE_A,
                [10, 244, 1, 0],
                VTEP_A,
                [0x02, 0, 0, 0, 0, 0xa1],
            ),
            "10.244.2.0/24",
            NODE_B,
            VTEP_B,
            kind,
        )?;
        let (median_ns, p90_ns) = time(&mut a, prog_name::FROM_PODS, &pod, TC_ACT_REDIRECT, calls)?;
        out.push(Cost {
            name: names[0],
            median_ns,
            p90_ns,
        });
        let Some(wire) = wire else { continue };
        let mut b = node_via(
            &config_for(kind, NODE_B, [10, 244, 2, 0], VTEP_B, UPLINK_MAC_B),
            "10.244.1.0/24",
            NODE_A,
            VTEP_A,
            kind,
        )?;
        b.sync_endpoints(&[(POD_B.into(), pod_b)].into())?;
        let (median_ns, p90_ns) =
            time(&mut b, prog_name::FROM_WIRE, &wire, TC_ACT_REDIRECT, calls)?;
        out.push(Cost {
            name: names[1],
            median_ns,
            p90_ns,
        });
        let (median_ns, p90_ns) = time(&mut b, prog_name::FROM_WIRE_XDP, &wire, XDP_PASS, calls)?;
        out.push(Cost {
            name: names[2],
            median_ns,
            p90_ns,
        });
    }
    Ok(out)
}
