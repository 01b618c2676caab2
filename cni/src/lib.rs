//! weft's chained CNI plugin (CNI spec 1.0): tells the node agent about each pod.
//!
//! The container runtime runs `weft-cni` after the cluster's primary CNI plugin, so it
//! must be listed after that plugin in the network configuration list. It changes nothing
//! in the pod's network: it reports what the runtime (environment variables) and the
//! primary plugin (`prevResult`) set up to the node agent over the enrollment socket
//! ([`weft_api::enroll`]), then passes the primary plugin's result through. The agent
//! decides whether the pod is meshed.
//!
//! Every input (environment, configuration, `prevResult`, the netns path) is checked
//! before the agent is contacted, so a rejected invocation has told the agent nothing.
//!
//! # When the agent is down
//!
//! - **ADD fails** with code 11 (try again later). A pod of a meshed namespace must not
//!   start outside the mesh, and only the agent knows which namespaces are meshed; the
//!   runtime retries the sandbox, so the pod starts once the agent answers. The price: no
//!   pod starts on a node whose agent is down.
//! - **DEL succeeds**, with a warning on stderr. Failing it would leave the pod stuck
//!   terminating for as long as the agent is away, and nothing is lost: when the agent
//!   starts it reconciles the pods that exist and drops those whose network namespace is
//!   gone.
//! - **CHECK fails** with code 11: the enrollment cannot be confirmed.
//!
//! # Error codes
//!
//! | code | when |
//! |---|---|
//! | 1 | `cniVersion` not one of [`SUPPORTED_VERSIONS`]; CHECK below 0.4.0 |
//! | 4 | `CNI_COMMAND` missing or unknown; `CNI_CONTAINERID`, `CNI_NETNS`, `CNI_IFNAME` missing or invalid; `CNI_NETNS` names nothing; `K8S_POD_NAME` / `K8S_POD_NAMESPACE` missing from `CNI_ARGS` |
//! | 5 | stdin or `CNI_NETNS` unreadable |
//! | 6 | stdin is not JSON of the configuration's shape; the agent's reply is unreadable |
//! | 7 | no `cniVersion`; no `prevResult`; `prevResult` unreadable or without a host-side interface; `timeoutMs` 0 |
//! | 11 | the agent is unreachable or times out (ADD, CHECK); the agent answers an error with `retry` |
//! | 100 | the agent answers an error without `retry` |
#![forbid(unsafe_code)]

mod agent;
mod config;
mod env;
mod error;
pub mod install;

use std::io::Read;

use serde_json::{Value, json};
use weft_api::enroll::{Pod, Reply, Request};

pub use crate::{
    agent::{AgentClient, AgentError, Endpoint, UnixAgent},
    config::{LATEST_VERSION, SUPPORTED_VERSIONS},
    env::Env,
    error::CniError,
};
use crate::{
    config::{NetConf, pod_network},
    env::{Action, Command},
};

const ADD_WITHOUT_AGENT: &str =
    "the pod is not started, so it cannot run unmeshed; the runtime retries";
const CHECK_WITHOUT_AGENT: &str = "the pod's enrollment cannot be confirmed";
const DEL_WITHOUT_AGENT: &str = "the pod is forgotten anyway: the agent drops pods whose network namespace is gone when it starts";

/// A successful invocation.
#[derive(Debug, Default)]
pub struct Success {
    /// What to print on stdout: the result of ADD, the version info of VERSION.
    pub result: Option<Value>,
    /// What to print on stderr.
    pub warning: Option<String>,
}

/// A failed invocation: print `error.to_json(&cni_version)` on stdout and exit non-zero.
#[derive(Debug)]
pub struct Failure {
    /// The version to answer in: the configuration's, or [`LATEST_VERSION`] when that is
    /// not known or not supported.
    pub cni_version: String,
    /// What went wrong.
    pub error: CniError,
}

/// Runs one CNI invocation: `env` from the runtime, the network configuration on
/// `stdin` (not read for VERSION), `agent` to reach the node agent.
pub fn run(env: &Env, stdin: &mut dyn Read, agent: &dyn AgentClient) -> Result<Success, Failure> {
    let latest = |error| Failure {
        cni_version: LATEST_VERSION.to_owned(),
        error,
    };
    let action = match env.command().map_err(latest)? {
        Command::Version => {
            return Ok(Success {
                result: Some(json!({
                    "cniVersion": LATEST_VERSION,
                    "supportedVersions": SUPPORTED_VERSIONS,
                })),
                warning: None,
            });
        }
        Command::Network(action) => action,
    };
    let mut config = Vec::new();
    stdin
        .read_to_end(&mut config)
        .map_err(|e| latest(CniError::Stdin(e)))?;
    let conf = NetConf::decode(&config).map_err(latest)?;
    match action {
        Action::Add => add(env, &conf, agent),
        Action::Del => del(env, &conf, agent),
        Action::Check => check(env, &conf, agent),
    }
    .map_err(|error| Failure {
        cni_version: conf.cni_version.clone(),
        error,
    })
}

fn add(env: &Env, conf: &NetConf, agent: &dyn AgentClient) -> Result<Success, CniError> {
    let container_id = env.container_id(Action::Add)?;
    let netns = env.netns(Action::Add)?;
    let ifname = env.ifname(Action::Add)?;
    let (name, namespace) = env.pod()?;
    let prev = conf.prev_result()?;
    let network = pod_network(prev, ifname)?;
    let endpoint = conf.endpoint()?;

    let pod = Pod {
        container_id: container_id.to_owned(),
        netns,
        ifname: ifname.to_owned(),
        host_interface: network.host_interface,
        ips: network.ips,
        gateways: network.gateways,
        name,
        namespace,
    };
    ask(agent, &endpoint, &Request::Add(pod), ADD_WITHOUT_AGENT)?;

    // A chained plugin answers with the previous result, in the configuration's version.
    let mut result = prev.clone();
    if let Value::Object(fields) = &mut result {
        fields.insert("cniVersion".to_owned(), conf.cni_version.clone().into());
    }
    Ok(Success {
        result: Some(result),
        warning: None,
    })
}

fn del(env: &Env, conf: &NetConf, agent: &dyn AgentClient) -> Result<Success, CniError> {
    let container_id = env.container_id(Action::Del)?;
    let endpoint = conf.endpoint()?;
    let request = Request::Del {
        container_id: container_id.to_owned(),
    };
    match ask(agent, &endpoint, &request, DEL_WITHOUT_AGENT) {
        Ok(()) => Ok(Success::default()),
        Err(error @ CniError::AgentUnavailable { .. }) => {
            let details = error.details().unwrap_or_default();
            Ok(Success {
                result: None,
                warning: Some(format!(
                    "weft-cni: DEL of {container_id} not delivered: {error} ({details})"
                )),
            })
        }
        Err(error) => Err(error),
    }
}

fn check(env: &Env, conf: &NetConf, agent: &dyn AgentClient) -> Result<Success, CniError> {
    conf.check_allowed()?;
    let container_id = env.container_id(Action::Check)?;
    env.netns(Action::Check)?;
    env.ifname(Action::Check)?;
    conf.prev_result()?;
    let endpoint = conf.endpoint()?;
    let request = Request::Check {
        container_id: container_id.to_owned(),
    };
    ask(agent, &endpoint, &request, CHECK_WITHOUT_AGENT)?;
    Ok(Success::default())
}

/// One round trip; `consequence` says what an unreachable agent means for this command.
fn ask(
    agent: &dyn AgentClient,
    endpoint: &Endpoint,
    request: &Request,
    consequence: &'static str,
) -> Result<(), CniError> {
    let socket = || endpoint.socket.clone();
    match agent.exchange(endpoint, request) {
        Ok(Reply::Ok { .. }) => Ok(()),
        Ok(Reply::Error {
            message,
            retry: true,
        }) => Err(CniError::AgentBusy(message)),
        Ok(Reply::Error {
            message,
            retry: false,
        }) => Err(CniError::AgentRefused(message)),
        Err(source @ AgentError::BadReply(_)) => Err(CniError::AgentGarbled {
            socket: socket(),
            source,
        }),
        Err(source) => Err(CniError::AgentUnavailable {
            socket: socket(),
            consequence,
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, io};

    use super::*;

    /// Records requests and answers each with `answer`.
    struct FakeAgent {
        requests: RefCell<Vec<Request>>,
        answer: fn() -> Result<Reply, AgentError>,
    }

    impl FakeAgent {
        fn new(answer: fn() -> Result<Reply, AgentError>) -> Self {
            Self {
                requests: RefCell::default(),
                answer,
            }
        }
    }

    impl AgentClient for FakeAgent {
        fn exchange(&self, endpoint: &Endpoint, request: &Request) -> Result<Reply, AgentError> {
            assert_eq!(endpoint.socket, std::path::Path::new("/tmp/agent.sock"));
            self.requests.borrow_mut().push(request.clone());
            (self.answer)()
        }
    }

    fn env(command: &str) -> Env {
        Env {
            command: Some(command.into()),
            container_id: Some("c1".into()),
            netns: Some("/".into()),
            ifname: Some("eth0".into()),
            args: Some("K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns".into()),
        }
    }

    const CONF: &[u8] = br#"{"cniVersion": "1.0.0", "agentSocket": "/tmp/agent.sock",
        "prevResult": {"interfaces": [{"name": "veth1"}], "ips": []}}"#;

    #[test]
    fn version_does_not_read_stdin() {
        struct Unreadable;
        impl Read for Unreadable {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                panic!("VERSION read stdin")
            }
        }
        let agent = FakeAgent::new(|| panic!("VERSION contacted the agent"));
        let success = run(&env("VERSION"), &mut Unreadable, &agent).unwrap();
        assert_eq!(
            success.result.unwrap()["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
        );
    }

    #[test]
    fn del_without_agent_succeeds_with_a_warning() {
        let agent = FakeAgent::new(|| {
            Err(AgentError::Connect(io::Error::from(
                io::ErrorKind::ConnectionRefused,
            )))
        });
        let success = run(&env("DEL"), &mut &CONF[..], &agent).unwrap();
        assert_eq!(success.result, None);
        let warning = success.warning.unwrap();
        assert!(warning.contains("/tmp/agent.sock"), "{warning}");
        assert!(warning.contains("cannot connect"), "{warning}");
        assert_eq!(agent.requests.borrow().len(), 1);
    }

    #[test]
    fn agent_refusals_keep_the_configurations_version() {
        let conf = br#"{"cniVersion": "0.4.0", "agentSocket": "/tmp/agent.sock"}"#;
        let agent = FakeAgent::new(|| {
            Ok(Reply::Error {
                message: "busy".into(),
                retry: true,
            })
        });
        let failure = run(&env("DEL"), &mut &conf[..], &agent).unwrap_err();
        assert_eq!(failure.cni_version, "0.4.0");
        assert_eq!(failure.error.code(), 11);
    }

    #[test]
    fn an_unreadable_reply_is_not_mistaken_for_an_absent_agent() {
        let agent = FakeAgent::new(|| {
            Err(AgentError::BadReply(
                serde_json::from_str::<Reply>("{}").unwrap_err(),
            ))
        });
        let failure = run(&env("DEL"), &mut &CONF[..], &agent).unwrap_err();
        assert!(matches!(failure.error, CniError::AgentGarbled { .. }));
        assert_eq!(failure.error.code(), 6);
    }

    #[test]
    fn a_zero_timeout_is_rejected_before_the_agent_is_asked() {
        let conf = br#"{"cniVersion": "1.0.0", "timeoutMs": 0,
            "prevResult": {"interfaces": [{"name": "veth1"}]}}"#;
        let agent = FakeAgent::new(|| panic!("contacted the agent"));
        for command in ["ADD", "DEL", "CHECK"] {
            let failure = run(&env(command), &mut &conf[..], &agent).unwrap_err();
            assert!(
                matches!(failure.error, CniError::ZeroTimeout),
                "{command}: {failure:?}"
            );
        }
    }
}
