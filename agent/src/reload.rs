//! Values the agent swaps while it runs (the mesh configuration, the certificates),
//! and the loop that reloads them when their files change.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

/// The current version of a value, replaced as a whole; readers keep the `Arc` they got
/// for as long as they need a consistent view, and may [`Current::subscribe`] to hear
/// of replacements.
#[derive(Debug)]
pub struct Current<T> {
    value: RwLock<Arc<T>>,
    replaced: watch::Sender<()>,
}

impl<T: Default> Default for Current<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T> Current<T> {
    pub fn new(value: T) -> Self {
        Self {
            value: RwLock::new(Arc::new(value)),
            replaced: watch::Sender::new(()),
        }
    }

    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.value.read().expect("a reader panicked"))
    }

    pub fn replace(&self, value: T) {
        *self.value.write().expect("a writer panicked") = Arc::new(value);
        self.replaced.send_replace(());
    }

    /// A receiver that sees a change after every [`Current::replace`].
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.replaced.subscribe()
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
