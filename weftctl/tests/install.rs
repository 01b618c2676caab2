//! `weftctl install --set …` makes the same objects as kubectl kustomize makes from
//! `deploy/base` with the matching component of `deploy/components`, so the two ways of
//! installing cannot drift apart.

use std::{collections::BTreeMap, path::Path, process::Command};

use serde::Deserialize as _;
use serde_yaml::Value;

/// Each component, and the `--set` options that make the same change.
const EQUIVALENTS: &[(&str, &[&str])] = &[
    (
        "busy-nodes",
        &["agentCPURequest=1", "agentMemoryRequest=128Mi"],
    ),
    ("cert-ttl", &["certTTL=6h"]),
    ("debug-logs", &["logLevel=debug"]),
    (
        "otlp",
        &["otlpEndpoint=http://otel-collector.observability.svc:4317"],
    ),
    ("prometheus-annotations", &["metrics=annotations"]),
    ("single-controller", &["controllerReplicas=1"]),
    ("trust-domain", &["trustDomain=example.org"]),
];

/// Objects by kind, namespace and name.
fn objects(text: &str) -> BTreeMap<(String, String, String), Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|document| Value::deserialize(document).expect("YAML"))
        .filter(|object| !object.is_null())
        .map(|object| {
            let text = |value: &Value| value.as_str().unwrap_or_default().to_owned();
            let key = (
                text(&object["kind"]),
                text(&object["metadata"]["namespace"]),
                text(&object["metadata"]["name"]),
            );
            (key, object)
        })
        .collect()
}

/// `kubectl kustomize` of the base with `component`.
fn kustomize(component: &str) -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // kustomize takes relative paths only: up to the root and down into the workspace.
    let up = "../".repeat(dir.path().components().count() - 1);
    let inside = workspace.strip_prefix("/").unwrap().display();
    std::fs::write(
        dir.path().join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources: [{up}{inside}/deploy/base]\n\
             components: [{up}{inside}/deploy/components/{component}]\n"
        ),
    )
    .unwrap();
    let output = Command::new("kubectl")
        .args(["kustomize", "--load-restrictor", "LoadRestrictionsNone"])
        .arg(dir.path())
        .output()
        .expect("kubectl runs (these machines have it)");
    assert!(
        output.status.success(),
        "{component}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn each_setting_makes_what_its_component_makes() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut components: Vec<String> = std::fs::read_dir(workspace.join("deploy/components"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    components.sort();
    let named: Vec<&str> = EQUIVALENTS.iter().map(|(name, _)| *name).collect();
    assert_eq!(
        components, named,
        "every component needs its --set equivalent here"
    );
    for (component, settings) in EQUIVALENTS {
        let mut command = Command::new(env!("CARGO_BIN_EXE_weftctl"));
        command.arg("install");
        for setting in *settings {
            command.args(["--set", setting]);
        }
        let output = command.output().unwrap();
        assert!(output.status.success(), "{component}: {output:?}");
        let ours = objects(&String::from_utf8(output.stdout).unwrap());
        let theirs = objects(&kustomize(component));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{component}"
        );
        for (key, object) in &theirs {
            assert_eq!(&ours[key], object, "{component}: {key:?}");
        }
    }
}
