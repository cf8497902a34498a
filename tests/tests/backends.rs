//! End-to-end tests of every backend on namespace clusters: host-gw, vxlan and ipip with
//! DirectRouting, ipip, udp (all in eBPF), wireguard (userspace fallback), and the netlink
//! dataplane interoperating with eBPF and stock nodes. Run by `cargo xtask test`.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use flannel_tests::{
    Backend,
    NodeKind::{self, Ebpf, Netlink, Stock},
    Options, Testbed, UNDERLAY_MTU, can_connect, in_ns, ip, ping_mtu, run, summarize, tcp_echo,
    wait_for,
};

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;

fn testbed(tag: &str, backend: Backend, kinds: &[NodeKind], far: &[usize]) -> Result<Testbed> {
    let mut options = Options::backend(backend, kinds, 1);
    options.far_nodes = far.to_vec();
    Testbed::start(tag, options)
}

/// subnet.env's MTU on every node, then a DF ping of exactly that size between every pair of
/// pods on different nodes. Returns the TTL seen by pod 1 of node 1 from pod 1 of node 2.
fn check_mtu(tb: &Testbed, overhead: u32) -> Result<u8> {
    let mtu = UNDERLAY_MTU - overhead;
    for i in 0..tb.nodes.len() {
        let env = tb.subnet_env(i)?;
        ensure!(
            env["FLANNEL_MTU"] == mtu.to_string(),
            "node {}: FLANNEL_MTU {} (expected {mtu})",
            i + 1,
            env["FLANNEL_MTU"]
        );
    }
    let pods = tb.pods();
    let mut ttl = 0;
    for a in &pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            let t = ping_mtu(a, b.ip, mtu)?;
            if a.node == 0 && b.node == 1 {
                ttl = t;
            }
        }
    }
    Ok(ttl)
}

fn stats_of(tb: &Testbed, i: usize) -> Result<std::collections::BTreeMap<String, u64>> {
    let stats = tb.stats(i)?;
    eprintln!("node {}: {}", i + 1, summarize(&stats));
    Ok(stats)
}

#[test]
fn host_gw_in_ebpf_interoperates_with_kernel_routes() -> Result<()> {
    let tb = testbed("hg", Backend::HostGw, &[Ebpf, Ebpf, Netlink, Stock], &[])?;
    tb.all_pairs(256 * KIB)?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], 16 * MIB)?;
    let ttl = check_mtu(&tb, 0)?;
    ensure!(
        ttl == 62,
        "two router hops each way, as flannel's host-gw: ttl {ttl}"
    );
    // eBPF nodes forward without kernel routes through the uplink; the netlink node has
    // flanneld's routes.
    let routes = ip(&tb.nodes[0].netns, "route show")?;
    ensure!(
        !routes.contains("dev eth0 proto 102") && !routes.contains("via 198.18.0.12"),
        "eBPF node routes pod subnets through the uplink:\n{routes}"
    );
    let routes = ip(&tb.nodes[2].netns, "route show proto 102")?;
    for peer in [1, 2, 4] {
        ensure!(
            routes.contains(&format!("10.244.{peer}.0/24 via 198.18.0.1{peer} dev eth0")),
            "netlink node lacks host-gw route for node {peer}:\n{routes}"
        );
    }
    for i in 0..2 {
        let stats = stats_of(&tb, i)?;
        ensure!(
            stats["direct"] > 0 && stats["deliver_local"] > 0,
            "node {}",
            i + 1
        );
        tb.no_drops(i)?;
    }
    // The node's own traffic to remote pods.
    tcp_echo(&tb.host(0), &tb.nodes[3].pods[0], MIB)?;
    // Nothing to encapsulate, so no headroom device (eBPF) and none of ours (netlink).
    for i in [0, 2] {
        ensure!(
            ip(&tb.nodes[i].netns, "link show flannel-hdroom").is_err(),
            "node {} has the headroom device",
            i + 1
        );
    }
    Ok(())
}

#[test]
fn host_gw_peer_off_the_segment_is_an_error_not_a_black_hole() -> Result<()> {
    let tb = testbed("hgfar", Backend::HostGw, &[Ebpf, Ebpf, Ebpf], &[3])?;
    let (p1, p2, p3) = (
        tb.nodes[0].pods[0].clone(),
        tb.nodes[1].pods[0].clone(),
        tb.nodes[2].pods[0].clone(),
    );
    tcp_echo(&p1, &p2, 256 * KIB)?;
    // The off-segment peer gets no route: nodes 1 and 2 route only each other, node 3 nobody.
    for (i, want) in [(0, 1), (1, 1), (2, 0)] {
        let routes = tb.pinned_entries(i, "FLANNEL_ROUTES")?;
        ensure!(
            routes.len() == want,
            "node {}: {} routes, want {want}: {routes:?}",
            i + 1,
            routes.len()
        );
    }
    ensure!(
        !can_connect(&p1, &p3, Duration::from_secs(1))?,
        "a pod behind an off-segment host-gw peer must not be reached by accident"
    );
    let stats = stats_of(&tb, 0)?;
    ensure!(
        stats["drop_no_route"] > 0,
        "the refused peer's traffic is counted as drop_no_route"
    );
    Ok(())
}

#[test]
fn vxlan_direct_routing_mixes_direct_and_tunnelled_peers() -> Result<()> {
    let backend = Backend::Vxlan {
        direct_routing: true,
    };
    let tb = testbed("vxdr", backend, &[Ebpf, Netlink, Ebpf], &[3])?;
    tb.all_pairs(256 * KIB)?;
    check_mtu(&tb, 50)?;
    let stats = stats_of(&tb, 0)?;
    ensure!(
        stats["direct"] > 0 && stats["encap_vxlan"] > 0,
        "node 1 reaches node 2 directly and node 3 through VXLAN"
    );
    ensure!(
        stats["deliver_local"] > 0 && stats["decap_vxlan"] > 0,
        "and receives both"
    );
    let stats = stats_of(&tb, 2)?;
    ensure!(
        stats["direct"] == 0 && stats["encap_vxlan"] > 0,
        "the far node tunnels to everyone"
    );
    // The netlink node has flanneld's mix: a direct route to node 1, flannel.1 for node 3.
    let routes = ip(&tb.nodes[1].netns, "route show proto 102")?;
    ensure!(
        routes.contains("10.244.1.0/24 via 198.18.0.11 dev eth0")
            && routes.contains("10.244.3.0/24 via 10.244.3.0 dev flannel.1")
            && routes.contains("onlink"),
        "netlink node routes:\n{routes}"
    );
    for i in 0..3 {
        if i != 1 {
            tb.no_drops(i)?;
        }
    }
    Ok(())
}

/// Node `i`'s `FLANNEL_NEXTHOP` entry for node `j`'s subnet: (node, via) as bpftool reads it.
fn next_hop(tb: &Testbed, i: usize, j: usize) -> Result<(Ipv4Addr, Ipv4Addr)> {
    let slot = next_hop_slot(tb, j)?;
    let path = tb.nodes[i].pins().join("FLANNEL_NEXTHOP");
    let out = run(
        "bpftool",
        &[
            "-j",
            "map",
            "lookup",
            "pinned",
            &path.to_string_lossy(),
            "key",
            "hex",
            &format!("{:02x}", slot & 0xff),
            &format!("{:02x}", (slot >> 8) & 0xff),
            "00",
            "00",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let addr = |field: &str| -> Result<Ipv4Addr> {
        let b: Vec<u8> = v["formatted"]["value"][field]
            .as_array()
            .with_context(|| format!("no {field} in {out}"))?
            .iter()
            .map(|x| x.as_u64().and_then(|x| u8::try_from(x).ok()).unwrap_or(0))
            .collect();
        ensure!(b.len() == 4, "{field} in {out}");
        Ok(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    };
    Ok((addr("node")?, addr("via")?))
}

/// The `FLANNEL_SUBNETS` (and `FLANNEL_NEXTHOP`) slot of node `j`'s subnet.
fn next_hop_slot(tb: &Testbed, j: usize) -> Result<u32> {
    let net = tb.nodes[j].subnet_net()?;
    let (own, all) = (
        u32::from(net.network()),
        u32::from(Ipv4Addr::new(10, 244, 0, 0)),
    );
    Ok((own - all) >> (32 - u32::from(net.prefix_len())))
}

/// Datagrams the underlay namespace forwarded (its `Ip: ForwDatagrams`): the outer packets
/// that took its router as their next hop.
fn underlay_forwarded(tb: &Testbed) -> Result<u64> {
    let snmp = in_ns(&tb.underlay(), "cat", &["/proc/net/snmp"])?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (ip.next().context("Ip:")?, ip.next().context("Ip:")?);
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ForwDatagrams")
        .and_then(|(_, v)| v.parse().ok())
        .context("ForwDatagrams")
}

/// Pings pod 1 of node 2 from pod 1 of node 1 `count` times; returns how many outer packets the
/// underlay's router forwarded meanwhile.
fn ping_through_router(tb: &Testbed, count: u32) -> Result<u64> {
    let before = underlay_forwarded(tb)?;
    let (from, to) = (&tb.nodes[0].pods[0], tb.nodes[1].pods[0].ip);
    in_ns(
        &from.netns,
        "ping",
        &[
            "-c",
            &count.to_string(),
            "-i",
            "0.05",
            "-W",
            "2",
            "-q",
            &to.to_string(),
        ],
    )
    .with_context(|| format!("ping {} → {to}", from.ip))?;
    Ok(underlay_forwarded(tb)? - before)
}

#[test]
fn encapsulated_packets_take_the_kernels_next_hop_kept_by_the_agent() -> Result<()> {
    let backend = Backend::Vxlan {
        direct_routing: false,
    };
    let mut tb = testbed("nh", backend, &[Ebpf, Ebpf, Ebpf], &[3])?;
    let (node2, node3) = (tb.nodes[1].public_ip, tb.nodes[2].public_ip);
    let router = Ipv4Addr::new(198, 18, 0, 1);
    let wait_hop = |tb: &Testbed, j: usize, want: (Ipv4Addr, Ipv4Addr), why: &str| {
        let mut seen = None;
        wait_for(why, Duration::from_secs(5), || {
            seen = next_hop(tb, 0, j).ok();
            seen == Some(want)
        })
        .with_context(|| {
            format!(
                "node 1's next hop for node {}: {seen:?}; its log:\n{}",
                j + 1,
                tb.log(0)
            )
        })
    };
    let none = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED);
    // Node 2 shares node 1's segment; node 3 is behind the underlay's router.
    wait_hop(&tb, 1, (node2, node2), "node 2 on the segment")?;
    wait_hop(&tb, 2, (node3, router), "node 3 through the router")?;
    tb.all_pairs(64 * KIB)?;
    ensure!(
        ping_through_router(&tb, 20)? < 20,
        "node 2 is reached directly"
    );

    // A route through the router: followed on its notification, and the packets take it.
    let via_router = format!("{node2}/32 via {router} dev eth0");
    ip(&tb.nodes[0].netns, &format!("route add {via_router}"))?;
    wait_hop(&tb, 1, (node2, router), "the new route")?;
    ensure!(
        ping_through_router(&tb, 20)? >= 20,
        "node 2 through the router"
    );

    // Policy routing rules: no next hop holds for every packet, the kernel routes each.
    let rule = "rule add fwmark 0x77 lookup 77 pref 100";
    ip(&tb.nodes[0].netns, rule)?;
    wait_hop(&tb, 1, none, "no next hops under policy rules")?;
    wait_hop(&tb, 2, none, "no next hops under policy rules")?;
    ensure!(
        ping_through_router(&tb, 20)? >= 20,
        "the kernel's lookup takes the route"
    );
    ip(&tb.nodes[0].netns, &rule.replace("add", "del"))?;
    wait_hop(&tb, 1, (node2, router), "next hops once the rule is gone")?;
    ip(&tb.nodes[0].netns, &format!("route del {via_router}"))?;
    wait_hop(&tb, 1, (node2, node2), "the route removed")?;

    // The programs use the map: with the agent gone, a next hop written by hand (the router)
    // is taken although the kernel's route says node 2 is on the segment.
    tb.stop_agent(0, nix::sys::signal::Signal::SIGKILL)?;
    let slot = next_hop_slot(&tb, 1)?;
    let path = tb.nodes[0].pins().join("FLANNEL_NEXTHOP");
    let bytes = |a: Ipv4Addr| a.octets().map(|b| b.to_string());
    let mut args: Vec<String> = ["map", "update", "pinned"].map(String::from).to_vec();
    args.push(path.to_string_lossy().into_owned());
    args.extend([
        "key".into(),
        (slot & 0xff).to_string(),
        (slot >> 8).to_string(),
        "0".into(),
        "0".into(),
    ]);
    args.push("value".into());
    args.extend(bytes(node2));
    args.extend(bytes(router));
    run(
        "bpftool",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    ensure!(
        ping_through_router(&tb, 20)? >= 20,
        "the hand-written next hop is taken"
    );
    // A restarted agent looks the next hops up again; a stopped one empties the map.
    tb.start_agent(0)?;
    wait_hop(&tb, 1, (node2, node2), "looked up again at start")?;
    ensure!(ping_through_router(&tb, 20)? < 20, "node 2 directly again");
    let status = tb.stop_agent(0, nix::sys::signal::Signal::SIGTERM)?;
    ensure!(status.success(), "agent stopped: {status}");
    for j in [1, 2] {
        ensure!(next_hop(&tb, 0, j)? == none, "emptied when the agent stops");
    }
    ensure!(
        ping_through_router(&tb, 20)? < 20,
        "the kernel routes each packet, directly"
    );
    Ok(())
}

#[test]
fn ipip_in_ebpf_needs_no_ipip_module() -> Result<()> {
    let tb = testbed(
        "ipip",
        Backend::Ipip {
            direct_routing: false,
        },
        &[Ebpf, Ebpf, Ebpf],
        &[],
    )?;
    tb.all_pairs(256 * KIB)?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[2].pods[0], 16 * MIB)?;
    let ttl = check_mtu(&tb, 20)?;
    ensure!(ttl == 62, "ttl {ttl}");
    let links = ip(&tb.nodes[0].netns, "link show")?;
    ensure!(
        !links.contains("tunl0") && !links.contains("flannel.ipip"),
        "no tunnel device may be involved:\n{links}"
    );
    for i in 0..3 {
        let stats = stats_of(&tb, i)?;
        ensure!(
            stats["encap_ipip"] > 0 && stats["decap_ipip"] > 0,
            "node {}",
            i + 1
        );
        tb.no_drops(i)?;
    }
    tcp_echo(&tb.host(0), &tb.nodes[1].pods[0], MIB)?;
    Ok(())
}

#[test]
fn ipip_direct_routing_mixes_direct_and_tunnelled_peers_with_xdp_decap() -> Result<()> {
    let backend = Backend::Ipip {
        direct_routing: true,
    };
    // Decapsulated by XDP this time (tc delivers).
    let mut options = Options::backend(backend, &[Ebpf, Ebpf, Ebpf], 1);
    options.far_nodes = vec![3];
    options.agent_args = vec!["--decap".into(), "xdp".into()];
    let tb = Testbed::start("ipdr", options)?;
    tb.all_pairs(256 * KIB)?;
    check_mtu(&tb, 20)?;
    let stats = stats_of(&tb, 0)?;
    ensure!(stats["direct"] > 0 && stats["encap_ipip"] > 0, "node 1");
    ensure!(
        stats["decap_ipip_xdp"] > 0,
        "node 1 decapsulates node 3's IPIP in XDP"
    );
    let stats = stats_of(&tb, 2)?;
    ensure!(stats["direct"] == 0 && stats["encap_ipip"] > 0, "node 3");
    for i in 0..3 {
        tb.no_drops(i)?;
    }
    Ok(())
}

#[test]
fn udp_backend_in_ebpf_without_tun_or_userspace() -> Result<()> {
    // No Backend in net-conf.json: udp, as in flannel's code.
    let mut options = Options::backend(Backend::Udp, &[Ebpf, Ebpf, Ebpf], 1);
    options.net_conf = format!(r#"{{"Network":"{}"}}"#, flannel_tests::NETWORK);
    let tb = Testbed::start("udp", options)?;
    let leases = std::fs::read_to_string(tb.leases_path())?;
    ensure!(
        leases.contains(r#""BackendType": """#),
        "udp leases have an empty type:\n{leases}"
    );
    tb.all_pairs(256 * KIB)?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], 16 * MIB)?;
    // Two router hops and two tunnel ends each way (flanneld's proxy decrements the TTL).
    let ttl = check_mtu(&tb, 28)?;
    ensure!(
        ttl == 60,
        "ttl {ttl}: flannel's udp backend decrements at each tunnel end"
    );
    let links = ip(&tb.nodes[0].netns, "link show")?;
    ensure!(!links.contains("flannel0"), "no TUN device:\n{links}");
    // The socket on 8285 is the slow path's (fragmented or option-carrying tunnel packets); all
    // of this traffic took the programs, none of it userspace.
    let sockets = in_ns(&tb.nodes[0].netns, "ss", &["-uanp"])?;
    ensure!(
        sockets.contains(":8285") && sockets.contains("flannel-agent"),
        "the slow path listens on 8285:\n{sockets}"
    );
    for i in 0..3 {
        let stats = stats_of(&tb, i)?;
        ensure!(
            stats["encap_udp"] > 0 && stats["decap_udp"] > 0,
            "node {}",
            i + 1
        );
        let slow: u64 = stats
            .iter()
            .filter(|(k, _)| k.starts_with("slow_path/"))
            .map(|(_, v)| v)
            .sum();
        ensure!(
            slow == 0,
            "node {}: {slow} packets took the slow path",
            i + 1
        );
        tb.no_drops(i)?;
    }
    tcp_echo(&tb.host(1), &tb.nodes[2].pods[0], MIB)?;
    Ok(())
}

#[test]
fn wireguard_falls_back_to_userspace_and_encrypts_the_underlay() -> Result<()> {
    let mut tb = testbed("wg", Backend::Wireguard, &[Ebpf, Ebpf, Ebpf], &[])?;
    // No kernel module here: every node runs the userspace implementation.
    let userspace = run("pgrep", &["-c", "-x", "wireguard-go"])?;
    ensure!(
        userspace.trim().parse::<usize>()? >= 3,
        "wireguard-go processes: {userspace}"
    );
    for i in 0..3 {
        let mode = std::fs::metadata(&tb.nodes[i].wg_key_file)?.permissions();
        ensure!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 == 0o400,
            "key file mode: owner read-only, as flanneld writes it"
        );
        let dev = ip(&tb.nodes[i].netns, "-d link show flannel-wg")?;
        ensure!(dev.contains("mtu 1420"), "{dev}");
        let routes = ip(&tb.nodes[i].netns, "route show dev flannel-wg")?;
        ensure!(
            routes.contains("10.244.0.0/16"),
            "one route for the Network:\n{routes}"
        );
    }
    let ttl = check_mtu(&tb, 80)?;
    ensure!(ttl > 0);
    // Capture the underlay while a recognisable payload crosses it.
    let capture = tb.dir.join("underlay.pcap");
    let mut tcpdump = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &tb.underlay(),
            "tcpdump",
            "-i",
            "br0",
            "-U",
            "-s",
            "0",
            "-w",
        ])
        .arg(&capture)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting tcpdump")?;
    std::thread::sleep(Duration::from_millis(700));
    tb.all_pairs(64 * KIB)?;
    std::thread::sleep(Duration::from_millis(300));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id().cast_signed()),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = tcpdump.wait();
    let pcap = std::fs::read(&capture)?;
    ensure!(
        pcap.len() > 64 * KIB,
        "the capture saw the traffic ({} bytes)",
        pcap.len()
    );
    // tcp_echo's payload is `pattern(len, from's last octet ^ to's node octet)`: look for
    // 32-byte windows of each one that crossed.
    let pods = tb.pods();
    let mut seeds: Vec<u8> = pods
        .iter()
        .flat_map(|a| {
            pods.iter()
                .filter(|b| b.node != a.node)
                .map(|b| a.ip.octets()[3] ^ b.ip.octets()[2])
        })
        .collect();
    seeds.sort_unstable();
    seeds.dedup();
    for seed in seeds {
        let plain = flannel_tests::pattern(8192, seed);
        for offset in [0, 3000, 6000] {
            let w = &plain[offset..offset + 32];
            ensure!(
                !pcap.windows(32).any(|p| p == w),
                "plaintext pod payload (seed {seed}) seen on the underlay"
            );
        }
    }
    ensure!(
        pcap.windows(2).any(|w| w == 51_820u16.to_be_bytes()),
        "no WireGuard (UDP 51820) traffic captured"
    );
    // A restarted agent adopts the running device (the same interface): traffic keeps flowing.
    let device = |tb: &Testbed| ip(&tb.nodes[0].netns, "-o link show flannel-wg");
    let index = |line: String| line.split(':').next().unwrap_or_default().to_string();
    let before = index(device(&tb)?);
    tb.stop_agent(0, nix::sys::signal::Signal::SIGKILL)?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], 256 * KIB)?;
    tb.start_agent(0)?;
    ensure!(index(device(&tb)?) == before, "flannel-wg was recreated");
    tb.all_pairs(64 * KIB)?;
    // A removed lease removes its peer: node 3 is unreachable from node 1, others still work.
    tb.write_leases(&[1, 2])?;
    wait_for("node 3's peer removed", Duration::from_secs(10), || {
        !can_connect(
            &tb.nodes[0].pods[0],
            &tb.nodes[2].pods[0],
            Duration::from_millis(500),
        )
        .unwrap_or(true)
    })?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], 64 * KIB)?;
    Ok(())
}

#[test]
fn netlink_dataplane_vxlan_is_flanneld_and_follows_leases() -> Result<()> {
    let tb = testbed(
        "nlvx",
        Backend::Vxlan {
            direct_routing: false,
        },
        &[Ebpf, Netlink, Stock],
        &[],
    )?;
    tb.all_pairs(256 * KIB)?;
    check_mtu(&tb, 50)?;
    let ns = &tb.nodes[1].netns;
    ensure!(
        !tb.nodes[1].pins().join("FLANNEL_CONFIG").exists(),
        "the netlink node pinned eBPF maps"
    );
    let dev = ip(ns, "-d link show flannel.1")?;
    ensure!(
        dev.contains("vxlan id 1 local 198.18.0.12 dev eth0")
            && dev.contains("dstport 8472")
            && dev.contains("nolearning")
            && dev.contains("mtu 1450")
            && dev.contains(&tb.nodes[1].vtep_mac),
        "flannel.1 as flanneld makes it:\n{dev}"
    );
    let addr = ip(ns, "addr show dev flannel.1")?;
    ensure!(addr.contains("10.244.2.0/32"), "{addr}");
    // flanneld's objects only: no headroom device on cni0.
    ensure!(
        ip(ns, "link show flannel-hdroom").is_err(),
        "the netlink node has the headroom device"
    );
    let check_peer = |peer: usize, present: bool| -> Result<()> {
        let n = &tb.nodes[peer];
        let gw = format!("10.244.{}.0", n.index);
        let neigh = ip(ns, "neigh show dev flannel.1")?;
        let fdb = in_ns(ns, "bridge", &["fdb", "show", "dev", "flannel.1"])?;
        let routes = ip(ns, "route show dev flannel.1")?;
        let has = (
            neigh.contains(&format!("{gw} lladdr {} PERMANENT", n.vtep_mac)),
            fdb.contains(&format!(
                "{} dst {} self permanent",
                n.vtep_mac, n.public_ip
            )),
            routes
                .lines()
                .any(|l| l.starts_with(&format!("{} via {gw} ", n.subnet)) && l.contains("onlink")),
        );
        ensure!(
            has == (present, present, present),
            "peer {}: expected present={present}, got {has:?}\n{neigh}\n{fdb}\n{routes}",
            n.index
        );
        Ok(())
    };
    check_peer(0, true)?;
    check_peer(2, true)?;
    // Removing a lease removes exactly its entries.
    tb.write_leases(&[1, 2])?;
    wait_for("node 3's entries removed", Duration::from_secs(10), || {
        check_peer(2, false).is_ok()
    })?;
    check_peer(0, true)?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], MIB)?;
    Ok(())
}

#[test]
fn without_bpf_privileges_the_agent_falls_back_to_netlink() -> Result<()> {
    let mut options = Options::backend(
        Backend::Vxlan {
            direct_routing: false,
        },
        &[Ebpf, NodeKind::NoBpf],
        1,
    );
    options.pods_per_node = 1;
    let tb = Testbed::start("nobpf", options)?;
    // Fell back: flanneld's device, and nothing pinned.
    ensure!(
        ip(&tb.nodes[1].netns, "link show flannel.1").is_ok(),
        "flannel.1 made"
    );
    ensure!(
        !tb.nodes[1].pins().join("FLANNEL_CONFIG").exists(),
        "the node without BPF privileges pinned maps"
    );
    tb.all_pairs(MIB)
}
