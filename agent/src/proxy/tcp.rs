//! The L4 case, "TCP, no routes": one endpoint per connection from the service's
//! balancer, connected with [`connect`], and the bytes copied both ways until the
//! connection ends or idles out, counted while it is open. A connection to a pod of
//! this node is authorized here by that pod's policies, before and while it is open.

use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};

use weft_api::authz::Traffic;

use super::{
    Proxy,
    authorize::{self, Caller, Direction},
    connect::connect,
    error::ProxyError,
    logical::{Hop, Logical},
    metrics::{self, Connection, Outcome, Reporter},
    outbound::{self, choose, refused},
    relay::relay,
};
use crate::logging::{Throttle, held_back};

/// Carries the captured connection `client` to an endpoint of `logical`.
pub async fn carry<IO>(proxy: &Proxy, mut client: IO, logical: &Logical)
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    static FAILED: Throttle = Throttle::new();
    let peer = logical.source.address;
    let (endpoint, pick) = match choose(proxy, logical) {
        Ok(chosen) => chosen,
        Err(refusal) => return refused(peer, &refusal),
    };
    // A pod of this node: this agent decides for it, as its own would for a tunnel.
    let local = (endpoint.hop == Hop::Local)
        .then(|| Caller::authenticated(&logical.source.identity, Some(peer.ip())));
    if let Some(caller) = &local
        && let Err(denied) = authorize::connection(
            &proxy.mesh.get(),
            Direction::Local,
            caller,
            endpoint.address,
            Traffic::Tcp,
        )
    {
        return refused(peer, &ProxyError::Denied { by: denied.by });
    }
    let idle = outbound::idle_timeout(proxy, logical);
    let mut connection = Connection::new(
        Reporter::Source,
        logical.source.peer.clone(),
        endpoint.peer.clone(),
    );
    connection.service = logical.service();
    connection.mutual_tls = endpoint.hop.mutual_tls();
    let open = connection.opened(&proxy.settings.access_log);
    let started = Instant::now();
    let outcome = match connect(proxy, &endpoint, &logical.source, None).await {
        Ok(mut server) => {
            if let Some(pick) = &pick {
                pick.observe(started.elapsed());
                pick.succeeded();
            }
            let relayed = relay(&mut client, &mut server, Some(idle), |received, sent| {
                open.progress(received, sent);
            });
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
        Err(error) => {
            if let Some(pick) = &pick {
                pick.failed();
            }
            Outcome::failed(error)
        }
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
