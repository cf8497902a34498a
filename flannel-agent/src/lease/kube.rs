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
    time::{Duration, SystemTime},
};

use futures::StreamExt as _;
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use futures::future::LocalBoxFuture;

use super::{Join, Joined, Lease, LeaseSource, own_lease_seen};
use crate::{
    Error,
    backoff::{Backoff, retry},
    cli::Args,
    config::NetConf,
};

/// Leases from the nodes of a Kubernetes cluster (`--kube-subnet-mgr`); the network configuration
/// from net-conf.json (kube-flannel-cfg's `net-conf.json`, mounted).
pub struct KubeSource {
    mgr: KubeManager,
    net_config: PathBuf,
}

impl KubeSource {
    pub fn new(args: &Args) -> Result<Self, Error> {
        let node = args.node_name.clone().ok_or_else(|| {
            Error::Unsupported("--kube-subnet-mgr needs --node-name (or NODE_NAME)".into())
        })?;
        let client = KubeClient::new(
            args.kube_api_url.as_deref(),
            args.kubeconfig_file.as_deref(),
        )?;
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

/// An API server connection: in-cluster (service account) or from a kubeconfig.
#[derive(Clone)]
pub struct KubeClient {
    base: String,
    token: Option<String>,
    /// The service account's token file, re-read on each request (kubelet rotates it).
    token_file: Option<PathBuf>,
    http: reqwest::Client,
}

/// The service account a pod of a DaemonSet has.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

impl KubeClient {
    /// `--kube-api-url` and `--kubeconfig-file` as flanneld takes them; with neither, the
    /// in-cluster configuration.
    pub fn new(api_url: Option<&str>, kubeconfig: Option<&Path>) -> Result<Self, Error> {
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        let (base, token) = if let Some(path) = kubeconfig {
            let (server, token, ca, identity, insecure) = read_kubeconfig(path)?;
            if let Some(ca) = ca {
                builder = builder.add_root_certificate(
                    reqwest::Certificate::from_pem(&ca)
                        .map_err(|e| api_err(path.display().to_string(), e))?,
                );
            }
            if let Some(id) = identity {
                builder = builder.identity(
                    reqwest::Identity::from_pem(&id)
                        .map_err(|e| api_err(path.display().to_string(), e))?,
                );
            }
            builder = builder.danger_accept_invalid_certs(insecure);
            (
                api_url.map_or(server, str::to_string),
                token.map(|t| (t, None)),
            )
        } else {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            let base = match (api_url, host) {
                (Some(url), _) => url.to_string(),
                (None, Some(host)) if host.contains(':') => format!("https://[{host}]:{port}"),
                (None, Some(host)) => format!("https://{host}:{port}"),
                (None, None) => {
                    return Err(Error::Unsupported(
                        "--kube-subnet-mgr: not in a cluster (no KUBERNETES_SERVICE_HOST); give --kubeconfig-file or --kube-api-url".into(),
                    ));
                }
            };
            let sa = PathBuf::from(SERVICE_ACCOUNT);
            if let Ok(ca) = crate::file::read(&sa.join("ca.crt")) {
                builder = builder.add_root_certificate(
                    reqwest::Certificate::from_pem(&ca)
                        .map_err(|e| api_err("service account ca.crt", e))?,
                );
            }
            let token_file = sa.join("token");
            let token = crate::file::read_to_string(&token_file)
                .ok()
                .map(|t| t.trim().to_string());
            (base, token.map(|t| (t, Some(token_file))))
        };
        let http = builder.build().map_err(|e| api_err("HTTP client", e))?;
        let (token, token_file) = token.map_or((None, None), |(t, f)| (Some(t), f));
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            token_file,
            http,
        })
    }

    /// Where the API is, for log lines.
    #[must_use]
    pub fn server(&self) -> &str {
        &self.base
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.request(method, format!("{}{path}", self.base));
        let fresh = self
            .token_file
            .as_ref()
            .and_then(|f| crate::file::read_to_string(f).ok())
            .map(|t| t.trim().to_string());
        match fresh.as_ref().or(self.token.as_ref()) {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    async fn json(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value, Error> {
        let resp = req
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| api_err(what, e))?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| api_err(what, e))?;
        if !status.is_success() {
            return Err(api_err(
                what,
                format!("{status}: {}", body["message"].as_str().unwrap_or_default()),
            ));
        }
        Ok(body)
    }

    pub async fn get_node(&self, name: &str) -> Result<Value, Error> {
        self.json(
            self.request(reqwest::Method::GET, &format!("/api/v1/nodes/{name}")),
            &format!("getting node {name}"),
        )
        .await
    }

    /// A strategic-merge patch of the node's status subresource (how flanneld writes both its
    /// annotations and its condition).
    pub async fn patch_node_status(&self, name: &str, patch: &Value) -> Result<Value, Error> {
        self.json(
            self.request(
                reqwest::Method::PATCH,
                &format!("/api/v1/nodes/{name}/status"),
            )
            .header("Content-Type", "application/strategic-merge-patch+json")
            .body(patch.to_string()),
            &format!("patching node {name}"),
        )
        .await
    }
}

/// (server, token, CA PEM, client identity PEM, insecure) of the current context of a kubeconfig.
#[expect(clippy::type_complexity, reason = "a private tuple read once")]
fn read_kubeconfig(
    path: &Path,
) -> Result<
    (
        String,
        Option<String>,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        bool,
    ),
    Error,
> {
    let text = crate::file::read_to_string(path).map_err(|source| Error::Read {
        path: path.into(),
        source,
    })?;
    let cfg: serde_yaml::Value = serde_yaml::from_str(&text)
        .map_err(|e| Error::config(path, "(kubeconfig)", e.to_string()))?;
    let named = |list: &str, name: Option<&str>, item: &str| -> Option<serde_yaml::Value> {
        let seq = cfg.get(list)?.as_sequence()?;
        let entry = match name {
            Some(n) => seq
                .iter()
                .find(|e| e.get("name").and_then(|v| v.as_str()) == Some(n))?,
            None => seq.first()?,
        };
        entry.get(item).cloned()
    };
    let current = cfg.get("current-context").and_then(|v| v.as_str());
    let context = named("contexts", current, "context");
    let cluster_name = context
        .as_ref()
        .and_then(|c| c.get("cluster")?.as_str().map(str::to_string));
    let user_name = context
        .as_ref()
        .and_then(|c| c.get("user")?.as_str().map(str::to_string));
    let cluster = named("clusters", cluster_name.as_deref(), "cluster")
        .ok_or_else(|| Error::config(path, "clusters", "no cluster for the current context"))?;
    let user = named("users", user_name.as_deref(), "user");
    let text_of = |v: Option<&serde_yaml::Value>, key: &str| {
        v.and_then(|v| v.get(key)?.as_str().map(str::to_string))
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let pem = |v: Option<&serde_yaml::Value>,
               data_key: &str,
               file_key: &str|
     -> Result<Option<Vec<u8>>, Error> {
        if let Some(b64) = text_of(v, data_key) {
            use base64::Engine as _;
            return base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map(Some)
                .map_err(|e| Error::config(path, data_key, e.to_string()));
        }
        text_of(v, file_key)
            .map(|f| {
                let f = dir.join(f);
                crate::file::read(&f).map_err(|source| Error::Read { path: f, source })
            })
            .transpose()
    };
    let server = text_of(Some(&cluster), "server")
        .ok_or_else(|| Error::config(path, "clusters[].cluster.server", "missing"))?;
    let ca = pem(
        Some(&cluster),
        "certificate-authority-data",
        "certificate-authority",
    )?;
    let insecure = cluster
        .get("insecure-skip-tls-verify")
        .and_then(serde_yaml::Value::as_bool)
        .unwrap_or(false);
    let cert = pem(
        user.as_ref(),
        "client-certificate-data",
        "client-certificate",
    )?;
    let key = pem(user.as_ref(), "client-key-data", "client-key")?;
    let identity = cert.zip(key).map(|(mut c, k)| {
        c.push(b'\n');
        c.extend_from_slice(&k);
        c
    });
    let token = text_of(user.as_ref(), "token");
    Ok((server, token, ca, identity, insecure))
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

/// Now as Kubernetes writes times (RFC 3339, UTC, seconds).
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days.cast_signed() + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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
        let now = now_rfc3339();
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

    /// Lists and watches all nodes in the background, sending the lease set after the first
    /// list and after every change. Never sends an empty set because of an error.
    pub fn watch(&self, tx: watch::Sender<Vec<Lease>>) {
        let client = self.client.clone();
        let ann = self.annotations.clone();
        tokio::spawn(async move {
            let mut nodes: BTreeMap<String, Lease> = BTreeMap::new();
            let mut skipped: BTreeMap<String, String> = BTreeMap::new();
            let mut backoff = Backoff::default();
            loop {
                match list_and_watch(&client, &ann, &mut nodes, &mut skipped, &tx).await {
                    Ok(()) => backoff.reset(),
                    Err(e) => {
                        crate::metrics::source_error("kube");
                        let delay = backoff.next_delay();
                        warn!(
                            "watching nodes at {}: {e}; retrying in {delay:?} (the dataplane keeps its state)",
                            client.server()
                        );
                        tokio::time::sleep(delay).await;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
    }
}

/// Why a watch ended.
enum WatchEnd {
    /// The server closed it (timeout): resume from the last version.
    Closed,
    /// The version expired (410 Gone): list again.
    Expired,
}

/// One list followed by watches until the version expires.
async fn list_and_watch(
    client: &KubeClient,
    ann: &Annotations,
    nodes: &mut BTreeMap<String, Lease>,
    skipped: &mut BTreeMap<String, String>,
    tx: &watch::Sender<Vec<Lease>>,
) -> Result<(), Error> {
    let list = client
        .json(
            client.request(reqwest::Method::GET, "/api/v1/nodes"),
            "listing nodes",
        )
        .await?;
    let mut version = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut listed = BTreeMap::new();
    for node in list["items"].as_array().into_iter().flatten() {
        apply(&mut listed, skipped, ann, "ADDED", node);
    }
    *nodes = listed;
    send(tx, nodes);
    loop {
        match watch_once(client, ann, nodes, skipped, tx, &mut version).await? {
            WatchEnd::Closed => {}
            WatchEnd::Expired => {
                info!(%version, "node watch expired (410 Gone); listing again");
                return Ok(());
            }
        }
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

async fn watch_once(
    client: &KubeClient,
    ann: &Annotations,
    nodes: &mut BTreeMap<String, Lease>,
    skipped: &mut BTreeMap<String, String>,
    tx: &watch::Sender<Vec<Lease>>,
    version: &mut String,
) -> Result<WatchEnd, Error> {
    let path = format!(
        "/api/v1/nodes?watch=true&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion={version}"
    );
    let resp = client
        .request(reqwest::Method::GET, &path)
        .send()
        .await
        .map_err(|e| api_err("watching nodes", e))?;
    if resp.status() == reqwest::StatusCode::GONE {
        return Ok(WatchEnd::Expired);
    }
    if !resp.status().is_success() {
        return Err(api_err("watching nodes", resp.status()));
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    // A silent server is a dead one: bookmarks and events come well within this.
    while let Ok(chunk) = tokio::time::timeout(Duration::from_secs(330), stream.next()).await {
        let Some(chunk) = chunk else {
            return Ok(WatchEnd::Closed);
        };
        buf.extend_from_slice(&chunk.map_err(|e| api_err("watching nodes", e))?);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: Value = serde_json::from_slice(&line)
                .map_err(|e| api_err("watching nodes", format!("bad event: {e}")))?;
            let kind = event["type"].as_str().unwrap_or_default();
            let object = &event["object"];
            if kind == "ERROR" {
                if object["code"].as_u64() == Some(410) {
                    return Ok(WatchEnd::Expired);
                }
                return Err(api_err(
                    "watching nodes",
                    object["message"].as_str().unwrap_or("error event"),
                ));
            }
            if let Some(v) = object["metadata"]["resourceVersion"].as_str() {
                *version = v.to_string();
            }
            if kind != "BOOKMARK" {
                apply(nodes, skipped, ann, kind, object);
                send(tx, nodes);
            }
        }
    }
    Err(api_err("watching nodes", "no event or bookmark for 330 s"))
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

    #[test]
    fn times_are_rfc3339() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(
            t.starts_with("20") && t.ends_with('Z') && t.as_bytes()[10] == b'T',
            "{t}"
        );
    }
}
