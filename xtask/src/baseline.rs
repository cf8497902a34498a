//! The eBPF object of an older git revision, for `cargo xtask bench` to time beside the current
//! one (`program_cost` with `FLANNEL_BASELINE_OBJECT`).
//!
//! The revision's tree is extracted with `git archive` into `target/baseline/<commit>/` (once per
//! commit) and its `flannel-ebpf` crate built there as flannel-agent's build.rs builds it with
//! aya-build: `rustup run nightly cargo build --package flannel-ebpf --bins --release --target
//! bpfel-unknown-none -Z build-std=core` with `--cfg bpf_target_arch`, `-Cdebuginfo=2` and
//! `-Clink-arg=--btf`, under the revision's own workspace manifest and lock file (its profile
//! settings). All revisions share one target directory, `target/baseline/target/`, so `core` and
//! the dependencies are built once; the object is kept as `target/baseline/flannel-<commit>-<tools>`
//! (`<tools>`: a hash of the nightly's `rustc -vV` and the bpf-linker in use) and reused as it is.
//!
//! Cargo tells a path crate's changes by file times, and `git archive` gives every file its
//! commit's time: in a shared target directory, revision B's older files would pass for revision
//! A's build, and A's object for B's. So a tree's files are touched before each build of it, which
//! makes cargo rebuild that revision's own crates (seconds), never anything else.
use std::{
    io::BufRead as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};

use crate::bootstrap::say;

/// Builds the eBPF object of `rev` (anything `git rev-parse` takes) and returns its commit and
/// the object's path.
pub fn object(rev: &str) -> Result<(String, PathBuf)> {
    let root = crate::workspace_root()
        .canonicalize()
        .context("workspace root")?;
    let commit = resolve(&root, rev)?;
    let dir = root.join("target/baseline");
    let object = dir.join(format!("flannel-{}-{:016x}", &commit[..12], tools()?));
    if object.exists() {
        say(&format!(
            "baseline object of {rev}: {} (built earlier)",
            object.display()
        ));
        return Ok((commit, object));
    }
    let tree = extract(&root, &dir, &commit)?;
    let started = Instant::now();
    say(&format!(
        "building the eBPF programs of {rev} ({}) in {}",
        &commit[..12],
        tree.display()
    ));
    touch(&tree, std::time::SystemTime::now())?;
    let built = build(&tree, &dir.join("target"))?;
    let partial = object.with_extension("partial");
    std::fs::copy(&built, &partial)
        .with_context(|| format!("copying {} to {}", built.display(), partial.display()))?;
    std::fs::rename(&partial, &object)?;
    say(&format!(
        "baseline object of {rev}: {} (built in {:.1} s)",
        object.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok((commit, object))
}

/// What the object depends on besides the revision: the nightly compiler and the bpf-linker.
fn tools() -> Result<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let rustc = Command::new("rustup")
        .args(["run", "nightly", "rustc", "-vV"])
        .output()
        .context("running rustup run nightly rustc -vV")?;
    ensure!(
        rustc.status.success(),
        "rustup run nightly rustc -vV failed (is the nightly toolchain installed?)"
    );
    let mut hasher = std::hash::DefaultHasher::new();
    rustc.stdout.hash(&mut hasher);
    let linker = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.exists())
        .context("no bpf-linker on PATH")?;
    let linker = linker.canonicalize()?;
    let meta = std::fs::metadata(&linker)?;
    (linker, meta.len(), meta.modified()?).hash(&mut hasher);
    Ok(hasher.finish())
}

/// Sets the modification time of every file under `dir` to `now`.
fn touch(dir: &Path, now: std::time::SystemTime) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            touch(&path, now)?;
        } else if kind.is_file() {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(now))
                .with_context(|| format!("touching {}", path.display()))?;
        }
    }
    Ok(())
}

/// The commit `rev` names, or why there is none.
fn resolve(root: &Path, rev: &str) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--verify", "--quiet", "--end-of-options"])
        .arg(format!("{rev}^{{commit}}"))
        .output()
        .context("running git (is it installed?)")?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let inside = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--is-inside-work-tree"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !inside {
        bail!(
            "no git repository at {} (no history to build from)",
            root.display()
        );
    }
    let shallow = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["rev-parse", "--is-shallow-repository"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true");
    bail!(
        "revision {rev} is not in this clone's history{}",
        if shallow {
            " (a shallow clone: fetch it, e.g. `git fetch --unshallow`)"
        } else {
            ""
        }
    )
}

/// `commit`'s tree under `dir`, extracted by `git archive` unless an earlier run did.
fn extract(root: &Path, dir: &Path, commit: &str) -> Result<PathBuf> {
    let tree = dir.join(&commit[..12]);
    let done = tree.join(".extracted");
    if done.exists() {
        return Ok(tree);
    }
    let partial = dir.join(format!("{}.partial", &commit[..12]));
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    std::fs::create_dir_all(&partial)?;
    say(&format!(
        "extracting {} into {} (git archive)",
        &commit[..12],
        tree.display()
    ));
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["archive", "--format=tar", commit])
        .stdout(Stdio::piped())
        .spawn()
        .context("running git archive")?;
    let stdout = archive.stdout.take().context("git archive's output")?;
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&partial)
        .stdin(stdout)
        .status()
        .context("running tar")?;
    let archived = archive.wait()?;
    ensure!(
        archived.success() && tar.success(),
        "extracting {commit}: git archive {archived}, tar {tar}"
    );
    ensure!(
        partial.join("flannel-ebpf/Cargo.toml").exists(),
        "revision {commit} has no flannel-ebpf crate"
    );
    std::fs::write(partial.join(".extracted"), commit)?;
    if tree.exists() {
        std::fs::remove_dir_all(&tree)?;
    }
    std::fs::rename(&partial, &tree)?;
    Ok(tree)
}

/// Builds `tree`'s flannel-ebpf as aya-build 0.2.0 does, into `target_dir`; the object's path.
fn build(tree: &Path, target_dir: &Path) -> Result<PathBuf> {
    let arch = match std::env::consts::ARCH {
        a if a.starts_with("riscv64") => "riscv64",
        a => a,
    };
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    let mut child = Command::new("rustup")
        .args(["run", "nightly", "cargo", "build"])
        .args(["--package", "flannel-ebpf", "--bins", "--release"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--features", ""])
        .arg("--message-format=json-render-diagnostics")
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(tree)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        // As aya-build: the nightly's own rustc, whatever ran xtask.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running rustup run nightly cargo build")?;
    let stdout = child.stdout.take().context("cargo's output")?;
    let mut object = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "flannel"
            && let Some(exe) = msg["executable"].as_str()
        {
            object = Some(PathBuf::from(exe));
        }
    }
    let status = child.wait()?;
    ensure!(
        status.success(),
        "building the baseline's eBPF programs in {} failed ({status})",
        tree.display()
    );
    object.ok_or_else(|| anyhow!("cargo built no `flannel` binary in {}", tree.display()))
}
