//! The nftables engine: flanneld's table `ip flannel-ipv4` (`"EnableNFTables": true`), with its
//! comments, chains and rules as flanneld v0.28 writes them (`pkg/trafficmngr/nftables`), in the
//! text `nft list table` prints.
//!
//! Applying is one `nft -f -` transaction that adds the table (a no-op if it is there), deletes it
//! and defines it again whole: the old table (an old Network or subnet, a rule someone added) is
//! replaced atomically, and nothing outside it is touched. The definition is the very text
//! `nft list table` prints back, which is what checking compares with: a missing table, chain or
//! rule (or one that is not ours) makes the check fail.
//!
//! Two deliberate differences from flanneld's source, where it disagrees with its own iptables
//! rules:
//! - the kube-proxy mark is tested as a bit, `meta mark & 0x00004000 == 0x00004000` (iptables:
//!   `-m mark --mark 0x4000/0x4000`), where flanneld writes `meta mark 0x4000`, which misses a
//!   packet carrying other mark bits too;
//! - the fourth rule is `ip saddr != CLUSTER ip daddr POD return` (iptables:
//!   `! -s CLUSTER -d POD -j RETURN`), where flanneld writes `ip saddr != POD ip daddr CLUSTER
//!   return`, which returns everything the last rule would masquerade and makes it dead.
use std::sync::{Mutex, PoisonError};

use tracing::{debug, info};

use super::{Engine, RuleSet, RulesError, TrafficManager, exec_ok};

/// Our table's family and name.
pub const TABLE: &str = "ip flannel-ipv4";
/// Our masquerade chain (nat, postrouting, priority srcnat).
pub const POSTRTG_CHAIN: &str = "postrtg";
/// Our forward chain (filter, forward, priority filter).
pub const FORWARD_CHAIN: &str = "forward";
/// Multicast is never masqueraded.
pub const MULTICAST: &str = "224.0.0.0/4";

/// The table as `nft list table ip flannel-ipv4` prints it; "" when both parts are off. It is
/// also valid `nft -f` input, and what [`Nftables::apply`] feeds.
fn definition(rs: &RuleSet) -> String {
    let mut chains = Vec::new();
    let (cluster, pod) = (rs.cluster, rs.pod);
    if rs.masquerade {
        let masq = if rs.fully_random {
            "masquerade fully-random"
        } else {
            "masquerade"
        };
        chains.push(chain(
            POSTRTG_CHAIN,
            "chain to manage traffic masquerading by flannel",
            "type nat hook postrouting priority srcnat; policy accept;",
            &[
                // kube-proxy's marked packets: its own masquerade handles them.
                "meta mark & 0x00004000 == 0x00004000 return".to_string(),
                // Within the overlay: no NAT.
                format!("ip saddr {pod} ip daddr {cluster} return"),
                format!("ip saddr {cluster} ip daddr {pod} return"),
                // External traffic arriving for one of this node's pods keeps its source.
                // flanneld's source has `ip saddr != POD ip daddr CLUSTER return` here, which
                // makes the last rule dead; this is the rule of its iptables engine.
                format!("ip saddr != {cluster} ip daddr {pod} return"),
                // Pods to the outside, multicast excepted.
                format!("ip saddr {cluster} ip daddr != {MULTICAST} {masq}"),
                // The host (or anything outside the Network) to the Network.
                format!("ip saddr != {cluster} ip daddr {cluster} {masq}"),
            ],
        ));
    }
    if rs.forward {
        chains.push(chain(
            FORWARD_CHAIN,
            "chain to accept flannel traffic",
            "type filter hook forward priority filter; policy accept;",
            &[
                format!("ip saddr {cluster} accept"),
                format!("ip daddr {cluster} accept"),
            ],
        ));
    }
    if chains.is_empty() {
        return String::new();
    }
    format!(
        "table {TABLE} {{\n\tcomment \"rules for flannel-ipv4\"\n{}}}\n",
        chains.join("\n")
    )
}

fn chain(name: &str, comment: &str, hook: &str, rules: &[String]) -> String {
    let mut out = format!("\tchain {name} {{\n\t\tcomment \"{comment}\"\n\t\t{hook}\n");
    for rule in rules {
        out.push_str("\t\t");
        out.push_str(rule);
        out.push('\n');
    }
    out.push_str("\t}\n");
    out
}

/// The `nft -f -` transaction that leaves our table as `rs` wants it: created if absent (so that
/// deleting it cannot fail), deleted, and defined again whole (unless both parts are off).
fn transaction(rs: &RuleSet) -> String {
    format!(
        "table {TABLE} {{}}\ndelete table {TABLE}\n{}",
        definition(rs)
    )
}

/// The lines that matter in a listing: trimmed, blank lines dropped.
fn normalize(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Whether `nft list tables` lists our table.
fn listed(tables: &str) -> bool {
    tables.lines().any(|l| l.trim() == format!("table {TABLE}"))
}

/// flanneld's rules with `nft`.
#[derive(Debug, Default)]
pub struct Nftables {
    /// One reader/writer at a time in this process (an nft transaction is atomic anyway).
    lock: Mutex<()>,
}

impl Nftables {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    fn run(&self, rs: &RuleSet) -> Result<(), RulesError> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let tx = transaction(rs);
        debug!("nft -f - <<EOF\n{tx}EOF");
        exec_ok("nft", &["-f", "-"], Some(&tx))?;
        Ok(())
    }
}

impl TrafficManager for Nftables {
    fn engine(&self) -> Engine {
        Engine::Nftables
    }

    fn apply(&self, rules: &RuleSet) -> Result<(), RulesError> {
        self.run(rules)
    }

    fn check(&self, rules: &RuleSet) -> Result<bool, RulesError> {
        let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let listing = match exec_ok("nft", &["list", "table", "ip", "flannel-ipv4"], None) {
            Ok(listing) => listing,
            Err(e) => {
                // Absent, or a real failure? `nft list tables` tells.
                if listed(&exec_ok("nft", &["list", "tables", "ip"], None)?) {
                    return Err(e);
                }
                if !rules.is_empty() {
                    info!("nftables: table {TABLE} is missing");
                }
                return Ok(rules.is_empty());
            }
        };
        let expected = definition(rules);
        if rules.is_empty() {
            info!("nftables: table {TABLE} is still there, but both parts are off");
            return Ok(false);
        }
        let (want, have) = (normalize(&expected), normalize(&listing));
        if want == have {
            return Ok(true);
        }
        if let Some(missing) = want.iter().find(|l| !have.contains(l)) {
            info!("nftables: missing from table {TABLE}: {missing}");
        } else {
            info!("nftables: table {TABLE} differs from ours:\n{listing}");
        }
        Ok(false)
    }

    fn cleanup(&self) -> Result<(), RulesError> {
        self.run(&RuleSet {
            masquerade: false,
            forward: false,
            cluster: ipnet::Ipv4Net::default(),
            pod: ipnet::Ipv4Net::default(),
            fully_random: false,
        })
    }

    fn render(&self, rules: &RuleSet) -> String {
        definition(rules)
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

    /// flanneld v0.28's table for Network 10.244.0.0/16 and subnet 10.244.1.0/24 (with the two
    /// corrections of the module docs), as `nft list table ip flannel-ipv4` prints it.
    const FLANNELD_TABLE: &str = "\
table ip flannel-ipv4 {
	comment \"rules for flannel-ipv4\"
	chain postrtg {
		comment \"chain to manage traffic masquerading by flannel\"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00004000 == 0x00004000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}

	chain forward {
		comment \"chain to accept flannel traffic\"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.244.0.0/16 accept
		ip daddr 10.244.0.0/16 accept
	}
}
";

    #[test]
    fn renders_flanneld_table() {
        assert_eq!(Nftables::new().render(&rules()), FLANNELD_TABLE);
    }

    #[test]
    fn renders_without_fully_random() {
        let rs = RuleSet {
            fully_random: false,
            ..rules()
        };
        let text = Nftables::new().render(&rs);
        assert_eq!(text, FLANNELD_TABLE.replace(" fully-random", ""));
        assert_eq!(text.matches(" masquerade\n").count(), 2);
    }

    #[test]
    fn renders_each_part_alone() {
        let nft = Nftables::new();
        let masq_only = nft.render(&RuleSet {
            forward: false,
            ..rules()
        });
        let postrtg_end = FLANNELD_TABLE.find("\n\tchain forward").unwrap();
        assert_eq!(masq_only, format!("{}}}\n", &FLANNELD_TABLE[..postrtg_end]));
        let forward_only = nft.render(&RuleSet {
            masquerade: false,
            ..rules()
        });
        let postrtg_start = FLANNELD_TABLE.find("\tchain postrtg").unwrap();
        assert_eq!(
            forward_only,
            format!(
                "{}{}",
                &FLANNELD_TABLE[..postrtg_start],
                &FLANNELD_TABLE[postrtg_end + 1..]
            )
        );
        assert!(!forward_only.contains("masquerade"));
        let none = nft.render(&RuleSet {
            masquerade: false,
            forward: false,
            ..rules()
        });
        assert_eq!(none, "");
    }

    #[test]
    fn transaction_replaces_the_table() {
        assert_eq!(
            transaction(&rules()),
            format!("table ip flannel-ipv4 {{}}\ndelete table ip flannel-ipv4\n{FLANNELD_TABLE}")
        );
        let none = RuleSet {
            masquerade: false,
            forward: false,
            ..rules()
        };
        assert_eq!(
            transaction(&none),
            "table ip flannel-ipv4 {}\ndelete table ip flannel-ipv4\n"
        );
    }

    #[test]
    fn listing_is_compared_line_by_line() {
        // `nft list` indents with tabs; whitespace and blank lines do not matter.
        let reindented = FLANNELD_TABLE.replace('\t', "  ").replace("\n\n", "\n");
        assert_eq!(normalize(&reindented), normalize(FLANNELD_TABLE));
        assert!(listed("table ip nat\ntable ip flannel-ipv4\n"));
        assert!(!listed("table ip flannel-ipv4x\ntable ip6 flannel-ipv4\n"));
    }
}
