//! The agent's end of the configuration stream: subscribe to the controller for this
//! node, hand every version to the agent to apply, acknowledge or reject it, and keep
//! the last applied version on disk, so a restarted agent serves it at once, even with
//! the controller away. A broken stream is resubscribed with backoff; the agent keeps
//! serving what it has meanwhile.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use prost::Message as _;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use weft_api::config::v1::{
    Ack, AgentMessage, ConfigUpdate, Hello, MAX_UPDATE_BYTES, Nack, agent_message::Message,
    config_discovery_client::ConfigDiscoveryClient,
};

use crate::{
    backoff::Backoff,
    controller::Controller,
    files::write_atomically,
    mesh::{
        MeshConfig,
        resources::{Resources, dump::Policies},
    },
    reload::Current,
};

/// Where and as whom to subscribe.
#[derive(Clone, Debug)]
pub struct Settings {
    pub controller: Arc<Controller>,
    pub node: String,
    /// Where the last applied version is kept.
    pub cache: PathBuf,
}

/// A version for the agent to apply; it answers through `done` (`Err`: why not).
#[derive(Debug)]
pub struct Offer {
    pub version: String,
    pub mesh: MeshConfig,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// The state of the subscription, for `/config_dump` and readiness.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub controller: String,
    pub connected: bool,
    /// The version applied last.
    pub version: Option<String>,
    /// Resources of that version, by kind.
    pub resources: std::collections::BTreeMap<String, usize>,
    /// The policies and routes of that version, for `/config_dump` (beside this).
    #[serde(skip)]
    pub policies: Arc<Policies>,
    pub last_error: Option<String>,
    /// Unix time the last version was applied.
    pub applied_at: Option<f64>,
}

/// The version last applied, as cached on disk.
#[derive(Debug)]
pub struct Cached {
    pub version: String,
    pub resources: Resources,
    pub mesh: MeshConfig,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(
        "cannot reach the controller at {endpoint}: {source}; is it running, and is port 15010 open from this node?"
    )]
    Connect {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the controller refused the subscription: {0}")]
    Refused(tonic::Status),
    #[error("the stream broke: {0}")]
    Stream(tonic::Status),
    #[error("{0}")]
    Local(String),
}

/// Describes the subscription's metrics.
pub fn describe_metrics() {
    metrics::describe_gauge!(
        "weft_controller_connected",
        "1 while the agent is subscribed to the controller"
    );
    metrics::describe_counter!(
        "weft_config_updates_total",
        "Configuration versions from the controller, by result (applied, rejected)"
    );
    metrics::describe_gauge!(
        "weft_config_applied_timestamp_seconds",
        "Unix time the agent last applied a configuration version"
    );
}

/// Reads the cached version from `path`, if there is a usable one.
pub fn load_cache(path: &Path) -> Option<Cached> {
    let bytes = std::fs::read(path).ok()?;
    let update = match ConfigUpdate::decode(bytes.as_slice()) {
        Ok(update) => update,
        Err(err) => {
            log::warn!(
                "ignoring the cached configuration {}: {err}",
                path.display()
            );
            return None;
        }
    };
    let mut resources = Resources::default();
    let mesh = resources.apply(&update).and_then(|()| resources.mesh());
    match mesh {
        Ok(mesh) => Some(Cached {
            version: update.version,
            resources,
            mesh,
        }),
        Err(err) => {
            log::warn!(
                "ignoring the cached configuration {}: {err}",
                path.display()
            );
            None
        }
    }
}

/// Subscribes until the agent stops, offering each version on `offers`.
pub async fn run(
    settings: Settings,
    cached: Option<Cached>,
    offers: mpsc::Sender<Offer>,
    status: Arc<Current<Status>>,
) {
    let (mut serving, mut resources) = match cached {
        Some(cached) => {
            settings
                .controller
                .set_streamed_anchors(&cached.mesh.trust_anchors);
            (Some(cached.version), cached.resources)
        }
        None => (None, Resources::default()),
    };
    status.replace(Status {
        controller: settings.controller.url().to_owned(),
        version: serving.clone(),
        resources: resources.counts(),
        policies: Arc::new(Policies::of(&resources)),
        ..Status::default()
    });
    let mut backoff = Backoff::default();
    loop {
        let result = session(
            &settings,
            &mut serving,
            &mut resources,
            &offers,
            &status,
            &mut backoff,
        )
        .await;
        let message = match result {
            Ok(()) => "the controller closed the stream".to_owned(),
            Err(err) => err.to_string(),
        };
        if offers.is_closed() {
            return;
        }
        let delay = backoff.next_delay();
        log::warn!(
            "{message}; serving the last configuration ({}), subscribing again in {:.1} s",
            serving.as_deref().unwrap_or("none yet"),
            delay.as_secs_f64()
        );
        metrics::gauge!("weft_controller_connected").set(0.0);
        update(&status, |status| {
            status.connected = false;
            status.last_error = Some(message);
        });
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    settings: &Settings,
    serving: &mut Option<String>,
    resources: &mut Resources,
    offers: &mpsc::Sender<Offer>,
    status: &Current<Status>,
    backoff: &mut Backoff,
) -> Result<(), SessionError> {
    let channel = settings
        .controller
        .connect()
        .await
        .map_err(|source| SessionError::Connect {
            endpoint: settings.controller.url().to_owned(),
            source,
        })?;
    let (outgoing, receiver) = mpsc::channel(8);
    let hello = AgentMessage {
        message: Some(Message::Hello(Hello {
            node: settings.node.clone(),
            serving_version: serving.clone().unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        })),
    };
    outgoing
        .send(hello)
        .await
        .map_err(|_| SessionError::Local("the request stream closed".to_owned()))?;
    let mut request = Request::new(ReceiverStream::new(receiver));
    settings
        .controller
        .authorize(&mut request)
        .map_err(SessionError::Local)?;
    let mut updates = ConfigDiscoveryClient::new(channel)
        .max_decoding_message_size(MAX_UPDATE_BYTES)
        .subscribe(request)
        .await
        .map_err(SessionError::Refused)?
        .into_inner();
    log::info!(
        "subscribed to {} as node {}",
        settings.controller.url(),
        settings.node
    );
    metrics::gauge!("weft_controller_connected").set(1.0);
    update(status, |status| {
        status.connected = true;
        status.last_error = None;
    });

    while let Some(config) = updates.message().await.map_err(SessionError::Stream)? {
        backoff.reset();
        let version = config.version.clone();
        let outcome = match resources.apply(&config).and_then(|()| resources.mesh()) {
            Err(reason) => Err(reason),
            Ok(_) if serving.as_deref() == Some(version.as_str()) => Ok(()),
            Ok(mesh) => {
                // The controller's current roots, whether or not this node takes the
                // rest: they check the controller from the next connection on.
                settings
                    .controller
                    .set_streamed_anchors(&mesh.trust_anchors);
                offer(offers, &version, mesh).await
            }
        };
        let reply = match outcome {
            Ok(()) => {
                if serving.as_deref() != Some(version.as_str()) {
                    log::info!("applied configuration {version} from the controller");
                    save_cache(&settings.cache, &resources.snapshot(&version));
                    *serving = Some(version.clone());
                    let applied_at = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0.0, |since| since.as_secs_f64());
                    let policies = Arc::new(Policies::of(resources));
                    update(status, |status| {
                        status.version = Some(version.clone());
                        status.resources = resources.counts();
                        status.policies = policies;
                        status.applied_at = Some(applied_at);
                    });
                    metrics::gauge!("weft_config_applied_timestamp_seconds").set(applied_at);
                }
                metrics::counter!("weft_config_updates_total", "result" => "applied").increment(1);
                Message::Ack(Ack { version })
            }
            Err(reason) => {
                log::error!(
                    "rejected configuration {version}: {reason}; still serving {}",
                    serving.as_deref().unwrap_or("nothing")
                );
                metrics::counter!("weft_config_updates_total", "result" => "rejected").increment(1);
                update(status, |status| status.last_error = Some(reason.clone()));
                Message::Nack(Nack { version, reason })
            }
        };
        if outgoing
            .send(AgentMessage {
                message: Some(reply),
            })
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

/// Hands `mesh` to the agent and waits for its answer.
async fn offer(
    offers: &mpsc::Sender<Offer>,
    version: &str,
    mesh: MeshConfig,
) -> Result<(), String> {
    let (done, answer) = oneshot::channel();
    let offer = Offer {
        version: version.to_owned(),
        mesh,
        done,
    };
    if offers.send(offer).await.is_err() {
        return Err("the agent is stopping".to_owned());
    }
    answer
        .await
        .unwrap_or_else(|_| Err("the agent dropped the configuration".to_owned()))
}

fn update(status: &Current<Status>, change: impl FnOnce(&mut Status)) {
    let mut next = status.get().as_ref().clone();
    change(&mut next);
    status.replace(next);
}

fn save_cache(path: &Path, snapshot: &ConfigUpdate) {
    if let Err(err) = write_atomically(path, &snapshot.encode_to_vec(), 0o644) {
        log::warn!(
            "cannot cache the configuration in {}: {err}; a restart will wait for the controller",
            path.display()
        );
    }
}
