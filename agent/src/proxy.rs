//! The agent's proxy: outbound (connections the kernel captured from local pods) and
//! inbound (HBONE tunnels from other nodes' agents), with the state both share.

pub mod hbone;
mod inbound;
pub mod metrics;
mod outbound;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::TcpStream, sync::Notify};
use weft_common::AGENT_MARK;

pub use self::{inbound::serve as serve_inbound, outbound::serve as serve_outbound};
use crate::{
    datapath::pinned::OriginalDestinations, identity::Identity, mesh::MeshConfig, reload::Current,
    tls::CertStore,
};

/// The port other nodes' agents open HBONE tunnels to.
pub const HBONE_PORT: u16 = 15008;
/// How long a connection to a pod or a peer agent may take to establish.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The buffer of each direction of a relayed connection. Tokio's default, 8 KiB, makes
/// every 8 KiB a read, an HTTP/2 DATA frame, a TLS record and a write; 64 KiB cut the
/// agents' CPU per GiB by a third in `cargo xtask bench`.
const COPY_BUFFER: usize = 64 << 10;

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
    pub pool: hbone::Pool<PoolKey>,
    pub settings: hbone::Settings,
    original_destinations: Mutex<OriginalDestinations>,
    /// Next endpoint index per service, for round-robin.
    round_robin: Mutex<HashMap<(String, String), usize>>,
    connections: Connections,
}

impl Proxy {
    pub fn new(
        node: String,
        mesh: Arc<Current<MeshConfig>>,
        certs: Arc<Current<CertStore>>,
        original_destinations: OriginalDestinations,
    ) -> Self {
        let settings = hbone::Settings::default();
        Self {
            node,
            mesh,
            certs,
            pool: hbone::Pool::new(settings),
            settings,
            original_destinations: Mutex::new(original_destinations),
            round_robin: Mutex::new(HashMap::new()),
            connections: Connections::default(),
        }
    }

    /// Connections the proxy is carrying now, both directions.
    pub fn active(&self) -> usize {
        self.connections.count.load(Ordering::Relaxed)
    }

    /// Waits until no connection is left or `deadline` passes; returns how many remain.
    pub async fn drain(&self, deadline: Duration) -> usize {
        let _ = tokio::time::timeout(deadline, async {
            while self.active() > 0 {
                self.connections.idle.notified().await;
            }
        })
        .await;
        self.active()
    }

    /// Counts a connection for as long as the guard lives.
    fn track(self: &Arc<Self>) -> Tracked {
        self.connections.count.fetch_add(1, Ordering::Relaxed);
        Tracked(Arc::clone(self))
    }

    /// The next endpoint of service `namespace/name` among `endpoints` (round robin).
    fn pick(
        &self,
        namespace: &str,
        name: &str,
        endpoints: &[std::net::IpAddr],
    ) -> Option<std::net::IpAddr> {
        if endpoints.is_empty() {
            return None;
        }
        let mut next = self.round_robin.lock().expect("round-robin lock");
        let slot = next
            .entry((namespace.to_owned(), name.to_owned()))
            .or_insert(0);
        let endpoint = endpoints[*slot % endpoints.len()];
        *slot = slot.wrapping_add(1);
        Some(endpoint)
    }
}

#[derive(Debug, Default)]
struct Connections {
    count: AtomicUsize,
    idle: Notify,
}

/// Keeps a connection counted; dropping it may wake a drain.
struct Tracked(Arc<Proxy>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.connections.count.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.connections.idle.notify_waiters();
        }
    }
}

/// Connects to `addr` from a socket carrying the agent's mark, which the inbound
/// program lets into STRICT pods.
async fn connect_marked(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_mark(AGENT_MARK)?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}
