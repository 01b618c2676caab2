//! `cargo xtask test`: every check CI runs, in the order that fails fastest, closing
//! with one line that adds up every test run.

use std::{
    io::{BufRead as _, BufReader},
    process::Stdio,
};

use anyhow::{Context as _, bail};

use crate::{cmd, fuzz, setup};

/// How long the test run fuzzes each target.
const FUZZ_SECONDS: u64 = 5;

#[derive(Debug, clap::Args)]
pub struct Args {}

/// Tests passed and failed, summed over the `test result:` lines of cargo test runs.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
}

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
            &["test", "--package", "weft-e2e", "--no-fail-fast"],
        ),
    ];
    let mut tally = Tally::default();
    for (name, args) in steps {
        eprintln!("==> {name}: cargo {}", args.join(" "));
        run_and_tally(args, &mut tally).with_context(|| format!("{name} failed"))?;
    }
    eprintln!("==> fuzz targets, {FUZZ_SECONDS} s each: cargo +nightly fuzz run");
    fuzz::smoke(FUZZ_SECONDS).context("the fuzz smoke run failed")?;
    eprintln!("==> all checks passed");
    println!("tests: {} passed, {} failed", tally.passed, tally.failed);
    Ok(())
}

/// Runs `cargo args…`, echoing its stdout and adding its test results to `tally`.
fn run_and_tally(args: &[&str], tally: &mut Tally) -> anyhow::Result<()> {
    let mut command = cmd::cargo();
    command.args(args).stdout(Stdio::piped());
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let stdout = child.stdout.take().context("cargo's stdout is piped")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        println!("{line}");
        if let Some(result) = parse_test_result(&line) {
            tally.passed += result.passed;
            tally.failed += result.failed;
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}

/// Reads `test result: ok. 3 passed; 0 failed; 0 ignored; …`.
fn parse_test_result(line: &str) -> Option<Tally> {
    let counts = line.strip_prefix("test result: ")?.split_once(". ")?.1;
    let count = |what: &str| {
        counts
            .split("; ")
            .find_map(|part| part.strip_suffix(what)?.trim().parse().ok())
    };
    Some(Tally {
        passed: count(" passed")?,
        failed: count(" failed")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cargo_test_results() {
        let ok = "test result: ok. 6 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 2.35s";
        let failed = "test result: FAILED. 4 passed; 2 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.1s";
        assert_eq!(
            parse_test_result(ok),
            Some(Tally {
                passed: 6,
                failed: 0
            })
        );
        assert_eq!(
            parse_test_result(failed),
            Some(Tally {
                passed: 4,
                failed: 2
            })
        );
        assert_eq!(parse_test_result("test foo ... ok"), None);
    }
}
