//! Running child processes from tasks, with the command line in every error.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Runs `command` with inherited stdio; a non-zero exit is an error.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Runs `command` and returns its stdout; a non-zero exit is an error with its stderr.
pub fn capture(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `cargo` as invoked by the outer `cargo xtask`, so the same toolchain builds everything.
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Builds the binaries of `packages` with the profile of the running xtask, so that
/// they land beside it (see `cluster::workspace_binaries`).
pub fn build_binaries(packages: &[&str]) -> anyhow::Result<()> {
    let mut command = cargo();
    command.args(["build", "--quiet", "--bins"]);
    for package in packages {
        command.args(["--package", package]);
    }
    let exe = std::env::current_exe().context("cannot locate the xtask binary")?;
    if exe.parent().and_then(|dir| dir.file_name()) == Some("release".as_ref()) {
        command.arg("--release");
    }
    run(&mut command)
}

/// Builds the release binaries of the agent and of `others`. The agent builds on its
/// own: built with the controller, it would get the features the controller's
/// dependencies ask of shared crates, among them `tracing`'s `log`, which sends every
/// span of h2 through the `log` crate (7 % more instructions per proxied request, with
/// the debug logging of the local cluster).
pub fn build_release(others: &[&str]) -> anyhow::Result<()> {
    for packages in [&["weft-agent"][..], others] {
        let mut command = cargo();
        command.args(["build", "--quiet", "--release", "--bins"]);
        for package in packages {
            command.args(["--package", package]);
        }
        run(&mut command)?;
    }
    Ok(())
}

/// The cargo target directory this xtask was built into (`<target>/<profile>/xtask`).
pub fn target_dir() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the xtask binary")?;
    exe.parent()
        .and_then(std::path::Path::parent)
        .map(std::path::Path::to_owned)
        .context("the xtask binary is not in a cargo target directory")
}
