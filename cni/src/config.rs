//! The network configuration on stdin, and what weft reads from the primary plugin's
//! result in it (`prevResult`).
//!
//! Besides the standard fields, weft-cni takes two of its own:
//!
//! ```json
//! { "type": "weft-cni", "agentSocket": "/run/weft/cni.sock", "timeoutMs": 5000 }
//! ```

use std::{net::IpAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer, de::Error as _};
use serde_json::Value;
use weft_api::enroll::DEFAULT_SOCKET;

use crate::{agent::Endpoint, error::CniError};

/// The CNI versions weft-cni speaks; their results all have the shape weft reads.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The newest of them: what VERSION reports, and errors found before the configuration's
/// own version is known use.
pub const LATEST_VERSION: &str = "1.0.0";
/// CHECK appeared in 0.4.0.
const CHECK_VERSIONS: [&str; 2] = ["0.4.0", "1.0.0"];
/// The agent round trip's bound unless `timeoutMs` says otherwise.
const DEFAULT_TIMEOUT_MS: u64 = 5000;

/// The configuration, decoded and at a supported version.
#[derive(Debug)]
pub(crate) struct NetConf {
    pub(crate) cni_version: String,
    agent_socket: PathBuf,
    timeout_ms: u64,
    prev_result: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    cni_version: Option<String>,
    agent_socket: Option<PathBuf>,
    timeout_ms: Option<u64>,
    prev_result: Option<Value>,
}

impl NetConf {
    pub(crate) fn decode(stdin: &[u8]) -> Result<Self, CniError> {
        let raw: Raw = serde_json::from_slice(stdin).map_err(CniError::Decode)?;
        let cni_version = raw.cni_version.ok_or(CniError::NoVersion)?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::IncompatibleVersion {
                version: cni_version,
            });
        }
        Ok(Self {
            cni_version,
            agent_socket: raw
                .agent_socket
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            timeout_ms: raw.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS),
            prev_result: raw.prev_result,
        })
    }

    pub(crate) fn check_allowed(&self) -> Result<(), CniError> {
        if CHECK_VERSIONS.contains(&self.cni_version.as_str()) {
            Ok(())
        } else {
            Err(CniError::CheckUnsupported {
                version: self.cni_version.clone(),
            })
        }
    }

    pub(crate) fn endpoint(&self) -> Result<Endpoint, CniError> {
        if self.timeout_ms == 0 {
            return Err(CniError::ZeroTimeout);
        }
        Ok(Endpoint {
            socket: self.agent_socket.clone(),
            timeout: Duration::from_millis(self.timeout_ms),
        })
    }

    /// The previous plugin's result; weft-cni only ever runs chained.
    pub(crate) fn prev_result(&self) -> Result<&Value, CniError> {
        self.prev_result.as_ref().ok_or(CniError::NoPrevResult)
    }
}

/// What the agent needs from `prevResult`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct PodNetwork {
    pub(crate) host_interface: String,
    pub(crate) ips: Vec<IpAddr>,
    pub(crate) gateways: Vec<IpAddr>,
}

/// A CNI result (0.3.0 to 1.0.0), only the fields weft reads.
#[derive(Deserialize)]
struct PrevResult {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    ips: Vec<IpConfig>,
}

#[derive(Deserialize)]
struct Interface {
    name: String,
    sandbox: Option<String>,
}

impl Interface {
    fn in_pod(&self) -> bool {
        self.sandbox.as_deref().is_some_and(|s| !s.is_empty())
    }
}

#[derive(Deserialize)]
struct IpConfig {
    #[serde(deserialize_with = "cidr_address")]
    address: IpAddr,
    gateway: Option<IpAddr>,
}

/// Reads the pod's addresses, gateways and host-side interface from `prev`. `ifname` is
/// the pod's interface (`CNI_IFNAME`).
pub(crate) fn pod_network(prev: &Value, ifname: &str) -> Result<PodNetwork, CniError> {
    let result = PrevResult::deserialize(prev).map_err(CniError::BadPrevResult)?;
    let host_interface = host_interface(&result.interfaces, ifname)
        .ok_or(CniError::NoHostInterface)?
        .to_owned();
    Ok(PodNetwork {
        host_interface,
        ips: result.ips.iter().map(|ip| ip.address).collect(),
        gateways: result.ips.iter().filter_map(|ip| ip.gateway).collect(),
    })
}

/// The pod's veth end in the node's namespace.
///
/// Interfaces without a sandbox are on the node, but not all of them are the pod's: the
/// bridge plugin reports `[bridge, host veth, pod veth]`, and plugins chained before
/// weft-cni may append more (bandwidth adds its ifb device). Plugins list the host end
/// before the pod end (bridge, ptp, Cilium), so the host interface is the last one without
/// a sandbox before the pod's interface; when the result has no pod interface (Calico
/// reports only the host end) or none precedes it, the first one without a sandbox.
fn host_interface<'a>(interfaces: &'a [Interface], ifname: &str) -> Option<&'a str> {
    let pod = interfaces
        .iter()
        .position(|i| i.in_pod() && i.name == ifname)
        .or_else(|| interfaces.iter().position(Interface::in_pod));
    let on_node = |i: &&Interface| !i.in_pod();
    pod.and_then(|pod| interfaces[..pod].iter().rev().find(on_node))
        .or_else(|| interfaces.iter().find(on_node))
        .map(|i| i.name.as_str())
}

/// An `address` in CIDR form ("10.244.0.2/24"), kept without its prefix length.
fn cidr_address<'de, D: Deserializer<'de>>(deserializer: D) -> Result<IpAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    let invalid = || D::Error::custom(format!("address {text:?} is not in CIDR form (ip/prefix)"));
    let (ip, prefix) = text.split_once('/').ok_or_else(invalid)?;
    let ip: IpAddr = ip.parse().map_err(|_| invalid())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    match prefix.parse::<u8>() {
        Ok(prefix) if prefix <= max => Ok(ip),
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn host(interfaces: Value) -> Option<String> {
        let interfaces: Vec<Interface> = serde_json::from_value(interfaces).unwrap();
        host_interface(&interfaces, "eth0").map(str::to_owned)
    }

    #[test]
    fn host_interface_is_the_pods_veth_end() {
        // ptp
        let ptp = json!([{"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/p"}]);
        assert_eq!(host(ptp).as_deref(), Some("veth1"));
        // bridge: the bridge comes first and is not the pod's
        let bridge = json!([
            {"name": "cni0", "mac": "aa:aa:aa:aa:aa:aa"},
            {"name": "veth2", "mac": "bb:bb:bb:bb:bb:bb", "sandbox": ""},
            {"name": "eth0", "sandbox": "/run/netns/p"},
            {"name": "bwp123"}
        ]);
        assert_eq!(host(bridge).as_deref(), Some("veth2"));
        // Calico: only the host end
        assert_eq!(host(json!([{"name": "cali1"}])).as_deref(), Some("cali1"));
        // a second pod interface (multus-style) does not confuse the choice
        let two = json!([
            {"name": "veth-a"}, {"name": "net1", "sandbox": "/run/netns/p"},
            {"name": "veth-b"}, {"name": "eth0", "sandbox": "/run/netns/p"}
        ]);
        assert_eq!(host(two).as_deref(), Some("veth-b"));
        // pod interface first
        let reversed = json!([{"name": "eth0", "sandbox": "/run/netns/p"}, {"name": "veth3"}]);
        assert_eq!(host(reversed).as_deref(), Some("veth3"));
        assert_eq!(host(json!([{"name": "eth0", "sandbox": "/p"}])), None);
        assert_eq!(host(json!([])), None);
    }

    #[test]
    fn addresses_and_gateways() {
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/p"}],
            "ips": [
                {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 1},
                {"address": "fd00::5/64", "interface": 1}
            ],
            "routes": [{"dst": "0.0.0.0/0"}]
        });
        let network = pod_network(&prev, "eth0").unwrap();
        assert_eq!(
            network,
            PodNetwork {
                host_interface: "veth1".into(),
                ips: vec!["10.244.1.5".parse().unwrap(), "fd00::5".parse().unwrap()],
                gateways: vec!["10.244.1.1".parse().unwrap()],
            }
        );
    }

    #[test]
    fn addresses_must_be_cidrs() {
        for address in [
            "10.244.1.5",
            "10.244.1.5/33",
            "fd00::5/129",
            "x/24",
            "10.0.0.1/",
        ] {
            let prev = json!({"interfaces": [{"name": "v"}], "ips": [{"address": address}]});
            match pod_network(&prev, "eth0") {
                Err(CniError::BadPrevResult(e)) => {
                    assert!(e.to_string().contains("CIDR"), "{address}: {e}")
                }
                other => panic!("{address}: {other:?}"),
            }
        }
    }

    #[test]
    fn versions_and_defaults() {
        let conf = NetConf::decode(br#"{"cniVersion": "0.3.1", "name": "n"}"#).unwrap();
        assert_eq!(
            conf.endpoint().unwrap(),
            Endpoint {
                socket: DEFAULT_SOCKET.into(),
                timeout: Duration::from_secs(5)
            }
        );
        assert!(matches!(
            conf.check_allowed(),
            Err(CniError::CheckUnsupported { .. })
        ));
        assert!(matches!(
            NetConf::decode(br#"{"cniVersion": "0.2.0"}"#),
            Err(CniError::IncompatibleVersion { version }) if version == "0.2.0"
        ));
        assert!(matches!(
            NetConf::decode(br#"{"name": "n"}"#),
            Err(CniError::NoVersion)
        ));
        let zero = NetConf::decode(br#"{"cniVersion": "1.0.0", "timeoutMs": 0}"#).unwrap();
        assert!(matches!(zero.endpoint(), Err(CniError::ZeroTimeout)));
    }
}
