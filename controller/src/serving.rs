//! The controller's own TLS: agents reach the config stream and the CA over TLS 1.3,
//! and the controller presents a certificate its own CA issues to
//! `spiffe://<trust-domain>/ns/<namespace>/sa/weft-controller`, renewed at half-life and
//! whenever the CA's signer changes (a rotation). Agents check that identity against
//! the mesh roots. Nodes still prove who they are with their tokens, now inside TLS.

use std::{
    io,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use rustls::{
    ServerConfig,
    crypto::aws_lc_rs,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    version::TLS13,
};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::ca::runtime::CaState;

/// The certificate the controller presents now.
#[derive(Debug)]
pub struct ServingCert {
    spiffe_id: String,
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().expect("a writer panicked").clone()
    }
}

/// How long the controller's own certificate lives.
const LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl ServingCert {
    /// Issues the first certificate for `spiffe_id` from `state`'s CA.
    pub fn new(spiffe_id: String, state: &CaState) -> anyhow::Result<Arc<ServingCert>> {
        let cert = Arc::new(ServingCert {
            spiffe_id,
            current: RwLock::default(),
        });
        cert.renew(state)?;
        Ok(cert)
    }

    /// The TLS configuration that presents it: TLS 1.3, ALPN `h2`, no client
    /// certificate (agents authenticate with their node tokens).
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let mut config =
            ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
                .with_protocol_versions(&[&TLS13])
                .expect("aws-lc-rs supports TLS 1.3")
                .with_no_client_auth()
                .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }

    /// Renews at half-life and when the CA changes, until the CA's channel closes.
    pub async fn keep_renewed(self: Arc<Self>, mut state: watch::Receiver<Arc<CaState>>) {
        let mut wait = LIFETIME / 2;
        loop {
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep(wait) => {}
            }
            let current = Arc::clone(&state.borrow_and_update());
            wait = match self.renew(&current) {
                Ok(()) => LIFETIME / 2,
                Err(err) => {
                    log::error!(
                        "cannot renew the controller's own certificate: {err}; trying again in 10 s"
                    );
                    Duration::from_secs(10)
                }
            };
        }
    }

    fn renew(&self, state: &CaState) -> anyhow::Result<()> {
        let (key, csr) = weft_api::ca::signing_request(&self.spiffe_id)?;
        let issued = state
            .authority
            .sign(&csr, SystemTime::now(), LIFETIME, state.propagated, |_| {
                Ok(())
            })?
            .map_err(anyhow::Error::msg)?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let certified = CertifiedKey::from_der(issued.chain, key, &aws_lc_rs::default_provider())?;
        *self.current.write().expect("a reader panicked") = Some(Arc::new(certified));
        log::info!(
            "the controller presents {} (certificate {})",
            self.spiffe_id,
            issued.serial
        );
        Ok(())
    }
}

/// The connections `listener` accepts, after their TLS handshake (a client whose
/// handshake fails or stalls is dropped without holding up the others).
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
) -> ReceiverStream<io::Result<Tls>> {
    let (sender, receiver) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    log::warn!("accepting an agent connection failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, handshaken) = (acceptor.clone(), sender.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let local = tcp.local_addr().ok();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let info = TcpConnectInfo {
                            local_addr: local,
                            remote_addr: Some(remote),
                        };
                        let _ = handshaken.send(Ok(Tls { stream, info })).await;
                    }
                    Ok(Err(err)) => log::info!("TLS handshake with {remote} failed: {err}"),
                    Err(_) => log::info!("TLS handshake with {remote} timed out"),
                }
            });
            if sender.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(receiver)
}

/// An agent's connection, after the handshake.
#[derive(Debug)]
pub struct Tls {
    stream: TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for Tls {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Tls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
