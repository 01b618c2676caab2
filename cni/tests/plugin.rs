//! The `weft-cni` binary run the way a container runtime runs it, against a fake agent
//! listening on a Unix socket in a temporary directory.

use std::{
    collections::BTreeMap,
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tempfile::TempDir;
use weft_api::enroll::{Pod, Reply, Request};

/// A temporary directory holding the agent's socket path and a stand-in netns file.
struct Node {
    dir: TempDir,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The plugin only checks that CNI_NETNS exists; a file stands in for the netns.
        std::fs::write(dir.path().join("netns"), b"").unwrap();
        Self { dir }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("cni.sock")
    }

    fn netns(&self) -> PathBuf {
        self.dir.path().join("netns")
    }

    /// An agent that records each request and answers `reply`.
    fn agent(&self, reply: Reply) -> Agent {
        let listener = UnixListener::bind(self.socket()).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&requests);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let stream = stream.unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let request: Request = serde_json::from_str(&line).unwrap();
                // Recorded before replying: once the plugin has exited, it is here.
                recorded.lock().unwrap().push(request);
                let mut answer = serde_json::to_vec(&reply).unwrap();
                answer.push(b'\n');
                (&stream).write_all(&answer).unwrap();
            }
        });
        Agent { requests }
    }

    /// An agent that accepts connections and never answers.
    fn silent_agent(&self) {
        let listener = UnixListener::bind(self.socket()).unwrap();
        thread::spawn(move || {
            let mut held: Vec<UnixStream> = Vec::new();
            for stream in listener.incoming() {
                held.push(stream.unwrap());
            }
        });
    }

    /// The environment of a well-formed `command` invocation.
    fn env(&self, command: &str) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("CNI_COMMAND", command.to_owned()),
            ("CNI_CONTAINERID", "f00d1234".to_owned()),
            ("CNI_NETNS", self.netns().display().to_string()),
            ("CNI_IFNAME", "eth0".to_owned()),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9f;K8S_POD_INFRA_CONTAINER_ID=f00d1234"
                    .to_owned(),
            ),
            ("CNI_PATH", "/opt/cni/bin".to_owned()),
        ])
    }

    /// A network configuration pointing at this node's agent.
    fn conf(&self, cni_version: &str, prev_result: Option<Value>) -> String {
        let mut conf = json!({
            "cniVersion": cni_version,
            "name": "kindnet",
            "type": "weft-cni",
            "agentSocket": self.socket(),
            "timeoutMs": 2000,
        });
        if let Some(prev) = prev_result {
            conf["prevResult"] = prev;
        }
        conf.to_string()
    }
}

struct Agent {
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Agent {
    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn ok() -> Reply {
    Reply::Ok { meshed: true }
}

/// What the bridge plugin reports: the bridge, the pod's host veth, the pod's interface.
fn bridge_result() -> Value {
    json!({
        "cniVersion": "0.4.0",
        "interfaces": [
            {"name": "cni0", "mac": "9a:3c:1e:00:00:01"},
            {"name": "veth5a2b9c1d", "mac": "9a:3c:1e:00:00:02"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/cni-1234"}
        ],
        "ips": [
            {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 2},
            {"address": "fd00:10:244:1::5/64", "gateway": "fd00:10:244:1::1", "interface": 2}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.96.0.10"]}
    })
}

fn cni(env: &BTreeMap<&str, String>, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-cni"))
        .env_clear()
        .envs(env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // VERSION and early errors exit without reading stdin, as a runtime's exec tolerates.
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => panic!("writing stdin: {e}"),
        _ => {}
    }
    child.wait_with_output().unwrap()
}

/// Checks `output` is a CNI error with `code`: non-zero exit, and exactly one JSON object
/// on stdout with `cniVersion`, `code`, `msg` and maybe `details`. Returns the object.
fn cni_error(output: &Output, code: u64) -> Value {
    assert_eq!(
        output.status.code(),
        Some(1),
        "stdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let error: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not one JSON value ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    let fields = error.as_object().expect("the error is an object");
    for key in fields.keys() {
        assert!(
            ["cniVersion", "code", "msg", "details"].contains(&key.as_str()),
            "unexpected field {key} in {error}"
        );
    }
    assert!(error["cniVersion"].is_string(), "{error}");
    assert_eq!(error["code"], code, "{error}");
    assert!(!error["msg"].as_str().expect("msg").is_empty(), "{error}");
    if let Some(details) = fields.get("details") {
        assert!(details.is_string(), "{error}");
    }
    error
}

fn msg(error: &Value) -> &str {
    error["msg"].as_str().unwrap()
}

fn assert_ok_and_silent(output: &Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(output.stdout.is_empty(), "{output:?}");
}

#[test]
fn version_lists_the_supported_versions() {
    let env = BTreeMap::from([("CNI_COMMAND", "VERSION".to_owned())]);
    for stdin in [r#"{"cniVersion": "1.0.0"}"#, ""] {
        let output = cni(&env, stdin);
        assert!(output.status.success(), "{output:?}");
        let info: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            info,
            json!({"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]})
        );
    }
}

#[test]
fn add_enrolls_the_pod_and_passes_the_previous_result_through() {
    let node = Node::new();
    let agent = node.agent(ok());
    let output = cni(&node.env("ADD"), &node.conf("1.0.0", Some(bridge_result())));

    assert!(output.status.success(), "{output:?}");
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut expected = bridge_result();
    expected["cniVersion"] = json!("1.0.0");
    assert_eq!(result, expected);

    assert_eq!(
        agent.requests(),
        [Request::Add(Pod {
            container_id: "f00d1234".into(),
            netns: node.netns(),
            ifname: "eth0".into(),
            host_interface: "veth5a2b9c1d".into(),
            ips: vec![
                "10.244.1.5".parse().unwrap(),
                "fd00:10:244:1::5".parse().unwrap()
            ],
            gateways: vec![
                "10.244.1.1".parse().unwrap(),
                "fd00:10:244:1::1".parse().unwrap()
            ],
            name: "cart-7d9f".into(),
            namespace: "shop".into(),
        })]
    );
}

#[test]
fn add_with_bad_json_is_a_decode_failure() {
    let node = Node::new();
    let agent = node.agent(ok());
    let output = cni(
        &node.env("ADD"),
        "{\"cniVersion\": \"1.0.0\",\n  \"name\": }",
    );
    let error = cni_error(&output, 6);
    assert_eq!(error["cniVersion"], "1.0.0");
    let details = error["details"]
        .as_str()
        .expect("the serde error in details");
    assert!(details.contains("line 2 column"), "{details}");
    assert!(agent.requests().is_empty());
}

#[test]
fn missing_environment_variables_are_named() {
    let node = Node::new();
    let agent = node.agent(ok());
    let prev = Some(bridge_result());
    for (command, name) in [
        ("ADD", "CNI_CONTAINERID"),
        ("ADD", "CNI_NETNS"),
        ("ADD", "CNI_IFNAME"),
        ("DEL", "CNI_CONTAINERID"),
        ("CHECK", "CNI_CONTAINERID"),
        ("CHECK", "CNI_NETNS"),
        ("CHECK", "CNI_IFNAME"),
    ] {
        for value in [None, Some("")] {
            let mut env = node.env(command);
            match value {
                None => env.remove(name),
                Some(empty) => env.insert(name, empty.to_owned()),
            };
            let error = cni_error(&cni(&env, &node.conf("1.0.0", prev.clone())), 4);
            assert!(msg(&error).contains(name), "{command} {name}: {error}");
            assert!(msg(&error).contains(command), "{command} {name}: {error}");
        }
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn missing_pod_name_or_namespace_is_named() {
    let node = Node::new();
    let agent = node.agent(ok());
    for (args, key) in [
        ("K8S_POD_NAMESPACE=shop", "K8S_POD_NAME"),
        (
            "K8S_POD_NAME=cart-7d9f;K8S_POD_NAMESPACE=",
            "K8S_POD_NAMESPACE",
        ),
    ] {
        let mut env = node.env("ADD");
        env.insert("CNI_ARGS", args.to_owned());
        let error = cni_error(&cni(&env, &node.conf("1.0.0", Some(bridge_result()))), 4);
        assert!(msg(&error).contains(key), "{args}: {error}");
    }
    let mut env = node.env("ADD");
    env.remove("CNI_ARGS");
    let error = cni_error(&cni(&env, &node.conf("1.0.0", Some(bridge_result()))), 4);
    assert!(msg(&error).contains("K8S_POD_NAME"), "{error}");
    assert!(agent.requests().is_empty());
}

#[test]
fn an_unknown_netns_is_rejected_before_the_agent_is_asked() {
    let node = Node::new();
    let agent = node.agent(ok());
    let gone = node.dir.path().join("no-such-netns");
    for command in ["ADD", "CHECK"] {
        let mut env = node.env(command);
        env.insert("CNI_NETNS", gone.display().to_string());
        let error = cni_error(&cni(&env, &node.conf("1.0.0", Some(bridge_result()))), 4);
        assert!(msg(&error).contains(&gone.display().to_string()), "{error}");
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn without_prev_result_weft_cni_asks_to_be_chained() {
    let node = Node::new();
    let agent = node.agent(ok());
    for command in ["ADD", "CHECK"] {
        let error = cni_error(&cni(&node.env(command), &node.conf("1.0.0", None)), 7);
        assert!(msg(&error).contains("chained plugin"), "{error}");
        assert!(msg(&error).contains("prevResult"), "{error}");
    }
    assert!(agent.requests().is_empty());
}

#[test]
fn without_a_host_interface_weft_cni_says_what_it_needs() {
    let node = Node::new();
    let agent = node.agent(ok());
    let macvlan = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-1234"}],
        "ips": [{"address": "10.244.1.5/24", "interface": 0}]
    });
    let error = cni_error(
        &cni(&node.env("ADD"), &node.conf("1.0.0", Some(macvlan))),
        7,
    );
    assert!(msg(&error).contains("host-side interface"), "{error}");
    assert!(agent.requests().is_empty());
}

#[test]
fn an_unsupported_cni_version_is_incompatible() {
    let node = Node::new();
    let agent = node.agent(ok());
    for command in ["ADD", "DEL", "CHECK"] {
        let error = cni_error(
            &cni(
                &node.env(command),
                &node.conf("0.2.0", Some(bridge_result())),
            ),
            1,
        );
        assert_eq!(error["cniVersion"], "1.0.0");
        assert!(msg(&error).contains("0.2.0"), "{error}");
    }
    // CHECK only exists from 0.4.0 on.
    let error = cni_error(
        &cni(
            &node.env("CHECK"),
            &node.conf("0.3.1", Some(bridge_result())),
        ),
        1,
    );
    assert_eq!(error["cniVersion"], "0.3.1");
    assert!(agent.requests().is_empty());
}

#[test]
fn unknown_or_missing_commands_are_invalid_environment() {
    let node = Node::new();
    let mut env = node.env("GC");
    let error = cni_error(&cni(&env, &node.conf("1.0.0", None)), 4);
    assert!(msg(&error).contains("\"GC\""), "{error}");
    env.remove("CNI_COMMAND");
    let error = cni_error(&cni(&env, &node.conf("1.0.0", None)), 4);
    assert!(msg(&error).contains("CNI_COMMAND"), "{error}");
}

#[test]
fn with_the_agent_down_add_and_check_fail_and_del_warns() {
    let node = Node::new();
    let socket = node.socket().display().to_string();
    let prev = Some(bridge_result());

    let error = cni_error(
        &cni(&node.env("ADD"), &node.conf("1.0.0", prev.clone())),
        11,
    );
    assert!(msg(&error).contains(&socket), "{error}");
    assert!(msg(&error).contains("not running"), "{error}");
    assert!(
        error["details"]
            .as_str()
            .unwrap()
            .contains("cannot connect")
    );

    let error = cni_error(
        &cni(&node.env("CHECK"), &node.conf("1.0.0", prev.clone())),
        11,
    );
    assert!(msg(&error).contains(&socket), "{error}");

    let output = cni(&node.env("DEL"), &node.conf("1.0.0", prev));
    assert_ok_and_silent(&output);
    let warning = String::from_utf8(output.stderr).unwrap();
    assert!(warning.contains("f00d1234"), "{warning}");
    assert!(warning.contains(&socket), "{warning}");
}

#[test]
fn a_silent_agent_times_out_as_try_again_later() {
    let node = Node::new();
    node.silent_agent();
    let conf = json!({
        "cniVersion": "1.0.0",
        "agentSocket": node.socket(),
        "timeoutMs": 300,
        "prevResult": bridge_result(),
    });
    let started = Instant::now();
    let error = cni_error(&cni(&node.env("ADD"), &conf.to_string()), 11);
    assert!(started.elapsed() < Duration::from_secs(4), "{error}");
    assert!(
        error["details"].as_str().unwrap().contains("300 ms"),
        "{error}"
    );
}

#[test]
fn agent_errors_map_to_refused_or_try_again() {
    for (retry, code) in [(false, 100), (true, 11)] {
        let node = Node::new();
        let agent = node.agent(Reply::Error {
            message: "namespace shop is being migrated".into(),
            retry,
        });
        for command in ["ADD", "DEL", "CHECK"] {
            let error = cni_error(
                &cni(
                    &node.env(command),
                    &node.conf("1.0.0", Some(bridge_result())),
                ),
                code,
            );
            assert!(
                msg(&error).contains("namespace shop is being migrated"),
                "{error}"
            );
            if !retry {
                assert!(msg(&error).contains("the weft agent refused the pod"));
            }
        }
        assert_eq!(agent.requests().len(), 3);
    }
}

#[test]
fn del_tells_the_agent_without_needing_the_netns() {
    let node = Node::new();
    let agent = node.agent(Reply::Ok { meshed: false });
    let mut env = node.env("DEL");
    env.remove("CNI_NETNS");
    let output = cni(&env, &node.conf("1.0.0", None));
    assert_ok_and_silent(&output);
    assert!(output.stderr.is_empty(), "{output:?}");
    assert_eq!(
        agent.requests(),
        [Request::Del {
            container_id: "f00d1234".into()
        }]
    );
}

#[test]
fn check_asks_the_agent() {
    let node = Node::new();
    let agent = node.agent(ok());
    let output = cni(
        &node.env("CHECK"),
        &node.conf("0.4.0", Some(bridge_result())),
    );
    assert_ok_and_silent(&output);
    assert_eq!(
        agent.requests(),
        [Request::Check {
            container_id: "f00d1234".into()
        }]
    );
}

#[test]
fn add_answers_in_older_versions_too() {
    let node = Node::new();
    let agent = node.agent(ok());
    let output = cni(&node.env("ADD"), &node.conf("0.3.1", Some(bridge_result())));
    assert!(output.status.success(), "{output:?}");
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["cniVersion"], "0.3.1");
    assert_eq!(agent.requests().len(), 1);
}
