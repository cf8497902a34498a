//! The etcd subnet manager (flannel's pkg/subnet/etcd), over etcd v3's gRPC API (etcd-client:
//! TLS with client certificates, username/password with the token refreshed, HTTP/2 keep-alive).
//!
//! - The network configuration is `<prefix>/config` (flannel's net-conf.json).
//! - This node's lease is `<prefix>/subnets/<a.b.c.d>-<len>` = `{"PublicIP":…,"PublicIPv6":null,
//!   "BackendType":…,"BackendData":…}` bound to an etcd lease of 24 h, renewed `renew_margin`
//!   before it expires. A lease that already carries this node's public IP is reused; otherwise
//!   the subnet of the previous `subnet.env`, if still free; otherwise a random free subnet of
//!   `SubnetLen` between `SubnetMin` and `SubnetMax`, created in a transaction that succeeds only
//!   if the key does not exist, so two nodes never take the same subnet.
//! - `<prefix>/subnets/` is watched; a compacted watch is replaced by a fresh read; an idle watch
//!   asks for progress notifications and a silent one is taken for a dead connection. The
//!   previous etcd lease is revoked once the key is bound to its renewal. Errors never empty the
//!   lease set.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, ResponseHeader, TlsOptions, Txn, TxnOp, WatchOptions,
};
use futures::future::LocalBoxFuture;
use ipnet::Ipv4Net;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Join, Joined, Lease, LeaseSource, own_lease_seen};
use crate::{
    Error,
    backoff::{Backoff, retry},
    cli::Args,
    config::NetConf,
    json::field,
};

/// Leases in etcd under flannel's prefix, the network configuration at `<prefix>/config`
/// (flanneld's default subnet manager).
pub struct EtcdSource {
    client: EtcdClient,
    prefix: String,
    /// Where the previous subnet is read from (flanneld tries it first after a lapse).
    subnet_file: PathBuf,
    renew_margin: Duration,
}

impl EtcdSource {
    pub fn new(args: &Args) -> Result<Self, Error> {
        let client = EtcdClient::new(&EtcdOptions {
            endpoints: args.etcd_endpoints.clone(),
            cafile: args.etcd_cafile.clone(),
            certfile: args.etcd_certfile.clone(),
            keyfile: args.etcd_keyfile.clone(),
            username: args.etcd_username.clone(),
            password: args.etcd_password.clone(),
        })?;
        Ok(Self {
            client,
            prefix: args.etcd_prefix.clone(),
            subnet_file: args.subnet_file.clone(),
            renew_margin: Duration::from_secs(args.subnet_lease_renew_margin * 60),
        })
    }
}

impl LeaseSource for EtcdSource {
    fn name(&self) -> PathBuf {
        PathBuf::from(format!("etcd:{}/subnets", self.prefix))
    }

    fn config_name(&self) -> String {
        format!("etcd:{}/config", self.prefix)
    }

    fn network_config(&self) -> LocalBoxFuture<'_, Result<NetConf, Error>> {
        Box::pin(async move {
            let what = format!(
                "{}/config in etcd at {}",
                self.prefix,
                self.client.endpoints()
            );
            Ok(retry(&what, || EtcdManager::config(&self.client, &self.prefix)).await)
        })
    }

    /// Acquires this node's subnet (waiting, with back-off, while etcd is unreachable), keeps it
    /// renewed and follows every lease.
    fn join<'a>(&'a mut self, join: Join<'a>) -> LocalBoxFuture<'a, Result<Joined, Error>> {
        Box::pin(async move {
            // After a lapse, flanneld tries the subnet it had (from subnet.env) first.
            let previous = crate::file::read_to_string(&self.subnet_file)
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
                        .and_then(|s| s.parse::<Ipv4Net>().ok())
                        .map(|n| n.trunc())
                });
            let what = format!(
                "etcd at {} (this node's subnet lease)",
                self.client.endpoints()
            );
            let (mgr, own) = retry(&what, || {
                EtcdManager::acquire(
                    self.client.clone(),
                    &self.prefix,
                    join.netconf,
                    join.public_ip,
                    join.netconf.backend.lease_type(),
                    join.backend_data,
                    previous,
                    self.renew_margin,
                )
            })
            .await;
            info!(subnet = %own.subnet, key = %mgr.key, "this node's lease in etcd");
            let (tx, mut leases) = watch::channel(Vec::new());
            mgr.run(tx);
            own_lease_seen(&mut leases, join.public_ip).await?;
            Ok(Joined {
                public_ip: join.public_ip,
                lease_ip: join.public_ip,
                leases,
            })
        })
    }
}

/// flannel's default etcd prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";
/// flannel's subnet lease TTL.
pub const LEASE_TTL: Duration = Duration::from_hours(24);

fn etcd_err(context: impl Into<String>, message: impl std::fmt::Display) -> Error {
    Error::Api {
        context: context.into(),
        message: message.to_string(),
    }
}

/// TLS and authentication options, as flanneld's `--etcd-*` flags.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    pub cafile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A connection to an etcd cluster (etcd-client, gRPC): connected on first use and again
/// after a failure, so that an unreachable etcd is waited for; HTTP/2 keep-alive pings notice a
/// half-open connection; an expired authentication token is refreshed.
#[derive(Clone)]
pub struct EtcdClient {
    endpoints: Vec<String>,
    options: ConnectOptions,
    connected: Arc<tokio::sync::Mutex<Option<Client>>>,
}

/// An etcd lease ID.
pub type LeaseId = i64;

fn etcd(context: &str) -> impl FnOnce(etcd_client::Error) -> Error + '_ {
    move |e| etcd_err(format!("etcd {context}"), e)
}

impl EtcdClient {
    pub fn new(opts: &EtcdOptions) -> Result<Self, Error> {
        let read = |p: &Path| {
            crate::file::read(p).map_err(|source| Error::Read {
                path: p.into(),
                source,
            })
        };
        let endpoints: Vec<String> = opts
            .endpoints
            .iter()
            .map(|e| e.trim_end_matches('/').to_string())
            .collect();
        if endpoints.is_empty() {
            return Err(Error::Unsupported("--etcd-endpoints is empty".into()));
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_auto_token_refresh(true);
        if let (Some(user), Some(password)) = (&opts.username, &opts.password) {
            options = options.with_user(user, password);
        }
        if opts.cafile.is_some() || opts.certfile.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &opts.cafile {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&opts.certfile, &opts.keyfile) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls);
        }
        Ok(Self {
            endpoints,
            options,
            connected: Arc::default(),
        })
    }

    #[must_use]
    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    /// The connected client (connecting, and authenticating, first if needed).
    async fn client(&self) -> Result<Client, Error> {
        let mut connected = self.connected.lock().await;
        if let Some(c) = connected.as_ref() {
            return Ok(c.clone());
        }
        let c = Client::connect(&self.endpoints, Some(self.options.clone()))
            .await
            .map_err(|e| etcd_err(format!("etcd {}", self.endpoints()), e))?;
        *connected = Some(c.clone());
        Ok(c)
    }

    /// Forgets the connection after an error that may be the connection's: the next call
    /// connects again.
    async fn reset(&self) {
        *self.connected.lock().await = None;
    }

    /// Runs `f` on the client; a failure drops the connection.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let result = f(self.client().await?).await;
        if result.is_err() {
            self.reset().await;
        }
        result
    }

    /// The value of `key`, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<String>, Error> {
        self.call(|mut c| async move {
            let resp = c.get(key, None).await.map_err(etcd("get"))?;
            Ok(resp
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
        .await
    }

    /// Every key/value under `prefix`, and the revision they were read at.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<(String, String)>, i64), Error> {
        self.call(|mut c| async move {
            let resp = c
                .get(prefix, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(etcd("list"))?;
            let kvs = resp
                .kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect();
            Ok((kvs, resp.header().map_or(0, ResponseHeader::revision)))
        })
        .await
    }

    /// A new etcd lease of `ttl`.
    pub async fn grant(&self, ttl: Duration) -> Result<LeaseId, Error> {
        let ttl = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        self.call(|mut c| async move {
            Ok(c.lease_grant(ttl, None)
                .await
                .map_err(etcd("lease grant"))?
                .id())
        })
        .await
    }

    /// Writes `key` bound to `lease`, if `when` holds. Returns whether it was written.
    async fn put_if(
        &self,
        key: &str,
        value: &str,
        lease: LeaseId,
        when: Vec<Compare>,
    ) -> Result<bool, Error> {
        self.call(|mut c| async move {
            let put = TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)));
            let txn = Txn::new().when(when).and_then(vec![put]);
            Ok(c.txn(txn).await.map_err(etcd("txn"))?.succeeded())
        })
        .await
    }

    /// Writes `key` bound to `lease`; only if it does not exist when `create`. Returns whether
    /// it was written.
    pub async fn put(
        &self,
        key: &str,
        value: &str,
        lease: LeaseId,
        create: bool,
    ) -> Result<bool, Error> {
        let when = if create {
            vec![Compare::create_revision(key, CompareOp::Equal, 0)]
        } else {
            Vec::new()
        };
        self.put_if(key, value, lease, when).await
    }

    /// Revokes an etcd lease (best effort).
    pub async fn revoke(&self, lease: LeaseId) {
        let _ = self
            .call(|mut c| async move {
                c.lease_revoke(lease).await.map_err(etcd("lease revoke"))?;
                Ok(())
            })
            .await;
    }

    /// Rewrites `key` with a new `lease` only if it still holds `value` (ours).
    pub async fn renew(&self, key: &str, value: &str, lease: LeaseId) -> Result<bool, Error> {
        let when = vec![Compare::value(key, CompareOp::Equal, value)];
        self.put_if(key, value, lease, when).await
    }

    /// Keeps `lease` alive once (etcd's `LeaseKeepAlive`): its TTL is reset. Returns the new TTL
    /// in seconds, 0 if the lease is gone.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<i64, Error> {
        self.call(|mut c| async move {
            let (mut keeper, mut stream) = c
                .lease_keep_alive(lease)
                .await
                .map_err(etcd("lease keep-alive"))?;
            keeper
                .keep_alive()
                .await
                .map_err(etcd("lease keep-alive"))?;
            let resp = stream
                .message()
                .await
                .map_err(etcd("lease keep-alive"))?
                .ok_or_else(|| etcd_err("etcd lease keep-alive", "no answer"))?;
            Ok(resp.ttl())
        })
        .await
    }

    /// Whether `key` holds `value` bound to `lease` (this node's lease, untouched).
    pub async fn holds(&self, key: &str, value: &str, lease: LeaseId) -> Result<bool, Error> {
        self.call(|mut c| async move {
            let resp = c.get(key, None).await.map_err(etcd("get"))?;
            Ok(resp
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == value.as_bytes() && kv.lease() == lease))
        })
        .await
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.call(|mut c| async move {
            c.delete(key, None).await.map_err(etcd("delete"))?;
            Ok(())
        })
        .await
    }
}

/// The key of a subnet lease: `<prefix>/subnets/10.244.1.0-24`.
#[must_use]
pub fn subnet_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{}/subnets/{}-{}",
        prefix.trim_end_matches('/'),
        subnet.network(),
        subnet.prefix_len()
    )
}

/// The subnet of a lease key, if it is one.
#[must_use]
pub fn key_subnet(prefix: &str, key: &str) -> Option<Ipv4Net> {
    let rest = key.strip_prefix(&format!("{}/subnets/", prefix.trim_end_matches('/')))?;
    let (addr, len) = rest.split_once('-')?;
    Ipv4Net::new(addr.parse().ok()?, len.parse().ok()?).ok()
}

/// A stored lease value as flannel writes it.
#[must_use]
pub fn lease_value(public_ip: Ipv4Addr, backend_type: &str, backend_data: &Value) -> String {
    json!({"PublicIP": public_ip.to_string(), "PublicIPv6": null, "BackendType": backend_type, "BackendData": backend_data})
        .to_string()
}

/// A stored lease, parsed (keys matched as Go does).
pub fn parse_lease(subnet: Ipv4Net, value: &str) -> Result<Lease, String> {
    let v: Value = serde_json::from_str(value).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let public_ip = field(obj, "PublicIP")
        .and_then(Value::as_str)
        .ok_or("no PublicIP")?
        .parse()
        .map_err(|_| "PublicIP is not an IPv4 address")?;
    Ok(Lease {
        subnet,
        public_ip,
        backend_type: field(obj, "BackendType")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        backend_data: field(obj, "BackendData").cloned().unwrap_or(Value::Null),
    })
}

/// The subnets `netconf` hands out, from `SubnetMin` to `SubnetMax`.
fn candidates(netconf: &NetConf) -> impl Iterator<Item = Ipv4Net> {
    let step = 1u64 << (32 - netconf.subnet_len);
    let (min, max) = (
        u64::from(u32::from(netconf.subnet_min)),
        u64::from(u32::from(netconf.subnet_max)),
    );
    let len = netconf.subnet_len;
    (min..=max)
        .step_by(usize::try_from(step).unwrap_or(usize::MAX))
        .filter_map(move |a| Ipv4Net::new(Ipv4Addr::from(u32::try_from(a).ok()?), len).ok())
}

/// This node's lease in etcd, kept alive.
pub struct EtcdManager {
    pub client: EtcdClient,
    pub prefix: String,
    pub key: String,
    pub value: String,
    pub renew_margin: Duration,
    /// The etcd lease the key is bound to now.
    pub lease: LeaseId,
}

impl EtcdManager {
    /// Reads `<prefix>/config`.
    pub async fn config(client: &EtcdClient, prefix: &str) -> Result<NetConf, Error> {
        let key = format!("{}/config", prefix.trim_end_matches('/'));
        let text = client.get(&key).await?.ok_or_else(|| {
            etcd_err(
                format!("etcd {key}"),
                "missing (flannel's network configuration)",
            )
        })?;
        crate::config::parse(Path::new(&format!("etcd:{key}")), &text)
    }

    /// Acquires this node's subnet: the lease already carrying `public_ip`, else `previous` if
    /// free, else a random free subnet, created atomically.
    #[expect(
        clippy::too_many_arguments,
        reason = "what flanneld's AcquireLease takes, each from a different source"
    )]
    pub async fn acquire(
        client: EtcdClient,
        prefix: &str,
        netconf: &NetConf,
        public_ip: Ipv4Addr,
        backend_type: &str,
        backend_data: impl Fn(Option<&Lease>) -> Value,
        previous: Option<Ipv4Net>,
        renew_margin: Duration,
    ) -> Result<(Self, Lease), Error> {
        let prefix = prefix.trim_end_matches('/').to_string();
        for _ in 0..10 {
            let (kvs, _) = client.list(&format!("{prefix}/subnets/")).await?;
            let leases: BTreeMap<Ipv4Net, Option<Lease>> = kvs
                .iter()
                .filter_map(|(k, v)| {
                    let subnet = key_subnet(&prefix, k)?;
                    Some((subnet, parse_lease(subnet, v).ok()))
                })
                .collect();
            let compatible = |s: &Ipv4Net| {
                netconf.network.contains(s)
                    && s.prefix_len() == netconf.subnet_len
                    && s.network() >= netconf.subnet_min
                    && s.network() <= netconf.subnet_max
            };
            let mine = leases
                .iter()
                .find(|(_, l)| l.as_ref().is_some_and(|l| l.public_ip == public_ip));
            if let Some((s, _)) = mine.filter(|(s, _)| !compatible(s)) {
                // As flanneld: a lease the configuration no longer allows is given up.
                warn!(subnet = %s, "this node's lease does not fit the network configuration any more; releasing it");
                client.delete(&subnet_key(&prefix, *s)).await?;
                continue;
            }
            let (subnet, existing, create) = if let Some((s, l)) = mine {
                info!(subnet = %s, "reusing this node's lease (it carries our public IP)");
                (*s, l.clone(), false)
            } else {
                let taken: BTreeSet<Ipv4Net> = leases.keys().copied().collect();
                let free: Vec<Ipv4Net> = candidates(netconf)
                    .filter(|c| {
                        !taken
                            .iter()
                            .any(|t| t.contains(&c.network()) || c.contains(&t.network()))
                    })
                    .collect();
                let pick = previous
                    .filter(|p| free.contains(p))
                    .or_else(|| {
                        let r = random_index(free.len())?;
                        free.get(r).copied()
                    })
                    .ok_or_else(|| {
                        etcd_err(
                            "etcd",
                            format!("no free subnet left in {}", netconf.network),
                        )
                    })?;
                (pick, None, true)
            };
            let data = backend_data(existing.as_ref());
            let key = subnet_key(&prefix, subnet);
            let value = lease_value(public_ip, backend_type, &data);
            let lease = client.grant(LEASE_TTL).await?;
            let written = client.put(&key, &value, lease, create).await;
            if !matches!(written, Ok(true)) {
                // Not used: do not leave a 24 h lease behind.
                client.revoke(lease).await;
            }
            if written? {
                if create {
                    info!(%subnet, "acquired a new subnet lease");
                }
                let parsed = parse_lease(subnet, &value).map_err(|e| etcd_err(&key, e))?;
                return Ok((
                    Self {
                        client,
                        prefix,
                        key,
                        value,
                        renew_margin,
                        lease,
                    },
                    parsed,
                ));
            }
            info!(%subnet, "another node took this subnet first; picking again");
        }
        Err(etcd_err(
            "etcd",
            "could not acquire a subnet after 10 attempts",
        ))
    }

    /// Renews this node's lease `renew_margin` before it expires, and watches every lease into
    /// `tx`, in the background.
    pub fn run(self, tx: watch::Sender<Vec<Lease>>) {
        let watcher = self.client.clone();
        let prefix = self.prefix.clone();
        let own = (self.key.clone(), self.value.clone());
        let watching = tokio::spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                match list_and_watch(&watcher, &prefix, &own, &tx).await {
                    Ok(WatchEnd::Resync) => backoff.reset(),
                    Ok(WatchEnd::Lost) => {
                        // Dropping `tx` ends the agent's loop with an error (see below).
                        lost(&own.0);
                        return;
                    }
                    Err(e) => {
                        crate::metrics::source_error("etcd");
                        let delay = backoff.next_delay();
                        warn!(
                            "watching {prefix}/subnets at {}: {e}; retrying in {delay:?} (the dataplane keeps its state)",
                            watcher.endpoints()
                        );
                        tokio::time::sleep(delay).await;
                    }
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        tokio::spawn(async move {
            let mut this = self;
            let mut renewed = Instant::now();
            loop {
                let due = LEASE_TTL.saturating_sub(this.renew_margin);
                tokio::time::sleep(
                    due.saturating_sub(renewed.elapsed())
                        .max(Duration::from_secs(1)),
                )
                .await;
                // The etcd lease kept alive (its 24 h start again) while the key is still ours
                // on it; if the lease is gone, as flanneld: a new 24 h lease, the key moved onto
                // it if it is still ours, and the previous lease revoked.
                let renew = async {
                    if this
                        .client
                        .holds(&this.key, &this.value, this.lease)
                        .await?
                        && this.client.keep_alive(this.lease).await? > 0
                    {
                        return Ok(Some(this.lease));
                    }
                    let lease = this.client.grant(LEASE_TTL).await?;
                    let done = this.client.renew(&this.key, &this.value, lease).await;
                    if !matches!(done, Ok(true)) {
                        this.client.revoke(lease).await;
                    }
                    done.map(|ok| ok.then_some(lease))
                };
                match renew.await {
                    Ok(Some(lease)) => {
                        if lease != this.lease {
                            this.client.revoke(this.lease).await;
                            this.lease = lease;
                        }
                        renewed = Instant::now();
                        info!(key = %this.key, lease, "renewed this node's subnet lease for 24 h");
                    }
                    Ok(None) => {
                        lost(&this.key);
                        watching.abort();
                        return;
                    }
                    Err(e) => {
                        crate::metrics::source_error("etcd");
                        warn!("renewing {}: {e}; retrying in 10 s", this.key);
                    }
                }
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        });
    }
}

/// A random index below `n` (from the kernel's random source), or `None` if `n` is 0.
fn random_index(n: usize) -> Option<usize> {
    if n == 0 {
        return None;
    }
    // A failed read only makes the pick less random (the lowest free subnet).
    let r = getrandom::u64().unwrap_or(0);
    Some((r % n as u64) as usize)
}

fn send(tx: &watch::Sender<Vec<Lease>>, leases: &BTreeMap<Ipv4Net, Lease>) {
    let set: Vec<Lease> = leases.values().cloned().collect();
    tx.send_if_modified(|cur| {
        let changed = *cur != set;
        *cur = set;
        changed
    });
}

fn apply(leases: &mut BTreeMap<Ipv4Net, Lease>, prefix: &str, key: &str, value: Option<&str>) {
    let Some(subnet) = key_subnet(prefix, key) else {
        return;
    };
    match value.map(|v| parse_lease(subnet, v)) {
        None => {
            leases.remove(&subnet);
        }
        Some(Ok(l)) => {
            leases.insert(subnet, l);
        }
        Some(Err(e)) => {
            warn!(%key, "ignoring a lease: {e}");
            leases.remove(&subnet);
        }
    }
}

/// Why a watch ended without an error.
enum WatchEnd {
    /// Compacted, canceled or closed: list again.
    Resync,
    /// This node's lease was deleted and another node holds its subnet now.
    Lost,
}

/// This node's lease is gone or belongs to another node now. As flanneld ("Lease has been
/// revoked. Shutting down daemon."), the agent stops: the lease watch ends, which ends its loop
/// with an error (no `process::exit` from a background task); the pinned dataplane keeps
/// forwarding and the restarted agent acquires a lease again.
fn lost(key: &str) {
    tracing::error!(%key, "this node's subnet lease was taken over by another node; stopping so that a restart acquires a new one (the pinned dataplane keeps forwarding)");
}

/// How often an idle watch asks etcd for a progress notification, and how long it waits for
/// any message before it takes the connection for dead (a half-open TCP connection would
/// otherwise keep a watch that never says anything).
const PROGRESS_EVERY: Duration = Duration::from_secs(30);
const SILENCE_LIMIT: Duration = Duration::from_secs(45);

/// Reads every lease, then follows changes from that revision until the watch is compacted.
async fn list_and_watch(
    client: &EtcdClient,
    prefix: &str,
    own: &(String, String),
    tx: &watch::Sender<Vec<Lease>>,
) -> Result<WatchEnd, Error> {
    let subnets = format!("{prefix}/subnets/");
    let (kvs, revision) = client.list(&subnets).await?;
    let mut leases = BTreeMap::new();
    for (k, v) in &kvs {
        apply(&mut leases, prefix, k, Some(v));
    }
    send(tx, &leases);
    let mut c = client.client().await?;
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1)
        .with_progress_notify();
    let mut stream = match c.watch(subnets.as_str(), Some(options)).await {
        Ok(w) => w,
        Err(e) => {
            client.reset().await;
            return Err(etcd_err("etcd watch", e));
        }
    };
    let mut last_heard = Instant::now();
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    loop {
        let msg = tokio::select! {
            m = stream.message() => Some(m),
            _ = progress.tick() => None,
        };
        let Some(msg) = msg else {
            if last_heard.elapsed() > SILENCE_LIMIT {
                client.reset().await;
                return Err(etcd_err(
                    "etcd watch",
                    format!(
                        "no message for {SILENCE_LIMIT:?} (progress requested every {PROGRESS_EVERY:?}): the connection is gone"
                    ),
                ));
            }
            let _ = stream.request_progress().await;
            continue;
        };
        let resp = match msg {
            Ok(Some(resp)) => resp,
            Ok(None) => return Ok(WatchEnd::Resync),
            Err(e) => {
                client.reset().await;
                return Err(etcd_err("etcd watch", e));
            }
        };
        last_heard = Instant::now();
        if resp.canceled() || resp.compact_revision() > 0 {
            info!("etcd watch compacted or canceled; reading the leases again");
            return Ok(WatchEnd::Resync);
        }
        if resp.events().is_empty() {
            // A progress notification.
            continue;
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let deleted = ev.event_type() == EventType::Delete;
            if deleted && key == own.0 {
                // Our lease was deleted (by hand, or expired): take it back if nobody else has,
                // as a new create-only write.
                warn!(%key, "this node's lease was deleted; re-creating it");
                let lease = client.grant(LEASE_TTL).await?;
                if !client.put(&own.0, &own.1, lease, true).await? {
                    client.revoke(lease).await;
                    return Ok(WatchEnd::Lost);
                }
                continue;
            }
            let value = String::from_utf8_lossy(kv.value()).into_owned();
            apply(
                &mut leases,
                prefix,
                &key,
                (!deleted).then_some(value.as_str()),
            );
        }
        send(tx, &leases);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_as_flannel_stores_them() {
        let s: Ipv4Net = "10.5.52.0/24".parse().unwrap();
        let k = subnet_key("/coreos.com/network/", s);
        assert_eq!(k, "/coreos.com/network/subnets/10.5.52.0-24");
        assert_eq!(key_subnet("/coreos.com/network", &k), Some(s));
        assert_eq!(
            key_subnet("/coreos.com/network", "/coreos.com/network/config"),
            None
        );
        let v = lease_value(
            [192, 168, 64, 3].into(),
            "vxlan",
            &json!({"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}),
        );
        assert_eq!(
            serde_json::from_str::<Value>(&v).unwrap(),
            json!({"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}})
        );
        let l = parse_lease(s, r#"{"publicip":"192.168.64.3","BackendType":"host-gw"}"#).unwrap();
        assert_eq!(l.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(l.backend_data, Value::Null);
        assert!(parse_lease(s, "{}").is_err());
    }

    #[test]
    fn candidates_span_subnet_min_to_max() {
        let nc = crate::config::parse(
            Path::new("x"),
            r#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.10.0","SubnetMax":"10.244.12.0"}"#,
        )
        .unwrap();
        let c: Vec<String> = candidates(&nc).map(|n| n.to_string()).collect();
        assert_eq!(c, ["10.244.10.0/24", "10.244.11.0/24", "10.244.12.0/24"]);
    }
}
