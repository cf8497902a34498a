//! The deployment manifest, `Documentation/kube-flannel-ebpf.yml`, checked offline by
//! `tests/manifest/check_manifest.py`: every document against the Kubernetes API schemas that
//! `kubernetes-validate` bundles (strict), then the contract field by field. Needs the Python venv
//! `cargo xtask test` makes and names in `FLANNEL_VENV_PYTHON`.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, ensure};

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn manifest() -> PathBuf {
    repo_file("Documentation/kube-flannel-ebpf.yml")
}

/// Runs the checker on `manifest`: its exit status's success, and its output.
fn check(manifest: &Path) -> Result<(bool, String)> {
    let python = std::env::var_os("FLANNEL_VENV_PYTHON")
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow!(
                "FLANNEL_VENV_PYTHON is not set: run the manifest test through `cargo xtask test` \
                 (it makes the venv with kubernetes-validate)"
            )
        })?;
    ensure!(
        python.exists(),
        "FLANNEL_VENV_PYTHON={} does not exist",
        python.display()
    );
    let out = Command::new(&python)
        .arg(repo_file("tests/manifest/check_manifest.py"))
        .arg(manifest)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

#[test]
fn the_manifest_validates_and_keeps_its_contract() -> Result<()> {
    let (ok, output) = check(&manifest())?;
    println!("{output}");
    ensure!(ok, "the manifest check failed (its output is above)");
    Ok(())
}

/// The checker is not a rubber stamp: a copy with a capability dropped, the health port moved, an
/// unknown field and the node name from the wrong field fails, naming each.
#[test]
fn a_broken_manifest_fails_the_check() -> Result<()> {
    let text = std::fs::read_to_string(manifest())?;
    let breakages = [
        ("            - PERFMON\n", "", "capabilities"),
        ("--healthz-port=8081", "--healthz-port=8080", "args"),
        (
            "      hostNetwork: true\n",
            "      hostNetwork: true\n      hostNetwrok: true\n",
            "'hostNetwrok' was unexpected",
        ),
        (
            "fieldPath: spec.nodeName",
            "fieldPath: status.hostIP",
            "env NODE_NAME",
        ),
    ];
    let mut broken = text.clone();
    for (from, to, _) in breakages {
        ensure!(
            broken.contains(from),
            "the manifest no longer contains {from:?}"
        );
        broken = broken.replacen(from, to, 1);
    }
    let dir = std::env::temp_dir().join(format!("flannel-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("kube-flannel-ebpf.yml");
    std::fs::write(&copy, broken)?;
    let result = check(&copy);
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, output) = result?;
    println!("{output}");
    ensure!(
        !ok,
        "the checker passed a broken manifest (its output is above)"
    );
    for (_, _, reported) in breakages {
        ensure!(
            output
                .lines()
                .any(|l| l.starts_with("FAIL") && l.contains(reported)),
            "the checker did not report {reported:?} (its output is above)"
        );
    }
    Ok(())
}
