//! The command line of the controller the cluster runs: the controller Deployment's
//! container from `deploy/install.yaml` (its capabilities, arguments and environment),
//! and the flags that stand in for Kubernetes on one machine: the cluster's objects and
//! the user's manifests as files, node tokens and the CA as directories, and listening
//! addresses on the fabric.

use std::path::Path;

use crate::{
    ClusterError, Topology,
    cluster::{CONTROL_PLANE_NAMESPACE, CONTROLLER_ADMIN_PORT, CONTROLLER_GRPC_PORT},
    manifest::{self, Local},
};

/// The controller pod's name (`metadata.name`).
const POD_NAME: &str = "weft-controller-0";

/// `weft-controller run` as the Deployment runs it, reading `manifests` beside the
/// cluster's own objects, with the cluster's extra controller arguments last.
pub(crate) fn command_line(
    controller_bin: &Path,
    topology: &Topology,
    manifests: &[impl AsRef<Path>],
) -> Result<Vec<String>, ClusterError> {
    let container = manifest::controller()?;
    let env = container.environment(&Local {
        fields: vec![("metadata.name", POD_NAME.to_owned())],
        ..Local::default()
    })?;
    let mut argv = container.confinement(&env);
    argv.push(controller_bin.display().to_string());
    argv.extend(container.args.iter().cloned());
    let address = topology.controller_address;
    let path = |path: &Path| path.display().to_string();
    let flags = [
        ("listen", format!("{address}:{CONTROLLER_GRPC_PORT}")),
        ("admin", format!("{address}:{CONTROLLER_ADMIN_PORT}")),
        ("node-tokens", path(&topology.node_tokens)),
        ("ca-dir", path(&topology.ca_dir)),
        ("ca-namespace", CONTROL_PLANE_NAMESPACE.to_owned()),
        ("file-interval-ms", "100".to_owned()),
        ("files", path(&topology.objects)),
    ];
    for (flag, value) in flags {
        argv.extend([format!("--{flag}"), value]);
    }
    for file in manifests {
        argv.extend(["--files".to_owned(), path(file.as_ref())]);
    }
    for port in &topology.exclude_ports {
        argv.extend(["--exclude-port".to_owned(), port.to_string()]);
    }
    argv.extend(topology.controller_args.iter().cloned());
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects;

    #[test]
    fn the_controller_runs_as_the_deployment_runs_it_with_files_for_kubernetes() {
        let topology = crate::agent::tests::topology(&[]);
        let argv = command_line(
            Path::new("/bin/weft-controller"),
            &topology,
            &["/work/mesh.yaml"],
        )
        .unwrap();
        assert_eq!(argv[..2], ["setpriv", "--bounding-set=-all"]);
        assert!(argv.contains(&"WEFT_POD_NAME=weft-controller-0".to_owned()));
        // The identities the cluster's objects and agents expect are in the trust
        // domain the manifest gives the controller.
        let trust_domain = format!("WEFT_TRUST_DOMAIN={}", objects::TRUST_DOMAIN);
        assert!(argv.contains(&trust_domain), "{argv:?}");
        let program = argv.iter().position(|word| word == "/bin/weft-controller");
        let program = program.unwrap();
        assert_eq!(argv[program + 1], "run");
        assert_eq!(
            argv[argv.len() - 4..],
            [
                "--files",
                "/run/weft/a/objects.json",
                "--files",
                "/work/mesh.yaml"
            ]
        );
    }
}
