//! `weft-agent`: the per-node agent.
//!
//! `weft-agent run` loads and pins the kernel programs, enrolls pods the CNI plugin
//! reports, keeps capture in step with the mesh configuration and reports flow events.
//! Stopping it leaves capture and enforcement attached; `weft-agent uninstall` removes
//! them.

use std::{
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use weft_agent::{
    cni,
    datapath::{CaptureTarget, Datapath, Pins, flows::Flow},
    mesh::MeshConfig,
    node::Node,
};

#[derive(Debug, Parser)]
#[command(version, about = "weft's per-node agent")]
struct Cli {
    /// Log filter (env_logger syntax); the kernel programs log under `weft_ebpf`, at
    /// debug level, e.g. `info,weft_ebpf=debug`.
    #[arg(long, env = "WEFT_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Run(RunArgs),
    /// Detach and unload everything the agent pinned (stop the agent first).
    Uninstall {
        /// The node's bpffs directory.
        #[arg(long, env = "WEFT_BPFFS", default_value = "/sys/fs/bpf/weft")]
        bpffs: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Name of the node this agent serves.
    #[arg(long, env = "WEFT_NODE")]
    node: String,
    /// The node's bpffs directory, where programs' links and maps are pinned.
    #[arg(long, env = "WEFT_BPFFS", default_value = "/sys/fs/bpf/weft")]
    bpffs: PathBuf,
    /// The cgroup v2 directory holding every pod of the node (capture attaches there).
    #[arg(long, env = "WEFT_POD_CGROUP")]
    pod_cgroup: PathBuf,
    /// The address pods reach this agent at; captured connections go there.
    #[arg(long, env = "WEFT_CAPTURE_ADDRESS")]
    capture_address: Ipv4Addr,
    /// The IPv6 address pods reach this agent at, on dual-stack nodes.
    #[arg(long, env = "WEFT_CAPTURE_ADDRESS_V6")]
    capture_address_v6: Option<Ipv6Addr>,
    /// The port captured connections go to.
    #[arg(long, env = "WEFT_OUTBOUND_PORT", default_value_t = 15001)]
    outbound_port: u16,
    /// The Unix socket the CNI plugin enrolls pods through.
    #[arg(long, env = "WEFT_CNI_SOCKET", default_value = weft_api::enroll::DEFAULT_SOCKET)]
    cni_socket: PathBuf,
    /// Where the agent keeps its records of enrolled pods.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/run/weft/agent")]
    state_dir: PathBuf,
    /// The mesh configuration file (reloaded when it changes).
    #[arg(long, env = "WEFT_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
    /// Write flow events as JSON lines to this file instead of the log.
    #[arg(long, env = "WEFT_FLOW_LOG")]
    flow_log: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    env_logger::Builder::new().parse_filters(&cli.log).init();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")?
            .block_on(run(args)),
        Command::Uninstall { bpffs } => {
            Pins::new(&bpffs).remove_all()?;
            log::info!("removed every pin under {}", bpffs.display());
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mesh = match &args.mesh_config {
        Some(path) => MeshConfig::load(path)?,
        None => MeshConfig::default(),
    };
    let target = CaptureTarget {
        ipv4: args.capture_address,
        ipv6: args.capture_address_v6,
        outbound_port: args.outbound_port,
    };
    let mut datapath = Datapath::start(Pins::new(&args.bpffs), &args.pod_cgroup, target)?;
    datapath.forward_logs(log::logger())?;
    datapath.forward_flows(flow_sink(args.flow_log.as_deref())?)?;
    let node = Arc::new(Mutex::new(Node::start(datapath, mesh, &args.state_dir)?));
    let listener = cni::bind(&args.cni_socket)
        .with_context(|| format!("cannot listen on {}", args.cni_socket.display()))?;
    log::info!(
        "weft-agent {} ready on node {}: capture to {}:{}, CNI socket {}",
        env!("CARGO_PKG_VERSION"),
        args.node,
        args.capture_address,
        args.outbound_port,
        args.cni_socket.display()
    );
    if let Some(path) = args.mesh_config.clone() {
        tokio::spawn(watch_mesh_config(path, Arc::clone(&node)));
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        () = cni::serve(listener, node) => {}
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    let _ = std::fs::remove_file(&args.cni_socket);
    log::info!(
        "stopping; capture and enforcement stay attached (pinned under {})",
        args.bpffs.display()
    );
    Ok(())
}

/// Where flow events go: JSON lines in `path`, or the log.
fn flow_sink(path: Option<&Path>) -> anyhow::Result<impl FnMut(Flow) + Send + 'static> {
    let mut file = path
        .map(|path| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the flow log {}", path.display()))
        })
        .transpose()?;
    Ok(move |flow: Flow| {
        let json = serde_json::to_string(&flow).expect("flows serialise");
        match file.as_mut() {
            Some(file) => {
                if let Err(err) = writeln!(file, "{json}") {
                    log::warn!("cannot write the flow log: {err}");
                }
            }
            None => log::info!(target: "weft::flow", "{json}"),
        }
    })
}

/// Reloads the mesh configuration when its file changes; a bad file is reported and
/// the last good configuration keeps serving.
async fn watch_mesh_config(path: PathBuf, node: Arc<Mutex<Node>>) {
    let modified = |path: &Path| {
        std::fs::metadata(path)
            .and_then(|meta| meta.modified())
            .ok()
    };
    let mut seen: Option<SystemTime> = modified(&path);
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    loop {
        interval.tick().await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match MeshConfig::load(&path) {
            Ok(mesh) => {
                let mut node = node.lock().expect("node lock");
                if *node.mesh() == mesh {
                    continue;
                }
                match node.set_mesh(mesh) {
                    Ok(()) => log::info!("applied the mesh configuration from {}", path.display()),
                    Err(err) => log::error!("applying {} failed: {err}", path.display()),
                }
            }
            Err(err) => log::error!("{err}; keeping the last good mesh configuration"),
        }
    }
}
