//! Load balancing: which endpoint of a service a request (or a TCP connection) goes to.
//!
//! [`Balancers`] holds what the node knows of each endpoint — requests in flight and a
//! peak-EWMA latency estimate ([`ewma`]), shared by every connection and request of the
//! node — and each service's round-robin position. A choice first narrows the
//! candidates to the closest usable tier ([`locality`]) and then applies the service's
//! [`Algorithm`] ([`pick`]); both are pure functions, the state lives here.
//!
//! The pick path takes no lock the whole node shares for writing: the per-endpoint and
//! per-service maps are read-locked (written only for an endpoint or service seen for
//! the first time, and by [`Balancers::retain`]), counts are atomics, and a latency
//! estimate or a weighted rotation is behind a lock of its own.

mod ewma;
mod locality;
mod pick;

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use fastrand::Rng;
use tokio::time::Instant;

use self::{ewma::PeakEwma, locality::Eligible};
use crate::sync;

/// How a service's endpoints are chosen (TrafficPolicy `spec.loadBalancer.algorithm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// The cheaper of two endpoints drawn by weight, the cost being the latency estimate
    /// times the requests in flight (plus this one), over the weight.
    #[default]
    PeakEwma,
    /// The cheaper of two endpoints drawn by weight, the cost being the requests in
    /// flight (plus this one) over the weight.
    LeastRequest,
    /// Each endpoint in turn, as often as its weight says, heavy ones spread out.
    RoundRobin,
    /// An endpoint drawn by weight.
    Random,
}

/// Where an endpoint is, relative to the client's node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Locality {
    SameNode,
    SameZone,
    Elsewhere,
}

/// One endpoint the balancer may choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub address: SocketAddr,
    /// Its share relative to the others: 0 is never chosen; 1 by default.
    pub weight: u32,
    pub locality: Locality,
}

/// What one choice takes into account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub algorithm: Algorithm,
    /// Only the closest tier with a usable endpoint: the same node, else the same zone,
    /// else everywhere (Kubernetes' `trafficDistribution: PreferClose`).
    pub prefer_close: bool,
    /// Whether and how failing endpoints are ejected (TrafficPolicy
    /// `outlierDetection`); `None`: never.
    pub outlier: Option<Outlier>,
}

/// Outlier detection, as failure accrual: `consecutive_failures` failures in a row
/// (5xx answers, connect failures, resets), or `consecutive_gateway_errors` gateway
/// errors, or `consecutive_connect_failures` failed connections, eject an endpoint for
/// `base_ejection` times the number of ejections in a row; back from one, it is on
/// probation, and its next failure ejects it again at once. At most
/// `max_ejection_percent` of a service's endpoints (and always at least one) are
/// ejected: past that, every endpoint takes traffic again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub consecutive_gateway_errors: Option<u32>,
    pub consecutive_connect_failures: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
}

/// The longest an endpoint stays ejected, however often it failed.
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Node-wide balancing state: per-endpoint load and latency shared by every connection
/// and request of the node, and per-service round-robin positions. Shared behind an
/// `Arc`.
#[derive(Debug, Default)]
pub struct Balancers {
    endpoints: RwLock<HashMap<SocketAddr, Arc<Endpoint>>>,
    services: RwLock<HashMap<String, Arc<Service>>>,
}

impl Balancers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Chooses among `candidates` for `service` (a key such as "namespace/name:port") by
    /// `policy`; None when no candidate may be chosen (none, or all of weight 0).
    ///
    /// `candidates` should come in the same order from one call to the next: a weighted
    /// round robin starts over when they change. A retry `avoid`s the endpoints tried
    /// before while another may be chosen.
    pub fn pick(
        &self,
        service: &str,
        policy: Policy,
        candidates: &[Candidate],
        avoid: &[SocketAddr],
    ) -> Option<Pick> {
        let now = Instant::now();
        let healthy = self.healthy(policy.outlier, candidates, now);
        let fresh = |candidate: &Candidate| !avoid.contains(&candidate.address);
        let avoiding = !avoid.is_empty()
            && candidates
                .iter()
                .any(|candidate| candidate.weight > 0 && healthy(candidate) && fresh(candidate));
        let eligible =
            Eligible::among(candidates, policy.prefer_close, |candidate: &Candidate| {
                healthy(candidate) && (!avoiding || fresh(candidate))
            })?;
        let eligible = |candidate: &Candidate| eligible.admits(candidate);
        let mut rng = Rng::new();
        let index = match policy.algorithm {
            Algorithm::PeakEwma => pick::two_choices(
                candidates,
                eligible,
                |candidate| {
                    self.endpoint(candidate.address)
                        .latency_cost(candidate.weight, now)
                },
                &mut rng,
            ),
            Algorithm::LeastRequest => pick::two_choices(
                candidates,
                eligible,
                |candidate| self.endpoint(candidate.address).load_cost(candidate.weight),
                &mut rng,
            ),
            Algorithm::RoundRobin => self.service(service).next(candidates, eligible),
            Algorithm::Random => pick::weighted(candidates, eligible, &mut rng),
        }?;
        let address = candidates[index].address;
        Some(Pick::new(address, self.endpoint(address), policy.outlier))
    }

    /// Which candidates may take traffic: those not ejected, unless more than the
    /// policy's share of them are (then all, as Envoy's panic threshold does).
    fn healthy(
        &self,
        outlier: Option<Outlier>,
        candidates: &[Candidate],
        now: Instant,
    ) -> impl Fn(&Candidate) -> bool {
        let ejected: HashSet<SocketAddr> = match outlier {
            None => HashSet::new(),
            Some(_) => candidates
                .iter()
                .filter(|candidate| self.endpoint(candidate.address).ejected(now))
                .map(|candidate| candidate.address)
                .collect(),
        };
        // Always at least one may be out, as in Envoy: else a small service never
        // ejects anything.
        let limit = outlier.map_or(0, |outlier| {
            (outlier.max_ejection_percent as usize * candidates.len() / 100).max(1)
        });
        let fail_open = ejected.len() > limit;
        move |candidate: &Candidate| fail_open || !ejected.contains(&candidate.address)
    }

    /// The endpoints ejected now, with how long they stay out and their ejections in a
    /// row, by address.
    pub fn ejected(&self) -> Vec<Ejection> {
        let now = Instant::now();
        let mut ejected: Vec<Ejection> = sync::read(&self.endpoints)
            .iter()
            .filter_map(|(address, endpoint)| {
                let health = sync::lock(&endpoint.health);
                let until = health.ejected_until.filter(|&until| now < until)?;
                Some(Ejection {
                    address: *address,
                    left: until - now,
                    ejections: health.ejections,
                })
            })
            .collect();
        ejected.sort_by_key(|ejection| ejection.address);
        ejected
    }

    /// Forgets the state of endpoints not in `live` (called after a configuration
    /// change), and the round-robin positions of services not picked from since the
    /// previous call (a service that comes back starts its rotation over).
    pub fn retain(&self, live: &HashSet<SocketAddr>) {
        sync::write(&self.endpoints).retain(|address, _| live.contains(address));
        sync::write(&self.services)
            .retain(|_, service| service.used.swap(false, Ordering::Relaxed));
    }

    fn endpoint(&self, address: SocketAddr) -> Arc<Endpoint> {
        if let Some(endpoint) = sync::read(&self.endpoints).get(&address) {
            return Arc::clone(endpoint);
        }
        let mut endpoints = sync::write(&self.endpoints);
        Arc::clone(
            endpoints
                .entry(address)
                .or_insert_with(|| Arc::new(Endpoint::new(Instant::now()))),
        )
    }

    fn service(&self, key: &str) -> Arc<Service> {
        if let Some(service) = sync::read(&self.services).get(key) {
            return Arc::clone(service);
        }
        let mut services = sync::write(&self.services);
        Arc::clone(services.entry(key.to_owned()).or_default())
    }
}

/// An endpoint out of rotation (outlier detection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub address: SocketAddr,
    /// Until it is back, on probation.
    pub left: Duration,
    /// Ejections in a row, this one included.
    pub ejections: u32,
}

/// What the node knows of one endpoint.
#[derive(Debug)]
struct Endpoint {
    in_flight: AtomicUsize,
    latency: Mutex<PeakEwma>,
    health: Mutex<Health>,
}

/// How a request (or connection) failed, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection.
    Connect,
    /// A 502, 503 or 504 answer, a reset, a timeout: the connection was made.
    Gateway,
    /// Any other 5xx answer.
    Server,
}

impl Failure {
    /// The failure an answer with `status` is, if any.
    pub fn of_status(status: u16) -> Option<Self> {
        match status {
            502..=504 => Some(Failure::Gateway),
            500..=599 => Some(Failure::Server),
            _ => None,
        }
    }
}

/// An endpoint's failure accrual.
#[derive(Debug, Default)]
struct Health {
    /// Failures since the last success.
    failures: u32,
    /// Gateway errors (failed connections included) in a row.
    gateway_errors: u32,
    /// Failed connections in a row.
    connect_failures: u32,
    /// Ejections since the last success.
    ejections: u32,
    /// Ejected until then.
    ejected_until: Option<Instant>,
}

impl Endpoint {
    fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            latency: Mutex::new(PeakEwma::new(now)),
            health: Mutex::default(),
        }
    }

    fn ejected(&self, now: Instant) -> bool {
        sync::lock(&self.health)
            .ejected_until
            .is_some_and(|until| now < until)
    }

    fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counting the request being placed makes weights count between idle endpoints.
    fn load_cost(&self, weight: u32) -> f64 {
        (self.in_flight() + 1) as f64 / f64::from(weight)
    }

    fn latency_cost(&self, weight: u32, now: Instant) -> f64 {
        let estimate = sync::lock(&self.latency).estimate(now);
        estimate.as_secs_f64() * self.load_cost(weight)
    }
}

/// A service's round-robin position.
#[derive(Debug, Default)]
struct Service {
    /// The next position when the eligible endpoints weigh the same.
    position: AtomicUsize,
    /// The rotation when they do not.
    weighted: Mutex<Rotation>,
    /// Picked from since the last [`Balancers::retain`].
    used: AtomicBool,
}

/// A smooth weighted rotation through a list of endpoints.
#[derive(Debug, Default)]
struct Rotation {
    addresses: Vec<SocketAddr>,
    credit: Vec<i64>,
}

impl Service {
    fn next(
        &self,
        candidates: &[Candidate],
        eligible: impl Fn(&Candidate) -> bool,
    ) -> Option<usize> {
        self.used.store(true, Ordering::Relaxed);
        if pick::even(candidates, &eligible) {
            let position = self.position.fetch_add(1, Ordering::Relaxed);
            return pick::rotation(candidates, eligible, position);
        }
        let mut rotation = sync::lock(&self.weighted);
        let unchanged = rotation
            .addresses
            .iter()
            .copied()
            .eq(candidates.iter().map(|candidate| candidate.address));
        if !unchanged {
            rotation.addresses = candidates
                .iter()
                .map(|candidate| candidate.address)
                .collect();
            rotation.credit = vec![0; candidates.len()];
        }
        pick::smooth(candidates, eligible, &mut rotation.credit)
    }
}

/// A chosen endpoint. While it lives the endpoint counts one more request (or
/// connection) in flight; [`Pick::observe`] feeds the endpoint's latency estimate.
/// Dropping it ends the in-flight count.
#[derive(Debug)]
pub struct Pick {
    address: SocketAddr,
    endpoint: Arc<Endpoint>,
    outlier: Option<Outlier>,
}

impl Pick {
    fn new(address: SocketAddr, endpoint: Arc<Endpoint>, outlier: Option<Outlier>) -> Self {
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        Self {
            address,
            endpoint,
            outlier,
        }
    }

    /// The request (or connection) succeeded: the endpoint's failures start over.
    /// Without outlier detection nothing was counted, so nothing is locked.
    pub fn succeeded(&self) {
        if self.outlier.is_none() {
            return;
        }
        let mut health = sync::lock(&self.endpoint.health);
        *health = Health {
            ejected_until: health.ejected_until,
            ..Health::default()
        };
    }

    /// The request failed (a 5xx answer, or no answer) as `failure` says: with
    /// outlier detection on, the failure that completes a streak, or any failure on
    /// probation, ejects the endpoint. Returns whether this failure ejected it.
    pub fn failed(&self, failure: Failure) -> bool {
        let Some(outlier) = self.outlier else {
            return false;
        };
        let now = Instant::now();
        let mut health = sync::lock(&self.endpoint.health);
        if health.ejected_until.is_some_and(|until| now < until) {
            // Already out: a request placed before the ejection.
            return false;
        }
        health.failures += 1;
        // A connection was made, or an answer came: those streaks break.
        match failure {
            Failure::Connect => {
                health.gateway_errors += 1;
                health.connect_failures += 1;
            }
            Failure::Gateway => {
                health.gateway_errors += 1;
                health.connect_failures = 0;
            }
            Failure::Server => {
                health.gateway_errors = 0;
                health.connect_failures = 0;
            }
        }
        let reached = |count: u32, limit: Option<u32>| limit.is_some_and(|limit| count >= limit);
        let streak = health.failures >= outlier.consecutive_failures.max(1)
            || reached(health.gateway_errors, outlier.consecutive_gateway_errors)
            || reached(
                health.connect_failures,
                outlier.consecutive_connect_failures,
            );
        let on_probation = health.ejections > 0;
        if !on_probation && !streak {
            return false;
        }
        health.ejections += 1;
        health.failures = 0;
        health.gateway_errors = 0;
        health.connect_failures = 0;
        let length = outlier
            .base_ejection
            .saturating_mul(health.ejections)
            .min(MAX_EJECTION);
        health.ejected_until = Some(now + length);
        metrics::counter!("weft_endpoint_ejections_total").increment(1);
        true
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Takes in the endpoint's latency: the time to the response headers for HTTP, the
    /// connect time for TCP.
    pub fn observe(&self, latency: Duration) {
        sync::lock(&self.endpoint.latency).observe(Instant::now(), latency);
    }
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "default/web:80";

    const ALGORITHMS: [Algorithm; 4] = [
        Algorithm::PeakEwma,
        Algorithm::LeastRequest,
        Algorithm::RoundRobin,
        Algorithm::Random,
    ];

    fn address(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    /// Candidates on ports 1, 2, … of the given weights, none close.
    fn candidates(weights: &[u32]) -> Vec<Candidate> {
        weights
            .iter()
            .zip(1..)
            .map(|(&weight, port)| Candidate {
                address: address(port),
                weight,
                locality: Locality::Elsewhere,
            })
            .collect()
    }

    fn policy(algorithm: Algorithm) -> Policy {
        Policy {
            algorithm,
            prefer_close: false,
            outlier: None,
        }
    }

    /// The candidate index each of `picks` picks went to, each pick dropped at once.
    fn sequence(
        balancers: &Balancers,
        policy: Policy,
        candidates: &[Candidate],
        picks: usize,
    ) -> Vec<usize> {
        (0..picks)
            .map(|_| {
                let pick = balancers
                    .pick(SERVICE, policy, candidates, &[])
                    .expect("a pick");
                index(candidates, pick.address())
            })
            .collect()
    }

    fn index(candidates: &[Candidate], address: SocketAddr) -> usize {
        candidates
            .iter()
            .position(|candidate| candidate.address == address)
            .expect("a candidate")
    }

    fn tally(candidates: usize, sequence: &[usize]) -> Vec<usize> {
        let mut counts = vec![0; candidates];
        for &index in sequence {
            counts[index] += 1;
        }
        counts
    }

    fn in_flight(balancers: &Balancers, address: SocketAddr) -> Option<usize> {
        sync::read(&balancers.endpoints)
            .get(&address)
            .map(|endpoint| endpoint.in_flight())
    }

    fn estimate(balancers: &Balancers, address: SocketAddr) -> Option<Duration> {
        sync::read(&balancers.endpoints)
            .get(&address)
            .map(|endpoint| sync::lock(&endpoint.latency).estimate(Instant::now()))
    }

    #[test]
    fn round_robin_rotates_evenly_through_equal_endpoints() {
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 1, 1]);
        let picks = sequence(&balancers, policy(Algorithm::RoundRobin), &candidates, 300);
        assert_eq!(picks[..6], [0, 1, 2, 0, 1, 2]);
        assert_eq!(tally(3, &picks), [100, 100, 100]);
    }

    #[test]
    fn weighted_round_robin_gives_each_its_share_interleaved() {
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 3]);
        let picks = sequence(&balancers, policy(Algorithm::RoundRobin), &candidates, 400);
        for turn in picks.chunks(4) {
            assert_eq!(tally(2, turn), [1, 3], "{turn:?}");
        }
        assert!(!picks.windows(2).any(|pair| pair == [0, 0]));
    }

    #[test]
    fn each_service_rotates_on_its_own() {
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 1]);
        let policy = policy(Algorithm::RoundRobin);
        let next = |service| {
            let pick = balancers.pick(service, policy, &candidates, &[]).unwrap();
            index(&candidates, pick.address())
        };
        assert_eq!(
            [
                next("a/a:80"),
                next("a/a:80"),
                next("b/b:80"),
                next("a/a:80")
            ],
            [0, 1, 0, 0]
        );
    }

    #[test]
    fn random_follows_the_weights() {
        fastrand::seed(11);
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 3]);
        let picks = sequence(&balancers, policy(Algorithm::Random), &candidates, 20_000);
        let counts = tally(2, &picks);
        assert!(counts[0].abs_diff(5_000) <= 500, "{counts:?}");
    }

    // The clock is paused so that the endpoints, first seen at one instant, are equals:
    // each default estimate fades from the instant its endpoint was first seen.
    #[tokio::test(start_paused = true)]
    async fn two_choices_spread_evenly_between_idle_equals() {
        fastrand::seed(12);
        for algorithm in [Algorithm::PeakEwma, Algorithm::LeastRequest] {
            let balancers = Balancers::new();
            let candidates = candidates(&[1, 1, 1]);
            let picks = sequence(&balancers, policy(algorithm), &candidates, 30_000);
            let counts = tally(3, &picks);
            for count in &counts {
                assert!(count.abs_diff(10_000) <= 1_000, "{algorithm:?}: {counts:?}");
            }
        }
    }

    #[test]
    fn least_request_avoids_the_endpoint_with_requests_in_flight() {
        fastrand::seed(13);
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 1, 1]);
        let policy = policy(Algorithm::LeastRequest);
        let held: Vec<_> = (0..5)
            .map(|_| {
                balancers
                    .pick(SERVICE, policy, &candidates[..1], &[])
                    .unwrap()
            })
            .collect();
        let picks = sequence(&balancers, policy, &candidates, 300);
        assert_eq!(tally(3, &picks)[0], 0);
        drop(held);
        let picks = sequence(&balancers, policy, &candidates, 300);
        assert!(tally(3, &picks)[0] > 50);
    }

    #[test]
    fn least_request_weighs_the_requests_in_flight() {
        fastrand::seed(14);
        let balancers = Balancers::new();
        let candidates = candidates(&[4, 1]);
        let policy = policy(Algorithm::LeastRequest);
        // The heavy one takes picks until it holds four times as many as the light one.
        let held: Vec<_> = (0..10)
            .map(|_| balancers.pick(SERVICE, policy, &candidates, &[]).unwrap())
            .collect();
        let counts = tally(
            2,
            &held
                .iter()
                .map(|pick| index(&candidates, pick.address()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(counts, [8, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_avoids_a_slow_endpoint_until_it_recovers() {
        fastrand::seed(15);
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 1, 1]);
        let policy = policy(Algorithm::PeakEwma);
        // Ten requests a second, one at a time, each taking its endpoint's latency.
        let run = async |seconds: usize, slow: Duration| {
            let mut picks = Vec::new();
            for _ in 0..seconds * 10 {
                let pick = balancers.pick(SERVICE, policy, &candidates, &[]).unwrap();
                let index = index(&candidates, pick.address());
                let latency = if index == 0 {
                    slow
                } else {
                    Duration::from_millis(10)
                };
                pick.observe(latency);
                picks.push(index);
                tokio::time::advance(Duration::from_millis(100)).await;
            }
            tally(3, &picks)
        };
        run(10, Duration::from_millis(100)).await;
        let slow = run(60, Duration::from_millis(100)).await;
        // It is tried again only as its estimate fades below the others', every 23 s
        // or so: 2 or 3 of 600 (whatever the seed).
        assert!(slow[0] <= 6, "{slow:?}");
        run(60, Duration::from_millis(10)).await;
        let recovered = run(60, Duration::from_millis(10)).await;
        // A third is its share (about 195 of 600 whatever the seed).
        assert!(recovered[0] >= 150, "{recovered:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_is_tried_but_not_flooded() {
        fastrand::seed(16);
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 1, 1]);
        let policy = policy(Algorithm::PeakEwma);
        for _ in 0..100 {
            let pick = balancers
                .pick(SERVICE, policy, &candidates[..2], &[])
                .unwrap();
            pick.observe(Duration::from_millis(20));
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        // Once the known endpoints hold a request each, they cost 20 ms × 2, more than
        // the newcomer's 30 ms × 1, so it is tried…
        let mut held: Vec<_> = (0..2)
            .map(|_| {
                balancers
                    .pick(SERVICE, policy, &candidates[..2], &[])
                    .unwrap()
            })
            .collect();
        held.extend((0..30).map(|_| balancers.pick(SERVICE, policy, &candidates, &[]).unwrap()));
        let newcomer = in_flight(&balancers, candidates[2].address).unwrap();
        // …and gets a share (about 9 of 32 whatever the seed), not everything.
        assert!((5..=15).contains(&newcomer), "{newcomer}");
    }

    #[tokio::test(start_paused = true)]
    async fn in_flight_counts_return_to_zero_when_picks_drop() {
        fastrand::seed(17);
        let candidates = candidates(&[1, 2, 3]);
        for algorithm in ALGORITHMS {
            let balancers = Balancers::new();
            let held: Vec<_> = (0..60)
                .map(|_| {
                    balancers
                        .pick(SERVICE, policy(algorithm), &candidates, &[])
                        .unwrap()
                })
                .collect();
            let counts = || {
                candidates
                    .iter()
                    .map(|c| in_flight(&balancers, c.address).unwrap_or(0))
            };
            assert_eq!(counts().sum::<usize>(), 60, "{algorithm:?}");
            drop(held);
            assert!(counts().all(|count| count == 0), "{algorithm:?}");
        }
    }

    #[test]
    fn nothing_is_picked_without_a_candidate_of_some_weight() {
        let balancers = Balancers::new();
        for algorithm in ALGORITHMS {
            for weights in [&[][..], &[0], &[0, 0, 0]] {
                let picked = balancers.pick(SERVICE, policy(algorithm), &candidates(weights), &[]);
                assert!(picked.is_none(), "{algorithm:?} {weights:?}");
            }
        }
    }

    #[test]
    fn a_candidate_of_weight_zero_is_never_picked() {
        fastrand::seed(18);
        let candidates = candidates(&[0, 2, 0, 1]);
        for algorithm in ALGORITHMS {
            let balancers = Balancers::new();
            let counts = tally(
                4,
                &sequence(&balancers, policy(algorithm), &candidates, 300),
            );
            assert_eq!((counts[0], counts[2]), (0, 0), "{algorithm:?}");
        }
    }

    #[test]
    fn a_single_candidate_is_always_picked() {
        let candidates = candidates(&[1]);
        for algorithm in ALGORITHMS {
            let balancers = Balancers::new();
            assert!(
                sequence(&balancers, policy(algorithm), &candidates, 10)
                    .iter()
                    .all(|&index| index == 0)
            );
        }
    }

    fn ejecting(algorithm: Algorithm) -> Policy {
        Policy {
            outlier: Some(Outlier {
                consecutive_failures: 3,
                consecutive_gateway_errors: None,
                consecutive_connect_failures: None,
                base_ejection: Duration::from_secs(10),
                max_ejection_percent: 50,
            }),
            ..policy(algorithm)
        }
    }

    /// A request to `address` under `policy` that fails; whether it ejected the endpoint.
    fn fail(balancers: &Balancers, policy: Policy, address: SocketAddr) -> bool {
        fail_as(balancers, policy, address, Failure::Server)
    }

    fn fail_as(
        balancers: &Balancers,
        policy: Policy,
        address: SocketAddr,
        failure: Failure,
    ) -> bool {
        Pick::new(address, balancers.endpoint(address), policy.outlier).failed(failure)
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_and_failed_connections_have_streaks_of_their_own() {
        use Failure::{Connect, Gateway, Server};
        let address = candidates(&[1])[0].address;
        let policy = |gateway: Option<u32>, connect: Option<u32>| Policy {
            outlier: Some(Outlier {
                consecutive_failures: 10,
                consecutive_gateway_errors: gateway,
                consecutive_connect_failures: connect,
                base_ejection: Duration::from_secs(10),
                max_ejection_percent: 100,
            }),
            ..ejecting(Algorithm::RoundRobin)
        };
        // (policy, failures in order, which one ejects: its index)
        let cases = [
            (
                policy(Some(2), None),
                vec![Gateway, Server, Gateway, Gateway],
                Some(3),
            ),
            (policy(Some(2), None), vec![Connect, Gateway], Some(1)),
            (
                policy(None, Some(2)),
                vec![Connect, Gateway, Connect, Connect],
                Some(3),
            ),
            (
                policy(None, Some(3)),
                vec![Connect, Connect, Gateway, Connect],
                None,
            ),
            (policy(None, None), vec![Gateway; 9], None),
            (policy(None, None), vec![Server; 10], Some(9)),
        ];
        for (policy, failures, ejecting_at) in cases {
            let balancers = Balancers::new();
            let ejected: Vec<bool> = failures
                .iter()
                .map(|&failure| fail_as(&balancers, policy, address, failure))
                .collect();
            let expected: Vec<bool> = (0..failures.len())
                .map(|index| Some(index) == ejecting_at)
                .collect();
            assert_eq!(ejected, expected, "{failures:?} under {:?}", policy.outlier);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_longer_each_time_and_probation_is_one_failure() {
        let candidates = candidates(&[1, 1, 1]);
        let bad = candidates[0].address;
        for algorithm in ALGORITHMS {
            let balancers = Balancers::new();
            let policy = ejecting(algorithm);
            assert!(!fail(&balancers, policy, bad));
            assert!(!fail(&balancers, policy, bad));
            assert!(fail(&balancers, policy, bad), "the third in a row ejects");
            let picked = sequence(&balancers, policy, &candidates, 30);
            assert!(
                !picked.contains(&0),
                "{algorithm:?}: ejected, never picked: {picked:?}"
            );

            tokio::time::advance(Duration::from_secs(10)).await;
            let picked = sequence(&balancers, policy, &candidates, 30);
            assert!(picked.contains(&0), "{algorithm:?}: back after 10 s");
            // On probation: one failure is enough, and the ejection is twice as long.
            assert!(fail(&balancers, policy, bad));
            tokio::time::advance(Duration::from_secs(19)).await;
            assert!(!sequence(&balancers, policy, &candidates, 30).contains(&0));
            tokio::time::advance(Duration::from_secs(1)).await;
            assert!(sequence(&balancers, policy, &candidates, 30).contains(&0));

            // A success ends probation: failures count from zero again.
            let pick = balancers
                .pick(SERVICE, policy, &candidates[..1], &[])
                .unwrap();
            pick.succeeded();
            assert!(!fail(&balancers, policy, bad));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_allowed_share_is_out_and_without_a_policy_none_is() {
        let candidates = candidates(&[1, 1]);
        let balancers = Balancers::new();
        let ejects = ejecting(Algorithm::RoundRobin);
        for candidate in &candidates {
            for _ in 0..3 {
                fail(&balancers, ejects, candidate.address);
            }
        }
        // Both failed, but at most one of two (50%) may be out: both take traffic.
        let counts = tally(2, &sequence(&balancers, ejects, &candidates, 10));
        assert_eq!(counts, [5, 5]);

        let never = policy(Algorithm::RoundRobin);
        let balancers = Balancers::new();
        for _ in 0..10 {
            assert!(!fail(&balancers, never, candidates[0].address));
        }
        let counts = tally(2, &sequence(&balancers, never, &candidates, 10));
        assert_eq!(counts, [5, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_ejected_endpoints_are_listed_until_they_are_back() {
        let candidates = candidates(&[1, 1, 1, 1]);
        let balancers = Balancers::new();
        let ejects = ejecting(Algorithm::RoundRobin);
        for _ in 0..3 {
            fail(&balancers, ejects, candidates[1].address);
        }
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            balancers.ejected(),
            [Ejection {
                address: candidates[1].address,
                left: Duration::from_secs(6),
                ejections: 1,
            }]
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(balancers.ejected().is_empty(), "back, on probation");
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_the_endpoints_tried_while_a_healthy_other_is_left() {
        let candidates = candidates(&[1, 1, 1]);
        let balancers = Balancers::new();
        let ejects = ejecting(Algorithm::RoundRobin);
        let pick = |avoid: &[SocketAddr]| {
            let pick = balancers.pick(SERVICE, ejects, &candidates, avoid);
            pick.map(|pick| index(&candidates, pick.address()))
        };
        for algorithm in ALGORITHMS {
            let tried = [candidates[0].address, candidates[1].address];
            let picked = balancers
                .pick(SERVICE, ejecting(algorithm), &candidates, &tried)
                .unwrap();
            assert_eq!(index(&candidates, picked.address()), 2, "{algorithm:?}");
        }
        // The one left is ejected: a tried one again, rather than none.
        for _ in 0..3 {
            fail(&balancers, ejects, candidates[2].address);
        }
        let tried = [candidates[0].address, candidates[1].address];
        assert!(matches!(pick(&tried), Some(0 | 1)));
        assert!(matches!(pick(&[]), Some(0 | 1)));
    }

    #[tokio::test(start_paused = true)]
    async fn prefer_close_keeps_to_the_closest_tier() {
        fastrand::seed(19);
        let mut candidates = candidates(&[1, 1, 1, 1]);
        candidates[1].locality = Locality::SameZone;
        candidates[2].locality = Locality::SameZone;
        for algorithm in ALGORITHMS {
            let balancers = Balancers::new();
            let close = Policy {
                algorithm,
                prefer_close: true,
                outlier: None,
            };
            let counts = tally(4, &sequence(&balancers, close, &candidates, 100));
            assert_eq!((counts[0], counts[3]), (0, 0), "{algorithm:?}: {counts:?}");
            let counts = tally(
                4,
                &sequence(&balancers, policy(algorithm), &candidates, 400),
            );
            assert!(
                counts.iter().all(|&count| count > 0),
                "{algorithm:?}: {counts:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retain_forgets_the_state_of_endpoints_gone() {
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 1]);
        for candidate in &candidates {
            let pick = balancers
                .pick(SERVICE, Policy::default(), &[*candidate], &[])
                .unwrap();
            pick.observe(Duration::from_secs(1));
        }
        balancers.retain(&HashSet::from([candidates[1].address]));
        assert_eq!(estimate(&balancers, candidates[0].address), None);
        assert_eq!(
            estimate(&balancers, candidates[1].address),
            Some(Duration::from_secs(1))
        );
        let again = balancers
            .pick(SERVICE, Policy::default(), &candidates[..1], &[])
            .unwrap();
        assert_eq!(again.address(), candidates[0].address);
        assert_eq!(
            estimate(&balancers, candidates[0].address),
            Some(ewma::DEFAULT_RTT)
        );
    }

    #[test]
    fn retain_forgets_the_rotations_of_services_not_picked_from() {
        let balancers = Balancers::new();
        let candidates = candidates(&[1, 1, 1]);
        let live = candidates.iter().map(|c| c.address).collect();
        let round_robin = policy(Algorithm::RoundRobin);
        assert_eq!(sequence(&balancers, round_robin, &candidates, 2), [0, 1]);
        balancers.retain(&live);
        assert_eq!(sequence(&balancers, round_robin, &candidates, 1), [2]);
        balancers.retain(&live);
        balancers.retain(&live);
        assert!(sync::read(&balancers.services).is_empty());
        assert_eq!(sequence(&balancers, round_robin, &candidates, 1), [0]);
    }
}
