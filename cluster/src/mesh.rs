//! The mesh configuration the cluster writes for its agents, derived the way
//! Kubernetes would derive it: nodes and workloads from the topology, each service's
//! endpoints from its label selector. The user supplies the rest (meshed namespaces
//! and their modes, services with selectors, excluded ports) as a template.
//!
//! The file is JSON, which the agents read as the YAML it also is.

use serde_json::{Value, json};

use crate::{ClusterError, Topology};

/// The trust domain of the local cluster's identities.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Renders `template` for `topology` as revision `revision`.
pub fn render(template: &Value, topology: &Topology, revision: u64) -> Result<Value, ClusterError> {
    let invalid = |problem: String| ClusterError::MeshTemplate(problem);
    let Some(user) = template.as_object() else {
        return Err(invalid("the template must be a mapping".to_owned()));
    };
    for generated in ["nodes", "workloads", "revision"] {
        if user.contains_key(generated) {
            return Err(invalid(format!(
                "{generated} is derived from the cluster; leave it out of the template"
            )));
        }
    }
    let mut rendered = user.clone();
    rendered.insert("revision".into(), json!(revision));
    rendered.insert("trustDomain".into(), json!(TRUST_DOMAIN));
    rendered.insert(
        "nodes".into(),
        topology
            .nodes
            .iter()
            .map(|node| json!({ "name": node.name, "address": node.ip }))
            .collect(),
    );
    rendered.insert(
        "workloads".into(),
        topology
            .pods
            .iter()
            .map(|pod| {
                json!({
                    "name": pod.name,
                    "namespace": pod.namespace,
                    "serviceAccount": pod.service_account,
                    "node": pod.node,
                    "ip": pod.ip,
                    "labels": pod.labels,
                })
            })
            .collect(),
    );
    if let Some(services) = rendered.get_mut("services") {
        let services = services
            .as_array_mut()
            .ok_or_else(|| invalid("services must be a list".to_owned()))?;
        for (index, service) in services.iter_mut().enumerate() {
            let service = service
                .as_object_mut()
                .ok_or_else(|| invalid(format!("services[{index}] must be a mapping")))?;
            let Some(selector) = service.remove("selector") else {
                continue;
            };
            let selector = selector
                .as_object()
                .ok_or_else(|| invalid(format!("services[{index}].selector must be a mapping")))?;
            let namespace = service
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("default");
            let endpoints: Vec<Value> = topology
                .pods
                .iter()
                .filter(|pod| pod.namespace == namespace)
                .filter(|pod| {
                    selector.iter().all(|(key, value)| {
                        value.as_str() == pod.labels.get(key).map(String::as_str)
                    })
                })
                .map(|pod| json!(pod.ip))
                .collect();
            service.insert("endpoints".into(), Value::Array(endpoints));
        }
    }
    Ok(Value::Object(rendered))
}
