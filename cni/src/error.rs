//! Why an invocation failed, as the CNI error the runtime logs and acts on.
//!
//! Each variant maps to one CNI error code ([`CniError::code`]): the well-known codes of
//! the spec where one fits, 100 for the agent refusing a pod. The message says what to
//! check; the lower-level cause, when there is one, goes to the error's `details`.

use std::{error::Error as _, io, path::PathBuf};

use serde_json::{Value, json};

use crate::{agent::AgentError, config::SUPPORTED_VERSIONS};

/// CNI 1.0 well-known error codes, and weft-cni's own.
mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin-specific (100 and up): the agent looked at the pod and said no.
    pub const AGENT_REFUSED: u32 = 100;
}

/// A failed CNI invocation.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error(
        "cniVersion {version:?} is not supported; weft-cni speaks {}: set one of them in the network configuration list",
        SUPPORTED_VERSIONS.join(", ")
    )]
    IncompatibleVersion { version: String },
    #[error(
        "CHECK needs cniVersion 0.4.0 or later, the network configuration says {version}; the runtime should not send CHECK for it"
    )]
    CheckUnsupported { version: String },
    #[error(
        "the network configuration has no cniVersion; set it at the top of the network configuration list"
    )]
    NoVersion,
    #[error("cannot read the network configuration from stdin")]
    Stdin(#[source] io::Error),
    #[error("cannot decode the network configuration on stdin as JSON")]
    Decode(#[source] serde_json::Error),
    #[error("CNI_COMMAND is not set; weft-cni is a CNI plugin, run by the container runtime")]
    NoCommand,
    #[error("CNI_COMMAND {0:?} is not one weft-cni knows: ADD, DEL, CHECK or VERSION")]
    UnknownCommand(String),
    #[error("{name} is not set or empty; the container runtime must pass it with {command}")]
    MissingEnv {
        name: &'static str,
        command: &'static str,
    },
    #[error(
        "CNI_CONTAINERID {0:?} is not a container id (a letter or digit, then letters, digits, '_', '.' or '-')"
    )]
    InvalidContainerId(String),
    #[error("CNI_ARGS has {pair:?}, which is not KEY=VALUE; pairs are separated by ';'")]
    MalformedArgs { pair: String },
    #[error(
        "CNI_ARGS has no {key}; weft-cni needs the pod's name and namespace, which kubelet passes as K8S_POD_NAME and K8S_POD_NAMESPACE"
    )]
    MissingArg { key: &'static str },
    // Not code 3 ("container unknown"): that code tells the runtime no cleanup is needed,
    // but the plugins before weft-cni in the chain have already set the pod up and their
    // DEL must still run. A path that names nothing is a bad CNI_NETNS value: code 4.
    #[error(
        "CNI_NETNS {} does not exist; the pod's network namespace is gone or the runtime passed a wrong path",
        path.display()
    )]
    NetnsMissing { path: PathBuf },
    #[error(
        "cannot look at CNI_NETNS {}; weft-cni runs as the runtime's user, which must see the network namespace",
        path.display()
    )]
    NetnsUnreadable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the network configuration has no prevResult: weft-cni is a chained plugin, list it after the primary plugin in the network configuration list"
    )]
    NoPrevResult,
    #[error(
        "prevResult is not a CNI result weft-cni can read; check the plugins listed before weft-cni"
    )]
    BadPrevResult(#[source] serde_json::Error),
    #[error(
        "prevResult lists no host-side interface (one without a sandbox): weft needs the pod's host-side interface, so list weft-cni after a plugin that reports it (bridge, ptp, Calico, Cilium, ...)"
    )]
    NoHostInterface,
    #[error("timeoutMs must be at least 1 (milliseconds) in the network configuration")]
    ZeroTimeout,
    #[error(
        "the weft agent is not running on this node or not answering at {}; {consequence}. Check the weft agent pod on this node and agentSocket in the network configuration",
        socket.display()
    )]
    AgentUnavailable {
        socket: PathBuf,
        consequence: &'static str,
        #[source]
        source: AgentError,
    },
    #[error(
        "the weft agent at {} answered something weft-cni cannot read; are the agent and weft-cni from the same weft release?",
        socket.display()
    )]
    AgentGarbled {
        socket: PathBuf,
        #[source]
        source: AgentError,
    },
    #[error("the weft agent cannot take the pod yet: {0}; the runtime retries")]
    AgentBusy(String),
    #[error("the weft agent refused the pod: {0}")]
    AgentRefused(String),
}

impl CniError {
    /// The CNI error code the runtime sees.
    pub fn code(&self) -> u32 {
        match self {
            Self::IncompatibleVersion { .. } | Self::CheckUnsupported { .. } => {
                code::INCOMPATIBLE_VERSION
            }
            Self::NoCommand
            | Self::UnknownCommand(_)
            | Self::MissingEnv { .. }
            | Self::InvalidContainerId(_)
            | Self::MalformedArgs { .. }
            | Self::MissingArg { .. }
            | Self::NetnsMissing { .. } => code::INVALID_ENV,
            Self::Stdin(_) | Self::NetnsUnreadable { .. } => code::IO_FAILURE,
            Self::Decode(_) | Self::AgentGarbled { .. } => code::DECODE_FAILURE,
            Self::NoVersion
            | Self::NoPrevResult
            | Self::BadPrevResult(_)
            | Self::NoHostInterface
            | Self::ZeroTimeout => code::INVALID_CONFIG,
            Self::AgentUnavailable { .. } | Self::AgentBusy(_) => code::TRY_AGAIN_LATER,
            Self::AgentRefused(_) => code::AGENT_REFUSED,
        }
    }

    /// The chain of lower-level causes ("cannot connect: No such file or directory"), if
    /// the error has any.
    pub fn details(&self) -> Option<String> {
        let mut cause = self.source()?;
        let mut details = cause.to_string();
        while let Some(next) = cause.source() {
            details.push_str(": ");
            details.push_str(&next.to_string());
            cause = next;
        }
        Some(details)
    }

    /// The error as the CNI error object printed on stdout:
    /// `{"cniVersion", "code", "msg", "details"}`, `details` only when there is one.
    pub fn to_json(&self, cni_version: &str) -> Value {
        let mut error = json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.to_string(),
        });
        if let (Some(details), Value::Object(fields)) = (self.details(), &mut error) {
            fields.insert("details".to_owned(), details.into());
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_json_has_the_spec_fields_and_details_only_with_a_cause() {
        let plain = CniError::NoPrevResult.to_json("0.4.0");
        assert_eq!(plain["cniVersion"], "0.4.0");
        assert_eq!(plain["code"], 7);
        assert!(plain["msg"].as_str().unwrap().contains("chained plugin"));
        assert!(plain.get("details").is_none());

        let caused = CniError::AgentUnavailable {
            socket: "/run/weft/cni.sock".into(),
            consequence: "the pod is not started",
            source: AgentError::Connect(io::Error::from(io::ErrorKind::ConnectionRefused)),
        }
        .to_json("1.0.0");
        assert_eq!(caused["code"], 11);
        assert_eq!(
            caused["details"],
            format!(
                "cannot connect: {}",
                io::Error::from(io::ErrorKind::ConnectionRefused)
            )
        );
    }
}
