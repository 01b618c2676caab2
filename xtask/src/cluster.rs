//! `cargo xtask cluster …`: the command line of the local cluster (`weft-cluster`).

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use weft_cluster::{Cluster, PodSpec};

use crate::cmd;

/// Taken by whoever removes a task's cluster: the Ctrl-C handler of [`start_fresh`] or
/// the task itself when it ends.
pub static REMOVING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Before a task brings up cluster `name`: removes what an earlier run left of it,
/// and has Ctrl-C remove it (the task removes it itself when it ends otherwise).
pub fn start_fresh(name: &str) -> anyhow::Result<()> {
    if Cluster::open(name).is_ok() {
        eprintln!("==> removing cluster {name} left by an earlier run");
    }
    weft_cluster::down(name)?;
    let name = name.to_owned();
    ctrlc::set_handler(move || {
        // Hold the lock until exit: the main thread, whose tool Ctrl-C interrupted too,
        // must not remove the cluster at the same time.
        let _removing = REMOVING.lock();
        eprintln!("\ninterrupted: removing cluster {name}");
        let _ = weft_cluster::down(&name);
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a cluster of N nodes.
    Up {
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Give the cluster a mesh: Kubernetes YAML files or directories (namespaces
        /// labelled weft.dev/mesh=enabled, Services, weft's policies, routes; repeatable),
        /// run weft-controller on them and weft-agent on every node, and enroll pods
        /// through weft-cni. Edits to the files apply while the cluster runs.
        #[arg(long)]
        mesh: Vec<PathBuf>,
        /// A destination port the mesh never captures (repeatable).
        #[arg(long = "exclude-port")]
        exclude_ports: Vec<u16>,
        /// An extra argument of `weft-controller run`, kept for its restarts
        /// (repeatable, e.g. `--controller-arg=--cert-ttl=1h`).
        #[arg(long = "controller-arg", allow_hyphen_values = true)]
        controller_args: Vec<String>,
        /// An extra argument of every `weft-agent run` the cluster starts (repeatable,
        /// e.g. `--agent-arg=--drain-timeout=5`); not one that ties the agent to its
        /// node.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Wait until the mesh has settled: the controller compiled the current manifests
    /// and every running agent applied them and holds its pods' certificates.
    Wait {
        #[arg(long)]
        name: String,
        /// Give up after this many seconds (and exit non-zero).
        #[arg(long, value_parser = parse_seconds, default_value = "60")]
        timeout: Duration,
    },
    /// Start, stop or restart a node's agent.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Start or stop the controller.
    Controller {
        #[command(subcommand)]
        command: ControllerCommand,
    },
    /// Remove everything of a cluster (also after a crashed `up`).
    Down {
        #[arg(long)]
        name: String,
    },
    /// Print a cluster's topology as JSON (schema in README.md).
    Status {
        #[arg(long)]
        name: String,
    },
    /// Add or remove pods.
    Pod {
        #[command(subcommand)]
        command: PodCommand,
    },
    /// Run a command inside a pod, or on a node, in the foreground.
    Exec {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        target: ExecTarget,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ExecTarget {
    /// The pod to run in.
    #[arg(long)]
    pod: Option<String>,
    /// The node to run on (its namespace and system cgroup, where the agent lives).
    #[arg(long)]
    node: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Start weft-agent on a node (pods are enrolled through weft-cni from then on).
    Start {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
        /// Give the cluster a mesh from these manifests first (needed when it has none
        /// yet; starts the controller too).
        #[arg(long)]
        mesh: Vec<PathBuf>,
    },
    /// Stop a node's agent (SIGTERM; it lets open connections finish up to its drain
    /// timeout). Capture and enforcement stay attached, so the node's meshed pods
    /// cannot open connections through the mesh until an agent runs again.
    Stop {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
    },
    /// Replace a node's agent with a new one, as an upgrade does: the new agent takes
    /// the listening sockets over, the old one drains and exits; no connection is
    /// refused.
    Restart {
        #[arg(long)]
        name: String,
        #[arg(long)]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ControllerCommand {
    /// Start weft-controller on the cluster's fabric (if it is not running).
    Start {
        #[arg(long)]
        name: String,
    },
    /// Stop the controller; the agents keep serving what they have.
    Stop {
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PodCommand {
    /// Add a pod and start its command (after `--`) in the background. Workspace
    /// binaries such as `weft-echo` are on the command's PATH.
    Add {
        #[arg(long)]
        name: String,
        #[arg(long)]
        pod: String,
        #[arg(long)]
        node: String,
        #[arg(long, default_value = "default")]
        namespace: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        /// A label as key=value; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// An annotation as key=value (`weft.dev/mesh=disabled` keeps the pod out of
        /// the mesh); repeat for more.
        #[arg(long = "annotation", value_parser = parse_label)]
        annotations: Vec<(String, String)>,
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Stop a pod and remove it.
    Del {
        #[arg(long)]
        name: String,
        #[arg(long)]
        pod: String,
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

pub fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up {
            name,
            nodes,
            mesh,
            exclude_ports,
            controller_args,
            agent_args,
        } => {
            // Before anything exists, so that a typo leaves nothing behind.
            weft_cluster::check_agent_args(&agent_args)?;
            let mut cluster = Cluster::up(&name, nodes)?;
            cluster.set_controller_args(controller_args)?;
            cluster.set_agent_args(agent_args)?;
            if !mesh.is_empty() {
                set_mesh(&mut cluster, mesh, exclude_ports)?;
                for node in cluster.topology().node_names() {
                    start_agent(&mut cluster, &node)?;
                }
            }
            eprintln!(
                "cluster {name} is up with {nodes} node(s); `cargo xtask cluster status --name {name}` shows it"
            );
            print_topology(&cluster)
        }
        Command::Agent {
            command: AgentCommand::Start { name, node, mesh },
        } => {
            let mut cluster = Cluster::open(&name)?;
            if !mesh.is_empty() {
                set_mesh(&mut cluster, mesh, Vec::new())?;
            }
            start_agent(&mut cluster, &node)
        }
        Command::Controller {
            command: ControllerCommand::Start { name },
        } => start_controller(&mut Cluster::open(&name)?),
        Command::Controller {
            command: ControllerCommand::Stop { name },
        } => Cluster::open(&name)?.stop_controller().map_err(Into::into),
        Command::Agent {
            command: AgentCommand::Stop { name, node },
        } => stop_agent(&mut Cluster::open(&name)?, &node),
        Command::Agent {
            command: AgentCommand::Restart { name, node },
        } => {
            let mut cluster = Cluster::open(&name)?;
            restart_agent(&mut cluster, &node)
        }
        Command::Wait { name, timeout } => {
            Cluster::open(&name)?.wait_for_mesh(timeout)?;
            eprintln!("the mesh of cluster {name} has settled");
            Ok(())
        }
        Command::Down { name } => {
            weft_cluster::down(&name)?;
            eprintln!("cluster {name} is gone");
            Ok(())
        }
        Command::Status { name } => print_topology(&Cluster::open(&name)?),
        Command::Pod {
            command:
                PodCommand::Add {
                    name,
                    pod,
                    node,
                    namespace,
                    service_account,
                    labels,
                    annotations,
                    command,
                },
        } => {
            let mut cluster = Cluster::open(&name)?;
            let spec = PodSpec {
                name: pod,
                namespace,
                node,
                service_account,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                annotations: annotations.into_iter().collect::<BTreeMap<_, _>>(),
                command,
                env: vec![("PATH".to_owned(), path_with_workspace_binaries()?)],
            };
            let pod = cluster.add_pod(spec)?;
            println!("{}", serde_json::to_string_pretty(&pod)?);
            Ok(())
        }
        Command::Pod {
            command:
                PodCommand::Del {
                    name,
                    pod,
                    namespace,
                },
        } => Cluster::open(&name)?
            .del_pod(&namespace, &pod)
            .map_err(Into::into),
        Command::Exec {
            name,
            target,
            namespace,
            command,
        } => {
            let cluster = Cluster::open(&name)?;
            let mut child = match (target.pod, target.node) {
                (Some(pod), _) => cluster.pod_command(&namespace, &pod, &command)?,
                (None, Some(node)) => cluster.node_command(&node, &command)?,
                (None, None) => unreachable!("clap requires --pod or --node"),
            };
            child.env("PATH", path_with_workspace_binaries()?);
            let status = child.status().context("cannot start the command")?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

/// Gives the cluster a mesh from the manifests at `paths` and starts its controller.
pub fn set_mesh(
    cluster: &mut Cluster,
    paths: Vec<PathBuf>,
    exclude_ports: Vec<u16>,
) -> anyhow::Result<()> {
    cluster.set_mesh(paths, exclude_ports)?;
    start_controller(cluster)
}

/// Builds and starts the controller (and builds `weftctl`, which reads it).
pub fn start_controller(cluster: &mut Cluster) -> anyhow::Result<()> {
    cmd::build_binaries(&["weft-controller", "weftctl"])?;
    let controller = cluster.start_controller(&workspace_binaries()?.join("weft-controller"))?;
    eprintln!(
        "weft-controller runs on the fabric at {} (pid {}, log {})",
        cluster.topology().controller_address,
        controller.pid,
        controller.log.display()
    );
    Ok(())
}

/// Builds the agent and the CNI plugin, turns on enrollment through the plugin and
/// starts the agent on `node`.
pub fn start_agent(cluster: &mut Cluster, node: &str) -> anyhow::Result<()> {
    cmd::build_binaries(&["weft-agent", "weft-cni"])?;
    let bin_dir = workspace_binaries()?;
    cluster.set_cni(Some(bin_dir.clone()))?;
    let agent = cluster.start_agent(node, &bin_dir.join("weft-agent"))?;
    eprintln!(
        "weft-agent runs on {node} (pid {}, log {})",
        agent.pid,
        agent.log.display()
    );
    Ok(())
}

/// Replaces `node`'s agent with one of the workspace's build, waiting for the old one
/// to drain.
fn restart_agent(cluster: &mut Cluster, node: &str) -> anyhow::Result<()> {
    cmd::build_binaries(&["weft-agent", "weft-cni"])?;
    let bin_dir = workspace_binaries()?;
    cluster.set_cni(Some(bin_dir.clone()))?;
    let drain = Duration::from_millis(cluster.topology().agent_drain_timeout_ms);
    eprintln!(
        "starting a new agent on {node}: it takes the listening sockets over, and the one running drains its connections (up to {drain:?}) and exits"
    );
    let agent = cluster.restart_agent(node, &bin_dir.join("weft-agent"))?;
    eprintln!(
        "weft-agent runs on {node} (pid {}, log {})",
        agent.pid,
        agent.log.display()
    );
    Ok(())
}

/// Stops `node`'s agent, saying first how long its drain may take.
fn stop_agent(cluster: &mut Cluster, node: &str) -> anyhow::Result<()> {
    let drain = Duration::from_millis(cluster.topology().agent_drain_timeout_ms);
    match cluster.running_agent(node)? {
        Some(pid) => eprintln!(
            "stopping the agent on {node} (pid {pid}): open connections get up to {drain:?} to finish; new ones from the node's meshed pods are refused until an agent runs again"
        ),
        None => eprintln!("no agent runs on {node}"),
    }
    cluster.stop_agent(node)?;
    Ok(())
}

fn print_topology(cluster: &Cluster) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(cluster.topology())?);
    Ok(())
}

fn parse_seconds(text: &str) -> anyhow::Result<Duration> {
    text.parse()
        .ok()
        .and_then(|seconds| Duration::try_from_secs_f64(seconds).ok())
        .with_context(|| format!("give a number of seconds, such as 30 or 0.5, not {text:?}"))
}

fn parse_label(text: &str) -> anyhow::Result<(String, String)> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => bail!("write a label as key=value, not {text:?}"),
    }
}

/// Where cargo put this build's binaries: the directory of the running xtask.
pub fn workspace_binaries() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the xtask binary")?;
    Ok(exe
        .parent()
        .context("the xtask binary has no parent directory")?
        .to_owned())
}

/// `PATH` with the workspace's binaries first.
fn path_with_workspace_binaries() -> anyhow::Result<String> {
    let mut dirs = vec![workspace_binaries()?];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    Ok(std::env::join_paths(dirs)?.to_string_lossy().into_owned())
}
