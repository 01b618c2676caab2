//! Who may subscribe to a node's configuration: an agent proves which node it runs on
//! with a bearer token. With the file source, each node has a token file of its own
//! (`<dir>/<node>.token`); a token opens that node's stream and no other. In a
//! Kubernetes cluster the token is the agent pod's projected service account token,
//! and the API server says which node that pod runs on ([`TokenReviewer`]).

use std::path::PathBuf;

use crate::source::kubernetes::TokenReviewer;

/// Checks node credentials.
#[derive(Debug)]
pub enum NodeAuthenticator {
    /// `<dir>/<node>.token` holds node `<node>`'s token.
    TokenFiles { dir: PathBuf },
    /// The API server reviews the token; it must be bound to a pod on the node.
    Kubernetes(TokenReviewer),
    /// Anyone may subscribe as any node (tests and single-user machines only).
    Insecure,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: send `authorization: Bearer <token>` with the subscription")]
    Missing,
    #[error("the credential is not node {node}'s")]
    WrongNode { node: String },
    #[error("node {node} has no token file {path}: create one, or check the node name")]
    UnknownNode { node: String, path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot review the token with the Kubernetes API: {source}; check that the \
         controller may create tokenreviews (authentication.k8s.io), as the \
         system:auth-delegator ClusterRole allows"
    )]
    TokenReview {
        #[source]
        source: kube::Error,
    },
    #[error(
        "the Kubernetes API did not accept the token ({reason}): the agent must send its \
         pod's projected service account token with audience {audience}"
    )]
    Unauthenticated { reason: String, audience: String },
    #[error(
        "the token authenticates {user}, not a service account: the agent must send its \
         pod's projected service account token"
    )]
    NotServiceAccount { user: String },
    #[error(
        "the token belongs to {user}, not to the agents' service account {agent}: only \
         weft agents may subscribe or ask for certificates; check --agent-service-account"
    )]
    NotAgent { user: String, agent: String },
    #[error(
        "the token of {user} names no node: it must be a projected, pod-bound service \
         account token (a serviceAccountToken volume; Kubernetes 1.30 or later puts the \
         pod's node in it)"
    )]
    NotPodBound { user: String },
    #[error(
        "the token belongs to a pod on node {token_node}, not on node {node}: the agent \
         must subscribe as the node it runs on (spec.nodeName)"
    )]
    NodeMismatch { node: String, token_node: String },
}

impl NodeAuthenticator {
    /// Succeeds when `token` proves the caller runs on `node`.
    pub async fn authenticate(&self, node: &str, token: Option<&str>) -> Result<(), AuthError> {
        match self {
            NodeAuthenticator::Insecure => Ok(()),
            NodeAuthenticator::Kubernetes(reviewer) => {
                let token = token.ok_or(AuthError::Missing)?;
                let token_node = reviewer.node_of(token).await?;
                if token_node == node {
                    Ok(())
                } else {
                    Err(AuthError::NodeMismatch {
                        node: node.to_owned(),
                        token_node,
                    })
                }
            }
            NodeAuthenticator::TokenFiles { dir } => {
                let token = token.ok_or(AuthError::Missing)?;
                let valid_name = !node.is_empty()
                    && node
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
                let path = dir.join(format!("{node}.token"));
                if !valid_name {
                    return Err(AuthError::UnknownNode {
                        node: node.to_owned(),
                        path,
                    });
                }
                let expected = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                        return Err(AuthError::UnknownNode {
                            node: node.to_owned(),
                            path,
                        });
                    }
                    Err(source) => return Err(AuthError::Read { path, source }),
                };
                if constant_time_eq(expected.trim().as_bytes(), token.as_bytes()) {
                    Ok(())
                } else {
                    Err(AuthError::WrongNode {
                        node: node.to_owned(),
                    })
                }
            }
        }
    }
}

/// The token of an `authorization: Bearer <token>` header, if there is one.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_opens_its_own_node_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node0.token"), "secret-0\n").unwrap();
        std::fs::write(dir.path().join("node1.token"), "secret-1\n").unwrap();
        let auth = NodeAuthenticator::TokenFiles {
            dir: dir.path().to_owned(),
        };
        auth.authenticate("node0", Some("secret-0")).await.unwrap();
        assert!(matches!(
            auth.authenticate("node1", Some("secret-0")).await,
            Err(AuthError::WrongNode { .. })
        ));
        assert!(matches!(
            auth.authenticate("node0", None).await,
            Err(AuthError::Missing)
        ));
        assert!(matches!(
            auth.authenticate("node9", Some("secret-0")).await,
            Err(AuthError::UnknownNode { .. })
        ));
        assert!(matches!(
            auth.authenticate("../node0", Some("secret-0")).await,
            Err(AuthError::UnknownNode { .. })
        ));
    }
}
