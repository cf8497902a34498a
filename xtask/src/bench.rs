//! `cargo xtask bench`: every datapath side by side in one run, on namespace clusters alive at
//! the same time, measured in interleaved, rotated repetitions.
//!
//! Paths: baseline (node to node on the underlay), kernel-vxlan and kernel-host-gw (flanneld's
//! kernel objects, the agent's netlink dataplane), ebpf-vxlan (the default datapath: tc decap),
//! ebpf-vxlan-xdp and ebpf-vxlan-xdp-generic (XDP decap, native and generic), ebpf-host-gw,
//! ebpf-ipip, ebpf-udp, wireguard
//! (wireguard-go), and pod to a host outside the pod network masqueraded (`--ip-masq`) by the
//! eBPF dataplane (ebpf-masq) or by flanneld's iptables rules (iptables-masq), compared side by
//! side in a table of their own, with the memory an entry of the eBPF masquerade table takes.
//! Figures per path: TCP 1 and 4 streams (iperf3), `TCP_RR` 1-byte p50/p99 and rate, `TCP_CRR` rate,
//! 64-byte UDP packet rate, busy CPU per Gbit/s, the baseline's single stream once more with the
//! path's own TCP segment size (the pods' MTU − 40; paired with the path's, because the receiver's
//! copy cost on this testbed varies with the segment size), the CPU time stolen by the hypervisor, and the
//! kernel's BPF run-time statistics per program; every ratio paired within a repetition, with its
//! spread, and the datapath goals judged on them ([`crate::compare`]); plus `BPF_PROG_TEST_RUN` cost per program, and the agent's memory and map-sync time at
//! 10, 1,000 and 5,000 leases.
#![allow(
    clippy::cast_precision_loss,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "measurement arithmetic on counts and durations far below 2^52"
)]
use std::{collections::BTreeMap, fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use flannel_tests::{
    Backend, Iperf3Server, NodeKind, Options, Testbed, iperf3, iperf3_with, run,
    traffic::{self, End, UdpReceiver},
};
use serde_json::{Value, json};

use crate::{
    bootstrap::say,
    compare::{self, Samples},
    median,
};

struct Path_ {
    name: &'static str,
    client: End,
    server: End,
    /// Pin directories of the agents whose programs serve this path (BPF run-time statistics).
    nodes: Vec<std::path::PathBuf>,
    /// The path's largest TCP segment option (`iperf3 -M`: interface MTU − 40) where it is
    /// smaller than the baseline's: the baseline is measured once more with it.
    segment: Option<u32>,
}

/// The baseline's largest TCP segment option at the underlay's MTU.
const BASELINE_SEGMENT: u32 = flannel_tests::UNDERLAY_MTU - 40;

/// A path's [`Path_::segment`] for pods behind a tunnel of `overhead` bytes.
fn segment(overhead: u32) -> Option<u32> {
    (overhead > 0).then(|| BASELINE_SEGMENT - overhead)
}

/// One repetition's figures for one path.
#[derive(Default, Clone)]
struct Sample {
    tcp: f64,
    /// The baseline's single stream with this path's segment size, measured right after `tcp`
    /// (0 where the path's segment is the baseline's).
    tcp_baseline_segment: f64,
    tcp4: f64,
    rr_p50: f64,
    rr_p99: f64,
    rr_per_s: f64,
    crr: f64,
    udp_pps: f64,
    /// The same with a receiver that polls instead of sleeping ([`traffic::UdpReceiver`]).
    udp_pps_polled: f64,
    cpu_per_gbit: f64,
    /// The share of CPU time the hypervisor stole while the path was measured (`/proc/stat`).
    steal_share: f64,
    /// BPF run time per packet during the 64-byte UDP run, by program.
    program_ns: BTreeMap<String, f64>,
    /// BPF run time per skb (GSO super-packets and ACKs) during the single-stream TCP run.
    program_ns_tcp: BTreeMap<String, f64>,
}

/// The median over repetitions of each program's run time.
fn median_by_program(
    samples: &[Sample],
    field: fn(&Sample) -> &BTreeMap<String, f64>,
) -> serde_json::Map<String, Value> {
    let mut names: Vec<&String> = samples.iter().flat_map(|s| field(s).keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let v: Vec<f64> = samples
                .iter()
                .filter_map(|s| field(s).get(name).copied())
                .collect();
            (name.clone(), json!(stats(&v).0))
        })
        .collect()
}

/// Run time per run of each program between two `bpf_stats` snapshots.
fn per_run(
    before: &BTreeMap<String, (u64, u64)>,
    after: &BTreeMap<String, (u64, u64)>,
) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, (t1, c1)) in after {
        let (t0, c0) = before.get(name).copied().unwrap_or_default();
        // A program that ran only a few times here (ARP, a stray packet) is not on the path.
        if *c1 >= c0 + 1000 {
            out.insert(name.clone(), (t1 - t0) as f64 / (c1 - c0) as f64);
        }
    }
    out
}

fn pod_end(tb: &Testbed, node: usize) -> End {
    End {
        netns: tb.nodes[node].pods[0].netns.clone(),
        ip: tb.nodes[node].pods[0].ip,
    }
}

fn cluster(tag: &str, backend: Backend, kinds: &[NodeKind], decap: &str) -> Result<Testbed> {
    let mut options = Options::backend(backend, kinds, 1);
    options.agent_args = vec!["--decap".into(), decap.into()];
    Testbed::start(tag, options)
}

/// A vxlan cluster of two `kind` nodes with `--ip-masq`, and its outside host (an address of its
/// own underlay namespace, so each such cluster has its own).
fn masq_cluster(tag: &str, kind: NodeKind) -> Result<(Testbed, End)> {
    let mut options = Options::vxlan(&[kind, kind], 1);
    options.agent_args = vec!["--ip-masq".into()];
    let mut tb = Testbed::start(tag, options)?;
    let outside = tb.add_outside()?;
    Ok((
        tb,
        End {
            netns: outside.netns,
            ip: outside.ip,
        },
    ))
}

/// The eBPF masquerade table's size, from `bpftool -j map show pinned <pins>/FLANNEL_NAT`.
struct NatMemory {
    bytes_memlock: u64,
    max_entries: u64,
    /// Without `BPF_F_NO_PREALLOC`: every entry allocated when the map is made.
    preallocated: bool,
}

fn nat_table_memory(pins: &Path) -> Result<NatMemory> {
    let map = pins.join("FLANNEL_NAT");
    let out = run(
        "bpftool",
        &["-j", "map", "show", "pinned", &map.to_string_lossy()],
    )?;
    let v: Value = serde_json::from_str(&out).context("bpftool map show output")?;
    let field = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| anyhow!("bpftool map show {}: no {k} in {out}", map.display()))
    };
    // BPF_F_NO_PREALLOC
    let preallocated = v["flags"].as_u64().unwrap_or(0) & 1 == 0;
    Ok(NatMemory {
        bytes_memlock: field("bytes_memlock")?,
        max_entries: field("max_entries")?,
        preallocated,
    })
}

/// One figure of the masquerade comparison: its name, how to read it from a sample, and the
/// issue's target for eBPF ÷ iptables (a floor), if it has one.
struct MasqFigure {
    name: &'static str,
    key: &'static str,
    unit: &'static str,
    scale: f64,
    decimals: usize,
    get: fn(&Sample) -> f64,
    target: Option<f64>,
    lower_is_better: bool,
}

const MASQ_FIGURES: [MasqFigure; 6] = [
    MasqFigure {
        name: "TCP, 1 stream",
        key: "tcp",
        unit: "Gbit/s",
        scale: 1.0,
        decimals: 2,
        get: |s| s.tcp,
        target: Some(1.0),
        lower_is_better: false,
    },
    MasqFigure {
        name: "TCP, 4 streams",
        key: "tcp4",
        unit: "Gbit/s",
        scale: 1.0,
        decimals: 2,
        get: |s| s.tcp4,
        target: None,
        lower_is_better: false,
    },
    MasqFigure {
        name: "TCP_CRR",
        key: "crr",
        unit: "connections/s",
        scale: 1.0,
        decimals: 0,
        get: |s| s.crr,
        target: Some(1.2),
        lower_is_better: false,
    },
    MasqFigure {
        name: "UDP 64-byte packets",
        key: "udp_pps",
        unit: "kpps",
        scale: 1e-3,
        decimals: 0,
        get: |s| s.udp_pps,
        target: Some(1.2),
        lower_is_better: false,
    },
    MasqFigure {
        name: "UDP 64-byte packets, polling receiver",
        key: "udp_pps_polled",
        unit: "kpps",
        scale: 1e-3,
        decimals: 0,
        get: |s| s.udp_pps_polled,
        target: Some(1.2),
        lower_is_better: false,
    },
    MasqFigure {
        name: "TCP_RR p50 latency",
        key: "rr_p50",
        unit: "µs",
        scale: 1.0,
        decimals: 0,
        get: |s| s.rr_p50,
        target: None,
        lower_is_better: true,
    },
];

/// The masquerade comparison: eBPF ÷ iptables per figure as the median of the ratios paired
/// within each repetition, with their min–max, next to the issue's targets; then the memory per
/// NAT entry. Markdown and JSON.
fn masquerade_report(
    ebpf: &[Sample],
    iptables: &[Sample],
    nat_memory: Option<NatMemory>,
    drops: &BTreeMap<String, u64>,
) -> (String, Value) {
    let mut md = String::from(
        "\nMasquerade, pod to a host outside the pod network (198.18.0.200): the eBPF masquerade (ebpf-masq) against flanneld's iptables `MASQUERADE --random-fully` (iptables-masq), eBPF ÷ iptables:\n\n| figure | ebpf-masq | iptables-masq | eBPF ÷ iptables (median) | min–max of paired ratios | target | met |\n|---|---|---|---|---|---|---|\n",
    );
    let mut figures = serde_json::Map::new();
    for f in &MASQ_FIGURES {
        let ratios: Vec<f64> = ebpf
            .iter()
            .zip(iptables)
            .map(|(a, b)| (f.get)(a) / (f.get)(b))
            .collect();
        let e: Vec<f64> = ebpf.iter().map(f.get).collect();
        let i: Vec<f64> = iptables.iter().map(f.get).collect();
        let (e, i) = (stats(&e).0, stats(&i).0);
        let (ratio, lo, hi) = stats(&ratios);
        let (target, met) = match f.target {
            Some(t) => (
                format!("≥ {t:.1} ×"),
                if lo >= t {
                    "yes (every repetition)"
                } else if ratio >= t {
                    "yes (median)"
                } else {
                    "no"
                },
            ),
            None if f.lower_is_better => ("— (lower is better)".into(), "—"),
            None => ("—".into(), "—"),
        };
        let decimals = f.decimals;
        let _ = writeln!(
            md,
            "| {} ({}) | {:.decimals$} | {:.decimals$} | {ratio:.2} | {lo:.2}–{hi:.2} | {target} | {met} |",
            f.name,
            f.unit,
            e * f.scale,
            i * f.scale,
        );
        figures.insert(
            f.key.to_string(),
            json!({
                "ebpf": e, "iptables": i, "ratio_median": ratio, "ratio_min": lo,
                "ratio_max": hi, "paired_ratios": ratios, "target_min_ratio": f.target,
            }),
        );
    }
    let _ = writeln!(
        md,
        "\neBPF ÷ iptables: the median over {} repetition(s) of the ratio of the two paths' figures within a repetition (measured a few seconds apart), and the min–max of those ratios. Targets, the issue's: TCP_CRR and 64-byte UDP ≥ 1.2 × iptables, TCP (1 stream) ≥ 1.0 ×; \"yes (median)\": some repetitions fell short.",
        ebpf.len().min(iptables.len())
    );
    let drop_list: Vec<String> = drops.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let _ = writeln!(
        md,
        "\nPackets the ebpf-masq node's programs dropped over the whole run (`flannel-agent --stats`): {}.",
        if drop_list.is_empty() {
            "none".to_string()
        } else {
            drop_list.join(", ")
        }
    );
    if drops.contains_key("drop_nat_no_port") {
        md.push_str("drop_nat_no_port: a new flow found no free port of the range for its remote address and port (a closed flow keeps its port 120 s), so its SYN was dropped and retried a second later, which a TCP_CRR run of a second or two shows.\n");
    }
    let nat_json = if let Some(m) = nat_memory {
        let per_entry = m.bytes_memlock as f64 / m.max_entries.max(1) as f64;
        let prealloc = if m.preallocated {
            "a preallocated hash, so all of it whatever the number of flows"
        } else {
            "a hash allocated as entries are made (`BPF_F_NO_PREALLOC`), so what it held then"
        };
        let _ = writeln!(
            md,
            "\nMemory of the eBPF masquerade table (`bpftool -j map show pinned <pins>/FLANNEL_NAT` on the ebpf-masq node after the runs; {prealloc}): {} bytes (`bytes_memlock`) for {} entries (`max_entries`), {per_entry:.0} bytes per entry, {:.0} bytes per masqueraded flow (two entries).",
            m.bytes_memlock,
            m.max_entries,
            2.0 * per_entry
        );
        json!({
            "bytes_memlock": m.bytes_memlock, "max_entries": m.max_entries,
            "preallocated": m.preallocated,
            "bytes_per_entry": per_entry, "bytes_per_flow": 2.0 * per_entry,
        })
    } else {
        md.push_str("\nMemory of the eBPF masquerade table: not read (see the log).\n");
        Value::Null
    };
    (
        md,
        json!({ "figures": figures, "nat_table": nat_json, "ebpf_node_drops": drops }),
    )
}

/// (run time ns, run count) of each BPF program attached through the pinned links under the
/// given pin directories, by program name.
fn bpf_stats(pins: &[std::path::PathBuf]) -> BTreeMap<String, (u64, u64)> {
    let mut ids = Vec::new();
    for dir in pins {
        for entry in std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            if !entry.file_name().to_string_lossy().starts_with("link-") {
                continue;
            }
            let Ok(out) = run(
                "bpftool",
                &[
                    "-j",
                    "link",
                    "show",
                    "pinned",
                    &entry.path().to_string_lossy(),
                ],
            ) else {
                continue;
            };
            let v: Value = serde_json::from_str(&out).unwrap_or_default();
            if let Some(id) = v["prog_id"].as_u64() {
                ids.push(id);
            }
        }
    }
    let mut stats: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for id in ids {
        let Ok(out) = run("bpftool", &["-j", "prog", "show", "id", &id.to_string()]) else {
            continue;
        };
        let v: Value = serde_json::from_str(&out).unwrap_or_default();
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let e = stats.entry(name).or_default();
        e.0 += v["run_time_ns"].as_u64().unwrap_or(0);
        e.1 += v["run_cnt"].as_u64().unwrap_or(0);
    }
    stats
}

fn measure(
    p: &Path_,
    baseline: &Path_,
    seconds: u32,
    profile: Option<&Path>,
    progress: &mut dyn FnMut(&str),
) -> Result<Sample> {
    let secs = f64::from(seconds);
    let mut s = Sample::default();
    let steal0 = cpu_steal()?;
    progress("TCP, 1 stream");
    let perf = match profile {
        Some(dir) => Some(
            std::process::Command::new("perf")
                .args(["record", "-q", "-a", "-g", "-e", "cpu-clock", "-o"])
                .arg(dir.join(format!("perf-{}.data", p.name)))
                .args(["--", "sleep", &seconds.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("perf record (is linux-perf installed?)")?,
        ),
        None => None,
    };
    let before = bpf_stats(&p.nodes);
    let (busy0, total0) = traffic::cpu_jiffies()?;
    s.tcp = iperf3(&p.client.netns, p.server.ip, seconds, 1)?;
    let (busy1, total1) = traffic::cpu_jiffies()?;
    if let Some(mut perf) = perf {
        perf.wait()?;
    }
    let after = bpf_stats(&p.nodes);
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let busy_cores = (busy1 - busy0) as f64 / ((total1 - total0).max(1)) as f64 * cpus;
    s.cpu_per_gbit = busy_cores / s.tcp.max(1e-9);
    s.program_ns_tcp = per_run(&before, &after);
    if let Some(mss) = p.segment {
        progress("TCP, 1 stream, the baseline with this path's segment size");
        s.tcp_baseline_segment = iperf3_with(
            &baseline.client.netns,
            baseline.server.ip,
            seconds,
            1,
            &["-M", &mss.to_string()],
        )?;
    }
    progress("TCP, 4 streams");
    s.tcp4 = iperf3(&p.client.netns, p.server.ip, seconds, 4)?;
    progress("TCP_RR");
    let rr = traffic::tcp_rr(&p.client, &p.server, secs, 1)?;
    (s.rr_p50, s.rr_p99, s.rr_per_s) = (rr.p50_us, rr.p99_us, rr.per_s);
    progress("TCP_CRR");
    s.crr = traffic::tcp_crr(&p.client, &p.server, secs.min(2.0))?;
    progress("UDP 64-byte packets");
    let before = bpf_stats(&p.nodes);
    s.udp_pps = traffic::udp_pps(
        &p.client,
        &p.server,
        secs.min(2.0),
        64,
        UdpReceiver::Blocking,
    )?;
    s.program_ns = per_run(&before, &bpf_stats(&p.nodes));
    progress("UDP 64-byte packets, polling receiver");
    s.udp_pps_polled = traffic::udp_pps(
        &p.client,
        &p.server,
        secs.min(2.0),
        64,
        UdpReceiver::Polling,
    )?;
    let steal1 = cpu_steal()?;
    s.steal_share = (steal1.0 - steal0.0) as f64 / ((steal1.1 - steal0.1).max(1)) as f64;
    Ok(s)
}

/// (steal, total) jiffies over all CPUs, from `/proc/stat`'s first line.
fn cpu_steal() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    anyhow::ensure!(v.len() >= 8, "/proc/stat: no steal column");
    Ok((v[7], v.iter().take(8).sum()))
}

/// Each figure's samples of one path, by the key `results.json` gives it.
fn figure_samples(samples: &[Sample]) -> Samples {
    let column = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let mut out = Samples::from([
        ("tcp_gbit_s", column(|s| s.tcp)),
        ("tcp4_gbit_s", column(|s| s.tcp4)),
        ("rr_p50_us", column(|s| s.rr_p50)),
        ("rr_p99_us", column(|s| s.rr_p99)),
        ("rr_per_s", column(|s| s.rr_per_s)),
        ("crr_per_s", column(|s| s.crr)),
        ("udp_pps", column(|s| s.udp_pps)),
        ("udp_pps_polled", column(|s| s.udp_pps_polled)),
        ("cpu_per_gbit", column(|s| s.cpu_per_gbit)),
        ("steal_share", column(|s| s.steal_share)),
    ]);
    if samples.iter().any(|s| s.tcp_baseline_segment > 0.0) {
        out.insert(
            compare::BASELINE_SEGMENT_KEY,
            column(|s| s.tcp_baseline_segment),
        );
    }
    out
}

/// The agent's resident memory and map-sync time with `n` leases (fake peers added to its lease
/// file in one change).
/// The agent at a lease count: memory, map-sync time, and `/metrics` scraped once a second.
struct AgentScale {
    rss_mib: f64,
    sync_ms: f64,
    /// Median and slowest scrape of `/metrics` (connect, request, whole answer), ms.
    scrape_ms: (f64, f64),
    /// The agent's CPU time while scraped once a second, as a share of one core.
    cpu_share: f64,
}

/// The health/metrics port of the scale test's agent.
const METRICS_PORT: u16 = 9101;

/// `GET /metrics` from inside `netns`: how long the whole answer took, in ms.
fn scrape_ms(netns: &str) -> Result<f64> {
    use std::io::{Read as _, Write as _};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], METRICS_PORT));
    let started = std::time::Instant::now();
    let mut conn = flannel_tests::with_netns(netns, move || {
        Ok(std::net::TcpStream::connect_timeout(
            &addr,
            Duration::from_secs(2),
        )?)
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut body = Vec::new();
    conn.read_to_end(&mut body)?;
    anyhow::ensure!(
        body.starts_with(b"HTTP/1.1 200"),
        "/metrics did not answer 200"
    );
    Ok(started.elapsed().as_secs_f64() * 1e3)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 14 and 15 of stat(5), counted from the state (field 3) here.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(tick(11) + tick(12))
}

fn agent_scale(n: usize, scrapes: u32) -> Result<AgentScale> {
    let mut options = Options::vxlan(&[NodeKind::Ebpf], 0);
    options.agent_args = vec!["--healthz-port".into(), METRICS_PORT.to_string()];
    options.net_conf =
        r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#.into();
    let tb = Testbed::start("scale", options)?;
    let node = &tb.nodes[0];
    let mut leases = vec![json!({
        "Subnet": node.subnet, "PublicIP": node.public_ip.to_string(), "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": node.vtep_mac},
    })];
    for i in 0..n {
        leases.push(json!({
            "Subnet": format!("10.{}.{}.0/24", 100 + i / 256, i % 256),
            "PublicIP": format!("198.19.{}.{}", i / 200, i % 200 + 1),
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": format!("0e:aa:00:00:{:02x}:{:02x}", i >> 8, i & 0xff)},
        }));
    }
    let before = tb.log(0).matches("leases changed").count();
    let tmp = tb.dir.join(".l.tmp");
    std::fs::write(&tmp, json!({ "leases": leases }).to_string())?;
    std::fs::rename(&tmp, tb.leases_path())?;
    flannel_tests::wait_for(
        "the agent applying the leases",
        Duration::from_mins(1),
        || tb.log(0).matches("leases changed").count() > before,
    )?;
    let log = tb.log(0);
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("leases changed"))
        .ok_or_else(|| anyhow!("no sync line"))?;
    let took = line
        .split("took=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .ok_or_else(|| anyhow!("no took= in {line}"))?;
    let ms = parse_duration_ms(took)?;
    // Let the host routes (one per lease) settle too, then scrape /metrics once a second, as a
    // Prometheus would, timing each scrape and the agent's CPU meanwhile; then read the memory.
    std::thread::sleep(Duration::from_secs(2));
    let pid = tb.agent_pid(0).ok_or_else(|| anyhow!("no agent"))?;
    let ticks0 = cpu_ticks(pid)?;
    let started = std::time::Instant::now();
    let mut times = Vec::new();
    for _ in 0..scrapes {
        let t = std::time::Instant::now();
        times.push(scrape_ms(&node.netns)?);
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    let hz = 100.0; // USER_HZ
    let cpu_share = (cpu_ticks(pid)? - ticks0) as f64 / hz / started.elapsed().as_secs_f64();
    let slowest = times.iter().copied().fold(0.0, f64::max);
    let scrape = (median(&mut times), slowest);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS"))?;
    Ok(AgentScale {
        rss_mib: rss_kib / 1024.0,
        sync_ms: ms,
        scrape_ms: scrape,
        cpu_share,
    })
}

/// A Debug-printed `Duration` (`12.3ms`, `1.2s`, `850µs`) in milliseconds.
/// One program's `BPF_PROG_TEST_RUN` cost, from flannel-agent's `program_cost` bench target.
struct Cost {
    name: String,
    median_ns: f64,
    p90_ns: f64,
    /// Less the harness's own share of a one-run timing.
    net_ns: f64,
    /// The mean of the middle 80 % of the calls.
    trimmed_mean_ns: f64,
    /// Half the new object's loads ÷ the other half: what where a load lands does to the figure.
    load_to_load: Option<Ratio>,
    /// The same case on the baseline object, timed in the same rounds.
    baseline: Option<BaselineCost>,
    /// Why the baseline object could not run this case.
    baseline_error: Option<String>,
}

/// A case on the baseline object, and the per-round paired ratios new ÷ baseline.
struct BaselineCost {
    median_ns: f64,
    trimmed_mean_ns: f64,
    ratio: Ratio,
    /// Of the costs less the harness overhead (the same for both objects).
    net_ratio: Ratio,
}

/// Per-round paired ratios: their median, min–max and a 95 % bootstrap interval of the median.
struct Ratio {
    median: f64,
    min: f64,
    max: f64,
    ci95: (f64, f64),
}

impl Ratio {
    fn json(&self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max,
               "ci95_low": self.ci95.0, "ci95_high": self.ci95.1})
    }
}

/// `BPF_PROG_TEST_RUN` figures: the harness's share of a one-run timing, the pass path over
/// repeated runs, and each program's cost.
struct Costs {
    overhead_ns: f64,
    overhead_xdp_ns: f64,
    pass_repeated_ns: f64,
    pass_repeated_xdp_ns: f64,
    /// What `kernel.bpf_stats_enabled` adds to each run of a program.
    stats_overhead_ns: f64,
    programs: Vec<Cost>,
    /// Rounds of calls, each case (and its baseline counterpart) once per round.
    rounds: usize,
    /// Loads of each object timed (several with a baseline).
    loads: usize,
    /// Why the baseline object did not load, if one was given.
    baseline_error: Option<String>,
}

/// Runs flannel-agent's `program_cost` bench target (it embeds the eBPF object, which xtask does
/// not, so that xtask builds before the bootstrap) and reads its JSON; with `baseline`, that
/// object is timed beside the embedded one.
fn program_cost(calls: usize, baseline: Option<&Path>) -> Result<Costs> {
    let mut cmd = crate::cargo_release("bench");
    match baseline {
        Some(object) => cmd.env("FLANNEL_BASELINE_OBJECT", object),
        None => cmd.env_remove("FLANNEL_BASELINE_OBJECT"),
    };
    let out = cmd
        .args([
            "--quiet",
            "-p",
            "flannel-agent",
            "--bench",
            "program_cost",
            "--",
        ])
        .args(["--calls", &calls.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo bench --bench program_cost")?;
    anyhow::ensure!(out.status.success(), "program_cost failed: {}", out.status);
    let v: Value = serde_json::from_slice(&out.stdout).context("program_cost output")?;
    let num = |v: &Value, k: &str| v[k].as_f64().ok_or_else(|| anyhow!("program_cost: no {k}"));
    let ratio = |v: &Value| -> Result<Ratio> {
        Ok(Ratio {
            median: num(v, "median")?,
            min: num(v, "min")?,
            max: num(v, "max")?,
            ci95: (num(v, "ci95_low")?, num(v, "ci95_high")?),
        })
    };
    let programs = v["programs"]
        .as_array()
        .ok_or_else(|| anyhow!("program_cost printed no programs"))?
        .iter()
        .map(|c| {
            Ok(Cost {
                name: c["name"]
                    .as_str()
                    .ok_or_else(|| anyhow!("no name"))?
                    .to_string(),
                median_ns: num(c, "median_ns")?,
                p90_ns: num(c, "p90_ns")?,
                net_ns: num(c, "net_ns")?,
                trimmed_mean_ns: num(c, "trimmed_mean_ns")?,
                load_to_load: match &c["load_to_load"] {
                    Value::Null => None,
                    r => Some(ratio(r)?),
                },
                baseline: match &c["baseline"] {
                    Value::Null => None,
                    b => Some(BaselineCost {
                        median_ns: num(b, "median_ns")?,
                        trimmed_mean_ns: num(b, "trimmed_mean_ns")?,
                        ratio: ratio(&b["ratio"])?,
                        net_ratio: ratio(&b["net_ratio"])?,
                    }),
                },
                baseline_error: c["baseline_error"].as_str().map(str::to_string),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Costs {
        overhead_ns: num(&v, "harness_overhead_ns")?,
        overhead_xdp_ns: num(&v, "harness_overhead_xdp_ns")?,
        pass_repeated_ns: num(&v, "pass_repeated_ns")?,
        pass_repeated_xdp_ns: num(&v, "pass_repeated_xdp_ns")?,
        stats_overhead_ns: num(&v, "bpf_stats_overhead_ns")?,
        programs,
        rounds: v["rounds"].as_u64().unwrap_or(0) as usize,
        loads: v["loads"].as_u64().unwrap_or(1) as usize,
        baseline_error: v["baseline_error"].as_str().map(str::to_string),
    })
}

/// The issue's bound on the per-packet program cost: new ÷ baseline.
const COST_TARGET: f64 = 1.05;

/// What the program costs are compared with.
pub enum CostBaseline {
    /// `--cost-baseline none`.
    Skipped,
    /// The revision's object could not be built.
    Failed { rev: String, why: String },
    Built {
        rev: String,
        commit: String,
        object: std::path::PathBuf,
    },
}

impl CostBaseline {
    /// Builds `rev`'s object (`None`: skipped); a failure is kept, to be reported.
    fn build(rev: Option<&str>) -> Self {
        let Some(rev) = rev else {
            return Self::Skipped;
        };
        match crate::baseline::object(rev) {
            Ok((commit, object)) => Self::Built {
                rev: rev.to_string(),
                commit,
                object,
            },
            Err(e) => {
                say(&format!(
                    "the baseline revision's eBPF object could not be built: {e:#}"
                ));
                Self::Failed {
                    rev: rev.to_string(),
                    why: format!("{e:#}"),
                }
            }
        }
    }

    fn object(&self) -> Option<&Path> {
        match self {
            Self::Built { object, .. } => Some(object),
            _ => None,
        }
    }
}

/// The comparison with the baseline when there is none: markdown and JSON saying why.
fn cost_not_measured(rev: Option<&str>, why: &str) -> (String, Value) {
    let md = format!(
        "\nPer-packet program cost against a baseline revision ({}): not measured: {why}. The target (≤ {COST_TARGET:.2} × the baseline's) is not shown as met.\n",
        rev.unwrap_or("none")
    );
    let json = json!({
        "baseline_revision": rev, "measured": false, "reason": why,
        "target_max_ratio": COST_TARGET, "met": Value::Null,
    });
    (md, json)
}

/// The per-packet cost of each case against the baseline object's, timed in the same run:
/// markdown and JSON. Never "met" without a measurement.
#[expect(
    clippy::too_many_lines,
    reason = "one table: its explanation, a row per case, the verdict"
)]
fn cost_comparison(costs: &Costs, baseline: &CostBaseline) -> (String, Value) {
    let not_measured = cost_not_measured;
    let (rev, commit) = match baseline {
        CostBaseline::Skipped => return not_measured(None, "skipped (`--cost-baseline none`)"),
        CostBaseline::Failed { rev, why } => {
            return not_measured(
                Some(rev),
                &format!("the baseline could not be built: {why}"),
            );
        }
        CostBaseline::Built { rev, commit, .. } => (rev, commit),
    };
    if let Some(e) = &costs.baseline_error {
        return not_measured(
            Some(rev),
            &format!("the baseline object did not load and set up: {e}"),
        );
    }
    let short = &commit[..commit.len().min(12)];
    let mut md = format!(
        "\nPer-packet program cost against the baseline revision {rev} (commit {short}): both objects timed in this run, because this VM's speed drifts between runs by more than the difference sought; each loaded {loads} times, in a random order (where a load's JIT images and maps land moves a program's cost by several per cent, the same in every run for the same order of loads), every case run on every load of both, in a random order, in each of {rounds} rounds of 50 calls. ns: median (and trimmed mean, of the middle 80 %) of all calls. new ÷ baseline: the median over rounds of the ratio of the two objects' figures in a round (the mean over loads of each load's trimmed mean; the kernel's timings come in steps of about 10 ns here, so a round's median would be one step or the next), the 95 % bootstrap interval of that median (round-to-round noise only), and the min–max over rounds; also less the harness overhead (the same subtracted from both). A/A: the new object against itself the same way, half of its loads ÷ the other half: the placement noise the interval does not show (1.000 if placement did not matter; the comparison averages twice as many loads per side). Target (issue 13): ≤ {COST_TARGET:.2} × the baseline's per-packet cost, judged on the median ratio of the per-packet figures.\n\n| program, packet | new ns | baseline ns | new ÷ baseline (median) | 95 % interval | min–max of rounds | less harness overhead (median, 95 % interval) | A/A: new ÷ new | target | met |\n|---|---|---|---|---|---|---|---|---|---|\n",
        loads = costs.loads,
        rounds = costs.rounds
    );
    let mut cases = serde_json::Map::new();
    let (mut measured, mut met, mut missed) = (0, 0, Vec::new());
    for c in &costs.programs {
        let Some(b) = &c.baseline else {
            let why = c
                .baseline_error
                .as_deref()
                .unwrap_or("no baseline figure")
                .replace('|', "\\|");
            let _ = writeln!(
                md,
                "| {} | {:.0} | — | not measured: {why} | — | — | — | — | ≤ {COST_TARGET:.2} | not measured |",
                c.name, c.median_ns
            );
            cases.insert(
                c.name.clone(),
                json!({"new_ns": c.median_ns, "measured": false, "reason": why}),
            );
            missed.push(c.name.clone());
            continue;
        };
        let (r, n) = (&b.ratio, &b.net_ratio);
        let ok = r.median <= COST_TARGET;
        measured += 1;
        if ok {
            met += 1;
        } else {
            missed.push(c.name.clone());
        }
        let _ = writeln!(
            md,
            "| {} | {:.0} ({:.1}) | {:.0} ({:.1}) | {:.3} | {:.3}–{:.3} | {:.2}–{:.2} | {:.3} ({:.3}–{:.3}) | {} | ≤ {COST_TARGET:.2} | {} |",
            c.name,
            c.median_ns,
            c.trimmed_mean_ns,
            b.median_ns,
            b.trimmed_mean_ns,
            r.median,
            r.ci95.0,
            r.ci95.1,
            r.min,
            r.max,
            n.median,
            n.ci95.0,
            n.ci95.1,
            c.load_to_load
                .as_ref()
                .map_or_else(|| "—".into(), |l| format!("{:.3}", l.median)),
            if ok { "yes" } else { "no" }
        );
        cases.insert(
            c.name.clone(),
            json!({
                "new_ns": c.median_ns, "baseline_ns": b.median_ns,
                "new_trimmed_mean_ns": c.trimmed_mean_ns,
                "baseline_trimmed_mean_ns": b.trimmed_mean_ns, "measured": true,
                "ratio": r.json(), "net_ratio": n.json(), "met": ok,
                "load_to_load": c.load_to_load.as_ref().map(Ratio::json),
            }),
        );
    }
    let all = measured == costs.programs.len() && met == measured;
    let _ = writeln!(
        md,
        "\nTarget ≤ {COST_TARGET:.2} × baseline: {}.",
        if all {
            format!("met by all {measured} cases")
        } else {
            format!(
                "not met by every case ({met} of {} met; not met or not measured: {})",
                costs.programs.len(),
                missed.join(", ")
            )
        }
    );
    let json = json!({
        "baseline_revision": rev, "baseline_commit": commit, "measured": true,
        "rounds": costs.rounds, "loads": costs.loads, "target_max_ratio": COST_TARGET,
        "met": all, "cases": cases,
    });
    (md, json)
}

fn parse_duration_ms(s: &str) -> Result<f64> {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic() || c == 'µ')
        .map(|i| s.split_at(i))
        .ok_or_else(|| anyhow!("bad duration {s}"))?;
    let v: f64 = num.parse()?;
    Ok(match unit {
        "s" => v * 1e3,
        "ms" => v,
        "µs" | "us" => v / 1e3,
        "ns" => v / 1e6,
        _ => return Err(anyhow!("bad duration {s}")),
    })
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    let med = median(&mut s);
    (med, s[0], s[s.len() - 1])
}

/// Enables the kernel's BPF run-time statistics for the run and restores the setting after.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Self {
        const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";
        let old = std::fs::read_to_string(PATH).unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(PATH, "1");
        Self(old.trim().to_string())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// The program costs measured by `BPF_PROG_TEST_RUN`, with the harness overhead and the
/// masquerade target.
fn cost_table(costs: &Costs) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "| program, packet (BPF_PROG_TEST_RUN, one run per call) | ns per packet (median) | p90 | less harness overhead |\n|---|---|---|---|"
    );
    for c in &costs.programs {
        let _ = writeln!(
            table,
            "| {} | {:.0} | {:.0} | {:.0} |",
            c.name, c.median_ns, c.p90_ns, c.net_ns
        );
    }
    let _ = writeln!(
        table,
        "\n`kernel.bpf_stats_enabled` adds {:.0} ns to each run of a program (measured on the pass path): a full run's BPF run times under traffic include it.",
        costs.stats_overhead_ns
    );
    let _ = writeln!(
        table,
        "\nHarness overhead of a one-run timing, subtracted in the last column: tc {:.0} ns (the pass path one run per call, {:.0} ns, minus the same over 1,000 runs per call, {:.0} ns), XDP {:.0} ns ({:.0} minus {:.0} ns).",
        costs.overhead_ns,
        costs.overhead_ns + costs.pass_repeated_ns,
        costs.pass_repeated_ns,
        costs.overhead_xdp_ns,
        costs.overhead_xdp_ns + costs.pass_repeated_xdp_ns,
        costs.pass_repeated_xdp_ns
    );
    if let Some(snat) = costs
        .programs
        .iter()
        .find(|c| c.name == "to_wire: SNAT (established flow)")
    {
        let _ = writeln!(
            table,
            "\nMasquerade target (the issue's): `to_wire` SNAT of an established flow ≤ 150 ns less harness overhead; measured {:.0} ns ({}).",
            snat.net_ns,
            if snat.net_ns <= 150.0 {
                "met"
            } else {
                "not met"
            }
        );
    }
    table
}

/// What `cargo xtask bench` was asked for.
#[expect(
    clippy::struct_excessive_bools,
    reason = "one field per command-line switch of `cargo xtask bench`"
)]
pub struct Opts {
    pub quick: bool,
    pub reps: Option<usize>,
    /// Paths to measure besides baseline and kernel-vxlan (all when empty).
    pub only: Vec<String>,
    /// `perf record` every single-stream TCP run.
    pub profile: bool,
    /// The git revision whose eBPF object the program costs are compared with (`None`: skip).
    pub cost_baseline: Option<String>,
    /// Only the program costs and their comparison (`program-cost.md` / `.json`).
    pub cost_only: bool,
    /// Only the agent's memory and map sync at scale (`agent-scale.md` / `.json`).
    pub agent_only: bool,
    /// An earlier run's `results.json`: print the change of every figure against it.
    pub compare: Option<std::path::PathBuf>,
}

#[expect(clippy::too_many_lines, reason = "one linear report")]
pub fn bench(opts: &Opts, out: &Path) -> Result<()> {
    let quick = opts.quick;
    anyhow::ensure!(
        opts.compare.is_none() || !(opts.agent_only || opts.cost_only),
        "--compare compares the paths' figures: it needs a run that measures them (not --agent-only or --cost-only)"
    );
    // Read first: a typo in the path should not cost a whole run.
    let old = match &opts.compare {
        Some(file) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--compare {}", file.display()))?;
            Some(
                serde_json::from_str::<Value>(&text)
                    .with_context(|| format!("--compare {}: not JSON", file.display()))?,
            )
        }
        None => None,
    };
    if opts.agent_only {
        return agent_only(quick, out);
    }
    let reps = opts.reps.unwrap_or(if quick { 1 } else { 5 });
    let seconds: u32 = if quick { 1 } else { 3 };
    // First, on a quiet machine: with the clusters up (their agents, wireguard-go) the same
    // timings come out 20-40 % higher and spread wider.
    let cost_baseline = CostBaseline::build(opts.cost_baseline.as_deref());
    say("measuring per-packet program cost (BPF_PROG_TEST_RUN)");
    let costs = program_cost(if quick { 2_000 } else { 20_000 }, cost_baseline.object())?;
    let (vs_baseline_md, vs_baseline) = cost_comparison(&costs, &cost_baseline);
    if opts.cost_only {
        let vs_baseline_md = format!("{}{vs_baseline_md}", cost_table(&costs));
        println!("{vs_baseline_md}");
        std::fs::create_dir_all(out)?;
        std::fs::write(out.join("program-cost.md"), &vs_baseline_md)?;
        std::fs::write(
            out.join("program-cost.json"),
            serde_json::to_string_pretty(&vs_baseline)?,
        )?;
        say(&format!(
            "wrote {0}/program-cost.md and {0}/program-cost.json",
            out.display()
        ));
        return Ok(());
    }
    say(
        "building the clusters: vxlan (XDP decap), vxlan (tc decap) + netlink nodes, vxlan (generic XDP decap), host-gw + netlink nodes, ipip, udp, wireguard, masquerade (eBPF), masquerade (iptables)",
    );
    let (e, n) = (NodeKind::Ebpf, NodeKind::Netlink);
    let vx = Backend::Vxlan {
        direct_routing: false,
    };
    let vx_xdp = cluster("bvx", vx, &[e, e], "xdp")?;
    let vx_tc = cluster("bvt", vx, &[e, e, n, n], "tc")?;
    let vx_gen = cluster("bvg", vx, &[e, e], "xdp-generic")?;
    let hg = cluster("bhg", Backend::HostGw, &[e, e, n, n], "tc")?;
    let ipip = cluster(
        "bip",
        Backend::Ipip {
            direct_routing: false,
        },
        &[e, e],
        "tc",
    )?;
    let udp = cluster("bud", Backend::Udp, &[e, e], "tc")?;
    let wg = cluster("bwg", Backend::Wireguard, &[e, e], "tc")?;
    let (masq_ebpf, outside_ebpf) = masq_cluster("bme", e)?;
    let (masq_ipt, outside_ipt) = masq_cluster("bmi", n)?;
    let nodes = |tb: &Testbed, a: usize, b: usize| vec![tb.nodes[a].pins(), tb.nodes[b].pins()];
    let path = |name, tb: &Testbed, a, b| Path_ {
        name,
        client: pod_end(tb, a),
        server: pod_end(tb, b),
        nodes: nodes(tb, a, b),
        segment: segment(tb.options.backend.overhead()),
    };
    let paths = vec![
        Path_ {
            name: "baseline",
            client: End {
                netns: vx_tc.nodes[0].netns.clone(),
                ip: vx_tc.nodes[0].public_ip,
            },
            server: End {
                netns: vx_tc.nodes[1].netns.clone(),
                ip: vx_tc.nodes[1].public_ip,
            },
            nodes: Vec::new(),
            segment: None,
        },
        path("kernel-vxlan", &vx_tc, 2, 3),
        path("ebpf-vxlan", &vx_tc, 0, 1),
        path("ebpf-vxlan-xdp", &vx_xdp, 0, 1),
        path("ebpf-vxlan-xdp-generic", &vx_gen, 0, 1),
        path("kernel-host-gw", &hg, 2, 3),
        path("ebpf-host-gw", &hg, 0, 1),
        path("ebpf-ipip", &ipip, 0, 1),
        path("ebpf-udp", &udp, 0, 1),
        path("wireguard", &wg, 0, 1),
        Path_ {
            name: "ebpf-masq",
            client: pod_end(&masq_ebpf, 0),
            server: outside_ebpf,
            nodes: vec![masq_ebpf.nodes[0].pins()],
            segment: segment(masq_ebpf.options.backend.overhead()),
        },
        Path_ {
            name: "iptables-masq",
            client: pod_end(&masq_ipt, 0),
            server: outside_ipt,
            nodes: Vec::new(),
            segment: segment(masq_ipt.options.backend.overhead()),
        },
    ];
    for name in &opts.only {
        anyhow::ensure!(
            paths.iter().any(|p| p.name == name),
            "--only: no path {name} (paths: {})",
            paths.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
        );
    }
    let paths: Vec<Path_> = paths
        .into_iter()
        .filter(|p| {
            opts.only.is_empty()
                || matches!(p.name, "baseline" | "kernel-vxlan")
                || opts.only.iter().any(|o| o == p.name)
        })
        .collect();
    std::fs::create_dir_all(out)?;
    let profile = opts.profile.then_some(out);
    let _servers: Vec<Iperf3Server> = paths
        .iter()
        .map(|p| Iperf3Server::start(&p.server.netns, &vx_tc.dir))
        .collect::<Result<_>>()?;
    let stats_on = BpfStats::enable();
    let per_measure = 3.5 * f64::from(seconds) + 2.0 * f64::from(seconds).min(2.0) + 3.0;
    let total = reps * paths.len();
    let baseline = paths
        .iter()
        .find(|p| p.name == "baseline")
        .context("the baseline path is always measured")?;
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); paths.len()];
    let started = std::time::Instant::now();
    for rep in 0..reps {
        for k in 0..paths.len() {
            let idx = (k + rep) % paths.len();
            let p = &paths[idx];
            let done = rep * paths.len() + k;
            let left = (total - done) as f64 * per_measure;
            let mut progress = |what: &str| {
                eprintln!(
                    "xtask: [{}/{total}] {} — {what} (about {left:.0} s left)",
                    done + 1,
                    p.name
                );
            };
            samples[idx].push(
                measure(p, baseline, seconds, profile, &mut progress).with_context(|| p.name)?,
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // The eBPF masquerade node's drop counters (a port search that failed, a full table).
    let masq_drops: BTreeMap<String, u64> = match masq_ebpf.stats(0) {
        Ok(stats) => stats
            .into_iter()
            .filter(|(k, n)| k.starts_with("drop_") && *n > 0)
            .collect(),
        Err(e) => {
            say(&format!(
                "could not read the ebpf-masq node's counters: {e:#}"
            ));
            BTreeMap::new()
        }
    };
    let nat_memory = match nat_table_memory(&masq_ebpf.nodes[0].pins()) {
        Ok(m) => Some(m),
        Err(e) => {
            say(&format!("could not read the NAT table's memory: {e:#}"));
            None
        }
    };
    // Off again: it would add its own cost to the test-run timings below.
    drop(stats_on);
    let (agent, agent_rows, scrapes) = agent_report(quick)?;
    // Report.
    let field =
        |i: usize, f: fn(&Sample) -> f64| -> Vec<f64> { samples[i].iter().map(f).collect() };
    let by_path: BTreeMap<&str, Samples> = paths
        .iter()
        .zip(&samples)
        .map(|(p, s)| (p.name, figure_samples(s)))
        .collect();
    let order: Vec<&str> = paths.iter().map(|p| p.name).collect();
    let (ratio_md, ratios) = compare::ratio_table(&order, &by_path);
    let (goals_md, goals) = compare::goals(&by_path);
    let steal: Vec<f64> = samples.iter().flatten().map(|s| s.steal_share).collect();
    let (steal_median, _, steal_max) = stats(&steal);
    let mut table = String::from(
        "| path | TCP Gbit/s (min–max) | 4 streams | RR p50 µs | RR p99 µs | RR/s | CRR/s | UDP kpps | UDP kpps, polling receiver | CPU cores per Gbit/s |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let mut json_paths = serde_json::Map::new();
    for (i, p) in paths.iter().enumerate() {
        let (tcp, lo, hi) = stats(&field(i, |s| s.tcp));
        let tcp4 = stats(&field(i, |s| s.tcp4)).0;
        let p50 = stats(&field(i, |s| s.rr_p50)).0;
        let p99 = stats(&field(i, |s| s.rr_p99)).0;
        let rrs = stats(&field(i, |s| s.rr_per_s)).0;
        let crr = stats(&field(i, |s| s.crr)).0;
        let pps = stats(&field(i, |s| s.udp_pps)).0;
        let pps_polled = stats(&field(i, |s| s.udp_pps_polled)).0;
        let cpu = stats(&field(i, |s| s.cpu_per_gbit)).0;
        let program_ns = median_by_program(&samples[i], |s| &s.program_ns);
        let program_ns_tcp = median_by_program(&samples[i], |s| &s.program_ns_tcp);
        let _ = writeln!(
            table,
            "| {} | {tcp:.2} ({lo:.2}–{hi:.2}) | {tcp4:.2} | {p50:.0} | {p99:.0} | {rrs:.0} | {crr:.0} | {:.0} | {:.0} | {cpu:.2} |",
            p.name,
            pps / 1e3,
            pps_polled / 1e3
        );
        json_paths.insert(
            p.name.to_string(),
            json!({
                "tcp_gbit_s": tcp, "tcp4_gbit_s": tcp4, "rr_p50_us": p50, "rr_p99_us": p99,
                "rr_per_s": rrs, "crr_per_s": crr, "udp_pps": pps, "udp_pps_polled": pps_polled, "cpu_per_gbit": cpu,
                "program_ns": program_ns, "program_ns_tcp_skb": program_ns_tcp,
                "ratios": ratios[p.name], "samples": by_path[p.name],
                compare::BASELINE_SEGMENT_KEY: by_path[p.name]
                    .get(compare::BASELINE_SEGMENT_KEY)
                    .map(|v| stats(v).0),
            }),
        );
    }
    let _ = write!(
        table,
        "\nMedians of {reps} interleaved, rotated repetition(s) of {seconds} s per figure. {elapsed:.0} s of measurements; CPU time stolen by the hypervisor while a path was measured: median {:.1} %, at most {:.1} %.\n\nRatios to the baseline (node to node on the underlay) and to kernel-vxlan (flanneld's device), each the median of the ratios paired within a repetition (the two paths measured a few seconds apart), with the min–max over repetitions (RR p50 and CPU per Gbit/s: lower is better):\n\n{ratio_md}{goals_md}\nBPF run time from `kernel.bpf_stats_enabled` (ns per run): per packet during the 64-byte UDP run, and per skb (GSO super-packets and ACKs) during the single-stream TCP run:\n\n| path | per 64-byte packet | per skb in TCP |\n|---|---|---|\n",
        steal_median * 100.0,
        steal_max * 100.0
    );
    for p in &paths {
        let list = |key: &str| -> String {
            let v: Vec<String> = json_paths[p.name][key]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, ns)| format!("{k} {:.0}", ns.as_f64().unwrap_or(0.0)))
                .collect();
            if v.is_empty() {
                "—".into()
            } else {
                v.join(", ")
            }
        };
        let _ = writeln!(
            table,
            "| {} | {} | {} |",
            p.name,
            list("program_ns"),
            list("program_ns_tcp_skb")
        );
    }
    let position = |name: &str| paths.iter().position(|p| p.name == name);
    let masquerade = match (position("ebpf-masq"), position("iptables-masq")) {
        (Some(with_ebpf), Some(with_iptables)) => {
            let (md, figures) = masquerade_report(
                &samples[with_ebpf],
                &samples[with_iptables],
                nat_memory,
                &masq_drops,
            );
            table.push_str(&md);
            figures
        }
        _ => Value::Null,
    };
    let _ = writeln!(
        table,
        "\nAgent (static lease file, one change adding every lease; then `/metrics` scraped once a second, {scrapes} times; RSS after the scrapes; targets: RSS ≤ 30 MiB, map sync ≤ 1 s, scrape ≤ 10 ms):\n\n| leases | RSS MiB | map sync ms | scrape ms (median) | scrape ms (slowest) | agent CPU % while scraped |\n|---|---|---|---|---|---|\n{agent_rows}"
    );
    table.push_str(&cost_table(&costs));
    table.push_str(&vs_baseline_md);
    table.push_str(
        &crate::fuzz::section(quick).unwrap_or_else(|e| format!("\nFuzzing failed: {e:#}\n")),
    );
    println!("{table}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("results.md"), &table)?;
    let compared = old.as_ref().map(|old| {
        let new = json!({"paths": json_paths, "path_order": order,
            "conditions": {"path_names": 2, "reps": reps, "seconds": seconds},
            "test_run_net_ns": costs.programs.iter().map(|c| (c.name.clone(), json!(c.net_ns))).collect::<serde_json::Map<_, _>>()});
        compare::compare(old, &new)
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let results = json!({
        "paths": json_paths,
        "path_order": order,
        "goals": goals,
        "agent": agent,
        "masquerade": masquerade,
        "test_run_ns": costs.programs.iter().map(|c| (c.name.clone(), json!(c.median_ns))).collect::<serde_json::Map<_, _>>(),
        "test_run_net_ns": costs.programs.iter().map(|c| (c.name.clone(), json!(c.net_ns))).collect::<serde_json::Map<_, _>>(),
        "test_run_harness_overhead_ns": {"tc": costs.overhead_ns, "xdp": costs.overhead_xdp_ns},
        "bpf_stats_overhead_ns": costs.stats_overhead_ns,
        "test_run_vs_baseline": vs_baseline,
        "conditions": {
            "kernel": kernel.trim(),
            "cpus": std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            "underlay_mtu": flannel_tests::UNDERLAY_MTU, "reps": reps, "seconds": seconds,
            "cpu_steal_share_median": steal_median, "cpu_steal_share_max": steal_max,
            // 2: ebpf-vxlan is the default datapath (tc decap), ebpf-vxlan-xdp native XDP.
            "path_names": 2,
            "underlay": "veth pairs on a Linux bridge in a namespace; GSO/GRO at veth defaults (TSO on)",
        },
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("chart.svg"), chart(&paths, &json_paths))?;
    say(&format!(
        "wrote {0}/results.md, {0}/results.json and {0}/chart.svg",
        out.display()
    ));
    if let (Some((md, _)), Some(file)) = (compared, &opts.compare) {
        println!("\nAgainst {}:\n\n{md}", file.display());
        std::fs::write(out.join("compare.md"), &md)?;
        say(&format!("wrote {}/compare.md", out.display()));
    }
    Ok(())
}

/// Bars of TCP throughput and RR p50 latency per path.
fn chart(paths: &[Path_], results: &serde_json::Map<String, Value>) -> String {
    let bar_h = 18.0;
    let gap = 8.0;
    let left = 170.0;
    let width = 360.0;
    let rows = paths.len() as f64;
    let height = 60.0 + 2.0 * (rows * (bar_h + gap)) + 40.0;
    let get = |p: &str, k: &str| results[p][k].as_f64().unwrap_or(0.0);
    let max_tcp = paths
        .iter()
        .map(|p| get(p.name, "tcp_gbit_s"))
        .fold(0.0, f64::max)
        .max(1e-9);
    let max_rr = paths
        .iter()
        .map(|p| get(p.name, "rr_p50_us"))
        .fold(0.0, f64::max)
        .max(1e-9);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{height:.0}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">TCP throughput, 1 stream (Gbit/s)</text>"#,
        left + width + 80.0
    );
    let mut y = 35.0;
    let bars = |s: &mut String, y: &mut f64, key: &str, max: f64, decimals: usize| {
        for p in paths {
            let v = get(p.name, key);
            let w = v / max * width;
            let color = if p.name.starts_with("ebpf") {
                "#2b7bb9"
            } else {
                "#999999"
            };
            let _ = write!(
                s,
                r#"<text x="10" y="{:.0}">{}</text><rect x="{left}" y="{y:.0}" width="{w:.1}" height="{bar_h}" fill="{color}"/><text x="{:.0}" y="{:.0}">{v:.decimals$}</text>"#,
                *y + 13.0,
                p.name,
                left + w + 5.0,
                *y + 13.0
            );
            *y += bar_h + gap;
        }
    };
    bars(&mut s, &mut y, "tcp_gbit_s", max_tcp, 2);
    y += 25.0;
    let _ = write!(
        s,
        r#"<text x="10" y="{y:.0}" font-size="14" font-weight="bold">TCP_RR latency p50 (µs, lower is better)</text>"#
    );
    y += 15.0;
    bars(&mut s, &mut y, "rr_p50_us", max_rr, 0);
    s.push_str("</svg>\n");
    s
}

/// The agent's memory, map sync and `/metrics` scrapes at 10, 1,000 and 5,000 leases: the JSON,
/// the table rows, and the scrapes per lease count.
fn agent_report(quick: bool) -> Result<(serde_json::Map<String, Value>, String, u32)> {
    say(
        "measuring the agent's memory, map sync and /metrics scrapes (once a second) at 10, 1,000 and 5,000 leases",
    );
    let mut agent = serde_json::Map::new();
    let mut agent_rows = String::new();
    let scrapes = if quick { 5 } else { 20 };
    for n in [10, 1000, 5000] {
        let a = agent_scale(n, scrapes)?;
        let (rss, ms, (p50, worst), cpu) = (a.rss_mib, a.sync_ms, a.scrape_ms, a.cpu_share);
        agent.insert(
            n.to_string(),
            json!({"rss_mib": rss, "map_sync_ms": ms, "scrape_ms_p50": p50,
                   "scrape_ms_max": worst, "cpu_share_scraped": cpu}),
        );
        let _ = writeln!(
            agent_rows,
            "| {n} | {rss:.1} | {ms:.1} | {p50:.2} | {worst:.2} | {:.2} |",
            cpu * 100.0
        );
    }
    Ok((agent, agent_rows, scrapes))
}

/// `--agent-only`: [`agent_report`] alone, into `agent-scale.md` / `.json`.
pub fn agent_only(quick: bool, out: &Path) -> Result<()> {
    let (agent, rows, scrapes) = agent_report(quick)?;
    let md = format!(
        "Agent (static lease file, one change adding every lease; then `/metrics` scraped once a second, {scrapes} times; RSS after the scrapes; targets: RSS ≤ 30 MiB, map sync ≤ 1 s, scrape ≤ 10 ms):\n\n| leases | RSS MiB | map sync ms | scrape ms (median) | scrape ms (slowest) | agent CPU % while scraped |\n|---|---|---|---|---|---|\n{rows}"
    );
    println!("{md}");
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("agent-scale.md"), &md)?;
    std::fs::write(
        out.join("agent-scale.json"),
        serde_json::to_string_pretty(&agent)?,
    )?;
    say(&format!(
        "wrote {0}/agent-scale.md and {0}/agent-scale.json",
        out.display()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_from_debug_output() {
        assert!((parse_duration_ms("12.5ms").unwrap() - 12.5).abs() < 1e-9);
        assert!((parse_duration_ms("1.5s").unwrap() - 1500.0).abs() < 1e-9);
        assert!((parse_duration_ms("850µs").unwrap() - 0.85).abs() < 1e-9);
        assert!(parse_duration_ms("abc").is_err());
    }

    /// The comparison with the baseline says "met" only of what it measured.
    #[test]
    fn cost_comparison_never_meets_unmeasured() {
        let ratio = |median| Ratio {
            median,
            min: median,
            max: median,
            ci95: (median, median),
        };
        let cost = |name: &str, r: Option<f64>| Cost {
            name: name.into(),
            median_ns: 100.0,
            p90_ns: 110.0,
            net_ns: 50.0,
            trimmed_mean_ns: 100.0,
            load_to_load: Some(ratio(1.0)),
            baseline: r.map(|r| BaselineCost {
                median_ns: 100.0 / r,
                trimmed_mean_ns: 100.0 / r,
                ratio: ratio(r),
                net_ratio: ratio(r),
            }),
            baseline_error: r.is_none().then(|| "verdict 2 instead of 7".into()),
        };
        let costs = |programs| Costs {
            overhead_ns: 50.0,
            overhead_xdp_ns: 50.0,
            pass_repeated_ns: 10.0,
            pass_repeated_xdp_ns: 10.0,
            stats_overhead_ns: 70.0,
            programs,
            rounds: 40,
            loads: 4,
            baseline_error: None,
        };
        let built = CostBaseline::Built {
            rev: "e6d225e".into(),
            commit: "e6d225e38636aaaa".into(),
            object: "/nonexistent".into(),
        };
        let (md, v) = cost_comparison(&costs(vec![cost("a", Some(1.01))]), &built);
        assert!(md.contains("| yes |") && md.contains("e6d225e"), "{md}");
        assert_eq!(v["met"], true);
        let (md, v) = cost_comparison(&costs(vec![cost("a", Some(1.06)), cost("b", None)]), &built);
        assert!(
            md.contains("| no |") && md.contains("not measured: verdict"),
            "{md}"
        );
        assert_eq!(v["met"], false);
        assert_eq!(v["cases"]["b"]["measured"], false);
        let failed = CostBaseline::Failed {
            rev: "e6d225e".into(),
            why: "revision e6d225e is not in this clone's history".into(),
        };
        let (md, v) = cost_comparison(&costs(vec![cost("a", Some(1.0))]), &failed);
        assert!(
            md.contains("not measured: the baseline could not be built"),
            "{md}"
        );
        assert!(v["met"].is_null() && v["measured"] == false);
    }
}
