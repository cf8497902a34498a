//! The trafficmngr engines against the real `iptables` and `nft`: what they install read back
//! with `iptables-save` and `nft list table`, compared with flanneld's text; rules deleted by hand
//! and rebuilt by a resync; an old subnet replaced; the engines switched; everything of ours
//! removed, and nobody else's rules, chains or policies touched.
//!
//! SAFETY: nothing here runs in the machine's network namespace. Each test creates a namespace of
//! its own (`fe-<pid>-tm-<n>`, removed on drop, also when the test fails) and runs the library
//! and the `iptables`/`nft` commands on a thread that has entered it (commands forked from that
//! thread inherit it), after checking that the thread really is in it. Needs root (as
//! `cargo xtask test` runs it) and the Debian packages `iptables` and `nftables`.
use std::{
    fmt::Write as _,
    fs,
    os::unix::fs::MetadataExt as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use flannel_agent::trafficmngr::{
    Engine, RuleSet, TrafficManager, ensure_and_resync, manager, resync, setup,
};
use flannel_tests::{run, sweep_stale, with_netns};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace of this run, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Result<Self> {
        ensure!(
            nix::unistd::Uid::effective().is_root(),
            "the trafficmngr tests need root: they create a network namespace and program \
             iptables and nftables inside it (run them as root, as `cargo xtask test` does)"
        );
        sweep_stale();
        let name = format!(
            "fe-{}-tm-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        Ok(Self { name })
    }

    /// Runs `f` on a thread inside the namespace, once that thread is checked to be in it.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        let path = self.path();
        with_netns(&self.name, move || {
            assert_inside(&path)?;
            f()
        })
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// Fails unless the calling thread is in the namespace at `path`, and not in the one of the
/// process's main thread (the test harness's, which never leaves the machine's namespace).
fn assert_inside(path: &str) -> Result<()> {
    let id = |p: &str| -> Result<(u64, u64)> {
        let m = fs::metadata(p).with_context(|| format!("stat {p}"))?;
        Ok((m.dev(), m.ino()))
    };
    let (want, have, main) = (
        id(path)?,
        id("/proc/thread-self/ns/net")?,
        id("/proc/self/ns/net")?,
    );
    ensure!(
        want == have && have != main,
        "SAFETY: this thread is not in the test namespace {path}; refusing to touch its rules"
    );
    Ok(())
}

fn rules(pod: &str) -> RuleSet {
    RuleSet {
        cluster: "10.244.0.0/16".parse().expect("network"),
        pod: pod.parse().expect("subnet"),
        masquerade: true,
        fully_random: true,
        forward: true,
    }
}

/// `iptables -w <line>`, `line` split at spaces outside double quotes.
fn iptables(line: &str) -> Result<String> {
    let mut args = vec!["-w".to_string()];
    let (mut word, mut quoted) = (None::<String>, false);
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.get_or_insert_default();
            }
            c if c.is_whitespace() && !quoted => args.extend(word.take()),
            c => word.get_or_insert_default().push(c),
        }
    }
    args.extend(word);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("iptables", &args)
}

/// `iptables-save -t <table>`.
fn save(table: &str) -> Result<String> {
    run("iptables-save", &["-t", table])
}

/// Our lines of `iptables-save` (those naming our chains), in the form `render` gives.
fn ours_iptables() -> Result<String> {
    let mut out = String::new();
    for table in ["nat", "filter"] {
        let lines: Vec<String> = save(table)?
            .lines()
            .filter(|l| l.contains("FLANNEL-"))
            .map(|l| format!("{l}\n"))
            .collect();
        if !lines.is_empty() {
            let _ = write!(out, "*{table}\n{}COMMIT\n", lines.concat());
        }
    }
    Ok(out)
}

/// Everybody else's lines of `iptables-save` (timestamps dropped).
fn theirs_iptables() -> Result<Vec<String>> {
    let mut out = Vec::new();
    for table in ["nat", "filter"] {
        out.extend(
            save(table)?
                .lines()
                .filter(|l| !l.contains("FLANNEL-") && !l.starts_with('#'))
                .map(String::from),
        );
    }
    Ok(out)
}

/// `nft list table ip flannel-ipv4`, or "" when there is no such table.
fn ours_nft() -> Result<String> {
    let tables = run("nft", &["list", "tables", "ip"])?;
    if !tables.lines().any(|l| l.trim() == "table ip flannel-ipv4") {
        return Ok(String::new());
    }
    run("nft", &["list", "table", "ip", "flannel-ipv4"])
}

/// Someone else's iptables state: a chain and rules in `filter`, a `POSTROUTING` rule, and a
/// FORWARD policy of DROP (as Docker sets it).
fn foreign_iptables() -> Result<()> {
    for line in [
        "-P FORWARD DROP",
        "-N TEST-OTHER",
        "-A TEST-OTHER -s 192.0.2.0/24 -j ACCEPT",
        "-A FORWARD -j TEST-OTHER",
        "-t nat -A POSTROUTING -s 192.168.0.0/16 -j MASQUERADE",
    ] {
        iptables(line)?;
    }
    Ok(())
}

/// Someone else's nftables table.
fn foreign_nft() -> Result<String> {
    run("nft", &["add", "table", "ip", "test-other"])?;
    run(
        "nft",
        &[
            "add chain ip test-other passing { type filter hook forward priority 10 ; policy drop ; }",
        ],
    )?;
    run(
        "nft",
        &["add rule ip test-other passing ip saddr 192.0.2.0/24 accept"],
    )?;
    run("nft", &["list", "table", "ip", "test-other"])
}

fn forward_policy_is_drop() -> Result<bool> {
    Ok(save("filter")?
        .lines()
        .any(|l| l.starts_with(":FORWARD DROP")))
}

/// The handle of the rule `rule` in our table, from `nft -a list table`.
fn nft_handle(rule: &str) -> Result<String> {
    let listing = run("nft", &["-a", "list", "table", "ip", "flannel-ipv4"])?;
    listing
        .lines()
        .find_map(|l| {
            let (text, handle) = l.trim().split_once(" # handle ")?;
            (text == rule).then(|| handle.to_string())
        })
        .ok_or_else(|| anyhow!("rule `{rule}` not in\n{listing}"))
}

#[test]
fn iptables_engine() -> Result<()> {
    let ns = Netns::new()?;
    ns.run(|| {
        foreign_iptables()?;
        // What an older flanneld left: our chain with an old subnet's rule, a jump without
        // comment.
        iptables("-t nat -N FLANNEL-POSTRTG")?;
        iptables("-t nat -A FLANNEL-POSTRTG -s 10.244.9.0/24 -d 10.244.0.0/16 -j RETURN")?;
        iptables("-t nat -A POSTROUTING -j FLANNEL-POSTRTG")?;
        let theirs = theirs_iptables()?;
        let ipt = manager(Engine::Iptables);
        let rs = rules("10.244.1.0/24");
        ensure!(!ipt.check(&rs)?, "check passed on an old flanneld's chain");

        // (2) Applied: exactly flanneld's lines, the old subnet and the stale jump gone.
        ipt.apply(&rs)?;
        assert_eq!(ours_iptables()?, ipt.render(&rs));
        assert!(!ours_iptables()?.contains("10.244.9.0/24"));
        assert!(ipt.check(&rs)?);
        assert_eq!(theirs_iptables()?, theirs);
        // Applying again changes nothing (the jump is not duplicated).
        ipt.apply(&rs)?;
        assert_eq!(ours_iptables()?, ipt.render(&rs));

        // (3) Rules deleted by hand are rebuilt.
        iptables_rebuilds(ipt.as_ref(), &rs)?;
        assert_eq!(theirs_iptables()?, theirs);

        // (4) Another subnet: its rules replace the old ones.
        let moved = rules("10.244.7.0/24");
        ipt.apply(&moved)?;
        let now = ours_iptables()?;
        assert_eq!(now, ipt.render(&moved));
        assert!(!now.contains("10.244.1.0/24"), "old subnet left:\n{now}");
        assert!(ipt.check(&moved)?);
        assert!(!ipt.check(&rs)?);
        // Without random-fully.
        let plain = RuleSet {
            fully_random: false,
            ..moved.clone()
        };
        ipt.apply(&plain)?;
        assert_eq!(ours_iptables()?, ipt.render(&plain));
        assert!(!ours_iptables()?.contains("random-fully"));
        // Masquerade off: our nat chain and its jump go, the forward rules stay.
        let no_masq = RuleSet {
            masquerade: false,
            ..moved.clone()
        };
        assert!(
            !ipt.check(&no_masq)?,
            "check passed with a chain that is off"
        );
        ipt.apply(&no_masq)?;
        assert_eq!(ours_iptables()?, ipt.render(&no_masq));
        assert!(!save("nat")?.contains("FLANNEL-"));
        assert!(ipt.check(&no_masq)?);

        // (6) Cleanup: ours gone, theirs as it was, FORWARD still DROP; again is fine.
        ipt.apply(&rs)?;
        ipt.cleanup()?;
        assert_eq!(ours_iptables()?, "");
        assert_eq!(theirs_iptables()?, theirs);
        assert!(forward_policy_is_drop()?);
        ipt.cleanup()?;
        assert_eq!(theirs_iptables()?, theirs);
        Ok(())
    })
}

/// A rule, a jump and a whole chain's rules deleted by hand: each time the check sees it and a
/// resync rebuilds the whole set, in order.
fn iptables_rebuilds(ipt: &dyn TrafficManager, rs: &RuleSet) -> Result<()> {
    for (what, line) in [
        ("a nat rule", "-t nat -D FLANNEL-POSTRTG 3"),
        (
            "a jump",
            r#"-D FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD"#,
        ),
        ("a filter rule", "-D FLANNEL-FWD 1"),
        ("a chain's rules", "-t nat -F FLANNEL-POSTRTG"),
    ] {
        iptables(line)?;
        assert_ne!(ours_iptables()?, ipt.render(rs), "{what}");
        assert!(!ipt.check(rs)?, "check missed {what} deleted");
        assert!(resync(ipt, rs)?, "resync did not rebuild {what}");
        assert!(ipt.check(rs)?);
        assert_eq!(ours_iptables()?, ipt.render(rs), "{what}");
        assert!(!resync(ipt, rs)?, "resync rebuilt rules in place");
    }
    Ok(())
}

#[test]
fn nftables_engine() -> Result<()> {
    let ns = Netns::new()?;
    ns.run(|| {
        foreign_iptables()?;
        let theirs_nft = foreign_nft()?;
        // What a flanneld v0.28 left, with an older subnet.
        let old = "table ip flannel-ipv4 {\n\tchain postrtg {\n\t\ttype nat hook postrouting \
                   priority srcnat; policy accept;\n\t\tmeta mark 0x4000 return\n\t\tip saddr \
                   != 10.244.9.0/24 ip daddr 10.244.0.0/16 return\n\t}\n}\n";
        nft_file(old)?;
        let theirs = theirs_iptables()?;
        let nft = manager(Engine::Nftables);
        let rs = rules("10.244.1.0/24");
        ensure!(!nft.check(&rs)?, "check passed on an old flanneld's table");

        // (5) Applied: `nft list table` shows exactly flanneld's table.
        nft.apply(&rs)?;
        assert_eq!(ours_nft()?, nft.render(&rs));
        assert!(nft.check(&rs)?);
        // A rule deleted by handle: the check sees it, a resync rebuilds the table.
        let handle = nft_handle("ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return")?;
        run(
            "nft",
            &[
                "delete",
                "rule",
                "ip",
                "flannel-ipv4",
                "postrtg",
                "handle",
                &handle,
            ],
        )?;
        assert_ne!(ours_nft()?, nft.render(&rs));
        assert!(!nft.check(&rs)?, "check missed a deleted rule");
        assert!(resync(nft.as_ref(), &rs)?, "resync did not rebuild");
        assert!(nft.check(&rs)?);
        assert_eq!(ours_nft()?, nft.render(&rs));
        assert!(
            !resync(nft.as_ref(), &rs)?,
            "resync rebuilt a table in place"
        );
        // A rule that is not ours, in our table.
        run(
            "nft",
            &["add rule ip flannel-ipv4 forward ip saddr 198.51.100.0/24 accept"],
        )?;
        assert!(!nft.check(&rs)?, "check missed an added rule");
        assert!(resync(nft.as_ref(), &rs)?);
        assert_eq!(ours_nft()?, nft.render(&rs));
        // The whole table deleted.
        run("nft", &["delete", "table", "ip", "flannel-ipv4"])?;
        assert!(!nft.check(&rs)?, "check missed a deleted table");
        assert!(resync(nft.as_ref(), &rs)?);
        assert_eq!(ours_nft()?, nft.render(&rs));

        // Another subnet replaces the old rules.
        let moved = rules("10.244.7.0/24");
        nft.apply(&moved)?;
        let now = ours_nft()?;
        assert_eq!(now, nft.render(&moved));
        assert!(!now.contains("10.244.1.0/24"), "old subnet left:\n{now}");
        assert!(!nft.check(&rs)?);
        // Without fully-random; masquerade off.
        let plain = RuleSet {
            fully_random: false,
            ..moved.clone()
        };
        nft.apply(&plain)?;
        assert_eq!(ours_nft()?, nft.render(&plain));
        assert!(!ours_nft()?.contains("fully-random"));
        let no_masq = RuleSet {
            masquerade: false,
            ..moved.clone()
        };
        nft.apply(&no_masq)?;
        assert_eq!(ours_nft()?, nft.render(&no_masq));
        assert!(!ours_nft()?.contains("postrtg"));
        assert!(nft.check(&no_masq)?);

        // (6) Cleanup: our table gone, the other table and the iptables state untouched.
        nft.cleanup()?;
        assert_eq!(ours_nft()?, "");
        let none = RuleSet {
            masquerade: false,
            forward: false,
            ..rs.clone()
        };
        assert!(nft.check(&none)?);
        nft.cleanup()?;
        assert_eq!(
            run("nft", &["list", "table", "ip", "test-other"])?,
            theirs_nft
        );
        assert_eq!(theirs_iptables()?, theirs);
        assert!(forward_policy_is_drop()?);
        Ok(())
    })
}

/// `nft -f -` with `text`.
fn nft_file(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(text.as_bytes())?;
    let status = child.wait()?;
    ensure!(status.success(), "nft -f - failed ({status}) on\n{text}");
    Ok(())
}

#[test]
fn setup_moves_between_engines() -> Result<()> {
    let ns = Netns::new()?;
    ns.run(|| {
        foreign_iptables()?;
        let theirs_nft = foreign_nft()?;
        let theirs = theirs_iptables()?;
        let (ipt, nft) = (manager(Engine::Iptables), manager(Engine::Nftables));
        let rs = rules("10.244.1.0/24");

        setup(Engine::Iptables, &rs)?;
        assert_eq!(ours_iptables()?, ipt.render(&rs));
        assert_eq!(ours_nft()?, "");
        // flanneld restarted with EnableNFTables: the iptables rules go.
        setup(Engine::Nftables, &rs)?;
        assert_eq!(ours_nft()?, nft.render(&rs));
        assert_eq!(ours_iptables()?, "");
        // And back.
        setup(Engine::Iptables, &rs)?;
        assert_eq!(ours_iptables()?, ipt.render(&rs));
        assert_eq!(ours_nft()?, "");

        // (6) Cleanup of both: nothing of ours, everything of theirs.
        nft.apply(&rs)?;
        ipt.cleanup()?;
        nft.cleanup()?;
        assert_eq!(ours_iptables()?, "");
        assert_eq!(ours_nft()?, "");
        assert_eq!(theirs_iptables()?, theirs);
        assert_eq!(
            run("nft", &["list", "table", "ip", "test-other"])?,
            theirs_nft
        );
        assert!(forward_policy_is_drop()?);
        Ok(())
    })
}

/// Polls `f` (on the blocking pool) until it is true, for at most `limit`.
async fn eventually(
    limit: Duration,
    f: impl Fn() -> Result<bool> + Send + Sync + Clone + 'static,
) -> Result<bool> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let f = f.clone();
        if tokio::task::spawn_blocking(f).await?? {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

#[test]
fn ensure_and_resync_rebuilds() -> Result<()> {
    let ns = Netns::new()?;
    let path = ns.path();
    ns.run(move || {
        let rs = rules("10.244.1.0/24");
        // The iptables rules of a previous run, to be removed.
        manager(Engine::Iptables).apply(&rs)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            // The blocking pool's threads are started from this thread: in the namespace too.
            let p = path.clone();
            tokio::task::spawn_blocking(move || assert_inside(&p)).await??;
            let task = tokio::spawn(ensure_and_resync(
                Engine::Nftables,
                rs.clone(),
                Duration::from_millis(100),
            ));
            let nft = manager(Engine::Nftables);
            let expected = nft.render(&rs);
            let applied = {
                let expected = expected.clone();
                move || Ok(ours_nft()? == expected)
            };
            if !eventually(Duration::from_secs(10), applied.clone()).await? {
                bail!(
                    "ensure_and_resync did not install the table:\n{}",
                    ours_nft()?
                );
            }
            assert_eq!(ours_iptables()?, "", "the other engine's rules stayed");
            // A rule deleted by hand comes back with the next resync.
            let handle = nft_handle("ip daddr 10.244.0.0/16 accept")?;
            run(
                "nft",
                &[
                    "delete",
                    "rule",
                    "ip",
                    "flannel-ipv4",
                    "forward",
                    "handle",
                    &handle,
                ],
            )?;
            if !eventually(Duration::from_secs(10), applied).await? {
                bail!("ensure_and_resync did not rebuild:\n{}", ours_nft()?);
            }
            ensure!(!task.is_finished(), "ensure_and_resync returned: {task:?}");
            task.abort();
            Ok::<_, anyhow::Error>(())
        })?;
        manager(Engine::Nftables).cleanup()?;
        manager(Engine::Iptables).cleanup()?;
        assert_eq!(ours_nft()?, "");
        assert_eq!(ours_iptables()?, "");
        Ok(())
    })
}
