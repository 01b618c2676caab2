//! Rapid reset from a peer agent: the tunnels a peer resets as soon as they are
//! opened are counted as the inspector sees them ([`PrematureResets`]), and once they
//! outrun their budget the HBONE server accepts the peer's next tunnels only as fast as
//! the budget refills ([`Pacing`]). A peer's connection carries every tunnel of its
//! clients, so it is paced rather than closed: its other tunnels go on, its new ones
//! wait (h2 queues them, and the peer counts them against its limit of concurrent
//! streams), and the pods behind the agent are dialled at most at the budget's rate.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use metrics::{counter, describe_counter};
use tokio::time::Instant;

use crate::proxy::admission::Bucket;

/// Tunnels a peer may reset within [`super::PREMATURE`] of opening them, a second
/// (twice that in a burst), before its new tunnels wait: ten pods' worth of the budget
/// each pod has on its own connection, whose cancellations a peer passes on.
pub const PEER_RESET_RATE: u32 = 1000;

pub fn describe() {
    describe_counter!(
        "weft_hbone_paced_total",
        "Times the agent began to hold back a peer's new HBONE tunnels because the peer \
         reset more tunnels within 1 s of opening them than its budget allows (rapid \
         reset); the peer's connection is paced, not closed"
    );
}

/// The streams a client reset within [`super::PREMATURE`] of opening them, as the
/// inspector of its connection counted them.
#[derive(Clone, Debug, Default)]
pub struct PrematureResets(Arc<AtomicU64>);

impl PrematureResets {
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub(super) fn add(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether a peer's new tunnels must wait: each premature reset takes a token of a
/// bucket of [`PEER_RESET_RATE`]; the resets the bucket cannot pay for are owed, and
/// while any is, new tunnels wait for the tokens to come.
#[derive(Debug)]
pub struct Pacing {
    bucket: Bucket,
    counted: u64,
    owed: u64,
}

impl Pacing {
    pub fn new(now: Instant) -> Self {
        Self {
            bucket: Bucket::full(PEER_RESET_RATE, now),
            counted: 0,
            owed: 0,
        }
    }

    /// With `resets` counted on the connection so far: `None` if new tunnels may be
    /// accepted now, else when to ask again (when the next token comes).
    pub fn wait(&mut self, resets: u64, now: Instant) -> Option<Instant> {
        self.owed += resets.saturating_sub(self.counted);
        self.counted = self.counted.max(resets);
        while self.owed > 0 && self.bucket.take(PEER_RESET_RATE, now) {
            self.owed -= 1;
        }
        (self.owed > 0).then(|| now + Duration::from_secs(1) / PEER_RESET_RATE)
    }
}

/// Counts one time a peer's new tunnels began to be held back.
pub fn paced() {
    counter!("weft_hbone_paced_total").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_within_the_budget_and_its_burst_hold_nothing_back() {
        let start = Instant::now();
        let mut pacing = Pacing::new(start);
        // A burst of twice the rate at once, then half the rate for a second.
        assert_eq!(pacing.wait(2 * u64::from(PEER_RESET_RATE), start), None);
        let mut resets = 2 * u64::from(PEER_RESET_RATE);
        for millis in (2..=1000).step_by(2) {
            resets += 1;
            let now = start + Duration::from_millis(millis);
            assert_eq!(pacing.wait(resets, now), None, "at {millis} ms");
        }
    }

    #[test]
    fn resets_beyond_the_budget_hold_new_tunnels_back_until_paid_for() {
        let start = Instant::now();
        let mut pacing = Pacing::new(start);
        let millisecond = Duration::from_millis(1);
        // Fifty resets more than the burst: they are paid for one a millisecond (one
        // more wait where a token's float falls just short).
        let resets = 2 * u64::from(PEER_RESET_RATE) + 50;
        assert_eq!(pacing.wait(resets, start), Some(start + millisecond));
        let mut now = start;
        let mut waits = 0;
        while let Some(until) = pacing.wait(resets, now) {
            assert_eq!(until, now + millisecond);
            now = until;
            waits += 1;
        }
        assert!((50..=51).contains(&waits), "{waits} waits");
        // Asked again with no new reset, nothing is owed.
        assert_eq!(pacing.wait(resets, now), None);
    }
}
