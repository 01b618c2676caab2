//! How the agent reaches the controller, for the configuration stream and for
//! certificates: gRPC over TLS 1.3 (`https://`) that accepts only the controller's
//! SPIFFE identity, chained to the bootstrap bundle (`--controller-ca`, reread at every
//! connect) or to a root of the trust bundle the controller streamed last (so a root
//! rotation needs no new file), with the node's credential on every call. `http://`
//! speaks plaintext, for tests only.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::either::Either;
use tonic::{
    Request,
    transport::{Channel, Endpoint, Uri},
};

use crate::{identity::Identity, mesh::TrustAnchor, sync, tls};

/// The controller, as this agent reaches it.
#[derive(Debug)]
pub struct Controller {
    url: String,
    /// PEM roots to trust before (and beside) the streamed bundle; `None` for
    /// plaintext.
    bundle: Option<PathBuf>,
    /// The identity the controller must present.
    identity: Identity,
    token_file: Option<PathBuf>,
    /// The roots of the trust bundle streamed last.
    streamed: RwLock<Vec<CertificateDer<'static>>>,
}

/// Why the controller cannot be reached as configured.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("{url} is not a controller address such as https://weft-controller:15010: {source}")]
    Url {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "{url} is https, so the agent needs the roots to check the controller with: give --controller-ca FILE"
    )]
    NoBundle { url: String },
}

impl Controller {
    pub fn new(
        url: String,
        bundle: Option<PathBuf>,
        identity: Identity,
        token_file: Option<PathBuf>,
    ) -> Result<Controller, ControllerError> {
        Endpoint::from_shared(url.clone()).map_err(|source| ControllerError::Url {
            url: url.clone(),
            source,
        })?;
        let tls = url.starts_with("https://");
        if tls && bundle.is_none() {
            return Err(ControllerError::NoBundle { url });
        }
        if !tls {
            log::warn!(
                "{url} is plaintext: the node token crosses the network in the clear (tests only)"
            );
        }
        Ok(Controller {
            url,
            bundle: bundle.filter(|_| tls),
            identity,
            token_file,
            streamed: RwLock::default(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Trusts the roots of the bundle the controller streamed, from now on.
    pub fn set_streamed_anchors(&self, anchors: &[TrustAnchor]) {
        *sync::write(&self.streamed) = anchors
            .iter()
            .map(|anchor| CertificateDer::from(anchor.certificate.clone()))
            .collect();
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn channel(self: &Arc<Self>) -> Channel {
        self.endpoint()
            .connect_with_connector_lazy(self.connector())
    }

    /// A channel, connected now.
    pub async fn connect(self: &Arc<Self>) -> Result<Channel, tonic::transport::Error> {
        self.endpoint()
            .connect_with_connector(self.connector())
            .await
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::from_shared(self.url.clone())
            .expect("checked in Controller::new")
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
    }

    fn connector(
        self: &Arc<Self>,
    ) -> impl tower::Service<
        Uri,
        Response = TokioIo<Io>,
        Error = io::Error,
        Future = impl Future<Output = io::Result<TokioIo<Io>>> + Send,
    > + Send
    + 'static {
        let controller = Arc::clone(self);
        tower::service_fn(move |uri: Uri| {
            let controller = Arc::clone(&controller);
            async move { controller.dial(uri).await }
        })
    }

    /// TCP to the URI's host and port, then TLS when the controller speaks it.
    async fn dial(&self, uri: Uri) -> io::Result<TokioIo<Io>> {
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(15010);
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let Some(bundle) = &self.bundle else {
            return Ok(TokioIo::new(Either::Left(tcp)));
        };
        let mut anchors = read_bundle(bundle)?;
        anchors.extend(sync::read(&self.streamed).iter().cloned());
        let config =
            tls::controller_client_config(&anchors, &self.identity).map_err(io::Error::other)?;
        let name = tls::server_name(&self.identity).map_err(io::Error::other)?;
        let stream = TlsConnector::from(config).connect(name, tcp).await?;
        Ok(TokioIo::new(Either::Right(stream)))
    }

    /// Adds the node's credential, read from the token file now (so it can be
    /// rotated), to a request.
    pub fn authorize<T>(&self, request: &mut Request<T>) -> Result<(), String> {
        let Some(path) = &self.token_file else {
            return Ok(());
        };
        let token = std::fs::read_to_string(path)
            .map_err(|err| format!("cannot read the node token {}: {err}", path.display()))?;
        let value = format!("Bearer {}", token.trim()).parse().map_err(|_| {
            format!(
                "the node token in {} is not a valid header value",
                path.display()
            )
        })?;
        request.metadata_mut().insert("authorization", value);
        Ok(())
    }
}

fn read_bundle(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let pem = std::fs::read(path)
        .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", path.display())))?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| invalid(format!("{} is not PEM: {err}", path.display())))
}

/// The connection to the controller: plaintext (tests) or TLS.
pub type Io = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
