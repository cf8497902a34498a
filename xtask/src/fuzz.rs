//! The structure-aware fuzzer (`flannel-agent/tests/fuzz.rs`) as a section of the bench report:
//! run in release, its JSON report turned into markdown.
use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, anyhow};
use serde_json::Value;

use crate::bootstrap::{say, sh};

/// Runs the fuzz test in release (1,000,000 packets per program, 250,000 with `quick`, unless
/// `FLANNEL_FUZZ_PACKETS` says otherwise) and returns the markdown section: packets fuzzed per
/// program and family, and the verdict histogram. The JSON report stays in
/// `target/bench/fuzz.json`.
pub fn section(quick: bool) -> Result<String> {
    let report = crate::workspace_root().join("target/bench/fuzz.json");
    std::fs::create_dir_all(report.parent().expect("a directory"))?;
    // A stale report must not pass for this run's.
    let _ = std::fs::remove_file(&report);
    say("fuzzing every program (BPF_PROG_TEST_RUN, release build)");
    let mut cmd = crate::cargo_release("test");
    cmd.args(["-p", "flannel-agent", "--test", "fuzz", "--", "--nocapture"])
        .env("FLANNEL_FUZZ_REPORT", &report);
    if quick && std::env::var_os("FLANNEL_FUZZ_PACKETS").is_none() {
        // A smoke test of the section (`cargo xtask test` has fuzzed a million packets per
        // program already); past the fuzzer's 200,000, so the NAT tables still age once.
        cmd.env("FLANNEL_FUZZ_PACKETS", "250000");
    }
    sh(&mut cmd)?;
    markdown(&report)
}

/// The markdown section for the JSON report at `path`.
#[allow(
    clippy::cast_precision_loss,
    reason = "packet counts far below 2^52, shown as percentages"
)]
fn markdown(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).context("the fuzz report")?;
    let families = v["families"]
        .as_array()
        .ok_or_else(|| anyhow!("the fuzz report lists no families"))?;
    let num = |v: &Value| v.as_u64().unwrap_or(0);
    let mut md = format!(
        "\nFuzzing (structure-aware, against a reference model; `cargo test --release --target x86_64-unknown-linux-musl -p flannel-agent --test fuzz`): {} packets in {:.0} s, every one counted exactly once, no disagreement with the model.\n\n| program | packets |\n|---|---|\n",
        num(&v["packets"]),
        v["wall_s"].as_f64().unwrap_or(0.0)
    );
    for (program, packets) in v["packets_per_program"].as_object().into_iter().flatten() {
        let _ = writeln!(md, "| {program} | {} |", num(packets));
    }
    md.push_str("\n| family | packets | test runs | s | return values |\n|---|---|---|---|---|\n");
    for f in families {
        let returns: Vec<String> = f["return_codes"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| format!("{k} {}", num(n)))
            .collect();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.1} | {} |",
            f["name"].as_str().unwrap_or("?"),
            num(&f["packets"]),
            num(&f["test_runs"]),
            f["wall_s"].as_f64().unwrap_or(0.0),
            returns.join(", ")
        );
    }
    md.push_str("\nVerdicts counted (`FLANNEL_STATS`), per family:\n\n| family | verdict | packets | share |\n|---|---|---|---|\n");
    for f in families {
        let name = f["name"].as_str().unwrap_or("?");
        let packets = num(&f["packets"]).max(1);
        let mut verdicts: Vec<(&String, u64)> = f["verdicts"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| (k, num(n)))
            .collect();
        verdicts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        for (verdict, n) in verdicts {
            let _ = writeln!(
                md,
                "| {name} | {verdict} | {n} | {:.1} % |",
                100.0 * n as f64 / packets as f64
            );
        }
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_report_becomes_tables() {
        let dir = std::env::temp_dir().join(format!("xtask-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fuzz.json");
        std::fs::write(
            &path,
            r#"{"packets": 3, "wall_s": 1.5, "packets_per_program": {"from_pods": 3},
                "families": [{"name": "from_pods/vxlan", "program": "from_pods", "packets": 3,
                  "test_runs": 3, "wall_s": 1.5,
                  "verdicts": {"from_pods/encap_vxlan": 2, "from_pods/drop_bad_ipv4": 1},
                  "return_codes": {"TC_ACT_REDIRECT": 2, "TC_ACT_SHOT": 1}, "model": {}}]}"#,
        )
        .unwrap();
        let md = super::markdown(&path).unwrap();
        assert!(md.contains("| from_pods | 3 |"), "{md}");
        assert!(
            md.contains("| from_pods/vxlan | 3 | 3 | 1.5 | TC_ACT_REDIRECT 2, TC_ACT_SHOT 1 |"),
            "{md}"
        );
        assert!(
            md.contains("| from_pods/vxlan | from_pods/encap_vxlan | 2 | 66.7 % |"),
            "{md}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
