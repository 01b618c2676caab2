//! Services of meshed namespaces: their virtual IPs, ports (named target ports
//! resolved through the EndpointSlices, as kube-proxy does, with their names and
//! appProtocols), ready endpoints and their weights, and whether clients prefer
//! endpoints of their own zone.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::util::intstr::IntOrString,
};
use weft_api::config::v1 as proto;

use super::membership::Mesh;
use crate::objects::{ObjectKey, Objects};

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The Service's `spec.trafficDistribution` values that ask for endpoints of the
/// client's zone (`PreferSameZone` is `PreferClose`'s newer name).
const PREFER_CLOSE: &[&str] = &["PreferClose", "PreferSameZone"];

/// The services of `mesh`; those in `prefer_close` prefer close endpoints whatever
/// their `spec.trafficDistribution` says (their TrafficPolicy asks for it).
pub fn compile(
    objects: &Objects,
    mesh: &Mesh,
    prefer_close: &BTreeSet<ObjectKey>,
) -> BTreeMap<ObjectKey, proto::Service> {
    let mut slices: BTreeMap<ObjectKey, Vec<&EndpointSlice>> = BTreeMap::new();
    for (key, slice) in &objects.endpoint_slices {
        if let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|labels| labels.get(SERVICE_NAME_LABEL))
        {
            slices
                .entry(ObjectKey::new(&key.namespace, service))
                .or_default()
                .push(slice);
        }
    }
    objects
        .services
        .iter()
        .filter(|(key, _)| mesh.namespaces.contains_key(&key.namespace))
        .filter_map(|(key, service)| {
            let slices = slices.get(key).map(Vec::as_slice).unwrap_or_default();
            let mut compiled = compile_service(key, service, slices, &mesh.weights)?;
            compiled.prefer_close |= prefer_close.contains(key);
            Some((key.clone(), compiled))
        })
        .collect()
}

/// A Service with a virtual IP; headless and ExternalName services have none.
/// `weights`: the pod addresses whose weight is not the default.
fn compile_service(
    key: &ObjectKey,
    service: &Service,
    slices: &[&EndpointSlice],
    weights: &BTreeMap<String, u32>,
) -> Option<proto::Service> {
    let spec = service.spec.as_ref()?;
    let mut vips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
    if let Some(ip) = &spec.cluster_ip
        && !vips.contains(ip)
    {
        vips.insert(0, ip.clone());
    }
    vips.retain(|ip| ip.parse::<std::net::IpAddr>().is_ok());
    if vips.is_empty() {
        return None;
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|port| port.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|port| {
            let name = port.name.clone().unwrap_or_default();
            let target_port = match &port.target_port {
                None => port.port,
                Some(IntOrString::Int(number)) => *number,
                // A named port: the number the endpoints' pods give it; none yet, no port.
                Some(IntOrString::String(_)) => slices
                    .iter()
                    .flat_map(|slice| slice.ports.iter().flatten())
                    .find(|slice_port| slice_port.name.as_deref().unwrap_or("") == name)
                    .and_then(|slice_port| slice_port.port)?,
            };
            Some(proto::ServicePort {
                port: u32::try_from(port.port).ok()?,
                target_port: u32::try_from(target_port).ok()?,
                name,
                app_protocol: port
                    .app_protocol
                    .as_deref()
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
            })
        })
        .collect();
    let endpoints: BTreeSet<String> = slices
        .iter()
        .filter(|slice| matches!(slice.address_type.as_str(), "IPv4" | "IPv6"))
        .flat_map(|slice| slice.endpoints.iter())
        .filter(|endpoint| {
            endpoint
                .conditions
                .as_ref()
                .and_then(|conditions| conditions.ready)
                != Some(false)
        })
        .flat_map(|endpoint| endpoint.addresses.iter().cloned())
        .collect();
    let endpoint_weights = endpoints
        .iter()
        .filter_map(|ip| Some((ip.clone(), *weights.get(ip)?)))
        .collect();
    Some(proto::Service {
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        vips,
        ports,
        endpoints: endpoints.into_iter().collect(),
        prefer_close: spec
            .traffic_distribution
            .as_deref()
            .is_some_and(|distribution| PREFER_CLOSE.contains(&distribution)),
        endpoint_weights,
    })
}
