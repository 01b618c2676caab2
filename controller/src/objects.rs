//! The Kubernetes objects the controller compiles, as the sources deliver them: one
//! map per kind, keyed by namespace and name. Both sources (the Kubernetes API and a
//! directory of YAML) fill the same [`Objects`], so the compiler cannot tell them apart.

use std::{collections::BTreeMap, fmt, sync::Arc};

use gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute, referencegrants::ReferenceGrant};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::Resource;
use weft_api::crd::{AuthorizationPolicy, FaultInjection, PeerAuthentication, TrafficPolicy};

/// Namespace (empty for cluster-scoped kinds) and name of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The key of `object`, from its metadata.
    pub fn of<K: Resource>(object: &K) -> Self {
        let meta = object.meta();
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// The kinds the controller reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    EndpointSlice,
    PeerAuthentication,
    AuthorizationPolicy,
    TrafficPolicy,
    FaultInjection,
    HttpRoute,
    GrpcRoute,
    ReferenceGrant,
}

impl Kind {
    pub const ALL: [Kind; 12] = [
        Kind::Namespace,
        Kind::Node,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::TrafficPolicy,
        Kind::FaultInjection,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::ReferenceGrant,
    ];

    /// The object's `kind` as Kubernetes spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::FaultInjection => "FaultInjection",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::ReferenceGrant => "ReferenceGrant",
        }
    }

    /// The `apiVersion` the controller reads this kind at.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::Node | Kind::Pod | Kind::Service => "v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::PeerAuthentication
            | Kind::AuthorizationPolicy
            | Kind::TrafficPolicy
            | Kind::FaultInjection => "weft.dev/v1alpha1",
            Kind::HttpRoute | Kind::GrpcRoute | Kind::ReferenceGrant => {
                "gateway.networking.k8s.io/v1"
            }
        }
    }

    /// The kind of a `kind` field, if the controller reads it.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One object of a kind the controller reads.
#[derive(Clone, Debug)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Node(Arc<Node>),
    Pod(Arc<Pod>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    PeerAuthentication(Arc<PeerAuthentication>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    TrafficPolicy(Arc<TrafficPolicy>),
    FaultInjection(Arc<FaultInjection>),
    HttpRoute(Arc<HttpRoute>),
    GrpcRoute(Arc<GrpcRoute>),
    ReferenceGrant(Arc<ReferenceGrant>),
}

impl Object {
    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Node(_) => Kind::Node,
            Object::Pod(_) => Kind::Pod,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::TrafficPolicy(_) => Kind::TrafficPolicy,
            Object::FaultInjection(_) => Kind::FaultInjection,
            Object::HttpRoute(_) => Kind::HttpRoute,
            Object::GrpcRoute(_) => Kind::GrpcRoute,
            Object::ReferenceGrant(_) => Kind::ReferenceGrant,
        }
    }

    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(object) => ObjectKey::of(object.as_ref()),
            Object::Node(object) => ObjectKey::of(object.as_ref()),
            Object::Pod(object) => ObjectKey::of(object.as_ref()),
            Object::Service(object) => ObjectKey::of(object.as_ref()),
            Object::EndpointSlice(object) => ObjectKey::of(object.as_ref()),
            Object::PeerAuthentication(object) => ObjectKey::of(object.as_ref()),
            Object::AuthorizationPolicy(object) => ObjectKey::of(object.as_ref()),
            Object::TrafficPolicy(object) => ObjectKey::of(object.as_ref()),
            Object::FaultInjection(object) => ObjectKey::of(object.as_ref()),
            Object::HttpRoute(object) => ObjectKey::of(object.as_ref()),
            Object::GrpcRoute(object) => ObjectKey::of(object.as_ref()),
            Object::ReferenceGrant(object) => ObjectKey::of(object.as_ref()),
        }
    }

    /// Parses one object of `kind` from its JSON (or YAML) value.
    pub fn from_value(kind: Kind, value: serde_json::Value) -> Result<Object, serde_json::Error> {
        fn parse<T: serde::de::DeserializeOwned>(
            value: serde_json::Value,
        ) -> Result<Arc<T>, serde_json::Error> {
            serde_json::from_value(value).map(Arc::new)
        }
        Ok(match kind {
            Kind::Namespace => Object::Namespace(parse(value)?),
            Kind::Node => Object::Node(parse(value)?),
            Kind::Pod => Object::Pod(parse(value)?),
            Kind::Service => Object::Service(parse(value)?),
            Kind::EndpointSlice => Object::EndpointSlice(parse(value)?),
            Kind::PeerAuthentication => Object::PeerAuthentication(parse(value)?),
            Kind::AuthorizationPolicy => Object::AuthorizationPolicy(parse(value)?),
            Kind::TrafficPolicy => Object::TrafficPolicy(parse(value)?),
            Kind::FaultInjection => Object::FaultInjection(parse(value)?),
            Kind::HttpRoute => Object::HttpRoute(parse(value)?),
            Kind::GrpcRoute => Object::GrpcRoute(parse(value)?),
            Kind::ReferenceGrant => Object::ReferenceGrant(parse(value)?),
        })
    }
}

/// Everything the sources know, by kind and key.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub namespaces: BTreeMap<ObjectKey, Arc<Namespace>>,
    pub nodes: BTreeMap<ObjectKey, Arc<Node>>,
    pub pods: BTreeMap<ObjectKey, Arc<Pod>>,
    pub services: BTreeMap<ObjectKey, Arc<Service>>,
    pub endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    pub peer_authentications: BTreeMap<ObjectKey, Arc<PeerAuthentication>>,
    pub authorization_policies: BTreeMap<ObjectKey, Arc<AuthorizationPolicy>>,
    pub traffic_policies: BTreeMap<ObjectKey, Arc<TrafficPolicy>>,
    pub fault_injections: BTreeMap<ObjectKey, Arc<FaultInjection>>,
    pub http_routes: BTreeMap<ObjectKey, Arc<HttpRoute>>,
    pub grpc_routes: BTreeMap<ObjectKey, Arc<GrpcRoute>>,
    pub reference_grants: BTreeMap<ObjectKey, Arc<ReferenceGrant>>,
    /// What the objects were read from, for the status: with the file source, each
    /// file's path and the digest of the content that applies.
    pub sources: BTreeMap<String, String>,
}

impl Objects {
    /// Adds `object`, or replaces the one with its kind and key.
    pub fn upsert(&mut self, object: Object) {
        let key = object.key();
        match object {
            Object::Namespace(object) => drop(self.namespaces.insert(key, object)),
            Object::Node(object) => drop(self.nodes.insert(key, object)),
            Object::Pod(object) => drop(self.pods.insert(key, object)),
            Object::Service(object) => drop(self.services.insert(key, object)),
            Object::EndpointSlice(object) => drop(self.endpoint_slices.insert(key, object)),
            Object::PeerAuthentication(object) => {
                drop(self.peer_authentications.insert(key, object))
            }
            Object::AuthorizationPolicy(object) => {
                drop(self.authorization_policies.insert(key, object))
            }
            Object::TrafficPolicy(object) => drop(self.traffic_policies.insert(key, object)),
            Object::FaultInjection(object) => drop(self.fault_injections.insert(key, object)),
            Object::HttpRoute(object) => drop(self.http_routes.insert(key, object)),
            Object::GrpcRoute(object) => drop(self.grpc_routes.insert(key, object)),
            Object::ReferenceGrant(object) => drop(self.reference_grants.insert(key, object)),
        }
    }

    pub fn remove(&mut self, kind: Kind, key: &ObjectKey) {
        match kind {
            Kind::Namespace => drop(self.namespaces.remove(key)),
            Kind::Node => drop(self.nodes.remove(key)),
            Kind::Pod => drop(self.pods.remove(key)),
            Kind::Service => drop(self.services.remove(key)),
            Kind::EndpointSlice => drop(self.endpoint_slices.remove(key)),
            Kind::PeerAuthentication => drop(self.peer_authentications.remove(key)),
            Kind::AuthorizationPolicy => drop(self.authorization_policies.remove(key)),
            Kind::TrafficPolicy => drop(self.traffic_policies.remove(key)),
            Kind::FaultInjection => drop(self.fault_injections.remove(key)),
            Kind::HttpRoute => drop(self.http_routes.remove(key)),
            Kind::GrpcRoute => drop(self.grpc_routes.remove(key)),
            Kind::ReferenceGrant => drop(self.reference_grants.remove(key)),
        }
    }

    /// Replaces every object of `kind` with `objects` (a re-list).
    pub fn replace_kind(&mut self, kind: Kind, objects: impl IntoIterator<Item = Object>) {
        match kind {
            Kind::Namespace => self.namespaces.clear(),
            Kind::Node => self.nodes.clear(),
            Kind::Pod => self.pods.clear(),
            Kind::Service => self.services.clear(),
            Kind::EndpointSlice => self.endpoint_slices.clear(),
            Kind::PeerAuthentication => self.peer_authentications.clear(),
            Kind::AuthorizationPolicy => self.authorization_policies.clear(),
            Kind::TrafficPolicy => self.traffic_policies.clear(),
            Kind::FaultInjection => self.fault_injections.clear(),
            Kind::HttpRoute => self.http_routes.clear(),
            Kind::GrpcRoute => self.grpc_routes.clear(),
            Kind::ReferenceGrant => self.reference_grants.clear(),
        }
        for object in objects {
            debug_assert_eq!(object.kind(), kind);
            self.upsert(object);
        }
    }

    /// How many objects of each kind there are.
    pub fn counts(&self) -> BTreeMap<Kind, usize> {
        [
            (Kind::Namespace, self.namespaces.len()),
            (Kind::Node, self.nodes.len()),
            (Kind::Pod, self.pods.len()),
            (Kind::Service, self.services.len()),
            (Kind::EndpointSlice, self.endpoint_slices.len()),
            (Kind::PeerAuthentication, self.peer_authentications.len()),
            (Kind::AuthorizationPolicy, self.authorization_policies.len()),
            (Kind::TrafficPolicy, self.traffic_policies.len()),
            (Kind::FaultInjection, self.fault_injections.len()),
            (Kind::HttpRoute, self.http_routes.len()),
            (Kind::GrpcRoute, self.grpc_routes.len()),
            (Kind::ReferenceGrant, self.reference_grants.len()),
        ]
        .into()
    }
}
