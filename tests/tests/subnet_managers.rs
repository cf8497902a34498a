//! End-to-end tests of the lease sources against their real protocols: the Kubernetes subnet
//! manager against a fake API server that speaks list/watch/patch as kube-apiserver does, plus
//! hitless restarts under load and an unreachable API. Run by `cargo xtask test`.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use base64::Engine as _;
use flannel_tests::{
    CONTROL_PLANE_IP, ETCD_PREFIX, KubeAccess,
    NodeKind::{Ebpf, Stock},
    Options, SubnetMgr, Testbed, can_connect, in_ns, run, tcp_echo, tcp_echo_paced, wait_for,
};
use nix::sys::signal::Signal;
use serde_json::json;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const PREFIX: &str = "flannel.alpha.coreos.com";

fn kube_testbed(tag: &str, kinds: &[flannel_tests::NodeKind]) -> Result<Testbed> {
    let mut options = Options::vxlan(kinds, 1);
    options.subnet_mgr = SubnetMgr::Kube;
    Testbed::start(tag, options)
}

fn annotation(tb: &Testbed, node: &str, key: &str) -> Option<String> {
    tb.kube.as_ref()?.node(node)?["metadata"]["annotations"][format!("{PREFIX}/{key}")]
        .as_str()
        .map(str::to_string)
}

/// What a restart must leave alone: node `i`'s route and node maps as `bpftool` dumps them, and
/// its pinned link IDs by pin name.
#[derive(PartialEq, Eq, Debug)]
struct PinnedState {
    routes: String,
    nodes: String,
    links: BTreeMap<String, u64>,
}

fn pinned_state(tb: &Testbed, i: usize) -> Result<PinnedState> {
    let dump = |map: &str| {
        let path = tb.nodes[i].pins().join(map);
        run(
            "bpftool",
            &["map", "dump", "pinned", &path.to_string_lossy()],
        )
    };
    Ok(PinnedState {
        routes: dump("FLANNEL_ROUTES")?,
        nodes: dump("FLANNEL_NODES")?,
        links: tb
            .pinned_links(i)?
            .into_iter()
            .map(|(name, (link, _))| (name, link))
            .collect(),
    })
}

/// Node `i`'s pinned state equals `before`; else an error saying what changed, with the log.
fn unchanged(tb: &Testbed, i: usize, before: &PinnedState, what: &str) -> Result<()> {
    let now = pinned_state(tb, i)?;
    if &now == before {
        return Ok(());
    }
    let mut changed = Vec::new();
    if now.routes != before.routes {
        changed.push(format!("routes:\n{}\n->\n{}", before.routes, now.routes));
    }
    if now.nodes != before.nodes {
        changed.push(format!("nodes:\n{}\n->\n{}", before.nodes, now.nodes));
    }
    if now.links != before.links {
        changed.push(format!("links: {:?} -> {:?}", before.links, now.links));
    }
    Err(anyhow::anyhow!(
        "{what}: {}\nagent log:\n{}",
        changed.join("\n"),
        tb.log(i)
    ))
}

/// True if node `i`'s subnet.env was written after `since` (the agent's start-up completed).
fn subnet_file_written_since(tb: &Testbed, i: usize, since: std::time::SystemTime) -> bool {
    std::fs::metadata(&tb.nodes[i].subnet_file)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t > since)
}

/// Number of remote subnets in node `i`'s pinned route map.
fn routes_of(tb: &Testbed, i: usize) -> Result<usize> {
    let path = tb.nodes[i].pins().join("FLANNEL_ROUTES");
    Ok(run(
        "bpftool",
        &["map", "dump", "pinned", &path.to_string_lossy()],
    )?
    .matches("vtep_mac")
    .count())
}

#[test]
fn kube_nodes_carry_the_leases_and_interoperate_with_stock_flannel() -> Result<()> {
    let mut tb = kube_testbed("kube", &[Ebpf, Ebpf, Stock])?;
    let api = tb.kube.as_ref().context("fake API")?;
    // Each agent published its lease in its node's annotations, as flanneld does.
    for i in 0..2 {
        let name = format!("n{}", i + 1);
        let node = &tb.nodes[i];
        ensure!(annotation(&tb, &name, "backend-type").as_deref() == Some("vxlan"));
        ensure!(annotation(&tb, &name, "kube-subnet-manager").as_deref() == Some("true"));
        ensure!(
            annotation(&tb, &name, "public-ip") == Some(node.public_ip.to_string()),
            "public-ip of {name}"
        );
        let data: serde_json::Value =
            serde_json::from_str(&annotation(&tb, &name, "backend-data").unwrap_or_default())?;
        ensure!(
            data == json!({"VNI": 1, "VtepMAC": node.vtep_mac}),
            "backend-data of {name}: {data}"
        );
        wait_for("NetworkUnavailable=False", Duration::from_secs(10), || {
            api.node(&name).is_some_and(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| {
                        c["type"] == "NetworkUnavailable"
                            && c["status"] == "False"
                            && c["reason"] == "FlannelIsUp"
                    })
            })
        })?;
        let env = tb.subnet_env(i)?;
        ensure!(
            env["FLANNEL_SUBNET"] == format!("10.244.{}.1/24", i + 1),
            "{env:?}"
        );
    }
    let patches = api
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH /api/v1/nodes/n1/status"))
        .count();
    ensure!(
        patches >= 2,
        "annotations and condition patched on the status subresource"
    );
    // Pod traffic both ways with the stock flanneld node, as it reads our annotations.
    tb.all_pairs(256 * KIB)?;

    // Nodes that are not flannel's (no annotations, no podCIDR) are skipped with a log line.
    api.add_node("worker-without-flannel", None, &json!({}));
    api.add_node(
        "worker-no-cidr",
        None,
        &json!({format!("{PREFIX}/kube-subnet-manager"): "true"}),
    );
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        routes_of(&tb, 0)? == 2,
        "a node that is not flannel's became a route"
    );

    // The stock node goes away: exactly its route goes; it comes back: its route too.
    let stock = api.node("n3").context("n3")?;
    api.delete_node("n3");
    wait_for("n3's lease removed", Duration::from_secs(10), || {
        routes_of(&tb, 0).is_ok_and(|n| n == 1)
    })?;
    ensure!(
        !can_connect(
            &tb.nodes[0].pods[0],
            &tb.nodes[2].pods[0],
            Duration::from_secs(1)
        )?,
        "no route to a deleted node"
    );
    api.add_node(
        "n3",
        stock["spec"]["podCIDR"].as_str(),
        &stock["metadata"]["annotations"],
    );
    wait_for("n3's lease back", Duration::from_secs(10), || {
        routes_of(&tb, 0).is_ok_and(|n| n == 2)
    })?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[2].pods[0], 256 * KIB)?;

    // A restart reuses the VTEP MAC in backend-data and changes nothing.
    let before = annotation(&tb, "n1", "backend-data");
    let state = pinned_state(&tb, 0)?;
    tb.stop_agent(0, Signal::SIGTERM)?;
    tb.start_agent(0)?;
    ensure!(
        annotation(&tb, "n1", "backend-data") == before,
        "VtepMAC reused"
    );
    unchanged(
        &tb,
        0,
        &state,
        "the restarted agent changed the maps or links",
    )?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], 256 * KIB)?;
    Ok(())
}

#[test]
fn kube_watch_expiry_and_api_outages_never_flush_the_dataplane() -> Result<()> {
    let mut tb = kube_testbed("kwatch", &[Ebpf, Ebpf])?;
    let (p1, p2) = (tb.nodes[0].pods[0].clone(), tb.nodes[1].pods[0].clone());
    let api = tb.kube.as_ref().context("fake API")?;
    // Watches end every few seconds (as an API server's timeout) and are resumed from the last
    // version seen, bookmarks included.
    wait_for("a resumed watch", Duration::from_secs(15), || {
        api.requests()
            .iter()
            .filter(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true"))
            .count()
            >= 3
    })?;
    // History compacted: the next watch gets 410 Gone, the agent lists again, nothing flushed.
    let lists = || {
        api.requests()
            .iter()
            .filter(|r| r.starts_with("GET /api/v1/nodes") && !r.contains("watch=true"))
            .filter(|r| !r.starts_with("GET /api/v1/nodes/"))
            .count()
    };
    let listed = lists();
    api.compact();
    api.update_node("n2", |n| {
        n["metadata"]["labels"]["touched"] = json!("yes");
    });
    wait_for("a re-list after 410 Gone", Duration::from_secs(15), || {
        lists() > listed
    })?;
    ensure!(routes_of(&tb, 0)? == 1, "the re-list kept the route");
    // The API goes away for a while: traffic keeps flowing, the agent keeps asking.
    let before = api.requests().len();
    api.set_down(true);
    wait_for(
        "the agent retrying through the outage",
        Duration::from_secs(15),
        || api.requests().len() >= before + 2,
    )?;
    tcp_echo(&p1, &p2, MIB)?;
    ensure!(routes_of(&tb, 0)? == 1, "an outage flushes nothing");
    api.set_down(false);

    // Unreachable at start-up: the restarted agent waits, saying for what, while the pinned
    // dataplane keeps forwarding; then it converges without a flush.
    let state = pinned_state(&tb, 0)?;
    tb.stop_agent(0, Signal::SIGKILL)?;
    tb.kube.as_ref().context("fake API")?.set_down(true);
    let spawned = std::time::SystemTime::now();
    tb.spawn_agent(0)?;
    // It keeps asking for its node, and stays up.
    let asked = |tb: &Testbed| {
        tb.kube.as_ref().map_or(0, |api| {
            api.requests()
                .iter()
                .filter(|r| r.starts_with("GET /api/v1/nodes/n1"))
                .count()
        })
    };
    let first = asked(&tb);
    wait_for(
        "the agent asking the API again",
        Duration::from_secs(15),
        || asked(&tb) >= first + 2,
    )?;
    ensure!(
        tb.agent_alive(0),
        "the agent gave up while the API was down"
    );
    tcp_echo(&p1, &p2, MIB).context("pinned dataplane forwards while the agent waits")?;
    tb.kube.as_ref().context("fake API")?.set_down(false);
    wait_for(
        "the agent up after the outage (subnet.env written)",
        Duration::from_secs(40),
        || subnet_file_written_since(&tb, 0, spawned),
    )?;
    unchanged(
        &tb,
        0,
        &state,
        "the agent changed the maps or links after the outage",
    )?;
    tcp_echo(&p1, &p2, MIB)?;
    Ok(())
}

/// An exec credential plugin, as EKS's, GKE's and AKS's kubeconfigs use: each run issues a
/// token `tok-<unix expiry>` valid for `lifetime` seconds (the fake API refuses it after that).
fn exec_plugin(dir: &std::path::Path, lifetime: u64) -> Result<std::path::PathBuf> {
    let script = dir.join("credential-plugin");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexp=$(( $(date +%s) + {lifetime} ))\n\
             printf '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"tok-%s\",\"expirationTimestamp\":\"%s\"}}}}' \
             \"$exp\" \"$(date -u -d @$exp +%Y-%m-%dT%H:%M:%SZ)\"\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(script)
}

#[test]
fn kube_clients_page_lists_refresh_exec_tokens_and_merge_kubeconfigs() -> Result<()> {
    let mut tb = kube_testbed("kauth", &[Ebpf, Ebpf, Ebpf])?;
    let api = tb.kube.as_ref().context("fake API")?;
    let server = api.url();
    // From now on: a token is required, lists come in pages of one node.
    api.require_tokens(Some(&["test-token", "merged-token"]));
    api.set_page_size(Some(1));

    // Node 1: an exec plugin whose tokens expire 12 s after they are issued (kube-rs refreshes a
    // token that expires within 60 s, so every request runs the plugin again).
    let plugin = exec_plugin(&tb.dir, 12)?;
    let exec_kubeconfig = tb.dir.join("kubeconfig-exec");
    std::fs::write(
        &exec_kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\nusers:\n- name: u\n  user:\n    exec:\n      \
             apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n",
            plugin.display()
        ),
    )?;
    // Node 2: KUBECONFIG names two files, merged: the cluster and context in one, the user (and
    // the only token the API accepts for it) in the other.
    let (a, b) = (tb.dir.join("kubeconfig-a"), tb.dir.join("kubeconfig-b"));
    std::fs::write(
        &a,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: merged\n"
        ),
    )?;
    std::fs::write(
        &b,
        "apiVersion: v1\nkind: Config\nusers:\n- name: merged\n  user:\n    token: merged-token\n",
    )?;
    for (i, access) in [
        (0, KubeAccess::Kubeconfig(exec_kubeconfig)),
        (
            1,
            KubeAccess::KubeconfigEnv(format!("{}:{}", a.display(), b.display())),
        ),
    ] {
        tb.stop_agent(i, Signal::SIGTERM)?;
        tb.kube_access.insert(i, access);
        tb.start_agent(i)?;
    }
    let api = tb.kube.as_ref().context("fake API")?;
    // The lists were paged: the agents followed `continue` to the end and see both peers.
    ensure!(
        api.requests().iter().any(|r| r.contains("continue=")),
        "no paged list: {:?}",
        api.requests()
    );
    for i in 0..3 {
        wait_for("every node's two peers", Duration::from_secs(15), || {
            routes_of(&tb, i).is_ok_and(|n| n == 2)
        })?;
    }
    let exec_tokens = |tb: &Testbed| {
        tb.kube.as_ref().map_or(0, |api| {
            api.seen_tokens()
                .into_iter()
                .filter(|t| t.starts_with("tok-"))
                .count()
        })
    };
    ensure!(
        exec_tokens(&tb) >= 1,
        "the exec plugin's token was never used"
    );
    // The agents name themselves to the API server.
    let agents = api.user_agents();
    ensure!(
        !agents.is_empty() && agents.iter().all(|ua| ua.starts_with("flannel-agent/")),
        "{agents:?}"
    );
    // Past the first tokens' expiry: a node's lease goes away, and every agent (the exec one
    // with a fresh token) still follows the change.
    std::thread::sleep(Duration::from_secs(14));
    tb.stop_agent(2, Signal::SIGTERM)?;
    let api = tb.kube.as_ref().context("fake API")?;
    api.delete_node("n3");
    for i in 0..2 {
        wait_for("n3's route removed", Duration::from_secs(20), || {
            routes_of(&tb, i).is_ok_and(|n| n == 1)
        })?;
    }
    ensure!(
        exec_tokens(&tb) >= 2,
        "the exec token was not refreshed: {:?}",
        api.seen_tokens()
    );
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], 256 * KIB)?;
    Ok(())
}

#[test]
fn kube_over_https_trusts_the_kubeconfig_ca_and_refuses_another() -> Result<()> {
    let mut options = Options::vxlan(&[Ebpf, Ebpf], 1);
    options.subnet_mgr = SubnetMgr::Kube;
    options.kube_tls = true;
    let mut tb = Testbed::start("ktls", options)?;
    // Both agents reached the HTTPS API with the CA from their kubeconfig.
    for i in 0..2 {
        wait_for("the peer's route", Duration::from_secs(15), || {
            routes_of(&tb, i).is_ok_and(|n| n == 1)
        })?;
    }
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[1].pods[0], 256 * KIB)?;

    // Another CA: the server's certificate is refused, nothing reaches the API.
    let other = flannel_tests::tls::TestCa::new()?;
    let wrong = tb.dir.join("kubeconfig-wrong-ca");
    let api = tb.kube.as_ref().context("fake API")?;
    std::fs::write(&wrong, api.kubeconfig_trusting(Some(&other.pem)))?;
    tb.stop_agent(0, Signal::SIGTERM)?;
    let api = tb.kube.as_ref().context("fake API")?;
    api.update_node("n1", |n| {
        if let Some(a) = n["metadata"]["annotations"].as_object_mut() {
            a.retain(|k, _| !k.starts_with(PREFIX));
        }
    });
    // Node 1's requests only: node 2's agent keeps watching (and re-watches after the update).
    let node1 = std::net::IpAddr::from(tb.nodes[0].public_ip);
    let served = api.requests_from(node1).len();
    ensure!(served > 0, "no request seen from node 1's address {node1}");
    tb.kube_access.insert(0, KubeAccess::Kubeconfig(wrong));
    tb.spawn_agent(0)?;
    std::thread::sleep(Duration::from_secs(4));
    let api = tb.kube.as_ref().context("fake API")?;
    let after = api.requests_from(node1);
    ensure!(
        after.len() == served,
        "a request got through a certificate signed by another CA: {:?}",
        &after[served..]
    );
    ensure!(
        annotation(&tb, "n1", "public-ip").is_none(),
        "the lease was published through an untrusted server"
    );
    Ok(())
}

#[test]
fn sigkill_during_a_transfer_loses_no_connection_and_no_byte() -> Result<()> {
    let mut tb = kube_testbed("kill", &[Ebpf, Ebpf])?;
    let (p1, p2) = (tb.nodes[0].pods[0].clone(), tb.nodes[1].pods[0].clone());
    // About 6 s of traffic: 24 MiB echoed both ways, paced.
    let transfer = std::thread::spawn(move || {
        tcp_echo_paced(&p1, &p2, 24 * MIB, Some(Duration::from_millis(15)))
    });
    std::thread::sleep(Duration::from_millis(800));
    for i in 0..2 {
        let state = pinned_state(&tb, i)?;
        tb.stop_agent(i, Signal::SIGKILL)?;
        tb.start_agent(i)?;
        unchanged(
            &tb,
            i,
            &state,
            &format!("node {} restarted without converging in place", i + 1),
        )?;
    }
    ensure!(
        !transfer.is_finished(),
        "the transfer must outlast both restarts"
    );
    transfer
        .join()
        .map_err(|_| anyhow::anyhow!("transfer panicked"))?
        .context("the connection across two SIGKILLed agents")?;
    Ok(())
}

/// Node `i`'s pinned routes: subnet → (public IP, VTEP MAC), from `bpftool`'s BTF-formatted dump.
fn route_map(tb: &Testbed, i: usize) -> Result<BTreeMap<String, (String, String)>> {
    let bytes = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_u64)
            .collect()
    };
    let mut out = BTreeMap::new();
    for f in &tb.pinned_entries(i, "FLANNEL_ROUTES")? {
        let d = bytes(&f["key"]["data"]);
        let ip = bytes(&f["value"]["public_ip"]);
        let mac = bytes(&f["value"]["vtep_mac"]);
        out.insert(
            format!(
                "{}.{}.{}.{}/{}",
                d[0], d[1], d[2], d[3], f["key"]["prefix_len"]
            ),
            (
                format!("{}.{}.{}.{}", ip[0], ip[1], ip[2], ip[3]),
                mac.iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
        );
    }
    Ok(out)
}

fn etcd_testbed(
    tag: &str,
    kinds: &[flannel_tests::NodeKind],
    net_conf: Option<&str>,
) -> Result<Testbed> {
    let mut options = Options::vxlan(kinds, 1);
    options.subnet_mgr = SubnetMgr::Etcd;
    if let Some(n) = net_conf {
        options.net_conf = n.to_string();
    }
    Testbed::start(tag, options)
}

#[test]
fn etcd_leases_are_flannels_own_format_and_subnets_are_taken_atomically() -> Result<()> {
    let mut tb = etcd_testbed("etcd", &[Ebpf, Ebpf, Stock], None)?;
    let stock_subnet = tb.nodes[2].subnet.clone();
    let mut subnets = Vec::new();
    for i in 0..2 {
        let node = &tb.nodes[i];
        ensure!(
            node.subnet != stock_subnet,
            "an agent took the stock node's subnet"
        );
        subnets.push(node.subnet.clone());
        let key = format!("{ETCD_PREFIX}/subnets/{}", node.subnet.replace('/', "-"));
        let value: serde_json::Value =
            serde_json::from_str(&tb.etcd_get(&key)?.context("lease missing")?)?;
        ensure!(
            value
                == json!({"PublicIP": node.public_ip.to_string(), "PublicIPv6": null, "BackendType": "vxlan",
                            "BackendData": {"VNI": 1, "VtepMAC": node.vtep_mac}}),
            "{key} = {value}"
        );
        // Bound to flannel's 24 h lease.
        let b64 = base64::engine::general_purpose::STANDARD.encode(&key);
        let kv = tb.etcd_call("/v3/kv/range", &json!({"key": b64}))?;
        let lease = kv["kvs"][0]["lease"]
            .as_str()
            .context("no etcd lease on the key")?
            .to_string();
        let ttl = tb.etcd_call("/v3/lease/timetolive", &json!({"ID": lease}))?;
        let granted: u64 = ttl["grantedTTL"].as_str().unwrap_or("0").parse()?;
        ensure!(granted == 86_400, "TTL {ttl}");
    }
    ensure!(subnets[0] != subnets[1], "two agents, two subnets");
    tb.all_pairs(256 * KIB)?;

    // A restarted agent reuses the lease that carries its public IP: same subnet, same VTEP MAC.
    let mac = tb.nodes[0].vtep_mac.clone();
    tb.stop_agent(0, Signal::SIGKILL)?;
    tb.start_agent(0)?;
    let key = format!("{ETCD_PREFIX}/subnets/{}", subnets[0].replace('/', "-"));
    let value: serde_json::Value = serde_json::from_str(&tb.etcd_get(&key)?.context("lease")?)?;
    ensure!(
        value["BackendData"]["VtepMAC"] == mac,
        "VtepMAC reused: {value}"
    );
    ensure!(tb.subnet_env(0)?["FLANNEL_SUBNET"].starts_with(&subnets[0][..subnets[0].len() - 4]));

    // The stock node's lease removed with etcdctl, then written back: exactly its route follows.
    let stock_key = format!("{ETCD_PREFIX}/subnets/{}", stock_subnet.replace('/', "-"));
    let stock_value = tb.etcd_get(&stock_key)?.context("stock lease")?;
    in_ns(
        &tb.underlay(),
        "etcdctl",
        &["--endpoints=http://198.18.0.254:2379", "del", &stock_key],
    )?;
    wait_for(
        "the stock lease gone from node 1",
        Duration::from_secs(10),
        || route_map(&tb, 0).is_ok_and(|m| m.len() == 1 && !m.contains_key(&stock_subnet)),
    )?;
    tb.etcdctl_put_with_lease(&stock_key, &stock_value)?;
    wait_for("the stock lease back", Duration::from_secs(10), || {
        route_map(&tb, 0).is_ok_and(|m| m.contains_key(&stock_subnet))
    })?;
    tcp_echo(&tb.nodes[0].pods[0], &tb.nodes[2].pods[0], 256 * KIB)?;

    // Our own lease deleted by hand: the agent takes it back (create-only), same subnet.
    let own_key = format!("{ETCD_PREFIX}/subnets/{}", subnets[0].replace('/', "-"));
    in_ns(
        &tb.underlay(),
        "etcdctl",
        &["--endpoints=http://198.18.0.254:2379", "del", &own_key],
    )?;
    wait_for("node 1's lease re-created", Duration::from_secs(10), || {
        tb.etcd_get(&own_key).is_ok_and(|v| v.is_some())
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&tb.etcd_get(&own_key)?.context("own lease")?)?;
    ensure!(
        value["PublicIP"] == tb.nodes[0].public_ip.to_string(),
        "re-created for another node: {value}"
    );
    tcp_echo(&tb.nodes[1].pods[0], &tb.nodes[0].pods[0], 256 * KIB)?;

    etcd_unreachable_at_start_up(&mut tb)
}

/// etcd unreachable at start-up: the agent waits, saying for what, while the pinned dataplane
/// forwards; when etcd is back it converges without a flush.
fn etcd_unreachable_at_start_up(tb: &mut Testbed) -> Result<()> {
    let state = pinned_state(tb, 1)?;
    let subnet = tb.subnet_env(1)?["FLANNEL_SUBNET"].clone();
    tb.stop_agent(1, Signal::SIGKILL)?;
    tb.stop_etcd();
    let spawned = std::time::SystemTime::now();
    tb.spawn_agent(1)?;
    std::thread::sleep(Duration::from_secs(3));
    ensure!(tb.agent_alive(1), "the agent gave up while etcd was down");
    ensure!(
        !subnet_file_written_since(tb, 1, spawned),
        "up without etcd?"
    );
    tcp_echo(&tb.nodes[1].pods[0], &tb.nodes[0].pods[0], MIB)
        .context("pinned dataplane forwards while the agent waits for etcd")?;
    tb.resume_etcd()?;
    wait_for(
        "the agent up after etcd is back (subnet.env written)",
        Duration::from_secs(40),
        || subnet_file_written_since(tb, 1, spawned),
    )?;
    ensure!(
        tb.subnet_env(1)?["FLANNEL_SUBNET"] == subnet,
        "the lease was not reused"
    );
    ensure!(
        pinned_state(tb, 1)? == state,
        "the agent changed the maps or links after etcd came back"
    );
    tcp_echo(&tb.nodes[1].pods[0], &tb.nodes[2].pods[0], MIB)?;
    Ok(())
}

#[test]
fn etcd_churn_of_a_thousand_leases_converges_exactly() -> Result<()> {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let tb = etcd_testbed(
        "churn",
        &[Ebpf],
        Some(r#"{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}"#),
    )?;
    let own = tb.nodes[0].subnet.clone();
    let lease = |n: u32, mac_seed: u32| {
        let subnet = format!("10.{}.{}.0/24", 100 + n / 256, n % 256);
        let ip = format!("198.19.{}.{}", n / 200, n % 200 + 1);
        let mac = format!(
            "0e:aa:{:02x}:{:02x}:{:02x}:{:02x}",
            mac_seed >> 8 & 0xff,
            mac_seed & 0xff,
            n >> 8,
            n & 0xff
        );
        (subnet, ip, mac)
    };
    let write = |entries: &[(String, String, String)], delete: &[String]| -> Result<()> {
        let mut ops: Vec<serde_json::Value> = entries
            .iter()
            .map(|(subnet, ip, mac)| {
                let key = format!("{ETCD_PREFIX}/subnets/{}", subnet.replace('/', "-"));
                let value = json!({"PublicIP": ip, "PublicIPv6": null, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": mac}});
                json!({"request_put": {"key": b64(&key), "value": b64(&value.to_string())}})
            })
            .collect();
        ops.extend(delete.iter().map(|subnet| {
            let key = format!("{ETCD_PREFIX}/subnets/{}", subnet.replace('/', "-"));
            json!({"request_delete_range": {"key": b64(&key)}})
        }));
        // etcd allows 128 operations per transaction.
        for batch in ops.chunks(100) {
            tb.etcd_call("/v3/kv/txn", &json!({"success": batch}))?;
        }
        Ok(())
    };
    let expect = |entries: &BTreeMap<String, (String, String)>| {
        let got = route_map(&tb, 0).unwrap_or_default();
        got == *entries
    };
    // 1,000 leases added.
    let mut want: BTreeMap<String, (String, String)> = BTreeMap::new();
    let added: Vec<_> = (0..1000).map(|n| lease(n, 1)).collect();
    for (s, ip, mac) in &added {
        want.insert(s.clone(), (ip.clone(), mac.clone()));
    }
    let t = Instant::now();
    write(&added, &[])?;
    wait_for("1,000 leases in the map", Duration::from_secs(30), || {
        expect(&want)
    })
    .with_context(|| {
        let log = tb.log(0);
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        format!(
            "map has {:?} entries; agent log (last lines, newest first):\n{}",
            route_map(&tb, 0).map(|m| m.len()),
            tail.join("\n")
        )
    })?;
    let add_time = t.elapsed();
    // 300 changed (new VTEP MAC), 300 removed.
    let changed: Vec<_> = (0..300).map(|n| lease(n, 2)).collect();
    let removed: Vec<String> = (300..600).map(|n| lease(n, 1).0).collect();
    for (s, ip, mac) in &changed {
        want.insert(s.clone(), (ip.clone(), mac.clone()));
    }
    for s in &removed {
        want.remove(s);
    }
    let t = Instant::now();
    write(&changed, &removed)?;
    wait_for(
        "changes and removals in the map",
        Duration::from_secs(30),
        || expect(&want),
    )?;
    let churn_time = t.elapsed();
    ensure!(
        !want.contains_key(&own),
        "the node's own subnet is not a route"
    );
    eprintln!(
        "etcd churn: 1,000 leases added → map exact in {add_time:?}; 300 changed + 300 removed → exact in {churn_time:?}"
    );
    std::fs::write(
        std::env::temp_dir().join("flannel-ebpf-churn.txt"),
        format!(
            "added_1000_ms={}\nchurn_600_ms={}\n",
            add_time.as_millis(),
            churn_time.as_millis()
        ),
    )?;
    Ok(())
}

/// An etcd of the test's own in the underlay namespace (client port `port`, peer port
/// `port + 1`), stopped on drop.
struct OwnEtcd {
    child: std::process::Child,
    endpoint: String,
    /// `etcdctl` flags that reach it (TLS files, a user).
    flags: Vec<String>,
    underlay: String,
}

impl OwnEtcd {
    fn start(tb: &Testbed, name: &str, scheme: &str, port: u16, extra: &[String]) -> Result<Self> {
        let endpoint = format!("{scheme}://{CONTROL_PLANE_IP}:{port}");
        let peer = format!("http://127.0.0.1:{}", port + 1);
        let log = std::fs::File::create(tb.dir.join(format!("{name}.log")))?;
        let child = std::process::Command::new("ip")
            .args(["netns", "exec", &tb.underlay(), "etcd", "--name", name])
            .arg("--data-dir")
            .arg(tb.dir.join(name))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{name}={peer}")])
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        Ok(Self {
            child,
            endpoint,
            flags: Vec::new(),
            underlay: tb.underlay(),
        })
    }

    fn ctl(&self, args: &[&str]) -> Result<String> {
        let endpoints = format!("--endpoints={}", self.endpoint);
        let mut all: Vec<&str> = vec![&endpoints];
        all.extend(self.flags.iter().map(String::as_str));
        all.extend_from_slice(args);
        in_ns(&self.underlay, "etcdctl", &all)
    }

    /// The subnet lease keys under the test prefix.
    fn subnet_keys(&self) -> Result<String> {
        self.ctl(&[
            "get",
            "--prefix",
            "--keys-only",
            &format!("{ETCD_PREFIX}/subnets/"),
        ])
    }
}

impl Drop for OwnEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs node `i`'s agent against `etcd` with `extra` flags until it has written a lease there
/// (`true`), or for `patience` without one (`false`); then stops it.
fn agent_acquires(
    tb: &Testbed,
    i: usize,
    etcd: &OwnEtcd,
    extra: &[String],
    patience: Duration,
) -> Result<bool> {
    agent_acquires_then(tb, i, etcd, extra, patience, |_| Ok(()))
}

/// [`agent_acquires`], running `then` with the lease's key while the agent still runs.
fn agent_acquires_then(
    tb: &Testbed,
    i: usize,
    etcd: &OwnEtcd,
    extra: &[String],
    patience: Duration,
    then: impl FnOnce(&str) -> Result<()>,
) -> Result<bool> {
    let mut args = tb.agent_args(i);
    let at = args
        .iter()
        .position(|a| a == "--etcd-endpoints")
        .context("etcd agent args")?;
    args[at + 1].clone_from(&etcd.endpoint);
    args.extend_from_slice(extra);
    let log = std::fs::File::create(tb.dir.join(format!("agent-{i}-own-etcd.log")))?;
    let mut child = tb
        .command_in_node(i, &tb.agent_bin)
        .args(&args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let ip = tb.nodes[i].public_ip.to_string();
    let deadline = Instant::now() + patience;
    let mut acquired = None;
    while Instant::now() < deadline && child.try_wait()?.is_none() {
        let keys = etcd.subnet_keys().unwrap_or_default();
        if let Some(key) = keys.lines().find(|k| !k.trim().is_empty())
            && etcd.ctl(&["get", "--print-value-only", key])?.contains(&ip)
        {
            acquired = Some(key.trim().to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let then = acquired.as_deref().map_or(Ok(()), then);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id().cast_signed()),
        Signal::SIGTERM,
    );
    let _ = child.wait();
    then?;
    Ok(acquired.is_some())
}

#[test]
fn etcd_with_client_certificates_and_with_password_authentication() -> Result<()> {
    let mut tb = etcd_testbed("etcdsec", &[Ebpf, Ebpf], None)?;
    tb.stop_agent(0, Signal::SIGTERM)?;
    let net_conf = tb.options.net_conf.clone();
    let pki = tb.dir.join("pki");
    let other_pki = tb.dir.join("pki-other");
    std::fs::create_dir_all(&pki)?;
    std::fs::create_dir_all(&other_pki)?;
    let ca = flannel_tests::tls::TestCa::new()?;
    ca.write(
        &pki,
        &[
            ("server", Some(CONTROL_PLANE_IP.into()), "etcd"),
            ("client", None, "flannel"),
        ],
    )?;
    // A client certificate from another CA: refused by the server.
    flannel_tests::tls::TestCa::new()?.write(&other_pki, &[("client", None, "intruder")])?;
    let file = |dir: &std::path::Path, name: &str| dir.join(name).to_string_lossy().into_owned();

    // etcd with TLS and client certificate authentication.
    let mut tls = OwnEtcd::start(
        &tb,
        "etcd-tls",
        "https",
        2381,
        &[
            "--cert-file".into(),
            file(&pki, "server.pem"),
            "--key-file".into(),
            file(&pki, "server-key.pem"),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            file(&pki, "ca.pem"),
        ],
    )?;
    tls.flags = vec![
        format!("--cacert={}", file(&pki, "ca.pem")),
        format!("--cert={}", file(&pki, "client.pem")),
        format!("--key={}", file(&pki, "client-key.pem")),
    ];
    wait_for("etcd with TLS", Duration::from_secs(20), || {
        tls.ctl(&["put", &format!("{ETCD_PREFIX}/config"), &net_conf])
            .is_ok()
    })?;
    let tls_flags = |dir: &std::path::Path| {
        vec![
            "--etcd-cafile".to_string(),
            file(&pki, "ca.pem"),
            "--etcd-certfile".into(),
            file(dir, "client.pem"),
            "--etcd-keyfile".into(),
            file(dir, "client-key.pem"),
        ]
    };
    ensure!(
        !agent_acquires(&tb, 0, &tls, &tls_flags(&other_pki), Duration::from_secs(5))?,
        "a client certificate from another CA was accepted"
    );
    ensure!(tls.subnet_keys()?.trim().is_empty());
    ensure!(
        agent_acquires(&tb, 0, &tls, &tls_flags(&pki), Duration::from_secs(20))?,
        "no lease acquired over TLS with a client certificate"
    );
    drop(tls);
    password_authentication(&tb, &net_conf)
}

/// etcd with authentication: a user and password, and tokens that expire after 2 s.
fn password_authentication(tb: &Testbed, net_conf: &str) -> Result<()> {
    let mut auth = OwnEtcd::start(
        tb,
        "etcd-auth",
        "http",
        2383,
        &["--auth-token-ttl=2".into()],
    )?;
    wait_for("etcd", Duration::from_secs(20), || {
        auth.ctl(&["put", &format!("{ETCD_PREFIX}/config"), net_conf])
            .is_ok()
    })?;
    auth.ctl(&["user", "add", "root:rootpw"])?;
    auth.ctl(&["auth", "enable"])?;
    auth.flags = vec!["--user=root:rootpw".into()];
    let password = |p: &str| {
        vec![
            "--etcd-username".to_string(),
            "root".into(),
            "--etcd-password".into(),
            p.into(),
        ]
    };
    ensure!(
        !agent_acquires(tb, 0, &auth, &password("wrong"), Duration::from_secs(5))?,
        "a wrong password was accepted"
    );
    ensure!(auth.subnet_keys()?.trim().is_empty());
    // Once its token has expired, the agent still writes: its lease deleted by hand comes back.
    let taken_back = |key: &str| {
        std::thread::sleep(Duration::from_secs(5));
        auth.ctl(&["del", key])?;
        let ip = tb.nodes[0].public_ip.to_string();
        wait_for(
            "the lease re-created after the token expired",
            Duration::from_secs(30),
            || {
                auth.ctl(&["get", "--print-value-only", key])
                    .is_ok_and(|v| v.contains(&ip))
            },
        )
    };
    ensure!(
        agent_acquires_then(
            tb,
            0,
            &auth,
            &password("rootpw"),
            Duration::from_secs(20),
            taken_back
        )?,
        "no lease acquired with a user and password"
    );
    Ok(())
}

/// The local ports of node `i`'s established connections to the testbed's etcd.
fn etcd_connections(tb: &Testbed, i: usize) -> Result<Vec<String>> {
    let out = in_ns(
        &tb.nodes[i].netns,
        "ss",
        &[
            "-tnH",
            "state",
            "established",
            "dst",
            &format!("{CONTROL_PLANE_IP}:2379"),
        ],
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(2)?
                .rsplit(':')
                .next()
                .map(String::from)
        })
        .collect())
}

/// A connection to etcd that goes silent without closing (its packets dropped both ways, as
/// when a NAT on the way forgets it or the server's host vanishes) is given up by the client's
/// keep-alive: the agent follows the leases again over a new one. Without it the watch would
/// wait for TCP to time out, a quarter of an hour.
#[test]
fn etcd_half_open_connection_is_noticed() -> Result<()> {
    let tb = etcd_testbed("etcdho", &[Ebpf, Ebpf], None)?;
    let ns = tb.nodes[0].netns.clone();
    let old = etcd_connections(&tb, 0)?;
    ensure!(!old.is_empty(), "node 0 has no connection to etcd");
    for port in &old {
        for (chain, dir) in [("OUTPUT", "--sport"), ("INPUT", "--dport")] {
            in_ns(
                &ns,
                "iptables",
                &["-I", chain, "-p", "tcp", dir, port, "-j", "DROP"],
            )?;
        }
    }
    // A new peer's lease, while node 0's watch hears nothing.
    let subnet = (200..250)
        .map(|k| format!("10.244.{k}.0/24"))
        .find(|s| tb.nodes.iter().all(|n| &n.subnet != s))
        .context("a free subnet")?;
    let key = format!("{ETCD_PREFIX}/subnets/{}", subnet.replace('/', "-"));
    tb.etcdctl_put_with_lease(
        &key,
        &json!({"PublicIP": "198.18.0.99", "PublicIPv6": null, "BackendType": "vxlan",
                "BackendData": {"VNI": 1, "VtepMAC": "0a:58:0a:f4:63:01"}})
        .to_string(),
    )?;
    wait_for(
        "node 0 following the leases over a new connection",
        Duration::from_secs(75),
        || route_map(&tb, 0).is_ok_and(|m| m.contains_key(&subnet)),
    )?;
    let now = etcd_connections(&tb, 0)?;
    ensure!(
        now.iter().any(|p| !old.contains(p)),
        "no new connection: before {old:?}, after {now:?}"
    );
    Ok(())
}

/// The etcd lease bound to `key`, and its remaining TTL in seconds.
fn etcd_lease_of(tb: &Testbed, key: &str) -> Result<(String, u64)> {
    let b64 = base64::engine::general_purpose::STANDARD.encode(key);
    let kv = tb.etcd_call("/v3/kv/range", &json!({"key": b64}))?;
    let lease = kv["kvs"][0]["lease"]
        .as_str()
        .context("no etcd lease on the key")?
        .to_string();
    let ttl = tb.etcd_call("/v3/lease/timetolive", &json!({"ID": lease}))?;
    Ok((lease, ttl["TTL"].as_str().unwrap_or("0").parse()?))
}

#[test]
fn etcd_lease_is_kept_alive_not_replaced() -> Result<()> {
    let mut options = Options::vxlan(&[Ebpf, Ebpf], 1);
    options.subnet_mgr = SubnetMgr::Etcd;
    // The largest margin (24 h less a minute): renewal is due a minute after the lease was
    // granted.
    options.agent_args = vec!["--subnet-lease-renew-margin".into(), "1439".into()];
    let tb = Testbed::start("etcdka", options)?;
    let key = format!(
        "{ETCD_PREFIX}/subnets/{}",
        tb.nodes[0].subnet.replace('/', "-")
    );
    let (lease, _) = etcd_lease_of(&tb, &key)?;
    // Let the TTL run down, then see it reset on the same lease.
    std::thread::sleep(Duration::from_secs(4));
    let (_, before) = etcd_lease_of(&tb, &key)?;
    ensure!(before < 86_398, "TTL {before} did not run down");
    wait_for("a keep-alive", Duration::from_secs(75), || {
        etcd_lease_of(&tb, &key).is_ok_and(|(l, ttl)| l == lease && ttl > before + 2)
    })?;
    ensure!(
        etcd_lease_of(&tb, &key)?.0 == lease,
        "the lease was replaced instead of kept alive"
    );
    tb.all_pairs(256 * KIB)
}
