//! A flannel cluster made of network namespaces, for end-to-end tests, the demo and benchmarks.
//!
//! Layout (every name carries the per-run prefix `fe-<pid>-<tag>`):
//! - `<prefix>-ul`: the underlay, a bridge `br0` with one veth port per node;
//! - `<prefix>-n<i>`: node i, uplink `eth0` = 198.18.0.(10+i)/24, bridge `cni0` =
//!   10.244.i.1/24 as the flannel CNI plugin makes it, and one veth per pod;
//! - `<prefix>-n<i>p<j>`: pod j of node i, `eth0` = 10.244.i.(10+j)/24, default via the gateway.
//!
//! Links are created directly inside these namespaces, so nothing is ever added to the root
//! namespace; deleting the namespaces deletes every link. [`Testbed`] cleans up on drop (also when a
//! test panics), and [`sweep_stale`] removes what a killed run left behind.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

pub mod kube_api;
pub mod tls;
pub mod traffic;

/// Prefix of every namespace and pin directory the testbed creates.
pub const PREFIX: &str = "fe-";
/// The flannel Network of every testbed.
pub const NETWORK: &str = "10.244.0.0/16";
/// Underlay MTU.
pub const UNDERLAY_MTU: u32 = 1500;

/// Capability numbers (linux/capability.h).
const CAP_SYS_ADMIN: libc::c_ulong = 21;
const CAP_PERFMON: libc::c_ulong = 38;
const CAP_BPF: libc::c_ulong = 39;

static RUN_COUNTER: AtomicU32 = AtomicU32::new(0);
static PORT_COUNTER: AtomicU32 = AtomicU32::new(0);

/// How a node forwards pod traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// Runs flannel-agent (eBPF dataplane; the wireguard backend uses its `WireGuard` device).
    Ebpf,
    /// Runs flannel-agent with `--dataplane=netlink`: the kernel objects flanneld makes.
    Netlink,
    /// Runs flannel-agent (default dataplane) without the capabilities BPF needs (`CAP_BPF`,
    /// `CAP_SYS_ADMIN`, `CAP_PERFMON`): it must fall back to netlink.
    NoBpf,
    /// Runs no agent: configured by the testbed exactly as stock flanneld configures a node
    /// (vxlan: `flannel.1` with its neighbours, fdb entries and routes; host-gw: routes).
    Stock,
}

impl NodeKind {
    /// True if the node runs flannel-agent.
    #[must_use]
    pub fn has_agent(self) -> bool {
        self != Self::Stock
    }
}

/// Where the agents get their leases from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubnetMgr {
    /// A lease file the testbed writes.
    Static,
    /// Node annotations in a fake Kubernetes API server in the underlay namespace.
    Kube,
    /// A real etcd server in the underlay namespace; the agents pick their subnets.
    Etcd,
}

/// flannel's etcd prefix.
pub const ETCD_PREFIX: &str = "/coreos.com/network";

/// The outside host of masquerade tests ([`Testbed::add_outside`]).
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
/// The outside host one routed hop away ([`Testbed::add_far_outside`]).
pub const FAR_OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 200);

/// Where the underlay namespace serves the cluster's control plane (API server, etcd).
pub const CONTROL_PLANE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// The flannel backend of a testbed, with its options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Vxlan { direct_routing: bool },
    HostGw,
    Ipip { direct_routing: bool },
    Udp,
    Wireguard,
}

impl Backend {
    /// Parses a backend name as `cargo xtask run --backend` takes it.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "vxlan" => Self::Vxlan {
                direct_routing: false,
            },
            "vxlan-directrouting" => Self::Vxlan {
                direct_routing: true,
            },
            "host-gw" => Self::HostGw,
            "ipip" => Self::Ipip {
                direct_routing: false,
            },
            "ipip-directrouting" => Self::Ipip {
                direct_routing: true,
            },
            "udp" => Self::Udp,
            "wireguard" => Self::Wireguard,
            other => bail!(
                "unknown backend {other:?} (vxlan, vxlan-directrouting, host-gw, ipip, ipip-directrouting, udp, wireguard)"
            ),
        })
    }

    /// The `Backend` section of net-conf.json.
    #[must_use]
    pub fn net_conf(self) -> String {
        let backend = match self {
            Self::Vxlan { direct_routing } => {
                format!(r#"{{"Type":"vxlan","DirectRouting":{direct_routing}}}"#)
            }
            Self::HostGw => r#"{"Type":"host-gw"}"#.into(),
            Self::Ipip { direct_routing } => {
                format!(r#"{{"Type":"ipip","DirectRouting":{direct_routing}}}"#)
            }
            Self::Udp => r#"{"Type":"udp"}"#.into(),
            Self::Wireguard => r#"{"Type":"wireguard"}"#.into(),
        };
        format!(r#"{{"Network":"{NETWORK}","Backend":{backend}}}"#)
    }

    /// The lease `BackendType` (flannel's udp backend leaves it empty).
    #[must_use]
    pub fn lease_type(self) -> &'static str {
        match self {
            Self::Vxlan { .. } => "vxlan",
            Self::HostGw => "host-gw",
            Self::Ipip { .. } => "ipip",
            Self::Udp => "",
            Self::Wireguard => "wireguard",
        }
    }

    /// Bytes of encapsulation (what `FLANNEL_MTU` is below the underlay MTU).
    #[must_use]
    pub fn overhead(self) -> u32 {
        match self {
            Self::Vxlan { .. } => 50,
            Self::HostGw => 0,
            Self::Ipip { .. } => 20,
            Self::Udp => 28,
            Self::Wireguard => 80,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: usize,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub index: usize,
    pub netns: String,
    pub kind: NodeKind,
    pub public_ip: Ipv4Addr,
    /// The underlay segment: 0 = 198.18.0.0/24, 1 = 198.18.1.0/24 (routed through the underlay).
    pub segment: u8,
    /// The wireguard backend's key file and advertised `BackendData`.
    pub wg_key_file: PathBuf,
    pub wg_backend_data: Option<serde_json::Value>,
    pub subnet: String,
    pub vtep_mac: String,
    pub pin_dir: PathBuf,
    pub subnet_file: PathBuf,
    pub log: PathBuf,
    pub pods: Vec<Pod>,
    /// The node's own mount namespace, if it has one (wireguard).
    pub mount_ns: Option<PathBuf>,
}

impl Node {
    /// The versioned directory of the node's pinned maps and links.
    #[must_use]
    pub fn pins(&self) -> PathBuf {
        self.pin_dir
            .join(format!("v{}", flannel_ebpf_common::LAYOUT_VERSION))
    }

    /// The `cni0` gateway address.
    #[must_use]
    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet_net()
            .map_or(Ipv4Addr::new(10, 244, self.index as u8, 1), |n| {
                Ipv4Addr::from(u32::from(n.network()) + 1)
            })
    }

    /// The node's pod subnet.
    pub fn subnet_net(&self) -> Result<ipnet::Ipv4Net> {
        self.subnet
            .parse()
            .with_context(|| format!("node {}: subnet {:?}", self.index, self.subnet))
    }
}

/// Options for building a testbed.
#[derive(Debug, Clone)]
pub struct Options {
    pub kinds: Vec<NodeKind>,
    pub pods_per_node: usize,
    /// Extra agent flags (e.g. `--decap xdp`).
    pub agent_args: Vec<String>,
    /// The backend every node uses.
    pub backend: Backend,
    /// The net-conf.json every node reads (from `backend` unless replaced).
    pub net_conf: String,
    /// Nodes (1-based) on the second underlay segment, one routed hop away from the others.
    pub far_nodes: Vec<usize>,
    pub subnet_mgr: SubnetMgr,
    /// `SubnetMgr::Kube`: the fake API serves HTTPS with a CA of its own.
    pub kube_tls: bool,
}

impl Options {
    #[must_use]
    pub fn vxlan(kinds: &[NodeKind], pods_per_node: usize) -> Self {
        Self::backend(
            Backend::Vxlan {
                direct_routing: false,
            },
            kinds,
            pods_per_node,
        )
    }

    #[must_use]
    pub fn backend(backend: Backend, kinds: &[NodeKind], pods_per_node: usize) -> Self {
        Self {
            kinds: kinds.to_vec(),
            pods_per_node,
            agent_args: Vec::new(),
            backend,
            net_conf: backend.net_conf(),
            far_nodes: Vec::new(),
            subnet_mgr: SubnetMgr::Static,
            kube_tls: false,
        }
    }
}

/// How an agent finds the Kubernetes API.
#[derive(Debug, Clone)]
pub enum KubeAccess {
    /// `--kubeconfig-file`.
    Kubeconfig(PathBuf),
    /// No flag: `KUBECONFIG` set to this list (files joined with `:`), merged by the client.
    KubeconfigEnv(String),
}

/// A running cluster of namespaces; everything is removed on drop.
pub struct Testbed {
    pub prefix: String,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub agent_bin: PathBuf,
    pub options: Options,
    agents: Vec<(usize, Child)>,
    namespaces: Vec<String>,
    /// Processes keeping the nodes' mount namespaces.
    holders: Vec<Child>,
    /// The fake Kubernetes API (`SubnetMgr::Kube`).
    pub kube: Option<kube_api::FakeKube>,
    /// How node `i`'s agent finds the API, where not the testbed's kubeconfig file.
    pub kube_access: BTreeMap<usize, KubeAccess>,
    /// The etcd server (`SubnetMgr::Etcd`).
    etcd: Option<Child>,
}

/// A fresh directory under the system's temporary directory for one test, removed with all it
/// holds when dropped (also when the test panics). Unit tests use it instead of the `tempfile`
/// crate: as a dev-dependency, `tempfile` turned on features of crates the agent shares (rustix's
/// `bitflags/std`), so that `cargo test` and `cargo bench` rebuilt the agent's whole dependency
/// graph beside `cargo build`'s (minutes of every `cargo xtask test` and bench run).
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `<tmp>/flannel-<name>-<pid>-<n>`, empty.
    ///
    /// # Panics
    /// If the directory cannot be made (a test helper: the test fails there).
    #[must_use]
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("flannel-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Self(dir)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The agent binary the tests drive: `FLANNEL_AGENT_BIN` (set by `cargo xtask test`).
pub fn agent_bin() -> Result<PathBuf> {
    let path = std::env::var_os("FLANNEL_AGENT_BIN")
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow!(
                "FLANNEL_AGENT_BIN is not set: run the end-to-end tests through `cargo xtask test`"
            )
        })?;
    ensure!(
        path.exists(),
        "FLANNEL_AGENT_BIN={} does not exist",
        path.display()
    );
    Ok(path)
}

/// Runs a command, failing with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("running {program} (is it installed? `cargo xtask test` installs it)")
        })?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip` in a namespace.
pub fn ip(netns: &str, args: &str) -> Result<String> {
    let mut full = vec!["-n", netns];
    full.extend(args.split_whitespace());
    run("ip", &full)
}

/// A command in a namespace.
pub fn in_ns(netns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["netns", "exec", netns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Removes namespaces and pin directories left by runs whose process is gone.
pub fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if let Some(pid) = owner_pid(name)
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            // A userspace WireGuard exits when its device is deleted, not with its namespace.
            let _ = ip(name, "link del flannel-wg");
            let _ = run("ip", &["netns", "delete", name]);
        }
    }
    if let Ok(entries) = fs::read_dir("/sys/fs/bpf") {
        for e in entries.filter_map(Result::ok) {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = owner_pid(&name)
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?.split('-').next()?.parse().ok()
}

impl Testbed {
    /// Builds the cluster and starts an agent on every eBPF node.
    pub fn start(tag: &str, options: Options) -> Result<Self> {
        sweep_stale();
        ensure!(
            nix::unistd::Uid::effective().is_root(),
            "the testbed needs root (network namespaces, BPF)"
        );
        let run_id = RUN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{PREFIX}{}-{tag}{run_id}", std::process::id());
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let mut tb = Self {
            prefix: prefix.clone(),
            dir,
            nodes: Vec::new(),
            agent_bin: if options.kinds.iter().any(|k| k.has_agent()) {
                agent_bin()?
            } else {
                PathBuf::new()
            },
            options,
            agents: Vec::new(),
            namespaces: Vec::new(),
            holders: Vec::new(),
            kube: None,
            kube_access: BTreeMap::new(),
            etcd: None,
        };
        tb.build()
            .with_context(|| format!("building testbed {prefix}"))?;
        Ok(tb)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        run("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        ip(name, "link set lo up")?;
        Ok(())
    }

    #[must_use]
    pub fn underlay(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    fn build(&mut self) -> Result<()> {
        let ul = self.underlay();
        self.add_netns(&ul)?;
        ip(&ul, "link add br0 type bridge")?;
        ip(&ul, "link set br0 up")?;
        let routed = !self.options.far_nodes.is_empty();
        if routed {
            // The underlay namespace routes between its two segments.
            ip(&ul, "addr add 198.18.0.1/24 dev br0")?;
            ip(&ul, "addr add 198.18.1.1/24 dev br0")?;
            in_ns(
                &ul,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.br0.send_redirects=0",
                ],
            )?;
        }
        fs::write(self.dir.join("net-conf.json"), &self.options.net_conf)?;
        if self.options.subnet_mgr == SubnetMgr::Etcd {
            ip(&ul, &format!("addr add {CONTROL_PLANE_IP}/24 dev br0"))?;
            self.start_etcd()?;
        }
        if self.options.subnet_mgr == SubnetMgr::Kube {
            ip(&ul, &format!("addr add {CONTROL_PLANE_IP}/24 dev br0"))?;
            let addr = SocketAddr::from((CONTROL_PLANE_IP, 6443));
            let api = if self.options.kube_tls {
                kube_api::FakeKube::start_tls(&ul, addr)?
            } else {
                kube_api::FakeKube::start(&ul, addr)?
            };
            fs::write(self.dir.join("kubeconfig"), api.kubeconfig())?;
            self.kube = Some(api);
        }

        for (i, kind) in self.options.kinds.clone().into_iter().enumerate() {
            self.add_node(i + 1, kind, routed)?;
        }
        if self.options.backend == Backend::Wireguard {
            self.prepare_wireguard()?;
        }
        if self.etcd.is_some() {
            return self.build_etcd_nodes();
        }
        if self.kube.is_some() {
            // Nodes as the kubelet registers them (a podCIDR each); stock nodes already carry
            // the annotations their flanneld wrote.
            for node in &self.nodes {
                let annotations = if node.kind == NodeKind::Stock {
                    self.stock_annotations(node)
                } else {
                    serde_json::json!({})
                };
                self.kube.as_ref().expect("kube").add_node(
                    &format!("n{}", node.index),
                    Some(&node.subnet),
                    &annotations,
                );
            }
            for i in 0..self.nodes.len() {
                if self.nodes[i].kind.has_agent() {
                    self.start_agent(i)?;
                    // The agent chose its VTEP MAC and published it.
                    let api = self.kube.as_ref().expect("kube");
                    let node = api.node(&format!("n{}", i + 1)).unwrap_or_default();
                    let data: serde_json::Value = serde_json::from_str(
                        node["metadata"]["annotations"]["flannel.alpha.coreos.com/backend-data"]
                            .as_str()
                            .unwrap_or("null"),
                    )?;
                    if let Some(mac) = data["VtepMAC"].as_str() {
                        self.nodes[i].vtep_mac = mac.to_string();
                    }
                }
            }
            self.configure_stock_nodes()?;
            return self.add_pods();
        }
        self.write_leases(&self.nodes.iter().map(|n| n.index).collect::<Vec<_>>())?;
        self.configure_stock_nodes()?;
        for i in 0..self.nodes.len() {
            if self.nodes[i].kind.has_agent() {
                self.start_agent(i)?;
            }
        }
        self.add_pods()
    }

    /// etcd mode: stock nodes' leases written as flanneld writes them (with `etcdctl`, bound to a
    /// 24 h etcd lease); each agent then picks its own subnet, and its `cni0` is addressed from
    /// the subnet.env it wrote, as the flannel CNI plugin does.
    fn build_etcd_nodes(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].kind == NodeKind::Stock {
                let node = &self.nodes[i];
                let value = serde_json::json!({
                    "PublicIP": node.public_ip.to_string(), "PublicIPv6": null,
                    "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": node.vtep_mac},
                });
                let key = format!("{ETCD_PREFIX}/subnets/{}", node.subnet.replace('/', "-"));
                self.etcdctl_put_with_lease(&key, &value.to_string())?;
            }
        }
        for i in 0..self.nodes.len() {
            if !self.nodes[i].kind.has_agent() {
                continue;
            }
            self.start_agent(i)?;
            let subnet: ipnet::Ipv4Net = self.subnet_env(i)?["FLANNEL_SUBNET"].parse()?;
            let node = &mut self.nodes[i];
            node.subnet = subnet.trunc().to_string();
            ip(&node.netns, &format!("addr add {subnet} dev cni0"))?;
            let key = format!("{ETCD_PREFIX}/subnets/{}", node.subnet.replace('/', "-"));
            let value = self
                .etcd_get(&key)?
                .ok_or_else(|| anyhow!("no lease {key} in etcd"))?;
            let value: serde_json::Value = serde_json::from_str(&value)?;
            if let Some(mac) = value["BackendData"]["VtepMAC"].as_str() {
                self.nodes[i].vtep_mac = mac.to_string();
            }
        }
        self.configure_stock_nodes()?;
        self.add_pods()
    }

    /// Starts etcd in the underlay namespace and stores the network configuration.
    fn start_etcd(&mut self) -> Result<()> {
        self.resume_etcd()?;
        self.etcd_put(&format!("{ETCD_PREFIX}/config"), &self.options.net_conf)
    }

    /// An outside host for masquerade tests: [`OUTSIDE_IP`], an address of the underlay
    /// namespace on its bridge. Nodes reach it on-link; it has no route to the pod network, so
    /// only masqueraded traffic gets answers.
    pub fn add_outside(&mut self) -> Result<Pod> {
        let ul = self.underlay();
        ip(&ul, &format!("addr replace {OUTSIDE_IP}/24 dev br0"))?;
        Ok(Pod {
            netns: ul,
            ip: OUTSIDE_IP,
            node: 0,
        })
    }

    /// An outside host one routed hop away: [`FAR_OUTSIDE_IP`] in namespace `<prefix>-far`,
    /// behind a link of `mtu` that the underlay namespace (198.18.0.1) routes to, so that it
    /// answers oversized DF packets with ICMP fragmentation-needed. Every node gets a route to it.
    pub fn add_far_outside(&mut self, mtu: u32) -> Result<Pod> {
        let ul = self.underlay();
        let far = format!("{}-far", self.prefix);
        self.add_netns(&far)?;
        ip(&ul, "addr replace 198.18.0.1/24 dev br0")?;
        in_ns(&ul, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        ip(
            &ul,
            &format!("link add far0 mtu {mtu} type veth peer name eth0 netns {far}"),
        )?;
        ip(&ul, "addr add 198.19.0.1/24 dev far0")?;
        ip(&ul, "link set far0 up")?;
        ip(&far, &format!("link set eth0 mtu {mtu} up"))?;
        ip(&far, &format!("addr add {FAR_OUTSIDE_IP}/24 dev eth0"))?;
        ip(&far, "route add default via 198.19.0.1")?;
        for node in &self.nodes {
            ip(
                &node.netns,
                "route replace 198.19.0.0/24 via 198.18.0.1 dev eth0",
            )?;
        }
        Ok(Pod {
            netns: far,
            ip: FAR_OUTSIDE_IP,
            node: 0,
        })
    }

    /// Stops the etcd server (an unreachable etcd); its data stays.
    pub fn stop_etcd(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
    }

    /// Starts the etcd server on its data, and waits until it serves.
    pub fn resume_etcd(&mut self) -> Result<()> {
        let data = self.dir.join("etcd");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))?;
        let client = format!("http://{CONTROL_PLANE_IP}:2379");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.underlay(),
                "etcd",
                "--name",
                "test",
                "--data-dir",
            ])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "test=http://127.0.0.1:2380",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd (Debian's etcd-server)")?;
        self.etcd = Some(child);
        wait_for("etcd to serve", Duration::from_secs(20), || {
            self.etcd_call("/v3/kv/range", &serde_json::json!({"key": "eA=="}))
                .is_ok()
        })?;
        self.etcd_put(&format!("{ETCD_PREFIX}/config"), &self.options.net_conf)
    }

    /// One call to etcd's JSON gateway, from the underlay namespace.
    pub fn etcd_call(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value> {
        let body = body.to_string();
        let path = path.to_string();
        with_netns(&self.underlay(), move || {
            let mut conn = TcpStream::connect_timeout(
                &SocketAddr::from((CONTROL_PLANE_IP, 2379)),
                Duration::from_secs(2),
            )?;
            conn.set_read_timeout(Some(Duration::from_secs(10)))?;
            write!(
                conn,
                "POST {path} HTTP/1.1\r\nHost: etcd\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            let mut raw = Vec::new();
            conn.read_to_end(&mut raw)?;
            let text = String::from_utf8_lossy(&raw);
            let (head, rest) = text
                .split_once("\r\n\r\n")
                .ok_or_else(|| anyhow!("bad HTTP response"))?;
            ensure!(head.starts_with("HTTP/1.1 200"), "etcd {path}: {head}");
            let body = if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                let mut out = String::new();
                let mut rest = rest;
                while let Some((len, tail)) = rest.split_once("\r\n") {
                    let n = usize::from_str_radix(len.trim(), 16)?;
                    if n == 0 {
                        break;
                    }
                    out.push_str(&tail[..n]);
                    rest = &tail[n + 2..];
                }
                out
            } else {
                rest.to_string()
            };
            Ok(serde_json::from_str(&body)?)
        })
    }

    pub fn etcd_put(&self, key: &str, value: &str) -> Result<()> {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD;
        self.etcd_call(
            "/v3/kv/put",
            &serde_json::json!({"key": b.encode(key), "value": b.encode(value)}),
        )
        .map(|_| ())
    }

    pub fn etcd_get(&self, key: &str) -> Result<Option<String>> {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD;
        let v = self.etcd_call("/v3/kv/range", &serde_json::json!({"key": b.encode(key)}))?;
        Ok(v["kvs"][0]["value"]
            .as_str()
            .and_then(|s| b.decode(s).ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// `etcdctl put --lease` with a fresh 24 h lease, as an operator (or flanneld) writes it.
    pub fn etcdctl_put_with_lease(&self, key: &str, value: &str) -> Result<()> {
        let endpoints = format!("--endpoints=http://{CONTROL_PLANE_IP}:2379");
        let granted = in_ns(
            &self.underlay(),
            "etcdctl",
            &[&endpoints, "lease", "grant", "86400"],
        )?;
        let id = granted
            .split_whitespace()
            .nth(1)
            .ok_or_else(|| anyhow!("etcdctl lease grant: {granted}"))?;
        in_ns(
            &self.underlay(),
            "etcdctl",
            &[&endpoints, "put", &format!("--lease={id}"), key, value],
        )?;
        Ok(())
    }

    /// The annotations stock flanneld writes on its node.
    #[must_use]
    pub fn stock_annotations(&self, node: &Node) -> serde_json::Value {
        let data = match self.options.backend {
            Backend::Vxlan { .. } => serde_json::json!({"VNI": 1, "VtepMAC": node.vtep_mac}),
            _ => serde_json::Value::Null,
        };
        serde_json::json!({
            "flannel.alpha.coreos.com/backend-type": self.options.backend.lease_type(),
            "flannel.alpha.coreos.com/backend-data": data.to_string(),
            "flannel.alpha.coreos.com/public-ip": node.public_ip.to_string(),
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        })
    }

    /// Node `index` (1-based) of `kind`: namespace, uplink on its segment, `cni0`, and for stock
    /// vxlan nodes the `flannel.1` device.
    fn add_node(&mut self, index: usize, kind: NodeKind, routed: bool) -> Result<()> {
        let ul = self.underlay();
        let netns = format!("{}-n{index}", self.prefix);
        self.add_netns(&netns)?;
        let segment = u8::from(self.options.far_nodes.contains(&index));
        let public_ip = Ipv4Addr::new(198, 18, segment, 10 + index as u8);
        ip(
            &ul,
            &format!("link add n{index} type veth peer name eth0 netns {netns}"),
        )?;
        ip(
            &ul,
            &format!("link set n{index} mtu {UNDERLAY_MTU} master br0 up"),
        )?;
        ip(&netns, &format!("link set eth0 mtu {UNDERLAY_MTU} up"))?;
        ip(&netns, &format!("addr add {public_ip}/24 dev eth0"))?;
        if routed {
            let other = 1 - segment;
            ip(
                &netns,
                &format!("route add 198.18.{other}.0/24 via 198.18.{segment}.1 dev eth0"),
            )?;
        }
        in_ns(&netns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        // cni0 as the flannel CNI plugin (bridge, isGateway) makes it.
        ip(&netns, "link add cni0 type bridge")?;
        if self.options.subnet_mgr != SubnetMgr::Etcd || kind == NodeKind::Stock {
            // With etcd an agent picks its subnet; cni0 gets its address from subnet.env then.
            ip(&netns, &format!("addr add 10.244.{index}.1/24 dev cni0"))?;
        }
        ip(&netns, "link set cni0 up")?;
        let node_dir = self.dir.join(format!("n{index}"));
        fs::create_dir_all(&node_dir)?;
        let backend = self.options.backend;
        let vtep_mac = match (kind, backend) {
            (NodeKind::Stock, Backend::Vxlan { direct_routing }) => {
                ensure!(
                    !direct_routing,
                    "stock vxlan nodes are built without DirectRouting"
                );
                // As flanneld: a VXLAN device with a kernel-chosen MAC that the lease advertises.
                ip(
                    &netns,
                    &format!(
                        "link add flannel.1 type vxlan id 1 local {public_ip} dev eth0 dstport 8472 nolearning"
                    ),
                )?;
                ip(
                    &netns,
                    &format!("link set flannel.1 mtu {} up", UNDERLAY_MTU - 50),
                )?;
                ip(
                    &netns,
                    &format!("addr add 10.244.{index}.0/32 dev flannel.1"),
                )?;
                let json = ip(&netns, "-j link show flannel.1")?;
                let v: serde_json::Value = serde_json::from_str(&json)?;
                v[0]["address"]
                    .as_str()
                    .ok_or_else(|| anyhow!("flannel.1 has no MAC"))?
                    .to_string()
            }
            (NodeKind::Stock, Backend::HostGw) => String::new(),
            (NodeKind::Stock, other) => bail!("no stock node for backend {other:?}"),
            _ => format!("0e:fe:00:00:00:{index:02x}"),
        };
        self.nodes.push(Node {
            index,
            netns,
            kind,
            public_ip,
            segment,
            wg_key_file: node_dir.join("wgkey"),
            wg_backend_data: None,
            subnet: format!("10.244.{index}.0/24"),
            vtep_mac,
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{}-n{index}", self.prefix)),
            subnet_file: node_dir.join("subnet.env"),
            log: node_dir.join("agent.log"),
            pods: Vec::new(),
            mount_ns: None,
        });
        Ok(())
    }

    /// wireguard: each node gets its own `/run/wireguard` (the userspace implementation's socket
    /// directory, fixed at build time) in a mount namespace kept by a holder process, as if it were
    /// its own machine; and its key, generated by the agent, whose public half goes in its lease.
    fn prepare_wireguard(&mut self) -> Result<()> {
        fs::create_dir_all("/run/wireguard")?;
        for i in 0..self.nodes.len() {
            let holder = Command::new("unshare")
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "sh",
                    "-c",
                    "mount -t tmpfs -o mode=0700 flannel-test /run/wireguard && exec sleep 3600",
                ])
                .stdin(Stdio::null())
                .spawn()
                .context("starting the mount-namespace holder")?;
            let pid = holder.id();
            self.holders.push(holder);
            wait_for("the node's mount namespace", Duration::from_secs(5), || {
                fs::read_to_string(format!("/proc/{pid}/mounts"))
                    .is_ok_and(|m| m.contains("flannel-test /run/wireguard"))
            })?;
            self.nodes[i].mount_ns = Some(PathBuf::from(format!("/proc/{pid}/ns/mnt")));
            let key_file = self.nodes[i].wg_key_file.to_string_lossy().into_owned();
            let net_conf = self
                .dir
                .join("net-conf.json")
                .to_string_lossy()
                .into_owned();
            let (ok, out, err) = self.agent_once(
                i,
                &[
                    "--print-backend-data",
                    "--net-config-path",
                    &net_conf,
                    "--wg-key-file",
                    &key_file,
                ],
            )?;
            ensure!(ok, "--print-backend-data: {err}");
            self.nodes[i].wg_backend_data = Some(serde_json::from_str(out.trim())?);
        }
        Ok(())
    }

    /// Stock nodes: per remote lease, the route, neighbour and fdb entry flanneld adds, and the
    /// subnet file flanneld writes.
    fn configure_stock_nodes(&self) -> Result<()> {
        for node in self.nodes.iter().filter(|n| n.kind == NodeKind::Stock) {
            let mtu = UNDERLAY_MTU - self.options.backend.overhead();
            fs::write(
                &node.subnet_file,
                format!(
                    "FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={}/24\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ=false\n",
                    node.gateway(),
                ),
            )?;
            if self.options.backend == Backend::HostGw {
                for peer in self.nodes.iter().filter(|p| p.index != node.index) {
                    ip(
                        &node.netns,
                        &format!("route add {} via {} dev eth0", peer.subnet, peer.public_ip),
                    )?;
                }
                continue;
            }
            for peer in self.nodes.iter().filter(|p| p.index != node.index) {
                let gw = peer.subnet_net()?.network().to_string();
                ip(
                    &node.netns,
                    &format!(
                        "neigh add {gw} lladdr {} dev flannel.1 nud permanent",
                        peer.vtep_mac
                    ),
                )?;
                in_ns(
                    &node.netns,
                    "bridge",
                    &[
                        "fdb",
                        "append",
                        &peer.vtep_mac,
                        "dev",
                        "flannel.1",
                        "dst",
                        &peer.public_ip.to_string(),
                        "self",
                        "permanent",
                    ],
                )?;
                ip(
                    &node.netns,
                    &format!("route add {} via {gw} dev flannel.1 onlink", peer.subnet),
                )?;
            }
        }
        Ok(())
    }

    /// Pods, with the MTU from the subnet file, as the flannel CNI plugin does.
    fn add_pods(&mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            let mtu = self
                .subnet_env(i)?
                .get("FLANNEL_MTU")
                .cloned()
                .ok_or_else(|| anyhow!("no FLANNEL_MTU"))?;
            for j in 1..=self.options.pods_per_node {
                let node = &self.nodes[i];
                let pod_ns = format!("{}p{j}", node.netns);
                let node_ns = node.netns.clone();
                let net = node.subnet_net()?.network();
                let pod_ip = Ipv4Addr::from(u32::from(net) + 10 + j as u32);
                let gateway = node.gateway();
                self.add_netns(&pod_ns)?;
                ip(
                    &node_ns,
                    &format!("link add veth{j} mtu {mtu} type veth peer name eth0 netns {pod_ns}"),
                )?;
                ip(&node_ns, &format!("link set veth{j} master cni0 up"))?;
                ip(&pod_ns, &format!("link set eth0 mtu {mtu} up"))?;
                ip(&pod_ns, &format!("addr add {pod_ip}/24 dev eth0"))?;
                ip(&pod_ns, &format!("route add default via {gateway}"))?;
                self.nodes[i].pods.push(Pod {
                    netns: pod_ns,
                    ip: pod_ip,
                    node: i,
                });
            }
        }
        Ok(())
    }

    /// Writes the static lease file with the leases of the given nodes (1-based indexes).
    pub fn write_leases(&self, indexes: &[usize]) -> Result<()> {
        let leases: Vec<_> = self
            .nodes
            .iter()
            .filter(|n| indexes.contains(&n.index))
            .map(|n| {
                let data = match self.options.backend {
                    Backend::Vxlan { .. } => serde_json::json!({"VNI": 1, "VtepMAC": n.vtep_mac}),
                    Backend::Wireguard => n.wg_backend_data.clone().unwrap_or_default(),
                    _ => serde_json::Value::Null,
                };
                serde_json::json!({
                    "Subnet": n.subnet, "PublicIP": n.public_ip.to_string(),
                    "BackendType": self.options.backend.lease_type(), "BackendData": data,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&serde_json::json!({ "leases": leases }))?;
        let tmp = self.dir.join(".leases.json.tmp");
        fs::write(&tmp, text)?;
        fs::rename(tmp, self.leases_path())?;
        Ok(())
    }

    #[must_use]
    pub fn leases_path(&self) -> PathBuf {
        self.dir.join("leases.json")
    }

    /// The agent command line for node `i` (0-based).
    #[must_use]
    pub fn agent_args(&self, i: usize) -> Vec<String> {
        let node = &self.nodes[i];
        let source = match self.options.subnet_mgr {
            SubnetMgr::Static => vec![
                "--subnet-mgr".to_string(),
                "static".into(),
                "--leases".into(),
                self.leases_path().to_string_lossy().into_owned(),
            ],
            SubnetMgr::Etcd => vec![
                "--subnet-mgr".to_string(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                format!("http://{CONTROL_PLANE_IP}:2379"),
                "--etcd-prefix".into(),
                ETCD_PREFIX.into(),
            ],
            SubnetMgr::Kube => {
                let mut args = vec!["--kube-subnet-mgr".to_string()];
                match self.kube_access.get(&i) {
                    Some(KubeAccess::KubeconfigEnv(_)) => {}
                    Some(KubeAccess::Kubeconfig(path)) => {
                        args.extend(["--kubeconfig-file".into(), path.to_string_lossy().into()]);
                    }
                    None => args.extend([
                        "--kubeconfig-file".into(),
                        self.dir.join("kubeconfig").to_string_lossy().into_owned(),
                    ]),
                }
                args.extend(["--node-name".into(), format!("n{}", node.index)]);
                args
            }
        };
        let mut args: Vec<String> = [
            "--iface",
            "eth0",
            "--net-config-path",
            &self.dir.join("net-conf.json").to_string_lossy(),
            "--pin-dir",
            &node.pin_dir.to_string_lossy(),
            "--subnet-file",
            &node.subnet_file.to_string_lossy(),
            "--wg-key-file",
            &node.wg_key_file.to_string_lossy(),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        args.extend(source);
        if node.kind == NodeKind::Netlink {
            args.push("--dataplane=netlink".into());
        }
        args.extend(self.options.agent_args.iter().cloned());
        args
    }

    /// A command that runs `program` inside node `i`'s network namespace (and its mount
    /// namespace if it has one; otherwise the root one, so that pins land on the machine's bpffs
    /// and outlive the process).
    #[must_use]
    pub fn command_in_node(&self, i: usize, program: &Path) -> Command {
        let netns_path = format!("/run/netns/{}", self.nodes[i].netns);
        let mount_ns = self.nodes[i].mount_ns.clone();
        let no_bpf = self.nodes[i].kind == NodeKind::NoBpf;
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (open, setns, close) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(mnt) = &mount_ns {
                    let f = fs::File::open(mnt)?;
                    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNS)
                        .map_err(std::io::Error::from)?;
                }
                let f = fs::File::open(&netns_path)?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)?;
                if no_bpf {
                    // Out of the bounding set, so the exec'd agent (uid 0) never gets them.
                    for cap in [CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF] {
                        // prctl with integer arguments is async-signal-safe.
                        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
        cmd
    }

    /// Starts the agent of node `i` and waits until its dataplane is active.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let marks_before = self.log(i).matches("dataplane active").count();
        self.spawn_agent(i)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.log(i).matches("dataplane active").count() > marks_before {
                return Ok(());
            }
            if let Some((_, child)) = self.agents.iter_mut().find(|(n, _)| *n == i)
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "agent of node {} exited ({status}):\n{}",
                    i + 1,
                    self.log(i)
                );
            }
            ensure!(
                Instant::now() < deadline,
                "agent of node {} not ready in 30 s:\n{}",
                i + 1,
                self.log(i)
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the agent of node `i` without waiting for it.
    pub fn spawn_agent(&mut self, i: usize) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.nodes[i].log)?;
        let child = self
            .command_in_node(i, &self.agent_bin.clone())
            .args(self.agent_args(i))
            .envs(match self.kube_access.get(&i) {
                Some(KubeAccess::KubeconfigEnv(list)) => vec![("KUBECONFIG", list.clone())],
                _ => Vec::new(),
            })
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning flannel-agent")?;
        self.agents.push((i, child));
        Ok(())
    }

    /// True if node `i`'s agent is running (started and not exited).
    pub fn agent_alive(&mut self, i: usize) -> bool {
        self.agents
            .iter_mut()
            .find(|(n, _)| *n == i)
            .is_some_and(|(_, child)| matches!(child.try_wait(), Ok(None)))
    }

    /// Stops the agent of node `i` with `signal` and waits for it to exit.
    pub fn stop_agent(
        &mut self,
        i: usize,
        signal: nix::sys::signal::Signal,
    ) -> Result<std::process::ExitStatus> {
        let pos = self
            .agents
            .iter()
            .position(|(n, _)| *n == i)
            .ok_or_else(|| anyhow!("node {} has no agent", i + 1))?;
        let (_, mut child) = self.agents.remove(pos);
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().cast_signed()), signal)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("agent of node {} did not exit on {signal}", i + 1);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id of node `i`'s running agent.
    #[must_use]
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents
            .iter()
            .find(|(n, _)| *n == i)
            .map(|(_, c)| c.id())
    }

    /// The agent log of node `i`.
    #[must_use]
    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// Node `i`'s subnet file as key/value pairs.
    pub fn subnet_env(&self, i: usize) -> Result<BTreeMap<String, String>> {
        let text = fs::read_to_string(&self.nodes[i].subnet_file)
            .with_context(|| format!("reading {}", self.nodes[i].subnet_file.display()))?;
        Ok(text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// Runs the agent binary with `args` inside node `i` and returns (success, stdout, stderr).
    /// An agent still running after 20 s is killed and reported as an error.
    pub fn agent_once(&self, i: usize, args: &[&str]) -> Result<(bool, String, String)> {
        let mut child = self
            .command_in_node(i, &self.agent_bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("flannel-agent {} did not exit within 20 s", args.join(" "));
            }
            thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Node `i`'s pinned links: file name (`link-<program>-if<ifindex>…`) → (link ID, program
    /// ID), from `bpftool link show pinned`. The same link ID across an agent restart means the
    /// attachment was adopted, not recreated; a new program ID, that its program was replaced.
    pub fn pinned_links(&self, i: usize) -> Result<BTreeMap<String, (u64, u64)>> {
        let mut links = BTreeMap::new();
        for entry in fs::read_dir(self.nodes[i].pins())? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !name.starts_with("link-") {
                continue;
            }
            let info: serde_json::Value = serde_json::from_str(&run(
                "bpftool",
                &["-j", "link", "show", "pinned", &path.to_string_lossy()],
            )?)?;
            let id = |k: &str| info[k].as_u64().unwrap_or(0);
            links.insert(name, (id("id"), id("prog_id")));
        }
        Ok(links)
    }

    /// The entries of node `i`'s pinned map `map` as `bpftool` formats them from BTF
    /// (`{"key": …, "value": …}` with field names).
    pub fn pinned_entries(&self, i: usize, map: &str) -> Result<Vec<serde_json::Value>> {
        let path = self.nodes[i].pins().join(map);
        let dump: serde_json::Value = serde_json::from_str(&run(
            "bpftool",
            &["-j", "map", "dump", "pinned", &path.to_string_lossy()],
        )?)?;
        Ok(dump
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["formatted"].clone())
            .collect())
    }

    /// The agent's `--stats` of node `i` as reason → packets.
    pub fn stats(&self, i: usize) -> Result<BTreeMap<String, u64>> {
        let pin = self.nodes[i].pin_dir.to_string_lossy().into_owned();
        let (ok, out, err) = self.agent_once(i, &["--stats", "--pin-dir", &pin])?;
        ensure!(ok, "--stats failed: {err}");
        Ok(out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((w.next()?.to_string(), w.next()?.parse().ok()?))
            })
            .collect())
    }

    /// Node `i` itself as a traffic end: its network namespace and its `cni0` address.
    #[must_use]
    pub fn host(&self, i: usize) -> Pod {
        Pod {
            netns: self.nodes[i].netns.clone(),
            ip: self.nodes[i].gateway(),
            node: i,
        }
    }

    /// Fails if node `i`'s dataplane counted any drop.
    pub fn no_drops(&self, i: usize) -> Result<()> {
        let stats = self.stats(i)?;
        let drops: Vec<_> = stats
            .iter()
            .filter(|(k, v)| k.starts_with("drop_") && **v > 0)
            .collect();
        ensure!(
            drops.is_empty(),
            "node {} dropped packets: {drops:?}",
            i + 1
        );
        Ok(())
    }

    /// Every pod to every pod on another node: TCP echoed byte for byte both ways, and ping.
    pub fn all_pairs(&self, bytes: usize) -> Result<()> {
        let pods = self.pods();
        for a in &pods {
            for b in pods.iter().filter(|b| b.node != a.node) {
                tcp_echo(a, b, bytes).with_context(|| format!("{} -> {}", a.ip, b.ip))?;
                ping(a, b.ip)?;
            }
        }
        Ok(())
    }

    /// Every pod of the cluster.
    #[must_use]
    pub fn pods(&self) -> Vec<Pod> {
        self.nodes.iter().flat_map(|n| n.pods.clone()).collect()
    }

    /// Removes everything: agents, pins, namespaces, files.
    fn teardown(&mut self) {
        for (_, mut child) in self.agents.drain(..) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id().cast_signed()),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
        }
        for node in &self.nodes {
            let _ = fs::remove_dir_all(&node.pin_dir);
            // A userspace WireGuard exits when its device is deleted, not with its namespace.
            if self.options.backend == Backend::Wireguard {
                let _ = ip(&node.netns, "link del flannel-wg");
            }
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = run("ip", &["netns", "delete", &ns]);
        }
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
        for mut holder in self.holders.drain(..) {
            let _ = holder.kill();
            let _ = holder.wait();
        }
        if thread::panicking() {
            for (i, node) in self.nodes.iter().enumerate() {
                if node.kind.has_agent() {
                    eprintln!("---- agent log of node {} ----\n{}", i + 1, self.log(i));
                }
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Runs `f` on a thread that has entered network namespace `netns`.
pub fn with_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    thread::spawn(move || {
        let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow!("netns thread panicked"))?
}

/// The headroom (`needed_headroom`, `IFLA_HEADROOM`) the kernel reports for interface `name`
/// of namespace `netns`: what sockets reserve in front of the packets they send through it.
pub fn link_headroom(netns: &str, name: &str) -> Result<u16> {
    const RTM_GETLINK: u16 = 18;
    const RTM_NEWLINK: u16 = 16;
    const NLMSG_ERROR: u16 = 2;
    const IFLA_IFNAME: u16 = 3;
    const IFLA_HEADROOM: u16 = 68;
    const NLM_F_REQUEST: u16 = 1;
    let name = name.to_owned();
    with_netns(netns, move || {
        // SAFETY: plain socket calls on a descriptor owned by this function.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) };
        ensure!(
            fd >= 0,
            "netlink socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor, owned from here on.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // nlmsghdr, ifinfomsg, then IFLA_IFNAME.
        let mut attr = name.clone().into_bytes();
        attr.push(0);
        let attr_len = 4 + attr.len();
        let len = 16 + 16 + attr_len.next_multiple_of(4);
        let mut req = Vec::with_capacity(len);
        req.extend_from_slice(&u32::try_from(len)?.to_ne_bytes());
        req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
        req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
        req.extend_from_slice(&[0; 8]);
        req.extend_from_slice(&[0; 16]);
        req.extend_from_slice(&u16::try_from(attr_len)?.to_ne_bytes());
        req.extend_from_slice(&IFLA_IFNAME.to_ne_bytes());
        req.extend_from_slice(&attr);
        req.resize(len, 0);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // SAFETY: `req` is a valid buffer of its length.
        let sent = unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) };
        ensure!(
            sent >= 0,
            "netlink send: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = vec![0_u8; 65536];
        // SAFETY: `buf` is a valid buffer of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        ensure!(n >= 32, "netlink recv: {}", std::io::Error::last_os_error());
        let buf = &buf[..usize::try_from(n)?];
        let u16_at = |off: usize| u16::from_ne_bytes([buf[off], buf[off + 1]]);
        match u16_at(4) {
            RTM_NEWLINK => {}
            NLMSG_ERROR => bail!("no link {name}"),
            t => bail!("unexpected netlink message type {t}"),
        }
        let end = usize::try_from(u32::from_ne_bytes(buf[..4].try_into()?))?.min(buf.len());
        let mut off = 32;
        while off + 4 <= end {
            let (alen, atype) = (usize::from(u16_at(off)), u16_at(off + 2) & 0x3fff);
            if alen < 4 {
                break;
            }
            if atype == IFLA_HEADROOM && alen >= 6 {
                return Ok(u16_at(off + 4));
            }
            off += alen.next_multiple_of(4);
        }
        bail!("the kernel reported no IFLA_HEADROOM for {name}")
    })
}

/// Deterministic, position-dependent test data.
#[must_use]
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Sends `bytes` from pod `from` to pod `to` over TCP; `to` echoes them back. Both directions are
/// compared byte for byte. Bounded by a 30 s timeout. Returns the round-trip time.
pub fn tcp_echo(from: &Pod, to: &Pod, bytes: usize) -> Result<Duration> {
    tcp_echo_paced(from, to, bytes, None)
}

/// As [`tcp_echo`], the sender pausing `pace` after each 64 KiB: a connection that lasts.
pub fn tcp_echo_paced(
    from: &Pod,
    to: &Pod,
    bytes: usize,
    pace: Option<Duration>,
) -> Result<Duration> {
    tcp_echo_seen(from, to, bytes, pace).map(|(rtt, _)| rtt)
}

/// As [`tcp_echo_paced`], also returning the address and port the server saw the connection
/// come from (the pod's own, or what masquerade made of it).
pub fn tcp_echo_seen(
    from: &Pod,
    to: &Pod,
    bytes: usize,
    pace: Option<Duration>,
) -> Result<(Duration, SocketAddr)> {
    let port = 20_000 + (PORT_COUNTER.fetch_add(1, Ordering::Relaxed) % 20_000) as u16;
    let addr = SocketAddr::from((to.ip, port));
    let listener = with_netns(&to.netns, move || Ok(TcpListener::bind(addr)?))?;
    let server = thread::spawn(move || -> Result<(Vec<u8>, SocketAddr)> {
        listener.set_nonblocking(false)?;
        let (mut conn, peer) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        conn.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            conn.write_all(&buf[..n])?;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok((got, peer))
    });
    let start = Instant::now();
    let stream = with_netns(&from.netns, move || {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
        Ok(s)
    })
    .with_context(|| format!("connecting {} → {addr}", from.ip))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let data = pattern(bytes, from.ip.octets()[3] ^ to.ip.octets()[2]);
    let mut writer = stream.try_clone()?;
    let to_send = data.clone();
    let sender = thread::spawn(move || -> Result<()> {
        match pace {
            None => writer.write_all(&to_send)?,
            Some(pause) => {
                for part in to_send.chunks(65_536) {
                    writer.write_all(part)?;
                    thread::sleep(pause);
                }
            }
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    let mut echoed = Vec::with_capacity(bytes);
    let mut reader = stream;
    reader
        .read_to_end(&mut echoed)
        .with_context(|| format!("reading the echo {} ← {}", from.ip, to.ip))?;
    sender.join().map_err(|_| anyhow!("sender panicked"))??;
    let (received, peer) = server.join().map_err(|_| anyhow!("server panicked"))??;
    let rtt = start.elapsed();
    ensure!(
        received == data,
        "{} → {}: the server got {} bytes that differ from the {} sent",
        from.ip,
        to.ip,
        received.len(),
        data.len()
    );
    ensure!(
        echoed == data,
        "{} ← {}: the echo ({} bytes) differs from the {} sent",
        from.ip,
        to.ip,
        echoed.len(),
        data.len()
    );
    Ok((rtt, peer))
}

/// Pings `dst` from pod `from` (3 echo requests, bounded to a few seconds).
pub fn ping(from: &Pod, dst: Ipv4Addr) -> Result<()> {
    in_ns(
        &from.netns,
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "2", "-q", &dst.to_string()],
    )
    .map(|_| ())
    .with_context(|| format!("ping {} → {dst}", from.ip))
}

/// Pings with DF set and a payload that fills `mtu` exactly: succeeds only if a packet of the
/// pod MTU crosses whole (no fragmentation, no black hole). Returns the reply's TTL.
pub fn ping_mtu(from: &Pod, dst: Ipv4Addr, mtu: u32) -> Result<u8> {
    let size = (mtu - 28).to_string();
    let out = in_ns(
        &from.netns,
        "ping",
        &[
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            "-M",
            "do",
            "-s",
            &size,
            &dst.to_string(),
        ],
    )
    .with_context(|| format!("ping -M do -s {size} {} → {dst}", from.ip))?;
    out.split_whitespace()
        .find_map(|w| w.strip_prefix("ttl=")?.parse().ok())
        .ok_or_else(|| anyhow!("no ttl in ping output:\n{out}"))
}

/// A one-line summary of counters, for logs.
#[must_use]
pub fn summarize(stats: &BTreeMap<String, u64>) -> String {
    let mut s = String::new();
    for (k, v) in stats.iter().filter(|(_, v)| **v > 0) {
        let _ = write!(s, "{k}={v} ");
    }
    s
}

/// True if a TCP connection from pod `from` to pod `to` completes within `timeout`.
pub fn can_connect(from: &Pod, to: &Pod, timeout: Duration) -> Result<bool> {
    let port = 20_000 + (PORT_COUNTER.fetch_add(1, Ordering::Relaxed) % 20_000) as u16;
    let addr = SocketAddr::from((to.ip, port));
    let _listener = with_netns(&to.netns, move || Ok(TcpListener::bind(addr)?))?;
    with_netns(&from.netns, move || {
        Ok(TcpStream::connect_timeout(&addr, timeout).is_ok())
    })
}

/// Waits until `cond` holds, up to `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        ensure!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// RX and TX packet counts of a link in a namespace.
pub fn link_packets(netns: &str, link: &str) -> Result<(u64, u64)> {
    let json = ip(netns, &format!("-s -j link show {link}"))?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    let stats = &v[0]["stats64"];
    Ok((
        stats["rx"]["packets"].as_u64().unwrap_or(0),
        stats["tx"]["packets"].as_u64().unwrap_or(0),
    ))
}

/// An `iperf3 -s` daemon in a namespace, killed on drop (deleting a namespace does not end the
/// processes inside it).
pub struct Iperf3Server {
    pidfile: PathBuf,
}

impl Iperf3Server {
    pub fn start(netns: &str, dir: &Path) -> Result<Self> {
        let pidfile = dir.join(format!("iperf3-{netns}.pid"));
        in_ns(
            netns,
            "iperf3",
            &["-s", "-D", "--pidfile", &pidfile.to_string_lossy()],
        )?;
        wait_for("iperf3 to start", Duration::from_secs(5), || {
            pidfile.exists()
        })?;
        thread::sleep(Duration::from_millis(200));
        Ok(Self { pidfile })
    }
}

impl Drop for Iperf3Server {
    fn drop(&mut self) {
        if let Some(pid) = fs::read_to_string(&self.pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = fs::remove_file(&self.pidfile);
    }
}

/// TCP throughput in Gbit/s from `netns` to `dst` (an `iperf3 -s` must listen there), bounded by
/// `seconds` plus a margin.
pub fn iperf3(netns: &str, dst: Ipv4Addr, seconds: u32, streams: u32) -> Result<f64> {
    iperf3_with(netns, dst, seconds, streams, &[])
}

/// [`iperf3`] with further client options (e.g. `-M 1440`, the largest TCP segment).
pub fn iperf3_with(
    netns: &str,
    dst: Ipv4Addr,
    seconds: u32,
    streams: u32,
    extra: &[&str],
) -> Result<f64> {
    let (seconds_arg, streams_arg, limit) = (
        seconds.to_string(),
        streams.to_string(),
        (seconds + 10).to_string(),
    );
    let dst = dst.to_string();
    let mut args = vec![
        limit.as_str(),
        "iperf3",
        "-c",
        &dst,
        "-t",
        &seconds_arg,
        "-P",
        &streams_arg,
        "-J",
    ];
    args.extend_from_slice(extra);
    let out = in_ns(netns, "timeout", &args)?;
    let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 reported no throughput: {}", v["error"]))?;
    Ok(bps / 1e9)
}
pub mod packet;
