//! Structure-aware fuzzing of every program and backend through `BPF_PROG_TEST_RUN`, against a
//! reference model of what each program must do with each packet.
//!
//! Each family (a program on a node of one backend) starts from valid packets of several kinds —
//! TCP, UDP, ICMP and other inner protocols, with and without IP options, of many lengths, in each
//! tunnel, plain, or as ICMP errors quoting another packet — and mutates them at a chosen layer:
//! the Ethernet type and MACs, the outer IPv4 header (IHL and options, fragment bits, lengths,
//! TTL, protocol, addresses, checksum), the outer UDP ports and length, the VXLAN flags and VNI,
//! the inner MAC and type, the inner IPv4 header, the L4 ports, flags, lengths and checksums, the
//! packet an ICMP error quotes; it truncates and pads them, then repairs checksums and lengths or
//! not, and passes GSO metadata and the mark through the test run's `__sk_buff`. The masquerade
//! family lets half a minute pass now and then (every entry and the model's clocks aged 31 s),
//! so that ports of finished and idle flows go to new flows.
//!
//! The oracle, per packet:
//! - the test run never fails;
//! - the packet is counted exactly once, under the program that ran (every counter read after
//!   each packet for the first 20,000 of a family, then as a batch every 10,000), with a drop
//!   reason exactly when it was dropped;
//! - the model says what a correct program does with it: pass it untouched, drop it, or emit
//!   exactly this packet. Delivered packets are byte-identical to the reference decapsulation
//!   (the inner packet of a known peer, TTL lowered by this node's hops, checksum updated);
//!   encapsulated ones are byte-identical to the reference encapsulation but for the outer IP ID,
//!   checksum (which must be valid) and VXLAN source port (in range, the same for a flow);
//!   masqueraded ones carry the flow's port and keep valid IPv4 and L4 checksums. Anything the
//!   model does not call valid traffic of ours is never delivered.
//!
//! `FLANNEL_FUZZ_PACKETS` sets the packets per program (default 1,000,000); `FLANNEL_FUZZ_REPORT`
//! names a JSON file for the report (packets, verdict histogram and wall time per family), which
//! `cargo xtask bench` reads. Needs root, as `datapath.rs`.
#![allow(
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::too_many_lines,
    clippy::similar_names,
    clippy::many_single_char_names,
    reason = "packet code: fixed-width conversions checked by the packet lengths; long model functions read best whole"
)]

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    fmt::Write as _,
    os::fd::{AsFd as _, AsRawFd as _, RawFd},
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp};
use flannel_agent::dataplane::{Desired, ebpf::EbpfDataplane};
use flannel_ebpf_common::{
    Endpoint, NatEntry, NatKey, NodeConfig, RemoteNode, RemoteSubnet, STATS_SLOTS, backend,
    map_name, nat, prog_name, program, reason,
};
use flannel_tests::packet::{
    CNI_MAC, NAT_PORTS, NODE_A, NODE_B, OUTSIDE, POD_A, POD_B, POD_MAC, PORT, UDP_PORT,
    UPLINK_MAC_B, VNI, VTEP_A, VTEP_B, config, config_for, eth, icmp, icmp_error, ipip_frame, ipv4,
    ipv4_with_options, masq_config, payload, tcp, udp, udp_checked, udp_frame, vxlan_around,
    vxlan_hdr, wire_frame,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;
const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;

const ICMP: u8 = 1;
const IPIP: u8 = 4;
const TCP: u8 = 6;
const UDP: u8 = 17;

/// Packets checked one by one (every counter read after each) at the start of a family.
const EXACT: u64 = 20_000;
/// Packets between two batch checks of the counters after that.
const BATCH: u64 = 10_000;
/// The shortest frame a tc test run accepts: `bpf_prog_test_run_skb` wants an Ethernet header,
/// and behind the IPv4 or IPv6 `EtherType` a whole IP header (shorter frames fail with `EINVAL`).
fn tc_min_len(frame: &[u8]) -> usize {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => 34,
        Some([0x86, 0xdd]) => 54,
        _ => 14,
    }
}
/// Size of the masquerade table of the NAT families: large enough never to fill, so that the
/// model knows every entry.
const NAT_ENTRIES: u32 = 262_144;

const UPLINK_MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
const GW_A: [u8; 4] = [10, 244, 1, 1];
const GW_B: [u8; 4] = [10, 244, 2, 1];
const POD_A2: [u8; 4] = [10, 244, 1, 11];
const OTHER_POD_B: [u8; 4] = [10, 244, 2, 99];
const UNKNOWN_NODE: [u8; 4] = [198, 18, 0, 66];
const POD_B_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x22];
const POD_B_IFINDEX: u32 = 42;
/// Addresses mutations pick from: the nodes, pods and gateways of both subnets, subnet edges,
/// unrouted and outside addresses, multicast and broadcast.
const ADDRS: [[u8; 4]; 18] = [
    NODE_A,
    NODE_B,
    UNKNOWN_NODE,
    POD_A,
    POD_A2,
    POD_B,
    OTHER_POD_B,
    GW_A,
    GW_B,
    [10, 244, 2, 0],
    [10, 244, 2, 255],
    [10, 244, 3, 3],
    [10, 244, 99, 1],
    OUTSIDE,
    [8, 8, 8, 8],
    [224, 0, 0, 1],
    [0, 0, 0, 0],
    [255, 255, 255, 255],
];
/// Ports mutations pick from: the backends', the masquerade range's edges, the flows' own.
const PORTS: [u16; 16] = [
    0, 53, 80, 443, 4789, 8285, 8472, 40_000, 40_001, 40_002, 40_003, 61_000, 61_001, 61_050,
    61_099, 65_535,
];

// ---- randomness, checksums, bytes ----

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
    fn u16(&mut self) -> u16 {
        self.next() as u16
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())]
    }
    /// One of `v`, or (as often as each) what `random` makes.
    fn pick_or<T: Copy>(&mut self, v: &[T], random: impl FnOnce(&mut Self) -> T) -> T {
        let i = self.below(v.len() + 1);
        if i == v.len() { random(self) } else { v[i] }
    }
    fn addr(&mut self) -> [u8; 4] {
        if self.chance(85) {
            self.pick(&ADDRS)
        } else {
            (self.next() as u32).to_be_bytes()
        }
    }
    fn port(&mut self) -> u16 {
        if self.chance(80) {
            self.pick(&PORTS)
        } else {
            self.u16()
        }
    }
}

/// One's complement sum of `b` (an odd last byte padded with zero) added to `acc`, unfolded.
fn sum16(b: &[u8], mut acc: u64) -> u64 {
    let mut i = 0;
    while i + 1 < b.len() {
        acc += u64::from(b[i]) << 8 | u64::from(b[i + 1]);
        i += 2;
    }
    if i < b.len() {
        acc += u64::from(b[i]) << 8;
    }
    acc
}

fn fold(mut s: u64) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// True if `b` (checksum included) sums to all ones.
fn sum_ok(b: &[u8]) -> bool {
    fold(sum16(b, 0)) == 0xffff
}

fn checksum(b: &[u8]) -> u16 {
    !fold(sum16(b, 0))
}

/// RFC 1624's incremental update of checksum `check` for a word changing from `old` to `new`.
fn replace16(check: u16, old: u16, new: u16) -> u16 {
    !fold(u64::from(!check) + u64::from(!old) + u64::from(new))
}

fn replace32(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = replace16(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    replace16(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// Equal as one's complement numbers (0x0000 and 0xffff are both zero).
fn eq_ones(a: u16, b: u16) -> bool {
    a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

fn put16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_be_bytes());
}

fn addr(b: &[u8], o: usize) -> [u8; 4] {
    [b[o], b[o + 1], b[o + 2], b[o + 3]]
}

fn in16(a: [u8; 4]) -> bool {
    a[0] == 10 && a[1] == 244
}

fn in24(a: [u8; 4], net: [u8; 3]) -> bool {
    a[..3] == net
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

/// True if the IPv4 header at `o` is a fragment's (MF set or an offset).
fn is_fragment(b: &[u8], o: usize) -> bool {
    be16(b, o + 6) & 0x3fff != 0
}

/// The header length of the IPv4 header at `o`, if it is sane and fits.
fn ip_hlen(b: &[u8], o: usize) -> Option<usize> {
    let hl = usize::from(b.get(o)? & 0x0f) * 4;
    (hl >= 20 && o + hl <= b.len()).then_some(hl)
}

/// True if the IPv4 header at `o` (options included) checks out.
fn ip_header_ok(b: &[u8], o: usize) -> bool {
    ip_hlen(b, o).is_some_and(|hl| b[o] >> 4 == 4 && sum_ok(&b[o..o + hl]))
}

/// The sum of the TCP/UDP pseudo-header of the IPv4 header at `ip` for `seg_len` bytes.
fn pseudo(b: &[u8], ip: usize, seg_len: usize) -> u64 {
    sum16(&b[ip + 12..ip + 20], u64::from(b[ip + 9]) + seg_len as u64)
}

/// True if the IPv4 packet at `ip` is whole (its total length is the rest of the frame), its
/// header checks out and so does its TCP, UDP or ICMP checksum.
fn packet_ok(b: &[u8], ip: usize) -> bool {
    let Some(hl) = ip_hlen(b, ip) else {
        return false;
    };
    if !ip_header_ok(b, ip) || usize::from(be16(b, ip + 2)) != b.len() - ip {
        return false;
    }
    let l4 = ip + hl;
    let seg = &b[l4..];
    match b[ip + 9] {
        TCP if seg.len() >= 20 => fold(pseudo(b, ip, seg.len()) + sum16(seg, 0)) == 0xffff,
        UDP if seg.len() >= 8 => {
            be16(seg, 6) == 0 || fold(pseudo(b, ip, seg.len()) + sum16(seg, 0)) == 0xffff
        }
        ICMP if seg.len() >= 8 => sum_ok(seg),
        _ => false,
    }
}

// ---- the dataplane under test ----

/// `BPF_MAP_LOOKUP_BATCH`: `FLANNEL_STATS` whole in one system call (a lookup per slot would
/// cost 512 calls per packet).
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// `union bpf_attr` as the batch commands use it.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const PROGRAMS: usize = program::SLOTS as usize;
const REASONS: usize = reason::SLOTS as usize;
const SLOTS: usize = STATS_SLOTS as usize;

/// The packet counters of `FLANNEL_STATS`, summed over CPUs.
struct Stats {
    fd: RawFd,
    cpus: usize,
    keys: Vec<u32>,
    /// Per slot and CPU, a `Counter`: packets, bytes.
    values: Vec<u64>,
    packets: Vec<u64>,
}

impl Stats {
    /// The counters of `dp`, which must outlive this.
    fn of(dp: &EbpfDataplane) -> Self {
        let fd = match dp.ebpf().map(map_name::STATS) {
            Some(aya::maps::Map::PerCpuArray(m)) => m.fd().as_fd().as_raw_fd(),
            _ => panic!("{} is not a per-CPU array", map_name::STATS),
        };
        let cpus = aya::util::nr_cpus().expect("possible CPUs");
        Self {
            fd,
            cpus,
            keys: vec![0; SLOTS],
            values: vec![0; SLOTS * cpus * 2],
            packets: vec![0; SLOTS],
        }
    }

    fn read(&mut self) -> &[u64] {
        let mut out_batch = 0u32;
        let mut attr = BatchAttr {
            in_batch: 0,
            out_batch: (&raw mut out_batch) as u64,
            keys: self.keys.as_mut_ptr() as u64,
            values: self.values.as_mut_ptr() as u64,
            count: STATS_SLOTS,
            map_fd: self.fd as u32,
            elem_flags: 0,
            flags: 0,
        };
        // SAFETY: `attr` points at buffers of `STATS_SLOTS` keys and values (a per-CPU value is a
        // 16-byte counter per possible CPU), which live across the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let err = std::io::Error::last_os_error();
        assert!(
            r == 0 || err.raw_os_error() == Some(libc::ENOENT),
            "BPF_MAP_LOOKUP_BATCH on {}: {err}",
            map_name::STATS
        );
        assert_eq!(attr.count, STATS_SLOTS, "every counter read");
        for (i, p) in self.packets.iter_mut().enumerate() {
            let mut sum = 0;
            for c in 0..self.cpus {
                sum += self.values[(i * self.cpus + c) * 2];
            }
            *p = sum;
        }
        &self.packets
    }
}

/// A dataplane the family runs packets through, and what its counters must show.
struct Target {
    dp: EbpfDataplane,
    stats: Stats,
    /// Counters when the family started, and at the last check.
    start: Vec<u64>,
    last: Vec<u64>,
    /// Runs per program since the last check.
    runs: [u64; PROGRAMS],
}

fn program_name(p: usize) -> &'static str {
    program::NAMES.get(p).copied().unwrap_or("program?")
}

fn reason_name(r: usize) -> &'static str {
    reason::NAMES.get(r).copied().unwrap_or("reason?")
}

impl Target {
    fn new(dp: EbpfDataplane) -> Self {
        let mut stats = Stats::of(&dp);
        let start = stats.read().to_vec();
        Self {
            dp,
            stats,
            last: start.clone(),
            start,
            runs: [0; PROGRAMS],
        }
    }

    /// Checks that each program's counters grew by exactly its runs since the last check, and
    /// nothing else moved; returns the reason each program counted, for those that ran once.
    fn check(&mut self) -> Result<[Option<u32>; PROGRAMS], String> {
        let now = self.stats.read();
        let mut single = [None; PROGRAMS];
        for (p, &runs) in self.runs.iter().enumerate() {
            let mut counted = 0;
            for r in 0..REASONS {
                let i = p * REASONS + r;
                let delta = now[i]
                    .checked_sub(self.last[i])
                    .ok_or_else(|| format!("counter {i} went backwards"))?;
                if delta == 0 {
                    continue;
                }
                if r >= reason::COUNT as usize {
                    return Err(format!(
                        "{}: {delta} packets counted under unused reason {r}",
                        program_name(p)
                    ));
                }
                counted += delta;
                single[p] = Some(r as u32);
            }
            if counted != runs {
                return Err(format!(
                    "{} counted {counted} packets for {runs} runs",
                    program_name(p)
                ));
            }
            if runs != 1 {
                single[p] = None;
            }
        }
        self.last.copy_from_slice(now);
        self.runs = [0; PROGRAMS];
        Ok(single)
    }
}

/// What the test run passes in `__sk_buff`. Of its fields 6.18 takes `mark`, `priority`,
/// `ingress_ifindex`, `ifindex`, `cb`, `tstamp`, `wire_len`, `gso_segs`, `gso_size` and
/// `hwtstamp`, and refuses the others (`hash`, `tc_index`, `tc_classid`, `tstamp_type`, ... must
/// be zero: so `from_pods` always computes its own flow hash here); the programs read these three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Meta {
    gso_size: u32,
    gso_segs: u32,
    mark: u32,
}

impl Meta {
    fn random(rng: &mut Rng) -> Self {
        if rng.chance(75) {
            return Self::default();
        }
        // Segment sizes either side of each backend's limit (1500 less its overhead and the
        // TCP/IP or UDP/IP headers), and others.
        let gso_size = rng.pick_or(
            &[
                0, 1, 100, 536, 1410, 1411, 1422, 1423, 1432, 1433, 1440, 1441, 1452, 1453, 1460,
                1461, 65_535,
            ],
            |r| u32::from(r.u16()),
        );
        Self {
            gso_size,
            gso_segs: rng.pick_or(&[0, 0, 1, 2, 3, 44], |r| u32::from(r.byte())),
            mark: rng.pick_or(&[0, 0, 0, nat::KUBE_MASQ_MARK], |r| r.next() as u32),
        }
    }

    /// `struct __sk_buff` (192 bytes on 6.18): `mark` at 8, `gso_segs` at 164, `gso_size` at 176.
    fn ctx(&self) -> Option<[u8; 192]> {
        if *self == Self::default() {
            return None;
        }
        let mut ctx = [0u8; 192];
        ctx[8..12].copy_from_slice(&self.mark.to_ne_bytes());
        ctx[164..168].copy_from_slice(&self.gso_segs.to_ne_bytes());
        ctx[176..180].copy_from_slice(&self.gso_size.to_ne_bytes());
        Some(ctx)
    }
}

fn run_tc(
    dp: &EbpfDataplane,
    prog: &str,
    input: &[u8],
    meta: &Meta,
    out: &mut [u8],
) -> (i32, usize) {
    let p: &SchedClassifier = dp
        .ebpf()
        .program(prog)
        .expect("the program")
        .try_into()
        .expect("a tc program");
    let ctx = meta.ctx();
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(out),
            ctx_in: ctx.as_ref().map(|c| &c[..]),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("test_run {prog}: {e}\n  input {}\n  {meta:?}", hex(input)));
    (r.return_value.cast_signed(), r.data_size_out as usize)
}

fn run_xdp(dp: &EbpfDataplane, input: &[u8], out: &mut [u8]) -> (i32, usize) {
    let p: &Xdp = dp
        .ebpf()
        .program(prog_name::FROM_WIRE_XDP)
        .expect("the program")
        .try_into()
        .expect("an XDP program");
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(out),
            ..TestRunOptions::default()
        })
        .unwrap_or_else(|e| panic!("test_run xdp: {e}\n  input {}", hex(input)));
    (r.return_value.cast_signed(), r.data_size_out as usize)
}

/// Programs `dp` as a node with one peer reached by backend `kind` (as `datapath.rs` does).
fn node_in(
    mut dp: EbpfDataplane,
    cfg: &NodeConfig,
    peer_subnet: &str,
    peer_ip: [u8; 4],
    peer_vtep: [u8; 6],
    kind: u8,
) -> EbpfDataplane {
    dp.set_config(cfg).unwrap();
    let mut d = Desired::default();
    d.routes.insert(
        peer_subnet.parse().unwrap(),
        RemoteSubnet {
            public_ip: peer_ip,
            vtep_mac: peer_vtep,
            backend: kind,
            _pad0: 0,
        },
    );
    d.nodes.insert(
        peer_ip.into(),
        RemoteNode {
            vtep_mac: peer_vtep,
            backend: kind,
            _pad0: 0,
        },
    );
    dp.sync(&d).unwrap();
    dp
}

fn loaded() -> EbpfDataplane {
    EbpfDataplane::unpinned().expect("load and verify the programs (run as root)")
}

/// Node A (10.244.1.0/24) of backend `kind`, node B reached by `route`.
fn node_a_of(kind: u8, route: u8) -> EbpfDataplane {
    let cfg = config_for(kind, NODE_A, [10, 244, 1, 0], VTEP_A, UPLINK_MAC_A);
    node_in(loaded(), &cfg, "10.244.2.0/24", NODE_B, VTEP_B, route)
}

/// Node B (10.244.2.0/24) of backend `kind`, node A its peer, `POD_B` a learnt pod.
fn node_b_of(kind: u8) -> EbpfDataplane {
    let cfg = config_for(kind, NODE_B, [10, 244, 2, 0], VTEP_B, UPLINK_MAC_B);
    let mut dp = node_in(loaded(), &cfg, "10.244.1.0/24", NODE_A, VTEP_A, kind);
    dp.sync_endpoints(
        &[(
            POD_B.into(),
            Endpoint {
                ifindex: POD_B_IFINDEX,
                mac: POD_B_MAC,
                flags: 0,
                _pad0: 0,
            },
        )]
        .into(),
    )
    .unwrap();
    dp
}

/// Node A, vxlan, with the eBPF masquerade on (ports picked at random, as `--random-fully`).
fn masq_node() -> EbpfDataplane {
    let cfg = masq_config(config(NODE_A, [10, 244, 1, 0], VTEP_A, UPLINK_MAC_A), true);
    let dp = EbpfDataplane::unpinned_with(NAT_ENTRIES).expect("load and verify the programs");
    node_in(dp, &cfg, "10.244.2.0/24", NODE_B, VTEP_B, backend::VXLAN)
}

fn nat_lookup(dp: &EbpfDataplane, key: &NatKey) -> Option<NatEntry> {
    let table: aya::maps::HashMap<_, NatKey, NatEntry> =
        aya::maps::HashMap::try_from(dp.ebpf().map(map_name::NAT).expect("the NAT map"))
            .expect("a hash map");
    table.get(key, 0).ok()
}

// ---- packets: seeds and structured mutation ----

/// Where the headers of a packet are (0: absent).
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    /// A tunnel frame: an outer IPv4 header at 14.
    outer: bool,
    /// The outer UDP header.
    udp: usize,
    vxlan: usize,
    inner_eth: usize,
    /// The IPv4 header the programs forward or translate (the inner one in a tunnel).
    ip: usize,
    l4: usize,
    /// The IPv4 header an ICMP error quotes.
    emb: usize,
}

#[derive(Clone, Debug, Default)]
struct Pkt {
    b: Vec<u8>,
    l: Layout,
}

impl Pkt {
    fn plain(b: Vec<u8>) -> Self {
        let l4 = 14 + ip_hlen(&b, 14).unwrap_or(20);
        Self {
            b,
            l: Layout {
                ip: 14,
                l4,
                ..Layout::default()
            },
        }
    }

    /// An ICMP error (no IP options) whose quoted packet starts at 42.
    fn error(b: Vec<u8>) -> Self {
        Self {
            b,
            l: Layout {
                ip: 14,
                l4: 34,
                emb: 42,
                ..Layout::default()
            },
        }
    }

    fn tunnel(kind: u8, b: Vec<u8>, inner_hlen: usize) -> Self {
        let (udp, vxlan, inner_eth, ip) = match kind {
            backend::VXLAN => (34, 42, 50, 64),
            backend::UDP => (34, 0, 0, 42),
            _ => (0, 0, 0, 34),
        };
        Self {
            b,
            l: Layout {
                outer: true,
                udp,
                vxlan,
                inner_eth,
                ip,
                l4: ip + inner_hlen,
                emb: 0,
            },
        }
    }

    fn set(&mut self, seed: &Self) {
        self.b.clear();
        self.b.extend_from_slice(&seed.b);
        self.l = seed.l;
    }
}

/// IPv4 options: NOPs ending in an end-of-list, a router alert, or noise.
fn options(rng: &mut Rng, n: usize, out: &mut [u8; 40]) {
    match rng.below(3) {
        0 => {
            out[..n].fill(1);
            out[n - 1] = 0;
        }
        1 => {
            out[..n].fill(1);
            out[..4].copy_from_slice(&[0x94, 4, 0, 0]);
        }
        _ => {
            for b in &mut out[..n] {
                *b = rng.byte();
            }
        }
    }
}

/// A valid IPv4 packet from `src` to `dst`: TCP, UDP (with or without a checksum), ICMP echo or
/// GRE, with options or not, of a random length, or `total` bytes long if given (and possible).
fn ip_packet(rng: &mut Rng, src: [u8; 4], dst: [u8; 4], ttl: u8, total: Option<usize>) -> Vec<u8> {
    let mut opts = [0u8; 40];
    let n_opts = rng.pick(&[0, 0, 0, 0, 0, 4, 8, 12, 40]);
    if n_opts > 0 {
        options(rng, n_opts, &mut opts);
    }
    let kind = rng.below(9);
    let l4_hlen = match kind {
        0..=3 => 20,
        _ => 8,
    };
    let len = match total {
        Some(t) => t.saturating_sub(20 + n_opts + l4_hlen),
        None => match rng.below(10) {
            0 => 0,
            1 => rng.below(8),
            2..=5 => rng.below(120),
            6..=7 => rng.below(600),
            _ => rng.below(1400),
        },
    };
    let data = payload(len);
    let (sport, dport) = (rng.port(), rng.port());
    let (proto, seg) = match kind {
        0..=3 => {
            let flags = rng.pick(&[0x02, 0x10, 0x18, 0x12, 0x11, 0x04, 0x14]);
            (TCP, tcp(src, dst, sport, dport, flags, &data))
        }
        4..=5 if rng.chance(70) => (UDP, udp_checked(src, dst, sport, dport, &data)),
        4..=5 => (UDP, udp(sport, dport, &data)),
        6..=7 => (ICMP, icmp(8, 0, [0, rng.byte(), 0, 1], &data)),
        _ => (47, payload(len + 8)),
    };
    let mut p = ipv4_with_options(src, dst, ttl, proto, &opts[..n_opts], &seg);
    if rng.chance(20) || rng.chance(20) {
        p[1] = rng.byte();
        if rng.chance(50) {
            p[6] = 0;
        }
        fix_ip_csum(&mut p, 0);
    }
    p
}

/// A frame off the wire for node B of backend `kind`: mostly its own tunnel traffic from node A
/// around a packet for one of its pods, and plain packets for its pods, other backends' tunnels,
/// and traffic that is not ours.
fn wire_seed(rng: &mut Rng, kind: u8) -> Pkt {
    let src = rng.pick(&[POD_A, POD_A, [10, 244, 1, 20]]);
    let dst = rng.pick(&[
        POD_B,
        POD_B,
        POD_B,
        OTHER_POD_B,
        OTHER_POD_B,
        GW_B,
        [10, 244, 3, 3],
    ]);
    let ttl = rng.pick(&[64, 63, 63, 63, 3, 2, 1]);
    let ip = ip_packet(rng, src, dst, ttl, None);
    let hl = ip_hlen(&ip, 0).unwrap();
    let roll = rng.below(100);
    let tunnel = if kind == backend::HOST_GW {
        if roll < 60 {
            backend::HOST_GW
        } else {
            rng.pick(&[backend::VXLAN, backend::IPIP, backend::UDP, 0])
        }
    } else if roll < 60 {
        kind
    } else if roll < 75 {
        backend::HOST_GW
    } else if roll < 85 {
        rng.pick(&[backend::VXLAN, backend::IPIP, backend::UDP])
    } else {
        0
    };
    match tunnel {
        backend::VXLAN => Pkt::tunnel(
            tunnel,
            vxlan_around(NODE_A, VNI, &eth(VTEP_B, VTEP_A, 0x0800, &ip)),
            hl,
        ),
        backend::IPIP => Pkt::tunnel(tunnel, ipip_frame(NODE_A, &ip), hl),
        backend::UDP => Pkt::tunnel(tunnel, udp_frame(NODE_A, &ip), hl),
        backend::HOST_GW => Pkt::plain(wire_frame(&ip)),
        _ => match rng.below(3) {
            0 => Pkt::plain(wire_frame(&ip_packet(rng, NODE_A, NODE_B, 64, None))),
            1 => Pkt::plain(eth([0xff; 6], UPLINK_MAC_A, 0x0806, &[0u8; 28])),
            _ => Pkt::plain(eth(UPLINK_MAC_B, UPLINK_MAC_A, 0x86dd, &ip)),
        },
    }
}

/// A frame into `cni0` on node A: from a pod (`from_pods`) or the node (`from_host`), mostly for
/// a pod of node B, some of a size either side of the backend's limit.
fn pod_seed(rng: &mut Rng, overhead: usize, host: bool) -> Pkt {
    let src = if host {
        rng.pick(&[GW_A, GW_A, NODE_A, POD_A])
    } else {
        rng.pick(&[POD_A, POD_A, [10, 244, 1, 20]])
    };
    let dst = rng.pick(&[
        POD_B,
        POD_B,
        POD_B,
        [10, 244, 2, 77],
        [10, 244, 1, 20],
        [10, 244, 99, 1],
        OUTSIDE,
        [10, 245, 0, 1],
    ]);
    let ttl = rng.pick(&[64, 64, 64, 3, 2, 1]);
    let total = rng
        .chance(25)
        .then(|| UPLINK_MTU - overhead + rng.below(3) - 1);
    let ip = ip_packet(rng, src, dst, ttl, total);
    let (to, from) = if host {
        (VTEP_B, CNI_MAC)
    } else {
        (CNI_MAC, POD_MAC)
    };
    Pkt::plain(eth(to, from, 0x0800, &ip))
}

const UPLINK_MTU: usize = 1500;

/// The flows of the masquerade families: their pods, ports and remote ends.
const NAT_PODS: [[u8; 4]; 2] = [POD_A, POD_A2];
const NAT_REMOTES: [[u8; 4]; 2] = [OUTSIDE, [8, 8, 8, 8]];
const NAT_DPORTS: [u16; 3] = [53, 80, 443];

/// A TCP, UDP or ICMP echo segment from `src`:`sport` to `dst`:`dport` (ICMP: `sport` is the
/// identifier of a request, `dport` that of a reply).
fn segment(
    rng: &mut Rng,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let most = if rng.chance(90) { 64 } else { 400 };
    let data = payload(rng.below(most));
    match proto {
        TCP => {
            let flags = rng.pick(&[0x02, 0x10, 0x10, 0x18, 0x12, 0x11, 0x04, 0x14]);
            tcp(src, dst, sport, dport, flags, &data)
        }
        UDP if rng.chance(85) => udp_checked(src, dst, sport, dport, &data),
        UDP => udp(sport, dport, &data),
        _ if dport == 0 => icmp(8, 0, [(sport >> 8) as u8, sport as u8, 0, 1], &data),
        _ => icmp(0, 0, [(dport >> 8) as u8, dport as u8, 0, 1], &data),
    }
}

/// The start of `ip` an ICMP error quotes: the header and 8 bytes, 28 bytes, or all of it.
fn quote(rng: &mut Rng, ip: &[u8]) -> Vec<u8> {
    let n = match rng.below(3) {
        0 => 28,
        1 => 48,
        _ => ip.len(),
    };
    ip[..n.min(ip.len())].to_vec()
}

/// A frame leaving node A's uplink (`to_wire` with masquerade on).
fn egress_seed(rng: &mut Rng) -> Pkt {
    let pod = rng.pick(&NAT_PODS);
    let remote = rng.pick(&NAT_REMOTES);
    let sport = 40_000 + rng.below(8) as u16;
    let dport = rng.pick(&NAT_DPORTS);
    let roll = rng.below(100);
    if roll < 55 {
        let mut opts = [0u8; 40];
        let n = rng.pick(&[0, 0, 0, 0, 8]);
        if n > 0 {
            options(rng, n, &mut opts);
        }
        let (proto, seg) = match rng.below(10) {
            0..=3 => (TCP, segment(rng, TCP, pod, remote, sport, dport)),
            4..=6 => (UDP, segment(rng, UDP, pod, remote, sport, dport)),
            // An echo request (the identifier is the flow's port).
            7 | 8 => (ICMP, segment(rng, ICMP, pod, remote, sport, 0)),
            // An echo reply of the pod's own, or GRE: neither can be masqueraded.
            _ if rng.chance(50) => (ICMP, icmp(0, 0, [0, 9, 0, 1], &payload(20))),
            _ => (47, payload(40)),
        };
        return Pkt::plain(wire_frame(&ipv4_with_options(
            pod,
            remote,
            63,
            proto,
            &opts[..n],
            &seg,
        )));
    }
    if roll < 70 {
        // The node's own flows, some from ports of the masquerade range.
        let port = rng.pick(&[61_000, 61_001, 61_005, 61_010, 61_019, 61_099, 40_000, 8472]);
        let proto = rng.pick(&[TCP, UDP, ICMP]);
        let d = if proto == ICMP { 0 } else { dport };
        let seg = segment(rng, proto, NODE_A, remote, port, d);
        return Pkt::plain(wire_frame(&ipv4(NODE_A, remote, 64, proto, &seg)));
    }
    if roll < 82 {
        // The pod's ICMP error about a reply it received.
        let proto = rng.pick(&[TCP, UDP, ICMP]);
        let (s, d) = if proto == ICMP {
            (0, sport)
        } else {
            (dport, sport)
        };
        let seg = segment(rng, proto, remote, pod, s, d);
        let quoted = quote(rng, &ipv4(remote, pod, 60, proto, &seg));
        let (kind, code) = rng.pick(&[(3, 3), (3, 1), (11, 0)]);
        return Pkt::error(wire_frame(&icmp_error(pod, remote, kind, code, &quoted)));
    }
    // Not masqueraded: inside the Network, multicast, not from a pod, not IPv4.
    let (src, dst) = rng.pick(&[
        (pod, POD_B),
        (pod, [239, 1, 2, 3]),
        ([198, 18, 0, 99], OUTSIDE),
        (pod, [10, 244, 1, 20]),
    ]);
    if rng.chance(10) {
        return Pkt::plain(eth(UPLINK_MAC_B, UPLINK_MAC_A, 0x0806, &[0u8; 28]));
    }
    Pkt::plain(wire_frame(&ip_packet(rng, src, dst, 63, None)))
}

/// A masqueraded flow as the reverse family sets it up.
#[derive(Clone, Copy, Debug)]
struct SetupFlow {
    remote: [u8; 4],
    remote_port: u16,
    proto: u8,
    /// The allocated port (the node's, or a host flow's own).
    port: u16,
}

/// A frame arriving at node A's uplink (`from_wire` with masquerade on): replies to its
/// masqueraded and own flows, ICMP errors about them, its tunnel traffic, and strangers.
fn ingress_seed(rng: &mut Rng, flows: &[SetupFlow], hosts: &[SetupFlow]) -> Pkt {
    let roll = rng.below(100);
    let f = if roll < 70 {
        rng.pick(flows)
    } else {
        rng.pick(hosts)
    };
    if roll < 55 || (70..80).contains(&roll) {
        let (s, d) = if f.proto == ICMP {
            (0, f.port)
        } else {
            (f.remote_port, f.port)
        };
        let d = if rng.chance(10) {
            rng.pick(&[61_050, 61_098, 40_000])
        } else {
            d
        };
        let seg = segment(rng, f.proto, f.remote, NODE_A, s, d);
        return Pkt::plain(wire_frame(&ipv4(f.remote, NODE_A, 60, f.proto, &seg)));
    }
    if roll < 88 {
        // An error about our (translated) packet, from the remote end or a router.
        let (s, d) = if f.proto == ICMP {
            (f.port, 0)
        } else {
            (f.port, f.remote_port)
        };
        let seg = segment(rng, f.proto, NODE_A, f.remote, s, d);
        let quoted = quote(rng, &ipv4(NODE_A, f.remote, 64, f.proto, &seg));
        let from = rng.pick(&[f.remote, [198, 18, 0, 1]]);
        let (kind, code) = rng.pick(&[(3, 3), (3, 4), (11, 0)]);
        return Pkt::error(wire_frame(&icmp_error(from, NODE_A, kind, code, &quoted)));
    }
    if roll < 95 {
        // Node B's VXLAN for a pod of node A.
        let ip = ip_packet(rng, POD_B, POD_A, 63, None);
        let hl = ip_hlen(&ip, 0).unwrap();
        let outer = ipv4(
            NODE_B,
            NODE_A,
            64,
            UDP,
            &udp(
                40_000,
                PORT,
                &vxlan_hdr(0x08, VNI, &eth(VTEP_A, VTEP_B, 0x0800, &ip)),
            ),
        );
        return Pkt::tunnel(
            backend::VXLAN,
            eth(UPLINK_MAC_A, UPLINK_MAC_B, 0x0800, &outer),
            hl,
        );
    }
    Pkt::plain(wire_frame(&ip_packet(
        rng,
        NODE_B,
        [10, 244, 1, 20],
        63,
        None,
    )))
}

/// Checksums and lengths a mutation broke on purpose (left so by the repair).
#[derive(Default)]
#[allow(clippy::struct_excessive_bools, reason = "independent repairs")]
struct Fix {
    lengths: bool,
    bad_outer: bool,
    bad_ip: bool,
    bad_l4: bool,
    bad_emb: bool,
}

impl Fix {
    fn bad_csum(&mut self, l: &Layout, o: usize) {
        if o == 14 && l.outer {
            self.bad_outer = true;
        } else if o == l.ip {
            self.bad_ip = true;
        } else {
            self.bad_emb = true;
        }
    }
}

/// Recomputes the header checksum of the IPv4 header at `o` (options included, if they fit).
fn fix_ip_csum(b: &mut [u8], o: usize) {
    if o + 20 > b.len() {
        return;
    }
    let hl = ip_hlen(b, o).unwrap_or(20);
    put16(b, o + 10, 0);
    let c = checksum(&b[o..o + hl]);
    put16(b, o + 10, c);
}

/// Recomputes the TCP, UDP (unless it has none) or ICMP checksum of the segment at `l4` of the
/// IPv4 packet at `ip`, as far as its total length (or the frame) goes.
fn fix_l4_csum(b: &mut [u8], ip: usize, l4: usize) {
    let len = b.len();
    if ip + 20 > len || l4 >= len {
        return;
    }
    let tot = usize::from(be16(b, ip + 2));
    let end = if ip + tot <= len && ip + tot >= l4 {
        ip + tot
    } else {
        len
    };
    let seg = end - l4;
    let at = match b[ip + 9] {
        TCP if seg >= 18 => l4 + 16,
        UDP if seg >= 8 && be16(b, l4 + 6) != 0 => l4 + 6,
        ICMP if seg >= 4 => l4 + 2,
        _ => return,
    };
    put16(b, at, 0);
    let c = if b[ip + 9] == ICMP {
        checksum(&b[l4..end])
    } else {
        let c = !fold(pseudo(b, ip, seg) + sum16(&b[l4..end], 0));
        if c == 0 && b[ip + 9] == UDP {
            0xffff
        } else {
            c
        }
    };
    put16(b, at, c);
}

fn repair(p: &mut Pkt, fix: &Fix) {
    let l = p.l;
    let len = p.b.len();
    if l.emb != 0 && !fix.bad_emb {
        fix_ip_csum(&mut p.b, l.emb);
    }
    if fix.lengths {
        if l.ip + 4 <= len {
            put16(&mut p.b, l.ip + 2, (len - l.ip) as u16);
        }
        if l.outer && len >= 18 {
            put16(&mut p.b, 16, (len - 14) as u16);
            if l.udp != 0 && l.udp + 6 <= len {
                put16(&mut p.b, l.udp + 4, (len - l.udp) as u16);
            }
        }
    }
    if !fix.bad_l4 {
        fix_l4_csum(&mut p.b, l.ip, l.l4);
    }
    if !fix.bad_ip {
        fix_ip_csum(&mut p.b, l.ip);
    }
    if l.outer && !fix.bad_outer {
        fix_ip_csum(&mut p.b, 14);
    }
}

/// Inserts options into the IPv4 header at `o`, moving what follows.
fn insert_options(rng: &mut Rng, p: &mut Pkt, o: usize, fix: &mut Fix) {
    let Some(hl) = ip_hlen(&p.b, o) else {
        return;
    };
    if hl >= 60 {
        return;
    }
    let n = 4 * (1 + rng.below((60 - hl) / 4));
    let mut opts = [0u8; 40];
    options(rng, n, &mut opts);
    let at = o + hl;
    p.b.splice(at..at, opts[..n].iter().copied());
    p.b[o] = (p.b[o] & 0xf0) | ((hl + n) / 4) as u8;
    if rng.chance(80) {
        let tot = be16(&p.b, o + 2).wrapping_add(n as u16);
        put16(&mut p.b, o + 2, tot);
    }
    if o != 14 && p.l.outer && rng.chance(80) {
        fix.lengths = true;
    }
    let l = &mut p.l;
    for field in [
        &mut l.udp,
        &mut l.vxlan,
        &mut l.inner_eth,
        &mut l.ip,
        &mut l.l4,
        &mut l.emb,
    ] {
        if *field > o {
            *field += n;
        }
    }
}

fn mutate_ip(rng: &mut Rng, p: &mut Pkt, o: usize, fix: &mut Fix) {
    if o == 0 || o + 20 > p.b.len() {
        return;
    }
    let b = &mut p.b;
    match rng.below(13) {
        0 => b[o] = rng.pick_or(&[0x44, 0x46, 0x47, 0x4f, 0x65, 0x55, 0x05, 0x40], Rng::byte),
        1 | 2 => insert_options(rng, p, o, fix),
        3 => {
            let frag = rng.pick_or(
                &[0x2000, 0x0001, 0x3fff, 0x4000, 0x8000, 0x6000, 0x2001],
                Rng::u16,
            );
            put16(b, o + 6, frag);
        }
        4 => {
            let tot = be16(b, o + 2);
            let whole = (b.len() - o) as u16;
            let v = rng.pick_or(
                &[
                    tot.wrapping_add(1),
                    tot.wrapping_sub(1),
                    tot.wrapping_add(4),
                    0,
                    19,
                    20,
                    whole,
                ],
                Rng::u16,
            );
            put16(b, o + 2, v);
        }
        5 => b[o + 8] = rng.pick_or(&[0, 1, 2, 3, 255], Rng::byte),
        6 => b[o + 1] = rng.byte(),
        7 => b[o + 9] = rng.pick_or(&[ICMP, IPIP, TCP, UDP, 47, 132, 41], Rng::byte),
        8 => {
            let a = rng.addr();
            b[o + 12..o + 16].copy_from_slice(&a);
        }
        9 => {
            let a = rng.addr();
            b[o + 16..o + 20].copy_from_slice(&a);
        }
        10 => {
            b[o + 10 + rng.below(2)] ^= 1 << rng.below(8);
            fix.bad_csum(&p.l, o);
        }
        11 => put16(b, o + 4, rng.u16()),
        _ => b[o + rng.below(20)] = rng.byte(),
    }
}

fn mutate_l4(rng: &mut Rng, p: &mut Pkt, l4: usize, fix: &mut Fix) {
    let len = p.b.len();
    if l4 == 0 || l4 + 4 > len {
        return;
    }
    let b = &mut p.b;
    match rng.below(9) {
        0 => put16(b, l4, rng.port()),
        1 => put16(b, l4 + 2, rng.port()),
        2 if l4 + 14 <= len => {
            b[l4 + 13] = rng.pick_or(
                &[0x02, 0x04, 0x01, 0x10, 0x12, 0x14, 0x11, 0xff, 0],
                Rng::byte,
            );
        }
        3 if l4 + 13 <= len => b[l4 + 12] = rng.byte(),
        4 if l4 + 6 <= len => {
            let v = be16(b, l4 + 4);
            put16(
                b,
                l4 + 4,
                rng.pick_or(&[v.wrapping_add(1), v.wrapping_sub(1), 0, 7, 8], |r| {
                    r.u16()
                }),
            );
        }
        5 if l4 + 8 <= len => {
            if rng.chance(50) {
                put16(b, l4 + 6, 0);
            } else {
                b[l4 + 6 + rng.below(2)] ^= 1 << rng.below(8);
                fix.bad_l4 = true;
            }
        }
        6 => {
            b[l4] = rng.pick_or(&[0, 3, 5, 8, 11, 13, 14], Rng::byte);
            b[l4 + 1] = rng.pick_or(&[0, 0, 1, 3, 4], Rng::byte);
        }
        7 if l4 + 6 <= len => put16(b, l4 + 4, rng.port()),
        _ => {
            let i = l4 + rng.below((len - l4).min(20));
            b[i] = rng.byte();
        }
    }
}

fn mutate_eth(rng: &mut Rng, p: &mut Pkt, o: usize) {
    if o + 14 > p.b.len() {
        return;
    }
    let b = &mut p.b;
    match rng.below(4) {
        0 | 1 => {
            let t = rng.pick_or(&[0x0800, 0x86dd, 0x0806, 0x8100, 0x88a8, 0x0801], |r| {
                r.u16()
            });
            put16(b, o + 12, t);
        }
        2 => {
            let mac = rng.pick(&[
                VTEP_A,
                VTEP_B,
                UPLINK_MAC_B,
                [0xff; 6],
                [0x01, 0, 0x5e, 0, 0, 1],
            ]);
            b[o..o + 6].copy_from_slice(&mac);
        }
        _ => b[o + rng.below(12)] ^= 1 << rng.below(8),
    }
}

fn mutate_udp(rng: &mut Rng, p: &mut Pkt, fix: &mut Fix) {
    let u = p.l.udp;
    if u + 8 > p.b.len() {
        return;
    }
    let b = &mut p.b;
    match rng.below(5) {
        0 => put16(b, u, rng.u16()),
        1 => put16(b, u + 2, rng.pick_or(&[PORT, UDP_PORT, 4789, 0], Rng::u16)),
        2 | 3 => {
            let v = be16(b, u + 4);
            put16(
                b,
                u + 4,
                rng.pick_or(&[v.wrapping_add(1), v.wrapping_sub(1), 0, 8, 36], |r| {
                    r.u16()
                }),
            );
            fix.lengths = false;
        }
        _ => put16(b, u + 6, rng.u16()),
    }
}

fn mutate_vxlan(rng: &mut Rng, p: &mut Pkt) {
    let v = p.l.vxlan;
    if v + 8 > p.b.len() {
        return;
    }
    let b = &mut p.b;
    match rng.below(4) {
        0 => b[v] = rng.pick_or(&[0, 0x08, 0x0c, 0x88, 0xff, 0x80], Rng::byte),
        1 => {
            let vni: u32 = rng.pick_or(&[0, 1, 2, 0x00ff_ffff, 0x0001_0001], |r| r.next() as u32);
            b[v + 4..v + 7].copy_from_slice(&vni.to_be_bytes()[1..]);
        }
        2 => b[v + 1 + rng.below(3)] = rng.byte(),
        _ => b[v + 7] = rng.byte(),
    }
}

/// Cuts the frame short, mostly at or near a header boundary.
fn truncate(rng: &mut Rng, p: &mut Pkt, tc: bool, fix: &mut Fix) {
    let min_len = if tc { tc_min_len(&p.b) } else { 14 };
    let len = p.b.len();
    if len <= min_len {
        return;
    }
    let l = p.l;
    let cut = if rng.chance(60) {
        let bounds = [
            14,
            34,
            42,
            50,
            64,
            l.ip,
            l.ip + 20,
            l.l4,
            l.l4 + 2,
            l.l4 + 4,
            l.l4 + 6,
            l.l4 + 8,
            l.l4 + 14,
            l.l4 + 18,
            l.l4 + 20,
            l.emb + 20,
            l.emb + 24,
            l.emb + 28,
        ];
        (rng.pick(&bounds) + rng.below(4)).saturating_sub(1)
    } else {
        min_len + rng.below(len - min_len)
    };
    p.b.truncate(cut.clamp(min_len, len));
    // Consistent lengths around a short packet, or lengths that claim what was cut.
    fix.lengths = rng.chance(50);
}

/// Ethernet padding (or trailing noise) after the packet.
fn pad(rng: &mut Rng, p: &mut Pkt, fix: &mut Fix) {
    let n = 1 + rng.below(64);
    let noise = rng.chance(30);
    for _ in 0..n {
        let x = if noise { rng.byte() } else { 0 };
        p.b.push(x);
    }
    fix.lengths = false;
}

/// One to three mutations at chosen layers, then (mostly) checksums repaired.
fn mutate(rng: &mut Rng, p: &mut Pkt, tc: bool) {
    let mut fix = Fix {
        lengths: rng.chance(20),
        ..Fix::default()
    };
    for _ in 0..=rng.below(3) {
        let l = p.l;
        match rng.below(20) {
            0 => mutate_eth(rng, p, 0),
            1..=4 if l.outer => mutate_ip(rng, p, 14, &mut fix),
            5 | 6 if l.udp != 0 => mutate_udp(rng, p, &mut fix),
            7 if l.vxlan != 0 => mutate_vxlan(rng, p),
            8 if l.inner_eth != 0 => mutate_eth(rng, p, l.inner_eth),
            9..=11 => mutate_ip(rng, p, l.ip, &mut fix),
            12..=14 => mutate_l4(rng, p, l.l4, &mut fix),
            15 if l.emb != 0 => {
                if rng.chance(50) {
                    mutate_ip(rng, p, l.emb, &mut fix);
                } else if let Some(hl) = ip_hlen(&p.b, l.emb) {
                    mutate_l4(rng, p, l.emb + hl, &mut fix);
                }
            }
            16 => truncate(rng, p, tc, &mut fix),
            17 => pad(rng, p, &mut fix),
            _ => {
                for _ in 0..=rng.below(3) {
                    let i = rng.below(p.b.len());
                    p.b[i] = rng.byte();
                }
            }
        }
    }
    if rng.chance(75) {
        repair(p, &fix);
    }
}

// ---- what the model expects ----

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Act {
    /// Passed on exactly as it came.
    #[default]
    Untouched,
    Drop,
    /// This return value, and the packet in `Want::exp`.
    Emit(i32),
}

#[derive(Default)]
struct Want {
    act: Act,
    /// A refused `bpf_skb_adjust_room` may drop instead: the test run gives a GSO packet no GSO
    /// type, which the helper refuses.
    may_drop: bool,
    exp: Vec<u8>,
    /// Byte ranges the model cannot predict (the outer IP ID and checksum, the VXLAN source
    /// port, an allocated port); the caller checks them.
    wild: Vec<(usize, usize)>,
    /// Checksum fields compared as one's complement numbers (0x0000 = 0xffff).
    ones: Vec<usize>,
    /// What the model made of the packet, for the report.
    label: &'static str,
}

impl Want {
    fn reset(&mut self, act: Act, label: &'static str) {
        self.act = act;
        self.may_drop = false;
        self.exp.clear();
        self.wild.clear();
        self.ones.clear();
        self.label = label;
    }

    /// Expects the program's output to be `input` changed as `exp` says (`exp` starts as a
    /// copy of `input`).
    fn emit(&mut self, ret: i32, input: &[u8], label: &'static str) {
        self.reset(Act::Emit(ret), label);
        self.exp.extend_from_slice(input);
    }

    /// Compares what the program did with what the model expects.
    fn check(
        &mut self,
        ret: i32,
        input: &[u8],
        out: &[u8],
        pass: i32,
        drop: i32,
    ) -> Result<(), String> {
        match self.act {
            Act::Untouched if ret == pass && out == input => Ok(()),
            Act::Untouched => Err(format!(
                "the model passes it untouched ({}); the program returned {ret}{}",
                self.label,
                if ret == pass { ", changed" } else { "" }
            )),
            Act::Drop if ret == drop => Ok(()),
            Act::Drop => Err(format!(
                "the model drops it ({}); the program returned {ret}",
                self.label
            )),
            Act::Emit(_) if ret == drop && self.may_drop => Ok(()),
            Act::Emit(want) => {
                if ret != want {
                    return Err(format!(
                        "the model emits it with {want} ({}); the program returned {ret}",
                        self.label
                    ));
                }
                if out.len() != self.exp.len() {
                    return Err(format!(
                        "{}: {} bytes out, the model's {} bytes",
                        self.label,
                        out.len(),
                        self.exp.len()
                    ));
                }
                for &(a, n) in &self.wild {
                    self.exp[a..a + n].copy_from_slice(&out[a..a + n]);
                }
                for &o in &self.ones {
                    if eq_ones(be16(out, o), be16(&self.exp, o)) {
                        self.exp[o..o + 2].copy_from_slice(&out[o..o + 2]);
                    }
                }
                if out == self.exp {
                    return Ok(());
                }
                let at = out
                    .iter()
                    .zip(&self.exp)
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                Err(format!(
                    "{}: output differs from the model's at byte {at}\n  model  {}",
                    self.label,
                    hex(&self.exp)
                ))
            }
        }
    }
}

/// Decrements the TTL of the IPv4 header at `o` as a router does; false if it may not be
/// forwarded.
fn dec_ttl(b: &mut [u8], o: usize, ones: &mut Vec<usize>) -> bool {
    let (ttl, proto) = (b[o + 8], b[o + 9]);
    if ttl <= 1 {
        return false;
    }
    b[o + 8] = ttl - 1;
    let c = replace16(
        be16(b, o + 10),
        u16::from_be_bytes([ttl, proto]),
        u16::from_be_bytes([ttl - 1, proto]),
    );
    put16(b, o + 10, c);
    if !ones.contains(&(o + 10)) {
        ones.push(o + 10);
    }
    true
}

// ---- the receiving node: from_wire and from_wire_xdp ----

/// A node as its `from_wire` sees the world.
struct WireNode {
    kind: u8,
    public: [u8; 4],
    subnet: [u8; 3],
    gateway: [u8; 4],
    port: u16,
    vni: u32,
    vtep: [u8; 6],
    uplink_mac: [u8; 6],
    /// The one node with a lease.
    peer: [u8; 4],
    /// The one learnt pod.
    endpoint: Option<([u8; 4], [u8; 6])>,
}

impl WireNode {
    fn b(kind: u8) -> Self {
        Self {
            kind,
            public: NODE_B,
            subnet: [10, 244, 2],
            gateway: GW_B,
            port: match kind {
                backend::VXLAN => PORT,
                backend::UDP => UDP_PORT,
                _ => 0,
            },
            vni: if kind == backend::VXLAN { VNI } else { 0 },
            vtep: VTEP_B,
            uplink_mac: UPLINK_MAC_B,
            peer: NODE_A,
            endpoint: Some((POD_B, POD_B_MAC)),
        }
    }

    /// The masquerade node (node A, vxlan).
    fn masq() -> Self {
        Self {
            kind: backend::VXLAN,
            public: NODE_A,
            subnet: [10, 244, 1],
            gateway: GW_A,
            port: PORT,
            vni: VNI,
            vtep: VTEP_A,
            uplink_mac: UPLINK_MAC_A,
            peer: NODE_B,
            endpoint: None,
        }
    }

    /// The inner IPv4 header of tunnel traffic at `inner`: valid as a router checks it, whole,
    /// and for this node's subnet.
    fn inner_ok(&self, f: &[u8], inner: usize) -> bool {
        let vihl = f[inner];
        let hl = usize::from(vihl & 0x0f) * 4;
        if vihl >> 4 != 4 || hl < 20 || (vihl == 0x45 && !sum_ok(&f[inner..inner + 20])) {
            return false;
        }
        let tot = usize::from(be16(f, inner + 2));
        tot >= hl && tot <= f.len() - inner && in24(addr(f, inner + 16), self.subnet)
    }

    fn classify(&self, f: &[u8]) -> Class {
        if be16(f, 12) != 0x0800 || f.len() < 34 {
            return Class::Pass;
        }
        let (vihl, proto, src, dst) = (f[14], f[23], addr(f, 26), addr(f, 30));
        if dst != self.public {
            if vihl >> 4 == 4 && in24(dst, self.subnet) && dst != self.gateway {
                return Class::Local;
            }
            return Class::NotOverlay;
        }
        let ours = match self.kind {
            backend::VXLAN | backend::UDP => proto == UDP,
            backend::IPIP => proto == IPIP,
            _ => false,
        };
        if !ours {
            return Class::NotOverlay;
        }
        if is_fragment(f, 14) {
            return Class::Pass;
        }
        if vihl != 0x45 {
            // Outer options: ours go to the slow path; a masquerade reply goes on as not ours.
            if self.kind == backend::IPIP {
                return Class::Pass;
            }
            let off = 14 + usize::from(vihl & 0x0f) * 4 + 2;
            return if off + 2 <= f.len() && be16(f, off) == self.port {
                Class::Pass
            } else {
                Class::NotOverlay
            };
        }
        let inner = match self.kind {
            backend::IPIP => 34,
            backend::UDP => 42,
            _ => 64,
        };
        let udp = self.kind != backend::IPIP;
        if udp {
            if f.len() < 42 {
                return Class::Pass;
            }
            if be16(f, 36) != self.port {
                return Class::NotOverlay;
            }
        }
        // Our tunnel traffic from here on: whatever is wrong drops it.
        let min = inner + 20 - 14;
        let tot = usize::from(be16(f, 16));
        if tot < min || tot > f.len() - 14 {
            return Class::Drop;
        }
        if udp {
            let ul = usize::from(be16(f, 38));
            if ul < min - 20 || ul > tot - 20 {
                return Class::Drop;
            }
        }
        if self.kind == backend::VXLAN
            && (f[42] & 0x08 == 0
                || u32::from_be_bytes([0, f[46], f[47], f[48]]) != self.vni
                || f[50..56] != self.vtep
                || be16(f, 62) != 0x0800)
        {
            return Class::Drop;
        }
        if src != self.peer || !self.inner_ok(f, inner) {
            return Class::Drop;
        }
        Class::Decap(inner)
    }

    /// Local delivery of the IPv4 packet behind the Ethernet header of `w.exp`.
    fn deliver(&self, w: &mut Want) {
        let dst = addr(&w.exp, 30);
        if dst == self.gateway {
            // For the node itself: to the stack.
            w.act = Act::Emit(TC_ACT_OK);
            return;
        }
        if !dec_ttl(&mut w.exp, 14, &mut w.ones) {
            w.reset(Act::Drop, "ttl exceeded");
            return;
        }
        if let Some((ip, mac)) = self.endpoint
            && ip == dst
        {
            w.exp[0..6].copy_from_slice(&mac);
            w.exp[6..12].copy_from_slice(&CNI_MAC);
        }
        w.act = Act::Emit(TC_ACT_REDIRECT);
    }

    /// What `from_wire` (tc) must do with `f`.
    fn want_tc(&self, f: &[u8], meta: &Meta, w: &mut Want, nat: Option<&Ingress>) -> Class {
        let class = self.classify(f);
        match class {
            Class::Pass => w.reset(Act::Untouched, "pass"),
            Class::NotOverlay => match nat {
                Some(m) => m.want(f, w),
                None => w.reset(Act::Untouched, "not overlay"),
            },
            Class::Drop => w.reset(Act::Drop, "bad tunnel traffic"),
            Class::Decap(inner) => {
                w.reset(Act::Emit(TC_ACT_REDIRECT), "decapsulate");
                w.exp.extend_from_slice(&f[..14]);
                w.exp.extend_from_slice(&f[inner..]);
                if self.kind == backend::UDP && !dec_ttl(&mut w.exp, 14, &mut w.ones) {
                    w.reset(Act::Drop, "ttl exceeded in the tunnel");
                    return class;
                }
                self.deliver(w);
                w.may_drop = meta.gso_size != 0;
            }
            Class::Local => {
                w.emit(TC_ACT_REDIRECT, f, "deliver plain");
                if f[14] & 0x0f < 5 || (f[14] == 0x45 && !sum_ok(&f[14..34])) {
                    w.reset(Act::Drop, "bad plain ipv4");
                } else {
                    self.deliver(w);
                }
            }
        }
        class
    }

    /// What `from_wire_xdp` must do with `f`.
    fn want_xdp(&self, f: &[u8], w: &mut Want) {
        match self.classify(f) {
            Class::Pass | Class::NotOverlay | Class::Local => w.reset(Act::Untouched, "pass"),
            Class::Drop => w.reset(Act::Drop, "bad tunnel traffic"),
            Class::Decap(inner) => {
                w.reset(Act::Emit(XDP_PASS), "decapsulate");
                w.exp.extend_from_slice(&f[inner - 14..]);
                w.exp[0..6].copy_from_slice(&self.uplink_mac);
                if self.kind != backend::VXLAN {
                    w.exp[6..12].copy_from_slice(&f[6..12]);
                    w.exp[12..14].copy_from_slice(&[8, 0]);
                }
                if self.kind == backend::UDP && !dec_ttl(&mut w.exp, 14, &mut w.ones) {
                    w.reset(Act::Drop, "ttl exceeded in the tunnel");
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Class {
    /// Not ours, passed on (not `pass_not_overlay`).
    Pass,
    /// `pass_not_overlay`: where the reverse masquerade looks.
    NotOverlay,
    Drop,
    /// Our valid tunnel traffic for a local pod; the inner IPv4 header's offset.
    Decap(usize),
    /// Plain IPv4 for a local pod.
    Local,
}

// ---- the sending node: from_pods and from_host ----

struct PodNode {
    /// The backend of the route to node B.
    route: u8,
    /// `from_host`: the node's own packets (no router hop here).
    host: bool,
}

impl PodNode {
    fn overhead(&self) -> usize {
        match self.route {
            backend::VXLAN => 50,
            backend::IPIP => 20,
            backend::UDP => 28,
            _ => 0,
        }
    }

    fn want(&self, f: &[u8], meta: &Meta, w: &mut Want) {
        if be16(f, 12) != 0x0800 {
            return w.reset(Act::Untouched, "not ipv4");
        }
        if f.len() < 34
            || f[14] >> 4 != 4
            || f[14] & 0x0f < 5
            || (f[14] == 0x45 && !sum_ok(&f[14..34]))
        {
            return w.reset(Act::Drop, "bad ipv4");
        }
        let dst = addr(f, 30);
        if !in16(dst) {
            return w.reset(Act::Untouched, "not overlay");
        }
        if in24(dst, [10, 244, 1]) {
            return w.reset(Act::Untouched, "local subnet");
        }
        if !in24(dst, [10, 244, 2]) {
            return w.reset(Act::Drop, "no route");
        }
        let overhead = self.overhead();
        let inner_len = f.len() - 14;
        let hl = usize::from(f[14] & 0x0f) * 4;
        let seg = if meta.gso_size == 0 {
            inner_len
        } else {
            let l4 = 14 + hl;
            let l4_len = if f[23] != TCP {
                8
            } else if l4 + 14 <= f.len() {
                usize::from(f[l4 + 12] >> 4) * 4
            } else {
                20
            };
            hl + l4_len + meta.gso_size as usize
        };
        if seg + overhead > UPLINK_MTU {
            let act = if self.host { Act::Drop } else { Act::Untouched };
            return w.reset(act, "too big");
        }
        let hops = usize::from(!self.host) + usize::from(self.route == backend::UDP);
        if hops > 0 && usize::from(f[22]) <= hops {
            return w.reset(Act::Drop, "ttl exceeded");
        }
        w.emit(TC_ACT_REDIRECT, f, "encapsulate");
        let mut outer = [0u8; 50];
        let ttl = f[22] - hops as u8;
        let tot = ((inner_len + overhead) as u16).to_be_bytes();
        let ecn = match f[15] & 3 {
            3 => 2,
            e => e,
        };
        let ip_hdr = |tos: u8, frag: u8, ttl: u8, proto: u8| -> [u8; 20] {
            let [a0, a1, a2, a3] = NODE_A;
            let [b0, b1, b2, b3] = NODE_B;
            [
                0x45, tos, tot[0], tot[1], 0, 0, frag, 0, ttl, proto, 0, 0, a0, a1, a2, a3, b0, b1,
                b2, b3,
            ]
        };
        match self.route {
            backend::HOST_GW => {
                w.label = "direct";
            }
            backend::VXLAN => {
                outer[..20].copy_from_slice(&ip_hdr(ecn, 0, 64, UDP));
                let ul = ((inner_len + 30) as u16).to_be_bytes();
                let p = PORT.to_be_bytes();
                outer[20..28].copy_from_slice(&[0, 0, p[0], p[1], ul[0], ul[1], 0, 0]);
                outer[28..36].copy_from_slice(&[8, 0, 0, 0, 0, 0, VNI as u8, 0]);
                outer[36..42].copy_from_slice(&VTEP_B);
                outer[42..48].copy_from_slice(&VTEP_A);
                outer[48..50].copy_from_slice(&[8, 0]);
                // The outer ID, checksum and source port.
                w.wild.extend_from_slice(&[(18, 2), (24, 2), (34, 2)]);
            }
            backend::IPIP => {
                outer[..20].copy_from_slice(&ip_hdr(ecn, f[20] & 0x40, ttl, IPIP));
                w.wild.extend_from_slice(&[(18, 2), (24, 2)]);
            }
            _ => {
                let mut ip = ip_hdr(0, 0x40, 64, UDP);
                let c = checksum(&ip);
                put16(&mut ip, 10, c);
                outer[..20].copy_from_slice(&ip);
                let ul = ((inner_len + 8) as u16).to_be_bytes();
                let p = UDP_PORT.to_be_bytes();
                outer[20..28].copy_from_slice(&[p[0], p[1], p[0], p[1], ul[0], ul[1], 0, 0]);
                w.ones.push(24);
            }
        }
        w.exp.splice(14..14, outer[..overhead].iter().copied());
        let inner = 14 + overhead;
        for _ in 0..hops {
            dec_ttl(&mut w.exp, inner, &mut w.ones);
        }
        // A refused adjust_room: the test run's GSO packets.
        w.may_drop = overhead != 0 && meta.gso_size != 0;
    }
}

// ---- masquerade: to_wire's translation and from_wire's reverse ----

/// The "ports" of a flow as the programs read them.
enum Ports {
    /// Not all there: the read fails.
    Short,
    /// No ports of a flow (another protocol, another ICMP type).
    None,
    Some([u8; 2], [u8; 2]),
}

fn ports(f: &[u8], proto: u8, l4: usize) -> Ports {
    match proto {
        TCP | UDP if l4 + 4 > f.len() => Ports::Short,
        TCP | UDP => Ports::Some([f[l4], f[l4 + 1]], [f[l4 + 2], f[l4 + 3]]),
        ICMP if l4 + 6 > f.len() => Ports::Short,
        ICMP => match f[l4] {
            8 => Ports::Some([f[l4 + 4], f[l4 + 5]], [0; 2]),
            0 => Ports::Some([0; 2], [f[l4 + 4], f[l4 + 5]]),
            _ => Ports::None,
        },
        _ => Ports::None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

impl End {
    fn addr_off(self) -> usize {
        match self {
            Self::Source => 12,
            Self::Destination => 16,
        }
    }
    fn port_off(self) -> usize {
        match self {
            Self::Source => 0,
            Self::Destination => 2,
        }
    }
}

/// Bytes past the L4 header a translation of `proto` writes (its checksum): a shorter packet
/// is dropped.
fn rewrite_fits(f: &[u8], proto: u8, l4: usize) -> bool {
    match proto {
        TCP => l4 + 18 <= f.len(),
        UDP => l4 + 8 <= f.len(),
        _ => l4 + 6 <= f.len(),
    }
}

/// `w.exp` (a copy of the packet) with `end`'s address and port of the TCP, UDP or ICMP echo
/// packet rewritten, checksums updated incrementally.
fn expect_rewrite(
    w: &mut Want,
    l4: usize,
    proto: u8,
    end: End,
    new_addr: [u8; 4],
    new_port: [u8; 2],
) {
    let b = &mut w.exp;
    let a = 14 + end.addr_off();
    let old_addr = addr(b, a);
    b[a..a + 4].copy_from_slice(&new_addr);
    let c = replace32(be16(b, 24), old_addr, new_addr);
    put16(b, 24, c);
    w.ones.push(24);
    if proto == ICMP {
        let old = be16(b, l4 + 4);
        b[l4 + 4..l4 + 6].copy_from_slice(&new_port);
        let c = replace16(be16(b, l4 + 2), old, u16::from_be_bytes(new_port));
        put16(b, l4 + 2, c);
        w.ones.push(l4 + 2);
        return;
    }
    let p = l4 + end.port_off();
    let old = be16(b, p);
    b[p..p + 2].copy_from_slice(&new_port);
    let at = l4 + if proto == UDP { 6 } else { 16 };
    let c = be16(b, at);
    if proto == UDP && c == 0 {
        return;
    }
    let c = replace16(
        replace32(c, old_addr, new_addr),
        old,
        u16::from_be_bytes(new_port),
    );
    put16(b, at, c);
    w.ones.push(at);
}

/// An ICMP error (at `l4`) about a masqueraded flow: `end` of the outer header and the other end
/// of the quoted packet and its port rewritten, the quoted checksums and the ICMP checksum
/// updated; `lookup` finds the flow's entry by the key the program builds. False if the
/// program must not translate it (the packet is then dropped on egress, left alone on ingress).
fn expect_icmp_error(
    f: &[u8],
    l4: usize,
    end: End,
    masq: [u8; 4],
    lookup: impl Fn(&NatKey) -> Option<([u8; 4], [u8; 2], bool)>,
    w: &mut Want,
) -> bool {
    let emb = l4 + 8;
    if emb + 20 > f.len() || f[emb] >> 4 != 4 || f[emb] & 0x0f < 5 {
        return false;
    }
    let (eproto, esrc, edst) = (f[emb + 9], addr(f, emb + 12), addr(f, emb + 16));
    let el4 = emb + usize::from(f[emb] & 0x0f) * 4;
    let Ports::Some(esport, edport) = ports(f, eproto, el4) else {
        return false;
    };
    let (dir, emb_end) = match end {
        End::Source => (nat::EGRESS, End::Destination),
        End::Destination => (nat::INGRESS, End::Source),
    };
    let Some((entry_addr, port, host)) =
        lookup(&NatKey::new(edst, esrc, edport, esport, eproto, dir))
    else {
        return false;
    };
    if host {
        return false;
    }
    let new_addr = if end == End::Source { masq } else { entry_addr };
    let (port_off, check_off) = match eproto {
        ICMP => (4, 2),
        UDP => (emb_end.port_off(), 6),
        _ => (emb_end.port_off(), 16),
    };
    if l4 + 4 > f.len() || el4 + port_off + 2 > f.len() {
        return false;
    }
    w.emit(TC_ACT_OK, f, "icmp error about a masqueraded flow");
    let b = &mut w.exp;
    let a = 14 + end.addr_off();
    let c = replace32(be16(b, 24), addr(b, a), new_addr);
    b[a..a + 4].copy_from_slice(&new_addr);
    put16(b, 24, c);
    let ea = emb + emb_end.addr_off();
    let old_addr = addr(b, ea);
    let old_emb_check = be16(b, emb + 10);
    let new_emb_check = replace32(old_emb_check, old_addr, new_addr);
    put16(b, emb + 10, new_emb_check);
    b[ea..ea + 4].copy_from_slice(&new_addr);
    let mut icmp_check = replace32(be16(b, l4 + 2), old_addr, new_addr);
    icmp_check = replace16(icmp_check, old_emb_check, new_emb_check);
    let old_port = be16(b, el4 + port_off);
    b[el4 + port_off..el4 + port_off + 2].copy_from_slice(&port);
    let new_port = u16::from_be_bytes(port);
    icmp_check = replace16(icmp_check, old_port, new_port);
    if el4 + check_off + 2 <= b.len() {
        let old = be16(b, el4 + check_off);
        if !(eproto == UDP && old == 0) {
            let mut new = old;
            if eproto != ICMP {
                new = replace32(new, old_addr, new_addr);
            }
            new = replace16(new, old_port, new_port);
            put16(b, el4 + check_off, new);
            icmp_check = replace16(icmp_check, old, new);
        }
    }
    put16(b, l4 + 2, icmp_check);
    w.ones.extend_from_slice(&[24, l4 + 2, emb + 10]);
    true
}

/// A flow as the `to_wire` model knows it.
struct Flow {
    port: [u8; 2],
    /// A TCP RST seen: the flow is over.
    reset: bool,
    last: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The node's own flow on the port.
    Host,
    /// A pod's flow (its original-direction key).
    Pod(NatKey),
}

/// The masquerade table as `to_wire` must keep it: flows, and who owns each (remote end, port).
struct Egress {
    flows: HashMap<NatKey, Flow>,
    /// By reply-direction key.
    owners: HashMap<NatKey, Owner>,
    takeovers: u64,
    clock_jumps: u64,
}

/// How long a flow must have been idle before its port may go to a new flow: the program's
/// 30 s ([`nat::REUSE_IDLE_NS`]) less the slack of its coarse clock and of `last_seen`, which
/// is refreshed at most once a second.
const IDLE_OVER: Duration = Duration::from_secs(28);

/// What the program must do with a packet leaving the uplink, before the table is consulted.
enum Plan {
    /// `w` says it all.
    Fixed,
    /// Untouched; the node's own flow claims this reply key's port.
    HostClaim(NatKey),
    /// A pod's flow: translated with its port (made if new), or dropped if too short to rewrite.
    Flow {
        key: NatKey,
        l4: usize,
        fits: bool,
        rst: bool,
    },
}

impl Egress {
    fn new() -> Self {
        Self {
            flows: HashMap::new(),
            owners: HashMap::new(),
            takeovers: 0,
            clock_jumps: 0,
        }
    }

    fn plan(&self, f: &[u8], meta: &Meta, w: &mut Want) -> Plan {
        w.reset(Act::Untouched, "not masqueraded");
        if be16(f, 12) != 0x0800 {
            return Plan::Fixed;
        }
        if f.len() < 34 || f[14] >> 4 != 4 || f[14] & 0x0f < 5 {
            w.reset(Act::Drop, "bad ipv4");
            return Plan::Fixed;
        }
        let (proto, src, dst) = (f[23], addr(f, 26), addr(f, 30));
        let fragment = is_fragment(f, 14);
        let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
        if src == NODE_A {
            w.label = "the node's own";
            if fragment {
                return Plan::Fixed;
            }
            let Ports::Some(sport, dport) = ports(f, proto, l4) else {
                return Plan::Fixed;
            };
            let port = u16::from_be_bytes(sport);
            if !(NAT_PORTS.0..=NAT_PORTS.1).contains(&port) {
                return Plan::Fixed;
            }
            return Plan::HostClaim(NatKey::new(dst, src, dport, sport, proto, nat::INGRESS));
        }
        if !in16(src) || meta.mark & nat::KUBE_MASQ_MARK != 0 || in16(dst) || dst[0] & 0xf0 == 224 {
            return Plan::Fixed;
        }
        w.reset(Act::Drop, "cannot masquerade");
        if fragment {
            return Plan::Fixed;
        }
        if proto == ICMP {
            if l4 + 2 > f.len() {
                return Plan::Fixed;
            }
            if f[l4] == 3 || f[l4] == 11 {
                let lookup = |k: &NatKey| self.flows.get(k).map(|fl| (NODE_A, fl.port, false));
                expect_icmp_error(f, l4, End::Source, NODE_A, lookup, w);
                return Plan::Fixed;
            }
        }
        let Ports::Some(sport, dport) = ports(f, proto, l4) else {
            return Plan::Fixed;
        };
        if proto == ICMP && sport == [0; 2] && dport != [0; 2] {
            return Plan::Fixed;
        }
        Plan::Flow {
            key: NatKey::new(src, dst, sport, dport, proto, nat::EGRESS),
            l4,
            fits: rewrite_fits(f, proto, l4),
            rst: proto == TCP && l4 + 14 <= f.len() && f[l4 + 13] & 0x04 != 0,
        }
    }

    /// Records that the new flow `key` holds `port`; an error if that port was not free for it.
    fn bind(&mut self, key: NatKey, port: [u8; 2], rst: bool) -> Result<(), String> {
        let p = u16::from_be_bytes(port);
        if !(NAT_PORTS.0..=NAT_PORTS.1).contains(&p) || p == PORT {
            return Err(format!("allocated port {p} outside the range"));
        }
        let reply = key.reply(NODE_A, port);
        match self.owners.get(&reply) {
            None => {}
            Some(Owner::Host) => {
                return Err(format!(
                    "a pod's new flow {key:?} got port {p}, the node's own flow's"
                ));
            }
            Some(&Owner::Pod(old)) => {
                let flow = &self.flows[&old];
                let idle = flow.last.elapsed();
                if !flow.reset && idle < IDLE_OVER {
                    return Err(format!(
                        "a new flow {key:?} took port {p} from flow {old:?}, active {idle:?} ago"
                    ));
                }
                self.flows.remove(&old);
                self.takeovers += 1;
            }
        }
        self.owners.insert(reply, Owner::Pod(key));
        self.flows.insert(
            key,
            Flow {
                port,
                reset: rst,
                last: Instant::now(),
            },
        );
        Ok(())
    }

    /// Checks the program's verdict on a packet against the plan and the table, and updates it.
    fn settle(
        &mut self,
        plan: &Plan,
        f: &[u8],
        ret: i32,
        out: &[u8],
        w: &mut Want,
        dp: &EbpfDataplane,
    ) -> Result<(), String> {
        match *plan {
            Plan::Fixed => w.check(ret, f, out, TC_ACT_OK, TC_ACT_SHOT),
            Plan::HostClaim(reply) => {
                w.check(ret, f, out, TC_ACT_OK, TC_ACT_SHOT)?;
                self.owners.entry(reply).or_insert(Owner::Host);
                Ok(())
            }
            Plan::Flow { key, l4, fits, rst } => {
                let proto = f[23];
                if let Some(flow) = self.flows.get_mut(&key) {
                    flow.reset |= rst;
                    flow.last = Instant::now();
                    if fits {
                        w.emit(TC_ACT_OK, f, "masquerade (flow known)");
                        let port = flow.port;
                        expect_rewrite(w, l4, proto, End::Source, NODE_A, port);
                    } else {
                        w.reset(Act::Drop, "too short to rewrite");
                    }
                    return w.check(ret, f, out, TC_ACT_OK, TC_ACT_SHOT);
                }
                if ret == TC_ACT_SHOT {
                    // No port, or made and then too short to rewrite: the table tells.
                    w.label = "new flow dropped";
                    if let Some(e) = nat_lookup(dp, &key) {
                        if fits {
                            return Err("a new flow was made, and its packet dropped".into());
                        }
                        self.bind(key, e.port, rst)?;
                    }
                    return Ok(());
                }
                if !fits || ret != TC_ACT_OK || out.len() != f.len() {
                    return Err(format!("a new flow: returned {ret}, {} bytes", out.len()));
                }
                let at = if proto == ICMP { l4 + 4 } else { l4 };
                let port = [out[at], out[at + 1]];
                self.bind(key, port, rst)?;
                w.emit(TC_ACT_OK, f, "masquerade (new flow)");
                expect_rewrite(w, l4, proto, End::Source, NODE_A, port);
                w.check(ret, f, out, TC_ACT_OK, TC_ACT_SHOT)
            }
        }
    }
}

/// The masquerade table as the reverse family set it up: reply keys to the pod's address and
/// port, or the node's own flow.
struct Ingress {
    table: HashMap<NatKey, ([u8; 4], [u8; 2], bool)>,
}

impl Ingress {
    /// What `from_wire` must do with `f`, which it does not take for overlay traffic.
    fn want(&self, f: &[u8], w: &mut Want) {
        w.reset(Act::Untouched, "not overlay");
        if f.len() < 34 || f[14] >> 4 != 4 || f[14] & 0x0f < 5 {
            return;
        }
        let (proto, src, dst) = (f[23], addr(f, 26), addr(f, 30));
        if dst != NODE_A || is_fragment(f, 14) || !matches!(proto, TCP | UDP | ICMP) {
            return;
        }
        let l4 = 14 + usize::from(f[14] & 0x0f) * 4;
        if proto == ICMP && l4 + 2 <= f.len() && (f[l4] == 3 || f[l4] == 11) {
            let lookup = |k: &NatKey| self.table.get(k).copied();
            if !expect_icmp_error(f, l4, End::Destination, NODE_A, lookup, w) {
                w.reset(Act::Untouched, "icmp error not about a flow");
            }
            return;
        }
        let Ports::Some(sport, dport) = ports(f, proto, l4) else {
            return;
        };
        let Some(&(pod, pod_port, host)) =
            self.table
                .get(&NatKey::new(src, dst, sport, dport, proto, nat::INGRESS))
        else {
            return w.reset(Act::Untouched, "no flow");
        };
        if host {
            return w.reset(Act::Untouched, "the node's own flow");
        }
        if !rewrite_fits(f, proto, l4) {
            return w.reset(Act::Drop, "reply too short to rewrite");
        }
        w.emit(TC_ACT_OK, f, "reverse masquerade");
        expect_rewrite(w, l4, proto, End::Destination, pod, pod_port);
    }
}

/// Masqueraded flows and node flows set up through `to_wire` for the reverse family.
fn setup_flows(dp: &EbpfDataplane, rng: &mut Rng) -> (Vec<SetupFlow>, Vec<SetupFlow>, Ingress) {
    let mut out = vec![0u8; 8192];
    let mut table = HashMap::new();
    let mut hosts = Vec::new();
    // The node's own flows first, so that no pod flow has their ports.
    for (i, proto) in [TCP, UDP, TCP, ICMP].into_iter().enumerate() {
        let port = NAT_PORTS.1 - i as u16;
        let remote_port = if proto == ICMP { 0 } else { 80 };
        let seg = segment(rng, proto, NODE_A, OUTSIDE, port, remote_port);
        let frame = wire_frame(&ipv4(NODE_A, OUTSIDE, 64, proto, &seg));
        let (ret, n) = run_tc(dp, prog_name::TO_WIRE, &frame, &Meta::default(), &mut out);
        assert_eq!(
            (ret, &out[..n]),
            (TC_ACT_OK, &frame[..]),
            "the node's own flow passes"
        );
        let f = SetupFlow {
            remote: OUTSIDE,
            remote_port,
            proto,
            port,
        };
        let (s, d) = if proto == ICMP {
            ([0; 2], port.to_be_bytes())
        } else {
            (remote_port.to_be_bytes(), port.to_be_bytes())
        };
        table.insert(
            NatKey::new(OUTSIDE, NODE_A, s, d, proto, nat::INGRESS),
            (NODE_A, port.to_be_bytes(), true),
        );
        hosts.push(f);
    }
    let mut flows = Vec::new();
    for pod in NAT_PODS {
        for pod_port in [40_000, 40_001] {
            for remote in NAT_REMOTES {
                for (proto, remote_port) in [(TCP, 80), (UDP, 53), (ICMP, 0)] {
                    let seg = segment(rng, proto, pod, remote, pod_port, remote_port);
                    let frame = wire_frame(&ipv4(pod, remote, 63, proto, &seg));
                    let (ret, n) =
                        run_tc(dp, prog_name::TO_WIRE, &frame, &Meta::default(), &mut out);
                    assert_eq!(ret, TC_ACT_OK, "a new flow is masqueraded");
                    let at = if proto == ICMP { 38 } else { 34 };
                    assert!(n == frame.len());
                    let port = be16(&out, at);
                    let (s, d) = if proto == ICMP {
                        ([0; 2], port.to_be_bytes())
                    } else {
                        (remote_port.to_be_bytes(), port.to_be_bytes())
                    };
                    table.insert(
                        NatKey::new(remote, NODE_A, s, d, proto, nat::INGRESS),
                        (pod, pod_port.to_be_bytes(), false),
                    );
                    flows.push(SetupFlow {
                        remote,
                        remote_port,
                        proto,
                        port,
                    });
                }
            }
        }
    }
    (flows, hosts, Ingress { table })
}

// ---- families ----

enum Kind {
    /// `from_pods` or `from_host`, a node per target.
    Pods(Vec<PodNode>),
    /// `from_wire` (tc), a node per target.
    Wire(Vec<WireNode>),
    /// `from_wire_xdp` (each decapsulated packet then through `from_wire` as the stack would).
    Xdp(Vec<WireNode>),
    /// `to_wire` on the masquerade node.
    Egress(Egress),
    /// `from_wire` on the masquerade node.
    Ingress(WireNode, Ingress),
}

struct Family {
    /// The program fuzzed (program id, program name).
    program: u32,
    prog: &'static str,
    kind: Kind,
    targets: Vec<Target>,
    /// Seed packets per target.
    seeds: Vec<Vec<Pkt>>,
}

/// Per-family results.
#[derive(Debug, Default)]
struct Report {
    name: &'static str,
    program: &'static str,
    packets: u64,
    test_runs: u64,
    wall: Duration,
    /// Counted verdicts, `program/reason` (summed over targets).
    verdicts: BTreeMap<String, u64>,
    /// Return values of the fuzzed program.
    returns: BTreeMap<&'static str, u64>,
    /// What the model made of the packets, and observations.
    model: BTreeMap<&'static str, u64>,
}

fn ret_name(xdp: bool, ret: i32) -> &'static str {
    match (xdp, ret) {
        (false, TC_ACT_OK) => "TC_ACT_OK",
        (false, TC_ACT_SHOT) => "TC_ACT_SHOT",
        (false, TC_ACT_REDIRECT) => "TC_ACT_REDIRECT",
        (true, XDP_PASS) => "XDP_PASS",
        (true, XDP_DROP) => "XDP_DROP",
        _ => "other",
    }
}

const SEEDS_PER_TARGET: usize = 256;

fn family(name: &'static str, rng: &mut Rng) -> Family {
    let pods = |rng: &mut Rng, host: bool, routes: &[u8]| {
        let nodes: Vec<PodNode> = routes
            .iter()
            .map(|&route| PodNode { route, host })
            .collect();
        let seeds = nodes
            .iter()
            .map(|n| {
                (0..SEEDS_PER_TARGET)
                    .map(|_| pod_seed(rng, n.overhead(), host))
                    .collect()
            })
            .collect();
        let targets = routes
            .iter()
            .map(|&route| Target::new(node_a_of(route, route)))
            .collect();
        (Kind::Pods(nodes), targets, seeds)
    };
    let wire = |rng: &mut Rng, kinds: &[u8]| {
        let seeds = kinds
            .iter()
            .map(|&k| (0..SEEDS_PER_TARGET).map(|_| wire_seed(rng, k)).collect())
            .collect();
        let targets = kinds.iter().map(|&k| Target::new(node_b_of(k))).collect();
        (
            kinds.iter().map(|&k| WireNode::b(k)).collect::<Vec<_>>(),
            targets,
            seeds,
        )
    };
    let (program, prog, (kind, targets, seeds)) = match name {
        "from_pods/vxlan" => (
            program::FROM_PODS,
            prog_name::FROM_PODS,
            pods(rng, false, &[backend::VXLAN]),
        ),
        "from_pods/ipip" => (
            program::FROM_PODS,
            prog_name::FROM_PODS,
            pods(rng, false, &[backend::IPIP]),
        ),
        "from_pods/udp" => (
            program::FROM_PODS,
            prog_name::FROM_PODS,
            pods(rng, false, &[backend::UDP]),
        ),
        "from_pods/host-gw" => (
            program::FROM_PODS,
            prog_name::FROM_PODS,
            pods(rng, false, &[backend::HOST_GW]),
        ),
        "from_host" => (
            program::FROM_HOST,
            prog_name::FROM_HOST,
            pods(
                rng,
                true,
                &[
                    backend::VXLAN,
                    backend::IPIP,
                    backend::UDP,
                    backend::HOST_GW,
                ],
            ),
        ),
        "from_wire/vxlan" | "from_wire/ipip" | "from_wire/udp" | "from_wire/host-gw" => {
            let k = match name {
                "from_wire/vxlan" => backend::VXLAN,
                "from_wire/ipip" => backend::IPIP,
                "from_wire/udp" => backend::UDP,
                _ => backend::HOST_GW,
            };
            let (nodes, targets, seeds) = wire(rng, &[k]);
            (
                program::FROM_WIRE,
                prog_name::FROM_WIRE,
                (Kind::Wire(nodes), targets, seeds),
            )
        }
        "from_wire_xdp" => {
            let (nodes, targets, seeds) = wire(rng, &[backend::VXLAN, backend::IPIP, backend::UDP]);
            (
                program::FROM_WIRE_XDP,
                prog_name::FROM_WIRE_XDP,
                (Kind::Xdp(nodes), targets, seeds),
            )
        }
        "to_wire/masquerade" => {
            let seeds = vec![
                (0..SEEDS_PER_TARGET * 2)
                    .map(|_| egress_seed(rng))
                    .collect(),
            ];
            (
                program::TO_WIRE,
                prog_name::TO_WIRE,
                (
                    Kind::Egress(Egress::new()),
                    vec![Target::new(masq_node())],
                    seeds,
                ),
            )
        }
        "from_wire/masquerade" => {
            let dp = masq_node();
            let (flows, hosts, model) = setup_flows(&dp, rng);
            let seeds = vec![
                (0..SEEDS_PER_TARGET * 2)
                    .map(|_| ingress_seed(rng, &flows, &hosts))
                    .collect(),
            ];
            (
                program::FROM_WIRE,
                prog_name::FROM_WIRE,
                (
                    Kind::Ingress(WireNode::masq(), model),
                    vec![Target::new(dp)],
                    seeds,
                ),
            )
        }
        other => panic!("no family {other}"),
    };
    Family {
        program,
        prog,
        kind,
        targets,
        seeds,
    }
}

/// What `from_pods` hashes for the VXLAN source port: addresses, protocol, and the ports when
/// it reads them.
type FlowHashKey = ([u8; 4], [u8; 4], u8, Option<[u8; 4]>);

/// Per-packet buffers, reused.
struct Scratch {
    pkt: Pkt,
    out: Vec<u8>,
    out2: Vec<u8>,
    want: Want,
    want2: Want,
    /// This packet's runs: (program, return value).
    runs: Vec<(u32, i32)>,
    /// The fuzzed program's return value and output length.
    ret: i32,
    out_len: usize,
    /// The VXLAN source port of each flow seen (a flow keeps its port).
    vxlan_ports: HashMap<FlowHashKey, u16>,
}

/// Packets of the masquerade family between two jumps of its clock.
const AGE_EVERY: u64 = 200_000;
/// How far the clock jumps: past [`nat::REUSE_IDLE_NS`], so that ports of flows idle since the
/// last jump may go to new flows.
const AGE_BY: Duration = Duration::from_secs(31);

impl Family {
    /// Makes every masquerade entry, and every flow the model knows, [`AGE_BY`] older: the
    /// fuzzer's way of letting half a minute pass.
    fn age_nat(&mut self) {
        let Kind::Egress(model) = &mut self.kind else {
            return;
        };
        let dp = &mut self.targets[0].dp;
        let entries = dp.nat_entries().expect("the masquerade table");
        let map = dp.ebpf_mut().map_mut(map_name::NAT).expect("the NAT map");
        let mut table: aya::maps::HashMap<_, NatKey, NatEntry> =
            aya::maps::HashMap::try_from(map).expect("a hash map");
        let by = AGE_BY.as_nanos() as u64;
        for (k, mut e) in entries {
            e.last_seen = e.last_seen.saturating_sub(by);
            table.insert(k, e, 0).expect("an entry rewritten");
        }
        for flow in model.flows.values_mut() {
            flow.last = flow
                .last
                .checked_sub(AGE_BY)
                .expect("a clock older than the flows");
        }
        model.clock_jumps += 1;
    }

    /// Runs one packet through target `t`: the program, the model, the checks.
    fn step(
        &mut self,
        t: usize,
        meta: &Meta,
        s: &mut Scratch,
        report: &mut Report,
    ) -> Result<(), String> {
        let input = &s.pkt.b;
        let target = &mut self.targets[t];
        match &mut self.kind {
            Kind::Pods(nodes) => {
                let node = &nodes[t];
                node.want(input, meta, &mut s.want);
                let (ret, n) = run_tc(&target.dp, self.prog, input, meta, &mut s.out);
                (s.ret, s.out_len) = (ret, n);
                s.runs.push((self.program, ret));
                let out = &s.out[..n];
                s.want.check(ret, input, out, TC_ACT_OK, TC_ACT_SHOT)?;
                if ret == TC_ACT_REDIRECT && node.route != backend::HOST_GW {
                    if !sum_ok(&out[14..34]) {
                        return Err("outer IPv4 checksum invalid".into());
                    }
                    if node.route == backend::VXLAN {
                        let sport = be16(out, 34);
                        if !(32_768..61_000).contains(&sport) {
                            return Err(format!("VXLAN source port {sport} outside the range"));
                        }
                        let ports = (input[14] == 0x45
                            && !is_fragment(input, 14)
                            && matches!(input[23], TCP | UDP | 132)
                            && input.len() >= 38)
                            .then(|| addr(input, 34));
                        let flow = (addr(input, 26), addr(input, 30), input[23], ports);
                        if s.vxlan_ports.len() < 4096 || s.vxlan_ports.contains_key(&flow) {
                            let first = *s.vxlan_ports.entry(flow).or_insert(sport);
                            if first != sport {
                                return Err(format!(
                                    "a flow's VXLAN source port changed: {first} → {sport}"
                                ));
                            }
                        }
                    }
                }
                if s.want.act == Act::Emit(TC_ACT_REDIRECT) && ret == TC_ACT_SHOT {
                    *report
                        .model
                        .entry("gso: adjust_room refused by the test run")
                        .or_default() += 1;
                }
            }
            Kind::Wire(nodes) => {
                let node = &nodes[t];
                let class = node.want_tc(input, meta, &mut s.want, None);
                let (ret, n) = run_tc(&target.dp, self.prog, input, meta, &mut s.out);
                (s.ret, s.out_len) = (ret, n);
                s.runs.push((self.program, ret));
                s.want
                    .check(ret, input, &s.out[..n], TC_ACT_OK, TC_ACT_SHOT)?;
                observe(class, input, ret, report);
            }
            Kind::Xdp(nodes) => {
                let node = &nodes[t];
                node.want_xdp(input, &mut s.want);
                let (ret, n) = run_xdp(&target.dp, input, &mut s.out);
                (s.ret, s.out_len) = (ret, n);
                // XDP counts what it decapsulates or drops; tc counts the rest.
                if s.want.act != Act::Untouched {
                    s.runs.push((self.program, ret));
                }
                s.want.check(ret, input, &s.out[..n], XDP_PASS, XDP_DROP)?;
                if ret == XDP_PASS && s.want.act != Act::Untouched {
                    // Then tc delivers it, as the stack hands it over.
                    let decapsulated = &s.out[..n];
                    node.want_tc(decapsulated, &Meta::default(), &mut s.want2, None);
                    let (ret2, n2) = run_tc(
                        &target.dp,
                        prog_name::FROM_WIRE,
                        decapsulated,
                        &Meta::default(),
                        &mut s.out2,
                    );
                    s.runs.push((program::FROM_WIRE, ret2));
                    report.test_runs += 1;
                    s.want2
                        .check(ret2, decapsulated, &s.out2[..n2], TC_ACT_OK, TC_ACT_SHOT)
                        .map_err(|e| format!("tc after XDP: {e}"))?;
                    *report
                        .model
                        .entry(if ret2 == TC_ACT_REDIRECT {
                            "delivered after xdp decapsulation"
                        } else {
                            "to the stack after xdp decapsulation"
                        })
                        .or_default() += 1;
                }
            }
            Kind::Egress(model) => {
                let plan = model.plan(input, meta, &mut s.want);
                let (ret, n) = run_tc(&target.dp, self.prog, input, meta, &mut s.out);
                (s.ret, s.out_len) = (ret, n);
                s.runs.push((self.program, ret));
                let out = &s.out[..n];
                model.settle(&plan, input, ret, out, &mut s.want, &target.dp)?;
                nat_checksums(input, ret, out, report)?;
            }
            Kind::Ingress(node, model) => {
                node.want_tc(input, meta, &mut s.want, Some(model));
                let (ret, n) = run_tc(&target.dp, self.prog, input, meta, &mut s.out);
                (s.ret, s.out_len) = (ret, n);
                s.runs.push((self.program, ret));
                let out = &s.out[..n];
                s.want.check(ret, input, out, TC_ACT_OK, TC_ACT_SHOT)?;
                if s.want.label == "reverse masquerade" || s.want.label.starts_with("icmp error") {
                    nat_checksums(input, ret, out, report)?;
                }
            }
        }
        *report.model.entry(s.want.label).or_default() += 1;
        *report
            .returns
            .entry(ret_name(self.program == program::FROM_WIRE_XDP, s.ret))
            .or_default() += 1;
        Ok(())
    }
}

/// Observations on `from_wire`'s deliveries the oracle allows but the report shows.
fn observe(class: Class, f: &[u8], ret: i32, report: &mut Report) {
    if ret == TC_ACT_SHOT {
        return;
    }
    match class {
        Class::Decap(inner) => {
            if !sum_ok(&f[14..34]) {
                *report
                    .model
                    .entry("observed: decapsulated with a bad outer IPv4 checksum")
                    .or_default() += 1;
            }
            if f[inner] != 0x45 && !ip_header_ok(f, inner) {
                *report
                    .model
                    .entry("observed: inner header with options and a bad checksum delivered")
                    .or_default() += 1;
            }
        }
        Class::Local => {
            if usize::from(be16(f, 16)) != f.len() - 14 {
                *report
                    .model
                    .entry("observed: plain packet delivered with a total length not the frame's")
                    .or_default() += 1;
            }
            if f[14] != 0x45 && !ip_header_ok(f, 14) {
                *report
                    .model
                    .entry("observed: plain header with options and a bad checksum delivered")
                    .or_default() += 1;
            }
        }
        _ => {}
    }
}

/// A translated packet keeps valid IPv4 and L4 (ICMP) checksums when it came with them.
fn nat_checksums(input: &[u8], ret: i32, out: &[u8], report: &mut Report) -> Result<(), String> {
    if ret != TC_ACT_OK || out == input || input.len() < 34 {
        return Ok(());
    }
    if ip_header_ok(input, 14) && !ip_header_ok(out, 14) {
        return Err("translated: IPv4 checksum no longer valid".into());
    }
    if packet_ok(input, 14) {
        if !packet_ok(out, 14) {
            return Err("translated: L4 checksum no longer valid".into());
        }
        *report
            .model
            .entry("translated, checksums valid before and after")
            .or_default() += 1;
    }
    Ok(())
}

/// Runs `packets` packets through a family; panics at the first disagreement.
fn run_family(name: &'static str, packets: u64, seed: u64, stop: &AtomicBool) -> Report {
    let started = Instant::now();
    let mut rng = Rng(seed | 1);
    let mut fam = family(name, &mut rng);
    let xdp = fam.program == program::FROM_WIRE_XDP;
    let mut report = Report {
        name,
        program: fam.prog,
        ..Report::default()
    };
    let mut s = Scratch {
        pkt: Pkt::default(),
        out: vec![0; 8192],
        out2: vec![0; 8192],
        want: Want::default(),
        want2: Want::default(),
        runs: Vec::with_capacity(2),
        ret: 0,
        out_len: 0,
        vxlan_ports: HashMap::new(),
    };
    let targets = fam.targets.len();
    for i in 0..packets {
        if i % 1024 == 0 && stop.load(Ordering::Relaxed) {
            break;
        }
        if i > 0 && i % AGE_EVERY == 0 {
            fam.age_nat();
        }
        let t = (i % targets as u64) as usize;
        let seed_pkt = &fam.seeds[t][rng.below(fam.seeds[t].len())];
        s.pkt.set(seed_pkt);
        if !rng.chance(25) {
            mutate(&mut rng, &mut s.pkt, !xdp);
        }
        if !xdp {
            // An EtherType mutated after a cut: padded to what the test run takes.
            let min = tc_min_len(&s.pkt.b);
            if s.pkt.b.len() < min {
                s.pkt.b.resize(min, 0);
            }
        }
        let meta = if xdp {
            Meta::default()
        } else {
            Meta::random(&mut rng)
        };
        s.runs.clear();
        let fail = |s: &Scratch, why: &str| -> ! {
            panic!(
                "{name}, packet {i} (target {t}): {why}\n  input  {}\n  {meta:?}\n  output {}",
                hex(&s.pkt.b),
                hex(&s.out[..s.out_len])
            )
        };
        if let Err(why) = fam.step(t, &meta, &mut s, &mut report) {
            fail(&s, &why);
        }
        report.packets += 1;
        report.test_runs += 1;
        let target = &mut fam.targets[t];
        for &(p, _) in &s.runs {
            target.runs[p as usize] += 1;
        }
        if i < EXACT {
            let single = target
                .check()
                .unwrap_or_else(|why| fail(&s, &format!("counters: {why}")));
            for &(p, ret) in &s.runs {
                let r = single[p as usize].unwrap_or_else(|| fail(&s, "no single reason counted"));
                let dropped = ret
                    == if p == program::FROM_WIRE_XDP {
                        XDP_DROP
                    } else {
                        TC_ACT_SHOT
                    };
                if reason::is_drop(r) != dropped {
                    fail(
                        &s,
                        &format!(
                            "{} counted {} for return value {ret}",
                            program_name(p as usize),
                            reason_name(r as usize)
                        ),
                    );
                }
            }
        } else if (i + 1) % BATCH == 0 {
            for target in &mut fam.targets {
                if let Err(why) = target.check() {
                    panic!("{name}, batch ending at packet {i}: counters: {why}");
                }
            }
        }
    }
    for target in &mut fam.targets {
        if let Err(why) = target.check() {
            panic!("{name}, last batch: counters: {why}");
        }
        let now = target.stats.read();
        for (i, (&a, &b)) in now.iter().zip(&target.start).enumerate() {
            if a > b {
                let (p, r) = (i / REASONS, i % REASONS);
                *report
                    .verdicts
                    .entry(format!("{}/{}", program_name(p), reason_name(r)))
                    .or_default() += a - b;
            }
        }
    }
    if let Kind::Egress(model) = &fam.kind {
        report
            .model
            .insert("flows made", model.flows.len() as u64 + model.takeovers);
        report
            .model
            .insert("ports taken over from finished flows", model.takeovers);
        report
            .model
            .insert("clock jumps of 31 s", model.clock_jumps);
    }
    report.wall = started.elapsed();
    report
}

const FAMILIES: [&str; 12] = [
    "from_pods/vxlan",
    "from_pods/ipip",
    "from_pods/udp",
    "from_pods/host-gw",
    "from_host",
    "from_wire/vxlan",
    "from_wire/ipip",
    "from_wire/udp",
    "from_wire/host-gw",
    "from_wire_xdp",
    "to_wire/masquerade",
    "from_wire/masquerade",
];

/// Sets the stop flag if its thread unwinds, so the other workers end early.
struct StopOnPanic<'a>(&'a AtomicBool);

impl Drop for StopOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(true, Ordering::Relaxed);
        }
    }
}

fn json_report(reports: &[Report], wall: Duration, per_program: u64) -> serde_json::Value {
    let families: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            serde_json::json!({
                "name": r.name,
                "program": r.program,
                "packets": r.packets,
                "test_runs": r.test_runs,
                "wall_s": r.wall.as_secs_f64(),
                "verdicts": r.verdicts,
                "return_codes": r.returns,
                "model": r.model,
            })
        })
        .collect();
    let mut per_prog: BTreeMap<&str, u64> = BTreeMap::new();
    for r in reports {
        *per_prog.entry(r.program).or_default() += r.packets;
    }
    serde_json::json!({
        "packets_per_program_target": per_program,
        "packets_per_program": per_prog,
        "packets": reports.iter().map(|r| r.packets).sum::<u64>(),
        "wall_s": wall.as_secs_f64(),
        "families": families,
    })
}

#[test]
fn fuzz_every_program_against_the_reference_model() {
    let per_program: u64 = std::env::var("FLANNEL_FUZZ_PACKETS")
        .ok()
        .map_or(1_000_000, |v| {
            v.parse().expect("FLANNEL_FUZZ_PACKETS: a number")
        });
    let started = Instant::now();
    let queue: Mutex<VecDeque<(usize, &'static str)>> =
        Mutex::new(FAMILIES.iter().copied().enumerate().collect());
    let reports: Mutex<Vec<Report>> = Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    let workers = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(FAMILIES.len());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let _guard = StopOnPanic(&stop);
                loop {
                    let Some((i, name)) = queue.lock().unwrap().pop_front() else {
                        break;
                    };
                    let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1);
                    let report = run_family(name, per_program, seed, &stop);
                    eprintln!(
                        "fuzz: {name}: {} packets in {:.1} s",
                        report.packets,
                        report.wall.as_secs_f64()
                    );
                    reports.lock().unwrap().push(report);
                }
            });
        }
    });
    let wall = started.elapsed();
    let mut reports = reports.into_inner().unwrap();
    reports.sort_by_key(|r| FAMILIES.iter().position(|f| *f == r.name));
    for r in &reports {
        println!(
            "{}: {} packets, {} test runs, {:.1} s",
            r.name,
            r.packets,
            r.test_runs,
            r.wall.as_secs_f64()
        );
        let verdicts: Vec<String> = r.verdicts.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  verdicts: {}", verdicts.join(", "));
        let rets: Vec<String> = r.returns.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  return values: {}", rets.join(", "));
        let model: Vec<String> = r.model.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  model: {}", model.join(", "));
    }
    let total: u64 = reports.iter().map(|r| r.packets).sum();
    println!("fuzzed {total} packets in {:.1} s", wall.as_secs_f64());
    if let Ok(path) = std::env::var("FLANNEL_FUZZ_REPORT") {
        let json = json_report(&reports, wall, per_program);
        std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap())
            .unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    assert_eq!(reports.len(), FAMILIES.len(), "every family ran");
    for r in &reports {
        assert_eq!(r.packets, per_program, "{}: every packet ran", r.name);
    }
}
