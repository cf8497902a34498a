//! The maps, BTF-described so that `bpftool map dump` prints field names. The agent pins them.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use flannel_ebpf_common::{
    Counter, Endpoint, MAX_ENDPOINTS, MAX_NODES, MAX_ROUTES, NodeConfig, RemoteNode, RemoteSubnet,
    reason,
};

/// This node's configuration (one entry).
#[btf_map]
pub static FLANNEL_CONFIG: Array<NodeConfig, 1> = Array::new();

/// Remote pod subnet → remote node, longest-prefix match on the inner destination.
#[btf_map]
pub static FLANNEL_ROUTES: LpmTrie<[u8; 4], RemoteSubnet, { MAX_ROUTES as usize }> = LpmTrie::new();

/// Remote node public IP → node: encapsulated traffic is accepted only from these.
#[btf_map]
pub static FLANNEL_NODES: HashMap<[u8; 4], RemoteNode, { MAX_NODES as usize }> = HashMap::new();

/// Local pod IPv4 → its veth and MAC, for delivery that bypasses the bridge.
#[btf_map]
pub static FLANNEL_ENDPTS: HashMap<[u8; 4], Endpoint, { MAX_ENDPOINTS as usize }> = HashMap::new();

/// Per-CPU packet and byte counters, indexed by verdict or drop reason.
#[btf_map]
pub static FLANNEL_STATS: PerCpuArray<Counter, { reason::SLOTS as usize }> = PerCpuArray::new();

/// This node's configuration, if the agent has enabled the dataplane.
#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    match FLANNEL_CONFIG.get(0) {
        Some(cfg) if cfg.enabled != 0 => Some(cfg),
        _ => None,
    }
}
