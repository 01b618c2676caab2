//! The configuration stream (`weft.config.v1.ConfigDiscovery`): each agent subscribes
//! for its node with its credential, gets a snapshot of its view (or, when it already
//! serves the current version, just that version), then a delta whenever its view
//! changes, and acknowledges or rejects each version. [`Nodes`] keeps what every node
//! was sent and acknowledged, for `/status` and the metrics.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use futures::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use weft_api::config::v1::{
    AgentMessage, ConfigUpdate,
    agent_message::Message,
    config_discovery_server::{ConfigDiscovery, ConfigDiscoveryServer},
};

use crate::{
    auth::{NodeAuthenticator, bearer_token},
    pipeline::Published,
    view::NodeView,
};

/// How long an agent may take to say hello after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the controller knows of one node's agent.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Streams open now (more than one: an agent restarting, or two agents claiming
    /// the node).
    pub streams: usize,
    pub agent_version: String,
    /// The version of the node's current view, and the generation it was computed in.
    pub version: String,
    pub generation: u64,
    /// What the agent acknowledged last, and the generation whose view that was.
    pub acked_version: Option<String>,
    pub acked_generation: Option<u64>,
    /// The agent serves the node's current view.
    pub in_sync: bool,
    /// The last rejection: version and the agent's reason.
    pub last_nack: Option<(String, String)>,
    #[serde(with = "unix_seconds")]
    pub last_change: Option<SystemTime>,
}

mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(
        time: &Option<SystemTime>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match time.and_then(|time| time.duration_since(UNIX_EPOCH).ok()) {
            Some(since) => serializer.serialize_f64(since.as_secs_f64()),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        let seconds: Option<f64> = serde::Deserialize::deserialize(deserializer)?;
        Ok(seconds
            .and_then(|seconds| std::time::Duration::try_from_secs_f64(seconds).ok())
            .map(|since| UNIX_EPOCH + since))
    }
}

/// Every node's status, shared by the streams and the admin endpoints.
#[derive(Debug, Default)]
pub struct Nodes(Mutex<BTreeMap<String, NodeStatus>>);

impl Nodes {
    pub fn snapshot(&self) -> BTreeMap<String, NodeStatus> {
        self.0.lock().expect("node status lock").clone()
    }

    /// Whether every node with a stream open has acknowledged a view of `generation`
    /// or later.
    pub fn all_acked(&self, generation: u64) -> bool {
        self.0
            .lock()
            .expect("node status lock")
            .values()
            .filter(|status| status.streams > 0)
            .all(|status| {
                status
                    .acked_generation
                    .is_some_and(|acked| acked >= generation)
            })
    }

    fn update(&self, node: &str, change: impl FnOnce(&mut NodeStatus)) {
        let mut nodes = self.0.lock().expect("node status lock");
        let status = nodes.entry(node.to_owned()).or_default();
        change(status);
        status.in_sync = status.acked_version.as_deref() == Some(status.version.as_str());
        status.last_change = Some(SystemTime::now());
        metrics::gauge!("weft_controller_node_in_sync", "node" => node.to_owned())
            .set(f64::from(u8::from(status.in_sync)));
        if let Some(generation) = status.acked_generation {
            metrics::gauge!("weft_controller_node_acked_generation", "node" => node.to_owned())
                .set(generation as f64);
        }
        metrics::gauge!("weft_controller_node_streams", "node" => node.to_owned())
            .set(status.streams as f64);
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct ConfigService {
    published: watch::Receiver<Published>,
    auth: Arc<NodeAuthenticator>,
    nodes: Arc<Nodes>,
}

impl ConfigService {
    pub fn new(
        published: watch::Receiver<Published>,
        auth: Arc<NodeAuthenticator>,
        nodes: Arc<Nodes>,
    ) -> Self {
        Self {
            published,
            auth,
            nodes,
        }
    }

    pub fn into_server(self) -> ConfigDiscoveryServer<Self> {
        ConfigDiscoveryServer::new(self)
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigDiscovery for ConfigService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let token = bearer_token(request.metadata());
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |addr| addr.to_string());
        let mut incoming = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, incoming.next()).await {
            Ok(Some(Ok(AgentMessage {
                message: Some(Message::Hello(hello)),
            }))) => hello,
            Ok(Some(Err(status))) => return Err(status),
            Err(_) => {
                return Err(Status::deadline_exceeded(
                    "no hello within 10 s: the first message must be a Hello",
                ));
            }
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello naming the node",
                ));
            }
        };
        if let Err(err) = self.auth.authenticate(&hello.node, token.as_deref()).await {
            log::warn!(
                "refused a subscription from {peer} for node {:?}: {err}",
                hello.node
            );
            metrics::counter!("weft_controller_subscriptions_refused_total").increment(1);
            return Err(Status::permission_denied(err.to_string()));
        }
        log::info!(
            "node {} subscribed from {peer} (agent {}, serving {})",
            hello.node,
            hello.agent_version,
            if hello.serving_version.is_empty() {
                "nothing yet"
            } else {
                hello.serving_version.as_str()
            }
        );
        let node = hello.node.clone();
        self.nodes.update(&node, |status| {
            status.streams += 1;
            status.agent_version = hello.agent_version.clone();
        });

        let (updates, receiver) = mpsc::channel(4);
        let stream = Subscription {
            node: node.clone(),
            nodes: Arc::clone(&self.nodes),
            published: self.published.clone(),
            sent: None,
        };
        tokio::spawn(stream.run(hello.serving_version, incoming, updates));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// One agent's stream.
struct Subscription {
    node: String,
    nodes: Arc<Nodes>,
    published: watch::Receiver<Published>,
    /// The view last sent, and its generation.
    sent: Option<(NodeView, u64)>,
}

impl Subscription {
    async fn run(
        mut self,
        serving: String,
        mut incoming: Streaming<AgentMessage>,
        updates: mpsc::Sender<Result<ConfigUpdate, Status>>,
    ) {
        let mut serving = Some(serving);
        // Send the current generation at once, if there is one yet.
        self.published.mark_changed();
        loop {
            tokio::select! {
                changed = self.published.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let published = self.published.borrow_and_update().clone();
                    if published.generation == 0 {
                        continue;
                    }
                    let update = self.next_update(&published, serving.take());
                    if let Some(update) = update
                        && updates.send(Ok(update)).await.is_err()
                    {
                        break;
                    }
                }
                message = incoming.next() => match message {
                    Some(Ok(AgentMessage { message: Some(message) })) => self.received(message),
                    Some(Ok(AgentMessage { message: None })) => {}
                    Some(Err(status)) => {
                        log::info!("node {}: stream ended: {}", self.node, status.message());
                        break;
                    }
                    None => break,
                },
            }
        }
        log::info!("node {} unsubscribed", self.node);
        self.nodes.update(&self.node, |status| {
            status.streams = status.streams.saturating_sub(1);
        });
    }

    /// What to send for `published`: the first time a snapshot (or, when the agent
    /// serves this version already, the bare version); then deltas, when the view moved.
    fn next_update(
        &mut self,
        published: &Published,
        serving: Option<String>,
    ) -> Option<ConfigUpdate> {
        let view = published.compiled.view(&self.node);
        let update = match (&self.sent, serving) {
            (None, Some(serving)) if serving == view.version => ConfigUpdate {
                version: view.version.clone(),
                ..Default::default()
            },
            (None, _) => view.snapshot(),
            (Some((before, _)), _) if before.version == view.version => {
                // Same view (for this node) in a newer generation.
                self.sent = Some((view, published.generation));
                self.record_sent();
                return None;
            }
            (Some((before, _)), _) => view.delta_from(before, &published.compiled.shared_changes),
        };
        metrics::counter!(
            "weft_controller_config_updates_total",
            "type" => if update.snapshot { "snapshot" } else { "delta" }
        )
        .increment(1);
        log::debug!(
            "node {}: sending {} {} ({} upserts, {} removals)",
            self.node,
            if update.snapshot { "snapshot" } else { "delta" },
            update.version,
            update.upserts.len(),
            update.removals.len()
        );
        self.sent = Some((view, published.generation));
        self.record_sent();
        Some(update)
    }

    fn record_sent(&self) {
        let Some((view, generation)) = &self.sent else {
            return;
        };
        self.nodes.update(&self.node, |status| {
            status.version = view.version.clone();
            status.generation = *generation;
            if status.acked_version.as_deref() == Some(view.version.as_str()) {
                status.acked_generation = Some(*generation);
            }
        });
    }

    fn received(&self, message: Message) {
        match message {
            Message::Ack(ack) => {
                let generation = self
                    .sent
                    .as_ref()
                    .filter(|(view, _)| view.version == ack.version)
                    .map(|(_, generation)| *generation);
                self.nodes.update(&self.node, |status| {
                    status.acked_version = Some(ack.version.clone());
                    if generation.is_some() {
                        status.acked_generation = generation;
                    }
                });
            }
            Message::Nack(nack) => {
                log::warn!(
                    "node {} rejected configuration {}: {}",
                    self.node,
                    nack.version,
                    nack.reason
                );
                metrics::counter!("weft_controller_config_rejections_total", "node" => self.node.clone())
                    .increment(1);
                self.nodes.update(&self.node, |status| {
                    status.last_nack = Some((nack.version.clone(), nack.reason.clone()));
                });
            }
            Message::Hello(_) => {
                log::warn!(
                    "node {}: a second Hello on one stream is ignored",
                    self.node
                );
            }
        }
    }
}
