//! weft's custom resources (`weft.dev/v1alpha1`): how users configure the mesh the
//! Kubernetes way. The CRDs in `deploy/crds/` are generated from these types
//! (`cargo xtask codegen`); the API server enforces their schema, and the controller
//! checks the same rules and the semantic ones ([`Validate`]) and reports the outcome
//! in each object's `status.conditions`.
//!
//! - [`PeerAuthentication`]: how selected pods take plaintext (STRICT, PERMISSIVE,
//!   DISABLE), with per-port overrides.
//! - [`AuthorizationPolicy`]: who may reach selected pods (ALLOW/DENY/AUDIT by source
//!   identity, namespace, service account, IP block, port; HTTP host, method, path and
//!   headers), with a dry-run mode.
//! - [`TrafficPolicy`]: how clients treat a service (balancing, timeouts, retries with a
//!   budget, connection limits, outlier detection). All of it is enforced but
//!   `outlierDetection.interval`.
//!
//! - [`FaultInjection`]: delays and aborts for route rules that reference it (an
//!   `ExtensionRef` filter), to test resilience.
//!
//! What the agents do not enforce is reported, not silently accepted: such an object
//! gets `Accepted: False` with reason `NotEnforced`, naming the fields.
//!
//! Membership needs no resource: the namespace label [`MESH_LABEL`] `=`
//! [`MESH_ENABLED`] puts a namespace's pods in the mesh, and the pod annotation
//! [`MESH_LABEL`] `=` [`MESH_DISABLED`] keeps one pod out. The pod annotation
//! [`WEIGHT_ANNOTATION`] gives a pod's endpoints a weight other than 1. The node
//! annotation [`HBONE_ADDRESS_ANNOTATION`] says where a node takes HBONE tunnels.

mod validate;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::validate::{FieldError, Validate};

/// Istio's annotation that puts an AuthorizationPolicy in dry-run mode, as `spec.dryRun`
/// does.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";
pub use crate::duration::parse_duration;

/// The API group of weft's resources.
pub const GROUP: &str = "weft.dev";
/// The version of weft's resources.
pub const VERSION: &str = "v1alpha1";
/// Namespace label (`enabled`) and pod annotation (`disabled`) deciding membership.
pub const MESH_LABEL: &str = "weft.dev/mesh";
pub const MESH_ENABLED: &str = "enabled";
pub const MESH_DISABLED: &str = "disabled";
/// Pod annotation: the weight of the pod's endpoints, `0` (drained) to `1000`;
/// without it, 1.
pub const WEIGHT_ANNOTATION: &str = "weft.dev/weight";
/// Node annotation: where the node takes HBONE tunnels, `node` (its own address: a
/// weft agent; the default) or `pod` (each pod's address: Istio's ztunnel). Any other
/// value is read as `node`, and the Node gets an `Invalid` verdict.
pub const HBONE_ADDRESS_ANNOTATION: &str = "weft.dev/hbone-address";

/// The status every weft resource reports: conditions of type `Accepted`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// Selects pods of the policy's namespace by their labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Pods carrying every one of these labels.
    pub match_labels: BTreeMap<String, String>,
}

/// How a pod takes connections that do not come through the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerMode {
    /// Only mutual TLS from the mesh; plaintext is dropped in the kernel.
    Strict,
    /// Mutual TLS and plaintext.
    Permissive,
    /// No enforcement: the pod takes anything.
    Disable,
}

// --- PeerAuthentication ------------------------------------------------------------

/// How pods take plaintext. One without a selector sets the namespace's default (in
/// the root namespace, the mesh's); one with a selector overrides that for the pods
/// it selects, and may override single ports.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyStatus",
    shortname = "peerauth",
    category = "weft",
    doc = "How the selected pods of a namespace take plaintext: STRICT, PERMISSIVE or DISABLE.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The pods this applies to; none: every pod of the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode; none: inherit the namespace's (or the mesh's) mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<PeerMode>,
    /// Ports whose mode differs; only with a selector.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub port_modes: Vec<PortMode>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortMode {
    /// The pod's (container) port.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    pub mode: PeerMode,
}

// --- AuthorizationPolicy -----------------------------------------------------------

/// Who may reach the selected pods, decided by the destination's agent for every
/// connection and, on ports that speak HTTP, for every request. Istio's evaluation
/// order: a request any DENY rule matches is denied; else, if any ALLOW policy selects
/// the pod, a request no ALLOW rule matches is denied; else it is allowed. AUDIT
/// policies decide nothing: their matches are logged and counted. A `dryRun` policy
/// is evaluated, logged and counted as if enforced, and enforced never.
///
/// Rules with HTTP conditions (`hosts`, `methods`, `paths`, `request.headers`) on
/// traffic the mesh carries as TCP: a DENY rule's HTTP conditions are taken as met (it
/// denies the whole connection), an ALLOW rule never matches, as in Istio.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "authz",
    category = "weft",
    doc = "Who may reach the selected pods: ALLOW, DENY or AUDIT by source identity, namespace, service account, IP block, port, and for HTTP host, method, path and headers. DENY first; then, if any ALLOW policy selects a pod, only what an ALLOW rule matches. Enforced by the destination's agent on every connection and request.",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Dry-run","type":"boolean","jsonPath":".spec.dryRun"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The pods this applies to; none: every pod of the namespace (in the root
    /// namespace: of the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: Action,
    /// Evaluate, log and count the policy's decisions (`result` `dry_run_allowed` or
    /// `dry_run_denied`), but never enforce them. Istio sets this with the annotation
    /// `istio.io/dry-run: "true"`, which weft reads too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    /// A connection or request matching any rule matches the policy. No rules: an
    /// ALLOW policy allows nothing (it denies everything no other ALLOW policy allows),
    /// a DENY or AUDIT policy matches nothing; one empty rule (`rules: [{}]`) matches
    /// everything.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    /// Take what a rule matches; once any ALLOW policy selects a pod, it takes nothing
    /// else.
    #[default]
    Allow,
    /// Refuse what a rule matches, before any ALLOW policy is looked at.
    Deny,
    /// Log and count what a rule matches; allow and deny nothing.
    Audit,
}

/// Matches when some source matches (or none is listed), some operation matches (or
/// none is listed) and every condition holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<RuleCondition>,
}

/// Where a connection comes from. Every field given must match (a `not` field: must
/// not match); within a field, any entry. Principals, namespaces and service accounts
/// come from the caller's verified certificate (or, on the same node, from the kernel's
/// record of the calling pod): plaintext has none, so it matches no `principals`,
/// `namespaces` or `serviceAccounts` entry and every `not` entry of them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// SPIFFE IDs, with or without `spiffe://` (`cluster.local/ns/<namespace>/sa/<account>`
    /// as Istio writes them); `*` alone is any authenticated caller, and an entry may
    /// start or end with `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
    /// The caller's namespace; an entry may start or end with `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<String>,
    /// The caller's service account, `<namespace>/<account>`, or `<account>` of the
    /// policy's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<String>,
    /// The calling pod's address: an IP or a CIDR block (`10.244.0.0/16`). Across
    /// nodes it is the address the caller's agent reports, accepted only when that
    /// address belongs to a pod running as the caller's verified identity.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ip_blocks: Vec<String>,
}

/// What a connection or request asks for. Every field given must match (a `not` field:
/// must not match); within a field, any entry. Hosts, methods and paths are HTTP
/// conditions (see the policy's note on TCP traffic).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// The request's host (`:authority` or `Host`), case-insensitive, with or without
    /// its port; an entry may start or end with `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
    /// The pod's ports (the container port, not the Service's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_ports: Vec<u16>,
    /// HTTP methods (a gRPC call is a `POST`); `*` matches any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Request paths without the query, exact or with a leading or trailing `*`
    /// (`/api/*`, `*.png`); a gRPC method is `/<package>.<Service>/<Method>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
}

/// A condition on an attribute of the connection or request: its value matches one of
/// `values` (if given) and none of `notValues`. Keys: `request.headers[<name>]` (HTTP),
/// `source.ip`, `source.namespace`, `source.principal`, `destination.ip`,
/// `destination.port`. Values may start or end with `*` (IPs take CIDR blocks).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleCondition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

// --- TrafficPolicy -----------------------------------------------------------------

/// How clients in the mesh treat a service of this namespace. The agents enforce all of
/// it but `outlierDetection.interval`; a policy that sets it says so in its status
/// (`Accepted: False`, reason `NotEnforced`), and the rest of it still applies.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyStatus",
    shortname = "tp",
    category = "weft",
    doc = "How clients treat a service: balancing, timeouts, retries with a budget, connection limits, outlier detection. All of it is enforced but outlierDetection.interval; the status says so when it is set (NotEnforced).",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.service"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// The Service (of this namespace) the policy is for.
    #[schemars(length(min = 1, max = 63))]
    pub service: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<Timeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
}

/// How clients spread requests and connections over the endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<TrafficDistribution>,
}

/// How a client picks an endpoint; unset: the agents' default, `PEAK_EWMA`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Algorithm {
    /// Each endpoint in turn.
    RoundRobin,
    /// Any endpoint, at random.
    Random,
    /// The less loaded of two endpoints picked at random (fewest requests in flight).
    LeastRequest,
    /// The faster of two endpoints picked at random (peak exponentially weighted
    /// latency, times requests in flight), as Linkerd balances.
    PeakEwma,
}

/// `PreferClose`: clients prefer endpoints in their own zone (the nodes' label
/// `topology.kubernetes.io/zone`) while it has any, as the Service field
/// `spec.trafficDistribution: PreferClose` asks; either one turns it on. Unset: as the
/// Service says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
pub enum TrafficDistribution {
    /// Endpoints of the client's zone first.
    PreferClose,
}

/// Durations are Gateway API durations: `500ms`, `15s`, `1m30s`, `1h`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// Establishing a connection to an endpoint (across nodes: the tunnel and its
    /// CONNECT); past it the request fails with 504, a TCP connection is closed.
    /// Unset: the agent's `--connect-timeout` (10 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub connect: Option<String>,
    /// A connection with no traffic is closed after this: a client's, and a pooled
    /// HTTP/1.1 connection the client's agent keeps to the service (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub idle: Option<String>,
    /// An HTTP request, until its response's head arrives; past it the client gets 504
    /// (gRPC `DEADLINE_EXCEEDED`). A route's `timeouts.request` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub request: Option<String>,
    /// An HTTP request whose stream carries nothing, either way, for this long is
    /// ended: before its response's head with 504 (gRPC `DEADLINE_EXCEEDED`), after it
    /// a gRPC call with `DEADLINE_EXCEEDED` in its trailers and any other response by
    /// a reset. For long-lived streams (gRPC watches, server-sent events) that must not
    /// hang forever on a peer gone silent. Unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub stream_idle: Option<String>,
}

/// Which failed requests clients retry, and how often. Each retry goes to another
/// endpoint when the service has one, after a jittered backoff (25 ms doubling up to
/// 250 ms), within the request's own timeout. A request body is kept for a retry up
/// to 64 KiB; a request with a larger body is not retried once it was sent. Without
/// this field clients retry only a failed connection, once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Retries {
    /// Retries after the first try; 0 turns retries off, even of failed connections.
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Each try, when it takes longer, is abandoned (and retried on `reset`, `5xx` or
    /// `gateway-error`). A route's `timeouts.backendRequest` is one too: the nearer
    /// applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub per_try_timeout: Option<String>,
    /// `connect-failure`, `reset`, `5xx`, `gateway-error` (502, 503, 504),
    /// `retriable-4xx` (409), a status code, or a gRPC status of a trailers-only
    /// answer: `cancelled`, `deadline-exceeded`, `resource-exhausted`, `unavailable`.
    /// None: `connect-failure`, `reset`, `gateway-error` and `unavailable`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    /// Also retry, after they may have reached the server, requests whose method is
    /// not idempotent (POST, PATCH, CONNECT — and so every gRPC call). A failed
    /// connection is retried for any method: nothing was sent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
    /// Unset: 20 percent, 10 per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// Retries may add at most `percent` of the requests of the last 10 seconds, plus
/// `minPerSecond` (so that a quiet service still retries). Each node's agent keeps
/// the budget of its own clients: an outage never turns into a retry storm.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    #[schemars(range(min = 0, max = 100))]
    pub percent: u32,
    #[serde(default)]
    pub min_per_second: u32,
}

/// Circuit breaking: limits past which clients fail fast — `503`, `response_flags`
/// `UO` — instead of piling onto a struggling service. They hold per node: each node's
/// agent counts what all of its clients have open or in flight to the service (one
/// agent carries them all, and the node's total is what the service feels), so a
/// limit of 100 lets up to 100 through from each node. Unset: no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimits {
    /// Connections open to the service's endpoints: a TCP connection past it is closed
    /// at once. An HTTP/1.1 request holds a connection while in flight, so this bounds
    /// those requests too (more wait as pending).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_connections: Option<u32>,
    /// HTTP requests (any version) in flight to the service; more wait as pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests: Option<u32>,
    /// HTTP requests waiting for a slot under `maxRequests` or `maxConnections` (as
    /// long as their timeout lets them); one past it is answered at once. Unset: none
    /// wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_pending_requests: Option<u32>,
    /// Requests an upstream HTTP connection carries before it is closed and a new one
    /// opened (spreads long-lived clients over new endpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_requests_per_connection: Option<u32>,
}

/// Endpoints that fail `consecutiveFailures` times in a row (5xx answers, failed
/// connections, resets, timeouts) are ejected for `baseEjectionTime` times the number of
/// ejections in a row; back from one, their next failure ejects them again at once
/// until one success. Each node's agent judges its own clients' requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Failures of any kind in a row: 5xx answers, failed connections, resets,
    /// timeouts.
    #[schemars(range(min = 1))]
    pub consecutive_failures: u32,
    /// Gateway errors in a row — 502, 503 or 504 answers, failed connections, resets,
    /// timeouts — eject too (an application's 500 breaks the streak). Unset: only
    /// `consecutiveFailures` counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub consecutive_gateway_errors: Option<u32>,
    /// Failed connections in a row eject too (any answer breaks the streak); L4
    /// connections count. Unset: only `consecutiveFailures` counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub consecutive_connect_failures: Option<u32>,
    /// How often failures are counted up in Envoy; weft counts every request as it
    /// ends, so this is not enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub interval: Option<String>,
    /// The first ejection's length (default 30s; at most 5 minutes however often).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub base_ejection_time: Option<String>,
    /// The most of the service's endpoints out at once (default 10), always at least
    /// one; past it every endpoint takes traffic again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
}

// --- FaultInjection ----------------------------------------------------------------

/// Faults to test a service's clients against, injected by the client's agent into
/// the requests of the HTTPRoute or GRPCRoute rules that reference it as a filter:
/// `{ type: ExtensionRef, extensionRef: { group: weft.dev, kind: FaultInjection,
/// name: ... } }`. A delay holds a request before it goes on; an abort answers it at
/// once with an error.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Deserialize, Serialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "FaultInjection",
    namespaced,
    status = "PolicyStatus",
    shortname = "fault",
    category = "weft",
    doc = "Delays and aborts a share of the requests of the route rules that reference it (an ExtensionRef filter), to test how clients cope.",
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct FaultInjectionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// Hold `percent` of the requests for `fixedDelay` (response flag `DI`); the delay
/// counts against the request's timeouts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    #[schemars(regex(pattern = DURATION_PATTERN))]
    pub fixed_delay: String,
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<u32>,
}

/// Answer `percent` of the requests at once (response flag `FI`): with `httpStatus`,
/// or for gRPC requests with `grpcStatus` (a gRPC request gets the status gRPC maps
/// `httpStatus` to when only that is set; an HTTP one, 500 when only `grpcStatus`
/// is).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 200, max = 599))]
    pub http_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 16))]
    pub grpc_status: Option<u32>,
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: Option<u32>,
}

/// A Gateway API duration: up to four `<number><unit>` parts, units `h`, `m`, `s`, `ms`.
pub const DURATION_PATTERN: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";

/// The generated CRDs as the files `deploy/crds/` holds: (file name, YAML), and the
/// kustomization that lists them (so that `deploy/base` can include the directory).
pub fn manifests() -> Vec<(String, String)> {
    use kube::CustomResourceExt as _;
    const GENERATED: &str =
        "# Generated by `cargo xtask codegen` from weft-api's crd.rs: do not edit.";
    let mut files: Vec<(String, String)> = [
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        TrafficPolicy::crd(),
        FaultInjection::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let name = crd.metadata.name.clone().unwrap_or_default();
        let yaml = serde_yaml::to_string(&crd).expect("CRDs serialise");
        (format!("{name}.yaml"), format!("{GENERATED}\n{yaml}"))
    })
    .collect();
    let resources: String = files
        .iter()
        .map(|(file, _)| format!("  - {file}\n"))
        .collect();
    files.push((
        "kustomization.yaml".to_owned(),
        format!(
            "{GENERATED}\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n{resources}"
        ),
    ));
    files
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// CI fails when the checked-in CRDs differ from the types.
    #[test]
    fn deploy_crds_match_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds");
        let generated_files: Vec<String> = super::manifests()
            .into_iter()
            .map(|(file, _)| file)
            .collect();
        for entry in
            std::fs::read_dir(&dir).unwrap_or_else(|err| panic!("{}: {err}", dir.display()))
        {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                generated_files.contains(&name),
                "deploy/crds/{name} is no CRD of the types: remove it, or run `cargo xtask codegen`"
            );
        }
        for (file, generated) in super::manifests() {
            let path = dir.join(&file);
            let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                on_disk == generated,
                "{} is not what the types generate: run `cargo xtask codegen` and commit the result",
                path.display()
            );
        }
    }
}
