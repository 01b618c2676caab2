//! The install manifests against the binaries they run: every `WEFT_*` variable a
//! container of `deploy/install.yaml` or `deploy/uninstall.yaml` sets, and every flag
//! it passes, is one its binary reads, so renaming a flag without the manifests fails
//! here rather than on a cluster. (The agent's capabilities are checked by every
//! end-to-end test: the local cluster runs agents with exactly the manifest's list.)

use std::{path::Path, process::Command};

use serde::Deserialize as _;
use weft_e2e::workspace_bin;

/// (binary, subcommand, env names, flags) of every container in `file`.
fn containers(file: &str) -> Vec<(String, String, Vec<String>, Vec<String>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .filter_map(|document| serde_yaml::Value::deserialize(document).ok())
        .filter(|object| object["kind"] == "DaemonSet" || object["kind"] == "Deployment")
        .flat_map(|object| {
            let containers = object["spec"]["template"]["spec"]["containers"].clone();
            containers.as_sequence().cloned().unwrap_or_default()
        })
        .map(|container| {
            let image = container["image"].as_str().unwrap_or_default();
            let binary = image.split(':').next().unwrap_or_default().to_owned();
            let args: Vec<String> = container["args"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|arg| arg.as_str().map(str::to_owned))
                .collect();
            let subcommand = args.first().cloned().unwrap_or_default();
            let flags = args
                .iter()
                .filter_map(|arg| arg.strip_prefix("--"))
                .map(|flag| flag.split('=').next().unwrap_or_default().to_owned())
                .collect();
            let env = container["env"]
                .as_sequence()
                .into_iter()
                .flatten()
                .filter_map(|var| var["name"].as_str().map(str::to_owned))
                .collect();
            (binary, subcommand, env, flags)
        })
        .collect()
}

#[test]
fn every_variable_and_flag_the_manifests_set_is_one_the_binaries_read() {
    let mut checked = 0;
    for file in ["install.yaml", "uninstall.yaml"] {
        for (binary, subcommand, env, flags) in containers(file) {
            let help = Command::new(workspace_bin(&binary))
                .args([subcommand.as_str(), "--help"])
                .output()
                .unwrap();
            let help = String::from_utf8_lossy(&help.stdout);
            for name in env.iter().filter(|name| name.starts_with("WEFT_")) {
                assert!(
                    help.contains(&format!("[env: {name}=")),
                    "{file}: {binary} {subcommand} reads no {name}"
                );
                checked += 1;
            }
            for flag in &flags {
                assert!(
                    help.contains(&format!("--{flag}")),
                    "{file}: {binary} {subcommand} has no --{flag}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 15, "only {checked} variables and flags found");
}
