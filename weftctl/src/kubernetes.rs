//! A Kubernetes cluster as a [`Mesh`], reached through its API server only, with the
//! kubeconfig's credentials and no port opened to users: the nodes from the Node
//! list, each node's agent from the weft-agent DaemonSet's pods, the controller
//! replica to ask from the Lease its replicas elect a leader with, and every endpoint
//! — an agent's readiness, metrics and admin port, the controller's admin port —
//! through a pod port-forward, as `kubectl port-forward` reaches them.
//!
//! What the operator needs is the `weft-operator` ClusterRole and Role of the install
//! manifest (deploy/README.md says how to bind them); a refusal says so.

use std::{
    collections::BTreeMap,
    future::Future,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Node, Pod},
};
use kube::{
    Api, Client, Config,
    api::{DynamicObject, ListParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use weft_cluster::AgentPort;
use weft_controller::{objects::Kind, source::kubernetes::api_resource};

use crate::{
    check::NodeInfo,
    mesh::{Connection, Endpoint, Leadership, Mesh},
};

/// Where the install manifest puts weft.
const NAMESPACE: &str = "weft-system";
const AGENT_PODS: &str = "app.kubernetes.io/name=weft-agent";
const CONTROLLER_PODS: &str = "app.kubernetes.io/name=weft-controller";
/// The Lease the controller's replicas elect a leader with (its `--lease`).
const LEASE: &str = "weft-controller";
/// How long an endpoint may take to answer through the port-forward.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// What an operator without the roles is told.
const BIND_HINT: &str = "bind the weft-operator ClusterRole and the weft-operator Role of \
                         weft-system to yourself (deploy/README.md, \"Operating weft\")";

/// A cluster weft is installed in.
pub struct Kubernetes {
    /// Runs the API calls and the port-forwards' relays, whatever runtime the command
    /// itself runs.
    runtime: tokio::runtime::Runtime,
    client: Client,
    nodes: Vec<NodeInfo>,
    /// The agent pod of each node that has one.
    agents: BTreeMap<String, String>,
    /// The controller pod to ask: the leader when one leads, else a ready replica.
    controller: Option<String>,
    leadership: Result<Leadership, String>,
}

impl Kubernetes {
    /// Reads the cluster's nodes, weft's pods and the Lease, with the credentials of
    /// `kubeconfig` (else `$KUBECONFIG`, `~/.kube/config`, or the pod's service
    /// account) for `context` (else the current one).
    pub fn connect(kubeconfig: Option<&Path>, context: Option<&str>) -> anyhow::Result<Self> {
        let runtime = runtime()?;
        let (client, nodes, agents, controllers, leadership) = runtime.block_on(async {
            let client = client(kubeconfig, context).await?;
            let nodes = list_nodes(&client).await?;
            let pods = Api::<Pod>::namespaced(client.clone(), NAMESPACE);
            let agents = pods
                .list(&ListParams::default().labels(AGENT_PODS))
                .await
                .map_err(|err| refused(err, "list weft's agent pods"))?;
            let controllers = pods
                .list(&ListParams::default().labels(CONTROLLER_PODS))
                .await
                .map_err(|err| refused(err, "list weft's controller pods"))?;
            let leadership = Api::<Lease>::namespaced(client.clone(), NAMESPACE)
                .get_opt(LEASE)
                .await
                .map_err(|err| format!("{:#}", refused(err, "read the controller's Lease")))
                .map(|lease| leadership(lease.as_ref()));
            anyhow::Ok((client, nodes, agents.items, controllers.items, leadership))
        })?;
        let leader = leadership
            .as_ref()
            .ok()
            .and_then(|leadership| leadership.holder.as_deref());
        Ok(Self {
            runtime,
            client,
            nodes,
            agents: agents_by_node(&agents),
            controller: controller_to_ask(&controllers, leader),
            leadership,
        })
    }

    /// What the API server of the cluster `kubeconfig` and `context` name (as for
    /// [`Kubernetes::connect`]) says of each node; nothing of weft is asked, so this
    /// works before an install.
    pub fn node_infos(
        kubeconfig: Option<&Path>,
        context: Option<&str>,
    ) -> anyhow::Result<Vec<NodeInfo>> {
        runtime()?.block_on(async { list_nodes(&client(kubeconfig, context).await?).await })
    }

    /// Runs `future` on the runtime and waits for it, also from inside another
    /// runtime (as `observe` calls [`Mesh::agent_connect`]).
    fn wait<T: Send + 'static>(&self, future: impl Future<Output = T> + Send + 'static) -> T {
        let (sender, received) = std::sync::mpsc::channel();
        self.runtime.spawn(async move {
            let _ = sender.send(future.await);
        });
        received
            .recv()
            .expect("the runtime dropped a task it was running")
    }

    fn agent_pod(&self, node: &str) -> Result<String, String> {
        self.agents.get(node).cloned().ok_or_else(|| {
            format!(
                "no weft-agent pod runs on node {node} (`kubectl -n {NAMESPACE} get pods -o wide`; \
                 the DaemonSet's events say why)"
            )
        })
    }

    fn get(&self, pod: Result<String, String>, port: u16, path: &str) -> Result<String, String> {
        let (pods, path) = (self.pods(), path.to_owned());
        let pod = pod?;
        self.wait(async move {
            let connection = forward(&pods, &pod, port).await?;
            tokio::time::timeout(ANSWER_TIMEOUT, http_get(connection, &path))
                .await
                .map_err(|_| {
                    format!("no answer from pod {pod} port {port} within {ANSWER_TIMEOUT:?}")
                })?
        })
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), NAMESPACE)
    }
}

impl Mesh for Kubernetes {
    fn nodes(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.name.clone()).collect()
    }

    fn controller_get(&self, path: &str) -> Result<String, String> {
        let pod = self.controller.clone().ok_or_else(|| {
            format!("no weft-controller pod is ready (`kubectl -n {NAMESPACE} get pods`)")
        });
        self.get(pod, weft_controller::admin::ADMIN_PORT, path)
    }

    fn agent_get(&self, node: &str, endpoint: Endpoint) -> Result<String, String> {
        let (port, path) = endpoint.port_and_path();
        self.get(self.agent_pod(node), port as u16, path)
    }

    fn agent_connect(&self, node: &str) -> Result<Box<dyn Connection>, String> {
        let (pods, pod) = (self.pods(), self.agent_pod(node)?);
        let connection =
            self.wait(async move { forward(&pods, &pod, AgentPort::Admin as u16).await })?;
        Ok(Box::new(connection))
    }

    /// One List per kind the controller reads, named `cluster/<Kind>`. A kind the API
    /// server does not serve (its CRD not installed) is left out, and said so.
    fn manifests(&self) -> anyhow::Result<Vec<(PathBuf, String)>> {
        let client = self.client.clone();
        self.wait(async move {
            let mut manifests = Vec::new();
            for kind in Kind::ALL {
                let resource = api_resource(kind);
                let listed = Api::<DynamicObject>::all_with(client.clone(), &resource)
                    .list(&ListParams::default())
                    .await;
                let objects = match listed {
                    Ok(objects) => objects.items,
                    Err(kube::Error::Api(status)) if status.code == 404 => {
                        eprintln!(
                            "weftctl: the API server does not serve {kind} ({}): none analyzed",
                            kind.api_version()
                        );
                        continue;
                    }
                    Err(err) => return Err(refused(err, &format!("list {}", resource.plural))),
                };
                let items: Vec<serde_json::Value> = objects
                    .into_iter()
                    .map(|object| {
                        let mut value = serde_json::to_value(object).unwrap_or_default();
                        value["apiVersion"] = kind.api_version().into();
                        value["kind"] = kind.name().into();
                        value
                    })
                    .collect();
                let list =
                    serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
                manifests.push((PathBuf::from(format!("cluster/{kind}")), list.to_string()));
            }
            Ok(manifests)
        })
    }

    fn leadership(&self) -> Option<Result<Leadership, String>> {
        Some(self.leadership.clone())
    }
}

/// The runtime a [`Kubernetes`] runs its calls and port-forwards on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start an async runtime")
}

/// A client with the credentials `kubeconfig` and `context` name.
async fn client(kubeconfig: Option<&Path>, context: Option<&str>) -> anyhow::Result<Client> {
    Client::try_from(config(kubeconfig, context).await?)
        .context("cannot make a client of the kubeconfig")
}

/// The cluster's nodes, by name.
async fn list_nodes(client: &Client) -> anyhow::Result<Vec<NodeInfo>> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|err| refused(err, "list the nodes"))?;
    let mut nodes: Vec<NodeInfo> = nodes.items.iter().map(node_info).collect();
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(nodes)
}

/// The client configuration `kubeconfig` and `context` name, or the environment's.
async fn config(kubeconfig: Option<&Path>, context: Option<&str>) -> anyhow::Result<Config> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..Default::default()
    };
    match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &options)
                .await
                .with_context(|| format!("the kubeconfig {}", path.display()))
        }
        None if context.is_some() => Config::from_kubeconfig(&options)
            .await
            .context("the kubeconfig ($KUBECONFIG, else ~/.kube/config)"),
        None => Config::infer().await.context(
            "no cluster to read: no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a pod; \
             give --kubeconfig, or --local NAME for a local cluster",
        ),
    }
}

/// What to tell an operator when the API server refused to let them `what`.
fn refused(err: kube::Error, what: &str) -> anyhow::Error {
    match &err {
        kube::Error::Api(status) if status.code == 403 => {
            anyhow::anyhow!(
                "the API server does not let you {what}: {}; {BIND_HINT}",
                status.message
            )
        }
        kube::Error::Api(status) if status.code == 401 => anyhow::anyhow!(
            "the API server does not know your credentials ({}): refresh them in the kubeconfig",
            status.message
        ),
        _ => anyhow::Error::new(err).context(format!("cannot {what}")),
    }
}

fn node_info(node: &Node) -> NodeInfo {
    let info = node
        .status
        .as_ref()
        .and_then(|status| status.node_info.as_ref());
    let ready = node
        .status
        .as_ref()
        .and_then(|status| status.conditions.as_ref())
        .and_then(|conditions| conditions.iter().find(|c| c.type_ == "Ready"));
    NodeInfo {
        ready: match ready {
            Some(ready) if ready.status == "True" => Ok(()),
            Some(ready) => Err(ready
                .message
                .clone()
                .unwrap_or_else(|| format!("Ready is {}", ready.status))),
            None => Err("the kubelet has not reported".to_owned()),
        },
        name: node.metadata.name.clone().unwrap_or_default(),
        kernel: info
            .map(|info| info.kernel_version.clone())
            .unwrap_or_default(),
        os: info
            .map(|info| info.operating_system.clone())
            .unwrap_or_default(),
    }
}

/// Who leads by the Lease (none when there is no Lease yet).
fn leadership(lease: Option<&Lease>) -> Leadership {
    let spec = lease.and_then(|lease| lease.spec.as_ref());
    Leadership {
        holder: spec
            .and_then(|spec| spec.holder_identity.clone())
            .filter(|holder| !holder.is_empty()),
        renewed_unix: spec
            .and_then(|spec| spec.renew_time.as_ref())
            .map(|renewed| renewed.0.as_second()),
        duration_seconds: spec
            .and_then(|spec| spec.lease_duration_seconds)
            .map(i64::from),
    }
}

/// Each node's agent pod, of the DaemonSet's `pods` (one per node; a pod not yet
/// scheduled has no node).
fn agents_by_node(pods: &[Pod]) -> BTreeMap<String, String> {
    pods.iter()
        .filter_map(|pod| {
            let node = pod.spec.as_ref()?.node_name.clone()?;
            Some((node, pod.metadata.name.clone()?))
        })
        .collect()
}

/// The controller replica to ask: `leader` when it is one of `pods`, else the first
/// ready one.
fn controller_to_ask(pods: &[Pod], leader: Option<&str>) -> Option<String> {
    let names = || pods.iter().filter_map(|pod| pod.metadata.name.as_deref());
    let ready = |pod: &&Pod| {
        pod.status
            .as_ref()
            .and_then(|status| status.conditions.as_ref())
            .is_some_and(|conditions| {
                conditions
                    .iter()
                    .any(|condition| condition.type_ == "Ready" && condition.status == "True")
            })
    };
    leader
        .filter(|leader| names().any(|name| name == *leader))
        .map(str::to_owned)
        .or_else(|| {
            pods.iter()
                .find(ready)
                .and_then(|pod| pod.metadata.name.clone())
        })
}

/// A connection to `port` of `pod`, through a port-forward.
async fn forward(pods: &Api<Pod>, pod: &str, port: u16) -> Result<impl Connection + use<>, String> {
    let mut forwarder = pods
        .portforward(pod, &[port])
        .await
        .map_err(|err| format!("{:#}", refused(err, &format!("port-forward to pod {pod}"))))?;
    let connection = forwarder
        .take_stream(port)
        .ok_or_else(|| format!("the port-forward to pod {pod} has no port {port}"))?;
    if let Some(error) = forwarder.take_error(port) {
        // The kubelet reports a port it cannot reach on the error channel; say it
        // where the operator reads.
        let pod = pod.to_owned();
        tokio::spawn(async move {
            if let Some(message) = error.await {
                eprintln!("weftctl: port-forward to pod {pod}: {message}");
            }
        });
    }
    Ok(connection)
}

/// The body of a 200 to a `GET` of `path` over `connection`, otherwise the status
/// and body (`503 not ready: …`).
async fn http_get(connection: impl Connection + 'static, path: &str) -> Result<String, String> {
    let (mut sender, driver) = hyper::client::conn::http1::handshake(TokioIo::new(connection))
        .await
        .map_err(|err| format!("no HTTP: {err}"))?;
    tokio::spawn(driver);
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .map_err(|err| err.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|err| format!("no answer: {err}"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|err| format!("the answer broke off: {err}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    if status == http::StatusCode::OK {
        Ok(body.into_owned())
    } else {
        Err(format!("{} {}", status.as_u16(), body.trim()))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            coordination::v1::LeaseSpec,
            core::v1::{PodCondition, PodSpec, PodStatus},
        },
        apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
        jiff::Timestamp,
    };

    use super::*;

    fn pod(name: &str, node: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(str::to_owned),
                ..Default::default()
            }),
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".to_owned(),
                    status: if ready { "True" } else { "False" }.to_owned(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn agents_are_found_by_the_node_they_run_on() {
        let pods = [
            pod("weft-agent-a", Some("node0"), true),
            pod("weft-agent-b", Some("node1"), false),
            pod("weft-agent-pending", None, false),
        ];
        let agents = agents_by_node(&pods);
        assert_eq!(agents.len(), 2);
        assert_eq!(agents["node0"], "weft-agent-a");
        assert_eq!(agents["node1"], "weft-agent-b");
    }

    #[test]
    fn the_leader_is_asked_else_a_ready_replica() {
        let pods = [pod("c-0", None, false), pod("c-1", None, true)];
        let cases = [
            (Some("c-0"), Some("c-0")),
            // A holder that is gone (its pod deleted) is not asked.
            (Some("c-9"), Some("c-1")),
            (None, Some("c-1")),
        ];
        for (leader, asked) in cases {
            assert_eq!(
                controller_to_ask(&pods, leader).as_deref(),
                asked,
                "{leader:?}"
            );
        }
        assert_eq!(controller_to_ask(&[pod("c-0", None, false)], None), None);
    }

    #[test]
    fn leadership_is_read_from_the_lease() {
        assert_eq!(
            leadership(None),
            Leadership {
                holder: None,
                renewed_unix: None,
                duration_seconds: None
            }
        );
        let lease = Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some("weft-controller-7d9-x".to_owned()),
                renew_time: Some(MicroTime(Timestamp::from_second(1_700_000_000).unwrap())),
                lease_duration_seconds: Some(15),
                ..Default::default()
            }),
        };
        assert_eq!(
            leadership(Some(&lease)),
            Leadership {
                holder: Some("weft-controller-7d9-x".to_owned()),
                renewed_unix: Some(1_700_000_000),
                duration_seconds: Some(15)
            }
        );
    }
}
