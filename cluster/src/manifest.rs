//! How `deploy/install.yaml` runs weft's agent and controller, so that the local
//! cluster runs them the same way: each container's arguments, its environment (the
//! values the manifest sets and the pod fields Kubernetes fills in) and its
//! capabilities. The rendered manifest is compiled into this crate, so a change to it
//! changes what every local cluster, demo and end-to-end test runs.
//!
//! A Kubernetes node and a local node differ in where things are: a value under one of
//! the container's volume mounts is moved to where that volume is on the local node,
//! and the controller's Service name becomes the controller's address. What the local
//! node cannot provide (a new volume, a new kind of value) is an error naming it, not a
//! silent difference.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::ClusterError;

/// `deploy/install.yaml`, as `cargo xtask codegen` renders it.
const INSTALL: &str = include_str!("../../deploy/install.yaml");

/// What a workload's container gets from the manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Workload {
    /// `DaemonSet weft-agent`: where in the manifest it is.
    object: String,
    /// The container's `args` (the subcommand).
    pub(crate) args: Vec<String>,
    /// The capabilities it adds; it drops every other one.
    pub(crate) capabilities: Vec<String>,
    env: Vec<EnvVar>,
    mounts: Vec<VolumeMount>,
}

/// The agent DaemonSet's agent container.
pub(crate) fn agent() -> Result<Workload, ClusterError> {
    Workload::read(INSTALL, "DaemonSet", "weft-agent", "agent")
}

/// The agent DaemonSet's socket holder (`weft-agent hold`).
pub(crate) fn holder() -> Result<Workload, ClusterError> {
    Workload::read(INSTALL, "DaemonSet", "weft-agent", "sockets")
}

/// The controller Deployment's container.
pub(crate) fn controller() -> Result<Workload, ClusterError> {
    Workload::read(INSTALL, "Deployment", "weft-controller", "controller")
}

/// Where the things a container sees are on a local node.
#[derive(Debug, Default)]
pub(crate) struct Local {
    /// Pod fields (`spec.nodeName`, …) and their values.
    pub fields: Vec<(&'static str, String)>,
    /// Volumes by name.
    pub volumes: Vec<(&'static str, Volume)>,
    /// Host names (a Service's DNS name) and the addresses that replace them.
    pub hosts: Vec<(String, String)>,
}

/// Where a volume's contents are on a local node.
#[derive(Debug)]
pub(crate) enum Volume {
    /// A directory: the mount shows it whole.
    Directory(PathBuf),
    /// Files by their path in the volume (a Secret's items, a projected token).
    Files(Vec<(&'static str, PathBuf)>),
}

impl Workload {
    fn read(manifest: &str, kind: &str, name: &str, container: &str) -> Result<Self, ClusterError> {
        let problem = |problem: String| ClusterError::Manifest {
            object: format!("{kind} {name}, container {container}"),
            problem,
        };
        let object = serde_yaml::Deserializer::from_str(manifest)
            .filter_map(|document| serde_yaml::Value::deserialize(document).ok())
            .find(|object| object["kind"] == kind && object["metadata"]["name"] == name)
            .ok_or_else(|| problem("it is not in the manifest".to_owned()))?;
        let pod: PodSpec = serde_yaml::from_value(object["spec"]["template"]["spec"].clone())
            .map_err(|err| problem(format!("its pod template does not read: {err}")))?;
        let container = pod
            .containers
            .into_iter()
            .find(|candidate| candidate.name == container)
            .ok_or_else(|| problem("its pod template has no such container".to_owned()))?;
        let capabilities = container.security_context.capabilities;
        if capabilities.drop != ["ALL"] {
            return Err(problem(
                "its container must drop ALL capabilities and add the ones it needs".to_owned(),
            ));
        }
        Ok(Self {
            object: format!("{kind} {name}, container {}", container.name),
            args: container.args,
            capabilities: capabilities.add,
            env: container.env,
            mounts: container.volume_mounts,
        })
    }

    /// The environment the container gets, as it is on a local node (`local`). Fails
    /// on a value the local node has nothing for.
    pub(crate) fn environment(&self, local: &Local) -> Result<Vec<(String, String)>, ClusterError> {
        self.env
            .iter()
            .map(|var| {
                let problem = |problem: String| ClusterError::Manifest {
                    object: format!("{}, env {}", self.object, var.name),
                    problem,
                };
                let value = match (&var.value, &var.value_from) {
                    (Some(value), None) => self.localize(value, local).map_err(problem)?,
                    (
                        None,
                        Some(EnvSource {
                            field_ref: Some(field),
                        }),
                    ) => local
                        .fields
                        .iter()
                        .find(|(path, _)| *path == field.field_path)
                        .map(|(_, value)| value.clone())
                        .ok_or_else(|| {
                            problem(format!(
                                "the local cluster has no value for the pod field {}",
                                field.field_path
                            ))
                        })?,
                    _ => {
                        return Err(problem(
                            "the local cluster takes a value or a fieldRef only".to_owned(),
                        ));
                    }
                };
                Ok((var.name.clone(), value))
            })
            .collect()
    }

    /// Whether the manifest sets environment variable `name`.
    pub(crate) fn sets(&self, name: &str) -> bool {
        self.env.iter().any(|var| var.name == name)
    }

    /// The start of a command line that runs a program as the container would: with
    /// only its capabilities (the bounding set of a root process is what it keeps
    /// across exec) and only the environment `env`.
    pub(crate) fn confinement(&self, env: &[(String, String)]) -> Vec<String> {
        let kept: String = self
            .capabilities
            .iter()
            .map(|name| format!(",+{}", name.to_lowercase()))
            .collect();
        let mut argv = vec![
            "setpriv".to_owned(),
            format!("--bounding-set=-all{kept}"),
            "--".to_owned(),
            "env".to_owned(),
            "-i".to_owned(),
        ];
        argv.extend(env.iter().map(|(name, value)| format!("{name}={value}")));
        argv
    }

    /// `value` with a path under one of the container's mounts moved to the local
    /// volume, and a known host name replaced by its address.
    fn localize(&self, value: &str, local: &Local) -> Result<String, String> {
        let path = Path::new(value);
        for mount in &self.mounts {
            let Ok(inside) = path.strip_prefix(&mount.mount_path) else {
                continue;
            };
            let volume = local
                .volumes
                .iter()
                .find(|(name, _)| *name == mount.name)
                .map(|(_, volume)| volume)
                .ok_or_else(|| {
                    format!(
                        "{value} is in volume {}, which the local cluster does not provide",
                        mount.name
                    )
                })?;
            let local_path = match volume {
                Volume::Directory(dir) if inside.as_os_str().is_empty() => dir.clone(),
                Volume::Directory(dir) => dir.join(inside),
                Volume::Files(files) => files
                    .iter()
                    .find(|(name, _)| Path::new(name) == inside)
                    .map(|(_, file)| file.clone())
                    .ok_or_else(|| {
                        format!(
                            "{value}: the local cluster has no {} in volume {}",
                            inside.display(),
                            mount.name
                        )
                    })?,
            };
            return Ok(local_path.display().to_string());
        }
        Ok(local
            .hosts
            .iter()
            .fold(value.to_owned(), |value, (host, address)| {
                value.replace(host, address)
            }))
    }
}

#[derive(Deserialize)]
struct PodSpec {
    containers: Vec<Container>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Container {
    name: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
    #[serde(default)]
    volume_mounts: Vec<VolumeMount>,
    #[serde(default)]
    security_context: SecurityContext,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvVar {
    name: String,
    value: Option<String>,
    value_from: Option<EnvSource>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EnvSource {
    field_ref: Option<FieldRef>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldRef {
    field_path: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct VolumeMount {
    name: String,
    mount_path: PathBuf,
}

#[derive(Default, Deserialize)]
struct SecurityContext {
    #[serde(default)]
    capabilities: Capabilities,
}

#[derive(Default, Deserialize)]
struct Capabilities {
    #[serde(default)]
    add: Vec<String>,
    #[serde(default)]
    drop: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
kind: ServiceAccount
metadata: { name: weft-agent }
---
kind: DaemonSet
metadata: { name: weft-agent }
spec:
  template:
    spec:
      containers:
        - name: agent
          args: [run]
          env:
            - name: WEFT_NODE
              valueFrom: { fieldRef: { fieldPath: spec.nodeName } }
            - { name: WEFT_CONTROLLER, value: "https://weft-controller.weft-system.svc:15010" }
            - { name: WEFT_CNI_CONF_DIR, value: /host/etc/cni/net.d }
            - { name: WEFT_TOKEN, value: /var/run/secrets/weft/token }
            - { name: WEFT_LOG, value: info }
          volumeMounts:
            - { name: cni-conf, mountPath: /host/etc/cni/net.d }
            - { name: token, mountPath: /var/run/secrets/weft }
          securityContext:
            capabilities: { drop: [ALL], add: [BPF, NET_ADMIN] }
"#;

    fn local() -> Local {
        Local {
            fields: vec![("spec.nodeName", "node0".to_owned())],
            volumes: vec![
                ("cni-conf", Volume::Directory("/run/a/node0/net.d".into())),
                (
                    "token",
                    Volume::Files(vec![("token", "/run/a/tokens/node0.token".into())]),
                ),
            ],
            hosts: vec![(
                "weft-controller.weft-system.svc".to_owned(),
                "10.99.0.254".to_owned(),
            )],
        }
    }

    fn agent() -> Workload {
        Workload::read(MANIFEST, "DaemonSet", "weft-agent", "agent").unwrap()
    }

    #[test]
    fn reads_the_container_of_the_named_object() {
        let agent = agent();
        assert_eq!(agent.args, ["run"]);
        assert_eq!(agent.capabilities, ["BPF", "NET_ADMIN"]);
        assert!(agent.sets("WEFT_LOG"));
        assert!(!agent.sets("WEFT_BPFFS"));
        let missing = Workload::read(MANIFEST, "Deployment", "weft-agent", "agent").unwrap_err();
        assert!(
            missing.to_string().contains("Deployment weft-agent"),
            "{missing}"
        );
        let missing = Workload::read(MANIFEST, "DaemonSet", "weft-agent", "other").unwrap_err();
        assert!(
            missing.to_string().contains("no such container"),
            "{missing}"
        );
    }

    #[test]
    fn environment_moves_mounts_fields_and_hosts_to_the_local_node() {
        let env = agent().environment(&local()).unwrap();
        let expected = [
            ("WEFT_NODE", "node0"),
            ("WEFT_CONTROLLER", "https://10.99.0.254:15010"),
            ("WEFT_CNI_CONF_DIR", "/run/a/node0/net.d"),
            ("WEFT_TOKEN", "/run/a/tokens/node0.token"),
            ("WEFT_LOG", "info"),
        ];
        let expected: Vec<_> = expected
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect();
        assert_eq!(env, expected);
    }

    #[test]
    fn what_the_local_node_lacks_is_named() {
        type Change = fn(&mut Local);
        let cases: [(Change, &str); 3] = [
            (
                |local| local.fields.clear(),
                "no value for the pod field spec.nodeName",
            ),
            (
                |local| drop(local.volumes.remove(0)),
                "volume cni-conf, which the local",
            ),
            (
                |local| local.volumes[1].1 = Volume::Files(Vec::new()),
                "no token in volume token",
            ),
        ];
        for (change, expected) in cases {
            let mut local = local();
            change(&mut local);
            let err = agent().environment(&local).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn confinement_keeps_the_capabilities_and_only_the_environment() {
        let env = [("WEFT_NODE".to_owned(), "node0".to_owned())];
        assert_eq!(
            agent().confinement(&env),
            [
                "setpriv",
                "--bounding-set=-all,+bpf,+net_admin",
                "--",
                "env",
                "-i",
                "WEFT_NODE=node0"
            ]
        );
    }

    #[test]
    fn a_container_must_drop_every_capability() {
        let keeps = MANIFEST.replace("drop: [ALL], ", "");
        let err = Workload::read(&keeps, "DaemonSet", "weft-agent", "agent").unwrap_err();
        assert!(err.to_string().contains("drop ALL"), "{err}");
    }

    #[test]
    fn the_installed_workloads_read() {
        let agent = super::agent().unwrap();
        assert_eq!(agent.args, ["run"]);
        assert!(agent.capabilities.contains(&"BPF".to_owned()));
        assert_eq!(
            super::controller().unwrap().capabilities,
            Vec::<String>::new()
        );
    }
}
