//! The ABI between the flannel-ebpf programs and the agent.
//!
//! Every type here is `#[repr(C)]`, made of plain integers and byte arrays, with explicit padding:
//! `bytemuck::Pod` is derived so the compiler proves there is no hidden padding, and each size is
//! asserted below. Addresses and MACs are kept as byte arrays in network order, so `bpftool map
//! dump` shows them as bytes and neither side needs to care about endianness. Changing any layout
//! here requires bumping [`LAYOUT_VERSION`], which moves the pins to a new directory.
#![no_std]
// Padding fields are public so that both sides can build values with struct literals.
#![allow(
    clippy::pub_underscore_fields,
    reason = "explicit padding, written as zero by both sides"
)]

use bytemuck::{Pod, Zeroable};

/// Version of the pinned map layout. Pins live under `<pin-dir>/v<LAYOUT_VERSION>/`.
pub const LAYOUT_VERSION: u32 = 4;

/// Names of the maps as they appear in the object file, in bpffs and in `bpftool map show`
/// (kernel map names are at most 15 bytes).
pub mod map_name {
    pub const CONFIG: &str = "FLANNEL_CONFIG";
    pub const ROUTES: &str = "FLANNEL_ROUTES";
    pub const NODES: &str = "FLANNEL_NODES";
    pub const STATS: &str = "FLANNEL_STATS";
    pub const ENDPOINTS: &str = "FLANNEL_ENDPTS";
    pub const SUBNETS: &str = "FLANNEL_SUBNETS";
    pub const NAT: &str = "FLANNEL_NAT";
    /// Which of `FLANNEL_CONFIG`'s two slots is in force.
    pub const CONFIG_SELECT: &str = "FLANNEL_CFGSEL";
    /// The next outer IPv4 ID, per CPU.
    pub const IP_ID: &str = "FLANNEL_IPID";
    /// The masquerade's clock, per CPU: the time read at the current tick.
    pub const CLOCK: &str = "FLANNEL_CLOCK";
    /// The underlay next hop towards each remote node, indexed as `FLANNEL_SUBNETS`.
    pub const NEXTHOP: &str = "FLANNEL_NEXTHOP";
}

/// The shape of one pinned map. Declared once, in [`layout`]: the programs' map definitions are
/// checked against it when the eBPF crate compiles, and the agent checks pins against it before
/// reusing them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub name: &'static str,
    /// The kernel's `BPF_MAP_TYPE_*` number ([`map_kind`]).
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    /// Entries; the masquerade table's is the default, the agent sizes it at load time.
    pub max_entries: u32,
}

/// The kernel's map type numbers (`enum bpf_map_type`) of the maps we use.
pub mod map_kind {
    pub const HASH: u32 = 1;
    pub const ARRAY: u32 = 2;
    pub const PERCPU_ARRAY: u32 = 6;
    pub const LPM_TRIE: u32 = 11;
}

/// Every pinned map's layout. A change here (or in a type it names) needs a new
/// [`LAYOUT_VERSION`]; a new map does not (an older agent's pins lack it, so it is created, and
/// an older agent ignores it).
pub mod layout {
    use super::{
        CONFIG_SLOTS, Clock, Counter, DEFAULT_NAT_ENTRIES, Endpoint, MAX_ENDPOINTS, MAX_NODES,
        MAX_ROUTES, MapLayout, NatEntry, NatKey, NextHop, NodeConfig, RemoteNode, RemoteSubnet,
        RouteKey, STATS_SLOTS, SUBNET_SLOTS, map_kind, map_name,
    };

    const fn size<T>() -> u32 {
        size_of::<T>() as u32
    }

    pub const CONFIG: MapLayout = MapLayout {
        name: map_name::CONFIG,
        kind: map_kind::ARRAY,
        key_size: 4,
        value_size: size::<NodeConfig>(),
        max_entries: CONFIG_SLOTS,
    };
    pub const CONFIG_SELECT: MapLayout = MapLayout {
        name: map_name::CONFIG_SELECT,
        kind: map_kind::ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    pub const ROUTES: MapLayout = MapLayout {
        name: map_name::ROUTES,
        kind: map_kind::LPM_TRIE,
        key_size: size::<RouteKey>(),
        value_size: size::<RemoteSubnet>(),
        max_entries: MAX_ROUTES,
    };
    pub const SUBNETS: MapLayout = MapLayout {
        name: map_name::SUBNETS,
        kind: map_kind::ARRAY,
        key_size: 4,
        value_size: size::<RemoteSubnet>(),
        max_entries: SUBNET_SLOTS,
    };
    pub const NODES: MapLayout = MapLayout {
        name: map_name::NODES,
        kind: map_kind::HASH,
        key_size: 4,
        value_size: size::<RemoteNode>(),
        max_entries: MAX_NODES,
    };
    pub const ENDPOINTS: MapLayout = MapLayout {
        name: map_name::ENDPOINTS,
        kind: map_kind::HASH,
        key_size: 4,
        value_size: size::<Endpoint>(),
        max_entries: MAX_ENDPOINTS,
    };
    pub const NAT: MapLayout = MapLayout {
        name: map_name::NAT,
        kind: map_kind::HASH,
        key_size: size::<NatKey>(),
        value_size: size::<NatEntry>(),
        max_entries: DEFAULT_NAT_ENTRIES,
    };
    pub const STATS: MapLayout = MapLayout {
        name: map_name::STATS,
        kind: map_kind::PERCPU_ARRAY,
        key_size: 4,
        value_size: size::<Counter>(),
        max_entries: STATS_SLOTS,
    };
    pub const IP_ID: MapLayout = MapLayout {
        name: map_name::IP_ID,
        kind: map_kind::PERCPU_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
    };
    pub const CLOCK: MapLayout = MapLayout {
        name: map_name::CLOCK,
        kind: map_kind::PERCPU_ARRAY,
        key_size: 4,
        value_size: size::<Clock>(),
        max_entries: 1,
    };
    pub const NEXTHOP: MapLayout = MapLayout {
        name: map_name::NEXTHOP,
        kind: map_kind::ARRAY,
        key_size: 4,
        value_size: size::<NextHop>(),
        max_entries: SUBNET_SLOTS,
    };
    /// Every pinned map.
    pub const ALL: [MapLayout; 11] = [
        CONFIG,
        CONFIG_SELECT,
        ROUTES,
        SUBNETS,
        NODES,
        ENDPOINTS,
        NAT,
        STATS,
        IP_ID,
        CLOCK,
        NEXTHOP,
    ];
}

/// Names of the programs in the object file.
pub mod prog_name {
    /// tc ingress on `cni0`: traffic from local pods towards other nodes.
    pub const FROM_PODS: &str = "from_pods";
    /// tc egress on `cni0`: the node's own traffic towards other nodes' pods.
    pub const FROM_HOST: &str = "from_host";
    /// tc ingress on the uplink: decapsulation (fallback or main path) and local delivery.
    pub const FROM_WIRE: &str = "from_wire";
    /// XDP on the uplink: early decapsulation.
    pub const FROM_WIRE_XDP: &str = "from_wire_xdp";
    /// tc egress on the uplink: masquerade of pod traffic leaving the Network (`--ip-masq`).
    pub const TO_WIRE: &str = "to_wire";
    /// tc ingress on each learnt pod's host-side veth: `from_pods` before the bridge, so that
    /// pod traffic to other nodes never enters `cni0`.
    pub const FROM_POD_VETH: &str = "from_pod_veth";
}

/// The programs, as counters tell them apart: `FLANNEL_STATS` is indexed by
/// [`stats_slot`]`(program, reason)`.
pub mod program {
    pub const FROM_PODS: u32 = 0;
    pub const FROM_HOST: u32 = 1;
    pub const FROM_WIRE: u32 = 2;
    pub const FROM_WIRE_XDP: u32 = 3;
    pub const TO_WIRE: u32 = 4;
    /// Not a BPF program: the agent's slow-path receiver, which delivers the tunnel traffic the
    /// programs leave to the stack (outer fragments, outer IP options). It counts its verdicts in
    /// the same map, so `--stats` and the metrics show them beside the programs'.
    pub const SLOW_PATH: u32 = 5;
    pub const FROM_POD_VETH: u32 = 6;
    /// Number of programs.
    pub const COUNT: u32 = 7;
    /// Programs `FLANNEL_STATS` has room for (new programs keep the map's shape).
    pub const SLOTS: u32 = 8;
    /// Names, indexed by program (as in [`super::prog_name`]).
    pub const NAMES: [&str; COUNT as usize] = [
        super::prog_name::FROM_PODS,
        super::prog_name::FROM_HOST,
        super::prog_name::FROM_WIRE,
        super::prog_name::FROM_WIRE_XDP,
        super::prog_name::TO_WIRE,
        "slow_path",
        super::prog_name::FROM_POD_VETH,
    ];
}

/// Entries of `FLANNEL_STATS`: a counter per program and reason.
pub const STATS_SLOTS: u32 = program::SLOTS * reason::SLOTS;

/// The `FLANNEL_STATS` index of `reason` counted by `program`.
#[must_use]
pub const fn stats_slot(program: u32, reason: u32) -> u32 {
    program * reason::SLOTS + reason
}

/// Maximum number of remote subnets (one per node lease).
pub const MAX_ROUTES: u32 = 16_384;
/// Slots of the `FLANNEL_SUBNETS` array: the remote subnets of a Network indexed by their number
/// within it (a /16 Network of /24 subnets needs 256; 65,536 allows e.g. a /8 of /24s).
pub const SUBNET_SLOTS: u32 = 65_536;
/// Maximum number of known nodes (public IPs).
pub const MAX_NODES: u32 = 16_384;
/// Default size of the `FLANNEL_NAT` table (entries; a masqueraded flow takes two).
pub const DEFAULT_NAT_ENTRIES: u32 = 65_536;
/// Maximum number of local pods the agent has learnt.
pub const MAX_ENDPOINTS: u32 = 4_096;

/// Backend types, as stored in [`NodeConfig::backend`] and [`RemoteSubnet::backend`].
/// For a route, how packets reach the remote subnet; for this node, what it decapsulates
/// (plain packets for local pods are always delivered: host-gw and `DirectRouting` peers send them).
pub mod backend {
    /// No route (an empty `FLANNEL_SUBNETS` slot).
    pub const NONE: u8 = 0;
    /// VXLAN, as the kernel device flanneld creates (`flannel.<VNI>`).
    pub const VXLAN: u8 = 1;
    /// Unencapsulated, to the remote node's public IP as the next hop (host-gw, and `DirectRouting`
    /// peers of vxlan and ipip).
    pub const HOST_GW: u8 = 2;
    /// IPv4 in IPv4 (protocol 4), as flanneld's `flannel.ipip` device.
    pub const IPIP: u8 = 3;
    /// flannel's udp backend: the inner IPv4 packet is the whole UDP payload.
    pub const UDP: u8 = 4;
}

/// Slots of `FLANNEL_CONFIG`: the agent writes a new configuration into the slot not in force,
/// then switches `FLANNEL_CFGSEL` to it, so a program never reads a half-written configuration.
pub const CONFIG_SLOTS: u32 = 2;

/// This node's configuration: the entry of the `FLANNEL_CONFIG` array that `FLANNEL_CFGSEL`
/// selects.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NodeConfig {
    /// 1 once the agent has written a complete configuration; 0 makes every program pass all
    /// traffic untouched.
    pub enabled: u32,
    /// This node's backend ([`backend`]).
    pub backend: u32,
    /// This node's public IP: the outer source address and the decapsulation destination.
    pub public_ip: [u8; 4],
    /// This node's pod subnet (from its lease), network order.
    pub subnet_addr: [u8; 4],
    pub subnet_mask: [u8; 4],
    /// The flannel `Network`.
    pub network_addr: [u8; 4],
    pub network_mask: [u8; 4],
    /// The gateway address on `cni0` (first address of the subnet): never redirected to pods.
    pub gateway_ip: [u8; 4],
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// The backend's UDP port, host order: VXLAN destination port, or the udp backend's port
    /// (its source and destination).
    pub port: u16,
    pub _pad0: u16,
    /// MTU of the uplink: non-GSO packets that would not fit once encapsulated are dropped.
    pub uplink_mtu: u32,
    pub uplink_ifindex: u32,
    /// Index of `cni0`, or 0 while it does not exist (decapsulated packets then go to the stack).
    pub cni_ifindex: u32,
    /// This node's VTEP MAC, as advertised in its lease.
    pub vtep_mac: [u8; 6],
    /// The uplink's own MAC (destination of packets passed up after XDP decapsulation).
    pub uplink_mac: [u8; 6],
    /// `cni0`'s MAC: the source of frames delivered straight to a pod's veth.
    pub cni_mac: [u8; 6],
    pub _pad1: [u8; 2],
    /// 32 − this node's subnet prefix length when remote subnets of that length are also indexed
    /// by number in `FLANNEL_SUBNETS` (slot = (address − Network) >> shift); 0 when the Network
    /// has more subnets than [`SUBNET_SLOTS`] and only the LPM trie is used.
    pub route_index_shift: u32,
    /// The address pod traffic leaving the Network is masqueraded to (the uplink's), or zero when
    /// the eBPF masquerade is off.
    pub masq_ip: [u8; 4],
    /// The port (and ICMP echo identifier) range of masqueraded flows, host order, inclusive.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// [`nat::FULLY_RANDOM`] and the like.
    pub nat_flags: u32,
}

/// Value of the `FLANNEL_ROUTES` LPM trie, keyed by a remote node's pod subnet, and of the
/// `FLANNEL_SUBNETS` array, indexed by the subnet's number in the Network (an empty slot has
/// backend [`backend::NONE`]: the LPM trie decides).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RemoteSubnet {
    /// The remote node's public IP (outer destination).
    pub public_ip: [u8; 4],
    /// The remote node's VTEP MAC (inner destination MAC).
    pub vtep_mac: [u8; 6],
    /// The remote lease's backend ([`backend`]).
    pub backend: u8,
    pub _pad0: u8,
}

/// Value of the `FLANNEL_NEXTHOP` array, indexed as `FLANNEL_SUBNETS`: the underlay next hop
/// towards the slot's remote node, as the kernel routes the node's public IP out of the uplink
/// (the node itself on a shared segment, else the gateway), so that encapsulated packets are
/// handed to the neighbour without a route lookup per packet. Used only while `node` is the
/// slot's `RemoteSubnet::public_ip` and `via` is not zero; otherwise the kernel looks the route
/// up (as it does for every packet when the agent writes no next hops: policy routing rules,
/// multipath routes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NextHop {
    pub node: [u8; 4],
    pub via: [u8; 4],
}

/// Value of the `FLANNEL_NODES` hash, keyed by a remote node's public IP: the nodes whose
/// encapsulated traffic is accepted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RemoteNode {
    pub vtep_mac: [u8; 6],
    pub backend: u8,
    pub _pad0: u8,
}

/// Value of the `FLANNEL_ENDPTS` hash, keyed by a local pod's IPv4 address: where to deliver
/// its packets without going through the `cni0` bridge. Learnt by the agent from `cni0`'s
/// neighbour table and the bridge's forwarding database.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Endpoint {
    /// The host-side veth of the pod (a `cni0` port).
    pub ifindex: u32,
    /// The pod's MAC.
    pub mac: [u8; 6],
    /// [`endpoint`] flags (0 in entries of agents that knew none: plain redirection).
    pub flags: u8,
    pub _pad0: u8,
}

/// [`Endpoint::flags`].
pub mod endpoint {
    /// The port is a veth whose peer (the pod's interface) lives in another network namespace:
    /// `bpf_redirect_peer` can put a packet straight into the pod's ingress, skipping the
    /// host-side veth's transmit and the backlog queue.
    pub const PEER: u8 = 1;
}

/// One per-CPU counter of `FLANNEL_STATS`, indexed by [`stats_slot`] of program and [`reason`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// One CPU's entry of `FLANNEL_CLOCK`: `CLOCK_MONOTONIC` (coarse) as read at tick `jiffies`. The
/// masquerade stamps flows with it; the clock is read once per tick and CPU (`bpf_jiffies64` is
/// inlined by the verifier, the clock helper is a call of ~25 ns) and the coarse clock itself
/// moves only at ticks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Clock {
    pub jiffies: u64,
    pub ns: u64,
}

/// Key of the `FLANNEL_NAT` hash. Each masqueraded flow has two entries: the original direction
/// (`dir` [`nat::EGRESS`]: pod → remote, as the pod sent it) and the reply direction (`dir`
/// [`nat::INGRESS`]: remote → the node's address and the allocated port). ICMP echo keeps its
/// identifier in `sport` (egress) and `dport` (ingress), the other port zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Pod, Zeroable)]
pub struct NatKey {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub dir: u8,
    pub _pad0: [u8; 2],
}

impl NatKey {
    #[must_use]
    pub const fn new(
        src: [u8; 4],
        dst: [u8; 4],
        sport: [u8; 2],
        dport: [u8; 2],
        proto: u8,
        dir: u8,
    ) -> Self {
        Self {
            src,
            dst,
            sport,
            dport,
            proto,
            dir,
            _pad0: [0; 2],
        }
    }

    /// The reply-direction key of this original-direction key, whose packets leave from `addr`
    /// and `port` once translated.
    #[must_use]
    pub const fn reply(&self, addr: [u8; 4], port: [u8; 2]) -> Self {
        Self::new(self.dst, addr, self.dport, port, self.proto, nat::INGRESS)
    }
}

/// Value of the `FLANNEL_NAT` hash: what the key's packets are rewritten to (egress: the node's
/// address and the allocated port, as source; ingress: the pod's address and port, as
/// destination), when the entry last saw a packet, and the flow's state.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatEntry {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) of the last packet, refreshed at most once a
    /// [`nat::TOUCH_NS`].
    pub last_seen: u64,
    pub addr: [u8; 4],
    pub port: [u8; 2],
    /// [`nat::SEEN_REPLY`], [`nat::CLOSING`], [`nat::RESET`], [`nat::HOST`].
    pub flags: u8,
    pub _pad0: u8,
}

/// Masquerade constants shared by the programs and the agent.
pub mod nat {
    /// `NatKey::dir` of the original direction (pod → outside).
    pub const EGRESS: u8 = 0;
    /// `NatKey::dir` of the reply direction (outside → the node's address).
    pub const INGRESS: u8 = 1;
    /// Entry flag: a reply has been seen (TCP established, UDP stream).
    pub const SEEN_REPLY: u8 = 1;
    /// Entry flag: a TCP FIN was seen.
    pub const CLOSING: u8 = 2;
    /// Entry flag: a TCP RST was seen.
    pub const RESET: u8 = 4;
    /// Entry flag (ingress entries only): a flow of the node itself holds this port; never
    /// translated, never allocated to a pod.
    pub const HOST: u8 = 8;
    /// `NodeConfig::nat_flags`: ports are chosen at random (flanneld's `--random-fully`), not
    /// from a hash of the flow.
    pub const FULLY_RANDOM: u32 = 1;
    /// kube-proxy's masquerade mark: packets carrying it are left to kube-proxy's own rule.
    pub const KUBE_MASQ_MARK: u32 = 0x4000;
    /// How often `last_seen` is rewritten at most (fewer writes to a shared cache line).
    pub const TOUCH_NS: u64 = 1_000_000_000;
    /// A flow idle this long gives its port to a new flow that needs it (TCP: one that never saw
    /// a reply; closed TCP flows give it up after [`TIME_WAIT_NS`], reset ones at once): Linux's
    /// 30 s timeout for unreplied and single-exchange UDP.
    pub const REUSE_IDLE_NS: u64 = 30_000_000_000;
    /// Ports tried for a new flow before giving up ([`super::reason::DROP_NAT_NO_PORT`]):
    /// consecutive ports from a random (or hashed) start, so a range of up to this many ports is
    /// searched whole; in a larger, nearly exhausted range a new flow can fail while a port is
    /// still free (as the kernel's own bounded search).
    pub const PORT_TRIES: u32 = 128;
    /// Default port range: below Kubernetes' `NodePort` range (30000–32767) and Linux's default
    /// `ip_local_port_range` (32768–60999), so the node's own connections never autobind these
    /// ports (the agent also reserves them, `net.ipv4.ip_local_reserved_ports`); 28,976 ports
    /// per remote address, port and protocol.
    pub const DEFAULT_PORT_MIN: u16 = 1_024;
    pub const DEFAULT_PORT_MAX: u16 = 29_999;
    /// How long a TCP flow closed by a FIN each way keeps its port: the remote end that closed
    /// first holds the tuple in `TIME_WAIT` (Linux: 60 s), and a new connection on it could stall.
    pub const TIME_WAIT_NS: u64 = 60_000_000_000;
}

/// Key of the `FLANNEL_ROUTES` LPM trie as the kernel sees it: prefix length then address.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RouteKey {
    pub prefix_len: u32,
    pub addr: [u8; 4],
}

/// Verdicts and drop reasons: the index into `FLANNEL_STATS`. Every path through every program
/// ends in exactly one of these.
pub mod reason {
    // Forwarding verdicts. `_HOST`: the node's own packet (routed through `cni0`), not a pod's.
    /// A pod's packet VXLAN-encapsulated and redirected out of the uplink.
    pub const ENCAP_VXLAN: u32 = 0;
    pub const ENCAP_VXLAN_HOST: u32 = 1;
    /// IPIP-encapsulated and redirected out of the uplink.
    pub const ENCAP_IPIP: u32 = 2;
    pub const ENCAP_IPIP_HOST: u32 = 3;
    /// udp-backend-encapsulated and redirected out of the uplink.
    pub const ENCAP_UDP: u32 = 4;
    pub const ENCAP_UDP_HOST: u32 = 5;
    /// Sent unencapsulated to the remote node (host-gw, `DirectRouting`).
    pub const DIRECT: u32 = 6;
    pub const DIRECT_HOST: u32 = 7;
    /// Decapsulated by tc and delivered straight to the pod's veth.
    pub const DECAP_VXLAN: u32 = 8;
    pub const DECAP_IPIP: u32 = 9;
    pub const DECAP_UDP: u32 = 10;
    /// Decapsulated by tc and handed to `cni0` (pod not learnt yet, or the node itself).
    pub const DECAP_BRIDGE: u32 = 11;
    /// Decapsulated by XDP (then delivered by tc, which counts the delivery too).
    pub const DECAP_VXLAN_XDP: u32 = 12;
    pub const DECAP_IPIP_XDP: u32 = 13;
    pub const DECAP_UDP_XDP: u32 = 14;
    /// Plain IPv4 for a local pod (host-gw, `DirectRouting`, or decapsulated by XDP) delivered
    /// straight to its veth.
    pub const DELIVER_LOCAL: u32 = 15;
    /// Plain IPv4 for a local pod handed to `cni0`.
    pub const DELIVER_LOCAL_BRIDGE: u32 = 16;
    // Traffic that is not ours and goes on untouched.
    pub const PASS_NOT_IPV4: u32 = 17;
    pub const PASS_NOT_OVERLAY: u32 = 18;
    pub const PASS_LOCAL_SUBNET: u32 = 19;
    pub const PASS_NOT_CONFIGURED: u32 = 20;
    /// A fragment (of anything addressed to this node): to the stack, which reassembles it; if it
    /// was tunnel traffic, the agent's slow-path receiver delivers the whole datagram.
    pub const PASS_FRAGMENT: u32 = 21;
    pub const PASS_UNPARSED: u32 = 22;
    // Drops.
    pub const DROP_TRUNCATED: u32 = 23;
    pub const DROP_BAD_IPV4: u32 = 24;
    pub const DROP_NO_ROUTE: u32 = 25;
    pub const DROP_TTL_EXCEEDED: u32 = 26;
    pub const DROP_TOO_BIG: u32 = 27;
    pub const DROP_VXLAN_FLAGS: u32 = 28;
    pub const DROP_UNKNOWN_VNI: u32 = 29;
    pub const DROP_UNKNOWN_SOURCE: u32 = 30;
    pub const DROP_BAD_INNER_MAC: u32 = 31;
    pub const DROP_INNER_NOT_IPV4: u32 = 32;
    pub const DROP_INNER_NOT_LOCAL: u32 = 33;
    pub const DROP_ADJUST_ROOM: u32 = 34;
    pub const DROP_REDIRECT: u32 = 35;
    pub const DROP_UNSUPPORTED_BACKEND: u32 = 36;
    // Masquerade (`to_wire` at the uplink's egress, reverse translation in `from_wire`).
    /// A pod's packet leaving the Network, source rewritten to the node's address (rule 5).
    pub const NAT_SNAT: u32 = 37;
    /// A reply to a masqueraded flow, destination rewritten back to the pod.
    pub const NAT_REVERSE: u32 = 38;
    /// An ICMP error about a masqueraded flow, outer and embedded headers rewritten (either way).
    pub const NAT_ICMP_ERROR: u32 = 39;
    /// Leaves the uplink untranslated: inside the Network, multicast, kube-proxy's mark
    /// (0x4000), or not from a pod (flanneld's RETURN rules).
    pub const PASS_NO_MASQ: u32 = 40;
    /// The node's own flow on a port of the masquerade range: claimed so that no pod flow gets it.
    pub const PASS_NAT_HOST: u32 = 41;
    /// A pod's packet of a protocol that cannot be masqueraded per port (not TCP, UDP or ICMP
    /// echo/error): dropped, because sending it with the pod's address would leak it.
    pub const DROP_NAT_PROTO: u32 = 42;
    /// A fragment of a pod's packet leaving the Network: no port to translate.
    pub const DROP_NAT_FRAGMENT: u32 = 43;
    /// A new flow while the NAT table is full (established flows keep working).
    pub const DROP_NAT_TABLE_FULL: u32 = 44;
    /// A new flow for which no free port was found in the range.
    pub const DROP_NAT_NO_PORT: u32 = 45;
    /// A node flow on a port a pod flow already holds (counted; the pod flow keeps the port).
    pub const NAT_HOST_COLLISION: u32 = 46;
    /// A pod's packet too big for the pod MTU (a pod whose own MTU is larger, or a GSO packet
    /// whose segments are): handed to the kernel, whose route for remote subnets carries the pod
    /// MTU, so it answers a DF packet with ICMP fragmentation-needed and fragments the others
    /// (the fragments come back through `from_host`).
    pub const PASS_TOO_BIG: u32 = 47;
    /// Our tunnel traffic whose outer IPv4 total length or UDP length does not fit the packet
    /// or cannot hold the tunnel headers and an inner IPv4 header.
    pub const DROP_BAD_OUTER: u32 = 48;
    /// Our tunnel traffic whose outer IPv4 header carries options: to the stack, where the agent's
    /// slow-path receiver delivers it.
    pub const PASS_IP_OPTIONS: u32 = 49;
    /// Slow path (counted by the agent, program `slow_path`): tunnel traffic that was not ours to
    /// deliver (unknown source, wrong VNI or MAC, not for a local pod, malformed).
    pub const SLOW_PATH_REFUSED: u32 = 50;
    /// Slow path: tunnel traffic that could not be handed to the stack (the send failed).
    pub const SLOW_PATH_SEND_FAILED: u32 = 51;
    /// A pod's UDP packet of a flow already masqueraded (its entry in `FLANNEL_NAT` proves that
    /// the kernel forwarded the flow out of the uplink untouched by DNAT), sent from the pod's
    /// veth straight to the uplink by the kernel's FIB, where `to_wire` translates it: no bridge,
    /// routing or netfilter on the way (`from_pod_veth`).
    pub const NAT_FORWARD: u32 = 52;
    /// Number of reasons in use.
    pub const COUNT: u32 = 53;
    /// Slots of `FLANNEL_STATS`: room for new reasons without changing the pinned map's shape.
    pub const SLOTS: u32 = 64;

    /// Human-readable names, indexed by reason.
    pub const NAMES: [&str; COUNT as usize] = [
        "encap_vxlan",
        "encap_vxlan_host",
        "encap_ipip",
        "encap_ipip_host",
        "encap_udp",
        "encap_udp_host",
        "direct",
        "direct_host",
        "decap_vxlan",
        "decap_ipip",
        "decap_udp",
        "decap_bridge",
        "decap_vxlan_xdp",
        "decap_ipip_xdp",
        "decap_udp_xdp",
        "deliver_local",
        "deliver_local_bridge",
        "pass_not_ipv4",
        "pass_not_overlay",
        "pass_local_subnet",
        "pass_not_configured",
        "pass_fragment",
        "pass_unparsed",
        "drop_truncated",
        "drop_bad_ipv4",
        "drop_no_route",
        "drop_ttl_exceeded",
        "drop_too_big",
        "drop_vxlan_flags",
        "drop_unknown_vni",
        "drop_unknown_source",
        "drop_bad_inner_mac",
        "drop_inner_not_ipv4",
        "drop_inner_not_local",
        "drop_adjust_room",
        "drop_redirect",
        "drop_unsupported_backend",
        "nat_snat",
        "nat_reverse",
        "nat_icmp_error",
        "pass_no_masq",
        "pass_nat_host",
        "drop_nat_proto",
        "drop_nat_fragment",
        "drop_nat_table_full",
        "drop_nat_no_port",
        "nat_host_collision",
        "pass_too_big",
        "drop_bad_outer",
        "pass_ip_options",
        "slow_path_refused",
        "slow_path_send_failed",
        "nat_forward",
    ];

    /// True for the reasons that mean the packet was dropped.
    #[must_use]
    pub const fn is_drop(reason: u32) -> bool {
        matches!(
            reason,
            DROP_TRUNCATED
                ..=DROP_UNSUPPORTED_BACKEND
                    | DROP_NAT_PROTO
                    | DROP_NAT_FRAGMENT
                    | DROP_NAT_TABLE_FULL
                    | DROP_NAT_NO_PORT
                    | DROP_BAD_OUTER
                    | SLOW_PATH_REFUSED
                    | SLOW_PATH_SEND_FAILED
        )
    }
}

/// VXLAN wire constants (RFC 7348 and the Linux VXLAN device as flanneld configures it).
pub mod vxlan {
    /// Outer Ethernet + IPv4 + UDP + VXLAN + inner Ethernet.
    pub const ENCAP_LEN: usize = 14 + 20 + 8 + 8 + 14;
    /// What flannel subtracts from the uplink MTU for the pod MTU (outer headers without the outer
    /// Ethernet header).
    pub const MTU_OVERHEAD: u32 = 50;
    /// The Linux kernel's default VXLAN port, which flannel uses when `Backend.Port` is 0.
    pub const DEFAULT_PORT: u16 = 8472;
    pub const DEFAULT_VNI: u32 = 1;
    /// The I flag of the VXLAN header: the VNI is valid.
    pub const FLAG_VNI: u8 = 0x08;
    /// Outer TTL the kernel uses when the VXLAN device has `ttl 0` (`ip4_dst_hoplimit` default).
    pub const OUTER_TTL: u8 = 64;
}

/// IPIP wire constants (flanneld's `flannel.ipip` device).
pub mod ipip {
    /// The outer IPv4 header.
    pub const MTU_OVERHEAD: u32 = 20;
    /// IP protocol number of IPv4-in-IPv4.
    pub const PROTO: u8 = 4;
}

/// flannel's udp backend wire constants (pkg/backend/udp).
pub mod udp {
    /// Outer IPv4 + UDP headers; the inner IPv4 packet is the whole payload.
    pub const MTU_OVERHEAD: u32 = 28;
    pub const DEFAULT_PORT: u16 = 8285;
}

const _: () = assert!(size_of::<NodeConfig>() == 88);
const _: () = assert!(size_of::<NatKey>() == 16);
const _: () = assert!(size_of::<NatEntry>() == 16);
const _: () = assert!(size_of::<Endpoint>() == 12);
const _: () = assert!(size_of::<RemoteSubnet>() == 12);
const _: () = assert!(size_of::<RemoteNode>() == 8);
const _: () = assert!(size_of::<NextHop>() == 8);
const _: () = assert!(size_of::<Counter>() == 16);
const _: () = assert!(size_of::<RouteKey>() == 8);
const _: () = assert!(reason::NAMES.len() == reason::COUNT as usize);
const _: () = assert!(reason::COUNT <= reason::SLOTS);
const _: () = assert!(program::COUNT <= program::SLOTS);

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is `bytemuck::Pod` (derived above, which proves `repr(C)`, no padding and
    // every bit pattern valid), which is exactly what `aya::Pod` requires.
    unsafe impl aya::Pod for super::NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RemoteSubnet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::RemoteNode {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NextHop {}
}
