//! The local cluster as a [`Mesh`]: its topology names the nodes, and the controller's
//! and agents' endpoints are reached inside the cluster's network namespaces.

use anyhow::Context as _;
use weft_cluster::{AgentPort, Cluster};

use crate::mesh::{Endpoint, Mesh};

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
        let (port, path) = match endpoint {
            Endpoint::Ready => (AgentPort::Ready, "/healthz/ready"),
            Endpoint::Metrics => (AgentPort::Metrics, "/metrics"),
            Endpoint::ConfigDump => (AgentPort::Admin, "/config_dump"),
            Endpoint::Certs => (AgentPort::Admin, "/certs"),
        };
        self.0.agent_get(node, port, path)
    }

    fn agent_connect(&self, node: &str) -> Result<std::net::TcpStream, String> {
        self.0.agent_connect(node, AgentPort::Admin)
    }
}
