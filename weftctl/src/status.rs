//! `weftctl status`: the mesh on one screen.

use std::collections::BTreeMap;

use serde::Serialize;
use weft_api::observe::Event;

use crate::{
    mesh::Snapshot,
    observe,
    output::{Report, age, table},
};

/// Certificates expiring sooner than this are listed.
const EXPIRING_SECONDS: i64 = 3_600;
/// How many of the newest kernel drops are listed.
pub const RECENT_DROPS: usize = 5;

#[derive(Debug, Serialize)]
pub struct Status {
    /// The controller's configuration generation; none when it does not answer.
    pub controller_generation: Option<u64>,
    /// Why the controller could not be read, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub controller_error: Option<String>,
    pub nodes: Vec<NodeLine>,
    /// Meshed pods per namespace and mode.
    pub namespaces: Vec<NamespaceLine>,
    /// Certificates with less than an hour left.
    pub expiring_certificates: Vec<Expiring>,
    /// The newest kernel drops of every node, oldest first, as `observe` shows them.
    pub recent_drops: Vec<Event>,
}

#[derive(Debug, Serialize)]
pub struct NodeLine {
    pub node: String,
    /// `ready`, or what the agent answered instead.
    pub agent: String,
    /// The version of the configuration the agent applied last.
    pub config_version: Option<String>,
    /// Whether that is the node's current view at the controller.
    pub in_sync: Option<bool>,
    pub pods: usize,
    pub certificates: usize,
    /// Packets and connections the kernel dropped since the agent started, by reason.
    pub kernel_drops: BTreeMap<String, u64>,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct NamespaceLine {
    pub namespace: String,
    pub mode: String,
    pub pods: usize,
}

#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Expiring {
    pub node: String,
    pub identity: String,
    pub expires_in_seconds: i64,
}

/// The status of `snapshot`'s mesh, with `drops`, the kernel drops the agents keep
/// (oldest first), of which the newest are listed.
pub fn of(snapshot: &Snapshot, drops: &[Event]) -> Status {
    let now = snapshot.unix_now();
    let mut namespaces: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut expiring = Vec::new();
    let nodes = snapshot
        .nodes
        .iter()
        .map(|node| {
            let pods = node.pods();
            for (namespace, _, mode) in &pods {
                *namespaces
                    .entry((namespace.clone(), mode.clone()))
                    .or_default() += 1;
            }
            let certs = node.certs.as_deref().unwrap_or_default();
            for cert in certs {
                let left = i64::try_from(cert.not_after).unwrap_or(i64::MAX) - now;
                if left < EXPIRING_SECONDS {
                    expiring.push(Expiring {
                        node: node.name.clone(),
                        identity: cert.identity.clone(),
                        expires_in_seconds: left,
                    });
                }
            }
            let state = snapshot
                .controller
                .as_ref()
                .ok()
                .and_then(|status| status.nodes.get(&node.name));
            NodeLine {
                node: node.name.clone(),
                agent: match &node.ready {
                    Ok(()) => "ready".to_owned(),
                    Err(answer) => answer.clone(),
                },
                config_version: node
                    .dump
                    .as_ref()
                    .ok()
                    .and_then(|dump| dump["controller"]["version"].as_str())
                    .map(str::to_owned),
                in_sync: state.map(|state| state.in_sync && state.streams > 0),
                pods: pods.len(),
                certificates: certs.len(),
                kernel_drops: node.kernel_drops(),
            }
        })
        .collect();
    Status {
        controller_generation: snapshot.controller.as_ref().ok().map(|s| s.generation),
        controller_error: snapshot.controller.as_ref().err().cloned(),
        nodes,
        namespaces: namespaces
            .into_iter()
            .map(|((namespace, mode), pods)| NamespaceLine {
                namespace,
                mode,
                pods,
            })
            .collect(),
        expiring_certificates: expiring,
        recent_drops: drops[drops.len().saturating_sub(RECENT_DROPS)..].to_vec(),
    }
}

impl Report for Status {
    fn table(&self) -> String {
        let controller = match (&self.controller_generation, &self.controller_error) {
            (Some(generation), _) => format!("controller: generation {generation}\n\n"),
            (None, error) => format!(
                "controller: no answer ({})\n\n",
                error.as_deref().unwrap_or("?")
            ),
        };
        let yes_no = |value: Option<bool>| match value {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "?",
        };
        let nodes: Vec<Vec<String>> = self
            .nodes
            .iter()
            .map(|node| {
                let drops: Vec<String> = node
                    .kernel_drops
                    .iter()
                    .filter(|(_, count)| **count > 0)
                    .map(|(reason, count)| format!("{reason}={count}"))
                    .collect();
                vec![
                    node.node.clone(),
                    node.agent.clone(),
                    node.config_version.clone().unwrap_or_else(|| "-".into()),
                    yes_no(node.in_sync).to_owned(),
                    node.pods.to_string(),
                    node.certificates.to_string(),
                    if drops.is_empty() {
                        "0".into()
                    } else {
                        drops.join(",")
                    },
                ]
            })
            .collect();
        let namespaces: Vec<Vec<String>> = self
            .namespaces
            .iter()
            .map(|line| {
                vec![
                    line.namespace.clone(),
                    line.mode.clone(),
                    line.pods.to_string(),
                ]
            })
            .collect();
        let mut text = controller
            + &table(
                &[
                    "NODE",
                    "AGENT",
                    "CONFIG",
                    "IN SYNC",
                    "PODS",
                    "CERTS",
                    "KERNEL DROPS",
                ],
                &nodes,
            )
            + "\n"
            + &table(&["NAMESPACE", "MODE", "MESHED PODS"], &namespaces);
        if !self.expiring_certificates.is_empty() {
            let rows: Vec<Vec<String>> = self
                .expiring_certificates
                .iter()
                .map(|cert| {
                    vec![
                        cert.node.clone(),
                        cert.identity.clone(),
                        age(cert.expires_in_seconds),
                    ]
                })
                .collect();
            text += "\n";
            text += &table(&["NODE", "EXPIRING CERTIFICATE", "IN"], &rows);
        }
        if !self.recent_drops.is_empty() {
            text += "\nnewest kernel drops (weftctl observe --verdict drop for more)\n";
            text += &observe::header();
            for drop in &self.recent_drops {
                text += &observe::line(drop);
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::tests::{certificate, healthy};

    #[test]
    fn status_sums_up_nodes_namespaces_and_expiring_certificates() {
        let mut snapshot = healthy();
        snapshot.nodes[1].ready = Err("no answer".into());
        snapshot.nodes[1].certs = Ok(vec![
            serde_json::from_value(certificate("spiffe://b", 1_000_000 + 600)).unwrap(),
        ]);
        let drops: Vec<Event> = (1..=7)
            .map(|n| Event {
                time_unix_nanos: n,
                kind: "kernel".into(),
                verdict: "drop".into(),
                ..Event::default()
            })
            .collect();
        let status = of(&snapshot, &drops);
        let times: Vec<i64> = status
            .recent_drops
            .iter()
            .map(|d| d.time_unix_nanos)
            .collect();
        assert_eq!(times, [3, 4, 5, 6, 7]);
        assert!(status.table().contains("newest kernel drops"));
        assert!(of(&snapshot, &[]).recent_drops.is_empty());
        assert_eq!(status.controller_generation, Some(3));
        assert_eq!(status.nodes[0].agent, "ready");
        assert_eq!(status.nodes[0].in_sync, Some(true));
        assert_eq!(status.nodes[0].kernel_drops["strict"], 2);
        assert_eq!(status.nodes[1].agent, "no answer");
        assert_eq!(
            status.namespaces,
            [NamespaceLine {
                namespace: "shop".into(),
                mode: "STRICT".into(),
                pods: 1
            }]
        );
        assert_eq!(
            status.expiring_certificates,
            [Expiring {
                node: "node1".into(),
                identity: "spiffe://b".into(),
                expires_in_seconds: 600
            }]
        );
        let table = status.table();
        assert!(table.contains("node0  ready"), "{table}");
        assert!(table.contains("strict=2"), "{table}");
        assert!(table.contains("spiffe://b            10m0s"), "{table}");
    }
}
