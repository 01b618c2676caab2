//! `cargo xtask codegen`: regenerates the files the workspace derives from its code —
//! today weft's CustomResourceDefinitions in `deploy/crds/`, from `weft-api`'s types.
//! A unit test fails when the checked-in files drift from what this writes.

use std::path::Path;

use anyhow::Context as _;

use crate::cmd;

pub fn run() -> anyhow::Result<()> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?;
    let out = workspace.join("deploy").join("crds");
    cmd::run(
        cmd::cargo()
            .args([
                "run",
                "--quiet",
                "--package",
                "weft-controller",
                "--",
                "crds",
                "--out",
            ])
            .arg(&out),
    )
}
