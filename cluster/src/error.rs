//! Errors of the local cluster, worded for the person running it.

use std::{io, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "invalid cluster name {0:?}: use 1-12 characters, a lowercase letter then lowercase letters or digits"
    )]
    ClusterName(String),
    #[error(
        "invalid {what} {value:?}: use a DNS label (lowercase letters, digits and '-', at most {max} characters, starting and ending with a letter or digit)"
    )]
    Label {
        what: &'static str,
        value: String,
        max: usize,
    },
    #[error("a cluster needs between 1 and {max} nodes, not {asked}")]
    NodeCount { asked: usize, max: usize },
    #[error("cluster {0} already exists; run `cargo xtask cluster down --name {0}` first")]
    Exists(String),
    #[error("cluster {0} does not exist; start it with `cargo xtask cluster up --name {0}`")]
    Missing(String),
    #[error(
        "cluster {cluster} has no node {node}; `cargo xtask cluster status --name {cluster}` lists them"
    )]
    NoSuchNode { cluster: String, node: String },
    #[error("cluster {cluster} has no pod {pod}")]
    NoSuchPod { cluster: String, pod: String },
    #[error("pod {pod} already exists in cluster {cluster}")]
    PodExists { cluster: String, pod: String },
    #[error("node {node} has no free pod address left (at most 253 pods a node)")]
    NodeFull { node: String },
    #[error("this needs root (network namespaces, cgroups and bpffs); run it with sudo")]
    NotRoot,
    #[error(
        "no cgroup v2 hierarchy is mounted; mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`"
    )]
    NoCgroup2,
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}; is iproute2 installed? (`cargo xtask setup`)")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the cluster state in {path} is unreadable ({source}); `down` still removes the cluster"
    )]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{addr} did not accept connections from pod {pod} within {timeout:?}; its log is in {log}"
    )]
    NotReady {
        addr: std::net::SocketAddrV4,
        pod: String,
        timeout: std::time::Duration,
        log: PathBuf,
    },
    #[error(
        "the CNI network configuration in {dir} cannot be used: {problem} (the cluster writes it at `up`; the agent chains weft-cni into it)"
    )]
    CniConfiguration {
        dir: std::path::PathBuf,
        problem: String,
    },
    #[error("{what} failed (CNI error {code}): {message}")]
    Cni {
        what: String,
        code: u64,
        message: String,
    },
    #[error(
        "an agent already runs on {node}, pid {pid}; stop it first (`cargo xtask cluster agent stop --name {cluster} --node {node}`) or restart it (`cargo xtask cluster agent restart --name {cluster} --node {node}`)"
    )]
    AgentRunning {
        cluster: String,
        node: String,
        pid: u32,
    },
    #[error("the agent on node {node} exited during start-up; its log {log} says why")]
    AgentExited { node: String, log: PathBuf },
    #[error(
        "the socket holder (weft-agent hold) on node {node} did not listen on {socket}; its log {log} says why"
    )]
    HolderNotListening {
        node: String,
        socket: PathBuf,
        log: PathBuf,
    },
    #[error(
        "the agent on node {node} did not report ready within {timeout:?} (GET :15021/healthz/ready: {answer}); its log is in {log}"
    )]
    AgentNotReady {
        node: String,
        timeout: std::time::Duration,
        answer: String,
        log: PathBuf,
    },
    #[error(
        "deploy/install.yaml, {object}: {problem} (the local cluster runs weft as the manifest does; see cluster/src/manifest.rs)"
    )]
    Manifest { object: String, problem: String },
    #[error("invalid agent argument {arg:?}: {problem}")]
    AgentArg { arg: String, problem: String },
    #[error("the controller exited or did not answer within {timeout:?}; its log is in {log}")]
    ControllerNotReady {
        timeout: std::time::Duration,
        log: PathBuf,
    },
    #[error(
        "cluster {0} has no mesh yet; give it one (`cluster up --mesh PATH`) before starting the controller or agents"
    )]
    NoMesh(String),
    #[error(
        "cluster {0} runs no controller, so its mesh cannot settle; start it with `cargo xtask cluster controller start --name {0}`"
    )]
    NoController(String),
    #[error(
        "the mesh did not settle within {timeout:?}: still waiting for {waiting_for}; see the logs in {logs}"
    )]
    MeshNotApplied {
        waiting_for: String,
        timeout: std::time::Duration,
        logs: PathBuf,
    },
    #[error("processes in cgroup {cgroup} did not exit within 10s after SIGKILL: {processes}")]
    Stuck { cgroup: PathBuf, processes: String },
}

impl ClusterError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| ClusterError::Io { path, source }
    }
}
