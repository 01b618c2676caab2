//! `weftctl observe`: what every node's agent sees — kernel verdicts, and the
//! connections and requests it refused or carried — from the gRPC stream on each
//! agent's admin port (`weft.observe.v1.Observer`), filtered by the agents and merged
//! here in time order. Without `--follow`, each agent's recent drops, denials and
//! errors; with it, every event from then on as well.

use std::{io::Write as _, process::ExitCode, sync::Mutex, time::Duration};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};
use tonic::transport::Endpoint;
use weft_api::observe::{
    Event, Filter, Peer, check, kind,
    v1::{WatchRequest, observer_client::ObserverClient},
};

use crate::{
    mesh::{Connection, Mesh},
    output::{Format, Report},
};

/// How long a followed event is held for events of other nodes that happened before
/// it to arrive, so that the merged stream is in time order.
const HOLD: Duration = Duration::from_millis(200);

/// What to watch.
#[derive(Debug)]
pub struct Options {
    pub filter: Filter,
    pub follow: bool,
    /// Only these nodes' agents; all when empty.
    pub nodes: Vec<String>,
}

/// The recent events of every node (without `--follow`).
#[derive(Debug, Serialize)]
pub struct Recent {
    pub events: Vec<Event>,
    /// Nodes whose agents did not answer, and why.
    pub unreachable: Vec<Unreachable>,
}

#[derive(Debug, Serialize)]
pub struct Unreachable {
    pub node: String,
    pub error: String,
}

impl Report for Recent {
    fn table(&self) -> String {
        let mut text = String::new();
        if self.events.is_empty() {
            text += "no recent drop, denial or error matches (follow with --follow)\n";
        } else {
            text += &header();
            for event in &self.events {
                text += &line(event);
            }
        }
        for node in &self.unreachable {
            text += &format!("node {}: {}\n", node.node, node.error);
        }
        text
    }

    fn passed(&self) -> bool {
        self.unreachable.is_empty()
    }
}

/// Runs `weftctl observe` on `mesh`, printing as `format` says.
pub fn run(mesh: &dyn Mesh, options: Options, format: Format) -> anyhow::Result<ExitCode> {
    check(&options.filter).map_err(anyhow::Error::msg)?;
    if !options.follow {
        let recent = recent(mesh, options.filter, &options.nodes)?;
        // A closed pipe (`| head`) is not an error of weftctl's.
        let _ = std::io::stdout()
            .lock()
            .write_all(format.render(&recent)?.as_bytes());
        return Ok(if recent.passed() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    runtime()?.block_on(async move {
        let request = WatchRequest {
            filter: Some(options.filter),
            follow: true,
        };
        let (mut received, unreachable) = start(mesh, &options.nodes, request);
        for failed in &unreachable {
            eprintln!("node {}: {}", failed.node, failed.error);
        }
        let mut failures = unreachable.len();
        if format == Format::Table {
            let _ = std::io::stdout().lock().write_all(header().as_bytes());
        }
        let mut held = Reorder::default();
        let mut tick = tokio::time::interval(HOLD / 4);
        loop {
            tokio::select! {
                item = received.recv() => match item {
                    Some(Item::Event(event)) => held.push(Instant::now(), *event),
                    Some(Item::Failed(failed)) => {
                        failures += 1;
                        eprintln!("node {}: {}", failed.node, failed.error);
                    }
                    None => break,
                },
                _ = tick.tick() => print_events(&held.release(Instant::now()), format)?,
            }
        }
        print_events(&held.release(Instant::now() + HOLD), format)?;
        Ok(if failures == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

/// The recent drops, denials and errors `filter` admits, of `nodes` (every node when
/// empty), oldest first.
pub fn recent(mesh: &dyn Mesh, filter: Filter, nodes: &[String]) -> anyhow::Result<Recent> {
    runtime()?.block_on(async move {
        let request = WatchRequest {
            filter: Some(filter),
            follow: false,
        };
        let (mut received, mut unreachable) = start(mesh, nodes, request);
        let mut events = Vec::new();
        while let Some(item) = received.recv().await {
            match item {
                Item::Event(event) => events.push(*event),
                Item::Failed(failed) => unreachable.push(failed),
            }
        }
        events.sort_by_key(|event| event.time_unix_nanos);
        Ok(Recent {
            events,
            unreachable,
        })
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start an async runtime")
}

/// Asks each of `nodes` (every node when empty) for `request`, on tasks of the
/// current runtime: the merged events, and the nodes that could not be reached.
fn start(
    mesh: &dyn Mesh,
    nodes: &[String],
    request: WatchRequest,
) -> (mpsc::Receiver<Item>, Vec<Unreachable>) {
    let nodes = if nodes.is_empty() {
        mesh.nodes()
    } else {
        nodes.to_vec()
    };
    let (sender, received) = mpsc::channel(1024);
    let mut unreachable = Vec::new();
    for node in nodes {
        match mesh.agent_connect(&node) {
            Ok(connection) => {
                tokio::spawn(watch(node, connection, request.clone(), sender.clone()));
            }
            Err(error) => unreachable.push(Unreachable { node, error }),
        }
    }
    (received, unreachable)
}

enum Item {
    Event(Box<Event>),
    Failed(Unreachable),
}

/// Streams `node`'s events over `connection` into `sender` until the agent ends the
/// stream or fails.
async fn watch(
    node: String,
    connection: Box<dyn Connection>,
    request: WatchRequest,
    sender: mpsc::Sender<Item>,
) {
    let failed = |error: String| {
        Item::Failed(Unreachable {
            node: node.clone(),
            error,
        })
    };
    let result = async {
        let mut events = client(connection)
            .await?
            .watch(request)
            .await
            .map_err(|status| format!("the agent refused to stream: {}", status.message()))?
            .into_inner();
        while let Some(mut event) = events
            .message()
            .await
            .map_err(|status| format!("the stream broke: {}", status.message()))?
        {
            if event.node.is_empty() {
                event.node.clone_from(&node);
            }
            if sender.send(Item::Event(Box::new(event))).await.is_err() {
                break;
            }
        }
        Ok::<_, String>(())
    }
    .await;
    if let Err(error) = result {
        let _ = sender.send(failed(error)).await;
    }
}

/// A gRPC client of the observer over `connection`, a connection to an agent's admin
/// port however it was made (inside a node's namespace, through a port-forward).
async fn client(
    connection: Box<dyn Connection>,
) -> Result<ObserverClient<tonic::transport::Channel>, String> {
    // The channel dials once, and gets the connection made already.
    let once = Mutex::new(Some(connection));
    let channel = Endpoint::from_static("http://agent-admin")
        .connect_with_connector(tower::service_fn(move |_| {
            let connection = once.lock().ok().and_then(|mut once| once.take());
            async move {
                connection
                    .map(hyper_util::rt::TokioIo::new)
                    .ok_or_else(|| std::io::Error::other("the connection to the agent closed"))
            }
        }))
        .await
        .map_err(|err| format!("no HTTP/2 to the agent's admin port: {err}"))?;
    Ok(ObserverClient::new(channel))
}

/// Followed events held for [`HOLD`] after they arrive, then released in time order.
#[derive(Debug, Default)]
struct Reorder {
    held: Vec<(Instant, Event)>,
}

impl Reorder {
    fn push(&mut self, arrived: Instant, event: Event) {
        self.held.push((arrived, event));
    }

    /// What has been held for [`HOLD`] at `now`, oldest event first.
    fn release(&mut self, now: Instant) -> Vec<Event> {
        let (mut ready, held): (Vec<_>, Vec<_>) = self
            .held
            .drain(..)
            .partition(|(arrived, _)| now.duration_since(*arrived) >= HOLD);
        self.held = held;
        ready.sort_by_key(|(_, event)| event.time_unix_nanos);
        ready.into_iter().map(|(_, event)| event).collect()
    }
}

fn print_events(events: &[Event], format: Format) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    for event in events {
        match format {
            Format::Table => out.write_all(line(event).as_bytes())?,
            Format::Json => writeln!(out, "{}", serde_json::to_string(event)?)?,
            Format::Yaml => write!(out, "---\n{}", serde_yaml::to_string(event)?)?,
        }
    }
    out.flush()?;
    Ok(())
}

pub fn header() -> String {
    format!(
        "{:<12}  {:<8}  {:<10}  {:<8}  FROM -> TO  WHAT\n",
        "TIME (UTC)", "NODE", "KIND", "VERDICT"
    )
}

/// One event for people: when, where, what, between whom, and what it was about.
pub fn line(event: &Event) -> String {
    let between = if event.kind == kind::LOST {
        String::new()
    } else {
        format!(
            "{} -> {}  ",
            peer(event.source.as_ref()),
            peer(event.destination.as_ref())
        )
    };
    format!(
        "{:<12}  {:<8}  {:<10}  {:<8}  {between}{}\n",
        clock(event.time_unix_nanos),
        event.node,
        event.kind,
        event.verdict,
        what(event)
    )
}

/// A peer by its workload if the mesh knows it, else its address, else its identity.
fn peer(peer: Option<&Peer>) -> String {
    match peer {
        Some(peer) if !peer.workload.is_empty() => format!("{}/{}", peer.namespace, peer.workload),
        Some(peer) if !peer.address.is_empty() => peer.address.clone(),
        Some(peer) if !peer.identity.is_empty() => peer.identity.clone(),
        _ => "?".to_owned(),
    }
}

fn what(event: &Event) -> String {
    let mut parts = Vec::new();
    match event.kind.as_str() {
        kind::LOST => {
            return format!(
                "{} events lost: this watcher read more slowly than they came",
                event.lost
            );
        }
        kind::REQUEST => {
            parts.push(format!(
                "{} {}{} {}",
                event.method, event.authority, event.path, event.status
            ));
            if event.flags != "-" && !event.flags.is_empty() {
                parts.push(event.flags.clone());
            }
            parts.push(format!("{:.1}ms", event.duration_micros as f64 / 1000.0));
        }
        kind::CONNECTION if event.detail.is_empty() => {
            parts.push(format!(
                "{} ({} B in, {} B out)",
                event.reason, event.bytes_received, event.bytes_sent
            ));
        }
        _ => parts.push(event.reason.clone()),
    }
    if !event.service.is_empty() {
        parts.push(format!("service {}", event.service));
    }
    if !event.route.is_empty() {
        parts.push(format!("route {}", event.route));
    }
    if !event.detail.is_empty() {
        parts.push(event.detail.clone());
    }
    parts.join("  ")
}

/// The time of day of `unix_nanos` in UTC, to the millisecond.
fn clock(unix_nanos: i64) -> String {
    let millis = unix_nanos.div_euclid(1_000_000);
    let seconds = millis.div_euclid(1000);
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        seconds.rem_euclid(86_400) / 3600,
        seconds.rem_euclid(3600) / 60,
        seconds.rem_euclid(60),
        millis.rem_euclid(1000)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(time_unix_nanos: i64) -> Event {
        Event {
            time_unix_nanos,
            ..Event::default()
        }
    }

    #[test]
    fn followed_events_come_out_in_time_order_once_held() {
        let start = Instant::now();
        let mut held = Reorder::default();
        held.push(start, event(30));
        held.push(start + Duration::from_millis(50), event(10));
        held.push(start + HOLD, event(20));
        assert!(held.release(start + HOLD / 2).is_empty());
        let times = |events: Vec<Event>| -> Vec<i64> {
            events.iter().map(|event| event.time_unix_nanos).collect()
        };
        assert_eq!(
            times(held.release(start + HOLD + Duration::from_millis(50))),
            [10, 30]
        );
        assert_eq!(times(held.release(start + HOLD * 2)), [20]);
        assert!(held.release(start + HOLD * 3).is_empty());
    }

    #[test]
    fn events_read_as_lines() {
        let drop = Event {
            time_unix_nanos: 1_772_366_400_250_000_000 + 3_723_000_000_000,
            node: "node1".to_owned(),
            kind: "kernel".to_owned(),
            verdict: "drop".to_owned(),
            reason: "strict_plaintext".to_owned(),
            source: Some(Peer {
                address: "10.244.0.9:40000".to_owned(),
                ..Peer::default()
            }),
            destination: Some(Peer {
                address: "10.244.1.2:8080".to_owned(),
                workload: "echo-1".to_owned(),
                namespace: "default".to_owned(),
                identity: String::new(),
            }),
            ..Event::default()
        };
        assert_eq!(
            line(&drop),
            "13:02:03.250  node1     kernel      drop      10.244.0.9:40000 -> default/echo-1  \
             strict_plaintext\n"
        );
        let denied = Event {
            kind: "request".to_owned(),
            verdict: "deny".to_owned(),
            method: "POST".to_owned(),
            authority: "echo".to_owned(),
            path: "/".to_owned(),
            status: 403,
            flags: "RBAC".to_owned(),
            duration_micros: 1500,
            detail: "denied by echo-readers".to_owned(),
            ..Event::default()
        };
        assert_eq!(
            what(&denied),
            "POST echo/ 403  RBAC  1.5ms  denied by echo-readers"
        );
        let lost = Event {
            kind: "lost".to_owned(),
            lost: 7,
            ..Event::default()
        };
        assert!(
            line(&lost)
                .ends_with("  7 events lost: this watcher read more slowly than they came\n"),
            "{}",
            line(&lost)
        );
    }
}
