//! Installs what building and testing need, saying what it does: Debian packages, the nightly
//! toolchain with rust-src, and a bpf-linker built against the nightly's own libLLVM.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

/// Debian packages the tests, the demo and the benchmark use.
const DEBIAN_PACKAGES: [&str; 13] = [
    "iproute2",
    "iputils-ping",
    "bpftool",
    "iperf3",
    // The userspace WireGuard the wireguard backend falls back to (no kernel module here).
    "wireguard-go",
    // Underlay captures in the wireguard e2e test.
    "tcpdump",
    // Checksum offload turned off in the masquerade's checksum e2e test.
    "ethtool",
    // The etcd subnet manager's tests run a real etcd, and write leases as operators do.
    "etcd-server",
    "etcd-client",
    // The trafficmngr fallback (flanneld's masquerade/forward rules) and its tests.
    "iptables",
    "nftables",
    // etcd-client's build script compiles etcd's gRPC API with protoc (and its well-known types).
    "protobuf-compiler",
    "libprotobuf-dev",
];

pub fn say(msg: &str) {
    eprintln!("xtask: {msg}");
}

/// Runs a command, echoing it, failing on a non-zero exit.
pub fn sh(cmd: &mut Command) -> Result<()> {
    say(&format!("$ {}", describe(cmd)));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", describe(cmd)))?;
    ensure!(status.success(), "{} failed ({status})", describe(cmd));
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    ensure!(
        out.status.success(),
        "{} failed: {}",
        describe(cmd),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Everything, in order.
pub fn ensure_all() -> Result<()> {
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the demo and the tests create network namespaces and load BPF programs: run as root (e.g. `sudo -E cargo xtask ...`)"
    );
    ensure_debian_packages()?;
    ensure_nightly()?;
    ensure_bpf_linker()?;
    ensure_python_venv()?;
    Ok(())
}

fn ensure_debian_packages() -> Result<()> {
    ensure_packages(&DEBIAN_PACKAGES)
}

/// Installs whichever of `packages` are missing.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    say(&format!(
        "installing Debian packages: {}",
        missing.join(" ")
    ));
    sh(Command::new("apt-get").args(["update", "-qq"]))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// What `cargo xtask image` needs besides the usual toolchain: the release target's tools
/// ([`ensure_release_target`]), `umoci` and `skopeo` (the OCI layout and its docker archive).
pub fn ensure_image_tools() -> Result<()> {
    ensure_release_target()?;
    ensure_packages(&["umoci", "skopeo"])
}

/// What a release build needs ([`crate::RELEASE_TARGET`], static): `musl-gcc` (ring's C code)
/// and the musl target of the toolchain that builds the agent.
pub fn ensure_release_target() -> Result<()> {
    ensure_packages(&["musl-tools"])?;
    let target = crate::RELEASE_TARGET;
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == target) {
        say(&format!(
            "adding the {target} target (release builds are static, as the image's agent)"
        ));
        sh(Command::new("rustup").args(["target", "add", target]))?;
    }
    Ok(())
}

fn ensure_nightly() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain (the eBPF programs build with -Z build-std)");
        sh(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to nightly (to build core for bpfel-unknown-none)");
        sh(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The nightly's libLLVM file and its LLVM major version.
fn nightly_llvm() -> Result<(PathBuf, u32)> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major: u32 = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .context("rustc +nightly -vV printed no LLVM version")?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let lib = std::fs::read_dir(&lib_dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    Ok((lib, major))
}

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from)
}

/// The Python packages the tests run: `kubernetes-validate` (the deployment manifest's offline
/// schema check, with the Kubernetes API schemas bundled) and `prometheus-client` (the metrics
/// test's parser).
const PYTHON_PACKAGES: [(&str, &str); 2] = [
    ("kubernetes-validate", "kubernetes_validate"),
    ("prometheus-client", "prometheus_client"),
];

/// The virtual environment holding [`PYTHON_PACKAGES`].
fn venv_dir() -> PathBuf {
    home().join(".cache/flannel-ebpf/venv")
}

/// The venv's interpreter, which the tests get as `FLANNEL_VENV_PYTHON`.
pub fn venv_python() -> PathBuf {
    venv_dir().join("bin/python")
}

/// Makes the venv with Debian's python3 (its `venv` module from `python3-venv`) and installs
/// [`PYTHON_PACKAGES`] into it, unless they already import there.
fn ensure_python_venv() -> Result<()> {
    let python = venv_python();
    let modules = PYTHON_PACKAGES.map(|(_, m)| m).join(", ");
    let imports = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if imports(&python) {
        return Ok(());
    }
    ensure_packages(&["python3-venv"])?;
    let dir = venv_dir();
    let runs = Command::new(&python)
        .args(["-c", "pass"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !runs {
        // Missing, or made by a Python that is gone: (re)made from scratch.
        say(&format!(
            "making a Python venv at {} (the manifest and metrics tests' packages)",
            dir.display()
        ));
        sh(Command::new("/usr/bin/python3")
            .args(["-m", "venv", "--clear"])
            .arg(&dir))?;
    }
    let packages = PYTHON_PACKAGES.map(|(p, _)| p);
    say(&format!(
        "installing {} into the venv (from PyPI, once)",
        packages.join(" ")
    ));
    sh(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(packages))?;
    ensure!(
        imports(&python),
        "{} still cannot import {modules}",
        python.display()
    );
    Ok(())
}

fn ensure_bpf_linker() -> Result<()> {
    let (lib, major) = nightly_llvm()?;
    let lib_name = lib
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // One prefix per nightly libLLVM: a new nightly gets a freshly built linker.
    let prefix = home()
        .join(".cache/flannel-ebpf")
        .join(format!("bpf-linker-{lib_name}"));
    let built = prefix.join("bin/bpf-linker");
    let link = home().join(".cargo/bin/bpf-linker");
    if let Ok(meta) = std::fs::symlink_metadata(&link)
        && !meta.file_type().is_symlink()
    {
        say(&format!(
            "using the bpf-linker installed at {}",
            link.display()
        ));
        return Ok(());
    }
    let works = |p: &Path| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !works(&built) {
        say(&format!(
            "building bpf-linker against the nightly's LLVM {major} ({lib_name}); this takes a few minutes once"
        ));
        let lib_dir = prefix.join("lib");
        std::fs::create_dir_all(&lib_dir)?;
        for name in ["libLLVM.so", lib_name.as_str()] {
            let l = lib_dir.join(name);
            let _ = std::fs::remove_file(&l);
            std::os::unix::fs::symlink(&lib, &l)?;
        }
        sh(Command::new("cargo")
            .args([
                "+stable",
                "install",
                "bpf-linker",
                "--version",
                "=0.13.0",
                "--locked",
                "--no-default-features",
            ])
            .args(["--features", &format!("llvm-{major}")])
            .arg("--root")
            .arg(&prefix)
            .env("LLVM_PREFIX", &prefix))?;
        if !works(&built) {
            bail!("bpf-linker was built but does not run: {}", built.display());
        }
    }
    if std::fs::read_link(&link).ok().as_deref() != Some(built.as_path()) {
        say(&format!(
            "linking {} -> {}",
            link.display(),
            built.display()
        ));
        std::fs::create_dir_all(link.parent().unwrap_or(Path::new("/")))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&built, &link)?;
    }
    Ok(())
}
