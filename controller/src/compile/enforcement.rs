//! What the agents enforce, in one place: a verdict says `Accepted` only for that. A
//! valid object that sets anything else is `NotEnforced`, with a message naming every
//! field the agents ignore and what of the object does apply; it is still compiled
//! and streamed, so what they enforce takes effect. The request layer extends
//! [`of`] as it lands.

use serde::Serialize;
use serde_json::Value;

use crate::{
    objects::Kind,
    status::{Reason, Verdict},
};

/// What the agents do with the objects of a kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enforcement {
    /// Everything such an object says.
    Everything,
    /// The fields in `enforced` (paths such as `spec.timeouts.idle`, with whatever is
    /// below them); those in `about` name what the object is for and are checked by
    /// the compiler. Other fields are ignored.
    Fields {
        about: &'static [&'static str],
        enforced: &'static [&'static str],
    },
}

/// What the agents enforce of `kind`.
pub fn of(kind: Kind) -> Enforcement {
    match kind {
        Kind::TrafficPolicy => Enforcement::Fields {
            about: &["spec.service"],
            enforced: &[
                "spec.loadBalancer",
                "spec.timeouts",
                "spec.retries",
                "spec.connectionLimits",
                "spec.outlierDetection.consecutiveFailures",
                "spec.outlierDetection.consecutiveGatewayErrors",
                "spec.outlierDetection.consecutiveConnectFailures",
                "spec.outlierDetection.baseEjectionTime",
                "spec.outlierDetection.maxEjectionPercent",
            ],
        },
        Kind::AuthorizationPolicy
        | Kind::FaultInjection
        | Kind::HttpRoute
        | Kind::GrpcRoute
        | Kind::Namespace
        | Kind::Node
        | Kind::Pod
        | Kind::Service
        | Kind::EndpointSlice
        | Kind::PeerAuthentication
        | Kind::ReferenceGrant => Enforcement::Everything,
    }
}

/// The verdict of a valid object of `kind` with `spec`, for `target` (what it applies
/// to, e.g. "clients of Service web"): `enforced`, the compiler's verdict, when the
/// agents enforce everything it sets, `NotEnforced` otherwise.
pub fn verdict(kind: Kind, spec: &impl Serialize, target: &str, enforced: Verdict) -> Verdict {
    match of(kind) {
        Enforcement::Everything => enforced,
        Enforcement::Fields {
            about,
            enforced: paths,
        } => {
            let spec = serde_json::to_value(spec).expect("the CRD and route types serialise");
            let (applied, ignored) = coverage(&spec, about, paths);
            if ignored.is_empty() {
                return enforced;
            }
            let pronoun = if ignored.len() == 1 { "it" } else { "them" };
            let ignored = format!(
                "the agents do not enforce {} yet and ignore {pronoun}",
                ignored.join(", ")
            );
            let message = if applied.is_empty() {
                format!(
                    "{ignored}, so nothing of it applies to {target} (of a {kind} they enforce {})",
                    paths.join(", ")
                )
            } else {
                let verb = if applied.len() == 1 {
                    "applies"
                } else {
                    "apply"
                };
                format!("{ignored}; {} {verb} to {target}", applied.join(", "))
            };
            Verdict::rejected(Reason::NotEnforced, message)
        }
    }
}

/// The fields `spec` (at path `spec`) sets, as (enforced, ignored) paths, sorted, with
/// the `about` fields left out. A field is named at the shallowest level nothing
/// enforced lies below; unset fields (null, or objects that set nothing) are left out.
fn coverage(spec: &Value, about: &[&str], enforced: &[&str]) -> (Vec<String>, Vec<String>) {
    fn walk(
        value: &Value,
        path: String,
        about: &[&str],
        enforced: &[&str],
        found: &mut (Vec<String>, Vec<String>),
    ) {
        if !is_set(value) || about.contains(&path.as_str()) {
            return;
        }
        if enforced.contains(&path.as_str()) {
            found.0.push(path);
            return;
        }
        let below = format!("{path}.");
        let something_below = enforced
            .iter()
            .chain(about)
            .any(|known| known.starts_with(&below));
        match value {
            Value::Object(fields) if something_below => {
                for (name, field) in fields {
                    walk(field, format!("{below}{name}"), about, enforced, found);
                }
            }
            _ => found.1.push(path),
        }
    }
    let mut found = (Vec::new(), Vec::new());
    walk(spec, "spec".to_owned(), about, enforced, &mut found);
    found.0.sort();
    found.1.sort();
    found
}

fn is_set(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Object(fields) => fields.values().any(is_set),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn coverage_names_each_field_at_the_shallowest_level_nothing_enforced_is_below() {
        let about = &["spec.service"];
        let enforced = &["spec.timeouts.idle", "spec.retries.attempts"];
        let cases = [
            (json!({ "service": "web" }), vec![], vec![]),
            (
                json!({ "service": "web", "timeouts": { "idle": "5s" } }),
                vec!["spec.timeouts.idle"],
                vec![],
            ),
            (
                json!({ "timeouts": { "idle": "5s", "request": "1s", "connect": null } }),
                vec!["spec.timeouts.idle"],
                vec!["spec.timeouts.request"],
            ),
            (
                json!({ "retries": { "attempts": 2, "budget": { "percent": 5 } } }),
                vec!["spec.retries.attempts"],
                vec!["spec.retries.budget"],
            ),
            (
                json!({ "outlierDetection": { "consecutiveFailures": 5 }, "loadBalancer": {} }),
                vec![],
                vec!["spec.outlierDetection"],
            ),
            (
                json!({ "timeouts": {}, "limits": { "max": null }, "rules": [] }),
                vec![],
                vec!["spec.rules"],
            ),
        ];
        for (spec, applied, ignored) in cases {
            assert_eq!(
                coverage(&spec, about, enforced),
                (
                    applied.into_iter().map(str::to_owned).collect(),
                    ignored.into_iter().map(str::to_owned).collect()
                ),
                "{spec}"
            );
        }
    }
}
