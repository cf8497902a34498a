//! The iptables engine: flanneld's `FLANNEL-POSTRTG` (table `nat`) and `FLANNEL-FWD` (table
//! `filter`) chains, rule for rule and comment for comment as flanneld v0.28 writes them
//! (`pkg/trafficmngr/iptables/iptables.go`).
//!
//! Applying is one `iptables-restore --noflush --wait` run holding a `*nat` and a `*filter`
//! transaction. Each declares our chain (`:FLANNEL-POSTRTG - [0:0]`, which creates it or, with
//! `--noflush`, empties it, so the rules of an old Network or subnet are replaced, never
//! accumulated), deletes the jump rules to it that are there (`-D`, as flanneld deletes and
//! re-appends an existing rule), appends the jump rule at the end of `POSTROUTING`/`FORWARD` as
//! flanneld does, then our rules in order. A part that is off gets the chain declared and deleted
//! (`-X`) after its jumps are gone. Nothing else is touched: other chains, their rules and the
//! policies (a `FORWARD` policy of DROP stays DROP).
//!
//! Checking is flanneld's: our chain must exist and every rule pass `iptables -C`.
use std::{
    fmt::Write as _,
    sync::{Mutex, PoisonError},
};

use tracing::{debug, info};

use super::{Engine, RuleSet, RulesError, TrafficManager, exec, exec_ok};

/// Our chain in table `nat`, jumped to from `POSTROUTING`.
pub const NAT_CHAIN: &str = "FLANNEL-POSTRTG";
/// Our chain in table `filter`, jumped to from `FORWARD`.
pub const FORWARD_CHAIN: &str = "FLANNEL-FWD";
/// The comment on every rule of table `nat` (the jump included).
pub const MASQ_COMMENT: &str = "flanneld masq";
/// The comment on every rule of table `filter` (the jump included).
pub const FORWARD_COMMENT: &str = "flanneld forward";
/// kube-proxy's masquerade mark: packets it marks are left to it (no double NAT).
pub const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
/// Multicast is never masqueraded.
pub const MULTICAST: &str = "224.0.0.0/4";

/// One of our two tables: the chain we own there and the built-in chain that jumps to it.
struct Part {
    table: &'static str,
    builtin: &'static str,
    chain: &'static str,
    comment: &'static str,
}

const NAT: Part = Part {
    table: "nat",
    builtin: "POSTROUTING",
    chain: NAT_CHAIN,
    comment: MASQ_COMMENT,
};
const FILTER: Part = Part {
    table: "filter",
    builtin: "FORWARD",
    chain: FORWARD_CHAIN,
    comment: FORWARD_COMMENT,
};
const PARTS: [&Part; 2] = [&NAT, &FILTER];

/// `-A <chain> <spec>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    chain: &'static str,
    spec: Vec<String>,
}

impl Rule {
    /// The rule as iptables-save prints it (and iptables-restore reads it).
    fn save_line(&self, op: &str) -> String {
        let mut line = format!("{op} {}", self.chain);
        for arg in &self.spec {
            line.push(' ');
            line.push_str(&quote(arg));
        }
        line
    }
}

/// iptables-save's quoting: an argument with spaces (a comment) in double quotes.
fn quote(arg: &str) -> String {
    if arg.is_empty() || arg.contains(char::is_whitespace) {
        format!("\"{arg}\"")
    } else {
        arg.to_string()
    }
}

impl Part {
    /// Our rules in this table, the jump first, in flanneld's order; `None` when the part is off.
    fn rules(&self, rs: &RuleSet) -> Option<Vec<Rule>> {
        let comment = ["-m", "comment", "--comment", self.comment];
        let rule = |chain: &'static str, head: &[&str], tail: &[&str]| Rule {
            chain,
            spec: head
                .iter()
                .chain(&comment)
                .chain(tail)
                .map(ToString::to_string)
                .collect(),
        };
        let jump = rule(self.builtin, &[], &["-j", self.chain]);
        let (cluster, pod) = (rs.cluster.to_string(), rs.pod.to_string());
        let (cluster, pod) = (cluster.as_str(), pod.as_str());
        let c = self.chain;
        if self.table == NAT.table {
            if !rs.masquerade {
                return None;
            }
            let masq: &[&str] = if rs.fully_random {
                &["-j", "MASQUERADE", "--random-fully"]
            } else {
                &["-j", "MASQUERADE"]
            };
            Some(vec![
                jump,
                // kube-proxy's marked packets: its own masquerade handles them.
                rule(
                    c,
                    &["-m", "mark", "--mark", KUBE_PROXY_MARK],
                    &["-j", "RETURN"],
                ),
                // Within the overlay: no NAT.
                rule(c, &["-s", pod, "-d", cluster], &["-j", "RETURN"]),
                rule(c, &["-s", cluster, "-d", pod], &["-j", "RETURN"]),
                // External traffic arriving for one of this node's pods keeps its source.
                rule(c, &["!", "-s", cluster, "-d", pod], &["-j", "RETURN"]),
                // Pods to the outside, multicast excepted.
                rule(c, &["-s", cluster, "!", "-d", MULTICAST], masq),
                // The host (or anything outside the Network) to the Network.
                rule(c, &["!", "-s", cluster, "-d", cluster], masq),
            ])
        } else {
            if !rs.forward {
                return None;
            }
            Some(vec![
                jump,
                rule(c, &["-s", cluster], &["-j", "ACCEPT"]),
                rule(c, &["-d", cluster], &["-j", "ACCEPT"]),
            ])
        }
    }

    /// The part as iptables-save shows it (the lines that name our chain), or "" when off.
    fn render(&self, rs: &RuleSet) -> String {
        let Some(rules) = self.rules(rs) else {
            return String::new();
        };
        let mut out = format!("*{}\n:{} - [0:0]\n", self.table, self.chain);
        for r in &rules {
            out.push_str(&r.save_line("-A"));
            out.push('\n');
        }
        out.push_str("COMMIT\n");
        out
    }

    /// What `iptables -t <table> -S` shows of ours.
    fn current(&self, listing: &str) -> Current {
        let declare = format!("-N {}", self.chain);
        let builtin = format!("-A {} ", self.builtin);
        let mut current = Current::default();
        for line in listing.lines().map(str::trim) {
            if line == declare {
                current.chain_exists = true;
            } else if let Some(rest) = line.strip_prefix(&builtin) {
                let args: Vec<&str> = rest.split_whitespace().collect();
                if args
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1] == self.chain)
                {
                    current.jumps.push(rest.to_string());
                }
            }
        }
        current
    }

    /// This table's `iptables-restore` transaction, given the table's current `-S` listing; `None`
    /// when there is nothing to do (the part is off and none of ours is there).
    fn restore(&self, rs: &RuleSet, listing: &str) -> Option<String> {
        let current = self.current(listing);
        let wanted = self.rules(rs);
        if wanted.is_none() && !current.chain_exists && current.jumps.is_empty() {
            return None;
        }
        // Declaring the chain creates it, or empties it (`--noflush` keeps everything else).
        let mut out = format!("*{}\n:{} - [0:0]\n", self.table, self.chain);
        for jump in &current.jumps {
            let _ = writeln!(out, "-D {} {jump}", self.builtin);
        }
        match wanted {
            Some(rules) => {
                for r in &rules {
                    out.push_str(&r.save_line("-A"));
                    out.push('\n');
                }
            }
            None => {
                let _ = writeln!(out, "-X {}", self.chain);
            }
        }
        out.push_str("COMMIT\n");
        Some(out)
    }
}

/// Ours in one table, as it is.
#[derive(Debug, Default)]
struct Current {
    chain_exists: bool,
    /// The built-in chain's rules that jump to ours, as listed (without `-A <builtin>`).
    jumps: Vec<String>,
}

/// The whole `iptables-restore` input for `rs`, given the current `-S` listings of `nat` and
/// `filter`; empty when there is nothing to do.
fn restore_payload(rs: &RuleSet, nat_listing: &str, filter_listing: &str) -> String {
    [(&NAT, nat_listing), (&FILTER, filter_listing)]
        .into_iter()
        .filter_map(|(part, listing)| part.restore(rs, listing))
        .collect()
}

/// `iptables -w -t <table> -S`: every chain and rule of a table.
fn list(table: &str) -> Result<String, RulesError> {
    exec_ok("iptables", &["-w", "-t", table, "-S"], None)
}

/// `iptables -w -t <table> -C ...`: whether the rule is there.
fn exists(table: &str, rule: &Rule) -> Result<bool, RulesError> {
    let mut args = vec!["-w", "-t", table, "-C", rule.chain];
    args.extend(rule.spec.iter().map(String::as_str));
    let out = exec("iptables", &args, None)?;
    match out.status.code() {
        Some(0) => Ok(true),
        // "Bad rule (does a matching rule exist in that chain?)".
        Some(1) => Ok(false),
        _ => Err(RulesError::Failed {
            command: super::describe("iptables", &args),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// flanneld's rules with `iptables`.
#[derive(Debug, Default)]
pub struct Iptables {
    /// One reader/writer at a time in this process (the xtables lock orders us with others).
    lock: Mutex<()>,
}

impl Iptables {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Brings our chains to `rs` (both parts off: removes them).
    fn install(&self, rs: &RuleSet) -> Result<(), RulesError> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let payload = restore_payload(rs, &list(NAT.table)?, &list(FILTER.table)?);
        if payload.is_empty() {
            debug!("iptables: none of flanneld's chains to remove");
            return Ok(());
        }
        debug!("iptables-restore --noflush --wait <<EOF\n{payload}EOF");
        exec_ok("iptables-restore", &["--noflush", "--wait"], Some(&payload))?;
        Ok(())
    }
}

impl TrafficManager for Iptables {
    fn engine(&self) -> Engine {
        Engine::Iptables
    }

    fn apply(&self, rules: &RuleSet) -> Result<(), RulesError> {
        self.install(rules)
    }

    fn check(&self, rules: &RuleSet) -> Result<bool, RulesError> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        for part in PARTS {
            let current = part.current(&list(part.table)?);
            let Some(wanted) = part.rules(rules) else {
                if current.chain_exists || !current.jumps.is_empty() {
                    info!(
                        table = part.table,
                        "iptables: chain {} is still there, but is off", part.chain
                    );
                    return Ok(false);
                }
                continue;
            };
            if !current.chain_exists {
                info!(
                    table = part.table,
                    "iptables: chain {} is missing", part.chain
                );
                return Ok(false);
            }
            for rule in &wanted {
                if !exists(part.table, rule)? {
                    info!(
                        table = part.table,
                        "iptables: rule missing: {}",
                        rule.save_line("-A")
                    );
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    fn cleanup(&self) -> Result<(), RulesError> {
        self.install(&RuleSet {
            masquerade: false,
            forward: false,
            cluster: ipnet::Ipv4Net::default(),
            pod: ipnet::Ipv4Net::default(),
            fully_random: false,
        })
    }

    fn render(&self, rules: &RuleSet) -> String {
        PARTS.iter().map(|p| p.render(rules)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> RuleSet {
        RuleSet {
            cluster: "10.244.0.0/16".parse().unwrap(),
            pod: "10.244.1.0/24".parse().unwrap(),
            masquerade: true,
            fully_random: true,
            forward: true,
        }
    }

    /// flanneld v0.28's rules for Network 10.244.0.0/16 and subnet 10.244.1.0/24, as
    /// `iptables-save` shows them.
    const FLANNELD_NAT: &str = r#"*nat
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
COMMIT
"#;
    const FLANNELD_FILTER: &str = r#"*filter
:FLANNEL-FWD - [0:0]
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
COMMIT
"#;

    #[test]
    fn renders_flanneld_rules() {
        let ipt = Iptables::new();
        assert_eq!(
            ipt.render(&rules()),
            format!("{FLANNELD_NAT}{FLANNELD_FILTER}")
        );
    }

    #[test]
    fn renders_without_random_fully() {
        let rs = RuleSet {
            fully_random: false,
            ..rules()
        };
        let expected = FLANNELD_NAT.replace(" --random-fully", "");
        assert_eq!(
            Iptables::new().render(&rs),
            format!("{expected}{FLANNELD_FILTER}")
        );
        assert_eq!(expected.matches("-j MASQUERADE\n").count(), 2);
    }

    #[test]
    fn renders_each_part_alone() {
        let ipt = Iptables::new();
        let masq_only = RuleSet {
            forward: false,
            ..rules()
        };
        assert_eq!(ipt.render(&masq_only), FLANNELD_NAT);
        let forward_only = RuleSet {
            masquerade: false,
            ..rules()
        };
        assert_eq!(ipt.render(&forward_only), FLANNELD_FILTER);
        let none = RuleSet {
            masquerade: false,
            forward: false,
            ..rules()
        };
        assert_eq!(ipt.render(&none), "");
    }

    /// `iptables -t nat -S` of a node where flanneld ran with an older subnet, under someone
    /// else's rule, plus a stale jump without comment.
    const OLD_NAT: &str = r#"-P PREROUTING ACCEPT
-P INPUT ACCEPT
-P OUTPUT ACCEPT
-P POSTROUTING ACCEPT
-N FLANNEL-POSTRTG
-N OTHER
-A POSTROUTING -s 192.168.0.0/16 -j MASQUERADE
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -j FLANNEL-POSTRTG
-A POSTROUTING -j OTHER
-A FLANNEL-POSTRTG -s 10.244.9.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
"#;
    const EMPTY_FILTER: &str = "-P INPUT ACCEPT\n-P FORWARD DROP\n-P OUTPUT ACCEPT\n";

    #[test]
    fn restore_replaces_our_chain_and_jumps_only() {
        let payload = restore_payload(&rules(), OLD_NAT, EMPTY_FILTER);
        let appends = |text: &str| {
            text.lines()
                .filter(|l| l.starts_with("-A"))
                .fold(String::new(), |acc, l| acc + l + "\n")
        };
        let (nat_rules, filter_rules) = (appends(FLANNELD_NAT), appends(FLANNELD_FILTER));
        assert_eq!(
            payload,
            format!(
                "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
                 -D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
                 -D POSTROUTING -j FLANNEL-POSTRTG\n\
                 {nat_rules}COMMIT\n\
                 *filter\n:FLANNEL-FWD - [0:0]\n{filter_rules}COMMIT\n"
            )
        );
    }

    #[test]
    fn restore_removes_a_part_that_is_off() {
        let rs = RuleSet {
            masquerade: false,
            ..rules()
        };
        let payload = restore_payload(&rs, OLD_NAT, EMPTY_FILTER);
        assert!(payload.starts_with(
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n\
             -D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
             -D POSTROUTING -j FLANNEL-POSTRTG\n\
             -X FLANNEL-POSTRTG\nCOMMIT\n*filter\n"
        ));
        // Nothing of ours and nothing wanted: nothing to run.
        let none = RuleSet {
            masquerade: false,
            forward: false,
            ..rules()
        };
        assert_eq!(restore_payload(&none, EMPTY_FILTER, EMPTY_FILTER), "");
    }

    #[test]
    fn finds_our_chain_and_jumps() {
        let current = NAT.current(OLD_NAT);
        assert!(current.chain_exists);
        assert_eq!(
            current.jumps,
            [
                "-m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
                "-j FLANNEL-POSTRTG"
            ]
        );
        let current = FILTER.current(EMPTY_FILTER);
        assert!(!current.chain_exists);
        assert!(current.jumps.is_empty());
    }
}
