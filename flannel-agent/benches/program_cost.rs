//! Per-packet cost of each program on a representative packet, from `BPF_PROG_TEST_RUN`, printed
//! as JSON for `cargo xtask bench` (`{"harness_overhead_ns", "harness_overhead_xdp_ns",
//! "pass_repeated_ns", "pass_repeated_xdp_ns", "bpf_stats_overhead_ns", "rounds", "loads",
//! "baseline_object", "baseline_error", "programs": [{"name", "median_ns", "p90_ns", "net_ns",
//! "trimmed_mean_ns", "load_to_load", "baseline", "baseline_error"}]}`). Run as root:
//! `cargo bench --target x86_64-unknown-linux-musl -p flannel-agent --bench program_cost -- --calls
//! 20000 [--loads N]` (xtask's release target: without it, a second release dependency graph).
//!
//! With `FLANNEL_BASELINE_OBJECT=<path>` (an older build of the same programs, which
//! `cargo xtask bench` makes from a git revision) every case is also timed on that object, in the
//! same rounds, right beside its counterpart. Each object is loaded `--loads` times (default
//! [`LOADS`]), the loads in a random order (`--seed` repeats one), because where a load's JIT images
//! and maps land moves a program's cost by several per cent; a round runs each case on every load
//! of both objects, in a random order. A program's `"baseline"` holds the baseline's `median_ns`,
//! `p90_ns`, `net_ns` and `trimmed_mean_ns`, and `"ratio"` / `"net_ratio"` the per-round paired
//! ratios new ÷ baseline (per packet, and less the harness overhead, the same for both) of the
//! objects' round figures (the mean over loads of each load's trimmed mean in the round), as
//! `median`, `min`, `max` and a 95 % bootstrap interval of the median (`ci95_low`, `ci95_high`);
//! `"load_to_load"` the same ratios between the new object's even and odd loads (an A/A
//! comparison: what is left of the placement effect with half as many loads averaged). Trimmed
//! means (the middle 80 % of a round's calls), not medians: the kernel's timings come in steps of
//! about 10 ns on this VM, so a round's median is one step or the next, while the mean of the
//! middle calls resolves less than a step and still ignores the calls an interrupt hit. This VM's
//! speed drifts by more than the differences sought, so only timings of one run compare. A case
//! the baseline cannot run (another verdict or output) gets `"baseline_error"` instead; an object
//! that does not load, the top-level `"baseline_error"`. Without a baseline, everything is as
//! before: one load, the same figures.
//!
//! `repeat > 1` re-runs a program on the buffer its previous run modified (after one
//! encapsulation the packet is no longer a pod's), so each call runs once and the kernel's own
//! timing of that run is collected; every verdict is checked so that the intended path is timed.
//! Cases are interleaved in rounds so that drift in the machine's speed reaches all alike.
//! `kernel.bpf_stats_enabled` is off while timing (it adds its own clock reads to every run,
//! ~70 ns on this VM kind); that overhead is measured and reported for reading the run-time
//! statistics taken under traffic.
use std::path::PathBuf;

use anyhow::{Result, ensure};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use flannel_agent::dataplane::{
    Desired,
    ebpf::{self, EbpfDataplane},
};
use flannel_ebpf_common::{Endpoint, RemoteNode, RemoteSubnet, backend, map_name, prog_name};
use flannel_tests::packet::{
    NODE_A, NODE_B, OUTSIDE, POD_A, POD_B, UPLINK_MAC_B, VNI, VTEP_A, VTEP_B, config, config_for,
    eth, ipip_frame, ipv4, masq_config, payload, pod_frame, tcp, udp_frame, vxlan_around,
    vxlan_frame, wire_frame,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_PASS: u32 = 2;

fn node(
    object: &[u8],
    cfg: &flannel_ebpf_common::NodeConfig,
    peer_subnet: &str,
    peer: [u8; 4],
    peer_vtep: [u8; 6],
) -> Result<EbpfDataplane> {
    node_via(object, cfg, peer_subnet, peer, peer_vtep, backend::VXLAN)
}

fn node_via(
    object: &[u8],
    cfg: &flannel_ebpf_common::NodeConfig,
    peer_subnet: &str,
    peer: [u8; 4],
    peer_vtep: [u8; 6],
    kind: u8,
) -> Result<EbpfDataplane> {
    let mut dp = EbpfDataplane::unpinned_from(object)?;
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
    // The underlay next hop an agent keeps for the peer (the peer itself, on the segment), where
    // the object has the map (an older revision's may not).
    if dp.ebpf().map(map_name::NEXTHOP).is_some() {
        dp.set_next_hops(Some([(peer.into(), peer.into())].into()))?;
    }
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
    /// The trimmed mean of each round's calls, for ratios paired by round.
    rounds: Vec<f64>,
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
            rounds: Vec::new(),
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
        let first = self.ns.len();
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
        self.rounds
            .push(trimmed_mean(&mut self.ns[first..].to_vec()));
        Ok(())
    }

    /// Median and p90.
    fn stats(&mut self) -> (f64, f64) {
        median_p90(&mut self.ns)
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one measurement sequence: arguments, loads, interleaved rounds, report"
)]
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| -> Result<Option<usize>> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                args.get(i + 1)
                    .ok_or_else(|| anyhow::anyhow!("{name} needs a number"))?
                    .parse()?,
            )),
            None => Ok(None),
        }
    };
    let calls = arg("--calls")?.unwrap_or(20_000);
    let baseline_path = std::env::var_os("FLANNEL_BASELINE_OBJECT").map(PathBuf::from);
    let loads = arg("--loads")?
        .unwrap_or(if baseline_path.is_some() { LOADS } else { 1 })
        .max(1);
    // Where each load lands follows from the order of the loads, the same in every run: the loads
    // go in a random order, and the rounds run them in a random order too.
    let seed = match arg("--seed")? {
        Some(seed) => seed as u64,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    };
    let mut rng = XorShift(seed | 1);
    let _off = BpfStats::set("0");
    let mut new = Vec::new();
    let mut baseline = baseline_path.as_ref().map(|path| {
        std::fs::read(path)
            .map(|object| (object, Vec::new()))
            .map_err(|e| format!("reading {}: {e}", path.display()))
    });
    let mut load_order: Vec<bool> = (0..loads).flat_map(|_| [false, true]).collect();
    rng.shuffle(&mut load_order);
    for on_baseline in load_order {
        if on_baseline {
            load_baseline(&mut baseline);
        } else {
            new.push(Load::new(ebpf::OBJECT)?);
        }
    }
    if let Some(Ok((_, theirs))) = &baseline
        && !theirs.iter().all(|t: &Load| {
            t.cases.len() == new[0].cases.len()
                && t.cases
                    .iter()
                    .zip(&new[0].cases)
                    .all(|(t, n)| t.name == n.name)
        })
    {
        baseline = Some(Err("the cases differ from the new object's".into()));
    }
    let n_cases = new[0].cases.len();
    // Why a case could not run on the baseline (another verdict or output than the new object's).
    let mut baseline_errors: Vec<Option<String>> = vec![None; n_cases];
    // The pass paths leave the packet as it is, so they can also be repeated within one call: one
    // run per call minus 1,000 runs per call is the harness's share of a one-run timing (entering
    // and leaving the test run, reading the clock), per program type; the other figures are also
    // reported less that share.
    let find = |name: &str| {
        new[0]
            .cases
            .iter()
            .position(|c| c.name == name)
            .ok_or_else(|| anyhow::anyhow!("no case {name}"))
    };
    let (pass_tc, pass_xdp) = (find(PASS)?, find(PASS_XDP)?);
    let repeated = |c: &Case| Case {
        repeat: 1000,
        ..Case::new(c.name, c.node, c.prog, &c.input, c.want)
    };
    let mut repeated_tc = repeated(&new[0].cases[pass_tc]);
    let mut repeated_xdp = repeated(&new[0].cases[pass_xdp]);
    // Interleaved rounds, so that drift in the machine's speed reaches every case alike; within a
    // round, a case runs on every load of both objects in turn, in a random order.
    let rounds = calls.div_ceil(PER_ROUND);
    let mut order: Vec<(bool, usize)> = (0..loads).flat_map(|j| [(false, j), (true, j)]).collect();
    for _ in 0..rounds {
        #[expect(
            clippy::needless_range_loop,
            reason = "`i` indexes the cases of every load, not only `baseline_errors`"
        )]
        for i in 0..n_cases {
            rng.shuffle(&mut order);
            for &(on_baseline, j) in &order {
                if !on_baseline {
                    new[j].run(i)?;
                } else if let Some(Ok((_, theirs))) = &mut baseline
                    && baseline_errors[i].is_none()
                    && let Err(e) = theirs[j].run(i)
                {
                    baseline_errors[i] = Some(format!("{e:#}"));
                }
            }
        }
        repeated_tc.run(&mut new[0].dps, 1)?;
        repeated_xdp.run(&mut new[0].dps, 1)?;
    }
    let (pass_repeated, _) = repeated_tc.stats();
    let (pass_repeated_xdp, _) = repeated_xdp.stats();
    // What `kernel.bpf_stats_enabled` adds to each run (the same repeated pass path with it on).
    let mut with_stats = repeated(&new[0].cases[pass_tc]);
    {
        let _on = BpfStats::set("1");
        with_stats.run(&mut new[0].dps, calls.div_ceil(PER_ROUND))?;
    }
    let stats_overhead = (with_stats.stats().0 - pass_repeated).max(0.0);
    let overhead_tc = (median_p90(&mut pooled(&new, pass_tc)).0 - pass_repeated).max(0.0);
    let overhead_xdp = (median_p90(&mut pooled(&new, pass_xdp)).0 - pass_repeated_xdp).max(0.0);
    let programs: Vec<serde_json::Value> = (0..n_cases)
        .map(|i| {
            let c = &new[0].cases[i];
            let mut ns = pooled(&new, i);
            let (median, p90) = median_p90(&mut ns);
            let overhead = if c.prog == prog_name::FROM_WIRE_XDP {
                overhead_xdp
            } else {
                overhead_tc
            };
            let mut program = serde_json::json!({
                "name": c.name, "median_ns": median, "p90_ns": p90,
                "net_ns": (median - overhead).max(0.0), "trimmed_mean_ns": trimmed_mean(&mut ns),
            });
            if loads > 1 {
                program["load_to_load"] = load_to_load(&new, i);
            }
            match (&baseline, &baseline_errors[i]) {
                (Some(Ok(_)), Some(e)) => program["baseline_error"] = e.as_str().into(),
                (Some(Ok((_, theirs))), None) => {
                    program["baseline"] = compare(&new, theirs, i, overhead);
                }
                _ => {}
            }
            program
        })
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "harness_overhead_ns": overhead_tc, "harness_overhead_xdp_ns": overhead_xdp,
            "pass_repeated_ns": pass_repeated, "pass_repeated_xdp_ns": pass_repeated_xdp,
            "bpf_stats_overhead_ns": stats_overhead, "rounds": rounds, "loads": loads,
            "seed": seed,
            "baseline_object": baseline_path.map(|p| p.display().to_string()),
            "baseline_error": baseline.as_ref().and_then(|b| b.as_ref().err()),
            "programs": programs,
        })
    );
    Ok(())
}

/// xorshift64*: a small, seeded generator (orders and bootstrap resamples reproducible per run).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Fisher–Yates.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for k in (1..v.len()).rev() {
            v.swap(k, self.below(k + 1));
        }
    }
}

/// Loads of each object when there is a baseline. Where a program's JIT image and maps land
/// moves its cost by up to ±6 % on this VM: two loads of one object, timed side by side, differ by
/// that much, case by case, and the same in every run if the loads go in the same order (so they
/// go in a random one). Each object's figure is the mean over its loads, which shrinks that; what
/// is left shows in `"load_to_load"`.
const LOADS: usize = 4;

/// One load of an object: its dataplanes and the cases timed on them.
struct Load {
    dps: Vec<EbpfDataplane>,
    cases: Vec<Case>,
}

impl Load {
    fn new(object: &[u8]) -> Result<Self> {
        let (dps, cases) = cases(object)?;
        Ok(Self { dps, cases })
    }

    /// One round of case `i`.
    fn run(&mut self, i: usize) -> Result<()> {
        self.cases[i].run(&mut self.dps, PER_ROUND)
    }
}

/// The baseline object's bytes and its loads so far, or why it could not be loaded and set up.
type Baseline = Result<(Vec<u8>, Vec<Load>), String>;

/// Adds a load of the baseline object (the object's bytes and the loads so far), or turns
/// `baseline` into why it could not be loaded and set up.
fn load_baseline(baseline: &mut Option<Baseline>) {
    if let Some(Ok((object, loads))) = baseline {
        match Load::new(object) {
            Ok(load) => loads.push(load),
            Err(e) => *baseline = Some(Err(format!("{e:#}"))),
        }
    }
}

/// Every call of case `i` over `loads`.
fn pooled(loads: &[Load], i: usize) -> Vec<f64> {
    loads
        .iter()
        .flat_map(|l| l.cases[i].ns.iter().copied())
        .collect()
}

/// Case `i`'s figure of each round: the mean over `loads` of the round's trimmed means.
#[expect(clippy::cast_precision_loss, reason = "a handful of loads")]
fn per_round<L: std::borrow::Borrow<Load>>(loads: &[L], i: usize) -> Vec<f64> {
    let rounds: Vec<&[f64]> = loads
        .iter()
        .map(|l| l.borrow().cases[i].rounds.as_slice())
        .collect();
    let n = rounds.iter().map(|r| r.len()).min().unwrap_or(0);
    (0..n)
        .map(|r| rounds.iter().map(|l| l[r]).sum::<f64>() / rounds.len() as f64)
        .collect()
}

/// Case `i` on the new object's even loads against its odd ones (the same object; each half
/// loaded first of its pair as often as the other): what is left of the placement effect after
/// averaging over half as many loads as the comparison with the baseline has; per-round ratios as
/// in [`ratio_summary`].
fn load_to_load(new: &[Load], i: usize) -> serde_json::Value {
    let half = |parity: usize| -> Vec<&Load> { new.iter().skip(parity).step_by(2).collect() };
    let ratios: Vec<f64> = per_round(&half(0), i)
        .iter()
        .zip(per_round(&half(1), i))
        .map(|(a, b)| a / b)
        .collect();
    ratio_summary(&ratios)
}

/// Case `i` on the baseline's loads (median, p90, less `overhead`, trimmed mean) and the paired
/// per-round ratios of the new object's figures to the baseline's.
fn compare(new: &[Load], theirs: &[Load], i: usize, overhead: f64) -> serde_json::Value {
    let mut ns = pooled(theirs, i);
    let (median, p90) = median_p90(&mut ns);
    let (ours, theirs) = (per_round(new, i), per_round(theirs, i));
    let pairs = || ours.iter().zip(&theirs);
    let ratios: Vec<f64> = pairs().map(|(n, b)| n / b).collect();
    // Less the harness overhead, floored at the timing's resolution (1 ns).
    let net_ratios: Vec<f64> = pairs()
        .map(|(n, b)| (n - overhead).max(1.0) / (b - overhead).max(1.0))
        .collect();
    serde_json::json!({
        "median_ns": median, "p90_ns": p90, "net_ns": (median - overhead).max(0.0),
        "trimmed_mean_ns": trimmed_mean(&mut ns),
        "ratio": ratio_summary(&ratios), "net_ratio": ratio_summary(&net_ratios),
    })
}

/// Median and p90; sorts `v`.
fn median_p90(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[v.len() * 9 / 10])
}

/// Median, min, max and a 95 % percentile-bootstrap interval of the median of per-round ratios.
fn ratio_summary(ratios: &[f64]) -> serde_json::Value {
    const RESAMPLES: usize = 2000;
    let mut sorted = ratios.to_vec();
    let mid = median(&mut sorted);
    let n = sorted.len();
    // A fixed seed, so a run's interval is reproducible from its ratios.
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut sample = vec![0.0; n];
    let mut medians: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            for x in &mut sample {
                *x = sorted[rng.below(n)];
            }
            median(&mut sample)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    serde_json::json!({
        "median": mid, "min": sorted[0], "max": sorted[n - 1],
        "ci95_low": medians[RESAMPLES / 40], "ci95_high": medians[RESAMPLES - 1 - RESAMPLES / 40],
        "rounds": n,
    })
}

/// The mean of the middle 80 % of `v` (all of it if it is shorter than 10); sorts `v`.
#[expect(
    clippy::cast_precision_loss,
    reason = "a count of calls, far below 2^52"
)]
fn trimmed_mean(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let cut = v.len() / 10;
    let middle = &v[cut..v.len() - cut];
    middle.iter().sum::<f64>() / middle.len() as f64
}

/// The median (the mean of the middle two of an even count); sorts `v`.
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
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
fn cases(object: &[u8]) -> Result<(Vec<EbpfDataplane>, Vec<Case>)> {
    let a = node(
        object,
        &config(NODE_A, [10, 244, 1, 0], VTEP_A, [0x02, 0, 0, 0, 0, 0xa1]),
        "10.244.2.0/24",
        NODE_B,
        VTEP_B,
    )?;
    let mut b = node(
        object,
        &config(NODE_B, [10, 244, 2, 0], VTEP_B, UPLINK_MAC_B),
        "10.244.1.0/24",
        NODE_A,
        VTEP_A,
    )?;
    let pod_b = Endpoint {
        ifindex: 42,
        mac: [0x02, 0, 0, 0, 0, 0x22],
        flags: 0,
        _pad0: 0,
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
            object,
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
            object,
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
    masquerade_cases(object, &mut dps, &mut cases)?;
    Ok((dps, cases))
}

/// The masquerade (`--ip-masq`) on node A: `to_wire` translating a pod's packet of an
/// established flow, `from_wire` translating the reply back, and `to_wire` passing the node's own
/// VXLAN packet (what most packets on an overlay node's uplink are). The flow is created (and its
/// reply seen) by one untimed run of each first, so that the timed runs find both entries; the
/// output is checked on every run, the verdict being `TC_ACT_OK` either way.
fn masquerade_cases(
    object: &[u8],
    dps: &mut Vec<EbpfDataplane>,
    cases: &mut Vec<Case>,
) -> Result<()> {
    const POD_PORT: u16 = 40_000;
    const SERVER_PORT: u16 = 5201;
    // An MTU-sized TCP segment (ACK) of the pod to the outside host.
    let data = payload(1400 - 40);
    let out_seg = tcp(POD_A, OUTSIDE, POD_PORT, SERVER_PORT, 0x10, &data);
    let pod_out = wire_frame(&ipv4(POD_A, OUTSIDE, 63, 6, &out_seg));
    let mut dp = node(
        object,
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
