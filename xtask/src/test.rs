//! `cargo xtask test`: every check CI runs, in the order that fails fastest.

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(Args {}: Args) -> anyhow::Result<()> {
    setup::ensure()?;
    if !weft_cluster::is_root() {
        bail!(
            "the end-to-end tests load kernel programs and create network namespaces, so they need root: run `sudo -E cargo xtask test`"
        );
    }
    let steps: [(&str, &[&str]); 5] = [
        ("format", &["fmt", "--all", "--", "--check"]),
        (
            "lints",
            &[
                "clippy",
                "--workspace",
                "--exclude",
                "weft-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        (
            "unit tests",
            &[
                "test",
                "--workspace",
                "--exclude",
                "weft-ebpf",
                "--exclude",
                "weft-e2e",
            ],
        ),
        // The end-to-end tests run the workspace's binaries inside pods.
        (
            "binaries",
            &["build", "--workspace", "--exclude", "weft-ebpf", "--bins"],
        ),
        (
            "privileged end-to-end tests",
            &["test", "--package", "weft-e2e"],
        ),
    ];
    for (name, args) in steps {
        eprintln!("==> {name}: cargo {}", args.join(" "));
        cmd::run(cmd::cargo().args(args)).with_context(|| format!("{name} failed"))?;
    }
    eprintln!("==> all checks passed");
    Ok(())
}
