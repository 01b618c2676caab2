//! The signing service (`weft.ca.v1.CertificateAuthority`): an agent, authenticated
//! as its node, sends a CSR for a workload identity; the CA signs it only when that
//! node runs a pod of the identity's service account. Every refusal is logged with
//! its reason and counted in `weft_controller_certificate_refusals_total`.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use weft_api::ca::v1::{
    SignRequest, SignResponse,
    certificate_authority_server::{CertificateAuthority, CertificateAuthorityServer},
};

use super::{pem, runtime::CaState};
use crate::{
    auth::{NodeAuthenticator, bearer_token},
    objects::Objects,
};

/// Signs workload certificates.
#[derive(Debug)]
pub struct CaService {
    pub state: watch::Receiver<Arc<CaState>>,
    pub objects: watch::Receiver<Arc<Objects>>,
    pub auth: Arc<NodeAuthenticator>,
    pub trust_domain: String,
    /// How long issued certificates are valid.
    pub ttl: Duration,
}

impl CaService {
    pub fn into_server(self) -> CertificateAuthorityServer<Self> {
        CertificateAuthorityServer::new(self)
    }
}

fn refuse(node: &str, reason: &'static str, message: String) -> Status {
    log::warn!("refused a certificate for node {node:?} ({reason}): {message}");
    metrics::counter!("weft_controller_certificate_refusals_total", "reason" => reason)
        .increment(1);
    match reason {
        "unauthenticated" | "foreign_identity" => Status::permission_denied(message),
        _ => Status::invalid_argument(message),
    }
}

#[tonic::async_trait]
impl CertificateAuthority for CaService {
    async fn sign(&self, request: Request<SignRequest>) -> Result<Response<SignResponse>, Status> {
        let token = bearer_token(request.metadata());
        let SignRequest { node, csr } = request.into_inner();
        if let Err(err) = self.auth.authenticate(&node, token.as_deref()).await {
            return Err(refuse(&node, "unauthenticated", err.to_string()));
        }
        let state = Arc::clone(&self.state.borrow());
        let objects = Arc::clone(&self.objects.borrow());
        let signed = state.authority.sign(
            &csr,
            SystemTime::now(),
            self.ttl,
            state.propagated,
            |spiffe_id| hosted(&objects, &node, &self.trust_domain, spiffe_id),
        );
        match signed {
            Err(err) => Err(refuse(&node, "invalid_request", err.to_string())),
            Ok(Err(why)) => Err(refuse(&node, "foreign_identity", why)),
            Ok(Ok(issued)) => {
                metrics::counter!("weft_controller_certificates_issued_total").increment(1);
                log::info!(
                    "issued certificate {} to node {node}, valid until {}",
                    issued.serial,
                    super::unix_seconds(issued.not_after)
                );
                Ok(Response::new(SignResponse {
                    chain: pem(&issued.chain),
                    root: pem(std::slice::from_ref(&issued.root)),
                }))
            }
        }
    }
}

/// Succeeds when `spiffe_id` is `spiffe://<trust_domain>/ns/<ns>/sa/<sa>` and a pod of
/// service account `<ns>/<sa>` that has not finished is scheduled on `node`.
pub fn hosted(
    objects: &Objects,
    node: &str,
    trust_domain: &str,
    spiffe_id: &str,
) -> Result<(), String> {
    let path = spiffe_id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.strip_prefix(trust_domain))
        .and_then(|rest| rest.strip_prefix('/'))
        .ok_or_else(|| format!("{spiffe_id} is not an identity of trust domain {trust_domain}"))?;
    let ["ns", namespace, "sa", account] = path.split('/').collect::<Vec<_>>()[..] else {
        return Err(format!(
            "{spiffe_id} is not a workload identity (spiffe://{trust_domain}/ns/<namespace>/sa/<service-account>)"
        ));
    };
    let runs_here = |pod: &Pod| {
        let spec = pod.spec.as_ref();
        let finished = pod
            .status
            .as_ref()
            .and_then(|status| status.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed");
        spec.and_then(|spec| spec.node_name.as_deref()) == Some(node)
            && spec
                .and_then(|spec| spec.service_account_name.as_deref())
                .unwrap_or("default")
                == account
            && !finished
    };
    let found = objects
        .pods
        .iter()
        .any(|(key, pod)| key.namespace == namespace && runs_here(pod));
    if found {
        Ok(())
    } else {
        Err(format!(
            "node {node} runs no pod of service account {namespace}/{account}, so it may not hold {spiffe_id}"
        ))
    }
}
