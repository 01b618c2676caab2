//! Support code for the controller's integration tests. (A `mod.rs`, unlike the
//! crate's modules, so that Cargo does not build `tests/support.rs` as a test of its
//! own.)

pub mod fake_api;
pub mod rbac;
