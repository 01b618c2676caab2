//! Enrollment: how the CNI plugin tells the node agent about pods.
//!
//! The plugin connects to the agent's Unix socket, writes one [`Request`] as a line of
//! JSON, reads one [`Reply`] line, and closes. The agent decides whether a pod is in the
//! mesh; the plugin only reports what the runtime and the primary CNI plugin set up.

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Where the agent listens on a Kubernetes node, unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/run/weft/cni.sock";

/// What the plugin asks of the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// A pod's network is up (CNI ADD): enroll it if its namespace is meshed.
    Add(Pod),
    /// A pod is going away (CNI DEL): forget it. Idempotent.
    Del { container_id: String },
    /// Is the pod still enrolled as the agent last said (CNI CHECK)?
    Check { container_id: String },
}

/// A pod as the runtime and the primary CNI plugin describe it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    /// `CNI_CONTAINERID`: the pod sandbox's id, the key of every later request.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns: PathBuf,
    /// `CNI_IFNAME`: the pod's interface inside its namespace.
    pub ifname: String,
    /// The pod's veth end in the node's namespace (from `prevResult.interfaces`).
    pub host_interface: String,
    /// The pod's addresses (from `prevResult.ips`).
    pub ips: Vec<IpAddr>,
    /// The gateways of those addresses: the node's side, the source of its health probes.
    pub gateways: Vec<IpAddr>,
    /// `K8S_POD_NAME` from `CNI_ARGS`.
    pub name: String,
    /// `K8S_POD_NAMESPACE` from `CNI_ARGS`.
    pub namespace: String,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Reply {
    /// Done. `meshed` says whether the pod is (still) in the mesh.
    Ok { meshed: bool },
    /// The agent could not do it. `retry` is true when trying again later may succeed.
    Error { message: String, retry: bool },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_one_line_of_tagged_json() {
        let del = Request::Del {
            container_id: "abc".into(),
        };
        let line = serde_json::to_string(&del).unwrap();
        assert_eq!(line, r#"{"op":"del","container_id":"abc"}"#);
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), del);
        let reply: Reply = serde_json::from_str(r#"{"status":"ok","meshed":true}"#).unwrap();
        assert_eq!(reply, Reply::Ok { meshed: true });
    }
}
