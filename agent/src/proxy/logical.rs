//! The first stages of the outbound path, pure functions over the configuration
//! snapshot:
//!
//! - [`logical`]: a captured connection (who called, the original destination) becomes
//!   a [`Logical`] target: the source workload and either a service port (with its
//!   protocol) or a meshed pod's own address;
//! - [`candidates`]: a service's endpoints as the balancer sees them (weight, locality);
//! - [`endpoint`]: the chosen address becomes a concrete [`Endpoint`]: how to reach it
//!   (same node, an HBONE tunnel to its node's agent, or plain) and who it is.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::{
    HBONE_PORT,
    balance::{Algorithm, Candidate, Locality, Policy},
    error::ProxyError,
    metrics::Peer,
};
use crate::{
    identity::Identity,
    mesh::{HboneAddress, LoadBalancing, MeshConfig, Protocol, Service},
};

/// The calling pod.
#[derive(Clone, Debug)]
pub struct Source {
    pub address: SocketAddr,
    pub identity: Identity,
    pub peer: Peer,
}

/// Where a captured connection was headed, before any endpoint is chosen.
#[derive(Clone, Debug)]
pub enum Destination {
    /// A service VIP and port: each connection (TCP) or request (HTTP) picks one of
    /// the service's endpoints.
    Service(ServiceTarget),
    /// A meshed pod's own address.
    Pod(SocketAddr),
}

/// A service port, named so that each request can find it again in the snapshot of
/// its time (endpoints change while a connection lives).
#[derive(Clone, Debug)]
pub struct ServiceTarget {
    pub namespace: String,
    pub name: String,
    pub vip: IpAddr,
    pub port: u16,
    /// `namespace/name:port`: the balancer's key.
    pub key: String,
}

#[derive(Clone, Debug)]
pub struct Logical {
    pub source: Source,
    pub destination: Destination,
    pub protocol: Protocol,
}

impl Logical {
    /// `(namespace, name)` of the service the client addressed, if any.
    pub fn service(&self) -> Option<(String, String)> {
        match &self.destination {
            Destination::Service(target) => Some((target.namespace.clone(), target.name.clone())),
            Destination::Pod(_) => None,
        }
    }
}

/// The logical target of the connection from `peer` to `original`.
pub fn logical(
    mesh: &MeshConfig,
    peer: SocketAddr,
    original: SocketAddr,
) -> Result<Logical, ProxyError> {
    let source = mesh
        .workload_by_ip(peer.ip())
        .ok_or(ProxyError::UnknownSource {
            peer,
            waited: std::time::Duration::ZERO,
        })?;
    let identity = mesh.identity(source);
    let source = Source {
        address: peer,
        peer: Peer::of(source, Some(&identity), peer),
        identity,
    };
    if let Some((service, port)) = mesh.service_at(original.ip(), original.port()) {
        return Ok(Logical {
            source,
            protocol: port.protocol(),
            destination: Destination::Service(ServiceTarget {
                key: format!("{}/{}:{}", service.namespace, service.name, port.port),
                namespace: service.namespace.clone(),
                name: service.name.clone(),
                vip: service.vip,
                port: port.port,
            }),
        });
    }
    // A pod address was captured because it is meshed.
    match mesh.workload_by_ip(original.ip()) {
        Some(workload) if mesh.is_meshed(workload) => Ok(Logical {
            source,
            destination: Destination::Pod(original),
            protocol: Protocol::Detect,
        }),
        _ => Err(ProxyError::UnknownDestination(original)),
    }
}

/// How `service`'s endpoints are balanced.
pub fn policy(service: &Service) -> Policy {
    Policy {
        algorithm: match service.balancing() {
            LoadBalancing::PeakEwma => Algorithm::PeakEwma,
            LoadBalancing::LeastRequest => Algorithm::LeastRequest,
            LoadBalancing::RoundRobin => Algorithm::RoundRobin,
            LoadBalancing::Random => Algorithm::Random,
        },
        prefer_close: service.prefer_close,
        outlier: service.outlier,
    }
}

/// The endpoints of `service` on `target_port`, with their weights and where they are
/// from node `node`.
pub fn candidates(
    mesh: &MeshConfig,
    node: &str,
    service: &Service,
    target_port: u16,
) -> Vec<Candidate> {
    let zone = mesh.zone(node);
    service
        .endpoints
        .iter()
        .map(|ip| {
            let endpoint_node = mesh
                .workload_by_ip(*ip)
                .and_then(|workload| workload.node.as_deref());
            let locality = match endpoint_node {
                Some(name) if name == node => Locality::SameNode,
                Some(name) if zone.is_some() && mesh.zone(name) == zone => Locality::SameZone,
                _ => Locality::Elsewhere,
            };
            Candidate {
                address: SocketAddr::new(*ip, target_port),
                weight: service.weight(*ip),
                locality,
            }
        })
        .collect()
}

/// A concrete endpoint: an address and how to reach it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub address: SocketAddr,
    pub hop: Hop,
    /// Who answers there, for telemetry.
    pub peer: Peer,
    /// How long to wait for a connection: its service's TrafficPolicy
    /// `timeouts.connect`; `None`: the agent's default.
    pub connect_timeout: Option<Duration>,
}

/// How the bytes get to an endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hop {
    /// A meshed pod on this node: a direct connection carrying the agent's mark.
    Local,
    /// A meshed pod on another node: an HBONE tunnel to that node's agent, which must
    /// present `destination`'s certificate.
    Tunnel {
        agent: SocketAddr,
        destination: Identity,
    },
    /// A service endpoint outside the mesh (an opted-out pod, an address that is no
    /// workload): a plain connection, as the pod would have made itself.
    Passthrough,
}

impl Hop {
    pub fn mutual_tls(&self) -> bool {
        matches!(self, Hop::Tunnel { .. })
    }
}

/// How node `node` reaches `address`, an endpoint of a service (`via_service`) or a
/// pod addressed directly.
pub fn endpoint(
    mesh: &MeshConfig,
    node: &str,
    address: SocketAddr,
    via_service: bool,
) -> Result<Endpoint, ProxyError> {
    let workload = mesh.workload_by_ip(address.ip());
    let Some(destination) = workload.filter(|workload| mesh.is_meshed(workload)) else {
        // Only a service may lead outside the mesh; a pod address was captured
        // because it was meshed.
        if !via_service {
            return Err(ProxyError::UnknownDestination(address));
        }
        let peer = match workload {
            Some(workload) => Peer::of(workload, None, address),
            None => Peer {
                address: Some(address),
                ..Peer::default()
            },
        };
        return Ok(Endpoint {
            address,
            hop: Hop::Passthrough,
            peer,
            connect_timeout: None,
        });
    };
    let destination_node = destination
        .node
        .as_deref()
        .ok_or_else(|| ProxyError::NoNode(destination.name.clone()))?;
    let identity = mesh.identity(destination);
    let peer = Peer::of(destination, Some(&identity), address);
    let hop = if destination_node == node {
        Hop::Local
    } else {
        let node = mesh
            .node(destination_node)
            .ok_or_else(|| ProxyError::UnknownNode(destination_node.to_owned()))?;
        let agent = match node.hbone_address {
            HboneAddress::Node => node.address,
            HboneAddress::Pod => address.ip(),
        };
        Hop::Tunnel {
            agent: SocketAddr::new(agent, HBONE_PORT),
            destination: identity,
        }
    };
    Ok(Endpoint {
        address,
        hop,
        peer,
        connect_timeout: None,
    })
}

/// Whether reaching `destination` from node `node` may need a tunnel, and so the
/// source's certificate.
pub fn may_tunnel(mesh: &MeshConfig, node: &str, destination: &Destination) -> bool {
    let remote = |ip: IpAddr| {
        mesh.workload_by_ip(ip).is_some_and(|workload| {
            mesh.is_meshed(workload) && workload.node.as_deref() != Some(node)
        })
    };
    match destination {
        Destination::Pod(address) => remote(address.ip()),
        Destination::Service(target) => mesh
            .service_at(target.vip, target.port)
            .is_some_and(|(service, _)| service.endpoints.iter().any(|ip| remote(*ip))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MESH: &str = r#"
nodes: [{ name: a, address: 10.99.0.1, zone: z1 }, { name: b, address: 10.99.0.2, zone: z2 }, { name: c, address: 10.99.0.3, zone: z1, hboneAddress: pod }]
namespaces: [{ name: shop }]
workloads:
  - { name: client, namespace: shop, serviceAccount: client, node: a, ip: 10.244.0.2 }
  - { name: web-a, namespace: shop, serviceAccount: web, node: a, ip: 10.244.0.3, labels: { app: web } }
  - { name: web-b, namespace: shop, serviceAccount: web, node: b, ip: 10.244.1.3 }
  - { name: web-c, namespace: shop, serviceAccount: web, node: c, ip: 10.244.2.3 }
  - { name: outsider, namespace: other, node: b, ip: 10.244.1.9 }
  - { name: batch, namespace: shop, node: b, ip: 10.244.1.8, optedOut: true }
services:
  - name: web
    namespace: shop
    vip: 10.96.0.10
    ports: [{ port: 80, targetPort: 8080, name: http }]
    endpoints: [10.244.0.3, 10.244.1.3, 10.244.2.3]
    weights: { 10.244.1.3: 3 }
    loadBalancing: ROUND_ROBIN
    preferClose: true
  - { name: empty, namespace: shop, vip: 10.96.0.11, ports: [{ port: 80 }] }
"#;

    fn mesh() -> MeshConfig {
        serde_yaml::from_str(MESH).unwrap()
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_service_address_is_the_service_port_with_its_protocol() {
        let mesh = mesh();
        let logical = logical(&mesh, addr("10.244.0.2:40000"), addr("10.96.0.10:80")).unwrap();
        let Destination::Service(target) = &logical.destination else {
            panic!("{:?}", logical.destination);
        };
        assert_eq!(target.key, "shop/web:80");
        assert_eq!(logical.protocol, Protocol::Http);
        assert_eq!(
            logical.source.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        let pod = super::logical(&mesh, addr("10.244.0.2:40000"), addr("10.244.1.3:9000")).unwrap();
        assert!(matches!(pod.destination, Destination::Pod(to) if to == addr("10.244.1.3:9000")));
        assert_eq!(pod.protocol, Protocol::Detect);
    }

    #[test]
    fn what_the_mesh_does_not_know_is_refused() {
        let mesh = mesh();
        let client = addr("10.244.0.2:40000");
        let reason = |peer, original| logical(&mesh, peer, original).err().map(|e| e.reason());
        assert_eq!(
            reason(addr("10.244.0.77:1"), addr("10.244.1.3:80")),
            Some("unknown_source")
        );
        assert_eq!(
            reason(client, addr("10.244.1.9:80")),
            Some("unknown_destination"),
            "an unmeshed pod"
        );
        assert_eq!(
            reason(client, addr("192.0.2.1:80")),
            Some("unknown_destination")
        );
    }

    #[test]
    fn candidates_carry_weights_and_locality() {
        let mesh = mesh();
        let (web, _) = mesh.service_at("10.96.0.10".parse().unwrap(), 80).unwrap();
        let found: Vec<(SocketAddr, u32, Locality)> = candidates(&mesh, "a", web, 8080)
            .into_iter()
            .map(|candidate| (candidate.address, candidate.weight, candidate.locality))
            .collect();
        assert_eq!(
            found,
            [
                (addr("10.244.0.3:8080"), 1, Locality::SameNode),
                (addr("10.244.1.3:8080"), 3, Locality::Elsewhere),
                (addr("10.244.2.3:8080"), 1, Locality::SameZone),
            ]
        );
        assert_eq!(
            policy(web),
            Policy {
                algorithm: Algorithm::RoundRobin,
                prefer_close: true,
                outlier: None,
            }
        );
        let (empty, _) = mesh.service_at("10.96.0.11".parse().unwrap(), 80).unwrap();
        assert_eq!(policy(empty).algorithm, Algorithm::PeakEwma, "the default");
        assert!(candidates(&mesh, "a", empty, 80).is_empty());
    }

    #[test]
    fn endpoints_are_reached_locally_through_a_tunnel_or_plainly() {
        let mesh = mesh();
        let remote = endpoint(&mesh, "a", addr("10.244.1.3:8080"), true).unwrap();
        let Hop::Tunnel { agent, destination } = &remote.hop else {
            panic!("another node: HBONE to its agent, not {:?}", remote.hop);
        };
        assert_eq!(*agent, addr("10.99.0.2:15008"));
        assert_eq!(
            destination.to_string(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        // Node c takes HBONE on each pod's own address, as Istio's ztunnel does.
        let on_pod = endpoint(&mesh, "a", addr("10.244.2.3:8080"), true).unwrap();
        let Hop::Tunnel { agent, .. } = &on_pod.hop else {
            panic!("another node: HBONE, not {:?}", on_pod.hop);
        };
        assert_eq!(*agent, addr("10.244.2.3:15008"));
        let local = endpoint(&mesh, "a", addr("10.244.0.3:8080"), true).unwrap();
        assert_eq!(local.hop, Hop::Local);
        for outside in ["10.244.1.9:8080", "10.244.1.8:8080", "192.0.2.7:8080"] {
            let plain = endpoint(&mesh, "a", addr(outside), true).unwrap();
            assert_eq!(plain.hop, Hop::Passthrough, "{outside}");
        }
        assert_eq!(
            endpoint(&mesh, "a", addr("192.0.2.7:80"), false)
                .err()
                .map(|e| e.reason()),
            Some("unknown_destination"),
            "only a service leads outside the mesh"
        );
    }

    #[test]
    fn a_tunnel_is_needed_when_an_endpoint_is_on_another_node() {
        let mesh = mesh();
        let web = logical(&mesh, addr("10.244.0.2:1"), addr("10.96.0.10:80")).unwrap();
        assert!(may_tunnel(&mesh, "a", &web.destination));
        let local_pod = Destination::Pod(addr("10.244.0.3:8080"));
        assert!(!may_tunnel(&mesh, "a", &local_pod));
        let empty = logical(&mesh, addr("10.244.0.2:1"), addr("10.96.0.11:80")).unwrap();
        assert!(!may_tunnel(&mesh, "a", &empty.destination));
    }
}
