//! The `baggage` header of an HBONE CONNECT, as Istio's peers write and read it: who
//! the client workload is, for the server's telemetry. Keys (W3C baggage members,
//! OpenTelemetry attribute names):
//!
//! - `k8s.cluster.name`, `k8s.namespace.name`;
//! - `k8s.<kind>.name`: the workload (`deployment`, `pod`, `job`, `cronjob`; weft
//!   knows pods and sends `k8s.pod.name`);
//! - `service.name`, `service.version`: the canonical service and revision
//!   ([`canonical_name`], [`canonical_revision`]);
//! - `cloud.availability_zone`.
//!
//! Baggage attributes; it never authorizes. The server believes it only as far as the
//! client's certificate agrees (the namespace).

use crate::mesh::Workload;

/// The cluster's name, as Istio names a cluster when none is configured: in baggage
/// and in the `*_cluster` labels of the standard metrics.
pub const CLUSTER: &str = "Kubernetes";

/// The client workload as baggage describes it; every part is optional.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    pub workload: Option<String>,
    pub service: Option<String>,
    pub version: Option<String>,
    pub zone: Option<String>,
}

impl Baggage {
    /// The baggage of a pod of this mesh, on a node in `zone`.
    pub fn of(workload: &Workload, zone: Option<&str>) -> Self {
        Self {
            cluster: Some(CLUSTER.to_owned()),
            namespace: Some(workload.namespace.to_string()),
            workload: Some(workload.name.clone()),
            service: Some(canonical_name(workload).to_owned()),
            version: Some(canonical_revision(workload).to_owned()),
            zone: zone.map(str::to_owned),
        }
    }

    /// The header value: the members present, in Istio's order.
    pub fn render(&self) -> String {
        [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            ("k8s.pod.name", &self.workload),
            ("service.name", &self.service),
            ("service.version", &self.version),
            ("cloud.availability_zone", &self.zone),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some(format!("{key}={}", value.as_deref()?)))
        .collect::<Vec<_>>()
        .join(",")
    }

    /// Reads every `baggage` header value given, later members replacing earlier ones.
    /// Members weft does not know, properties after `;` and empty values are left out;
    /// percent-encoded values are decoded, and one that does not decode is left out.
    pub fn parse<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut baggage = Self::default();
        for member in values.into_iter().flat_map(|value| value.split(',')) {
            let member = member.split(';').next().unwrap_or_default();
            let Some((key, value)) = member.split_once('=') else {
                continue;
            };
            let Some(value) = decode(value.trim()).filter(|value| !value.is_empty()) else {
                continue;
            };
            let slot = match key.trim() {
                "k8s.cluster.name" => &mut baggage.cluster,
                "k8s.namespace.name" => &mut baggage.namespace,
                "k8s.pod.name" | "k8s.deployment.name" | "k8s.job.name" | "k8s.cronjob.name" => {
                    &mut baggage.workload
                }
                "service.name" => &mut baggage.service,
                "service.version" => &mut baggage.version,
                "cloud.availability_zone" => &mut baggage.zone,
                _ => continue,
            };
            *slot = Some(value);
        }
        baggage
    }
}

/// The workload's canonical service, as Istio names it: its label
/// `service.istio.io/canonical-name`, else `app.kubernetes.io/name`, else `app`, else
/// the workload's own name.
pub fn canonical_name(workload: &Workload) -> &str {
    [
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ]
    .into_iter()
    .find_map(|label| workload.labels.get(label))
    .unwrap_or(&workload.name)
}

/// The workload's canonical revision: its label `service.istio.io/canonical-revision`,
/// else `app.kubernetes.io/version`, else `version`, else `latest`.
pub fn canonical_revision(workload: &Workload) -> &str {
    [
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ]
    .into_iter()
    .find_map(|label| workload.labels.get(label))
    .unwrap_or("latest")
}

/// A baggage value with its `%XX` escapes decoded; `None` when one is malformed or
/// the result is not UTF-8.
fn decode(value: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut rest = value.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(labels: &[(&str, &str)]) -> Workload {
        let labels: String = labels
            .iter()
            .map(|(key, value)| format!("{key}: {value}, "))
            .collect();
        serde_yaml::from_str(&format!(
            "{{ name: web-7d4f-x2, namespace: shop, ip: 10.244.0.2, labels: {{ {labels} }} }}"
        ))
        .unwrap()
    }

    #[test]
    fn canonical_names_and_revisions_follow_istios_label_order() {
        type Labels<'a> = &'a [(&'a str, &'a str)];
        let cases: [(Labels, &str, &str); 5] = [
            (&[], "web-7d4f-x2", "latest"),
            (&[("app", "web"), ("version", "v2")], "web", "v2"),
            (
                &[
                    ("app", "web"),
                    ("app.kubernetes.io/name", "storefront"),
                    ("version", "v2"),
                    ("app.kubernetes.io/version", "2.1"),
                ],
                "storefront",
                "2.1",
            ),
            (
                &[
                    ("app", "web"),
                    ("service.istio.io/canonical-name", "shop-web"),
                    ("service.istio.io/canonical-revision", "canary"),
                    ("version", "v2"),
                ],
                "shop-web",
                "canary",
            ),
            (&[("version", "v3")], "web-7d4f-x2", "v3"),
        ];
        for (labels, name, revision) in cases {
            let workload = workload(labels);
            assert_eq!(canonical_name(&workload), name, "{labels:?}");
            assert_eq!(canonical_revision(&workload), revision, "{labels:?}");
        }
    }

    #[test]
    fn a_pods_baggage_reads_back_as_written() {
        let baggage = Baggage::of(&workload(&[("app", "web")]), Some("zone-a"));
        let rendered = baggage.render();
        assert_eq!(
            rendered,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.pod.name=web-7d4f-x2,\
             service.name=web,service.version=latest,cloud.availability_zone=zone-a"
        );
        assert_eq!(Baggage::parse([rendered.as_str()]), baggage);
    }

    #[test]
    fn baggage_is_read_as_istio_peers_write_it() {
        let cases: [(&[&str], Baggage); 6] = [
            (&[], Baggage::default()),
            (
                // ztunnel, for a deployment.
                &[
                    "k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,service.name=N2,service.version=V1",
                ],
                Baggage {
                    cluster: Some("K1".into()),
                    namespace: Some("NS1".into()),
                    workload: Some("N1".into()),
                    service: Some("N2".into()),
                    version: Some("V1".into()),
                    zone: None,
                },
            ),
            (
                // Members over several header values; the later wins.
                &[
                    "k8s.namespace.name=a",
                    "service.name=x",
                    "k8s.namespace.name=b",
                ],
                Baggage {
                    namespace: Some("b".into()),
                    service: Some("x".into()),
                    ..Baggage::default()
                },
            ),
            (
                // Empty values, unknown keys, properties, spaces, no `=`.
                &[" service.name = web ;ttl=5 , k8s.namespace.name=, user.id=7, junk"],
                Baggage {
                    service: Some("web".into()),
                    ..Baggage::default()
                },
            ),
            (
                &["service.name=my%20web,service.version=%E2%9C%93"],
                Baggage {
                    service: Some("my web".into()),
                    version: Some("✓".into()),
                    ..Baggage::default()
                },
            ),
            (
                // A malformed escape loses its member only.
                &["service.name=%zz,k8s.job.name=nightly%"],
                Baggage::default(),
            ),
        ];
        for (values, expected) in cases {
            assert_eq!(
                Baggage::parse(values.iter().copied()),
                expected,
                "{values:?}"
            );
        }
    }
}
