//! Values the agent swaps while it runs (the mesh configuration, the certificates),
//! and the loop that reloads them when their files change.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

/// The current version of a value, replaced as a whole; readers keep the `Arc` they got
/// for as long as they need a consistent view.
#[derive(Debug, Default)]
pub struct Current<T>(RwLock<Arc<T>>);

impl<T> Current<T> {
    pub fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }

    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.0.read().expect("a reader panicked"))
    }

    pub fn replace(&self, value: T) {
        *self.0.write().expect("a writer panicked") = Arc::new(value);
    }
}

/// Calls `reload` whenever the modification time of `path` (a file, or a directory
/// whose entries change) moves, checking every `interval`.
pub async fn on_change(path: PathBuf, interval: Duration, mut reload: impl FnMut(&Path)) {
    let stamp = |path: &Path| -> Option<SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        let mut newest = meta.modified().ok()?;
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).ok()?.flatten() {
                if let Ok(modified) = entry.metadata().and_then(|meta| meta.modified()) {
                    newest = newest.max(modified);
                }
            }
        }
        Some(newest)
    };
    let mut seen = stamp(&path);
    let mut ticks = tokio::time::interval(interval);
    loop {
        ticks.tick().await;
        let now = stamp(&path);
        if now != seen {
            seen = now;
            reload(&path);
        }
    }
}
