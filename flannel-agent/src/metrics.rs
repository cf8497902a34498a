//! Prometheus metrics (`/metrics`, `OpenMetrics` text): the datapath's per-reason counters read from
//! the pinned `FLANNEL_STATS` at each scrape, and the agent's own state kept in one registry.
//! flanneld exports no metrics; the names follow Prometheus conventions (`flannel_` prefix,
//! `_total` counters, base units).
use std::{
    path::PathBuf,
    sync::{
        LazyLock, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use crate::dataplane::ebpf;

type Labels = [(&'static str, String); 1];

/// The agent's metrics. One instance per process ([`METRICS`]).
pub struct Metrics {
    /// Leases the lease source currently reports (this node's included).
    pub leases: Gauge,
    /// Peers by how this node reaches them: `route` (a map or kernel route), `unreachable`
    /// (host-gw off this node's segment), `wireguard`.
    pub peers: Family<Labels, Gauge>,
    /// Reconciliations of the dataplane with a changed lease set, and how long they took.
    pub reconcile_seconds: Histogram,
    /// Reconciliations that failed (retried on the next change or repair pass).
    pub reconcile_errors: Counter,
    /// Errors talking to the lease source (API server, etcd, lease file) by source.
    pub lease_source_errors: Family<Labels, Counter>,
    /// Entries of the dataplane's maps by map (routes, nodes, endpoints, NAT) as last synced.
    pub map_entries: Family<Labels, Gauge>,
    /// The maps' capacities.
    pub map_capacity: Family<Labels, Gauge>,
    registry: Registry,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Set once the dataplane is programmed, the rules are in and subnet.env is written (`/readyz`).
pub static READY: AtomicBool = AtomicBool::new(false);

/// The pin directory whose `FLANNEL_STATS` the datapath counters come from (eBPF dataplane).
static PINS: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Exports the datapath counters of the pins under `root` from now on.
pub fn export_datapath(root: PathBuf) {
    *PINS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(root);
}

/// Marks the agent ready (or not) for `/readyz`.
pub fn set_ready(ready: bool) {
    READY.store(ready, Ordering::SeqCst);
}

#[must_use]
pub fn is_ready() -> bool {
    READY.load(Ordering::SeqCst)
}

/// Counts an error of lease source `source` (`kube`, `etcd`, `file`, `startup`).
pub fn source_error(source: &'static str) {
    METRICS
        .lease_source_errors
        .get_or_create(&label("source", source))
        .inc();
}

/// One label value.
#[must_use]
pub fn label(key: &'static str, value: impl Into<String>) -> Labels {
    [(key, value.into())]
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("flannel");
        let m = Self {
            leases: Gauge::default(),
            peers: Family::default(),
            // 100 µs to ~13 s.
            reconcile_seconds: Histogram::new(exponential_buckets(0.000_1, 4.0, 9)),
            reconcile_errors: Counter::default(),
            lease_source_errors: Family::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "leases",
            "Leases the lease source reports, this node's included",
            m.leases.clone(),
        );
        registry.register(
            "peers",
            "Peers by how this node reaches them",
            m.peers.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time to bring the dataplane to a changed lease set",
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed and are retried",
            m.reconcile_errors.clone(),
        );
        registry.register(
            "lease_source_errors",
            "Errors talking to the lease source (each followed by a retry or reconnect)",
            m.lease_source_errors.clone(),
        );
        registry.register(
            "map_entries",
            "Entries of the dataplane's maps as last synced",
            m.map_entries.clone(),
        );
        registry.register(
            "map_capacity",
            "Capacity of the dataplane's maps",
            m.map_capacity.clone(),
        );
        registry.register(
            "build",
            "The agent's version",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );
        registry.register_collector(Box::new(Datapath));
        Self { registry, ..m }
    }

    /// The `OpenMetrics` text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The datapath's per-reason packet and byte counters, read from the pins at each scrape.
#[derive(Debug)]
struct Datapath;

impl Collector for Datapath {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let root = PINS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let Some(stats) = root.and_then(|r| ebpf::read_stats_by_program(&r).ok()) else {
            return Ok(());
        };
        for (name, help, bytes) in [
            (
                "datapath_packets",
                "Packets the eBPF programs handled, by program and verdict or drop reason",
                false,
            ),
            (
                "datapath_bytes",
                "Bytes the eBPF programs handled, by program and verdict or drop reason",
                true,
            ),
        ] {
            let mut family = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            // Counters that never counted are left out: 5 programs × 47 reasons are mostly zero.
            for c in stats.iter().filter(|c| c.counter.packets > 0) {
                let value = if bytes {
                    c.counter.bytes
                } else {
                    c.counter.packets
                };
                let labels = [("program", c.program), ("reason", c.reason)];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
