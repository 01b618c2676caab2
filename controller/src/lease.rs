//! Leader election over a `coordination.k8s.io` Lease, so that several replicas of
//! the controller can run: every replica serves the config stream and signs
//! certificates, and only the leader writes status (two writers would fight over
//! every condition).
//!
//! Each replica reads the Lease every [`Timing::retry`]. The holder renews it; the
//! others wait until the record has not moved for the Lease's duration — measured on
//! their own clock from when they first saw that record, never by comparing the
//! holder's timestamps with theirs, so clock skew between nodes cannot elect two
//! leaders — and then take it over. Every write carries the resourceVersion it read,
//! so of two replicas that try at once only one wins (the other gets 409 and follows).
//! A leader that cannot renew steps down at once; it leads again only through the
//! same rules.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::{sync::watch, time::Instant};

/// How long a Lease lasts unrenewed, and how often replicas look at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    pub duration: Duration,
    pub retry: Duration,
}

impl Default for Timing {
    /// Kubernetes' own controllers' choice: a new leader within about 15 s.
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(15),
            retry: Duration::from_secs(2),
        }
    }
}

/// What a replica knows of the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    /// The holder's last renewal, as written: only compared for change.
    pub renewed: Option<String>,
}

/// What a replica does after reading the Lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// There is none: create it, holding it.
    Create,
    /// It is ours: renew it.
    Renew,
    /// Its holder let it lapse (or released it): take it over.
    TakeOver,
    /// Someone else holds it.
    Follow,
}

/// The decision for `record` (`None`: no Lease), seen unchanged since `since`, at
/// `now`, for replica `me`.
pub fn decide(
    record: Option<&Record>,
    since: Instant,
    now: Instant,
    me: &str,
    duration: Duration,
) -> Decision {
    let Some(record) = record else {
        return Decision::Create;
    };
    match record.holder.as_deref() {
        Some(holder) if holder == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) if now.duration_since(since) >= duration => Decision::TakeOver,
        Some(_) => Decision::Follow,
    }
}

/// One replica's side of the election.
#[derive(Debug)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    /// The record last seen and when it was first seen so.
    observed: Option<(Option<Record>, Instant)>,
}

impl Elector {
    /// Elects among the replicas sharing the Lease `namespace/name`; this one is
    /// `identity` (its pod's name).
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            timing,
            observed: None,
        }
    }

    /// Takes part for as long as the task runs; `leading` says whether this replica
    /// leads now (and changes only when that does).
    pub async fn run(mut self, leading: watch::Sender<bool>) {
        loop {
            let leads = match self.round().await {
                Ok(leads) => leads,
                Err(err) => {
                    log::warn!("leader election (Lease {}): {err}", self.name);
                    false
                }
            };
            let changed = leading.send_if_modified(|current| {
                let changed = *current != leads;
                *current = leads;
                changed
            });
            if changed {
                match leads {
                    true => log::info!("leading (Lease {}): writing status", self.name),
                    false => log::info!("following (Lease {}): not writing status", self.name),
                }
            }
            tokio::time::sleep(self.timing.retry).await;
        }
    }

    /// Reads the Lease and acts on it; whether this replica holds it afterwards.
    async fn round(&mut self) -> Result<bool, kube::Error> {
        let lease = self.api.get_opt(&self.name).await?;
        let record = lease.as_ref().map(record_of);
        let now = Instant::now();
        let since = match &self.observed {
            Some((seen, at)) if *seen == record => *at,
            _ => {
                self.observed = Some((record.clone(), now));
                now
            }
        };
        let decision = decide(
            record.as_ref(),
            since,
            now,
            &self.identity,
            self.timing.duration,
        );
        let written = match (decision, lease) {
            (Decision::Follow, _) => return Ok(false),
            (Decision::Create, _) => {
                let lease = self.hold(Lease::default(), true);
                self.api.create(&PostParams::default(), &lease).await
            }
            (_, None) => return Ok(false),
            (decision, Some(lease)) => {
                let lease = self.hold(lease, decision == Decision::TakeOver);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match written {
            Ok(lease) => {
                self.observed = Some((Some(record_of(&lease)), Instant::now()));
                Ok(true)
            }
            // Another replica wrote first (409), or created it first.
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// `lease` held by this replica, renewed now; `acquired`: newly.
    fn hold(&self, mut lease: Lease, acquired: bool) -> Lease {
        let now = MicroTime(Timestamp::now());
        if lease.metadata.name.is_none() {
            lease.metadata = ObjectMeta {
                name: Some(self.name.clone()),
                ..ObjectMeta::default()
            };
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if acquired {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.map_or(0, |count| count + 1));
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.timing.duration.as_secs().max(1) as i32);
        spec.renew_time = Some(now);
        lease
    }
}

fn record_of(lease: &Lease) -> Record {
    let spec = lease.spec.as_ref();
    Record {
        holder: spec.and_then(|spec| spec.holder_identity.clone()),
        renewed: spec
            .and_then(|spec| spec.renew_time.as_ref())
            .map(|time| time.0.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_takes_the_lease_only_when_its_holder_let_it_lapse() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        let held_by = |holder: &str| Record {
            holder: Some(holder.to_owned()),
            renewed: Some("2026-12-02T00:00:00Z".to_owned()),
        };
        let released = Record {
            holder: None,
            renewed: None,
        };
        let fifteen = Duration::from_secs(15);
        let cases = [
            (None, at(0), Decision::Create),
            (Some(held_by("me")), at(100), Decision::Renew),
            (Some(held_by("other")), at(0), Decision::Follow),
            (Some(held_by("other")), at(14), Decision::Follow),
            (Some(held_by("other")), at(15), Decision::TakeOver),
            (Some(released), at(0), Decision::TakeOver),
        ];
        for (record, now, expected) in cases {
            let decided = decide(record.as_ref(), start, now, "me", fifteen);
            assert_eq!(decided, expected, "{record:?} at {:?}", now - start);
        }
    }
}
