//! Node-wide state kept per service under the service's policy — retry budgets,
//! circuit breakers — shared by every client of the node: looked up by the service's
//! key under a read lock, started over when the policy changes, forgotten when unused.

use std::{
    collections::HashMap,
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use crate::sync;

/// The state `T` of each service, made from its policy `P`.
#[derive(Debug)]
pub struct PerService<P, T> {
    entries: RwLock<HashMap<String, Entry<P, T>>>,
}

#[derive(Debug)]
struct Entry<P, T> {
    policy: P,
    state: Arc<T>,
    /// Looked up since the last [`PerService::retain_used`].
    used: AtomicBool,
}

impl<P, T> Default for PerService<P, T> {
    fn default() -> Self {
        Self {
            entries: RwLock::default(),
        }
    }
}

impl<P: PartialEq + Clone, T> PerService<P, T> {
    /// The state of `service` (a key such as "namespace/name:port") under `policy`,
    /// made by `make` the first time and whenever the policy changed.
    pub fn of(&self, service: &str, policy: &P, make: impl FnOnce(&P) -> T) -> Arc<T> {
        if let Some(entry) = sync::read(&self.entries).get(service)
            && entry.policy == *policy
        {
            // Read first: a store on every request would bounce the line between cores.
            if !entry.used.load(Ordering::Relaxed) {
                entry.used.store(true, Ordering::Relaxed);
            }
            return Arc::clone(&entry.state);
        }
        let mut entries = sync::write(&self.entries);
        // Another request may have made it since the read.
        if let Some(entry) = entries.get(service)
            && entry.policy == *policy
        {
            return Arc::clone(&entry.state);
        }
        let state = Arc::new(make(policy));
        let entry = Entry {
            policy: policy.clone(),
            state: Arc::clone(&state),
            used: AtomicBool::new(true),
        };
        entries.insert(service.to_owned(), entry);
        state
    }

    /// Forgets the services not looked up since the previous call.
    pub fn retain_used(&self) {
        sync::write(&self.entries).retain(|_, entry| entry.used.swap(false, Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_policy_starts_over_and_unused_services_are_forgotten() {
        let store: PerService<u32, String> = PerService::default();
        let made = |policy: &u32| format!("made under {policy}");
        let first = store.of("shop/web:80", &1, made);
        assert!(Arc::ptr_eq(&first, &store.of("shop/web:80", &1, made)));
        let changed = store.of("shop/web:80", &2, made);
        assert_eq!(*changed, "made under 2");
        store.of("shop/api:80", &1, made);
        store.retain_used();
        assert_eq!(sync::read(&store.entries).len(), 2, "both were used");
        store.of("shop/api:80", &1, made);
        store.retain_used();
        let left: Vec<String> = sync::read(&store.entries).keys().cloned().collect();
        assert_eq!(left, ["shop/api:80"]);
    }
}
