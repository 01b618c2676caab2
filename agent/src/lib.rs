//! The weft node agent.
//!
//! One agent runs per node. It loads weft's kernel programs and attaches them where the
//! node's pods live ([`loader`]); the proxy, identity, configuration and telemetry parts
//! grow beside it (see ARCHITECTURE.md).

pub mod loader;
