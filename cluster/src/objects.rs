//! The Kubernetes objects the cluster itself would hold: a `Node` per node (with its
//! fabric address, where its agent takes HBONE, its zone and annotations) and a `Pod` per pod (namespace, name,
//! labels, annotations, service account, node, address, running and ready). The
//! cluster writes them to one file that the controller reads beside the user's
//! manifests, as a controller would watch the API server.

use serde_json::{Map, Value, json};
use weft_api::ZONE_LABEL;

use crate::{NodeInfo, Topology};

/// The trust domain of the local cluster's identities.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// The cluster's nodes and pods as a Kubernetes `List`.
pub fn render(topology: &Topology) -> Value {
    let nodes = topology.nodes.iter().map(node);
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

fn node(node: &NodeInfo) -> Value {
    let labels: Map<String, Value> = node
        .zone
        .iter()
        .map(|zone| (ZONE_LABEL.to_owned(), zone.as_str().into()))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": node.name, "labels": labels, "annotations": node.annotations },
        "status": { "addresses": [{ "type": "InternalIP", "address": node.ip }] },
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn nodes_carry_their_zone_label_and_annotations() {
        let mut info = NodeInfo {
            name: "node1".into(),
            netns: "weft-a-node1".into(),
            ip: Ipv4Addr::new(10, 99, 0, 2),
            zone: None,
            annotations: Default::default(),
            pod_cidr: "10.244.1.0/24".into(),
            pod_gateway: Ipv4Addr::new(10, 244, 1, 1),
            cgroup: "/cg/weft-a/node1".into(),
            pods_cgroup: "/cg/weft-a/node1/kubepods.slice".into(),
            system_cgroup: "/cg/weft-a/node1/system".into(),
            bpffs: "/sys/fs/bpf/weft-a/node1".into(),
            run_dir: "/run/weft/a/node1".into(),
            agent_socket: "/run/weft/a/node1/cni.sock".into(),
            cni_conf_dir: "/run/weft/a/node1/cni/net.d".into(),
            cni_plugin_dir: "/run/weft/a/node1/cni/bin".into(),
            agent_state_dir: "/run/weft/a/node1/agent".into(),
            flow_log: "/run/weft/a/node1/flows.jsonl".into(),
            agent: None,
        };
        assert_eq!(
            node(&info)["metadata"],
            json!({ "name": "node1", "labels": {}, "annotations": {} })
        );
        info.zone = Some("zone-b".into());
        info.annotations
            .insert("weft.dev/hbone-address".into(), "pod".into());
        assert_eq!(
            node(&info),
            json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": "node1",
                    "labels": { "topology.kubernetes.io/zone": "zone-b" },
                    "annotations": { "weft.dev/hbone-address": "pod" },
                },
                "status": { "addresses": [{ "type": "InternalIP", "address": "10.99.0.2" }] },
            })
        );
    }
}
