//! The L4 case, "TCP, no routes": one endpoint per connection from the service's
//! balancer, connected with [`connect`] (a failed connection retried on another
//! endpoint, as the service's retry policy allows), and the bytes copied both ways
//! until the connection ends or idles out, counted while it is open. A connection past
//! the service's `connectionLimits.maxConnections` is closed at once. A connection to
//! a pod of this node is authorized here by that pod's policies, before and while it
//! is open.

use http::Method;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use weft_api::authz::Traffic;

use super::{
    Proxy,
    authorize::{self, Caller, Direction},
    balance::Pick,
    breaker::Admitted,
    connect::{Upstream, connect},
    error::ProxyError,
    logical::{Destination, Endpoint, Hop, Logical},
    metrics::{self, Connection, Outcome, Reporter},
    outbound::{self, choose, refused},
    relay::{self, Spliceable, relay},
    retry::{self, Failure},
};
use crate::logging::{Throttle, held_back};

/// Carries the captured connection `client` to an endpoint of `logical`.
pub async fn carry<IO>(proxy: &Proxy, mut client: IO, logical: &Logical)
where
    IO: AsyncRead + AsyncWrite + Spliceable + Unpin,
{
    static FAILED: Throttle = Throttle::new();
    let peer = logical.source.address;
    // Held while the connection is open.
    let _admitted = match admit(proxy, logical) {
        Ok(admitted) => admitted,
        Err(overflow) => return refused(peer, &overflow),
    };
    let Connected {
        endpoint,
        pick: _pick,
        local,
        server,
    } = match connect_retrying(proxy, logical).await {
        Ok(connected) => connected,
        Err(refusal) => return refused(peer, &refusal),
    };
    let idle = outbound::idle_timeout(proxy, logical);
    let mut connection = Connection::new(
        Reporter::Source,
        logical.source.peer.clone(),
        endpoint.peer.clone(),
    );
    connection.service = logical.service();
    connection.mutual_tls = endpoint.hop.mutual_tls();
    let open = connection.opened(&proxy.settings.access_log);
    let outcome = match server {
        Ok(mut server) => {
            let progress = |received, sent| open.progress(received, sent);
            let relayed = async {
                if proxy.settings.splice
                    && let Some((prefix, client)) = client.spliceable()
                    && let Upstream::Tcp(server) = &mut server
                {
                    metrics::relayed("splice");
                    relay::splice(client, prefix, server, Some(idle), progress).await
                } else {
                    metrics::relayed("copy");
                    relay(&mut client, &mut server, Some(idle), progress).await
                }
            };
            if let Some(caller) = &local {
                let revoked = authorize::revoked(proxy, Direction::Local, caller, endpoint.address);
                tokio::select! {
                    relayed = relayed => relayed.into(),
                    by = revoked => Outcome::failed(ProxyError::Revoked { by }),
                }
            } else {
                relayed.await.into()
            }
        }
        Err(error) => Outcome::failed(error),
    };
    if let metrics::Ending::Failed(error) = &outcome.ending
        && let Some(held) = FAILED.allow()
    {
        log::warn!(
            "outbound {peer} -> {}: {error}{}",
            endpoint.address,
            held_back(held)
        );
    }
    open.closed(&outcome);
}

/// A connection slot of the service's circuit breaker, if it has limits.
fn admit(proxy: &Proxy, logical: &Logical) -> Result<Option<Admitted>, ProxyError> {
    let Destination::Service(target) = &logical.destination else {
        return Ok(None);
    };
    let mesh = proxy.mesh.get();
    let Some(breaker) = mesh
        .service_at(target.vip, target.port)
        .and_then(|(service, _)| outbound::breaker(proxy, service, &target.key))
    else {
        return Ok(None);
    };
    let admitted = breaker.connection().map_err(|limit| ProxyError::Overflow {
        service: target.key.clone(),
        limit,
    })?;
    Ok(Some(admitted))
}

/// The endpoint a connection went to, and how connecting to it went.
struct Connected {
    endpoint: Endpoint,
    /// The balancer's pick, counting the connection in flight while it is open.
    pick: Option<Pick>,
    /// The caller, when the endpoint is a pod of this node (authorized here).
    local: Option<Caller>,
    server: Result<Upstream, ProxyError>,
}

/// Connects to an endpoint of `logical`; a failed connection is retried on another
/// endpoint as far as the service's retry policy and budget allow. Fails only when no
/// endpoint may be tried at all (none, or denied).
async fn connect_retrying(proxy: &Proxy, logical: &Logical) -> Result<Connected, ProxyError> {
    let retrying = outbound::retrying(proxy, &proxy.mesh.get(), logical);
    if let Some(retrying) = &retrying {
        retrying.budget.deposit();
    }
    let mut avoid = Vec::new();
    let mut retried: Option<String> = None;
    let mut rng = fastrand::Rng::new();
    let mut attempt = 0;
    loop {
        let (endpoint, pick) = choose(proxy, logical, &avoid)?;
        // A pod of this node: this agent decides for it, as its own would for a tunnel.
        let local = (endpoint.hop == Hop::Local).then(|| {
            Caller::authenticated(&logical.source.identity, Some(logical.source.address.ip()))
        });
        if let Some(caller) = &local {
            authorize::connection(
                &proxy.mesh.get(),
                Direction::Local,
                caller,
                endpoint.address,
                Traffic::Tcp,
            )
            .map_err(|denied| ProxyError::Denied { by: denied.by })?;
        }
        let started = Instant::now();
        let server = connect(proxy, &endpoint, &logical.source, None).await;
        if let Some(pick) = &pick {
            match &server {
                Ok(_) => {
                    pick.observe(started.elapsed());
                    pick.succeeded();
                }
                Err(error) => {
                    if let Some(failure) = retry::endpoint_failure(error) {
                        pick.failed(failure);
                    }
                }
            }
        }
        let connected = Connected {
            endpoint,
            pick,
            local,
            server,
        };
        let Some(retrying) = &retrying else {
            return Ok(connected);
        };
        // Only a failed connection is retried: whatever the method, nothing was sent.
        let condition = match &connected.server {
            Ok(_) => None,
            Err(error) => Failure::of(error)
                .and_then(|failure| retrying.policy.condition(failure, &Method::CONNECT)),
        };
        if let Some(previous) = retried.take() {
            let result = if connected.server.is_ok() {
                "success"
            } else {
                "failure"
            };
            retry::count(&retrying.service, previous, result);
        }
        let Some(condition) = condition.filter(|_| attempt < retrying.policy.attempts) else {
            return Ok(connected);
        };
        let reason = retry::reason(condition, Failure::Connect);
        if !retrying.budget.withdraw() {
            retry::count(&retrying.service, reason, "budget_exhausted");
            return Ok(connected);
        }
        avoid.push(connected.endpoint.address);
        attempt += 1;
        tokio::time::sleep(retry::backoff(attempt, &mut rng)).await;
        retried = Some(reason);
    }
}
