//! What the container runtime passes in environment variables, checked before use.
//!
//! `CNI_PATH` is not read: weft-cni runs no other plugin.

use std::{
    env, fs, io,
    path::{Path, PathBuf},
};

use crate::error::CniError;

/// The CNI environment variables weft-cni reads; an empty value counts as unset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`: ADD, DEL, CHECK or VERSION.
    pub command: Option<String>,
    /// `CNI_CONTAINERID`: the pod sandbox's id.
    pub container_id: Option<String>,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns: Option<String>,
    /// `CNI_IFNAME`: the pod's interface inside its namespace.
    pub ifname: Option<String>,
    /// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`, from kubelet.
    pub args: Option<String>,
}

/// What the runtime asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    Version,
    Network(Action),
}

/// The commands that act on a pod's network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    Add,
    Del,
    Check,
}

impl Action {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
        }
    }
}

impl Env {
    /// Reads the variables of this process.
    pub fn from_process() -> Self {
        let var = |name| env::var_os(name).map(|value| value.to_string_lossy().into_owned());
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    pub(crate) fn command(&self) -> Result<Command, CniError> {
        match set(&self.command).ok_or(CniError::NoCommand)? {
            "VERSION" => Ok(Command::Version),
            "ADD" => Ok(Command::Network(Action::Add)),
            "DEL" => Ok(Command::Network(Action::Del)),
            "CHECK" => Ok(Command::Network(Action::Check)),
            other => Err(CniError::UnknownCommand(other.to_owned())),
        }
    }

    /// `CNI_CONTAINERID`, in the spec's syntax: it keys every later request to the agent.
    pub(crate) fn container_id(&self, action: Action) -> Result<&str, CniError> {
        let id = required(&self.container_id, "CNI_CONTAINERID", action)?;
        let mut chars = id.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if valid {
            Ok(id)
        } else {
            Err(CniError::InvalidContainerId(id.to_owned()))
        }
    }

    /// `CNI_NETNS`, which must name something that exists.
    pub(crate) fn netns(&self, action: Action) -> Result<PathBuf, CniError> {
        let path = Path::new(required(&self.netns, "CNI_NETNS", action)?);
        match fs::metadata(path) {
            Ok(_) => Ok(path.to_owned()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CniError::NetnsMissing {
                path: path.to_owned(),
            }),
            Err(source) => Err(CniError::NetnsUnreadable {
                path: path.to_owned(),
                source,
            }),
        }
    }

    pub(crate) fn ifname(&self, action: Action) -> Result<&str, CniError> {
        required(&self.ifname, "CNI_IFNAME", action)
    }

    /// The pod's `(name, namespace)` from `CNI_ARGS`. Other keys (`IgnoreUnknown`,
    /// `K8S_POD_UID`, ...) are ignored, as the spec asks.
    pub(crate) fn pod(&self) -> Result<(String, String), CniError> {
        let mut name = None;
        let mut namespace = None;
        for pair in set(&self.args).unwrap_or_default().split(';') {
            if pair.is_empty() {
                continue;
            }
            let (key, value) = pair
                .split_once('=')
                .ok_or_else(|| CniError::MalformedArgs {
                    pair: pair.to_owned(),
                })?;
            match key {
                "K8S_POD_NAME" => name = Some(value),
                "K8S_POD_NAMESPACE" => namespace = Some(value),
                _ => {}
            }
        }
        let present = |value: Option<&str>, key| match value {
            Some(value) if !value.is_empty() => Ok(value.to_owned()),
            _ => Err(CniError::MissingArg { key }),
        };
        Ok((
            present(name, "K8S_POD_NAME")?,
            present(namespace, "K8S_POD_NAMESPACE")?,
        ))
    }
}

fn set(value: &Option<String>) -> Option<&str> {
    value.as_deref().filter(|value| !value.is_empty())
}

fn required<'a>(
    value: &'a Option<String>,
    name: &'static str,
    action: Action,
) -> Result<&'a str, CniError> {
    set(value).ok_or(CniError::MissingEnv {
        name,
        command: action.name(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_args(args: &str) -> Env {
        Env {
            args: Some(args.to_owned()),
            ..Env::default()
        }
    }

    #[test]
    fn pod_name_and_namespace_come_from_cni_args() {
        let env = with_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_INFRA_CONTAINER_ID=abc;",
        );
        assert_eq!(env.pod().unwrap(), ("cart-0".into(), "shop".into()));
    }

    #[test]
    fn cni_args_without_a_key_or_with_a_bare_word_are_rejected() {
        for (args, expected) in [
            ("K8S_POD_NAMESPACE=shop", "K8S_POD_NAME"),
            ("K8S_POD_NAME=cart-0", "K8S_POD_NAMESPACE"),
            ("K8S_POD_NAME=;K8S_POD_NAMESPACE=shop", "K8S_POD_NAME"),
            ("", "K8S_POD_NAME"),
        ] {
            match with_args(args).pod() {
                Err(CniError::MissingArg { key }) => assert_eq!(key, expected, "{args}"),
                other => panic!("{args}: {other:?}"),
            }
        }
        assert!(matches!(
            with_args("K8S_POD_NAME=a;oops;K8S_POD_NAMESPACE=b").pod(),
            Err(CniError::MalformedArgs { pair }) if pair == "oops"
        ));
    }

    #[test]
    fn container_ids_follow_the_spec() {
        for good in ["a", "0abc", "a_b.c-d", "f00d"] {
            let env = Env {
                container_id: Some(good.into()),
                ..Env::default()
            };
            assert_eq!(env.container_id(Action::Add).unwrap(), good);
        }
        for bad in ["-a", "_a", "a/b", "a b", "../x"] {
            let env = Env {
                container_id: Some(bad.into()),
                ..Env::default()
            };
            assert!(
                matches!(
                    env.container_id(Action::Add),
                    Err(CniError::InvalidContainerId(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            Env::default().container_id(Action::Del),
            Err(CniError::MissingEnv {
                name: "CNI_CONTAINERID",
                command: "DEL"
            })
        ));
    }

    #[test]
    fn commands() {
        let env = |command: &str| Env {
            command: Some(command.into()),
            ..Env::default()
        };
        assert_eq!(env("VERSION").command().unwrap(), Command::Version);
        assert_eq!(
            env("CHECK").command().unwrap(),
            Command::Network(Action::Check)
        );
        assert!(matches!(env("add").command(), Err(CniError::UnknownCommand(c)) if c == "add"));
        assert!(matches!(env("").command(), Err(CniError::NoCommand)));
    }
}
