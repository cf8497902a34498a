//! Masquerade: flanneld's `FLANNEL-POSTRTG` rules in BPF, with their state in `FLANNEL_NAT`.
//!
//! A pod's packet leaving the Network through the uplink gets the node's address and a port of
//! the masquerade range as its source ([`snat`], at the uplink's egress); replies get the pod's
//! address and port back before the stack sees them ([`reverse`], at the uplink's ingress). A
//! flow is two entries of `FLANNEL_NAT` (original and reply direction); the reply entry is made
//! first, with `BPF_NOEXIST`, which is what makes a port unique per remote endpoint. ICMP echo
//! uses its identifier as the port; ICMP errors about a masqueraded flow are rewritten outer and
//! embedded headers alike, both ways. The agent expires and collects entries.
//!
//! Checksums: the IPv4 header checksum and everything inside an ICMP message are updated in
//! place (RFC 1624); TCP and UDP checksums too where the skb's checksum state is known, and
//! otherwise with one `bpf_l4_csum_replace` call, which also handles the pseudo-header of a
//! `CHECKSUM_PARTIAL` skb (pods' offloaded checksums, GSO): see [`l4_checksum`].
use aya_ebpf::{
    bindings::{BPF_EXIST, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK},
    helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns},
    programs::TcContext,
};
use flannel_ebpf_common::{Clock, NatEntry, NatKey, NodeConfig, nat, reason};
use network_types::ip::Ipv4Hdr;

use crate::{
    csum, fib,
    maps::{FLANNEL_CLOCK, FLANNEL_NAT},
    parse::{
        ETH_HLEN, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, in_subnet, ipv4_at, is_fragment, ptr_at,
    },
};

pub const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
/// `-EEXIST`: the key is taken (a port in use for this remote endpoint).
const EEXIST: i32 = -17;
/// Bytes an ICMP error's translation reads past its ICMP header: the quoted IPv4 header with
/// options and 20 bytes of its L4 header.
const ICMP_ERROR_LEN: usize = 8 + 60 + 20;
/// Bytes of a TCP/UDP/ICMP echo header a translation reads.
const L4_LEN: usize = 20;

/// Offsets of the fields a translation touches, relative to the L4 header.
const PORTS_OFF: usize = 0;
const ICMP_CSUM_OFF: usize = 2;
const ICMP_ID_OFF: usize = 4;
const UDP_CSUM_OFF: usize = 6;
const TCP_FLAGS_OFF: usize = 13;
const TCP_CSUM_OFF: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Makes the first `len` bytes (or the whole packet, if shorter) directly accessible. Only
/// called for what a decision needs, so that packets that are not translated (encapsulated pod
/// traffic, the node's own) are never pulled: a pull of a cloned skb copies its head.
#[inline(always)]
fn pull(ctx: &TcContext, len: usize) {
    let len = len as u32;
    let want = if ctx.len() < len { ctx.len() } else { len };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        let _ = ctx.pull_data(want);
    }
}

/// Pulls what a translation of a `proto` packet with its L4 header at `l4` reads.
#[inline(always)]
fn pull_l4(ctx: &TcContext, l4: usize, proto: u8, error: bool) {
    pull(
        ctx,
        l4 + if proto == IPPROTO_ICMP && error {
            ICMP_ERROR_LEN
        } else {
            L4_LEN
        },
    );
}

/// The L4 header's offset behind an IPv4 header.
#[inline(always)]
fn l4_offset(ip_off: usize, ip: *const Ipv4Hdr) -> usize {
    // SAFETY: `ip` came from `ptr_at`.
    ip_off + usize::from(unsafe { (*ip).vihl } & 0x0f) * 4
}

/// A flow's two "ports": TCP and UDP ports, or for ICMP echo the identifier on the side of the
/// one who asked (a request's `sport`, a reply's `dport`).
#[inline(always)]
fn ports(ctx: &TcContext, proto: u8, l4: usize) -> Result<Option<([u8; 2], [u8; 2])>, u32> {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let p = ptr_at::<[[u8; 2]; 2]>(ctx, l4 + PORTS_OFF)?;
            // SAFETY: bounds checked by `ptr_at`.
            let p = unsafe { *p };
            Ok(Some((p[0], p[1])))
        }
        IPPROTO_ICMP => {
            let h = ptr_at::<[u8; 6]>(ctx, l4)?;
            // SAFETY: bounds checked by `ptr_at`.
            let h = unsafe { *h };
            let id = [h[4], h[5]];
            Ok(match h[0] {
                ICMP_ECHO => Some((id, [0; 2])),
                ICMP_ECHO_REPLY => Some(([0; 2], id)),
                _ => None,
            })
        }
        _ => Ok(None),
    }
}

/// `CLOCK_MONOTONIC`, coarse: entry times need no more than a tick's precision, and the coarse
/// clock is a memory read where the fine one reads the clock source on every packet. Read
/// through this CPU's `FLANNEL_CLOCK`, once per tick: `bpf_jiffies64` is inlined, the clock
/// helper is a call. Between a tick's jiffies and clock updates a CPU may keep the previous
/// tick's time for one more tick: flows' times stay within a tick or two.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: helpers without arguments.
    let (tick, read) = (unsafe { bpf_jiffies64() }, || unsafe {
        bpf_ktime_get_coarse_ns()
    });
    let Some(clock) = FLANNEL_CLOCK.get_ptr_mut(0) else {
        return read();
    };
    // SAFETY: this CPU's entry, from a successful lookup; only this CPU's programs write it. A
    // program nested in another on this CPU (softirq over process context) can at worst read
    // the new tick with the previous tick's time.
    unsafe {
        if (*clock).jiffies == tick {
            return (*clock).ns;
        }
        let t = read();
        *clock = Clock {
            jiffies: tick,
            ns: t,
        };
        t
    }
}

/// Refreshes an entry's time (at most once per [`nat::TOUCH_NS`]) and flags.
#[inline(always)]
fn touch(entry: *mut NatEntry, flags: u8) {
    let t = now();
    // SAFETY: the pointer came from a successful map lookup; a racing writer can only store an
    // equally valid time or flag set.
    unsafe {
        if t.wrapping_sub((*entry).last_seen) > nat::TOUCH_NS {
            (*entry).last_seen = t;
        }
        if (*entry).flags & flags != flags {
            (*entry).flags |= flags;
        }
    }
}

/// TCP flags that change a flow's expiry.
#[inline(always)]
fn tcp_state(ctx: &TcContext, proto: u8, l4: usize) -> u8 {
    if proto != IPPROTO_TCP {
        return 0;
    }
    // Two bytes: the verifier cannot bound a one-byte read at a variable offset, as LLVM
    // compiles its check.
    let Ok(f) = ptr_at::<[u8; 2]>(ctx, l4 + TCP_FLAGS_OFF - 1) else {
        return 0;
    };
    // SAFETY: bounds checked by `ptr_at`.
    let f = unsafe { (*f)[1] };
    let mut state = 0;
    if f & TCP_FIN != 0 {
        state |= nat::CLOSING;
    }
    if f & TCP_RST != 0 {
        state |= nat::RESET;
    }
    state
}

/// A start for the port search: random (`--random-fully`) or a hash of the flow.
#[inline(always)]
fn port_seed(cfg: &NodeConfig, key: &NatKey) -> u32 {
    if cfg.nat_flags & nat::FULLY_RANDOM != 0 {
        // SAFETY: a helper without arguments.
        return unsafe { bpf_get_prandom_u32() };
    }
    let mut h = u32::from_ne_bytes(key.src) ^ u32::from_ne_bytes(key.dst).rotate_left(7);
    h ^= u32::from(u16::from_ne_bytes(key.sport)) << 16 | u32::from(u16::from_ne_bytes(key.dport));
    h ^= u32::from(key.proto);
    h = h.wrapping_mul(0x9e37_79b1);
    h ^ (h >> 15)
}

/// Gives the port of the flow whose reply key `reply` is to a new flow (writing `back` in its
/// place) if that flow is over: a TCP flow reset, or closed by a FIN each way longer than the
/// remote end's TIME_WAIT ([`nat::TIME_WAIT_NS`]), or any other flow idle for
/// [`nat::REUSE_IDLE_NS`] (Linux's unreplied and single-exchange UDP timeout); otherwise a
/// closed connection would hold its port until the collector's 120 s. The node's own ports are
/// never taken.
#[inline(always)]
fn take_over(reply: &NatKey, back: &NatEntry, now: u64) -> bool {
    let Some(old) = FLANNEL_NAT.get_ptr(reply) else {
        return false;
    };
    // SAFETY: the pointer came from a successful lookup; the fields are copied at once.
    let (flags, last_seen, addr, port) =
        unsafe { ((*old).flags, (*old).last_seen, (*old).addr, (*old).port) };
    if flags & nat::HOST != 0 {
        return false;
    }
    let original = NatKey::new(addr, reply.src, port, reply.sport, reply.proto, nat::EGRESS);
    // Idle since the newer of the two directions' last packets (as the agent's collector
    // measures it): a one-way flow that is still sending refreshes only its original entry.
    // Without an original entry (a race, or a restart mid-way), TCP counts as closing.
    // SAFETY: as above.
    let (out_flags, out_seen) = FLANNEL_NAT
        .get_ptr(&original)
        .map_or((nat::CLOSING, 0), |o| unsafe {
            ((*o).flags, (*o).last_seen)
        });
    let idle = now.saturating_sub(last_seen.max(out_seen));
    let over = if reply.proto == IPPROTO_TCP {
        // Both directions' TCP state: a reset either way, or a FIN each way.
        (flags | out_flags) & nat::RESET != 0
            || (flags & out_flags & nat::CLOSING != 0 && idle >= nat::TIME_WAIT_NS)
            || (flags & nat::SEEN_REPLY == 0 && idle >= nat::REUSE_IDLE_NS)
    } else {
        idle >= nat::REUSE_IDLE_NS
    };
    if !over {
        return false;
    }
    // The old flow's original direction goes first, so that its late packets start a new flow
    // instead of being translated to the port it no longer owns.
    let _ = FLANNEL_NAT.remove(&original);
    FLANNEL_NAT
        .insert(reply, back, u64::from(BPF_EXIST))
        .is_ok()
}

/// The allocated port of a flow, creating the flow (both entries) if it is new.
#[inline(always)]
fn flow_port(cfg: &NodeConfig, key: &NatKey, flags: u8) -> Result<[u8; 2], u32> {
    if let Some(entry) = FLANNEL_NAT.get_ptr_mut(key) {
        touch(entry, flags);
        // SAFETY: as in `touch`.
        return Ok(unsafe { (*entry).port });
    }
    let (min, max) = (u32::from(cfg.nat_port_min), u32::from(cfg.nat_port_max));
    if max < min {
        return Err(reason::DROP_NAT_NO_PORT);
    }
    let span = max - min + 1;
    let seed = port_seed(cfg, key) % span;
    let t = now();
    let back = NatEntry {
        last_seen: t,
        addr: key.src,
        port: key.sport,
        flags: 0,
        _pad0: 0,
    };
    let mut reply = key.reply(cfg.masq_ip, [0; 2]);
    let mut port = None;
    for i in 0..nat::PORT_TRIES {
        let p = min + (seed + i) % span;
        if p == u32::from(cfg.port) {
            // The backend's own port (VXLAN's 8472, udp's 8285): replies to it would be taken
            // for tunnel traffic.
            continue;
        }
        reply.dport = (p as u16).to_be_bytes();
        match FLANNEL_NAT.insert(&reply, &back, u64::from(BPF_NOEXIST)) {
            Ok(()) => {
                port = Some(reply.dport);
                break;
            }
            Err(EEXIST) if take_over(&reply, &back, t) => {
                port = Some(reply.dport);
                break;
            }
            Err(EEXIST) => {}
            Err(_) => return Err(reason::DROP_NAT_TABLE_FULL),
        }
    }
    let port = port.ok_or(reason::DROP_NAT_NO_PORT)?;
    let out = NatEntry {
        last_seen: t,
        addr: cfg.masq_ip,
        port,
        flags,
        _pad0: 0,
    };
    match FLANNEL_NAT.insert(key, &out, u64::from(BPF_NOEXIST)) {
        Ok(()) => Ok(port),
        Err(e) => {
            let _ = FLANNEL_NAT.remove(&reply);
            if e != EEXIST {
                return Err(reason::DROP_NAT_TABLE_FULL);
            }
            // Another CPU created the flow at the same time: use its port.
            let entry = FLANNEL_NAT
                .get_ptr(key)
                .ok_or(reason::DROP_NAT_TABLE_FULL)?;
            // SAFETY: the pointer came from a successful lookup.
            Ok(unsafe { (*entry).port })
        }
    }
}

/// Rewrites a 4-byte field and patches `check` (an IPv4 or ICMP checksum) for it.
#[inline(always)]
fn set_addr(field: *mut [u8; 4], check: *mut [u8; 2], new: [u8; 4]) {
    // SAFETY: both pointers came from `ptr_at`.
    unsafe {
        let old = *field;
        *check = csum::replace32(*check, old, new);
        *field = new;
    }
}

/// Rewrites a 2-byte field and patches `check` for it.
#[inline(always)]
fn set_port(field: *mut [u8; 2], check: *mut [u8; 2], new: [u8; 2]) {
    // SAFETY: both pointers came from `ptr_at`.
    unsafe {
        let old = *field;
        *check = csum::replace16(*check, u16::from_be_bytes(old), u16::from_be_bytes(new));
        *field = new;
    }
}

/// Which end of a packet a translation rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

impl End {
    /// Offset of the address in an IPv4 header.
    #[inline(always)]
    fn addr_off(self) -> usize {
        match self {
            Self::Source => 12,
            Self::Destination => 16,
        }
    }
    /// Offset of the port in a TCP/UDP header.
    #[inline(always)]
    fn port_off(self) -> usize {
        match self {
            Self::Source => 0,
            Self::Destination => 2,
        }
    }
}

/// Rewrites `end`'s address and port of a TCP, UDP or ICMP echo packet whose IPv4 header is at
/// `ETH_HLEN` and L4 header at `l4`. Must be the last packet access of the program (the checksum
/// helpers invalidate packet pointers).
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    proto: u8,
    l4: usize,
    end: End,
    addr: [u8; 4],
    port: [u8; 2],
) -> Result<(), u32> {
    let ip_check = ptr_at::<[u8; 2]>(ctx, ETH_HLEN + 10)?;
    let ip_addr = ptr_at::<[u8; 4]>(ctx, ETH_HLEN + end.addr_off())?;
    // SAFETY: bounds checked by `ptr_at`.
    let old_addr = unsafe { *ip_addr };
    set_addr(ip_addr, ip_check, addr);
    if proto == IPPROTO_ICMP {
        // Echo: the identifier; ICMP's checksum has no pseudo-header.
        let id = ptr_at::<[u8; 2]>(ctx, l4 + ICMP_ID_OFF)?;
        let check = ptr_at::<[u8; 2]>(ctx, l4 + ICMP_CSUM_OFF)?;
        set_port(id, check, port);
        return Ok(());
    }
    let field = ptr_at::<[u8; 2]>(ctx, l4 + end.port_off())?;
    // SAFETY: bounds checked by `ptr_at`.
    let old_port = unsafe { *field };
    // SAFETY: as above.
    unsafe { *field = port };
    l4_checksum(ctx, proto, l4, end, (old_addr, addr), (old_port, port))
}

/// Updates a TCP or UDP checksum for a translation's new address (which the pseudo-header
/// covers) and port. How depends on the skb's `ip_summed`, which a tc program cannot read: a
/// complete checksum (`CHECKSUM_NONE`, `_UNNECESSARY`, `_COMPLETE`) changes by both differences;
/// a partial one (`CHECKSUM_PARTIAL`: the field holds the pseudo-header's sum and the device or
/// `skb_checksum_help` adds the rest, port included) by the address's only, the other way round.
/// `bpf_l4_csum_replace` knows, but each call costs ~60 ns here, so:
/// - A source rewritten at the egress (the pods' packets, forwarded or redirected, so never
///   `CHECKSUM_COMPLETE`: forwarding turns that into `_NONE`) whose field is not the
///   pseudo-header's sum cannot be partial (a partial field is that sum, or the device's result
///   would be wrong anyway), and is updated here without a helper. GSO packets, always partial,
///   are left to the helper.
/// - Otherwise the helper updates the address (and `skb->csum` of a `CHECKSUM_COMPLETE` skb),
///   and its result, which moves the field one way if partial and the other way if complete,
///   tells which it was: the port is then updated here (complete) or not at all (partial). Only
///   if the address's difference is its own opposite (`2d ≡ 0`) does the port take a second
///   helper call.
///
/// Must be the last packet access of the program (the helper invalidates packet pointers).
#[inline(always)]
fn l4_checksum(
    ctx: &TcContext,
    proto: u8,
    l4: usize,
    end: End,
    (old_addr, addr): ([u8; 4], [u8; 4]),
    (old_port, port): ([u8; 2], [u8; 2]),
) -> Result<(), u32> {
    let udp = proto == IPPROTO_UDP;
    let csum_off = l4 + if udp { UDP_CSUM_OFF } else { TCP_CSUM_OFF };
    let check = ptr_at::<[u8; 2]>(ctx, csum_off)?;
    // SAFETY: bounds checked by `ptr_at`.
    let before = unsafe { *check };
    if udp && before == [0; 2] {
        // No UDP checksum (never a partial one: the pseudo-header's sum is not zero).
        return Ok(());
    }
    let (from_port, to_port) = (u16::from_be_bytes(old_port), u16::from_be_bytes(port));
    // The complete checksum's update, and the port's update of a complete checksum `c`.
    let complete = csum::replace32(before, old_addr, addr);
    let with_port = |c: [u8; 2]| {
        let c = csum::replace16(c, from_port, to_port);
        // A UDP checksum that comes out zero is sent as all ones (zero means none).
        if udp && c == [0; 2] { [0xff; 2] } else { c }
    };
    if end == End::Source {
        let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds checked by `ptr_at`; the program's own context.
        let (tot_len, dst, gso_size) =
            unsafe { ((*ip).tot_len, (*ip).dst_addr, (*ctx.skb.skb).gso_size) };
        let l4_len = u16::from_be_bytes(tot_len).wrapping_sub((l4 - ETH_HLEN) as u16);
        let pseudo = csum::pseudo_header(old_addr, dst, proto, l4_len);
        if gso_size == 0 && !csum::same16(u16::from_be_bytes(before), pseudo) {
            // SAFETY: bounds checked by `ptr_at`.
            unsafe { *check = with_port(complete) };
            return Ok(());
        }
    }
    let mangled = if udp {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    ctx.l4_csum_replace(
        csum_off,
        u64::from(u32::from_ne_bytes(old_addr)),
        u64::from(u32::from_ne_bytes(addr)),
        u64::from(BPF_F_PSEUDO_HDR) | mangled | 4,
    )
    .map_err(|_| reason::DROP_TRUNCATED)?;
    let check = ptr_at::<[u8; 2]>(ctx, csum_off)?;
    // SAFETY: bounds checked by `ptr_at` (after the helper moved the packet's pointers).
    let after = u16::from_be_bytes(unsafe { *check });
    // A partial field is a plain sum: it moves by the address's difference the other way, which
    // is the complete update applied to its complement.
    let partial = !u16::from_be_bytes(csum::replace32(
        (!u16::from_be_bytes(before)).to_be_bytes(),
        old_addr,
        addr,
    ));
    let complete = u16::from_be_bytes(complete);
    let (was_complete, was_partial) = (csum::same16(after, complete), csum::same16(after, partial));
    if was_complete && !was_partial {
        // SAFETY: as above.
        unsafe { *check = with_port(after.to_be_bytes()) };
        return Ok(());
    }
    if was_partial && !was_complete {
        return Ok(());
    }
    ctx.l4_csum_replace(
        csum_off,
        u64::from(u16::from_ne_bytes(old_port)),
        u64::from(u16::from_ne_bytes(port)),
        mangled | 2,
    )
    .map_err(|_| reason::DROP_TRUNCATED)
}

/// Source NAT at the uplink's egress (flanneld's `FLANNEL-POSTRTG`, in its order): a pod's
/// packet leaving the Network gets the node's address and a port of the range; everything else
/// passes. The node's own flows on ports of the range are claimed so pods never get them.
#[inline(always)]
pub fn snat(ctx: &TcContext, cfg: &NodeConfig) -> Result<(i32, u32), u32> {
    if cfg.masq_ip == [0; 4] {
        return Ok((TC_ACT_OK, reason::PASS_NO_MASQ));
    }
    pull(ctx, ETH_HLEN + IPV4_HLEN);
    let eth = crate::parse::eth(ctx)?;
    if !crate::parse::is_ipv4(eth) {
        return Ok((TC_ACT_OK, reason::PASS_NOT_IPV4));
    }
    let ip = ipv4_at(ctx, ETH_HLEN)?;
    // SAFETY: `ip` came from `ptr_at`.
    let (proto, src, dst) = unsafe { ((*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
    let in_cluster = |a: [u8; 4]| in_subnet(a, cfg.network_addr, cfg.network_mask);
    if src == cfg.masq_ip {
        return claim_host_port(ctx, cfg, ip, proto, src, dst);
    }
    // SAFETY: the program's own context.
    let mark = unsafe { (*ctx.skb.skb).mark };
    // 1. kube-proxy's mark; 2.–4. inside the Network; 5. not to multicast.
    if !in_cluster(src)
        || mark & nat::KUBE_MASQ_MARK != 0
        || in_cluster(dst)
        || dst[0] & 0xf0 == 224
    {
        return Ok((TC_ACT_OK, reason::PASS_NO_MASQ));
    }
    if is_fragment(ip) {
        return Err(reason::DROP_NAT_FRAGMENT);
    }
    let l4 = l4_offset(ETH_HLEN, ip);
    pull_l4(ctx, l4, proto, true);
    if proto == IPPROTO_ICMP && icmp_is_error(ctx, l4)? {
        return icmp_error(ctx, cfg, l4, End::Source);
    }
    let Some((sport, dport)) = ports(ctx, proto, l4)? else {
        return Err(reason::DROP_NAT_PROTO);
    };
    if proto == IPPROTO_ICMP && sport == [0; 2] && dport != [0; 2] {
        // An echo reply of the pod's: no flow of ours (only requests start one).
        return Err(reason::DROP_NAT_PROTO);
    }
    let key = NatKey::new(src, dst, sport, dport, proto, nat::EGRESS);
    let port = flow_port(cfg, &key, tcp_state(ctx, proto, l4))?;
    rewrite(ctx, proto, l4, End::Source, cfg.masq_ip, port)?;
    Ok((TC_ACT_OK, reason::NAT_SNAT))
}

/// A pod's UDP packet at its veth (`from_pod_veth`, leaving the Network): if its flow is already
/// masqueraded, it is forwarded straight to the uplink, where [`snat`] translates it as before,
/// skipping `cni0`, routing and netfilter. The flow's original entry is the proof that the
/// kernel forwarded this very tuple out of the uplink untouched by DNAT, by kube-proxy's mark or
/// by a FORWARD rule (`snat` keys it on the tuple as it leaves, so a DNATed flow's packets, which
/// the pod addresses to the original destination, never find one); the route is asked of the
/// kernel's FIB for each packet. UDP only: the kernel's conntrack then misses the original
/// direction's later packets, which UDP tracking does not mind, while TCP window tracking would
/// mark the replies INVALID (DEVELOPERS.md, "Masquerade"). `None`: the stack forwards it.
#[inline(always)]
pub fn forward_established(ctx: &TcContext, cfg: &NodeConfig) -> Result<Option<i32>, u32> {
    if cfg.masq_ip == [0; 4] {
        return Ok(None);
    }
    let ip = ipv4_at(ctx, ETH_HLEN)?;
    // SAFETY: `ip` came from `ptr_at`.
    let (proto, src, dst) = unsafe { ((*ip).proto, (*ip).src_addr, (*ip).dst_addr) };
    if proto != IPPROTO_UDP
        || !in_subnet(src, cfg.subnet_addr, cfg.subnet_mask)
        || dst[0] >= 224
        || is_fragment(ip)
    {
        return Ok(None);
    }
    // A UDP header outside the linear data: the stack (and `snat`, which pulls it) takes it.
    let Ok(Some((sport, dport))) = ports(ctx, proto, l4_offset(ETH_HLEN, ip)) else {
        return Ok(None);
    };
    let key = NatKey::new(src, dst, sport, dport, proto, nat::EGRESS);
    if FLANNEL_NAT.get_ptr(&key).is_none() {
        return Ok(None);
    }
    fib::forward_through(ctx, ip, (sport, dport), cfg.cni_ifindex, cfg.uplink_ifindex)
}

/// The node's own packet from the masquerade address: a port of the range it uses is claimed
/// (a reply-direction entry flagged [`nat::HOST`]) so that no pod flow is given it.
#[inline(always)]
fn claim_host_port(
    ctx: &TcContext,
    cfg: &NodeConfig,
    ip: *const Ipv4Hdr,
    proto: u8,
    src: [u8; 4],
    dst: [u8; 4],
) -> Result<(i32, u32), u32> {
    if is_fragment(ip) {
        return Ok((TC_ACT_OK, reason::PASS_NO_MASQ));
    }
    let l4 = l4_offset(ETH_HLEN, ip);
    pull(ctx, l4 + 8);
    let Ok(Some((sport, dport))) = ports(ctx, proto, l4) else {
        return Ok((TC_ACT_OK, reason::PASS_NO_MASQ));
    };
    let port = u16::from_be_bytes(sport);
    if port < cfg.nat_port_min || port > cfg.nat_port_max {
        return Ok((TC_ACT_OK, reason::PASS_NO_MASQ));
    }
    let key = NatKey::new(dst, src, dport, sport, proto, nat::INGRESS);
    if let Some(entry) = FLANNEL_NAT.get_ptr_mut(&key) {
        // SAFETY: the pointer came from a successful lookup.
        if unsafe { (*entry).flags } & nat::HOST == 0 {
            return Ok((TC_ACT_OK, reason::NAT_HOST_COLLISION));
        }
        touch(entry, 0);
        return Ok((TC_ACT_OK, reason::PASS_NAT_HOST));
    }
    let claim = NatEntry {
        last_seen: now(),
        addr: src,
        port: sport,
        flags: nat::HOST,
        _pad0: 0,
    };
    // Best effort: a full table only means this port is not claimed.
    let _ = FLANNEL_NAT.insert(&key, &claim, u64::from(BPF_NOEXIST));
    Ok((TC_ACT_OK, reason::PASS_NAT_HOST))
}

#[inline(always)]
fn icmp_is_error(ctx: &TcContext, l4: usize) -> Result<bool, u32> {
    // Type and code: see `tcp_state` on one-byte reads.
    let t = ptr_at::<[u8; 2]>(ctx, l4)?;
    // SAFETY: bounds checked by `ptr_at`.
    let t = unsafe { (*t)[0] };
    Ok(t == ICMP_DEST_UNREACH || t == ICMP_TIME_EXCEEDED)
}

/// Reverse translation at the uplink's ingress, for a packet addressed to the masquerade
/// address: a reply of a masqueraded flow gets its pod's address and port back; an ICMP error
/// about one is rewritten inside and out. `None`: not ours, the stack takes it as it is.
#[inline(always)]
pub fn reverse(ctx: &TcContext, cfg: &NodeConfig) -> Result<Option<u32>, u32> {
    let Ok(ip) = ipv4_at(ctx, ETH_HLEN) else {
        return Ok(None);
    };
    // SAFETY: `ip` came from `ptr_at`.
    let (proto, dst) = unsafe { ((*ip).proto, (*ip).dst_addr) };
    if dst != cfg.masq_ip || is_fragment(ip) {
        return Ok(None);
    }
    let l4 = l4_offset(ETH_HLEN, ip);
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Ok(None);
    }
    pull_l4(ctx, l4, proto, true);
    let Ok(ip) = ipv4_at(ctx, ETH_HLEN) else {
        return Ok(None);
    };
    // SAFETY: `ip` came from `ptr_at` (after the pull moved the packet).
    let src = unsafe { (*ip).src_addr };
    if proto == IPPROTO_ICMP && icmp_is_error(ctx, l4).unwrap_or(false) {
        return match icmp_error(ctx, cfg, l4, End::Destination) {
            Ok((_, why)) => Ok(Some(why)),
            // Not about a flow of ours (or unreadable): the node's own business.
            Err(_) => Ok(None),
        };
    }
    let Ok(Some((sport, dport))) = ports(ctx, proto, l4) else {
        return Ok(None);
    };
    let key = NatKey::new(src, dst, sport, dport, proto, nat::INGRESS);
    let Some(entry) = FLANNEL_NAT.get_ptr_mut(&key) else {
        return Ok(None);
    };
    // SAFETY: the pointer came from a successful lookup; the fields are copied at once.
    let (flags, addr, port) = unsafe { ((*entry).flags, (*entry).addr, (*entry).port) };
    if flags & nat::HOST != 0 {
        touch(entry, 0);
        return Ok(None);
    }
    touch(entry, nat::SEEN_REPLY | tcp_state(ctx, proto, l4));
    rewrite(ctx, proto, l4, End::Destination, addr, port)?;
    Ok(Some(reason::NAT_REVERSE))
}

/// Rewrites an ICMP error (destination unreachable, time exceeded) about a masqueraded flow:
/// `end` of the outer header (egress: the pod's error, source; ingress: an error for the pod,
/// destination), and the opposite end of the embedded packet with its port, updating the
/// embedded IPv4 and L4 checksums and the ICMP checksum.
#[inline(always)]
fn icmp_error(ctx: &TcContext, cfg: &NodeConfig, l4: usize, end: End) -> Result<(i32, u32), u32> {
    const EMB_IP: usize = 8;
    let emb_off = l4 + EMB_IP;
    let emb = ipv4_at(ctx, emb_off)?;
    // SAFETY: `emb` came from `ptr_at`.
    let (eproto, esrc, edst) = unsafe { ((*emb).proto, (*emb).src_addr, (*emb).dst_addr) };
    let el4 = l4_offset(emb_off, emb);
    let (esport, edport) = ports(ctx, eproto, el4)?.ok_or(reason::DROP_NAT_PROTO)?;
    // The quoted packet travelled the other way, so its reverse is a packet of the flow: the
    // pod reports on one the remote sent it (remote → pod; reversed, the original direction),
    // or a router reports on our translated one (node → remote; reversed, the reply direction).
    let (dir, emb_end) = match end {
        End::Source => (nat::EGRESS, End::Destination),
        End::Destination => (nat::INGRESS, End::Source),
    };
    let key = NatKey::new(edst, esrc, edport, esport, eproto, dir);
    let entry = FLANNEL_NAT.get_ptr(&key).ok_or(reason::DROP_NAT_PROTO)?;
    // SAFETY: the pointer came from a successful lookup; the fields are copied at once.
    let (flags, addr, port) = unsafe { ((*entry).flags, (*entry).addr, (*entry).port) };
    if flags & nat::HOST != 0 {
        return Err(reason::DROP_NAT_PROTO);
    }
    let (new_addr, new_port) = match end {
        End::Source => (cfg.masq_ip, port),
        End::Destination => (addr, port),
    };
    let (port_off, l4_check_off) = match eproto {
        IPPROTO_ICMP => (ICMP_ID_OFF, ICMP_CSUM_OFF),
        IPPROTO_UDP => (emb_end.port_off(), UDP_CSUM_OFF),
        _ => (emb_end.port_off(), TCP_CSUM_OFF),
    };
    // Every field that must be there, before anything is written.
    let ip_check = ptr_at::<[u8; 2]>(ctx, ETH_HLEN + 10)?;
    let ip_addr = ptr_at::<[u8; 4]>(ctx, ETH_HLEN + end.addr_off())?;
    let icmp_check = ptr_at::<[u8; 2]>(ctx, l4 + ICMP_CSUM_OFF)?;
    let emb_check = ptr_at::<[u8; 2]>(ctx, emb_off + 10)?;
    let emb_addr = ptr_at::<[u8; 4]>(ctx, emb_off + emb_end.addr_off())?;
    let emb_port = ptr_at::<[u8; 2]>(ctx, el4 + port_off)?;
    // Outer header: address and IPv4 checksum (ICMP's checksum does not cover it).
    set_addr(ip_addr, ip_check, new_addr);
    // Embedded packet: every change is covered by the ICMP checksum.
    // SAFETY: bounds checked by `ptr_at`.
    unsafe {
        let (old_addr, old_emb_check) = (*emb_addr, *emb_check);
        let new_emb_check = csum::replace32(old_emb_check, old_addr, new_addr);
        *emb_check = new_emb_check;
        *emb_addr = new_addr;
        // The ICMP checksum covers both the address and the embedded checksum field.
        let c = csum::replace32(*icmp_check, old_addr, new_addr);
        *icmp_check = csum::replace16(
            c,
            u16::from_be_bytes(old_emb_check),
            u16::from_be_bytes(new_emb_check),
        );
        let old_port = *emb_port;
        set_port(emb_port, icmp_check, new_port);
        // The embedded L4 checksum, where the error quoted it (TCP's lies past the first 8
        // bytes); a UDP checksum of zero means none.
        if let Ok(check) = ptr_at::<[u8; 2]>(ctx, el4 + l4_check_off) {
            let old = *check;
            if !(eproto == IPPROTO_UDP && old == [0; 2]) {
                let mut new = old;
                if eproto != IPPROTO_ICMP {
                    new = csum::replace32(new, old_addr, new_addr);
                }
                new = csum::replace16(
                    new,
                    u16::from_be_bytes(old_port),
                    u16::from_be_bytes(new_port),
                );
                *check = new;
                *icmp_check = csum::replace16(
                    *icmp_check,
                    u16::from_be_bytes(old),
                    u16::from_be_bytes(new),
                );
            }
        }
    }
    Ok((TC_ACT_OK, reason::NAT_ICMP_ERROR))
}
