//! Workload identities: the SPIFFE IDs `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! that mesh certificates carry and that policy is written against.
//!
//! [`Identity::parse`] is strict, so an [`Identity`] it returns always has a valid TLS
//! server name ([`Identity::sni`]): the trust domain is a DNS name of lowercase letters,
//! digits, `-`, `_` and `.` (what SPIFFE allows, minus upper case, which SPIFFE requires
//! to be normalised away); the namespace and the service account are DNS labels, as
//! Kubernetes makes them (a service account whose name has a dot in it has no weft
//! identity). Build identities with [`Identity::new`] or [`Identity::parse`]; the fields
//! are public for reading, and code that assembles one by hand should validate it with
//! [`Identity::new`].

use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The fixed tail of every [`Identity::sni`] name. `.invalid` is reserved (RFC 6761) and
/// never resolves, so a weft server name cannot be mistaken for, or collide with, a real
/// host name.
const SNI_SUFFIX: &str = "spiffe.invalid";

/// Longest DNS name (RFC 1035, without the trailing dot), hence longest SNI.
const MAX_DNS_NAME: usize = 253;

/// Longest DNS label.
const MAX_LABEL: usize = 63;

/// A workload's SPIFFE identity. Displays (and serialises) as its SPIFFE ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

/// Why a string or a set of parts is not a weft workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "{id:?} is not a SPIFFE ID: it must start with `spiffe://` (lower case), as in spiffe://cluster.local/ns/default/sa/default"
    )]
    Scheme { id: String },
    #[error(
        "{id:?} has an invalid trust domain {trust_domain:?}: {reason}; a trust domain is a DNS name such as cluster.local"
    )]
    TrustDomain {
        id: String,
        trust_domain: String,
        reason: &'static str,
    },
    #[error(
        "{id:?} is not a workload identity: its path must be exactly /ns/<namespace>/sa/<service-account>"
    )]
    Path { id: String },
    #[error(
        "{id:?} has an invalid {what} {value:?}: use a DNS label (lowercase letters, digits and '-', at most 63 characters, starting and ending with a letter or digit)"
    )]
    Label {
        id: String,
        what: &'static str,
        value: String,
    },
    #[error(
        "{id:?} is too long: its TLS server name would be {len} characters, more than the 253 DNS allows; use a shorter trust domain"
    )]
    TooLong { id: String, len: usize },
}

impl Identity {
    /// Checks the parts and builds the identity `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Identity, IdentityError> {
        let identity = Identity {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        identity.validate()?;
        Ok(identity)
    }

    /// Parses a SPIFFE ID of the form `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
    ///
    /// Nothing else is accepted: no upper case, port, user, query, fragment, percent
    /// encoding, empty or extra path segment, or trailing slash.
    pub fn parse(id: &str) -> Result<Identity, IdentityError> {
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme { id: id.to_owned() })?;
        let (trust_domain, path) = rest.split_once('/').unwrap_or((rest, ""));
        // Checked before the path so that `spiffe://Example.org/...` is reported as a
        // trust-domain problem rather than a path one.
        check_trust_domain(id, trust_domain)?;
        let mut segments = path.split('/');
        let (Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) = (
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
            segments.next(),
        ) else {
            return Err(IdentityError::Path { id: id.to_owned() });
        };
        Identity::new(trust_domain, namespace, service_account)
    }

    /// The TLS server name (SNI) that asks a weft agent for this workload's certificate:
    /// The SPIFFE ID without `spiffe://`, as authorization policies (and Istio) write
    /// principals.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// `<service-account>.<namespace>.<trust-domain>.spiffe.invalid`.
    ///
    /// The service account and the namespace are single DNS labels, so the name maps
    /// back to exactly one identity; the reserved `.invalid` top-level domain keeps it
    /// apart from every real host name. For an identity from [`Identity::new`] or
    /// [`Identity::parse`] it is always a valid DNS name (at most 253 characters).
    pub fn sni(&self) -> String {
        format!(
            "{}.{}.{}.{SNI_SUFFIX}",
            self.service_account, self.namespace, self.trust_domain
        )
    }

    fn validate(&self) -> Result<(), IdentityError> {
        let id = || self.to_string();
        check_trust_domain(&id(), &self.trust_domain)?;
        for (what, value) in [
            ("namespace", &self.namespace),
            ("service account", &self.service_account),
        ] {
            if !is_dns_label(value) {
                return Err(IdentityError::Label {
                    id: id(),
                    what,
                    value: value.clone(),
                });
            }
        }
        let len = self.sni().len();
        if len > MAX_DNS_NAME {
            return Err(IdentityError::TooLong { id: id(), len });
        }
        Ok(())
    }
}

/// A trust domain is a DNS name: dot-separated labels of lowercase letters, digits, `-`
/// and `_`, none empty, none longer than 63, none starting or ending with `-`.
fn check_trust_domain(id: &str, trust_domain: &str) -> Result<(), IdentityError> {
    let reason = if trust_domain.is_empty() {
        Some("it is empty")
    } else if !trust_domain
        .bytes()
        .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.'))
    {
        Some("only lowercase letters, digits, '-', '_' and '.' are allowed")
    } else if trust_domain.split('.').any(|label| label.is_empty()) {
        Some("it has an empty label (a leading, trailing or double dot)")
    } else if trust_domain.split('.').any(|label| label.len() > MAX_LABEL) {
        Some("a label is longer than 63 characters")
    } else if trust_domain
        .split('.')
        .any(|label| label.starts_with('-') || label.ends_with('-'))
    {
        Some("a label starts or ends with '-'")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(IdentityError::TrustDomain {
            id: id.to_owned(),
            trust_domain: trust_domain.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// An RFC 1123 label as Kubernetes uses it for namespace and service account names.
fn is_dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            bytes.len() <= MAX_LABEL
                && first.is_ascii_alphanumeric()
                && last.is_ascii_alphanumeric()
                && bytes
                    .iter()
                    .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'-'))
        }
        _ => false,
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(id: &str) -> Result<Identity, IdentityError> {
        Identity::parse(id)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Identity, D::Error> {
        let id = String::deserialize(deserializer)?;
        Identity::parse(&id).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(td: &str, ns: &str, sa: &str) -> Identity {
        Identity {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn parses_and_displays_round_trip() {
        let text = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage";
        let parsed = Identity::parse(text).expect("valid id");
        assert_eq!(
            parsed,
            id("cluster.local", "default", "bookinfo-productpage")
        );
        assert_eq!(parsed.to_string(), text);
        assert_eq!(text.parse::<Identity>().expect("valid id"), parsed);
    }

    #[test]
    fn accepts_spiffe_trust_domain_characters() {
        for text in [
            "spiffe://td/ns/a/sa/b",
            "spiffe://my_domain.example-1.org/ns/0ns/sa/9",
            "spiffe://123/ns/a-b/sa/c-d",
        ] {
            Identity::parse(text).unwrap_or_else(|e| panic!("{text} rejected: {e}"));
        }
    }

    #[test]
    fn rejects_malformed_ids() {
        type Case = (&'static str, fn(&IdentityError) -> bool);
        let cases: &[Case] = &[
            ("", |e| matches!(e, IdentityError::Scheme { .. })),
            ("http://td/ns/a/sa/b", |e| {
                matches!(e, IdentityError::Scheme { .. })
            }),
            ("SPIFFE://td/ns/a/sa/b", |e| {
                matches!(e, IdentityError::Scheme { .. })
            }),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, IdentityError::TrustDomain { .. })
            }),
            ("spiffe://Example.org/ns/a/sa/b", |e| {
                matches!(e, IdentityError::TrustDomain { .. })
            }),
            ("spiffe://td:8443/ns/a/sa/b", |e| {
                matches!(e, IdentityError::TrustDomain { .. })
            }),
            ("spiffe://user@td/ns/a/sa/b", |e| {
                matches!(e, IdentityError::TrustDomain { .. })
            }),
            ("spiffe://td./ns/a/sa/b", |e| {
                matches!(e, IdentityError::TrustDomain { .. })
            }),
            ("spiffe://-td/ns/a/sa/b", |e| {
                matches!(e, IdentityError::TrustDomain { .. })
            }),
            ("spiffe://td", |e| matches!(e, IdentityError::Path { .. })),
            ("spiffe://td/", |e| matches!(e, IdentityError::Path { .. })),
            ("spiffe://td/ns/a/sa/b/", |e| {
                matches!(e, IdentityError::Path { .. })
            }),
            ("spiffe://td/ns/a/sa/b/c", |e| {
                matches!(e, IdentityError::Path { .. })
            }),
            ("spiffe://td/ns/a/sa", |e| {
                matches!(e, IdentityError::Path { .. })
            }),
            ("spiffe://td/sa/b/ns/a", |e| {
                matches!(e, IdentityError::Path { .. })
            }),
            ("spiffe://td//ns/a/sa/b", |e| {
                matches!(e, IdentityError::Path { .. })
            }),
            ("spiffe://td/ns/a/sa/b?x=1", |e| {
                matches!(e, IdentityError::Label { .. })
            }),
            ("spiffe://td/ns//sa/b", |e| {
                matches!(e, IdentityError::Label { .. })
            }),
            ("spiffe://td/ns/a/sa/", |e| {
                matches!(e, IdentityError::Label { .. })
            }),
            ("spiffe://td/ns/A/sa/b", |e| {
                matches!(e, IdentityError::Label { .. })
            }),
            ("spiffe://td/ns/a/sa/b.c", |e| {
                matches!(e, IdentityError::Label { .. })
            }),
            ("spiffe://td/ns/a-/sa/b", |e| {
                matches!(e, IdentityError::Label { .. })
            }),
            ("spiffe://td/ns/a%41/sa/b", |e| {
                matches!(e, IdentityError::Label { .. })
            }),
        ];
        for (text, expected) in cases {
            match Identity::parse(text) {
                Ok(identity) => panic!("{text:?} accepted as {identity}"),
                Err(error) => assert!(expected(&error), "{text:?}: unexpected error {error}"),
            }
        }
    }

    #[test]
    fn rejects_overlong_labels_and_names() {
        let long = "a".repeat(64);
        assert!(matches!(
            Identity::parse(&format!("spiffe://td/ns/{long}/sa/b")),
            Err(IdentityError::Label { .. })
        ));
        assert!(matches!(
            Identity::parse(&format!("spiffe://{long}.org/ns/a/sa/b")),
            Err(IdentityError::TrustDomain { .. })
        ));
        // Labels that are fine one by one, but together exceed what DNS allows.
        let label = "a".repeat(63);
        let trust_domain = [label.as_str(); 3].join(".");
        assert!(matches!(
            Identity::parse(&format!("spiffe://{trust_domain}/ns/{label}/sa/{label}")),
            Err(IdentityError::TooLong { .. })
        ));
    }

    #[test]
    fn errors_tell_the_operator_what_to_fix() {
        let error = Identity::parse("spiffe://td/ns/Prod/sa/b").expect_err("upper case");
        let message = error.to_string();
        assert!(message.contains("namespace \"Prod\""), "{message}");
        assert!(message.contains("DNS label"), "{message}");
        let error = Identity::parse("spiffe://td/default/b").expect_err("bad path");
        assert!(
            error
                .to_string()
                .contains("/ns/<namespace>/sa/<service-account>"),
            "{error}"
        );
    }

    #[test]
    fn new_validates_parts() {
        assert_eq!(
            Identity::new("td", "ns", "sa").expect("valid"),
            id("td", "ns", "sa")
        );
        assert!(matches!(
            Identity::new("td", "ns", "sa/x"),
            Err(IdentityError::Label { .. })
        ));
        assert!(matches!(
            Identity::new("", "ns", "sa"),
            Err(IdentityError::TrustDomain { .. })
        ));
    }

    #[test]
    fn sni_is_a_dns_name_that_maps_back_to_one_identity() {
        let identity = Identity::parse("spiffe://cluster.local/ns/shop/sa/cart").expect("valid");
        assert_eq!(identity.sni(), "cart.shop.cluster.local.spiffe.invalid");
        rustls::pki_types::ServerName::try_from(identity.sni()).expect("valid DNS name");

        // Distinct identities get distinct names even when their parts would run
        // together, because namespace and service account are single labels.
        let a = id("b.c", "a", "x");
        let b = id("c", "b", "a");
        assert_ne!(a.sni(), b.sni());

        // The longest identity that parses still yields a valid server name.
        let label = "a".repeat(63);
        let trust_domain = format!("{label}.{}", "b".repeat(46));
        let longest = Identity::new(trust_domain, label.clone(), label).expect("fits");
        assert_eq!(longest.sni().len(), MAX_DNS_NAME);
        rustls::pki_types::ServerName::try_from(longest.sni()).expect("valid DNS name");
    }

    #[test]
    fn orders_by_trust_domain_then_namespace_then_account() {
        let mut ids = vec![id("b", "a", "a"), id("a", "b", "a"), id("a", "a", "b")];
        ids.sort();
        assert_eq!(
            ids,
            vec![id("a", "a", "b"), id("a", "b", "a"), id("b", "a", "a")]
        );
    }

    #[test]
    fn serde_uses_the_spiffe_id() {
        let identity = id("td", "ns", "sa");
        let json = serde_json::to_string(&identity).expect("serialises");
        assert_eq!(json, "\"spiffe://td/ns/ns/sa/sa\"");
        let back: Identity = serde_json::from_str(&json).expect("deserialises");
        assert_eq!(back, identity);
        let error = serde_json::from_str::<Identity>("\"spiffe://td/ns/a\"")
            .expect_err("invalid id rejected");
        assert!(error.to_string().contains("/ns/<namespace>/sa/"), "{error}");
    }
}
