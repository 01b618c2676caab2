//! The signing service (`weft.ca.v1.CertificateAuthority`) over real gRPC on loopback:
//! agents authenticate as their node with a token file, and get a certificate only for
//! the service account of a pod that runs (or is about to run) on that node. Refusals
//! are counted by reason.
//!
//! The tests run on tokio's single-threaded runtime, so the server's tasks run on the
//! test's thread and record metrics into the test's own (thread-local) recorder.

#[path = "support/grpc.rs"]
mod grpc;

use std::{
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rcgen::{CertificateParams, KeyPair, PublicKeyData as _, SanType, string::Ia5String};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tempfile::TempDir;
use tokio::sync::watch;
use tonic::{Code, Request, Status, service::Routes};
use weft_api::ca::v1::{
    SignRequest, SignResponse, certificate_authority_client::CertificateAuthorityClient,
};
use weft_controller::{
    auth::NodeAuthenticator,
    ca::{Authority, Material, ROOTS, runtime::CaState, service::CaService},
    objects::Objects,
    source::files,
};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const PAY: &str = "spiffe://cluster.local/ns/shop/sa/pay";
const REPORT: &str = "spiffe://cluster.local/ns/shop/sa/report";

/// `shop/cart` runs on node0, `shop/pay` on node1; `shop/report`'s pod on node0 is in
/// phase `{report}`.
fn cluster(report: &str) -> Objects {
    let yaml = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{ name: shop, labels: {{ weft.dev/mesh: enabled }} }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: cart-0, namespace: shop }}
spec: {{ nodeName: node0, serviceAccountName: cart, containers: [{{ name: c, image: x }}] }}
status: {{ phase: Running, podIP: 10.244.0.2 }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: pay-0, namespace: shop }}
spec: {{ nodeName: node1, serviceAccountName: pay, containers: [{{ name: c, image: x }}] }}
status: {{ phase: Running, podIP: 10.244.1.2 }}
---
apiVersion: v1
kind: Pod
metadata: {{ name: report-0, namespace: shop }}
spec: {{ nodeName: node0, serviceAccountName: report, containers: [{{ name: c, image: x }}] }}
status: {{ phase: {report}, podIP: 10.244.0.3 }}
"#
    );
    let mut objects = Objects::default();
    for object in files::parse(Path::new("cluster.yaml"), &yaml).expect("the cluster parses") {
        objects.upsert(object);
    }
    objects
}

/// A controller's signing service, serving on loopback.
struct Ca {
    address: SocketAddr,
    objects: watch::Sender<Arc<Objects>>,
    state: watch::Sender<Arc<CaState>>,
    /// The root weft generated.
    root: CertificateDer<'static>,
    material: Material,
    /// Holds `node0.token` (`token-0`) and `node1.token` (`token-1`).
    _tokens: TempDir,
}

impl Ca {
    async fn start(objects: Objects) -> Ca {
        let now = SystemTime::now();
        let material = Authority::generate_root(now).unwrap();
        let authority = Authority::load(&material, now).unwrap();
        let root = CertificateDer::from_pem_slice(&material[ROOTS]).unwrap();
        let (state, state_rx) = watch::channel(Arc::new(CaState {
            authority: Arc::new(authority),
            propagated: true,
        }));
        let (objects, objects_rx) = watch::channel(Arc::new(objects));
        let tokens = tempfile::tempdir().unwrap();
        std::fs::write(tokens.path().join("node0.token"), "token-0\n").unwrap();
        std::fs::write(tokens.path().join("node1.token"), "token-1\n").unwrap();
        let service = CaService {
            state: state_rx,
            objects: objects_rx,
            auth: Arc::new(NodeAuthenticator::TokenFiles {
                dir: tokens.path().to_owned(),
            }),
            trust_domain: "cluster.local".to_owned(),
            ttl: Duration::from_secs(3600),
        };
        let address = grpc::serve(Routes::new(service.into_server())).await;
        Ca {
            address,
            objects,
            state,
            root,
            material,
            _tokens: tokens,
        }
    }

    /// Asks for `csr` as `node`, with `token` as the bearer token if there is one.
    async fn sign(
        &self,
        node: &str,
        token: Option<&str>,
        csr: &str,
    ) -> Result<SignResponse, Status> {
        let mut client = CertificateAuthorityClient::connect(format!("http://{}", self.address))
            .await
            .expect("the controller accepts connections");
        let mut request = Request::new(SignRequest {
            node: node.to_owned(),
            csr: csr.to_owned(),
        });
        if let Some(token) = token {
            let value = format!("Bearer {token}").parse().unwrap();
            request.metadata_mut().insert("authorization", value);
        }
        client.sign(request).await.map(tonic::Response::into_inner)
    }
}

/// A PEM signing request with these SANs, and the key it was made with.
fn csr(sans: Vec<SanType>) -> (String, KeyPair) {
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let key = KeyPair::generate().unwrap();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (pem, key)
}

fn uri(id: &str) -> SanType {
    SanType::URI(Ia5String::try_from(id).unwrap())
}

fn csr_for(id: &str) -> (String, KeyPair) {
    csr(vec![uri(id)])
}

fn certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("PEM certificates")
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> X509Certificate<'a> {
    x509_parser::parse_x509_certificate(der)
        .expect("a certificate")
        .1
}

/// Checks that `response` holds a certificate for `id` and `key`, alone in its chain
/// and signed by `root`, which is the root the response names.
fn assert_issued(response: &SignResponse, id: &str, key: &KeyPair, root: &CertificateDer<'_>) {
    let chain = certificates(&response.chain);
    assert_eq!(chain.len(), 1, "a root signer sends the leaf alone");
    assert_eq!(certificates(&response.root), std::slice::from_ref(root));
    let leaf = parse(&chain[0]);
    let sans = &leaf
        .subject_alternative_name()
        .expect("a valid SAN extension")
        .expect("a SAN extension")
        .value
        .general_names;
    assert_eq!(sans, &[GeneralName::URI(id)]);
    assert_eq!(leaf.public_key().raw, key.subject_public_key_info());
    assert!(!leaf.is_ca());
    assert!(leaf.validity().is_valid(), "{:?}", leaf.validity());
    let root = parse(root);
    assert_eq!(leaf.issuer(), root.subject());
    leaf.verify_signature(Some(root.public_key()))
        .expect("the leaf is signed by the root");
}

fn assert_refused(result: Result<SignResponse, Status>, code: Code, mentions: &[&str]) {
    let status = result.expect_err("the request is refused");
    assert_eq!(status.code(), code, "{status:?}");
    for text in mentions {
        assert!(status.message().contains(text), "{text:?} in {status:?}");
    }
}

/// Counts what the server records on this test's thread, until it is dropped.
fn count_metrics() -> (PrometheusHandle, metrics::LocalRecorderGuard<'static>) {
    let recorder = Box::leak(Box::new(PrometheusBuilder::new().build_recorder()));
    let handle = recorder.handle();
    (handle, metrics::set_default_local_recorder(recorder))
}

/// The value of a counter series (`name{labels}`, as Prometheus prints it).
fn counter(metrics: &PrometheusHandle, series: &str) -> u64 {
    metrics
        .render()
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

fn refusals(metrics: &PrometheusHandle, reason: &str) -> u64 {
    counter(
        metrics,
        &format!("weft_controller_certificate_refusals_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test]
async fn a_node_gets_certificates_for_the_service_accounts_it_runs() {
    let (metrics, _counting) = count_metrics();
    let ca = Ca::start(cluster("Running")).await;

    let (request, key) = csr_for(CART);
    let response = ca.sign("node0", Some("token-0"), &request).await.unwrap();
    assert_issued(&response, CART, &key, &ca.root);

    let (request, key) = csr_for(PAY);
    let response = ca.sign("node1", Some("token-1"), &request).await.unwrap();
    assert_issued(&response, PAY, &key, &ca.root);

    assert_eq!(
        counter(&metrics, "weft_controller_certificates_issued_total"),
        2
    );
    assert!(
        !metrics
            .render()
            .contains("weft_controller_certificate_refusals_total")
    );
}

#[tokio::test]
async fn a_node_may_not_hold_identities_of_pods_elsewhere() {
    let (metrics, _counting) = count_metrics();
    let ca = Ca::start(cluster("Running")).await;

    // shop/pay runs on node1 only.
    let (request, _) = csr_for(PAY);
    let refused = ca.sign("node0", Some("token-0"), &request).await;
    assert_refused(refused, Code::PermissionDenied, &["node0", "shop/pay"]);
    // The same service account name in another namespace is another identity.
    let (request, _) = csr_for("spiffe://cluster.local/ns/legacy/sa/cart");
    let refused = ca.sign("node0", Some("token-0"), &request).await;
    assert_refused(refused, Code::PermissionDenied, &["node0", "legacy/cart"]);
    // So is the same path in another trust domain.
    let (request, _) = csr_for("spiffe://example.org/ns/shop/sa/cart");
    let refused = ca.sign("node0", Some("token-0"), &request).await;
    assert_refused(
        refused,
        Code::PermissionDenied,
        &["trust domain cluster.local"],
    );
    // And a SPIFFE ID that names no service account.
    let (request, _) = csr_for("spiffe://cluster.local/ns/shop/sa/cart/extra");
    let refused = ca.sign("node0", Some("token-0"), &request).await;
    assert_refused(
        refused,
        Code::PermissionDenied,
        &["not a workload identity"],
    );

    assert_eq!(refusals(&metrics, "foreign_identity"), 4);
    assert_eq!(
        counter(&metrics, "weft_controller_certificates_issued_total"),
        0
    );
}

#[tokio::test]
async fn a_node_that_does_not_prove_its_name_is_refused() {
    let (metrics, _counting) = count_metrics();
    let ca = Ca::start(cluster("Running")).await;
    let (request, _) = csr_for(CART);

    // Another node's token.
    let refused = ca.sign("node0", Some("token-1"), &request).await;
    assert_refused(refused, Code::PermissionDenied, &["node0"]);
    // No token.
    let refused = ca.sign("node0", None, &request).await;
    assert_refused(refused, Code::PermissionDenied, &["authorization: Bearer"]);
    // A node that has no token file.
    let refused = ca.sign("node9", Some("token-0"), &request).await;
    assert_refused(refused, Code::PermissionDenied, &["node9"]);
    // Authentication comes first: a broken request without a token says so.
    let refused = ca.sign("node0", None, "garbage").await;
    assert_refused(refused, Code::PermissionDenied, &["no credential"]);

    assert_eq!(refusals(&metrics, "unauthenticated"), 4);
    assert_eq!(refusals(&metrics, "invalid_request"), 0);
    assert_eq!(
        counter(&metrics, "weft_controller_certificates_issued_total"),
        0
    );
}

#[tokio::test]
async fn requests_without_exactly_one_spiffe_id_are_invalid() {
    let (metrics, _counting) = count_metrics();
    let ca = Ca::start(cluster("Running")).await;

    let (two, _) = csr(vec![uri(CART), uri(PAY)]);
    let refused = ca.sign("node0", Some("token-0"), &two).await;
    assert_refused(
        refused,
        Code::InvalidArgument,
        &["exactly one URI", "it has 2"],
    );

    let dns = SanType::DnsName(Ia5String::try_from("cart.shop.svc").unwrap());
    let (none, _) = csr(vec![dns]);
    let refused = ca.sign("node0", Some("token-0"), &none).await;
    assert_refused(refused, Code::InvalidArgument, &["it has 0"]);

    let refused = ca.sign("node0", Some("token-0"), "garbage").await;
    assert_refused(refused, Code::InvalidArgument, &["PKCS#10"]);

    // A request whose signature does not match its key proves no possession of it.
    let (request, _) = csr_for(CART);
    let mut der = pem::parse(&request).unwrap().into_contents();
    *der.last_mut().unwrap() ^= 0x01;
    let forged = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
    let refused = ca.sign("node0", Some("token-0"), &forged).await;
    assert_refused(refused, Code::InvalidArgument, &["PKCS#10"]);

    assert_eq!(refusals(&metrics, "invalid_request"), 4);
    assert_eq!(
        counter(&metrics, "weft_controller_certificates_issued_total"),
        0
    );
}

#[tokio::test]
async fn a_pod_that_has_finished_does_not_count() {
    let ca = Ca::start(cluster("Succeeded")).await;
    let (request, key) = csr_for(REPORT);

    let refused = ca.sign("node0", Some("token-0"), &request).await;
    assert_refused(refused, Code::PermissionDenied, &["node0", "shop/report"]);
    ca.objects.send_replace(Arc::new(cluster("Failed")));
    let refused = ca.sign("node0", Some("token-0"), &request).await;
    assert_refused(refused, Code::PermissionDenied, &["node0", "shop/report"]);

    // The same pod, scheduled again, is about to run: its identity is signed.
    ca.objects.send_replace(Arc::new(cluster("Pending")));
    let response = ca.sign("node0", Some("token-0"), &request).await.unwrap();
    assert_issued(&response, REPORT, &key, &ca.root);
}

#[tokio::test]
async fn the_previous_root_signs_until_the_new_one_has_propagated() {
    let ca = Ca::start(cluster("Running")).await;
    let now = SystemTime::now();
    let rotated = Authority::rotate(&ca.material, now, Duration::from_secs(3600)).unwrap();
    let new_root = CertificateDer::from_pem_slice(&rotated[ROOTS]).unwrap();
    assert_ne!(new_root, ca.root);
    let authority = Arc::new(Authority::load(&rotated, now).unwrap());
    let (request, key) = csr_for(CART);

    ca.state.send_replace(Arc::new(CaState {
        authority: Arc::clone(&authority),
        propagated: false,
    }));
    let response = ca.sign("node0", Some("token-0"), &request).await.unwrap();
    assert_issued(&response, CART, &key, &ca.root);

    ca.state.send_replace(Arc::new(CaState {
        authority,
        propagated: true,
    }));
    let response = ca.sign("node0", Some("token-0"), &request).await.unwrap();
    assert_issued(&response, CART, &key, &new_root);
}
