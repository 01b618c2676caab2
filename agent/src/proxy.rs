//! The agent's proxy: outbound (connections the kernel captured from local pods) and
//! inbound (HBONE tunnels from other nodes' agents), with the state both share.

pub mod abuse;
pub mod admission;
pub mod authorize;
mod baggage;
pub mod balance;
pub mod breaker;
mod connect;
mod detect;
mod error;
pub mod hbone;
mod http;
pub mod in_pod;
mod inbound;
mod logical;
pub mod metrics;
mod outbound;
mod per_service;
mod relay;
pub mod retry;
mod tcp;
pub mod trace;
pub mod workers;

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};
use weft_common::AGENT_MARK;

use self::{
    admission::{Admission, Limits, Permit, Refused},
    balance::Balancers,
    breaker::Breakers,
    in_pod::InPod,
    metrics::AccessLog,
    retry::Budgets,
    workers::PerWorker,
};
pub use self::{
    http::describe as describe_requests, in_pod::serve as serve_in_pod,
    inbound::serve as serve_inbound, outbound::serve as serve_outbound,
};
use crate::{
    datapath::pinned::OriginalDestinations,
    identity::Identity,
    logging::{Throttle, held_back},
    mesh::MeshConfig,
    observe,
    reload::Current,
    tls::CertStore,
};
use weft_api::observe::verdict;

/// The port HBONE peers open tunnels to, on the node's address or a pod's.
pub const HBONE_PORT: u16 = weft_common::HBONE_PORT;

/// The data path's timeouts and bounds, in one place (`weft-agent run` flags).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// How long a connection to a pod or a peer agent may take to establish.
    pub connect_timeout: Duration,
    /// How long a carried TCP connection (or an HTTP request's stream) may move no
    /// byte either way before the agent closes it (ends it), unless its service's
    /// TrafficPolicy says otherwise (`timeouts.idle`, `timeouts.streamIdle`).
    pub idle_timeout: Duration,
    /// How long a captured connection from a pod the mesh configuration does not name
    /// yet (it was just created) waits for the configuration, and for its certificate.
    pub source_wait: Duration,
    /// How long protocol detection waits for a client's first bytes
    /// ([`detect`]).
    pub detect_timeout: Duration,
    /// How long a client may keep the agent waiting: for the rest of a request body
    /// before the response starts, or to take any of the bytes written to it
    /// ([`abuse`]).
    pub client_stall: Duration,
    /// What the agent takes on at once.
    pub limits: Limits,
    pub hbone: hbone::Settings,
    pub access_log: AccessLog,
    /// Data-plane worker threads ([`workers`]), each with pools of its own.
    pub workers: usize,
    /// Whether a TCP connection between two plain sockets (to a pod of this node, or
    /// out of the mesh) is carried with `splice(2)` ([`relay::splice`]) rather than
    /// copied through the agent's buffers.
    pub splice: bool,
}

impl Settings {
    /// The defaults, for a process that may hold `open_files` descriptors.
    ///
    /// - `connect_timeout` 10 s: a pod or agent that has not answered a SYN by then is
    ///   not coming.
    /// - `idle_timeout` 1 h, as Istio: long enough for the pooled connections of
    ///   databases and message brokers, whose own keepalives are minutes apart, and short
    ///   enough that connections abandoned by a vanished peer do not pile up.
    /// - `source_wait` 5 s: the configuration names a new pod within a second of its
    ///   creation on a healthy cluster (the controller sees the pod's address, compiles,
    ///   streams; then the CA signs its certificate); five give a busy control plane
    ///   room while a pod the configuration never names still fails fast.
    /// - `detect_timeout` 100 ms: an HTTP client sends its request as soon as it is
    ///   connected; a server-speaks-first client waits this long for its greeting.
    /// - `client_stall` 60 s, as nginx's `client_body_timeout` and `send_timeout`: a
    ///   client on a slow link still moves some bytes a minute; one that moves none
    ///   holds a stream and a connection to the server for nothing.
    /// - `workers` 1; `weft-agent run` starts one per CPU it may use.
    /// - `splice` on.
    pub fn new(open_files: u64) -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            source_wait: Duration::from_secs(5),
            detect_timeout: Duration::from_millis(100),
            client_stall: Duration::from_secs(60),
            limits: Limits::for_open_files(open_files),
            hbone: hbone::Settings::default(),
            access_log: AccessLog::default(),
            workers: 1,
            splice: true,
        }
    }
}

/// A pooled HBONE connection serves one (client identity, server identity, peer agent)
/// triple: TLS authenticates exactly one identity on each side.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub source: Identity,
    /// The serial of the source's certificate: a renewed certificate opens new
    /// connections, and those made with the old one serve until they close.
    pub certificate: String,
    pub destination: Identity,
    pub agent: SocketAddr,
}

/// What the outbound and inbound sides share.
#[derive(Debug)]
pub struct Proxy {
    /// This node's name, as the mesh configuration calls it.
    pub node: String,
    pub mesh: Arc<Current<MeshConfig>>,
    pub certs: Arc<Current<CertStore>>,
    /// Each worker's HBONE connections to other nodes' agents.
    pub pool: PerWorker<hbone::Pool<PoolKey>>,
    /// Each worker's upstream HTTP connections of the outbound side.
    pub http_pool: PerWorker<http::Pool>,
    pub balancers: Balancers,
    /// Each service's retry budget.
    pub budgets: Budgets,
    /// Each service's circuit breaker.
    pub breakers: Breakers,
    pub tracer: trace::Tracer,
    pub settings: Settings,
    pub admission: Arc<Admission>,
    /// The HBONE listeners inside this node's pods.
    pub in_pod: Arc<InPod>,
    original_destinations: OriginalDestinations,
    connections: Arc<Connections>,
}

impl Proxy {
    pub fn new(
        node: String,
        mesh: Arc<Current<MeshConfig>>,
        certs: Arc<Current<CertStore>>,
        original_destinations: OriginalDestinations,
        settings: Settings,
        tracer: trace::Tracer,
        in_pod: Arc<InPod>,
    ) -> Self {
        Self {
            node,
            mesh,
            certs,
            pool: PerWorker::new(settings.workers, || hbone::Pool::new(settings.hbone)),
            http_pool: PerWorker::new(settings.workers, http::Pool::default),
            balancers: Balancers::new(),
            budgets: Budgets::default(),
            breakers: Breakers::default(),
            tracer,
            admission: Admission::new(settings.limits),
            settings,
            original_destinations,
            in_pod,
            connections: Arc::default(),
        }
    }

    /// Connections the proxy is carrying now, both directions.
    pub fn active(&self) -> usize {
        self.connections.active()
    }

    /// Tells the connections that carry requests to close at their next request
    /// boundary, then waits until no connection is left or `deadline` passes; returns
    /// how many remain.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.connections.drain(deadline).await
    }

    /// Whether the proxy drains, for the connections that close when it does.
    pub fn draining(&self) -> Draining {
        Draining(self.connections.draining.subscribe())
    }

    /// Counts a connection for as long as the guard lives.
    fn track(&self) -> Tracked {
        self.connections.track()
    }
}

/// The connections being carried, for the drain.
#[derive(Debug)]
struct Connections {
    count: AtomicUsize,
    idle: Notify,
    /// Set when the drain starts.
    draining: watch::Sender<bool>,
}

impl Default for Connections {
    fn default() -> Self {
        Self {
            count: AtomicUsize::new(0),
            idle: Notify::new(),
            draining: watch::Sender::new(false),
        }
    }
}

impl Connections {
    fn active(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    fn track(self: &Arc<Self>) -> Tracked {
        self.count.fetch_add(1, Ordering::AcqRel);
        Tracked(Arc::clone(self))
    }

    async fn drain(&self, deadline: Duration) -> usize {
        self.draining.send_replace(true);
        let _ = tokio::time::timeout(deadline, async {
            loop {
                // Registered before looking: the last connection closing between the
                // look and the wait still wakes us (`notify_waiters` keeps no permit).
                let idle = self.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if self.active() == 0 {
                    break;
                }
                idle.await;
            }
        })
        .await;
        self.active()
    }
}

/// Whether the proxy drains. A connection that carries requests closes at a request
/// boundary once it does: HTTP/1.1 with `Connection: close` on its next response,
/// HTTP/2 and HBONE with GOAWAY, so that clients move to a new connection (after an
/// upgrade, to the new agent) without losing a request. TCP connections are carried
/// until they close.
#[derive(Clone, Debug)]
pub struct Draining(watch::Receiver<bool>);

impl Draining {
    /// Whether the drain has started.
    pub fn now(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once the drain starts (never, if it does not).
    pub async fn started(mut self) {
        let gone = self.0.wait_for(|draining| *draining).await.is_err();
        if gone {
            std::future::pending::<()>().await;
        }
    }

    /// A signal of its own, started by the sender (for tests).
    #[cfg(test)]
    pub fn of_test() -> (watch::Sender<bool>, Self) {
        let (start, started) = watch::channel(false);
        (start, Self(started))
    }
}

/// Keeps a connection counted; dropping it may wake a drain.
struct Tracked(Arc<Connections>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// How a listener takes on a connection from a source address.
type Admit = fn(&Arc<Admission>, std::net::IpAddr) -> Result<Permit, Refused>;

/// Accepts connections on `listener` until it is dropped: each one that `admit` takes
/// on goes to `handle` on a task of its own; the others are closed at once and counted
/// (`direction` names the listener in metrics and logs).
pub async fn accept<H, Fut>(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    direction: &'static str,
    admit: Admit,
    handle: H,
) where
    H: Fn(Arc<Proxy>, TcpStream, SocketAddr, Permit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    static REFUSED: Throttle = Throttle::new();
    static FAILED: Throttle = Throttle::new();
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match admit(&proxy.admission, peer.ip()) {
                Ok(permit) => {
                    tokio::spawn(handle(Arc::clone(&proxy), stream, peer, permit));
                }
                Err(refused) => {
                    metrics::refused(direction, refused.reason());
                    observe::report(verdict::ERROR, || {
                        let source = observe::peer_at_address(peer);
                        observe::refusal(
                            direction,
                            refused.reason(),
                            refused.to_string(),
                            source,
                            None,
                        )
                    });
                    if let Some(count) = REFUSED.allow() {
                        log_refusal(direction, peer, refused, &proxy.admission, count);
                    }
                }
            },
            Err(err) => {
                // Out of descriptors or memory: the connection stays in the kernel's
                // queue; try again shortly rather than spin.
                metrics::refused(direction, "accept_error");
                if let Some(count) = FAILED.allow() {
                    log::warn!("{direction} accept failed: {err}{}", held_back(count));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn log_refusal(
    direction: &str,
    peer: SocketAddr,
    refused: Refused,
    admission: &Admission,
    held: u64,
) {
    let (everything, _) = admission.counts();
    let limits = admission.limits();
    log::warn!(
        "{direction} connection from {peer} refused: {refused} (the agent holds {} pending and \
         {} established, of {} at most; a source may hold {}, {} of them pending, and start {} \
         handshakes a second){}",
        everything.pending,
        everything.established,
        limits.total,
        limits.per_source,
        limits.pending_per_source,
        limits.handshakes_per_source,
        held_back(held)
    );
}

/// A non-blocking listening socket on `address` with `SO_REUSEPORT`, so that every
/// worker (and, during an upgrade, both agents) can listen there, and the kernel
/// spreads connections over them. An IPv6 socket takes IPv6 only. With `free_bind`,
/// the address need not be up yet.
pub fn listener(address: SocketAddr, free_bind: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(address),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if address.is_ipv6() {
        socket.set_only_v6(true)?;
        socket.set_freebind_v6(free_bind)?;
    } else {
        socket.set_freebind_v4(free_bind)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&address.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Connects to `addr` from a socket carrying the agent's mark, which the inbound
/// program lets into STRICT pods.
async fn connect_marked(addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(AGENT_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    connect_within(timeout, socket.connect(addr)).await
}

/// `connect`, failing with `TimedOut` after `timeout`.
async fn connect_within<T>(
    timeout: Duration,
    connect: impl Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_drain_ends_when_the_last_connection_does_or_at_its_deadline() {
        let connections = Arc::new(Connections::default());
        assert_eq!(connections.drain(Duration::from_secs(30)).await, 0);

        let (first, second) = (connections.track(), connections.track());
        let started = Instant::now();
        let draining = {
            let connections = Arc::clone(&connections);
            tokio::spawn(async move { connections.drain(Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(first);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!draining.is_finished(), "one connection is left");
        drop(second);
        assert_eq!(draining.await.unwrap(), 0);
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        let _stuck = connections.track();
        let started = Instant::now();
        assert_eq!(connections.drain(Duration::from_secs(30)).await, 1);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }
}
