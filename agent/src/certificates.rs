//! Workload certificates from the mesh CA: for every identity whose pods run on this
//! node, the agent makes a key (it never leaves the node), asks the controller to sign
//! a CSR for it (`weft.ca.v1.CertificateAuthority`, authenticated as the node), and
//! installs the result with the streamed trust bundle as the node's [`CertStore`].
//!
//! A certificate is renewed at 45–55% of its lifetime (the spread keeps a fleet from
//! renewing at once), sooner when the root it leads to is being rotated out (between
//! a quarter and a half of the time left before that root retires), and at once when no
//! root in the bundle is its own any more. Failures are retried with backoff; a
//! certificate is kept until it expires, so an unreachable CA costs nothing until
//! then. New connections use a renewed certificate at once; established ones keep
//! theirs. Certificates are cached in the state directory (keys mode 0600), so a
//! restarted agent serves at once, even with the controller away.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject};
use tonic::{Code, Request, transport::Channel};
use weft_api::ca::v1::{SignRequest, certificate_authority_client::CertificateAuthorityClient};

use crate::{
    backoff::Backoff,
    controller::Controller,
    files::write_atomically,
    identity::Identity,
    mesh::{MeshConfig, TrustAnchor},
    reload::Current,
    tls::{self, CertStore, IssuedCert},
};

/// Where to ask, as whom, and where to cache.
#[derive(Clone, Debug)]
pub struct Settings {
    pub controller: Arc<Controller>,
    pub node: String,
    /// Where issued certificates and their keys are kept across restarts.
    pub cache_dir: PathBuf,
}

/// Why a certificate was not obtained; the metric label is [`Failure::reason`].
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("cannot reach the CA at {controller}: {message}")]
    Unreachable { controller: String, message: String },
    #[error("the CA refused: {0}")]
    Refused(String),
    #[error("the CA's answer is unusable: {0}")]
    InvalidResponse(String),
    #[error("{0}")]
    Local(String),
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Failure::Unreachable { .. } => "unreachable",
            Failure::Refused(_) => "refused",
            Failure::InvalidResponse(_) => "invalid_response",
            Failure::Local(_) => "local",
        }
    }
}

/// A certificate this node holds.
struct Held {
    cert: IssuedCert,
    serial: String,
    not_after: SystemTime,
    /// When it arrived: renewal is planned from here, not from its (backdated) start.
    received: SystemTime,
    /// When the agent first saw the root it leads to being rotated out.
    retiring_since: Option<SystemTime>,
}

impl Held {
    fn new(cert: IssuedCert, received: SystemTime) -> Result<Held, Failure> {
        let facts = tls::leaf_facts(&cert.chain)
            .map_err(|err| Failure::InvalidResponse(err.to_string()))?;
        Ok(Held {
            cert,
            serial: facts.serial,
            not_after: facts.not_after,
            received,
            retiring_since: None,
        })
    }

    /// A fraction in [0, 1) that is fixed for this certificate, for jitter that does
    /// not move each time the renewal is planned.
    fn spread(&self) -> f64 {
        let digest = weft_api::digest::of(self.serial.as_bytes());
        let bits = u64::from_str_radix(&digest[..digest.len().min(8)], 16).unwrap_or(0);
        (bits % 10_000) as f64 / 10_000.0
    }

    /// When to renew, given the trust bundle now.
    fn renew_at(&mut self, anchors: &[TrustAnchor], now: SystemTime) -> SystemTime {
        let spread = self.spread();
        let lifetime = self
            .not_after
            .duration_since(self.received)
            .unwrap_or_default();
        let mut at = self.received + lifetime.mul_f64(0.45 + 0.1 * spread);
        match anchors
            .iter()
            .find(|anchor| anchor.certificate == self.cert.root.as_ref())
        {
            // Its root is no longer trusted: peers refuse it already.
            None if !anchors.is_empty() => return now,
            Some(TrustAnchor {
                signing: false,
                retire_at: Some(retire_at),
                ..
            }) => {
                let since = *self.retiring_since.get_or_insert(now);
                let left = retire_at.duration_since(since).unwrap_or_default();
                at = at.min(since + left.mul_f64(0.25 + 0.25 * spread));
            }
            _ => self.retiring_since = None,
        }
        at
    }
}

/// The identities of this node's meshed pods.
pub(crate) fn local_identities(mesh: &MeshConfig, node: &str) -> BTreeSet<Identity> {
    mesh.workloads
        .iter()
        .filter(|workload| workload.node.as_deref() == Some(node) && !workload.opted_out)
        .map(|workload| mesh.identity(workload))
        .collect()
}

/// Keeps this node's certificates.
pub struct Manager {
    settings: Settings,
    mesh: Arc<Current<MeshConfig>>,
    client: CertificateAuthorityClient<Channel>,
    held: BTreeMap<Identity, Held>,
    /// Identities whose last request failed: the backoff and when to try again.
    failing: BTreeMap<Identity, (Backoff, SystemTime)>,
    /// What the installed store was built from: anchors and serials.
    installed: Option<(Vec<Vec<u8>>, Vec<String>)>,
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("controller", &self.settings.controller.url())
            .field("held", &self.held.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The longest the manager sleeps without looking again.
const MAX_SLEEP: Duration = Duration::from_secs(30);
/// How long one signing request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Manager {
    /// Loads the cached certificates, asks for the missing ones once, and returns the
    /// manager with the node's first store (built from what it has, even if the CA did
    /// not answer).
    pub async fn start(
        settings: Settings,
        mesh: Arc<Current<MeshConfig>>,
    ) -> anyhow::Result<(Manager, CertStore)> {
        let client = CertificateAuthorityClient::new(settings.controller.channel());
        let held = load_cache(&settings.cache_dir);
        let mut manager = Manager {
            settings,
            mesh,
            client,
            held,
            failing: BTreeMap::new(),
            installed: None,
        };
        manager.round(SystemTime::now()).await;
        let store = manager.build()?.ok_or_else(|| {
            anyhow::anyhow!(
                "the controller sent no trust bundle; is it older than this agent? (the mesh CA arrived with weft 0.1's identity work)"
            )
        })?;
        Ok((manager, store))
    }

    /// Renews and installs certificates into `certs` for as long as the agent runs.
    pub async fn run(mut self, certs: Arc<Current<CertStore>>) {
        let mut mesh_changes = self.mesh.subscribe();
        loop {
            let next = self.round(SystemTime::now()).await;
            match self.build() {
                Ok(Some(store)) => {
                    log::info!(
                        "installed {} workload certificate(s)",
                        store.identities().len()
                    );
                    certs.replace(store);
                }
                Ok(None) => {}
                Err(err) => log::error!("{err}; keeping the certificates installed before"),
            }
            let wait = next
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(MAX_SLEEP);
            tokio::select! {
                _ = mesh_changes.changed() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Drops what is no longer needed or valid, requests what is due, and returns when
    /// something will next be due.
    async fn round(&mut self, now: SystemTime) -> SystemTime {
        let mesh = self.mesh.get();
        let wanted = local_identities(&mesh, &self.settings.node);
        self.held
            .retain(|identity, held| wanted.contains(identity) && held.not_after > now);
        self.failing.retain(|identity, _| wanted.contains(identity));
        let mut next = now + MAX_SLEEP;
        // Once the CA cannot be reached, the other identities wait for the next round
        // instead of each timing out in turn.
        let mut unreachable = None;
        for identity in &wanted {
            let due = match self.held.get_mut(identity) {
                Some(held) => held.renew_at(&mesh.trust_anchors, now),
                None => now,
            };
            let retry = self.failing.get(identity).map(|(_, at)| *at);
            let at = retry.map_or(due, |retry| due.max(retry));
            if at > now {
                next = next.min(at);
                continue;
            }
            let result = match &unreachable {
                Some(message) => Err(Failure::Unreachable {
                    controller: self.settings.controller.url().to_owned(),
                    message: String::clone(message),
                }),
                None => self.request(identity).await,
            };
            if let Err(Failure::Unreachable { message, .. }) = &result {
                unreachable = Some(message.clone());
            }
            match result {
                Ok(held) => {
                    metrics::counter!("weft_certificate_requests_total", "result" => "issued")
                        .increment(1);
                    log::info!(
                        "the CA issued {identity} certificate {}, valid for {} s",
                        held.serial,
                        held.not_after
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                            .as_secs()
                    );
                    self.failing.remove(identity);
                    self.held.insert(identity.clone(), held);
                    let renew = self
                        .held
                        .get_mut(identity)
                        .map(|held| held.renew_at(&mesh.trust_anchors, now));
                    next = next.min(renew.unwrap_or(next));
                }
                Err(failure) => {
                    metrics::counter!("weft_certificate_requests_total", "result" => "failed")
                        .increment(1);
                    metrics::counter!("weft_certificate_failures_total", "reason" => failure.reason())
                        .increment(1);
                    let (backoff, retry_at) = self
                        .failing
                        .entry(identity.clone())
                        .or_insert_with(|| (Backoff::default(), now));
                    let delay = backoff.next_delay();
                    *retry_at = now + delay;
                    next = next.min(*retry_at);
                    log::warn!(
                        "no certificate for {identity}: {failure}; trying again in {delay:?}{}",
                        match self.held.get(identity) {
                            Some(held) => format!(", serving {} until then", held.serial),
                            None => String::new(),
                        }
                    );
                }
            }
        }
        next
    }

    /// Asks the CA to sign a fresh key for `identity`.
    async fn request(&mut self, identity: &Identity) -> Result<Held, Failure> {
        let (key, csr) = weft_api::ca::signing_request(&identity.to_string())
            .map_err(|err| Failure::Local(format!("cannot make a signing request: {err}")))?;
        let mut request = Request::new(SignRequest {
            node: self.settings.node.clone(),
            csr,
        });
        request.set_timeout(REQUEST_TIMEOUT);
        self.settings
            .controller
            .authorize(&mut request)
            .map_err(Failure::Local)?;
        let response = self
            .client
            .sign(request)
            .await
            .map_err(|status| match status.code() {
                Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated => {
                    Failure::Refused(status.message().to_owned())
                }
                _ => Failure::Unreachable {
                    controller: self.settings.controller.url().to_owned(),
                    message: status.message().to_owned(),
                },
            })?;
        let response = response.into_inner();
        let invalid = |what: &str| Failure::InvalidResponse(what.to_owned());
        let chain = CertificateDer::pem_slice_iter(response.chain.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| invalid("its chain is not PEM"))?;
        let root = CertificateDer::from_pem_slice(response.root.as_bytes())
            .map_err(|_| invalid("its root is not PEM"))?;
        let cert = IssuedCert {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            root,
        };
        let held = Held::new(cert, SystemTime::now())?;
        let issued_for = tls::leaf_facts(&held.cert.chain)
            .map_err(|err| Failure::InvalidResponse(err.to_string()))?
            .identity;
        if issued_for != *identity {
            return Err(Failure::InvalidResponse(format!(
                "it is for {issued_for}, not {identity}"
            )));
        }
        Ok(held)
    }

    /// A new store when the anchors or the certificates changed since the last one
    /// (`None` when nothing did, or when there is no trust bundle yet).
    fn build(&mut self) -> Result<Option<CertStore>, tls::TlsError> {
        let mesh = self.mesh.get();
        if mesh.trust_anchors.is_empty() {
            return Ok(None);
        }
        let anchors: Vec<Vec<u8>> = mesh
            .trust_anchors
            .iter()
            .map(|anchor| anchor.certificate.clone())
            .collect();
        let serials: Vec<String> = self.held.values().map(|held| held.serial.clone()).collect();
        let built_from = Some((anchors, serials));
        if self.installed == built_from {
            return Ok(None);
        }
        let roots: Vec<CertificateDer<'static>> = mesh
            .trust_anchors
            .iter()
            .map(|anchor| CertificateDer::from(anchor.certificate.clone()))
            .collect();
        let issued: Vec<&IssuedCert> = self.held.values().map(|held| &held.cert).collect();
        let store = CertStore::issued(&roots, &issued)?;
        self.installed = built_from;
        save_cache(&self.settings.cache_dir, &self.held);
        Ok(Some(store))
    }
}

fn stem(identity: &Identity) -> String {
    format!("{}.{}", identity.service_account, identity.namespace)
}

/// The certificates cached by an earlier run; what cannot be read is skipped (it will
/// be requested again).
fn load_cache(dir: &Path) -> BTreeMap<Identity, Held> {
    let Ok(entries) = fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    let mut held = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|ext| ext != "crt") {
            continue;
        }
        let read = || -> Option<IssuedCert> {
            let chain = CertificateDer::pem_file_iter(&path)
                .ok()?
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_file(path.with_extension("key")).ok()?;
            let root = CertificateDer::from_pem_file(path.with_extension("root")).ok()?;
            Some(IssuedCert { chain, key, root })
        };
        let Some(cert) = read() else {
            log::warn!(
                "ignoring the unreadable cached certificate {}",
                path.display()
            );
            continue;
        };
        // Unknown arrival: plan renewal from now, which at worst renews a little late
        // in the first lifetime after a restart.
        if let Ok(cached) = Held::new(cert, SystemTime::now()) {
            let identity = tls::leaf_facts(&cached.cert.chain).map(|facts| facts.identity);
            if let Ok(identity) = identity {
                held.insert(identity, cached);
            }
        }
    }
    held
}

/// Replaces the cache with `held`; failures are logged (a restart then waits for the
/// CA).
fn save_cache(dir: &Path, held: &BTreeMap<Identity, Held>) {
    let result = (|| -> std::io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut keep = BTreeSet::new();
        for (identity, held) in held {
            let stem = stem(identity);
            let pem = |label: &str, der: &[u8]| pem::encode(&pem::Pem::new(label, der.to_vec()));
            let chain: String = held
                .cert
                .chain
                .iter()
                .map(|der| pem("CERTIFICATE", der))
                .collect();
            let key = pem("PRIVATE KEY", held.cert.key.secret_der());
            let root = pem("CERTIFICATE", &held.cert.root);
            for (extension, contents, mode) in [
                ("key", key, 0o600),
                ("root", root, 0o644),
                ("crt", chain, 0o644),
            ] {
                let name = format!("{stem}.{extension}");
                write_atomically(&dir.join(&name), contents.as_bytes(), mode)?;
                keep.insert(name);
            }
        }
        for entry in fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    })();
    if let Err(err) = result {
        log::warn!(
            "cannot cache the certificates in {}: {err}; a restart will wait for the CA",
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::PermissionsExt,
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    };

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    };
    use tokio::net::TcpListener;
    use tonic::{Response, Status};
    use weft_api::ca::v1::{
        SignResponse,
        certificate_authority_server::{CertificateAuthority, CertificateAuthorityServer},
    };

    use super::*;

    /// A stand-in CA that signs every request for `ttl`, or refuses while `refuse`.
    struct FakeCa {
        issuer: Issuer<'static, KeyPair>,
        root: CertificateDer<'static>,
        ttl: Duration,
        refuse: AtomicBool,
        signed: AtomicUsize,
    }

    impl FakeCa {
        fn new(ttl: Duration) -> FakeCa {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let root = params.self_signed(&key).unwrap().der().clone();
            FakeCa {
                issuer: Issuer::new(params, key),
                root,
                ttl,
                refuse: AtomicBool::new(false),
                signed: AtomicUsize::new(0),
            }
        }

        fn anchor(&self, signing: bool, retire_at: Option<SystemTime>) -> TrustAnchor {
            TrustAnchor {
                certificate: self.root.to_vec(),
                signing,
                retire_at,
            }
        }
    }

    /// The CA as the gRPC server holds it.
    struct Served(Arc<FakeCa>);

    #[tonic::async_trait]
    impl CertificateAuthority for Served {
        async fn sign(
            &self,
            request: Request<SignRequest>,
        ) -> Result<Response<SignResponse>, Status> {
            let ca = &self.0;
            if ca.refuse.load(Ordering::SeqCst) {
                return Err(Status::permission_denied("not on this node"));
            }
            let request = CertificateSigningRequestParams::from_pem(&request.into_inner().csr)
                .map_err(|err| Status::invalid_argument(err.to_string()))?;
            let mut params = CertificateParams::default();
            params.subject_alt_names = request.params.subject_alt_names.clone();
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let now = SystemTime::now();
            params.not_before = (now - Duration::from_secs(60)).into();
            params.not_after = (now + ca.ttl).into();
            let leaf = params.signed_by(&request.public_key, &ca.issuer).unwrap();
            ca.signed.fetch_add(1, Ordering::SeqCst);
            let pem = |der: &[u8]| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()));
            Ok(Response::new(SignResponse {
                chain: pem(leaf.der()),
                root: pem(&ca.root),
            }))
        }
    }

    async fn serve(ca: Arc<FakeCa>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CertificateAuthorityServer::new(Served(ca)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{address}")
    }

    fn mesh(anchors: Vec<TrustAnchor>, accounts: &[&str]) -> MeshConfig {
        let mut mesh = MeshConfig {
            trust_anchors: anchors,
            ..MeshConfig::default()
        };
        let yaml: String = accounts
            .iter()
            .enumerate()
            .map(|(index, account)| {
                format!(
                    "- {{name: {account}-0, namespace: shop, serviceAccount: {account}, node: node0, ip: 10.0.0.{}}}\n",
                    index + 1
                )
            })
            .collect();
        mesh.workloads = serde_yaml::from_str(&format!("{yaml}- {{name: far, namespace: shop, serviceAccount: far, node: node1, ip: 10.0.1.1}}\n")).unwrap();
        mesh
    }

    fn settings(url: String, cache: &Path) -> Settings {
        let identity = Identity::parse("spiffe://cluster.local/ns/weft-system/sa/weft-controller");
        let controller = Controller::new(url, None, identity.unwrap(), None).unwrap();
        Settings {
            controller: Arc::new(controller),
            node: "node0".into(),
            cache_dir: cache.to_owned(),
        }
    }

    fn ids(store: &CertStore) -> Vec<String> {
        store
            .identities()
            .iter()
            .map(|info| info.identity.to_string())
            .collect()
    }

    #[tokio::test]
    async fn issues_the_node_identities_caches_them_and_drops_departed_ones() {
        let ca = Arc::new(FakeCa::new(Duration::from_secs(3600)));
        let controller = serve(Arc::clone(&ca)).await;
        let cache = tempfile::tempdir().unwrap();
        let config = Arc::new(Current::new(mesh(
            vec![ca.anchor(true, None)],
            &["cart", "pay"],
        )));
        let (mut manager, store) = Manager::start(
            settings(controller.clone(), cache.path()),
            Arc::clone(&config),
        )
        .await
        .unwrap();
        // Only this node's identities, each leading to the streamed root.
        assert_eq!(
            ids(&store),
            [
                "spiffe://cluster.local/ns/shop/sa/cart",
                "spiffe://cluster.local/ns/shop/sa/pay"
            ]
        );
        assert_eq!(ca.signed.load(Ordering::SeqCst), 2);
        let key = cache.path().join("cart.shop.key");
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );

        // Nothing is due: a second round asks for nothing and builds nothing new.
        manager.round(SystemTime::now()).await;
        assert!(manager.build().unwrap().is_none());
        assert_eq!(ca.signed.load(Ordering::SeqCst), 2);

        // A restarted agent serves the cached certificates without asking, even with
        // the CA gone.
        ca.refuse.store(true, Ordering::SeqCst);
        let (_, restarted) =
            Manager::start(settings(controller, cache.path()), Arc::clone(&config))
                .await
                .unwrap();
        assert_eq!(ids(&restarted), ids(&store));

        // A departed pod's identity goes, from the store and the cache.
        config.replace(mesh(vec![ca.anchor(true, None)], &["cart"]));
        manager.round(SystemTime::now()).await;
        let store = manager.build().unwrap().expect("a new store");
        assert_eq!(ids(&store), ["spiffe://cluster.local/ns/shop/sa/cart"]);
        assert!(!cache.path().join("pay.shop.key").exists());
    }

    #[tokio::test]
    async fn a_refusing_ca_is_retried_with_backoff_and_the_old_certificate_kept() {
        let ca = Arc::new(FakeCa::new(Duration::from_secs(3600)));
        let controller = serve(Arc::clone(&ca)).await;
        let cache = tempfile::tempdir().unwrap();
        let config = Arc::new(Current::new(mesh(vec![ca.anchor(true, None)], &["cart"])));
        let (mut manager, store) = Manager::start(settings(controller, cache.path()), config)
            .await
            .unwrap();
        let serial = store.identities()[0].serial.clone();

        // Past the renewal time, the CA refuses: the certificate stays, and the next
        // attempt waits for the backoff.
        ca.refuse.store(true, Ordering::SeqCst);
        let later = SystemTime::now() + Duration::from_secs(3000);
        let next = manager.round(later).await;
        assert!(next > later, "a retry is planned after a backoff");
        assert_eq!(manager.held.values().next().unwrap().serial, serial);
        assert!(
            manager
                .failing
                .contains_key(&Identity::parse("spiffe://cluster.local/ns/shop/sa/cart").unwrap())
        );

        ca.refuse.store(false, Ordering::SeqCst);
        manager.round(next).await;
        assert_ne!(manager.held.values().next().unwrap().serial, serial);
        assert!(manager.failing.is_empty());
    }

    #[tokio::test]
    async fn renewal_is_planned_at_half_life_or_before_the_root_retires() {
        let ca = Arc::new(FakeCa::new(Duration::from_secs(1000)));
        let controller = serve(Arc::clone(&ca)).await;
        let cache = tempfile::tempdir().unwrap();
        let config = Arc::new(Current::new(mesh(vec![ca.anchor(true, None)], &["cart"])));
        let (manager, _) = Manager::start(settings(controller, cache.path()), config)
            .await
            .unwrap();
        let mut held = manager.held.into_values().next().unwrap();
        let now = held.received;
        let lifetime = held.not_after.duration_since(now).unwrap();

        let normal = held.renew_at(&[ca.anchor(true, None)], now);
        let offset = normal.duration_since(now).unwrap();
        assert!(
            offset >= lifetime.mul_f64(0.45) && offset <= lifetime.mul_f64(0.55),
            "{offset:?} of {lifetime:?}"
        );
        assert_eq!(
            held.renew_at(&[ca.anchor(true, None)], now),
            normal,
            "the jitter is stable"
        );

        // Its root is being rotated out, retiring in 400 s: renew within 100–200 s.
        let retire = now + Duration::from_secs(400);
        let other = FakeCa::new(Duration::from_secs(1)).anchor(true, None);
        let early = held.renew_at(&[other.clone(), ca.anchor(false, Some(retire))], now);
        let offset = early.duration_since(now).unwrap();
        assert!(
            offset >= Duration::from_secs(100) && offset <= Duration::from_secs(200),
            "{offset:?}"
        );

        // Its root is gone from the bundle: renew now.
        assert_eq!(held.renew_at(&[other], now), now);
    }

    #[tokio::test]
    async fn an_unreachable_ca_leaves_every_identity_waiting_for_a_retry() {
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let controller = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let cache = tempfile::tempdir().unwrap();
        let ca = FakeCa::new(Duration::from_secs(60));
        let config = Arc::new(Current::new(mesh(
            vec![ca.anchor(true, None)],
            &["cart", "pay"],
        )));
        let (manager, store) = Manager::start(settings(controller, cache.path()), config)
            .await
            .unwrap();
        assert!(store.identities().is_empty());
        assert_eq!(manager.failing.len(), 2, "both wait for a retry");
        assert!(
            manager
                .failing
                .values()
                .all(|(_, at)| *at > SystemTime::now() - Duration::from_secs(1))
        );
    }
}
