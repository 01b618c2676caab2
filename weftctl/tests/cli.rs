//! The `weftctl` binary as scripts and CI pipelines run it: exit codes, JSON, and the
//! generated completion script and man page.

use std::process::{Command, Output};

fn weftctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args(args)
        .output()
        .expect("weftctl runs")
}

#[test]
fn analyze_exits_1_on_a_manifest_weft_would_refuse_and_0_on_good_ones() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: shop, labels: { weft.dev/mesh: enabled } }\n",
    )
    .unwrap();
    let output = weftctl(&["analyze", "-f", good.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\n\
         metadata: { name: p, namespace: shop }\nspec: { mode: SOMETIMES }\n",
    )
    .unwrap();
    let output = weftctl(&["analyze", "-f", dir.path().to_str().unwrap(), "-o", "json"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let finding = &report["findings"][0];
    assert_eq!(finding["severity"], "error", "{report:#}");
    assert_eq!(finding["file"], bad.to_str().unwrap(), "{report:#}");
    assert_eq!(report["files"].as_array().unwrap().len(), 2);

    let missing = weftctl(&["analyze", "-f", "/nonexistent/weft"]);
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no YAML or JSON file"));
}

#[test]
fn commands_that_need_a_mesh_say_how_to_name_one() {
    // No kubeconfig, and not in a pod.
    let home = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .arg("status")
        .env("HOME", home.path())
        .env("KUBECONFIG", home.path().join("none"))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .expect("weftctl runs");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--kubeconfig") && stderr.contains("--local NAME"),
        "{stderr}"
    );
}

#[test]
fn completions_and_the_man_page_cover_every_command() {
    let bash = weftctl(&["completion", "bash"]);
    assert!(bash.status.success());
    let man = weftctl(&["man"]);
    assert!(man.status.success());
    let (bash, man) = (
        String::from_utf8_lossy(&bash.stdout),
        String::from_utf8_lossy(&man.stdout),
    );
    for command in ["check", "status", "explain", "certs", "config", "analyze"] {
        assert!(bash.contains(command), "bash completion lacks {command}");
        assert!(man.contains(command), "the man page lacks {command}");
    }
    assert!(
        man.starts_with(".ie") || man.contains(".TH weftctl"),
        "{man}"
    );
}
