//! The weft node agent.
//!
//! One agent runs per node. It loads weft's kernel programs and keeps their maps in
//! step with the mesh ([`datapath`]), enrolls the pods the CNI plugin reports ([`cni`],
//! [`node`]) and reads the mesh configuration ([`mesh`]). The proxy, identity and
//! telemetry parts grow beside them (see ARCHITECTURE.md).

pub mod admin;
pub mod cni;
pub mod datapath;
pub mod identity;
pub mod logging;
pub mod mesh;
pub mod node;
pub mod proxy;
pub mod reload;
pub mod tls;
