//! What the controller concluded about each policy and route, and the status condition
//! a user reads with `kubectl get` or the controller's `/status` endpoint.

use std::{collections::BTreeMap, fmt};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use serde::Serialize;

use crate::objects::{Kind, ObjectKey};

/// The outcome for one object: accepted (and applied) or not, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub accepted: bool,
    pub reason: Reason,
    /// For the operator: what applies, or which field is wrong and how.
    pub message: String,
    /// The object's `metadata.generation` the verdict is about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
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
        }
    }

    pub fn rejected(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            accepted: false,
            reason,
            message: message.into(),
            generation: None,
        }
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
}

/// The condition type every weft resource reports.
pub const ACCEPTED: &str = "Accepted";

/// Verdicts by object.
pub type Statuses = BTreeMap<(Kind, ObjectKey), Verdict>;
