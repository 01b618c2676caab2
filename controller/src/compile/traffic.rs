//! TrafficPolicies: one per Service (the oldest wins), for every client. The agents
//! enforce only some of the fields (see [`enforcement`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use weft_api::{
    config::v1::{self as proto, LoadBalancing},
    crd::{Algorithm, TrafficDistribution, TrafficPolicySpec, Validate, parse_duration},
};

use super::{by_age, enforcement, judge};
use crate::{
    objects::{Kind, ObjectKey, Objects},
    status::{Reason, Statuses, Verdict},
};

/// The policies that apply.
#[derive(Debug, Default)]
pub struct Traffic {
    /// The compiled policies by service.
    pub policies: BTreeMap<ObjectKey, proto::TrafficPolicy>,
    /// The services whose policy sets `loadBalancer.trafficDistribution: PreferClose`
    /// (sent as the Service's `prefer_close`).
    pub prefer_close: BTreeSet<ObjectKey>,
}

pub fn compile(objects: &Objects, statuses: &mut Statuses) -> Traffic {
    let mut traffic = Traffic::default();
    let mut decided_by: BTreeMap<ObjectKey, String> = BTreeMap::new();
    let policies = by_age(
        objects
            .traffic_policies
            .iter()
            .map(|(key, policy)| (key, policy.as_ref())),
        |policy| &policy.metadata,
    );
    for (key, policy) in policies {
        let spec = &policy.spec;
        let service = ObjectKey::new(&key.namespace, &spec.service);
        let verdict = if let Err(error) = spec.validate() {
            Verdict::rejected(Reason::Invalid, error.to_string())
        } else if !objects.services.contains_key(&service) {
            Verdict::rejected(
                Reason::ServiceNotFound,
                format!(
                    "spec.service: there is no Service {} in namespace {}",
                    spec.service, key.namespace
                ),
            )
        } else if let Some(older) = decided_by.get(&service) {
            Verdict::rejected(
                Reason::Conflicted,
                format!(
                    "spec.service: Service {} already has TrafficPolicy {older}, which is older",
                    spec.service
                ),
            )
        } else {
            // Compiled and sent even when the agents ignore some of it: what they
            // enforce applies, and the status names the rest.
            decided_by.insert(service.clone(), key.name.clone());
            let distribution = spec
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.traffic_distribution);
            if distribution == Some(TrafficDistribution::PreferClose) {
                traffic.prefer_close.insert(service.clone());
            }
            traffic
                .policies
                .insert(service.clone(), compile_policy(key, spec));
            let target = format!("clients of Service {}", spec.service);
            let accepted = Verdict::accepted(Reason::Accepted, format!("applies to {target}"));
            enforcement::verdict(Kind::TrafficPolicy, spec, &target, accepted)
        };
        judge(
            statuses,
            Kind::TrafficPolicy,
            key,
            &policy.metadata,
            verdict,
        );
    }
    traffic
}

/// Milliseconds of a duration the policy has already validated; 0 when not set.
fn millis(text: Option<&str>) -> u64 {
    text.and_then(parse_duration)
        .map_or(0, |duration: Duration| duration.as_millis() as u64)
}

fn compile_policy(key: &ObjectKey, spec: &TrafficPolicySpec) -> proto::TrafficPolicy {
    let timeouts = spec.timeouts.clone().unwrap_or_default();
    proto::TrafficPolicy {
        service: spec.service.clone(),
        namespace: key.namespace.clone(),
        source: key.to_string(),
        load_balancing: match spec.load_balancer.as_ref().and_then(|lb| lb.algorithm) {
            None => LoadBalancing::Unspecified,
            Some(Algorithm::RoundRobin) => LoadBalancing::RoundRobin,
            Some(Algorithm::Random) => LoadBalancing::Random,
            Some(Algorithm::LeastRequest) => LoadBalancing::LeastRequest,
            Some(Algorithm::PeakEwma) => LoadBalancing::PeakEwma,
        } as i32,
        connect_timeout_ms: millis(timeouts.connect.as_deref()),
        idle_timeout_ms: millis(timeouts.idle.as_deref()),
        request_timeout_ms: millis(timeouts.request.as_deref()),
        stream_idle_timeout_ms: millis(timeouts.stream_idle.as_deref()),
        retries: spec.retries.as_ref().map(|retries| proto::Retries {
            attempts: retries.attempts,
            per_try_timeout_ms: millis(retries.per_try_timeout.as_deref()),
            retry_on: retries.retry_on.clone(),
            budget_percent: retries.budget.as_ref().map_or(0, |budget| budget.percent),
            budget_min_per_second: retries
                .budget
                .as_ref()
                .map_or(0, |budget| budget.min_per_second),
            non_idempotent: retries.non_idempotent,
            budget_set: retries.budget.is_some(),
        }),
        limits: spec
            .connection_limits
            .as_ref()
            .map(|limits| proto::ConnectionLimits {
                max_connections: limits.max_connections.unwrap_or(0),
                max_requests: limits.max_requests.unwrap_or(0),
                max_pending_requests: limits.max_pending_requests.unwrap_or(0),
                max_requests_per_connection: limits.max_requests_per_connection.unwrap_or(0),
            }),
        outlier_detection: spec
            .outlier_detection
            .as_ref()
            .map(|outlier| proto::OutlierDetection {
                consecutive_failures: outlier.consecutive_failures,
                consecutive_gateway_errors: outlier.consecutive_gateway_errors.unwrap_or(0),
                consecutive_connect_failures: outlier.consecutive_connect_failures.unwrap_or(0),
                interval_ms: millis(outlier.interval.as_deref()),
                base_ejection_ms: millis(outlier.base_ejection_time.as_deref()),
                max_ejection_percent: outlier.max_ejection_percent.unwrap_or(0),
            }),
    }
}
