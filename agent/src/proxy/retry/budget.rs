//! Retry budgets (Linkerd's and Envoy's model): a service's retries may add at most a
//! share of its recent requests, plus a few per second so that a quiet service still
//! retries. When the whole service fails, retries stop at the budget instead of
//! multiplying its load.
//!
//! "Recent" is the last 10 seconds, kept as per-second slots of atomic counts: a
//! request costs one atomic add, a retry a sum over the slots. Counts racing a slot's
//! turnover may be lost; a budget is a bound, not an audit.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use tokio::time::Instant;

use crate::sync;

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
    /// Used since the last [`Budgets::retain_used`].
    used: AtomicBool,
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
            used: AtomicBool::new(true),
        }
    }

    /// A request (not a retry) was sent.
    pub fn deposit(&self) {
        self.used.store(true, Ordering::Relaxed);
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
#[derive(Debug, Default)]
pub struct Budgets {
    budgets: RwLock<HashMap<String, Arc<Budget>>>,
}

impl Budgets {
    /// The budget of `service` (a key such as "namespace/name:port") under `policy`;
    /// a changed policy starts a new one.
    pub fn of(&self, service: &str, policy: BudgetPolicy) -> Arc<Budget> {
        if let Some(budget) = sync::read(&self.budgets).get(service)
            && budget.policy == policy
        {
            return Arc::clone(budget);
        }
        let mut budgets = sync::write(&self.budgets);
        let budget = budgets
            .entry(service.to_owned())
            .and_modify(|budget| {
                if budget.policy != policy {
                    *budget = Arc::new(Budget::new(policy));
                }
            })
            .or_insert_with(|| Arc::new(Budget::new(policy)));
        Arc::clone(budget)
    }

    /// Forgets the budgets not used since the previous call.
    pub fn retain_used(&self) {
        sync::write(&self.budgets).retain(|_, budget| budget.used.swap(false, Ordering::Relaxed));
    }
}

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

    #[tokio::test(start_paused = true)]
    async fn a_changed_policy_starts_over_and_unused_budgets_are_forgotten() {
        let budgets = Budgets::default();
        let policy = BudgetPolicy {
            percent: 0,
            min_per_second: 1,
        };
        let first = budgets.of("shop/web:80", policy);
        assert_eq!(retries_allowed(&first), 10);
        assert_eq!(retries_allowed(&budgets.of("shop/web:80", policy)), 0);
        let changed = BudgetPolicy {
            min_per_second: 2,
            ..policy
        };
        assert_eq!(retries_allowed(&budgets.of("shop/web:80", changed)), 20);
        budgets.retain_used();
        assert_eq!(
            sync::read(&budgets.budgets).len(),
            1,
            "new ones count as used"
        );
        budgets.retain_used();
        assert!(sync::read(&budgets.budgets).is_empty());
    }
}
