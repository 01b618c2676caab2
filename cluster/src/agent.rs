//! The command line of the agents the cluster runs: the agent DaemonSet's container
//! from `deploy/install.yaml` (its capabilities, arguments and environment, moved to
//! the node), the flags that wire an agent into its node where the manifest leaves
//! them to defaults, and the extra arguments a user adds ([`Topology::agent_args`]).

use std::{path::Path, time::Duration};

use crate::{
    ClusterError, NodeInfo, Topology,
    cluster::{CONTROL_PLANE_NAMESPACE, CONTROLLER_GRPC_PORT},
    manifest::{self, Local, Volume},
    objects,
};

/// The flag extra arguments may shorten a drain with, which the cluster then waits for.
const DRAIN_TIMEOUT: &str = "drain-timeout";
/// The flag of the cluster's log filter, which extra arguments may replace.
const LOG: &str = "log";

/// `weft-agent run` for `node`, as the agent DaemonSet runs it: under `setpriv` and
/// `env -i` with the container's capabilities and environment, then the wiring flags
/// whose variables the manifest does not set, `--log` (`log_filter`) unless the extra
/// arguments set it, then the extra arguments.
pub(crate) fn command_line(
    agent_bin: &Path,
    topology: &Topology,
    node: &NodeInfo,
    log_filter: &str,
) -> Result<Vec<String>, ClusterError> {
    let container = manifest::agent()?;
    let env = container.environment(&local_node(topology, node))?;
    let mut argv = container.confinement(&env);
    argv.push(agent_bin.display().to_string());
    argv.extend(container.args.iter().cloned());
    for (flag, value) in wiring(topology, node) {
        if !container.sets(&variable(flag)) {
            argv.push(format!("--{flag}"));
            argv.push(value);
        }
    }
    let extra = &topology.agent_args;
    if !flags(extra).any(|(flag, _)| flag == LOG) {
        argv.push(format!("--{LOG}"));
        argv.push(log_filter.to_owned());
    }
    argv.extend(extra.iter().cloned());
    Ok(argv)
}

/// `weft-agent hold` for `node`, as the agent DaemonSet's `sockets` container runs it,
/// with the node's agent state directory (where the holder's socket is).
pub(crate) fn holder_command_line(
    agent_bin: &Path,
    topology: &Topology,
    node: &NodeInfo,
) -> Result<Vec<String>, ClusterError> {
    let container = manifest::holder()?;
    let env = container.environment(&local_node(topology, node))?;
    let mut argv = container.confinement(&env);
    argv.push(agent_bin.display().to_string());
    argv.extend(container.args.iter().cloned());
    if !container.sets(&variable("state-dir")) {
        argv.push("--state-dir".to_owned());
        argv.push(node.agent_state_dir.display().to_string());
    }
    Ok(argv)
}

/// The environment variable of flag `flag` (`cni-conf-dir`: `WEFT_CNI_CONF_DIR`).
fn variable(flag: &str) -> String {
    format!("WEFT_{}", flag.to_uppercase().replace('-', "_"))
}

/// What the agent's pod sees, on local node `node`: its pod fields, the host
/// directories and projected files the environment refers to, and the controller's
/// Service name.
fn local_node(topology: &Topology, node: &NodeInfo) -> Local {
    let token = topology.node_tokens.join(format!("{}.token", node.name));
    Local {
        fields: vec![
            ("spec.nodeName", node.name.clone()),
            ("status.hostIP", node.ip.to_string()),
        ],
        volumes: vec![
            ("cgroup", Volume::Directory(node.cgroup.clone())),
            ("run", Volume::Directory(node.run_dir.clone())),
            ("cni-conf", Volume::Directory(node.cni_conf_dir.clone())),
            ("cni-bin", Volume::Directory(node.cni_plugin_dir.clone())),
            (
                "controller-ca",
                Volume::Files(vec![("ca.crt", topology.ca_dir.join("ca.crt"))]),
            ),
            ("token", Volume::Files(vec![("token", token)])),
        ],
        hosts: vec![(
            format!("weft-controller.{CONTROL_PLANE_NAMESPACE}.svc"),
            topology.controller_address.to_string(),
        )],
    }
}

/// The flags of [`wiring`], which extra arguments may not set.
const WIRED: [&str; 14] = [
    "node",
    "bpffs",
    "pod-cgroup",
    "capture-address",
    "cni-socket",
    "state-dir",
    "controller",
    "controller-ca",
    "controller-identity",
    "controller-token-file",
    "flow-log",
    "cni-conf-dir",
    "cni-bin-dir",
    "cni-binary",
];

/// The flags that tie an agent to its node (namespace, cgroup, pins, socket, state,
/// CNI directories), to the cluster's controller and to its flow log.
fn wiring(topology: &Topology, node: &NodeInfo) -> Vec<(&'static str, String)> {
    let path = |path: &Path| path.display().to_string();
    let mut wiring = vec![
        ("node", node.name.clone()),
        ("bpffs", path(&node.bpffs)),
        ("pod-cgroup", path(&node.pods_cgroup)),
        // What the DaemonSet gives it: the node's own address (`status.hostIP`).
        ("capture-address", node.ip.to_string()),
        ("cni-socket", path(&node.agent_socket)),
        ("state-dir", path(&node.agent_state_dir)),
        (
            "controller",
            format!(
                "https://{}:{CONTROLLER_GRPC_PORT}",
                topology.controller_address
            ),
        ),
        ("controller-ca", path(&topology.ca_dir.join("ca.crt"))),
        (
            "controller-identity",
            format!(
                "spiffe://{}/ns/{CONTROL_PLANE_NAMESPACE}/sa/weft-controller",
                objects::TRUST_DOMAIN
            ),
        ),
        (
            "controller-token-file",
            path(&topology.node_tokens.join(format!("{}.token", node.name))),
        ),
        ("flow-log", path(&node.flow_log)),
    ];
    // With CNI on, the agent installs weft-cni on its node, as on a real one.
    if let Some(bin_dir) = &topology.cni_bin_dir {
        wiring.extend([
            ("cni-conf-dir", path(&node.cni_conf_dir)),
            ("cni-bin-dir", path(&node.cni_plugin_dir)),
            ("cni-binary", path(&bin_dir.join(crate::cni::PLUGIN))),
        ]);
    }
    wiring
}

/// Checks extra arguments of `weft-agent run`: none may set a flag of the wiring, and
/// a `--drain-timeout` must be seconds the cluster can wait for. Returns that drain
/// timeout in milliseconds, if they set one.
pub fn check_agent_args(args: &[String]) -> Result<Option<u64>, ClusterError> {
    let mut drain_timeout = None;
    for (flag, value) in flags(args) {
        let arg = match value {
            Some(value) => format!("--{flag}={value}"),
            None => format!("--{flag}"),
        };
        if WIRED.contains(&flag) {
            return Err(ClusterError::AgentArg {
                arg,
                problem: format!(
                    "the cluster sets --{flag} itself, to wire each agent into its node"
                ),
            });
        }
        if flag == DRAIN_TIMEOUT {
            let ms = value
                .and_then(milliseconds)
                .ok_or_else(|| ClusterError::AgentArg {
                    arg,
                    problem: format!(
                        "--{DRAIN_TIMEOUT} takes a number of seconds, such as 5 or 0.5"
                    ),
                })?;
            drain_timeout = Some(ms);
        }
    }
    Ok(drain_timeout)
}

/// The long flags in `args` with their values: `--name=value`, or `--name value` when
/// the next argument is not a flag itself.
fn flags(args: &[String]) -> impl Iterator<Item = (&str, Option<&str>)> {
    let mut args = args.iter().map(String::as_str).peekable();
    std::iter::from_fn(move || {
        loop {
            let Some(flag) = args
                .next()?
                .strip_prefix("--")
                .filter(|flag| !flag.is_empty())
            else {
                continue;
            };
            return Some(match flag.split_once('=') {
                Some((flag, value)) => (flag, Some(value)),
                None => (flag, args.next_if(|next| !next.starts_with('-'))),
            });
        }
    })
}

/// `text` seconds in whole milliseconds, if it is a number of seconds a deadline can
/// be set to.
fn milliseconds(text: &str) -> Option<u64> {
    let seconds: f64 = text.parse().ok()?;
    let duration = Duration::try_from_secs_f64(seconds).ok()?;
    u64::try_from(duration.as_millis()).ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{net::Ipv4Addr, path::PathBuf};

    use super::*;
    use crate::topology::DEFAULT_AGENT_DRAIN_TIMEOUT_MS;

    /// A topology of one node, `node0`, whose agents get `agent_args`.
    pub(crate) fn topology(agent_args: &[&str]) -> Topology {
        let node = NodeInfo {
            name: "node0".into(),
            netns: "weft-a-node0".into(),
            ip: Ipv4Addr::new(10, 99, 0, 1),
            zone: None,
            annotations: Default::default(),
            pod_cidr: "10.244.0.0/24".into(),
            pod_gateway: Ipv4Addr::new(10, 244, 0, 1),
            cgroup: "/cg/weft-a/node0".into(),
            pods_cgroup: "/cg/weft-a/node0/kubepods.slice".into(),
            system_cgroup: "/cg/weft-a/node0/system".into(),
            bpffs: "/sys/fs/bpf/weft-a/node0".into(),
            run_dir: "/run/weft/a/node0".into(),
            agent_socket: "/run/weft/a/node0/cni.sock".into(),
            cni_conf_dir: "/run/weft/a/node0/cni/net.d".into(),
            cni_plugin_dir: "/run/weft/a/node0/cni/bin".into(),
            agent_state_dir: "/run/weft/a/node0/agent".into(),
            flow_log: "/run/weft/a/node0/flows.jsonl".into(),
            agent: None,
        };
        Topology {
            name: "a".into(),
            fabric_netns: "weft-a-fabric".into(),
            node_cidr: "10.99.0.0/24".into(),
            cgroup: "/cg/weft-a".into(),
            bpffs: "/sys/fs/bpf/weft-a".into(),
            state_dir: "/run/weft/a".into(),
            cni_bin_dir: None,
            manifests: Some(Vec::new()),
            exclude_ports: Vec::new(),
            controller_args: Vec::new(),
            agent_args: agent_args.iter().map(|arg| (*arg).to_owned()).collect(),
            agent_drain_timeout_ms: DEFAULT_AGENT_DRAIN_TIMEOUT_MS,
            objects: "/run/weft/a/objects.json".into(),
            controller_address: Ipv4Addr::new(10, 99, 0, 254),
            controller: None,
            node_tokens: "/run/weft/a/control-plane/tokens".into(),
            ca_dir: "/run/weft/a/ca".into(),
            nodes: vec![node],
            pods: Vec::new(),
        }
    }

    fn args(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| (*arg).to_owned()).collect()
    }

    fn argv(topology: &Topology) -> Vec<String> {
        command_line(
            &PathBuf::from("/bin/weft-agent"),
            topology,
            &topology.nodes[0],
            "info",
        )
        .unwrap()
    }

    /// The values `argv` gives `flag`, in either spelling.
    fn values(argv: &[String], flag: &str) -> Vec<String> {
        flags(argv)
            .filter(|(name, _)| *name == flag)
            .map(|(_, value)| value.unwrap_or_default().to_owned())
            .collect()
    }

    /// The environment of `argv`: the `NAME=value` words after `env -i`.
    fn environment(argv: &[String]) -> Vec<(&str, &str)> {
        argv.iter()
            .skip_while(|word| *word != "-i")
            .skip(1)
            .map_while(|word| word.split_once('='))
            .collect()
    }

    #[test]
    fn the_socket_holder_runs_as_the_sockets_container_with_no_capability() {
        let topology = topology(&["--workers", "1"]);
        let argv = holder_command_line(
            &PathBuf::from("/bin/weft-agent"),
            &topology,
            &topology.nodes[0],
        )
        .unwrap();
        assert_eq!(argv[..2], ["setpriv", "--bounding-set=-all"]);
        let program = argv
            .iter()
            .position(|word| word == "/bin/weft-agent")
            .unwrap();
        assert_eq!(
            argv[program + 1..],
            ["hold", "--state-dir", "/run/weft/a/node0/agent"],
            "the agent's state directory, and none of the agent's extra arguments"
        );
    }

    #[test]
    fn agents_run_as_the_daemonset_runs_them_with_the_wiring_and_the_extra_arguments() {
        let argv = argv(&topology(&["--workers", "1"]));
        assert_eq!(
            argv[..5],
            [
                "setpriv",
                "--bounding-set=-all,+bpf,+net_admin,+sys_admin",
                "--",
                "env",
                "-i"
            ]
        );
        let env = environment(&argv);
        for expected in [
            ("WEFT_NODE", "node0"),
            ("WEFT_CAPTURE_ADDRESS", "10.99.0.1"),
            ("WEFT_POD_CGROUP", "/cg/weft-a/node0/kubepods.slice"),
            ("WEFT_CONTROLLER", "https://10.99.0.254:15010"),
            ("WEFT_CONTROLLER_CA", "/run/weft/a/ca/ca.crt"),
            (
                "WEFT_CONTROLLER_TOKEN_FILE",
                "/run/weft/a/control-plane/tokens/node0.token",
            ),
            ("WEFT_DRAIN_TIMEOUT", "30s"),
        ] {
            assert!(env.contains(&expected), "{expected:?} not in {env:?}");
        }
        let program = argv
            .iter()
            .position(|word| word == "/bin/weft-agent")
            .unwrap();
        assert_eq!(argv[program + 1], "run");
        // Flags only where the manifest leaves a setting to the agent's default.
        assert_eq!(values(&argv, "node"), Vec::<String>::new());
        assert_eq!(values(&argv, "bpffs"), ["/sys/fs/bpf/weft-a/node0"]);
        assert_eq!(values(&argv, "state-dir"), ["/run/weft/a/node0/agent"]);
        assert_eq!(values(&argv, "drain-timeout"), Vec::<String>::new());
        assert_eq!(values(&argv, "log"), ["info"]);
        assert_eq!(argv[argv.len() - 2..], ["--workers", "1"]);
    }

    #[test]
    fn the_manifest_and_the_node_agree_on_every_setting_both_give() {
        let topology = topology(&[]);
        let node = &topology.nodes[0];
        let container = manifest::agent().unwrap();
        let env = container.environment(&local_node(&topology, node)).unwrap();
        for (flag, value) in wiring(&topology, node) {
            if let Some((_, given)) = env.iter().find(|(name, _)| *name == variable(flag)) {
                assert_eq!(*given, value, "--{flag}");
            }
        }
        let drain = env
            .iter()
            .find(|(name, _)| name == "WEFT_DRAIN_TIMEOUT")
            .map(|(_, value)| value.trim_end_matches('s'))
            .and_then(milliseconds);
        assert_eq!(drain, Some(DEFAULT_AGENT_DRAIN_TIMEOUT_MS));
    }

    #[test]
    fn the_wiring_sets_the_flags_extra_arguments_may_not() {
        let mut topology = topology(&[]);
        topology.cni_bin_dir = Some("/build/bin".into());
        let flags: Vec<&str> = wiring(&topology, &topology.nodes[0])
            .into_iter()
            .map(|(flag, _)| flag)
            .collect();
        assert_eq!(flags, WIRED);
        assert_eq!(
            values(&argv(&topology), "cni-binary"),
            ["/build/bin/weft-cni"]
        );
    }

    #[test]
    fn extra_arguments_replace_the_drain_timeout_and_the_log_default() {
        let argv = argv(&topology(&["--drain-timeout=2.5", "--log", "debug"]));
        assert_eq!(values(&argv, "drain-timeout"), ["2.5"]);
        assert_eq!(values(&argv, "log"), ["debug"]);
    }

    #[test]
    fn extra_arguments_are_checked() {
        let check = |list: &[&str]| check_agent_args(&args(list));
        assert_eq!(check(&["--workers=1"]).unwrap(), None);
        assert_eq!(check(&["--drain-timeout", "0.5"]).unwrap(), Some(500));
        assert_eq!(check(&["--drain-timeout=45"]).unwrap(), Some(45_000));
        for wired in [&["--node=node7"][..], &["--bpffs", "/tmp"], &["--flow-log"]] {
            let err = check(wired).unwrap_err().to_string();
            assert!(err.contains("the cluster sets"), "{err}");
        }
        for bad in [
            &["--drain-timeout"][..],
            &["--drain-timeout", "-1"],
            &["--drain-timeout=soon"],
        ] {
            let err = check(bad).unwrap_err().to_string();
            assert!(err.contains("number of seconds"), "{bad:?}: {err}");
        }
        assert!(
            check(&["--drain-timeout=1e30"]).is_err(),
            "an endless drain"
        );
    }
}
