//! Runs the chained CNI plugin (`weft-cni`) for a pod exactly as a container runtime
//! does: `CNI_*` environment, the network configuration on stdin with the primary
//! plugin's result as `prevResult` — which here describes the veth pair and address
//! the cluster itself set up, playing the primary plugin.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::json;

use crate::{ClusterError, NodeInfo, PodInfo};

/// The plugin's binary name in the CNI bin directory.
pub const PLUGIN: &str = "weft-cni";

/// `CNI_CONTAINERID` of a pod: its network namespace's name, unique on the machine.
pub fn container_id(pod: &PodInfo) -> &str {
    &pod.netns
}

/// Runs `command` (ADD, DEL or CHECK) for `pod` on `node`.
pub fn invoke(
    bin_dir: &Path,
    command: &str,
    node: &NodeInfo,
    pod: &PodInfo,
) -> Result<(), ClusterError> {
    let config = json!({
        "cniVersion": "1.0.0",
        "name": "weft-local",
        "type": PLUGIN,
        "agentSocket": node.agent_socket,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [
                { "name": pod.host_veth },
                { "name": "eth0", "sandbox": netns_path(pod) },
            ],
            "ips": [{
                "address": format!("{}/32", pod.ip),
                "gateway": node.pod_gateway.to_string(),
                "interface": 1,
            }],
            "routes": [{ "dst": "0.0.0.0/0", "gw": node.pod_gateway.to_string() }],
        },
    });
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
        pod.namespace,
        pod.name,
        container_id(pod)
    );
    let plugin = bin_dir.join(PLUGIN);
    let described = format!("CNI {command} of pod {}/{}", pod.namespace, pod.name);
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id(pod))
        .env("CNI_NETNS", netns_path(pod))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", bin_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ClusterError::Spawn {
            command: plugin.display().to_string(),
            source,
        })?;
    // Written and closed before waiting, so the plugin sees the end of its input.
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let write = stdin.write_all(config.to_string().as_bytes());
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(ClusterError::io(&plugin))?;
    write.map_err(ClusterError::io(&plugin))?;
    if output.status.success() {
        return Ok(());
    }
    // The spec's error shape: {"cniVersion", "code", "msg", "details"}.
    let error: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_default();
    Err(ClusterError::Cni {
        what: described,
        code: error["code"].as_u64().unwrap_or(0),
        message: error["msg"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(&output.stderr).trim().to_owned()),
    })
}

fn netns_path(pod: &PodInfo) -> String {
    format!("/run/netns/{}", pod.netns)
}
