//! weft's cluster controller.
//!
//! It will watch the cluster (Kubernetes API or a directory of the same YAML objects),
//! compile what it sees into a per-node view, stream each agent its view over
//! `weft.config.v1.ConfigDiscovery`, and run the mesh certificate authority. Nothing of
//! that exists yet: see ARCHITECTURE.md for the plan and the open issues for the order.
