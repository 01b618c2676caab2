//! What weft's controller, agent and CLI share.
//!
//! Today that is the agent <-> controller configuration protocol ([`config::v1`]),
//! generated from `proto/` by tonic, and the CNI plugin <-> agent enrollment protocol
//! ([`enroll`]). The CRD types join this crate with the control plane.

pub mod enroll;

/// The configuration stream between controller and agents.
pub mod config {
    /// Version 1 of the configuration stream.
    pub mod v1 {
        #![allow(missing_debug_implementations, clippy::all)]
        tonic::include_proto!("weft.config.v1");
    }
}
