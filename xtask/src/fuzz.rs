//! `cargo xtask fuzz TARGET`: runs one of the fuzz targets in `fuzz/` (cargo-fuzz on
//! the nightly toolchain) for as long as asked, growing its corpus in
//! `fuzz/corpus/TARGET` and leaving what crashes it in `fuzz/artifacts/TARGET`; and
//! the smoke run of every target that `cargo xtask test` makes ([`smoke`]).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cmd, setup};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The target: a file of fuzz/fuzz_targets/ without `.rs`.
    target: String,
    /// Stop after this many seconds (by default: at the first crash, or Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Fuzzing processes to run side by side.
    #[arg(long, default_value_t = 1)]
    jobs: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::ensure()?;
    let fuzz = fuzz_dir()?;
    if !targets(&fuzz)?.contains(&args.target) {
        bail!(
            "no fuzz target {:?}; the targets are: {}",
            args.target,
            targets(&fuzz)?.join(", ")
        );
    }
    let corpus = fuzz.join("corpus").join(&args.target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("cannot make the corpus {}", corpus.display()))?;
    // More than one job runs in processes of their own, logging to fuzz/fuzz-N.log.
    let mut options = if args.jobs > 1 {
        vec![
            format!("-jobs={}", args.jobs),
            format!("-workers={}", args.jobs),
        ]
    } else {
        Vec::new()
    };
    if let Some(seconds) = args.seconds {
        options.push(format!("-max_total_time={seconds}"));
    }
    cmd::run(&mut fuzz_run(&fuzz, &args.target, &[&corpus], &options))
}

/// Builds every target, then runs each for `seconds` on a copy of its corpus (so that
/// a smoke run leaves the repository as it was): what a test run checks, that each
/// target builds and its seeds and a few seconds of mutations find nothing. Returns
/// each target's executions.
pub fn smoke(seconds: u64) -> anyhow::Result<Vec<(String, u64)>> {
    let fuzz = fuzz_dir()?;
    cmd::run(
        nightly_fuzz(&fuzz)
            .args(["build", "--sanitizer", "none"])
            .args(["--fuzz-dir"])
            .arg(&fuzz),
    )
    .context("building the fuzz targets")?;
    let mut executions = Vec::new();
    for target in targets(&fuzz)? {
        let scratch = tempfile::tempdir().context("cannot make a scratch corpus")?;
        let seeds = fuzz.join("corpus").join(&target);
        let options = [
            format!("-max_total_time={seconds}"),
            format!("-artifact_prefix={}/", scratch.path().display()),
        ];
        let output = fuzz_run(&fuzz, &target, &[scratch.path(), &seeds], &options)
            .output()
            .with_context(|| format!("cannot run fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            bail!("fuzz target {target} failed:\n{}", tail(&log, 40));
        }
        let runs = executions_in(&log).with_context(|| {
            format!(
                "fuzz target {target} reported no run count:\n{}",
                tail(&log, 20)
            )
        })?;
        eprintln!("    {target}: {runs} executions in {seconds} s, no crash");
        executions.push((target, runs));
    }
    Ok(executions)
}

/// `cargo +nightly fuzz run` of `target` on `corpora` (the first one grows), with
/// libFuzzer `options`. Without sanitizers: the targets are safe Rust, and a run
/// makes several times the executions.
fn fuzz_run(fuzz: &Path, target: &str, corpora: &[&Path], options: &[String]) -> Command {
    let mut command = nightly_fuzz(fuzz);
    command
        .args(["run", "--sanitizer", "none", "--fuzz-dir"])
        .arg(fuzz)
        .arg(target)
        .args(corpora)
        .arg("--")
        .args(options);
    command
}

/// `cargo +nightly fuzz` (cargo-fuzz needs the nightly compiler's instrumentation).
fn nightly_fuzz(fuzz: &Path) -> Command {
    let mut command = Command::new("cargo");
    command.args(["+nightly", "fuzz"]).current_dir(fuzz);
    // Set by the cargo that runs xtask, for its own toolchain.
    command.env_remove("RUSTUP_TOOLCHAIN");
    command
}

fn fuzz_dir() -> anyhow::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?;
    Ok(workspace.join("fuzz"))
}

/// The fuzz targets, by name.
fn targets(fuzz: &Path) -> anyhow::Result<Vec<String>> {
    let dir = fuzz.join("fuzz_targets");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "rs").then(|| path.file_stem()?.to_str().map(str::to_owned))?
        })
        .collect();
    names.sort();
    Ok(names)
}

/// The executions libFuzzer reports at the end of a run (`Done 123 runs in 5 second(s)`).
fn executions_in(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|line| {
        line.strip_prefix("Done ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_executions_of_a_finished_run() {
        let log = "INFO: Seed: 1\n#1024\tpulse  cov: 10\nDone 123456 runs in 6 second(s)\n";
        assert_eq!(executions_in(log), Some(123_456));
        assert_eq!(
            executions_in("==1== ERROR: libFuzzer: deadly signal\n"),
            None
        );
    }
}
