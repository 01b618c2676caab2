//! weft's project tasks, run as `cargo xtask <task>`: install prerequisites, run the
//! tests, drive the local cluster, run the demo and the benchmarks, regenerate derived
//! files.

mod bench;
mod closed_pipe;
mod cluster;
mod cmd;
mod codegen;
mod demo;
mod fuzz;
mod image;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "weft's project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install every prerequisite (Debian packages, nightly rust-src, bpf-linker, bpffs).
    Setup,
    /// Regenerate derived files (the CRDs, deploy/install.yaml, the PrometheusRule).
    Codegen,
    /// Run every check CI runs: fmt, clippy, unit tests, privileged end-to-end tests,
    /// and a few seconds of each fuzz target.
    Test(test::Args),
    /// Run a fuzz target (fuzz/fuzz_targets/) until it crashes, Ctrl-C or `--seconds`.
    Fuzz(fuzz::Args),
    /// Bring up a local cluster with sample workloads and show what runs.
    Demo(demo::Args),
    /// Measure weft against direct TCP and a reference mTLS proxy pair (release build,
    /// 2-node local cluster; about 9 minutes, `--quick` under 2).
    Bench(bench::Args),
    /// Run a 2-node local cluster under a long load with churn (pods, policies,
    /// certificates) and chart the agents' memory and file descriptors (release build;
    /// about 20 minutes for 10^6 connections and 10^7 requests).
    Soak(soak::Args),
    /// Build the OCI images of the agent and the controller from release binaries
    /// (target/images/), and check that they run.
    Image,
    /// Manage local clusters (network namespaces and cgroups on this machine).
    Cluster {
        #[command(subcommand)]
        command: cluster::Command,
    },
}

fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let task = Cli::parse().task;
    closed_pipe::quietly(|| match task {
        Task::Setup => setup::setup(),
        Task::Codegen => codegen::run(),
        Task::Test(args) => test::run(args),
        Task::Fuzz(args) => fuzz::run(args),
        Task::Demo(args) => demo::run(args),
        Task::Bench(args) => bench::run(args),
        Task::Soak(args) => soak::run(args),
        Task::Image => image::run(),
        Task::Cluster { command } => cluster::run(command),
    })
}
