//! weft's cluster controller.
//!
//! It reads the cluster from a source ([`source`]: the Kubernetes API, or a directory
//! of the same YAML objects) into [`objects::Objects`], compiles them into each node's
//! view ([`compile`], [`view`]) with a verdict for every policy ([`status`]), and
//! streams every agent its view over `weft.config.v1.ConfigDiscovery` ([`stream`]). It
//! is also the mesh's certificate authority ([`ca`]), and serves agents over TLS with a
//! certificate of its own ([`serving`]). Its status port explains authorization
//! decisions over the compiled policies ([`explain`]).
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod ca;
pub mod compile;
pub mod explain;
pub mod lease;
pub mod objects;
pub mod pipeline;
pub mod serving;
pub mod source;
pub mod status;
pub mod stream;
pub mod view;
