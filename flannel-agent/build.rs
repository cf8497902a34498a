//! Builds the eBPF programs with aya-build (nightly, bpf-linker) and leaves the object in `OUT_DIR`,
//! where the agent embeds it. `AYA_BUILD_SKIP=1` skips it for cheap `cargo check`/clippy runs.
use std::path::Path;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir)
        .join("../flannel-ebpf")
        .canonicalize()?;
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed=../flannel-ebpf-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "flannel-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
