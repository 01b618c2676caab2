//! What weft's controller, agent, CNI plugin and CLI share.
//!
//! - [`config::v1`]: the agent <-> controller configuration stream and the resources it
//!   carries, generated from `proto/` by tonic (feature `config`);
//! - [`ca::v1`]: the mesh certificate authority's signing service (feature `config`);
//! - [`admin`]: documents of the agent's admin endpoint that tools read back;
//! - [`authz`]: authorization policies as the agents enforce them, and their evaluator;
//! - [`crd`]: weft's custom resources, whose CRDs are generated from these types
//!   (feature `crd`);
//! - [`enroll`]: the CNI plugin <-> agent enrollment protocol;
//! - `endpoints`: the small HTTP servers of agent and controller (feature `endpoints`);
//! - [`digest`]: the content digest both ends use to name configuration versions;
//! - [`duration`]: durations as the Gateway API writes them;
//! - [`exposition`]: reading Prometheus text back (the samples of one metric);
//! - [`manifests`]: which files a set of manifest paths holds;
//! - [`observe`]: the agent's stream of what it sees, and which events a watcher's
//!   filter lets through (feature `config`);
//! - [`protocol`]: which protocol a service port speaks, as Istio decides it;
//! - [`retry`]: the conditions a TrafficPolicy retries on;
//! - [`routes`]: HTTPRoutes and GRPCRoutes as the agents apply them, and their matcher;
//! - [`ZONE_LABEL`]: the Node label Kubernetes names zones by.
#![forbid(unsafe_code)]

pub mod admin;
pub mod authz;
#[cfg(feature = "crd")]
pub mod crd;
pub mod digest;
pub mod duration;
#[cfg(feature = "endpoints")]
pub mod endpoints;
pub mod enroll;
pub mod exposition;
pub mod manifests;
#[cfg(feature = "config")]
pub mod observe;
pub mod protocol;
pub mod retry;
pub mod routes;

/// Kubernetes' well-known Node label naming the node's zone: the controller reads it,
/// the local cluster writes it.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The configuration stream between controller and agents.
#[cfg(feature = "config")]
pub mod config {
    /// Version 1 of the configuration stream.
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("weft.config.v1");

        /// The largest update an agent takes (tonic's default of 4 MiB is less than
        /// the snapshot of a cluster with 100,000 endpoints).
        pub const MAX_UPDATE_BYTES: usize = 512 << 20;

        /// The weight of an endpoint `Service.endpoint_weights` does not list.
        pub const DEFAULT_ENDPOINT_WEIGHT: u32 = 1;
        /// The largest endpoint weight.
        pub const MAX_ENDPOINT_WEIGHT: u32 = 1000;

        /// A message the stream carries as a resource, and the kind that names it.
        pub trait Kind: prost::Message + Default {
            /// The message's full protobuf name, e.g. `weft.config.v1.Workload`.
            const KIND: &'static str;
        }

        macro_rules! kinds {
            ($($message:ident),* $(,)?) => {
                $(impl Kind for $message {
                    const KIND: &'static str = concat!("weft.config.v1.", stringify!($message));
                })*
                /// Every resource kind of the stream.
                pub const KINDS: &[&str] = &[$(<$message as Kind>::KIND),*];
            };
        }

        kinds!(
            MeshSettings,
            Node,
            Namespace,
            Workload,
            Service,
            AuthorizationPolicy,
            TrafficPolicy,
            ServiceRoutes,
            TrustBundle,
        );

        /// Enum fields (an `i32` each) as JSON by their protobuf name, for the messages
        /// `build.rs` derives `Serialize` for; a number no variant has stays a number.
        mod names {
            macro_rules! names {
                ($($function:ident: $enum:ty),* $(,)?) => {$(
                    pub(in crate::config::v1) fn $function<S: serde::Serializer>(
                        value: &i32,
                        serializer: S,
                    ) -> Result<S::Ok, S::Error> {
                        match <$enum>::try_from(*value) {
                            Ok(known) => serializer.serialize_str(known.as_str_name()),
                            Err(_) => serializer.serialize_i32(*value),
                        }
                    }
                )*};
            }

            names!(
                action: super::authorization_policy::Action,
                load_balancing: super::LoadBalancing,
                path_kind: super::route_match::PathKind,
            );
        }
    }
}

/// The mesh certificate authority's signing service.
#[cfg(feature = "config")]
pub mod ca {
    /// Version 1 of the signing service.
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("weft.ca.v1");
    }

    use rcgen::{
        CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType,
        string::Ia5String,
    };

    /// A new P-256 key and the PEM PKCS#10 request for `spiffe_id` signed with it: the
    /// ID as the only SAN and nothing else, which is all the mesh CA reads.
    pub fn signing_request(spiffe_id: &str) -> Result<(KeyPair, String), rcgen::Error> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(spiffe_id)?)];
        let csr = params.serialize_request(&key)?.pem()?;
        Ok((key, csr))
    }
}
