//! The eBPF dataplane: loads the programs, keeps maps and links pinned under
//! `<pin-dir>/v<LAYOUT_VERSION>/` so that they outlive the agent, and reconciles the maps.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use flannel_ebpf_common::{
    Counter, Endpoint, LAYOUT_VERSION, MAX_NODES, MAX_ROUTES, MapLayout, NatEntry, NatKey, NextHop,
    NodeConfig, RemoteNode, RemoteSubnet, SUBNET_SLOTS, backend, layout, map_name, nat, prog_name,
    reason, stats_slot,
};
use ipnet::Ipv4Net;
use tracing::{info, warn};

use super::{Desired, SyncReport};
use crate::{Error, iface::Link};

/// The compiled programs, built by build.rs.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel"));

/// Where XDP decapsulation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecapMode {
    /// tc ingress on the uplink only (no XDP program).
    Tc,
    /// Native (driver) XDP; falls back to generic XDP, then to tc alone, if it cannot attach.
    Xdp,
    /// Generic (skb) XDP.
    XdpGeneric,
}

/// The pin layout: one versioned directory under the pin root.
#[derive(Debug, Clone)]
pub struct PinDir {
    pub root: PathBuf,
    pub dir: PathBuf,
}

impl PinDir {
    #[must_use]
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            dir: root.join(format!("v{LAYOUT_VERSION}")),
        }
    }

    #[must_use]
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn link_prefix(prog: &str) -> String {
        format!("link-{prog}-")
    }

    fn link(&self, prog: &str, ifindex: u32, suffix: &str) -> PathBuf {
        self.dir
            .join(format!("{}if{ifindex}{suffix}", Self::link_prefix(prog)))
    }

    /// Pinned links of `prog` other than `keep`.
    fn other_links(&self, prog: &str, keep: Option<&Path>) -> Vec<PathBuf> {
        let prefix = Self::link_prefix(prog);
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .filter(|p| Some(p.as_path()) != keep)
            .collect()
    }
}

/// Every pinned map's layout as this agent's programs declare it, with a masquerade table of
/// `nat_entries` (the one size the agent sets at load time).
fn expected_maps(nat_entries: u32) -> impl Iterator<Item = MapLayout> {
    layout::ALL.into_iter().map(move |mut m| {
        if m.name == layout::NAT.name {
            m.max_entries = nat_entries;
        }
        m
    })
}

pub struct EbpfDataplane {
    ebpf: Ebpf,
    pins: PinDir,
    /// What `FLANNEL_SUBNETS` holds (filled slots), read from the map once by the first sync.
    slots: Option<BTreeMap<u32, RemoteSubnet>>,
    /// The underlay next hop of each remote node, once [`Self::set_next_hops`] gave them.
    vias: Option<BTreeMap<Ipv4Addr, Ipv4Addr>>,
    /// What `FLANNEL_NEXTHOP` holds (filled slots), read from the map once.
    hops: Option<BTreeMap<u32, NextHop>>,
    /// Pod ports `from_pod_veth` was attached to (or adopted on) by this process.
    attached_ports: BTreeSet<u32>,
}

/// `NodeConfig::route_index_shift` for a Network whose subnets have `subnet_len` bits: 0 (no
/// index, the LPM trie alone) when the Network holds more subnets than [`SUBNET_SLOTS`].
#[must_use]
pub fn route_index_shift(network: Ipv4Net, subnet_len: u8) -> u32 {
    let net_len = network.prefix_len();
    if subnet_len <= net_len || subnet_len > 31 {
        return 0;
    }
    if (1u64 << (subnet_len - net_len)) > u64::from(SUBNET_SLOTS) {
        return 0;
    }
    32 - u32::from(subnet_len)
}

/// The `FLANNEL_SUBNETS` slot of a remote subnet, if the configuration indexes subnets of its
/// length.
fn subnet_slot(cfg: &NodeConfig, len: u32, addr: [u8; 4]) -> Option<u32> {
    let shift = cfg.route_index_shift;
    if shift == 0 || shift >= 32 || len != 32 - shift {
        return None;
    }
    let (addr, net, mask) = (
        u32::from_be_bytes(addr),
        u32::from_be_bytes(cfg.network_addr),
        u32::from_be_bytes(cfg.network_mask),
    );
    if addr & mask != net {
        return None;
    }
    let slot = (addr - net) >> shift;
    (slot < SUBNET_SLOTS).then_some(slot)
}

impl EbpfDataplane {
    /// Mounts bpffs if needed, checks any pinned state, and loads the programs, reusing pinned
    /// maps (a restarted agent adopts them instead of flushing). `nat_entries`: the size of the
    /// masquerade table.
    pub fn open(root: &Path, nat_entries: u32) -> Result<Self, Error> {
        ensure_bpffs(root)?;
        let pins = PinDir::new(root);
        check_other_layouts(&pins)?;
        fs::create_dir_all(&pins.dir).map_err(|e| Error::PinDir {
            path: pins.dir.clone(),
            message: e.to_string(),
        })?;
        check_pinned_maps(&pins, nat_entries)?;
        let mut loader = EbpfLoader::new();
        for map in layout::ALL {
            loader.map_pin_path(map.name, pins.map(map.name));
        }
        loader.map_max_entries(map_name::NAT, nat_entries);
        let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        load_programs(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pins,
            slots: None,
            vias: None,
            hops: None,
            attached_ports: BTreeSet::new(),
        })
    }

    /// Loads and verifies the programs with private, unpinned maps and attaches nothing: for
    /// `BPF_PROG_TEST_RUN` tests and micro-benchmarks. Pin and link methods must not be used.
    pub fn unpinned() -> Result<Self, Error> {
        Self::unpinned_from(OBJECT)
    }

    /// As [`Self::unpinned`], from another build of the programs (`program_cost` times an
    /// older revision's object beside [`OBJECT`]). It needs the same program names and the maps
    /// [`Self::set_config`] and [`Self::sync`] use, with the same layouts; maps it lacks that
    /// nothing here touches do not matter. `object` need not be aligned.
    pub fn unpinned_from(object: &[u8]) -> Result<Self, Error> {
        // The ELF parser reads headers in place and wants them 8-byte aligned.
        let aligned: Vec<u64>;
        let object = if object.as_ptr().align_offset(8) == 0 {
            object
        } else {
            let mut words = vec![0u64; object.len().div_ceil(8)];
            for (word, chunk) in words.iter_mut().zip(object.chunks(8)) {
                let mut bytes = [0u8; 8];
                bytes[..chunk.len()].copy_from_slice(chunk);
                *word = u64::from_ne_bytes(bytes);
            }
            aligned = words;
            // SAFETY: `aligned` holds at least `object.len()` initialised bytes and outlives
            // this borrow; u8 has no alignment or validity requirements.
            unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast::<u8>(), object.len()) }
        };
        let mut ebpf = Ebpf::load(object).map_err(|e| Error::Load(Box::new(e)))?;
        load_programs(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pins: PinDir::new(Path::new("/nonexistent")),
            slots: None,
            vias: None,
            hops: None,
            attached_ports: BTreeSet::new(),
        })
    }

    /// As [`Self::unpinned`], with a masquerade table of `nat_entries`.
    pub fn unpinned_with(nat_entries: u32) -> Result<Self, Error> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(map_name::NAT, nat_entries)
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        load_programs(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pins: PinDir::new(Path::new("/nonexistent")),
            slots: None,
            vias: None,
            hops: None,
            attached_ports: BTreeSet::new(),
        })
    }

    /// Every entry of the masquerade table.
    pub fn nat_entries(&self) -> Result<Vec<(NatKey, NatEntry)>, Error> {
        let map = self
            .ebpf
            .map(map_name::NAT)
            .ok_or_else(|| missing_map(map_name::NAT))?;
        let table: HashMap<_, NatKey, NatEntry> =
            HashMap::try_from(map).map_err(|e| map_err(map_name::NAT, "opening", e))?;
        list_nat(&table)
    }

    /// Collects the masquerade table (see [`collect_nat`]).
    pub fn collect_nat(
        &mut self,
        timeouts: &NatTimeouts,
        now_ns: u64,
    ) -> Result<NatCollection, Error> {
        let map = self
            .ebpf
            .map_mut(map_name::NAT)
            .ok_or_else(|| missing_map(map_name::NAT))?;
        let mut table: HashMap<_, NatKey, NatEntry> =
            HashMap::try_from(map).map_err(|e| map_err(map_name::NAT, "opening", e))?;
        collect_in(&mut table, timeouts, now_ns)
    }

    /// The loaded object, for tests that drive the programs with `BPF_PROG_TEST_RUN`.
    #[must_use]
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    /// The loaded object, for tests that drive the programs with `BPF_PROG_TEST_RUN`.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    #[must_use]
    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// The configuration in force (what a previous agent left, after a restart).
    pub fn config(&self) -> Result<NodeConfig, Error> {
        let slot = self.config_slot()?;
        self.array::<NodeConfig>(map_name::CONFIG)?
            .get(&slot, 0)
            .map_err(|e| map_err(map_name::CONFIG, "reading", e))
    }

    /// The `FLANNEL_CONFIG` slot in force.
    pub fn config_slot(&self) -> Result<u32, Error> {
        Ok(self
            .array::<u32>(map_name::CONFIG_SELECT)?
            .get(&0, 0)
            .map_err(|e| map_err(map_name::CONFIG_SELECT, "reading", e))?
            & 1)
    }

    /// An array map of the object, opened for reading.
    fn array<V: aya::Pod>(&self, name: &str) -> Result<Array<&MapData, V>, Error> {
        let map = self.ebpf.map(name).ok_or_else(|| missing_map(name))?;
        Array::try_from(map).map_err(|e| map_err(name, "opening", e))
    }

    /// An array map of the object, opened for writing.
    fn array_mut<V: aya::Pod>(&mut self, name: &str) -> Result<Array<&mut MapData, V>, Error> {
        let map = self.ebpf.map_mut(name).ok_or_else(|| missing_map(name))?;
        Array::try_from(map).map_err(|e| map_err(name, "opening", e))
    }

    /// Puts `cfg` in force: written whole into the slot not in force, then selected, so a
    /// program never reads a half-written configuration.
    pub fn set_config(&mut self, cfg: &NodeConfig) -> Result<(), Error> {
        let next = 1 - self.config_slot()?;
        self.array_mut::<NodeConfig>(map_name::CONFIG)?
            .set(next, cfg, 0)
            .map_err(|e| map_err(map_name::CONFIG, "writing", e))?;
        self.array_mut::<u32>(map_name::CONFIG_SELECT)?
            .set(0, next, 0)
            .map_err(|e| map_err(map_name::CONFIG_SELECT, "writing", e))
    }

    /// Makes the maps hold exactly `desired`, touching only what differs. New nodes are accepted
    /// before routes point at them, and forgotten only after their routes are gone. Routes go
    /// into the LPM trie and, where the configuration in the map indexes them, into
    /// `FLANNEL_SUBNETS` (so sync again after a configuration that changes the index).
    pub fn sync(&mut self, desired: &Desired) -> Result<SyncReport, Error> {
        // A set that does not fit is refused whole: a partly written set would leave maps that
        // disagree with each other (nodes accepted as tunnel sources without their routes).
        check_capacity(desired).map_err(Error::Unsupported)?;
        let mut report = SyncReport::default();
        // The Network and index geometry (set_config comes first).
        let cfg = self.config()?;
        let [routes_map, nodes_map] = self
            .ebpf
            .maps_disjoint_mut([map_name::ROUTES, map_name::NODES]);
        let mut nodes: HashMap<_, [u8; 4], RemoteNode> =
            HashMap::try_from(nodes_map.ok_or_else(|| missing_map(map_name::NODES))?)
                .map_err(|e| map_err(map_name::NODES, "opening", e))?;
        let mut routes: LpmTrie<_, [u8; 4], RemoteSubnet> =
            LpmTrie::try_from(routes_map.ok_or_else(|| missing_map(map_name::ROUTES))?)
                .map_err(|e| map_err(map_name::ROUTES, "opening", e))?;

        let want_nodes: BTreeMap<[u8; 4], RemoteNode> = desired
            .nodes
            .iter()
            .map(|(ip, n)| (ip.octets(), *n))
            .collect();
        let stale_nodes = upsert(&mut nodes, &want_nodes, map_name::NODES, &mut report)?;

        let current_routes: BTreeMap<(u32, [u8; 4]), RemoteSubnet> = routes
            .iter()
            .map(|r| r.map(|(k, v)| ((k.prefix_len(), k.data()), v)))
            .collect::<Result<_, _>>()
            .map_err(|e| map_err(map_name::ROUTES, "listing", e))?;
        let want: BTreeMap<(u32, [u8; 4]), &RemoteSubnet> = desired
            .routes
            .iter()
            .map(|(net, v)| ((u32::from(net.prefix_len()), net.network().octets()), v))
            .collect();
        for (&(len, addr), value) in &want {
            match current_routes.get(&(len, addr)) {
                Some(cur) if cur == *value => continue,
                Some(_) => report.updated += 1,
                None => report.added += 1,
            }
            routes
                .insert(&Key::new(len, addr), *value, 0)
                .map_err(|e| {
                    map_err(
                        map_name::ROUTES,
                        &format!("inserting {}/{len}", Ipv4Addr::from(addr)),
                        e,
                    )
                })?;
        }
        for &(len, addr) in current_routes.keys() {
            if !want.contains_key(&(len, addr)) {
                routes
                    .remove(&Key::new(len, addr))
                    .map_err(|e| map_err(map_name::ROUTES, "removing", e))?;
                report.removed += 1;
            }
        }
        remove(&mut nodes, &stale_nodes, map_name::NODES, &mut report)?;
        let want_slots: BTreeMap<u32, RemoteSubnet> = want
            .iter()
            .filter_map(|(&(len, addr), v)| Some((subnet_slot(&cfg, len, addr)?, **v)))
            .collect();
        self.sync_slots(&want_slots)?;
        Ok(report)
    }

    /// Makes `FLANNEL_SUBNETS` hold exactly `want`, and `FLANNEL_NEXTHOP` follow it.
    fn sync_slots(&mut self, want: &BTreeMap<u32, RemoteSubnet>) -> Result<(), Error> {
        let known = self.slots.take();
        self.sync_array(map_name::SUBNETS, known, want, |v| {
            v.backend != backend::NONE
        })?;
        self.slots = Some(want.clone());
        self.sync_next_hops()
    }

    /// Gives the underlay next hop of each remote node (public IP → gateway or the node itself),
    /// written for the nodes of `FLANNEL_SUBNETS`; `None` empties `FLANNEL_NEXTHOP`, so that the
    /// kernel routes every encapsulated packet (as when no agent keeps the next hops current).
    /// Returns how many slots hold one.
    pub fn set_next_hops(
        &mut self,
        vias: Option<BTreeMap<Ipv4Addr, Ipv4Addr>>,
    ) -> Result<usize, Error> {
        self.vias = Some(vias.unwrap_or_default());
        self.sync_next_hops()?;
        Ok(self.hops.as_ref().map_or(0, BTreeMap::len))
    }

    /// Brings `FLANNEL_NEXTHOP` to the slots and next hops known (emptied while the slots are
    /// not known; nothing before
    /// [`Self::set_next_hops`]: an object without the map, as `program_cost`'s baseline, works).
    fn sync_next_hops(&mut self) -> Result<(), Error> {
        let Some(vias) = &self.vias else {
            return Ok(());
        };
        // Slots not known (a sync failed): empty, which is always safe.
        let empty = BTreeMap::new();
        let want: BTreeMap<u32, NextHop> = self
            .slots
            .as_ref()
            .unwrap_or(&empty)
            .iter()
            .filter(|(_, r)| r.backend != backend::HOST_GW)
            .filter_map(|(&slot, r)| {
                let via = vias.get(&Ipv4Addr::from(r.public_ip))?;
                Some((
                    slot,
                    NextHop {
                        node: r.public_ip,
                        via: via.octets(),
                    },
                ))
            })
            .collect();
        let known = self.hops.take();
        self.sync_array(map_name::NEXTHOP, known, &want, |v| v.via != [0; 4])?;
        self.hops = Some(want);
        Ok(())
    }

    /// Makes array `name` hold exactly `want` (every other slot empty, `V::default()`), from
    /// what it holds: `known`, or once per process what a previous agent left (the `filled`
    /// slots). An array slot is rewritten in place, not swapped as a trie or hash entry is, so
    /// a changed slot is emptied first: a packet that races the change reads an empty slot
    /// (the trie, or the kernel's route lookup, decides) instead of half of each value.
    fn sync_array<V: aya::Pod + PartialEq + Default>(
        &mut self,
        name: &str,
        known: Option<BTreeMap<u32, V>>,
        want: &BTreeMap<u32, V>,
        filled: impl Fn(&V) -> bool,
    ) -> Result<(), Error> {
        let mut array = self.array_mut::<V>(name)?;
        let current = if let Some(slots) = known {
            slots
        } else {
            let mut slots = BTreeMap::new();
            for i in 0..array.len() {
                let v = array.get(&i, 0).map_err(|e| map_err(name, "reading", e))?;
                if filled(&v) {
                    slots.insert(i, v);
                }
            }
            slots
        };
        let empty = V::default();
        let mut set = |slot: u32, v: &V| {
            array
                .set(slot, v, 0)
                .map_err(|e| map_err(name, &format!("writing slot {slot}"), e))
        };
        for (&slot, v) in want {
            match current.get(&slot) {
                Some(cur) if cur == v => continue,
                Some(_) => set(slot, &empty)?,
                None => {}
            }
            set(slot, v)?;
        }
        for &slot in current.keys() {
            if !want.contains_key(&slot) {
                set(slot, &empty)?;
            }
        }
        Ok(())
    }

    /// The endpoint map's entries (local pod IPv4 → veth and MAC).
    pub fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, Endpoint>, Error> {
        let map = self
            .ebpf
            .map(map_name::ENDPOINTS)
            .ok_or_else(|| missing_map(map_name::ENDPOINTS))?;
        let endpoints: HashMap<_, [u8; 4], Endpoint> =
            HashMap::try_from(map).map_err(|e| map_err(map_name::ENDPOINTS, "opening", e))?;
        endpoints
            .iter()
            .map(|r| r.map(|(ip, e)| (Ipv4Addr::from(ip), e)))
            .collect::<Result<_, _>>()
            .map_err(|e| map_err(map_name::ENDPOINTS, "listing", e))
    }

    /// Makes the endpoint map hold exactly `desired` (local pod IPv4 → veth and MAC).
    pub fn sync_endpoints(
        &mut self,
        desired: &BTreeMap<Ipv4Addr, Endpoint>,
    ) -> Result<SyncReport, Error> {
        let current = self.endpoints()?;
        self.sync_endpoints_from(&current, desired)
    }

    /// As [`Self::sync_endpoints`], given what the map holds (as [`Self::endpoints`] listed it
    /// this pass; only this agent writes it), so that the map is not listed twice.
    pub fn sync_endpoints_from(
        &mut self,
        current: &BTreeMap<Ipv4Addr, Endpoint>,
        desired: &BTreeMap<Ipv4Addr, Endpoint>,
    ) -> Result<SyncReport, Error> {
        let mut report = SyncReport::default();
        let map = self
            .ebpf
            .map_mut(map_name::ENDPOINTS)
            .ok_or_else(|| missing_map(map_name::ENDPOINTS))?;
        let mut endpoints: HashMap<_, [u8; 4], Endpoint> =
            HashMap::try_from(map).map_err(|e| map_err(map_name::ENDPOINTS, "opening", e))?;
        let octets = |m: &BTreeMap<Ipv4Addr, Endpoint>| -> BTreeMap<[u8; 4], Endpoint> {
            m.iter().map(|(ip, e)| (ip.octets(), *e)).collect()
        };
        let stale = upsert_known(
            &mut endpoints,
            octets(current),
            &octets(desired),
            map_name::ENDPOINTS,
            &mut report,
        )?;
        remove(&mut endpoints, &stale, map_name::ENDPOINTS, &mut report)?;
        Ok(report)
    }

    /// Attaches a tc program at `direction` of `link`, or atomically replaces the program of the
    /// link a previous agent pinned there. Pins of the same program on other (gone or renamed)
    /// interfaces are removed.
    pub fn attach_tc(
        &mut self,
        name: &str,
        link: &Link,
        direction: TcAttachType,
    ) -> Result<(), Error> {
        let pin = self.pins.link(name, link.index, "");
        remove_pins(&self.pins.other_links(name, Some(&pin)));
        self.attach_tc_pinned(name, link, direction, &pin)
    }

    /// Attaches `name` to `link` at tcx `direction` with its link pinned at `pin`, adopting (and
    /// replacing the program of) a link already pinned there.
    fn attach_tc_pinned(
        &mut self,
        name: &str,
        link: &Link,
        direction: TcAttachType,
        pin: &Path,
    ) -> Result<(), Error> {
        let pin = pin.to_path_buf();
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        if pin.exists() {
            let adopted = adopt_pinned::<SchedClassifierLink>(&pin, |l| {
                let id = prog.attach_to_link(l).map_err(|e| e.to_string())?;
                // The pin keeps the link; our handle to it can go.
                drop(prog.take_link(id));
                Ok(())
            });
            match adopted {
                Ok(()) => {
                    info!(program = name, interface = %link.name, "replaced the program of the pinned tc link");
                    return Ok(());
                }
                Err(e) => {
                    warn!(program = name, interface = %link.name, "pinned tc link unusable ({e}); attaching anew");
                    remove_pins(std::slice::from_ref(&pin));
                }
            }
        }
        let id = prog
            .attach_with_options(
                &link.name,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(|source| {
                prog_err(
                    name,
                    &format!("attaching to {} {direction:?} (tcx)", link.name),
                    source,
                )
            })?;
        let taken = prog
            .take_link(id)
            .map_err(|source| prog_err(name, "taking the link", source))?;
        pin_link(taken, &pin)?;
        info!(program = name, interface = %link.name, ?direction, "attached at tc");
        Ok(())
    }

    /// Makes `from_pod_veth` attached (tc ingress, pinned) on exactly `ports`: attached where
    /// missing (an adopted pin gets the new program), detached and unpinned where a port is
    /// gone or no longer a pod's. Returns how many were attached and removed.
    pub fn sync_pod_ports(&mut self, ports: &[Link]) -> Result<(usize, usize), Error> {
        let name = prog_name::FROM_POD_VETH;
        let want: Vec<PathBuf> = ports
            .iter()
            .map(|l| self.pins.link(name, l.index, ""))
            .collect();
        let stale: Vec<PathBuf> = self
            .pins
            .other_links(name, None)
            .into_iter()
            .filter(|p| !want.contains(p))
            .collect();
        remove_pins(&stale);
        let mut attached = 0;
        for (port, pin) in ports.iter().zip(&want) {
            if self.attached_ports.contains(&port.index) && pin.exists() {
                continue;
            }
            self.attach_tc_pinned(name, port, TcAttachType::Ingress, pin)?;
            self.attached_ports.insert(port.index);
            attached += 1;
        }
        self.attached_ports
            .retain(|i| ports.iter().any(|p| p.index == *i));
        Ok((attached, stale.len()))
    }

    /// Detaches `name` from every interface it is pinned on (now, not when the kernel gets to
    /// it); `true` if it was attached anywhere.
    pub fn detach(&self, name: &str) -> bool {
        let pins = self.pins.other_links(name, None);
        for pin in &pins {
            if let Err(e) = detach_pinned_link(pin) {
                warn!(pin = %pin.display(), "detaching: {e}");
            }
        }
        remove_pins(&pins);
        !pins.is_empty()
    }

    /// Attaches (or adopts) the XDP decapsulation program on the uplink per `mode`; returns the
    /// XDP mode in use, or `None` when decapsulation is left to tc.
    pub fn attach_xdp(
        &mut self,
        link: &Link,
        mode: DecapMode,
    ) -> Result<Option<&'static str>, Error> {
        let name = prog_name::FROM_WIRE_XDP;
        let attempts: &[(XdpMode, &'static str)] = match mode {
            DecapMode::Tc => {
                remove_pins(&self.pins.other_links(name, None));
                return Ok(None);
            }
            DecapMode::Xdp => &[(XdpMode::Driver, "native"), (XdpMode::Skb, "generic")],
            DecapMode::XdpGeneric => &[(XdpMode::Skb, "generic")],
        };
        for &(xdp_mode, label) in attempts {
            let pin = self.pins.link(name, link.index, &format!("-{label}"));
            let prog: &mut Xdp = program(&mut self.ebpf, name)?;
            if pin.exists() {
                let adopted = adopt_pinned::<XdpLink>(&pin, |l| {
                    let id = prog.attach_to_link(l).map_err(|e| e.to_string())?;
                    drop(prog.take_link(id));
                    Ok(())
                });
                match adopted {
                    Ok(()) => {
                        remove_pins(&self.pins.other_links(name, Some(&pin)));
                        info!(interface = %link.name, mode = label, "replaced the program of the pinned XDP link");
                        return Ok(Some(label));
                    }
                    Err(e) => {
                        warn!(interface = %link.name, "pinned XDP link unusable ({e}); attaching anew");
                        remove_pins(std::slice::from_ref(&pin));
                    }
                }
            }
            // Only one XDP program per interface: drop other modes' links before attaching.
            remove_pins(&self.pins.other_links(name, None));
            match prog.attach_to_if_index(link.index, xdp_mode) {
                Ok(id) => {
                    let taken = prog
                        .take_link(id)
                        .map_err(|source| prog_err(name, "taking the link", source))?;
                    pin_link(taken, &pin)?;
                    info!(interface = %link.name, mode = label, "attached XDP decapsulation");
                    return Ok(Some(label));
                }
                Err(e) => warn!(interface = %link.name, mode = label, "XDP attach failed: {e}"),
            }
        }
        warn!(interface = %link.name, "XDP could not attach: decapsulation stays in tc");
        Ok(None)
    }
}

/// Inserts or updates every entry of `want` that differs in `map`; returns the keys the map
/// holds beyond `want`, for the caller to remove when that is safe.
/// Checks that `desired` fits the maps (their sizes are fixed by the pinned layout).
pub fn check_capacity(desired: &Desired) -> Result<(), String> {
    let (nodes, routes) = (desired.nodes.len(), desired.routes.len());
    if nodes > MAX_NODES as usize || routes > MAX_ROUTES as usize {
        return Err(format!(
            "{routes} remote subnets of {nodes} nodes: more than the eBPF maps hold ({MAX_ROUTES} subnets, {MAX_NODES} nodes); nothing of this lease set was applied"
        ));
    }
    Ok(())
}

fn upsert<V: aya::Pod + PartialEq>(
    map: &mut HashMap<&mut MapData, [u8; 4], V>,
    want: &BTreeMap<[u8; 4], V>,
    name: &str,
    report: &mut SyncReport,
) -> Result<Vec<[u8; 4]>, Error> {
    let current: BTreeMap<[u8; 4], V> = map
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|e| map_err(name, "listing", e))?;
    upsert_known(map, current, want, name, report)
}

/// Writes the entries of `want` that `current` (what the map holds) lacks or holds otherwise;
/// returns the keys of `current` that `want` lacks.
fn upsert_known<V: aya::Pod + PartialEq>(
    map: &mut HashMap<&mut MapData, [u8; 4], V>,
    current: BTreeMap<[u8; 4], V>,
    want: &BTreeMap<[u8; 4], V>,
    name: &str,
    report: &mut SyncReport,
) -> Result<Vec<[u8; 4]>, Error> {
    for (key, value) in want {
        match current.get(key) {
            Some(cur) if cur == value => continue,
            Some(_) => report.updated += 1,
            None => report.added += 1,
        }
        map.insert(key, value, 0)
            .map_err(|e| map_err(name, &format!("inserting {}", Ipv4Addr::from(*key)), e))?;
    }
    Ok(current
        .into_keys()
        .filter(|k| !want.contains_key(k))
        .collect())
}

fn remove<V: aya::Pod>(
    map: &mut HashMap<&mut MapData, [u8; 4], V>,
    keys: &[[u8; 4]],
    name: &str,
    report: &mut SyncReport,
) -> Result<(), Error> {
    for key in keys {
        map.remove(key).map_err(|e| map_err(name, "removing", e))?;
        report.removed += 1;
    }
    Ok(())
}

/// Opens the link pinned at `pin` as an `L` and hands it to `attach` (an atomic program
/// replacement). Errors come back as text: the caller then attaches anew.
fn adopt_pinned<L>(pin: &Path, attach: impl FnOnce(L) -> Result<(), String>) -> Result<(), String>
where
    L: TryFrom<FdLink>,
    L::Error: std::fmt::Display,
{
    let fd_link = FdLink::from(PinnedLink::from_pin(pin).map_err(|e| e.to_string())?);
    attach(L::try_from(fd_link).map_err(|e| e.to_string())?)
}

/// Pins a freshly attached link so that it outlives the agent.
fn pin_link<L>(link: L, pin: &Path) -> Result<(), Error>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let err = |message: String| Error::Pin {
        path: pin.to_path_buf(),
        message,
    };
    FdLink::try_from(link)
        .map_err(|e| err(format!("not a bpf_link: {e}")))?
        .pin(pin)
        .map_err(|e| err(e.to_string()))?;
    Ok(())
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), Error> {
    for name in [
        prog_name::FROM_PODS,
        prog_name::FROM_HOST,
        prog_name::FROM_WIRE,
        prog_name::TO_WIRE,
        prog_name::FROM_POD_VETH,
    ] {
        if name == prog_name::FROM_POD_VETH && ebpf.program(name).is_none() {
            // An older object (a cost baseline) without it.
            continue;
        }
        let prog: &mut SchedClassifier = program(ebpf, name)?;
        prog.load()
            .map_err(|source| prog_err(name, "verifying", source))?;
    }
    let prog: &mut Xdp = program(ebpf, prog_name::FROM_WIRE_XDP)?;
    prog.load()
        .map_err(|source| prog_err(prog_name::FROM_WIRE_XDP, "verifying", source))
}

/// A counter of one program and reason, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramCounter {
    pub program: &'static str,
    pub reason: &'static str,
    pub counter: Counter,
}

/// Per-reason counters summed over CPUs and programs.
pub fn sum_stats(ebpf: &Ebpf) -> Result<Vec<(&'static str, Counter)>, Error> {
    Ok(totals(&sum_stats_by_program(ebpf)?))
}

/// Per-program, per-reason counters summed over CPUs.
pub fn sum_stats_by_program(ebpf: &Ebpf) -> Result<Vec<ProgramCounter>, Error> {
    let map = ebpf
        .map(map_name::STATS)
        .ok_or_else(|| missing_map(map_name::STATS))?;
    let array: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(map).map_err(|e| map_err(map_name::STATS, "opening", e))?;
    collect_stats(&array)
}

/// Per-reason totals over programs, in reason order.
#[must_use]
pub fn totals(by_program: &[ProgramCounter]) -> Vec<(&'static str, Counter)> {
    reason::NAMES
        .iter()
        .map(|&name| {
            let total = by_program
                .iter()
                .filter(|c| c.reason == name)
                .fold(Counter::default(), |acc, c| add(acc, c.counter));
            (name, total)
        })
        .collect()
}

fn add(a: Counter, b: Counter) -> Counter {
    Counter {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
    }
}

fn collect_stats<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, Counter>,
) -> Result<Vec<ProgramCounter>, Error> {
    let mut out = Vec::new();
    for (p, program) in flannel_ebpf_common::program::NAMES.iter().enumerate() {
        for (r, reason) in reason::NAMES.iter().enumerate() {
            let values = array
                .get(&stats_slot(p as u32, r as u32), 0)
                .map_err(|e| map_err(map_name::STATS, "reading", e))?;
            out.push(ProgramCounter {
                program,
                reason,
                counter: values.iter().copied().fold(Counter::default(), add),
            });
        }
    }
    Ok(out)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| Error::Unsupported(format!("program {name} missing from the eBPF object")))?
        .try_into()
        .map_err(|source| prog_err(name, "wrong program type", source))
}

fn prog_err(name: &str, context: &str, source: aya::programs::ProgramError) -> Error {
    Error::Program {
        program: name.into(),
        context: context.into(),
        source: Box::new(source),
    }
}

fn map_err(name: &str, context: &str, source: aya::maps::MapError) -> Error {
    Error::Map {
        map: name.into(),
        context: context.into(),
        source: Box::new(source),
    }
}

fn missing_map(name: &str) -> Error {
    Error::Unsupported(format!("map {name} missing from the eBPF object"))
}

/// Detaches the link pinned at `pin` now (`BPF_OBJ_GET`, then `BPF_LINK_DETACH`); aya has no
/// call for it.
fn detach_pinned_link(pin: &Path) -> std::io::Result<()> {
    use std::os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    };
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    // `union bpf_attr` as 128 zeroed bytes; `obj_get.pathname` and `link_detach.link_fd` are both
    // its first field.
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: `attr` outlives the call and its size is passed; `path` outlives `attr[0]`'s use.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, attr.as_mut_ptr(), 128) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr = [0u64; 16];
    attr[0] = u64::from(fd.as_raw_fd().cast_unsigned());
    // SAFETY: as above.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_mut_ptr(), 128) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn remove_pins(paths: &[PathBuf]) {
    for p in paths {
        match fs::remove_file(p) {
            Ok(()) => info!(pin = %p.display(), "removed stale pin"),
            Err(e) => warn!(pin = %p.display(), "could not remove stale pin: {e}"),
        }
    }
}

/// Makes sure `root` is on a bpffs, mounting one at /sys/fs/bpf if nothing is mounted there.
fn ensure_bpffs(root: &Path) -> Result<(), Error> {
    let bpffs = |p: &Path| {
        nix::sys::statfs::statfs(p)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
    };
    // A misconfigured --pin-dir is an error to report, not a reason to fall back to netlink
    // (which is for kernels that cannot load eBPF).
    let existing = root
        .ancestors()
        .find(|p| p.symlink_metadata().is_ok())
        .unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        return Err(Error::PinDir {
            path: existing.into(),
            message: "exists and is not a directory".into(),
        });
    }
    if bpffs(existing) {
        return Ok(());
    }
    let default = Path::new("/sys/fs/bpf");
    if root.starts_with(default) && !bpffs(default) {
        info!("mounting bpffs at /sys/fs/bpf");
        nix::mount::mount(
            Some("bpf"),
            default,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| Error::Bpffs {
            path: default.into(),
            message: format!("mount -t bpf failed: {e}"),
        })?;
        return Ok(());
    }
    Err(Error::PinDir {
        path: root.into(),
        message: "not on a bpf filesystem: pins must live on bpffs (e.g. under /sys/fs/bpf)".into(),
    })
}

/// A different layout version's pins mean an agent of another version is (or was) in charge:
/// its programs would keep running beside ours, so refuse rather than guess.
fn check_other_layouts(pins: &PinDir) -> Result<(), Error> {
    let Ok(entries) = fs::read_dir(&pins.root) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path != pins.dir && name.starts_with('v') && name[1..].parse::<u32>().is_ok() {
            return Err(Error::Pin {
                path,
                message: format!(
                    "pins of map layout {name} found, this agent uses v{LAYOUT_VERSION}: stop the other agent and run `flannel-agent --cleanup --pin-dir {}` first",
                    pins.root.display()
                ),
            });
        }
    }
    Ok(())
}

/// Refuses to reuse a pinned map whose shape differs from what the programs expect.
fn check_pinned_maps(pins: &PinDir, nat_entries: u32) -> Result<(), Error> {
    for want in expected_maps(nat_entries) {
        let path = pins.map(want.name);
        if !path.exists() {
            continue;
        }
        let info = MapData::from_pin(&path)
            .and_then(|m| m.info())
            .map_err(|e| Error::Pin {
                path: path.clone(),
                message: format!("cannot open: {e}"),
            })?;
        let got = MapLayout {
            name: want.name,
            kind: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
        };
        if got != want {
            return Err(Error::Pin {
                path,
                message: format!(
                    "incompatible map (type {}, key {} B, value {} B, {} entries; expected type {}, {} B, {} B, {}): run `flannel-agent --cleanup --pin-dir {}`",
                    got.kind,
                    got.key_size,
                    got.value_size,
                    got.max_entries,
                    want.kind,
                    want.key_size,
                    want.value_size,
                    want.max_entries,
                    pins.root.display()
                ),
            });
        }
    }
    Ok(())
}

/// Idle timeouts of masqueraded flows (Linux's conntrack defaults unless configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatTimeouts {
    /// An established TCP flow (a reply seen, no FIN or RST).
    pub tcp_established: Duration,
    /// A UDP flow that has seen a reply.
    pub udp_replied: Duration,
    /// One-way UDP, ICMP echo.
    pub other: Duration,
}

/// TCP before its reply, and after a FIN (Linux: `syn_sent`, `time_wait` 120 s).
const TCP_TRANSITORY: Duration = Duration::from_mins(2);
/// TCP after an RST (Linux: `close` 10 s).
const TCP_RESET: Duration = Duration::from_secs(10);
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

impl NatTimeouts {
    /// How long a flow of `proto` with `flags` (both directions' combined) may stay idle.
    #[must_use]
    pub fn of(&self, proto: u8, flags: u8) -> Duration {
        match proto {
            IPPROTO_TCP if flags & nat::RESET != 0 => TCP_RESET,
            IPPROTO_TCP if flags & nat::CLOSING != 0 => TCP_TRANSITORY,
            IPPROTO_TCP if flags & nat::SEEN_REPLY != 0 => self.tcp_established,
            IPPROTO_TCP => TCP_TRANSITORY,
            IPPROTO_UDP if flags & nat::SEEN_REPLY != 0 => self.udp_replied,
            _ => self.other,
        }
    }
}

/// What a collection of the masquerade table found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatCollection {
    /// Entries in the table before the collection.
    pub entries: usize,
    /// Entries removed (both of an expired flow, expired host claims and orphans).
    pub removed: usize,
}

/// The kernel's `CLOCK_MONOTONIC`, which `bpf_ktime_get_ns` reads, in nanoseconds.
#[must_use]
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Every entry of the pinned masquerade table under `root`.
pub fn read_nat(root: &Path) -> Result<Vec<(NatKey, NatEntry)>, Error> {
    let map = open_nat(root)?;
    let table: HashMap<_, NatKey, NatEntry> =
        HashMap::try_from(&map).map_err(|e| map_err(map_name::NAT, "opening", e))?;
    list_nat(&table)
}

fn list_nat<T: std::borrow::Borrow<MapData>>(
    table: &HashMap<T, NatKey, NatEntry>,
) -> Result<Vec<(NatKey, NatEntry)>, Error> {
    table
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|e| map_err(map_name::NAT, "listing", e))
}

/// How full the pinned masquerade table under `root` is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NatOccupancy {
    /// Entries in use (two per flow, one per claimed node port).
    pub entries: usize,
    /// Masqueraded flows (original-direction entries).
    pub flows: usize,
    /// Node ports of the range claimed for the node's own flows.
    pub host_claims: usize,
    /// The table's size (`--ip-masq-table-size`).
    pub capacity: u32,
}

/// The occupancy of the pinned masquerade table under `root`.
pub fn nat_occupancy(root: &Path) -> Result<NatOccupancy, Error> {
    let entries = read_nat(root)?;
    let map = open_nat(root)?;
    let Map::HashMap(data) = &map else {
        return Err(missing_map(map_name::NAT));
    };
    let capacity = data
        .info()
        .map_err(|e| map_err(map_name::NAT, "reading its size", e))?
        .max_entries();
    Ok(NatOccupancy {
        entries: entries.len(),
        flows: entries.iter().filter(|(k, _)| k.dir == nat::EGRESS).count(),
        host_claims: entries
            .iter()
            .filter(|(_, e)| e.flags & nat::HOST != 0)
            .count(),
        capacity,
    })
}

fn open_nat(root: &Path) -> Result<Map, Error> {
    let path = PinDir::new(root).map(map_name::NAT);
    let data = MapData::from_pin(&path).map_err(|e| Error::Pin {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(Map::HashMap(data))
}

/// Removes the masquerade table's expired flows (both entries), host claims and orphans, as
/// of `now_ns` (`CLOCK_MONOTONIC`), from the table pinned under `root`.
pub fn collect_nat(
    root: &Path,
    timeouts: &NatTimeouts,
    now_ns: u64,
) -> Result<NatCollection, Error> {
    let mut map = open_nat(root)?;
    let mut table: HashMap<_, NatKey, NatEntry> =
        HashMap::try_from(&mut map).map_err(|e| map_err(map_name::NAT, "opening", e))?;
    collect_in(&mut table, timeouts, now_ns)
}

fn collect_in<T: std::borrow::BorrowMut<MapData>>(
    table: &mut HashMap<T, NatKey, NatEntry>,
    timeouts: &NatTimeouts,
    now_ns: u64,
) -> Result<NatCollection, Error> {
    let entries: StdHashMap<NatKey, NatEntry> = table
        .iter()
        .collect::<Result<_, _>>()
        .map_err(|e| map_err(map_name::NAT, "listing", e))?;
    let idle = |last_seen: u64| Duration::from_nanos(now_ns.saturating_sub(last_seen));
    let mut doomed = std::collections::HashSet::new();
    let mut live_replies = std::collections::HashSet::new();
    for (key, entry) in entries.iter().filter(|(k, _)| k.dir == nat::EGRESS) {
        let reply_key = key.reply(entry.addr, entry.port);
        let reply = entries.get(&reply_key);
        let flags = entry.flags | reply.map_or(0, |r| r.flags);
        let newest = reply.map_or(entry.last_seen, |r| r.last_seen.max(entry.last_seen));
        if idle(newest) > timeouts.of(key.proto, flags) {
            doomed.insert(*key);
            doomed.insert(reply_key);
        } else {
            live_replies.insert(reply_key);
        }
    }
    // Host claims, and replies whose original entry is gone (a race, or a restart mid-way).
    for (key, entry) in entries.iter().filter(|(k, _)| k.dir == nat::INGRESS) {
        if !live_replies.contains(key)
            && idle(entry.last_seen) > timeouts.of(key.proto, entry.flags)
        {
            doomed.insert(*key);
        }
    }
    let mut removed = 0;
    // Original directions first: a pod's next packet then starts a new flow on another port
    // while the old reply entry still holds its own.
    let mut doomed: Vec<NatKey> = doomed.into_iter().collect();
    doomed.sort_by_key(|k| k.dir);
    for key in &doomed {
        // An entry gone meanwhile (never created, or removed by a racing packet) is not an error.
        if table.remove(key).is_ok() {
            removed += 1;
        }
    }
    Ok(NatCollection {
        entries: entries.len(),
        removed,
    })
}

/// Per-reason counters summed over CPUs and programs, read from the pinned stats map.
pub fn read_stats(root: &Path) -> Result<Vec<(&'static str, Counter)>, Error> {
    Ok(totals(&read_stats_by_program(root)?))
}

/// Per-program, per-reason counters summed over CPUs, read from the pinned stats map.
pub fn read_stats_by_program(root: &Path) -> Result<Vec<ProgramCounter>, Error> {
    let pins = PinDir::new(root);
    let path = pins.map(map_name::STATS);
    let data = MapData::from_pin(&path).map_err(|e| Error::Pin {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let array: PerCpuArray<_, Counter> = PerCpuArray::try_from(Map::PerCpuArray(data))
        .map_err(|e| map_err(map_name::STATS, "opening", e))?;
    collect_stats(&array)
}

/// Removes every pin under `root` (which detaches the programs) and the subnet file.
pub fn cleanup(root: &Path, subnet_file: &Path) -> Result<(), Error> {
    if root.exists() {
        // Detach every pinned link first: unpinning alone releases a link later, from a kernel
        // work queue, so the programs could still forward for a moment after we return.
        let versions = fs::read_dir(root)
            .into_iter()
            .flatten()
            .filter_map(Result::ok);
        for dir in versions.filter(|d| d.path().is_dir()) {
            for pin in fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
            {
                if pin.file_name().to_string_lossy().starts_with("link-")
                    && let Err(e) = detach_pinned_link(&pin.path())
                {
                    warn!(pin = %pin.path().display(), "detaching: {e}");
                }
            }
        }
        fs::remove_dir_all(root).map_err(|e| Error::Pin {
            path: root.into(),
            message: format!("removing: {e}"),
        })?;
        info!(pins = %root.display(), "removed pinned programs, links and maps");
    } else {
        info!(pins = %root.display(), "no pins to remove");
    }
    match fs::remove_file(subnet_file) {
        Ok(()) => info!(file = %subnet_file.display(), "removed the subnet file"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::SubnetFile {
                path: subnet_file.into(),
                source: e,
            });
        }
    }
    Ok(())
}
