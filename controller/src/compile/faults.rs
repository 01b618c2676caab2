//! FaultInjections: each is checked and judged on its own; what a valid one does is
//! compiled for the route rules that reference it (an `ExtensionRef` filter,
//! [`super::routes`]).

use std::time::Duration;

use weft_api::{
    crd::{FaultInjectionSpec, Validate, parse_duration},
    routes::{Abort, Fault},
};

use super::judge;
use crate::{
    objects::{Kind, Objects},
    status::{Reason, Statuses, Verdict},
};

/// Judges every FaultInjection: valid ones are accepted, for the route rules that
/// reference them; the rest are invalid, and so are those rules' filters.
pub fn compile(objects: &Objects, statuses: &mut Statuses) {
    for (key, fault) in &objects.fault_injections {
        let verdict = match fault_of(&fault.spec) {
            Ok(_) => Verdict::accepted(
                Reason::Accepted,
                "applies to the requests of the route rules that reference it",
            ),
            Err(problem) => Verdict::rejected(Reason::Invalid, problem),
        };
        judge(
            statuses,
            Kind::FaultInjection,
            key,
            &fault.metadata,
            verdict,
        );
    }
}

/// What `spec` does, or why it is invalid.
pub fn fault_of(spec: &FaultInjectionSpec) -> Result<Fault, String> {
    spec.validate().map_err(|error| error.to_string())?;
    Ok(compile_fault(spec))
}

/// The fault of a valid spec; an unset percent is 100.
fn compile_fault(spec: &FaultInjectionSpec) -> Fault {
    Fault {
        delay: spec.delay.as_ref().map(|delay| {
            let length = parse_duration(&delay.fixed_delay).unwrap_or(Duration::ZERO);
            (length, delay.percent.unwrap_or(100))
        }),
        abort: spec.abort.as_ref().map(|abort| {
            let answer = Abort {
                http_status: abort.http_status,
                grpc_status: abort
                    .grpc_status
                    .and_then(|status| u8::try_from(status).ok()),
            };
            (answer, abort.percent.unwrap_or(100))
        }),
    }
}

/// What a rule does whose FaultInjection does not resolve: the Gateway API wants its
/// requests failed rather than the filter skipped, so every one is answered 500.
pub fn unresolved() -> Fault {
    Fault {
        delay: None,
        abort: Some((
            Abort {
                http_status: Some(500),
                grpc_status: None,
            },
            100,
        )),
    }
}
