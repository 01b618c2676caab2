//! The fake's port-forwards, driven by kube-rs's own client as weftctl drives them:
//! bytes reach the pod's port and come back, a port nobody listens on is reported on
//! its error channel, and only a subject the roles allow may open one.

use std::{net::TcpListener, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use weft_fake_api::{FakeApi, Subject};

const DEADLINE: Duration = Duration::from_secs(10);

fn pod(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "weft-system" },
        "status": { "podIP": "127.0.0.1" },
    })
}

/// A client of `fake` authenticated as user `alice`, bound to the operator's roles.
fn operator(fake: &FakeApi) -> kube::Client {
    fake.add_token("alice-token", &[], json!({ "username": "alice" }));
    let alice = Subject::User("alice".into());
    fake.bind(alice, "Role", "weft-operator", Some("weft-system"));
    let mut config = kube::Config::new(fake.url().parse().unwrap());
    config.auth_info.token = Some("alice-token".to_owned().into());
    kube::Client::try_from(config).unwrap()
}

#[tokio::test]
async fn bytes_reach_the_pods_port_and_come_back() {
    let fake = FakeApi::start().await;
    fake.create(pod("echo"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        std::io::copy(&mut stream.try_clone().unwrap(), &mut stream).unwrap();
    });

    let pods: Api<Pod> = Api::namespaced(operator(&fake), "weft-system");
    let mut forwarder = pods.portforward("echo", &[port]).await.unwrap();
    let mut stream = forwarder.take_stream(port).unwrap();
    stream.write_all(b"ping over the API server").await.unwrap();
    let mut echoed = [0; 24];
    tokio::time::timeout(DEADLINE, stream.read_exact(&mut echoed))
        .await
        .expect("the echo within the deadline")
        .unwrap();
    assert_eq!(&echoed, b"ping over the API server");
    drop(stream);
    tokio::time::timeout(DEADLINE, forwarder.join())
        .await
        .expect("the port-forward ends once the stream is dropped")
        .unwrap();
    server.join().unwrap();
    let path = "/api/v1/namespaces/weft-system/pods/echo/portforward";
    assert_eq!(fake.requests("create", path), 1);
}

#[tokio::test]
async fn an_unreachable_port_is_reported_on_its_error_channel() {
    let fake = FakeApi::start().await;
    fake.create(pod("echo"));
    // A port nobody listens on: bound, then closed.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pods: Api<Pod> = Api::namespaced(operator(&fake), "weft-system");
    let mut forwarder = pods.portforward("echo", &[port]).await.unwrap();
    let error = forwarder.take_error(port).unwrap();
    let message = tokio::time::timeout(DEADLINE, error)
        .await
        .expect("the error within the deadline")
        .expect("an error message");
    assert!(
        message.starts_with(&format!("error forwarding port {port} to pod echo: ")),
        "{message}"
    );
}

#[tokio::test]
async fn a_port_forward_needs_the_role_that_allows_it() {
    let fake = FakeApi::start().await;
    fake.create(pod("echo"));
    fake.add_token("bob-token", &[], json!({ "username": "bob" }));
    let mut config = kube::Config::new(fake.url().parse().unwrap());
    config.auth_info.token = Some("bob-token".to_owned().into());
    let pods: Api<Pod> = Api::namespaced(kube::Client::try_from(config).unwrap(), "weft-system");
    let refused = pods.portforward("echo", &[80]).await.err().unwrap();
    assert!(refused.to_string().contains("403"), "{refused}");
    assert_eq!(
        fake.take_forbidden(),
        [
            "pods \"echo\" is forbidden: User \"bob\" cannot create resource \
             \"pods/portforward\" in API group \"\" in the namespace \"weft-system\""
        ]
    );

    let mut config = kube::Config::new(fake.url().parse().unwrap());
    config.auth_info.token = Some("nobody-issued-this".to_owned().into());
    let pods: Api<Pod> = Api::namespaced(kube::Client::try_from(config).unwrap(), "weft-system");
    let refused = pods.list(&Default::default()).await.err().unwrap();
    assert!(
        matches!(&refused, kube::Error::Api(status) if status.code == 401),
        "{refused}"
    );
}
