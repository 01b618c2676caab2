//! Runs a node's CNI plugins for a pod as a container runtime does (libcni's rules):
//! the first network configuration of the node's directory, its plugins in order for
//! ADD and CHECK and in reverse for DEL, each given the result before it as
//! `prevResult`. The cluster plays the list's first plugin ([`PRIMARY`]) itself — it
//! has set up the veth pair and address — and runs the plugins chained after it from
//! the node's plugin directory: weft-cni, once the node's agent has chained it.

use std::{
    io::Write as _,
    path::Path,
    process::{Command, Stdio},
};

use serde_json::{Value, json};

use crate::{ClusterError, NodeInfo, PodInfo};

/// The plugin's binary name in the CNI bin directory.
pub const PLUGIN: &str = "weft-cni";

/// The `type` of the list's first plugin, which the cluster plays.
pub const PRIMARY: &str = "weft-local";

/// Writes the node's network configuration as a primary CNI installs it: a list of
/// the primary plugin alone.
pub fn write_primary(conf_dir: &Path) -> Result<(), ClusterError> {
    crate::host::create_dir(conf_dir)?;
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "weft-local",
        "plugins": [{ "type": PRIMARY }],
    });
    let path = conf_dir.join("10-weft-local.conflist");
    std::fs::write(&path, format!("{list:#}\n")).map_err(ClusterError::io(&path))
}

/// `CNI_CONTAINERID` of a pod: its network namespace's name, unique on the machine.
pub fn container_id(pod: &PodInfo) -> &str {
    &pod.netns
}

/// Runs `command` (ADD, DEL or CHECK) for `pod` on `node`: the plugins chained after
/// the primary in the node's network configuration.
pub fn invoke(command: &str, node: &NodeInfo, pod: &PodInfo) -> Result<(), ClusterError> {
    let (list, mut chained) = configuration(node)?;
    if command == "DEL" {
        chained.reverse();
    }
    let mut result = primary_result(node, pod);
    for plugin in &chained {
        let mut config = plugin.clone();
        config["cniVersion"] = list["cniVersion"].clone();
        config["name"] = list["name"].clone();
        config["prevResult"] = result.clone();
        let output = run_plugin(command, node, pod, &config)?;
        // ADD's result is the next plugin's prevResult (weft-cni passes it through).
        if command == "ADD"
            && let Ok(next) = serde_json::from_str::<Value>(&output)
        {
            result = next;
        }
    }
    Ok(())
}

/// The node's network configuration (the first file, by name) and the plugins chained
/// after its primary.
fn configuration(node: &NodeInfo) -> Result<(Value, Vec<Value>), ClusterError> {
    let bad = |problem: String| ClusterError::CniConfiguration {
        dir: node.cni_conf_dir.clone(),
        problem,
    };
    let path =
        weft_cni::install::primary(&node.cni_conf_dir).map_err(|err| bad(err.to_string()))?;
    let text = std::fs::read_to_string(&path).map_err(ClusterError::io(&path))?;
    let list: Value =
        serde_json::from_str(&text).map_err(|err| bad(format!("{}: {err}", path.display())))?;
    let plugins = list["plugins"].as_array().cloned().unwrap_or_default();
    match plugins.first().and_then(|plugin| plugin["type"].as_str()) {
        Some(PRIMARY) => Ok((list, plugins[1..].to_vec())),
        other => Err(bad(format!(
            "{}: its first plugin is {other:?}, not the cluster's {PRIMARY:?}",
            path.display()
        ))),
    }
}

/// What the primary plugin (the cluster) set up for `pod`: its veth pair and address.
fn primary_result(node: &NodeInfo, pod: &PodInfo) -> Value {
    json!({
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
    })
}

/// Runs one plugin from the node's plugin directory; its stdout when it succeeds.
fn run_plugin(
    command: &str,
    node: &NodeInfo,
    pod: &PodInfo,
    config: &Value,
) -> Result<String, ClusterError> {
    let kind = config["type"].as_str().unwrap_or_default();
    let args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
        pod.namespace,
        pod.name,
        container_id(pod)
    );
    let plugin = node.cni_plugin_dir.join(kind);
    let described = format!("CNI {command} of pod {}/{}", pod.namespace, pod.name);
    let mut child = Command::new(&plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id(pod))
        .env("CNI_NETNS", netns_path(pod))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", &node.cni_plugin_dir)
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
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
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
