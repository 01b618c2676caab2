//! `weftctl`, the operator's command line: whether the mesh is healthy (`check`), what
//! runs where (`status`), which certificates each node holds (`certs`), which
//! configuration it runs (`config`), what the mesh does with a given request
//! (`explain`) and what its agents see happen (`observe`), and what of a set of manifests weft would not apply (`analyze`), as a
//! readable table or as JSON or YAML for scripts, exiting non-zero when what it checks
//! is wrong; and the install manifests with an operator's options (`install`).
//!
//! Every command reads a [`mesh::Snapshot`] of the controller's and the agents' own
//! endpoints through a [`mesh::Mesh`] (a Kubernetes cluster through its API server,
//! [`kubernetes`], or a local cluster, [`local`]), then
//! decides in pure functions over that snapshot, so the decisions are table-tested.

mod analyze;
mod certs;
mod check;
mod cli;
mod config;
mod explain;
mod install;
mod kubernetes;
mod local;
mod mesh;
mod observe;
mod output;
mod status;

pub use cli::main;
