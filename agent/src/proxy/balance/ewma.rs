//! The peak-EWMA latency estimate of one endpoint, as Linkerd balances: a sample slower
//! than the estimate is believed at once, faster ones only as time passes, and an
//! estimate that no sample refreshes fades towards zero, so that an endpoint avoided
//! for being slow is tried again once in a while and can show that it recovered.

use std::time::Duration;

use tokio::time::Instant;

/// How fast the past loses its say: a value `DECAY` old weighs 1/e.
pub const DECAY: Duration = Duration::from_secs(10);

/// The estimate of an endpoint before its first sample: low enough that a new endpoint
/// is tried, not zero so that it is not sent everything until it answers.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakEwma {
    /// The estimate when it was last set, in nanoseconds.
    nanos: f64,
    at: Instant,
}

impl PeakEwma {
    /// An estimate of [`DEFAULT_RTT`], set at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            nanos: DEFAULT_RTT.as_nanos() as f64,
            at: now,
        }
    }

    /// Takes in a latency measured at `now`.
    pub fn observe(&mut self, now: Instant, sample: Duration) {
        let sample = sample.as_nanos() as f64;
        if sample > self.nanos {
            self.nanos = sample;
        } else {
            let kept = kept(now.saturating_duration_since(self.at));
            self.nanos = self.nanos * kept + sample * (1.0 - kept);
        }
        self.at = self.at.max(now);
    }

    /// The estimate at `now`: the last one, faded towards zero for the time since.
    ///
    /// Fading only when read, without storing the result, keeps picks from writing to
    /// the endpoint's state and leaves the next sample the weight its age gives it.
    pub fn estimate(&self, now: Instant) -> Duration {
        let kept = kept(now.saturating_duration_since(self.at));
        Duration::from_secs_f64(self.nanos * kept / 1e9)
    }
}

/// The weight of a value `elapsed` old against a new one.
fn kept(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(estimate: Duration) -> f64 {
        estimate.as_secs_f64() * 1e3
    }

    fn close(actual: Duration, expected_millis: f64) -> bool {
        (millis(actual) - expected_millis).abs() < 0.01
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_starts_at_the_default_and_fades() {
        let ewma = PeakEwma::new(Instant::now());
        assert!(close(ewma.estimate(Instant::now()), 30.0));
        tokio::time::advance(DECAY).await;
        assert!(close(
            ewma.estimate(Instant::now()),
            30.0 / std::f64::consts::E
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slower_sample_replaces_the_estimate_at_once() {
        let mut ewma = PeakEwma::new(Instant::now());
        ewma.observe(Instant::now(), Duration::from_millis(500));
        assert!(close(ewma.estimate(Instant::now()), 500.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_faster_sample_counts_by_the_time_since_the_last() {
        let cases = [
            // (seconds since the last sample, expected estimate in ms) from 100 ms
            // towards a sample of 10 ms.
            (0.0, 100.0),
            (10.0, 10.0 + 90.0 / std::f64::consts::E),
            (20.0, 10.0 + 90.0 * (-2.0f64).exp()),
            (600.0, 10.0),
        ];
        for (seconds, expected) in cases {
            let start = Instant::now();
            let mut ewma = PeakEwma::new(start);
            ewma.observe(start, Duration::from_millis(100));
            let now = start + Duration::from_secs_f64(seconds);
            ewma.observe(now, Duration::from_millis(10));
            assert!(
                close(ewma.estimate(now), expected),
                "{seconds} s: {:?}",
                ewma.estimate(now)
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sample_older_than_the_estimate_changes_nothing() {
        let start = Instant::now();
        let mut ewma = PeakEwma::new(start);
        ewma.observe(start + Duration::from_secs(1), Duration::from_millis(100));
        ewma.observe(start, Duration::from_millis(10));
        assert!(close(ewma.estimate(start + Duration::from_secs(1)), 100.0));
    }
}
