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
