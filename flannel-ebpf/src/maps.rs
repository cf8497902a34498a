//! The maps, BTF-described so that `bpftool map dump` prints field names. The agent pins them.
use aya_ebpf::{
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray},
    macros::btf_map,
};
use flannel_ebpf_common::{
    Clock, Counter, Endpoint, MapLayout, NatEntry, NatKey, NextHop, NodeConfig, RemoteNode,
    RemoteSubnet, RouteKey, backend, layout,
};

/// The entries of a map defined with key `K` and value `V`, from its declared layout; the build
/// fails if the definition's key or value size is not the layout's (the agent checks pins against
/// the same layout).
const fn declared<K, V>(layout: MapLayout) -> usize {
    assert!(
        size_of::<K>() as u32 == layout.key_size,
        "key size differs from the layout"
    );
    assert!(
        size_of::<V>() as u32 == layout.value_size,
        "value size differs from the layout"
    );
    layout.max_entries as usize
}

/// This node's configuration, double-buffered: the agent fills the slot not in force, then
/// points `FLANNEL_CFGSEL` at it (a 4-byte store), so a program never sees a torn update.
#[btf_map]
pub static FLANNEL_CONFIG: Array<NodeConfig, { declared::<u32, NodeConfig>(layout::CONFIG) }> =
    Array::new();

/// The `FLANNEL_CONFIG` slot in force (0 or 1).
#[btf_map]
pub static FLANNEL_CFGSEL: Array<u32, { declared::<u32, u32>(layout::CONFIG_SELECT) }> =
    Array::new();

/// Remote pod subnet → remote node, longest-prefix match on the inner destination.
#[btf_map]
pub static FLANNEL_ROUTES: LpmTrie<
    [u8; 4],
    RemoteSubnet,
    { declared::<RouteKey, RemoteSubnet>(layout::ROUTES) },
> = LpmTrie::new();

/// Remote subnets indexed by their number in the Network: the same routes as `FLANNEL_ROUTES` for
/// subnets of this node's prefix length, found with an array lookup the verifier inlines instead
/// of a trie walk.
#[btf_map]
pub static FLANNEL_SUBNETS: Array<
    RemoteSubnet,
    { declared::<u32, RemoteSubnet>(layout::SUBNETS) },
> = Array::new();

/// The underlay next hop towards each `FLANNEL_SUBNETS` slot's node (see [`NextHop`]).
#[btf_map]
pub static FLANNEL_NEXTHOP: Array<NextHop, { declared::<u32, NextHop>(layout::NEXTHOP) }> =
    Array::new();

/// Remote node public IP → node: encapsulated traffic is accepted only from these.
#[btf_map]
pub static FLANNEL_NODES: HashMap<
    [u8; 4],
    RemoteNode,
    { declared::<[u8; 4], RemoteNode>(layout::NODES) },
> = HashMap::new();

/// Local pod IPv4 → its veth and MAC, for delivery that bypasses the bridge.
#[btf_map]
pub static FLANNEL_ENDPTS: HashMap<
    [u8; 4],
    Endpoint,
    { declared::<[u8; 4], Endpoint>(layout::ENDPOINTS) },
> = HashMap::new();

/// Masqueraded flows, two entries each (original and reply direction). A plain hash, not an LRU:
/// when it is full a new flow fails (counted) instead of evicting an established one. The agent
/// sizes it (`--ip-masq-table-size`) and collects expired entries.
#[btf_map]
pub static FLANNEL_NAT: HashMap<NatKey, NatEntry, { declared::<NatKey, NatEntry>(layout::NAT) }> =
    HashMap::new();

/// Per-CPU packet and byte counters, indexed by program and verdict or drop reason
/// (`stats_slot`).
#[btf_map]
pub static FLANNEL_STATS: PerCpuArray<Counter, { declared::<u32, Counter>(layout::STATS) }> =
    PerCpuArray::new();

/// The next outer IPv4 ID of this CPU's encapsulated packets; a GSO packet takes one per segment,
/// as the kernel's segmentation numbers them.
#[btf_map]
pub static FLANNEL_IPID: PerCpuArray<u32, { declared::<u32, u32>(layout::IP_ID) }> =
    PerCpuArray::new();

/// The masquerade's clock, read once per tick on each CPU ([`Clock`]).
#[btf_map]
pub static FLANNEL_CLOCK: PerCpuArray<Clock, { declared::<u32, Clock>(layout::CLOCK) }> =
    PerCpuArray::new();

/// This node's configuration, if the agent has enabled the dataplane.
#[inline(always)]
pub fn config() -> Option<&'static NodeConfig> {
    let slot = FLANNEL_CFGSEL.get(0).map_or(0, |s| *s & 1);
    match FLANNEL_CONFIG.get(slot) {
        Some(cfg) if cfg.enabled != 0 => Some(cfg),
        _ => None,
    }
}

/// The route to `dst` (an address in the Network, network order) from `FLANNEL_SUBNETS`, if the
/// agent indexes this Network and the slot is filled, with its slot; `None` leaves it to
/// `FLANNEL_ROUTES`.
#[inline(always)]
pub fn indexed_route(cfg: &NodeConfig, dst: [u8; 4]) -> Option<(RemoteSubnet, u32)> {
    let shift = cfg.route_index_shift;
    if shift == 0 || shift >= 32 {
        return None;
    }
    let slot = u32::from_be_bytes(dst).wrapping_sub(u32::from_be_bytes(cfg.network_addr)) >> shift;
    match FLANNEL_SUBNETS.get(slot) {
        Some(route) if route.backend != backend::NONE => Some((*route, slot)),
        _ => None,
    }
}

/// The underlay next hop the agent found for `slot`'s node `node` (a public IP), if it is still
/// that node's: a slot given to another node, or a next hop being rewritten, reads as none.
#[inline(always)]
pub fn next_hop(slot: u32, node: [u8; 4]) -> Option<[u8; 4]> {
    let hop = FLANNEL_NEXTHOP.get_ptr(slot)?;
    // One 8-byte load, so that `node` and `via` come from the same write (map values are 8-byte
    // aligned).
    // SAFETY: a pointer to a map value of 8 bytes, from a successful lookup.
    let word = unsafe { core::ptr::read_volatile(hop.cast::<u64>()) }.to_ne_bytes();
    let (got, via) = (
        [word[0], word[1], word[2], word[3]],
        [word[4], word[5], word[6], word[7]],
    );
    (got == node && via != [0; 4]).then_some(via)
}
