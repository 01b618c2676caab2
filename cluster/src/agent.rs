//! The command line of the agents the cluster runs: the flags that wire an agent into
//! its node, the cluster's defaults, and the extra arguments a user adds
//! ([`Topology::agent_args`]).

use std::{path::Path, time::Duration};

use crate::{
    ClusterError, NodeInfo, Topology,
    cluster::{CONTROL_PLANE_NAMESPACE, CONTROLLER_GRPC_PORT},
    objects,
};

/// Flags of `weft-agent run` with a cluster default that extra arguments may replace.
const DRAIN_TIMEOUT: &str = "drain-timeout";
const LOG: &str = "log";

/// `weft-agent run` for `node` (under `setpriv`, keeping only the agents'
/// capabilities, when the topology names them): the wiring, then `--drain-timeout`
/// and `--log` (`log_filter`) unless the extra arguments set them, then the extra
/// arguments.
pub(crate) fn command_line(
    agent_bin: &Path,
    topology: &Topology,
    node: &NodeInfo,
    log_filter: &str,
) -> Vec<String> {
    let mut argv = Vec::new();
    if let Some(capabilities) = &topology.agent_capabilities {
        // The bounding set of a root process is what it keeps across exec.
        let kept: Vec<String> = capabilities
            .iter()
            .map(|name| format!("+{}", name.to_lowercase()))
            .collect();
        argv.push("setpriv".to_owned());
        argv.push(format!("--bounding-set=-all,{}", kept.join(",")));
        argv.push("--".to_owned());
    }
    argv.extend([agent_bin.display().to_string(), "run".to_owned()]);
    for (flag, value) in wiring(topology, node) {
        argv.push(format!("--{flag}"));
        argv.push(value);
    }
    let extra = &topology.agent_args;
    if !flags(extra).any(|(flag, _)| flag == DRAIN_TIMEOUT) {
        argv.push(format!("--{DRAIN_TIMEOUT}"));
        argv.push(seconds(topology.agent_drain_timeout_ms));
    }
    if !flags(extra).any(|(flag, _)| flag == LOG) {
        argv.push(format!("--{LOG}"));
        argv.push(log_filter.to_owned());
    }
    argv.extend(extra.iter().cloned());
    argv
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
        ("capture-address", node.pod_gateway.to_string()),
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

/// Milliseconds as the agent's seconds argument (`30000` is `30`, `1500` is `1.5`).
fn seconds(ms: u64) -> String {
    (Duration::from_millis(ms).as_secs_f64()).to_string()
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::PathBuf};

    use super::*;
    use crate::topology::DEFAULT_AGENT_DRAIN_TIMEOUT_MS;

    fn topology(agent_args: &[&str]) -> Topology {
        let node = NodeInfo {
            name: "node0".into(),
            netns: "weft-a-node0".into(),
            ip: Ipv4Addr::new(10, 99, 0, 1),
            zone: None,
            pod_cidr: "10.244.0.0/24".into(),
            pod_gateway: Ipv4Addr::new(10, 244, 0, 1),
            cgroup: "/cg/weft-a/node0".into(),
            pods_cgroup: "/cg/weft-a/node0/pods".into(),
            system_cgroup: "/cg/weft-a/node0/system".into(),
            bpffs: "/sys/fs/bpf/weft-a/node0".into(),
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
            agent_capabilities: None,
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
    }

    /// The values `argv` gives `flag`, in either spelling.
    fn values(argv: &[String], flag: &str) -> Vec<String> {
        flags(argv)
            .filter(|(name, _)| *name == flag)
            .map(|(_, value)| value.unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn agents_get_the_wiring_the_defaults_and_the_extra_arguments() {
        let argv = argv(&topology(&["--workers", "1"]));
        assert_eq!(argv[..2], ["/bin/weft-agent", "run"]);
        assert_eq!(values(&argv, "node"), ["node0"]);
        assert_eq!(
            values(&argv, "controller-token-file"),
            ["/run/weft/a/control-plane/tokens/node0.token"]
        );
        assert_eq!(values(&argv, "controller"), ["https://10.99.0.254:15010"]);
        assert_eq!(values(&argv, "drain-timeout"), ["30"]);
        assert_eq!(values(&argv, "log"), ["info"]);
        assert_eq!(argv[argv.len() - 2..], ["--workers", "1"]);
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
    fn agents_keep_only_the_capabilities_the_topology_names() {
        let mut topology = topology(&[]);
        assert_eq!(argv(&topology)[1], "run");
        topology.agent_capabilities = Some(vec!["BPF".into(), "NET_ADMIN".into()]);
        let argv = argv(&topology);
        assert_eq!(
            argv[..4],
            [
                "setpriv",
                "--bounding-set=-all,+bpf,+net_admin",
                "--",
                "/bin/weft-agent"
            ]
        );
    }

    #[test]
    fn extra_arguments_replace_the_drain_timeout_and_log_defaults() {
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

    #[test]
    fn milliseconds_and_seconds_round_trip() {
        for ms in [0, 100, 1_500, 30_000] {
            assert_eq!(milliseconds(&seconds(ms)), Some(ms));
        }
    }
}
