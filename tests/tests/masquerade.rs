//! `--ip-masq` end to end: pods reach an outside host (an address in the underlay namespace)
//! through the eBPF masquerade, or through flanneld's iptables/nftables rules where the kernel
//! forwards; flanneld's forward rules on a node whose FORWARD policy is DROP. Needs root and
//! `FLANNEL_AGENT_BIN` (`cargo xtask test`).
use std::{
    collections::{BTreeMap, BTreeSet},
    io::ErrorKind,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use flannel_tests::{
    NETWORK,
    NodeKind::{Ebpf, Netlink},
    Options, Pod, Testbed, in_ns, ping, summarize, tcp_echo, tcp_echo_seen, wait_for, with_netns,
};
use nix::sys::signal::Signal;

const MIB: usize = 1024 * 1024;
const NAT_PORTS: std::ops::RangeInclusive<u16> = 1_024..=29_999;

fn masq_options(kinds: &[flannel_tests::NodeKind], pods: usize, extra: &[&str]) -> Options {
    let mut o = Options::vxlan(kinds, pods);
    o.agent_args = ["--ip-masq"]
        .iter()
        .chain(extra)
        .map(ToString::to_string)
        .collect();
    o
}

/// A UDP socket bound in `netns` (to `addr`, or any address with port 0).
fn udp_socket(netns: &str, addr: SocketAddrV4) -> Result<UdpSocket> {
    let s = with_netns(netns, move || Ok(UdpSocket::bind(addr)?))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(s)
}

/// An echo server on `host:port` that records the source of every datagram it answers, until
/// `count` distinct payloads arrived or `timeout` passed: payload → where it came from.
fn udp_echo_server(
    host: &Pod,
    port: u16,
    count: usize,
    timeout: Duration,
) -> Result<thread::JoinHandle<BTreeMap<Vec<u8>, SocketAddr>>> {
    let sock = udp_socket(&host.netns, SocketAddrV4::new(host.ip, port))?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(thread::spawn(move || {
        let mut seen = BTreeMap::new();
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 64];
        while seen.len() < count && Instant::now() < deadline {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
                seen.insert(buf[..n].to_vec(), from);
            }
        }
        seen
    }))
}

/// A pod's datagram to the outside and its echo: returns the source the outside saw.
fn udp_round_trip(pod: &Pod, outside: &Pod, port: u16) -> Result<SocketAddr> {
    let server = udp_echo_server(outside, port, 1, Duration::from_secs(5))?;
    let client = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    client.connect((outside.ip, port))?;
    let payload = b"masquerade me".to_vec();
    let mut echo = [0u8; 64];
    let mut got = None;
    for _ in 0..5 {
        client.send(&payload)?;
        if let Ok(n) = client.recv(&mut echo) {
            got = Some(echo[..n].to_vec());
            break;
        }
    }
    let seen = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?;
    ensure!(
        got.as_deref() == Some(&payload[..]),
        "{}: no UDP echo from {}",
        pod.ip,
        outside.ip
    );
    seen.get(&payload)
        .copied()
        .context("the outside host saw nothing")
}

/// An ICMP port unreachable from the outside (nothing listens) reaches the pod's socket.
fn port_unreachable_reaches(pod: &Pod, outside: &Pod) -> Result<()> {
    let client = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    client.connect((outside.ip, 9))?;
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        client.send(b"anyone?")?;
        match client.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
            _ => thread::sleep(Duration::from_millis(200)),
        }
    }
    bail!(
        "{}: no port unreachable came back from {}",
        pod.ip,
        outside.ip
    )
}

fn node_ip(tb: &Testbed, i: usize) -> Ipv4Addr {
    tb.nodes[i].public_ip
}

#[test]
fn ebpf_masquerade_takes_pods_to_the_outside_on_a_forward_drop_node() -> Result<()> {
    let mut tb = Testbed::start("mq", masq_options(&[Ebpf, Ebpf], 2, &[]))?;
    let outside = tb.add_outside()?;
    let far = tb.add_far_outside(1280)?;
    // Docker's FORWARD policy on node 1: only flanneld's forward rules let pod traffic through.
    in_ns(
        &tb.nodes[0].netns,
        "iptables",
        &["-w", "-P", "FORWARD", "DROP"],
    )?;
    let pods = tb.pods();
    let (pod, remote) = (&pods[0], &pods[2]);
    ensure!(pod.node == 0 && remote.node == 1);

    // TCP, 20 MiB checked byte for byte; the outside sees the node's address and a range port.
    let (_, peer) = tcp_echo_seen(pod, &outside, 20 * MIB, None)?;
    ensure!(
        peer.ip() == node_ip(&tb, 0) && NAT_PORTS.contains(&peer.port()),
        "the outside saw {peer}, not {}:<1024-29999>",
        node_ip(&tb, 0)
    );
    // UDP and ping.
    let seen = udp_round_trip(pod, &outside, 5353)?;
    ensure!(seen.ip() == node_ip(&tb, 0), "UDP seen from {seen}");
    ping(pod, outside.ip)?;
    // Pod to remote pod is never rewritten.
    let (_, peer) = tcp_echo_seen(pod, remote, MIB, None)?;
    ensure!(peer.ip() == pod.ip, "pod-to-pod seen from {peer}");
    // ICMP errors about masqueraded flows come back to the pod: port unreachable, and
    // fragmentation-needed from a router in front of a 1280-byte link (without it this transfer
    // would stall in a PMTU black hole).
    port_unreachable_reaches(pod, &outside)?;
    let (_, peer) = tcp_echo_seen(&pods[1], &far, 2 * MIB, None)?;
    ensure!(peer.ip() == node_ip(&tb, 0), "far host saw {peer}");

    let stats = tb.stats(0)?;
    eprintln!("node 1: {}", summarize(&stats));
    for reason in ["nat_snat", "nat_reverse", "nat_icmp_error"] {
        ensure!(stats[reason] > 0, "{reason} never counted: {stats:?}");
    }
    // The table is in a pinned, BTF-described map; the ports are reserved from the node's own
    // connections; the forward rules are flanneld's; no kernel masquerade rule is installed.
    let entries = tb.pinned_entries(0, "FLANNEL_NAT")?;
    ensure!(
        entries
            .iter()
            .any(|e| e["key"]["dport"].is_array() && e["value"]["last_seen"].is_number()),
        "NAT table: {entries:?}"
    );
    let reserved = in_ns(
        &tb.nodes[0].netns,
        "sysctl",
        &["-n", "net.ipv4.ip_local_reserved_ports"],
    )?;
    ensure!(
        reserved.trim() == "1024-29999",
        "reserved ports: {reserved:?}"
    );
    let filter = in_ns(&tb.nodes[0].netns, "iptables-save", &["-t", "filter"])?;
    for rule in [
        format!("-A FLANNEL-FWD -s {NETWORK} -m comment --comment \"flanneld forward\" -j ACCEPT"),
        format!("-A FLANNEL-FWD -d {NETWORK} -m comment --comment \"flanneld forward\" -j ACCEPT"),
        ":FORWARD DROP".to_string(),
    ] {
        ensure!(filter.contains(&rule), "missing {rule:?} in\n{filter}");
    }
    let nat = in_ns(&tb.nodes[0].netns, "iptables-save", &["-t", "nat"])?;
    ensure!(
        !nat.contains("FLANNEL-POSTRTG"),
        "kernel masquerade rules with eBPF:\n{nat}"
    );
    Ok(())
}

/// The TCP and UDP `InCsumErrors` counters of `netns`.
fn csum_errors(netns: &str) -> Result<(u64, u64)> {
    Ok((
        snmp_counter(netns, "Tcp", "InCsumErrors")?,
        snmp_counter(netns, "Udp", "InCsumErrors")?,
    ))
}

/// A counter of `/proc/net/snmp` in `netns`: `proto` (`Tcp`, `Udp`, `Icmp`…) and its `name`.
fn snmp_counter(netns: &str, proto: &str, name: &str) -> Result<u64> {
    let snmp = in_ns(netns, "cat", &["/proc/net/snmp"])?;
    let mut lines = snmp
        .lines()
        .filter(|l| l.starts_with(&format!("{proto}: ")));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        bail!("no {proto} lines in /proc/net/snmp of {netns}");
    };
    let at = names
        .split_whitespace()
        .position(|n| n == name)
        .with_context(|| format!("no {proto} {name}"))?;
    Ok(values
        .split_whitespace()
        .nth(at)
        .context("short line")?
        .parse()?)
}

/// The masquerade updates TCP and UDP checksums right whether the pod left them to the device
/// (`CHECKSUM_PARTIAL`: the field holds the pseudo-header's sum, updated the other way) or filled
/// them in, and so do replies: with checksum offload off on the node's uplink, on the
/// underlay's port towards the node and in one pod, every checksum is finished in software and
/// checked by the receiver, which counts a wrong one in `InCsumErrors` and drops the packet.
#[test]
fn masqueraded_checksums_hold_with_and_without_offload() -> Result<()> {
    let mut tb = Testbed::start("mqcs", masq_options(&[Ebpf], 2, &[]))?;
    let outside = tb.add_outside()?;
    let pods = tb.pods();
    let (offloaded, complete) = (&pods[0], &pods[1]);
    in_ns(&tb.nodes[0].netns, "ethtool", &["-K", "eth0", "tx", "off"])?;
    in_ns(&outside.netns, "ethtool", &["-K", "n1", "tx", "off"])?;
    in_ns(&complete.netns, "ethtool", &["-K", "eth0", "tx", "off"])?;
    for (i, pod) in [offloaded, complete].into_iter().enumerate() {
        let (_, peer) = tcp_echo_seen(pod, &outside, 4 * MIB, None)?;
        ensure!(
            peer.ip() == node_ip(&tb, 0),
            "{}: the outside saw {peer}",
            pod.ip
        );
        let seen = udp_round_trip(pod, &outside, 5353 + i as u16)?;
        ensure!(
            seen.ip() == node_ip(&tb, 0),
            "{}: UDP seen from {seen}",
            pod.ip
        );
    }
    for netns in [&outside.netns, &offloaded.netns, &complete.netns] {
        let errors = csum_errors(netns)?;
        ensure!(
            errors == (0, 0),
            "{netns}: TCP and UDP checksum errors {errors:?}"
        );
    }
    let stats = tb.stats(0)?;
    ensure!(
        stats["nat_snat"] > 0 && stats["nat_reverse"] > 0,
        "not masqueraded: {stats:?}"
    );
    Ok(())
}

/// `n` datagrams from `pod` to `to` (connected), each echoed by `echo` (which listens on
/// `outside`): how many echoes came back, and what `echo` saw them come from.
fn udp_exchange(
    pod: &Pod,
    outside: &Pod,
    to: SocketAddrV4,
    n: usize,
) -> Result<(usize, BTreeSet<SocketAddr>)> {
    let server = udp_echo_server(outside, to.port(), n, Duration::from_secs(20))?;
    let client = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    client.connect(to)?;
    let mut echoes = 0;
    let mut buf = [0u8; 64];
    for i in 0..n {
        let payload = format!("datagram {i}");
        client.send(payload.as_bytes())?;
        if matches!(client.recv(&mut buf), Ok(len) if buf[..len] == *payload.as_bytes()) {
            echoes += 1;
        }
    }
    let seen = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?;
    Ok((echoes, seen.into_values().collect()))
}

/// A node counter by its `--stats` name (0 if never counted).
fn counted(tb: &Testbed, node: usize, name: &str) -> Result<u64> {
    Ok(tb.stats(node)?.get(name).copied().unwrap_or(0))
}

/// A pod's UDP flow to the outside, once masqueraded, leaves from the pod's veth straight to the
/// uplink (`nat_forward`, translated at the uplink as before), but only as the kernel would have
/// sent it: a flow the stack DNATs (as kube-proxy does a service address) and its replies stay in the
/// stack; TCP stays in the stack; a datagram whose TTL runs out at the node is answered by the
/// node's ICMP time exceeded.
#[test]
fn established_udp_flows_leave_from_the_pod_veth_as_the_kernel_would_route_them() -> Result<()> {
    const N: usize = 200;
    let mut tb = Testbed::start("mf", masq_options(&[Ebpf, Ebpf], 1, &[]))?;
    let outside = tb.add_outside()?;
    let pod = tb.pods()[0].clone();
    ensure!(pod.node == 0);
    let node = tb.nodes[0].netns.clone();
    let shortcut = "from_pod_veth/nat_forward";

    // A plain flow: every datagram translated once at the uplink, all but the first (which
    // made the flow) from the veth.
    let (fwd0, snat0) = (
        counted(&tb, 0, shortcut)?,
        counted(&tb, 0, "to_wire/nat_snat")?,
    );
    let (echoes, seen) = udp_exchange(&pod, &outside, SocketAddrV4::new(outside.ip, 7001), N)?;
    let (fwd1, snat1) = (
        counted(&tb, 0, shortcut)?,
        counted(&tb, 0, "to_wire/nat_snat")?,
    );
    ensure!(echoes == N, "{echoes} of {N} echoes came back");
    ensure!(
        seen.len() == 1 && seen.iter().all(|a| a.ip() == node_ip(&tb, 0)),
        "the outside saw {seen:?}"
    );
    ensure!(
        snat1 - snat0 >= N as u64,
        "translated {} of {N}",
        snat1 - snat0
    );
    ensure!(
        fwd1 - fwd0 >= (N - 1 - 10) as u64,
        "only {} of {N} datagrams left from the veth",
        fwd1 - fwd0
    );

    // TCP stays in the stack.
    tcp_echo_seen(&pod, &outside, MIB, None)?;
    ensure!(counted(&tb, 0, shortcut)? == fwd1, "TCP left from the veth");

    // A flow the stack DNATs: a "service" address that the node's nat table sends to the
    // outside host. The address is the outside host's too (nothing listens there on the port),
    // with its neighbour resolved on the node, so a shortcut taken without the stack's DNAT
    // would reach it and get no echo.
    let service = Ipv4Addr::new(198, 18, 0, 201);
    flannel_tests::ip(&tb.underlay(), &format!("addr add {service}/24 dev br0"))?;
    in_ns(&node, "ping", &["-c", "1", "-W", "2", &service.to_string()])?;
    for args in [
        "add table ip mfdnat".to_string(),
        "add chain ip mfdnat pre { type nat hook prerouting priority -100 ; }".to_string(),
        format!(
            "add rule ip mfdnat pre ip daddr {service} udp dport 7002 dnat to {}:7002",
            outside.ip
        ),
    ] {
        in_ns(&node, "nft", &args.split(' ').collect::<Vec<_>>())?;
    }
    let (echoes, _) = udp_exchange(&pod, &outside, SocketAddrV4::new(service, 7002), N)?;
    ensure!(
        echoes == N,
        "{echoes} of {N} echoes came back from the DNATed address"
    );
    ensure!(
        counted(&tb, 0, shortcut)? == fwd1,
        "a DNATed flow left from the veth"
    );

    // TTL 1 on an established flow: the node's stack answers it, nothing goes out.
    let expired = snmp_counter(&node, "Icmp", "OutTimeExcds")?;
    let server = udp_echo_server(&outside, 7003, 2, Duration::from_secs(3))?;
    let client = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    client.connect((outside.ip, 7003))?;
    let mut buf = [0u8; 64];
    client.send(b"first")?;
    ensure!(
        client.recv(&mut buf).is_ok(),
        "no echo of the first datagram"
    );
    let before_ttl = counted(&tb, 0, shortcut)?;
    client.set_ttl(1)?;
    client.send(b"expires")?;
    let seen = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?;
    ensure!(
        !seen.contains_key(&b"expires"[..]),
        "a TTL 1 datagram went out"
    );
    ensure!(
        snmp_counter(&node, "Icmp", "OutTimeExcds")? > expired,
        "the node sent no time exceeded"
    );
    ensure!(
        counted(&tb, 0, shortcut)? == before_ttl,
        "the TTL 1 datagram was counted as forwarded"
    );
    Ok(())
}

#[test]
fn without_ip_masq_nothing_is_rewritten() -> Result<()> {
    let mut tb = Testbed::start("nomq", Options::vxlan(&[Ebpf, Ebpf], 1))?;
    let outside = tb.add_outside()?;
    let pod = tb.pods()[0].clone();
    // The outside host has no route back to pods: just see what arrives.
    let server = udp_echo_server(&outside, 5353, 1, Duration::from_secs(5))?;
    let client = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    for _ in 0..3 {
        client.send_to(b"plain", (outside.ip, 5353))?;
        thread::sleep(Duration::from_millis(100));
    }
    let seen = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?;
    let from = seen.get(&b"plain"[..]).context("nothing arrived")?;
    ensure!(
        from.ip() == pod.ip,
        "without --ip-masq the outside must see the pod: {from}"
    );
    ensure!(
        !tb.nodes[0]
            .pins()
            .read_dir()?
            .any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("link-to_wire"))),
        "the masquerade program is attached without --ip-masq"
    );
    Ok(())
}

/// Raises this process's open-file limit (many sockets at once).
fn raise_nofile(n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: a plain system call on a local struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) };
}

#[test]
fn ten_thousand_concurrent_flows_never_share_an_outside_tuple() -> Result<()> {
    const FLOWS: usize = 10_000;
    const PORTS: [u16; 4] = [7001, 7002, 7003, 7004];
    raise_nofile(65_536);
    let mut tb = Testbed::start("mq10k", masq_options(&[Ebpf, Ebpf], 2, &[]))?;
    let outside = tb.add_outside()?;
    let pods: Vec<Pod> = tb.pods().into_iter().filter(|p| p.node == 0).collect();
    let servers = PORTS
        .iter()
        .map(|&p| udp_echo_server(&outside, p, FLOWS / PORTS.len(), Duration::from_mins(1)))
        .collect::<Result<Vec<_>>>()?;
    // 10,000 sockets open at once, from both pods of node 1, to four ports of the outside host.
    let mut clients = Vec::with_capacity(FLOWS);
    for i in 0..FLOWS {
        let pod = &pods[i % pods.len()];
        let s = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((outside.ip, PORTS[i % PORTS.len()]))?;
        s.set_nonblocking(true)?;
        clients.push(s);
    }
    let mut answered = vec![false; FLOWS];
    // Datagrams can be lost on a loaded machine: unanswered flows send again (same socket, same
    // flow), up to five rounds.
    for round in 0..5 {
        for (i, s) in clients.iter().enumerate().filter(|(i, _)| !answered[*i]) {
            s.send(format!("flow {i}").as_bytes())?;
            if i % 100 == 99 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        thread::sleep(Duration::from_millis(500 * (round + 1)));
        let mut buf = [0u8; 64];
        for (i, s) in clients.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                answered[i] |= buf[..n] == *format!("flow {i}").as_bytes();
            }
        }
        eprintln!(
            "round {round}: {} of {FLOWS} answered",
            answered.iter().filter(|a| **a).count()
        );
        if answered.iter().all(|a| *a) {
            break;
        }
    }
    let mut tuples = BTreeSet::new();
    let mut flows = 0;
    for (server, port) in servers.into_iter().zip(PORTS) {
        for (payload, from) in server
            .join()
            .map_err(|_| anyhow::anyhow!("server panicked"))?
        {
            ensure!(
                from.ip() == node_ip(&tb, 0),
                "flow {payload:?} seen from {from}"
            );
            ensure!(
                tuples.insert((from, port)),
                "two flows share the outside tuple {from} → :{port}"
            );
            flows += 1;
        }
    }
    ensure!(flows == FLOWS, "the outside saw {flows} of {FLOWS} flows");
    ensure!(answered.iter().all(|a| *a), "every flow got its echo back");
    let entries = tb.pinned_entries(0, "FLANNEL_NAT")?;
    ensure!(
        entries.len() >= 2 * FLOWS,
        "{} NAT entries for {FLOWS} flows",
        entries.len()
    );
    // `--stats` says how full the table is.
    let pin = tb.nodes[0].pin_dir.to_string_lossy().into_owned();
    let (ok, out, _) = tb.agent_once(0, &["--stats", "--pin-dir", &pin])?;
    let line = out
        .lines()
        .find(|l| l.starts_with("masquerade table:"))
        .unwrap_or_default();
    let words: Vec<&str> = line.split_whitespace().collect();
    ensure!(
        ok && words.get(4) == Some(&"65536")
            && words.get(2).and_then(|n| n.parse::<usize>().ok()) >= Some(2 * FLOWS)
            && words
                .get(6)
                .and_then(|n| n.trim_start_matches('(').parse::<usize>().ok())
                >= Some(FLOWS),
        "--stats: {line:?}"
    );
    Ok(())
}

#[test]
fn a_full_table_fails_new_flows_closed_and_keeps_established_ones() -> Result<()> {
    let mut tb = Testbed::start(
        "mqfull",
        masq_options(&[Ebpf, Ebpf], 1, &["--ip-masq-table-size", "1024"]),
    )?;
    let outside = tb.add_outside()?;
    let pod = tb.pods()[0].clone();
    let first = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
    first.connect((outside.ip, 7100))?;
    let server = udp_echo_server(&outside, 7100, usize::MAX, Duration::from_secs(8))?;
    first.send(b"first")?;
    let mut buf = [0u8; 64];
    ensure!(first.recv(&mut buf).is_ok(), "the first flow is answered");
    // 600 more flows: 1024 entries hold 512 flows.
    let mut others = Vec::new();
    for i in 0..600 {
        let s = udp_socket(&pod.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        s.connect((outside.ip, 7100))?;
        s.send(format!("other {i}").as_bytes())?;
        others.push(s);
    }
    wait_for("the table to fill", Duration::from_secs(5), || {
        tb.stats(0).is_ok_and(|s| s["drop_nat_table_full"] > 0)
    })?;
    let entries = tb.pinned_entries(0, "FLANNEL_NAT")?.len();
    ensure!(entries == 1024, "{entries} entries in a 1024-entry table");
    // The established flow still works; the flows that found no room got nothing.
    first.send(b"first again")?;
    let n = first
        .recv(&mut buf)
        .context("established flow after the table filled")?;
    ensure!(&buf[..n] == b"first again");
    let seen = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))?;
    ensure!(
        seen.len() <= 512 + 1,
        "{} flows got through a 512-flow table",
        seen.len()
    );
    ensure!(
        seen.values().all(|from| from.ip() == node_ip(&tb, 0)),
        "no flow leaked the pod's address"
    );
    drop(others);
    Ok(())
}

#[test]
fn a_masqueraded_transfer_survives_sigkill_and_restart_of_the_agent() -> Result<()> {
    let mut tb = Testbed::start("mqkill", masq_options(&[Ebpf, Ebpf], 1, &[]))?;
    let outside = tb.add_outside()?;
    let pod = tb.pods()[0].clone();
    let to = outside.clone();
    let transfer =
        thread::spawn(move || tcp_echo_seen(&pod, &to, 8 * MIB, Some(Duration::from_millis(20))));
    thread::sleep(Duration::from_millis(700));
    tb.stop_agent(0, Signal::SIGKILL)?;
    thread::sleep(Duration::from_millis(300));
    tb.start_agent(0)?;
    let (_, peer) = transfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer panicked"))?
        .context("the transfer through NAT across the agent's restart")?;
    ensure!(peer.ip() == node_ip(&tb, 0), "seen from {peer}");
    // New flows after the restart work too.
    tcp_echo(&tb.pods()[0], &outside, MIB)?;
    Ok(())
}

/// The lines of our chains in `iptables-save -t <table>` of node `i`.
fn our_iptables(tb: &Testbed, i: usize, table: &str) -> Result<Vec<String>> {
    Ok(in_ns(&tb.nodes[i].netns, "iptables-save", &["-t", table])?
        .lines()
        .filter(|l| l.contains("FLANNEL-"))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect())
}

#[test]
fn the_kernel_path_uses_flanneld_iptables_rules_kept_in_place() -> Result<()> {
    let mut tb = Testbed::start(
        "mqipt",
        masq_options(&[Netlink, Netlink], 1, &["--iptables-resync", "1"]),
    )?;
    let outside = tb.add_outside()?;
    let pod = tb.pods()[0].clone();
    let (_, peer) = tcp_echo_seen(&pod, &outside, 4 * MIB, None)?;
    ensure!(
        peer.ip() == node_ip(&tb, 0),
        "kernel MASQUERADE: seen from {peer}"
    );
    let subnet = &tb.nodes[0].subnet;
    let want_nat = vec![
        ":FLANNEL-POSTRTG - ".to_string(),
        "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG".to_string(),
        "-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment \"flanneld masq\" -j RETURN".to_string(),
        format!("-A FLANNEL-POSTRTG -s {subnet} -d {NETWORK} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {NETWORK} -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {NETWORK} -d {subnet} -m comment --comment \"flanneld masq\" -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {NETWORK} ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
        format!("-A FLANNEL-POSTRTG ! -s {NETWORK} -d {NETWORK} -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"),
    ];
    let got = our_iptables(&tb, 0, "nat")?;
    ensure!(
        got.len() == want_nat.len(),
        "nat rules:\n{}",
        got.join("\n")
    );
    for (g, w) in got.iter().zip(&want_nat) {
        ensure!(
            g.starts_with(w.trim_end()),
            "nat rule\n  got  {g}\n  want {w}"
        );
    }
    // A rule deleted by hand comes back within the resync period.
    in_ns(
        &tb.nodes[0].netns,
        "iptables",
        &["-w", "-t", "nat", "-D", "FLANNEL-POSTRTG", "5"],
    )?;
    ensure!(
        our_iptables(&tb, 0, "nat")?.len() == want_nat.len() - 1,
        "the rule was deleted"
    );
    wait_for(
        "the deleted rule to come back",
        Duration::from_secs(5),
        || our_iptables(&tb, 0, "nat").is_ok_and(|g| g.len() == want_nat.len()),
    )?;
    // --cleanup removes ours and only ours.
    in_ns(
        &tb.nodes[0].netns,
        "iptables",
        &["-w", "-N", "SOMEONE-ELSE"],
    )?;
    tb.stop_agent(0, Signal::SIGTERM)?;
    let pin = tb.nodes[0].pin_dir.to_string_lossy().into_owned();
    let (ok, _, err) = tb.agent_once(0, &["--cleanup", "--pin-dir", &pin])?;
    ensure!(ok, "--cleanup failed: {err}");
    ensure!(
        our_iptables(&tb, 0, "nat")?.is_empty() && our_iptables(&tb, 0, "filter")?.is_empty(),
        "rules left after --cleanup"
    );
    let all = in_ns(&tb.nodes[0].netns, "iptables-save", &[])?;
    ensure!(
        all.contains(":SOMEONE-ELSE"),
        "--cleanup removed a chain that is not ours"
    );
    Ok(())
}

#[test]
fn enable_nftables_uses_flanneld_tables() -> Result<()> {
    let mut options = masq_options(&[Netlink, Netlink], 1, &[]);
    options.net_conf =
        format!(r#"{{"Network":"{NETWORK}","EnableNFTables":true,"Backend":{{"Type":"vxlan"}}}}"#);
    let mut tb = Testbed::start("mqnft", options)?;
    let outside = tb.add_outside()?;
    let pod = tb.pods()[0].clone();
    let (_, peer) = tcp_echo_seen(&pod, &outside, 2 * MIB, None)?;
    ensure!(
        peer.ip() == node_ip(&tb, 0),
        "nftables masquerade: seen from {peer}"
    );
    let subnet = &tb.nodes[0].subnet;
    let table = in_ns(
        &tb.nodes[0].netns,
        "nft",
        &["list", "table", "ip", "flannel-ipv4"],
    )?;
    for rule in [
        "type nat hook postrouting priority srcnat".to_string(),
        format!("ip saddr {subnet} ip daddr {NETWORK} return"),
        format!("ip saddr {NETWORK} ip daddr {subnet} return"),
        // flannel's own text has `ip saddr != POD ip daddr CLUSTER` here (its last rule dead).
        format!("ip saddr != {NETWORK} ip daddr {subnet} return"),
        format!("ip saddr {NETWORK} ip daddr != 224.0.0.0/4 masquerade fully-random"),
        format!("ip saddr != {NETWORK} ip daddr {NETWORK} masquerade fully-random"),
        "type filter hook forward priority filter".to_string(),
        format!("ip saddr {NETWORK} accept"),
        format!("ip daddr {NETWORK} accept"),
    ] {
        ensure!(table.contains(&rule), "missing {rule:?} in\n{table}");
    }
    let nat = in_ns(&tb.nodes[0].netns, "iptables-save", &["-t", "nat"])?;
    ensure!(
        !nat.contains("FLANNEL-POSTRTG"),
        "iptables rules beside nftables:\n{nat}"
    );
    Ok(())
}
