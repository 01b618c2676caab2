//! weft's local cluster: a Kubernetes-shaped cluster on one machine, for development,
//! demos and end-to-end tests.
//!
//! Nodes and pods are network namespaces. A *fabric* namespace holds a bridge that joins
//! the nodes; each node routes its own pod range and reaches the other nodes' ranges
//! through the fabric; each pod hangs off its node by a veth pair and has its own cgroup
//! under the node's. Nothing is created in the machine's own network namespace, so a
//! cluster never touches the host's addresses and two clusters never collide.
//!
//! Every object is named after the cluster ([`Layout`]), which is how [`down`] finds
//! and removes everything of one cluster, even after `up` died half-way, and nothing
//! of another.
#![forbid(unsafe_code)]

mod agent;
mod cluster;
pub mod cni;
mod controller;
mod error;
mod host;
mod layout;
mod manifest;
pub mod objects;
mod topology;

pub use agent::check_agent_args;
pub use cluster::{AgentPort, Cluster, PodSpec, down};
pub use error::ClusterError;
pub use host::{bpffs_mounted, cgroup2_mount, is_root, process_running};
pub use layout::Layout;
pub use topology::{NodeInfo, NodeProcess, PodInfo, Topology};
