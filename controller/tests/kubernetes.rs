//! The Kubernetes source, the status writer, the token reviewer and the CA's Secret
//! store, each run with a real kube-rs client against a fake API server that lists,
//! watches and writes as Kubernetes does ([`weft_fake_api`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};
use weft_api::config::v1::TrustBundle;
use weft_controller::{
    auth::{AuthError, NodeAuthenticator},
    ca::{
        Authority, Material, runtime,
        store::{Store, StoreError},
    },
    compile::Settings,
    objects::{Kind, ObjectKey, Objects},
    pipeline::{self, Published},
    source::kubernetes::{self, CONTROLLER_NAME, TokenReviewer},
    status::{Reason, Statuses, Verdict},
};
use weft_fake_api::FakeApi;

/// How long anything may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// Runs the Kubernetes source against `fake`; what it publishes arrives here.
fn start_source(fake: &FakeApi) -> watch::Receiver<Arc<Objects>> {
    start_source_reporting(fake).0
}

/// [`start_source`], with the kinds it cannot read.
fn start_source_reporting(
    fake: &FakeApi,
) -> (
    watch::Receiver<Arc<Objects>>,
    watch::Receiver<BTreeMap<String, String>>,
) {
    let (publisher, objects) = watch::channel(Arc::new(Objects::default()));
    let (unread_tx, unread) = watch::channel(BTreeMap::new());
    tokio::spawn(kubernetes::run(fake.client(), publisher, unread_tx));
    (objects, unread)
}

/// Waits until the published objects pass `check`, and returns them.
async fn wait_for(
    objects: &mut watch::Receiver<Arc<Objects>>,
    what: &str,
    check: impl Fn(&Objects) -> bool,
) -> Arc<Objects> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let current = Arc::clone(&objects.borrow_and_update());
        if check(&current) {
            return current;
        }
        match tokio::time::timeout_at(deadline, objects.changed()).await {
            Ok(changed) => changed.expect("the source stopped"),
            Err(_) => panic!(
                "timed out waiting for {what}; the source has {:?}",
                current.counts()
            ),
        }
    }
}

/// Polls `check` until it holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey::new(namespace, name)
}

fn namespace(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": { "name": name, "labels": { "weft.dev/mesh": "enabled" } },
    })
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name },
        "status": { "addresses": [{ "type": "InternalIP", "address": "192.168.0.2" }] },
    })
}

fn pod(namespace: &str, name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": namespace, "labels": { "app": "web" } },
        "spec": { "nodeName": "node-a", "containers": [{ "name": "web", "image": "web" }] },
        "status": { "phase": "Running", "podIP": ip },
    })
}

fn service(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "clusterIP": "10.96.0.10",
            "selector": { "app": "web" },
            "ports": [{ "port": 80 }],
        },
    })
}

fn endpoint_slice(namespace: &str, name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": namespace,
            "labels": { "kubernetes.io/service-name": service },
        },
        "addressType": "IPv4",
        "endpoints": [{ "addresses": ["10.244.0.2"], "nodeName": "node-a" }],
        "ports": [{ "port": 80 }],
    })
}

fn peer_authentication(namespace: &str, name: &str, mode: &str) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "PeerAuthentication",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "mode": mode },
    })
}

fn authorization_policy(namespace: &str, name: &str) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "action": "ALLOW", "rules": [{ "from": [{ "namespaces": ["shop"] }] }] },
    })
}

fn traffic_policy(namespace: &str, name: &str, service: &str) -> Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": { "name": name, "namespace": namespace },
        "spec": { "service": service, "loadBalancer": { "algorithm": "PEAK_EWMA" } },
    })
}

fn route(kind: &str, namespace: &str, name: &str, parent_refs: Value) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": kind,
        "metadata": { "name": name, "namespace": namespace },
        "spec": {
            "parentRefs": parent_refs,
            "rules": [{ "backendRefs": [{ "name": "web", "port": 80 }] }],
        },
    })
}

fn service_parent(name: &str) -> Value {
    json!({ "group": "", "kind": "Service", "name": name, "port": 80 })
}

#[tokio::test]
async fn lists_every_kind_then_follows_creations_updates_and_deletions() {
    let fake = FakeApi::start().await;
    fake.create(namespace("shop"));
    fake.create(node("node-a"));
    fake.create(pod("shop", "web-1", "10.244.0.2"));
    fake.create(service("shop", "web"));
    fake.create(endpoint_slice("shop", "web-abcde", "web"));
    fake.create(peer_authentication("shop", "strict", "STRICT"));
    fake.create(authorization_policy("shop", "allow-shop"));
    fake.create(traffic_policy("shop", "web", "web"));
    fake.create(json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "FaultInjection",
        "metadata": { "name": "slow", "namespace": "shop" },
        "spec": { "delay": { "fixedDelay": "1s", "percent": 10 } },
    }));
    fake.create(route(
        "HTTPRoute",
        "shop",
        "web-http",
        json!([service_parent("web")]),
    ));
    fake.create(route(
        "GRPCRoute",
        "shop",
        "web-grpc",
        json!([service_parent("web")]),
    ));
    fake.create(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "ReferenceGrant",
        "metadata": { "name": "from-store", "namespace": "shop" },
        "spec": {
            "from": [{ "group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "store" }],
            "to": [{ "group": "", "kind": "Service" }],
        },
    }));

    let mut objects = start_source(&fake);
    let listed = wait_for(&mut objects, "one object of every kind", |o| {
        o.counts().values().all(|&count| count == 1)
    })
    .await;
    assert_eq!(
        listed.pods[&key("shop", "web-1")]
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref()),
        Some("10.244.0.2")
    );
    assert!(
        listed.pods[&key("shop", "web-1")]
            .metadata
            .managed_fields
            .is_none()
    );

    fake.create(pod("shop", "web-2", "10.244.0.3"));
    wait_for(&mut objects, "the pod created after the list", |o| {
        o.pods.contains_key(&key("shop", "web-2"))
    })
    .await;

    let mut changed = pod("shop", "web-1", "10.244.0.2");
    changed["metadata"]["labels"]["version"] = "v2".into();
    fake.update(changed);
    wait_for(&mut objects, "the updated labels of web-1", |o| {
        o.pods[&key("shop", "web-1")]
            .metadata
            .labels
            .as_ref()
            .is_some_and(|labels| labels.get("version").is_some_and(|v| v == "v2"))
    })
    .await;

    fake.delete("Pod", "shop", "web-2");
    fake.delete("PeerAuthentication", "shop", "strict");
    wait_for(&mut objects, "the deletions", |o| {
        !o.pods.contains_key(&key("shop", "web-2")) && o.peer_authentications.is_empty()
    })
    .await;
    assert_eq!(fake.requests("list", "/api/v1/pods"), 1);
    assert_eq!(fake.requests("watch", "/api/v1/pods"), 1);
}

/// The fake enforces the controller's roles from deploy/install.yaml (every test here
/// runs under them, and fails on a refusal it did not expect); this shows it refuses
/// what they do not grant, as the API server would.
#[tokio::test]
async fn the_roles_of_the_install_manifest_are_enforced() {
    use kube::{Api, api::ListParams};
    let fake = FakeApi::start().await;
    let client = fake.client();
    fn forbidden<T>(result: Result<T, kube::Error>) -> bool {
        matches!(result, Err(kube::Error::Api(response)) if response.code == 403)
    }
    // Granted: pods anywhere; the CA Secret by its name (absent here: 404).
    Api::<k8s_openapi::api::core::v1::Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), "weft-system");
    assert!(secrets.get_opt("weft-ca").await.unwrap().is_none());
    // Not granted: other Secrets, Secrets elsewhere, listing them.
    assert!(forbidden(secrets.get("other").await));
    let elsewhere = Api::<Secret>::namespaced(client.clone(), "shop");
    assert!(forbidden(elsewhere.get("weft-ca").await));
    assert!(forbidden(
        Api::<Secret>::all(client)
            .list(&ListParams::default())
            .await
    ));
    let refused = fake.take_forbidden();
    assert_eq!(refused.len(), 3, "{refused:#?}");
    assert!(
        refused[0].contains(
            "cannot get resource \"secrets\" in API group \"\" in the namespace \"weft-system\""
        ),
        "{}",
        refused[0]
    );
}

#[tokio::test]
async fn a_list_longer_than_a_page_arrives_whole() {
    let fake = FakeApi::start().await;
    for index in 0..1100 {
        let ip = format!("10.244.{}.{}", index / 250, index % 250 + 2);
        fake.create(pod("shop", &format!("web-{index:04}"), &ip));
    }
    let mut objects = start_source(&fake);
    wait_for(&mut objects, "1100 pods", |o| o.pods.len() == 1100).await;
    // kube-rs lists 500 at a time.
    assert_eq!(fake.requests("list", "/api/v1/pods"), 3);
}

#[tokio::test]
async fn bookmarks_move_the_watch_forward_without_changing_objects() {
    let fake = FakeApi::start().await;
    fake.set_bookmark_interval(Duration::from_millis(50));
    fake.create(namespace("shop"));
    fake.create(pod("shop", "web-1", "10.244.0.2"));
    let mut objects = start_source(&fake);
    wait_for(&mut objects, "web-1", |o| o.pods.len() == 1).await;

    // A change elsewhere moves the resourceVersion past the pods'; only bookmarks
    // tell the pod watcher about it.
    fake.create(service("shop", "web"));
    let sent = fake.bookmarks_sent("Pod");
    eventually("two more pod bookmarks", || {
        fake.bookmarks_sent("Pod") >= sent + 2
    })
    .await;
    let current = Arc::clone(&objects.borrow());
    assert_eq!(current.pods.len(), 1);
    assert_eq!(current.namespaces.len(), 1);

    // An outage, and a compaction at the newest version: a watcher that took the
    // bookmarks resumes from there; one that ignored them would have to list again.
    fake.hold_watches();
    fake.compact();
    fake.release_watches();
    eventually("the pod watch to resume", || {
        fake.requests("watch", "/api/v1/pods") == 2
    })
    .await;
    fake.create(pod("shop", "web-2", "10.244.0.3"));
    wait_for(&mut objects, "web-2", |o| o.pods.len() == 2).await;
    assert_eq!(fake.requests("list", "/api/v1/pods"), 1);
}

#[tokio::test]
async fn an_expired_watch_lists_again_and_catches_up() {
    let fake = FakeApi::start().await;
    fake.create(namespace("shop"));
    fake.create(pod("shop", "web-1", "10.244.0.2"));
    fake.create(pod("shop", "web-2", "10.244.0.3"));
    let mut objects = start_source(&fake);
    wait_for(&mut objects, "both pods", |o| o.pods.len() == 2).await;
    assert_eq!(fake.requests("list", "/api/v1/pods"), 1);

    // While the watch is broken, one pod goes, one comes, and the history of both
    // events is compacted away: only a new list can tell.
    fake.hold_watches();
    fake.delete("Pod", "shop", "web-1");
    fake.create(pod("shop", "web-3", "10.244.0.4"));
    fake.compact();
    fake.release_watches();

    wait_for(&mut objects, "the state after the outage", |o| {
        let names: Vec<&str> = o.pods.keys().map(|k| k.name.as_str()).collect();
        names == ["web-2", "web-3"]
    })
    .await;
    assert!(fake.requests("list", "/api/v1/pods") >= 2);

    // And the new watch follows changes again.
    fake.delete("Pod", "shop", "web-2");
    wait_for(&mut objects, "web-2 gone", |o| o.pods.len() == 1).await;
}

#[tokio::test]
async fn a_kind_without_its_crd_does_not_stop_the_others() {
    let fake = FakeApi::start().await;
    fake.set_installed("GRPCRoute", false);
    fake.create(namespace("shop"));
    fake.create(service("shop", "web"));
    fake.create(peer_authentication("shop", "strict", "STRICT"));
    fake.create(route(
        "HTTPRoute",
        "shop",
        "web-http",
        json!([service_parent("web")]),
    ));

    let (mut objects, mut unread) = start_source_reporting(&fake);
    let published = wait_for(&mut objects, "the installed kinds", |o| {
        o.namespaces.len() == 1
            && o.services.len() == 1
            && o.peer_authentications.len() == 1
            && o.http_routes.len() == 1
    })
    .await;
    assert!(published.grpc_routes.is_empty());
    assert!(fake.requests("list", "/apis/gateway.networking.k8s.io/v1/grpcroutes") >= 1);
    // The missing kind is reported, with what to install (`/status`, `weftctl check`).
    let problem = unread.borrow_and_update().get("GRPCRoute").cloned();
    let problem = problem.expect("GRPCRoute is reported unread");
    assert!(
        problem.contains("install the Gateway API CRDs"),
        "{problem}"
    );
    assert_eq!(unread.borrow().len(), 1, "{:?}", unread.borrow());

    // Installed later, the kind is picked up by the watcher's retries.
    fake.set_installed("GRPCRoute", true);
    fake.create(route(
        "GRPCRoute",
        "shop",
        "web-grpc",
        json!([service_parent("web")]),
    ));
    wait_for(&mut objects, "the GRPCRoute", |o| o.grpc_routes.len() == 1).await;
    assert!(fake.requests("list", "/apis/gateway.networking.k8s.io/v1/grpcroutes") >= 2);
    let deadline = Instant::now() + DEADLINE;
    while !unread.borrow_and_update().is_empty() {
        tokio::time::timeout_at(deadline, unread.changed())
            .await
            .expect("GRPCRoute leaves the unread kinds once it is served")
            .unwrap();
    }
}

#[tokio::test]
async fn an_unreadable_object_keeps_its_last_readable_version() {
    let fake = FakeApi::start().await;
    fake.create(peer_authentication("shop", "broken", "LOOSE"));
    fake.create(peer_authentication("shop", "strict", "STRICT"));
    let mut objects = start_source(&fake);
    let listed = wait_for(&mut objects, "the readable policy", |o| {
        o.peer_authentications.contains_key(&key("shop", "strict"))
    })
    .await;
    assert_eq!(
        listed.peer_authentications.len(),
        1,
        "the unreadable one is skipped"
    );

    fake.update(peer_authentication("shop", "strict", "SIDEWAYS"));
    // Events of one kind arrive in order: once this one is in, so is the update.
    fake.create(peer_authentication("shop", "later", "PERMISSIVE"));
    let current = wait_for(&mut objects, "the later policy", |o| {
        o.peer_authentications.contains_key(&key("shop", "later"))
    })
    .await;
    let strict = &current.peer_authentications[&key("shop", "strict")];
    assert_eq!(
        serde_json::to_value(&strict.spec).unwrap()["mode"],
        "STRICT"
    );
}

fn accepted_condition(object: &Value) -> Option<Value> {
    accepted_in(&object["status"]["conditions"])
}

fn accepted_in(conditions: &Value) -> Option<Value> {
    conditions
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")
        .cloned()
}

#[tokio::test]
async fn statuses_are_written_once_and_leave_other_controllers_alone() {
    let fake = FakeApi::start().await;
    fake.create(namespace("shop"));
    fake.create(service("shop", "web"));
    fake.create(peer_authentication("shop", "bad", "STRICT"));
    fake.create(authorization_policy("shop", "allow-shop"));
    fake.create(traffic_policy("shop", "web", "web"));
    let theirs = json!({
        "parentRef": { "name": "gateway" },
        "controllerName": "example.net/gateway-controller",
        "conditions": [{
            "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
            "lastTransitionTime": "2025-01-01T00:00:00Z", "observedGeneration": 1,
        }],
        // A field of a newer Gateway API than the controller's types know.
        "futureField": "kept",
    });
    let mut http_route = route(
        "HTTPRoute",
        "shop",
        "web",
        json!([service_parent("web"), { "name": "gateway" }]),
    );
    http_route["status"] = json!({ "parents": [theirs] });
    fake.create(http_route);

    let mut objects = start_source(&fake);
    wait_for(&mut objects, "the policies and the route", |o| {
        o.peer_authentications.len() == 1 && o.http_routes.len() == 1
    })
    .await;
    let (statuses, written) = watch::channel(Arc::new(Statuses::new()));
    let (_leading, leads) = watch::channel(true);
    tokio::spawn(kubernetes::write_statuses(
        fake.client(),
        written,
        objects.clone(),
        leads,
    ));

    let invalid = Verdict::rejected(Reason::Invalid, "spec.mode: say why it is wrong")
        .for_generation(Some(1));
    let routed = Verdict::accepted(Reason::Accepted, "routes shop/web:80").for_generation(Some(1));
    let mut verdicts = Statuses::new();
    verdicts.insert((Kind::PeerAuthentication, key("shop", "bad")), invalid);
    verdicts.insert((Kind::HttpRoute, key("shop", "web")), routed);
    // Watches lag: the writes do not come back until the watches are released.
    fake.hold_watches();
    statuses.send_replace(Arc::new(verdicts.clone()));

    let policy_status = "/apis/weft.dev/v1alpha1/namespaces/shop/peerauthentications/bad/status";
    let route_status = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web/status";
    eventually("the policy's status", || {
        fake.get("PeerAuthentication", "shop", "bad")
            .and_then(|o| accepted_condition(&o))
            .is_some()
    })
    .await;
    let condition =
        accepted_condition(&fake.get("PeerAuthentication", "shop", "bad").unwrap()).unwrap();
    assert_eq!(condition["status"], "False");
    assert_eq!(condition["reason"], "Invalid");
    assert_eq!(condition["message"], "spec.mode: say why it is wrong");
    assert_eq!(condition["observedGeneration"], 1);
    let first_transition = condition["lastTransitionTime"].clone();
    assert!(first_transition.is_string(), "{condition}");

    eventually("the route's status", || {
        fake.requests("patch", route_status) == 1
    })
    .await;
    let parents = fake.get("HTTPRoute", "shop", "web").unwrap()["status"]["parents"].clone();
    let parents = parents.as_array().unwrap();
    assert_eq!(parents.len(), 2, "{parents:?}");
    assert_eq!(parents[0], theirs);
    assert_eq!(parents[1]["parentRef"], service_parent("web"));
    assert_eq!(parents[1]["controllerName"], CONTROLLER_NAME);
    assert_eq!(parents[1]["conditions"][0]["type"], "Accepted");
    assert_eq!(parents[1]["conditions"][0]["status"], "True");
    assert_eq!(parents[1]["conditions"][0]["observedGeneration"], 1);

    // The same verdicts again before the writes have come back through the watch,
    // with one more verdict whose write shows the writer got this far.
    let allowed = Verdict::accepted(Reason::Accepted, "applies to 0 pods").for_generation(Some(1));
    verdicts.insert(
        (Kind::AuthorizationPolicy, key("shop", "allow-shop")),
        allowed,
    );
    statuses.send_replace(Arc::new(verdicts.clone()));
    let allow_status =
        "/apis/weft.dev/v1alpha1/namespaces/shop/authorizationpolicies/allow-shop/status";
    eventually("the authorization policy's status", || {
        fake.requests("patch", allow_status) == 1
    })
    .await;
    assert_eq!(fake.requests("patch", policy_status), 1);
    assert_eq!(fake.requests("patch", route_status), 1);

    // And once the controller has seen its writes.
    fake.release_watches();
    wait_for(&mut objects, "the written statuses", |o| {
        let policy = &o.peer_authentications[&key("shop", "bad")];
        let route = &o.http_routes[&key("shop", "web")];
        policy
            .status
            .as_ref()
            .is_some_and(|s| !s.conditions.is_empty())
            && route.status.as_ref().is_some_and(|s| s.parents.len() == 2)
    })
    .await;
    let balanced =
        Verdict::accepted(Reason::Accepted, "applies to shop/web").for_generation(Some(1));
    verdicts.insert((Kind::TrafficPolicy, key("shop", "web")), balanced);
    statuses.send_replace(Arc::new(verdicts.clone()));
    let traffic_status = "/apis/weft.dev/v1alpha1/namespaces/shop/trafficpolicies/web/status";
    eventually("the traffic policy's status", || {
        fake.requests("patch", traffic_status) == 1
    })
    .await;
    assert_eq!(fake.requests("patch", policy_status), 1);
    assert_eq!(fake.requests("patch", route_status), 1);

    // A new message with the same status is written, keeping the transition time.
    let reworded = Verdict::rejected(Reason::Invalid, "spec.mode: LOOSE is not a mode")
        .for_generation(Some(1));
    verdicts.insert((Kind::PeerAuthentication, key("shop", "bad")), reworded);
    statuses.send_replace(Arc::new(verdicts));
    eventually("the reworded status", || {
        fake.get("PeerAuthentication", "shop", "bad")
            .and_then(|o| accepted_condition(&o))
            .is_some_and(|c| c["message"] == "spec.mode: LOOSE is not a mode")
    })
    .await;
    let condition =
        accepted_condition(&fake.get("PeerAuthentication", "shop", "bad").unwrap()).unwrap();
    assert_eq!(condition["lastTransitionTime"], first_transition);
    assert_eq!(fake.requests("patch", policy_status), 2);
}

/// The condition weft wrote into a route's `status.parents`, if any.
fn route_condition(route: &Value) -> Option<Value> {
    route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|entry| entry["controllerName"] == CONTROLLER_NAME)
        .and_then(|entry| accepted_in(&entry["conditions"]))
}

/// From the watch through the compiler to the status subresource: what the agents do
/// not enforce is written as `Accepted: False`, reason `NotEnforced`; what they do, as
/// `Accepted` (and, for a route, `ResolvedRefs`).
#[tokio::test]
async fn what_the_agents_do_not_enforce_is_written_as_not_enforced() {
    let fake = FakeApi::start().await;
    fake.create(namespace("shop"));
    fake.create(node("node-a"));
    fake.create(pod("shop", "web-1", "10.244.0.2"));
    fake.create(service("shop", "web"));
    fake.create(service("shop", "api"));
    fake.create(authorization_policy("shop", "allow-shop"));
    // PEAK_EWMA balancing, an idle timeout and an outlier detection interval: the
    // interval does not apply.
    let mut balanced = traffic_policy("shop", "web", "web");
    balanced["spec"]["timeouts"] = json!({ "idle": "30s" });
    balanced["spec"]["outlierDetection"] = json!({ "consecutiveFailures": 2, "interval": "5s" });
    fake.create(balanced);
    let mut idle = traffic_policy("shop", "api", "api");
    idle["spec"] = json!({ "service": "api", "timeouts": { "idle": "30s" } });
    fake.create(idle);
    fake.create(route(
        "HTTPRoute",
        "shop",
        "web",
        json!([service_parent("web")]),
    ));

    let objects = start_source(&fake);
    let (published, _) = watch::channel(Published::default());
    let (statuses, written) = watch::channel(Arc::new(Statuses::new()));
    // No CA: a closed trust channel.
    let (_, trust) = watch::channel(Arc::new(TrustBundle::default()));
    tokio::spawn(pipeline::run(
        objects.clone(),
        trust,
        Settings::default(),
        published,
        statuses,
    ));
    let (_leading, leads) = watch::channel(true);
    tokio::spawn(kubernetes::write_statuses(
        fake.client(),
        written,
        objects,
        leads,
    ));

    let condition = |kind: &str, name: &str| {
        let object = fake.get(kind, "shop", name)?;
        if kind == "HTTPRoute" {
            route_condition(&object)
        } else {
            accepted_condition(&object)
        }
    };
    let expected = [
        (
            "AuthorizationPolicy",
            "allow-shop",
            "True",
            "Accepted",
            "applies to every meshed pod of namespace shop",
        ),
        (
            "TrafficPolicy",
            "web",
            "False",
            "NotEnforced",
            "the agents do not enforce spec.outlierDetection.interval yet and ignore it; \
             spec.loadBalancer, spec.outlierDetection.consecutiveFailures, spec.timeouts \
             apply to clients of Service web",
        ),
        (
            "TrafficPolicy",
            "api",
            "True",
            "Accepted",
            "applies to clients of Service api",
        ),
        (
            "HTTPRoute",
            "web",
            "True",
            "Accepted",
            "routes requests to Service shop/web for every client",
        ),
    ];
    for (kind, name, status, reason, message) in expected {
        eventually(&format!("the status of {kind} shop/{name}"), || {
            condition(kind, name).is_some()
        })
        .await;
        let condition = condition(kind, name).unwrap();
        assert_eq!(
            (
                &condition["status"],
                &condition["reason"],
                &condition["message"]
            ),
            (&json!(status), &json!(reason), &json!(message)),
            "{kind} shop/{name}: {condition}"
        );
    }
    // A route also says whether its references resolve (the Gateway API's ResolvedRefs).
    let route = fake.get("HTTPRoute", "shop", "web").unwrap();
    let ours = route["status"]["parents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["controllerName"] == CONTROLLER_NAME)
        .unwrap();
    let resolved = ours["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|condition| condition["type"] == "ResolvedRefs")
        .unwrap_or_else(|| panic!("no ResolvedRefs condition: {route}"));
    assert_eq!(
        (&resolved["status"], &resolved["reason"]),
        (&json!("True"), &json!("ResolvedRefs")),
        "{resolved}"
    );
}

#[tokio::test]
async fn token_reviews_prove_which_node_an_agent_runs_on() {
    let fake = FakeApi::start().await;
    let agent = |extra: Value| {
        json!({
            "username": "system:serviceaccount:weft-system:weft-agent",
            "uid": "c0ffee",
            "groups": ["system:serviceaccounts"],
            "extra": extra,
        })
    };
    fake.add_token(
        "pod-bound",
        &["weft"],
        agent(json!({
            "authentication.kubernetes.io/node-name": ["node-a"],
            "authentication.kubernetes.io/pod-name": ["weft-agent-x1"],
        })),
    );
    fake.add_token("legacy", &["weft"], agent(json!({})));
    fake.add_token(
        "other-audience",
        &["vault"],
        agent(json!({
            "authentication.kubernetes.io/node-name": ["node-a"],
        })),
    );
    fake.add_token(
        "person",
        &["weft"],
        json!({
            "username": "alice",
            "extra": { "authentication.kubernetes.io/node-name": ["node-a"] },
        }),
    );
    fake.add_token(
        "workload",
        &["weft"],
        json!({
            "username": "system:serviceaccount:shop:cart",
            "extra": { "authentication.kubernetes.io/node-name": ["node-a"] },
        }),
    );
    let auth = NodeAuthenticator::Kubernetes(TokenReviewer::new(
        fake.client(),
        "weft".to_owned(),
        "weft-system/weft-agent",
    ));

    auth.authenticate("node-a", Some("pod-bound"))
        .await
        .unwrap();
    let error = auth
        .authenticate("node-b", Some("pod-bound"))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, AuthError::NodeMismatch { token_node, .. } if token_node == "node-a"),
        "{error}"
    );
    let error = auth
        .authenticate("node-a", Some("forged"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, AuthError::Unauthenticated { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("audience weft"), "{error}");
    let error = auth
        .authenticate("node-a", Some("other-audience"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, AuthError::Unauthenticated { .. }),
        "{error}"
    );
    let error = auth
        .authenticate("node-a", Some("legacy"))
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::NotPodBound { .. }), "{error}");
    assert!(
        error.to_string().contains("projected, pod-bound"),
        "{error}"
    );
    let error = auth
        .authenticate("node-a", Some("workload"))
        .await
        .unwrap_err();
    assert!(matches!(error, AuthError::NotAgent { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("system:serviceaccount:shop:cart"),
        "{error}"
    );
    let error = auth
        .authenticate("node-a", Some("person"))
        .await
        .unwrap_err();
    assert!(
        matches!(error, AuthError::NotServiceAccount { .. }),
        "{error}"
    );
    assert!(matches!(
        auth.authenticate("node-a", None).await,
        Err(AuthError::Missing)
    ));
    assert_eq!(
        fake.requests("create", "/apis/authentication.k8s.io/v1/tokenreviews"),
        7
    );
}

/// The CA's Secret, `weft-system/weft-ca`, in `fake`.
fn ca_store(fake: &FakeApi) -> Store {
    Store::Secret {
        client: fake.client(),
        namespace: "weft-system".to_owned(),
        name: "weft-ca".to_owned(),
    }
}

const CA_SECRETS: &str = "/api/v1/namespaces/weft-system/secrets";
const CA_SECRET: &str = "/api/v1/namespaces/weft-system/secrets/weft-ca";

/// The CA's Secret as the fake stores it, and the material it holds.
fn ca_secret(fake: &FakeApi) -> (Value, Material) {
    let stored = fake
        .get("Secret", "weft-system", "weft-ca")
        .expect("the CA's Secret exists");
    let secret: Secret = serde_json::from_value(stored.clone()).expect("a Secret");
    let material = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, ByteString(value))| (key, value))
        .collect();
    (stored, material)
}

#[tokio::test]
async fn the_ca_secret_is_created_once_then_read() {
    let fake = FakeApi::start().await;
    let store = ca_store(&fake);

    let created = runtime::load_or_create(&store).await.unwrap();
    let (secret, stored) = ca_secret(&fake);
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let names: BTreeSet<&str> = stored.keys().map(String::as_str).collect();
    assert_eq!(names, BTreeSet::from(["ca.crt", "tls.crt", "tls.key"]));
    assert_eq!(stored, created);
    let authority = Authority::load(&created, SystemTime::now()).unwrap();
    assert!(authority.signing_root().subject.contains("weft mesh root"));
    assert_eq!(fake.requests("create", CA_SECRETS), 1);

    // A restarted controller reads what the first one created, and writes nothing.
    let read = runtime::load_or_create(&store).await.unwrap();
    assert_eq!(read, created);
    assert_eq!(fake.requests("get", CA_SECRET), 2);
    assert_eq!(fake.requests("create", CA_SECRETS), 1);
    assert_eq!(fake.requests("update", CA_SECRET), 0);
    assert_eq!(ca_secret(&fake).0, secret);
}

#[tokio::test]
async fn controllers_starting_together_use_the_same_root() {
    // Usually both find no Secret and both create one; the second is told it exists
    // and reads the first's. Whichever way they interleave, there is one root.
    let fake = FakeApi::start().await;
    let (one, two) = (ca_store(&fake), ca_store(&fake));
    let (first, second) =
        tokio::join!(runtime::load_or_create(&one), runtime::load_or_create(&two));
    let (first, second) = (first.unwrap(), second.unwrap());
    assert_eq!(first, second);
    assert_eq!(ca_secret(&fake).1, first);
}

#[tokio::test]
async fn the_ca_secret_is_replaced_only_at_the_revision_that_was_read() {
    let fake = FakeApi::start().await;
    let store = ca_store(&fake);
    let created = runtime::load_or_create(&store).await.unwrap();
    let (material, revision) = store.read().await.unwrap().expect("the CA's Secret");
    assert_eq!(material, created);
    assert!(revision.resource_version().is_some());

    // Creating it again stores nothing.
    let other = Authority::generate_root(SystemTime::now()).unwrap();
    assert!(!store.create(&other).await.unwrap());
    assert_eq!(ca_secret(&fake).1, created);

    // Someone labels it; a rotation keeps the label.
    let (mut secret, _) = ca_secret(&fake);
    secret["metadata"]["labels"]["team"] = json!("platform");
    fake.update(secret);
    let (material, revision) = store.read().await.unwrap().expect("the CA's Secret");

    // A rotation replaces it at the revision it read.
    let now = SystemTime::now();
    let overlap = Duration::from_secs(3600);
    let rotated = Authority::rotate(&material, now, overlap).unwrap();
    store.replace(&rotated, revision.clone()).await.unwrap();
    let (stored, new_revision) = store.read().await.unwrap().expect("the CA's Secret");
    assert_eq!(stored, rotated);
    assert_ne!(new_revision, revision);
    assert_eq!(ca_secret(&fake).0["type"], "kubernetes.io/tls");
    assert_eq!(ca_secret(&fake).0["metadata"]["labels"]["team"], "platform");
    let authority = Authority::load(&stored, now).unwrap();
    assert_eq!(
        authority.anchors().len(),
        2,
        "the old root is still trusted"
    );

    // A second rotation from the same read (another operator's, say) is refused,
    // naming the Secret, and changes nothing.
    let stale = Authority::rotate(&material, now, overlap).unwrap();
    let error = store.replace(&stale, revision).await.unwrap_err();
    assert!(matches!(&error, StoreError::Conflict { .. }), "{error:?}");
    assert!(error.to_string().contains("weft-system/weft-ca"), "{error}");
    assert_eq!(ca_secret(&fake).1, rotated);
    assert_eq!(fake.requests("update", CA_SECRET), 2);
}

#[tokio::test]
async fn an_empty_ca_secret_is_filled() {
    let fake = FakeApi::start().await;
    fake.create(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": { "name": "weft-ca", "namespace": "weft-system", "labels": { "chart": "weft" } },
        "type": "kubernetes.io/tls",
    }));
    let store = ca_store(&fake);
    let material = runtime::load_or_create(&store).await.unwrap();
    let (secret, stored) = ca_secret(&fake);
    assert_eq!(stored, material);
    assert!(Authority::load(&stored, SystemTime::now()).is_ok());
    assert_eq!(secret["metadata"]["labels"]["chart"], "weft");
}

/// Two replicas against one Lease: the first leads, the second follows while the first
/// renews, and takes over once the first is gone.
#[tokio::test]
async fn one_replica_leads_and_another_takes_over_when_it_stops() {
    use weft_controller::lease::{Elector, Timing};
    let fake = FakeApi::start().await;
    let timing = Timing {
        duration: Duration::from_secs(1),
        retry: Duration::from_millis(50),
    };
    let replica = |name: &str, leading| {
        let elector = Elector::new(
            fake.client(),
            "weft-system",
            "weft-controller",
            name,
            timing,
        );
        tokio::spawn(elector.run(leading))
    };
    let (a_tx, a) = watch::channel(false);
    let first = replica("controller-a", a_tx);
    eventually("the first replica leads", || *a.borrow()).await;
    let (b_tx, mut b) = watch::channel(false);
    let second = replica("controller-b", b_tx);
    // Many rounds of both (two seconds of renewals, past the Lease's duration): the
    // second never leads.
    let lease = "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases/weft-controller";
    let reads = fake.requests("get", lease);
    eventually("forty more rounds", || {
        fake.requests("get", lease) >= reads + 40
    })
    .await;
    assert!(
        !b.has_changed().unwrap(),
        "the second replica led beside the first"
    );
    let held = fake.get("Lease", "weft-system", "weft-controller").unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "controller-a");

    first.abort();
    eventually("the second replica takes over", || *b.borrow_and_update()).await;
    let held = fake.get("Lease", "weft-system", "weft-controller").unwrap();
    assert_eq!(held["spec"]["holderIdentity"], "controller-b");
    assert_eq!(held["spec"]["leaseTransitions"], 1);
    second.abort();
}

/// Of two status writers, only the leader's writes.
#[tokio::test]
async fn only_the_leader_writes_status() {
    let fake = FakeApi::start().await;
    fake.create(namespace("shop"));
    fake.create(peer_authentication("shop", "one", "STRICT"));
    fake.create(peer_authentication("shop", "two", "STRICT"));
    let mut objects = start_source(&fake);
    wait_for(&mut objects, "the policies", |o| {
        o.peer_authentications.len() == 2
    })
    .await;
    let (statuses, written) = watch::channel(Arc::new(Statuses::new()));
    let (_leads, leader) = watch::channel(true);
    let (_follows, follower) = watch::channel(false);
    for leading in [leader, follower] {
        tokio::spawn(kubernetes::write_statuses(
            fake.client(),
            written.clone(),
            objects.clone(),
            leading,
        ));
    }
    let invalid = Verdict::rejected(Reason::Invalid, "spec.mode: why").for_generation(Some(1));
    let mut verdicts = Statuses::new();
    verdicts.insert(
        (Kind::PeerAuthentication, key("shop", "one")),
        invalid.clone(),
    );
    statuses.send_replace(Arc::new(verdicts.clone()));
    let path = |name: &str| {
        format!("/apis/weft.dev/v1alpha1/namespaces/shop/peerauthentications/{name}/status")
    };
    eventually("the first status", || {
        fake.requests("patch", &path("one")) == 1
    })
    .await;
    // A later change, written once: both writers saw the first one before it.
    verdicts.insert((Kind::PeerAuthentication, key("shop", "two")), invalid);
    statuses.send_replace(Arc::new(verdicts));
    eventually("the second status", || {
        fake.requests("patch", &path("two")) == 1
    })
    .await;
    assert_eq!(
        fake.requests("patch", &path("one")),
        1,
        "the follower wrote too"
    );
}
