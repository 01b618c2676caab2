//! `weftctl config`: the configuration a node's agent runs, kind by kind, and whether
//! it is the view the controller has for the node now.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::{
    mesh::Snapshot,
    output::{Report, table},
};

/// A kind of resource in a node's view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Kind {
    Namespaces,
    Nodes,
    Workloads,
    Services,
    Routes,
    Authorization,
    Traffic,
}

const KINDS: [Kind; 7] = [
    Kind::Namespaces,
    Kind::Nodes,
    Kind::Workloads,
    Kind::Services,
    Kind::Routes,
    Kind::Authorization,
    Kind::Traffic,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Namespaces => "namespaces",
            Self::Nodes => "nodes",
            Self::Workloads => "workloads",
            Self::Services => "services",
            Self::Routes => "routes",
            Self::Authorization => "authorization",
            Self::Traffic => "traffic",
        }
    }

    /// Where the kind is in the agent's `/config_dump`.
    fn pointer(self) -> &'static str {
        match self {
            Self::Namespaces => "/mesh/namespaces",
            Self::Nodes => "/mesh/nodes",
            Self::Workloads => "/mesh/workloads",
            Self::Services => "/mesh/services",
            Self::Routes => "/policies/routes",
            Self::Authorization => "/policies/authorization",
            Self::Traffic => "/policies/traffic",
        }
    }

    /// The columns of the kind's table, each a pointer into one resource.
    fn columns(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Namespaces => &[("NAME", "/name"), ("MODE", "/mode")],
            Self::Nodes => &[("NAME", "/name"), ("ADDRESS", "/address")],
            Self::Workloads => &[
                ("NAMESPACE", "/namespace"),
                ("NAME", "/name"),
                ("IP", "/ip"),
                ("NODE", "/node"),
                ("MODE", "/mode"),
                ("SERVICE ACCOUNT", "/serviceAccount"),
            ],
            Self::Services => &[
                ("NAMESPACE", "/namespace"),
                ("NAME", "/name"),
                ("VIP", "/vip"),
                ("PORTS", "/ports"),
                ("ENDPOINTS", "/endpoints"),
            ],
            Self::Routes | Self::Traffic => &[("RULES", "/rules")],
            Self::Authorization => &[
                ("ACTION", "/action"),
                ("WORKLOADS", "/workloads"),
                ("RULES", "/rules"),
            ],
        }
    }
}

#[derive(Debug, Serialize)]
pub struct NodeConfig {
    pub node: String,
    /// The version the agent applied last.
    pub applied_version: Option<String>,
    /// The version of the node's view at the controller now.
    pub current_version: Option<String>,
    pub in_sync: Option<bool>,
    /// The view, by kind (`workloads`, `routes`, …): the agent's own JSON.
    pub resources: BTreeMap<String, Value>,
}

/// What `node` runs, of `kinds` (every kind when empty).
pub fn of(snapshot: &Snapshot, node: &str, kinds: &[Kind]) -> anyhow::Result<NodeConfig> {
    let each = snapshot.node(node)?;
    let dump = each.dump.as_ref().map_err(|err| {
        anyhow::anyhow!("the agent on {node} does not answer /config_dump: {err}")
    })?;
    let kinds = if kinds.is_empty() { &KINDS[..] } else { kinds };
    let state = snapshot
        .controller
        .as_ref()
        .ok()
        .and_then(|status| status.nodes.get(node));
    Ok(NodeConfig {
        node: node.to_owned(),
        applied_version: dump["controller"]["version"].as_str().map(str::to_owned),
        current_version: state.map(|state| state.version.clone()),
        in_sync: state.map(|state| state.in_sync),
        resources: kinds
            .iter()
            .map(|kind| {
                let value = dump.pointer(kind.pointer()).cloned().unwrap_or(Value::Null);
                (kind.name().to_owned(), value)
            })
            .collect(),
    })
}

impl Report for NodeConfig {
    fn table(&self) -> String {
        let version = |version: &Option<String>| version.clone().unwrap_or_else(|| "?".into());
        let mut text = format!(
            "node {}: applied {}, the controller's is {}{}\n",
            self.node,
            version(&self.applied_version),
            version(&self.current_version),
            match self.in_sync {
                Some(true) => " (in sync)",
                Some(false) => " (NOT in sync)",
                None => "",
            }
        );
        for kind in KINDS {
            let Some(value) = self.resources.get(kind.name()) else {
                continue;
            };
            // Lists are shown as they are; maps by their keys (`namespace/name`).
            let entries: Vec<(Option<&str>, &Value)> = match value {
                Value::Array(items) => items.iter().map(|item| (None, item)).collect(),
                Value::Object(map) => map
                    .iter()
                    .map(|(key, item)| (Some(key.as_str()), item))
                    .collect(),
                _ => Vec::new(),
            };
            let keyed = matches!(value, Value::Object(_));
            let mut header: Vec<&str> = Vec::new();
            if keyed {
                header.push("KEY");
            }
            header.extend(kind.columns().iter().map(|(name, _)| *name));
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|(key, item)| {
                    let mut row: Vec<String> = key.iter().map(|key| (*key).to_owned()).collect();
                    row.extend(
                        kind.columns()
                            .iter()
                            .map(|(_, pointer)| cell(item.pointer(pointer))),
                    );
                    row
                })
                .collect();
            text += &format!("\n{} ({})\n", kind.name(), entries.len());
            text += &table(&header, &rows);
        }
        text
    }
}

/// A value in one table cell: strings as they are, lists by their length unless they
/// are short lists of strings.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(items)) if items.len() <= 3 && items.iter().all(Value::is_string) => {
            items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        }
        Some(Value::Array(items)) => items.len().to_string(),
        Some(other) => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mesh::tests::healthy;

    #[test]
    fn a_nodes_view_by_kind_against_the_controllers_version() {
        let mut snapshot = healthy();
        snapshot.nodes[0].dump = Ok(json!({
            "controller": { "version": "v0" },
            "mesh": {
                "workloads": [{"namespace": "shop", "name": "web-1", "ip": "10.244.0.2", "node": "node0", "mode": "STRICT", "serviceAccount": "web"}],
                "services": [{"namespace": "shop", "name": "web", "vip": "10.96.0.1", "ports": [{"port": 80}], "endpoints": ["10.244.0.2"]}],
            },
            "policies": { "routes": { "shop/web:80": { "rules": [{}, {}] } } },
        }));
        let config = of(&snapshot, "node0", &[]).unwrap();
        assert_eq!(config.applied_version.as_deref(), Some("v0"));
        assert_eq!(config.in_sync, Some(true));
        assert_eq!(config.resources.len(), KINDS.len());
        let table = config.table();
        assert!(
            table.contains("applied v0, the controller's is v0 (in sync)"),
            "{table}"
        );
        assert!(
            table.contains("shop       web-1  10.244.0.2  node0  STRICT  web"),
            "{table}"
        );
        assert!(table.contains("shop/web:80  2"), "{table}");

        let only = of(&snapshot, "node0", &[Kind::Routes]).unwrap();
        assert_eq!(only.resources.keys().collect::<Vec<_>>(), ["routes"]);
        snapshot.nodes[0].dump = Err("no answer".into());
        assert!(of(&snapshot, "node0", &[]).is_err());
    }
}
