//! The command line: arguments, and what each command does with them.

use std::{
    io::{self, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::SystemTime,
};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::{
    analyze, certs, check, config, explain, install,
    kubernetes::Kubernetes,
    local::LocalCluster,
    mesh::{Mesh, Snapshot},
    observe,
    output::{Format, Report},
    status,
};

#[derive(Debug, Parser)]
#[command(
    name = "weftctl",
    version,
    about = "Check, inspect and explain a weft mesh",
    after_help = "As a kubectl plugin: kubectl weft <COMMAND>."
)]
struct Cli {
    #[command(flatten)]
    target: Target,
    /// How to print: a table for people, JSON or YAML for scripts.
    #[arg(short, long, global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

/// Which mesh to read.
#[derive(Debug, clap::Args)]
struct Target {
    /// The local cluster to read (`cargo xtask cluster up --name NAME`) instead of a
    /// Kubernetes cluster.
    #[arg(long, global = true, env = "WEFTCTL_LOCAL", value_name = "NAME")]
    local: Option<String>,
    /// The kubeconfig to read (else $KUBECONFIG, ~/.kube/config, or the pod's service
    /// account).
    #[arg(long, global = true, value_name = "FILE", conflicts_with = "local")]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (else the current one).
    #[arg(long, global = true, value_name = "NAME", conflicts_with = "local")]
    context: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Whether the mesh is healthy: the controller answers and its CA signs, every
    /// agent is ready and serves the current configuration, certificates are valid and
    /// not near expiry, objects are accepted. Exits 1 when a check fails. With
    /// `--pre`: whether this machine can run weft (kernel, BTF, cgroup v2, bpffs), or
    /// with --kubeconfig/--context, each node of that cluster (Linux, kernel).
    Check {
        /// Check before installing (this machine, or the named cluster's nodes) instead of
        /// a running mesh.
        #[arg(long)]
        pre: bool,
    },
    /// One screen: nodes and their agents, configuration versions, meshed pods per
    /// namespace and mode, certificates near expiry, kernel drops.
    Status,
    /// Workload certificates per node (identity, serial, issuer, expiry) and the CA's
    /// roots and rotation state.
    Certs {
        /// Only this node's certificates.
        #[arg(long)]
        node: Option<String>,
    },
    /// The configuration a node runs (workloads, services, routes, policies) and its
    /// version against the controller's.
    Config {
        /// The node.
        #[arg(long)]
        node: String,
        /// Only these kinds (repeatable).
        #[arg(long, value_enum)]
        kind: Vec<config::Kind>,
    },
    /// What the mesh does with a connection or request: the authorization decision and
    /// the policies behind it, the route rule and backends, the traffic policy, and per
    /// destination pod its mode and whether the path is same-node or HBONE.
    Explain {
        /// The caller: a pod `NS/NAME`, a SPIFFE ID (as in access logs), or an IP.
        #[arg(long)]
        from: String,
        /// The destination with its port: a service or pod `NS/NAME:PORT`, or
        /// `IP:PORT`.
        #[arg(long)]
        to: String,
        /// An HTTP request's method (with --path or alone; without both, the question
        /// is about a TCP connection).
        #[arg(long)]
        method: Option<String>,
        /// An HTTP request's path, with its query.
        #[arg(long)]
        path: Option<String>,
        /// A request header, `NAME=VALUE` (repeatable).
        #[arg(long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
    },
    /// What the agents see: kernel verdicts (redirects, drops and why), and the
    /// connections and requests they refused or carried (identities, route, status,
    /// latency, response flags), from every node, in time order. Without --follow, the
    /// recent drops, denials and errors; with it, every event as it happens. Exits 1
    /// when a node's agent cannot be reached.
    Observe {
        /// The source: an IP, a workload `NS/NAME`, or a whole namespace `NS/`.
        #[arg(long)]
        from: Option<String>,
        /// The destination: as --from, or a service `NS/NAME`.
        #[arg(long)]
        to: Option<String>,
        /// Either side in this namespace.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Only these verdicts (repeatable): drop, deny, error, ok, redirect, pass.
        #[arg(long)]
        verdict: Vec<String>,
        /// Only these nodes' agents (repeatable).
        #[arg(long)]
        node: Vec<String>,
        /// Keep streaming every event as it happens.
        #[arg(short, long)]
        follow: bool,
    },
    /// What of a set of manifests weft would not apply as written, before they are
    /// applied: the controller's own parsing, validation and compilation, offline, or
    /// over what a cluster holds (--cluster). Exits 1 when an object would be refused
    /// or a file does not parse.
    Analyze {
        /// Manifest files, or directories of them (repeatable).
        #[arg(short = 'f', long = "filename")]
        files: Vec<PathBuf>,
        /// Analyze the files over the objects the cluster has now (the one --local,
        /// --kubeconfig and --context name), as applying them would leave it; without
        /// files, the cluster's objects alone.
        #[arg(long)]
        cluster: bool,
    },
    /// Prints weft's install manifests with options, for `kubectl apply -f -`.
    Install {
        /// An option, `key=value` (repeatable): trustDomain, certTTL, logLevel,
        /// otlpEndpoint, traceSampling, metrics=annotations, controllerReplicas,
        /// agentCPURequest, agentMemoryRequest, agentImage, controllerImage.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        settings: Vec<install::Setting>,
    },
    /// Prints the manifest that removes weft from every node (after `kubectl delete`
    /// of the install), for `kubectl apply -f -`.
    Uninstall {
        /// `agentImage=…`, where your nodes pull the agent image from.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        settings: Vec<install::Setting>,
    },
    /// Prints a shell completion script (bash, zsh, fish, …).
    Completion { shell: clap_complete::Shell },
    /// Prints weftctl's man page (roff).
    Man,
}

/// Runs the command line of this process.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("weftctl: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let format = cli.output;
    match cli.command {
        Command::Completion { shell } => {
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "weftctl", &mut io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        // Before an install: a cluster's nodes when one is named, else this machine.
        Command::Check { pre: true } => match &cli.target {
            Target {
                local: None,
                kubeconfig: None,
                context: None,
            } => print(&check::machine(), format),
            Target { local: Some(_), .. } => {
                anyhow::bail!(
                    "check --pre checks this machine or a Kubernetes cluster's nodes, not a local cluster"
                )
            }
            target => {
                let nodes = Kubernetes::node_infos(
                    target.kubeconfig.as_deref(),
                    target.context.as_deref(),
                )?;
                print(&check::nodes(&nodes), format)
            }
        },
        Command::Analyze { files, cluster } => {
            let mut manifests = Vec::new();
            if cluster || files.is_empty() {
                manifests = connect(&cli.target)?.manifests()?;
            }
            manifests.extend(analyze::read(&files)?);
            print(&analyze::analyze(&manifests), format)
        }
        Command::Install { settings } => manifests(&install::install(&settings)?),
        Command::Uninstall { settings } => manifests(&install::uninstall(&settings)?),
        Command::Observe {
            from,
            to,
            namespace,
            verdict,
            node,
            follow,
        } => {
            let mesh = connect(&cli.target)?;
            let options = observe::Options {
                filter: weft_api::observe::Filter {
                    from: from.unwrap_or_default(),
                    to: to.unwrap_or_default(),
                    namespace: namespace.unwrap_or_default(),
                    verdicts: verdict,
                },
                follow,
                nodes: node,
            };
            observe::run(mesh.as_ref(), options, format)
        }
        command => {
            let mesh = connect(&cli.target)?;
            let snapshot = Snapshot::take(mesh.as_ref(), SystemTime::now());
            match command {
                Command::Check { .. } => print(&check::mesh(&snapshot), format),
                Command::Status => {
                    let drops = weft_api::observe::Filter {
                        verdicts: vec![weft_api::observe::verdict::DROP.to_owned()],
                        ..Default::default()
                    };
                    // An agent that cannot be asked shows as such in the node table.
                    let drops = observe::recent(mesh.as_ref(), drops, &[])?.events;
                    print(&status::of(&snapshot, &drops), format)
                }
                Command::Certs { node } => print(&certs::of(&snapshot, node.as_deref())?, format),
                Command::Config { node, kind } => {
                    print(&config::of(&snapshot, &node, &kind)?, format)
                }
                Command::Explain {
                    from,
                    to,
                    method,
                    path,
                    headers,
                } => {
                    let question = explain::Question {
                        from,
                        to,
                        method,
                        path,
                        headers,
                    };
                    print(
                        &explain::explain(mesh.as_ref(), &snapshot, &question)?,
                        format,
                    )
                }
                Command::Completion { .. }
                | Command::Observe { .. }
                | Command::Man
                | Command::Analyze { .. }
                | Command::Install { .. }
                | Command::Uninstall { .. } => unreachable!("handled above"),
            }
        }
    }
}

/// The mesh the arguments name: a local cluster, else the Kubernetes cluster of the
/// kubeconfig.
fn connect(target: &Target) -> anyhow::Result<Box<dyn Mesh>> {
    match &target.local {
        Some(name) => Ok(Box::new(LocalCluster::open(name)?)),
        None => Ok(Box::new(Kubernetes::connect(
            target.kubeconfig.as_deref(),
            target.context.as_deref(),
        )?)),
    }
}

/// Prints manifests (YAML whatever `-o` says: they are for `kubectl apply -f -`).
fn manifests(text: &str) -> anyhow::Result<ExitCode> {
    let _ = io::stdout().lock().write_all(text.as_bytes());
    Ok(ExitCode::SUCCESS)
}

/// Prints `report` in `format`; the exit code says whether it found what it checks.
fn print(report: &impl Report, format: Format) -> anyhow::Result<ExitCode> {
    let text = format.render(report)?;
    let mut out = io::stdout().lock();
    // A closed pipe (`| head`) is not an error of weftctl's.
    let _ = out.write_all(text.as_bytes());
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
