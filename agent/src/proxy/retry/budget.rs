//! Retry budgets (Linkerd's and Envoy's model): a service's retries may add at most a
//! share of its recent requests, plus a few per second so that a quiet service still
//! retries. When the whole service fails, retries stop at the budget instead of
//! multiplying its load.
//!
//! "Recent" is the last 10 seconds, kept as per-second slots of atomic counts: a
//! request costs one atomic add, a retry a sum over the slots. Counts racing a slot's
//! turnover may be lost; a budget is a bound, not an audit.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::proxy::per_service::PerService;

/// The seconds a budget looks back.
const WINDOW: u64 = 10;

/// A service's budget (TrafficPolicy `retries.budget`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BudgetPolicy {
    /// Retries may add this percentage of the requests...
    pub percent: u32,
    /// ...plus this many each second.
    pub min_per_second: u32,
}

impl Default for BudgetPolicy {
    fn default() -> Self {
        Self {
            percent: 20,
            min_per_second: 10,
        }
    }
}

/// The requests and retries of one service over the last [`WINDOW`] seconds.
#[derive(Debug)]
pub struct Budget {
    policy: BudgetPolicy,
    start: Instant,
    slots: [Slot; WINDOW as usize],
}

#[derive(Debug, Default)]
struct Slot {
    /// The second (since `start`) the counts are of.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl Budget {
    pub fn new(policy: BudgetPolicy) -> Self {
        Self {
            policy,
            start: Instant::now(),
            slots: Default::default(),
        }
    }

    /// A request (not a retry) was sent.
    pub fn deposit(&self) {
        let (slot, _) = self.slot(Instant::now());
        slot.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a retry may go now; if it may, it is counted.
    pub fn withdraw(&self) -> bool {
        let (slot, second) = self.slot(Instant::now());
        let (mut requests, mut retries) = (0, 0);
        for slot in &self.slots {
            if slot.second.load(Ordering::Relaxed) + WINDOW > second {
                requests += slot.requests.load(Ordering::Relaxed);
                retries += slot.retries.load(Ordering::Relaxed);
            }
        }
        let allowed = u64::from(self.policy.min_per_second) * WINDOW
            + requests * u64::from(self.policy.percent) / 100;
        if retries >= allowed {
            return false;
        }
        slot.retries.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// The slot of the second `now` falls in, emptied first if it held an older one.
    fn slot(&self, now: Instant) -> (&Slot, u64) {
        let second = now.duration_since(self.start).as_secs();
        let slot = &self.slots[(second % WINDOW) as usize];
        let held = slot.second.load(Ordering::Relaxed);
        if held != second
            && slot
                .second
                .compare_exchange(held, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        (slot, second)
    }
}

/// Every service's budget on this node, shared by all its clients here.
pub type Budgets = PerService<BudgetPolicy, Budget>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn retries_allowed(budget: &Budget) -> usize {
        std::iter::from_fn(|| budget.withdraw().then_some(()))
            .take(10_000)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_recent_requests_plus_a_floor() {
        let budget = Budget::new(BudgetPolicy {
            percent: 20,
            min_per_second: 1,
        });
        // Quiet: the floor, 1 a second over the window.
        assert_eq!(retries_allowed(&budget), 10);
        for _ in 0..1000 {
            budget.deposit();
        }
        // 20 % of 1000 more.
        assert_eq!(retries_allowed(&budget), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn what_was_spent_comes_back_as_the_window_moves_on() {
        let budget = Budget::new(BudgetPolicy {
            percent: 50,
            min_per_second: 0,
        });
        for _ in 0..100 {
            budget.deposit();
        }
        assert_eq!(retries_allowed(&budget), 50);
        tokio::time::advance(Duration::from_secs(5)).await;
        for _ in 0..100 {
            budget.deposit();
        }
        // 200 requests in the window, 50 retries already spent.
        assert_eq!(retries_allowed(&budget), 50);
        // The first second's requests and retries leave the window.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(retries_allowed(&budget), 0, "100 requests, 50 retries left");
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(retries_allowed(&budget), 0, "nothing in the window");
        budget.deposit();
        budget.deposit();
        assert_eq!(retries_allowed(&budget), 1);
    }
}
