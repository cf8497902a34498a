//! Command-line flags: flanneld's names where they apply (each also read from `FLANNELD_<FLAG>`),
//! plus the few that an eBPF dataplane needs.
use std::{net::Ipv4Addr, path::PathBuf};

use clap::{ArgAction, Parser, ValueEnum};

use crate::dataplane::ebpf::DecapMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SubnetMgr {
    /// Leases from a file (`--leases`), for clusters without Kubernetes or etcd.
    Static,
    /// Leases in Kubernetes node annotations (flanneld's `--kube-subnet-mgr`).
    Kube,
    /// Leases in etcd under `--etcd-prefix` (flanneld's default).
    Etcd,
}

/// Which dataplane programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DataplaneKind {
    /// eBPF where it can be loaded; otherwise the kernel objects flanneld makes (vxlan, host-gw).
    Auto,
    /// eBPF only: fail if it cannot be loaded.
    Ebpf,
    /// The kernel objects flanneld makes (vxlan, host-gw), no eBPF.
    Netlink,
}

#[derive(Debug, Clone, Parser)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one field per command-line switch, as clap derives them"
)]
#[command(
    name = "flannel-agent",
    version,
    about = "flanneld-compatible node agent with an eBPF dataplane"
)]
pub struct Args {
    /// Interface (name or IPv4 address) for inter-host traffic; repeatable, the first that
    /// exists wins. Default: the interface of the default route.
    #[arg(long = "iface", env = "FLANNELD_IFACE", value_delimiter = ',')]
    pub iface: Vec<String>,

    /// Regex matched against whole interface names and IPv4 addresses; repeatable.
    #[arg(
        long = "iface-regex",
        env = "FLANNELD_IFACE_REGEX",
        value_delimiter = ','
    )]
    pub iface_regex: Vec<String>,

    /// IP address other nodes reach this node at (default: the interface's address).
    #[arg(long = "public-ip", env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,

    /// flannel's network configuration (net-conf.json).
    #[arg(
        long = "net-config-path",
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,

    /// Where to write the environment the flannel CNI plugin reads.
    #[arg(
        long = "subnet-file",
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,

    /// Whether flannel masquerades traffic leaving the pod network (`FLANNEL_IPMASQ`).
    #[arg(long = "ip-masq", env = "FLANNELD_IP_MASQ", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    pub ip_masq: bool,

    /// Masquerade with sequential, hash-chosen ports instead of fully random ones (flanneld's
    /// flag: iptables `MASQUERADE` without `--random-fully`).
    #[arg(long = "ip-masq-fully-random-disable", env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    pub ip_masq_fully_random_disable: bool,

    /// Ports (and ICMP echo identifiers) the eBPF masquerade allocates, `MIN-MAX`. The agent
    /// adds them to `net.ipv4.ip_local_reserved_ports` so the node's own connections never take
    /// them; the default lies below Kubernetes' `NodePorts` (`30000–32767`) and Linux's default
    /// `ip_local_port_range` (32768–60999).
    #[arg(
        long = "ip-masq-port-range",
        env = "FLANNELD_IP_MASQ_PORT_RANGE",
        default_value = "1024-29999",
        value_parser = parse_port_range
    )]
    pub ip_masq_port_range: (u16, u16),

    /// Entries of the eBPF masquerade table (a flow takes two). When it is full, established
    /// flows keep working and new ones fail (counted as `drop_nat_table_full`). Changing it needs
    /// `--cleanup` (the pinned table keeps its size).
    #[arg(
        long = "ip-masq-table-size",
        env = "FLANNELD_IP_MASQ_TABLE_SIZE",
        default_value_t = flannel_ebpf_common::DEFAULT_NAT_ENTRIES,
        value_parser = clap::value_parser!(u32).range(1024..=16_777_216)
    )]
    pub ip_masq_table_size: u32,

    /// Idle timeouts of masqueraded flows in seconds, as Linux's conntrack defaults: an
    /// established TCP flow, a UDP flow that has seen replies, anything else (a TCP flow before
    /// its reply, after FIN; one-way UDP; ICMP echo).
    #[arg(
        long = "ip-masq-tcp-timeout",
        env = "FLANNELD_IP_MASQ_TCP_TIMEOUT",
        default_value_t = 432_000
    )]
    pub ip_masq_tcp_timeout: u64,
    #[arg(
        long = "ip-masq-udp-timeout",
        env = "FLANNELD_IP_MASQ_UDP_TIMEOUT",
        default_value_t = 120
    )]
    pub ip_masq_udp_timeout: u64,
    #[arg(
        long = "ip-masq-other-timeout",
        env = "FLANNELD_IP_MASQ_OTHER_TIMEOUT",
        default_value_t = 30
    )]
    pub ip_masq_other_timeout: u64,

    /// Seconds between checks that the iptables masquerade/forward rules are intact (a missing
    /// rule rebuilds the set, as flanneld).
    #[arg(long = "iptables-resync", env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub iptables_resync: u64,

    /// Accept traffic from and to the Network in the kernel's FORWARD hook (flanneld's
    /// `FLANNEL-FWD`), for nodes whose FORWARD policy is DROP.
    #[arg(long = "iptables-forward-rules", env = "FLANNELD_IPTABLES_FORWARD_RULES", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "true")]
    pub iptables_forward_rules: bool,

    /// Address of the health endpoints (`/healthz`, `/readyz`) and of `/metrics`.
    #[arg(
        long = "healthz-ip",
        env = "FLANNELD_HEALTHZ_IP",
        default_value = "0.0.0.0"
    )]
    pub healthz_ip: std::net::IpAddr,

    /// Port of the health endpoints and `/metrics`; 0 (the default, as flanneld) serves none.
    #[arg(
        long = "healthz-port",
        env = "FLANNELD_HEALTHZ_PORT",
        default_value_t = 0
    )]
    pub healthz_port: u16,

    /// Where leases come from. Default: `kube` with `--kube-subnet-mgr`, `static` with
    /// `--leases`, else `etcd` (as flanneld).
    #[arg(long = "subnet-mgr", value_enum)]
    pub subnet_mgr: Option<SubnetMgr>,

    /// etcd endpoints (comma-separated).
    #[arg(
        long = "etcd-endpoints",
        env = "FLANNELD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:4001,http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,

    /// etcd prefix of flannel's keys.
    #[arg(
        long = "etcd-prefix",
        env = "FLANNELD_ETCD_PREFIX",
        default_value = "/coreos.com/network"
    )]
    pub etcd_prefix: String,

    /// TLS: CA, client certificate and key for etcd.
    #[arg(long = "etcd-cafile", env = "FLANNELD_ETCD_CAFILE")]
    pub etcd_cafile: Option<PathBuf>,
    #[arg(long = "etcd-certfile", env = "FLANNELD_ETCD_CERTFILE")]
    pub etcd_certfile: Option<PathBuf>,
    #[arg(long = "etcd-keyfile", env = "FLANNELD_ETCD_KEYFILE")]
    pub etcd_keyfile: Option<PathBuf>,

    /// etcd authentication.
    #[arg(long = "etcd-username", env = "FLANNELD_ETCD_USERNAME")]
    pub etcd_username: Option<String>,
    #[arg(long = "etcd-password", env = "FLANNELD_ETCD_PASSWORD")]
    pub etcd_password: Option<String>,

    /// Minutes before the 24 h lease expires at which it is renewed.
    #[arg(
        long = "subnet-lease-renew-margin",
        env = "FLANNELD_SUBNET_LEASE_RENEW_MARGIN",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..1440)
    )]
    pub subnet_lease_renew_margin: u64,

    /// Use the Kubernetes API for leases (flanneld's flag; same as `--subnet-mgr kube`).
    #[arg(long = "kube-subnet-mgr", env = "FLANNELD_KUBE_SUBNET_MGR", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set, default_value = "false")]
    pub kube_subnet_mgr: bool,

    /// The Kubernetes API server URL (default: in-cluster, or the kubeconfig's).
    #[arg(long = "kube-api-url", env = "FLANNELD_KUBE_API_URL")]
    pub kube_api_url: Option<String>,

    /// A kubeconfig file (default: the in-cluster service account).
    #[arg(long = "kubeconfig-file", env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,

    /// Prefix of flannel's node annotations.
    #[arg(
        long = "kube-annotation-prefix",
        env = "FLANNELD_KUBE_ANNOTATION_PREFIX",
        default_value = "flannel.alpha.coreos.com"
    )]
    pub kube_annotation_prefix: String,

    /// This node's name in Kubernetes.
    #[arg(long = "node-name", env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// The lease file of `--subnet-mgr static` (flannel's lease format, re-read when it changes).
    #[arg(long = "leases", env = "FLANNELD_LEASES")]
    pub leases: Option<PathBuf>,

    /// bpffs directory for this agent's pinned maps and links (one per node when several agents
    /// share a machine).
    #[arg(
        long = "pin-dir",
        env = "FLANNELD_PIN_DIR",
        default_value = "/sys/fs/bpf/flannel"
    )]
    pub pin_dir: PathBuf,

    /// Which dataplane to use. The wireguard backend always uses its WireGuard device.
    #[arg(
        long = "dataplane",
        env = "FLANNELD_DATAPLANE",
        value_enum,
        default_value = "auto"
    )]
    pub dataplane: DataplaneKind,

    /// The wireguard backend's private key file (flanneld's path and environment variable);
    /// created with mode 0400 if missing, reused otherwise.
    #[arg(
        long = "wg-key-file",
        env = "WIREGUARD_KEY_FILE",
        default_value = "/run/flannel/wgkey"
    )]
    pub wg_key_file: PathBuf,

    /// Print the `BackendData` this node advertises in its lease (for the wireguard backend its
    /// public key, generating the key if needed) and exit: what to put in a static lease file.
    #[arg(long)]
    pub print_backend_data: bool,

    /// Where tunnel traffic is decapsulated on the uplink (eBPF dataplane).
    #[arg(long = "decap", value_enum, default_value = "tc")]
    pub decap: DecapMode,

    /// The bridge the flannel CNI plugin puts pods on.
    #[arg(long = "cni-bridge", default_value = "cni0")]
    pub cni_bridge: String,

    /// Remove everything the agent created (pinned programs, links, maps, the subnet file) and exit.
    #[arg(long)]
    pub cleanup: bool,

    /// Print the dataplane's per-reason packet counters from the pinned maps and exit.
    #[arg(long)]
    pub stats: bool,
}

/// Parses `MIN-MAX` (inclusive, MIN ≤ MAX, MIN ≥ 1024).
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected MIN-MAX, e.g. 61000-65535"))?;
    let lo: u16 = lo.trim().parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.trim().parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo < 1024 || lo > hi {
        return Err(format!("{s:?}: need 1024 <= MIN <= MAX"));
    }
    Ok((lo, hi))
}

#[cfg(test)]
mod tests {
    use super::parse_port_range;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("61000-65535"), Ok((61000, 65535)));
        assert_eq!(parse_port_range("2000-2000"), Ok((2000, 2000)));
        assert!(parse_port_range("3000-2000").is_err());
        assert!(parse_port_range("80-90").is_err());
        assert!(parse_port_range("61000").is_err());
        assert!(parse_port_range("61000-70000").is_err());
    }
}
