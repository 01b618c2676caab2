//! The compiler on small clusters written as the YAML a user would apply. (The large
//! cluster is in `tests/stream.rs`, compiled and streamed.)

use std::{path::Path, sync::Arc, time::Duration};

use weft_api::config::v1 as proto;

use super::*;
use crate::{objects::Object, source::files};

fn objects(yaml: &str) -> Objects {
    let mut objects = Objects::default();
    for object in files::parse(Path::new("test.yaml"), yaml).expect("fixture parses") {
        objects.upsert(object);
    }
    objects
}

fn settings() -> Settings {
    Settings {
        trust_domain: "cluster.local".into(),
        root_namespace: "weft-system".into(),
        exclude_ports: vec![22],
    }
}

fn verdict<'a>(compiled: &'a Compiled, kind: Kind, namespace: &str, name: &str) -> &'a Verdict {
    compiled
        .statuses
        .get(&(kind, ObjectKey::new(namespace, name)))
        .unwrap_or_else(|| panic!("no verdict for {kind} {namespace}/{name}"))
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: Node
metadata: { name: node0 }
status: { addresses: [{ type: InternalIP, address: 10.99.0.1 }] }
---
apiVersion: v1
kind: Node
metadata: { name: node1 }
status: { addresses: [{ type: Hostname, address: node1 }, { type: InternalIP, address: 10.99.0.2 }] }
---
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Namespace
metadata: { name: legacy }
---
apiVersion: v1
kind: Pod
metadata: { name: web-0, namespace: shop, labels: { app: web } }
spec: { nodeName: node0, serviceAccountName: web, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.0.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: web-1, namespace: shop, labels: { app: web } }
spec: { nodeName: node1, serviceAccountName: web, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.1.2 }
---
apiVersion: v1
kind: Pod
metadata: { name: client, namespace: shop, labels: { app: client } }
spec: { nodeName: node0, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.0.3 }
---
apiVersion: v1
kind: Pod
metadata:
  name: batch
  namespace: shop
  labels: { app: batch }
  annotations: { weft.dev/mesh: disabled }
spec: { nodeName: node1, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.1.3 }
---
apiVersion: v1
kind: Pod
metadata: { name: done, namespace: shop, labels: { app: web } }
spec: { nodeName: node1, containers: [{ name: c, image: x }] }
status: { phase: Succeeded, podIP: 10.244.1.9 }
---
apiVersion: v1
kind: Pod
metadata: { name: old-app, namespace: legacy, labels: { app: web } }
spec: { nodeName: node1, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.1.4 }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIP: 10.96.0.10
  selector: { app: web }
  ports: [{ name: http, port: 80, targetPort: 8080 }, { name: udp, port: 53, protocol: UDP }]
---
apiVersion: v1
kind: Service
metadata: { name: headless, namespace: shop }
spec: { clusterIP: None, selector: { app: web }, ports: [{ port: 80 }] }
---
apiVersion: v1
kind: Service
metadata: { name: old, namespace: legacy }
spec: { clusterIP: 10.96.0.20, selector: { app: web }, ports: [{ port: 80 }] }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-abc, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [{ name: http, port: 8080 }]
endpoints:
  - { addresses: [10.244.0.2], conditions: { ready: true } }
  - { addresses: [10.244.1.2] }
  - { addresses: [10.244.1.7], conditions: { ready: false } }
"#;

#[test]
fn membership_follows_the_namespace_label_and_the_opt_out_annotation() {
    let compiled = compile(&objects(CLUSTER), &settings(), &TrustBundle::default());
    let namespaces = compiled.shared.all::<proto::Namespace>();
    assert_eq!(namespaces.keys().collect::<Vec<_>>(), ["shop"]);
    assert_eq!(namespaces["shop"].mode, proto::PeerMode::Strict as i32);

    let workloads = compiled.shared.all::<proto::Workload>();
    assert_eq!(
        workloads.keys().collect::<Vec<_>>(),
        ["shop/batch", "shop/client", "shop/web-0", "shop/web-1"],
        "finished pods and unmeshed namespaces stay out"
    );
    let web = &workloads["shop/web-1"];
    assert_eq!(
        (
            web.node.as_str(),
            web.ips.as_slice(),
            web.service_account.as_str()
        ),
        ("node1", &["10.244.1.2".to_owned()][..], "web")
    );
    assert_eq!(workloads["shop/client"].service_account, "default");
    assert!(workloads["shop/batch"].opted_out);
    assert!(!web.opted_out);

    let nodes = compiled.shared.all::<proto::Node>();
    assert_eq!(nodes["node1"].address, "10.99.0.2");
    let mesh = compiled.shared.get::<proto::MeshSettings>("mesh").unwrap();
    assert_eq!(mesh.exclude_ports, [22]);
}

#[test]
fn services_carry_ready_endpoints_and_tcp_ports() {
    let compiled = compile(&objects(CLUSTER), &settings(), &TrustBundle::default());
    let services = compiled.shared.all::<proto::Service>();
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        ["shop/web"],
        "headless services and unmeshed namespaces have no mesh VIP"
    );
    let web = &services["shop/web"];
    assert_eq!(web.vips, ["10.96.0.10"]);
    assert_eq!(web.ports.len(), 1, "UDP is not carried");
    assert_eq!((web.ports[0].port, web.ports[0].target_port), (80, 8080));
    assert_eq!(web.endpoints, ["10.244.0.2", "10.244.1.2"]);
}

#[test]
fn services_carry_port_protocols_endpoint_weights_and_locality() {
    // Replacing objects of CLUSTER.
    let changes = r#"
---
apiVersion: v1
kind: Node
metadata:
  name: node1
  labels: { topology.kubernetes.io/zone: zone-b }
  annotations: { weft.dev/hbone-address: pod }
status: { addresses: [{ type: InternalIP, address: 10.99.0.2 }] }
---
apiVersion: v1
kind: Node
metadata: { name: node2, annotations: { weft.dev/hbone-address: ztunnel } }
status: { addresses: [{ type: InternalIP, address: 10.99.0.3 }] }
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  labels: { app: web }
  annotations: { weft.dev/weight: "0" }
spec: { nodeName: node0, serviceAccountName: web, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.0.2 }
---
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  labels: { app: web }
  annotations: { weft.dev/weight: "1" }
spec: { nodeName: node1, serviceAccountName: web, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.1.2 }
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  labels: { app: client }
  annotations: { weft.dev/weight: heavy }
spec: { nodeName: node0, containers: [{ name: c, image: x }] }
status: { phase: Running, podIP: 10.244.0.3 }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIP: 10.96.0.10
  selector: { app: web }
  trafficDistribution: PreferClose
  ports:
    - { name: http, port: 80, targetPort: 8080, appProtocol: Kubernetes.io/H2C }
    - { name: grpc-api, port: 81, targetPort: 8081 }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-abc, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [{ name: http, port: 8080 }]
endpoints:
  - { addresses: [10.244.0.2] }
  - { addresses: [10.244.1.2] }
  - { addresses: [10.244.0.3] }
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: shop }
spec: { clusterIP: 10.96.0.11, selector: { app: web }, ports: [{ port: 80 }] }
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: api, namespace: shop }
spec: { service: api, loadBalancer: { trafficDistribution: PreferClose } }
---
apiVersion: v1
kind: Service
metadata: { name: far, namespace: shop }
spec: { clusterIP: 10.96.0.12, trafficDistribution: PreferSameNode, ports: [{ port: 80 }] }
"#;
    let compiled = compile(
        &objects(&format!("{CLUSTER}{changes}")),
        &settings(),
        &TrustBundle::default(),
    );
    let nodes = compiled.shared.all::<proto::Node>();
    assert_eq!(
        (nodes["node0"].zone.as_str(), nodes["node1"].zone.as_str()),
        ("", "zone-b")
    );
    assert_eq!(
        (
            nodes["node0"].hbone_address(),
            nodes["node1"].hbone_address()
        ),
        (proto::HboneAddress::Node, proto::HboneAddress::Pod)
    );
    // A value it does not know: the node's own address, and the node's verdict says why.
    assert_eq!(nodes["node2"].hbone_address(), proto::HboneAddress::Node);
    let node2 = verdict(&compiled, Kind::Node, "", "node2");
    assert_eq!(
        (node2.accepted, node2.reason, node2.message.as_str()),
        (
            false,
            Reason::Invalid,
            "metadata.annotations[\"weft.dev/hbone-address\"]: \"ztunnel\" is neither \"node\" \
             nor \"pod\"; the node's HBONE peer is dialed at the node's address"
        )
    );

    let services = compiled.shared.all::<proto::Service>();
    let web = &services["shop/web"];
    let ports: Vec<(&str, &str)> = web
        .ports
        .iter()
        .map(|port| (port.name.as_str(), port.app_protocol.as_str()))
        .collect();
    assert_eq!(
        ports,
        [("http", "kubernetes.io/h2c"), ("grpc-api", "")],
        "appProtocol in lower case, none as empty"
    );
    assert_eq!(
        web.endpoint_weights,
        [("10.244.0.2".to_owned(), 0)].into(),
        "only weights other than 1, and a bad one is 1"
    );
    let client = verdict(&compiled, Kind::Pod, "shop", "client");
    assert_eq!(
        (client.accepted, client.reason, client.message.as_str()),
        (
            false,
            Reason::Invalid,
            "metadata.annotations[\"weft.dev/weight\"]: \"heavy\" is not a weight (a whole \
             number from 0 to 1000); its endpoints keep weight 1"
        )
    );
    assert!(
        !compiled
            .statuses
            .contains_key(&(Kind::Pod, ObjectKey::new("shop", "web-0"))),
        "good pods have no verdict"
    );

    let prefer_close = |name: &str| services[&format!("shop/{name}")].prefer_close;
    assert!(prefer_close("web"), "the Service asks");
    assert!(prefer_close("api"), "its TrafficPolicy asks");
    assert!(!prefer_close("far"), "PreferSameNode is not about zones");
    let api = compiled
        .shared
        .get::<proto::TrafficPolicy>("shop/api")
        .unwrap();
    assert_eq!(
        api.load_balancing,
        proto::LoadBalancing::Unspecified as i32,
        "no algorithm: the agents' default"
    );
}

#[test]
fn peer_authentication_from_mesh_to_namespace_to_workload() {
    let policies = r#"
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: mesh, namespace: weft-system, creationTimestamp: "2026-01-01T00:00:00Z" }
spec: { mode: PERMISSIVE }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: web, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z", generation: 3 }
spec:
  selector: { matchLabels: { app: web } }
  mode: STRICT
  portModes: [{ port: 9090, mode: DISABLE }]
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: web-too, namespace: shop, creationTimestamp: "2026-01-03T00:00:00Z" }
spec: { selector: { matchLabels: { app: web } }, mode: DISABLE }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: nobody, namespace: shop, creationTimestamp: "2026-01-03T00:00:00Z" }
spec: { selector: { matchLabels: { app: nobody } }, mode: DISABLE }
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: broken, namespace: shop }
spec: { mode: DISABLE, portModes: [{ port: 80, mode: PERMISSIVE }] }
"#;
    let compiled = compile(
        &objects(&format!("{CLUSTER}{policies}")),
        &settings(),
        &TrustBundle::default(),
    );
    let namespaces = compiled.shared.all::<proto::Namespace>();
    assert_eq!(
        namespaces["shop"].mode,
        proto::PeerMode::Permissive as i32,
        "the mesh default applies; the invalid namespace policy does not"
    );
    let workloads = compiled.shared.all::<proto::Workload>();
    assert_eq!(workloads["shop/web-0"].mode, proto::PeerMode::Strict as i32);
    assert_eq!(
        workloads["shop/web-0"].port_modes.get(&9090),
        Some(&(proto::PeerMode::Disable as i32))
    );
    assert_eq!(
        workloads["shop/client"].mode,
        proto::PeerMode::Permissive as i32
    );
    assert_eq!(
        workloads["shop/batch"].mode,
        proto::PeerMode::Unspecified as i32
    );

    let web = verdict(&compiled, Kind::PeerAuthentication, "shop", "web");
    assert!(
        web.accepted && web.reason == Reason::Accepted && !web.message.contains("web-too"),
        "{web:?}"
    );
    assert_eq!(web.generation, Some(3));
    let too = verdict(&compiled, Kind::PeerAuthentication, "shop", "web-too");
    assert_eq!(
        (too.accepted, too.reason),
        (false, Reason::Conflicted),
        "{too:?}"
    );
    let nobody = verdict(&compiled, Kind::PeerAuthentication, "shop", "nobody");
    assert_eq!(
        (nobody.accepted, nobody.reason),
        (true, Reason::NoMatchingPods)
    );
    let broken = verdict(&compiled, Kind::PeerAuthentication, "shop", "broken");
    assert_eq!((broken.accepted, broken.reason), (false, Reason::Invalid));
    assert!(broken.message.starts_with("spec.portModes: "), "{broken:?}");
}

#[test]
fn authorization_policies_go_to_the_nodes_of_their_workloads() {
    let policies = r#"
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web-from-client, namespace: shop }
spec:
  selector: { matchLabels: { app: web } }
  rules:
    - from: [{ principals: ["spiffe://cluster.local/ns/shop/sa/default"] }]
      to: [{ ports: [8080], methods: [GET] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata:
  name: deny-legacy
  namespace: weft-system
  annotations: { istio.io/dry-run: "true" }
spec:
  action: DENY
  rules: [{ from: [{ namespaces: [legacy] }] }]
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: typo, namespace: shop }
spec:
  rules: [{ from: [{ principals: ["shop/sa/default"] }] }]
"#;
    let compiled = compile(
        &objects(&format!("{CLUSTER}{policies}")),
        &settings(),
        &TrustBundle::default(),
    );
    let node0 = compiled.view("node0");
    let policies0 = node0.local.all::<proto::AuthorizationPolicy>();
    assert_eq!(
        policies0.keys().collect::<Vec<_>>(),
        ["shop/web-from-client", "weft-system/deny-legacy"]
    );
    assert_eq!(policies0["shop/web-from-client"].workloads, ["shop/web-0"]);
    assert_eq!(
        policies0["weft-system/deny-legacy"].workloads,
        ["shop/client", "shop/web-0"],
        "mesh-wide: every meshed pod of the node"
    );
    let node1 = compiled
        .view("node1")
        .local
        .all::<proto::AuthorizationPolicy>();
    assert_eq!(
        node1["weft-system/deny-legacy"].workloads,
        ["shop/web-1"],
        "opted-out pods are not enforced"
    );
    assert!(
        compiled
            .view("node0")
            .shared
            .all::<proto::AuthorizationPolicy>()
            .is_empty()
    );
    let rule = &policies0["shop/web-from-client"].rules[0];
    assert_eq!(rule.to[0].ports, [8080]);
    assert_eq!(
        rule.from[0].principals,
        ["cluster.local/ns/shop/sa/default"],
        "principals travel as Istio writes them"
    );
    assert!(!policies0["shop/web-from-client"].dry_run);
    assert!(
        policies0["weft-system/deny-legacy"].dry_run,
        "Istio's dry-run annotation"
    );
    let typo = verdict(&compiled, Kind::AuthorizationPolicy, "shop", "typo");
    assert!(
        !typo.accepted
            && typo
                .message
                .starts_with("spec.rules[0].from[0].principals[0]: "),
        "{typo:?}"
    );
    assert_ne!(
        compiled.view("node0").version,
        compiled.view("node1").version,
        "nodes with different policies have different versions"
    );
}

#[test]
fn traffic_policies_need_their_service_and_the_oldest_wins() {
    let policies = r#"
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: web, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z" }
spec:
  service: web
  loadBalancer: { algorithm: PEAK_EWMA }
  timeouts: { connect: 500ms, request: 1m30s, streamIdle: 5m }
  retries: { attempts: 2, retryOn: [5xx], budget: { percent: 20, minPerSecond: 5 } }
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: web-again, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z" }
spec: { service: web }
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: ghost, namespace: shop }
spec: { service: ghost }
"#;
    let compiled = compile(
        &objects(&format!("{CLUSTER}{policies}")),
        &settings(),
        &TrustBundle::default(),
    );
    let policy = compiled
        .shared
        .get::<proto::TrafficPolicy>("shop/web")
        .unwrap();
    assert_eq!(policy.load_balancing, proto::LoadBalancing::PeakEwma as i32);
    assert_eq!(
        (
            policy.connect_timeout_ms,
            policy.request_timeout_ms,
            policy.stream_idle_timeout_ms
        ),
        (500, 90_000, 300_000)
    );
    assert_eq!(policy.retries.as_ref().unwrap().budget_percent, 20);
    assert_eq!(policy.source, "shop/web");
    let again = verdict(&compiled, Kind::TrafficPolicy, "shop", "web-again");
    assert_eq!(again.reason, Reason::Conflicted);
    let ghost = verdict(&compiled, Kind::TrafficPolicy, "shop", "ghost");
    assert_eq!(ghost.reason, Reason::ServiceNotFound);
    assert!(ghost.message.starts_with("spec.service: "), "{ghost:?}");
}

#[test]
fn routes_attach_to_service_ports_in_precedence_order_with_gateway_api_status() {
    let routes = r#"
---
apiVersion: v1
kind: Service
metadata: { name: web-canary, namespace: shop }
spec: { clusterIP: 10.96.0.11, selector: { app: canary }, ports: [{ port: 80 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: split, namespace: shop, creationTimestamp: "2026-01-01T00:00:00Z" }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules:
    - name: canary
      filters:
        - type: RequestMirror
          requestMirror: { backendRef: { name: web-canary, port: 80 }, fraction: { numerator: 1, denominator: 4 } }
        - type: RequestMirror
          requestMirror: { backendRef: { name: shadow, port: 80 } }
      backendRefs:
        - { name: web, port: 80, weight: 90 }
        - { name: web-canary, port: 80, weight: 10 }
        - { name: gone, port: 80, weight: 0 }
    - matches:
        - path: { type: Exact, value: /admin }
        - headers: [{ name: X-Canary, value: "yes" }]
      filters:
        - type: RequestRedirect
          requestRedirect: { scheme: https, statusCode: 301 }
      timeouts: { request: 2s, backendRequest: 1s }
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: rpc, namespace: shop, creationTimestamp: "2026-01-02T00:00:00Z" }
spec:
  parentRefs: [{ kind: Service, name: web }]
  rules:
    - matches: [{ method: { service: shop.Cart, method: Add } }]
      backendRefs: [{ name: web-canary, port: 80 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: dangling, namespace: shop, creationTimestamp: "2026-01-03T00:00:00Z" }
spec:
  parentRefs: [{ kind: Service, name: web, port: 80 }]
  rules: [{ matches: [{ path: { value: /dangling } }], backendRefs: [{ name: nowhere, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: legacy }
spec:
  parentRefs: [{ kind: Service, name: web, namespace: shop }]
  rules: [{ backendRefs: [{ name: web, namespace: shop, port: 80 }] }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: north-south, namespace: shop }
spec:
  parentRefs: [{ name: public-gateway }]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
"#;
    let compiled = compile(
        &objects(&format!("{CLUSTER}{routes}")),
        &settings(),
        &TrustBundle::default(),
    );
    let at = |key: &str| {
        let wire = compiled.shared.get::<proto::ServiceRoutes>(key).unwrap();
        weft_api::routes::ServiceRoutes::try_from(&wire).unwrap()
    };
    let at_80 = at("shop/web:80");
    let order: Vec<(&str, &str, Option<&str>)> = at_80
        .rules
        .iter()
        .map(|rule| {
            (
                rule.route.as_str(),
                rule.name.as_str(),
                rule.consumer_namespace.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        order,
        [
            ("GRPCRoute/shop/rpc", "0", None),
            ("HTTPRoute/shop/split", "1", None),
            ("HTTPRoute/shop/dangling", "0", None),
            ("HTTPRoute/shop/split", "1", None),
            // No creation time sorts first: older than the others.
            ("HTTPRoute/legacy/web", "0", Some("legacy")),
            ("HTTPRoute/shop/split", "canary", None),
        ],
        "exact paths, then the longest prefix, then more headers, then age"
    );
    assert_eq!(at_80.rules[3].matches[0].headers[0].name, "x-canary");
    let redirect = at_80.rules[1].filters.redirect.as_ref().unwrap();
    assert_eq!(
        (redirect.scheme.as_deref(), redirect.status),
        (Some("https"), 301)
    );
    assert_eq!(
        at_80.rules[1].timeouts.backend_request,
        Some(std::time::Duration::from_secs(1))
    );
    let backends: Vec<(Option<String>, u32)> = at_80.rules[5]
        .backends
        .iter()
        .map(|b| (b.target.as_ref().map(|t| t.service.clone()), b.weight))
        .collect();
    assert_eq!(
        backends,
        [
            (Some("web".into()), 90),
            (Some("web-canary".into()), 10),
            (None, 0)
        ]
    );
    // A parent without a port means every port of the service the mesh carries: the
    // UDP port is not one.
    assert!(
        compiled
            .shared
            .get::<proto::ServiceRoutes>("shop/web:53")
            .is_none()
    );

    let status =
        |namespace: &str, name: &str, kind: Kind| verdict(&compiled, kind, namespace, name);
    let mirrors: Vec<(&str, u32, u32)> = at_80.rules[5]
        .filters
        .mirrors
        .iter()
        .map(|m| (m.backend.service.as_str(), m.numerator, m.denominator))
        .collect();
    assert_eq!(
        mirrors,
        [("web-canary", 1, 4)],
        "a mirror that does not resolve sends nothing"
    );
    let split = status("shop", "split", Kind::HttpRoute);
    assert!(split.accepted, "{split:?}");
    let references = split.references.as_ref().unwrap();
    assert_eq!(
        (references.resolved, references.message.as_str()),
        (
            false,
            "spec.rules[0].filters[1].requestMirror.backendRef: there is no Service shop/shadow"
        ),
        "a weight-0 backend that does not resolve is no problem; a mirror's is"
    );
    let dangling = status("shop", "dangling", Kind::HttpRoute);
    assert!(
        dangling.accepted,
        "a missing backend fails only its share: {dangling:?}"
    );
    let references = dangling.references.as_ref().unwrap();
    assert_eq!(
        (
            references.resolved,
            references.reason,
            references.message.as_str()
        ),
        (
            false,
            Reason::BackendNotFound,
            "spec.rules[0].backendRefs[0]: there is no Service shop/nowhere"
        )
    );
    let consumer = status("legacy", "web", Kind::HttpRoute);
    assert_eq!(
        consumer.message,
        "routes requests to Service shop/web for clients in namespace legacy (a consumer route)"
    );
    assert_eq!(
        consumer.references.as_ref().unwrap().reason,
        Reason::ResolvedRefs
    );
    assert!(
        !compiled
            .statuses
            .contains_key(&(Kind::HttpRoute, ObjectKey::new("shop", "north-south"))),
        "routes of Gateways are another controller's"
    );
}

#[test]
fn backends_in_other_namespaces_need_a_reference_grant() {
    let store = r#"
---
apiVersion: v1
kind: Namespace
metadata: { name: store, labels: { weft.dev/mesh: enabled } }
---
apiVersion: v1
kind: Service
metadata: { name: api, namespace: store }
spec: { clusterIP: 10.96.0.30, selector: { app: api }, ports: [{ port: 80 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: to-store, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: web, port: 80 }]
  rules: [{ backendRefs: [{ name: api, namespace: store, port: 80 }] }]
"#;
    let grant = |from_kind: &str, to_name: &str| {
        format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: ReferenceGrant\nmetadata: {{ name: shop-in, namespace: store }}\nspec:\n  from: [{{ group: gateway.networking.k8s.io, kind: {from_kind}, namespace: shop }}]\n  to: [{{ group: \"\", kind: Service, name: {to_name} }}]\n"
        )
    };
    let cases = [
        (String::new(), false),
        (grant("HTTPRoute", "api"), true),
        (grant("GRPCRoute", "api"), false),
        (grant("HTTPRoute", "other"), false),
    ];
    for (grant, resolved) in cases {
        let compiled = compile(
            &objects(&format!("{CLUSTER}{store}{grant}")),
            &settings(),
            &TrustBundle::default(),
        );
        let verdict = verdict(&compiled, Kind::HttpRoute, "shop", "to-store");
        let references = verdict.references.as_ref().unwrap();
        assert_eq!(references.resolved, resolved, "{grant}: {verdict:?}");
        if !resolved {
            assert_eq!(references.reason, Reason::RefNotPermitted, "{grant}");
        }
        let wire = compiled
            .shared
            .get::<proto::ServiceRoutes>("shop/web:80")
            .unwrap();
        assert_eq!(
            wire.rules[0].backends[0].service.is_empty(),
            !resolved,
            "{grant}"
        );
    }
}

#[test]
fn route_rules_carry_the_fault_injections_they_reference() {
    let faults = |delay: &str| {
        format!(
            r#"
---
apiVersion: weft.dev/v1alpha1
kind: FaultInjection
metadata: {{ name: flaky, namespace: shop }}
spec: {{ delay: {{ fixedDelay: {delay}, percent: 10 }}, abort: {{ grpcStatus: 14 }} }}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{ name: chaos, namespace: shop }}
spec:
  parentRefs: [{{ kind: Service, name: web, port: 80 }}]
  rules:
    - filters: [{{ type: ExtensionRef, extensionRef: {{ group: weft.dev, kind: FaultInjection, name: flaky }} }}]
      backendRefs: [{{ name: web, port: 80 }}]
"#
        )
    };
    let compiled = compile(
        &objects(&format!("{CLUSTER}{}", faults("250ms"))),
        &settings(),
        &TrustBundle::default(),
    );
    let fault = verdict(&compiled, Kind::FaultInjection, "shop", "flaky");
    assert_eq!(fault.reason, Reason::Accepted, "{fault:?}");
    let route = verdict(&compiled, Kind::HttpRoute, "shop", "chaos");
    assert!(route.references.as_ref().unwrap().resolved, "{route:?}");
    let wire = compiled
        .shared
        .get::<proto::ServiceRoutes>("shop/web:80")
        .unwrap();
    let routes = weft_api::routes::ServiceRoutes::try_from(&wire).unwrap();
    let injected = routes.rules[0].filters.fault.unwrap();
    assert_eq!(injected.delay, Some((Duration::from_millis(250), 10)));
    let (abort, percent) = injected.abort.unwrap();
    assert_eq!(
        (abort.grpc_status, abort.http_status, percent),
        (Some(14), None, 100)
    );

    // Invalid: the FaultInjection says why, and the rule's requests get 500.
    let compiled = compile(
        &objects(&format!("{CLUSTER}{}", faults("soon"))),
        &settings(),
        &TrustBundle::default(),
    );
    let fault = verdict(&compiled, Kind::FaultInjection, "shop", "flaky");
    assert_eq!(fault.reason, Reason::Invalid, "{fault:?}");
    assert!(
        fault.message.starts_with("spec.delay.fixedDelay: "),
        "{fault:?}"
    );
    let route = verdict(&compiled, Kind::HttpRoute, "shop", "chaos");
    let references = route.references.as_ref().unwrap();
    assert_eq!(references.reason, Reason::FilterNotFound, "{route:?}");
    assert!(
        references.message.contains(
            "spec.rules[0].filters[0].extensionRef: FaultInjection shop/flaky is invalid"
        ),
        "{references:?}"
    );
    let wire = compiled
        .shared
        .get::<proto::ServiceRoutes>("shop/web:80")
        .unwrap();
    let routes = weft_api::routes::ServiceRoutes::try_from(&wire).unwrap();
    let (abort, percent) = routes.rules[0].filters.fault.unwrap().abort.unwrap();
    assert_eq!((abort.http_status, percent), (Some(500), 100));
}

#[test]
fn a_parent_that_does_not_exist_refuses_the_route_for_itself_only() {
    let route = r#"
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: two-parents, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: web, port: 80 }, { kind: Service, name: gone }]
  rules: [{ backendRefs: [{ name: web, port: 80 }] }]
"#;
    let compiled = compile(
        &objects(&format!("{CLUSTER}{route}")),
        &settings(),
        &TrustBundle::default(),
    );
    let verdict = verdict(&compiled, Kind::HttpRoute, "shop", "two-parents");
    assert!(verdict.accepted, "{verdict:?}");
    let gone = verdict.for_parent(1);
    assert_eq!(
        (gone.accepted, gone.reason, gone.message.as_str()),
        (
            false,
            Reason::NoMatchingParent,
            "spec.parentRefs[1]: there is no Service shop/gone"
        )
    );
    assert!(verdict.for_parent(0).accepted);
    assert!(
        compiled
            .shared
            .get::<proto::ServiceRoutes>("shop/web:80")
            .is_some()
    );
}

#[test]
fn routes_weft_cannot_honour_are_refused_naming_the_field() {
    let route = |spec: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{ name: mysql, namespace: shop }}\nspec: {{ clusterIP: 10.96.0.40, selector: {{ app: db }}, ports: [{{ name: mysql, port: 3306 }}] }}\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: bad, namespace: shop }}\nspec: {spec}\n"
        )
    };
    let cases = [
        (
            "{ parentRefs: [{ kind: Service, name: nowhere }] }",
            Reason::NoMatchingParent,
            "spec.parentRefs[0]: there is no Service shop/nowhere",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web, port: 81 }] }",
            Reason::NoMatchingParent,
            "spec.parentRefs[0].port: Service shop/web has no port 81",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: mysql, port: 3306 }] }",
            Reason::UnsupportedValue,
            "spec.parentRefs[0].port: port 3306 of Service shop/mysql carries opaque TCP (its \
             appProtocol or name says so), which routes cannot match",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], hostnames: [web.example] }",
            Reason::UnsupportedValue,
            "spec.hostnames: a mesh route applies by the Service's address, not by host names; \
             remove them (or route a Gateway with them)",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], rules: [{ filters: [{ type: RequestMirror, requestMirror: { backendRef: { name: web, port: 80 }, percent: 200 } }] }] }",
            Reason::UnsupportedValue,
            "spec.rules[0].filters[0]: requestMirror: 200/100 is not a share of requests",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], rules: [{ filters: [{ type: CORS, cors: { allowOrigins: [\"*\"] } }] }] }",
            Reason::UnsupportedValue,
            "spec.rules[0].filters[0]: CORS filters are not supported by weft \
             (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, \
             RequestMirror and ExtensionRef to a weft.dev FaultInjection are)",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], rules: [{ filters: [{ type: ExtensionRef, extensionRef: { group: example.com, kind: RateLimit, name: x } }] }] }",
            Reason::UnsupportedValue,
            "spec.rules[0].filters[0]: extensionRef: example.com/RateLimit is not a filter \
             weft knows (weft.dev/FaultInjection is)",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], rules: [{ matches: [{ path: { type: RegularExpression, value: '(' } }] }] }",
            Reason::UnsupportedValue,
            "spec.rules[0].matches[0].path.value: \"(\" is not a regular expression (unclosed group)",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], rules: [{ filters: [{ type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: \"bad name\", value: x }] } }] }] }",
            Reason::UnsupportedValue,
            "spec.rules[0].filters[0]: requestHeaderModifier: \"bad name\" is not a header name",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], rules: [{ filters: [{ type: URLRewrite, urlRewrite: { hostname: a } }, { type: URLRewrite, urlRewrite: { hostname: b } }] }] }",
            Reason::UnsupportedValue,
            "spec.rules[0].filters[1]: a second URLRewrite filter",
        ),
        (
            "{ parentRefs: [{ kind: Service, name: web }], rules: [{ timeouts: { request: 1s, backendRequest: 2s } }] }",
            Reason::UnsupportedValue,
            "spec.rules[0].timeouts.backendRequest: longer than timeouts.request",
        ),
    ];
    for (spec, reason, message) in cases {
        let compiled = compile(
            &objects(&format!("{CLUSTER}{}", route(spec))),
            &settings(),
            &TrustBundle::default(),
        );
        let verdict = verdict(&compiled, Kind::HttpRoute, "shop", "bad");
        assert_eq!(
            (verdict.accepted, verdict.reason, verdict.message.as_str()),
            (false, reason, message),
            "{spec}"
        );
        assert!(
            compiled
                .shared
                .get::<proto::ServiceRoutes>("shop/web:80")
                .is_none(),
            "a refused route applies nowhere: {spec}"
        );
    }
}

#[test]
fn endpoint_changes_change_only_what_they_touch() {
    let mut objects = objects(CLUSTER);
    let before = compile(&objects, &settings(), &TrustBundle::default());
    let slice_key = ObjectKey::new("shop", "web-abc");
    let mut slice = objects.endpoint_slices[&slice_key].as_ref().clone();
    slice.endpoints.truncate(1);
    objects.upsert(Object::EndpointSlice(Arc::new(slice)));
    let after = compile(&objects, &settings(), &TrustBundle::default());
    let delta = after
        .view("node0")
        .delta_from(&before.view("node0"), &after.shared_changes);
    let changed: Vec<&str> = delta
        .upserts
        .iter()
        .map(|r| r.key.as_ref().unwrap().name.as_str())
        .collect();
    assert_eq!(changed, ["shop/web"]);
    assert!(delta.removals.is_empty());
    assert_eq!(
        compile(&objects, &settings(), &TrustBundle::default())
            .view("node0")
            .version,
        after.view("node0").version,
        "the same objects give the same version"
    );
}

#[test]
fn verdicts_say_accepted_only_for_what_the_agents_enforce() {
    // (object, kind, name, accepted, reason, message)
    let cases = [
        (
            "kind: TrafficPolicy\nmetadata: { name: idle, namespace: shop }\nspec: { service: web, timeouts: { idle: 5s } }",
            Kind::TrafficPolicy,
            "idle",
            true,
            Reason::Accepted,
            "applies to clients of Service web".to_owned(),
        ),
        (
            "kind: TrafficPolicy\nmetadata: { name: bare, namespace: shop }\nspec: { service: web, timeouts: {}, connectionLimits: {} }",
            Kind::TrafficPolicy,
            "bare",
            true,
            Reason::Accepted,
            "applies to clients of Service web".to_owned(),
        ),
        (
            "kind: TrafficPolicy\nmetadata: { name: retries, namespace: shop }\nspec: { service: web, timeouts: { idle: 5s }, retries: { attempts: 2 } }",
            Kind::TrafficPolicy,
            "retries",
            true,
            Reason::Accepted,
            "applies to clients of Service web".to_owned(),
        ),
        (
            "kind: TrafficPolicy\nmetadata: { name: everything, namespace: shop }\nspec:\n  service: web\n  loadBalancer: { algorithm: PEAK_EWMA }\n  timeouts: { connect: 1s, request: 2s }\n  retries: { attempts: 2 }\n  connectionLimits: { maxConnections: 10 }\n  outlierDetection: { consecutiveFailures: 5, interval: 10s }",
            Kind::TrafficPolicy,
            "everything",
            false,
            Reason::NotEnforced,
            "the agents do not enforce spec.outlierDetection.interval yet and ignore it; \
             spec.connectionLimits, spec.loadBalancer, \
             spec.outlierDetection.consecutiveFailures, spec.retries, spec.timeouts apply \
             to clients of Service web"
                .to_owned(),
        ),
        (
            "kind: TrafficPolicy\nmetadata: { name: close, namespace: shop }\nspec: { service: web, loadBalancer: { trafficDistribution: PreferClose } }",
            Kind::TrafficPolicy,
            "close",
            true,
            Reason::Accepted,
            "applies to clients of Service web".to_owned(),
        ),
        (
            "kind: TrafficPolicy\nmetadata: { name: typo, namespace: shop }\nspec: { service: web, timeouts: { idle: soon }, retries: { attempts: 2 } }",
            Kind::TrafficPolicy,
            "typo",
            false,
            Reason::Invalid,
            format!(
                "spec.timeouts.idle: \"soon\" is not a duration such as 500ms, 15s, 1m30s (pattern {})",
                weft_api::crd::DURATION_PATTERN
            ),
        ),
        (
            "kind: TrafficPolicy\nmetadata: { name: ghost, namespace: shop }\nspec: { service: ghost, retries: { attempts: 2 } }",
            Kind::TrafficPolicy,
            "ghost",
            false,
            Reason::ServiceNotFound,
            "spec.service: there is no Service ghost in namespace shop".to_owned(),
        ),
        (
            "kind: AuthorizationPolicy\nmetadata: { name: web, namespace: shop }\nspec: { selector: { matchLabels: { app: web } } }",
            Kind::AuthorizationPolicy,
            "web",
            true,
            Reason::Accepted,
            "applies to the meshed pods spec.selector matches".to_owned(),
        ),
        (
            "kind: AuthorizationPolicy\nmetadata: { name: shop-wide, namespace: shop }\nspec: { action: DENY, rules: [{ from: [{ namespaces: [legacy] }] }] }",
            Kind::AuthorizationPolicy,
            "shop-wide",
            true,
            Reason::Accepted,
            "applies to every meshed pod of namespace shop".to_owned(),
        ),
        (
            "kind: AuthorizationPolicy\nmetadata: { name: nobody, namespace: shop }\nspec: { selector: { matchLabels: { app: nobody } } }",
            Kind::AuthorizationPolicy,
            "nobody",
            true,
            Reason::NoMatchingPods,
            "applies to the meshed pods spec.selector matches, and there are none yet".to_owned(),
        ),
        (
            "kind: AuthorizationPolicy\nmetadata: { name: by-address, namespace: shop }\nspec: { selector: { matchLabels: { app: web } }, rules: [{ from: [{ ipBlocks: [10.0.0.0/8] }] }] }\n---\napiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: { name: open, namespace: shop }\nspec: { mode: PERMISSIVE }",
            Kind::AuthorizationPolicy,
            "by-address",
            false,
            Reason::NotEnforced,
            "plaintext into PERMISSIVE pods or ports (shop/web-0, shop/web-1) is let in \
             unchecked: the kernel decides plaintext by port alone, and the rules name source \
             addresses (ipBlocks, notIpBlocks or source.ip); it applies to all mesh traffic \
             to the meshed pods spec.selector matches"
                .to_owned(),
        ),
        (
            "kind: AuthorizationPolicy\nmetadata: { name: typo, namespace: shop }\nspec: { rules: [{ from: [{ principals: [shop/sa/web] }] }] }",
            Kind::AuthorizationPolicy,
            "typo",
            false,
            Reason::Invalid,
            "spec.rules[0].from[0].principals[0]: \"shop/sa/web\" is not a SPIFFE ID \
             (<trust-domain>/ns/<namespace>/sa/<service-account>, optionally with spiffe://)"
                .to_owned(),
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: web, namespace: shop }\nspec: { parentRefs: [{ kind: Service, name: web }], rules: [{ backendRefs: [{ name: web, port: 80 }] }] }",
            Kind::HttpRoute,
            "web",
            true,
            Reason::Accepted,
            "routes requests to Service shop/web for every client".to_owned(),
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: { name: rpc, namespace: shop }\nspec: { parentRefs: [{ kind: Service, name: web }], rules: [{ backendRefs: [{ name: web, port: 80 }] }] }",
            Kind::GrpcRoute,
            "rpc",
            true,
            Reason::Accepted,
            "routes requests to Service shop/web for every client".to_owned(),
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: dangling, namespace: shop }\nspec: { parentRefs: [{ kind: Service, name: web }], rules: [{ backendRefs: [{ name: nowhere, port: 80 }] }] }",
            Kind::HttpRoute,
            "dangling",
            true,
            Reason::Accepted,
            "routes requests to Service shop/web for every client".to_owned(),
        ),
        (
            "kind: PeerAuthentication\nmetadata: { name: web, namespace: shop }\nspec: { selector: { matchLabels: { app: web } }, mode: PERMISSIVE }",
            Kind::PeerAuthentication,
            "web",
            true,
            Reason::Accepted,
            "applies to the meshed pods spec.selector matches".to_owned(),
        ),
    ];
    for (object, kind, name, accepted, reason, message) in cases {
        let object = if object.starts_with("apiVersion") {
            object.to_owned()
        } else {
            format!("apiVersion: weft.dev/v1alpha1\n{object}")
        };
        let compiled = compile(
            &objects(&format!("{CLUSTER}---\n{object}\n")),
            &settings(),
            &TrustBundle::default(),
        );
        let verdict = verdict(&compiled, kind, "shop", name);
        assert_eq!(
            (verdict.accepted, verdict.reason, verdict.message.as_str()),
            (accepted, reason, message.as_str()),
            "{kind} {name}"
        );
    }
}

#[test]
fn policies_the_agents_do_not_enforce_are_still_sent() {
    let policies = r#"
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: web, namespace: shop }
spec: { service: web, timeouts: { idle: 3s }, outlierDetection: { consecutiveFailures: 2, interval: 5s } }
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: web, namespace: shop }
spec: { selector: { matchLabels: { app: web } } }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: shop }
spec: { parentRefs: [{ kind: Service, name: web, port: 80 }], rules: [{ backendRefs: [{ name: web, port: 80 }] }] }
"#;
    let compiled = compile(
        &objects(&format!("{CLUSTER}{policies}")),
        &settings(),
        &TrustBundle::default(),
    );
    assert_eq!(
        verdict(&compiled, Kind::TrafficPolicy, "shop", "web").reason,
        Reason::NotEnforced
    );
    let traffic = compiled
        .shared
        .get::<proto::TrafficPolicy>("shop/web")
        .expect("the traffic policy is sent");
    assert_eq!(
        (traffic.idle_timeout_ms, traffic.outlier_detection.is_some()),
        (3000, true)
    );
    assert!(
        compiled
            .shared
            .get::<proto::ServiceRoutes>("shop/web:80")
            .is_some()
    );
    assert!(
        compiled
            .view("node0")
            .local
            .get::<proto::AuthorizationPolicy>("shop/web")
            .is_some()
    );
}
