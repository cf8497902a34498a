//! Builds the eBPF programs with aya-build (nightly, bpf-linker) and leaves the object in `OUT_DIR`,
//! where the agent embeds it.
use std::{
    env, fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .join("../flannel-ebpf")
        .canonicalize()?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed=../flannel-ebpf-common/src");
    // Held until the object is copied to OUT_DIR (after cargo's own lock on the shared
    // directory is released): another build of another checkout sharing the target directory
    // cannot put its object there in between.
    let _shared = share_ebpf_target_dir("flannel-ebpf")
        .inspect_err(|e| {
            // Only slower: aya-build's own directory is used.
            println!("cargo:warning=the eBPF build is not shared between profiles: {e:#}");
        })
        .ok()
        .flatten();
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "flannel-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}

/// aya-build gives every run of this script its own cargo target directory for the eBPF crate
/// (`OUT_DIR/aya-build/target/<package>`), and every profile and target of the agent (debug,
/// test, release, the image's musl, the bench's) its own `OUT_DIR`: the same `bpfel` object,
/// `core` included, was built from scratch once for each, about a minute apiece. That directory
/// becomes a link to one `<target dir>/ebpf`, so the object is built once and every later build
/// finds it fresh; a source change rebuilds what changed. Returns the shared directory's lock,
/// held exclusively. Where `OUT_DIR` is not laid out as cargo's
/// `<target>[/<triple>]/<profile>/build/<pkg>-<hash>/out` (`None`), or the link cannot be made
/// (`Err`, the link removed), aya-build's own directory is used.
fn share_ebpf_target_dir(package: &str) -> anyhow::Result<Option<fs::File>> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let link = out_dir.join("aya-build").join("target").join(package);
    let Some(shared) = shared_dir(&out_dir) else {
        return Ok(None);
    };
    link_to(&link, &shared)
        .and_then(|()| {
            let lock = fs::File::create(shared.join(".flannel-agent-build.lock"))?;
            lock.lock()?;
            Ok(Some(lock))
        })
        .inspect_err(|_| {
            if fs::symlink_metadata(&link).is_ok_and(|m| m.file_type().is_symlink()) {
                let _ = fs::remove_file(&link);
            }
        })
}

/// `<target dir>/ebpf` for a build script's `OUT_DIR`, if laid out as cargo lays it out.
fn shared_dir(out_dir: &Path) -> Option<PathBuf> {
    let mut up = out_dir.ancestors();
    let (Some(_out), Some(_unit), Some(build), Some(profile)) =
        (up.next(), up.next(), up.next(), up.next())
    else {
        return None;
    };
    if build.file_name().is_none_or(|n| n != "build") {
        return None;
    }
    let mut target = profile.parent()?;
    if let (Some(name), Some(triple)) = (target.file_name(), env::var_os("TARGET"))
        && name == triple
        && let Some(parent) = target.parent()
    {
        target = parent;
    }
    Some(target.join("ebpf"))
}

/// Makes `link` a symlink to the directory `shared` (made if missing), replacing whatever is
/// there.
fn link_to(link: &Path, shared: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(shared).with_context(|| format!("creating {}", shared.display()))?;
    if fs::read_link(link).is_ok_and(|to| to == shared) {
        return Ok(());
    }
    match fs::symlink_metadata(link) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(link),
        Ok(_) => fs::remove_file(link),
        Err(_) => Ok(()),
    }
    .with_context(|| format!("replacing {}", link.display()))?;
    if let Some(parent) = link.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::os::unix::fs::symlink(shared, link)
        .with_context(|| format!("linking {} to {}", link.display(), shared.display()))
}
