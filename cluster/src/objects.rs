//! The Kubernetes objects the cluster itself would hold: a `Node` per node (with its
//! fabric address, where its agent takes HBONE) and a `Pod` per pod (namespace, name,
//! labels, annotations, service account, node, address, running and ready). The
//! cluster writes them to one file that the controller reads beside the user's
//! manifests, as a controller would watch the API server.

use serde_json::{Value, json};

use crate::Topology;

/// The trust domain of the local cluster's identities.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The cluster's nodes and pods as a Kubernetes `List`.
pub fn render(topology: &Topology) -> Value {
    let nodes = topology.nodes.iter().map(|node| {
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": node.name },
            "status": { "addresses": [{ "type": "InternalIP", "address": node.ip }] },
        })
    });
    let pods = topology.pods.iter().map(|pod| {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "labels": pod.labels,
                "annotations": pod.annotations,
            },
            "spec": {
                "nodeName": pod.node,
                "serviceAccountName": pod.service_account,
                "containers": [{ "name": "main", "image": "local" }],
            },
            "status": {
                "phase": "Running",
                "podIP": pod.ip,
                "podIPs": [{ "ip": pod.ip }],
                "conditions": [{ "type": "Ready", "status": "True" }],
            },
        })
    });
    json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": nodes.chain(pods).collect::<Vec<_>>(),
    })
}
