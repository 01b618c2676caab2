//! The weft node agent.
//!
//! One agent runs per node. It loads weft's kernel programs and keeps their maps in
//! step with the mesh ([`datapath`]), enrolls the pods the CNI plugin reports ([`cni`],
//! [`node`]), reads the mesh configuration ([`mesh`], from a file or streamed by the
//! controller: [`subscription`]) and carries the captured traffic
//! ([`proxy`]) in mutual TLS between nodes ([`tls`], [`identity`]) with certificates the
//! controller's CA issues ([`certificates`]), reporting on its
//! small HTTP endpoints ([`admin`]) and streaming what it sees to watchers
//! ([`observe`]). An upgrade hands its listening sockets to the next agent
//! ([`handover`]). See ARCHITECTURE.md.

pub mod admin;
pub mod backoff;
pub mod certificates;
pub mod cni;
pub mod controller;
pub mod datapath;
pub mod files;
pub mod handover;
pub mod identity;
pub mod logging;
pub mod memory;
pub mod mesh;
pub mod node;
pub mod observe;
pub mod process;
pub mod proxy;
pub mod reload;
pub mod subscription;
pub mod sync;
pub mod tls;
