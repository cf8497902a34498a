//! `cargo xtask run | test | bench`: each installs what it needs first and says what it does.
mod baseline;
mod bench;
mod bootstrap;
mod compare;
mod fuzz;
mod image;

use std::{
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bootstrap::{say, sh};
use clap::{Parser, Subcommand, ValueEnum};
use flannel_tests::{
    Backend, Iperf3Server, NodeKind, Options, Pod, Testbed, iperf3, ping, summarize, tcp_echo,
    tcp_echo_seen,
};

#[derive(Parser)]
#[command(about = "flannel-ebpf developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Vxlan,
    VxlanDirectrouting,
    HostGw,
    Ipip,
    IpipDirectrouting,
    Udp,
    Wireguard,
}

impl BackendArg {
    fn backend(self) -> Backend {
        match self {
            Self::Vxlan => Backend::Vxlan {
                direct_routing: false,
            },
            Self::VxlanDirectrouting => Backend::Vxlan {
                direct_routing: true,
            },
            Self::HostGw => Backend::HostGw,
            Self::Ipip => Backend::Ipip {
                direct_routing: false,
            },
            Self::IpipDirectrouting => Backend::Ipip {
                direct_routing: true,
            },
            Self::Udp => Backend::Udp,
            Self::Wireguard => Backend::Wireguard,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DecapArg {
    Tc,
    Xdp,
    XdpGeneric,
}

impl DecapArg {
    fn flag(self) -> &'static str {
        match self {
            Self::Tc => "tc",
            Self::Xdp => "xdp",
            Self::XdpGeneric => "xdp-generic",
        }
    }
}

#[derive(Subcommand)]
enum Task {
    /// Build, start a demo cluster of network namespaces with an agent per node, show cross-node
    /// pod traffic and counters, and keep it up until Ctrl-C (or --duration); then clean up.
    Run {
        /// flannel backend of the cluster. With DirectRouting the last node sits on a second
        /// underlay segment, so that its peers tunnel to it and reach the others directly.
        #[arg(long, value_enum, default_value = "vxlan")]
        backend: BackendArg,
        /// Nodes running flannel-agent.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Extra nodes configured as stock flanneld configures them (vxlan: kernel VXLAN device;
        /// host-gw: routes). Default: 1 for vxlan and host-gw, none for the other backends.
        #[arg(long)]
        stock_nodes: Option<usize>,
        /// Extra nodes running flannel-agent with `--dataplane=netlink` (vxlan, host-gw).
        #[arg(long, default_value_t = 0)]
        netlink_nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        #[arg(long, value_enum, default_value = "tc")]
        decap: DecapArg,
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
    },
    /// Unit, `BPF_PROG_TEST_RUN` and end-to-end tests (as root).
    Test,
    /// The container image: a static agent and the tools it runs, as an OCI layout and a
    /// `docker load`-able archive in target/image/ (no registry or container daemon needed).
    Image,
    /// Pod-to-pod TCP throughput through each datapath, interleaved, with ratios.
    Bench {
        /// A short run (fewer, shorter repetitions): a smoke test of the harness.
        #[arg(long)]
        quick: bool,
        #[arg(long)]
        reps: Option<usize>,
        /// Measure only these paths (comma-separated), besides baseline and kernel-vxlan, which
        /// every ratio needs: for investigating one datapath.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Also sample every CPU with `perf record -g` during each single-stream TCP run, into
        /// `target/bench/perf-<path>.data` (read with `perf report -i`).
        #[arg(long)]
        profile: bool,
        /// The git revision whose eBPF programs the per-packet costs are compared with, both
        /// timed in this run (its object is built under target/baseline/); `none` skips it.
        #[arg(long, default_value = "e6d225e")]
        cost_baseline: String,
        /// Only the per-packet program costs against the baseline, into
        /// target/bench/program-cost.md and .json (no clusters).
        #[arg(long)]
        cost_only: bool,
        /// Only the agent's memory, map-sync time and scrapes at 10, 1,000 and 5,000 leases, into
        /// target/bench/agent-scale.md and .json (no clusters).
        #[arg(long)]
        agent_only: bool,
        /// An earlier run's results.json: after this run, print every figure's change against it
        /// (also of its ratio to each run's own baseline path), into target/bench/compare.md.
        #[arg(long, value_name = "OLD.json")]
        compare: Option<PathBuf>,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_stop_handlers() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { sigaction(sig, &action) }?;
    }
    Ok(())
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// The target of every release build: the image's static agent, which the demo and the bench
/// run too, and the bench's test-run and fuzz binaries. One release dependency graph (kube,
/// rustls, etcd-client…), built once, where a glibc and a musl one took minutes each.
pub const RELEASE_TARGET: &str = "x86_64-unknown-linux-musl";

/// `cargo <subcommand> --release --target RELEASE_TARGET` in the workspace (after
/// [`bootstrap::ensure_release_target`]).
fn cargo_release(subcommand: &str) -> Command {
    let mut cmd = cargo();
    cmd.arg(subcommand);
    // `cargo bench` builds with the release settings (its profile inherits them, and shares
    // the artifacts) and takes no `--release`.
    if subcommand != "bench" {
        cmd.arg("--release");
    }
    cmd.args(["--target", RELEASE_TARGET]);
    cmd
}

/// Cargo's target directory: `CARGO_TARGET_DIR`, or the workspace's `target`.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// Builds the debug agent (and with it the eBPF object) that the tests drive; returns the binary.
fn debug_agent() -> Result<PathBuf> {
    say("building flannel-agent (debug) and its eBPF programs");
    sh(cargo().args(["build", "-p", "flannel-agent"]))?;
    let bin = target_dir().join("debug").join("flannel-agent");
    ensure!(bin.exists(), "{} was not built", bin.display());
    bin.canonicalize().context("agent path")
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // rustc finds bpf-linker on PATH; make sure the bootstrap's location is on it.
    if let Some(home) = std::env::var_os("HOME") {
        let bin = PathBuf::from(home).join(".cargo/bin");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut parts: Vec<PathBuf> = std::env::split_paths(&path).collect();
        if !parts.contains(&bin) {
            parts.insert(0, bin);
            // SAFETY: single-threaded at this point; nothing else reads the environment yet.
            unsafe { std::env::set_var("PATH", std::env::join_paths(parts)?) };
        }
    }
    match cli.task {
        Task::Test => test(),
        Task::Image => image::command(),
        Task::Run {
            backend,
            nodes,
            stock_nodes,
            netlink_nodes,
            pods,
            decap,
            duration,
        } => {
            let backend = backend.backend();
            let stock = stock_nodes.unwrap_or(usize::from(matches!(
                backend,
                Backend::Vxlan {
                    direct_routing: false
                } | Backend::HostGw
            )));
            run(
                backend,
                [nodes, netlink_nodes, stock],
                pods,
                decap,
                duration,
            )
        }
        Task::Bench {
            quick,
            reps,
            only,
            profile,
            cost_baseline,
            cost_only,
            agent_only,
            compare,
        } => bench(&bench::Opts {
            quick,
            reps,
            only,
            profile,
            cost_baseline: (cost_baseline != "none").then_some(cost_baseline),
            cost_only,
            agent_only,
            compare,
        }),
    }
}

fn test() -> Result<()> {
    bootstrap::ensure_all()?;
    let agent = debug_agent()?;
    let image = image::build()?;
    flannel_tests::sweep_stale();
    say(
        "running unit, BPF_PROG_TEST_RUN and end-to-end tests (one at a time: each builds its own cluster)",
    );
    let mut cmd = cargo();
    // Every test binary runs even after one fails: the closing line counts all of them.
    cmd.args([
        "test",
        "--no-fail-fast",
        "-p",
        "flannel-ebpf-common",
        "-p",
        "flannel-agent",
        "-p",
        "flannel-tests",
        "-p",
        "xtask",
        "--",
        "--test-threads=1",
    ])
    .env("FLANNEL_AGENT_BIN", &agent)
    .env("FLANNEL_IMAGE", &image)
    .env("FLANNEL_VENV_PYTHON", bootstrap::venv_python())
    .stdout(std::process::Stdio::piped());
    say(
        "$ cargo test --no-fail-fast -p flannel-ebpf-common -p flannel-agent -p flannel-tests -p xtask -- --test-threads=1",
    );
    let mut child = cmd.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)
                            .and_then(|n| n.split_whitespace().last()?.parse().ok())
                    })
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let status = child.wait()?;
    // One closing line for the whole run (cargo's last line is that of an arbitrary test binary).
    if ignored > 0 {
        println!("tests: {passed} passed, {failed} failed, {ignored} skipped");
    } else {
        println!("tests: {passed} passed, {failed} failed");
    }
    ensure!(status.success() && failed == 0, "tests failed");
    ensure!(passed > 0, "no test ran");
    Ok(())
}

fn set_agent_env(agent: &std::path::Path) {
    // SAFETY: called before any thread is spawned.
    unsafe { std::env::set_var("FLANNEL_AGENT_BIN", agent) };
}

/// Checks the demo's node counts against what exists for `backend`; returns the node total.
fn check_demo_shape(
    backend: Backend,
    [nodes, netlink, stock]: [usize; 3],
    pods: usize,
) -> Result<usize> {
    let total = nodes + netlink + stock;
    ensure!(
        (2..=200).contains(&total),
        "--nodes, --netlink-nodes and --stock-nodes must add up to between 2 and 200"
    );
    if stock > 0 {
        ensure!(
            matches!(
                backend,
                Backend::Vxlan {
                    direct_routing: false
                } | Backend::HostGw
            ),
            "stock nodes exist for vxlan (without DirectRouting) and host-gw only"
        );
    }
    if netlink > 0 {
        ensure!(
            matches!(backend, Backend::Vxlan { .. } | Backend::HostGw),
            "the netlink dataplane exists for vxlan and host-gw only"
        );
    }
    ensure!(
        (1..=200).contains(&pods),
        "--pods must be between 1 and 200"
    );
    Ok(total)
}

fn run(
    backend: Backend,
    [nodes, netlink, stock]: [usize; 3],
    pods: usize,
    decap: DecapArg,
    duration: Option<u64>,
) -> Result<()> {
    let total = check_demo_shape(backend, [nodes, netlink, stock], pods)?;
    bootstrap::ensure_all()?;
    let agent = image::static_agent()?;
    set_agent_env(&agent);
    install_stop_handlers()?;
    let mut kinds = vec![NodeKind::Ebpf; nodes];
    kinds.extend(std::iter::repeat_n(NodeKind::Netlink, netlink));
    kinds.extend(std::iter::repeat_n(NodeKind::Stock, stock));
    let mut options = Options::backend(backend, &kinds, pods);
    // As kube-flannel.yml starts every node.
    options.agent_args = vec!["--decap".into(), decap.flag().into(), "--ip-masq".into()];
    if matches!(
        backend,
        Backend::Vxlan {
            direct_routing: true
        } | Backend::Ipip {
            direct_routing: true
        }
    ) {
        options.far_nodes = vec![total];
    }
    say(&format!(
        "creating the demo cluster ({backend:?}): {nodes} flannel-agent node(s), {netlink} netlink node(s), {stock} stock-flannel node(s), {pods} pod(s) each"
    ));
    let mut tb = Testbed::start("demo", options)?;
    let outside = tb.add_outside()?;
    print_cluster(&tb, backend);
    let all = tb.pods();
    let (first, last) = (&all[0], &all[all.len() - 1]);
    println!("\nCross-node pod traffic:");
    ping(first, last.ip)?;
    println!("  ping {} -> {}: ok", first.ip, last.ip);
    let rtt = tcp_echo(first, last, 8 << 20)?;
    println!(
        "  TCP 8 MiB each way {} <-> {}: verified byte for byte in {rtt:.2?}",
        first.ip, last.ip
    );
    let second = tb.nodes[1].pods[0].clone();
    {
        let _server = Iperf3Server::start(&second.netns, &tb.dir)?;
        let gbps = iperf3(&first.netns, second.ip, 3, 1)?;
        println!(
            "  iperf3 {} -> {} (3 s): {gbps:.2} Gbit/s",
            first.ip, second.ip
        );
    }
    show_masquerade(&tb, first, &outside, backend)?;
    print_counters(&tb)?;
    if backend == Backend::Wireguard {
        println!("\nThe wireguard backend runs on its WireGuard device, not on eBPF:");
        println!(
            "  ip netns exec {} ip -d link show flannel-wg",
            tb.nodes[0].netns
        );
        println!("  agent logs: {}/n*/agent.log", tb.dir.display());
    }
    println!("\nInspect the dataplane (BTF-described pinned maps):");
    let pins = tb.nodes[0].pins();
    println!(
        "  bpftool map dump pinned {}/FLANNEL_CONFIG",
        pins.display()
    );
    println!(
        "  bpftool map dump pinned {}/FLANNEL_ROUTES",
        pins.display()
    );
    println!("  bpftool map dump pinned {}/FLANNEL_STATS", pins.display());
    println!(
        "  bpftool map dump pinned {}/FLANNEL_NAT     # masqueraded flows",
        pins.display()
    );
    println!(
        "  ip netns exec {} bpftool net show dev eth0",
        tb.nodes[0].netns
    );
    println!(
        "  {} --stats --pin-dir {}",
        agent.display(),
        tb.nodes[0].pin_dir.display()
    );
    println!("  agent logs: {}/n*/agent.log", tb.dir.display());
    let deadline = duration.map(|s| Instant::now() + Duration::from_secs(s));
    match duration {
        Some(s) => println!("\nRunning for {s} s (Ctrl-C stops earlier)..."),
        None => println!("\nRunning until Ctrl-C..."),
    }
    let mut next_report = Instant::now() + Duration::from_secs(30);
    while !STOP.load(Ordering::SeqCst) && deadline.is_none_or(|d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(200));
        if Instant::now() >= next_report {
            print_counters(&tb)?;
            next_report = Instant::now() + Duration::from_secs(30);
        }
    }
    say("stopping the agents and removing the cluster");
    drop(tb);
    say("cleaned up");
    Ok(())
}

/// A pod reaching a host outside the pod network, and the address that host saw.
fn show_masquerade(tb: &Testbed, pod: &Pod, outside: &Pod, backend: Backend) -> Result<()> {
    println!(
        "\nTo a host outside the pod network ({} in netns {}), masqueraded (--ip-masq):",
        outside.ip, outside.netns
    );
    ping(pod, outside.ip)?;
    println!("  ping {} -> {}: ok", pod.ip, outside.ip);
    let (rtt, peer) = tcp_echo_seen(pod, outside, 4 << 20, None)?;
    println!(
        "  TCP 4 MiB each way {} <-> {}: verified in {rtt:.2?}; the outside host saw the connection come from {peer} (node {}, {})",
        pod.ip,
        outside.ip,
        tb.nodes[pod.node].public_ip,
        if tb.nodes[pod.node].kind == NodeKind::Ebpf && backend != Backend::Wireguard {
            "eBPF masquerade"
        } else {
            "iptables MASQUERADE"
        }
    );
    Ok(())
}

/// The demo cluster's nodes and pods.
fn print_cluster(tb: &Testbed, backend: Backend) {
    println!(
        "\nCluster {} (underlay bridge in netns {}):",
        tb.prefix,
        tb.underlay()
    );
    for node in &tb.nodes {
        let kind = match (node.kind, backend) {
            (NodeKind::Ebpf, Backend::Wireguard) => "flannel-agent (WireGuard device)",
            (NodeKind::Ebpf, _) => "flannel-agent (eBPF)",
            (NodeKind::Netlink | NodeKind::NoBpf, _) => "flannel-agent --dataplane=netlink",
            (NodeKind::Stock, Backend::HostGw) => "stock flannel config (kernel routes)",
            (NodeKind::Stock, _) => "stock flannel config (kernel flannel.1)",
        };
        println!(
            "  {:<22} {:<14} {:<15} vtep {}  {kind}",
            node.netns, node.public_ip, node.subnet, node.vtep_mac
        );
        for pod in &node.pods {
            println!("    pod {:<26} {}", pod.netns, pod.ip);
        }
    }
}

fn print_counters(tb: &Testbed) -> Result<()> {
    if tb.options.backend == Backend::Wireguard {
        return Ok(());
    }
    println!("\nDataplane counters (flannel-agent --stats):");
    for (i, node) in tb.nodes.iter().enumerate() {
        if node.kind == NodeKind::Ebpf {
            println!("  {}: {}", node.netns, summarize(&tb.stats(i)?));
        }
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn bench(opts: &bench::Opts) -> Result<()> {
    bootstrap::ensure_all()?;
    // Every release build is static (the test-run and fuzz binaries too).
    bootstrap::ensure_release_target()?;
    if opts.profile {
        bootstrap::ensure_packages(&["linux-perf"])?;
    }
    // The program costs need no agent binary (their bench target embeds the object).
    if !opts.cost_only {
        let agent = image::static_agent()?;
        set_agent_env(&agent);
    }
    bench::bench(opts, &workspace_root().join("target/bench"))
}
