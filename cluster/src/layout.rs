//! Where each object of a cluster lives and what it is called.
//!
//! All names derive from the cluster name, which has no '-', so the netns prefix
//! `weft-<cluster>-` of one cluster is never a prefix of another's.

use std::path::{Path, PathBuf};

use crate::{ClusterError, host};

/// Root of the per-cluster state directories (topology, lock, pod logs, sockets).
const STATE_ROOT: &str = "/run/weft";
/// Where bpffs is mounted; each cluster pins under its own directory there.
pub(crate) const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// The names and paths of one cluster's objects.
#[derive(Clone, Debug)]
pub struct Layout {
    cluster: String,
    cgroup_root: PathBuf,
}

impl Layout {
    /// The layout of cluster `cluster`; fails on an invalid name or when no cgroup v2
    /// hierarchy is mounted.
    pub fn new(cluster: &str) -> Result<Self, ClusterError> {
        validate_cluster_name(cluster)?;
        Ok(Self {
            cluster: cluster.to_owned(),
            cgroup_root: host::cgroup2_mount()?,
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn state_dir(&self) -> PathBuf {
        Path::new(STATE_ROOT).join(&self.cluster)
    }

    pub(crate) fn topology_file(&self) -> PathBuf {
        self.state_dir().join("topology.json")
    }

    pub(crate) fn lock_file(&self) -> PathBuf {
        self.state_dir().join("lock")
    }

    pub fn pod_log(&self, namespace: &str, pod: &str) -> PathBuf {
        self.state_dir()
            .join("logs")
            .join(format!("{namespace}.{pod}.log"))
    }

    /// Log of a process the cluster runs on a node (such as the agent).
    pub fn node_log(&self, node: &str, label: &str) -> PathBuf {
        self.state_dir()
            .join("logs")
            .join(format!("{node}.{label}.log"))
    }

    /// Files of node `node`'s agent: its CNI socket and its records.
    pub fn node_state(&self, node: &str) -> PathBuf {
        self.state_dir().join(node)
    }

    /// The mesh CA's directory, which the controller keeps (`--ca-dir`).
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir().join("ca")
    }

    /// Prefix of every network namespace of this cluster.
    pub fn netns_prefix(&self) -> String {
        format!("weft-{}-", self.cluster)
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}fabric", self.netns_prefix())
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("{}{node}", self.netns_prefix())
    }

    /// Pod namespaces contain a '.', which node names never do.
    pub fn pod_netns(&self, namespace: &str, pod: &str) -> String {
        format!("{}{namespace}.{pod}", self.netns_prefix())
    }

    /// The cluster's cgroup; everything the cluster runs lives below it.
    pub fn cgroup(&self) -> PathBuf {
        self.cgroup_root.join(format!("weft-{}", self.cluster))
    }

    pub fn node_cgroup(&self, node: &str) -> PathBuf {
        self.cgroup().join(node)
    }

    /// The cgroup holding all pods of `node`: where capture programs attach. Named as
    /// the kubelet's systemd driver names it, which is what the agent DaemonSet's
    /// `WEFT_POD_CGROUP` points at.
    pub fn pods_cgroup(&self, node: &str) -> PathBuf {
        self.node_cgroup(node).join("kubepods.slice")
    }

    /// The cgroup for the node's own processes (the agent), outside the pods' subtree.
    pub fn system_cgroup(&self, node: &str) -> PathBuf {
        self.node_cgroup(node).join("system")
    }

    /// The cgroup of the control plane (the controller), outside every node.
    pub fn control_plane_cgroup(&self) -> PathBuf {
        self.cgroup().join("control-plane")
    }

    pub fn pod_cgroup(&self, node: &str, namespace: &str, pod: &str) -> PathBuf {
        self.pods_cgroup(node).join(format!("{namespace}.{pod}"))
    }

    pub fn bpffs(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(format!("weft-{}", self.cluster))
    }

    pub fn node_bpffs(&self, node: &str) -> PathBuf {
        self.bpffs().join(node)
    }
}

fn validate_cluster_name(name: &str) -> Result<(), ClusterError> {
    let mut chars = name.chars();
    let valid = (1..=12).contains(&name.len())
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if valid {
        Ok(())
    } else {
        Err(ClusterError::ClusterName(name.to_owned()))
    }
}

/// Checks that `value` is a DNS label no longer than `max`, as Kubernetes requires of
/// namespace names (and as we require of pod names, so they fit in paths unescaped).
pub(crate) fn validate_dns_label(
    what: &'static str,
    value: &str,
    max: usize,
) -> Result<(), ClusterError> {
    let bytes = value.as_bytes();
    let allowed = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let valid = (1..=max).contains(&bytes.len())
        && bytes.iter().all(allowed)
        && bytes.first() != Some(&b'-')
        && bytes.last() != Some(&b'-');
    if valid {
        Ok(())
    } else {
        Err(ClusterError::Label {
            what,
            value: value.to_owned(),
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names_cannot_prefix_each_other() {
        for bad in ["", "a-b", "A", "1a", "abcdefghijklm", "a.b", "a_b"] {
            assert!(validate_cluster_name(bad).is_err(), "{bad:?} was accepted");
        }
        for good in ["a", "demo", "t1f2e3", "abcdefghijkl"] {
            validate_cluster_name(good).unwrap();
        }
    }

    #[test]
    fn dns_labels() {
        for bad in ["", "-a", "a-", "A", "a.b", "a_b"] {
            assert!(validate_dns_label("pod name", bad, 40).is_err(), "{bad:?}");
        }
        assert!(validate_dns_label("pod name", &"a".repeat(41), 40).is_err());
        for good in ["a", "web-0", "client", "a1-b2"] {
            validate_dns_label("pod name", good, 40).unwrap();
        }
    }

    #[test]
    fn pod_and_node_namespaces_never_collide() {
        let layout = Layout {
            cluster: "a".into(),
            cgroup_root: "/cg".into(),
        };
        assert_eq!(layout.node_netns("node0"), "weft-a-node0");
        assert_eq!(layout.pod_netns("default", "node0"), "weft-a-default.node0");
        assert_ne!(layout.fabric_netns(), layout.pod_netns("x", "fabric"));
        assert_eq!(
            layout.pod_cgroup("node1", "default", "web-0"),
            Path::new("/cg/weft-a/node1/kubepods.slice/default.web-0")
        );
    }
}
