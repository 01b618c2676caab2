//! The local cluster's certificate authority: until the controller runs the mesh CA
//! (the identity issue), the local cluster issues the workload certificates its agents
//! load from files.
//!
//! The CA is a self-signed ECDSA P-256 root kept as `ca.crt` + `ca.key` in a directory
//! of the cluster; `ca.crt` is the agents' trust bundle. Each workload gets a
//! `<stem>.crt` + `<stem>.key` pair in the layout the agent's certificate directory
//! expects: the `.crt` holds the leaf alone (the root is in every agent's bundle, so
//! sending it in handshakes would only cost bytes), the `.key` its PKCS#8 key, mode
//! 0600. The leaf carries the SPIFFE ID as its only URI SAN, is not a CA, and allows
//! digitalSignature with both serverAuth and clientAuth, because a workload's
//! certificate serves both ends of an HBONE tunnel.
//!
//! The CA's subject is derived from its key, so reopening a directory rebuilds exactly
//! the issuer that wrote `ca.crt` without parsing it, and certificates issued before and
//! after a restart chain to the same root. `ca.crt` and `ca.key` belong together:
//! replace both or neither.

use std::{
    fmt::Write as _,
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, string::Ia5String,
};

use crate::error::ClusterError;

const CA_CERT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
/// How long a new root is valid. The local cluster's CA is for development and tests;
/// recreate it by removing its directory.
const CA_DAYS: u32 = 3650;
/// Backdating of certificates, so that a peer whose clock is a little behind accepts them.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
/// The last second X.509 can express (9999-12-31T23:59:59Z).
const MAX_X509_TIME: u64 = 253_402_300_799;

/// When a certificate is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl Validity {
    /// `days` days from now, starting an hour ago to allow for clock skew.
    pub fn days(days: u32) -> Validity {
        let now = SystemTime::now();
        // Neither can leave SystemTime's range on a 64-bit clock; if one did, the
        // resulting validity is refused by `issue` with a message saying why.
        Validity {
            not_before: now.checked_sub(CLOCK_SKEW).unwrap_or(now),
            not_after: now
                .checked_add(Duration::from_secs(u64::from(days) * 86_400))
                .unwrap_or(now),
        }
    }

    fn apply(&self, params: &mut CertificateParams, path: &Path) -> Result<(), ClusterError> {
        let in_range = |time: SystemTime| {
            time.duration_since(UNIX_EPOCH)
                .is_ok_and(|since| since.as_secs() <= MAX_X509_TIME)
        };
        if !(in_range(self.not_before) && in_range(self.not_after)) {
            return Err(invalid_input(
                path,
                format!("validity {self:?} is outside the years 1970 to 9999"),
            ));
        }
        if self.not_after <= self.not_before {
            return Err(invalid_input(
                path,
                format!("validity {self:?} ends before it starts"),
            ));
        }
        // In range, checked above: the conversion cannot overflow.
        params.not_before = self.not_before.into();
        params.not_after = self.not_after.into();
        Ok(())
    }
}

/// The local cluster's CA.
#[derive(Debug)]
pub struct LocalCa {
    dir: PathBuf,
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
}

impl LocalCa {
    /// Opens the CA kept in `dir`, creating it (and `dir`) when neither `ca.crt` nor
    /// `ca.key` exists. It issues identities of `trust_domain` only.
    pub fn create_or_load(dir: &Path, trust_domain: &str) -> Result<LocalCa, ClusterError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if trust_domain.is_empty()
            || !trust_domain
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.'))
        {
            return Err(invalid_input(
                dir,
                format!(
                    "invalid trust domain {trust_domain:?}: use a DNS name such as cluster.local"
                ),
            ));
        }
        let exists = |path: &Path| path.try_exists().map_err(ClusterError::io(path));
        let key = match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let cert = read_to_string(&cert_path)?;
                if !cert.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(invalid_input(
                        &cert_path,
                        "holds no PEM CERTIFICATE block; remove ca.crt and ca.key to create a new CA",
                    ));
                }
                KeyPair::from_pem(&read_to_string(&key_path)?)
                    .map_err(rcgen_error(&key_path, "cannot read the CA key"))?
            }
            (false, false) => create(dir, &cert_path, &key_path)?,
            (true, false) => return Err(missing_half(&key_path, &cert_path)),
            (false, true) => return Err(missing_half(&cert_path, &key_path)),
        };
        Ok(LocalCa {
            dir: dir.to_owned(),
            trust_domain: trust_domain.to_owned(),
            issuer: Issuer::new(ca_params(&key), key),
        })
    }

    /// The PEM file holding the CA's root certificate: the agents' trust bundle.
    pub fn trust_bundle(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }

    /// Issues a certificate for the workload `spiffe_id` (which must be
    /// `spiffe://<this CA's trust domain>/ns/<namespace>/sa/<service-account>`) and
    /// writes `out_dir/<stem>.crt` (the leaf alone) and `out_dir/<stem>.key` (its PKCS#8
    /// key, mode 0600), replacing any earlier pair atomically, file by file. Returns
    /// their paths. `stem` must not start with `.`, which the agent skips.
    pub fn issue(
        &self,
        spiffe_id: &str,
        out_dir: &Path,
        stem: &str,
        validity: Validity,
    ) -> Result<(PathBuf, PathBuf), ClusterError> {
        let cert_path = out_dir.join(format!("{stem}.crt"));
        let key_path = out_dir.join(format!("{stem}.key"));
        if stem.is_empty() || stem.starts_with('.') || stem.contains('/') {
            return Err(invalid_input(
                out_dir,
                format!(
                    "invalid certificate file stem {stem:?}: use a plain file name not starting with '.'"
                ),
            ));
        }
        self.check_spiffe_id(spiffe_id, &cert_path)?;

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = Ia5String::try_from(spiffe_id)
            .map_err(rcgen_error(&cert_path, "the SPIFFE ID is not ASCII"))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity.apply(&mut params, &cert_path)?;

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(rcgen_error(&key_path, "cannot generate a key"))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_error(&cert_path, "cannot sign the certificate"))?;

        fs::create_dir_all(out_dir).map_err(ClusterError::io(out_dir))?;
        write_atomically(&key_path, &key.serialize_pem(), 0o600)?;
        write_atomically(&cert_path, &cert.pem(), 0o644)?;
        Ok((cert_path, key_path))
    }

    /// A light check of the shape; the agent parses identities strictly when it loads
    /// the certificate.
    fn check_spiffe_id(&self, spiffe_id: &str, cert_path: &Path) -> Result<(), ClusterError> {
        let path = spiffe_id
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.strip_prefix(self.trust_domain.as_str()))
            .and_then(|rest| rest.strip_prefix('/'));
        let Some(path) = path else {
            return Err(invalid_input(
                cert_path,
                format!(
                    "{spiffe_id:?} is not a SPIFFE ID of trust domain {}: expected spiffe://{}/ns/<namespace>/sa/<service-account>",
                    self.trust_domain, self.trust_domain
                ),
            ));
        };
        match path.split('/').collect::<Vec<_>>().as_slice() {
            ["ns", namespace, "sa", account] if !namespace.is_empty() && !account.is_empty() => {
                Ok(())
            }
            _ => Err(invalid_input(
                cert_path,
                format!(
                    "{spiffe_id:?} is not a workload identity: its path must be /ns/<namespace>/sa/<service-account>"
                ),
            )),
        }
    }
}

/// The root's parameters. Only the subject, key identifier method and key usages
/// matter to an [`Issuer`]; they depend on the key alone, so the issuer rebuilt on load
/// matches the `ca.crt` written at creation.
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let key_id = params.key_identifier(key);
    let mut fingerprint = String::new();
    for byte in key_id.iter().take(8) {
        // Writing to a String cannot fail.
        let _ = write!(fingerprint, "{byte:02x}");
    }
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "weft");
    params.distinguished_name.push(
        DnType::CommonName,
        format!("weft local cluster CA {fingerprint}"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn create(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<KeyPair, ClusterError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(rcgen_error(key_path, "cannot generate the CA key"))?;
    let mut params = ca_params(&key);
    Validity::days(CA_DAYS).apply(&mut params, cert_path)?;
    let cert = params
        .self_signed(&key)
        .map_err(rcgen_error(cert_path, "cannot sign the CA certificate"))?;
    fs::create_dir_all(dir).map_err(ClusterError::io(dir))?;
    write_atomically(key_path, &key.serialize_pem(), 0o600)?;
    write_atomically(cert_path, &cert.pem(), 0o644)?;
    log::info!(
        "created the local cluster CA in {} (trust bundle {})",
        dir.display(),
        cert_path.display()
    );
    Ok(key)
}

fn read_to_string(path: &Path) -> Result<String, ClusterError> {
    fs::read_to_string(path).map_err(ClusterError::io(path))
}

/// Writes `path` through a temporary file (hidden, so the agent never loads a half
/// written one) created with `mode`, then renamed over `path`.
fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<(), ClusterError> {
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    match fs::remove_file(&tmp) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            return Err(ClusterError::io(&tmp)(err));
        }
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(ClusterError::io(&tmp))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(ClusterError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(ClusterError::io(path))
}

fn invalid_input(path: &Path, message: impl Into<String>) -> ClusterError {
    ClusterError::io(path)(io::Error::new(io::ErrorKind::InvalidInput, message.into()))
}

fn missing_half(missing: &Path, present: &Path) -> ClusterError {
    ClusterError::io(missing)(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "missing, but {} exists; restore it, or remove {} to create a new CA",
            present.display(),
            present.display()
        ),
    ))
}

fn rcgen_error(path: &Path, what: &'static str) -> impl FnOnce(rcgen::Error) -> ClusterError {
    let to_cluster = ClusterError::io(path);
    move |err| to_cluster(io::Error::other(format!("{what}: {err}")))
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::PermissionsExt,
        process,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use rcgen::PublicKeyData;

    use super::*;

    const TD: &str = "cluster.local";
    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    /// A directory under the system temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "weft-ca-test-{}-{}",
                process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).expect("create temp dir");
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    fn pem_blocks(path: &Path, label: &str) -> usize {
        fs::read_to_string(path)
            .expect("read")
            .matches(&format!("-----BEGIN {label}-----"))
            .count()
    }

    fn message(error: ClusterError) -> String {
        error.to_string()
    }

    #[test]
    fn creates_then_reloads_the_same_ca() {
        let dir = TempDir::new();
        let ca_dir = dir.0.join("ca");
        let ca = LocalCa::create_or_load(&ca_dir, TD).expect("create");
        assert_eq!(ca.trust_bundle(), ca_dir.join("ca.crt"));
        assert_eq!(pem_blocks(&ca_dir.join("ca.crt"), "CERTIFICATE"), 1);
        assert_eq!(pem_blocks(&ca_dir.join("ca.key"), "PRIVATE KEY"), 1);
        assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
        let cert = fs::read(ca_dir.join("ca.crt")).expect("read");

        let reloaded = LocalCa::create_or_load(&ca_dir, TD).expect("reload");
        assert_eq!(fs::read(ca_dir.join("ca.crt")).expect("read"), cert);
        // Same key, hence the same subject and key identifier: leaves issued after the
        // reload name the issuer that signed ca.crt.
        let spki = |ca: &LocalCa| ca.issuer.key().subject_public_key_info();
        let subject = |ca: &LocalCa| ca_params(ca.issuer.key()).distinguished_name;
        assert_eq!(spki(&reloaded), spki(&ca));
        assert_eq!(subject(&reloaded), subject(&ca));

        let other = LocalCa::create_or_load(&dir.0.join("other"), TD).expect("create");
        assert_ne!(spki(&other), spki(&ca));
        assert_ne!(subject(&other), subject(&ca));
    }

    #[test]
    fn issues_a_leaf_and_a_private_key() {
        let dir = TempDir::new();
        let ca = LocalCa::create_or_load(&dir.0.join("ca"), TD).expect("create");
        let out = dir.0.join("node-1");
        let (cert, key) = ca
            .issue(ID, &out, "shop-cart", Validity::days(1))
            .expect("issue");
        assert_eq!(cert, out.join("shop-cart.crt"));
        assert_eq!(key, out.join("shop-cart.key"));
        assert_eq!(pem_blocks(&cert, "CERTIFICATE"), 1, "the leaf alone");
        assert_eq!(pem_blocks(&key, "PRIVATE KEY"), 1, "PKCS#8");
        assert_eq!(mode(&key), 0o600);
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&out)
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // Reissuing replaces the pair, and keeps the key private even if it was not.
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let before = fs::read(&cert).expect("read");
        ca.issue(ID, &out, "shop-cart", Validity::days(1))
            .expect("reissue");
        assert_ne!(fs::read(&cert).expect("read"), before);
        assert_eq!(mode(&key), 0o600);
    }

    #[test]
    fn refuses_bad_requests_naming_the_file() {
        let dir = TempDir::new();
        let ca = LocalCa::create_or_load(&dir.0.join("ca"), TD).expect("create");
        let out = dir.0.join("out");
        for id in [
            "spiffe://other.domain/ns/shop/sa/cart",
            "spiffe://cluster.localx/ns/shop/sa/cart",
            "https://cluster.local/ns/shop/sa/cart",
            "spiffe://cluster.local/ns/shop",
            "spiffe://cluster.local/ns//sa/cart",
            "spiffe://cluster.local/ns/shop/sa/cart/extra",
        ] {
            let error = ca.issue(id, &out, "x", Validity::days(1)).expect_err(id);
            let text = message(error);
            assert!(text.contains("x.crt") && text.contains(id), "{text}");
        }
        for stem in ["", ".hidden", "a/b"] {
            let error = ca.issue(ID, &out, stem, Validity::days(1)).expect_err(stem);
            assert!(message(error).contains("stem"));
        }
        let backwards = Validity {
            not_before: SystemTime::now(),
            not_after: SystemTime::now() - Duration::from_secs(60),
        };
        let error = ca.issue(ID, &out, "x", backwards).expect_err("backwards");
        assert!(message(error).contains("ends before it starts"));
        let too_late = Validity {
            not_before: SystemTime::now(),
            not_after: UNIX_EPOCH + Duration::from_secs(MAX_X509_TIME + 1),
        };
        let error = ca.issue(ID, &out, "x", too_late).expect_err("year 10000");
        assert!(message(error).contains("9999"));
        assert!(!out.exists(), "nothing is written for a refused request");
    }

    #[test]
    fn refuses_half_a_ca_and_bad_trust_domains() {
        let dir = TempDir::new();
        let ca_dir = dir.0.join("ca");
        LocalCa::create_or_load(&ca_dir, TD).expect("create");
        fs::remove_file(ca_dir.join("ca.key")).expect("remove");
        let text = message(LocalCa::create_or_load(&ca_dir, TD).expect_err("no key"));
        assert!(text.contains("ca.key") && text.contains("ca.crt"), "{text}");

        let ca_dir = dir.0.join("ca2");
        LocalCa::create_or_load(&ca_dir, TD).expect("create");
        fs::write(ca_dir.join("ca.key"), "garbage").expect("write");
        let text = message(LocalCa::create_or_load(&ca_dir, TD).expect_err("bad key"));
        assert!(text.contains("ca.key"), "{text}");

        for trust_domain in ["", "Cluster.local", "td:8080"] {
            let error =
                LocalCa::create_or_load(&dir.0.join("ca3"), trust_domain).expect_err(trust_domain);
            assert!(message(error).contains("trust domain"));
        }
    }

    #[test]
    fn validity_days_starts_an_hour_ago() {
        let day = Duration::from_secs(86_400);
        let before = SystemTime::now();
        let validity = Validity::days(2);
        let after = SystemTime::now();
        assert!(before - CLOCK_SKEW <= validity.not_before);
        assert!(validity.not_before <= after - CLOCK_SKEW);
        assert!(before + 2 * day <= validity.not_after);
        assert!(validity.not_after <= after + 2 * day);
    }
}
