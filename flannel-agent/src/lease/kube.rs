//! The Kubernetes subnet manager (flannel's pkg/subnet/kube), over the API's HTTP endpoints.
//!
//! - This node's subnet is its `spec.podCIDR`; its lease is published in its annotations
//!   (`<prefix>/backend-type`, `backend-data`, `public-ip`, `kube-subnet-manager: "true"`), as a
//!   strategic-merge patch of the node's status subresource, as flanneld does; `public-ip-overwrite`
//!   replaces the public IP and `node-public-ip` (read at start-up) overrides `--public-ip`.
//! - Once the dataplane is up, the node condition `NetworkUnavailable=False` (reason
//!   `FlannelIsUp`) is set.
//! - All nodes are listed and watched (`resourceVersion`, bookmarks); a watch that ends is resumed
//!   from the last version seen, and one that expired (410 Gone) is replaced by a fresh list.
//!   Nodes without the `kube-subnet-manager` annotation, a podCIDR or a public IP are skipped with
//!   a log line. An API error never empties the lease set: the dataplane keeps what it has.
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::Duration,
};

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, Config,
    api::{Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use futures::future::LocalBoxFuture;

use super::{Join, Joined, Lease, LeaseSource, own_lease_seen};
use crate::{Error, backoff::retry, cli::Args, config::NetConf};

/// Leases from the nodes of a Kubernetes cluster (`--kube-subnet-mgr`); the network configuration
/// from net-conf.json (kube-flannel-cfg's `net-conf.json`, mounted).
pub struct KubeSource {
    mgr: KubeManager,
    net_config: PathBuf,
}

impl KubeSource {
    pub async fn new(args: &Args) -> Result<Self, Error> {
        let node = args.node_name.clone().ok_or_else(|| {
            Error::Unsupported("--kube-subnet-mgr needs --node-name (or NODE_NAME)".into())
        })?;
        let client = KubeClient::new(
            args.kube_api_url.as_deref(),
            args.kubeconfig_file.as_deref(),
        )
        .await?;
        Ok(Self {
            mgr: KubeManager {
                client,
                node,
                annotations: Annotations::new(&args.kube_annotation_prefix)?,
            },
            net_config: args.net_config_path.clone(),
        })
    }
}

impl LeaseSource for KubeSource {
    fn name(&self) -> PathBuf {
        PathBuf::from(format!("node {}", self.mgr.node))
    }

    fn config_name(&self) -> String {
        self.net_config.display().to_string()
    }

    fn network_config(&self) -> LocalBoxFuture<'_, Result<NetConf, Error>> {
        Box::pin(std::future::ready(crate::config::load(&self.net_config)))
    }

    /// This node's subnet from its podCIDR, its lease published in its annotations, all nodes
    /// watched. Waits (with back-off, saying so) while the API is unreachable or the node has no
    /// podCIDR yet.
    fn join<'a>(&'a mut self, join: Join<'a>) -> LocalBoxFuture<'a, Result<Joined, Error>> {
        Box::pin(async move {
            let mgr = &self.mgr;
            let what = format!(
                "the Kubernetes API at {} (node {})",
                mgr.client.server(),
                mgr.node
            );
            let node = retry(&what, || async {
                let node = mgr.client.get_node(&mgr.node).await?;
                if pod_cidr(&node).is_none() {
                    return Err(Error::Api {
                        context: format!("node {}", mgr.node),
                        message: "no podCIDR assigned yet".into(),
                    });
                }
                Ok(node)
            })
            .await;
            let subnet = pod_cidr(&node).expect("checked above");
            if !join.netconf.network.contains(&subnet) {
                return Err(Error::Unsupported(format!(
                    "node {}: podCIDR {subnet} is outside the Network {}",
                    mgr.node, join.netconf.network
                )));
            }
            let annotation = |key: &str| {
                node["metadata"]["annotations"][key]
                    .as_str()
                    .filter(|s| !s.is_empty())
                    .and_then(|s| s.parse::<Ipv4Addr>().ok())
            };
            let mut public_ip = join.public_ip;
            if let Some(ip) = annotation(&mgr.annotations.node_public_ip) {
                info!(%ip, "public IP from the node-public-ip annotation");
                // Validated before anything is published.
                (join.check_public_ip)(ip)?;
                public_ip = ip;
            }
            let lease_ip = annotation(&mgr.annotations.public_ip_overwrite).unwrap_or(public_ip);
            let existing = node_lease(&node, &mgr.annotations).ok();
            let want = Publish {
                backend_type: join.netconf.backend.lease_type().to_string(),
                backend_data: (join.backend_data)(existing.as_ref()),
                public_ip,
            };
            retry(&what, || async {
                let node = mgr.client.get_node(&mgr.node).await?;
                mgr.publish(&node, &want).await
            })
            .await;
            let (tx, mut leases) = watch::channel(Vec::new());
            mgr.watch(tx);
            own_lease_seen(&mut leases, lease_ip).await?;
            Ok(Joined {
                public_ip,
                lease_ip,
                leases,
            })
        })
    }

    fn complete(&self) {
        let mgr = self.mgr.clone();
        tokio::spawn(async move {
            retry("the Kubernetes API (node condition)", || {
                mgr.set_network_available()
            })
            .await;
            info!(node = %mgr.node, "node condition NetworkUnavailable=False (FlannelIsUp)");
        });
    }
}

/// flannel's default annotation prefix.
pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// The annotation names under a prefix (pkg/subnet/kube/annotations.go).
#[derive(Debug, Clone)]
pub struct Annotations {
    pub managed: String,
    pub backend_type: String,
    pub backend_data: String,
    pub public_ip: String,
    pub public_ip_overwrite: String,
    pub node_public_ip: String,
}

impl Annotations {
    /// Names under `prefix`, completed as flannel does (`fqdn` → `fqdn/`, `fqdn/x` → `fqdn/x-`).
    pub fn new(prefix: &str) -> Result<Self, Error> {
        let slashes = prefix.matches('/').count();
        if slashes > 1 || prefix.is_empty() {
            return Err(Error::Unsupported(format!(
                "--kube-annotation-prefix {prefix:?}: must be fqdn[/name] with at most one slash"
            )));
        }
        let mut p = prefix.to_string();
        if slashes == 0 {
            p.push('/');
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        Ok(Self {
            managed: format!("{p}kube-subnet-manager"),
            backend_type: format!("{p}backend-type"),
            backend_data: format!("{p}backend-data"),
            public_ip: format!("{p}public-ip"),
            public_ip_overwrite: format!("{p}public-ip-overwrite"),
            node_public_ip: format!("{p}node-public-ip"),
        })
    }
}

fn api_err(context: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::Api {
        context: context.into(),
        message: message.to_string(),
    }
}

/// An API server connection (kube-rs): in-cluster (service account), or from a kubeconfig with
/// everything kube-rs supports (exec and auth-provider credential plugins, client certificates,
/// `tls-server-name`, `KUBECONFIG` lists merged).
#[derive(Clone)]
pub struct KubeClient {
    nodes: Api<Node>,
    server: String,
}

/// The User-Agent of our requests.
const USER_AGENT: &str = concat!("flannel-agent/", env!("CARGO_PKG_VERSION"));

impl KubeClient {
    /// `--kube-api-url` and `--kubeconfig-file` as flanneld takes them: the kubeconfig file (its
    /// server replaced by the URL, if given); else the URL with the service account's
    /// credentials if there are any; else kube-rs's inference (`KUBECONFIG`, merged, or
    /// `~/.kube/config`, else in-cluster).
    pub async fn new(api_url: Option<&str>, kubeconfig: Option<&Path>) -> Result<Self, Error> {
        let mut config = if let Some(path) = kubeconfig {
            // Bounded and non-blocking first (a FIFO or device is refused), then kube-rs's reader,
            // which resolves the file's relative paths.
            crate::file::read(path).map_err(|source| Error::Read {
                path: path.into(),
                source,
            })?;
            let kc =
                Kubeconfig::read_from(path).map_err(|e| api_err(path.display().to_string(), e))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| api_err(path.display().to_string(), e))?
        } else if let Some(url) = api_url {
            let uri = parse_url(url)?;
            Config::incluster().unwrap_or_else(|_| Config::new(uri))
        } else {
            Config::infer().await.map_err(|e| {
                Error::Unsupported(format!(
                    "--kube-subnet-mgr: no Kubernetes API configuration ({e}); give --kubeconfig-file or --kube-api-url"
                ))
            })?
        };
        if let Some(url) = api_url {
            config.cluster_url = parse_url(url)?;
        }
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(15));
        config.reset_reader_on_write = true;
        // Our own back-off retries (and says what it waits for); kube-rs's would hide an outage.
        config.default_retry = false;
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(USER_AGENT),
        ));
        let server = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let client = Client::try_from(config).map_err(|e| api_err(&server, e))?;
        Ok(Self {
            nodes: Api::all(client),
            server,
        })
    }

    /// Where the API is, for log lines.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.server
    }

    pub async fn get_node(&self, name: &str) -> Result<Value, Error> {
        let node = self
            .nodes
            .get(name)
            .await
            .map_err(|e| api_err(format!("getting node {name}"), e))?;
        serde_json::to_value(node).map_err(|e| api_err(format!("getting node {name}"), e))
    }

    /// A strategic-merge patch of the node's status subresource (how flanneld writes both its
    /// annotations and its condition).
    pub async fn patch_node_status(&self, name: &str, patch: &Value) -> Result<Value, Error> {
        let what = || format!("patching node {name}");
        let node = self
            .nodes
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
            .map_err(|e| api_err(what(), e))?;
        serde_json::to_value(node).map_err(|e| api_err(what(), e))
    }
}

fn parse_url(url: &str) -> Result<http::Uri, Error> {
    url.parse()
        .map_err(|e| Error::Unsupported(format!("--kube-api-url {url:?}: {e}")))
}

/// A node as a lease, or why it is not one.
pub fn node_lease(node: &Value, ann: &Annotations) -> Result<Lease, String> {
    let a = &node["metadata"]["annotations"];
    let get = |k: &str| a.get(k).and_then(Value::as_str).filter(|s| !s.is_empty());
    if get(&ann.managed) != Some("true") {
        return Err(format!(
            "no {}=true annotation (not managed by flannel)",
            ann.managed
        ));
    }
    let subnet = pod_cidr(node).ok_or("no IPv4 podCIDR")?;
    // As flanneld reads peers: `public-ip` (a node with an overwrite publishes it there).
    let ip = get(&ann.public_ip).ok_or_else(|| format!("no {} annotation", ann.public_ip))?;
    let public_ip: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("{}: {ip:?} is not an IPv4 address", ann.public_ip))?;
    let backend_type = get(&ann.backend_type).unwrap_or_default().to_string();
    let backend_data = match get(&ann.backend_data) {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| format!("{}: not JSON: {e}", ann.backend_data))?,
        None => Value::Null,
    };
    Ok(Lease {
        subnet,
        public_ip,
        backend_type,
        backend_data,
    })
}

/// The node's IPv4 pod CIDR (`spec.podCIDRs` first, then `spec.podCIDR`).
#[must_use]
pub fn pod_cidr(node: &Value) -> Option<Ipv4Net> {
    let spec = &node["spec"];
    spec["podCIDRs"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(std::iter::once(&spec["podCIDR"]))
        .filter_map(Value::as_str)
        .find_map(|s| s.parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
}

fn node_name(node: &Value) -> Option<&str> {
    node["metadata"]["name"].as_str()
}

/// What this node publishes in its lease.
#[derive(Debug, Clone)]
pub struct Publish {
    pub backend_type: String,
    pub backend_data: Value,
    pub public_ip: Ipv4Addr,
}

/// The annotation patch that makes `node` advertise `want`, if anything differs (as flanneld:
/// an existing `public-ip-overwrite` is what `public-ip` then says).
#[must_use]
pub fn annotation_patch(node: &Value, ann: &Annotations, want: &Publish) -> Option<Value> {
    let a = &node["metadata"]["annotations"];
    let get = |k: &str| {
        a.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let public_ip = match get(&ann.public_ip_overwrite) {
        o if !o.is_empty() => o,
        _ => want.public_ip.to_string(),
    };
    let data = want.backend_data.to_string();
    let wanted = [
        (&ann.backend_type, want.backend_type.clone()),
        (&ann.backend_data, data),
        (&ann.public_ip, public_ip),
        (&ann.managed, "true".to_string()),
    ];
    if wanted.iter().all(|(k, v)| get(k) == *v) {
        return None;
    }
    let map: serde_json::Map<String, Value> = wanted
        .into_iter()
        .map(|(k, v)| (k.clone(), Value::String(v)))
        .collect();
    Some(json!({"metadata": {"annotations": map}}))
}

/// The subnet manager of one node.
#[derive(Clone)]
pub struct KubeManager {
    pub client: KubeClient,
    pub node: String,
    pub annotations: Annotations,
}

impl KubeManager {
    /// Publishes this node's lease in its annotations (only if they differ).
    pub async fn publish(&self, node: &Value, want: &Publish) -> Result<(), Error> {
        if let Some(patch) = annotation_patch(node, &self.annotations, want) {
            self.client.patch_node_status(&self.node, &patch).await?;
            info!(node = %self.node, "published this node's lease in its annotations");
        }
        Ok(())
    }

    /// Sets `NetworkUnavailable=False` (reason `FlannelIsUp`), as flanneld once it is up.
    pub async fn set_network_available(&self) -> Result<(), Error> {
        // RFC 3339, as the API serializes its `Time`.
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let patch = json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        self.client.patch_node_status(&self.node, &patch).await?;
        Ok(())
    }

    /// Lists and watches all nodes in the background (kube-rs's watcher: pages, bookmarks, a
    /// fresh list after 410 Gone, back-off), sending the lease set after each complete list and
    /// after every change. Never sends an empty set because of an error.
    pub fn watch(&self, tx: watch::Sender<Vec<Lease>>) {
        let client = self.client.clone();
        let ann = self.annotations.clone();
        tokio::spawn(async move {
            let mut nodes: BTreeMap<String, Lease> = BTreeMap::new();
            let mut skipped: BTreeMap<String, String> = BTreeMap::new();
            // Nodes of a list in progress: they replace `nodes` once the list is complete.
            let mut listing: Option<BTreeMap<String, Lease>> = None;
            let stream =
                watcher(client.nodes.clone(), watcher::Config::default()).default_backoff();
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if tx.is_closed() {
                    return;
                }
                let event = match event {
                    Ok(e) => e,
                    Err(e) => {
                        crate::metrics::source_error("kube");
                        warn!(
                            "watching nodes at {}: {e}; retrying with back-off (the dataplane keeps its state)",
                            client.server()
                        );
                        continue;
                    }
                };
                let value = |node: &Node| serde_json::to_value(node).unwrap_or(Value::Null);
                match event {
                    watcher::Event::Init => listing = Some(BTreeMap::new()),
                    watcher::Event::InitApply(node) => {
                        let target = listing.get_or_insert_with(BTreeMap::new);
                        apply(target, &mut skipped, &ann, "ADDED", &value(&node));
                    }
                    watcher::Event::InitDone => {
                        nodes = listing.take().unwrap_or_default();
                        send(&tx, &nodes);
                    }
                    watcher::Event::Apply(node) => {
                        apply(&mut nodes, &mut skipped, &ann, "MODIFIED", &value(&node));
                        send(&tx, &nodes);
                    }
                    watcher::Event::Delete(node) => {
                        apply(&mut nodes, &mut skipped, &ann, "DELETED", &value(&node));
                        send(&tx, &nodes);
                    }
                }
            }
        });
    }
}

fn send(tx: &watch::Sender<Vec<Lease>>, nodes: &BTreeMap<String, Lease>) {
    let leases: Vec<Lease> = nodes.values().cloned().collect();
    tx.send_if_modified(|cur| {
        if *cur == leases {
            false
        } else {
            *cur = leases;
            true
        }
    });
}

/// Applies one node event to the lease set; a node that is skipped is logged once per reason.
fn apply(
    nodes: &mut BTreeMap<String, Lease>,
    skipped: &mut BTreeMap<String, String>,
    ann: &Annotations,
    kind: &str,
    node: &Value,
) {
    let Some(name) = node_name(node) else {
        return;
    };
    if kind == "DELETED" {
        if nodes.remove(name).is_some() {
            info!(node = name, "node deleted: its lease is gone");
        }
        return;
    }
    match node_lease(node, ann) {
        Ok(lease) => {
            skipped.remove(name);
            nodes.insert(name.to_string(), lease);
        }
        Err(why) => {
            if nodes.remove(name).is_some() {
                info!(node = name, "node no longer has a lease: {why}");
            } else if skipped.get(name) != Some(&why) {
                info!(node = name, "skipping node: {why}");
            }
            skipped.insert(name.to_string(), why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_names_as_flannel() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        assert_eq!(a.backend_data, "flannel.alpha.coreos.com/backend-data");
        assert_eq!(a.managed, "flannel.alpha.coreos.com/kube-subnet-manager");
        let a = Annotations::new("example.com/net").unwrap();
        assert_eq!(a.public_ip, "example.com/net-public-ip");
        assert!(Annotations::new("a/b/c").is_err());
    }

    fn node(annotations: &Value) -> Value {
        json!({"metadata": {"name": "n1", "resourceVersion": "7", "annotations": annotations},
               "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24", "fd00::/64"]}})
    }

    #[test]
    fn nodes_become_leases_as_flannel_reads_them() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        let n = node(&json!({
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/backend-data": "{\"VNI\":1,\"VtepMAC\":\"c6:d2:00:00:00:01\"}",
            "flannel.alpha.coreos.com/public-ip": "198.18.0.11",
        }));
        let l = node_lease(&n, &a).unwrap();
        assert_eq!(l.subnet.to_string(), "10.244.1.0/24");
        assert_eq!(l.public_ip, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(l.backend_data["VtepMAC"], "c6:d2:00:00:00:01");
        let mut o = n.clone();
        o["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip-overwrite"] =
            json!("203.0.113.9");
        assert_eq!(
            node_lease(&o, &a).unwrap().public_ip,
            Ipv4Addr::new(198, 18, 0, 11),
            "peers are read from public-ip, which their own agent sets from the overwrite"
        );
        assert!(
            node_lease(&node(&json!({})), &a)
                .unwrap_err()
                .contains("kube-subnet-manager")
        );
        let mut no_cidr = n.clone();
        no_cidr["spec"] = json!({});
        assert!(node_lease(&no_cidr, &a).unwrap_err().contains("podCIDR"));
    }

    #[test]
    fn the_patch_only_says_what_differs() {
        let a = Annotations::new(DEFAULT_PREFIX).unwrap();
        let want = Publish {
            backend_type: "vxlan".into(),
            backend_data: json!({"VNI": 1, "VtepMAC": "0e:fe:00:00:00:01"}),
            public_ip: Ipv4Addr::new(198, 18, 0, 11),
        };
        let patch = annotation_patch(&node(&json!({})), &a, &want).unwrap();
        let ann = &patch["metadata"]["annotations"];
        assert_eq!(
            ann["flannel.alpha.coreos.com/backend-data"],
            "{\"VNI\":1,\"VtepMAC\":\"0e:fe:00:00:00:01\"}"
        );
        assert_eq!(ann["flannel.alpha.coreos.com/kube-subnet-manager"], "true");
        let mut done = node(ann);
        assert!(annotation_patch(&done, &a, &want).is_none());
        done["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip-overwrite"] =
            json!("203.0.113.9");
        let patch = annotation_patch(&done, &a, &want).unwrap();
        assert_eq!(
            patch["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"],
            "203.0.113.9"
        );
    }
}
