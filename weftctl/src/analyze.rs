//! `weftctl analyze -f FILES…`: the controller's own parsing, validation and
//! compilation, run offline on manifests before they are applied — each object weft
//! would not apply as written, with its file, object and the field at fault (the
//! controller's verdicts name it), and each route rule that never takes a request
//! because an earlier one matches the same, so a CI pipeline can stop a bad change.
//! With `--cluster` (or without files) the same over the objects a cluster has now
//! ([`crate::mesh::Mesh::manifests`]), the files applied on top.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Serialize;
use weft_api::{config::v1 as proto, routes::ServiceRoutes};
use weft_controller::{
    compile::{self, Settings},
    objects::Objects,
    source::files,
    status::{Reason, Verdict},
};

use crate::output::{Report, table};

#[derive(Debug, Serialize)]
pub struct Analysis {
    /// The files read.
    pub files: Vec<PathBuf>,
    /// What is wrong or worth knowing, errors first.
    pub findings: Vec<Finding>,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub file: PathBuf,
    /// `Kind namespace/name`; none for a file that does not parse.
    pub object: Option<String>,
    /// The controller's reason (`Invalid`, `Conflicted`, …), or `Unreadable`.
    pub reason: String,
    /// What is wrong, naming the field.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Nothing of the object applies, or the file does not parse: analyze exits 1.
    Error,
    /// Part of it does not apply, or it refers to something these files lack (which
    /// the cluster may have).
    Warning,
    /// Applies once something these files lack exists (pods its selector matches).
    Info,
}

/// The manifests under `paths` (files, or directories of `*.yaml`, `*.yml`,
/// `*.json`), with their content.
pub fn read(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let files = weft_api::manifests::files(paths);
    if files.is_empty() && !paths.is_empty() {
        anyhow::bail!("no YAML or JSON file in {paths:?}");
    }
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
            Ok((path, text))
        })
        .collect()
}

/// The findings for manifests `inputs` (path, content), compiled together as the
/// controller compiles a cluster's objects; an object of a later input replaces one
/// of an earlier input with the same kind, namespace and name, as applying it would.
pub fn analyze(inputs: &[(PathBuf, String)]) -> Analysis {
    let mut findings = Vec::new();
    let mut objects = Objects::default();
    // By `<Kind>/<namespace>/<name>`, as compiled rules name their route.
    let mut origin: BTreeMap<String, &Path> = BTreeMap::new();
    for (path, text) in inputs {
        match files::parse(path, text) {
            Ok(parsed) => {
                for object in parsed {
                    origin.insert(format!("{}/{}", object.kind(), object.key()), path);
                    objects.upsert(object);
                }
            }
            Err(error) => findings.push(Finding {
                severity: Severity::Error,
                file: path.clone(),
                object: None,
                reason: "Unreadable".to_owned(),
                message: error.to_string(),
            }),
        }
    }
    let settings = Settings {
        trust_domain: "cluster.local".to_owned(),
        root_namespace: "weft-system".to_owned(),
        exclude_ports: Vec::new(),
    };
    let compiled = compile::compile(&objects, &settings, &Default::default());
    let file_of = |object: &str| {
        origin
            .get(object)
            .map_or_else(PathBuf::new, |path| path.to_path_buf())
    };
    for ((kind, key), verdict) in &compiled.statuses {
        let file = file_of(&format!("{kind}/{key}"));
        for (severity, reason, message) in judge(verdict) {
            findings.push(Finding {
                severity,
                file: file.clone(),
                object: Some(format!("{kind} {key}")),
                reason,
                message,
            });
        }
    }
    for routes in compiled.shared.all::<proto::ServiceRoutes>().values() {
        let Ok(routes) = ServiceRoutes::try_from(routes) else {
            continue;
        };
        for (shadowed, by) in routes.shadowed() {
            let (rule, earlier) = (&routes.rules[shadowed], &routes.rules[by]);
            findings.push(Finding {
                severity: Severity::Warning,
                file: file_of(&rule.route),
                object: Some(rule.route.replacen('/', " ", 1)),
                reason: "Shadowed".to_owned(),
                message: format!(
                    "rule {} never takes a request to Service {}/{} port {}: rule {} of {} \
                     matches the same requests and comes first (on a tie the older route \
                     wins, then the first by namespace and name)",
                    rule.name,
                    routes.namespace,
                    routes.service,
                    routes.port,
                    earlier.name,
                    earlier.route
                ),
            });
        }
    }
    findings.sort();
    Analysis {
        files: inputs.iter().map(|(path, _)| path.clone()).collect(),
        findings,
    }
}

/// What a verdict is worth reporting, and how seriously.
fn judge(verdict: &Verdict) -> Vec<(Severity, String, String)> {
    let mut found = Vec::new();
    // A policy that selects no pod yet is accepted, and worth a note offline, where
    // manifests rarely hold the pods.
    if !verdict.accepted || verdict.reason == Reason::NoMatchingPods {
        found.push((
            severity(verdict.reason),
            verdict.reason.to_string(),
            verdict.message.clone(),
        ));
    }
    if let Some(references) = verdict.references.as_ref().filter(|refs| !refs.resolved) {
        found.push((
            severity(references.reason),
            references.reason.to_string(),
            references.message.clone(),
        ));
    }
    for caution in &verdict.cautions {
        found.push((Severity::Warning, "Caution".to_owned(), caution.clone()));
    }
    for parent in &verdict.refused_parents {
        found.push((
            Severity::Warning,
            parent.reason.to_string(),
            format!("spec.parentRefs[{}]: {}", parent.index, parent.message),
        ));
    }
    found
}

fn severity(reason: Reason) -> Severity {
    match reason {
        Reason::Invalid
        | Reason::Conflicted
        | Reason::UnsupportedValue
        | Reason::RefNotPermitted => Severity::Error,
        Reason::NoMatchingPods => Severity::Info,
        _ => Severity::Warning,
    }
}

impl Report for Analysis {
    fn table(&self) -> String {
        if self.findings.is_empty() {
            return format!(
                "{} file(s): weft applies every object as written\n",
                self.files.len()
            );
        }
        let rows: Vec<Vec<String>> = self
            .findings
            .iter()
            .map(|finding| {
                vec![
                    format!("{:?}", finding.severity).to_lowercase(),
                    finding.file.display().to_string(),
                    finding.object.clone().unwrap_or_else(|| "-".into()),
                    finding.reason.clone(),
                    finding.message.clone(),
                ]
            })
            .collect();
        let errors = self
            .findings
            .iter()
            .filter(|finding| finding.severity == Severity::Error)
            .count();
        table(&["SEVERITY", "FILE", "OBJECT", "REASON", "MESSAGE"], &rows)
            + &format!("{errors} error(s) in {} file(s)\n", self.files.len())
    }

    fn passed(&self) -> bool {
        self.findings
            .iter()
            .all(|finding| finding.severity != Severity::Error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.10, selector: { app: web }, ports: [{ name: http, port: 80 }] }
"#;

    const POLICIES: &str = r#"
# Istio's nesting: would allow everything; refused.
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: from-istio, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  rules: [{ from: [{ source: { principals: ["cluster.local/ns/shop/sa/client"] } }] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: readers, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  rules: [{ from: [{ principals: ["cluster.local/ns/shop/sa/client"] }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: split, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules: [{ backendRefs: [{ name: web-v2, port: 80 }] }]
---
# Matches what split matches, and split is older (earlier in the files).
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: split-again, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules: [{ matches: [{ path: { type: PathPrefix, value: / } }], backendRefs: [{ name: web, port: 80 }] }]
"#;

    fn analysis(files: &[(&str, &str)]) -> Analysis {
        let inputs: Vec<(PathBuf, String)> = files
            .iter()
            .map(|(path, text)| (PathBuf::from(path), (*text).to_owned()))
            .collect();
        analyze(&inputs)
    }

    fn summary(analysis: &Analysis) -> Vec<(Severity, &str, Option<&str>, &str)> {
        analysis
            .findings
            .iter()
            .map(|f| {
                (
                    f.severity,
                    f.file.to_str().unwrap(),
                    f.object.as_deref(),
                    f.reason.as_str(),
                )
            })
            .collect()
    }

    #[test]
    fn each_object_weft_would_not_apply_is_found_in_its_file() {
        let analysis = analysis(&[("app.yaml", APP), ("policies.yaml", POLICIES)]);
        assert_eq!(
            summary(&analysis),
            [
                (
                    Severity::Error,
                    "policies.yaml",
                    Some("AuthorizationPolicy shop/from-istio"),
                    "Invalid"
                ),
                (
                    Severity::Warning,
                    "policies.yaml",
                    Some("HTTPRoute shop/split"),
                    "BackendNotFound"
                ),
                (
                    Severity::Warning,
                    "policies.yaml",
                    Some("HTTPRoute shop/split-again"),
                    "Shadowed"
                ),
                (
                    Severity::Info,
                    "policies.yaml",
                    Some("AuthorizationPolicy shop/readers"),
                    "NoMatchingPods"
                ),
            ]
        );
        let shadowed = &analysis.findings[2].message;
        assert!(
            shadowed.starts_with("rule 0 never takes a request to Service shop/web port 80: rule 0 of HTTPRoute/shop/split"),
            "{shadowed}"
        );
        let invalid = &analysis.findings[0].message;
        assert!(
            invalid.contains("spec.rules[0].from[0]") && invalid.contains("source:"),
            "{invalid}"
        );
        assert!(!analysis.passed());
        let table = analysis.table();
        assert!(table.ends_with("1 error(s) in 2 file(s)\n"), "{table}");
    }

    #[test]
    fn http_conditions_on_a_tcp_port_are_a_caution() {
        let db = r#"
apiVersion: v1
kind: Service
metadata: { name: db, namespace: shop }
spec: { clusterIP: 10.96.0.11, selector: { app: db }, ports: [{ name: tcp-postgres, port: 5432 }] }
---
apiVersion: v1
kind: Pod
metadata: { name: db-0, namespace: shop, labels: { app: db } }
spec: { nodeName: node0, serviceAccountName: db, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.0.9 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: db-abc, namespace: shop, labels: { kubernetes.io/service-name: db } }
addressType: IPv4
ports: [{ name: tcp-postgres, port: 5432 }]
endpoints: [{ addresses: [10.244.0.9] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: no-admin, namespace: shop }
spec:
  selector: { matchLabels: { app: db } }
  action: DENY
  rules: [{ to: [{ paths: ["/admin*"] }] }]
"#;
        let analysis = analysis(&[("app.yaml", APP), ("db.yaml", db)]);
        assert_eq!(
            summary(&analysis),
            [(
                Severity::Warning,
                "db.yaml",
                Some("AuthorizationPolicy shop/no-admin"),
                "Caution"
            )]
        );
        assert!(
            analysis.findings[0]
                .message
                .contains("spec.rules[0] has HTTP conditions and reaches ports declared TCP (shop/db:5432): it denies every connection there"),
            "{analysis:?}"
        );
        assert!(analysis.passed());
    }

    #[test]
    fn good_manifests_pass_and_broken_files_are_errors() {
        let good = analysis(&[("app.yaml", APP)]);
        assert!(good.passed() && good.findings.is_empty(), "{good:?}");
        assert!(good.table().contains("applies every object as written"));
        let broken = analysis(&[
            ("app.yaml", APP),
            ("typo.yaml", "kind: Service\nmetadata: ["),
        ]);
        assert_eq!(
            summary(&broken),
            [(Severity::Error, "typo.yaml", None, "Unreadable")]
        );
        assert!(
            broken.findings[0].message.starts_with("typo.yaml:"),
            "{broken:?}"
        );
        assert!(!broken.passed());
    }
}
