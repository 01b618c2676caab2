//! What the controller concluded about each policy and route, and the status condition
//! a user reads with `kubectl get` or the controller's `/status` endpoint.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use serde::{Deserialize, Serialize};

use crate::objects::{Kind, ObjectKey};

/// The outcome for one object: accepted (and applied) or not, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: Reason,
    /// For the operator: what applies, or which field is wrong and how.
    pub message: String,
    /// The object's `metadata.generation` the verdict is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// A route's references (the Gateway API's `ResolvedRefs` condition).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references: Option<References>,
    /// A route's parents that do not take it, by their index in `spec.parentRefs`,
    /// while others do (the Gateway API reports `Accepted` per parent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_parents: Vec<RefusedParent>,
    /// What applies, but probably not as its author meant (also in `message`): each
    /// names the field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cautions: Vec<String>,
}

/// A parent of a route that does not take it, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedParent {
    /// Its index in `spec.parentRefs`.
    pub index: usize,
    pub reason: Reason,
    pub message: String,
}

/// Whether every reference of a route resolves; if not, the first that does not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct References {
    pub resolved: bool,
    pub reason: Reason,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reason {
    /// Valid and applied.
    Accepted,
    /// Valid, but its selector matches no pod yet.
    NoMatchingPods,
    /// Breaks a rule; nothing of it applies.
    Invalid,
    /// Another, older object already decides what this one would; nothing applies.
    Conflicted,
    /// Names a Service that does not exist.
    ServiceNotFound,
    /// Valid, but sets something the agents do not enforce yet; the message names it
    /// and says what of the object does apply.
    NotEnforced,
    /// A route's parent Service (or its port) does not exist (Gateway API).
    NoMatchingParent,
    /// A route sets a value or field weft does not support (Gateway API).
    UnsupportedValue,
    /// Every reference of a route resolves (Gateway API, `ResolvedRefs`).
    ResolvedRefs,
    /// A route's backend Service does not exist (Gateway API, `ResolvedRefs`).
    BackendNotFound,
    /// A route's backend is in another namespace, and no ReferenceGrant permits it.
    RefNotPermitted,
    /// A route's backend is not a Service.
    InvalidKind,
    /// A route's `ExtensionRef` filter names a FaultInjection that does not exist or is
    /// invalid (weft's own reason): the rule's requests are answered 500.
    FilterNotFound,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Accepted => "Accepted",
            Reason::NoMatchingPods => "NoMatchingPods",
            Reason::Invalid => "Invalid",
            Reason::Conflicted => "Conflicted",
            Reason::ServiceNotFound => "ServiceNotFound",
            Reason::NotEnforced => "NotEnforced",
            Reason::NoMatchingParent => "NoMatchingParent",
            Reason::UnsupportedValue => "UnsupportedValue",
            Reason::ResolvedRefs => "ResolvedRefs",
            Reason::BackendNotFound => "BackendNotFound",
            Reason::RefNotPermitted => "RefNotPermitted",
            Reason::InvalidKind => "InvalidKind",
            Reason::FilterNotFound => "FilterNotFound",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Verdict {
    pub fn accepted(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            accepted: true,
            reason,
            message: message.into(),
            generation: None,
            references: None,
            refused_parents: Vec::new(),
            cautions: Vec::new(),
        }
    }

    pub fn rejected(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            accepted: false,
            reason,
            message: message.into(),
            generation: None,
            references: None,
            refused_parents: Vec::new(),
            cautions: Vec::new(),
        }
    }

    /// The verdict for the route's parent at `index` in `spec.parentRefs`: refused if
    /// that parent is, this verdict otherwise.
    pub fn for_parent(&self, index: usize) -> Verdict {
        match self
            .refused_parents
            .iter()
            .find(|parent| parent.index == index)
        {
            Some(refused) => Verdict {
                accepted: false,
                reason: refused.reason,
                message: refused.message.clone(),
                refused_parents: Vec::new(),
                ..self.clone()
            },
            None => self.clone(),
        }
    }

    /// With a route's `ResolvedRefs` outcome.
    pub fn with_references(mut self, references: References) -> Self {
        self.references = Some(references);
        self
    }

    pub fn for_generation(mut self, generation: Option<i64>) -> Self {
        self.generation = generation;
        self
    }

    /// The `Accepted` condition for this verdict. `previous` (the condition the object
    /// has now) keeps its transition time when the status does not change.
    pub fn condition(&self, previous: Option<&Condition>) -> Condition {
        let status = if self.accepted { "True" } else { "False" };
        let last_transition_time = previous
            .filter(|previous| previous.status == status)
            .map(|previous| previous.last_transition_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now()));
        Condition {
            type_: ACCEPTED.to_owned(),
            status: status.to_owned(),
            reason: self.reason.as_str().to_owned(),
            message: self.message.clone(),
            observed_generation: self.generation,
            last_transition_time,
        }
    }

    /// The `ResolvedRefs` condition of a route, if the verdict has one. `previous` keeps
    /// its transition time as for [`Verdict::condition`].
    pub fn references_condition(&self, previous: Option<&Condition>) -> Option<Condition> {
        let references = self.references.as_ref()?;
        let status = if references.resolved { "True" } else { "False" };
        let last_transition_time = previous
            .filter(|previous| previous.status == status)
            .map(|previous| previous.last_transition_time.clone())
            .unwrap_or_else(|| Time(Timestamp::now()));
        Some(Condition {
            type_: RESOLVED_REFS.to_owned(),
            status: status.to_owned(),
            reason: references.reason.as_str().to_owned(),
            message: references.message.clone(),
            observed_generation: self.generation,
            last_transition_time,
        })
    }
}

/// The condition type every weft resource reports.
pub const ACCEPTED: &str = "Accepted";
/// The condition type a route reports about its references, beside [`ACCEPTED`].
pub const RESOLVED_REFS: &str = "ResolvedRefs";

/// Verdicts by object.
pub type Statuses = BTreeMap<(Kind, ObjectKey), Verdict>;
