//! `weft-agent`: the per-node agent.
//!
//! `weft-agent run` loads and pins the kernel programs, enrolls pods the CNI plugin
//! reports, and proxies: captured connections on 15001, HBONE tunnels on 15008, with
//! metrics on 15020, readiness on 15021 and admin on localhost 15000. Stopping it leaves
//! capture and enforcement attached; `weft-agent uninstall` removes them.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::{
    net::TcpListener,
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use weft_agent::{
    admin::{self, Admin},
    certificates::{self, Manager},
    cni,
    controller::Controller,
    datapath::{CaptureTarget, Datapath, Pins, flows::Flow, pinned::OriginalDestinations},
    files, handover,
    identity::Identity,
    logging, memory,
    mesh::MeshConfig,
    node::{Enrolled, Node, NodeHandle},
    observe,
    proxy::{
        self, Proxy,
        in_pod::InPod,
        metrics::{AccessLog, AccessLogMode},
        trace::{TraceSettings, Tracer},
    },
    reload::{self, Current},
    subscription::{self, Offer},
    tls::CertStore,
};
use weft_cni::install::Installer;

/// Where the agent keeps its state on the node, unless told otherwise.
const STATE_DIR: &str = "/run/weft/agent";

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
    Run(Box<RunArgs>),
    /// Detach and unload everything the agent pinned, and take weft-cni out of the
    /// node's CNI configuration (stop the agent first).
    Uninstall {
        /// The node's bpffs directory.
        #[arg(long, env = "WEFT_BPFFS", default_value = "/sys/fs/bpf/weft")]
        bpffs: PathBuf,
        #[command(flatten)]
        cni: CniArgs,
        /// Wait for the node's agent to stop first (its ready port answers while it
        /// runs), and after uninstalling wait for SIGTERM: how the uninstall DaemonSet
        /// runs it. Without it, a running agent is an error.
        #[arg(long)]
        wait: bool,
    },
    /// Keep the node's proxy listening sockets between agents (the DaemonSet's
    /// `sockets` container): each agent leaves them here once it serves, and one that
    /// starts after a crash takes them back, so that the connections that came
    /// meanwhile waited in the kernel's queues instead of being refused. It never
    /// accepts a connection itself.
    Hold {
        /// The agent's state directory, where `holder.sock` is.
        #[arg(long, env = "WEFT_STATE_DIR", default_value = STATE_DIR)]
        state_dir: PathBuf,
    },
}

/// Where the node's CNI configuration lives, when the agent installs weft-cni there.
#[derive(Clone, Debug, clap::Args)]
struct CniArgs {
    /// The node's CNI configuration directory (`/etc/cni/net.d` on the host): the agent
    /// chains weft-cni into the primary network configuration there, and chains it
    /// again when the primary CNI rewrites it. Unset: the CNI configuration is managed
    /// by someone else (the local cluster, or the node's image).
    #[arg(long, env = "WEFT_CNI_CONF_DIR")]
    cni_conf_dir: Option<PathBuf>,
    /// The node's CNI plugin directory, where weft-cni is placed.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The weft-cni binary to place there. Default: the one beside this executable.
    #[arg(long, env = "WEFT_CNI_BINARY")]
    cni_binary: Option<PathBuf>,
}

impl CniArgs {
    /// The installer, with `--cni-conf-dir`; `socket` is where the plugin enrolls pods.
    fn installer(&self, socket: &Path) -> anyhow::Result<Option<Installer>> {
        let Some(conf_dir) = self.cni_conf_dir.clone() else {
            return Ok(None);
        };
        let binary = match &self.cni_binary {
            Some(binary) => binary.clone(),
            None => std::env::current_exe()
                .context("cannot find the agent's own executable")?
                .with_file_name(weft_cni::install::PLUGIN_TYPE),
        };
        let mut plugin = serde_json::Map::new();
        plugin.insert("agentSocket".into(), socket.display().to_string().into());
        Ok(Some(Installer {
            conf_dir,
            bin_dir: self.cni_bin_dir.clone(),
            binary,
            plugin,
        }))
    }
}

#[derive(Clone, Debug, clap::Args)]
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
    #[command(flatten)]
    cni: CniArgs,
    /// Where the agent keeps its records of enrolled pods.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = STATE_DIR)]
    state_dir: PathBuf,
    /// The mesh configuration file (reloaded when it changes), for running without a
    /// controller.
    #[arg(long, env = "WEFT_MESH_CONFIG", conflicts_with = "controller")]
    mesh_config: Option<PathBuf>,
    /// Take the mesh configuration and the workload certificates from the controller
    /// at this address (`https://host:15010`; `http://` only in tests). The last
    /// version applied, and the certificates, are cached in the state directory and
    /// served at once after a restart, even with the controller away.
    #[arg(long, env = "WEFT_CONTROLLER")]
    controller: Option<String>,
    /// The file holding this node's token for the controller.
    #[arg(long, env = "WEFT_CONTROLLER_TOKEN_FILE", requires = "controller")]
    controller_token_file: Option<PathBuf>,
    /// PEM roots that check an `https://` controller (the mesh CA's `ca.crt`), reread
    /// at every connect; the trust bundle the controller streams is trusted too.
    #[arg(long, env = "WEFT_CONTROLLER_CA", requires = "controller")]
    controller_ca: Option<PathBuf>,
    /// The SPIFFE ID the controller must present.
    #[arg(
        long,
        env = "WEFT_CONTROLLER_IDENTITY",
        value_parser = Identity::parse,
        default_value = "spiffe://cluster.local/ns/weft-system/sa/weft-controller"
    )]
    controller_identity: Identity,
    /// Write flow events as JSON lines to this file instead of the log.
    #[arg(long, env = "WEFT_FLOW_LOG")]
    flow_log: Option<PathBuf>,
    /// Without a controller: the PEM file of the mesh's trust anchors (root
    /// certificates). With one, the trust bundle comes with the configuration.
    #[arg(
        long,
        env = "WEFT_TRUST_BUNDLE",
        conflicts_with = "controller",
        required_unless_present = "controller"
    )]
    trust_bundle: Option<PathBuf>,
    /// Without a controller: the directory of workload certificates, `<name>.crt`
    /// (chain, leaf first) and `<name>.key` pairs, one per identity running on this
    /// node (reloaded on change). With one, the controller's CA issues them.
    #[arg(
        long,
        env = "WEFT_CERTS",
        conflicts_with = "controller",
        required_unless_present = "controller"
    )]
    certs: Option<PathBuf>,
    /// Data-plane worker threads (1 to 1024). By default one per CPU the agent may use:
    /// its CPU affinity, capped by the CPU quota of its cgroup (a container's CPU
    /// limit), so that a limited agent is not throttled for running more threads than
    /// its share.
    #[arg(
        long,
        env = "WEFT_WORKERS",
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    workers: Option<u16>,
    /// How long SIGTERM waits for open connections before closing them (seconds, or a
    /// duration such as 2m; at most a day). New captured connections are refused
    /// meanwhile: the listeners are closed while capture stays attached.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", value_parser = parse_duration, default_value = "30")]
    drain_timeout: Duration,
    /// How long a carried TCP connection may move no byte either way before it is
    /// closed, unless its service's TrafficPolicy sets `timeouts.idle`; and an HTTP
    /// request's stream, unless it sets `timeouts.streamIdle`.
    #[arg(long, env = "WEFT_IDLE_TIMEOUT", value_parser = parse_duration, default_value = "1h")]
    idle_timeout: Duration,
    /// How long a connection to an endpoint may take to open (across nodes: the HBONE
    /// tunnel), unless its service's TrafficPolicy sets `timeouts.connect`.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    connect_timeout: Duration,
    /// How long an HTTP client may keep the agent waiting, for the rest of a request
    /// body before the response starts (answered 408) or to take any of the bytes
    /// written to it (its connection is closed).
    #[arg(long, env = "WEFT_CLIENT_STALL_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    client_stall_timeout: Duration,
    /// How long a connection from a pod the mesh configuration does not name yet (just
    /// created) waits for it, and for the pod's certificate, before it is refused.
    #[arg(long, env = "WEFT_SOURCE_WAIT", value_parser = parse_duration, default_value = "5s")]
    source_wait: Duration,
    /// The open-file limit to run with; by default the soft limit is raised to the
    /// hard one. The connection limits follow from it (see ARCHITECTURE.md).
    #[arg(long, env = "WEFT_OPEN_FILES", value_parser = clap::value_parser!(u64).range(64..))]
    open_files: Option<u64>,
    /// Connections one source address may hold, pending or established (default: a
    /// quarter of what the open-file limit allows).
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_SOURCE", value_parser = clap::value_parser!(u64).range(1..))]
    max_connections_per_source: Option<u64>,
    /// Connections one source address may hold on the HBONE port before their TLS
    /// handshakes prove a mesh identity (default 256).
    #[arg(long, env = "WEFT_MAX_PENDING_PER_SOURCE", value_parser = clap::value_parser!(u64).range(1..))]
    max_pending_per_source: Option<u64>,
    /// TLS handshakes one source address may start a second on the HBONE port, with
    /// bursts of twice as many.
    #[arg(
        long,
        env = "WEFT_MAX_HANDSHAKES_PER_SOURCE",
        default_value_t = 256,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_handshakes_per_source: u32,
    /// Receive window of each HBONE tunnel (bytes, 16384 to 2147483647): how much of one
    /// tunnel may be in flight between the agents, which caps one tunnel at window /
    /// round trip. Memory is used only while a reader lags, up to this much a tunnel.
    #[arg(
        long,
        env = "WEFT_HBONE_STREAM_WINDOW",
        value_parser = clap::value_parser!(u32).range(16_384..=2_147_483_647)
    )]
    hbone_stream_window: Option<u32>,
    /// Receive window of each HBONE connection (bytes, 65535 to 2147483647), shared by
    /// all its tunnels: the most unread data one peer connection can leave buffered.
    #[arg(
        long,
        env = "WEFT_HBONE_CONNECTION_WINDOW",
        value_parser = clap::value_parser!(u32).range(65_535..=2_147_483_647)
    )]
    hbone_connection_window: Option<u32>,
    /// Carry TCP connections between two plain sockets (to a pod of this node, or out
    /// of the mesh) with splice(2), inside the kernel, instead of copying them through
    /// the agent (true or false).
    #[arg(long, env = "WEFT_SPLICE", default_value_t = true, action = clap::ArgAction::Set)]
    splice: bool,
    /// How long protocol detection waits for a client's first bytes on a port whose
    /// protocol no appProtocol or port name declares; a silent client is carried as
    /// TCP after it (server-speaks-first protocols wait this long once).
    #[arg(long, env = "WEFT_DETECT_TIMEOUT", value_parser = parse_duration, default_value = "100ms")]
    detect_timeout: Duration,
    /// Which access-log lines to write (target `weft::access`).
    #[arg(long, env = "WEFT_ACCESS_LOG", value_enum, default_value_t = AccessLogMode::Request)]
    access_log: AccessLogMode,
    /// An OpenTelemetry collector (OTLP over gRPC, `http://host:4317`) to export the
    /// spans of proxied requests to; without it no span is exported, and trace context
    /// is still passed on.
    #[arg(long, env = "WEFT_TRACE_ENDPOINT")]
    trace_endpoint: Option<http::Uri>,
    /// The share of requests that arrive outside any trace whose new trace is sampled,
    /// 0 to 1 (a request in a trace follows its parent's decision).
    #[arg(long, env = "WEFT_TRACE_SAMPLING", value_parser = parse_ratio, default_value = "0.01")]
    trace_sampling: f64,
    /// Finished spans waiting for export at most; more are dropped and counted
    /// (weft_spans_dropped_total) rather than slow traffic down.
    #[arg(long, env = "WEFT_TRACE_QUEUE", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    trace_queue: u64,
    /// The share of access-log lines written, 0 to 1.
    #[arg(long, env = "WEFT_ACCESS_LOG_SAMPLING", value_parser = parse_ratio, default_value = "1")]
    access_log_sampling: f64,
}

impl RunArgs {
    /// `--workers`, or one per CPU the agent may use: std reads the affinity mask and
    /// the cgroup's `cpu.max` quota.
    fn workers(&self) -> usize {
        self.workers.map_or_else(
            || std::thread::available_parallelism().map_or(1, usize::from),
            usize::from,
        )
    }
}

/// A ratio flag: a number from 0 to 1.
fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!("{text:?} is not a ratio from 0 to 1")),
    }
}

/// The longest duration a flag takes: beyond a day, a timeout is a mistake.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// A duration flag: seconds (`30`, `0.5`) or a Gateway API duration (`1h30m`, `500ms`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = match text.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).ok(),
        Err(_) => weft_api::duration::parse_duration(text),
    };
    match duration {
        Some(duration) if duration <= LONGEST => Ok(duration),
        Some(_) => Err(format!("{text:?} is longer than a day")),
        None => Err(format!(
            "{text:?} is not a duration: give seconds (30) or a duration such as 500ms, 5s, 1h"
        )),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(&cli.log);
    match cli.command {
        Command::Run(args) => run(*args),
        Command::Uninstall { bpffs, cni, wait } => uninstall(&bpffs, &cni, wait),
        Command::Hold { state_dir } => {
            // Told apart from agents by name (`ps`, the local cluster).
            let _ = nix::sys::prctl::set_name(c"weft-hold");
            handover::hold(&state_dir).map_err(Into::into)
        }
    }
}

/// `weft-agent uninstall`: once no agent runs on the node (waiting for that with
/// `wait`, else refusing), removes the pins and takes weft-cni out of the node's CNI
/// configuration; with `wait`, then waits for SIGTERM.
fn uninstall(bpffs: &Path, cni: &CniArgs, wait: bool) -> anyhow::Result<()> {
    let ready = SocketAddr::from((Ipv4Addr::LOCALHOST, admin::READY_PORT));
    let agent_runs = || std::net::TcpStream::connect(ready).is_ok();
    if agent_runs() && !wait {
        anyhow::bail!(
            "an agent still runs on this node (it answers on {ready}): stop it first (delete the weft-agent DaemonSet), or pass --wait"
        );
    }
    if agent_runs() {
        log::info!("waiting for the node's agent to stop (it answers on {ready})");
        while agent_runs() {
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    Pins::new(bpffs).remove_all()?;
    log::info!("removed every pin under {}", bpffs.display());
    if let Some(installer) = cni.installer(Path::new(weft_api::enroll::DEFAULT_SOCKET))? {
        let removed = installer.uninstall()?;
        if let Some(path) = removed.configuration {
            log::info!("took weft-cni out of {}", path.display());
        }
        if removed.binary {
            log::info!("removed weft-cni from {}", installer.bin_dir.display());
        }
    }
    if wait {
        log::info!("weft is uninstalled from this node; waiting for SIGTERM");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(terminated())?;
    }
    Ok(())
}

/// Resolves at SIGTERM or Ctrl-C.
async fn terminated() -> std::io::Result<()> {
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}

/// Starts the control side on its own thread and runtime, then serves the data plane on
/// one single-threaded runtime per worker ([`proxy::workers`]) until SIGTERM, or until
/// a new agent takes its listening sockets over ([`handover`]), and drains.
fn run(args: RunArgs) -> anyhow::Result<()> {
    let workers = args.workers();
    // Taken over from the agent running now, or bound, first: readiness (on the control
    // thread) must never answer before the proxy's ports take connections, and
    // connections captured meanwhile wait in the accept queues instead of being
    // refused.
    let mut inherited = handover::take(&args.state_dir)?;
    let taken = match inherited.as_mut() {
        Some(inherited) => {
            log::info!(
                "took over {} listening socket(s) from the agent running on the node",
                inherited.listeners.len()
            );
            std::mem::take(&mut inherited.listeners)
        }
        None => {
            let held = handover::take_held(&args.state_dir)?;
            if !held.is_empty() {
                log::info!(
                    "took {} listening socket(s) back from the node's socket holder: the agent before stopped without handing them over",
                    held.len()
                );
            }
            held
        }
    };
    // The listeners in pods are the node's to give to their pods.
    let (in_pod_taken, taken): (Vec<_>, Vec<_>) = taken
        .into_iter()
        .partition(|listener| listener.local_addr().is_ok_and(InPod::is_in_pod));
    let in_pod = Arc::new(InPod::default());
    in_pod.adopt(in_pod_taken);
    let listeners = Listeners::open(&args, workers, taken)?;
    let (proxy_sockets, admin_sockets) = listeners.duplicates()?;
    let (started, start_result) = std::sync::mpsc::channel();
    let control_args = args.clone();
    let (tenure, admin_tenure) = tokio::sync::watch::channel(Tenure::Starting);
    let admin_listeners = listeners.admin;
    let control_in_pod = Arc::clone(&in_pod);
    std::thread::Builder::new()
        .name("weft-control".into())
        .spawn(move || {
            let runtime = match single_threaded() {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = started.send(Err(err));
                    return;
                }
            };
            runtime.block_on(control(
                control_args,
                admin_listeners,
                admin_tenure,
                started,
                control_in_pod,
            ));
        })
        .context("cannot start the control thread")?;
    let proxy = start_result
        .recv()
        .context("the control thread ended during start-up")??;

    log::info!("data plane: {workers} worker thread(s)");
    let (phase, watching) = tokio::sync::watch::channel(Phase::Serving);
    let mut threads = Vec::with_capacity(workers);
    for (index, listeners) in listeners.workers.into_iter().enumerate() {
        let runtime = single_threaded()?;
        let serving = {
            let _entered = runtime.enter();
            listeners.serve(&proxy)?
        };
        let phase = watching.clone();
        let thread = std::thread::Builder::new()
            .name(format!("weft-data-{index}"))
            .spawn(move || {
                proxy::workers::enter(index);
                runtime.block_on(work(serving, phase));
                // Dropping the runtime would wait for connections still open past the
                // drain deadline.
                runtime.shutdown_background();
            })
            .context("cannot start a data-plane worker thread")?;
        threads.push(thread);
    }
    log::info!(
        "weft-agent {} serving on node {}: outbound :{}, HBONE :{}, metrics :{}, ready :{}, admin 127.0.0.1:{}",
        env!("CARGO_PKG_VERSION"),
        args.node,
        args.outbound_port,
        proxy::HBONE_PORT,
        admin::METRICS_PORT,
        admin::READY_PORT,
        admin::ADMIN_PORT
    );
    if let Some(predecessor) = inherited {
        match predecessor.release() {
            Ok(()) => log::info!("told the agent that ran before to let go of the sockets"),
            // It is gone: nothing to tell.
            Err(err) => log::info!("the agent that ran before is gone ({err})"),
        }
    }
    let _ = tenure.send(Tenure::Serving);
    let kept = proxy_sockets
        .iter()
        .map(OwnedFd::try_clone)
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot duplicate the listening sockets")?;
    let offered = proxy_sockets.into_iter().chain(admin_sockets).collect();
    let offer = match handover::offer(&args.state_dir, offered, move || in_pod.duplicates()) {
        Ok(offer) => Some(offer),
        Err(err) => {
            log::warn!(
                "{err}: a new agent on this node will not take over without refusing connections"
            );
            None
        }
    };
    let handed = single_threaded()?.block_on(async {
        let (served, standing) = match offer {
            Some(offer) => (Some(offer.served), Some(offer.standing)),
            None => (None, None),
        };
        // Resolves once a new agent serves the listening sockets.
        let taken_over = async {
            if let Some(served) = served
                && served.await.is_ok()
            {
                return;
            }
            std::future::pending::<()>().await;
        };
        let handed = tokio::select! {
            () = keep_deposited(&args.state_dir, &kept) => false,
            terminated = terminated() => {
                terminated?;
                if let Some(standing) = &standing {
                    standing.withdraw();
                }
                false
            }
            () = taken_over => true,
        };
        if handed {
            let _ = tenure.send(Tenure::HandedOver);
        }
        // Stop accepting, let open connections finish, then close what is left.
        let _ = phase.send(Phase::Draining);
        proxy.in_pod.close();
        let active = proxy.active();
        if active > 0 {
            log::info!(
                "draining {active} connection(s) for up to {:?}",
                args.drain_timeout
            );
        }
        let left = proxy.drain(args.drain_timeout).await;
        if left > 0 {
            log::warn!("closing {left} connection(s) still open after the drain deadline");
        }
        anyhow::Ok(handed)
    })?;
    let _ = phase.send(Phase::Stopped);
    for thread in threads {
        let _ = thread.join();
    }
    if handed {
        log::info!("stopped; the new agent serves the node");
    } else {
        let _ = std::fs::remove_file(&args.cni_socket);
        log::info!(
            "stopped; capture and enforcement stay attached (pinned under {})",
            args.bpffs.display()
        );
    }
    Ok(())
}

/// How often the proxy's sockets are left with the node's socket holder again: a
/// holder that restarted, or started after this agent, holds them again within this.
const DEPOSIT_EVERY: Duration = Duration::from_secs(15);

/// Leaves the proxy's listening sockets (`kept`) with the node's socket holder now and
/// every [`DEPOSIT_EVERY`], saying when that changes: held, no holder, or failing.
async fn keep_deposited(state_dir: &Path, kept: &[OwnedFd]) {
    let mut every = tokio::time::interval(DEPOSIT_EVERY);
    let mut last = None;
    loop {
        every.tick().await;
        let now = handover::deposit(state_dir, kept).map_err(|err| err.to_string());
        if last.as_ref() != Some(&now) {
            match &now {
                Ok(true) => {
                    log::info!("the node's socket holder keeps the proxy's listening sockets")
                }
                Ok(false) => log::info!(
                    "no socket holder runs on this node: if this agent crashes, new connections are refused until the next one listens"
                ),
                Err(err) => log::warn!(
                    "cannot leave the listening sockets with the node's socket holder: {err}"
                ),
            }
        }
        last = Some(now);
    }
}

fn single_threaded() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")
}

/// Whose the listening sockets are, for the admin endpoints: they answer only while
/// this agent serves, so that what answers during an upgrade is the agent that serves
/// the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tenure {
    /// Starting; the agent that ran before (if any) still serves.
    Starting,
    Serving,
    /// A new agent serves the sockets.
    HandedOver,
}

/// Where the data plane is in its life; the workers follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Serving,
    /// Accepting no more; carrying what is open.
    Draining,
    /// Done: the workers' runtimes stop with whatever is left.
    Stopped,
}

/// Every listening socket of the agent: each worker's proxy ports, and the admin
/// endpoints (in the order of [`admin::addresses`]).
struct Listeners {
    workers: Vec<WorkerListeners>,
    admin: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// Serves what was `taken` over from the agent running before, by the port or
    /// address each socket listens on, and binds the rest. Taken proxy sockets are
    /// dealt over the workers; a worker left without one binds its own (with
    /// `SO_REUSEPORT`, beside the taken ones).
    fn open(
        args: &RunArgs,
        workers: usize,
        taken: Vec<std::net::TcpListener>,
    ) -> anyhow::Result<Self> {
        let admin_addresses = admin::addresses().map(|(address, ..)| address);
        let mut admin: Vec<Option<std::net::TcpListener>> = admin_addresses.map(|_| None).into();
        let (mut outbound, mut inbound) = (Vec::new(), Vec::new());
        for listener in taken {
            let address = listener.local_addr()?;
            if address.port() == args.outbound_port {
                outbound.push((address, listener));
            } else if address.port() == proxy::HBONE_PORT {
                inbound.push((address, listener));
            } else if let Some(index) = admin_addresses.iter().position(|a| *a == address) {
                admin[index] = Some(listener);
            } else {
                log::warn!(
                    "not serving the listening socket taken over on {address}: this agent does not listen there"
                );
            }
        }
        let (outbound, inbound) = (deal(outbound, workers), deal(inbound, workers));
        let workers = outbound
            .into_iter()
            .zip(inbound)
            .map(|(outbound, inbound)| {
                anyhow::Ok(WorkerListeners {
                    outbound: listen(args.outbound_port, "outbound", outbound)?,
                    inbound: listen(proxy::HBONE_PORT, "HBONE", inbound)?,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let admin = admin
            .into_iter()
            .zip(admin_addresses)
            .map(|(taken, address)| match taken {
                Some(listener) => Ok(listener),
                None => std::net::TcpListener::bind(address)
                    .and_then(|listener| {
                        listener.set_nonblocking(true)?;
                        Ok(listener)
                    })
                    .with_context(|| format!("cannot listen on {address}")),
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { workers, admin })
    }

    /// A duplicate of every socket, to hand over to the next agent: the proxy's, and
    /// the admin endpoints'.
    fn duplicates(&self) -> anyhow::Result<(Vec<OwnedFd>, Vec<OwnedFd>)> {
        let duplicate = |listeners: &mut dyn Iterator<Item = &std::net::TcpListener>| {
            listeners
                .map(|listener| Ok(listener.try_clone()?.into()))
                .collect::<std::io::Result<Vec<OwnedFd>>>()
                .context("cannot duplicate the listening sockets")
        };
        let proxy = duplicate(
            &mut self
                .workers
                .iter()
                .flat_map(|worker| worker.outbound.iter().chain(&worker.inbound)),
        )?;
        Ok((proxy, duplicate(&mut self.admin.iter())?))
    }
}

/// Deals `items` into `hands` hands, round-robin among the items of each key: each
/// hand gets its share of every address's sockets.
fn deal<K: Ord, T>(items: Vec<(K, T)>, hands: usize) -> Vec<Vec<T>> {
    let mut dealt: Vec<Vec<T>> = (0..hands).map(|_| Vec::new()).collect();
    let mut next: BTreeMap<K, usize> = BTreeMap::new();
    for (key, item) in items {
        let count = next.entry(key).or_default();
        dealt[*count % hands].push(item);
        *count += 1;
    }
    dealt
}

/// A worker's listening sockets: every address family of each proxy port.
struct WorkerListeners {
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<std::net::TcpListener>,
}

impl WorkerListeners {
    /// Spawns the accept loops on the runtime entered.
    fn serve(self, proxy: &Arc<Proxy>) -> anyhow::Result<tokio::task::JoinSet<()>> {
        let mut serving = tokio::task::JoinSet::new();
        for listener in self.outbound {
            let listener = TcpListener::from_std(listener)?;
            serving.spawn(proxy::serve_outbound(listener, Arc::clone(proxy)));
        }
        for listener in self.inbound {
            let listener = TcpListener::from_std(listener)?;
            serving.spawn(proxy::serve_inbound(listener, Arc::clone(proxy)));
        }
        serving.spawn(proxy::serve_in_pod(Arc::clone(proxy)));
        Ok(serving)
    }
}

/// A worker's life: accepts until the drain starts, then carries its open connections
/// until the data plane stops.
async fn work(
    mut serving: tokio::task::JoinSet<()>,
    mut phase: tokio::sync::watch::Receiver<Phase>,
) {
    let _ = phase.wait_for(|now| *now >= Phase::Draining).await;
    serving.abort_all();
    let _ = phase.wait_for(|now| *now >= Phase::Stopped).await;
    logging::access::flush();
}

/// Listening sockets on `port` of every IPv4 address and, where the node has IPv6,
/// every IPv6 address (a socket of its own, so IPv4 peers keep IPv4 addresses), for
/// one data-plane worker: those `taken` over, and new ones for the addresses they
/// leave out. `SO_REUSEPORT` lets every worker (and, during an upgrade, both agents)
/// listen on the port, and the kernel spreads connections over them.
fn listen(
    port: u16,
    what: &str,
    mut taken: Vec<std::net::TcpListener>,
) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let bind = |address| proxy::listener(address, false);
    let held = |taken: &[std::net::TcpListener], address| {
        taken
            .iter()
            .any(|listener| listener.local_addr().ok() == Some(address))
    };
    let ipv4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    if !held(&taken, ipv4) {
        taken.push(bind(ipv4).with_context(|| format!("cannot listen on port {port} ({what})"))?);
    }
    let ipv6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    if !held(&taken, ipv6) {
        match bind(ipv6) {
            Ok(listener) => taken.push(listener),
            Err(err) => log::info!("not listening on IPv6 port {port} ({what}): {err}"),
        }
    }
    Ok(taken)
}

/// The control side: starts the datapath, enrollment and proxy state, reports the
/// proxy (or the start-up error) to the data plane, then serves the CNI socket, the
/// configuration and certificate reloads, and the admin endpoints on `admin_listeners`
/// while `tenure` says this agent serves (all of them stop when a new agent does).
async fn control(
    args: RunArgs,
    admin_listeners: Vec<std::net::TcpListener>,
    tenure: tokio::sync::watch::Receiver<Tenure>,
    started: std::sync::mpsc::Sender<anyhow::Result<Arc<Proxy>>>,
    in_pod: Arc<InPod>,
) {
    let Started {
        proxy,
        admin,
        node,
        listener,
        offers,
        certificates,
    } = match start(&args, in_pod).await {
        Ok(parts) => parts,
        Err(err) => {
            let _ = started.send(Err(err));
            return;
        }
    };
    if let Some(offers) = offers {
        tokio::spawn(apply_offers(offers, node.clone()));
    }
    // Before the ready port opens: the enrollment socket is bound already.
    match args.cni.installer(&args.cni_socket) {
        Ok(Some(installer)) => {
            let mut chaining = cni::Chaining::new(installer);
            chaining.check().await;
            tokio::spawn(chaining.keep());
        }
        Ok(None) => {}
        Err(err) => {
            let _ = started.send(Err(err));
            return;
        }
    }
    let recorder = admin.metrics.clone();
    tokio::spawn(weft_api::endpoints::keep_up(
        weft_api::endpoints::UPKEEP_EVERY,
        move || {
            recorder.run_upkeep();
        },
    ));
    for ((address, route, observer), listener) in
        admin::addresses().into_iter().zip(admin_listeners)
    {
        match TcpListener::from_std(listener) {
            Ok(listener) => {
                let serving = Arc::clone(&admin).serve(listener, route, observer);
                let mut tenure = tenure.clone();
                tokio::spawn(async move {
                    if tenure.wait_for(|now| *now >= Tenure::Serving).await.is_ok() {
                        serving.await;
                    }
                });
            }
            Err(err) => {
                let _ = started.send(Err(anyhow::anyhow!("cannot listen on {address}: {err}")));
                return;
            }
        }
    }
    if let Some(path) = args.mesh_config.clone() {
        let node = node.clone();
        tokio::spawn(reload::on_change(path, RELOAD_INTERVAL, move |path| {
            let node = node.clone();
            async move {
                match MeshConfig::load(&path) {
                    Ok(mesh) => match node.set_mesh(mesh).await {
                        Ok(()) => {
                            log::info!("the mesh configuration from {} applies", path.display())
                        }
                        Err(err) => log::error!("applying {} failed: {err}", path.display()),
                    },
                    Err(err) => log::error!("{err}; keeping the last good mesh configuration"),
                }
            }
        }));
    }
    let certs = Arc::clone(&admin.certs);
    match (certificates, args.trust_bundle.clone(), args.certs.clone()) {
        (Some(manager), _, _) => {
            tokio::spawn(forget_superseded_connections(
                Arc::clone(&certs),
                Arc::clone(&proxy),
            ));
            tokio::spawn(manager.run(certs));
        }
        (None, Some(bundle), Some(certs_dir)) => {
            tokio::spawn(reload::on_change(
                certs_dir.clone(),
                RELOAD_INTERVAL,
                move |certs_dir| {
                    match CertStore::load(&bundle, &certs_dir) {
                        Ok(store) => {
                            log::info!(
                                "reloaded {} workload certificate(s)",
                                store.identities().len()
                            );
                            certs.replace(store);
                        }
                        Err(err) => log::error!("{err}; keeping the certificates loaded before"),
                    }
                    std::future::ready(())
                },
            ));
        }
        _ => {}
    }
    tokio::spawn(tidy(Arc::clone(&proxy)));
    let _ = started.send(Ok(proxy));
    let mut tenure = tenure;
    tokio::select! {
        () = cni::serve(listener, node) => {}
        // Returning drops the control runtime and every task on it: the subscription,
        // the certificates, the reloads, the admin endpoints. The new agent applies
        // the mesh to the kernel from now on, and this one must not undo it.
        _ = tenure.wait_for(|now| *now == Tenure::HandedOver) => {
            log::info!("the new agent serves the node: this agent's control side stops");
        }
    }
}

/// What start-up hands the control loop.
struct Started {
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    node: NodeHandle,
    listener: tokio::net::UnixListener,
    /// Versions from the controller, with `--controller`.
    offers: Option<mpsc::Receiver<Offer>>,
    /// The certificates from the controller's CA, with `--controller`.
    certificates: Option<Manager>,
}

/// Loads everything the agent needs before it may say it is ready. With a controller
/// and no cached configuration, that includes the first version from the controller:
/// until then the CNI socket is closed, so no pod starts unmeshed.
async fn start(args: &RunArgs, in_pod: Arc<InPod>) -> anyhow::Result<Started> {
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[
            0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
        ])
        .context("invalid histogram buckets")?
        // weft's own durations are in seconds, as Prometheus advises; Istio's keep
        // their milliseconds.
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_owned()),
            &[
                0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ],
        )
        .context("invalid histogram buckets")?
        // Istio's body sizes, by powers of ten as Istio buckets them.
        .set_buckets_for_metric(
            Matcher::Suffix("_bytes".to_owned()),
            &[1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9],
        )
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    proxy::metrics::describe();
    proxy::describe_requests();
    proxy::trace::describe();
    subscription::describe_metrics();
    cni::describe();
    weft_agent::process::describe();
    let mut first_offer = None;
    let mut offers = None;
    let mut subscription = None;
    let controller = args
        .controller
        .clone()
        .map(|url| {
            Controller::new(
                url,
                args.controller_ca.clone(),
                args.controller_identity.clone(),
                args.controller_token_file.clone(),
            )
            .map(Arc::new)
        })
        .transpose()?;
    let mesh = match (&args.mesh_config, &controller) {
        (Some(path), _) => MeshConfig::load(path)?,
        (None, Some(controller)) => {
            std::fs::create_dir_all(&args.state_dir).with_context(|| {
                format!(
                    "cannot create the state directory {}",
                    args.state_dir.display()
                )
            })?;
            files::remove_leftovers(&args.state_dir).with_context(|| {
                format!(
                    "cannot clean the state directory {}",
                    args.state_dir.display()
                )
            })?;
            let settings = subscription::Settings {
                controller: Arc::clone(controller),
                node: args.node.clone(),
                cache: args.state_dir.join("config.pb"),
            };
            let cached = subscription::load_cache(&settings.cache);
            let status = Arc::new(Current::new(subscription::Status::default()));
            let (sender, mut receiver) = mpsc::channel(1);
            let initial = cached.as_ref().map(|cached| {
                log::info!(
                    "serving the cached configuration {} until the controller answers",
                    cached.version
                );
                cached.mesh.clone()
            });
            tokio::spawn(subscription::run(
                settings,
                cached,
                sender,
                Arc::clone(&status),
            ));
            subscription = Some(status);
            let mesh = match initial {
                Some(mesh) => mesh,
                None => {
                    log::info!(
                        "waiting for the first configuration from {}",
                        controller.url()
                    );
                    let offer = receiver
                        .recv()
                        .await
                        .context("the subscription to the controller ended")?;
                    first_offer = Some(offer.done);
                    offer.mesh
                }
            };
            offers = Some(receiver);
            mesh
        }
        (None, None) => MeshConfig::default(),
    };
    let mesh = Arc::new(Current::new(mesh));
    let (store, certificates) = match (&controller, &args.trust_bundle, &args.certs) {
        (Some(controller), _, _) => {
            let settings = certificates::Settings {
                controller: Arc::clone(controller),
                node: args.node.clone(),
                cache_dir: args.state_dir.join("certs"),
            };
            let (manager, store) = Manager::start(settings, Arc::clone(&mesh)).await?;
            (store, Some(manager))
        }
        (None, Some(bundle), Some(dir)) => (CertStore::load(bundle, dir)?, None),
        _ => anyhow::bail!("give --controller, or --trust-bundle and --certs"),
    };
    let certs = Arc::new(Current::new(store));
    let target = CaptureTarget {
        ipv4: args.capture_address,
        ipv6: args.capture_address_v6,
        outbound_port: args.outbound_port,
    };
    let pins = Pins::new(&args.bpffs);
    let mut datapath = Datapath::start(pins.clone(), &args.pod_cgroup, target)?;
    datapath.forward_logs(log::logger())?;
    let enrolled = Arc::new(Current::new(Vec::new()));
    datapath.forward_flows(flow_sink(
        args.flow_log.as_deref(),
        Arc::clone(&mesh),
        Arc::clone(&enrolled),
    )?)?;
    let original_destinations = OriginalDestinations::open(&pins)?;
    let node = Node::start(
        datapath,
        Arc::clone(&mesh),
        &args.state_dir,
        Arc::clone(&in_pod),
    );
    if let Some(done) = first_offer {
        let _ = done.send(node.as_ref().map(drop).map_err(ToString::to_string));
    }
    let node = node?
        .spawn(enrolled)
        .context("cannot start the node's thread")?;
    let proxy = Arc::new(Proxy::new(
        args.node.clone(),
        Arc::clone(&mesh),
        Arc::clone(&certs),
        original_destinations,
        proxy_settings(args)?,
        Tracer::new(TraceSettings {
            endpoint: args.trace_endpoint.clone(),
            sampling: args.trace_sampling,
            queue: usize::try_from(args.trace_queue).unwrap_or(usize::MAX),
            node: args.node.clone(),
        })?,
        in_pod,
    ));
    let listener = cni::bind(&args.cni_socket)
        .with_context(|| format!("cannot listen on {}", args.cni_socket.display()))?;
    let admin = Arc::new(Admin {
        metrics,
        pins,
        mesh,
        certs,
        node: node.clone(),
        proxy: Arc::clone(&proxy),
        subscription,
    });
    Ok(Started {
        proxy,
        admin,
        node,
        listener,
        offers,
        certificates,
    })
}

/// Drops pooled HBONE connections made with a certificate the node no longer holds,
/// so that renewed certificates are used from now on.
async fn forget_superseded_connections(certs: Arc<Current<CertStore>>, proxy: Arc<Proxy>) {
    let mut replaced = certs.subscribe();
    while replaced.changed().await.is_ok() {
        let store = certs.get();
        for pool in proxy.pool.iter() {
            pool.retain(|key| store.serial(&key.source) == Some(key.certificate.as_str()));
        }
    }
}

/// The data path's settings from the flags, after setting the open-file limit they
/// derive from.
fn proxy_settings(args: &RunArgs) -> anyhow::Result<proxy::Settings> {
    let open_files = proxy::admission::set_open_files(args.open_files)
        .context("cannot set the open-file limit (RLIMIT_NOFILE)")?;
    let mut settings = proxy::Settings::new(open_files);
    settings.workers = args.workers();
    settings.splice = args.splice;
    settings.idle_timeout = args.idle_timeout;
    settings.connect_timeout = args.connect_timeout;
    settings.source_wait = args.source_wait;
    settings.detect_timeout = args.detect_timeout;
    settings.client_stall = args.client_stall_timeout;
    settings.access_log = AccessLog {
        mode: args.access_log,
        sampling: args.access_log_sampling,
    };
    let limits = &mut settings.limits;
    if let Some(per_source) = args.max_connections_per_source {
        limits.per_source = usize::try_from(per_source).unwrap_or(usize::MAX);
    }
    if let Some(pending) = args.max_pending_per_source {
        limits.pending_per_source = usize::try_from(pending).unwrap_or(usize::MAX);
    }
    limits.handshakes_per_source = args.max_handshakes_per_source;
    if let Some(window) = args.hbone_stream_window {
        settings.hbone.stream_window = window;
    }
    if let Some(window) = args.hbone_connection_window {
        settings.hbone.connection_window = window;
    }
    log::info!(
        "open-file limit {open_files}: at most {} connections, {} of them pending; {} per source, \
         {} of them pending, {} TLS handshakes a second",
        limits.total,
        limits.pending,
        limits.per_source,
        limits.pending_per_source,
        limits.handshakes_per_source
    );
    Ok(settings)
}

/// Every 10 s: forgets idle pooled HBONE connections (`hbone::Pool::release_idle`),
/// and gives the memory of connections gone back to the system once the agent holds
/// far fewer than it did, or the allocator keeps much free (`memory::give_back`).
async fn tidy(proxy: Arc<Proxy>) {
    /// Connections fewer than at the peak that are worth a trim (a few megabytes).
    const FEWER: usize = 256;
    let mut ticks = tokio::time::interval(Duration::from_secs(10));
    loop {
        ticks.tick().await;
        proxy.pool.iter().for_each(|pool| pool.release_idle());
        proxy.http_pool.iter().for_each(|pool| pool.release_idle());
        proxy
            .balancers
            .retain(&proxy.mesh.get().endpoint_addresses());
        proxy.budgets.retain_used();
        proxy.breakers.retain_used();
        let (peak, now) = proxy.admission.take_peak();
        if peak >= now + FEWER || memory::kept_free() > Some(memory::WORTH_A_TRIM) {
            memory::give_back();
        }
    }
}

/// Applies each version the controller sends and answers whether it took.
async fn apply_offers(mut offers: mpsc::Receiver<Offer>, node: NodeHandle) {
    while let Some(offer) = offers.recv().await {
        let result = node
            .set_mesh(offer.mesh)
            .await
            .map_err(|err| format!("applying it to this node failed: {err}"));
        if let Err(reason) = &result {
            log::error!("configuration {}: {reason}", offer.version);
        }
        let _ = offer.done.send(result);
    }
}

/// How often the configuration and certificate files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_millis(500);

/// Where kernel flows go: the flow log (`path`, or the log), and the watchers of
/// `weftctl observe`, with their addresses named from `mesh` and the `enrolled` pods.
fn flow_sink(
    path: Option<&Path>,
    mesh: Arc<Current<MeshConfig>>,
    enrolled: Arc<Current<Vec<Enrolled>>>,
) -> anyhow::Result<impl FnMut(Flow) + Send + 'static> {
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
        observe::report(flow.verdict, || {
            observe::kernel(&flow, &mesh.get(), &enrolled.get())
        });
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

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd as _;

    use super::*;

    #[test]
    fn taken_sockets_are_dealt_over_the_workers_per_address() {
        // The sockets taken (address, socket), the workers, each worker's sockets.
        type Case<'a> = (&'a [(&'a str, u32)], usize, &'a [&'a [u32]]);
        let cases: &[Case] = &[
            // Two workers before, two now: each keeps one socket of each address.
            (
                &[("v4", 1), ("v6", 2), ("v4", 3), ("v6", 4)],
                2,
                &[&[1, 2], &[3, 4]],
            ),
            // Two before, one now: it serves them all.
            (
                &[("v4", 1), ("v6", 2), ("v4", 3), ("v6", 4)],
                1,
                &[&[1, 2, 3, 4]],
            ),
            // One before, three now: the others bind their own.
            (&[("v4", 1), ("v6", 2)], 3, &[&[1, 2], &[], &[]]),
            // Three of one address over two.
            (&[("v4", 1), ("v4", 2), ("v4", 3)], 2, &[&[1, 3], &[2]]),
            (&[], 2, &[&[], &[]]),
        ];
        for (items, hands, dealt) in cases {
            assert_eq!(
                deal(items.to_vec(), *hands),
                *dealt,
                "{items:?} over {hands}"
            );
        }
    }

    #[test]
    fn a_worker_binds_only_the_addresses_it_took_no_socket_for() {
        let taken = listen(0, "test", Vec::new()).unwrap();
        let port = taken[0].local_addr().unwrap().port();
        let fd = taken[0].as_raw_fd();
        let again = listen(port, "test", taken).unwrap();
        assert_eq!(again[0].as_raw_fd(), fd, "the taken socket is kept");
        let addresses: Vec<_> = again.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut distinct = addresses.clone();
        distinct.dedup();
        assert_eq!(addresses, distinct, "one socket per address");
        assert_eq!(
            addresses[0],
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))
        );
    }

    #[test]
    fn every_worker_listens_on_the_port_and_the_kernel_spreads_connections_over_them() {
        let first = listen(0, "test", Vec::new()).unwrap();
        let port = first[0].local_addr().unwrap().port();
        let second = listen(port, "test", Vec::new()).unwrap();
        let (first, second) = (&first[0], &second[0]);
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap())
            .collect();
        let accept_all = |listener: &std::net::TcpListener| {
            std::iter::from_fn(|| listener.accept().ok()).count()
        };
        let counts = (accept_all(first), accept_all(second));
        assert_eq!(counts.0 + counts.1, clients.len(), "{counts:?}");
        // All 64 on one socket: a chance of 2^-63 with a fair hash.
        assert!(counts.0 > 0 && counts.1 > 0, "{counts:?}");
    }

    fn run_args(extra: &[&str]) -> Result<RunArgs, String> {
        let mut argv = vec![
            "weft-agent",
            "run",
            "--node",
            "n",
            "--pod-cgroup",
            "/sys/fs/cgroup/pods",
            "--capture-address",
            "10.0.0.1",
            "--controller",
            "https://10.0.0.2:15010",
        ];
        argv.extend(extra);
        match Cli::try_parse_from(argv)
            .map_err(|err| err.to_string())?
            .command
        {
            Command::Run(args) => Ok(*args),
            Command::Uninstall { .. } | Command::Hold { .. } => unreachable!("run was asked for"),
        }
    }

    #[test]
    fn bad_numbers_are_refused_with_a_reason_not_a_panic() {
        let refused = |extra: &[&str]| run_args(extra).unwrap_err();
        assert!(refused(&["--workers", "0"]).contains("--workers"));
        for bad in ["1e20", "-1", "NaN", "inf", "2d", "25h"] {
            let message = refused(&["--drain-timeout", bad]);
            assert!(message.contains(bad), "{bad}: {message}");
        }
        assert!(refused(&["--idle-timeout", "soon"]).contains("not a duration"));
        assert!(refused(&["--open-files", "10"]).contains("--open-files"));
        assert!(refused(&["--hbone-stream-window", "1024"]).contains("--hbone-stream-window"));
        assert!(
            refused(&["--hbone-connection-window", "2147483648"])
                .contains("--hbone-connection-window")
        );
    }

    #[test]
    fn durations_are_seconds_or_gateway_durations() {
        let args = run_args(&[
            "--drain-timeout",
            "0.5",
            "--idle-timeout",
            "10m",
            "--connect-timeout",
            "2s",
        ])
        .unwrap();
        assert_eq!(args.drain_timeout, Duration::from_millis(500));
        assert_eq!(args.idle_timeout, Duration::from_secs(600));
        assert_eq!(args.connect_timeout, Duration::from_secs(2));
        let defaults = run_args(&[]).unwrap();
        assert_eq!(defaults.client_stall_timeout, Duration::from_secs(60));
        assert_eq!(
            (
                defaults.drain_timeout,
                defaults.idle_timeout,
                defaults.connect_timeout,
                defaults.source_wait,
                defaults.workers
            ),
            (
                Duration::from_secs(30),
                Duration::from_secs(3600),
                Duration::from_secs(10),
                Duration::from_secs(5),
                None
            )
        );
    }
}
