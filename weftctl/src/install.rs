//! `weftctl install` / `uninstall`: `deploy/install.yaml` and `deploy/uninstall.yaml`,
//! compiled into weftctl, printed with the options an operator sets (`--set
//! key=value`), each the same change as one of the kustomize components in
//! `deploy/components/` (a test renders both and compares them), ready for
//! `kubectl apply -f -`.

use std::str::FromStr;

use serde::Deserialize as _;
use serde_yaml::{Mapping, Value};

const INSTALL: &str = include_str!("../../deploy/install.yaml");
const UNINSTALL: &str = include_str!("../../deploy/uninstall.yaml");

/// The keys `--set` takes, for error messages and `--help`.
pub const KEYS: &str = "trustDomain, certTTL, logLevel, otlpEndpoint, traceSampling, \
                        metrics=annotations, controllerReplicas, agentCPURequest, \
                        agentMemoryRequest, agentImage, controllerImage";

/// One option of an install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Setting {
    /// The mesh's trust domain (the controller issues identities in it, the agents
    /// expect the controller's identity in it): component `trust-domain`.
    TrustDomain(String),
    /// Workload certificates' lifetime (`6h`): component `cert-ttl`.
    CertTtl(String),
    /// Agent and controller log filter: component `debug-logs` is `debug`.
    LogLevel(String),
    /// Where agents send traces (OTLP/gRPC), sampling 1 %: component `otlp`.
    OtlpEndpoint(String),
    /// The ratio of traces sampled, with `otlpEndpoint`.
    TraceSampling(String),
    /// `prometheus.io/*` annotations on the pods, for a Prometheus without the
    /// operator: component `prometheus-annotations`.
    MetricsAnnotations,
    /// Controller replicas; 1 also drops the disruption budget: component
    /// `single-controller`.
    ControllerReplicas(u32),
    /// The agent's CPU and memory requests: component `busy-nodes` is `1` and `128Mi`.
    AgentCpuRequest(String),
    AgentMemoryRequest(String),
    /// Images, where your nodes pull them from.
    AgentImage(String),
    ControllerImage(String),
}

impl FromStr for Setting {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (key, value) = text
            .split_once('=')
            .filter(|(_, value)| !value.is_empty())
            .ok_or_else(|| format!("{text:?} is not key=value (keys: {KEYS})"))?;
        let value = value.to_owned();
        Ok(match key {
            "trustDomain" => Self::TrustDomain(value),
            "certTTL" => Self::CertTtl(value),
            "logLevel" => Self::LogLevel(value),
            "otlpEndpoint" => Self::OtlpEndpoint(value),
            "traceSampling" => Self::TraceSampling(value),
            "metrics" if value == "annotations" => Self::MetricsAnnotations,
            "metrics" => {
                return Err(format!(
                    "metrics={value}: only `annotations` (PodMonitors are deploy/monitoring)"
                ));
            }
            "controllerReplicas" => Self::ControllerReplicas(
                value
                    .parse()
                    .ok()
                    .filter(|&replicas| replicas > 0)
                    .ok_or_else(|| format!("controllerReplicas={value}: a number, 1 or more"))?,
            ),
            "agentCPURequest" => Self::AgentCpuRequest(value),
            "agentMemoryRequest" => Self::AgentMemoryRequest(value),
            "agentImage" => Self::AgentImage(value),
            "controllerImage" => Self::ControllerImage(value),
            _ => return Err(format!("{key}: not a setting (keys: {KEYS})")),
        })
    }
}

/// `deploy/install.yaml` with `settings` applied.
pub fn install(settings: &[Setting]) -> anyhow::Result<String> {
    let mut objects = documents(INSTALL)?;
    for setting in settings {
        apply(&mut objects, setting)?;
    }
    render(&objects)
}

/// `deploy/uninstall.yaml`, with the agent image of `settings` if they name one.
pub fn uninstall(settings: &[Setting]) -> anyhow::Result<String> {
    let mut objects = documents(UNINSTALL)?;
    for setting in settings {
        match setting {
            Setting::AgentImage(image) => {
                container(&mut objects, "DaemonSet", "weft-uninstall")?["image"] =
                    image.as_str().into();
            }
            _ => anyhow::bail!("uninstall takes only agentImage, not {setting:?}"),
        }
    }
    render(&objects)
}

fn apply(objects: &mut Vec<Value>, setting: &Setting) -> anyhow::Result<()> {
    const AGENT: (&str, &str) = ("DaemonSet", "weft-agent");
    const CONTROLLER: (&str, &str) = ("Deployment", "weft-controller");
    match setting {
        Setting::TrustDomain(domain) => {
            env(objects, CONTROLLER, "WEFT_TRUST_DOMAIN", domain)?;
            let identity = format!("spiffe://{domain}/ns/weft-system/sa/weft-controller");
            env(objects, AGENT, "WEFT_CONTROLLER_IDENTITY", &identity)?;
        }
        Setting::CertTtl(ttl) => env(objects, CONTROLLER, "WEFT_CERT_TTL", ttl)?,
        Setting::LogLevel(filter) => {
            env(objects, AGENT, "WEFT_LOG", filter)?;
            env(objects, CONTROLLER, "WEFT_LOG", filter)?;
        }
        Setting::OtlpEndpoint(endpoint) => {
            env(objects, AGENT, "WEFT_TRACE_ENDPOINT", endpoint)?;
            if !has_env(container(objects, AGENT.0, AGENT.1)?, "WEFT_TRACE_SAMPLING") {
                env(objects, AGENT, "WEFT_TRACE_SAMPLING", "0.01")?;
            }
        }
        Setting::TraceSampling(ratio) => env(objects, AGENT, "WEFT_TRACE_SAMPLING", ratio)?,
        Setting::MetricsAnnotations => {
            for ((kind, name), port) in [(AGENT, "15020"), (CONTROLLER, "15014")] {
                let metadata = &mut object(objects, kind, name)?["spec"]["template"]["metadata"];
                let annotations = mapping(&mut metadata["annotations"]);
                annotations.insert("prometheus.io/scrape".into(), "true".into());
                annotations.insert("prometheus.io/port".into(), port.into());
                annotations.insert("prometheus.io/path".into(), "/metrics".into());
            }
        }
        Setting::ControllerReplicas(replicas) => {
            object(objects, CONTROLLER.0, CONTROLLER.1)?["spec"]["replicas"] = (*replicas).into();
            if *replicas == 1 {
                // A budget of one available replica out of one blocks every drain.
                objects.retain(|object| !is(object, "PodDisruptionBudget", "weft-controller"));
            }
        }
        Setting::AgentCpuRequest(cpu) => {
            container(objects, AGENT.0, AGENT.1)?["resources"]["requests"]["cpu"] =
                cpu.as_str().into();
        }
        Setting::AgentMemoryRequest(memory) => {
            container(objects, AGENT.0, AGENT.1)?["resources"]["requests"]["memory"] =
                memory.as_str().into();
        }
        Setting::AgentImage(image) => {
            // The agent and its socket holder run the same binary.
            for container in containers(objects, AGENT.0, AGENT.1)? {
                container["image"] = image.as_str().into();
            }
        }
        Setting::ControllerImage(image) => {
            container(objects, CONTROLLER.0, CONTROLLER.1)?["image"] = image.as_str().into();
        }
    }
    Ok(())
}

/// Sets environment variable `variable` of workload `(kind, name)`'s container.
fn env(
    objects: &mut [Value],
    (kind, name): (&str, &str),
    variable: &str,
    value: &str,
) -> anyhow::Result<()> {
    set_env(container(objects, kind, name)?, variable, value)
}

fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    serde_yaml::Deserializer::from_str(text)
        .map(Value::deserialize)
        .filter(|document| !matches!(document, Ok(Value::Null)))
        .collect::<Result<_, _>>()
        .map_err(|err| anyhow::anyhow!("the compiled-in manifest does not read: {err}"))
}

fn render(objects: &[Value]) -> anyhow::Result<String> {
    let documents: Vec<String> = objects
        .iter()
        .map(serde_yaml::to_string)
        .collect::<Result<_, _>>()?;
    Ok(documents.join("---\n"))
}

fn is(object: &Value, kind: &str, name: &str) -> bool {
    object["kind"] == kind && object["metadata"]["name"] == name
}

fn object<'o>(objects: &'o mut [Value], kind: &str, name: &str) -> anyhow::Result<&'o mut Value> {
    objects
        .iter_mut()
        .find(|object| is(object, kind, name))
        .ok_or_else(|| anyhow::anyhow!("the manifest has no {kind} {name}"))
}

/// A workload's main container: the one named after it (`agent` in `weft-agent`).
fn container<'o>(
    objects: &'o mut [Value],
    kind: &str,
    name: &str,
) -> anyhow::Result<&'o mut Value> {
    let main = name.strip_prefix("weft-").unwrap_or(name);
    containers(objects, kind, name)?
        .iter_mut()
        .find(|container| container["name"] == main)
        .ok_or_else(|| anyhow::anyhow!("{kind} {name} has no container {main}"))
}

/// Every container of a workload's pod template.
fn containers<'o>(
    objects: &'o mut [Value],
    kind: &str,
    name: &str,
) -> anyhow::Result<&'o mut Vec<Value>> {
    object(objects, kind, name)?["spec"]["template"]["spec"]["containers"]
        .as_sequence_mut()
        .ok_or_else(|| anyhow::anyhow!("{kind} {name} has no containers"))
}

/// `value`'s mapping, made one if it is not.
fn mapping(value: &mut Value) -> &mut Mapping {
    if !value.is_mapping() {
        *value = Value::Mapping(Mapping::new());
    }
    value.as_mapping_mut().expect("made a mapping above")
}

fn has_env(container: &Value, variable: &str) -> bool {
    container["env"]
        .as_sequence()
        .is_some_and(|env| env.iter().any(|entry| entry["name"] == variable))
}

/// Sets environment variable `variable` of `container` to `value`, in its place, or
/// last when it is new.
fn set_env(container: &mut Value, variable: &str, value: &str) -> anyhow::Result<()> {
    let env = container["env"]
        .as_sequence_mut()
        .ok_or_else(|| anyhow::anyhow!("the container has no env list"))?;
    let mut entry = Mapping::new();
    entry.insert("name".into(), variable.into());
    entry.insert("value".into(), value.into());
    match env.iter_mut().find(|entry| entry["name"] == variable) {
        Some(existing) => *existing = Value::Mapping(entry),
        None => env.push(Value::Mapping(entry)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects(settings: &[&str]) -> Vec<Value> {
        let settings: Vec<Setting> = settings.iter().map(|text| text.parse().unwrap()).collect();
        documents(&install(&settings).unwrap()).unwrap()
    }

    fn env(objects: &[Value], kind: &str, name: &str, variable: &str) -> Option<String> {
        let object = objects
            .iter()
            .find(|object| is(object, kind, name))
            .unwrap();
        let main = name.strip_prefix("weft-").unwrap();
        object["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|container| container["name"] == main)
            .unwrap()["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|entry| entry["name"] == variable)
            .and_then(|entry| entry["value"].as_str().map(str::to_owned))
    }

    #[test]
    fn without_settings_it_is_the_install_manifest() {
        assert_eq!(objects(&[]), documents(INSTALL).unwrap());
    }

    #[test]
    fn each_setting_changes_what_it_names() {
        let set = objects(&[
            "trustDomain=corp.example",
            "logLevel=debug",
            "otlpEndpoint=http://c:4317",
        ]);
        assert_eq!(
            env(&set, "Deployment", "weft-controller", "WEFT_TRUST_DOMAIN").as_deref(),
            Some("corp.example")
        );
        assert_eq!(
            env(&set, "DaemonSet", "weft-agent", "WEFT_CONTROLLER_IDENTITY").as_deref(),
            Some("spiffe://corp.example/ns/weft-system/sa/weft-controller")
        );
        assert_eq!(
            env(&set, "DaemonSet", "weft-agent", "WEFT_LOG").as_deref(),
            Some("debug")
        );
        assert_eq!(
            env(&set, "DaemonSet", "weft-agent", "WEFT_TRACE_SAMPLING").as_deref(),
            Some("0.01")
        );
        let sampled = objects(&["traceSampling=0.5", "otlpEndpoint=http://c:4317"]);
        assert_eq!(
            env(&sampled, "DaemonSet", "weft-agent", "WEFT_TRACE_SAMPLING").as_deref(),
            Some("0.5")
        );

        let single = objects(&["controllerReplicas=1"]);
        assert!(
            !single
                .iter()
                .any(|object| object["kind"] == "PodDisruptionBudget")
        );
        let three = objects(&["controllerReplicas=3"]);
        assert!(
            three
                .iter()
                .any(|object| object["kind"] == "PodDisruptionBudget")
        );
    }

    #[test]
    fn bad_settings_are_named() {
        for (text, expected) in [
            ("trustDomain", "is not key=value"),
            ("colour=blue", "colour: not a setting"),
            ("controllerReplicas=0", "1 or more"),
            ("metrics=podmonitor", "only `annotations`"),
        ] {
            let err = text.parse::<Setting>().unwrap_err();
            assert!(err.contains(expected), "{text}: {err}");
        }
        let err = uninstall(&[Setting::CertTtl("1h".into())]).unwrap_err();
        assert!(err.to_string().contains("only agentImage"), "{err}");
    }

    #[test]
    fn uninstall_takes_the_agent_image() {
        let text =
            uninstall(&[Setting::AgentImage("registry.example/weft-agent:1".into())]).unwrap();
        assert!(
            text.contains("image: registry.example/weft-agent:1"),
            "{text}"
        );
    }
}
