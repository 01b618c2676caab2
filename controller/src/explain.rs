//! "Why was this allowed or denied?", answered for the whole mesh from the compiled
//! configuration: every node's policies, converted as the agents convert them, so the
//! controller's answer is the one the destination's agent acts on; and which route
//! takes a request ([`routes`]).

pub mod routes;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use weft_api::{
    authz::{
        self,
        query::{Directory, Pod},
    },
    config::v1 as proto,
};

use crate::compile::Compiled;

/// The compiled mesh, indexed for explain queries.
#[derive(Debug, Default)]
pub struct ClusterDirectory {
    trust_domain: String,
    workloads: Vec<proto::Workload>,
    services: Vec<proto::Service>,
    policies: Vec<authz::Policy>,
    /// Workload address → the policies selecting it.
    selected: HashMap<IpAddr, Vec<usize>>,
}

impl ClusterDirectory {
    pub fn new(compiled: &Compiled) -> Self {
        let trust_domain = compiled
            .shared
            .get::<proto::MeshSettings>("mesh")
            .map(|settings| settings.trust_domain)
            .unwrap_or_default();
        let workloads: Vec<proto::Workload> = compiled
            .shared
            .all::<proto::Workload>()
            .into_values()
            .filter(|workload| !workload.opted_out)
            .collect();
        let addresses: HashMap<String, Vec<IpAddr>> = workloads
            .iter()
            .map(|workload| {
                let ips = workload
                    .ips
                    .iter()
                    .filter_map(|ip| ip.parse().ok())
                    .collect();
                (format!("{}/{}", workload.namespace, workload.name), ips)
            })
            .collect();
        let mut policies = Vec::new();
        let mut selected: HashMap<IpAddr, Vec<usize>> = HashMap::new();
        for set in compiled.local.values() {
            for wire in set.all::<proto::AuthorizationPolicy>().into_values() {
                // The compiler wrote it: it reads back.
                let Ok(policy) = authz::Policy::try_from(&wire) else {
                    continue;
                };
                for ip in policy
                    .workloads
                    .iter()
                    .filter_map(|w| addresses.get(w))
                    .flatten()
                {
                    selected.entry(*ip).or_default().push(policies.len());
                }
                policies.push(policy);
            }
        }
        Self {
            trust_domain,
            workloads,
            services: compiled
                .shared
                .all::<proto::Service>()
                .into_values()
                .collect(),
            policies,
            selected,
        }
    }

    fn pod_of(&self, workload: &proto::Workload) -> Option<Pod> {
        Some(Pod {
            name: format!("{}/{}", workload.namespace, workload.name),
            ip: workload.ips.first()?.parse().ok()?,
            principal: format!(
                "{}/ns/{}/sa/{}",
                self.trust_domain, workload.namespace, workload.service_account
            ),
        })
    }
}

impl Directory for ClusterDirectory {
    fn pod(&self, namespace: &str, name: &str) -> Option<Pod> {
        let workload = self
            .workloads
            .iter()
            .find(|workload| workload.namespace == namespace && workload.name == name)?;
        self.pod_of(workload)
    }

    fn pod_at(&self, ip: IpAddr) -> Option<Pod> {
        let text = ip.to_string();
        let workload = self
            .workloads
            .iter()
            .find(|workload| workload.ips.contains(&text))?;
        self.pod_of(workload)
    }

    fn service_endpoints(&self, namespace: &str, name: &str, port: u16) -> Option<Vec<SocketAddr>> {
        let service = self
            .services
            .iter()
            .find(|service| service.namespace == namespace && service.name == name)?;
        let port = service
            .ports
            .iter()
            .find(|entry| entry.port == u32::from(port))?;
        let target = u16::try_from(port.target_port).ok()?;
        Some(
            service
                .endpoints
                .iter()
                .filter_map(|ip| ip.parse().ok())
                .map(|ip| SocketAddr::new(ip, target))
                .collect(),
        )
    }

    fn policies(&self, ip: IpAddr) -> Result<Vec<&authz::Policy>, String> {
        if self.pod_at(ip).is_none() {
            return Err(format!("{ip} is no meshed pod: no policy applies to it"));
        }
        Ok(self
            .selected
            .get(&ip)
            .into_iter()
            .flatten()
            .map(|&index| &self.policies[index])
            .collect())
    }
}
