//! The agent: start-up (validate every input, join the cluster through the lease source, start
//! the dataplane, install flanneld's rules, write subnet.env) and then one reconciler loop that
//! turns every lease set into a plan and hands it to the dataplane.
use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use flannel_ebpf_common::{MAX_ENDPOINTS, MAX_NODES, MAX_ROUTES};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    Error,
    backend::{self as backends, Mac, wireguard},
    cli::{Args, DataplaneKind},
    config::{self, Backend},
    dataplane::{
        self, Dataplane, Node,
        ebpf::{self, NatTimeouts},
        masq::Masquerade,
    },
    health,
    iface::{self, ExtIface, Netlink, RouteTable},
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
    dataplane::remove_all(&Netlink::connect()?, args).await
}

/// Runs the agent until SIGTERM/SIGINT (or performs `--cleanup` / `--stats` /
/// `--print-backend-data`).
pub async fn run(args: &Args) -> Result<(), Error> {
    if args.cleanup {
        return cleanup(args).await;
    }
    if args.stats {
        return print_stats(args);
    }
    if args.print_backend_data {
        return print_backend_data(args);
    }
    if args.healthz_port != 0 {
        // Up before the lease source is reached: /healthz answers while the agent waits for it.
        health::serve(SocketAddr::new(args.healthz_ip, args.healthz_port)).await?;
    }
    Agent::start(args).await?.reconcile().await
}

/// The running agent: this node, its lease source's watch, the plan in force and the dataplane
/// holding it.
struct Agent<'a> {
    args: &'a Args,
    nl: Netlink,
    node: Node<'a>,
    /// Names the lease set in errors.
    source: PathBuf,
    /// The public IP of this node's lease.
    lease_ip: Ipv4Addr,
    wg_key: Option<wireguard::Key>,
    leases: watch::Receiver<Vec<Lease>>,
    /// The main routing table, which decides which peers are direct.
    table: RouteTable,
    plan: Plan,
    dataplane: Box<dyn Dataplane>,
    rules: Rules,
}

impl<'a> Agent<'a> {
    /// Start-up: every input validated and the cluster joined before anything is programmed;
    /// then the dataplane, flanneld's rules and subnet.env.
    async fn start(args: &'a Args) -> Result<Self, Error> {
        let mut source = lease::open(args).await?;
        let netconf = source.network_config().await?;
        check_implemented(&netconf.backend, &source.config_name())?;
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
        SubnetEnv::prepare(&args.subnet_file)?;

        let nl = Netlink::connect()?;
        let ext = iface::select(&nl, &args.iface, &args.iface_regex).await?;
        let check_public_ip = |ip| check_own_public_ip(&netconf.backend, ip, &ext);
        check_public_ip(args.public_ip.unwrap_or(ext.addr))?;
        let fresh_mac = random_mac()?;
        let backend_data = |existing: Option<&Lease>| {
            netconf
                .backend
                .advertised(existing, wg_key.as_ref(), fresh_mac)
        };
        let mut joined = source
            .join(Join {
                netconf: &netconf,
                public_ip: args.public_ip.unwrap_or(ext.addr),
                backend_data: &backend_data,
                check_public_ip: &check_public_ip,
            })
            .await?;
        let leases = joined.leases.borrow_and_update().clone();
        let table = nl.route_table().await?;
        let plan = Plan::new(
            &leases,
            &netconf.backend,
            joined.lease_ip,
            &table,
            wg_key.as_ref(),
            &source.name(),
        )?;
        plan.report_unreachable(None);
        if args.dataplane != DataplaneKind::Netlink
            && !matches!(netconf.backend, Backend::Wireguard(_))
        {
            ebpf::check_capacity(&plan.desired)
                .map_err(|e| Error::config(&source.name(), "leases", e))?;
        }
        let node = Node {
            args,
            pod_mtu: netconf.backend.mtu(ext.link.mtu),
            masq: args.ip_masq.then(|| masquerade(args, &ext)),
            netconf,
            ext,
            public_ip: joined.public_ip,
        };
        info!(
            interface = %node.ext.link.name, public_ip = %node.public_ip, subnet = %plan.own.subnet,
            backend = node.netconf.backend.name(), mtu = node.pod_mtu, "this node"
        );

        // Programming starts here.
        let mut dataplane = dataplane::start(&nl, &node, &plan, wg_private.as_ref()).await?;
        let report = dataplane.apply(&nl, &node, &plan).await?;
        let rules = Rules::start(&node, dataplane.masquerades(), &plan).await?;
        subnet_env(&node, &plan).write(&args.subnet_file)?;
        record(&plan, leases.len(), args.ip_masq_table_size);
        metrics::set_ready(true);
        info!(
            dataplane = dataplane.name(), backend = node.netconf.backend.name(), %report,
            subnet_file = %args.subnet_file.display(), "dataplane active"
        );
        source.complete();
        Ok(Self {
            args,
            nl,
            node,
            source: source.name(),
            lease_ip: joined.lease_ip,
            wg_key,
            leases: joined.leases,
            table,
            plan,
            dataplane,
            rules,
        })
    }

    /// The reconciler: every lease change (and every 10 s, the routing table) becomes a plan
    /// applied to the dataplane; once a second (and on neighbour changes) the dataplane follows
    /// what changes without a plan, repairing drift every 10 s. Until SIGTERM or SIGINT.
    async fn reconcile(mut self) -> Result<(), Error> {
        let result = self.reconcile_until_stopped().await;
        // Whatever ended the loop (a signal or an error), leave nothing that only a running
        // agent keeps current.
        if let Err(e) = self.dataplane.stop() {
            warn!("{e}");
        }
        result
    }

    async fn reconcile_until_stopped(&mut self) -> Result<(), Error> {
        let signal_err = |source| Error::NetlinkIo {
            context: "installing the SIGTERM/SIGINT handlers".into(),
            source,
        };
        let mut term = signal(SignalKind::terminate()).map_err(signal_err)?;
        let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_err)?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let (mut repaired, mut table_read) = (Instant::now(), Instant::now());
        // Neighbour changes wake the loop at once (the eBPF dataplane learns a new pod from its
        // first ARP exchange); without the subscription the 1 s tick still learns it.
        let mut neighbours = Netlink::neighbour_events(true)
            .inspect_err(|e| warn!("{e}; local pods are learnt by polling once a second"))
            .ok();
        loop {
            let mut changed = false;
            tokio::select! {
                _ = term.recv() => break,
                _ = interrupt.recv() => break,
                r = self.leases.changed() => {
                    r.map_err(|_| Error::Unsupported("the lease source stopped".into()))?;
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
            if !changed
                && let Err(e) = self
                    .dataplane
                    .tick(&self.nl, &self.node, &self.plan, repair)
                    .await
            {
                warn!("{e}");
            }
            let reread_table = table_read.elapsed() >= Duration::from_secs(10);
            if reread_table {
                table_read = Instant::now();
                match self.nl.route_table().await {
                    Ok(t) => self.table = t,
                    Err(e) => warn!("{e}"),
                }
            }
            if changed || reread_table {
                self.replan().await?;
            }
        }
        info!(
            dataplane = self.dataplane.name(),
            "stopping; the dataplane stays and keeps forwarding (`flannel-agent --cleanup` removes it)"
        );
        Ok(())
    }

    /// Plans from the current lease set and applies only the difference; a plan that cannot be
    /// made or applied leaves the one in force (retried at the next change or repair pass).
    async fn replan(&mut self) -> Result<(), Error> {
        let leases = self.leases.borrow_and_update().clone();
        let next = match Plan::new(
            &leases,
            &self.node.netconf.backend,
            self.lease_ip,
            &self.table,
            self.wg_key.as_ref(),
            &self.source,
        ) {
            Err(e) => {
                warn!("{e}; keeping the current leases");
                return Ok(());
            }
            Ok(next) if next == self.plan => return Ok(()),
            Ok(next) => next,
        };
        next.report_unreachable(Some(&self.plan));
        let started = Instant::now();
        let applied = self.dataplane.apply(&self.nl, &self.node, &next).await;
        metrics::METRICS
            .reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        let report = match applied {
            Ok(r) => r,
            Err(e) => {
                metrics::METRICS.reconcile_errors.inc();
                warn!(
                    "applying the leases of {}: {e}; will retry",
                    self.source.display()
                );
                return Ok(());
            }
        };
        if next.own != self.plan.own {
            info!(subnet = %next.own.subnet, "this node's lease changed");
            self.rules.restart(&self.node, &next).await?;
            subnet_env(&self.node, &next).write(&self.args.subnet_file)?;
        }
        info!(%report, leases = leases.len(), took = ?started.elapsed(), "leases changed");
        record(&next, leases.len(), self.args.ip_masq_table_size);
        self.plan = next;
        Ok(())
    }
}

/// Backends flannel knows that this agent does not implement are refused at start-up.
fn check_implemented(backend: &Backend, config_name: &str) -> Result<(), Error> {
    match backend {
        Backend::Other(kind) => Err(Error::Unsupported(format!(
            "{config_name}: Backend.Type {kind:?} is not implemented by flannel-agent (it implements vxlan, host-gw, ipip, udp and wireguard)"
        ))),
        Backend::Vxlan(vx) if vx.gbp => Err(Error::Unsupported(format!(
            "{config_name}: Backend.GBP is not implemented by flannel-agent"
        ))),
        _ => Ok(()),
    }
}

/// The eBPF masquerade's settings from the `--ip-masq*` flags.
fn masquerade(args: &Args, ext: &ExtIface) -> Masquerade {
    Masquerade {
        addr: ext.addr,
        ports: args.ip_masq_port_range,
        fully_random: !args.ip_masq_fully_random_disable,
        timeouts: NatTimeouts {
            tcp_established: Duration::from_secs(args.ip_masq_tcp_timeout),
            udp_replied: Duration::from_secs(args.ip_masq_udp_timeout),
            other: Duration::from_secs(args.ip_masq_other_timeout),
        },
    }
}

/// subnet.env for this node under `plan`.
fn subnet_env(node: &Node<'_>, plan: &Plan) -> SubnetEnv {
    SubnetEnv {
        network: node.netconf.network,
        subnet: plan.own.subnet,
        mtu: node.pod_mtu,
        ipmasq: node.args.ip_masq,
    }
}

/// flanneld's masquerade rules where the kernel forwards pod traffic (a dataplane that
/// masquerades itself needs none), its forward rules everywhere, kept in place in the background.
struct Rules {
    engine: Engine,
    kernel_masquerades: bool,
    keeper: tokio::task::JoinHandle<()>,
}

impl Rules {
    async fn start(
        node: &Node<'_>,
        dataplane_masquerades: bool,
        plan: &Plan,
    ) -> Result<Self, Error> {
        let engine = if node.netconf.enable_nftables {
            Engine::Nftables
        } else {
            Engine::Iptables
        };
        let kernel_masquerades = node.args.ip_masq && !dataplane_masquerades;
        let keeper = start_rules(
            engine,
            rule_set(node, kernel_masquerades, plan),
            resync(node),
        )
        .await?;
        Ok(Self {
            engine,
            kernel_masquerades,
            keeper,
        })
    }

    /// After this node's lease changed: the rules of the new subnet.
    async fn restart(&mut self, node: &Node<'_>, plan: &Plan) -> Result<(), Error> {
        self.keeper.abort();
        self.keeper = start_rules(
            self.engine,
            rule_set(node, self.kernel_masquerades, plan),
            resync(node),
        )
        .await?;
        Ok(())
    }
}

fn rule_set(node: &Node<'_>, masquerade: bool, plan: &Plan) -> RuleSet {
    RuleSet {
        cluster: node.netconf.network,
        pod: plan.own.subnet,
        masquerade,
        fully_random: !node.args.ip_masq_fully_random_disable,
        forward: node.args.iptables_forward_rules,
    }
}

fn resync(node: &Node<'_>) -> Duration {
    Duration::from_secs(node.args.iptables_resync)
}

/// `--stats`: the pinned counters and the masquerade table's occupancy.
fn print_stats(args: &Args) -> Result<(), Error> {
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
    Ok(())
}

/// `--print-backend-data`: what a static lease file needs for this node, from net-conf.json
/// without any lease source.
fn print_backend_data(args: &Args) -> Result<(), Error> {
    let netconf = config::load(&args.net_config_path)?;
    let data = match &netconf.backend {
        Backend::Wireguard(wg) => {
            let (key, _) = wireguard::load_or_generate(&args.wg_key_file)?;
            wireguard::advertised(&key.public(), wg.listen_port)
        }
        Backend::Vxlan(_) => {
            return Err(Error::Unsupported(
                "vxlan: the VtepMAC is this node's lease's own (static leases: pick a unique MAC)"
                    .into(),
            ));
        }
        _ => serde_json::Value::Null,
    };
    println!("{data}");
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
