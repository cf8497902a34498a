//! flanneld's masquerade and forward rules (flannel's `pkg/trafficmngr`), as an exact, compatible
//! fallback: the same chains, rules, comments and table that flanneld v0.28 installs, so that a
//! node moving between flanneld and this agent sees no difference and each one's cleanup removes
//! the other's rules.
//!
//! Two engines, as in flanneld:
//! - [`Engine::Iptables`] (flanneld's default): chain `FLANNEL-POSTRTG` in table `nat`, jumped to
//!   from `POSTROUTING`, and chain `FLANNEL-FWD` in table `filter`, jumped to from `FORWARD`;
//!   applied in one `iptables-restore --noflush --wait` transaction.
//! - [`Engine::Nftables`] (`"EnableNFTables": true` in net-conf.json): table `ip flannel-ipv4` with
//!   base chains `postrtg` (nat, postrouting, srcnat) and `forward` (filter, forward, filter);
//!   applied in one `nft -f -` transaction that replaces the whole table.
//!
//! [`setup`] applies the rules with one engine and removes the other engine's (flanneld does the
//! same at start, so that a restart with the other engine leaves nothing behind); [`resync`]
//! re-checks them and rebuilds them all when anything is missing (flanneld's `--iptables-resync`,
//! every 5 s by default); [`ensure_and_resync`] does both on tokio.
//!
//! The engines run `iptables`, `iptables-restore` and `nft` (found on `PATH`) with
//! [`std::process::Command`]: they block, so call them from `spawn_blocking` (as
//! [`ensure_and_resync`] does). IPv4 only: the agent has no IPv6 networks.
use std::{
    convert::Infallible,
    fmt,
    io::{ErrorKind, Write as _},
    process::{Command, ExitStatus, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use ipnet::Ipv4Net;
use tracing::{debug, info, warn};

pub mod iptables;
pub mod nftables;

/// The rules to install: flanneld's `--ip-masq` rules and its `--iptables-forward-rules`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSet {
    /// The flannel Network (net-conf.json `Network`): CLUSTER in the rules.
    pub cluster: Ipv4Net,
    /// This node's leased subnet: POD in the rules.
    pub pod: Ipv4Net,
    /// Install the masquerade rules (flanneld `--ip-masq`).
    pub masquerade: bool,
    /// `--random-fully` / `fully-random` on the masquerade rules (flanneld's default; off with
    /// `--ip-masq-fully-random-disable`).
    pub fully_random: bool,
    /// Install the forward rules (flanneld `--iptables-forward-rules`, on by default).
    pub forward: bool,
}

impl RuleSet {
    /// True when neither masquerade nor forward rules are wanted: applying it removes ours.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        !self.masquerade && !self.forward
    }
}

impl fmt::Display for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "network {} subnet {} (masquerade {}{}, forward {})",
            self.cluster,
            self.pod,
            if self.masquerade { "on" } else { "off" },
            if self.masquerade && !self.fully_random {
                " without fully-random"
            } else {
                ""
            },
            if self.forward { "on" } else { "off" },
        )
    }
}

/// Which packet filter holds the rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `iptables` (whichever backend, legacy or nft, the distribution's `iptables` is).
    Iptables,
    /// `nft`, table `ip flannel-ipv4`.
    Nftables,
}

impl Engine {
    /// The engine that is not this one (whose rules [`setup`] removes).
    #[must_use]
    pub fn other(self) -> Self {
        match self {
            Self::Iptables => Self::Nftables,
            Self::Nftables => Self::Iptables,
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Iptables => "iptables",
            Self::Nftables => "nftables",
        })
    }
}

/// A rule command that could not run or failed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// The binary is not on `PATH`.
    #[error("`{binary}` was not found on PATH: install the Debian package `{package}`")]
    MissingBinary {
        binary: &'static str,
        package: &'static str,
    },
    /// The command could not be started or talked to.
    #[error("running `{command}`: {source}")]
    Io {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// The command exited with a failure status.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    /// The blocking task running the commands panicked or was cancelled.
    #[error("the task applying the {engine} rules failed: {reason}")]
    Task { engine: Engine, reason: String },
}

/// Programs one engine's rules.
pub trait TrafficManager: Send + Sync {
    /// Which engine this is.
    fn engine(&self) -> Engine;
    /// Installs exactly `rules` (replacing any previous content of our chains/table).
    /// masquerade=false and forward=false => our chains/table removed entirely.
    fn apply(&self, rules: &RuleSet) -> Result<(), RulesError>;
    /// True if every rule of `rules` is in place (and, for a part that is off, none of ours is).
    fn check(&self, rules: &RuleSet) -> Result<bool, RulesError>;
    /// Removes all of ours (chains, jump rules, table), nothing else; idempotent; Ok if nothing
    /// was there.
    fn cleanup(&self) -> Result<(), RulesError>;
    /// The rule set as the engine's own dump shows it (iptables-save lines of our chains /
    /// `nft list table` text), for the README and tests.
    fn render(&self, rules: &RuleSet) -> String;
}

/// The manager of `engine`.
#[must_use]
pub fn manager(engine: Engine) -> Box<dyn TrafficManager> {
    match engine {
        Engine::Iptables => Box::new(iptables::Iptables::new()),
        Engine::Nftables => Box::new(nftables::Nftables::new()),
    }
}

/// Removes the other engine's rules, then applies `rules` with `primary` (flanneld's start-up).
/// The other engine's cleanup is best effort: its binary may well not be installed.
pub fn setup(primary: Engine, rules: &RuleSet) -> Result<(), RulesError> {
    let other = primary.other();
    match manager(other).cleanup() {
        Ok(()) => debug!(engine = %other, "removed the unused engine's rules (if any)"),
        Err(e @ RulesError::MissingBinary { .. }) => {
            debug!(engine = %other, "not cleaning up the unused engine: {e}");
        }
        Err(e) => warn!(engine = %other, "could not clean up the unused engine's rules: {e}"),
    }
    manager(primary).apply(rules)?;
    info!(engine = %primary, "installed flanneld rules: {rules}");
    Ok(())
}

/// One resync step: if any rule of `rules` is missing, rebuilds the whole set (the order of the
/// rules matters, so flanneld rebuilds rather than patches). Returns whether it rebuilt.
pub fn resync(mgr: &dyn TrafficManager, rules: &RuleSet) -> Result<bool, RulesError> {
    if mgr.check(rules)? {
        return Ok(false);
    }
    let engine = mgr.engine();
    info!(%engine, "flanneld rules missing or changed; rebuilding {rules}");
    mgr.apply(rules)?;
    if mgr.check(rules)? {
        info!(%engine, "rebuilt flanneld rules: {rules}");
    } else {
        warn!(
            %engine,
            "rebuilt flanneld rules ({rules}), but they still do not read back as expected; \
             expected:\n{}",
            mgr.render(rules)
        );
    }
    Ok(true)
}

/// Applies `rules` with `primary` and removes the other engine's rules ([`setup`]); then every
/// `period` re-checks them and rebuilds them when anything is missing ([`resync`]), logging
/// failures and carrying on. Returns only if the first setup fails; stop it by dropping the
/// future (a command already running completes on the blocking pool).
pub async fn ensure_and_resync(
    primary: Engine,
    rules: RuleSet,
    period: Duration,
) -> Result<Infallible, RulesError> {
    let rules = Arc::new(rules);
    let mgr: Arc<dyn TrafficManager> = Arc::from(manager(primary));
    {
        let rules = Arc::clone(&rules);
        blocking(primary, move || setup(primary, &rules)).await?;
    }
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: the rules were just applied
    loop {
        tick.tick().await;
        let (mgr, rules) = (Arc::clone(&mgr), Arc::clone(&rules));
        if let Err(e) = blocking(primary, move || resync(mgr.as_ref(), &rules)).await {
            warn!(engine = %primary, "could not resync flanneld rules: {e}");
        }
    }
}

async fn blocking<T: Send + 'static>(
    engine: Engine,
    f: impl FnOnce() -> Result<T, RulesError> + Send + 'static,
) -> Result<T, RulesError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RulesError::Task {
            engine,
            reason: e.to_string(),
        })?
}

/// The Debian package that provides `binary`.
fn package_of(binary: &str) -> &'static str {
    if binary == "nft" {
        "nftables"
    } else {
        "iptables"
    }
}

/// A command line for messages: arguments with spaces quoted as a shell would need them.
fn describe(binary: &str, args: &[&str]) -> String {
    std::iter::once(binary)
        .chain(args.iter().copied())
        .map(|a| {
            if a.is_empty() || a.contains(char::is_whitespace) {
                format!("\"{a}\"")
            } else {
                a.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `binary args` (with `stdin` on its standard input), returning its output whatever its
/// exit status.
fn exec(binary: &'static str, args: &[&str], stdin: Option<&str>) -> Result<Output, RulesError> {
    let command = || describe(binary, args);
    let mut child = Command::new(binary)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C")
        .spawn()
        .map_err(|source| {
            if source.kind() == ErrorKind::NotFound {
                RulesError::MissingBinary {
                    binary,
                    package: package_of(binary),
                }
            } else {
                RulesError::Io {
                    command: command(),
                    source,
                }
            }
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A command that fails early closes its input: its status and stderr say why.
        if let Err(source) = pipe.write_all(input.as_bytes())
            && source.kind() != ErrorKind::BrokenPipe
        {
            return Err(RulesError::Io {
                command: command(),
                source,
            });
        }
    }
    child.wait_with_output().map_err(|source| RulesError::Io {
        command: command(),
        source,
    })
}

/// Runs `binary args`, failing unless it exits 0; returns its standard output.
fn exec_ok(binary: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, RulesError> {
    let out = exec(binary, args, stdin)?;
    if !out.status.success() {
        return Err(RulesError::Failed {
            command: describe(binary, args),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_names_its_package() {
        let err = exec_ok("flannel-no-such-binary", &[], None).unwrap_err();
        assert!(
            matches!(
                err,
                RulesError::MissingBinary {
                    binary: "flannel-no-such-binary",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(package_of("nft"), "nftables");
        assert_eq!(package_of("iptables"), "iptables");
        assert_eq!(package_of("iptables-restore"), "iptables");
        let msg = RulesError::MissingBinary {
            binary: "nft",
            package: "nftables",
        }
        .to_string();
        assert_eq!(
            msg,
            "`nft` was not found on PATH: install the Debian package `nftables`"
        );
    }

    #[test]
    fn failures_name_the_command_and_its_stderr() {
        let err = exec_ok("sh", &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        assert_eq!(
            err.to_string(),
            "`sh -c \"echo oops >&2; exit 3\"` failed (exit status: 3): oops"
        );
    }

    #[test]
    fn stdin_reaches_the_command() {
        let out = exec_ok("cat", &[], Some("*nat\nCOMMIT\n")).unwrap();
        assert_eq!(out, "*nat\nCOMMIT\n");
    }

    #[test]
    fn engines_and_rule_sets_display() {
        assert_eq!(Engine::Iptables.other(), Engine::Nftables);
        assert_eq!(Engine::Nftables.other(), Engine::Iptables);
        assert_eq!(manager(Engine::Nftables).engine(), Engine::Nftables);
        assert_eq!(manager(Engine::Iptables).engine(), Engine::Iptables);
        let rules = RuleSet {
            cluster: "10.244.0.0/16".parse().unwrap(),
            pod: "10.244.1.0/24".parse().unwrap(),
            masquerade: true,
            fully_random: false,
            forward: true,
        };
        assert_eq!(
            rules.to_string(),
            "network 10.244.0.0/16 subnet 10.244.1.0/24 (masquerade on without fully-random, \
             forward on)"
        );
        assert!(!rules.is_empty());
        assert!(
            RuleSet {
                masquerade: false,
                forward: false,
                ..rules
            }
            .is_empty()
        );
    }
}
