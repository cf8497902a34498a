//! The agent: start-up (validate every input, join the cluster through the lease source, start
//! the dataplane, install flanneld's rules, write subnet.env) and then one reconciler loop that
//! turns every lease set into a plan and hands it to the dataplane.
use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use flannel_ebpf_common::{MAX_ENDPOINTS, MAX_NODES, MAX_ROUTES};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    Error,
    backend::{self as backends, Mac, wireguard},
    cli::{Args, DataplaneKind},
    config::{self, Backend},
    dataplane::{
        self, Node,
        ebpf::{self, NatTimeouts},
        masq::{self, Masquerade},
        netlink as kernel, routes,
        wireguard::WireguardDevice,
    },
    health,
    iface::{self, ExtIface, Netlink},
    lease::{self, Join, Lease},
    metrics,
    plan::Plan,
    subnet_env::SubnetEnv,
    trafficmngr::{self, Engine, RuleSet},
};

/// Checks this node's public IP before it is published: an address a node can have and, for
/// host-gw (as flanneld: peers route to the public IP), the uplink's own.
fn check_own_public_ip(
    backend: &Backend,
    public_ip: Ipv4Addr,
    ext: &ExtIface,
) -> Result<(), Error> {
    backends::check_public_ip(public_ip)
        .map_err(|e| Error::Unsupported(format!("this node: {e}")))?;
    if *backend == Backend::HostGw && public_ip != ext.addr {
        return Err(Error::Unsupported(format!(
            "host-gw: the public IP {public_ip} is not the address of {} ({}); host-gw needs them equal",
            ext.link.name, ext.addr
        )));
    }
    Ok(())
}

/// A random locally administered unicast MAC (a new VTEP), from the OS's random source: a failed
/// read is an error, never a MAC every node would share.
fn random_mac() -> Result<Mac, Error> {
    let mut mac = [0u8; 6];
    getrandom::fill(&mut mac)
        .map_err(|e| Error::Unsupported(format!("reading the OS's random source: {e}")))?;
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(Mac(mac))
}

/// Removes everything the agent created (`--cleanup`).
async fn cleanup(args: &Args) -> Result<(), Error> {
    let nl = Netlink::connect()?;
    let removed = routes::remove_all(&nl).await?;
    info!(routes = removed, "removed the routes of remote subnets");
    let devices = kernel::remove_devices(&nl).await?;
    if devices > 0 {
        info!(devices, "removed the flannel.<VNI> VXLAN devices");
    }
    if WireguardDevice::remove(&nl).await? {
        info!("removed the flannel-wg device");
    }
    for engine in [Engine::Iptables, Engine::Nftables] {
        match trafficmngr::manager(engine).cleanup() {
            Ok(()) => info!(%engine, "removed flanneld's masquerade and forward rules (if any)"),
            Err(e @ trafficmngr::RulesError::MissingBinary { .. }) => {
                info!(%engine, "no rules to remove: {e}");
            }
            Err(e) => {
                return Err(Error::Unsupported(format!(
                    "removing the {engine} rules: {e}"
                )));
            }
        }
    }
    if let Err(e) = masq::release_ports(args.ip_masq_port_range) {
        warn!("{e}");
    }
    ebpf::cleanup(&args.pin_dir, &args.subnet_file)
}

/// Runs the agent until SIGTERM/SIGINT (or performs `--cleanup` / `--stats` /
/// `--print-backend-data`).
#[expect(
    clippy::too_many_lines,
    reason = "one linear start-up sequence and its loop; splitting would only pass its locals around"
)]
pub async fn run(args: &Args) -> Result<(), Error> {
    if args.cleanup {
        return cleanup(args).await;
    }
    if args.stats {
        let by_program = ebpf::read_stats_by_program(&args.pin_dir)?;
        for (name, c) in ebpf::totals(&by_program) {
            println!("{name:<26} {:>12} packets {:>16} bytes", c.packets, c.bytes);
        }
        println!("by program:");
        for c in by_program.iter().filter(|c| c.counter.packets > 0) {
            let name = format!("{}/{}", c.program, c.reason);
            println!(
                "{name:<40} {:>12} packets {:>16} bytes",
                c.counter.packets, c.counter.bytes
            );
        }
        let nat = ebpf::nat_occupancy(&args.pin_dir)?;
        println!(
            "masquerade table: {} of {} entries ({} flows, {} node ports claimed)",
            nat.entries, nat.capacity, nat.flows, nat.host_claims
        );
        return Ok(());
    }

    if args.print_backend_data {
        // What a static lease file needs: from net-conf.json, without any lease source.
        let netconf = config::load(&args.net_config_path)?;
        let data = match &netconf.backend {
            Backend::Wireguard(wg) => {
                let (key, _) = wireguard::load_or_generate(&args.wg_key_file)?;
                wireguard::advertised(&key.public(), wg.listen_port)
            }
            Backend::Vxlan(_) => {
                return Err(Error::Unsupported(
                    "vxlan: the VtepMAC is this node's lease's own (static leases: pick a unique MAC)".into(),
                ));
            }
            _ => serde_json::Value::Null,
        };
        println!("{data}");
        return Ok(());
    }
    if args.healthz_port != 0 {
        // Up before the lease source is reached: /healthz answers while the agent waits for it.
        health::serve(SocketAddr::new(args.healthz_ip, args.healthz_port)).await?;
    }
    // Validate every input before touching the kernel: bad input leaves nothing half-programmed.
    let mut source = lease::open(args).await?;
    let netconf = source.network_config().await?;
    let config_name = source.config_name();
    match &netconf.backend {
        Backend::Other(kind) => {
            return Err(Error::Unsupported(format!(
                "{config_name}: Backend.Type {kind:?} is not implemented by flannel-agent (it implements vxlan, host-gw, ipip, udp and wireguard)"
            )));
        }
        Backend::Vxlan(vx) if vx.gbp => {
            return Err(Error::Unsupported(format!(
                "{config_name}: Backend.GBP is not implemented by flannel-agent"
            )));
        }
        _ => {}
    }
    // The private key stays in `wg_private`; plans and leases only see the public one.
    let wg_private = match &netconf.backend {
        Backend::Wireguard(_) => {
            let (key, generated) = wireguard::load_or_generate(&args.wg_key_file)?;
            if generated {
                info!(path = %args.wg_key_file.display(), "generated this node's WireGuard key");
            }
            Some(key)
        }
        _ => None,
    };
    let wg_key = wg_private.as_ref().map(wireguard::Key::public);

    // The subnet file must be writable before anything is programmed.
    SubnetEnv::prepare(&args.subnet_file)?;

    let nl = Netlink::connect()?;
    let ext = iface::select(&nl, &args.iface, &args.iface_regex).await?;
    let public_ip = args.public_ip.unwrap_or(ext.addr);
    let check_public_ip = |ip| check_own_public_ip(&netconf.backend, ip, &ext);
    check_public_ip(public_ip)?;
    let fresh_mac = random_mac()?;
    let backend_data = |existing: Option<&Lease>| {
        netconf
            .backend
            .advertised(existing, wg_key.as_ref(), fresh_mac)
    };
    let joined = source
        .join(Join {
            netconf: &netconf,
            public_ip,
            backend_data: &backend_data,
            check_public_ip: &check_public_ip,
        })
        .await?;
    let (public_ip, lease_ip, mut leases_rx) = (joined.public_ip, joined.lease_ip, joined.leases);
    let leases = leases_rx.borrow_and_update().clone();
    let source_name = source.name();
    let mut table = nl.route_table().await?;
    let mut plan = Plan::new(
        &leases,
        &netconf.backend,
        lease_ip,
        &table,
        wg_key.as_ref(),
        &source_name,
    )?;
    plan.report_unreachable(None);
    if args.dataplane != DataplaneKind::Netlink && !matches!(netconf.backend, Backend::Wireguard(_))
    {
        // Before anything is programmed.
        ebpf::check_capacity(&plan.desired)
            .map_err(|e| Error::config(&source_name, "leases", e))?;
    }
    let pod_mtu = netconf.backend.mtu(ext.link.mtu);
    let masq = args.ip_masq.then(|| Masquerade {
        addr: ext.addr,
        ports: args.ip_masq_port_range,
        fully_random: !args.ip_masq_fully_random_disable,
        timeouts: NatTimeouts {
            tcp_established: Duration::from_secs(args.ip_masq_tcp_timeout),
            udp_replied: Duration::from_secs(args.ip_masq_udp_timeout),
            other: Duration::from_secs(args.ip_masq_other_timeout),
        },
    });
    let node = Node {
        args,
        netconf,
        ext,
        public_ip,
        pod_mtu,
        masq,
    };
    info!(
        interface = %node.ext.link.name, %public_ip, subnet = %plan.own.subnet, backend = node.netconf.backend.name(),
        mtu = pod_mtu, "this node"
    );

    let mut active = dataplane::start(&nl, &node, &plan, wg_private.as_ref()).await?;
    let report = active.apply(&nl, &node, &plan).await?;
    // flanneld's masquerade rules where the kernel forwards pod traffic (the eBPF dataplane
    // masquerades itself), its forward rules everywhere.
    let kernel_masquerades = args.ip_masq && !active.masquerades();
    let rule_set = |plan: &Plan| RuleSet {
        cluster: node.netconf.network,
        pod: plan.own.subnet,
        masquerade: kernel_masquerades,
        fully_random: !args.ip_masq_fully_random_disable,
        forward: args.iptables_forward_rules,
    };
    let engine = if node.netconf.enable_nftables {
        Engine::Nftables
    } else {
        Engine::Iptables
    };
    let resync = Duration::from_secs(args.iptables_resync);
    let mut rules = start_rules(engine, rule_set(&plan), resync).await?;
    let subnet_env = |plan: &Plan| SubnetEnv {
        network: node.netconf.network,
        subnet: plan.own.subnet,
        mtu: pod_mtu,
        ipmasq: args.ip_masq,
    };
    subnet_env(&plan).write(&args.subnet_file)?;
    record(&plan, leases.len(), args.ip_masq_table_size);
    metrics::set_ready(true);
    info!(
        dataplane = active.name(), backend = node.netconf.backend.name(), %report,
        subnet_file = %args.subnet_file.display(), "dataplane active"
    );

    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::NetlinkIo {
        context: "installing the SIGTERM handler".into(),
        source,
    })?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| Error::NetlinkIo {
        context: "installing the SIGINT handler".into(),
        source,
    })?;
    source.complete();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut repaired = Instant::now();
    let mut table_read = Instant::now();
    // Neighbour changes wake the loop at once (the eBPF dataplane learns a new pod from its first
    // ARP exchange); without the subscription the 1 s tick still learns it.
    let mut neighbours = match Netlink::neighbour_events() {
        Ok(events) => Some(events),
        Err(e) => {
            warn!("{e}; local pods are learnt by polling once a second");
            None
        }
    };
    loop {
        let mut changed = false;
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            r = leases_rx.changed() => {
                if r.is_err() {
                    return Err(Error::Unsupported("the lease source stopped".into()));
                }
                changed = true;
            }
            _ = tick.tick() => {}
            burst = async {
                match neighbours.as_mut() {
                    Some(events) => events.next_burst(Duration::from_millis(5)).await,
                    None => std::future::pending().await,
                }
            } => {
                if burst.is_none() {
                    warn!("neighbour notifications ended; local pods are learnt by polling once a second");
                    neighbours = None;
                }
            }
        }
        let repair = repaired.elapsed() >= Duration::from_secs(10);
        if repair {
            repaired = Instant::now();
        }
        if !changed && let Err(e) = active.tick(&nl, &node, &plan, repair).await {
            warn!("{e}");
        }
        // The leases changed (or, every 10 s, the routes that decide which peers are direct):
        // plan again, apply only the difference.
        let reread_table = table_read.elapsed() >= Duration::from_secs(10);
        if !changed && !reread_table {
            continue;
        }
        if reread_table {
            table_read = Instant::now();
            match nl.route_table().await {
                Ok(t) => table = t,
                Err(e) => warn!("{e}"),
            }
        }
        let leases = leases_rx.borrow_and_update().clone();
        match Plan::new(
            &leases,
            &node.netconf.backend,
            lease_ip,
            &table,
            wg_key.as_ref(),
            &source_name,
        ) {
            Err(e) => warn!("{e}; keeping the current leases"),
            Ok(next) if next == plan => {}
            Ok(next) => {
                next.report_unreachable(Some(&plan));
                let started = Instant::now();
                let applied = active.apply(&nl, &node, &next).await;
                metrics::METRICS
                    .reconcile_seconds
                    .observe(started.elapsed().as_secs_f64());
                let report = match applied {
                    Ok(r) => r,
                    Err(e) => {
                        metrics::METRICS.reconcile_errors.inc();
                        // Transient (e.g. netlink): keep the plan we had, retry on the next change
                        // or repair pass.
                        warn!(
                            "applying the leases of {}: {e}; will retry",
                            source_name.display()
                        );
                        continue;
                    }
                };
                if next.own != plan.own {
                    info!(subnet = %next.own.subnet, "this node's lease changed");
                    rules.abort();
                    rules = start_rules(engine, rule_set(&next), resync).await?;
                    subnet_env(&next).write(&args.subnet_file)?;
                }
                info!(%report, leases = leases.len(), took = ?started.elapsed(), "leases changed");
                record(&next, leases.len(), args.ip_masq_table_size);
                plan = next;
            }
        }
    }
    info!(
        dataplane = active.name(),
        "stopping; the dataplane stays and keeps forwarding (`flannel-agent --cleanup` removes it)"
    );
    Ok(())
}

/// Publishes what `plan` (from `leases` leases) holds as metrics.
fn record(plan: &Plan, leases: usize, nat_entries: u32) {
    let m = &metrics::METRICS;
    m.leases.set(i64::try_from(leases).unwrap_or(i64::MAX));
    let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    for (kind, n) in [
        ("route", plan.desired.routes.len()),
        ("unreachable", plan.unreachable.len()),
        ("wireguard", plan.wg_peers.len()),
    ] {
        m.peers
            .get_or_create(&metrics::label("kind", kind))
            .set(count(n));
    }
    // Endpoints and NAT entries are counted where they are synced and collected.
    for (map, n) in [
        ("routes", plan.desired.routes.len()),
        ("nodes", plan.desired.nodes.len()),
    ] {
        m.map_entries
            .get_or_create(&metrics::label("map", map))
            .set(count(n));
    }
    for (map, capacity) in [
        ("routes", MAX_ROUTES),
        ("nodes", MAX_NODES),
        ("endpoints", MAX_ENDPOINTS),
        ("nat", nat_entries),
    ] {
        m.map_capacity
            .get_or_create(&metrics::label("map", map))
            .set(i64::from(capacity));
    }
}

/// Installs flanneld's masquerade/forward rules with `engine` (removing the other engine's) and
/// keeps them in place every `resync` in the background; the handle stops that.
async fn start_rules(
    engine: Engine,
    rules: RuleSet,
    resync: Duration,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let first = rules.clone();
    tokio::task::spawn_blocking(move || trafficmngr::setup(engine, &first))
        .await
        .map_err(|e| Error::Unsupported(format!("installing the {engine} rules: {e}")))?
        .map_err(|e| Error::Unsupported(format!("installing the {engine} rules: {e}")))?;
    Ok(tokio::spawn(async move {
        let Err(e) = trafficmngr::ensure_and_resync(engine, rules, resync).await;
        warn!("keeping the {engine} rules in place: {e}");
    }))
}
