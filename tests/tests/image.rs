//! The container image `cargo xtask image` builds, taken back out of its `docker load`-able
//! archive (`FLANNEL_IMAGE`) as a container runtime would: its run configuration, its root
//! filesystem, and the agent and tools in it running. Needs root (chroot, `umoci unpack`), and
//! Debian's `skopeo` and `umoci`; run through `cargo xtask test`.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

const ENTRYPOINT: &str = "/opt/bin/flanneld";

/// A scratch directory removed on drop, also when the test panics.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Result<Output> {
    let what = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    ensure!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_slice(&fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        .with_context(|| format!("parsing {}", path.display()))
}

fn blob(layout: &Path, digest: &Value) -> Result<Value> {
    let digest = digest.as_str().context("digest is not a string")?;
    let (algo, hex) = digest.split_once(':').context("digest without algorithm")?;
    read_json(&layout.join("blobs").join(algo).join(hex))
}

/// The image's configuration (`config` of the OCI image config) from an OCI layout's one image.
fn image_config(layout: &Path) -> Result<Value> {
    let index = read_json(&layout.join("index.json"))?;
    let manifests = index["manifests"]
        .as_array()
        .context("index.json: no manifests")?;
    ensure!(
        manifests.len() == 1,
        "expected one image, got {}",
        manifests.len()
    );
    let manifest = blob(layout, &manifests[0]["digest"])?;
    let config = blob(layout, &manifest["config"]["digest"])?;
    ensure!(
        config["os"] == "linux" && config["architecture"] == "amd64",
        "image is for {}/{}, not linux/amd64",
        config["os"],
        config["architecture"]
    );
    Ok(config["config"].clone())
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (`PT_INTERP`): a
/// dynamically linked executable does, a static one (also static-pie) does not.
fn elf_interpreter(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let elf = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(
        elf.len() > 64 && elf.starts_with(b"\x7fELF\x02\x01"),
        "{} is not a 64-bit little-endian ELF file",
        path.display()
    );
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let phoff = usize::try_from(u64::from_le_bytes(elf[0x20..0x28].try_into()?))?;
    let (phentsize, phnum) = (usize::from(u16_at(0x36)), usize::from(u16_at(0x38)));
    ensure!(
        phnum > 0 && phoff + phentsize * phnum <= elf.len(),
        "{}: bad program headers",
        path.display()
    );
    Ok((0..phnum).any(|i| {
        let o = phoff + i * phentsize;
        u32::from_le_bytes([elf[o], elf[o + 1], elf[o + 2], elf[o + 3]]) == PT_INTERP
    }))
}

/// Runs `args` inside `rootfs` (chroot): the root filesystem alone must carry what they need.
fn in_rootfs(rootfs: &Path, args: &[&str]) -> Result<String> {
    run(Command::new("chroot").arg(rootfs).args(args))
        .map(|o| stdout(&o))
        .with_context(|| format!("{} does not run inside the image", args[0]))
}

#[test]
fn image() -> Result<()> {
    let Some(archive) = std::env::var_os("FLANNEL_IMAGE").map(PathBuf::from) else {
        bail!(
            "FLANNEL_IMAGE (the image archive `cargo xtask image` writes, target/image/flannel-agent.tar) is not set: run the tests through `cargo xtask test`"
        );
    };
    ensure!(
        archive.is_file(),
        "FLANNEL_IMAGE={}: no such file (`cargo xtask image` builds it)",
        archive.display()
    );
    ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the image test unpacks the image and runs its tools in a chroot: run as root"
    );
    let scratch = Scratch(std::env::temp_dir().join(format!("fe-{}-image", std::process::id())));
    let _ = fs::remove_dir_all(&scratch.0);
    fs::create_dir_all(&scratch.0)?;
    let layout = scratch.0.join("layout");
    let bundle = scratch.0.join("bundle");

    // As `docker load` would read it; then unpacked to a runtime bundle as a runtime would.
    run(Command::new("skopeo")
        .arg("copy")
        .arg(format!("docker-archive:{}", archive.display()))
        .arg(format!("oci:{}:t", layout.display())))?;
    let config = image_config(&layout)?;
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:t", layout.display()))
        .arg(&bundle))?;
    let rootfs = bundle.join("rootfs");
    let version = check_config(&config, &read_json(&bundle.join("config.json"))?)?;
    check_rootfs(&rootfs)?;
    check_runs(&rootfs, &version)
}

/// The image's run configuration and the runtime bundle made from it; returns the version label.
fn check_config(config: &Value, runtime: &Value) -> Result<String> {
    // The run configuration: kube-flannel.yml's `command: ["/opt/bin/flanneld"]` is the image's
    // own entrypoint, run as root, with the tools on PATH.
    ensure!(
        config["Entrypoint"] == serde_json::json!([ENTRYPOINT]),
        "entrypoint is {}, not [{ENTRYPOINT:?}]",
        config["Entrypoint"]
    );
    ensure!(
        config["Cmd"].as_array().is_none_or(Vec::is_empty),
        "unexpected Cmd {}",
        config["Cmd"]
    );
    ensure!(
        config["User"] == "0:0" || config["User"] == "0",
        "user is {}, not 0:0",
        config["User"]
    );
    let env: Vec<&str> = config["Env"]
        .as_array()
        .context("image config: no Env")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        env.iter().any(|e| e.strip_prefix("PATH=").is_some_and(|p| {
            p.split(':').any(|d| d == "/usr/sbin") && p.split(':').any(|d| d == "/usr/bin")
        })),
        "PATH in {env:?} misses /usr/sbin or /usr/bin (where iptables, nft and wireguard-go are)"
    );
    let labels = &config["Labels"];
    let label = |k: &str| -> Result<&str> {
        labels[k]
            .as_str()
            .with_context(|| format!("label {k} missing in {labels}"))
    };
    ensure!(label("org.opencontainers.image.title")? == "flannel-agent");
    ensure!(label("org.opencontainers.image.licenses")? == "Apache-2.0");
    let version = label("org.opencontainers.image.version")?;

    // The runtime bundle agrees with the image configuration.
    ensure!(
        runtime["process"]["args"] == serde_json::json!([ENTRYPOINT]),
        "bundle process.args is {}",
        runtime["process"]["args"]
    );
    ensure!(
        runtime["process"]["user"]["uid"] == 0 && runtime["process"]["user"]["gid"] == 0,
        "bundle process.user is {}",
        runtime["process"]["user"]
    );
    ensure!(
        runtime["annotations"]["org.opencontainers.image.title"] == "flannel-agent",
        "bundle annotations lack the image's labels: {}",
        runtime["annotations"]
    );
    Ok(version.to_owned())
}

fn check_rootfs(rootfs: &Path) -> Result<()> {
    // The root filesystem: the static agent at flanneld's path and its own, the tools it runs.
    let agent = rootfs.join(ENTRYPOINT.trim_start_matches('/'));
    for bin in [agent.clone(), rootfs.join("usr/local/bin/flannel-agent")] {
        let meta = fs::metadata(&bin).with_context(|| format!("{} missing", bin.display()))?;
        ensure!(
            meta.is_file() && meta.permissions().mode() & 0o111 == 0o111,
            "{} is not an executable file",
            bin.display()
        );
        ensure!(
            !elf_interpreter(&bin)?,
            "{} is dynamically linked (it has a PT_INTERP program header); the image's agent must be static",
            bin.display()
        );
    }
    ensure!(
        fs::read(&agent)? == fs::read(rootfs.join("usr/local/bin/flannel-agent"))?,
        "/opt/bin/flanneld and /usr/local/bin/flannel-agent differ"
    );
    for tool in [
        "usr/sbin/iptables",
        "usr/sbin/iptables-restore",
        "usr/sbin/iptables-save",
        "usr/sbin/nft",
        "usr/bin/wireguard-go",
        "bin/cp",
    ] {
        let p = rootfs.join(tool);
        ensure!(
            fs::symlink_metadata(&p).is_ok(),
            "/{tool} missing from the image"
        );
    }
    for dir in ["run", "tmp"] {
        ensure!(rootfs.join(dir).is_dir(), "/{dir} missing from the image");
    }
    ensure!(
        fs::metadata(rootfs.join("tmp"))?.permissions().mode() & 0o7777 == 0o1777,
        "/tmp is not mode 1777"
    );
    Ok(())
}

fn check_runs(rootfs: &Path, version: &str) -> Result<()> {
    let agent = rootfs.join(ENTRYPOINT.trim_start_matches('/'));
    // The agent taken out of the image runs, here and inside its root filesystem.
    let v = stdout(&run(Command::new(&agent).arg("--version"))?);
    ensure!(
        v.trim() == format!("flannel-agent {version}"),
        "{ENTRYPOINT} --version printed {v:?}, the image is labelled {version}"
    );
    let help = stdout(&run(Command::new(&agent).arg("--help"))?);
    ensure!(
        help.contains("Usage:") && help.contains("--iface") && help.contains("--ip-masq"),
        "{ENTRYPOINT} --help printed no usage:\n{help}"
    );
    let v = in_rootfs(rootfs, &[ENTRYPOINT, "--version"])?;
    ensure!(v.contains(version), "chroot {ENTRYPOINT} --version: {v:?}");

    // The tools the agent execs run inside the image, iptables in its nf_tables variant (what
    // the postinst's alternatives would choose).
    for (args, expect) in [
        (&["/usr/sbin/iptables", "--version"][..], "(nf_tables)"),
        (&["/usr/sbin/iptables-restore", "--version"], "(nf_tables)"),
        (&["/usr/sbin/iptables-save", "--version"], "(nf_tables)"),
        (&["/usr/sbin/nft", "--version"], "nftables v"),
        (&["/usr/bin/wireguard-go", "--version"], "wireguard-go v"),
    ] {
        let out = in_rootfs(rootfs, args)?;
        ensure!(
            out.contains(expect),
            "chroot {} printed {out:?}, expected {expect:?}",
            args.join(" ")
        );
    }
    // kube-flannel.yml's install-cni init container runs `cp` in this image.
    fs::write(rootfs.join("tmp/cni-conf.json"), "{}")?;
    in_rootfs(
        rootfs,
        &[
            "/bin/cp",
            "-f",
            "/tmp/cni-conf.json",
            "/run/10-flannel.conflist",
        ],
    )?;
    ensure!(fs::read_to_string(rootfs.join("run/10-flannel.conflist"))? == "{}");
    Ok(())
}
