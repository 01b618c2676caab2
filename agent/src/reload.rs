//! Values the agent swaps while it runs (the mesh configuration, the certificates),
//! and the loop that reloads them when their files change.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, time::Instant};

use crate::sync;

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
        Arc::clone(&sync::read(&self.value))
    }

    pub fn replace(&self, value: T) {
        *sync::write(&self.value) = Arc::new(value);
        self.replaced.send_replace(());
    }

    /// What `ready` finds in the current value, waiting through replacements until it
    /// finds something or `deadline` passes (then `None`).
    pub async fn wait_for<R>(
        &self,
        deadline: Instant,
        mut ready: impl FnMut(&T) -> Option<R>,
    ) -> Option<R> {
        let mut replaced = self.subscribe();
        loop {
            // Marked seen before looking, so a replacement made after the look wakes us.
            replaced.borrow_and_update();
            if let Some(found) = ready(&self.get()) {
                return Some(found);
            }
            match tokio::time::timeout_at(deadline, replaced.changed()).await {
                Ok(Ok(())) => {}
                // The sender lives in `self`: it cannot be gone while we are borrowed.
                Ok(Err(_)) | Err(_) => return None,
            }
        }
    }

    /// A receiver that sees a change after every [`Current::replace`].
    pub fn subscribe(&self) -> watch::Receiver<()> {
        self.replaced.subscribe()
    }
}

/// Calls `reload` (and waits for it) whenever the modification time of `path` (a file,
/// or a directory whose entries change) moves, checking every `interval`.
pub async fn on_change<F, Fut>(path: PathBuf, interval: Duration, mut reload: F)
where
    F: FnMut(PathBuf) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
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
            reload(path.clone()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waiting_sees_a_replacement_before_the_deadline_and_gives_up_after_it() {
        let current = Arc::new(Current::new(0));
        let later = Arc::clone(&current);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            later.replace(1);
            tokio::time::sleep(Duration::from_secs(1)).await;
            later.replace(7);
        });
        let started = Instant::now();
        let deadline = started + Duration::from_secs(5);
        let found = current
            .wait_for(deadline, |value| (*value > 5).then_some(*value))
            .await;
        assert_eq!(found, Some(7));
        assert_eq!(started.elapsed(), Duration::from_secs(3));

        let started = Instant::now();
        let deadline = started + Duration::from_secs(5);
        let never = current.wait_for(deadline, |value| (*value > 7).then_some(()));
        assert_eq!(never.await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // What is there already is found at once, even past the deadline.
        assert_eq!(
            current.wait_for(deadline, |value| Some(*value)).await,
            Some(7)
        );
    }
}
