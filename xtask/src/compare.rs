//! The benchmark's judgements: paired ratios with their spread, the datapath goals (issue 14)
//! judged on them, and `--compare OLD.json`, the change of every figure against an earlier run.
//!
//! Everything here reads the per-repetition samples that `results.json` carries per path
//! (`"samples": {"tcp_gbit_s": [...], ...}`), so a judgement can be recomputed from a results
//! file alone.
use std::{collections::BTreeMap, fmt::Write as _};

use serde_json::{Value, json};

use crate::median;

/// One figure measured per path: its key in `results.json` and whether more is better.
pub struct Figure {
    pub key: &'static str,
    pub label: &'static str,
    pub higher_is_better: bool,
}

pub const FIGURES: [Figure; 10] = [
    Figure {
        key: "tcp_gbit_s",
        label: "TCP Gbit/s",
        higher_is_better: true,
    },
    Figure {
        key: "tcp4_gbit_s",
        label: "TCP 4 streams Gbit/s",
        higher_is_better: true,
    },
    Figure {
        key: "rr_p50_us",
        label: "RR p50 µs",
        higher_is_better: false,
    },
    Figure {
        key: "rr_p99_us",
        label: "RR p99 µs",
        higher_is_better: false,
    },
    Figure {
        key: "rr_per_s",
        label: "RR/s",
        higher_is_better: true,
    },
    Figure {
        key: "crr_per_s",
        label: "CRR/s",
        higher_is_better: true,
    },
    Figure {
        key: "udp_pps",
        label: "UDP pps",
        higher_is_better: true,
    },
    Figure {
        key: "udp_pps_polled",
        label: "UDP pps (polling receiver)",
        higher_is_better: true,
    },
    Figure {
        key: "cpu_per_gbit",
        label: "CPU cores per Gbit/s",
        higher_is_better: false,
    },
    Figure {
        key: BASELINE_SEGMENT_KEY,
        label: "baseline TCP at the path's segment size, Gbit/s",
        higher_is_better: true,
    },
];

/// The baseline's single-stream TCP measured with a path's largest segment (its pods' MTU − 40),
/// right after the path's own: what the same payload per packet costs without any overlay.
/// On this testbed the receiver's copy of a stream varies with the segment size by more than
/// the tunnels' header overhead (README, "What limits the figures").
pub const BASELINE_SEGMENT_KEY: &str = "tcp_baseline_segment_gbit_s";

/// A path's single-stream TCP ÷ the baseline's with the same segment size, paired within a
/// repetition; `None` for paths whose segment is the baseline's own.
fn same_segment(mine: &Samples) -> Option<Spread> {
    paired(mine.get("tcp_gbit_s")?, mine.get(BASELINE_SEGMENT_KEY)?)
}

/// The samples of one path, by figure key, one per repetition (in repetition order).
pub type Samples = BTreeMap<&'static str, Vec<f64>>;

/// The median, min and max of the ratios of two paths' figures paired within a repetition.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn md(self) -> String {
        format!("{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
    }

    pub fn json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// `a[i] ÷ b[i]` for each repetition both have, summarised; `None` without a pair.
pub fn paired(a: &[f64], b: &[f64]) -> Option<Spread> {
    let mut r: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|(_, y)| **y != 0.0)
        .map(|(x, y)| x / y)
        .collect();
    if r.is_empty() {
        return None;
    }
    let median = median(&mut r);
    Some(Spread {
        median,
        min: r[0],
        max: r[r.len() - 1],
    })
}

/// The ratios every path is given (figure, reference path), in the table's order.
pub const RATIOS: [(&str, &str); 11] = [
    ("tcp_gbit_s", "baseline"),
    ("tcp_gbit_s", "kernel-vxlan"),
    ("tcp4_gbit_s", "baseline"),
    ("rr_p50_us", "baseline"),
    ("rr_p50_us", "kernel-vxlan"),
    ("crr_per_s", "baseline"),
    ("udp_pps", "baseline"),
    ("udp_pps", "kernel-vxlan"),
    ("udp_pps_polled", "baseline"),
    ("udp_pps_polled", "kernel-vxlan"),
    ("cpu_per_gbit", "baseline"),
];

fn label(key: &str) -> &'static str {
    FIGURES
        .iter()
        .find(|f| f.key == key)
        .map_or("?", |f| f.label)
}

/// Markdown table and JSON of [`RATIOS`] for every path, each as median (min–max) of the paired
/// ratios, with the CPU steal seen while the path was measured.
pub fn ratio_table(order: &[&str], samples: &BTreeMap<&str, Samples>) -> (String, Value) {
    let mut md = String::from("| path |");
    for (key, reference) in RATIOS {
        let _ = write!(md, " {} ÷ {reference} |", label(key));
    }
    md.push_str(" TCP Gbit/s ÷ baseline at the same segment size | CPU steal % (max) |\n|---|");
    md.push_str(&"---|".repeat(RATIOS.len() + 2));
    md.push('\n');
    let mut out = serde_json::Map::new();
    for path in order {
        let mine = &samples[path];
        let _ = write!(md, "| {path} |");
        let mut ratios = serde_json::Map::new();
        for (key, reference) in RATIOS {
            let spread = samples
                .get(reference)
                .and_then(|r| paired(mine.get(key)?, r.get(key)?));
            match spread {
                Some(s) => {
                    let _ = write!(md, " {} |", s.md());
                    ratios.insert(format!("{key}/{reference}"), s.json());
                }
                None => md.push_str(" — |"),
            }
        }
        match same_segment(mine) {
            Some(s) => {
                let _ = write!(md, " {} |", s.md());
                ratios.insert("tcp_gbit_s/baseline_same_segment".into(), s.json());
            }
            None => md.push_str(" — |"),
        }
        let steal = mine
            .get("steal_share")
            .map_or(0.0, |v| v.iter().copied().fold(0.0, f64::max) * 100.0);
        let _ = writeln!(md, " {steal:.1} |");
        out.insert((*path).to_string(), Value::Object(ratios));
    }
    (md, Value::Object(out))
}

/// The pod path the eBPF vxlan goals are shown beside: host-gw in eBPF adds no encapsulation
/// to what every pod path pays (the pod's veth, the programs' redirects).
const FLOOR_PATH: &str = "ebpf-host-gw";

/// A datapath goal of issue 14: `path`'s `key` ÷ `reference`'s, paired within a repetition,
/// at least (or at most) `bound`.
#[derive(Clone, Copy)]
pub struct Goal {
    pub path: &'static str,
    pub key: &'static str,
    pub reference: &'static str,
    pub bound: f64,
    pub at_least: bool,
}

pub const GOALS: [Goal; 10] = [
    Goal::at_least("ebpf-vxlan", "tcp_gbit_s", "baseline", 0.95),
    Goal::at_least("ebpf-vxlan", "tcp_gbit_s", "kernel-vxlan", 1.3),
    Goal::at_least("ebpf-host-gw", "tcp_gbit_s", "baseline", 0.98),
    Goal::at_least("ebpf-ipip", "tcp_gbit_s", "baseline", 0.95),
    Goal::at_least("ebpf-udp", "tcp_gbit_s", "baseline", 0.95),
    Goal::at_most("ebpf-vxlan", "rr_p50_us", "baseline", 1.05),
    Goal::at_least("ebpf-vxlan", "crr_per_s", "baseline", 0.95),
    Goal::at_least("ebpf-vxlan", "udp_pps", "kernel-vxlan", 1.5),
    Goal::at_least("ebpf-vxlan", "udp_pps_polled", "kernel-vxlan", 1.5),
    Goal::at_most("ebpf-vxlan", "cpu_per_gbit", "baseline", 1.1),
];

impl Goal {
    const fn at_least(
        path: &'static str,
        key: &'static str,
        reference: &'static str,
        bound: f64,
    ) -> Self {
        Self {
            path,
            key,
            reference,
            bound,
            at_least: true,
        }
    }

    const fn at_most(
        path: &'static str,
        key: &'static str,
        reference: &'static str,
        bound: f64,
    ) -> Self {
        Self {
            at_least: false,
            ..Self::at_least(path, key, reference, bound)
        }
    }
}

/// How a goal came out.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// Every repetition's ratio is within the bound.
    Always,
    /// The median is, some repetition is not.
    Median,
    No,
    NotMeasured,
}

impl Verdict {
    fn md(self) -> &'static str {
        match self {
            Self::Always => "yes (every repetition)",
            Self::Median => "yes (median)",
            Self::No => "**no**",
            Self::NotMeasured => "not measured",
        }
    }
}

pub fn judge(goal: &Goal, samples: &BTreeMap<&str, Samples>) -> (Option<Spread>, Verdict) {
    let spread = samples
        .get(goal.path)
        .zip(samples.get(goal.reference))
        .and_then(|(mine, reference)| paired(mine.get(goal.key)?, reference.get(goal.key)?));
    let Some(s) = spread else {
        return (None, Verdict::NotMeasured);
    };
    let within = |r: f64| {
        if goal.at_least {
            r >= goal.bound
        } else {
            r <= goal.bound
        }
    };
    // The worst repetition: the smallest ratio for a floor, the largest for a ceiling.
    let worst = if goal.at_least { s.min } else { s.max };
    let verdict = if within(worst) {
        Verdict::Always
    } else if within(s.median) {
        Verdict::Median
    } else {
        Verdict::No
    };
    (Some(s), verdict)
}

/// The goals section of results.md and its JSON.
pub fn goals(samples: &BTreeMap<&str, Samples>) -> (String, Value) {
    let mut md = String::from(
        "\nDatapath goals (issue 14), each a median of ratios paired within a repetition (min–max over repetitions). Judged as the issue sets them; for TCP against the baseline, a further column gives the ratio to the baseline measured with the path's own segment size, and for eBPF vxlan's goals the last one gives the same ratio of `ebpf-host-gw` (no encapsulation, both bridges skipped: the shortest pod path, what a pod's own veth costs), neither judged:\n\n| path | figure | ÷ | goal | measured | met | TCP ÷ baseline at the same segment size | the same of ebpf-host-gw |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut out = Vec::new();
    for g in &GOALS {
        let (spread, verdict) = judge(g, samples);
        let bound = format!("{} {:.2}", if g.at_least { "≥" } else { "≤" }, g.bound);
        let equal_segment = (g.key == "tcp_gbit_s" && g.reference == "baseline")
            .then(|| samples.get(g.path).and_then(same_segment))
            .flatten();
        let floor = (g.path == "ebpf-vxlan")
            .then(|| {
                judge(
                    &Goal {
                        path: FLOOR_PATH,
                        ..*g
                    },
                    samples,
                )
                .0
            })
            .flatten();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {bound} | {} | {} | {} | {} |",
            g.path,
            label(g.key),
            g.reference,
            spread.map_or_else(|| "—".into(), Spread::md),
            verdict.md(),
            equal_segment.map_or_else(|| "—".into(), Spread::md),
            floor.map_or_else(|| "—".into(), Spread::md)
        );
        out.push(json!({
            "path": g.path, "figure": g.key, "reference": g.reference, "bound": g.bound,
            "at_least": g.at_least, "ratio": spread.map(Spread::json),
            "ratio_baseline_same_segment": equal_segment.map(Spread::json),
            "ratio_of_host_gw": floor.map(Spread::json),
            "met": matches!(verdict, Verdict::Always | Verdict::Median),
            "verdict": format!("{verdict:?}"),
        }));
    }
    (md, Value::Array(out))
}

/// The path names of results files written before `conditions.path_names` 2: the default
/// datapath (tc decap) was `ebpf-vxlan-tc-decap` and `ebpf-vxlan` was native XDP decap.
fn current_name(old_name: &str, naming: u64) -> &str {
    match (naming, old_name) {
        (0 | 1, "ebpf-vxlan") => "ebpf-vxlan-xdp",
        (0 | 1, "ebpf-vxlan-tc-decap") => "ebpf-vxlan",
        _ => old_name,
    }
}

/// A run's paths by their current names.
fn paths_of(run: &Value) -> BTreeMap<String, &Value> {
    let naming = run["conditions"]["path_names"].as_u64().unwrap_or(1);
    run["paths"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, v)| (current_name(name, naming).to_string(), v))
        .collect()
}

/// A change beyond which `--compare` calls a figure worse.
pub const WORSE: f64 = 0.05;

/// A path's paired ratios to its run's baseline for one figure, from the run's per-repetition
/// samples (`None` for files without them).
fn baseline_spread(run_paths: &BTreeMap<String, &Value>, path: &str, key: &str) -> Option<Spread> {
    let samples = |p: &str| -> Option<Vec<f64>> {
        run_paths.get(p)?["samples"][key]
            .as_array()?
            .iter()
            .map(Value::as_f64)
            .collect()
    };
    paired(&samples(path)?, &samples("baseline")?)
}

/// Whether a ratio's drop is more than the repetitions' noise: every repetition of the new run
/// is on the worse side of the old run's median (one repetition as good as the old median
/// means the runs overlap).
fn beyond_noise(old: Spread, new: Spread, higher_is_better: bool) -> bool {
    if higher_is_better {
        new.max < old.median
    } else {
        new.min > old.median
    }
}

/// Whether a figure's change (`judged`) flags it, and its table mark: past [`WORSE`] the wrong
/// way and, where both runs' paired ratios are known (`spreads`), [`beyond_noise`].
fn flag(
    judged: Option<f64>,
    f: &Figure,
    spreads: impl FnOnce() -> Option<(Spread, Spread)>,
) -> (bool, &'static str) {
    let past_threshold = judged.is_some_and(|c| {
        if f.higher_is_better {
            c < -WORSE
        } else {
            c > WORSE
        }
    });
    if !past_threshold {
        return (false, "");
    }
    match spreads() {
        Some((o, n)) if !beyond_noise(o, n, f.higher_is_better) => (false, "within the noise"),
        _ => (true, "**worse**"),
    }
}

/// `--compare OLD.json`: every figure of every path in both runs, old and new, its change, and
/// the change of its ratio to the same run's baseline path (what a slower or faster machine does
/// not move); a figure whose ratio to the baseline got worse by more than [`WORSE`] is flagged,
/// where both runs carry their repetitions' samples only if every new repetition's paired
/// ratio is worse than the old run's median (otherwise it is marked "within the noise", not
/// flagged). Then the per-packet test-run costs. Markdown, and the list of figures flagged.
pub fn compare(old: &Value, new: &Value) -> (String, Vec<String>) {
    let (old_paths, new_paths) = (paths_of(old), paths_of(new));
    let order: Vec<String> = match new["path_order"].as_array() {
        Some(a) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        None => new_paths.keys().cloned().collect(),
    };
    let runs = |run: &Value| {
        let c = &run["conditions"];
        match (c["reps"].as_u64(), c["seconds"].as_u64()) {
            (Some(r), Some(s)) => format!("{r} repetition(s) of {s} s"),
            _ => "repetitions not recorded".into(),
        }
    };
    let mut md = format!(
        "Old run: {}; new run: {} (the fewer the repetitions, the wider a figure's noise: see each run's min–max).\n\n| path | figure | old | new | change | ÷ baseline, old | ÷ baseline, new | change of ÷ baseline | |\n|---|---|---|---|---|---|---|---|---|\n",
        runs(old),
        runs(new)
    );
    let mut worse = Vec::new();
    let mut missing = Vec::new();
    for path in &order {
        let Some(old_path) = old_paths.get(path) else {
            missing.push(format!("{path} (new)"));
            continue;
        };
        for f in &FIGURES {
            let (Some(o), Some(n)) = (
                old_path[f.key].as_f64(),
                new_paths.get(path).and_then(|v| v[f.key].as_f64()),
            ) else {
                continue;
            };
            let change = n / o - 1.0;
            let rel = |run_paths: &BTreeMap<String, &Value>, value: f64| {
                run_paths
                    .get("baseline")
                    .and_then(|b| b[f.key].as_f64())
                    .filter(|b| *b != 0.0)
                    .map(|b| value / b)
            };
            let (ro, rn) = (rel(&old_paths, o), rel(&new_paths, n));
            let rel_change = ro.zip(rn).map(|(ro, rn)| rn / ro - 1.0);
            // Against the baseline where both runs have one (the baseline path itself: raw).
            let judged = if path == "baseline" {
                Some(change)
            } else {
                rel_change
            };
            let (is_worse, mark) = flag(judged, f, || {
                (path != "baseline")
                    .then(|| {
                        baseline_spread(&old_paths, path, f.key)
                            .zip(baseline_spread(&new_paths, path, f.key))
                    })
                    .flatten()
            });
            if is_worse {
                worse.push(format!("{path} {}", f.label));
            }
            let opt = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{v:.3}"));
            let _ = writeln!(
                md,
                "| {path} | {} | {o:.3} | {n:.3} | {:+.1} % | {} | {} | {} | {} |",
                f.label,
                change * 100.0,
                opt(ro),
                opt(rn),
                rel_change.map_or_else(|| "—".into(), |c| format!("{:+.1} %", c * 100.0)),
                mark
            );
        }
    }
    for name in old_paths.keys() {
        if !order.contains(name) {
            missing.push(format!("{name} (gone)"));
        }
    }
    md.push_str(&cost_changes(old, new));
    if !missing.is_empty() {
        let _ = writeln!(md, "\nPaths in one run only: {}.", missing.join(", "));
    }
    let _ = writeln!(
        md,
        "\n{}",
        if worse.is_empty() {
            format!(
                "No figure's ratio to its run's baseline got worse by more than {:.0} % and beyond the repetitions' noise.",
                WORSE * 100.0
            )
        } else {
            format!(
                "Worse by more than {:.0} % against the run's baseline, with every repetition below the old run's median ratio: {}.",
                WORSE * 100.0,
                worse.join(", ")
            )
        }
    );
    (md, worse)
}

/// The per-packet test-run costs of both runs, as a markdown section (empty without any).
fn cost_changes(old: &Value, new: &Value) -> String {
    let mut costs = String::new();
    for (case, n) in new["test_run_net_ns"].as_object().into_iter().flatten() {
        let (Some(o), Some(n)) = (old["test_run_net_ns"][case].as_f64(), n.as_f64()) else {
            continue;
        };
        let _ = writeln!(
            costs,
            "| {case} | {o:.0} | {n:.0} | {:+.1} % |",
            (n / o - 1.0) * 100.0
        );
    }
    if costs.is_empty() {
        return costs;
    }
    format!(
        "\nBPF_PROG_TEST_RUN cost less harness overhead (ns; machines differ, so compare with `--cost-baseline` for a verdict):\n\n| program, packet | old | new | change |\n|---|---|---|---|\n{costs}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(
        entries: &[(&'static str, &'static str, &[f64])],
    ) -> BTreeMap<&'static str, Samples> {
        let mut out: BTreeMap<&str, Samples> = BTreeMap::new();
        for (path, key, v) in entries {
            out.entry(path).or_default().insert(key, v.to_vec());
        }
        out
    }

    #[test]
    fn ratios_are_paired_within_a_repetition() {
        // Repetition 2 is slow for both paths: paired, the ratio stays 0.9 throughout.
        let s = paired(&[9.0, 4.5, 9.0], &[10.0, 5.0, 10.0]).unwrap();
        assert!(
            (s.median - 0.9).abs() < 1e-12 && (s.min - 0.9).abs() < 1e-12,
            "{s:?}"
        );
        let s = paired(&[1.0, 2.0, 4.0, 3.0], &[1.0, 1.0, 1.0, 1.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 4.0));
        assert!(paired(&[], &[1.0]).is_none());
    }

    /// The goal in `goals`' JSON whose `field` is `value`.
    fn goal_where<'a>(v: &'a Value, field: &str, value: &str) -> &'a Value {
        v.as_array()
            .unwrap()
            .iter()
            .find(|g| g[field] == value)
            .unwrap()
    }

    #[test]
    fn goals_are_judged_on_the_worst_repetition_and_the_median() {
        let goal = &GOALS[0]; // ebpf-vxlan TCP ≥ 0.95 × baseline
        let b = [10.0, 10.0, 10.0];
        let always = samples(&[
            ("ebpf-vxlan", "tcp_gbit_s", &[9.6, 9.7, 9.9]),
            ("baseline", "tcp_gbit_s", &b),
        ]);
        assert_eq!(judge(goal, &always).1, Verdict::Always);
        let median = samples(&[
            ("ebpf-vxlan", "tcp_gbit_s", &[9.0, 9.7, 9.9]),
            ("baseline", "tcp_gbit_s", &b),
        ]);
        assert_eq!(judge(goal, &median).1, Verdict::Median);
        let no = samples(&[
            ("ebpf-vxlan", "tcp_gbit_s", &[9.0, 9.1, 9.9]),
            ("baseline", "tcp_gbit_s", &b),
        ]);
        assert_eq!(judge(goal, &no).1, Verdict::No);
        let missing = samples(&[("baseline", "tcp_gbit_s", &b)]);
        assert_eq!(judge(goal, &missing).1, Verdict::NotMeasured);
        // A ceiling (RR p50 ≤ 1.05 × baseline) is judged on the largest ratio.
        let rr = GOALS.iter().find(|g| g.key == "rr_p50_us").unwrap();
        let s = samples(&[
            ("ebpf-vxlan", "rr_p50_us", &[40.0, 42.0, 50.0]),
            ("baseline", "rr_p50_us", &[40.0, 40.0, 40.0]),
        ]);
        assert_eq!(judge(rr, &s).1, Verdict::Median);
        let (md, v) = goals(&s);
        assert!(
            md.contains(
                "| ebpf-vxlan | RR p50 µs | baseline | ≤ 1.05 | 1.05 (1.00–1.25) | yes (median) | — | — |"
            ),
            "{md}"
        );
        assert_eq!(v.as_array().unwrap().len(), GOALS.len());
        // eBPF vxlan's goals show host-gw's ratio of the same figure beside them (not judged).
        let s = samples(&[
            ("ebpf-vxlan", "rr_p50_us", &[44.0, 46.0, 48.0]),
            ("ebpf-host-gw", "rr_p50_us", &[42.0, 43.0, 44.0]),
            ("baseline", "rr_p50_us", &[40.0, 40.0, 40.0]),
        ]);
        let (md, v) = goals(&s);
        assert!(
            md.contains(
                "| ebpf-vxlan | RR p50 µs | baseline | ≤ 1.05 | 1.15 (1.10–1.20) | **no** | — | 1.07 (1.05–1.10) |"
            ),
            "{md}"
        );
        let rr = goal_where(&v, "figure", "rr_p50_us");
        assert_eq!(rr["ratio_of_host_gw"]["median"], json!(43.0 / 40.0));
    }

    #[test]
    fn the_same_segment_ratio_pairs_a_path_with_its_own_baseline_run() {
        // ebpf-ipip's segment is slow on this machine for the baseline as well: 0.7 × the
        // baseline at its own segment size, 1.0 × at the path's.
        let s = samples(&[
            ("ebpf-ipip", "tcp_gbit_s", &[7.0, 3.5, 7.0]),
            ("ebpf-ipip", BASELINE_SEGMENT_KEY, &[7.0, 3.5, 7.0]),
            ("ebpf-host-gw", "tcp_gbit_s", &[9.0, 4.5, 9.0]),
            ("baseline", "tcp_gbit_s", &[10.0, 5.0, 10.0]),
        ]);
        let (md, v) = ratio_table(&["baseline", "ebpf-host-gw", "ebpf-ipip"], &s);
        assert!(
            md.contains("| ebpf-ipip | 0.70 (0.70–0.70) | — | — | — | — | — | — | — | — | — | — | 1.00 (1.00–1.00) |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| ebpf-host-gw | 0.90 (0.90–0.90) | — | — | — | — | — | — | — | — | — | — | — |"
            ),
            "{md}"
        );
        assert_eq!(
            v["ebpf-ipip"]["tcp_gbit_s/baseline_same_segment"]["median"],
            json!(1.0)
        );
        assert!(
            v["ebpf-host-gw"]
                .get("tcp_gbit_s/baseline_same_segment")
                .is_none()
        );
        let (md, v) = goals(&s);
        assert!(
            md.contains("| ebpf-ipip | TCP Gbit/s | baseline | ≥ 0.95 | 0.70 (0.70–0.70) | **no** | 1.00 (1.00–1.00) | — |"),
            "{md}"
        );
        let ipip = goal_where(&v, "path", "ebpf-ipip");
        assert_eq!(ipip["met"], json!(false));
        assert_eq!(ipip["ratio_baseline_same_segment"]["median"], json!(1.0));
    }

    fn run(naming: Option<u64>, paths: &[(&str, f64, f64)]) -> Value {
        let mut p = serde_json::Map::new();
        for (name, tcp, rr) in paths {
            p.insert((*name).into(), json!({"tcp_gbit_s": tcp, "rr_p50_us": rr}));
        }
        let mut v = json!({"paths": p, "test_run_net_ns": {"from_pods: encapsulate (tc)": 140.0}});
        if let Some(n) = naming {
            v["conditions"] = json!({"path_names": n});
            v["path_order"] = json!(paths.iter().map(|p| p.0).collect::<Vec<_>>());
        }
        v
    }

    #[test]
    fn compare_flags_what_got_worse_against_its_own_baseline() {
        // The old run's names: ebpf-vxlan was native XDP, the default was ebpf-vxlan-tc-decap.
        let old = run(
            None,
            &[
                ("baseline", 10.0, 40.0),
                ("ebpf-vxlan-tc-decap", 9.0, 44.0),
                ("ebpf-vxlan", 3.0, 50.0),
            ],
        );
        // A machine half as fast: every raw figure halves. ebpf-vxlan (tc) keeps its ratio;
        // ebpf-vxlan-xdp loses a third against the baseline; RR p50 of ebpf-vxlan gets 20 % worse.
        let new = run(
            Some(2),
            &[
                ("baseline", 5.0, 80.0),
                ("ebpf-vxlan", 4.5, 105.6),
                ("ebpf-vxlan-xdp", 1.0, 100.0),
            ],
        );
        let (md, worse) = compare(&old, &new);
        assert_eq!(
            worse,
            vec![
                "baseline TCP Gbit/s",
                "baseline RR p50 µs",
                "ebpf-vxlan RR p50 µs",
                "ebpf-vxlan-xdp TCP Gbit/s"
            ],
            "{md}"
        );
        assert!(
            md.contains(
                "| ebpf-vxlan | TCP Gbit/s | 9.000 | 4.500 | -50.0 % | 0.900 | 0.900 | +0.0 % |  |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| from_pods: encapsulate (tc) | 140 | 140 | +0.0 % |"),
            "{md}"
        );
        // The same run against itself: nothing worse.
        let (md, worse) = compare(&new, &new);
        assert!(worse.is_empty(), "{md}");
    }

    fn with_samples(tcp: &[f64], baseline: &[f64]) -> Value {
        json!({
            "paths": {
                "baseline": {"tcp_gbit_s": median(&mut baseline.to_vec()),
                             "samples": {"tcp_gbit_s": baseline}},
                "ebpf-vxlan": {"tcp_gbit_s": median(&mut tcp.to_vec()),
                               "samples": {"tcp_gbit_s": tcp}},
            },
            "conditions": {"path_names": 2},
            "path_order": ["baseline", "ebpf-vxlan"],
        })
    }

    #[test]
    fn compare_flags_a_drop_only_beyond_the_repetitions_noise() {
        let old = with_samples(&[9.0, 9.0, 9.0], &[10.0, 10.0, 10.0]);
        // The median ratio falls 0.9 -> 0.8, but one repetition is as good as before.
        let noisy = with_samples(&[8.0, 7.0, 9.0], &[10.0, 10.0, 10.0]);
        let (md, worse) = compare(&old, &noisy);
        assert!(worse.is_empty(), "{md}");
        assert!(md.contains("| -11.1 % | within the noise |"), "{md}");
        // Every repetition below the old median: flagged.
        let clear = with_samples(&[8.0, 7.0, 8.9], &[10.0, 10.0, 10.0]);
        let (md, worse) = compare(&old, &clear);
        assert_eq!(worse, vec!["ebpf-vxlan TCP Gbit/s"], "{md}");
    }
}
