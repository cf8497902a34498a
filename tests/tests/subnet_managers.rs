//! End-to-end tests of the lease sources against their real protocols: the Kubernetes subnet
//! manager against a fake API server that speaks list/watch/patch as kube-apiserver does, plus
//! hitless restarts under load and an unreachable API. Run by `cargo xtask test`.
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use flannel_tests::{
    NodeKind::{Ebpf, Stock},
    Options, SubnetMgr, Testbed, can_connect, run, tcp_echo, tcp_echo_paced, wait_for,
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
    wait_for("skipped nodes logged", Duration::from_secs(10), || {
        let log = tb.log(0);
        log.contains("skipping node")
            && log.contains("worker-no-cidr")
            && log.contains("no IPv4 podCIDR")
    })?;

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
    tb.stop_agent(0, Signal::SIGTERM)?;
    tb.start_agent(0)?;
    ensure!(
        annotation(&tb, "n1", "backend-data") == before,
        "VtepMAC reused"
    );
    let log = tb.log(0);
    ensure!(
        log.matches("synced remote subnets report=0 added, 0 updated, 0 removed")
            .count()
            == 1,
        "the restarted agent rewrote nothing:\n{log}"
    );
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
    api.compact();
    api.update_node("n2", |n| {
        n["metadata"]["labels"]["touched"] = json!("yes");
    });
    wait_for("a re-list after 410 Gone", Duration::from_secs(15), || {
        tb.log(0).contains("listing again")
    })?;
    ensure!(routes_of(&tb, 0)? == 1, "the re-list kept the route");
    // The API goes away for a while: traffic keeps flowing, the agent says it retries.
    api.set_down(true);
    wait_for(
        "the agent noticing the outage",
        Duration::from_secs(15),
        || tb.log(0).contains("retrying in"),
    )?;
    tcp_echo(&p1, &p2, MIB)?;
    ensure!(routes_of(&tb, 0)? == 1, "an outage flushes nothing");
    api.set_down(false);

    // Unreachable at start-up: the restarted agent waits, saying for what, while the pinned
    // dataplane keeps forwarding; then it converges without a flush.
    tb.stop_agent(0, Signal::SIGKILL)?;
    tb.kube.as_ref().context("fake API")?.set_down(true);
    tb.spawn_agent(0)?;
    wait_for(
        "the agent waiting for the API",
        Duration::from_secs(15),
        || tb.log(0).contains("waiting for the Kubernetes API"),
    )?;
    tcp_echo(&p1, &p2, MIB).context("pinned dataplane forwards while the agent waits")?;
    tb.kube.as_ref().context("fake API")?.set_down(false);
    wait_for(
        "the agent up after the outage",
        Duration::from_secs(40),
        || tb.log(0).matches("dataplane active").count() == 2,
    )?;
    let log = tb.log(0);
    ensure!(
        log.contains("adopting the pinned dataplane (no flush)")
            && log.contains("synced remote subnets report=0 added, 0 updated, 0 removed"),
        "{log}"
    );
    tcp_echo(&p1, &p2, MIB)?;
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
        tb.stop_agent(i, Signal::SIGKILL)?;
        tb.start_agent(i)?;
        let log = tb.log(i);
        ensure!(
            log.contains("adopting the pinned dataplane (no flush)")
                && log.contains("synced remote subnets report=0 added, 0 updated, 0 removed"),
            "node {} restarted without converging in place:\n{log}",
            i + 1
        );
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
