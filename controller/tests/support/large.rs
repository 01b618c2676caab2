//! A large generated cluster: `services` Services in 10 meshed namespaces, each with
//! `pods_per_service` ready pods spread over `nodes` nodes and one EndpointSlice.

use std::sync::Arc;

use k8s_openapi::{
    api::{
        core::v1::{
            Namespace, Node, NodeAddress, NodeStatus, Pod, PodSpec, PodStatus, Service,
            ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use weft_controller::objects::{Object, Objects};

pub const NAMESPACES: usize = 10;

fn meta(namespace: Option<&str>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: namespace.map(str::to_owned),
        ..Default::default()
    }
}

pub fn cluster(nodes: usize, services: usize, pods_per_service: usize) -> Objects {
    let mut objects = Objects::default();
    for index in 0..NAMESPACES {
        let mut metadata = meta(None, format!("ns{index}"));
        metadata.labels = Some([("weft.dev/mesh".to_owned(), "enabled".to_owned())].into());
        objects.upsert(Object::Namespace(Arc::new(Namespace {
            metadata,
            ..Default::default()
        })));
    }
    for index in 0..nodes {
        objects.upsert(Object::Node(Arc::new(Node {
            metadata: meta(None, format!("node{index}")),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: format!("10.250.{}.{}", index >> 8, index & 255),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })));
    }
    for index in 0..services {
        let namespace = format!("ns{}", index % NAMESPACES);
        let name = format!("svc{index}");
        let mut addresses = Vec::new();
        for replica in 0..pods_per_service {
            let pod = index * pods_per_service + replica;
            let ip = format!("10.{}.{}.{}", pod >> 16, (pod >> 8) & 255, pod & 255);
            let mut metadata = meta(Some(&namespace), format!("{name}-{replica}"));
            metadata.labels = Some([("app".to_owned(), name.clone())].into());
            objects.upsert(Object::Pod(Arc::new(Pod {
                metadata,
                spec: Some(PodSpec {
                    node_name: Some(format!("node{}", pod % nodes)),
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    phase: Some("Running".into()),
                    pod_ip: Some(ip.clone()),
                    ..Default::default()
                }),
            })));
            addresses.push(ip);
        }
        objects.upsert(Object::Service(Arc::new(Service {
            metadata: meta(Some(&namespace), name.clone()),
            spec: Some(ServiceSpec {
                cluster_ip: Some(format!("10.96.{}.{}", index >> 8, index & 255)),
                ports: Some(vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })));
        let mut metadata = meta(Some(&namespace), format!("{name}-slice"));
        metadata.labels = Some([("kubernetes.io/service-name".to_owned(), name)].into());
        objects.upsert(Object::EndpointSlice(Arc::new(EndpointSlice {
            metadata,
            address_type: "IPv4".into(),
            endpoints: addresses
                .into_iter()
                .map(|ip| Endpoint {
                    addresses: vec![ip],
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                port: Some(80),
                ..Default::default()
            }]),
        })));
    }
    objects
}
