//! Builds the kernel programs (`ebpf/programs`) for `bpfel-unknown-none` with the
//! nightly toolchain and bpf-linker, and leaves the object in `OUT_DIR` for the loader
//! to embed. `cargo xtask setup` installs what this needs.

use std::path::Path;

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/programs");
    let root_dir = root_dir
        .to_str()
        .context("the workspace path is not valid UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "weft-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the kernel programs failed; run `cargo xtask setup` to install the nightly rust-src and bpf-linker")
}
