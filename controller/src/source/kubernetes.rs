//! The Kubernetes source, and everything else the controller asks of the API server.
//!
//! - [`run`] keeps one watcher per kind the controller reads (all namespaces) and
//!   publishes the whole [`Objects`] after changes, at most every [`PUBLISH_INTERVAL`]
//!   while events keep coming. Nothing is published until every kind has been listed
//!   once, so the compiler never sees a half-read cluster. A kind whose CRD is not
//!   installed counts as empty (with a warning saying what to install) and is retried
//!   with backoff like any other failure.
//! - [`write_statuses`] writes the compiler's verdicts into the `status` of weft's
//!   resources and of the HTTPRoutes and GRPCRoutes attached to Services, only when
//!   they differ from what the object already says.
//! - [`TokenReviewer`] asks the API server which node an agent's service account
//!   token belongs to (a `TokenReview`).
//!
//! Objects are read as untyped JSON and converted one by one, so an object the
//! controller cannot read is skipped with a warning (its last readable version keeps
//! applying) instead of failing the list of its whole kind.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute, referencegrants::ReferenceGrant};
use k8s_openapi::{
    api::{
        authentication::v1::{TokenReview, TokenReviewSpec},
        core::v1::{Namespace, Node, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};
use weft_api::crd::{
    AuthorizationPolicy, FaultInjection, PeerAuthentication, PolicyStatus, TrafficPolicy,
};

use super::Publisher;
use crate::{
    auth::AuthError,
    objects::{Kind, Object, ObjectKey, Objects},
    status::{ACCEPTED, RESOLVED_REFS, Statuses, Verdict},
};

/// How long a burst of events may go unpublished.
pub const PUBLISH_INTERVAL: Duration = Duration::from_millis(50);

/// The `controllerName` of the route status entries weft writes.
pub const CONTROLLER_NAME: &str = "weft.dev/mesh-controller";

/// Where a pod-bound service account token carries its pod's node.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Writes of statuses in flight at once.
const CONCURRENT_WRITES: usize = 8;

/// Where the API serves `kind`.
pub fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::Namespace => ApiResource::erase::<Namespace>(&()),
        Kind::Node => ApiResource::erase::<Node>(&()),
        Kind::Pod => ApiResource::erase::<Pod>(&()),
        Kind::Service => ApiResource::erase::<Service>(&()),
        Kind::EndpointSlice => ApiResource::erase::<EndpointSlice>(&()),
        Kind::PeerAuthentication => ApiResource::erase::<PeerAuthentication>(&()),
        Kind::AuthorizationPolicy => ApiResource::erase::<AuthorizationPolicy>(&()),
        Kind::TrafficPolicy => ApiResource::erase::<TrafficPolicy>(&()),
        Kind::FaultInjection => ApiResource::erase::<FaultInjection>(&()),
        Kind::HttpRoute => ApiResource::erase::<HttpRoute>(&()),
        Kind::GrpcRoute => ApiResource::erase::<GrpcRoute>(&()),
        Kind::ReferenceGrant => ApiResource::erase::<ReferenceGrant>(&()),
    }
}

/// `plural.group` (or `plural` for the core group), as RBAC rules and CRDs name it.
fn resource_name(resource: &ApiResource) -> String {
    if resource.group.is_empty() {
        resource.plural.clone()
    } else {
        format!("{}.{}", resource.plural, resource.group)
    }
}

/// What to install when the API server does not serve `kind`.
fn install_hint(kind: Kind) -> &'static str {
    match kind {
        Kind::PeerAuthentication
        | Kind::AuthorizationPolicy
        | Kind::TrafficPolicy
        | Kind::FaultInjection => {
            "install weft's CRDs: kubectl apply -k deploy/crds (deploy/install.yaml has them too)"
        }
        Kind::HttpRoute | Kind::GrpcRoute | Kind::ReferenceGrant => {
            "install the Gateway API CRDs (standard channel): \
             https://gateway-api.sigs.k8s.io/guides/#installing-gateway-api"
        }
        Kind::Namespace | Kind::Node | Kind::Pod | Kind::Service | Kind::EndpointSlice => {
            "this kind is built into Kubernetes: check that the controller talks to a \
             Kubernetes API server (1.21 or later)"
        }
    }
}

/// Why a kind cannot be read right now.
#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error(
        "{kind} ({api_version}) is not served by the API server: {hint}; \
         weft treats it as empty and keeps checking"
    )]
    NotInstalled {
        kind: Kind,
        api_version: &'static str,
        hint: &'static str,
    },
    #[error(
        "the controller may not list and watch {resource}: grant its ServiceAccount \
         `list` and `watch` on them (the controller's ClusterRole); weft publishes \
         nothing until it can read every kind"
    )]
    Forbidden { resource: String },
    #[error("cannot list or watch {kind}: {source}; retrying with backoff")]
    Failed {
        kind: Kind,
        #[source]
        source: watcher::Error,
    },
}

/// A change to apply to [`Objects`].
#[derive(Debug)]
enum Change {
    /// A (re-)list finished: every object of `kind`. Objects that could not be read
    /// keep the version the controller had.
    Replace {
        kind: Kind,
        objects: Vec<Object>,
        unreadable: Vec<ObjectKey>,
    },
    Upsert(Object),
    Remove(Kind, ObjectKey),
    /// The kind cannot be read, and why (`None`: it can again).
    Unread(Kind, Option<String>),
}

/// The kinds the source cannot read now, by name, and why: what `/status` reports as
/// `unread_kinds`.
pub type Unread = watch::Sender<BTreeMap<String, String>>;

/// Watches every kind the controller reads and publishes what the cluster holds, and
/// in `unread` the kinds it cannot read. Runs until dropped.
pub async fn run(client: Client, publisher: Publisher, unread: Unread) {
    let mut changes =
        futures::stream::select_all(Kind::ALL.map(|kind| kind_changes(client.clone(), kind)));
    let mut objects = Objects::default();
    let mut unlisted: BTreeSet<Kind> = Kind::ALL.into();
    let mut publish_at: Option<Instant> = None;
    loop {
        tokio::select! {
            change = changes.next() => {
                // Watchers retry forever; their streams never end.
                let Some(change) = change else { return };
                if let Change::Unread(kind, problem) = change {
                    unread.send_modify(|unread| match problem {
                        Some(problem) => drop(unread.insert(kind.to_string(), problem)),
                        None => drop(unread.remove(&kind.to_string())),
                    });
                    continue;
                }
                if let Change::Replace { kind, .. } = &change
                    && unlisted.remove(kind)
                    && unlisted.is_empty()
                {
                    log::info!("listed every kind from the Kubernetes API; publishing");
                }
                apply(&mut objects, change);
                if unlisted.is_empty() && publish_at.is_none() {
                    publish_at = Some(Instant::now() + PUBLISH_INTERVAL);
                }
            }
            () = sleep_until(publish_at) => {
                publish_at = None;
                publisher.send_replace(Arc::new(objects.clone()));
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn apply(objects: &mut Objects, change: Change) {
    match change {
        Change::Replace {
            kind,
            objects: mut listed,
            unreadable,
        } => {
            listed.extend(unreadable.iter().filter_map(|key| find(objects, kind, key)));
            objects.replace_kind(kind, listed);
        }
        Change::Upsert(object) => objects.upsert(object),
        Change::Remove(kind, key) => objects.remove(kind, &key),
        // `run` keeps these apart from the objects.
        Change::Unread(..) => {}
    }
}

/// The object of `kind` with `key`, if `objects` has it.
fn find(objects: &Objects, kind: Kind, key: &ObjectKey) -> Option<Object> {
    Some(match kind {
        Kind::Namespace => Object::Namespace(objects.namespaces.get(key)?.clone()),
        Kind::Node => Object::Node(objects.nodes.get(key)?.clone()),
        Kind::Pod => Object::Pod(objects.pods.get(key)?.clone()),
        Kind::Service => Object::Service(objects.services.get(key)?.clone()),
        Kind::EndpointSlice => Object::EndpointSlice(objects.endpoint_slices.get(key)?.clone()),
        Kind::PeerAuthentication => {
            Object::PeerAuthentication(objects.peer_authentications.get(key)?.clone())
        }
        Kind::AuthorizationPolicy => {
            Object::AuthorizationPolicy(objects.authorization_policies.get(key)?.clone())
        }
        Kind::TrafficPolicy => Object::TrafficPolicy(objects.traffic_policies.get(key)?.clone()),
        Kind::FaultInjection => Object::FaultInjection(objects.fault_injections.get(key)?.clone()),
        Kind::HttpRoute => Object::HttpRoute(objects.http_routes.get(key)?.clone()),
        Kind::GrpcRoute => Object::GrpcRoute(objects.grpc_routes.get(key)?.clone()),
        Kind::ReferenceGrant => Object::ReferenceGrant(objects.reference_grants.get(key)?.clone()),
    })
}

/// The changes of one kind, from a watcher that retries with backoff.
fn kind_changes(client: Client, kind: Kind) -> BoxStream<'static, Change> {
    let api = Api::<DynamicObject>::all_with(client, &api_resource(kind));
    let mut tracker = KindTracker::new(kind);
    watcher(api, watcher::Config::default())
        .default_backoff()
        .flat_map(move |event| futures::stream::iter(tracker.on(event)))
        .boxed()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Health {
    Starting,
    Healthy,
    NotInstalled,
    Failing,
}

/// Turns one kind's watcher events into changes, and reports its health when it
/// changes (not on every retry).
#[derive(Debug)]
struct KindTracker {
    kind: Kind,
    health: Health,
    listed: Vec<Object>,
    unreadable: Vec<ObjectKey>,
}

impl KindTracker {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            health: Health::Starting,
            listed: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    fn on(&mut self, event: Result<watcher::Event<DynamicObject>, watcher::Error>) -> Vec<Change> {
        let event = match event {
            Ok(event) => event,
            Err(error) => return self.failed(error),
        };
        let recovered = match event {
            watcher::Event::Init | watcher::Event::InitApply(_) => None,
            _ => self.healthy(),
        };
        let change = match event {
            watcher::Event::Init => {
                self.listed.clear();
                self.unreadable.clear();
                None
            }
            watcher::Event::InitApply(object) => {
                match self.read(object) {
                    Ok(object) => self.listed.push(object),
                    Err(key) => self.unreadable.push(key),
                }
                None
            }
            watcher::Event::InitDone => {
                log::debug!("listed {} {}(s)", self.listed.len(), self.kind);
                Some(Change::Replace {
                    kind: self.kind,
                    objects: std::mem::take(&mut self.listed),
                    unreadable: std::mem::take(&mut self.unreadable),
                })
            }
            watcher::Event::Apply(object) => self.read(object).ok().map(Change::Upsert),
            watcher::Event::Delete(object) => {
                Some(Change::Remove(self.kind, key_of(&object.metadata)))
            }
        };
        recovered.into_iter().chain(change).collect()
    }

    /// Marks the kind readable; says so when it was not.
    fn healthy(&mut self) -> Option<Change> {
        let was = std::mem::replace(&mut self.health, Health::Healthy);
        match was {
            Health::NotInstalled => log::info!("{} is served now", self.kind),
            Health::Failing => log::info!("reading {} again", self.kind),
            Health::Starting | Health::Healthy => return None,
        }
        Some(Change::Unread(self.kind, None))
    }

    fn failed(&mut self, error: watcher::Error) -> Vec<Change> {
        let status = match &error {
            watcher::Error::InitialListFailed(kube::Error::Api(status))
            | watcher::Error::WatchStartFailed(kube::Error::Api(status))
            | watcher::Error::WatchFailed(kube::Error::Api(status)) => Some(status.as_ref()),
            watcher::Error::WatchError(status) => Some(status.as_ref()),
            _ => None,
        };
        let code = status.map(|status| status.code);
        if code == Some(410) {
            // The watch fell out of the API server's history: the watcher re-lists.
            log::debug!("the watch of {} expired; listing again", self.kind);
            return Vec::new();
        }
        let resource = api_resource(self.kind);
        let (health, error) = match code {
            Some(404) => (
                Health::NotInstalled,
                WatchError::NotInstalled {
                    kind: self.kind,
                    api_version: self.kind.api_version(),
                    hint: install_hint(self.kind),
                },
            ),
            Some(403) => (
                Health::Failing,
                WatchError::Forbidden {
                    resource: resource_name(&resource),
                },
            ),
            _ => (
                Health::Failing,
                WatchError::Failed {
                    kind: self.kind,
                    source: error,
                },
            ),
        };
        if health == self.health {
            log::debug!("{error}");
            return Vec::new();
        }
        log::warn!("{error}");
        self.health = health;
        let mut changes = vec![Change::Unread(self.kind, Some(error.to_string()))];
        // A kind that is not installed has no objects: say so once, which also lets
        // the source publish without it.
        if health == Health::NotInstalled {
            changes.push(Change::Replace {
                kind: self.kind,
                objects: Vec::new(),
                unreadable: Vec::new(),
            });
        }
        changes
    }

    /// The object, or its key when it does not convert (logged).
    fn read(&self, object: DynamicObject) -> Result<Object, ObjectKey> {
        let DynamicObject {
            mut metadata, data, ..
        } = object;
        let key = key_of(&metadata);
        // Nobody here reads managedFields; they are a large part of every object.
        metadata.managed_fields = None;
        let mut value = data;
        if !value.is_object() {
            value = Value::Object(Default::default());
        }
        value["apiVersion"] = self.kind.api_version().into();
        value["kind"] = self.kind.name().into();
        value["metadata"] = match serde_json::to_value(&metadata) {
            Ok(metadata) => metadata,
            Err(error) => {
                log::warn!("{} {key}: cannot read its metadata: {error}", self.kind);
                return Err(key);
            }
        };
        Object::from_value(self.kind, value).map_err(|error| {
            log::warn!(
                "{} {key} cannot be read ({error}); its last readable version keeps applying",
                self.kind
            );
            key
        })
    }
}

fn key_of(metadata: &ObjectMeta) -> ObjectKey {
    ObjectKey::new(
        metadata.namespace.as_deref().unwrap_or_default(),
        metadata.name.as_deref().unwrap_or_default(),
    )
}

// --- statuses ----------------------------------------------------------------------

/// Why a status could not be written.
#[derive(Debug, thiserror::Error)]
enum StatusError {
    #[error("{kind} {key} changed while its status was written; writing again after the change")]
    Conflict { kind: Kind, key: ObjectKey },
    #[error(
        "the controller may not write the status of {kind} {key}: grant its \
         ServiceAccount `patch` on {resource}/status (the controller's ClusterRole)"
    )]
    Forbidden {
        kind: Kind,
        key: ObjectKey,
        resource: String,
    },
    #[error("cannot write the status of {kind} {key}: {source}; retrying on the next change")]
    Api {
        kind: Kind,
        key: ObjectKey,
        #[source]
        source: kube::Error,
    },
}

/// Writes the verdicts into the objects' statuses whenever verdicts or objects
/// change, while `leading` says this replica leads ([`crate::lease`]), until a sender
/// is dropped. A status is written only when it differs
/// from what the object says, and a write the controller has not seen come back yet
/// is not repeated; a failed write is retried on the next change.
pub async fn write_statuses(
    client: Client,
    mut statuses: watch::Receiver<Arc<Statuses>>,
    mut objects: watch::Receiver<Arc<Objects>>,
    mut leading: watch::Receiver<bool>,
) {
    let mut writer = StatusWriter {
        client,
        written: HashMap::new(),
    };
    loop {
        if *leading.borrow_and_update() {
            let verdicts = Arc::clone(&statuses.borrow_and_update());
            let current = Arc::clone(&objects.borrow_and_update());
            writer.write(&verdicts, &current).await;
        } else {
            // Another replica writes meanwhile: what this one wrote may be stale.
            writer.written.clear();
        }
        tokio::select! {
            changed = statuses.changed() => if changed.is_err() { return },
            changed = objects.changed() => if changed.is_err() { return },
            changed = leading.changed() => if changed.is_err() { return },
        }
    }
}

struct StatusWriter {
    client: Client,
    /// The last verdict written for each object, and the object's resourceVersion
    /// when it was written: until the object moves past that version, the write has
    /// not come back through the watch yet.
    written: HashMap<(Kind, ObjectKey), (Verdict, Option<String>)>,
}

impl StatusWriter {
    async fn write(&mut self, verdicts: &Statuses, objects: &Objects) {
        self.written.retain(|id, _| verdicts.contains_key(id));
        let mut writes = Vec::new();
        for (id, verdict) in verdicts {
            let Some((resource_version, write)) = plan(id.0, &id.1, verdict, objects) else {
                continue;
            };
            let pending = self.written.get(id).is_some_and(|(written, version)| {
                written == verdict && *version == resource_version
            });
            if !pending {
                writes.push((id.clone(), verdict.clone(), resource_version, write));
            }
        }
        // Owned futures: a borrowing closure here would make this future not `Send`.
        let results: Vec<_> = futures::stream::iter(writes)
            .map(|(id, verdict, resource_version, write)| {
                let client = self.client.clone();
                async move {
                    let result =
                        execute(&client, &id, &verdict, resource_version.clone(), write).await;
                    (id, verdict, resource_version, result)
                }
            })
            .buffer_unordered(CONCURRENT_WRITES)
            .collect()
            .await;
        for (id, verdict, resource_version, result) in results {
            match result {
                Ok(()) => {
                    self.written.insert(id, (verdict, resource_version));
                }
                Err(error) => {
                    if matches!(error, StatusError::Conflict { .. }) {
                        log::debug!("{error}");
                    } else {
                        log::warn!("{error}");
                    }
                    self.written.remove(&id);
                }
            }
        }
    }
}

/// A status write the controller's view of the object calls for.
#[derive(Debug)]
enum Write {
    /// The new `status` of a weft resource, whose status is all the controller's.
    Policy(Value),
    /// A route's status: its parents are shared with other controllers, so the write
    /// starts from the object as the API server has it now, every field included.
    Route,
}

/// What to write so that the status of `kind` `key` says what `verdict` says, with
/// the object's resourceVersion; `None` when it says so already or is not known.
fn plan(
    kind: Kind,
    key: &ObjectKey,
    verdict: &Verdict,
    objects: &Objects,
) -> Option<(Option<String>, Write)> {
    fn route_write(
        metadata: &ObjectMeta,
        parent_refs: Value,
        parents: Value,
        verdict: &Verdict,
    ) -> Option<(Option<String>, Write)> {
        route_status(&parent_refs, &parents, verdict)?;
        Some((metadata.resource_version.clone(), Write::Route))
    }
    fn policy_write(
        metadata: &ObjectMeta,
        status: Option<&PolicyStatus>,
        verdict: &Verdict,
    ) -> Option<(Option<String>, Write)> {
        let status = policy_status(status, verdict)?;
        Some((metadata.resource_version.clone(), Write::Policy(status)))
    }
    match kind {
        Kind::PeerAuthentication => {
            let object = objects.peer_authentications.get(key)?;
            policy_write(&object.metadata, object.status.as_ref(), verdict)
        }
        Kind::AuthorizationPolicy => {
            let object = objects.authorization_policies.get(key)?;
            policy_write(&object.metadata, object.status.as_ref(), verdict)
        }
        Kind::TrafficPolicy => {
            let object = objects.traffic_policies.get(key)?;
            policy_write(&object.metadata, object.status.as_ref(), verdict)
        }
        Kind::FaultInjection => {
            let object = objects.fault_injections.get(key)?;
            policy_write(&object.metadata, object.status.as_ref(), verdict)
        }
        Kind::HttpRoute => {
            let route = objects.http_routes.get(key)?;
            route_write(
                &route.metadata,
                serde_json::to_value(&route.spec.parent_refs).ok()?,
                serde_json::to_value(route.status.as_ref().map(|status| &status.parents)).ok()?,
                verdict,
            )
        }
        Kind::GrpcRoute => {
            let route = objects.grpc_routes.get(key)?;
            route_write(
                &route.metadata,
                serde_json::to_value(&route.spec.parent_refs).ok()?,
                serde_json::to_value(route.status.as_ref().map(|status| &status.parents)).ok()?,
                verdict,
            )
        }
        Kind::Namespace
        | Kind::Node
        | Kind::Pod
        | Kind::Service
        | Kind::EndpointSlice
        | Kind::ReferenceGrant => None,
    }
}

/// Carries out `write` with a merge patch of the status subresource. The patch
/// carries the resourceVersion the status was computed from, so the API server
/// refuses it (409) if the object changed in between.
async fn execute(
    client: &Client,
    (kind, key): &(Kind, ObjectKey),
    verdict: &Verdict,
    resource_version: Option<String>,
    write: Write,
) -> Result<(), StatusError> {
    let kind = *kind;
    let resource = api_resource(kind);
    let api = Api::<DynamicObject>::namespaced_with(client.clone(), &key.namespace, &resource);
    let api_error = |source: kube::Error| match source {
        kube::Error::Api(status) if status.code == 409 => StatusError::Conflict {
            kind,
            key: key.clone(),
        },
        kube::Error::Api(status) if status.code == 403 => StatusError::Forbidden {
            kind,
            key: key.clone(),
            resource: resource_name(&resource),
        },
        source => StatusError::Api {
            kind,
            key: key.clone(),
            source,
        },
    };
    let (resource_version, status) = match write {
        Write::Policy(status) => (resource_version, status),
        Write::Route => {
            let Some(current) = api.get_opt(&key.name).await.map_err(api_error)? else {
                // Deleted since the controller saw it.
                return Ok(());
            };
            let data = &current.data;
            let Some(status) = route_status(
                &data["spec"]["parentRefs"],
                &data["status"]["parents"],
                verdict,
            ) else {
                return Ok(());
            };
            (current.metadata.resource_version, status)
        }
    };
    let mut patch = json!({ "status": status });
    if let Some(version) = resource_version {
        patch["metadata"] = json!({ "resourceVersion": version });
    }
    let params = PatchParams {
        field_manager: Some("weft-controller".to_owned()),
        ..Default::default()
    };
    api.patch_status(&key.name, &params, &Patch::Merge(&patch))
        .await
        .map_err(api_error)?;
    log::debug!("wrote the status of {kind} {key}");
    Ok(())
}

/// Whether `current` says what `desired` says (the transition time aside).
fn same_condition(current: &Condition, desired: &Condition) -> bool {
    current.status == desired.status
        && current.reason == desired.reason
        && current.message == desired.message
        && current.observed_generation == desired.observed_generation
}

fn accepted(conditions: &[Condition]) -> Option<&Condition> {
    conditions
        .iter()
        .find(|condition| condition.type_ == ACCEPTED)
}

/// A weft resource's new `status`, other condition types kept; `None` if unchanged.
fn policy_status(status: Option<&PolicyStatus>, verdict: &Verdict) -> Option<Value> {
    let conditions = status
        .map(|status| status.conditions.as_slice())
        .unwrap_or_default();
    let previous = accepted(conditions);
    let condition = verdict.condition(previous);
    if previous.is_some_and(|previous| same_condition(previous, &condition)) {
        return None;
    }
    let mut conditions = conditions.to_vec();
    match conditions.iter_mut().find(|c| c.type_ == ACCEPTED) {
        Some(slot) => *slot = condition,
        None => conditions.push(condition),
    }
    Some(json!({ "conditions": conditions }))
}

/// A route's new `status`: one entry of ours per Service parent, the entries of other
/// controllers as they are; `None` if unchanged. Works on JSON so that HTTPRoute and
/// GRPCRoute share it (their parent references and status entries have one shape).
fn route_status(parent_refs: &Value, parents: &Value, verdict: &Verdict) -> Option<Value> {
    // Each Service parent once, with its (first) index in spec.parentRefs.
    let mut services: Vec<(usize, Value)> = Vec::new();
    for (index, parent) in parent_refs.as_array().into_iter().flatten().enumerate() {
        if is_service(parent) && !services.iter().any(|(_, known)| known == parent) {
            services.push((index, parent.clone()));
        }
    }
    let (ours, others): (Vec<Value>, Vec<Value>) = parents
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .partition(|entry| entry["controllerName"] == CONTROLLER_NAME);
    let previous = |parent: &Value, kind: &str| -> Option<Condition> {
        let entry = ours.iter().find(|entry| entry["parentRef"] == *parent)?;
        let conditions: Vec<Condition> =
            serde_json::from_value(entry["conditions"].clone()).ok()?;
        conditions
            .into_iter()
            .find(|condition| condition.type_ == kind)
    };
    let conditions = |index: usize, parent: &Value| -> Vec<Condition> {
        let verdict = verdict.for_parent(index);
        let accepted = verdict.condition(previous(parent, ACCEPTED).as_ref());
        let references = verdict.references_condition(previous(parent, RESOLVED_REFS).as_ref());
        std::iter::once(accepted).chain(references).collect()
    };
    let unchanged = ours.len() == services.len()
        && services.iter().all(|(index, parent)| {
            conditions(*index, parent).iter().all(|desired| {
                previous(parent, &desired.type_)
                    .is_some_and(|current| same_condition(&current, desired))
            })
        });
    if unchanged {
        return None;
    }
    let mut entries = others;
    for (index, parent) in &services {
        entries.push(json!({
            "parentRef": parent,
            "controllerName": CONTROLLER_NAME,
            "conditions": conditions(*index, parent),
        }));
    }
    Some(json!({ "parents": entries }))
}

/// A parent reference to a Service (the mesh profile of the Gateway API), as the
/// compiler reads them: the core group and an explicit `kind: Service`.
fn is_service(parent: &Value) -> bool {
    matches!(
        parent.get("group").and_then(Value::as_str),
        None | Some("" | "core")
    ) && parent["kind"] == "Service"
}

// --- tokens ------------------------------------------------------------------------

/// Finds out which node an agent runs on from its pod's service account token, by
/// asking the API server (`TokenReview`, which the controller must be allowed to
/// create, as `system:auth-delegator` allows).
#[derive(Clone, Debug)]
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audience: String,
    /// The agents' service account, `system:serviceaccount:<namespace>:<name>`: a
    /// token of any other (a workload's, say) proves nothing about being an agent.
    agent: String,
}

impl TokenReviewer {
    /// Reviews tokens that must be meant for `audience` and belong to the service
    /// account `agent` (`<namespace>/<name>`).
    pub fn new(client: Client, audience: String, agent: &str) -> Self {
        let (namespace, name) = agent.split_once('/').unwrap_or(("", agent));
        Self {
            api: Api::all(client),
            audience,
            agent: format!("system:serviceaccount:{namespace}:{name}"),
        }
    }

    /// The node of the pod `token` was issued to.
    pub async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let reviewed = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|source| AuthError::TokenReview { source })?;
        let status = reviewed.status.unwrap_or_default();
        let for_audience = status
            .audiences
            .as_ref()
            .is_none_or(|audiences| audiences.contains(&self.audience));
        if status.authenticated != Some(true) || !for_audience {
            let reason = status
                .error
                .filter(|error| !error.is_empty())
                .unwrap_or_else(|| "not authenticated".to_owned());
            return Err(AuthError::Unauthenticated {
                reason,
                audience: self.audience.clone(),
            });
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let service_account = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(namespace, name)| !namespace.is_empty() && !name.is_empty());
        if !service_account {
            return Err(AuthError::NotServiceAccount { user: username });
        }
        if username != self.agent {
            return Err(AuthError::NotAgent {
                user: username,
                agent: self.agent.clone(),
            });
        }
        user.extra
            .unwrap_or_default()
            .remove(NODE_NAME_EXTRA)
            .and_then(|nodes| nodes.into_iter().next())
            .filter(|node| !node.is_empty())
            .ok_or(AuthError::NotPodBound { user: username })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Reason;

    #[test]
    fn every_kind_is_served_where_the_controller_expects_it() {
        for kind in Kind::ALL {
            let resource = api_resource(kind);
            assert_eq!(resource.api_version, kind.api_version(), "{kind}");
            assert_eq!(resource.kind, kind.name(), "{kind}");
        }
    }

    fn condition(verdict: &Verdict) -> Value {
        serde_json::to_value(verdict.condition(None)).unwrap()
    }

    #[test]
    fn route_status_replaces_only_our_entries() {
        let verdict = Verdict::rejected(Reason::ServiceNotFound, "no such service");
        let refs = json!([
            { "group": "", "kind": "Service", "name": "web" },
            { "name": "gateway" },
            { "group": "", "kind": "Service", "name": "web" },
        ]);
        let theirs = json!({
            "parentRef": { "name": "gateway" },
            "controllerName": "example.net/gateway",
            "conditions": [],
        });
        let stale = json!({
            "parentRef": { "group": "", "kind": "Service", "name": "old" },
            "controllerName": CONTROLLER_NAME,
            "conditions": [],
        });
        let status = route_status(&refs, &json!([theirs, stale]), &verdict).unwrap();
        let parents = status["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2, "{status}");
        assert_eq!(parents[0], theirs);
        assert_eq!(parents[1]["parentRef"]["name"], "web");
        assert_eq!(parents[1]["conditions"][0]["reason"], "ServiceNotFound");

        let written = json!([theirs, {
            "parentRef": { "group": "", "kind": "Service", "name": "web" },
            "controllerName": CONTROLLER_NAME,
            "conditions": [condition(&verdict)],
        }]);
        assert_eq!(route_status(&refs, &written, &verdict), None);
    }

    #[test]
    fn route_status_speaks_per_parent_and_reports_references() {
        let verdict = Verdict {
            refused_parents: vec![crate::status::RefusedParent {
                index: 1,
                reason: Reason::NoMatchingParent,
                message: "spec.parentRefs[1]: there is no Service shop/gone".into(),
            }],
            ..Verdict::accepted(Reason::Accepted, "routes").with_references(
                crate::status::References {
                    resolved: false,
                    reason: Reason::BackendNotFound,
                    message: "no such backend".into(),
                },
            )
        };
        let refs = json!([
            { "group": "", "kind": "Service", "name": "web" },
            { "group": "", "kind": "Service", "name": "gone" },
        ]);
        let status = route_status(&refs, &json!([]), &verdict).unwrap();
        let parents = status["parents"].as_array().unwrap();
        let summary: Vec<(Value, Value, Value)> = parents
            .iter()
            .map(|entry| {
                (
                    entry["parentRef"]["name"].clone(),
                    entry["conditions"][0]["reason"].clone(),
                    entry["conditions"][1]["reason"].clone(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (json!("web"), json!("Accepted"), json!("BackendNotFound")),
                (
                    json!("gone"),
                    json!("NoMatchingParent"),
                    json!("BackendNotFound")
                ),
            ]
        );
        let written = status["parents"].clone();
        assert_eq!(route_status(&refs, &written, &verdict), None, "unchanged");
    }

    #[test]
    fn policy_status_keeps_other_conditions_and_transition_times() {
        let verdict = Verdict::accepted(Reason::Accepted, "applies").for_generation(Some(2));
        // Whole seconds: that is what survives serialization.
        let then = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            "2020-01-01T00:00:00Z".parse().unwrap(),
        );
        let other = Condition {
            type_: "Ready".to_owned(),
            status: "True".to_owned(),
            last_transition_time: then.clone(),
            ..verdict.condition(None)
        };
        let mut old = verdict.condition(None);
        old.observed_generation = Some(1);
        old.last_transition_time = then;
        let status = PolicyStatus {
            conditions: vec![other.clone(), old.clone()],
        };
        let patch = policy_status(Some(&status), &verdict).unwrap();
        let conditions: Vec<Condition> =
            serde_json::from_value(patch["conditions"].clone()).unwrap();
        assert_eq!(conditions[0], other);
        assert_eq!(conditions[1].observed_generation, Some(2));
        assert_eq!(conditions[1].last_transition_time, old.last_transition_time);

        let current = PolicyStatus { conditions };
        assert_eq!(policy_status(Some(&current), &verdict), None);
    }
}
