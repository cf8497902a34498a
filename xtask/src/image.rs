//! `cargo xtask image`: the agent's container image, built without a registry or a container
//! daemon. A static (musl) agent, a root filesystem of Debian packages unpacked with `dpkg-deb`,
//! an OCI layout made with `umoci`, and a `docker load`-able archive made with `skopeo`, all in
//! `target/image/`. The root `Containerfile` builds the same layout with a container engine.
use std::{
    fs,
    os::unix::fs::{PermissionsExt as _, symlink},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    bootstrap::{self, say, sh},
    cargo_release, target_dir, workspace_root,
};

/// The image's name in the archive (`docker load` tags it `flannel-agent:<version>`).
const NAME: &str = "flannel-agent";
/// flanneld's path: kube-flannel.yml starts the container with `command: ["/opt/bin/flanneld"]`.
const ENTRYPOINT: &str = "/opt/bin/flanneld";
/// What the agent execs, each with its dependencies: the masquerade/forward-rule fallback
/// (`iptables`, `iptables-restore`; `nft`), the wireguard backend's `wireguard-go`, and
/// busybox for the `cp` that kube-flannel.yml's `install-cni` init container runs in this image.
const ROOT_PACKAGES: [&str; 4] = ["iptables", "nftables", "wireguard-go", "busybox-static"];
/// The alternatives the iptables package's postinst would point at the `nf_tables` variant.
const IPTABLES_ALTERNATIVES: [&str; 6] = [
    "iptables",
    "iptables-restore",
    "iptables-save",
    "ip6tables",
    "ip6tables-restore",
    "ip6tables-save",
];
/// busybox applets linked into `/bin` (what kube-flannel.yml and debugging need).
const BUSYBOX_APPLETS: [&str; 2] = ["cp", "sh"];
/// Unused at run time; dropped to keep the image small (the packages' copyright files stay).
const TRIM: [&str; 5] = [
    "usr/lib/x86_64-linux-gnu/gconv",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
];
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `cargo xtask image`: the bootstrap, then [`build`].
pub fn command() -> Result<()> {
    bootstrap::ensure_all()?;
    build().map(drop)
}

/// Builds the image (after the bootstrap, which builds the eBPF object's toolchain); returns
/// the `docker load`-able archive.
pub fn build() -> Result<PathBuf> {
    bootstrap::ensure_image_tools()?;
    let dir = target_dir().join("image");
    fs::create_dir_all(&dir)?;
    let agent = static_agent()?;
    let version = agent_version(&agent)?;

    let root = dir.join("rootfs");
    build_rootfs(&root, &dir.join("debs"), &agent)?;
    check_rootfs(&root)?;

    let layout = dir.join("oci");
    build_layout(&layout, &root, &version)?;
    let archive = dir.join(format!("{NAME}.tar"));
    say(&format!("exporting {NAME}:{version} as a docker archive"));
    if archive.exists() {
        fs::remove_file(&archive)?;
    }
    sh(Command::new("skopeo")
        .arg("copy")
        .arg(format!("oci:{}:{version}", layout.display()))
        .arg(format!(
            "docker-archive:{}:{NAME}:{version}",
            archive.display()
        )))?;

    println!("\nImage {NAME}:{version} (entrypoint {ENTRYPOINT}):");
    println!(
        "  docker archive  {}  {}   (docker load -i / podman load -i)",
        archive.display(),
        human(fs::metadata(&archive)?.len())
    );
    println!(
        "  OCI layout      {}:{version}  {}",
        layout.display(),
        human(du(&layout)?)
    );
    println!(
        "  root filesystem {}  {}",
        root.display(),
        human(du(&root)?)
    );
    println!(
        "  static agent    {}  {}",
        agent.display(),
        human(fs::metadata(&agent)?.len())
    );
    Ok(archive)
}

/// The static agent (`cargo build --release --target x86_64-unknown-linux-musl`; its eBPF object
/// is built by build.rs as for any build), which the image ships and the demo and the bench run.
/// ring's C code is compiled with Debian's `musl-gcc`.
pub fn static_agent() -> Result<PathBuf> {
    bootstrap::ensure_release_target()?;
    say("building a static flannel-agent (release, musl) and its eBPF programs");
    sh(cargo_release("build").args(["-p", "flannel-agent"]))?;
    let bin = target_dir()
        .join(crate::RELEASE_TARGET)
        .join("release/flannel-agent");
    ensure!(bin.exists(), "{} was not built", bin.display());
    bin.canonicalize().context("agent path")
}

/// The version `--version` prints (`flannel-agent 0.1.0`): the image's tag and version label.
fn agent_version(agent: &Path) -> Result<String> {
    let out = Command::new(agent)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", agent.display()))?;
    ensure!(
        out.status.success(),
        "{} --version failed ({})",
        agent.display(),
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .context("flannel-agent --version printed no version")
}

/// The packages to unpack: `roots` and their dependencies, recursively (Depends and
/// Pre-Depends), without the Essential ones (a base system's, which the tools do not need).
fn package_closure(roots: &[&str]) -> Result<Vec<String>> {
    let out = Command::new("apt-cache")
        .args([
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
        ])
        .args(roots)
        .output()
        .context("running apt-cache depends")?;
    ensure!(
        out.status.success(),
        "apt-cache depends failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut packages: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        // Package lines are unindented; virtual packages are printed as `<name>`.
        .filter(|l| !l.starts_with([' ', '<']) && !l.is_empty())
        .map(str::to_owned)
        .collect();
    packages.sort();
    packages.dedup();
    let mut kept = Vec::new();
    for p in packages {
        let show = Command::new("apt-cache")
            .args(["show", "--no-all-versions", &p])
            .output()
            .with_context(|| format!("running apt-cache show {p}"))?;
        if String::from_utf8_lossy(&show.stdout)
            .lines()
            .any(|l| l == "Essential: yes")
        {
            say(&format!(
                "leaving out {p} (Essential: part of a base system)"
            ));
        } else {
            kept.push(p);
        }
    }
    Ok(kept)
}

fn apt_download(packages: &[String], debs: &Path) -> Result<()> {
    let download = || {
        sh(Command::new("apt-get")
            .current_dir(debs)
            // Downloading into a directory _apt cannot write to: no sandbox user (we are root).
            .args(["-qq", "-o", "APT::Sandbox::User=root", "download"])
            .args(packages))
    };
    if download().is_err() {
        say("apt-get download failed; refreshing the package lists and retrying");
        sh(Command::new("apt-get").args(["update", "-qq"]))?;
        download()?;
    }
    Ok(())
}

/// The root filesystem: the Debian packages unpacked as dpkg would, the links their maintainer
/// scripts would make, the agent, and the directories a runtime expects.
fn build_rootfs(root: &Path, debs: &Path, agent: &Path) -> Result<()> {
    let packages = package_closure(&ROOT_PACKAGES)?;
    say(&format!(
        "root filesystem {}: unpacking Debian packages {}",
        root.display(),
        packages.join(" ")
    ));
    for d in [root, debs] {
        if d.exists() {
            fs::remove_dir_all(d).with_context(|| format!("removing {}", d.display()))?;
        }
        fs::create_dir_all(d)?;
    }
    apt_download(&packages, debs)?;
    let mut files: Vec<PathBuf> = fs::read_dir(debs)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    files.sort();
    ensure!(
        files.len() == packages.len(),
        "apt-get download left {} .deb files for {} packages in {}",
        files.len(),
        packages.len(),
        debs.display()
    );
    for deb in &files {
        sh(Command::new("dpkg-deb").arg("-x").arg(deb).arg(root))?;
    }

    say(
        "linking iptables, iptables-restore, iptables-save (and ip6tables*) to xtables-nft-multi, as update-alternatives would",
    );
    let sbin = root.join("usr/sbin");
    ensure!(
        sbin.join("xtables-nft-multi").exists(),
        "the iptables package left no usr/sbin/xtables-nft-multi"
    );
    for name in IPTABLES_ALTERNATIVES {
        symlink("xtables-nft-multi", sbin.join(name))?;
    }
    say(&format!(
        "linking /bin/{} to busybox",
        BUSYBOX_APPLETS.join(", /bin/")
    ));
    for name in BUSYBOX_APPLETS {
        let link = root.join("bin").join(name);
        if !link.exists() {
            symlink("busybox", link)?;
        }
    }

    say(&format!(
        "installing the agent as {ENTRYPOINT} and /usr/local/bin/flannel-agent"
    ));
    for dest in [ENTRYPOINT, "/usr/local/bin/flannel-agent"] {
        let dest = root.join(dest.trim_start_matches('/'));
        fs::create_dir_all(dest.parent().context("agent destination")?)?;
        fs::copy(agent, &dest)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o755))?;
    }
    fs::create_dir_all(root.join("run"))?;
    fs::create_dir_all(root.join("tmp"))?;
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    // The agent writes its subnet file to /run/flannel (kube-flannel.yml mounts it there).
    fs::create_dir_all(root.join("run/flannel"))?;

    say(&format!("trimming {}", TRIM.join(" ")));
    for t in TRIM {
        let p = root.join(t);
        if p.exists() {
            fs::remove_dir_all(&p)?;
        }
    }
    Ok(())
}

/// Runs the tools inside the root filesystem: every shared library resolves there, and they run.
fn check_rootfs(root: &Path) -> Result<()> {
    say("checking the root filesystem (chroot): libraries resolve, the tools run");
    for bin in ["/usr/sbin/xtables-nft-multi", "/usr/sbin/nft"] {
        let out = Command::new("chroot")
            .arg(root)
            .args(["/lib64/ld-linux-x86-64.so.2", "--list", bin])
            .output()
            .context("running chroot")?;
        let listing = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || listing.contains("not found") {
            bail!(
                "{bin} in {} misses shared libraries:\n{listing}{}",
                root.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    for args in [
        &["/usr/sbin/iptables", "--version"][..],
        &["/usr/sbin/iptables-restore", "--version"],
        &["/usr/sbin/nft", "--version"],
        &["/usr/bin/wireguard-go", "--version"],
        &[ENTRYPOINT, "--version"],
    ] {
        let out = Command::new("chroot")
            .arg(root)
            .args(args)
            .output()
            .context("running chroot")?;
        ensure!(
            out.status.success(),
            "chroot {} {} failed ({}): {}",
            root.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let first = String::from_utf8_lossy(&out.stdout);
        say(&format!(
            "  {}: {}",
            args[0],
            first.lines().next().unwrap_or_default()
        ));
    }
    Ok(())
}

/// The OCI layout: one layer holding the root filesystem, and the run configuration.
fn build_layout(layout: &Path, root: &Path, version: &str) -> Result<()> {
    say(&format!(
        "OCI layout {}: {NAME}:{version}",
        layout.display()
    ));
    if layout.exists() {
        fs::remove_dir_all(layout)?;
    }
    let image = format!("{}:{version}", layout.display());
    sh(Command::new("umoci").args(["init", "--layout"]).arg(layout))?;
    sh(Command::new("umoci").args(["new", "--image", &image]))?;
    sh(Command::new("umoci")
        .args(["insert", "--image", &image])
        .arg(root)
        .arg("/"))?;
    let mut labels = vec![
        format!("org.opencontainers.image.title={NAME}"),
        "org.opencontainers.image.description=flanneld-compatible node agent with an eBPF dataplane"
            .to_owned(),
        format!("org.opencontainers.image.version={version}"),
        "org.opencontainers.image.licenses=Apache-2.0".to_owned(),
    ];
    if let Ok(out) = Command::new("git")
        .current_dir(workspace_root())
        .args(["rev-parse", "HEAD"])
        .output()
        && out.status.success()
    {
        labels.push(format!(
            "org.opencontainers.image.revision={}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    let mut config = Command::new("umoci");
    config.args([
        "config",
        "--image",
        &image,
        "--config.entrypoint",
        ENTRYPOINT,
        "--config.user",
        "0:0",
        "--config.workingdir",
        "/",
        "--config.env",
        PATH_ENV,
        "--os",
        "linux",
        "--architecture",
        "amd64",
    ]);
    for l in &labels {
        config.args(["--config.label", l]);
    }
    sh(&mut config)?;
    // Drops the blobs of the intermediate manifests and configs.
    sh(Command::new("umoci").args(["gc", "--layout"]).arg(layout))
}

fn du(path: &Path) -> Result<u64> {
    let meta = fs::symlink_metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for e in fs::read_dir(path)? {
        total += du(&e?.path())?;
    }
    Ok(total)
}

#[expect(
    clippy::cast_precision_loss,
    reason = "a size for people to read, to one decimal"
)]
fn human(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
