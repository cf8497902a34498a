//! A Kubernetes API server for the Node resource, faithful in what flannel's subnet manager
//! relies on: `GET /api/v1/nodes` (a list with `metadata.resourceVersion`), the watch
//! (`?watch=true&resourceVersion=N&allowWatchBookmarks=true`, a chunked stream of JSON events,
//! `BOOKMARK`s, an `ERROR` event with code 410 for an expired version, the stream ending after
//! its `timeoutSeconds` — capped short here, so clients must resume), `GET` of one node, and
//! strategic-merge/merge `PATCH` of a node and its status subresource (annotations merged as maps,
//! `status.conditions` merged by `type`). Every change bumps the resource version.
//!
//! Lists are served in pages (`limit`, `continue`) when a page size is set. Bearer tokens can be
//! required: a fixed set, and exec-plugin tokens `tok-<unix expiry>` that are refused (401) once
//! expired. It serves HTTP/1.1, or HTTPS with a certificate from its own CA, inside a network
//! namespace (the testbed's underlay), so agents in node namespaces reach it over the underlay,
//! as a DaemonSet reaches its API server.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// Longest a watch stays open before the server ends it (the client asks for more).
const WATCH_CAP: Duration = Duration::from_secs(4);

#[derive(Default)]
struct State {
    version: u64,
    nodes: BTreeMap<String, Value>,
    /// (version, type, object) of every change.
    events: Vec<(u64, &'static str, Value)>,
    /// Watches from versions below this get 410 Gone.
    oldest: u64,
    /// While set, every request is answered 503 (an unreachable API).
    down: bool,
    /// Request lines served, for tests to inspect, with the client's address.
    log: Vec<(Option<IpAddr>, String)>,
    /// Items per list page, if lists are paged.
    page_size: Option<usize>,
    /// If set, the bearer tokens accepted (besides unexpired `tok-<unix expiry>` ones).
    tokens: Option<BTreeSet<String>>,
    /// Every bearer token presented.
    seen_tokens: BTreeSet<String>,
    /// Every User-Agent seen.
    user_agents: BTreeSet<String>,
    /// Requests refused with 401.
    unauthorized: u64,
}

/// A connection: plain TCP or TLS over it.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

type Shared = Arc<(Mutex<State>, Condvar)>;

/// A running fake API server; stops when dropped.
pub struct FakeKube {
    shared: Shared,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// The CA (PEM) that signed the server's certificate, if it serves HTTPS.
    ca_pem: Option<String>,
}

impl FakeKube {
    /// Serves HTTP on `addr`, bound inside network namespace `netns`.
    pub fn start(netns: &str, addr: SocketAddr) -> Result<Self> {
        Self::serve_on(netns, addr, None)
    }

    /// Serves HTTPS on `addr` with a certificate for its IP address from a CA of its own
    /// ([`Self::ca_pem`]).
    pub fn start_tls(netns: &str, addr: SocketAddr) -> Result<Self> {
        let ca = crate::tls::TestCa::new()?;
        let (cert, key) = ca.issue(Some(addr.ip()), "fake kube-apiserver")?;
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
        let mut fake = Self::serve_on(netns, addr, Some(Arc::new(tls)))?;
        fake.ca_pem = Some(ca.pem);
        Ok(fake)
    }

    fn serve_on(
        netns: &str,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Self> {
        let listener = crate::with_netns(netns, move || Ok(TcpListener::bind(addr)?))
            .with_context(|| format!("binding the fake API server to {addr}"))?;
        let shared: Shared = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let peer = conn.peer_addr().ok().map(|a| a.ip());
                let s = s.clone();
                let st = st.clone();
                let tls = tls.clone();
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = match tls {
                        None => serve(&s, &st, peer, conn),
                        Some(cfg) => rustls::ServerConnection::new(cfg)
                            .map_err(anyhow::Error::from)
                            .and_then(|c| serve(&s, &st, peer, rustls::StreamOwned::new(c, conn))),
                    };
                });
            }
        });
        Ok(Self {
            shared,
            addr,
            stop,
            ca_pem: None,
        })
    }

    /// The PEM of the CA that signed the HTTPS server's certificate.
    #[must_use]
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// Serves lists in pages of at most `n` items (`None`: whole).
    pub fn set_page_size(&self, n: Option<usize>) {
        self.shared.0.lock().expect("state lock").page_size = n;
    }

    /// Requires a bearer token: one of `tokens`, or an unexpired `tok-<unix expiry>` (what the
    /// tests' exec credential plugin issues); `None` accepts any request.
    pub fn require_tokens(&self, tokens: Option<&[&str]>) {
        self.shared.0.lock().expect("state lock").tokens =
            tokens.map(|t| t.iter().map(ToString::to_string).collect());
    }

    /// Every bearer token presented so far.
    #[must_use]
    pub fn seen_tokens(&self) -> BTreeSet<String> {
        self.shared
            .0
            .lock()
            .expect("state lock")
            .seen_tokens
            .clone()
    }

    /// Every User-Agent header seen so far.
    #[must_use]
    pub fn user_agents(&self) -> BTreeSet<String> {
        self.shared
            .0
            .lock()
            .expect("state lock")
            .user_agents
            .clone()
    }

    /// Requests refused with 401 so far.
    #[must_use]
    pub fn unauthorized(&self) -> u64 {
        self.shared.0.lock().expect("state lock").unauthorized
    }

    #[must_use]
    pub fn url(&self) -> String {
        let scheme = if self.ca_pem.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    /// A kubeconfig that points at this server (trusting its CA if it serves HTTPS).
    #[must_use]
    pub fn kubeconfig(&self) -> String {
        self.kubeconfig_trusting(self.ca_pem())
    }

    /// A kubeconfig that points at this server and trusts the CA `ca_pem` (if any).
    #[must_use]
    pub fn kubeconfig_trusting(&self, ca_pem: Option<&str>) -> String {
        use base64::Engine as _;
        let ca = ca_pem.map_or(String::new(), |pem| {
            format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem)
            )
        });
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\nclusters:\n- name: test\n  cluster:\n    server: {}\n{ca}contexts:\n- name: test\n  context:\n    cluster: test\n    user: agent\nusers:\n- name: agent\n  user:\n    token: test-token\n",
            self.url()
        )
    }

    fn change(&self, kind: &'static str, name: &str, f: impl FnOnce(&mut State) -> Option<Value>) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().expect("state lock");
        if let Some(obj) = f(&mut st) {
            record(&mut st, kind, name, obj);
        }
        cv.notify_all();
    }

    /// Adds a node with `spec.podCIDR` (if any) and `annotations`.
    pub fn add_node(&self, name: &str, pod_cidr: Option<&str>, annotations: &Value) {
        let mut spec = json!({});
        if let Some(c) = pod_cidr {
            spec = json!({"podCIDR": c, "podCIDRs": [c]});
        }
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": annotations, "labels": {"kubernetes.io/hostname": name}},
            "spec": spec,
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]},
        });
        self.change("ADDED", name, |st| {
            st.nodes.insert(name.to_string(), node.clone());
            Some(node)
        });
    }

    /// Changes a node in place.
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Value)) {
        self.change("MODIFIED", name, |st| {
            let node = st.nodes.get_mut(name)?;
            f(node);
            Some(node.clone())
        });
    }

    pub fn delete_node(&self, name: &str) {
        self.change("DELETED", name, |st| st.nodes.remove(name));
    }

    /// A node as the server holds it.
    #[must_use]
    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared
            .0
            .lock()
            .expect("state lock")
            .nodes
            .get(name)
            .cloned()
    }

    /// Forgets the event history, as after an API server restart: every open watch and every
    /// watch from a version up to now ends with 410 Gone, so clients must list again.
    pub fn compact(&self) {
        let (lock, cv) = &*self.shared;
        let mut st = lock.lock().expect("state lock");
        st.oldest = st.version + 2;
        st.events.clear();
        cv.notify_all();
    }

    /// Makes the server unavailable (every request answered 503, open watches ended) or back.
    pub fn set_down(&self, down: bool) {
        let (lock, cv) = &*self.shared;
        lock.lock().expect("state lock").down = down;
        cv.notify_all();
    }

    /// The request lines (method and target) served so far.
    #[must_use]
    pub fn requests(&self) -> Vec<String> {
        let st = self.shared.0.lock().expect("state lock");
        st.log.iter().map(|(_, r)| r.clone()).collect()
    }

    /// The request lines served so far to clients at `ip` (one node's agent).
    #[must_use]
    pub fn requests_from(&self, ip: IpAddr) -> Vec<String> {
        let st = self.shared.0.lock().expect("state lock");
        st.log
            .iter()
            .filter(|(peer, _)| *peer == Some(ip))
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shared.1.notify_all();
    }
}

fn record(st: &mut State, kind: &'static str, name: &str, mut obj: Value) {
    st.version += 1;
    obj["metadata"]["resourceVersion"] = json!(st.version.to_string());
    if let Some(n) = st.nodes.get_mut(name) {
        n["metadata"]["resourceVersion"] = json!(st.version.to_string());
    }
    let v = st.version;
    st.events.push((v, kind, obj));
}

struct Request {
    method: String,
    target: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: String,
    /// The bearer token, if any.
    token: Option<String>,
    user_agent: Option<String>,
    body: Vec<u8>,
}

fn read_request(conn: &mut impl Conn) -> Result<Request> {
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut len = 0;
    let mut content_type = String::new();
    let mut token = None;
    let mut user_agent = None;
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "content-type" => content_type = v.trim().to_string(),
                "authorization" => {
                    token = v.trim().strip_prefix("Bearer ").map(str::to_string);
                }
                "user-agent" => user_agent = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    Ok(Request {
        method,
        target: target.clone(),
        path: path.to_string(),
        query,
        content_type,
        token,
        user_agent,
        body,
    })
}

/// Whether `token` may use the API under `accepted` (see [`FakeKube::require_tokens`]).
fn authorized(accepted: Option<&BTreeSet<String>>, token: Option<&str>) -> bool {
    let Some(accepted) = accepted else {
        return true;
    };
    let Some(token) = token else {
        return false;
    };
    if accepted.contains(token) {
        return true;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    token
        .strip_prefix("tok-")
        .and_then(|t| t.parse::<u64>().ok())
        .is_some_and(|expiry| expiry >= now)
}

fn respond(conn: &mut impl Conn, code: u16, body: &Value) -> Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        401 => "Unauthorized",
        404 => "Not Found",
        410 => "Gone",
        415 => "Unsupported Media Type",
        _ => "Service Unavailable",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    conn.flush()?;
    Ok(())
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason, "message": message})
}

fn serve(
    shared: &Shared,
    stop: &AtomicBool,
    peer: Option<IpAddr>,
    mut conn: impl Conn,
) -> Result<()> {
    let req = read_request(&mut conn)?;
    let (lock, cv) = &**shared;
    {
        let mut st = lock.lock().expect("state lock");
        st.log
            .push((peer, format!("{} {}", req.method, req.target)));
        if let Some(t) = &req.token {
            st.seen_tokens.insert(t.clone());
        }
        if let Some(ua) = &req.user_agent {
            st.user_agents.insert(ua.clone());
        }
        if st.down {
            drop(st);
            return respond(&mut conn, 503, &status(503, "ServiceUnavailable", "down"));
        }
        if !authorized(st.tokens.as_ref(), req.token.as_deref()) {
            st.unauthorized += 1;
            drop(st);
            return respond(&mut conn, 401, &status(401, "Unauthorized", "Unauthorized"));
        }
    }
    let segments: Vec<&str> = req.path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "nodes"])
            if req
                .query
                .get("watch")
                .is_some_and(|w| w == "true" || w == "1") =>
        {
            watch(shared, stop, conn, &req)
        }
        ("GET", ["api", "v1", "nodes"]) => {
            let st = lock.lock().expect("state lock");
            // A page: from the `continue` index, at most min(limit, page size) items.
            let start: usize = req
                .query
                .get("continue")
                .and_then(|c| c.parse().ok())
                .unwrap_or(0);
            let limit = req.query.get("limit").and_then(|l| l.parse::<usize>().ok());
            let take = match (limit, st.page_size) {
                (Some(l), Some(p)) => l.min(p),
                (Some(n), None) | (None, Some(n)) => n,
                (None, None) => usize::MAX,
            }
            .max(1);
            let items: Vec<&Value> = st.nodes.values().skip(start).take(take).collect();
            let mut metadata = json!({"resourceVersion": st.version.to_string()});
            if start + items.len() < st.nodes.len() {
                metadata["continue"] = json!((start + items.len()).to_string());
            }
            let list = json!({
                "kind": "NodeList", "apiVersion": "v1",
                "metadata": metadata,
                "items": items,
            });
            drop(st);
            respond(&mut conn, 200, &list)
        }
        ("GET", ["api", "v1", "nodes", name]) => {
            let node = lock.lock().expect("state lock").nodes.get(*name).cloned();
            match node {
                Some(n) => respond(&mut conn, 200, &n),
                None => respond(
                    &mut conn,
                    404,
                    &status(404, "NotFound", &format!("nodes \"{name}\" not found")),
                ),
            }
        }
        ("PATCH", ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"]) => {
            if !req.content_type.contains("merge-patch+json") {
                return respond(
                    &mut conn,
                    415,
                    &status(415, "UnsupportedMediaType", &req.content_type),
                );
            }
            let patch: Value = serde_json::from_slice(&req.body)?;
            let mut st = lock.lock().expect("state lock");
            let Some(node) = st.nodes.get_mut(*name) else {
                drop(st);
                return respond(&mut conn, 404, &status(404, "NotFound", name));
            };
            strategic_merge(node, &patch);
            let node = node.clone();
            record(&mut st, "MODIFIED", name, node);
            let node = st.nodes[*name].clone();
            drop(st);
            cv.notify_all();
            respond(&mut conn, 200, &node)
        }
        _ => respond(&mut conn, 404, &status(404, "NotFound", &req.path)),
    }
}

/// JSON merge patch (RFC 7386), with `status.conditions` merged by `type` as the strategic
/// merge patch of a Node does.
fn strategic_merge(target: &mut Value, patch: &Value) {
    let Some(p) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    for (k, v) in p {
        if v.is_null() {
            target.as_object_mut().expect("object").remove(k);
        } else if k == "conditions" && v.is_array() {
            let list = target[k.as_str()].as_array().cloned().unwrap_or_default();
            let mut merged = list;
            for c in v.as_array().into_iter().flatten() {
                match merged.iter_mut().find(|m| m["type"] == c["type"]) {
                    Some(m) => strategic_merge(m, c),
                    None => merged.push(c.clone()),
                }
            }
            target[k.as_str()] = Value::Array(merged);
        } else {
            strategic_merge(&mut target[k.as_str()], v);
        }
    }
}

fn chunk(conn: &mut impl Conn, event: &Value) -> std::io::Result<()> {
    let text = format!("{event}\n");
    write!(conn, "{:x}\r\n{text}\r\n", text.len())?;
    conn.flush()
}

fn watch(shared: &Shared, stop: &AtomicBool, mut conn: impl Conn, req: &Request) -> Result<()> {
    let (lock, cv) = &**shared;
    let mut from: u64 = req
        .query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let asked = req
        .query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(WATCH_CAP, Duration::from_secs);
    let deadline = Instant::now() + asked.min(WATCH_CAP);
    let bookmarks = req
        .query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )?;
    let mut st = lock.lock().expect("state lock");
    let mut last_bookmark = Instant::now();
    while Instant::now() < deadline && !stop.load(Ordering::SeqCst) && !st.down {
        if from + 1 < st.oldest {
            drop(st);
            chunk(
                &mut conn,
                &json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from}"))}),
            )?;
            write!(conn, "0\r\n\r\n")?;
            return Ok(());
        }
        let pending: Vec<Value> = st
            .events
            .iter()
            .filter(|(v, ..)| *v > from)
            .map(|(_, kind, obj)| json!({"type": kind, "object": obj}))
            .collect();
        from = st.version.max(from);
        let version = st.version;
        drop(st);
        for event in &pending {
            chunk(&mut conn, event)?;
        }
        if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
            chunk(
                &mut conn,
                &json!({"type": "BOOKMARK", "object": {"kind": "Node", "apiVersion": "v1", "metadata": {"resourceVersion": version.to_string()}}}),
            )?;
            last_bookmark = Instant::now();
        }
        st = lock.lock().expect("state lock");
        if st.version == from {
            st = cv
                .wait_timeout(st, Duration::from_millis(500))
                .expect("state lock")
                .0;
        }
    }
    drop(st);
    write!(conn, "0\r\n\r\n")?;
    Ok(())
}
