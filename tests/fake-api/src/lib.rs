//! A fake Kubernetes API server over plain HTTP/1.1 on loopback, close enough to the
//! real one that kube-rs clients and watchers run against it unchanged:
//!
//! - per-collection storage with one global, increasing resourceVersion;
//! - LIST (`limit`/`continue` pages, each with the list's resourceVersion; equality
//!   `labelSelector`s);
//! - WATCH from a resourceVersion: the events after it, periodic BOOKMARKs, and a
//!   single `410 Expired` ERROR event when that version is older than the last
//!   compaction (the client must then list again);
//! - GET of one object, `404 NotFound` when there is none;
//! - POST (create): `409 AlreadyExists` when the name is taken, a new resourceVersion
//!   otherwise;
//! - PUT (replace): `404 NotFound` when there is nothing to replace, `409 Conflict`
//!   when the body's `metadata.resourceVersion` is not the stored one (none or empty
//!   replaces unconditionally, as the real server allows for these kinds);
//! - PATCH of the status subresource with a JSON merge patch (and a
//!   `metadata.resourceVersion` precondition, as the real server checks);
//! - TokenReviews answered from a table of tokens;
//! - `404` for the kinds a test marks as not installed;
//! - pod port-forwards over WebSocket (`v4.channel.k8s.io`, as kube-rs and kubectl
//!   speak it), to where a dialer the test sets reaches the pod's port
//!   ([`FakeApi::set_dialer`]; the pod's IP by default);
//! - authentication: a bearer token of the token table is its user; a request without
//!   one is the controller's service account (what [`FakeApi::client`] sends);
//! - RBAC: every request is checked against the roles and bindings of
//!   `deploy/install.yaml` ([`rbac`]), plus those a test adds as an operator would
//!   ([`FakeApi::bind`]), and refused `403 Forbidden` when they do not allow it. A
//!   refusal a test did not take back with [`FakeApi::take_forbidden`] fails the test
//!   when the server is dropped, so a new watch, write or port-forward without a rule
//!   is caught.
//!
//! Creates and replaces take the same path whether a client sends them or a test
//! calls [`FakeApi::create`] or [`FakeApi::update`] (which panic where the server
//! would answer with an error). Tests change objects directly (those two and
//! [`FakeApi::delete`]), compact the history, break and hold open watches to simulate
//! an outage, and count the requests the client made by verb and path.

pub mod rbac;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    convert::Infallible,
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

pub use rbac::Subject;
use rbac::{Access, Rbac};

/// Connects to a pod's port, as the kubelet would for a port-forward.
pub type Dialer = Arc<dyn Fn(&Value, u16) -> std::io::Result<TcpStream> + Send + Sync>;

/// The WebSocket subprotocol of port-forwards the fake speaks.
const PORT_FORWARD_PROTOCOL: &str = "v4.channel.k8s.io";

type Body = BoxBody<Bytes, Infallible>;

/// A collection the fake serves.
#[derive(Debug)]
struct Resource {
    api_version: &'static str,
    kind: &'static str,
    plural: &'static str,
    namespaced: bool,
}

impl Resource {
    /// The name the server's messages give the collection: `secrets`,
    /// `httproutes.gateway.networking.k8s.io`.
    fn qualified(&self) -> String {
        match self.api_version.split_once('/') {
            Some((group, _)) => format!("{}.{group}", self.plural),
            None => self.plural.to_owned(),
        }
    }
}

const RESOURCES: &[Resource] = &[
    Resource {
        api_version: "v1",
        kind: "Namespace",
        plural: "namespaces",
        namespaced: false,
    },
    Resource {
        api_version: "v1",
        kind: "Node",
        plural: "nodes",
        namespaced: false,
    },
    Resource {
        api_version: "v1",
        kind: "Pod",
        plural: "pods",
        namespaced: true,
    },
    Resource {
        api_version: "v1",
        kind: "Secret",
        plural: "secrets",
        namespaced: true,
    },
    Resource {
        api_version: "v1",
        kind: "Service",
        plural: "services",
        namespaced: true,
    },
    Resource {
        api_version: "discovery.k8s.io/v1",
        kind: "EndpointSlice",
        plural: "endpointslices",
        namespaced: true,
    },
    Resource {
        api_version: "weft.dev/v1alpha1",
        kind: "PeerAuthentication",
        plural: "peerauthentications",
        namespaced: true,
    },
    Resource {
        api_version: "weft.dev/v1alpha1",
        kind: "AuthorizationPolicy",
        plural: "authorizationpolicies",
        namespaced: true,
    },
    Resource {
        api_version: "weft.dev/v1alpha1",
        kind: "TrafficPolicy",
        plural: "trafficpolicies",
        namespaced: true,
    },
    Resource {
        api_version: "weft.dev/v1alpha1",
        kind: "FaultInjection",
        plural: "faultinjections",
        namespaced: true,
    },
    Resource {
        api_version: "gateway.networking.k8s.io/v1",
        kind: "HTTPRoute",
        plural: "httproutes",
        namespaced: true,
    },
    Resource {
        api_version: "gateway.networking.k8s.io/v1",
        kind: "GRPCRoute",
        plural: "grpcroutes",
        namespaced: true,
    },
    Resource {
        api_version: "gateway.networking.k8s.io/v1",
        kind: "ReferenceGrant",
        plural: "referencegrants",
        namespaced: true,
    },
    Resource {
        api_version: "coordination.k8s.io/v1",
        kind: "Lease",
        plural: "leases",
        namespaced: true,
    },
];

/// The resource of `kind` (a test's mistake if there is none).
fn resource(kind: &str) -> &'static Resource {
    RESOURCES
        .iter()
        .find(|resource| resource.kind == kind)
        .unwrap_or_else(|| panic!("the fake API server does not serve kind {kind}"))
}

/// Namespace ("" for cluster-scoped objects) and name.
type Key = (String, String);

fn key_of(object: &Value) -> Key {
    let metadata = &object["metadata"];
    (
        metadata["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        metadata["name"].as_str().unwrap_or_default().to_owned(),
    )
}

#[derive(Debug, Default)]
struct Collection {
    objects: BTreeMap<Key, Value>,
    /// `(resourceVersion, type, object)`, oldest first, since the last compaction.
    events: Vec<(u64, &'static str, Value)>,
    /// The newest event compaction removed.
    compacted: u64,
}

#[derive(Debug)]
struct Token {
    audiences: Vec<String>,
    user: Value,
}

#[derive(Debug)]
struct State {
    version: u64,
    /// Watches from before this version get `410 Gone`.
    compacted: u64,
    /// By kind.
    collections: HashMap<&'static str, Collection>,
    /// Kinds whose collections answer 404.
    not_installed: BTreeSet<&'static str>,
    tokens: HashMap<String, Token>,
    /// `(verb, path)` of every request, as Kubernetes audit logs name verbs.
    requests: Vec<(&'static str, String)>,
    bookmark_interval: Duration,
    /// Bookmarks sent, by kind.
    bookmarks: HashMap<&'static str, usize>,
    rbac: Rbac,
    /// The messages of the requests RBAC refused.
    forbidden: Vec<String>,
    /// Open watches end when this moves.
    epoch: u64,
    /// New watches wait while this is set.
    held: bool,
}

impl State {
    /// Stores `object` (or removes it, for `DELETED`) at a new resourceVersion and
    /// records the event; returns the object as stored.
    fn write(&mut self, kind: &'static str, event: &'static str, mut object: Value) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = self.version.to_string().into();
        let collection = self.collections.entry(kind).or_default();
        let key = key_of(&object);
        if event == "DELETED" {
            collection.objects.remove(&key);
        } else {
            collection.objects.insert(key, object.clone());
        }
        collection
            .events
            .push((self.version, event, object.clone()));
        object
    }

    fn stored(&self, kind: &str, key: &Key) -> Option<&Value> {
        self.collections.get(kind)?.objects.get(key)
    }

    /// Stores a new object as a create does; `Err` holds the `Status` the server
    /// answers.
    fn create(&mut self, resource: &'static Resource, mut object: Value) -> Result<Value, Value> {
        let key = key_of(&object);
        if self.stored(resource.kind, &key).is_some() {
            let message = format!("{} \"{}\" already exists", resource.qualified(), key.1);
            return Err(status(409, "AlreadyExists", &message));
        }
        let metadata = &mut object["metadata"];
        metadata["uid"] = format!("uid-{}", self.version + 1).into();
        metadata["generation"] = 1.into();
        metadata["creationTimestamp"] = "2025-01-01T00:00:00Z".into();
        Ok(self.write(resource.kind, "ADDED", object))
    }

    /// Replaces an object as a PUT does: only if its `metadata.resourceVersion`, when
    /// it has one, is the stored one; the status stays, the generation moves when the
    /// spec changes. `Err` holds the `Status` the server answers.
    fn update(&mut self, resource: &'static Resource, mut object: Value) -> Result<Value, Value> {
        let key = key_of(&object);
        let Some(old) = self.stored(resource.kind, &key).cloned() else {
            return Err(not_found(resource, &key.1));
        };
        if let Some(version) = object["metadata"]["resourceVersion"]
            .as_str()
            .filter(|version| !version.is_empty())
            && old["metadata"]["resourceVersion"] != version
        {
            return Err(conflict(resource, &key.1));
        }
        for field in ["uid", "creationTimestamp", "generation"] {
            object["metadata"][field] = old["metadata"][field].clone();
        }
        if object["spec"] != old["spec"] {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(0) + 1;
            object["metadata"]["generation"] = generation.into();
        }
        match old.get("status") {
            Some(status) => object["status"] = status.clone(),
            None => {
                if let Some(object) = object.as_object_mut() {
                    object.remove("status");
                }
            }
        }
        Ok(self.write(resource.kind, "MODIFIED", object))
    }
}

#[derive(Clone)]
struct Shared {
    state: Arc<Mutex<State>>,
    dialer: Arc<Mutex<Dialer>>,
    /// Ticks whenever the state changes.
    changed: Arc<watch::Sender<()>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("a test thread panicked holding the fake's state")
    }

    fn notify(&self) {
        self.changed.send_replace(());
    }
}

/// A running fake API server; it stops when dropped.
pub struct FakeApi {
    shared: Shared,
    url: String,
    server: JoinHandle<()>,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi").field("url", &self.url).finish()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.server.abort();
        // A test that failed has said why; a second panic here would only abort.
        if std::thread::panicking() {
            return;
        }
        let forbidden = std::mem::take(&mut self.shared.lock().forbidden);
        assert!(
            forbidden.is_empty(),
            "the roles in deploy/install.yaml do not allow what a client did: {forbidden:#?}"
        );
    }
}

impl FakeApi {
    /// Serves on a free port of 127.0.0.1, with every kind installed and bookmarks
    /// every second.
    pub async fn start() -> FakeApi {
        let _ = env_logger::builder().is_test(true).try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shared = Shared {
            state: Arc::new(Mutex::new(State {
                version: 100,
                compacted: 0,
                collections: HashMap::new(),
                not_installed: BTreeSet::new(),
                tokens: HashMap::new(),
                requests: Vec::new(),
                bookmark_interval: Duration::from_secs(1),
                bookmarks: HashMap::new(),
                rbac: Rbac::of_install_manifest(),
                forbidden: Vec::new(),
                epoch: 0,
                held: false,
            })),
            dialer: Arc::new(Mutex::new(Arc::new(dial_pod_ip))),
            changed: Arc::new(watch::channel(()).0),
        };
        let server = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            handle(shared.clone(), request)
                        });
                        // Fails when a client goes away mid-watch, which is its right.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .with_upgrades()
                            .await;
                    });
                }
            }
        });
        FakeApi {
            shared,
            url,
            server,
        }
    }

    /// The server's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of this server, as the controller's service account.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Creates `object` (its `kind` says where); returns it as stored.
    pub fn create(&self, object: Value) -> Value {
        let resource = resource(object["kind"].as_str().unwrap_or_default());
        assert_eq!(object["apiVersion"], resource.api_version, "{object}");
        let key = key_of(&object);
        assert_eq!(
            !key.0.is_empty(),
            resource.namespaced,
            "namespace of {object}"
        );
        let mut state = self.shared.lock();
        assert!(
            !state.not_installed.contains(resource.kind),
            "{} is not installed",
            resource.kind
        );
        let stored = state
            .create(resource, object)
            .unwrap_or_else(|status| panic!("{}", status["message"]));
        drop(state);
        self.shared.notify();
        stored
    }

    /// Replaces an object as a PUT would (see [`State::update`]).
    pub fn update(&self, object: Value) -> Value {
        let resource = resource(object["kind"].as_str().unwrap_or_default());
        let mut state = self.shared.lock();
        let stored = state
            .update(resource, object)
            .unwrap_or_else(|status| panic!("{}", status["message"]));
        drop(state);
        self.shared.notify();
        stored
    }

    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let resource = resource(kind);
        let key = (namespace.to_owned(), name.to_owned());
        let mut state = self.shared.lock();
        let object = state
            .stored(resource.kind, &key)
            .unwrap_or_else(|| panic!("no {kind} {key:?} to delete"))
            .clone();
        state.write(resource.kind, "DELETED", object);
        drop(state);
        self.shared.notify();
    }

    /// The stored object.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (namespace.to_owned(), name.to_owned());
        self.shared
            .lock()
            .stored(resource(kind).kind, &key)
            .cloned()
    }

    /// Forgets the history up to now: watches and list pages from before get
    /// `410 Gone`.
    pub fn compact(&self) {
        let mut state = self.shared.lock();
        let version = state.version;
        state.compacted = version;
        for collection in state.collections.values_mut() {
            if let Some(&(newest, ..)) = collection.events.last() {
                collection.compacted = collection.compacted.max(newest);
            }
            collection.events.clear();
        }
        drop(state);
        self.shared.notify();
    }

    /// Installs or uninstalls the CRD of `kind`.
    pub fn set_installed(&self, kind: &str, installed: bool) {
        let kind = resource(kind).kind;
        let mut state = self.shared.lock();
        if installed {
            state.not_installed.remove(kind);
        } else {
            state.not_installed.insert(kind);
        }
    }

    /// Makes `token` authenticate `user` (a TokenReview `status.user`) for
    /// `audiences`.
    pub fn add_token(&self, token: &str, audiences: &[&str], user: Value) {
        let audiences = audiences.iter().map(|a| (*a).to_owned()).collect();
        self.shared
            .lock()
            .tokens
            .insert(token.to_owned(), Token { audiences, user });
    }

    /// Binds `role` to `subject` as `kubectl create rolebinding` (with `namespace`)
    /// or `clusterrolebinding` (without) would.
    pub fn bind(&self, subject: Subject, role_kind: &str, role: &str, namespace: Option<&str>) {
        self.shared
            .lock()
            .rbac
            .bind(subject, role_kind, role, namespace);
    }

    /// Makes port-forwards reach pods through `dialer`.
    pub fn set_dialer(&self, dialer: Dialer) {
        *self
            .shared
            .dialer
            .lock()
            .expect("a test thread panicked holding the dialer") = dialer;
    }

    /// How many requests with `verb` (`list`, `watch`, `get`, `create`, `update`,
    /// `patch`) went to `path` (port-forwards are `create`s of
    /// `…/pods/NAME/portforward`).
    pub fn requests(&self, verb: &str, path: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|(v, p)| *v == verb && p == path)
            .count()
    }

    /// The requests RBAC refused so far (their messages), forgotten: a test that
    /// expects refusals takes them back.
    pub fn take_forbidden(&self) -> Vec<String> {
        std::mem::take(&mut self.shared.lock().forbidden)
    }

    pub fn set_bookmark_interval(&self, interval: Duration) {
        self.shared.lock().bookmark_interval = interval;
    }

    /// Bookmarks sent to watches of `kind` so far.
    pub fn bookmarks_sent(&self, kind: &str) -> usize {
        let kind = resource(kind).kind;
        self.shared
            .lock()
            .bookmarks
            .get(kind)
            .copied()
            .unwrap_or_default()
    }

    /// Ends every open watch, and keeps new watch requests waiting (no response)
    /// until [`FakeApi::release_watches`]: an outage between client and server.
    pub fn hold_watches(&self) {
        let mut state = self.shared.lock();
        state.epoch += 1;
        state.held = true;
        drop(state);
        self.shared.notify();
    }

    pub fn release_watches(&self) {
        self.shared.lock().held = false;
        self.shared.notify();
    }
}

/// What a request names.
struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    /// `status` or `portforward`.
    subresource: Option<&'static str>,
}

fn target(path: &str) -> Option<Target> {
    let (api_version, rest) = if let Some(rest) = path.strip_prefix("/api/v1") {
        ("v1".to_owned(), rest)
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let mut parts = rest.splitn(3, '/');
        let group = parts.next()?;
        let version = parts.next()?;
        (
            format!("{group}/{version}"),
            parts.next().unwrap_or_default(),
        )
    };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let (namespace, segments) = match segments.as_slice() {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some((*namespace).to_owned()), rest)
        }
        all => (None, all),
    };
    let (plural, name, subresource) = match segments {
        [plural] => (*plural, None, None),
        [plural, name] => (*plural, Some((*name).to_owned()), None),
        [plural, name, "status"] => (*plural, Some((*name).to_owned()), Some("status")),
        ["pods", name, "portforward"] => ("pods", Some((*name).to_owned()), Some("portforward")),
        _ => return None,
    };
    let resource = RESOURCES
        .iter()
        .find(|r| r.api_version == api_version && r.plural == plural)?;
    if namespace.is_some() && !resource.namespaced {
        return None;
    }
    Some(Target {
        resource,
        namespace,
        name,
        subresource,
    })
}

/// The request's query, decoded as the API server decodes it.
fn query(request: &Request<Incoming>) -> HashMap<String, String> {
    let query = request.uri().query().unwrap_or_default();
    form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect()
}

fn full(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

/// A `Status` object, as the API server reports failures.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// The response carrying `status`, with its code.
fn reply(status: &Value) -> Response<Body> {
    let code = status["code"]
        .as_u64()
        .and_then(|code| u16::try_from(code).ok());
    full(StatusCode::from_u16(code.unwrap_or(500)).unwrap(), status)
}

fn failure(code: u16, reason: &str, message: &str) -> Response<Body> {
    reply(&status(code, reason, message))
}

fn not_found(resource: &Resource, name: &str) -> Value {
    let message = format!("{} \"{name}\" not found", resource.qualified());
    status(404, "NotFound", &message)
}

fn conflict(resource: &Resource, name: &str) -> Value {
    let message = format!(
        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
         please apply your changes to the latest version and try again",
        resource.qualified()
    );
    status(409, "Conflict", &message)
}

async fn handle(
    shared: Shared,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_owned();
    let query = query(&request);
    let subject = match authenticate(&shared, &request) {
        Ok(subject) => subject,
        Err(refused) => {
            shared.lock().requests.push(("unauthorized", path));
            return Ok(reply(&refused));
        }
    };
    if request.method() == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        shared.lock().requests.push(("create", path));
        let access = Access {
            verb: "create",
            group: "authentication.k8s.io",
            resource: "tokenreviews",
            namespace: None,
            name: None,
        };
        if let Some(refused) = authorize(&shared, &subject, access) {
            return Ok(refused);
        }
        let body = request.into_body().collect().await.map(|b| b.to_bytes());
        return Ok(token_review(&shared, body.as_deref().unwrap_or_default()));
    }
    let Some(target) = target(&path) else {
        shared.lock().requests.push(("unknown", path));
        return Ok(failure(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    let verb = match (request.method(), &target.name, target.subresource) {
        (&Method::GET, None, None) if query.get("watch").is_some_and(|w| w == "true") => "watch",
        (&Method::GET, None, None) => "list",
        (&Method::GET, Some(_), None) => "get",
        (&Method::POST, None, None) => "create",
        (&Method::PUT, Some(_), None) => "update",
        (&Method::PATCH, Some(_), Some("status")) => "patch",
        // A WebSocket port-forward is a GET, which the server authorizes as the
        // `create` it is (as Kubernetes does since the WebSocket streaming
        // protocols replaced SPDY).
        (&Method::GET, Some(_), Some("portforward")) => "create",
        _ => {
            shared.lock().requests.push(("unsupported", path));
            return Ok(failure(
                405,
                "MethodNotAllowed",
                "not supported by the fake",
            ));
        }
    };
    shared.lock().requests.push((verb, path));
    let group = match target.resource.api_version.split_once('/') {
        Some((group, _)) => group,
        None => "",
    };
    let resource = match target.subresource {
        Some(subresource) => format!("{}/{subresource}", target.resource.plural),
        None => target.resource.plural.to_owned(),
    };
    let access = Access {
        verb,
        group,
        resource: &resource,
        namespace: target.namespace.as_deref(),
        name: target.name.as_deref(),
    };
    if let Some(refused) = authorize(&shared, &subject, access) {
        return Ok(refused);
    }
    let installed = !shared.lock().not_installed.contains(target.resource.kind);
    if !installed {
        return Ok(failure(
            404,
            "NotFound",
            "the server could not find the requested resource",
        ));
    }
    if target.subresource == Some("portforward") {
        return Ok(port_forward(&shared, &target, &query, &mut request));
    }
    Ok(match verb {
        "watch" => watch(shared, target, &query).await,
        "list" => list(&shared, &target, &query),
        "get" => get(&shared, &target),
        "create" | "update" => {
            let body = request.into_body().collect().await.map(|b| b.to_bytes());
            match serde_json::from_slice(body.as_deref().unwrap_or_default()) {
                Ok(object) => write_object(&shared, &target, verb, object),
                Err(err) => failure(400, "BadRequest", &err.to_string()),
            }
        }
        _ => {
            let content_type = request
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            if !content_type.starts_with("application/merge-patch+json") {
                return Ok(failure(
                    415,
                    "UnsupportedMediaType",
                    "the fake takes merge patches only",
                ));
            }
            let body = request.into_body().collect().await.map(|b| b.to_bytes());
            match serde_json::from_slice(body.as_deref().unwrap_or_default()) {
                Ok(patch) => patch_status(&shared, &target, &patch),
                Err(err) => failure(400, "BadRequest", &err.to_string()),
            }
        }
    })
}

/// Who sent `request`: the user of its bearer token, or the controller's service
/// account when it has none; `Err` is the `401` `Status` for a token nobody issued.
fn authenticate(shared: &Shared, request: &Request<Incoming>) -> Result<Subject, Value> {
    let Some(authorization) = request.headers().get(header::AUTHORIZATION) else {
        return Ok(Subject::controller());
    };
    let token = authorization
        .to_str()
        .ok()
        .and_then(|value| value.strip_prefix("Bearer "));
    let state = shared.lock();
    token
        .and_then(|token| state.tokens.get(token))
        .and_then(|known| known.user["username"].as_str())
        .map(Subject::of_username)
        .ok_or_else(|| status(401, "Unauthorized", "Unauthorized"))
}

/// `None` when RBAC allows `access` by `subject`; else the `403` the server
/// answers, recorded.
fn authorize(shared: &Shared, subject: &Subject, access: Access<'_>) -> Option<Response<Body>> {
    let mut state = shared.lock();
    if state.rbac.allows(subject, access) {
        return None;
    }
    let message = Rbac::forbidden(subject, access);
    state.forbidden.push(message.clone());
    Some(failure(403, "Forbidden", &message))
}

/// The `key=value` pairs of the request's equality-based `labelSelector`; `Err` is
/// the `400` `Status` for a selector the fake does not take (set-based, `!=`).
fn label_selector(query: &HashMap<String, String>) -> Result<Vec<(String, String)>, Value> {
    let Some(selector) = query.get("labelSelector") else {
        return Ok(Vec::new());
    };
    selector
        .split(',')
        .filter(|term| !term.is_empty())
        .map(|term| {
            let (key, value) = term
                .split_once("==")
                .or_else(|| term.split_once('='))
                .filter(|(key, _)| !key.ends_with('!'))
                .ok_or_else(|| {
                    status(
                        400,
                        "BadRequest",
                        "the fake takes equality label selectors only",
                    )
                })?;
            Ok((key.to_owned(), value.to_owned()))
        })
        .collect()
}

/// Whether `object`'s labels hold every pair of `selector`.
fn selected(object: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(key, value)| object["metadata"]["labels"][key] == value.as_str())
}

fn in_namespace(namespace: &Option<String>, key: &Key) -> bool {
    namespace
        .as_ref()
        .is_none_or(|namespace| *namespace == key.0)
}

fn hex(text: &str) -> String {
    text.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<String> {
    let bytes: Option<Vec<u8>> = (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Response<Body> {
    let selector = match label_selector(query) {
        Ok(selector) => selector,
        Err(refused) => return reply(&refused),
    };
    let state = shared.lock();
    let limit = query
        .get("limit")
        .and_then(|limit| limit.parse::<usize>().ok())
        .filter(|&limit| limit > 0)
        .unwrap_or(usize::MAX);
    // A continue token: the list's resourceVersion and the last key it returned.
    let (version, after) = match query.get("continue") {
        Some(token) => {
            let parsed = token.split_once('-').and_then(|(version, key)| {
                let key = unhex(key)?;
                let (namespace, name) = key.split_once('/')?;
                Some((
                    version.parse::<u64>().ok()?,
                    (namespace.to_owned(), name.to_owned()),
                ))
            });
            match parsed {
                Some((version, key)) => (version, Some(key)),
                None => return failure(400, "BadRequest", "malformed continue token"),
            }
        }
        None => (state.version, None),
    };
    if version < state.compacted {
        return failure(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result.",
        );
    }
    let mut items: Vec<&Value> = Vec::new();
    let mut more = false;
    if let Some(collection) = state.collections.get(target.resource.kind) {
        for (key, object) in &collection.objects {
            if !in_namespace(&target.namespace, key)
                || after.as_ref().is_some_and(|a| key <= a)
                || !selected(object, &selector)
            {
                continue;
            }
            if items.len() == limit {
                more = true;
                break;
            }
            items.push(object);
        }
    }
    let mut metadata = json!({ "resourceVersion": version.to_string() });
    if more && let Some(last) = items.last() {
        let (namespace, name) = key_of(last);
        metadata["continue"] = format!("{version}-{}", hex(&format!("{namespace}/{name}"))).into();
    }
    full(
        StatusCode::OK,
        &json!({
            "kind": format!("{}List", target.resource.kind),
            "apiVersion": target.resource.api_version,
            "metadata": metadata,
            "items": items,
        }),
    )
}

fn get(shared: &Shared, target: &Target) -> Response<Body> {
    let key = (
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    );
    match shared.lock().stored(target.resource.kind, &key) {
        Some(object) => full(StatusCode::OK, object),
        None => reply(&not_found(target.resource, &key.1)),
    }
}

/// A create (`verb` `create`, a POST to the collection) or a replace (`update`, a PUT
/// to the object) from a client: the body must be of the request's kind, namespace
/// and (for a replace) name.
fn write_object(shared: &Shared, target: &Target, verb: &str, mut object: Value) -> Response<Body> {
    let resource = target.resource;
    if !object.is_object() {
        return failure(400, "BadRequest", "the body is not an object");
    }
    for (field, expected) in [
        ("apiVersion", resource.api_version),
        ("kind", resource.kind),
    ] {
        match object.get(field).and_then(Value::as_str) {
            None | Some("") => object[field] = expected.into(),
            Some(given) if given == expected => {}
            Some(given) => {
                let message = format!("{field} {given} does not match the request's {expected}");
                return failure(400, "BadRequest", &message);
            }
        }
    }
    let namespace = target.namespace.clone().unwrap_or_default();
    match object["metadata"]["namespace"].as_str() {
        None | Some("") if resource.namespaced => {
            object["metadata"]["namespace"] = namespace.into();
        }
        None | Some("") => {}
        Some(given) if given == namespace => {}
        Some(_) => {
            return failure(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            );
        }
    }
    let name = key_of(&object).1;
    if name.is_empty() {
        let message = format!(
            "{} \"\" is invalid: metadata.name: Required value: name is required",
            resource.kind
        );
        return failure(422, "Invalid", &message);
    }
    if let Some(url_name) = target.name.as_ref().filter(|url_name| **url_name != name) {
        let message = format!(
            "the name of the object ({name}) does not match the name on the URL ({url_name})"
        );
        return failure(400, "BadRequest", &message);
    }
    let mut state = shared.lock();
    let (written, code) = if verb == "create" {
        (state.create(resource, object), StatusCode::CREATED)
    } else {
        (state.update(resource, object), StatusCode::OK)
    };
    drop(state);
    match written {
        Ok(stored) => {
            shared.notify();
            full(code, &stored)
        }
        Err(status) => reply(&status),
    }
}

/// RFC 7386.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn patch_status(shared: &Shared, target: &Target, patch: &Value) -> Response<Body> {
    let key = (
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    );
    let mut state = shared.lock();
    let Some(stored) = state.stored(target.resource.kind, &key).cloned() else {
        return reply(&not_found(target.resource, &key.1));
    };
    if let Some(version) = patch["metadata"]["resourceVersion"].as_str()
        && stored["metadata"]["resourceVersion"] != version
    {
        return reply(&conflict(target.resource, &key.1));
    }
    let mut patched = stored.clone();
    merge(&mut patched, patch);
    // The status subresource changes the status and nothing else.
    if patched.get("status") == stored.get("status") {
        return full(StatusCode::OK, &stored);
    }
    let mut object = stored;
    match patched.get("status") {
        Some(status) => object["status"] = status.clone(),
        None => {
            if let Some(object) = object.as_object_mut() {
                object.remove("status");
            }
        }
    }
    let stored = state.write(target.resource.kind, "MODIFIED", object);
    drop(state);
    shared.notify();
    full(StatusCode::OK, &stored)
}

fn token_review(shared: &Shared, body: &[u8]) -> Response<Body> {
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return failure(400, "BadRequest", "not a TokenReview");
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let requested: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let state = shared.lock();
    let status = match state.tokens.get(token) {
        None => json!({ "user": {}, "error": "[invalid bearer token, token lookup failed]" }),
        Some(known) => {
            let matched: Vec<&String> = requested
                .iter()
                .filter(|a| known.audiences.contains(a))
                .collect();
            if matched.is_empty() && !requested.is_empty() {
                json!({
                    "user": {},
                    "error": format!(
                        "[invalid bearer token, token audiences {:?} is invalid for the \
                         target audiences {:?}]",
                        known.audiences, requested
                    ),
                })
            } else {
                json!({ "authenticated": true, "user": known.user, "audiences": matched })
            }
        }
    };
    review["status"] = status;
    full(StatusCode::CREATED, &review)
}

fn event_line(event: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": event, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn expired(version: u64, compacted: u64) -> Bytes {
    let message = format!("too old resource version: {version} ({compacted})");
    event_line("ERROR", &status(410, "Expired", &message))
}

async fn watch(shared: Shared, target: Target, query: &HashMap<String, String>) -> Response<Body> {
    let mut changed = shared.changed.subscribe();
    while shared.lock().held {
        if changed.changed().await.is_err() {
            break;
        }
    }
    let from = query
        .get("resourceVersion")
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&v| v > 0);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (sender, receiver) = mpsc::channel::<Bytes>(64);
    tokio::spawn(stream_watch(
        shared, target, from, bookmarks, timeout, sender,
    ));
    let body = StreamBody::new(ReceiverStream::new(receiver).map(|line| Ok(Frame::data(line))));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(body))
        .unwrap()
}

async fn stream_watch(
    shared: Shared,
    target: Target,
    from: Option<u64>,
    bookmarks: bool,
    timeout: Duration,
    sender: mpsc::Sender<Bytes>,
) {
    let kind = target.resource.kind;
    let deadline = Instant::now() + timeout;
    let mut changed = shared.changed.subscribe();
    let start = {
        let state = shared.lock();
        let next_bookmark = Instant::now() + state.bookmark_interval;
        match from {
            Some(version) if version < state.compacted => Err(expired(version, state.compacted)),
            Some(version) => Ok((state.epoch, version, Vec::new(), next_bookmark)),
            // No version: the current objects first, as ADDED events.
            None => {
                let added = state
                    .collections
                    .get(kind)
                    .into_iter()
                    .flat_map(|c| &c.objects)
                    .filter(|(key, _)| in_namespace(&target.namespace, key))
                    .map(|(_, object)| event_line("ADDED", object))
                    .collect();
                Ok((state.epoch, state.version, added, next_bookmark))
            }
        }
    };
    let (epoch, mut cursor, mut lines, mut next_bookmark) = match start {
        Ok(start) => start,
        Err(expired) => {
            let _ = sender.send(expired).await;
            return;
        }
    };
    loop {
        let mut done = false;
        {
            let mut state = shared.lock();
            if state.epoch != epoch {
                return;
            }
            let collection = state.collections.entry(kind).or_default();
            if cursor < collection.compacted {
                // Events this watch has not sent are gone: the client must list again.
                lines.push(expired(cursor, collection.compacted));
                done = true;
            } else {
                for (version, event, object) in &collection.events {
                    if *version > cursor {
                        if in_namespace(&target.namespace, &key_of(object)) {
                            lines.push(event_line(event, object));
                        }
                        cursor = *version;
                    }
                }
                if bookmarks && Instant::now() >= next_bookmark {
                    cursor = state.version;
                    let bookmark = json!({
                        "kind": kind,
                        "apiVersion": target.resource.api_version,
                        "metadata": { "resourceVersion": cursor.to_string() },
                    });
                    lines.push(event_line("BOOKMARK", &bookmark));
                    *state.bookmarks.entry(kind).or_default() += 1;
                    next_bookmark = Instant::now() + state.bookmark_interval;
                }
            }
        }
        for line in lines.drain(..) {
            if sender.send(line).await.is_err() {
                return;
            }
        }
        if done {
            return;
        }
        tokio::select! {
            _ = changed.changed() => {}
            () = tokio::time::sleep_until(next_bookmark), if bookmarks => {}
            () = tokio::time::sleep_until(deadline) => return,
            () = sender.closed() => return,
        }
    }
}

/// Where a pod's port is when the test set no dialer: its `status.podIP`.
fn dial_pod_ip(pod: &Value, port: u16) -> std::io::Result<TcpStream> {
    let ip: IpAddr = pod["status"]["podIP"]
        .as_str()
        .and_then(|ip| ip.parse().ok())
        .ok_or_else(|| std::io::Error::other("the pod has no IP"))?;
    TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(5))
}

/// Answers a port-forward's WebSocket upgrade and then relays, as the kubelet does,
/// each requested port `i`: its data on channel `2i`, its error on `2i + 1`, each
/// channel first announcing its port (two bytes, little-endian).
fn port_forward(
    shared: &Shared,
    target: &Target,
    query: &HashMap<String, String>,
    request: &mut Request<Incoming>,
) -> Response<Body> {
    let key = (
        target.namespace.clone().unwrap_or_default(),
        target.name.clone().unwrap_or_default(),
    );
    let Some(pod) = shared.lock().stored("Pod", &key).cloned() else {
        return reply(&not_found(target.resource, &key.1));
    };
    let ports: Option<Vec<u16>> = query
        .get("ports")
        .and_then(|ports| ports.split(',').map(|port| port.parse().ok()).collect());
    let Some(ports) = ports.filter(|ports| !ports.is_empty()) else {
        return failure(
            400,
            "BadRequest",
            "a port-forward names its ports: ?ports=PORT[,PORT]",
        );
    };
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
    };
    let offered = header(header::SEC_WEBSOCKET_PROTOCOL)
        .split(',')
        .any(|protocol| protocol.trim() == PORT_FORWARD_PROTOCOL);
    let websocket = header(header::UPGRADE).eq_ignore_ascii_case("websocket");
    let client_key = header(header::SEC_WEBSOCKET_KEY);
    if !offered || !websocket || client_key.is_empty() {
        let message =
            format!("a port-forward is a WebSocket upgrade offering {PORT_FORWARD_PROTOCOL}");
        return failure(400, "BadRequest", &message);
    }
    let accept = derive_accept_key(client_key.as_bytes());
    let upgrade = hyper::upgrade::on(request);
    let dialer = Arc::clone(
        &shared
            .dialer
            .lock()
            .expect("a test thread panicked holding the dialer"),
    );
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            let socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            relay_ports(socket, pod, ports, dialer).await;
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .header(header::SEC_WEBSOCKET_PROTOCOL, PORT_FORWARD_PROTOCOL)
        .body(Full::new(Bytes::new()).boxed())
        .unwrap()
}

/// Relays the channels of a port-forward's `socket` to the pod's `ports` until the
/// client closes it or every port's connection has ended. A port that cannot be
/// reached gets its message on its error channel.
async fn relay_ports<S>(socket: WebSocketStream<S>, pod: Value, ports: Vec<u16>, dialer: Dialer)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut incoming) = socket.split();
    for (index, port) in ports.iter().enumerate() {
        for channel in [2 * index, 2 * index + 1] {
            let [low, high] = port.to_le_bytes();
            let announce = Message::binary(vec![channel as u8, low, high]);
            if sink.send(announce).await.is_err() {
                return;
            }
        }
    }
    let (to_client, mut outgoing) = mpsc::channel::<Message>(16);
    let mut writers = Vec::new();
    for (index, &port) in ports.iter().enumerate() {
        let dialed = {
            let (dialer, pod) = (Arc::clone(&dialer), pod.clone());
            tokio::task::spawn_blocking(move || dialer(&pod, port)).await
        };
        let connection = match dialed {
            Ok(Ok(connection)) => connection
                .set_nonblocking(true)
                .and_then(|()| tokio::net::TcpStream::from_std(connection)),
            Ok(Err(err)) => Err(err),
            Err(panicked) => Err(std::io::Error::other(panicked.to_string())),
        };
        match connection {
            Ok(connection) => {
                let (mut reader, writer) = connection.into_split();
                writers.push(Some(writer));
                let to_client = to_client.clone();
                let channel = (2 * index) as u8;
                tokio::spawn(async move {
                    let mut buffer = vec![0; 16 * 1024];
                    while let Ok(read @ 1..) = reader.read(&mut buffer).await {
                        let mut frame = Vec::with_capacity(read + 1);
                        frame.push(channel);
                        frame.extend_from_slice(&buffer[..read]);
                        if to_client.send(Message::binary(frame)).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(err) => {
                writers.push(None);
                let name = pod["metadata"]["name"].as_str().unwrap_or_default();
                let mut frame = vec![(2 * index + 1) as u8];
                frame.extend(format!("error forwarding port {port} to pod {name}: {err}").bytes());
                let _ = to_client.send(Message::binary(frame)).await;
            }
        }
    }
    // Once every port's reader has ended, `outgoing` ends too.
    drop(to_client);
    loop {
        tokio::select! {
            message = outgoing.recv() => match message {
                Some(message) => {
                    if sink.send(message).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
            },
            message = incoming.next() => match message {
                Some(Ok(Message::Binary(data))) if data.len() > 1 && data[0] % 2 == 0 => {
                    let index = usize::from(data[0] / 2);
                    if let Some(slot) = writers.get_mut(index)
                        && let Some(writer) = slot
                        && writer.write_all(&data[1..]).await.is_err()
                    {
                        *slot = None;
                    }
                }
                // Answers the client's close, completing the handshake.
                Some(Ok(Message::Close(_))) => {
                    let _ = sink.close().await;
                    return;
                }
                Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
}
