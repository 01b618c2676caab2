//! The agent's log: env_logger filters that the admin endpoint can replace at run time.

use std::sync::RwLock;

use log::{Log, Metadata, Record};

/// The installed logger; `set_filter` swaps its filter.
struct Switchable(RwLock<env_logger::Logger>);

static LOGGER: std::sync::OnceLock<Switchable> = std::sync::OnceLock::new();

impl Log for Switchable {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.0.read().expect("logger lock").enabled(metadata)
    }

    fn log(&self, record: &Record) {
        self.0.read().expect("logger lock").log(record);
    }

    fn flush(&self) {
        self.0.read().expect("logger lock").flush();
    }
}

fn build(filter: &str) -> env_logger::Logger {
    env_logger::Builder::new().parse_filters(filter).build()
}

/// Installs the logger with `filter` (env_logger syntax, such as `info,weft_ebpf=debug`).
pub fn init(filter: &str) {
    let logger = LOGGER.get_or_init(|| Switchable(RwLock::new(build(filter))));
    if log::set_logger(logger).is_ok() {
        set_max_level(&logger.0.read().expect("logger lock"));
    }
}

/// Replaces the filter of the installed logger.
pub fn set_filter(filter: &str) {
    if let Some(logger) = LOGGER.get() {
        let built = build(filter);
        set_max_level(&built);
        *logger.0.write().expect("logger lock") = built;
    }
}

/// Lets the `log` macros skip, without a call or a lock, every record more verbose
/// than the filter lets through anywhere (rustls and h2 trace on every record and
/// frame).
fn set_max_level(logger: &env_logger::Logger) {
    log::set_max_level(logger.filter());
}
