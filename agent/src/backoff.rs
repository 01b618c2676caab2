//! Exponential backoff with jitter, for everything the agent retries against the
//! controller.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Exponential backoff with jitter: 0.5 s doubling up to 30 s.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    pub fn next_delay(&mut self) -> Duration {
        let base = Self::FIRST
            .saturating_mul(1 << self.failures.min(6))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        // Up to 25% jitter, so agents that lost the controller together do not return
        // together.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        base + base.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first >= Backoff::FIRST && first <= Backoff::FIRST.mul_f64(1.25));
        let delays: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Backoff::MAX.mul_f64(1.25)));
        assert!(*delays.last().unwrap() >= Backoff::MAX);
        backoff.reset();
        assert!(backoff.next_delay() <= Backoff::FIRST.mul_f64(1.25));
    }
}
