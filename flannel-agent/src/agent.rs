//! The control loop: validate everything, then program the dataplane, then follow changes.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use aya::programs::TcAttachType;
use flannel_ebpf_common::{NodeConfig, RemoteNode, RemoteSubnet, backend, prog_name};
use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, info, warn};

use crate::{
    Error,
    backend::{Mac, vxlan},
    cli::{Args, SubnetMgr},
    config::{self, Backend, NetConf, VxlanConfig},
    dataplane::{
        Desired,
        ebpf::{self, EbpfDataplane},
        host_routes::{self, HostRoute},
    },
    iface::{self, ExtIface, Link, Netlink},
    lease::{Lease, static_file},
    subnet_env::SubnetEnv,
};

/// This node's lease and what the dataplane should hold, derived from a lease set.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub own: Lease,
    pub vtep_mac: Mac,
    pub desired: Desired,
}

impl Plan {
    /// Finds this node's lease (the one with its public IP) and turns the others into map
    /// entries. Leases of another backend are skipped with a warning, as flanneld does.
    pub fn new(
        leases: &[Lease],
        public_ip: Ipv4Addr,
        vx: &VxlanConfig,
        source: &Path,
    ) -> Result<Self, Error> {
        let own = leases
            .iter()
            .find(|l| l.public_ip == public_ip)
            .ok_or_else(|| {
                Error::config(
                    source,
                    "leases",
                    format!("no lease has PublicIP {public_ip} (this node's public IP)"),
                )
            })?;
        if own.backend_type != "vxlan" {
            return Err(Error::config(
                source,
                format!("lease of {public_ip}: BackendType"),
                format!(
                    "{:?}, but net-conf.json's backend is vxlan",
                    own.backend_type
                ),
            ));
        }
        let own_data = vxlan::lease_data(&own.backend_data)
            .map_err(|m| Error::config(source, format!("lease of {public_ip}"), m))?;
        if own_data.vni != vx.vni {
            warn!(
                lease_vni = own_data.vni,
                vni = vx.vni,
                "this node's lease advertises another VNI than net-conf.json"
            );
        }
        let mut desired = Desired::default();
        for lease in leases.iter().filter(|l| l.public_ip != public_ip) {
            if lease.backend_type != "vxlan" {
                warn!(subnet = %lease.subnet, backend = %lease.backend_type, "ignoring a non-vxlan lease");
                continue;
            }
            let data = vxlan::lease_data(&lease.backend_data)
                .map_err(|m| Error::config(source, format!("lease of {}", lease.public_ip), m))?;
            let mac = data.vtep_mac.0;
            desired.routes.insert(
                lease.subnet,
                RemoteSubnet {
                    public_ip: lease.public_ip.octets(),
                    vtep_mac: mac,
                    backend: backend::VXLAN,
                    _pad0: 0,
                },
            );
            desired.nodes.insert(
                lease.public_ip,
                RemoteNode {
                    vtep_mac: mac,
                    backend: backend::VXLAN,
                    _pad0: 0,
                },
            );
        }
        Ok(Self {
            own: own.clone(),
            vtep_mac: own_data.vtep_mac,
            desired,
        })
    }
}

/// The configuration map entry for this node.
#[must_use]
pub fn node_config(
    netconf: &NetConf,
    vx: &VxlanConfig,
    plan: &Plan,
    ext: &ExtIface,
    public_ip: Ipv4Addr,
    cni: Option<&Link>,
) -> NodeConfig {
    let cni_ifindex = cni.map_or(0, |l| l.index);
    let subnet = plan.own.subnet;
    NodeConfig {
        enabled: 1,
        backend: u32::from(backend::VXLAN),
        public_ip: public_ip.octets(),
        subnet_addr: subnet.network().octets(),
        subnet_mask: subnet.netmask().octets(),
        network_addr: netconf.network.network().octets(),
        network_mask: netconf.network.netmask().octets(),
        gateway_ip: gateway(subnet).octets(),
        vni: vx.vni,
        port: vx.port,
        _pad0: 0,
        uplink_mtu: ext.link.mtu,
        uplink_ifindex: ext.link.index,
        cni_ifindex,
        vtep_mac: plan.vtep_mac.0,
        uplink_mac: ext.link.mac,
        cni_mac: cni.map_or([0; 6], |l| l.mac),
        _pad1: [0; 2],
    }
}

/// The first address of a subnet: the `cni0` gateway.
#[must_use]
pub fn gateway(subnet: Ipv4Net) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(subnet.network()) + 1)
}

/// Runs the agent until SIGTERM/SIGINT (or performs `--cleanup` / `--stats`).
#[expect(
    clippy::too_many_lines,
    reason = "one linear start-up sequence and its loop; splitting would only pass its locals around"
)]
pub async fn run(args: &Args) -> Result<(), Error> {
    if args.cleanup {
        let removed = host_routes::remove_all(&Netlink::connect()?).await?;
        info!(routes = removed, "removed the routes of remote subnets");
        return ebpf::cleanup(&args.pin_dir, &args.subnet_file);
    }
    if args.stats {
        for (name, c) in ebpf::read_stats(&args.pin_dir)? {
            println!("{name:<26} {:>12} packets {:>16} bytes", c.packets, c.bytes);
        }
        return Ok(());
    }

    // Validate every input before touching the kernel: bad input leaves nothing half-programmed.
    let netconf = config::load(&args.net_config_path)?;
    let vx = match &netconf.backend {
        Backend::Vxlan(vx) => vx.clone(),
        Backend::Other(kind) => {
            return Err(Error::Unsupported(format!(
                "{}: Backend.Type {kind:?} is not implemented by this version of flannel-agent (it implements vxlan)",
                args.net_config_path.display()
            )));
        }
    };
    for (set, name) in [(vx.gbp, "GBP"), (vx.direct_routing, "DirectRouting")] {
        if set {
            return Err(Error::Unsupported(format!(
                "{}: Backend.{name} is not implemented by this version of flannel-agent",
                args.net_config_path.display()
            )));
        }
    }
    let leases_path = match args.subnet_mgr {
        SubnetMgr::Static => args
            .leases
            .clone()
            .ok_or_else(|| Error::Unsupported("--subnet-mgr static needs --leases FILE".into()))?,
    };
    let nl = Netlink::connect()?;
    let ext = iface::select(&nl, &args.iface, &args.iface_regex).await?;
    let public_ip = args.public_ip.unwrap_or(ext.addr);
    let leases = static_file::read(&leases_path, &netconf)?;
    let mut plan = Plan::new(&leases, public_ip, &vx, &leases_path)?;
    let subnet_env = |plan: &Plan| SubnetEnv {
        network: netconf.network,
        subnet: plan.own.subnet,
        mtu: vxlan::mtu(&vx, ext.link.mtu),
        ipmasq: args.ip_masq,
    };
    info!(
        interface = %ext.link.name, %public_ip, subnet = %plan.own.subnet, vtep_mac = %plan.vtep_mac,
        vni = vx.vni, port = vx.port, "using backend vxlan"
    );

    // Program the dataplane: maps first, then the configuration, then the links.
    let mut dp = EbpfDataplane::open(&args.pin_dir)?;
    if dp.config()?.enabled != 0 {
        info!(pins = %dp.pins().dir.display(), "adopting the pinned dataplane (no flush)");
    }
    let report = dp.sync(&plan.desired)?;
    info!(%report, leases = leases.len(), "synced remote subnets");
    let cni = nl.link_by_name(&args.cni_bridge).await?;
    let mut cni = cni;
    let mut cfg = node_config(&netconf, &vx, &plan, &ext, public_ip, cni.as_ref());
    dp.set_config(&cfg)?;
    dp.attach_tc(prog_name::FROM_WIRE, &ext.link, TcAttachType::Ingress)?;
    let xdp = dp.attach_xdp(&ext.link, args.decap)?;
    if let Some(cni) = &cni {
        attach_cni(&mut dp, cni)?;
    } else {
        warn!(bridge = %args.cni_bridge, "bridge not there yet (the CNI plugin creates it with the first pod); waiting for it");
    }
    subnet_env(&plan).write(&args.subnet_file)?;
    info!(
        subnet_file = %args.subnet_file.display(), decap = xdp.map_or("tc".to_string(), |m| format!("xdp ({m})")),
        pins = %dp.pins().dir.display(), "eBPF dataplane active"
    );

    let mut term = signal(SignalKind::terminate()).map_err(|source| Error::NetlinkIo {
        context: "installing the SIGTERM handler".into(),
        source,
    })?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(|source| Error::NetlinkIo {
        context: "installing the SIGINT handler".into(),
        source,
    })?;
    let pod_mtu = vxlan::mtu(&vx, ext.link.mtu);
    let mut routes_synced: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut seen = fingerprint(&leases_path);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = interrupt.recv() => break,
            _ = tick.tick() => {}
        }
        // The bridge appears with the first pod and may be recreated.
        match nl.link_by_name(&args.cni_bridge).await {
            Ok(Some(link)) if cni.as_ref() != Some(&link) => match attach_cni(&mut dp, &link) {
                Ok(()) => {
                    cfg.cni_ifindex = link.index;
                    cfg.cni_mac = link.mac;
                    dp.set_config(&cfg)?;
                    cni = Some(link);
                    routes_synced = None;
                }
                Err(e) => warn!("attaching to {}: {e}", link.name),
            },
            Ok(None) if cni.is_some() => {
                warn!(bridge = %args.cni_bridge, "bridge disappeared; decapsulated packets go to the stack until it is back");
                cfg.cni_ifindex = 0;
                dp.set_config(&cfg)?;
                cni = None;
            }
            Ok(_) => {}
            Err(e) => warn!("{e}"),
        }
        // Local pods behind the bridge: learnt so that their packets skip it.
        let endpoints = match &cni {
            Some(link) => nl.endpoints(link.index, plan.own.subnet).await,
            None => Ok(BTreeMap::new()),
        };
        match endpoints.and_then(|e| dp.sync_endpoints(&e)) {
            Ok(report) if !report.is_empty() => debug!(%report, "local endpoints"),
            Ok(_) => {}
            Err(e) => warn!("learning local endpoints: {e}"),
        }
        // The node's own routes into cni0: on every change, and every 10 s to repair them.
        if let Some(link) = &cni
            && routes_synced.is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            let want = host_routes(&plan);
            match host_routes::sync(
                &nl,
                link.index,
                netconf.network,
                plan.own.subnet,
                pod_mtu,
                &want,
            )
            .await
            {
                Ok(report) if !report.is_empty() => info!(%report, "routes of remote subnets"),
                Ok(_) => {}
                Err(e) => warn!("routes of remote subnets: {e}"),
            }
            routes_synced = Some(Instant::now());
        }
        // The lease file changed: re-read, validate, apply only the difference.
        let now = fingerprint(&leases_path);
        if now == seen {
            continue;
        }
        seen = now;
        let next = static_file::read(&leases_path, &netconf)
            .and_then(|leases| Plan::new(&leases, public_ip, &vx, &leases_path));
        match next {
            Err(e) => warn!("{e}; keeping the current leases"),
            Ok(next) if next == plan => {}
            Ok(next) => {
                let report = dp.sync(&next.desired)?;
                if next.own != plan.own || next.vtep_mac != plan.vtep_mac {
                    info!(subnet = %next.own.subnet, vtep_mac = %next.vtep_mac, "this node's lease changed");
                    cfg = node_config(&netconf, &vx, &next, &ext, public_ip, cni.as_ref());
                    dp.set_config(&cfg)?;
                    subnet_env(&next).write(&args.subnet_file)?;
                }
                info!(%report, "leases changed");
                plan = next;
                routes_synced = None;
            }
        }
    }
    info!(
        "stopping; the pinned programs and maps stay and keep forwarding (`flannel-agent --cleanup` removes them)"
    );
    Ok(())
}

/// Attaches the programs of the bridge: pods' traffic at ingress, the node's own at egress.
fn attach_cni(dp: &mut EbpfDataplane, cni: &Link) -> Result<(), Error> {
    dp.attach_tc(prog_name::FROM_PODS, cni, TcAttachType::Ingress)?;
    dp.attach_tc(prog_name::FROM_HOST, cni, TcAttachType::Egress)
}

/// The routes of the remote subnets in a plan, as flanneld shapes them (gateway `<subnet>.0`).
#[must_use]
pub fn host_routes(plan: &Plan) -> BTreeMap<Ipv4Net, HostRoute> {
    plan.desired
        .routes
        .iter()
        .map(|(net, r)| {
            (
                *net,
                HostRoute {
                    gateway: net.network(),
                    vtep_mac: r.vtep_mac,
                },
            )
        })
        .collect()
}

/// Identity of the lease file's current version (modification time, size, inode).
fn fingerprint(path: &PathBuf) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}
