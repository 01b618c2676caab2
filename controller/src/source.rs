//! Where the controller reads the cluster from: the Kubernetes API ([`kubernetes`]) or
//! a directory of the same YAML objects ([`files`]). A source publishes the whole set
//! of objects every time it changes; the compiler takes it from there.

pub mod files;
pub mod kubernetes;

use std::sync::Arc;

use crate::objects::Objects;

/// Where a source publishes what it knows.
pub type Publisher = tokio::sync::watch::Sender<Arc<Objects>>;
