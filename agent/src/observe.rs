//! What the agent sees, for `weftctl observe`: the kernel programs' verdicts and the
//! connections and requests the proxy refused or carried are reported to the [`Hub`],
//! which keeps the recent notable ones (drops, denials, errors) and hands every event
//! to the watchers whose filter admits it. Each watcher has a bounded buffer: one too
//! slow to read loses events, and is told how many, rather than slowing traffic.
//!
//! The hub is process-wide, as the metrics recorder is, so every part of the data path
//! reports to it without being handed it; with nobody watching, an ordinary event
//! costs one atomic load and is never built.

use std::{
    collections::VecDeque,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::SystemTime,
};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use weft_api::observe::{
    self, Event, Filter, Peer, admits, kind,
    v1::{WatchRequest, observer_server::Observer},
    verdict,
};

use crate::{datapath::flows::Flow, mesh::MeshConfig, node::Enrolled, sync};

/// How many notable events the hub keeps for watchers that come later.
pub const RECENT: usize = 256;
/// How many events a watcher may have waiting before it loses the next ones.
pub const BUFFER: usize = 1024;

/// Where the data path reports events, and watchers take them from.
#[derive(Debug, Default)]
pub struct Hub {
    /// How many watchers follow: read without the lock, so that with none an ordinary
    /// event is not even built.
    following: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    watchers: Vec<Watcher>,
    recent: VecDeque<Event>,
}

#[derive(Debug)]
struct Watcher {
    filter: Filter,
    sender: mpsc::Sender<Event>,
    /// Events it lost since it last took one.
    lost: u64,
}

static HUB: std::sync::LazyLock<Hub> = std::sync::LazyLock::new(Hub::default);

/// Reports an event of `verdict` to the process's hub; `event` builds it only if
/// someone will see it.
pub fn report(verdict: &'static str, event: impl FnOnce() -> Event) {
    HUB.report(verdict, event);
}

impl Hub {
    /// Reports an event of `verdict`, built by `event` only when a watcher follows or
    /// the event is notable. Its verdict and (if unset) its time are filled in here.
    pub fn report(&self, verdict: &'static str, event: impl FnOnce() -> Event) {
        let notable = verdict::notable(verdict);
        if !notable && self.following.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut event = event();
        event.verdict = verdict.to_owned();
        if event.time_unix_nanos == 0 {
            event.time_unix_nanos = unix_nanos(SystemTime::now());
        }
        let mut state = sync::lock(&self.state);
        state.watchers.retain_mut(|watcher| watcher.offer(&event));
        self.following
            .store(state.watchers.len(), Ordering::Relaxed);
        if notable {
            if state.recent.len() == RECENT {
                state.recent.pop_front();
            }
            state.recent.push_back(event);
        }
    }

    /// The recent notable events `filter` admits, oldest first, and with `follow` the
    /// receiver of every event it admits from now on.
    pub fn watch(
        &self,
        filter: Filter,
        follow: bool,
    ) -> (Vec<Event>, Option<mpsc::Receiver<Event>>) {
        let mut state = sync::lock(&self.state);
        let recent = state
            .recent
            .iter()
            .filter(|event| admits(&filter, event))
            .cloned()
            .collect();
        let receiver = follow.then(|| {
            let (sender, receiver) = mpsc::channel(BUFFER);
            state.watchers.push(Watcher {
                filter,
                sender,
                lost: 0,
            });
            self.following
                .store(state.watchers.len(), Ordering::Relaxed);
            receiver
        });
        (recent, receiver)
    }
}

impl Watcher {
    /// Hands `event` over if the filter admits it, first saying what was lost since
    /// the last one; false once the watcher has gone.
    fn offer(&mut self, event: &Event) -> bool {
        if !admits(&self.filter, event) {
            return !self.sender.is_closed();
        }
        if self.lost > 0 {
            let notice = Event {
                time_unix_nanos: event.time_unix_nanos,
                kind: kind::LOST.to_owned(),
                lost: self.lost,
                ..Event::default()
            };
            match self.sender.try_send(notice) {
                Ok(()) => self.lost = 0,
                Err(TrySendError::Full(_)) => return self.lose(),
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match self.sender.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => self.lose(),
            Err(TrySendError::Closed(_)) => false,
        }
    }

    fn lose(&mut self) -> bool {
        self.lost += 1;
        metrics::counter!("weft_observe_events_lost_total").increment(1);
        true
    }
}

/// A kernel verdict as watchers see it, its addresses named from `mesh`.
pub fn kernel(flow: &Flow, mesh: &MeshConfig, pods: &[Enrolled]) -> Event {
    let outbound = flow.verdict == verdict::REDIRECT;
    // connect() has no source address yet: the pod whose network namespace made the
    // connection is the source, known by its address (the port comes later).
    let source = if flow.source.ip().is_unspecified() {
        pods.iter()
            .find(|enrolled| {
                flow.netns_cookie != 0
                    && enrolled
                        .attachment
                        .as_ref()
                        .is_some_and(|attachment| attachment.netns_cookie == flow.netns_cookie)
            })
            .and_then(|enrolled| enrolled.pod.ips.first())
            .map(|&ip| workload_peer(ip.to_string(), ip, mesh))
    } else {
        Some(peer_at(flow.source, mesh))
    };
    Event {
        time_unix_nanos: unix_nanos(flow.wall_time),
        kind: kind::KERNEL.to_owned(),
        reason: flow.reason.to_owned(),
        source,
        destination: Some(peer_at(flow.destination, mesh)),
        direction: if outbound { "outbound" } else { "inbound" }.to_owned(),
        service: mesh
            .service_at(flow.destination.ip(), flow.destination.port())
            .map(|(service, _)| format!("{}/{}", service.namespace, service.name))
            .unwrap_or_default(),
        ..Event::default()
    }
}

/// `address` and the workload the mesh has there, if any.
fn peer_at(address: SocketAddr, mesh: &MeshConfig) -> Peer {
    workload_peer(address.to_string(), address.ip(), mesh)
}

/// A peer at `address` (with or without a port), named as the mesh's workload at `ip`.
fn workload_peer(address: String, ip: IpAddr, mesh: &MeshConfig) -> Peer {
    let workload = mesh.workload_by_ip(ip);
    Peer {
        address,
        workload: workload.map(|w| w.name.clone()).unwrap_or_default(),
        namespace: workload
            .map(|w| w.namespace.to_string())
            .unwrap_or_default(),
        identity: workload
            .map(|w| mesh.identity(w).to_string())
            .unwrap_or_default(),
    }
}

/// A peer known only by its address.
pub fn peer_at_address(address: impl ToString) -> Peer {
    Peer {
        address: address.to_string(),
        ..Peer::default()
    }
}

/// A connection the agent refused before carrying it, going `direction`, for
/// `reason` (the `weft_connections_refused_total` label) as `detail` tells.
pub fn refusal(
    direction: &str,
    reason: &str,
    detail: String,
    source: Peer,
    destination: Option<Peer>,
) -> Event {
    Event {
        kind: kind::CONNECTION.to_owned(),
        direction: direction.to_owned(),
        reason: reason.to_owned(),
        detail,
        source: Some(source),
        destination,
        ..Event::default()
    }
}

/// `time` in nanoseconds since the Unix epoch.
pub fn unix_nanos(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
        })
}

/// The `weft.observe.v1.Observer` service of the admin port, over the process's hub.
#[derive(Debug)]
pub struct Service {
    /// This node's name, stamped on every event.
    node: String,
}

impl Service {
    pub fn new(node: String) -> Self {
        Self { node }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for Service {
    type WatchStream = EventStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<EventStream>, Status> {
        let WatchRequest { filter, follow } = request.into_inner();
        let filter = filter.unwrap_or_default();
        observe::check(&filter).map_err(Status::invalid_argument)?;
        let (recent, live) = HUB.watch(filter, follow);
        let node = self.node.clone();
        let events = futures::stream::iter(recent)
            .chain(futures::stream::iter(live.map(ReceiverStream::new)).flatten())
            .map(move |mut event| {
                event.node.clone_from(&node);
                Ok(event)
            });
        Ok(Response::new(Box::pin(events)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outbound_redirect_is_named_after_the_pod_whose_namespace_made_it() {
        let mesh = MeshConfig {
            workloads: serde_yaml::from_str(
                "- {name: client, namespace: shop, serviceAccount: client, node: node0, ip: 10.244.0.5}\n",
            )
            .unwrap(),
            ..MeshConfig::default()
        };
        let enrolled: Enrolled = serde_json::from_value(serde_json::json!({
            "pod": {
                "container_id": "c1", "netns": "/run/netns/c1", "ifname": "eth0",
                "host_interface": "veth1", "ips": ["10.244.0.5"], "gateways": [],
                "name": "client", "namespace": "shop",
            },
            "attachment": { "netns_cookie": 4097, "ifindex": 7, "mode": "STRICT" },
        }))
        .unwrap();
        let flow = |netns_cookie| Flow {
            time: String::new(),
            timestamp_ns: 0,
            verdict: "redirect",
            reason: "outbound",
            source: "0.0.0.0:0".parse().unwrap(),
            destination: "10.96.0.10:80".parse().unwrap(),
            netns_cookie,
            ifindex: 0,
            wall_time: SystemTime::UNIX_EPOCH,
        };
        let pods = [enrolled];
        let source = kernel(&flow(4097), &mesh, &pods).source.unwrap();
        assert_eq!(
            (
                source.address.as_str(),
                source.workload.as_str(),
                source.namespace.as_str()
            ),
            ("10.244.0.5", "client", "shop")
        );
        // A namespace the agent does not know (a pod not enrolled): no source.
        assert_eq!(kernel(&flow(9), &mesh, &pods).source, None);
        assert_eq!(kernel(&flow(0), &mesh, &pods).source, None);
    }

    fn event_to(address: &str) -> impl FnOnce() -> Event {
        let address = address.to_owned();
        move || Event {
            kind: kind::REQUEST.to_owned(),
            destination: Some(Peer {
                address,
                ..Peer::default()
            }),
            ..Event::default()
        }
    }

    #[test]
    fn with_nobody_watching_only_notable_events_are_built_and_kept() {
        let hub = Hub::default();
        let mut built = 0;
        for _ in 0..3 {
            hub.report(verdict::OK, || {
                built += 1;
                Event::default()
            });
        }
        hub.report(verdict::DENY, event_to("10.0.0.1:80"));
        assert_eq!(built, 0);
        let (recent, live) = hub.watch(Filter::default(), false);
        assert!(live.is_none());
        assert_eq!(recent.len(), 1);
        assert_eq!(recent[0].verdict, "deny");
        assert!(recent[0].time_unix_nanos > 0);
    }

    #[test]
    fn the_recent_events_are_bounded_and_filtered() {
        let hub = Hub::default();
        for n in 0..RECENT + 10 {
            hub.report(verdict::ERROR, event_to(&format!("10.0.0.{}:80", n % 2)));
        }
        let (recent, _) = hub.watch(Filter::default(), false);
        assert_eq!(recent.len(), RECENT);
        let to_one = Filter {
            to: "10.0.0.1".to_owned(),
            ..Filter::default()
        };
        assert_eq!(hub.watch(to_one, false).0.len(), RECENT / 2);
    }

    #[test]
    fn a_follower_gets_what_its_filter_admits_and_learns_what_it_lost() {
        let hub = Hub::default();
        let filter = Filter {
            verdicts: vec!["ok".to_owned()],
            ..Filter::default()
        };
        let (_, live) = hub.watch(filter, true);
        let mut live = live.unwrap();
        hub.report(verdict::ERROR, event_to("10.0.0.1:80"));
        for _ in 0..BUFFER + 5 {
            hub.report(verdict::OK, event_to("10.0.0.2:80"));
        }
        // Nothing blocked: the buffer is full and five were lost.
        for _ in 0..BUFFER {
            assert_eq!(live.try_recv().unwrap().verdict, "ok");
        }
        assert!(live.try_recv().is_err());
        hub.report(verdict::OK, event_to("10.0.0.3:80"));
        let notice = live.try_recv().unwrap();
        assert_eq!((notice.kind.as_str(), notice.lost), ("lost", 5));
        assert_eq!(live.try_recv().unwrap().verdict, "ok");
    }

    #[test]
    fn a_watcher_that_left_is_forgotten_and_events_are_no_longer_built() {
        let hub = Hub::default();
        let (_, live) = hub.watch(Filter::default(), true);
        hub.report(verdict::OK, event_to("10.0.0.1:80"));
        assert_eq!(hub.following.load(Ordering::Relaxed), 1);
        drop(live);
        hub.report(verdict::OK, event_to("10.0.0.1:80"));
        assert_eq!(hub.following.load(Ordering::Relaxed), 0);
        let mut built = false;
        hub.report(verdict::OK, || {
            built = true;
            Event::default()
        });
        assert!(!built);
    }
}
