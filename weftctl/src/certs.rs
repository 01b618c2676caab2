//! `weftctl certs`: the workload certificates each node holds, and the CA's roots.

use serde::Serialize;
use weft_controller::ca::runtime::CaStatus;

use crate::{
    mesh::Snapshot,
    output::{Report, age, table},
};

#[derive(Debug, Serialize)]
pub struct Certs {
    pub nodes: Vec<NodeCerts>,
    /// The CA's roots and rotation state; none when the controller does not answer.
    pub ca: Option<CaStatus>,
}

#[derive(Debug, Serialize)]
pub struct NodeCerts {
    pub node: String,
    pub certificates: Vec<CertLine>,
    /// Why the node's certificates could not be read, if they could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CertLine {
    pub identity: String,
    pub serial: String,
    pub issuer: String,
    /// Seconds since the Unix epoch.
    pub not_after: u64,
    pub expires_in_seconds: i64,
}

/// Every node's certificates, or only `node`'s.
pub fn of(snapshot: &Snapshot, node: Option<&str>) -> anyhow::Result<Certs> {
    if let Some(node) = node {
        snapshot.node(node)?;
    }
    let now = snapshot.unix_now();
    let nodes = snapshot
        .nodes
        .iter()
        .filter(|each| node.is_none_or(|name| each.name == name))
        .map(|each| NodeCerts {
            node: each.name.clone(),
            certificates: each
                .certs
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|cert| CertLine {
                    identity: cert.identity.clone(),
                    serial: cert.serial.clone(),
                    issuer: cert.issuer.clone(),
                    not_after: cert.not_after,
                    expires_in_seconds: i64::try_from(cert.not_after).unwrap_or(i64::MAX) - now,
                })
                .collect(),
            error: each.certs.as_ref().err().cloned(),
        })
        .collect();
    let ca = snapshot
        .controller
        .as_ref()
        .ok()
        .and_then(|status| status.ca.clone());
    Ok(Certs { nodes, ca })
}

impl Report for Certs {
    fn table(&self) -> String {
        let mut rows = Vec::new();
        for node in &self.nodes {
            if let Some(error) = &node.error {
                rows.push(vec![node.node.clone(), format!("unreadable: {error}")]);
            }
            for cert in &node.certificates {
                rows.push(vec![
                    node.node.clone(),
                    cert.identity.clone(),
                    cert.serial.clone(),
                    age(cert.expires_in_seconds),
                    cert.issuer.clone(),
                ]);
            }
        }
        let mut text = table(
            &["NODE", "IDENTITY", "SERIAL", "EXPIRES IN", "ISSUER"],
            &rows,
        );
        if let Some(ca) = &self.ca {
            text += &format!(
                "\nCA ({}): signs under {}{}\n",
                ca.store,
                ca.signing_root,
                if ca.propagating {
                    "; a new root is propagating"
                } else {
                    ""
                }
            );
            let anchors: Vec<Vec<String>> = ca
                .anchors
                .iter()
                .map(|anchor| {
                    vec![
                        anchor.subject.clone(),
                        anchor.not_after.to_string(),
                        anchor
                            .retire_at
                            .map_or_else(|| "-".to_owned(), |at| at.to_string()),
                    ]
                })
                .collect();
            text += &table(&["ROOT", "NOT AFTER", "RETIRES AT"], &anchors);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::tests::healthy;

    #[test]
    fn certificates_per_node_and_the_roots() {
        let snapshot = healthy();
        let all = of(&snapshot, None).unwrap();
        assert_eq!(all.nodes.len(), 2);
        let node0 = of(&snapshot, Some("node0")).unwrap();
        assert_eq!(node0.nodes.len(), 1);
        let cert = &node0.nodes[0].certificates[0];
        assert_eq!(cert.identity, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(cert.expires_in_seconds, 12 * 3_600);
        let table = node0.table();
        assert!(table.contains("12h0m"), "{table}");
        assert!(table.contains("signs under CN=root"), "{table}");
        assert!(of(&snapshot, Some("node7")).is_err());
    }
}
