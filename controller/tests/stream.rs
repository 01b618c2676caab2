//! The config stream over real gRPC on loopback, at scale: a cluster of 10,000
//! services, 100,000 endpoints and 50 nodes is compiled and streamed to 50 subscribed
//! agents, each gets its snapshot, then a one-resource delta when an endpoint goes,
//! and the controller's status follows their acknowledgements. node0's snapshot and
//! delta then go through the agent's own code, as a subscribed agent applies them:
//! what holding the view costs it, in memory and in time. Times and memory are
//! printed for the record; thresholds belong in the benchmark.

#[path = "support/grpc.rs"]
mod grpc;
#[path = "support/large.rs"]
mod large;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::service::Routes;
use weft_agent::mesh::resources::Resources;
use weft_api::config::v1::{
    Ack, AgentMessage, ConfigUpdate, Hello, MAX_UPDATE_BYTES, Nack, agent_message::Message,
    config_discovery_client::ConfigDiscoveryClient,
};
use weft_controller::{
    auth::NodeAuthenticator,
    compile::{Settings, compile},
    objects::{Object, ObjectKey},
    pipeline::Published,
    stream::{ConfigService, Nodes},
};

/// The system allocator, counting the bytes allocated and not yet freed: what a
/// structure built in between holds.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call goes to the system allocator with the caller's arguments; the
// counter only adds what it allocated and subtracts what it freed.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller promised `alloc`.
        let allocated = unsafe { System.alloc(layout) };
        if !allocated.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        allocated
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the caller promised `alloc_zeroed`.
        let allocated = unsafe { System.alloc_zeroed(layout) };
        if !allocated.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        allocated
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: as the caller promised `dealloc`.
        unsafe { System.dealloc(pointer, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, size: usize) -> *mut u8 {
        // SAFETY: as the caller promised `realloc`.
        let moved = unsafe { System.realloc(pointer, layout, size) };
        if !moved.is_null() {
            LIVE_BYTES.fetch_add(size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        moved
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_mib() -> f64 {
    LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1 << 20) as f64
}

const NODES: usize = 50;
const SERVICES: usize = 10_000;
const PODS_PER_SERVICE: usize = 10;

/// One subscribed agent: what it sends and what it receives.
struct Agent {
    outgoing: mpsc::Sender<AgentMessage>,
    updates: tonic::Streaming<ConfigUpdate>,
}

impl Agent {
    async fn subscribe(address: std::net::SocketAddr, node: &str, serving: &str) -> Self {
        let mut client = ConfigDiscoveryClient::connect(format!("http://{address}"))
            .await
            .expect("the controller accepts connections")
            .max_decoding_message_size(MAX_UPDATE_BYTES);
        let (outgoing, receiver) = mpsc::channel(4);
        outgoing
            .send(AgentMessage {
                message: Some(Message::Hello(Hello {
                    node: node.to_owned(),
                    serving_version: serving.to_owned(),
                    agent_version: "test".to_owned(),
                })),
            })
            .await
            .unwrap();
        let updates = client
            .subscribe(ReceiverStream::new(receiver))
            .await
            .expect("the subscription is accepted")
            .into_inner();
        Self { outgoing, updates }
    }

    async fn next(&mut self) -> ConfigUpdate {
        tokio::time::timeout(Duration::from_secs(60), self.updates.next())
            .await
            .expect("an update within a minute")
            .expect("the stream is open")
            .expect("the update is well formed")
    }

    async fn reply(&self, message: Message) {
        self.outgoing
            .send(AgentMessage {
                message: Some(message),
            })
            .await
            .unwrap();
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// node0's view as its agent holds it: the resources as received and the mesh
/// configuration the agent serves from, built from the snapshot and rebuilt on the delta
/// and on its undoing, five times each (as `weft_agent::subscription` does), the cache
/// it writes of each version, and the per-connection lookups against it beside the same
/// lookups in a view of 10 services.
fn agent_holds_the_view(snapshot: &ConfigUpdate, delta: &ConfigUpdate) {
    let before = live_mib();
    let started = Instant::now();
    let mut resources = Resources::default();
    resources.apply(snapshot).unwrap();
    let mesh = resources.mesh().expect("the agent takes the view");
    // The lookup indexes are built on first use.
    let pod = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 31));
    assert!(mesh.workload_by_ip(pod).is_some());
    eprintln!(
        "agent view: snapshot applied and the mesh built in {:.0} ms; resources and mesh hold {:.1} MiB",
        started.elapsed().as_secs_f64() * 1000.0,
        live_mib() - before
    );

    // The delta, and the same resource as the snapshot had it, in turn: a change each
    // time, timed until the new version answers its first lookup.
    let key = delta.upserts[0].key.clone();
    let undo = ConfigUpdate {
        version: "undone".into(),
        snapshot: false,
        upserts: snapshot
            .upserts
            .iter()
            .filter(|resource| resource.key == key)
            .cloned()
            .collect(),
        removals: Vec::new(),
    };
    assert_eq!(undo.upserts.len(), 1);
    let held = live_mib();
    let mut times = Vec::new();
    let mut added = 0.0;
    for round in 0..10 {
        let update = if round % 2 == 0 { delta } else { &undo };
        let started = Instant::now();
        resources.apply(update).unwrap();
        let changed = resources.mesh().expect("the agent takes the delta");
        let (service, _) = changed.service_named("ns3", "svc3", 80).unwrap();
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        let endpoints = PODS_PER_SERVICE - usize::from(round % 2 == 0);
        assert_eq!(service.endpoints.len(), endpoints);
        added = live_mib() - held;
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "agent view: one-endpoint delta applied, the mesh rebuilt and indexed in {:.1} ms (median of 10; {:.1}–{:.1}); the new version adds {added:.1} MiB while the old one lives",
        times[5], times[0], times[9]
    );
    // What the agent writes to its cache after each version it applies.
    let started = Instant::now();
    let cache = resources.snapshot("cached").encode_to_vec();
    eprintln!(
        "agent view: the cache of a version encoded in {:.1} ms, {:.1} MiB to write",
        started.elapsed().as_secs_f64() * 1000.0,
        cache.len() as f64 / (1 << 20) as f64
    );

    let small = compile(
        &large::cluster(2, 10, PODS_PER_SERVICE),
        &Settings::default(),
        &Default::default(),
    )
    .view("node0")
    .snapshot();
    let mut small_resources = Resources::default();
    small_resources.apply(&small).unwrap();
    let small = small_resources.mesh().unwrap();
    let vip = IpAddr::V4(Ipv4Addr::new(10, 96, 0, 3));
    for (name, view) in [("10 services", &small), ("10,000 services", &mesh)] {
        assert!(view.service_at(vip, 80).is_some() && view.workload_by_ip(pod).is_some());
        const LOOKUPS: u32 = 200_000;
        let started = Instant::now();
        for _ in 0..LOOKUPS {
            black_box(view.workload_by_ip(black_box(pod)));
            black_box(view.service_at(black_box(vip), 80));
        }
        eprintln!(
            "agent view: a connection's lookups (its pod, its service) with {name}: {:.0} ns",
            started.elapsed().as_secs_f64() * 1e9 / f64::from(LOOKUPS)
        );
    }
}

async fn wait_for(what: &str, nodes: &Nodes, done: impl Fn(&Nodes) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(nodes) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:#?}",
            nodes.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_cluster_compiles_and_streams_to_every_node() {
    let mut objects = large::cluster(NODES, SERVICES, PODS_PER_SERVICE);
    let settings = Settings::default();
    let started = Instant::now();
    let compiled = compile(&objects, &settings, &Default::default());
    eprintln!(
        "compile: {SERVICES} services, {} endpoints, {NODES} nodes in {:.0} ms; {} shared resources, {:.1} MiB encoded",
        SERVICES * PODS_PER_SERVICE,
        started.elapsed().as_secs_f64() * 1000.0,
        compiled.shared.len(),
        compiled.shared.encoded_size() as f64 / (1 << 20) as f64
    );
    let expected = compiled.view("node0").snapshot().upserts.len();
    assert_eq!(
        expected,
        1 + NODES + large::NAMESPACES + SERVICES * PODS_PER_SERVICE + SERVICES
    );

    let (published, receiver) = watch::channel(Published {
        generation: 1,
        compiled: Arc::new(compiled),
        sources: Default::default(),
        trust: Default::default(),
    });
    let nodes = Arc::new(Nodes::default());
    let service = ConfigService::new(
        receiver,
        Arc::new(NodeAuthenticator::Insecure),
        Arc::clone(&nodes),
    )
    .into_server();
    let address = grpc::serve(Routes::new(service)).await;

    // Every node subscribes and gets its whole view.
    let started = Instant::now();
    let mut agents = Vec::new();
    for node in 0..NODES {
        agents.push(Agent::subscribe(address, &format!("node{node}"), "").await);
    }
    let mut version = String::new();
    let mut node0_snapshot = None;
    for agent in &mut agents {
        let snapshot = agent.next().await;
        assert!(snapshot.snapshot);
        assert_eq!(snapshot.upserts.len(), expected);
        version = snapshot.version.clone();
        node0_snapshot.get_or_insert_with(|| snapshot.clone());
        agent
            .reply(Message::Ack(Ack {
                version: snapshot.version,
            }))
            .await;
    }
    wait_for("every node in sync", &nodes, |nodes| {
        let all = nodes.snapshot();
        all.len() == NODES
            && all
                .values()
                .all(|node| node.in_sync && node.acked_generation == Some(1))
    })
    .await;
    eprintln!(
        "stream: {NODES} snapshots of {expected} resources sent and acknowledged in {:.0} ms",
        started.elapsed().as_secs_f64() * 1000.0
    );

    // An endpoint goes: every node gets exactly the one service that changed.
    let key = ObjectKey::new("ns3", "svc3-slice");
    let mut slice = objects.endpoint_slices[&key].as_ref().clone();
    slice.endpoints.pop();
    objects.upsert(Object::EndpointSlice(Arc::new(slice)));
    let started = Instant::now();
    published.send_replace(Published {
        generation: 2,
        compiled: Arc::new(compile(&objects, &settings, &Default::default())),
        sources: Default::default(),
        trust: Default::default(),
    });
    let mut node0_delta = None;
    for agent in &mut agents {
        let delta = agent.next().await;
        node0_delta.get_or_insert_with(|| delta.clone());
        assert!(!delta.snapshot);
        let names: Vec<&str> = delta
            .upserts
            .iter()
            .map(|resource| resource.key.as_ref().unwrap().name.as_str())
            .collect();
        assert_eq!(names, ["ns3/svc3"]);
        assert!(delta.removals.is_empty());
        assert_ne!(delta.version, version);
        agent
            .reply(Message::Ack(Ack {
                version: delta.version,
            }))
            .await;
    }
    wait_for("every node at generation 2", &nodes, |nodes| {
        nodes
            .snapshot()
            .values()
            .all(|node| node.in_sync && node.acked_generation == Some(2))
    })
    .await;
    eprintln!(
        "delta: recompiled and acknowledged by {NODES} nodes in {:.0} ms; peak RSS of the test process {:.0} MiB",
        started.elapsed().as_secs_f64() * 1000.0,
        peak_rss_mib()
    );
    agent_holds_the_view(&node0_snapshot.unwrap(), &node0_delta.unwrap());

    // A rejection is recorded with its reason, and the node is not in sync.
    let current = nodes.snapshot()["node0"].version.clone();
    agents[0]
        .reply(Message::Nack(Nack {
            version: current.clone(),
            reason: "Service ns3/svc3: testing".into(),
        }))
        .await;
    agents[0]
        .reply(Message::Ack(Ack {
            version: "something-older".into(),
        }))
        .await;
    wait_for("the rejection", &nodes, |nodes| {
        let node0 = &nodes.snapshot()["node0"];
        node0
            .last_nack
            .as_ref()
            .is_some_and(|(_, reason)| reason.contains("testing"))
            && !node0.in_sync
    })
    .await;

    // An agent that resubscribes with the current version is told so, not resent all.
    let mut again = Agent::subscribe(address, "node1", &current).await;
    let update = again.next().await;
    assert!(!update.snapshot && update.upserts.is_empty() && update.removals.is_empty());
    assert_eq!(update.version, current);
    wait_for("two streams for node1", &nodes, |nodes| {
        nodes.snapshot()["node1"].streams == 2
    })
    .await;
    drop(again);
    wait_for("the closed stream to be counted", &nodes, |nodes| {
        nodes.snapshot()["node1"].streams == 1
    })
    .await;
}
