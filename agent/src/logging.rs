//! The agent's log: env_logger filters that the admin endpoint can replace at run time.

pub mod access;

use std::sync::RwLock;

use log::{Log, Metadata, Record};

use crate::sync;

/// The installed logger; `set_filter` swaps its filter.
struct Switchable(RwLock<env_logger::Logger>);

static LOGGER: std::sync::OnceLock<Switchable> = std::sync::OnceLock::new();

impl Log for Switchable {
    fn enabled(&self, metadata: &Metadata) -> bool {
        sync::read(&self.0).enabled(metadata)
    }

    fn log(&self, record: &Record) {
        sync::read(&self.0).log(record);
    }

    fn flush(&self) {
        sync::read(&self.0).flush();
    }
}

fn build(filter: &str) -> env_logger::Logger {
    env_logger::Builder::new().parse_filters(filter).build()
}

/// Installs the logger with `filter` (env_logger syntax, such as `info,weft_ebpf=debug`).
pub fn init(filter: &str) {
    let logger = LOGGER.get_or_init(|| Switchable(RwLock::new(build(filter))));
    if log::set_logger(logger).is_ok() {
        set_max_level(&sync::read(&logger.0));
    }
}

/// Replaces the filter of the installed logger.
pub fn set_filter(filter: &str) {
    if let Some(logger) = LOGGER.get() {
        let built = build(filter);
        set_max_level(&built);
        *sync::write(&logger.0) = built;
    }
}

/// Lets the `log` macros skip, without a call or a lock, every record more verbose
/// than the filter lets through anywhere (rustls and h2 trace on every record and
/// frame).
fn set_max_level(logger: &env_logger::Logger) {
    log::set_max_level(logger.filter());
}

/// Lets a log call site write at most one line a second: a flood of refusals would
/// otherwise write a line per connection. The line that gets through says how many
/// were held back before it.
#[derive(Debug)]
pub struct Throttle {
    /// When the last line was written, and how many were held back since.
    state: std::sync::Mutex<(Option<tokio::time::Instant>, u64)>,
}

impl Throttle {
    const INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

    pub const fn new() -> Self {
        Self {
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(held back)` when a line may be written now; `None` to hold it back.
    pub fn allow(&self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        let mut state = sync::lock(&self.state);
        let (last, held_back) = &mut *state;
        if last.is_some_and(|last| now < last + Self::INTERVAL) {
            *held_back += 1;
            return None;
        }
        *last = Some(now);
        Some(std::mem::take(held_back))
    }
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new()
    }
}

/// ` (and N more like it in the last second)`, or nothing for N = 0.
pub fn held_back(count: u64) -> String {
    if count == 0 {
        String::new()
    } else {
        format!(" (and {count} more like it since the last such line)")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_throttle_lets_one_line_a_second_through_and_counts_the_rest() {
        let throttle = Throttle::new();
        assert_eq!(throttle.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(throttle.allow(), None);
        }
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(throttle.allow(), None);
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(throttle.allow(), Some(1001));
        assert_eq!(throttle.allow(), None);
        assert_eq!(held_back(0), "");
        assert!(held_back(3).contains("3 more"));
    }
}
