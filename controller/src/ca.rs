//! The mesh certificate authority: it signs the workload certificates agents ask for
//! ([`service`]), keeps its root in a [`store`] (a file directory or a Kubernetes
//! Secret), and rotates roots with an overlap ([`runtime`]).
//!
//! The CA's persisted form ([`Material`]) is laid out like a cert-manager CA Secret, so
//! a user can hand weft an intermediate (or root) that cert-manager or an offline CA
//! issued:
//!
//! - `tls.crt`: the signing certificate, then any intermediates above it, PEM;
//! - `tls.key`: the signing certificate's private key, PEM;
//! - `ca.crt`: the root certificate(s) to trust, PEM; the chain in `tls.crt` must lead
//!   to one of them. With weft's own self-signed root, `ca.crt` and `tls.crt` are the
//!   same certificate.
//! - `previous-<unix seconds>.crt` and `.key`: a root (and its key) replaced by
//!   `weft-controller ca rotate`, still trusted until that time. Its key signs until
//!   every connected agent trusts the new root, so that no peer sees a certificate from
//!   a root it does not know yet.

pub mod runtime;
pub mod service;
pub mod store;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber, string::Ia5String,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use weft_api::config::v1::{TrustAnchor, TrustBundle};
use x509_parser::certificate::X509Certificate;

/// The CA's files (or Secret keys) by name.
pub type Material = BTreeMap<String, Vec<u8>>;

pub const SIGNING_CERT: &str = "tls.crt";
pub const SIGNING_KEY: &str = "tls.key";
pub const ROOTS: &str = "ca.crt";
const PREVIOUS_PREFIX: &str = "previous-";

/// How long a root weft creates is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 86_400);
/// Certificates start this long before they are issued, for peers whose clocks lag.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// What is wrong with the CA's material or with a signing request.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CA's {file} is missing; it needs tls.crt, tls.key and ca.crt")]
    Missing { file: String },
    #[error("the CA's {file} is not valid PEM: {reason}")]
    Pem { file: String, reason: String },
    #[error("the CA's {file} holds no certificate")]
    Empty { file: String },
    #[error("the CA's {file} cannot be parsed: {reason}")]
    Certificate { file: String, reason: String },
    #[error("the CA's key {file} cannot be used: {reason}")]
    Key { file: String, reason: String },
    #[error(
        "the CA's tls.crt does not lead to a root in ca.crt (its top certificate was issued by {issuer}); put that root in ca.crt"
    )]
    NoRoot { issuer: String },
    #[error(
        "the CA's signing certificate {subject} is not a CA certificate (basicConstraints CA:TRUE)"
    )]
    NotCa { subject: String },
    #[error("the CA's signing certificate expired at {not_after:?}; rotate it")]
    Expired { not_after: SystemTime },
    #[error(
        "the CA's {file} is not named previous-<unix seconds>.crt/.key, or has no partner of the other kind"
    )]
    Previous { file: String },
    #[error(
        "rotation replaces weft's own self-signed root; this CA signs with a certificate issued by {issuer}, so rotate it where it was issued"
    )]
    NotSelfSigned { issuer: String },
    #[error("the signing request is not a valid PKCS#10 request: {0}")]
    BadRequest(String),
    #[error(
        "the signing request must carry exactly one URI subject alternative name, the workload's SPIFFE ID; it has {0}"
    )]
    RequestSans(usize),
    #[error("cannot sign: {0}")]
    Sign(String),
}

/// A root the mesh trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Anchor {
    pub der: CertificateDer<'static>,
    pub subject: String,
    pub not_after: SystemTime,
    /// When a rotated-out root stops being trusted.
    pub retire_at: Option<SystemTime>,
}

/// A key that signs workload certificates, with what goes after the leaf in a chain.
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    /// Intermediates between the leaf and the root (empty for a root signer).
    intermediates: Vec<CertificateDer<'static>>,
    /// The index of the root, in [`Authority::anchors`], that the chain leads to.
    anchor: usize,
    not_after: SystemTime,
}

/// The CA as loaded from its [`Material`].
pub struct Authority {
    current: Signer,
    /// Rotated-out roots still within their overlap, newest first.
    previous: Vec<Signer>,
    /// Every trusted root: `ca.crt`'s, then the previous ones.
    anchors: Vec<Anchor>,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authority")
            .field("signing_root", &self.anchors[self.current.anchor].subject)
            .field("anchors", &self.anchors.len())
            .finish_non_exhaustive()
    }
}

/// What signing produced: the chain for the agent (leaf first, without the root) and
/// the root it leads to.
#[derive(Debug)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub root: CertificateDer<'static>,
    pub serial: String,
    pub not_after: SystemTime,
}

impl Authority {
    /// A new self-signed root, as the material to persist.
    pub fn generate_root(now: SystemTime) -> Result<Material, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|err| CaError::Sign(format!("cannot generate a key: {err}")))?;
        let mut params = CertificateParams::default();
        let mut fingerprint = String::new();
        for byte in params.key_identifier(&key).iter().take(6) {
            let _ = write!(fingerprint, "{byte:02x}");
        }
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "weft");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("weft mesh root {fingerprint}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let cert = params
            .self_signed(&key)
            .map_err(|err| CaError::Sign(format!("cannot sign the root: {err}")))?;
        let cert_pem = cert.pem().into_bytes();
        Ok(Material::from([
            (SIGNING_CERT.to_owned(), cert_pem.clone()),
            (SIGNING_KEY.to_owned(), key.serialize_pem().into_bytes()),
            (ROOTS.to_owned(), cert_pem),
        ]))
    }

    /// The material after rotating weft's own root: a new root signs, the old one (and
    /// its key) stays trusted until `now + overlap`. Roots already past their overlap
    /// are dropped.
    pub fn rotate(
        material: &Material,
        now: SystemTime,
        overlap: Duration,
    ) -> Result<Material, CaError> {
        let authority = Authority::load(material, now)?;
        let signing = &authority.anchors[authority.current.anchor];
        if !authority.current.intermediates.is_empty()
            || material.get(SIGNING_CERT) != material.get(ROOTS)
        {
            return Err(CaError::NotSelfSigned {
                issuer: signing.subject.clone(),
            });
        }
        let mut rotated = Authority::generate_root(now)?;
        // Two rotations within a second must not share a name.
        let mut retire = unix_seconds(now + overlap);
        while material.contains_key(&format!("{PREVIOUS_PREFIX}{retire}.crt")) {
            retire += 1;
        }
        rotated.insert(
            format!("{PREVIOUS_PREFIX}{retire}.crt"),
            material[SIGNING_CERT].clone(),
        );
        rotated.insert(
            format!("{PREVIOUS_PREFIX}{retire}.key"),
            material[SIGNING_KEY].clone(),
        );
        for (name, value) in material {
            if name.starts_with(PREVIOUS_PREFIX) && !is_retired(name, now) {
                rotated.insert(name.clone(), value.clone());
            }
        }
        Ok(rotated)
    }

    /// Loads the CA, ignoring rotated-out roots whose overlap ended before `now`.
    pub fn load(material: &Material, now: SystemTime) -> Result<Authority, CaError> {
        let mut anchors = Vec::new();
        for der in certificates(material, ROOTS)? {
            anchors.push(anchor(ROOTS, der, None)?);
        }
        let current = signer(material, SIGNING_CERT, SIGNING_KEY, &anchors)?;
        if current.not_after <= now {
            return Err(CaError::Expired {
                not_after: current.not_after,
            });
        }
        let mut previous = Vec::new();
        for name in material.keys().rev() {
            let Some(stem) = name
                .strip_prefix(PREVIOUS_PREFIX)
                .and_then(|rest| rest.strip_suffix(".crt"))
            else {
                if name.starts_with(PREVIOUS_PREFIX) && !name.ends_with(".key") {
                    return Err(CaError::Previous { file: name.clone() });
                }
                continue;
            };
            let retire_at = stem
                .parse::<u64>()
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
                .map_err(|_| CaError::Previous { file: name.clone() })?;
            let key_name = format!("{PREVIOUS_PREFIX}{stem}.key");
            if !material.contains_key(&key_name) {
                return Err(CaError::Previous { file: name.clone() });
            }
            if retire_at <= now {
                continue;
            }
            let mut roots = Vec::new();
            for der in certificates(material, name)? {
                roots.push(anchor(name, der, Some(retire_at))?);
            }
            let first = anchors.len();
            anchors.extend(roots);
            let signer = signer(material, name, &key_name, &anchors[first..])?;
            previous.push(Signer {
                anchor: first + signer.anchor,
                ..signer
            });
        }
        Ok(Authority {
            current,
            previous,
            anchors,
        })
    }

    pub fn anchors(&self) -> &[Anchor] {
        &self.anchors
    }

    /// The root the current signing certificate leads to.
    pub fn signing_root(&self) -> &Anchor {
        &self.anchors[self.current.anchor]
    }

    /// The root certificates are issued under now (see [`Authority::signer`]).
    pub fn signing_anchor(&self, propagated: bool) -> &Anchor {
        &self.anchors[self.signer(propagated).anchor]
    }

    /// The signer: the current one, or while it propagates
    /// (`propagated` false) the newest previous one, if there is one.
    fn signer(&self, propagated: bool) -> &Signer {
        match (propagated, self.previous.first()) {
            (false, Some(previous)) => previous,
            _ => &self.current,
        }
    }

    /// The trust bundle agents get: every anchor, the one that signs marked.
    pub fn trust_bundle(&self, propagated: bool) -> TrustBundle {
        let signing = self.signer(propagated).anchor;
        TrustBundle {
            anchors: self
                .anchors
                .iter()
                .enumerate()
                .map(|(index, anchor)| TrustAnchor {
                    certificate: anchor.der.to_vec(),
                    signing: index == signing,
                    retire_at: anchor.retire_at.map_or(0, |at| unix_seconds(at) as i64),
                })
                .collect(),
        }
    }

    /// Whether a rotated-out root is still within its overlap: after a restart, the
    /// controller makes sure again that agents trust the new root before it signs.
    pub fn rotating(&self) -> bool {
        !self.previous.is_empty()
    }

    /// When the next rotated-out root retires.
    pub fn next_retirement(&self) -> Option<SystemTime> {
        self.anchors.iter().filter_map(|a| a.retire_at).min()
    }

    /// Signs the PEM PKCS#10 request `csr` after `allow` accepted the SPIFFE ID it
    /// asks for: a certificate valid from a little before `now` for `ttl` (no longer
    /// than the signer), with that ID as its only SAN, for TLS client and server use.
    /// Nothing else of the request is copied.
    pub fn sign(
        &self,
        csr: &str,
        now: SystemTime,
        ttl: Duration,
        propagated: bool,
        allow: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<Result<Issued, String>, CaError> {
        let request = CertificateSigningRequestParams::from_pem(csr)
            .map_err(|err| CaError::BadRequest(err.to_string()))?;
        let uris: Vec<&Ia5String> = request
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(uri) => Some(uri),
                _ => None,
            })
            .collect();
        let [uri] = uris.as_slice() else {
            return Err(CaError::RequestSans(uris.len()));
        };
        if let Err(refusal) = allow(uri.as_str()) {
            return Ok(Err(refusal));
        }
        let signer = self.signer(propagated);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI((*uri).clone())];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        let not_after = (now + ttl).min(signer.not_after);
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        let leaf = params
            .signed_by(&request.public_key, &signer.issuer)
            .map_err(|err| CaError::Sign(err.to_string()))?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(signer.intermediates.iter().cloned());
        Ok(Ok(Issued {
            chain,
            root: self.anchors[signer.anchor].der.clone(),
            serial: hex(serial.as_ref()),
            not_after,
        }))
    }
}

/// Whether `name` is a `previous-<secs>.*` entry whose time has come.
fn is_retired(name: &str, now: SystemTime) -> bool {
    name.strip_prefix(PREVIOUS_PREFIX)
        .and_then(|rest| rest.split('.').next())
        .and_then(|secs| secs.parse::<u64>().ok())
        .is_some_and(|secs| UNIX_EPOCH + Duration::from_secs(secs) <= now)
}

fn certificates(material: &Material, file: &str) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = material.get(file).ok_or_else(|| CaError::Missing {
        file: file.to_owned(),
    })?;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| CaError::Pem {
            file: file.to_owned(),
            reason: err.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CaError::Empty {
            file: file.to_owned(),
        });
    }
    Ok(certs)
}

fn parse<'a>(file: &str, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, CaError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|err| CaError::Certificate {
            file: file.to_owned(),
            reason: err.to_string(),
        })
}

fn anchor(
    file: &str,
    der: CertificateDer<'static>,
    retire_at: Option<SystemTime>,
) -> Result<Anchor, CaError> {
    let cert = parse(file, &der)?;
    let subject = cert.subject().to_string();
    let not_after = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0));
    Ok(Anchor {
        der,
        subject,
        not_after,
        retire_at,
    })
}

/// The signer in `cert_file`/`key_file`, whose chain must lead to one of `anchors`
/// (by issuer name and signature).
fn signer(
    material: &Material,
    cert_file: &str,
    key_file: &str,
    anchors: &[Anchor],
) -> Result<Signer, CaError> {
    let chain = certificates(material, cert_file)?;
    let key_pem = material.get(key_file).ok_or_else(|| CaError::Missing {
        file: key_file.to_owned(),
    })?;
    let key_error = |reason: String| CaError::Key {
        file: key_file.to_owned(),
        reason,
    };
    let key_pem = std::str::from_utf8(key_pem).map_err(|err| key_error(err.to_string()))?;
    let key = KeyPair::from_pem(key_pem).map_err(|err| key_error(err.to_string()))?;
    let signing = parse(cert_file, &chain[0])?;
    if !signing.is_ca() {
        return Err(CaError::NotCa {
            subject: signing.subject().to_string(),
        });
    }
    if signing.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(key_error(format!(
            "it is not the key of the certificate in {cert_file}; replace both together"
        )));
    }
    let not_after = UNIX_EPOCH
        + Duration::from_secs(u64::try_from(signing.validity().not_after.timestamp()).unwrap_or(0));
    // The chain goes up to (and may include) a root; everything below the root is sent
    // after the leaf (nothing, when the signer is the root itself).
    let is_anchor = |der: &CertificateDer<'_>| anchors.iter().any(|a| a.der == *der);
    let intermediates: Vec<_> = chain
        .iter()
        .take_while(|der| !is_anchor(der))
        .cloned()
        .collect();
    let anchor = match intermediates.last() {
        None => anchors
            .iter()
            .position(|anchor| anchor.der == chain[0])
            .expect("the first certificate is an anchor"),
        Some(top) => {
            let top = parse(cert_file, top)?;
            anchors
                .iter()
                .position(|anchor| {
                    parse(cert_file, &anchor.der).is_ok_and(|root| {
                        root.subject().as_raw() == top.issuer().as_raw()
                            && top.verify_signature(Some(root.public_key())).is_ok()
                    })
                })
                .ok_or_else(|| CaError::NoRoot {
                    issuer: top.issuer().to_string(),
                })?
        }
    };
    let issuer = Issuer::from_ca_cert_der(&chain[0], key).map_err(|err| CaError::Certificate {
        file: cert_file.to_owned(),
        reason: err.to_string(),
    })?;
    Ok(Signer {
        issuer,
        intermediates,
        anchor,
        not_after,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // aws-lc-rs's system random; it cannot fail on Linux.
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

pub fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    text.trim_start_matches('0').to_owned()
}

/// The PEM text of certificates.
pub fn pem(certs: &[CertificateDer<'_>]) -> String {
    certs
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn csr(uris: &[&str]) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|uri| SanType::URI(Ia5String::try_from(*uri).unwrap()))
            .collect();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn allow_all(_: &str) -> Result<(), String> {
        Ok(())
    }

    /// Checks that `issued` is a workload certificate for `id` signed by `root`.
    fn assert_issued(issued: &Issued, id: &str, root: &CertificateDer<'_>) {
        let (_, leaf) = x509_parser::parse_x509_certificate(&issued.chain[0]).unwrap();
        let uris: Vec<String> = leaf
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|name| name.to_string())
            .collect();
        assert_eq!(uris, vec![format!("URI({id})")]);
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        // The chain verifies link by link up to the root.
        let (_, root) = x509_parser::parse_x509_certificate(root).unwrap();
        let mut chain: Vec<X509Certificate<'_>> = issued
            .chain
            .iter()
            .map(|der| x509_parser::parse_x509_certificate(der).unwrap().1)
            .collect();
        chain.push(root);
        for pair in chain.windows(2) {
            pair[0]
                .verify_signature(Some(pair[1].public_key()))
                .expect("each certificate is signed by the next");
        }
    }

    #[test]
    fn a_new_root_signs_requests_it_is_allowed_to() {
        let now = SystemTime::now();
        let material = Authority::generate_root(now).unwrap();
        let authority = Authority::load(&material, now).unwrap();
        assert_eq!(authority.anchors().len(), 1);
        assert!(authority.signing_root().subject.contains("weft mesh root"));

        let ttl = Duration::from_secs(3600);
        let issued = authority
            .sign(&csr(&[ID]), now, ttl, true, |id| {
                assert_eq!(id, ID);
                Ok(())
            })
            .unwrap()
            .unwrap();
        assert_issued(&issued, ID, &authority.signing_root().der);
        assert_eq!(issued.root, authority.signing_root().der);
        assert_eq!(issued.chain.len(), 1, "a root signer sends the leaf alone");
        assert_eq!(unix_seconds(issued.not_after), unix_seconds(now + ttl));

        let bundle = authority.trust_bundle(true);
        assert_eq!(bundle.anchors.len(), 1);
        assert!(bundle.anchors[0].signing);
        assert_eq!(bundle.anchors[0].retire_at, 0);
    }

    #[test]
    fn refused_and_malformed_requests_are_not_signed() {
        let now = SystemTime::now();
        let authority = Authority::load(&Authority::generate_root(now).unwrap(), now).unwrap();
        let ttl = Duration::from_secs(60);
        let refused = authority
            .sign(&csr(&[ID]), now, ttl, true, |_| Err("not here".into()))
            .unwrap();
        assert_eq!(refused.unwrap_err(), "not here");
        assert!(matches!(
            authority.sign(
                &csr(&[ID, "spiffe://cluster.local/ns/a/sa/b"]),
                now,
                ttl,
                true,
                allow_all
            ),
            Err(CaError::RequestSans(2))
        ));
        assert!(matches!(
            authority.sign(&csr(&[]), now, ttl, true, allow_all),
            Err(CaError::RequestSans(0))
        ));
        assert!(matches!(
            authority.sign("not a request", now, ttl, true, allow_all),
            Err(CaError::BadRequest(_))
        ));
    }

    #[test]
    fn rotation_trusts_both_roots_and_signs_with_the_new_one_once_propagated() {
        let now = SystemTime::now();
        let first = Authority::generate_root(now).unwrap();
        let old_root = Authority::load(&first, now).unwrap().signing_root().clone();
        let rotated = Authority::rotate(&first, now, Duration::from_secs(600)).unwrap();
        let authority = Authority::load(&rotated, now).unwrap();
        assert_eq!(authority.anchors().len(), 2);
        assert_ne!(authority.signing_root().der, old_root.der);
        let retiring = &authority.anchors()[1];
        assert_eq!(retiring.der, old_root.der);
        assert_eq!(
            retiring.retire_at.map(unix_seconds),
            Some(unix_seconds(now + Duration::from_secs(600)))
        );

        // Until agents trust the new root, the old key signs and is marked signing.
        let ttl = Duration::from_secs(60);
        let before = authority
            .sign(&csr(&[ID]), now, ttl, false, allow_all)
            .unwrap()
            .unwrap();
        assert_eq!(before.root, old_root.der);
        assert_issued(&before, ID, &old_root.der);
        let bundle = authority.trust_bundle(false);
        assert!(!bundle.anchors[0].signing && bundle.anchors[1].signing);
        let after = authority
            .sign(&csr(&[ID]), now, ttl, true, allow_all)
            .unwrap()
            .unwrap();
        assert_issued(&after, ID, &authority.signing_root().der);
        assert!(authority.trust_bundle(true).anchors[0].signing);
        assert_eq!(
            authority.next_retirement().map(unix_seconds),
            retiring.retire_at.map(unix_seconds)
        );

        // After the overlap the old root is gone, and a second rotation drops it too.
        let later = now + Duration::from_secs(601);
        let authority = Authority::load(&rotated, later).unwrap();
        assert_eq!(authority.anchors().len(), 1);
        let again = Authority::rotate(&rotated, later, Duration::from_secs(60)).unwrap();
        assert_eq!(
            again
                .keys()
                .filter(|name| name.starts_with("previous-"))
                .count(),
            2
        );
    }

    /// A root and an intermediate under it, as a user's own PKI would hand them over.
    fn intermediate(now: SystemTime) -> (Material, CertificateDer<'static>) {
        let root_material = Authority::generate_root(now).unwrap();
        let root_key =
            KeyPair::from_pem(std::str::from_utf8(&root_material[SIGNING_KEY]).unwrap()).unwrap();
        let root_der = certificates(&root_material, ROOTS).unwrap().remove(0);
        let root = Issuer::from_ca_cert_der(&root_der, root_key).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "team intermediate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.signed_by(&key, &root).unwrap();
        let material = Material::from([
            (SIGNING_CERT.to_owned(), cert.pem().into_bytes()),
            (SIGNING_KEY.to_owned(), key.serialize_pem().into_bytes()),
            (ROOTS.to_owned(), root_material[ROOTS].clone()),
        ]);
        (material, root_der)
    }

    #[test]
    fn a_user_supplied_intermediate_signs_under_its_root() {
        let now = SystemTime::now();
        let (material, root) = intermediate(now);
        let authority = Authority::load(&material, now).unwrap();
        assert_eq!(authority.signing_root().der, root);
        let issued = authority
            .sign(&csr(&[ID]), now, Duration::from_secs(60), true, allow_all)
            .unwrap()
            .unwrap();
        assert_eq!(issued.chain.len(), 2, "the intermediate follows the leaf");
        assert_issued(&issued, ID, &root);
        assert!(matches!(
            Authority::rotate(&material, now, Duration::from_secs(60)),
            Err(CaError::NotSelfSigned { .. })
        ));
    }

    #[test]
    fn broken_material_is_named() {
        let now = SystemTime::now();
        let (material, _) = intermediate(now);
        let other = Authority::generate_root(now).unwrap();

        let mut no_root = material.clone();
        no_root.insert(ROOTS.to_owned(), other[ROOTS].clone());
        let error = Authority::load(&no_root, now).unwrap_err();
        assert!(matches!(error, CaError::NoRoot { .. }), "{error}");
        assert!(
            error.to_string().contains("team intermediate")
                || error.to_string().contains("weft mesh root"),
            "{error}"
        );

        let mut wrong_key = material.clone();
        wrong_key.insert(SIGNING_KEY.to_owned(), other[SIGNING_KEY].clone());
        assert!(matches!(
            Authority::load(&wrong_key, now),
            Err(CaError::Key { .. })
        ));

        let mut missing = material.clone();
        missing.remove(ROOTS);
        let error = Authority::load(&missing, now).unwrap_err();
        assert!(error.to_string().contains("ca.crt is missing"), "{error}");

        let mut garbage = material;
        garbage.insert(
            SIGNING_CERT.to_owned(),
            b"-----BEGIN CERTIFICATE-----\nnope\n".to_vec(),
        );
        assert!(matches!(
            Authority::load(&garbage, now),
            Err(CaError::Pem { .. })
        ));

        let mut stray = other;
        stray.insert("previous-x.crt".to_owned(), Vec::new());
        assert!(matches!(
            Authority::load(&stray, now),
            Err(CaError::Previous { .. })
        ));
    }
}
