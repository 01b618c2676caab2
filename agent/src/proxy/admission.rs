//! Admission: how many connections the agent takes on, from everywhere and from one
//! source address, before they are authenticated and after, so that one host on the
//! node network (or one pod) can neither use up the agent's file descriptors nor
//! starve the peers it must serve.
//!
//! A connection is *pending* from accept() until it is authenticated — on 15008 when
//! its TLS handshake has proven a mesh identity, on 15001 when the kernel's record and
//! the mesh configuration have named its source — and *established* after. Each
//! HBONE tunnel served inbound counts towards the total too (it holds a socket to the
//! pod), but not towards its source's share: tunnels come from authenticated agents.
//! [`decide`] is the rule; [`Admission`] keeps the counts.
//!
//! A TLS handshake costs the server a key exchange and a signature even when the
//! client never had a certificate, so on the HBONE port each source may also start
//! only so many handshakes a second ([`Bucket`]); a peer agent opens a handful of
//! pooled connections, a flood thousands.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio::time::Instant;

use crate::sync;

/// Descriptors kept for the agent itself (maps, logs, listeners, the controller's
/// channel, the CNI socket) outside every connection budget.
const OWN_DESCRIPTORS: u64 = 256;

/// Sets the soft open-file limit to `wanted`, or by default raises it to the hard
/// limit (a root agent raises the hard limit too when `wanted` is above it), and
/// returns the limit in effect.
pub fn set_open_files(wanted: Option<u64>) -> Result<u64, nix::Error> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let target = wanted.unwrap_or(hard);
    if target != soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard.max(target))?;
    }
    Ok(target)
}

/// What the agent takes on at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections and inbound tunnels, everything counted.
    pub total: usize,
    /// Pending connections from everywhere: below `total`, so that what is left is
    /// always there for authenticated peers.
    pub pending: usize,
    /// Connections from one source address, pending or established.
    pub per_source: usize,
    /// Pending connections from one source address.
    pub pending_per_source: usize,
    /// TLS handshakes one source address may start a second on the HBONE port, with
    /// bursts of twice as many.
    pub handshakes_per_source: u32,
}

impl Limits {
    /// Limits for a process that may hold `open_files` descriptors.
    ///
    /// A carried connection holds two (the accepted socket and the one to its
    /// destination), so `total` is half of what is left after the agent's own.
    /// Unauthenticated connections may take three quarters of it; one source may hold
    /// a quarter of it, and 256 pending (a node's agent opens a handful of HBONE
    /// connections at once, a pod rarely hundreds of connections in its first
    /// milliseconds).
    pub fn for_open_files(open_files: u64) -> Limits {
        let total = usize::try_from(open_files.saturating_sub(OWN_DESCRIPTORS) / 2)
            .unwrap_or(usize::MAX)
            .max(4);
        Limits {
            total,
            pending: total / 4 * 3,
            per_source: total / 4,
            pending_per_source: 256.min(total / 4),
            handshakes_per_source: 256,
        }
    }
}

/// Why a connection was not taken on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "the source has too many connections waiting to authenticate (a host without a mesh \
         certificate flooding the port, or a pod the mesh configuration does not name)"
    )]
    SourcePending,
    #[error("the source holds its share of the agent's connections already")]
    Source,
    #[error(
        "the source starts TLS handshakes faster than any agent would (a handshake flood, or \
         a peer that cannot keep a connection)"
    )]
    SourceHandshakes,
    #[error(
        "too many connections are waiting to authenticate; the rest is kept for authenticated peers"
    )]
    Pending,
    #[error(
        "the agent carries as many connections as its open-file limit allows (raise the limit, \
         or spread the load over more nodes)"
    )]
    Total,
}

impl Refused {
    /// The `weft_connections_refused_total` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::SourcePending => "source_pending_limit",
            Refused::SourceHandshakes => "source_handshake_rate",
            Refused::Source => "source_limit",
            Refused::Pending => "pending_limit",
            Refused::Total => "connection_limit",
        }
    }
}

/// Counts of one source, or of everything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: usize,
    pub established: usize,
}

impl Counts {
    fn all(self) -> usize {
        self.pending + self.established
    }
}

/// Where a connection comes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    /// 15001: a local pod's connection, captured by the kernel, which vouches for its
    /// source. Naming the source costs a map lookup, and a pod may open hundreds of
    /// connections in its first milliseconds, so only its share and the agent's caps
    /// apply, not a pending share of its own.
    Captured,
    /// 15008: a TLS handshake from anywhere on the node network.
    Hbone,
}

/// Whether one more pending connection through `door` from a source with `source`
/// counts fits, when the agent holds `everything`.
pub fn decide(
    everything: Counts,
    source: Counts,
    limits: &Limits,
    door: Door,
) -> Result<(), Refused> {
    if everything.all() >= limits.total {
        Err(Refused::Total)
    } else if everything.pending >= limits.pending {
        Err(Refused::Pending)
    } else if door == Door::Hbone && source.pending >= limits.pending_per_source {
        Err(Refused::SourcePending)
    } else if source.all() >= limits.per_source {
        Err(Refused::Source)
    } else {
        Ok(())
    }
}

/// A token bucket: `rate` tokens a second, holding at most `2 × rate`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    pub fn full(rate: u32, now: Instant) -> Self {
        Self {
            tokens: Self::capacity(rate),
            refilled: now,
        }
    }

    fn capacity(rate: u32) -> f64 {
        2.0 * f64::from(rate)
    }

    /// Takes a token if there is one.
    pub fn take(&mut self, rate: u32, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * f64::from(rate);
        self.tokens = (self.tokens + earned).min(Self::capacity(rate));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full by `now`: nothing to remember about its source.
    fn is_full(&self, rate: u32, now: Instant) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * f64::from(rate);
        self.tokens + earned >= Self::capacity(rate)
    }
}

/// The counts of everything the agent carries.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counts: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    everything: Counts,
    /// The most held at once since [`Admission::take_peak`] last looked.
    peak: usize,
    by_source: HashMap<IpAddr, Counts>,
    /// Handshake budgets of the sources that used some lately.
    handshakes: HashMap<IpAddr, Bucket>,
}

/// Sources whose handshake budgets are remembered before full ones are forgotten.
const REMEMBERED_BUDGETS: usize = 1024;

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(State::default()),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes on a captured connection just accepted from `source`, as pending.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refused> {
        let mut state = sync::lock(&self.counts);
        let known = state.by_source.get(&source).copied().unwrap_or_default();
        decide(state.everything, known, &self.limits, Door::Captured)?;
        Ok(self.count(&mut state, source))
    }

    /// Takes on a connection to the HBONE port just accepted from `source`, as pending:
    /// within the source's pending share and its handshake rate too.
    pub fn admit_handshake(self: &Arc<Self>, source: IpAddr) -> Result<Permit, Refused> {
        let rate = self.limits.handshakes_per_source;
        let now = Instant::now();
        let mut state = sync::lock(&self.counts);
        let known = state.by_source.get(&source).copied().unwrap_or_default();
        decide(state.everything, known, &self.limits, Door::Hbone)?;
        if state.handshakes.len() >= REMEMBERED_BUDGETS {
            state
                .handshakes
                .retain(|_, bucket| !bucket.is_full(rate, now));
        }
        let bucket = state
            .handshakes
            .entry(source)
            .or_insert_with(|| Bucket::full(rate, now));
        if !bucket.take(rate, now) {
            return Err(Refused::SourceHandshakes);
        }
        Ok(self.count(&mut state, source))
    }

    fn count(self: &Arc<Self>, state: &mut State, source: IpAddr) -> Permit {
        state.everything.pending += 1;
        state.peak = state.peak.max(state.everything.all());
        state.by_source.entry(source).or_default().pending += 1;
        Permit {
            admission: Arc::clone(self),
            source: Some(source),
            pending: true,
        }
    }

    /// Takes on an HBONE tunnel of an authenticated connection.
    pub fn admit_tunnel(self: &Arc<Self>) -> Result<Permit, Refused> {
        let mut state = sync::lock(&self.counts);
        if state.everything.all() >= self.limits.total {
            return Err(Refused::Total);
        }
        state.everything.established += 1;
        state.peak = state.peak.max(state.everything.all());
        Ok(Permit {
            admission: Arc::clone(self),
            source: None,
            pending: false,
        })
    }

    /// What the agent holds now: everything, and the source holding the most.
    pub fn counts(&self) -> (Counts, Option<(IpAddr, Counts)>) {
        let state = sync::lock(&self.counts);
        let busiest = state
            .by_source
            .iter()
            .max_by_key(|(_, counts)| counts.all())
            .map(|(source, counts)| (*source, *counts));
        (state.everything, busiest)
    }

    /// The most connections held at once since the last call, and how many are held
    /// now (which the next call's peak starts from).
    pub fn take_peak(&self) -> (usize, usize) {
        let mut state = sync::lock(&self.counts);
        let now = state.everything.all();
        (std::mem::replace(&mut state.peak, now), now)
    }

    fn release(&self, source: Option<IpAddr>, pending: bool) {
        let mut state = sync::lock(&self.counts);
        let counts = |counts: &mut Counts| {
            if pending {
                counts.pending -= 1;
            } else {
                counts.established -= 1;
            }
        };
        counts(&mut state.everything);
        if let Some(source) = source
            && let Some(by_source) = state.by_source.get_mut(&source)
        {
            counts(by_source);
            if by_source.all() == 0 {
                state.by_source.remove(&source);
            }
        }
    }
}

/// A connection's place in the counts, given back when dropped.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    source: Option<IpAddr>,
    pending: bool,
}

impl Permit {
    /// The connection proved who it is: it is established from now on.
    pub fn authenticated(&mut self) {
        if !self.pending {
            return;
        }
        let mut state = sync::lock(&self.admission.counts);
        state.everything.pending -= 1;
        state.everything.established += 1;
        if let Some(source) = self.source
            && let Some(counts) = state.by_source.get_mut(&source)
        {
            counts.pending -= 1;
            counts.established += 1;
        }
        self.pending = false;
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.release(self.source, self.pending);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const LIMITS: Limits = Limits {
        total: 100,
        pending: 75,
        per_source: 25,
        pending_per_source: 10,
        handshakes_per_source: 5,
    };

    fn counts(pending: usize, established: usize) -> Counts {
        Counts {
            pending,
            established,
        }
    }

    #[test]
    fn the_tightest_limit_decides() {
        let cases = [
            // A pod's own burst is only held to its share.
            (counts(10, 0), counts(10, 0), Door::Captured, Ok(())),
            (
                counts(25, 0),
                counts(24, 1),
                Door::Captured,
                Err(Refused::Source),
            ),
            (
                counts(75, 0),
                counts(0, 0),
                Door::Captured,
                Err(Refused::Pending),
            ),
        ];
        for (everything, source, door, expected) in cases {
            assert_eq!(
                decide(everything, source, &LIMITS, door),
                expected,
                "{everything:?} {source:?} {door:?}"
            );
        }
        let cases = [
            (counts(0, 0), counts(0, 0), Ok(())),
            (counts(9, 50), counts(9, 15), Ok(())),
            (counts(10, 50), counts(10, 0), Err(Refused::SourcePending)),
            (counts(10, 50), counts(5, 20), Err(Refused::Source)),
            // A source that floods unauthenticated is told so, whatever its total.
            (counts(25, 0), counts(25, 0), Err(Refused::SourcePending)),
            (counts(75, 0), counts(0, 0), Err(Refused::Pending)),
            // Authenticated connections may use what pending ones may not.
            (counts(10, 80), counts(0, 0), Ok(())),
            (counts(10, 90), counts(0, 0), Err(Refused::Total)),
            (counts(75, 25), counts(10, 15), Err(Refused::Total)),
        ];
        for (everything, source, expected) in cases {
            assert_eq!(
                decide(everything, source, &LIMITS, Door::Hbone),
                expected,
                "{everything:?} {source:?}"
            );
        }
    }

    #[test]
    fn limits_follow_the_open_file_limit() {
        let limits = Limits::for_open_files(20_000);
        assert_eq!(limits.total, 9872);
        assert_eq!(limits.pending, 7404);
        assert_eq!(limits.per_source, 2468);
        assert_eq!(limits.pending_per_source, 256);
        let tiny = Limits::for_open_files(10);
        assert!(
            tiny.total >= 4 && tiny.pending >= 1 && tiny.per_source >= 1,
            "{tiny:?}"
        );
        assert!(tiny.pending_per_source >= 1, "{tiny:?}");
    }

    #[test]
    fn permits_move_from_pending_to_established_and_give_their_place_back() {
        let admission = Admission::new(Limits {
            handshakes_per_source: 1000,
            ..LIMITS
        });
        let flooder: IpAddr = "10.99.0.254".parse().unwrap();
        let peer: IpAddr = "10.99.0.2".parse().unwrap();
        let mut held: Vec<Permit> = (0..10)
            .map(|_| admission.admit_handshake(flooder).unwrap())
            .collect();
        assert_eq!(
            admission.admit_handshake(flooder).unwrap_err(),
            Refused::SourcePending
        );
        // Another source is not held back by the first.
        let mut permit = admission.admit_handshake(peer).unwrap();
        permit.authenticated();
        assert_eq!(admission.counts().0, counts(10, 1));
        // Authenticated, the flooder's connections no longer count as pending ...
        for permit in &mut held {
            permit.authenticated();
        }
        let mut more: Vec<Permit> = (0..10)
            .map(|_| admission.admit_handshake(flooder).unwrap())
            .collect();
        let (everything, busiest) = admission.counts();
        assert_eq!(everything, counts(10, 11));
        assert_eq!(busiest, Some((flooder, counts(10, 10))));
        // ... but still towards its share.
        for permit in &mut more {
            permit.authenticated();
        }
        let last: Vec<Permit> = (0..5)
            .map(|_| admission.admit_handshake(flooder).unwrap())
            .collect();
        assert_eq!(
            admission.admit_handshake(flooder).unwrap_err(),
            Refused::Source
        );
        let tunnels: Vec<Permit> = (0..5).map(|_| admission.admit_tunnel().unwrap()).collect();
        assert_eq!(admission.counts().0, counts(5, 26));
        assert_eq!(admission.take_peak(), (31, 31));
        drop((held, more, last, tunnels, permit));
        assert_eq!(admission.counts(), (Counts::default(), None));
        assert_eq!(admission.take_peak(), (31, 0));
        assert_eq!(admission.take_peak(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_starts_only_so_many_handshakes_a_second() {
        let admission = Admission::new(LIMITS);
        let flooder: IpAddr = "10.99.0.254".parse().unwrap();
        let peer: IpAddr = "10.99.0.2".parse().unwrap();
        // A burst of twice the rate, each connection gone at once (a failed handshake).
        for _ in 0..10 {
            drop(admission.admit_handshake(flooder).unwrap());
        }
        assert_eq!(
            admission.admit_handshake(flooder).unwrap_err(),
            Refused::SourceHandshakes
        );
        // Others are not held back, nor the flooder's connections on another port.
        drop(admission.admit_handshake(peer).unwrap());
        drop(admission.admit(flooder).unwrap());
        // Five a second come back.
        tokio::time::sleep(Duration::from_millis(400)).await;
        drop(admission.admit_handshake(flooder).unwrap());
        drop(admission.admit_handshake(flooder).unwrap());
        assert!(admission.admit_handshake(flooder).is_err());
    }

    #[test]
    fn buckets_refill_at_their_rate_up_to_twice_it() {
        let start = Instant::now();
        let mut bucket = Bucket::full(2, start);
        assert!((0..4).all(|_| bucket.take(2, start)));
        assert!(!bucket.take(2, start));
        assert!(bucket.take(2, start + Duration::from_millis(500)));
        assert!(!bucket.take(2, start + Duration::from_millis(500)));
        assert!(!bucket.is_full(2, start + Duration::from_secs(1)));
        assert!(bucket.is_full(2, start + Duration::from_secs(3)));
        let later = start + Duration::from_secs(3600);
        assert!(
            (0..4).all(|_| bucket.take(2, later)),
            "no more than the capacity is kept"
        );
        assert!(!bucket.take(2, later));
    }
}
