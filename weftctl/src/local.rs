//! The local cluster as a [`Mesh`]: its topology names the nodes, and the controller's
//! and agents' endpoints are reached inside the cluster's network namespaces.

use std::path::PathBuf;

use anyhow::Context as _;
use weft_cluster::{AgentPort, Cluster};

use crate::mesh::{Connection, Endpoint, Mesh};

/// A local cluster (`cargo xtask cluster up`).
pub struct LocalCluster(Cluster);

impl LocalCluster {
    pub fn open(name: &str) -> anyhow::Result<Self> {
        let cluster = Cluster::open(name).with_context(|| format!("local cluster {name}"))?;
        if cluster.topology().manifests.is_none() {
            anyhow::bail!(
                "local cluster {name} runs no mesh: give it one with `cargo xtask cluster up \
                 --name {name} --mesh PATH`"
            );
        }
        Ok(Self(cluster))
    }
}

impl Mesh for LocalCluster {
    fn nodes(&self) -> Vec<String> {
        self.0.topology().node_names()
    }

    fn controller_get(&self, path: &str) -> Result<String, String> {
        self.0.controller_get(path)
    }

    fn agent_get(&self, node: &str, endpoint: Endpoint) -> Result<String, String> {
        let (port, path) = endpoint.port_and_path();
        self.0.agent_get(node, port, path)
    }

    fn manifests(&self) -> anyhow::Result<Vec<(PathBuf, String)>> {
        crate::analyze::read(&self.0.mesh_files())
    }

    fn agent_connect(&self, node: &str) -> Result<Box<dyn Connection>, String> {
        let connection = self.0.agent_connect(node, AgentPort::Admin)?;
        connection
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpStream::from_std(connection))
            .map(|connection| Box::new(connection) as Box<dyn Connection>)
            .map_err(|err| err.to_string())
    }
}
