//! Mutual TLS for HBONE: the workload certificates this node holds and the rustls
//! configurations that present and check them.
//!
//! HBONE tunnels are TLS 1.3 only, ALPN `h2`, with client certificates required. The
//! source agent presents the *client workload's* certificate ([`CertStore::client_config`]);
//! the destination agent presents the *destination workload's* certificate, which the
//! client asks for by TLS server name: [`Identity::sni`] of that workload
//! ([`CertStore::server_config`], [`server_name`]). Both sides verify the peer's chain
//! against the mesh trust anchors; host names play no part. The client additionally
//! requires the server's SPIFFE ID to be exactly the one it expected, and the server
//! learns who the client is with [`peer_identity`], for policy.
//!
//! With a controller, the certificates are the ones its CA issued and the trust anchors
//! are streamed with the configuration ([`CertStore::issued`]; see `certificates`).
//! Without one, they come from files ([`CertStore::load`]): a PEM trust bundle and a directory of `<name>.crt` (chain, leaf first) + `<name>.key`
//! pairs. Each leaf names its workload in its only `spiffe://` URI SAN, must chain to the
//! bundle now and must allow both `serverAuth` and `clientAuth`, since a workload's
//! certificate serves both ends of a tunnel. One crypto provider is used throughout,
//! aws-lc-rs, passed explicitly rather than taken from the process default.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt, fs, io,
    path::{Path, PathBuf},
    slice,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error as RustlsError, InconsistentKeys,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        verify_server_cert_signed_by_trust_anchor,
    },
    crypto::{
        CryptoProvider, WebPkiSupportedAlgorithms, aws_lc_rs, verify_tls12_signature,
        verify_tls13_signature,
    },
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem, pem::PemObject},
    server::{
        ClientHello, ParsedCertificate, ResolvesServerCert, VerifierBuilderError,
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
    version::TLS13,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

use crate::{
    identity::{Identity, IdentityError},
    sync,
};

/// The one application protocol HBONE speaks over TLS.
pub const ALPN_H2: &[u8] = b"h2";

/// What went wrong loading certificates, building a TLS configuration or checking a
/// peer. The messages name the file, or the identity, and what to check.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}; check that it exists and that the agent may read it")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot list the certificate directory {path}: {source}; check that it exists and that the agent may read it"
    )]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid PEM: {source}")]
    Pem {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error(
        "the trust bundle {path} holds no CERTIFICATE block; it must hold the mesh CA's root certificate(s) in PEM"
    )]
    EmptyBundle { path: PathBuf },
    #[error("certificate #{index} of the trust bundle {path} cannot be a trust anchor: {source}")]
    TrustAnchor {
        path: PathBuf,
        index: usize,
        #[source]
        source: RustlsError,
    },
    #[error(
        "{path} holds no CERTIFICATE block; it must hold the workload's certificate chain in PEM, leaf first"
    )]
    EmptyChain { path: PathBuf },
    #[error(
        "{path} holds no private key; expected a PEM PRIVATE KEY (PKCS#8), EC PRIVATE KEY (SEC1) or RSA PRIVATE KEY (PKCS#1) block"
    )]
    NoKey { path: PathBuf },
    #[error("the private key in {path} cannot be used: {source}")]
    Key {
        path: PathBuf,
        #[source]
        source: RustlsError,
    },
    #[error(
        "the private key in {key} does not belong to the certificate in {cert}; replace both files of the pair together"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{cert} has no private key beside it; expected {key}")]
    MissingKey { cert: PathBuf, key: PathBuf },
    #[error("{key} has no certificate beside it; expected {cert}")]
    MissingCert { key: PathBuf, cert: PathBuf },
    #[error(
        "{path} is not valid as a TLS {usage} certificate under the trust bundle {bundle}: {source}; check that the bundle's CA issued it, that it is within its validity period and that it allows the serverAuth and clientAuth extended key usages"
    )]
    Untrusted {
        path: PathBuf,
        bundle: PathBuf,
        usage: &'static str,
        // Boxed to keep the error (and every `Result` of this module) small.
        #[source]
        source: Box<RustlsError>,
    },
    #[error("{identity} has two certificates, {first} and {second}; remove one of the pairs")]
    Duplicate {
        identity: Identity,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{path}: {source}")]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<TlsError>,
    },
    #[error(
        "certificate #{index} of the controller's trust bundle cannot be a trust anchor: {source}"
    )]
    StreamedAnchor {
        index: usize,
        #[source]
        source: RustlsError,
    },
    #[error("the certificate the CA issued for {identity}: {source}")]
    Issued {
        identity: Box<Identity>,
        #[source]
        source: Box<TlsError>,
    },
    #[error("the certificate cannot be parsed: {0}")]
    BadCertificate(String),
    #[error(
        "the certificate has no spiffe:// URI subject alternative name; a weft certificate carries the workload's SPIFFE ID as its only URI SAN"
    )]
    NoSpiffeId,
    #[error(
        "the certificate carries several SPIFFE IDs ({}); a weft certificate carries exactly one",
        .0.join(", ")
    )]
    SeveralSpiffeIds(Vec<String>),
    #[error("the certificate's SPIFFE ID is not a weft workload identity: {0}")]
    InvalidSpiffeId(#[from] IdentityError),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error(
        "the peer presented the certificate of {presented}, but {expected} was expected; the destination may not run the workload the mesh configuration says, or its node holds the wrong certificate"
    )]
    WrongPeer {
        // Boxed to keep the error (and every `Result` of this module) small.
        expected: Box<Identity>,
        presented: Box<Identity>,
    },
    #[error(
        "this node holds no certificate for {0}; its .crt/.key pair must be in the agent's certificate directory"
    )]
    NoCertificate(Identity),
    #[error(
        "{0} has no valid TLS server name; build identities with Identity::new or Identity::parse"
    )]
    ServerName(Identity),
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] VerifierBuilderError),
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] RustlsError),
}

/// One workload certificate held by the node, as the admin endpoint and the metrics
/// show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The serial number in lowercase hex, without leading zeros or separators.
    pub serial: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// The root it leads to (its subject), when the CA said so.
    pub root: Option<String>,
    /// The `.crt` file it was loaded from; none for a certificate the CA issued.
    pub cert_file: Option<PathBuf>,
}

/// A workload certificate the mesh CA issued, with the key the agent made for it.
#[derive(Debug)]
pub struct IssuedCert {
    /// Leaf first, without the root.
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The root the chain leads to.
    pub root: CertificateDer<'static>,
}

/// The mesh trust anchors and this node's workload certificates, and the TLS
/// configurations built from them.
pub struct CertStore {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    certs: BTreeMap<Identity, LoadedCert>,
    server_config: Arc<ServerConfig>,
    /// For connections dialed at a pod's own address: the pod's certificate when the
    /// client sends no server name.
    dialed_configs: HashMap<Identity, Arc<ServerConfig>>,
    /// Client configurations by source identity, then expected server identity. At most
    /// one per (local workload, remote workload) pair the node talks to.
    client_configs: Mutex<HashMap<Identity, HashMap<Identity, Arc<ClientConfig>>>>,
}

struct LoadedCert {
    key: Arc<CertifiedKey>,
    info: CertInfo,
}

impl CertStore {
    /// Loads the trust anchors from the PEM bundle `trust_bundle` (one or more root
    /// certificates) and every `<name>.crt` + `<name>.key` pair in `certs_dir`.
    ///
    /// A `.crt` holds the PEM chain, leaf first; a `.key` the PEM private key (PKCS#8,
    /// SEC1 or PKCS#1). Files whose names start with `.` (such as the `..data` links of
    /// a Kubernetes secret volume) and files with other extensions are ignored. Each
    /// leaf's identity is its only `spiffe://` URI SAN. A pair that is incomplete,
    /// unreadable, not trusted by the bundle right now, or names an identity another
    /// pair already has, fails the whole load with an error naming the file.
    pub fn load(trust_bundle: &Path, certs_dir: &Path) -> Result<CertStore, TlsError> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let roots = Arc::new(load_trust_bundle(trust_bundle)?);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let checks = LeafChecks {
            bundle: trust_bundle,
            roots: &roots,
            client_verifier: client_verifier.as_ref(),
            algorithms: provider.signature_verification_algorithms,
            now: UnixTime::now(),
        };

        let mut certs = BTreeMap::<Identity, LoadedCert>::new();
        for (cert_file, key_file) in find_pairs(certs_dir)? {
            let loaded = load_pair(&cert_file, &key_file, &checks, &provider)?;
            if let Some(first) = certs.get(&loaded.info.identity) {
                return Err(TlsError::Duplicate {
                    identity: loaded.info.identity,
                    first: first.info.cert_file.clone().unwrap_or_default(),
                    second: cert_file,
                });
            }
            log::info!(
                "loaded the certificate of {} from {} (serial {})",
                loaded.info.identity,
                cert_file.display(),
                loaded.info.serial
            );
            certs.insert(loaded.info.identity.clone(), loaded);
        }
        if certs.is_empty() {
            log::info!(
                "no workload certificates in {}; inbound HBONE connections will be refused",
                certs_dir.display()
            );
        }
        CertStore::assemble(provider, roots, client_verifier, certs)
    }

    /// The store of certificates the mesh CA issued, trusting `anchors` (DER roots).
    /// Each chain must lead to one of them now; one that does not (or whose key does
    /// not fit) fails the whole build with an error naming its identity.
    pub fn issued(
        anchors: &[CertificateDer<'static>],
        issued: &[&IssuedCert],
    ) -> Result<CertStore, TlsError> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let mut roots = RootCertStore::empty();
        for (index, anchor) in anchors.iter().enumerate() {
            roots
                .add(anchor.clone())
                .map_err(|source| TlsError::StreamedAnchor {
                    index: index + 1,
                    source,
                })?;
        }
        let roots = Arc::new(roots);
        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        let now = UnixTime::now();
        let mut certs = BTreeMap::new();
        for cert in issued {
            let (leaf, intermediates) = cert
                .chain
                .split_first()
                .ok_or(TlsError::NoPeerCertificate)?;
            let facts = parse_leaf(leaf)?;
            let identity = facts.identity.clone();
            let in_cert = |source: TlsError| TlsError::Issued {
                identity: Box::new(identity.clone()),
                source: Box::new(source),
            };
            let untrusted = |source| {
                in_cert(TlsError::BadCertificate(format!(
                    "it does not lead to the streamed trust bundle: {source}"
                )))
            };
            let webpki_leaf = ParsedCertificate::try_from(leaf).map_err(untrusted)?;
            verify_server_cert_signed_by_trust_anchor(
                &webpki_leaf,
                &roots,
                intermediates,
                now,
                provider.signature_verification_algorithms.all,
            )
            .map_err(untrusted)?;
            let key = CertifiedKey::from_der(cert.chain.clone(), cert.key.clone_key(), &provider)
                .map_err(|source| in_cert(TlsError::Config(source)))?;
            let root = parse_certificate(&cert.root)
                .map(|root| root.subject().to_string())
                .ok();
            certs.insert(
                identity,
                LoadedCert {
                    key: Arc::new(key),
                    info: CertInfo {
                        identity: facts.identity,
                        not_before: facts.not_before,
                        not_after: facts.not_after,
                        serial: facts.serial,
                        issuer: facts.issuer,
                        root,
                        cert_file: None,
                    },
                },
            );
        }
        CertStore::assemble(provider, roots, client_verifier, certs)
    }

    fn assemble(
        provider: Arc<CryptoProvider>,
        roots: Arc<RootCertStore>,
        client_verifier: Arc<dyn ClientCertVerifier>,
        certs: BTreeMap<Identity, LoadedCert>,
    ) -> Result<CertStore, TlsError> {
        let by_sni: Arc<HashMap<String, Arc<CertifiedKey>>> = Arc::new(
            certs
                .iter()
                .map(|(identity, cert)| (identity.sni(), cert.key.clone()))
                .collect(),
        );
        let config = |dialed: Option<Arc<CertifiedKey>>| -> Result<_, TlsError> {
            let resolver = ServerCert {
                by_sni: by_sni.clone(),
                dialed,
            };
            let mut config = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&TLS13])
                .map_err(TlsError::Config)?
                .with_client_cert_verifier(Arc::new(SpiffeClientVerifier(client_verifier.clone())))
                .with_cert_resolver(Arc::new(resolver));
            config.alpn_protocols = vec![ALPN_H2.to_vec()];
            Ok(Arc::new(config))
        };
        let server_config = config(None)?;
        let dialed_configs = certs
            .iter()
            .map(|(identity, cert)| Ok((identity.clone(), config(Some(cert.key.clone()))?)))
            .collect::<Result<_, TlsError>>()?;
        Ok(CertStore {
            provider,
            roots,
            certs,
            server_config,
            dialed_configs,
            client_configs: Mutex::default(),
        })
    }

    /// The serial number of the certificate held for `identity`.
    pub fn serial(&self, identity: &Identity) -> Option<&str> {
        self.certs
            .get(identity)
            .map(|cert| cert.info.serial.as_str())
    }

    /// The certificates held, ordered by identity.
    pub fn identities(&self) -> Vec<CertInfo> {
        self.certs.values().map(|cert| cert.info.clone()).collect()
    }

    /// The configuration of the inbound HBONE listener: TLS 1.3, ALPN `h2`, a client
    /// certificate required and verified against the trust anchors, and the server
    /// certificate chosen by TLS server name. The name must be [`Identity::sni`] of a
    /// workload this store holds; with an unknown one the handshake fails.
    ///
    /// Without a name, the certificate is `dialed`'s: the identity of the pod whose
    /// own address the client dialed, as Istio's HBONE peers address a pod. Without a
    /// name or a dialed pod (or with one this store holds no certificate for), the
    /// handshake fails. Built once at load.
    pub fn server_config(&self, dialed: Option<&Identity>) -> Arc<ServerConfig> {
        dialed
            .and_then(|identity| self.dialed_configs.get(identity))
            .unwrap_or(&self.server_config)
            .clone()
    }

    /// The configuration for a tunnel from local workload `source` to the workload
    /// `expected_server`: TLS 1.3, ALPN `h2`, `source`'s certificate as the client
    /// certificate, and a server check that accepts only a chain to the trust anchors
    /// whose leaf is exactly `expected_server`. Connect with
    /// [`server_name`]`(expected_server)` so the destination agent picks the right
    /// certificate. Configurations are cached per pair, which also keeps their TLS
    /// session caches (resumption) alive across calls.
    pub fn client_config(
        &self,
        source: &Identity,
        expected_server: &Identity,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut cache = sync::lock(&self.client_configs);
        if let Some(config) = cache
            .get(source)
            .and_then(|by_server| by_server.get(expected_server))
        {
            return Ok(config.clone());
        }
        let cert = self
            .certs
            .get(source)
            .ok_or_else(|| TlsError::NoCertificate(source.clone()))?;
        let verifier = SpiffeServerVerifier {
            roots: self.roots.clone(),
            algorithms: self.provider.signature_verification_algorithms,
            expected: expected_server.clone(),
        };
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&TLS13])
            .map_err(TlsError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(ClientCert(cert.key.clone())));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        let config = Arc::new(config);
        cache
            .entry(source.clone())
            .or_default()
            .insert(expected_server.clone(), config.clone());
        Ok(config)
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("trust_anchors", &self.roots.len())
            .field(
                "identities",
                &self
                    .certs
                    .keys()
                    .map(Identity::to_string)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The configuration for reaching the controller: TLS 1.3, ALPN `h2`, no client
/// certificate (the node proves itself with its token), and a server check that
/// accepts only a chain to `anchors` whose leaf is exactly `controller`.
pub fn controller_client_config(
    anchors: &[CertificateDer<'static>],
    controller: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut roots = RootCertStore::empty();
    for (index, anchor) in anchors.iter().enumerate() {
        roots
            .add(anchor.clone())
            .map_err(|source| TlsError::StreamedAnchor {
                index: index + 1,
                source,
            })?;
    }
    let verifier = SpiffeServerVerifier {
        roots: Arc::new(roots),
        algorithms: provider.signature_verification_algorithms,
        expected: controller.clone(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The SPIFFE identity of a peer, from the leaf (first) certificate of the chain it
/// presented, e.g. `ServerConnection::peer_certificates()` after the handshake.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<Identity, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    Ok(parse_leaf(leaf)?.identity)
}

/// The TLS server name to connect with for `identity` (its [`Identity::sni`]). Fails
/// only for an identity built by hand with invalid parts.
pub fn server_name(identity: &Identity) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(identity.sni()).map_err(|_| TlsError::ServerName(identity.clone()))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn load_trust_bundle(path: &Path) -> Result<RootCertStore, TlsError> {
    let pem = read(path)?;
    let mut roots = RootCertStore::empty();
    for (index, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let cert = cert.map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
        roots.add(cert).map_err(|source| TlsError::TrustAnchor {
            path: path.to_owned(),
            index: index + 1,
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::EmptyBundle {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// The `(<name>.crt, <name>.key)` pairs in `dir`, ordered by name.
fn find_pairs(dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, TlsError> {
    let read_dir_error = |source| TlsError::ReadDir {
        path: dir.to_owned(),
        source,
    };
    let mut certs = BTreeSet::new();
    let mut keys = BTreeSet::new();
    for entry in fs::read_dir(dir).map_err(read_dir_error)? {
        let name = entry.map_err(read_dir_error)?.file_name();
        // Names that are not UTF-8 cannot end in ".crt" or ".key" as far as we can tell;
        // like any other unrelated file, they are skipped.
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        if let Some(stem) = name.strip_suffix(".crt") {
            certs.insert(stem.to_owned());
        } else if let Some(stem) = name.strip_suffix(".key") {
            keys.insert(stem.to_owned());
        }
    }
    let files = |stem: &str| {
        (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        )
    };
    if let Some(stem) = keys.difference(&certs).next() {
        let (cert, key) = files(stem);
        return Err(TlsError::MissingCert { key, cert });
    }
    certs
        .iter()
        .map(|stem| {
            let (cert, key) = files(stem);
            match keys.contains(stem) {
                true => Ok((cert, key)),
                false => Err(TlsError::MissingKey { cert, key }),
            }
        })
        .collect()
}

/// What every leaf is checked against at load.
struct LeafChecks<'a> {
    bundle: &'a Path,
    roots: &'a RootCertStore,
    client_verifier: &'a dyn ClientCertVerifier,
    algorithms: WebPkiSupportedAlgorithms,
    now: UnixTime,
}

fn load_pair(
    cert_file: &Path,
    key_file: &Path,
    checks: &LeafChecks<'_>,
    provider: &CryptoProvider,
) -> Result<LoadedCert, TlsError> {
    let pem_error = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Pem { path, source }
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(cert_file))?;
    let (leaf, intermediates) = chain.split_first().ok_or_else(|| TlsError::EmptyChain {
        path: cert_file.to_owned(),
    })?;
    let in_file = |source| TlsError::InFile {
        path: cert_file.to_owned(),
        source: Box::new(source),
    };
    let parsed = parse_leaf(leaf).map_err(in_file)?;

    let untrusted = |usage| {
        move |source| TlsError::Untrusted {
            path: cert_file.to_owned(),
            bundle: checks.bundle.to_owned(),
            usage,
            source: Box::new(source),
        }
    };
    let webpki_leaf = ParsedCertificate::try_from(leaf).map_err(untrusted("server"))?;
    verify_server_cert_signed_by_trust_anchor(
        &webpki_leaf,
        checks.roots,
        intermediates,
        checks.now,
        checks.algorithms.all,
    )
    .map_err(untrusted("server"))?;
    checks
        .client_verifier
        .verify_client_cert(leaf, intermediates, checks.now)
        .map_err(untrusted("client"))?;

    let key = match PrivateKeyDer::from_pem_slice(&read(key_file)?) {
        Ok(key) => key,
        Err(pem::Error::NoItemsFound) => {
            return Err(TlsError::NoKey {
                path: key_file.to_owned(),
            });
        }
        Err(source) => return Err(pem_error(key_file)(source)),
    };
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|source| match source {
        RustlsError::InconsistentKeys(InconsistentKeys::KeyMismatch) => TlsError::KeyMismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
        },
        source => TlsError::Key {
            path: key_file.to_owned(),
            source,
        },
    })?;

    Ok(LoadedCert {
        key: Arc::new(key),
        info: CertInfo {
            identity: parsed.identity,
            not_before: parsed.not_before,
            not_after: parsed.not_after,
            serial: parsed.serial,
            issuer: parsed.issuer,
            root: None,
            cert_file: Some(cert_file.to_owned()),
        },
    })
}

/// What weft reads from a leaf certificate.
#[derive(Debug)]
pub struct LeafFacts {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Lowercase hex, without leading zeros.
    pub serial: String,
    /// The issuer's distinguished name.
    pub issuer: String,
}

/// The facts of the leaf (first) certificate of `chain`.
pub fn leaf_facts(chain: &[CertificateDer<'_>]) -> Result<LeafFacts, TlsError> {
    parse_leaf(chain.first().ok_or(TlsError::NoPeerCertificate)?)
}

fn parse_certificate<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, TlsError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|err| TlsError::BadCertificate(err.to_string()))
}

fn parse_leaf(der: &CertificateDer<'_>) -> Result<LeafFacts, TlsError> {
    let cert = parse_certificate(der)?;
    let validity = cert.validity();
    Ok(LeafFacts {
        identity: spiffe_id(&cert)?,
        not_before: system_time(validity.not_before.timestamp())?,
        not_after: system_time(validity.not_after.timestamp())?,
        serial: cert.tbs_certificate.serial.to_str_radix(16),
        issuer: cert.issuer().to_string(),
    })
}

/// The identity in the certificate's only `spiffe://` URI SAN (the scheme matched
/// case-insensitively, so that `SPIFFE://…` gets a precise error rather than none).
fn spiffe_id(cert: &X509Certificate<'_>) -> Result<Identity, TlsError> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|err| TlsError::BadCertificate(format!("its subject alternative names: {err}")))?;
    let ids: Vec<&str> = sans
        .iter()
        .flat_map(|sans| &sans.value.general_names)
        .filter_map(|name| match name {
            GeneralName::URI(uri)
                if uri
                    .get(..9)
                    .is_some_and(|scheme| scheme.eq_ignore_ascii_case("spiffe://")) =>
            {
                Some(*uri)
            }
            _ => None,
        })
        .collect();
    match ids.as_slice() {
        [] => Err(TlsError::NoSpiffeId),
        [id] => Ok(Identity::parse(id)?),
        several => Err(TlsError::SeveralSpiffeIds(
            several.iter().map(|id| id.to_string()).collect(),
        )),
    }
}

fn system_time(unix_seconds: i64) -> Result<SystemTime, TlsError> {
    let offset = Duration::from_secs(unix_seconds.unsigned_abs());
    match unix_seconds >= 0 {
        true => UNIX_EPOCH.checked_add(offset),
        false => UNIX_EPOCH.checked_sub(offset),
    }
    .ok_or_else(|| {
        TlsError::BadCertificate(format!(
            "its validity time {unix_seconds} (UNIX) is out of range"
        ))
    })
}

/// Turns a weft verdict on a peer into the rustls error that fails the handshake.
fn handshake_error(error: TlsError) -> RustlsError {
    RustlsError::Other(OtherError(Arc::new(error)))
}

/// The `weft_hbone_failures_total` reason of a failed TLS handshake, from the error
/// tokio-rustls returned (which carries the rustls error inside):
///
/// - `certificate_expired`, `certificate_not_yet_valid`: the peer's certificate is
///   outside its validity period (by this node's clock);
/// - `certificate_untrusted`: the peer's certificate was refused for another reason:
///   it does not chain to the trust bundle, a bad signature, a wrong key usage, …;
/// - `wrong_identity`: weft's SPIFFE check refused the peer (see [`handshake_error`]):
///   not the workload expected, or no usable SPIFFE ID;
/// - `certificate_rejected_by_peer`: the peer sent an alert saying it refused *our*
///   certificate (expired, unknown CA, revoked, …);
/// - `tls_handshake`: anything else, including errors that carry no rustls error.
pub fn handshake_failure_reason(error: &io::Error) -> &'static str {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    let is_weft_verdict = |other: &OtherError| other.0.downcast_ref::<TlsError>().is_some();
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<RustlsError>())
    {
        Some(RustlsError::InvalidCertificate(error)) => match error {
            Cert::Expired | Cert::ExpiredContext { .. } => "certificate_expired",
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => "certificate_not_yet_valid",
            Cert::Other(other) if is_weft_verdict(other) => "wrong_identity",
            _ => "certificate_untrusted",
        },
        Some(RustlsError::Other(other)) if is_weft_verdict(other) => "wrong_identity",
        Some(RustlsError::AlertReceived(
            Alert::BadCertificate
            | Alert::UnsupportedCertificate
            | Alert::CertificateRevoked
            | Alert::CertificateExpired
            | Alert::CertificateUnknown
            | Alert::UnknownCA
            | Alert::AccessDenied
            | Alert::CertificateRequired
            | Alert::CertificateUnobtainable
            | Alert::BadCertificateStatusResponse
            | Alert::BadCertificateHashValue,
        )) => "certificate_rejected_by_peer",
        _ => "tls_handshake",
    }
}

/// Picks the server certificate by TLS server name ([`Identity::sni`]), or without
/// one, the dialed pod's.
#[derive(Debug)]
struct ServerCert {
    by_sni: Arc<HashMap<String, Arc<CertifiedKey>>>,
    dialed: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(sni) = client_hello.server_name() else {
            if self.dialed.is_none() {
                log::warn!(
                    "refusing an HBONE handshake without a TLS server name on the node's address; weft clients send the destination workload's, Istio's dial the pod's own address"
                );
            }
            return self.dialed.clone();
        };
        let key = self.by_sni.get(&sni.to_ascii_lowercase()).cloned();
        if key.is_none() {
            log::warn!(
                "refusing an HBONE handshake for TLS server name {sni:?}: this node holds no certificate for that workload"
            );
        }
        key
    }
}

/// Presents the source workload's certificate whatever the server asks for.
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The client's check of the server: a chain to the trust anchors, whatever DNS names
/// it has or lacks, whose leaf is exactly the expected workload.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    expected: Identity,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, RustlsError> {
        let leaf = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &leaf,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let presented = peer_identity(slice::from_ref(end_entity)).map_err(handshake_error)?;
        if presented != self.expected {
            return Err(handshake_error(TlsError::WrongPeer {
                expected: Box::new(self.expected.clone()),
                presented: Box::new(presented),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The server's check of the client: webpki's (chain to the trust anchors, `clientAuth`,
/// certificate required), plus a usable SPIFFE ID, so that a client without one is
/// refused during the handshake rather than after it.
#[derive(Debug)]
struct SpiffeClientVerifier(Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, RustlsError> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        peer_identity(slice::from_ref(end_entity)).map_err(handshake_error)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, RustlsError> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        process,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType, string::Ia5String,
    };
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
        time::timeout,
    };
    use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

    use super::*;

    const A: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
    const B: &str = "spiffe://cluster.local/ns/shop/sa/cart";
    const C: &str = "spiffe://cluster.local/ns/billing/sa/payments";

    fn id(text: &str) -> Identity {
        Identity::parse(text).expect("valid test identity")
    }

    /// A directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "weft-tls-test-{}-{}",
                process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            // A leftover from an earlier run with the same pid would make tests flaky.
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }

        fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
            let path = self.0.join(name);
            fs::write(&path, contents).expect("write test file");
            path
        }

        fn subdir(&self, name: &str) -> PathBuf {
            let path = self.0.join(name);
            fs::create_dir_all(&path).expect("create test subdir");
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl TestCa {
        fn new(name: &str) -> TestCa {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::default();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key).expect("CA certificate");
            TestCa {
                issuer: Issuer::new(params, key),
                pem: cert.pem(),
            }
        }

        /// A workload leaf as weft's CA makes it, for the SPIFFE ID `uri`: certificate
        /// PEM and PKCS#8 key PEM.
        fn leaf(&self, uri: &str) -> (String, String) {
            let key = KeyPair::generate().expect("leaf key");
            let cert = self.sign(&key, leaf_params(&[uri]));
            (cert, key.serialize_pem())
        }

        fn sign(&self, key: &KeyPair, params: CertificateParams) -> String {
            params.signed_by(key, &self.issuer).expect("leaf").pem()
        }
    }

    fn leaf_params(uris: &[&str]) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI(Ia5String::try_from(*uri).expect("IA5 URI")))
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + Duration::from_secs(86400)).into();
        params
    }

    /// A node's files: the bundle of `ca` and, in `certs/`, one pair per identity.
    fn node(dir: &TempDir, name: &str, ca: &TestCa, ids: &[&str]) -> (PathBuf, PathBuf) {
        let bundle = dir.write(&format!("{name}-bundle.pem"), &ca.pem);
        let certs = dir.subdir(name);
        for (i, uri) in ids.iter().enumerate() {
            let (cert, key) = ca.leaf(uri);
            fs::write(certs.join(format!("w{i}.crt")), cert).expect("write cert");
            fs::write(certs.join(format!("w{i}.key")), key).expect("write key");
        }
        (bundle, certs)
    }

    fn load(files: &(PathBuf, PathBuf)) -> Arc<CertStore> {
        Arc::new(CertStore::load(&files.0, &files.1).unwrap_or_else(|e| panic!("load: {e}")))
    }

    fn load_err(files: &(PathBuf, PathBuf)) -> TlsError {
        match CertStore::load(&files.0, &files.1) {
            Ok(store) => panic!("load succeeded: {store:?}"),
            Err(error) => error,
        }
    }

    fn assert_names(error: &TlsError, path: &Path) {
        let message = error.to_string();
        assert!(
            message.contains(&path.display().to_string()),
            "error does not name {}: {message}",
            path.display()
        );
    }

    type Handshake = (
        io::Result<client::TlsStream<DuplexStream>>,
        io::Result<server::TlsStream<DuplexStream>>,
    );

    async fn handshake(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
        name: ServerName<'static>,
    ) -> Handshake {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let connect = TlsConnector::from(client).connect(name, client_io);
        let accept = TlsAcceptor::from(server).accept(server_io);
        timeout(Duration::from_secs(10), async {
            tokio::join!(connect, accept)
        })
        .await
        .expect("handshake timed out")
    }

    /// The client's view of a failed TLS 1.3 handshake: either connect() failed, or (the
    /// client finishes first in TLS 1.3) the first read reports the server's alert.
    async fn client_failed(client: io::Result<client::TlsStream<DuplexStream>>) -> io::Error {
        match client {
            Err(error) => error,
            Ok(mut stream) => {
                let mut buf = [0u8; 16];
                match timeout(Duration::from_secs(10), stream.read(&mut buf))
                    .await
                    .expect("read timed out")
                {
                    Err(error) => error,
                    Ok(n) => panic!("client read {n} bytes from a failed handshake"),
                }
            }
        }
    }

    #[test]
    fn load_reads_every_pair_and_lists_identities() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let files = node(&dir, "node", &ca, &[B, A]);
        // Unrelated files and dot-files next to the pairs are ignored.
        fs::write(files.1.join("README"), "not a certificate").expect("write");
        fs::write(files.1.join("..data"), "k8s secret volume link").expect("write");
        let store = load(&files);

        let infos = store.identities();
        let ids: Vec<_> = infos.iter().map(|info| info.identity.to_string()).collect();
        assert_eq!(ids, [B, A], "ordered by identity (cart < frontend)");
        let now = SystemTime::now();
        for info in &infos {
            assert!(info.not_before < now && now < info.not_after, "{info:?}");
            assert!(!info.serial.is_empty(), "{info:?}");
            assert!(
                info.serial
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{info:?}"
            );
            assert!(
                info.cert_file.as_ref().unwrap().starts_with(&files.1),
                "{info:?}"
            );
        }
        assert_ne!(infos[0].serial, infos[1].serial);
    }

    #[test]
    fn load_accepts_a_bundle_of_several_roots_and_a_chain_with_its_root() {
        let dir = TempDir::new();
        let old = TestCa::new("old mesh CA");
        let new = TestCa::new("new mesh CA");
        let bundle = dir.write("bundle.pem", format!("{}{}", old.pem, new.pem));
        let certs = dir.subdir("certs");
        let (cert, key) = old.leaf(A);
        fs::write(certs.join("a.crt"), cert).expect("write");
        fs::write(certs.join("a.key"), key).expect("write");
        let (cert, key) = new.leaf(B);
        // Leaf then root, as some issuers write it.
        fs::write(certs.join("b.crt"), format!("{cert}{}", new.pem)).expect("write");
        fs::write(certs.join("b.key"), key).expect("write");
        let store = load(&(bundle, certs));
        assert_eq!(store.identities().len(), 2);
    }

    /// The inner structure of a PKCS#8 key (RFC 5208 `privateKey`): an RFC 5915 (SEC1)
    /// key for EC, an RFC 8017 (PKCS#1) key for RSA.
    fn unwrap_pkcs8(key: &KeyPair) -> Vec<u8> {
        use x509_parser::der_parser::parse_der;
        let (_, info) = parse_der(key.serialized_der()).expect("PKCS#8 DER");
        let fields = info.as_sequence().expect("PKCS#8 sequence");
        fields[2].as_slice().expect("privateKey octets").to_vec()
    }

    fn pem(label: &str, der: &[u8]) -> String {
        // Base64 by hand keeps the test free of another dependency.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut text = String::new();
        for chunk in der.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
            for i in 0..4 {
                text.push(match i <= chunk.len() {
                    true => ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char,
                    false => '=',
                });
            }
        }
        let lines: Vec<&str> = text
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).expect("ASCII"))
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    #[test]
    fn load_accepts_pkcs8_sec1_and_pkcs1_keys() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let bundle = dir.write("bundle.pem", &ca.pem);
        let certs = dir.subdir("certs");

        let pkcs8 = KeyPair::generate().expect("key");
        let sec1 = KeyPair::generate().expect("key");
        let rsa = KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
        let keys = [
            (A, &pkcs8, pkcs8.serialize_pem()),
            (B, &sec1, pem("EC PRIVATE KEY", &unwrap_pkcs8(&sec1))),
            (C, &rsa, pem("RSA PRIVATE KEY", &unwrap_pkcs8(&rsa))),
        ];
        for (i, (uri, key, key_pem)) in keys.iter().enumerate() {
            fs::write(
                certs.join(format!("{i}.crt")),
                ca.sign(key, leaf_params(&[uri])),
            )
            .expect("write");
            fs::write(certs.join(format!("{i}.key")), key_pem).expect("write");
        }
        let store = load(&(bundle, certs));
        assert_eq!(store.identities().len(), 3);
    }

    #[test]
    fn bad_trust_bundles_are_named() {
        let dir = TempDir::new();
        let certs = dir.subdir("certs");

        let missing = dir.0.join("missing.pem");
        let error = load_err(&(missing.clone(), certs.clone()));
        assert!(matches!(error, TlsError::Read { .. }), "{error}");
        assert_names(&error, &missing);

        let empty = dir.write("empty.pem", "no PEM here\n");
        let error = load_err(&(empty.clone(), certs.clone()));
        assert!(matches!(error, TlsError::EmptyBundle { .. }), "{error}");
        assert_names(&error, &empty);

        let garbage = dir.write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        );
        let error = load_err(&(garbage.clone(), certs.clone()));
        assert!(
            matches!(error, TlsError::TrustAnchor { index: 1, .. }),
            "{error}"
        );
        assert_names(&error, &garbage);

        let ca = TestCa::new("mesh CA");
        let truncated = dir.write("truncated.pem", &ca.pem[..ca.pem.len() - 20]);
        let error = load_err(&(truncated.clone(), certs));
        assert!(matches!(error, TlsError::Pem { .. }), "{error}");
        assert_names(&error, &truncated);

        let error = load_err(&(dir.write("ok.pem", &ca.pem), dir.0.join("no-such-dir")));
        assert!(matches!(error, TlsError::ReadDir { .. }), "{error}");
        assert_names(&error, &dir.0.join("no-such-dir"));
    }

    /// Loads a certs dir holding the single pair `x.crt`/`x.key` and returns the error.
    fn single_pair_error(cert: &str, key: &str) -> (TlsError, PathBuf, PathBuf) {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let bundle = dir.write("bundle.pem", &ca.pem);
        let certs = dir.subdir("certs");
        let cert_file = certs.join("x.crt");
        let key_file = certs.join("x.key");
        fs::write(&cert_file, cert).expect("write");
        fs::write(&key_file, key).expect("write");
        (load_err(&(bundle, certs)), cert_file, key_file)
    }

    #[test]
    fn bad_certificates_are_named_with_the_problem() {
        // The pair is signed by a CA that is not the one in the bundle.
        let (cert, key) = TestCa::new("other CA").leaf(A);
        let (error, cert_file, _) = single_pair_error(&cert, &key);
        assert!(matches!(error, TlsError::Untrusted { .. }), "{error}");
        assert_names(&error, &cert_file);

        // Each of these needs a CA that the bundle does hold; single_pair_error makes its
        // own, so sign with a throwaway and only check the identity errors, which come
        // before the trust check.
        let ca = TestCa::new("any CA");
        let key = KeyPair::generate().expect("key");
        type Case = (CertificateParams, fn(&TlsError) -> bool);
        let cases: [Case; 4] = [
            (leaf_params(&[]), |e| matches!(e, TlsError::NoSpiffeId)),
            (leaf_params(&["https://example.com/"]), |e| {
                matches!(e, TlsError::NoSpiffeId)
            }),
            (
                leaf_params(&[A, B]),
                |e| matches!(e, TlsError::SeveralSpiffeIds(ids) if ids.len() == 2),
            ),
            (leaf_params(&["spiffe://cluster.local/ns/shop"]), |e| {
                matches!(e, TlsError::InvalidSpiffeId(IdentityError::Path { .. }))
            }),
        ];
        for (params, expected) in cases {
            let cert = ca.sign(&key, params);
            let (error, cert_file, _) = single_pair_error(&cert, &key.serialize_pem());
            assert_names(&error, &cert_file);
            match &error {
                TlsError::InFile { source, .. } => assert!(expected(source), "{error}"),
                other => panic!("unexpected error: {other}"),
            }
        }

        let (error, cert_file, _) = single_pair_error("nothing here\n", "");
        assert!(matches!(error, TlsError::EmptyChain { .. }), "{error}");
        assert_names(&error, &cert_file);

        let garbage = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let (error, cert_file, _) = single_pair_error(garbage, "");
        assert!(
            matches!(&error, TlsError::InFile { source, .. }
                if matches!(**source, TlsError::BadCertificate(_))),
            "{error}"
        );
        assert_names(&error, &cert_file);
    }

    /// Files for a store whose CA is `ca`, with one pair whose key is given separately.
    fn pair_with_key(dir: &TempDir, ca: &TestCa, cert: &str, key: &str) -> (PathBuf, PathBuf) {
        let bundle = dir.write("bundle.pem", &ca.pem);
        let certs = dir.subdir("certs");
        fs::write(certs.join("x.crt"), cert).expect("write");
        fs::write(certs.join("x.key"), key).expect("write");
        (bundle, certs)
    }

    #[test]
    fn bad_keys_and_lone_files_are_named() {
        let ca = TestCa::new("mesh CA");
        let (cert, _) = ca.leaf(A);
        let (_, other_key) = ca.leaf(B);

        let dir = TempDir::new();
        let files = pair_with_key(&dir, &ca, &cert, &other_key);
        let error = load_err(&files);
        assert!(matches!(error, TlsError::KeyMismatch { .. }), "{error}");
        assert_names(&error, &files.1.join("x.key"));
        assert_names(&error, &files.1.join("x.crt"));

        let dir = TempDir::new();
        let files = pair_with_key(&dir, &ca, &cert, "no key here\n");
        let error = load_err(&files);
        assert!(matches!(error, TlsError::NoKey { .. }), "{error}");
        assert_names(&error, &files.1.join("x.key"));

        let dir = TempDir::new();
        let files = pair_with_key(
            &dir,
            &ca,
            &cert,
            "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
        );
        let error = load_err(&files);
        assert!(matches!(error, TlsError::Key { .. }), "{error}");
        assert_names(&error, &files.1.join("x.key"));

        let dir = TempDir::new();
        let files = pair_with_key(&dir, &ca, &cert, &other_key);
        fs::remove_file(files.1.join("x.key")).expect("remove");
        let error = load_err(&files);
        assert!(matches!(error, TlsError::MissingKey { .. }), "{error}");
        assert_names(&error, &files.1.join("x.crt"));

        let dir = TempDir::new();
        let files = pair_with_key(&dir, &ca, &cert, &other_key);
        fs::remove_file(files.1.join("x.crt")).expect("remove");
        let error = load_err(&files);
        assert!(matches!(error, TlsError::MissingCert { .. }), "{error}");
        assert_names(&error, &files.1.join("x.key"));
    }

    #[test]
    fn expired_and_single_purpose_certificates_are_refused() {
        let ca = TestCa::new("mesh CA");
        let key = KeyPair::generate().expect("key");

        let mut expired = leaf_params(&[A]);
        let now = SystemTime::now();
        expired.not_before = (now - Duration::from_secs(7200)).into();
        expired.not_after = (now - Duration::from_secs(3600)).into();

        let mut server_only = leaf_params(&[A]);
        server_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut client_only = leaf_params(&[A]);
        client_only.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];

        for (params, what) in [
            (expired, "expired"),
            (server_only, "client"),
            (client_only, "server"),
        ] {
            let dir = TempDir::new();
            let files = pair_with_key(&dir, &ca, &ca.sign(&key, params), &key.serialize_pem());
            let error = load_err(&files);
            assert!(matches!(error, TlsError::Untrusted { .. }), "{error}");
            assert!(error.to_string().contains(what), "{what}: {error}");
            assert_names(&error, &files.1.join("x.crt"));
        }
    }

    #[test]
    fn two_pairs_for_one_identity_are_refused() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let files = node(&dir, "node", &ca, &[A, A]);
        let error = load_err(&files);
        assert!(matches!(error, TlsError::Duplicate { .. }), "{error}");
        assert_names(&error, &files.1.join("w0.crt"));
        assert_names(&error, &files.1.join("w1.crt"));
    }

    #[tokio::test]
    async fn handshake_checks_both_identities_and_negotiates_h2() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let client_node = load(&node(&dir, "client", &ca, &[A]));
        let server_node = load(&node(&dir, "server", &ca, &[B, C]));

        let config = client_node.client_config(&id(A), &id(B)).expect("config");
        let name = server_name(&id(B)).expect("server name");
        let (client, server) = handshake(config, server_node.server_config(None), name).await;
        let mut client = client.expect("client handshake");
        let mut server = server.expect("server handshake");

        assert_eq!(client.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(server.get_ref().1.alpn_protocol(), Some(ALPN_H2));
        assert_eq!(
            client.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        let client_certs = server.get_ref().1.peer_certificates().expect("client cert");
        assert_eq!(peer_identity(client_certs).expect("client identity"), id(A));
        let server_certs = client.get_ref().1.peer_certificates().expect("server cert");
        assert_eq!(peer_identity(server_certs).expect("server identity"), id(B));

        client.write_all(b"ping").await.expect("write");
        client.flush().await.expect("flush");
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn a_server_presenting_another_identity_is_refused() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let client_node = load(&node(&dir, "client", &ca, &[A]));
        let server_node = load(&node(&dir, "server", &ca, &[B, C]));

        // The client expects C, but the tunnel lands where B's certificate is served.
        let config = client_node.client_config(&id(A), &id(C)).expect("config");
        let name = server_name(&id(B)).expect("server name");
        let (client, server) = handshake(config, server_node.server_config(None), name).await;
        let error = client.expect_err("the client must refuse B");
        let message = error.to_string();
        assert!(message.contains(B) && message.contains(C), "{message}");
        assert!(server.is_err(), "the server must see the handshake fail");
    }

    #[tokio::test]
    async fn a_client_certificate_from_another_ca_is_refused() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let rogue = TestCa::new("rogue CA");
        let server_node = load(&node(&dir, "server", &ca, &[B]));
        // The rogue client trusts the mesh CA (to get past its own check of the server)
        // and its own, which signed its certificate for A.
        let bundle = dir.write("rogue-bundle.pem", format!("{}{}", ca.pem, rogue.pem));
        let certs = dir.subdir("rogue");
        let (cert, key) = rogue.leaf(A);
        fs::write(certs.join("a.crt"), cert).expect("write");
        fs::write(certs.join("a.key"), key).expect("write");
        let client_node = load(&(bundle, certs));

        let config = client_node.client_config(&id(A), &id(B)).expect("config");
        let name = server_name(&id(B)).expect("server name");
        let (client, server) = handshake(config, server_node.server_config(None), name).await;
        let error = server.expect_err("the server must refuse the client");
        assert!(error.to_string().contains("UnknownIssuer"), "{error}");
        client_failed(client).await;
    }

    #[tokio::test]
    async fn unknown_or_missing_server_names_are_refused() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let client_node = load(&node(&dir, "client", &ca, &[A]));
        let server_node = load(&node(&dir, "server", &ca, &[B]));
        let config = client_node.client_config(&id(A), &id(B)).expect("config");

        let unknown = server_name(&id(C)).expect("server name");
        let plain_host = ServerName::try_from("cart.shop.svc.cluster.local").expect("name");
        // rustls sends no SNI for an IP address.
        let no_sni = ServerName::from(std::net::IpAddr::from([127, 0, 0, 1]));
        for name in [unknown, plain_host, no_sni] {
            let (client, server) = handshake(
                config.clone(),
                server_node.server_config(None),
                name.clone(),
            )
            .await;
            assert!(server.is_err(), "{name:?}: the server must refuse");
            assert!(client.is_err(), "{name:?}: the client must fail");
        }
    }

    #[tokio::test]
    async fn without_a_server_name_the_dialed_pods_certificate_is_presented() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let client_node = load(&node(&dir, "client", &ca, &[A]));
        let server_node = load(&node(&dir, "server", &ca, &[B, C]));
        let no_sni = ServerName::from(std::net::IpAddr::from([10, 244, 1, 2]));
        // Dialed at B's pod: B's certificate, which a client expecting B accepts.
        let expects_b = client_node.client_config(&id(A), &id(B)).expect("config");
        let dialed_b = server_node.server_config(Some(&id(B)));
        let (client, server) = handshake(expects_b.clone(), dialed_b, no_sni.clone()).await;
        client.expect("the client accepts B's certificate");
        let server = server.expect("the server takes A's certificate");
        assert_eq!(server.get_ref().1.server_name(), None, "no SNI was sent");
        // Dialed at C's pod, the certificate is C's: a client expecting B refuses it.
        let dialed_c = server_node.server_config(Some(&id(C)));
        let (client, _) = handshake(expects_b.clone(), dialed_c, no_sni).await;
        let error = client.expect_err("C's certificate is not B's");
        assert_eq!(
            handshake_failure_reason(&error),
            "wrong_identity",
            "{error}"
        );
        // A server name, when sent, still decides.
        let named_b = server_name(&id(B)).expect("server name");
        let dialed_c = server_node.server_config(Some(&id(C)));
        let (client, server) = handshake(expects_b, dialed_c, named_b).await;
        client.expect("B's certificate, by name");
        let server = server.expect("handshake");
        assert_eq!(server.get_ref().1.server_name(), Some(id(B).sni().as_str()));
        // A dialed identity this node holds no certificate for: the name decides.
        let unheld = server_node.server_config(Some(&id(A)));
        let expects_a = client_node.client_config(&id(A), &id(A)).expect("config");
        let no_sni = ServerName::from(std::net::IpAddr::from([10, 244, 1, 3]));
        let (client, server) = handshake(expects_a, unheld, no_sni).await;
        assert!(client.is_err() && server.is_err(), "nothing to present");
    }

    /// A ClientHello that offers TLS 1.2 only (no supported_versions extension), with
    /// a weft server name, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 and P-256.
    fn tls12_client_hello(sni: &str) -> Vec<u8> {
        fn with_len16(body: &[u8]) -> Vec<u8> {
            let len = u16::try_from(body.len()).expect("short");
            [&len.to_be_bytes()[..], body].concat()
        }
        fn extension(kind: u16, body: &[u8]) -> Vec<u8> {
            [&kind.to_be_bytes()[..], &with_len16(body)].concat()
        }
        let server_name = with_len16(&[&[0u8][..], &with_len16(sni.as_bytes())].concat());
        let extensions = [
            extension(0x0000, &server_name),
            extension(0x000a, &with_len16(&[0x00, 0x17])),
            extension(0x000b, &[0x01, 0x00]),
            extension(0x000d, &with_len16(&[0x04, 0x03])),
        ]
        .concat();
        let hello = [
            &[0x03, 0x03][..], // legacy_version: TLS 1.2
            &[0x42; 32],       // random
            &[0x00],           // no session id
            &with_len16(&[0xc0, 0x2b]),
            &[0x01, 0x00], // null compression
            &with_len16(&extensions),
        ]
        .concat();
        let len = u32::try_from(hello.len()).expect("short").to_be_bytes();
        let handshake = [&[0x01], &len[1..], &hello].concat();
        [&[0x16, 0x03, 0x01][..], &with_len16(&handshake)].concat()
    }

    #[tokio::test]
    async fn a_tls12_only_client_is_refused() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let server_node = load(&node(&dir, "server", &ca, &[B]));
        let (mut client_io, server_io) = tokio::io::duplex(64 * 1024);
        let accept = TlsAcceptor::from(server_node.server_config(None)).accept(server_io);
        let hello = tls12_client_hello(&id(B).sni());
        let client = async {
            client_io.write_all(&hello).await.expect("send hello");
            let mut reply = Vec::new();
            client_io.read_to_end(&mut reply).await.expect("read reply");
            reply
        };
        let (server, reply) = timeout(Duration::from_secs(10), async {
            tokio::join!(accept, client)
        })
        .await
        .expect("timed out");
        let error = server.expect_err("the server must refuse TLS 1.2");
        // A fatal protocol_version alert (RFC 8446 §6.2), in the clear.
        assert_eq!(
            reply.first(),
            Some(&0x15),
            "not an alert: {reply:?} ({error})"
        );
        assert_eq!(reply.get(5..7), Some(&[2u8, 70][..]), "{reply:?} ({error})");
    }

    #[test]
    fn client_configs_are_cached_per_pair_and_need_a_local_certificate() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let store = load(&node(&dir, "node", &ca, &[A]));
        let first = store.client_config(&id(A), &id(B)).expect("config");
        let again = store.client_config(&id(A), &id(B)).expect("config");
        let other = store.client_config(&id(A), &id(C)).expect("config");
        assert!(Arc::ptr_eq(&first, &again));
        assert!(!Arc::ptr_eq(&first, &other));
        assert_eq!(first.alpn_protocols, [ALPN_H2.to_vec()]);

        let error = store
            .client_config(&id(B), &id(A))
            .expect_err("no cert for B");
        assert!(
            matches!(&error, TlsError::NoCertificate(who) if *who == id(B)),
            "{error}"
        );
        assert!(error.to_string().contains(B), "{error}");
    }

    #[test]
    fn peer_identity_reads_the_leaf() {
        let ca = TestCa::new("mesh CA");
        let (cert, _) = ca.leaf(A);
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).expect("PEM");
        let root = CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("PEM");
        assert_eq!(
            peer_identity(&[der, root.clone()]).expect("identity"),
            id(A)
        );
        assert!(matches!(
            peer_identity(&[]),
            Err(TlsError::NoPeerCertificate)
        ));
        assert!(matches!(peer_identity(&[root]), Err(TlsError::NoSpiffeId)));

        let key = KeyPair::generate().expect("key");
        let upper = ca.sign(&key, leaf_params(&["SPIFFE://cluster.local/ns/a/sa/b"]));
        let der = CertificateDer::from_pem_slice(upper.as_bytes()).expect("PEM");
        assert!(matches!(
            peer_identity(&[der]),
            Err(TlsError::InvalidSpiffeId(IdentityError::Scheme { .. }))
        ));
    }

    #[test]
    fn server_names_are_the_identity_sni() {
        let name = server_name(&id(B)).expect("valid");
        assert_eq!(name.to_str(), id(B).sni());
        let broken = Identity {
            trust_domain: "cluster local".into(),
            namespace: "shop".into(),
            service_account: "cart".into(),
        };
        assert!(matches!(server_name(&broken), Err(TlsError::ServerName(_))));
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// A leaf of `ca` made from `params`, ready to present. Made by hand:
    /// [`CertStore::load`] refuses a certificate that is not valid now.
    fn presented(ca: &TestCa, params: CertificateParams) -> Arc<CertifiedKey> {
        let key = KeyPair::generate().expect("leaf key");
        let cert = CertificateDer::from_pem_slice(ca.sign(&key, params).as_bytes()).expect("PEM");
        let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).expect("PEM");
        let provider = aws_lc_rs::default_provider();
        Arc::new(CertifiedKey::from_der(vec![cert], key, &provider).expect("certified key"))
    }

    /// The parameters of a workload leaf for `uri`, valid from `not_before` to `not_after`.
    fn valid(uri: &str, not_before: SystemTime, not_after: SystemTime) -> CertificateParams {
        let mut params = leaf_params(&[uri]);
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params
    }

    fn roots(ca: &TestCa) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        let root = CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("PEM");
        roots.add(root).expect("trust anchor");
        Arc::new(roots)
    }

    /// A client configuration as [`CertStore::client_config`] builds it for a server B
    /// certified by `ca`, presenting `key` whatever it is.
    fn client_presenting(key: Arc<CertifiedKey>, ca: &TestCa) -> Arc<ClientConfig> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let verifier = SpiffeServerVerifier {
            roots: roots(ca),
            algorithms: provider.signature_verification_algorithms,
            expected: id(B),
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_cert_resolver(Arc::new(ClientCert(key)));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    /// A server configuration as [`CertStore::load`] builds it for clients certified by
    /// `ca`, presenting `key` whatever it is for B's server name.
    fn server_presenting(key: Arc<CertifiedKey>, ca: &TestCa) -> Arc<ServerConfig> {
        let provider = Arc::new(aws_lc_rs::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca), provider.clone())
            .build()
            .expect("client verifier");
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&TLS13])
            .expect("TLS 1.3")
            .with_client_cert_verifier(Arc::new(SpiffeClientVerifier(verifier)))
            .with_cert_resolver(Arc::new(ServerCert {
                by_sni: Arc::new(HashMap::from([(id(B).sni(), key)])),
                dialed: None,
            }));
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Arc::new(config)
    }

    #[tokio::test]
    async fn a_refused_client_certificate_is_counted_with_its_reason() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let rogue = TestCa::new("rogue CA");
        let server_node = load(&node(&dir, "server", &ca, &[B]));
        let now = SystemTime::now();
        // (what the client presents, the server's reason, the client's reason)
        let cases = [
            (
                presented(&ca, valid(A, now - 2 * HOUR, now - HOUR)),
                "certificate_expired",
                "certificate_rejected_by_peer",
            ),
            (
                presented(&ca, valid(A, now + HOUR, now + 2 * HOUR)),
                "certificate_not_yet_valid",
                "certificate_rejected_by_peer",
            ),
            (
                presented(&rogue, valid(A, now - HOUR, now + HOUR)),
                "certificate_untrusted",
                "certificate_rejected_by_peer",
            ),
            // A valid certificate without a SPIFFE ID: weft's own check refuses it, and
            // rustls tells the client only handshake_failure.
            (
                presented(&ca, leaf_params(&["https://example.com/"])),
                "wrong_identity",
                "tls_handshake",
            ),
        ];
        for (key, server_reason, client_reason) in cases {
            let config = client_presenting(key, &ca);
            let name = server_name(&id(B)).expect("server name");
            let (client, server) = handshake(config, server_node.server_config(None), name).await;
            let error = server.expect_err("the server must refuse the client");
            assert_eq!(handshake_failure_reason(&error), server_reason, "{error}");
            let error = client_failed(client).await;
            assert_eq!(handshake_failure_reason(&error), client_reason, "{error}");
        }
    }

    #[tokio::test]
    async fn a_refused_server_certificate_is_counted_with_its_reason() {
        let dir = TempDir::new();
        let ca = TestCa::new("mesh CA");
        let rogue = TestCa::new("rogue CA");
        let client_node = load(&node(&dir, "client", &ca, &[A]));
        let config = client_node.client_config(&id(A), &id(B)).expect("config");
        let now = SystemTime::now();
        // (what the server presents for B, the client's reason, the server's reason)
        let cases = [
            (
                presented(&ca, valid(B, now - 2 * HOUR, now - HOUR)),
                "certificate_expired",
                "certificate_rejected_by_peer",
            ),
            (
                presented(&ca, valid(B, now + HOUR, now + 2 * HOUR)),
                "certificate_not_yet_valid",
                "certificate_rejected_by_peer",
            ),
            (
                presented(&rogue, valid(B, now - HOUR, now + HOUR)),
                "certificate_untrusted",
                "certificate_rejected_by_peer",
            ),
            // A valid certificate of another workload: weft's SPIFFE check refuses it,
            // and rustls tells the server only handshake_failure.
            (
                presented(&ca, valid(C, now - HOUR, now + HOUR)),
                "wrong_identity",
                "tls_handshake",
            ),
        ];
        for (key, client_reason, server_reason) in cases {
            let name = server_name(&id(B)).expect("server name");
            let (client, server) =
                handshake(config.clone(), server_presenting(key, &ca), name).await;
            let error = client.expect_err("the client must refuse the server");
            assert_eq!(handshake_failure_reason(&error), client_reason, "{error}");
            let error = server.expect_err("the server must see the handshake fail");
            assert_eq!(handshake_failure_reason(&error), server_reason, "{error}");
        }
    }

    #[test]
    fn other_handshake_failures_keep_the_generic_reason() {
        use rustls::{AlertDescription, CertificateError};

        let reason = |error: RustlsError| {
            handshake_failure_reason(&io::Error::new(io::ErrorKind::InvalidData, error))
        };
        let foreign = || OtherError(Arc::new(io::Error::other("not weft's")));
        let wrong_peer = || {
            OtherError(Arc::new(TlsError::WrongPeer {
                expected: Box::new(id(B)),
                presented: Box::new(id(C)),
            }))
        };
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        let expired = CertificateError::ExpiredContext {
            time: at(2),
            not_after: at(1),
        };
        let cases = [
            (expired.into(), "certificate_expired"),
            (CertificateError::Revoked.into(), "certificate_untrusted"),
            (
                CertificateError::Other(foreign()).into(),
                "certificate_untrusted",
            ),
            (
                CertificateError::Other(wrong_peer()).into(),
                "wrong_identity",
            ),
            (RustlsError::Other(wrong_peer()), "wrong_identity"),
            (RustlsError::Other(foreign()), "tls_handshake"),
            (RustlsError::NoCertificatesPresented, "tls_handshake"),
            (
                RustlsError::AlertReceived(AlertDescription::UnknownCA),
                "certificate_rejected_by_peer",
            ),
            (
                RustlsError::AlertReceived(AlertDescription::HandshakeFailure),
                "tls_handshake",
            ),
            (RustlsError::DecryptError, "tls_handshake"),
        ];
        for (error, expected) in cases {
            let text = error.to_string();
            assert_eq!(reason(error), expected, "{text}");
        }
        // Errors without a rustls error inside: the peer hung up, or sent no TLS at all.
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(handshake_failure_reason(&reset), "tls_handshake");
        let eof = io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof");
        assert_eq!(handshake_failure_reason(&eof), "tls_handshake");
    }
}
