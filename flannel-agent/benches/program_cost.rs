//! Per-packet cost of each program on a representative packet, from `BPF_PROG_TEST_RUN`, printed
//! as JSON for `cargo xtask bench` (`{"harness_overhead_ns", "harness_overhead_xdp_ns",
//! "pass_repeated_ns", "pass_repeated_xdp_ns", "bpf_stats_overhead_ns",
//! "programs": [{"name", "median_ns", "p90_ns", "net_ns"}]}`). Run as
//! root: `cargo bench -p flannel-agent --bench program_cost -- --calls 20000`.
//!
//! `repeat > 1` re-runs a program on the buffer its previous run modified (after one
//! encapsulation the packet is no longer a pod's), so each call runs once and the kernel's own
//! timing of that run is collected; every verdict is checked so that the intended path is timed.
//! Cases are interleaved in rounds so that drift in the machine's speed reaches all alike.
//! `kernel.bpf_stats_enabled` is off while timing (it adds its own clock reads to every run,
//! ~70 ns on this VM kind); that overhead is measured and reported for reading the run-time
//! statistics taken under traffic.
use anyhow::{Result, ensure};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use flannel_agent::dataplane::{Desired, ebpf::EbpfDataplane};
use flannel_ebpf_common::{Endpoint, RemoteNode, RemoteSubnet, backend, prog_name};
use flannel_tests::packet::{
    NODE_A, NODE_B, OUTSIDE, POD_A, POD_B, UPLINK_MAC_B, VNI, VTEP_A, VTEP_B, config, config_for,
    eth, ipip_frame, ipv4, masq_config, payload, pod_frame, tcp, udp_frame, vxlan_around,
    vxlan_frame, wire_frame,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;

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

/// One timed case: a program of one node's dataplane on one packet, and the verdict it must give
/// (so that the intended path is the one timed).
struct Case {
    name: &'static str,
    node: usize,
    prog: &'static str,
    input: Vec<u8>,
    want: u32,
    /// Bytes the output must hold at an offset, where the verdict alone does not tell the path
    /// (the masquerade passes translated and untouched packets alike).
    want_out: Vec<(usize, Vec<u8>)>,
    repeat: u32,
    ns: Vec<f64>,
}

impl Case {
    fn new(name: &'static str, node: usize, prog: &'static str, input: &[u8], want: u32) -> Self {
        Self {
            name,
            node,
            prog,
            input: input.to_vec(),
            want,
            want_out: Vec::new(),
            repeat: 1,
            ns: Vec::new(),
        }
    }

    /// As [`Self::new`], also checking that the output holds `bytes` at `offset`.
    fn with_output(mut self, offset: usize, bytes: &[u8]) -> Self {
        self.want_out.push((offset, bytes.to_vec()));
        self
    }

    /// Runs the case `calls` times, keeping the kernel's ns per run of each call.
    fn run(&mut self, dps: &mut [EbpfDataplane], calls: usize) -> Result<()> {
        let mut out = vec![0u8; self.input.len() + 256];
        for _ in 0..calls {
            let opts = TestRunOptions {
                data_in: Some(&self.input),
                data_out: Some(&mut out),
                repeat: self.repeat,
                ..Default::default()
            };
            let program = dps[self.node]
                .ebpf_mut()
                .program_mut(self.prog)
                .ok_or_else(|| anyhow::anyhow!("no {}", self.prog))?;
            let r = if self.prog == prog_name::FROM_WIRE_XDP {
                let p: &mut Xdp = program.try_into()?;
                p.test_run(opts)?
            } else {
                let p: &mut SchedClassifier = program.try_into()?;
                p.test_run(opts)?
            };
            ensure!(
                r.return_value == self.want,
                "{}: verdict {} instead of {}",
                self.name,
                r.return_value,
                self.want
            );
            for (offset, bytes) in &self.want_out {
                let got = out[..r.data_size_out as usize].get(*offset..*offset + bytes.len());
                ensure!(
                    got == Some(&bytes[..]),
                    "{}: output at {offset} is {got:?} instead of {bytes:?}",
                    self.name
                );
            }
            self.ns.push(r.duration.as_secs_f64() * 1e9);
        }
        Ok(())
    }

    /// Median and p90.
    fn stats(&mut self) -> (f64, f64) {
        self.ns.sort_by(f64::total_cmp);
        (self.ns[self.ns.len() / 2], self.ns[self.ns.len() * 9 / 10])
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let calls: usize = match args.iter().position(|a| a == "--calls") {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("--calls needs a number"))?
            .parse()?,
        None => 20_000,
    };
    let _off = BpfStats::set("0");
    let (mut dps, mut cases) = cases()?;
    // The pass path leaves the packet as it is, so it can also be repeated within one call: one
    // run per call minus 1,000 runs per call is the harness's share of a one-run timing (entering
    // and leaving the test run, reading the clock), which the other figures are reported less of.
    // The pass paths leave the packet as it is, so they can also be repeated within one call: one
    // run per call minus 1,000 runs per call is the harness's share of a one-run timing (entering
    // and leaving the test run, reading the clock), per program type; the other figures are also
    // reported less that share.
    let find = |name: &str| {
        cases
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| anyhow::anyhow!("no case {name}"))
    };
    let (pass_tc, pass_xdp) = (find(PASS)?, find(PASS_XDP)?);
    let repeated = |c: &Case| Case {
        repeat: 1000,
        ..Case::new(c.name, c.node, c.prog, &c.input, c.want)
    };
    let mut repeated_tc = repeated(&cases[pass_tc]);
    let mut repeated_xdp = repeated(&cases[pass_xdp]);
    // Interleaved rounds, so that drift in the machine's speed reaches every case alike.
    for _ in 0..calls.div_ceil(PER_ROUND) {
        for case in &mut cases {
            case.run(&mut dps, PER_ROUND)?;
        }
        repeated_tc.run(&mut dps, 1)?;
        repeated_xdp.run(&mut dps, 1)?;
    }
    let (pass_repeated, _) = repeated_tc.stats();
    let (pass_repeated_xdp, _) = repeated_xdp.stats();
    // What `kernel.bpf_stats_enabled` adds to each run (the same repeated pass path with it on).
    let mut with_stats = repeated(&cases[pass_tc]);
    {
        let _on = BpfStats::set("1");
        with_stats.run(&mut dps, calls.div_ceil(PER_ROUND))?;
    }
    let stats_overhead = (with_stats.stats().0 - pass_repeated).max(0.0);
    let overhead_tc = (cases[pass_tc].stats().0 - pass_repeated).max(0.0);
    let overhead_xdp = (cases[pass_xdp].stats().0 - pass_repeated_xdp).max(0.0);
    let programs: Vec<serde_json::Value> = cases
        .iter_mut()
        .map(|c| {
            let (median, p90) = c.stats();
            let overhead = if c.prog == prog_name::FROM_WIRE_XDP {
                overhead_xdp
            } else {
                overhead_tc
            };
            serde_json::json!({
                "name": c.name, "median_ns": median, "p90_ns": p90,
                "net_ns": (median - overhead).max(0.0),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "harness_overhead_ns": overhead_tc, "harness_overhead_xdp_ns": overhead_xdp,
            "pass_repeated_ns": pass_repeated, "pass_repeated_xdp_ns": pass_repeated_xdp,
            "bpf_stats_overhead_ns": stats_overhead, "programs": programs,
        })
    );
    Ok(())
}

/// Sets `kernel.bpf_stats_enabled` and restores its earlier value when dropped.
struct BpfStats(Option<String>);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";
    fn set(value: &str) -> Self {
        let old = std::fs::read_to_string(Self::PATH).ok();
        let _ = std::fs::write(Self::PATH, value);
        Self(old)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write(Self::PATH, old.trim());
        }
    }
}

/// Calls of each case per interleaved round.
const PER_ROUND: usize = 50;

const PASS: &str = "from_wire: pass non-overlay (tc)";
const PASS_XDP: &str = "from_wire_xdp: pass non-overlay (XDP)";

/// The dataplanes (one per node and backend) and the cases timed on them.
#[expect(
    clippy::too_many_lines,
    reason = "a table of program × packet cases, one per backend"
)]
fn cases() -> Result<(Vec<EbpfDataplane>, Vec<Case>)> {
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
    let mut dps = vec![a, b];
    let mut cases = vec![
        Case::new(
            "from_pods: encapsulate (tc)",
            0,
            prog_name::FROM_PODS,
            &pod,
            TC_ACT_REDIRECT,
        ),
        Case::new(
            "from_wire: decapsulate + deliver (tc)",
            1,
            prog_name::FROM_WIRE,
            &wire,
            TC_ACT_REDIRECT,
        ),
        Case::new(
            "from_wire_xdp: decapsulate (XDP)",
            1,
            prog_name::FROM_WIRE_XDP,
            &wire,
            XDP_PASS,
        ),
        Case::new(PASS, 1, prog_name::FROM_WIRE, &other, TC_ACT_OK),
        Case::new(PASS_XDP, 1, prog_name::FROM_WIRE_XDP, &other, XDP_PASS),
    ];
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
        dps.push(node_via(
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
        )?);
        cases.push(Case::new(
            names[0],
            dps.len() - 1,
            prog_name::FROM_PODS,
            &pod,
            TC_ACT_REDIRECT,
        ));
        let Some(wire) = wire else { continue };
        let mut b = node_via(
            &config_for(kind, NODE_B, [10, 244, 2, 0], VTEP_B, UPLINK_MAC_B),
            "10.244.1.0/24",
            NODE_A,
            VTEP_A,
            kind,
        )?;
        b.sync_endpoints(&[(POD_B.into(), pod_b)].into())?;
        dps.push(b);
        let n = dps.len() - 1;
        cases.push(Case::new(
            names[1],
            n,
            prog_name::FROM_WIRE,
            &wire,
            TC_ACT_REDIRECT,
        ));
        cases.push(Case::new(
            names[2],
            n,
            prog_name::FROM_WIRE_XDP,
            &wire,
            XDP_PASS,
        ));
    }
    masquerade_cases(&mut dps, &mut cases)?;
    Ok((dps, cases))
}

/// The masquerade (`--ip-masq`) on node A: `to_wire` translating a pod's packet of an
/// established flow, `from_wire` translating the reply back, and `to_wire` passing the node's own
/// VXLAN packet (what most packets on an overlay node's uplink are). The flow is created (and its
/// reply seen) by one untimed run of each first, so that the timed runs find both entries; the
/// output is checked on every run, the verdict being `TC_ACT_OK` either way.
fn masquerade_cases(dps: &mut Vec<EbpfDataplane>, cases: &mut Vec<Case>) -> Result<()> {
    const POD_PORT: u16 = 40_000;
    const SERVER_PORT: u16 = 5201;
    // An MTU-sized TCP segment (ACK) of the pod to the outside host.
    let data = payload(1400 - 40);
    let out_seg = tcp(POD_A, OUTSIDE, POD_PORT, SERVER_PORT, 0x10, &data);
    let pod_out = wire_frame(&ipv4(POD_A, OUTSIDE, 63, 6, &out_seg));
    let mut dp = node(
        &masq_config(
            config(NODE_A, [10, 244, 1, 0], VTEP_A, [0x02, 0, 0, 0, 0, 0xa1]),
            true,
        ),
        "10.244.2.0/24",
        NODE_B,
        VTEP_B,
    )?;
    // Offsets in a frame: the IPv4 source address at 26, its destination at 30, the TCP source
    // and destination ports at 34 and 36.
    let snat = run_once(&mut dp, prog_name::TO_WIRE, &pod_out)?;
    ensure!(
        snat[26..30] == NODE_A,
        "to_wire did not masquerade the pod's packet"
    );
    let port = [snat[34], snat[35]];
    let reply_seg = tcp(
        OUTSIDE,
        NODE_A,
        SERVER_PORT,
        u16::from_be_bytes(port),
        0x10,
        &data,
    );
    let reply = wire_frame(&ipv4(OUTSIDE, NODE_A, 60, 6, &reply_seg));
    let back = run_once(&mut dp, prog_name::FROM_WIRE, &reply)?;
    ensure!(
        back[30..34] == POD_A,
        "from_wire did not translate the reply back"
    );
    // The node's own VXLAN packet (source port 40000, outside the masquerade range).
    let vxlan = vxlan_around(
        NODE_A,
        VNI,
        &eth(VTEP_B, VTEP_A, 0x0800, &ipv4(POD_A, POD_B, 63, 6, &out_seg)),
    );
    dps.push(dp);
    let n = dps.len() - 1;
    cases.push(
        Case::new(
            "to_wire: SNAT (established flow)",
            n,
            prog_name::TO_WIRE,
            &pod_out,
            TC_ACT_OK,
        )
        // Source address and port.
        .with_output(26, &NODE_A)
        .with_output(34, &port),
    );
    cases.push(
        Case::new(
            "from_wire: reverse SNAT",
            n,
            prog_name::FROM_WIRE,
            &reply,
            TC_ACT_OK,
        )
        // Destination address and port.
        .with_output(30, &POD_A)
        .with_output(36, &POD_PORT.to_be_bytes()),
    );
    cases.push(
        Case::new(
            "to_wire: pass (not masqueraded)",
            n,
            prog_name::TO_WIRE,
            &vxlan,
            TC_ACT_OK,
        )
        .with_output(0, &vxlan),
    );
    Ok(())
}

/// One untimed run of a tc program; its output.
fn run_once(dp: &mut EbpfDataplane, prog: &str, input: &[u8]) -> Result<Vec<u8>> {
    let mut out = vec![0u8; input.len() + 256];
    let program: &mut SchedClassifier = dp
        .ebpf_mut()
        .program_mut(prog)
        .ok_or_else(|| anyhow::anyhow!("no {prog}"))?
        .try_into()?;
    let r = program.test_run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    ensure!(
        r.return_value == TC_ACT_OK,
        "{prog}: verdict {}",
        r.return_value
    );
    out.truncate(r.data_size_out as usize);
    Ok(out)
}
