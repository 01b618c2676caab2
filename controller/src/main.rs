//! `weft-controller`: watches the cluster (or a directory of its YAML objects),
//! compiles each node's view and streams it to the agents, and signs their workload
//! certificates; `weft-controller crds` writes weft's CustomResourceDefinitions and
//! `weft-controller ca rotate` replaces the mesh root.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::{net::TcpListener, sync::watch};
use weft_controller::{
    admin::{ADMIN_PORT, Admin},
    auth::NodeAuthenticator,
    ca::{
        Authority,
        runtime::{self, Runtime},
        service::CaService,
        store::Store,
    },
    compile::Settings,
    lease::{Elector, Timing},
    pipeline::{self, Published},
    serving::{self, ServingCert},
    source::{
        files::{self, Files},
        kubernetes::{self, TokenReviewer},
    },
    stream::{ConfigService, Nodes},
};

#[derive(Debug, Parser)]
#[command(version, about = "weft's cluster controller")]
struct Cli {
    /// Log filter (env_logger syntax), e.g. `info,weft_controller=debug`.
    #[arg(long, env = "WEFT_LOG", default_value = "info", global = true)]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controller.
    Run(Box<RunArgs>),
    /// Write weft's CustomResourceDefinitions as YAML files into a directory.
    Crds {
        /// Where to write them (one file per CRD).
        #[arg(long, default_value = "deploy/crds")]
        out: PathBuf,
    },
    /// Manage the mesh certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Replace weft's self-signed root with a new one. The running controller trusts
    /// both at once, signs with the new root once every agent trusts it, and drops the
    /// old one when the overlap ends; agents renew their certificates before then.
    Rotate {
        #[command(flatten)]
        store: CaStoreArgs,
        /// How long the old root stays trusted (e.g. `24h`, `90m`); make it longer than
        /// the certificate lifetime.
        #[arg(long, value_parser = parse_duration, default_value = "48h")]
        overlap: Duration,
    },
}

#[derive(Clone, Debug, clap::Args)]
struct CaStoreArgs {
    /// Keep the CA in this directory (tls.crt, tls.key, ca.crt, as a cert-manager CA
    /// Secret holds them) instead of a Kubernetes Secret; needed with --files. Put your
    /// own intermediate there to sign with it; without one, a root is created.
    #[arg(long, env = "WEFT_CA_DIR")]
    ca_dir: Option<PathBuf>,
    /// The Secret that keeps the CA, with the Kubernetes source.
    #[arg(long, env = "WEFT_CA_SECRET", default_value = "weft-ca")]
    ca_secret: String,
    /// The namespace of that Secret (the controller's own).
    #[arg(long, env = "WEFT_CA_NAMESPACE", default_value = "weft-system")]
    ca_namespace: String,
}

impl CaStoreArgs {
    async fn store(&self) -> anyhow::Result<Store> {
        Ok(match &self.ca_dir {
            Some(dir) => Store::Dir(dir.clone()),
            None => Store::Secret {
                client: kube::Client::try_default().await.context(
                    "cannot reach the Kubernetes API to keep the CA in a Secret; give --ca-dir DIR to keep it in files",
                )?,
                namespace: self.ca_namespace.clone(),
                name: self.ca_secret.clone(),
            },
        })
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    weft_api::crd::parse_duration(text)
        .filter(|duration| !duration.is_zero())
        .ok_or_else(|| format!("{text:?} is not a duration such as 24h, 90m or 30s"))
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Read the cluster from these YAML files or directories instead of the
    /// Kubernetes API (repeatable); they are reread when they change.
    #[arg(long = "files", env = "WEFT_FILES", value_delimiter = ',')]
    files: Vec<PathBuf>,
    /// Where agents subscribe (gRPC).
    #[arg(long, env = "WEFT_LISTEN", default_value = "0.0.0.0:15010")]
    listen: SocketAddr,
    /// Metrics, `/status` and readiness.
    #[arg(long, env = "WEFT_ADMIN", default_value_t = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT)))]
    admin: SocketAddr,
    /// Directory of node credentials: `<node>.token` holds the token node `<node>`'s
    /// agent presents. Without it, and with the Kubernetes source, agents present a
    /// pod-bound service account token checked with a TokenReview.
    #[arg(long, env = "WEFT_NODE_TOKENS")]
    node_tokens: Option<PathBuf>,
    /// The agents' service account (`<namespace>/<name>`): only its tokens prove a
    /// node, with the Kubernetes source.
    #[arg(
        long,
        env = "WEFT_AGENT_SERVICE_ACCOUNT",
        default_value = "weft-system/weft-agent"
    )]
    agent_service_account: String,
    /// The audience agents' service account tokens are projected for.
    #[arg(long, env = "WEFT_TOKEN_AUDIENCE", default_value = "weft")]
    token_audience: String,
    /// Serve agents without TLS (tests only: node tokens then cross the network in
    /// the clear).
    #[arg(long, env = "WEFT_PLAINTEXT")]
    plaintext: bool,
    /// Let any agent subscribe as any node, without a credential (tests only).
    #[arg(long, env = "WEFT_INSECURE_NODES", conflicts_with = "node_tokens")]
    insecure_nodes: bool,
    /// The trust domain of the mesh's SPIFFE identities.
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Policies without a selector in this namespace apply to the whole mesh.
    #[arg(long, env = "WEFT_ROOT_NAMESPACE", default_value = "weft-system")]
    root_namespace: String,
    /// Destination ports never captured (repeatable or comma-separated).
    #[arg(
        long = "exclude-port",
        env = "WEFT_EXCLUDE_PORTS",
        value_delimiter = ','
    )]
    exclude_ports: Vec<u16>,
    #[command(flatten)]
    ca: CaStoreArgs,
    /// How long the workload certificates the CA issues are valid; agents renew them
    /// at half-life.
    #[arg(long, env = "WEFT_CERT_TTL", value_parser = parse_duration, default_value = "24h")]
    cert_ttl: Duration,
    /// The longest a new root waits for every connected agent to trust it before it
    /// signs anyway.
    #[arg(long, env = "WEFT_ROOT_PROPAGATION_GRACE", value_parser = parse_duration, default_value = "5m")]
    root_propagation_grace: Duration,
    /// How often the files are checked for changes, in milliseconds.
    #[arg(long, env = "WEFT_FILE_INTERVAL_MS", default_value_t = 200)]
    file_interval_ms: u64,
    /// With the Kubernetes source, replicas elect a leader over the Lease of this name
    /// in the controller's namespace (`--ca-namespace`): only the leader writes
    /// status; every replica serves agents and signs their certificates.
    #[arg(long, env = "WEFT_LEASE", default_value = "weft-controller")]
    lease: String,
    /// This replica's name in the election: its pod's name (Kubernetes also sets
    /// HOSTNAME to it).
    #[arg(long, env = "WEFT_POD_NAME")]
    pod_name: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    env_logger::Builder::new()
        .parse_filters(&cli.log)
        .format_timestamp_millis()
        .init();
    match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("cannot start the runtime")?
            .block_on(run(*args)),
        Command::Crds { out } => {
            std::fs::create_dir_all(&out)
                .with_context(|| format!("cannot create {}", out.display()))?;
            for (file, yaml) in weft_api::crd::manifests() {
                let path = out.join(file);
                std::fs::write(&path, yaml)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Ca {
            command: CaCommand::Rotate { store, overlap },
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the runtime")?
            .block_on(rotate(store, overlap)),
    }
}

/// Writes a new root into the store; the running controller takes it from there.
async fn rotate(args: CaStoreArgs, overlap: Duration) -> anyhow::Result<()> {
    let store = args.store().await?;
    let (material, revision) = store
        .read()
        .await?
        .with_context(|| format!("the {store} holds no CA yet; start the controller first"))?;
    let rotated = Authority::rotate(&material, std::time::SystemTime::now(), overlap)?;
    store.replace(&rotated, revision).await?;
    let new_root = Authority::load(&rotated, std::time::SystemTime::now())?
        .signing_root()
        .subject
        .clone();
    println!(
        "rotated the mesh root in the {store}: new root {new_root}; the old one stays trusted for {overlap:?}"
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let metrics = PrometheusBuilder::new()
        .set_buckets(&[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0])
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    describe_metrics();
    let settings = Settings {
        trust_domain: args.trust_domain.clone(),
        root_namespace: args.root_namespace,
        exclude_ports: args.exclude_ports,
    };
    let (objects_tx, objects_rx) = watch::channel(Arc::default());
    let (published_tx, published_rx) = watch::channel(Published::default());
    let (statuses_tx, statuses_rx) = watch::channel(Arc::default());
    let client = if args.files.is_empty() {
        Some(
            kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (in-cluster or KUBECONFIG); use --files to run from YAML files")?,
        )
    } else {
        None
    };
    let auth = Arc::new(match (args.node_tokens, &client) {
        (Some(dir), _) => NodeAuthenticator::TokenFiles { dir },
        (None, _) if args.insecure_nodes => {
            log::warn!("--insecure-nodes: any agent may subscribe as any node");
            NodeAuthenticator::Insecure
        }
        (None, Some(client)) => NodeAuthenticator::Kubernetes(TokenReviewer::new(
            client.clone(),
            args.token_audience.clone(),
            &args.agent_service_account,
        )),
        (None, None) => anyhow::bail!(
            "the file source needs node credentials: give --node-tokens DIR (or --insecure-nodes for tests)"
        ),
    });
    let (files, unread) = match &client {
        Some(client) => {
            let (unread_tx, unread_rx) = watch::channel(Default::default());
            tokio::spawn(kubernetes::run(client.clone(), objects_tx, unread_tx));
            let identity = args
                .pod_name
                .clone()
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "weft-controller".to_owned());
            let (leading_tx, leading_rx) = watch::channel(false);
            let elector = Elector::new(
                client.clone(),
                &args.ca.ca_namespace,
                &args.lease,
                &identity,
                Timing::default(),
            );
            tokio::spawn(elector.run(leading_tx));
            tokio::spawn(kubernetes::write_statuses(
                client.clone(),
                statuses_rx.clone(),
                objects_rx.clone(),
                leading_rx,
            ));
            (None, Some(unread_rx))
        }
        None => {
            let (files_tx, files_rx) = watch::channel(Vec::new());
            tokio::spawn(files::run(
                Files::new(args.files.clone()),
                objects_tx,
                files_tx,
                Duration::from_millis(args.file_interval_ms),
            ));
            (Some(files_rx), None)
        }
    };
    if client.is_none() && args.ca.ca_dir.is_none() {
        anyhow::bail!("the file source keeps the mesh CA in files: give --ca-dir DIR");
    }
    let ca_store = args.ca.store().await?;
    let material = runtime::load_or_create(&ca_store).await?;
    let authority = Arc::new(
        Authority::load(&material, std::time::SystemTime::now())
            .with_context(|| format!("the CA in the {ca_store} cannot be used"))?,
    );
    log::info!(
        "mesh CA from the {ca_store}: signing under {}",
        authority.signing_root().subject
    );
    // Mid-rotation (after a restart), the previous root signs until agents trust the new one.
    let propagated = !authority.rotating();
    let (trust_tx, trust_rx) = watch::channel(Arc::new(authority.trust_bundle(propagated)));
    let (ca_state_tx, ca_state_rx) = watch::channel(Arc::new(runtime::CaState {
        authority,
        propagated,
    }));
    let (ca_status_tx, ca_status_rx) = watch::channel(None);
    tokio::spawn(pipeline::run(
        objects_rx.clone(),
        trust_rx,
        settings,
        published_tx,
        statuses_tx,
    ));

    let nodes = Arc::new(Nodes::default());
    tokio::spawn(
        Runtime {
            store: ca_store,
            published: published_rx.clone(),
            nodes: Arc::clone(&nodes),
            trust: trust_tx,
            state: ca_state_tx,
            status: ca_status_tx,
            grace: args.root_propagation_grace,
        }
        .run(material),
    );
    let recorder = metrics.clone();
    tokio::spawn(weft_api::endpoints::keep_up(
        weft_api::endpoints::UPKEEP_EVERY,
        move || {
            recorder.run_upkeep();
        },
    ));
    let admin = Arc::new(Admin {
        metrics,
        published: published_rx.clone(),
        objects: objects_rx.clone(),
        statuses: statuses_rx,
        files,
        unread,
        nodes: Arc::clone(&nodes),
        ca: ca_status_rx,
    });
    let admin_listener = TcpListener::bind(args.admin)
        .await
        .with_context(|| format!("cannot listen on {} (admin)", args.admin))?;
    tokio::spawn(admin.serve(admin_listener));

    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (config stream)", args.listen))?;
    let source = if args.files.is_empty() {
        "the Kubernetes API".to_owned()
    } else {
        args.files
            .iter()
            .map(|path| path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    log::info!(
        "weft-controller {} serving the config stream on {}, status on {}; reading {source}",
        env!("CARGO_PKG_VERSION"),
        args.listen,
        args.admin,
    );
    let ca = CaService {
        state: ca_state_rx.clone(),
        objects: objects_rx.clone(),
        auth: Arc::clone(&auth),
        trust_domain: args.trust_domain.clone(),
        ttl: args.cert_ttl,
    }
    .into_server();
    let service = ConfigService::new(published_rx, auth, nodes).into_server();
    let serving = if args.plaintext {
        log::warn!("--plaintext: agents' node tokens cross the network in the clear");
        None
    } else {
        let identity = format!(
            "spiffe://{}/ns/{}/sa/weft-controller",
            args.trust_domain, args.ca.ca_namespace
        );
        let cert = ServingCert::new(identity, &ca_state_rx.borrow())?;
        tokio::spawn(Arc::clone(&cert).keep_renewed(ca_state_rx.clone()));
        Some(cert.server_config())
    };
    let shutdown = async {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("a SIGTERM handler");
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        log::info!("stopping");
    };
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(service)
        .add_service(ca);
    match serving {
        Some(config) => {
            router
                .serve_with_incoming_shutdown(serving::incoming(grpc, config), shutdown)
                .await
        }
        None => {
            router
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(grpc),
                    shutdown,
                )
                .await
        }
    }
    .context("the config stream server failed")
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "weft_controller_generation",
        "Compiles since the controller started"
    );
    describe_histogram!(
        "weft_controller_compile_seconds",
        "Time to compile the cluster's objects into every node's view"
    );
    describe_gauge!(
        "weft_controller_objects",
        "Objects the controller reads, by kind"
    );
    describe_gauge!(
        "weft_controller_node_in_sync",
        "1 when the node's agent serves the node's current view"
    );
    describe_gauge!(
        "weft_controller_node_acked_generation",
        "The generation whose view the node's agent acknowledged last"
    );
    describe_gauge!(
        "weft_controller_node_streams",
        "Config streams open for the node"
    );
    describe_counter!(
        "weft_controller_config_updates_total",
        "Updates sent to agents, by type (snapshot, delta)"
    );
    describe_counter!(
        "weft_controller_config_rejections_total",
        "Versions an agent rejected, by node"
    );
    describe_counter!(
        "weft_controller_certificates_issued_total",
        "Workload certificates the CA signed"
    );
    describe_counter!(
        "weft_controller_certificate_refusals_total",
        "Certificate requests refused, by reason (unauthenticated, invalid_request, foreign_identity)"
    );
    describe_counter!(
        "weft_controller_subscriptions_refused_total",
        "Subscriptions refused for a missing or wrong node credential"
    );
}
