//! flanneld's health endpoints and our metrics, end to end: `--healthz-port` on a namespace node,
//! `/readyz` 503 while the agent waits for the Kubernetes API and 200 once it has programmed the
//! dataplane, `/metrics` parsed by the Prometheus project's own Python parser. Needs root,
//! `FLANNEL_AGENT_BIN` and `FLANNEL_VENV_PYTHON` (`cargo xtask test` sets both).
use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, ensure};
use flannel_tests::{NodeKind::Ebpf, Options, SubnetMgr, Testbed, tcp_echo, wait_for, with_netns};
use nix::sys::signal::Signal;

const PORT: u16 = 8081;

/// `GET path` on node `i`'s health port: (status, body).
fn get(tb: &Testbed, i: usize, path: &str) -> Result<(u16, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], PORT));
    let mut conn = with_netns(&tb.nodes[i].netns, move || {
        Ok(TcpStream::connect_timeout(&addr, Duration::from_secs(2))?)
    })?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    conn.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no status line in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The samples of an `OpenMetrics` text, as the `prometheus_client` Python package parses it:
/// `name{label="value",…}` → value.
fn parse_metrics(text: &str) -> Result<BTreeMap<String, f64>> {
    let python = std::env::var("FLANNEL_VENV_PYTHON")
        .context("FLANNEL_VENV_PYTHON is not set: run the tests through `cargo xtask test`")?;
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {python}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "the Prometheus parser rejected /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn scrape(tb: &Testbed, i: usize) -> Result<BTreeMap<String, f64>> {
    let (status, body) = get(tb, i, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}");
    parse_metrics(&body)
}

#[test]
fn health_readiness_and_metrics_as_flanneld_and_prometheus_expect() -> Result<()> {
    let mut options = Options::vxlan(&[Ebpf, Ebpf], 1);
    options.subnet_mgr = SubnetMgr::Kube;
    options.agent_args = vec!["--healthz-port".into(), PORT.to_string()];
    let mut tb = Testbed::start("hz", options)?;

    // Up: both endpoints 200 with flanneld's bodies.
    ensure!(get(&tb, 0, "/healthz")? == (200, "flanneld is running".into()));
    ensure!(get(&tb, 0, "/readyz")? == (200, "flanneld is ready".into()));

    // A restart while the API is down: alive, not ready; ready once the API answers again.
    tb.stop_agent(0, Signal::SIGTERM)?;
    tb.kube.as_ref().context("kube")?.set_down(true);
    tb.spawn_agent(0)?;
    wait_for(
        "/healthz while the API is down",
        Duration::from_secs(10),
        || get(&tb, 0, "/healthz").is_ok_and(|(s, _)| s == 200),
    )?;
    let (status, body) = get(&tb, 0, "/readyz")?;
    ensure!(
        (status, body.as_str()) == (503, "flanneld is not ready yet"),
        "/readyz before programming: {status} {body:?}"
    );
    // The agent counts the outage once its first request has failed.
    let startup_errors = r#"flannel_lease_source_errors_total{source="startup"}"#;
    wait_for(
        "the API outage to be counted",
        Duration::from_secs(20),
        || scrape(&tb, 0).is_ok_and(|m| m.get(startup_errors).is_some_and(|v| *v >= 1.0)),
    )
    .with_context(|| tb.log(0))?;
    tb.kube.as_ref().context("kube")?.set_down(false);
    wait_for("/readyz to turn 200", Duration::from_secs(40), || {
        get(&tb, 0, "/readyz").is_ok_and(|(s, _)| s == 200)
    })?;

    // Metrics: parsed by Prometheus's parser; the datapath counters grow with a transfer and
    // equal what `--stats` reads from the same map. A pod's traffic is encapsulated at its veth
    // (`from_pod_veth`) once the agent has learnt the pod, at `cni0` (`from_pods`) before.
    let encap = |program: &str| {
        format!(r#"flannel_datapath_packets_total{{program="{program}",reason="encap_vxlan"}}"#)
    };
    let programs = ["from_pods", "from_pod_veth"];
    let sum = |m: &BTreeMap<String, f64>| -> f64 {
        programs
            .iter()
            .map(|p| m.get(&encap(p)).copied().unwrap_or(0.0))
            .sum()
    };
    let before = scrape(&tb, 0)?;
    let pods = tb.pods();
    tcp_echo(&pods[0], &pods[1], 4 << 20)?;
    let after = scrape(&tb, 0)?;
    let counters = tb.stats(0)?;
    let grown = sum(&after) - sum(&before);
    // 4 MiB leave in GSO super-packets of at most 64 KiB: at least 64 of them.
    ensure!(
        grown >= 64.0,
        "encap_vxlan of {programs:?} grew by {grown} over a 4 MiB transfer"
    );
    for p in programs {
        let scraped = after.get(&encap(p)).copied().unwrap_or(0.0);
        let read = counters
            .get(&format!("{p}/encap_vxlan"))
            .copied()
            .unwrap_or(0);
        ensure!(
            scraped.to_string() == read.to_string(),
            "{p}: /metrics says {scraped} and --stats {read}"
        );
    }
    for (name, want) in [
        ("flannel_leases", 2.0),
        (r#"flannel_peers{kind="route"}"#, 1.0),
        (r#"flannel_map_entries{map="routes"}"#, 1.0),
        (r#"flannel_map_entries{map="nodes"}"#, 1.0),
        (r#"flannel_map_capacity{map="routes"}"#, 16_384.0),
    ] {
        ensure!(
            after.get(name) == Some(&want),
            "{name}: {:?} (want {want})",
            after.get(name)
        );
    }
    ensure!(
        after.get(startup_errors).is_some_and(|v| *v >= 1.0),
        "the API outage was not counted: {after:?}"
    );
    ensure!(
        after
            .keys()
            .any(|k| k.starts_with("flannel_build_info{version=")),
        "no build info"
    );
    ensure!(
        after.contains_key("flannel_reconcile_duration_seconds_count"),
        "no reconcile histogram"
    );
    Ok(())
}
