//! The CNI installer against the network configurations the common primary CNIs write
//! (their shapes as they ship them), a single-plugin `.conf`, and missing or malformed
//! ones, in temporary directories.

use std::{fs, path::Path};

use serde_json::{Map, Value, json};
use tempfile::TempDir;
use weft_cni::install::{InstallError, Installer, PLUGIN_TYPE};

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "calico",
      "log_level": "info",
      "datastore_type": "kubernetes",
      "nodename": "node-a",
      "mtu": 0,
      "ipam": { "type": "calico-ipam" },
      "policy": { "type": "k8s" },
      "kubernetes": { "kubeconfig": "/etc/cni/net.d/calico-kubeconfig" }
    },
    { "type": "portmap", "snat": true, "capabilities": { "portMappings": true } },
    { "type": "bandwidth", "capabilities": { "bandwidth": true } }
  ]
}"#;

const CILIUM: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "cilium",
  "plugins": [
    { "type": "cilium-cni", "enable-debug": false, "log-file": "/var/run/cilium/cilium-cni.log" }
  ]
}"#;

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    { "type": "flannel", "delegate": { "hairpinMode": true, "isDefaultGateway": true } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}"#;

const KINDNET: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "kindnet",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "dataDir": "/run/cni-ipam-state",
        "routes": [{ "dst": "0.0.0.0/0" }],
        "ranges": [[{ "subnet": "10.244.0.0/24" }]]
      },
      "mtu": 1500
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}"#;

const AWS_VPC: &str = r#"{
  "cniVersion": "0.4.0",
  "name": "aws-cni",
  "disableCheck": true,
  "plugins": [
    {
      "name": "aws-cni",
      "type": "aws-cni",
      "vethPrefix": "eni",
      "mtu": "9001",
      "podSGEnforcingMode": "strict",
      "pluginLogFile": "/var/log/aws-routed-eni/plugin.log",
      "pluginLogLevel": "DEBUG"
    },
    {
      "name": "egress-cni",
      "type": "egress-cni",
      "mtu": "9001",
      "enabled": "false",
      "randomizeSNAT": "prng",
      "nodeIP": "",
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "fd00::ac:00/118" }]] },
      "pluginLogFile": "/var/log/aws-routed-eni/egress-v6-plugin.log",
      "pluginLogLevel": "DEBUG"
    },
    { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true }
  ]
}"#;

/// A node: its configuration and plugin directories, and a weft-cni binary to place.
struct Node {
    _dir: TempDir,
    installer: Installer,
}

impl Node {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (conf_dir, bin_dir) = (dir.path().join("net.d"), dir.path().join("bin"));
        fs::create_dir_all(&conf_dir).unwrap();
        fs::create_dir_all(&bin_dir).unwrap();
        for (name, text) in files {
            fs::write(conf_dir.join(name), text).unwrap();
        }
        let binary = dir.path().join("image-weft-cni");
        fs::write(&binary, b"#!/bin/sh\necho weft-cni\n").unwrap();
        let installer = Installer {
            conf_dir,
            bin_dir,
            binary,
            plugin: plugin("/run/weft/cni.sock"),
        };
        Self {
            _dir: dir,
            installer,
        }
    }

    fn conf(&self, name: &str) -> Value {
        let text = fs::read_to_string(self.installer.conf_dir.join(name)).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.installer.conf_dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn plugin(socket: &str) -> Map<String, Value> {
    let Value::Object(plugin) = json!({ "agentSocket": socket }) else {
        unreachable!()
    };
    plugin
}

fn types(conf: &Value) -> Vec<&str> {
    conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|plugin| plugin["type"].as_str().unwrap())
        .collect()
}

#[test]
fn weft_goes_last_in_each_primary_cnis_list_and_comes_out_as_it_went_in() {
    let shapes = [
        (
            "10-calico.conflist",
            CALICO,
            vec!["calico", "portmap", "bandwidth"],
        ),
        ("05-cilium.conflist", CILIUM, vec!["cilium-cni"]),
        ("10-flannel.conflist", FLANNEL, vec!["flannel", "portmap"]),
        ("10-kindnet.conflist", KINDNET, vec!["ptp", "portmap"]),
        (
            "10-aws.conflist",
            AWS_VPC,
            vec!["aws-cni", "egress-cni", "portmap"],
        ),
    ];
    for (name, text, primary) in shapes {
        let node = Node::new(&[(name, text)]);
        let changed = node.installer.install().unwrap();
        assert_eq!(
            changed.configuration.as_deref(),
            Some(node.installer.conf_dir.join(name).as_path()),
            "{name}"
        );
        assert!(changed.binary);
        let chained = node.conf(name);
        let mut expected = primary.clone();
        expected.push(PLUGIN_TYPE);
        assert_eq!(types(&chained), expected, "{name}");
        assert_eq!(
            chained["plugins"].as_array().unwrap().last().unwrap()["agentSocket"],
            "/run/weft/cni.sock"
        );
        // Everything of the primary's is kept as it was.
        let original: Value = serde_json::from_str(text).unwrap();
        for (key, value) in original.as_object().unwrap() {
            if key != "plugins" {
                assert_eq!(&chained[key], value, "{name}: {key}");
            }
        }
        assert_eq!(
            chained["plugins"].as_array().unwrap()[..primary.len()],
            original["plugins"].as_array().unwrap()[..],
            "{name}"
        );
        assert!(is_executable(&node.installer.bin_dir.join(PLUGIN_TYPE)));
        // No temporary file is left beside it.
        assert_eq!(node.names(), [name], "{name}");

        let removed = node.installer.uninstall().unwrap();
        assert!(removed.binary && removed.configuration.is_some(), "{name}");
        assert_eq!(node.conf(name), original, "{name}");
        assert!(!node.installer.bin_dir.join(PLUGIN_TYPE).exists());
        assert_eq!(
            node.installer.uninstall().unwrap(),
            Default::default(),
            "{name}"
        );
    }
}

#[test]
fn installing_again_changes_nothing_until_the_primary_rewrites_its_file() {
    let node = Node::new(&[("10-calico.conflist", CALICO)]);
    node.installer.install().unwrap();
    let path = node.installer.conf_dir.join("10-calico.conflist");
    let written = fs::read(&path).unwrap();
    let again = node.installer.install().unwrap();
    assert!(!again.anything(), "{again:?}");
    assert_eq!(fs::read(&path).unwrap(), written);

    // The primary CNI puts its own file back: weft is added again.
    fs::write(&path, CALICO).unwrap();
    let repaired = node.installer.install().unwrap();
    assert_eq!(repaired.configuration.as_deref(), Some(path.as_path()));
    assert!(!repaired.binary);
    assert_eq!(
        types(&node.conf("10-calico.conflist")).last(),
        Some(&PLUGIN_TYPE)
    );

    // A changed setting replaces weft's entry rather than adding a second.
    let mut moved = node.installer.clone();
    moved.plugin = plugin("/var/run/weft/cni.sock");
    moved.install().unwrap();
    let conf = node.conf("10-calico.conflist");
    assert_eq!(
        types(&conf),
        ["calico", "portmap", "bandwidth", PLUGIN_TYPE]
    );
    assert_eq!(conf["plugins"][3]["agentSocket"], "/var/run/weft/cni.sock");

    // So does a weft entry that is no longer last.
    let mut shuffled = conf.clone();
    shuffled["plugins"].as_array_mut().unwrap().rotate_right(1);
    fs::write(&path, shuffled.to_string()).unwrap();
    assert!(moved.install().unwrap().configuration.is_some());
    assert_eq!(
        types(&node.conf("10-calico.conflist")).last(),
        Some(&PLUGIN_TYPE)
    );
}

#[test]
fn only_the_file_the_runtime_reads_first_is_chained() {
    let node = Node::new(&[
        ("10-calico.conflist", CALICO),
        ("05-cilium.conflist", CILIUM),
        (
            "99-loopback.conf",
            r#"{"cniVersion":"0.3.1","name":"lo","type":"loopback"}"#,
        ),
        ("README", "not a configuration"),
    ]);
    node.installer.install().unwrap();
    assert_eq!(
        types(&node.conf("05-cilium.conflist")),
        ["cilium-cni", PLUGIN_TYPE]
    );
    assert_eq!(
        node.conf("10-calico.conflist"),
        serde_json::from_str::<Value>(CALICO).unwrap()
    );
}

#[test]
fn a_single_plugin_conf_becomes_a_list_of_the_same_name() {
    let bridge = r#"{
      "cniVersion": "0.4.0",
      "name": "bridge",
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipam": { "type": "host-local", "subnet": "10.22.0.0/16" }
    }"#;
    let node = Node::new(&[("10-bridge.conf", bridge)]);
    let changed = node.installer.install().unwrap();
    let list = node.installer.conf_dir.join("10-bridge.conflist");
    assert_eq!(changed.configuration.as_deref(), Some(list.as_path()));
    assert_eq!(node.names(), ["10-bridge.conflist"]);
    let conf = node.conf("10-bridge.conflist");
    assert_eq!(
        (&conf["name"], &conf["cniVersion"]),
        (&json!("bridge"), &json!("0.4.0"))
    );
    assert_eq!(types(&conf), ["bridge", PLUGIN_TYPE]);
    assert_eq!(conf["plugins"][0]["ipam"]["subnet"], "10.22.0.0/16");
    assert!(conf["plugins"][0].get("cniVersion").is_none());
    assert!(!node.installer.install().unwrap().anything());
}

#[test]
fn a_missing_or_malformed_configuration_is_named_and_left_alone() {
    let empty = Node::new(&[]);
    let error = empty.installer.install().unwrap_err();
    assert!(matches!(error, InstallError::NoConfiguration(_)), "{error}");
    assert!(error.to_string().contains("primary CNI"), "{error}");

    let cases = [
        ("{ \"plugins\": [", "EOF"),
        ("[1, 2]", "not a JSON object"),
        (r#"{"name":"x","plugins":{}}"#, "`plugins` is not a list"),
        (r#"{"name":"x","plugins":["calico"]}"#, "not an object"),
        (r#"{"name":"x"}"#, "neither `plugins` nor `type`"),
    ];
    for (text, problem) in cases {
        let node = Node::new(&[("10-broken.conflist", text)]);
        let error = node.installer.install().unwrap_err();
        let message = error.to_string();
        assert!(matches!(error, InstallError::Malformed { .. }), "{message}");
        assert!(
            message.contains("10-broken.conflist") && message.contains(problem),
            "{message}"
        );
        assert_eq!(
            fs::read_to_string(node.installer.conf_dir.join("10-broken.conflist")).unwrap(),
            text
        );
        // Uninstalling passes over what it cannot read.
        node.installer.uninstall().unwrap();
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|meta| meta.permissions().mode() & 0o111 == 0o111)
}
