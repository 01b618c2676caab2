//! HBONE on a pod's own address. Istio's HBONE peers dial `<pod IP>:15008`, where
//! ztunnel listens inside each pod's network namespace; the agent does the same, so
//! that such peers reach weft-served pods.
//!
//! The node's thread opens a listener inside each meshed pod's namespace and publishes
//! it here ([`InPod::insert`]); every data-plane worker accepts on all of them
//! ([`serve`]) as on the node's own HBONE port, and the inbound knows the pod dialed
//! from the connection's local address. The kernel's inbound program lets connections
//! to that port in as mesh traffic.

use std::{collections::BTreeMap, net::TcpListener, sync::Arc};

use tokio::{sync::watch, task::JoinSet};

use super::Proxy;

/// The listeners of each pod, by container id.
type Published = BTreeMap<String, Vec<Arc<TcpListener>>>;

/// The in-pod listeners the node opened, for the workers to serve.
#[derive(Debug)]
pub struct InPod {
    published: watch::Sender<Arc<Published>>,
    /// Set once the agent drains: nothing is published any more.
    closed: watch::Sender<bool>,
}

impl Default for InPod {
    fn default() -> Self {
        Self {
            published: watch::Sender::new(Arc::default()),
            closed: watch::Sender::new(false),
        }
    }
}

impl InPod {
    /// Serves `listeners` as pod `id`'s, in place of any it had. Refused (and the
    /// listeners closed) once the agent drains.
    pub fn insert(&self, id: &str, listeners: Vec<TcpListener>) {
        if *self.closed.borrow() {
            return;
        }
        let listeners = listeners.into_iter().map(Arc::new).collect();
        self.published.send_modify(|published| {
            Arc::make_mut(published).insert(id.to_owned(), listeners);
        });
    }

    /// Stops serving pod `id`'s listeners; they close once no worker holds them.
    pub fn remove(&self, id: &str) {
        self.published.send_if_modified(|published| {
            published.contains_key(id) && Arc::make_mut(published).remove(id).is_some()
        });
    }

    /// Whether pod `id` has listeners served.
    pub fn contains(&self, id: &str) -> bool {
        self.published.borrow().contains_key(id)
    }

    /// Closes every listener for good: a draining agent must not keep connections
    /// in accept queues it no longer serves, while the next agent listens beside it.
    pub fn close(&self) {
        self.closed.send_replace(true);
        self.published.send_replace(Arc::default());
    }
}

/// Accepts on every published in-pod listener, on the calling worker, until dropped.
pub async fn serve(proxy: Arc<Proxy>) {
    let mut published = proxy.in_pod.published.subscribe();
    // Each listener's accept loop, by the listener's address in memory (the `Arc`
    // kept alongside pins it).
    let mut serving: BTreeMap<usize, (Arc<TcpListener>, tokio::task::AbortHandle)> =
        BTreeMap::new();
    let mut loops = JoinSet::new();
    loop {
        let current = Arc::clone(&published.borrow_and_update());
        let wanted: BTreeMap<usize, &Arc<TcpListener>> = current
            .values()
            .flatten()
            .map(|listener| (Arc::as_ptr(listener) as usize, listener))
            .collect();
        serving.retain(|key, (_, abort)| {
            let keep = wanted.contains_key(key);
            if !keep {
                abort.abort();
            }
            keep
        });
        for (key, listener) in wanted {
            if serving.contains_key(&key) {
                continue;
            }
            // The worker's own descriptor of the shared socket, in its own reactor.
            let accepting = listener
                .try_clone()
                .and_then(tokio::net::TcpListener::from_std);
            match accepting {
                Ok(accepting) => {
                    let abort = loops.spawn(super::serve_inbound(accepting, Arc::clone(&proxy)));
                    serving.insert(key, (Arc::clone(listener), abort));
                }
                Err(err) => log::warn!("cannot serve an in-pod HBONE listener: {err}"),
            }
        }
        drop(current);
        // Reap finished loops so the set does not grow.
        while loops.try_join_next().is_some() {}
        if published.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").expect("a loopback listener")
    }

    #[test]
    fn listeners_are_published_until_removed_and_none_after_close() {
        let in_pod = InPod::default();
        let mut published = in_pod.published.subscribe();
        in_pod.insert("pod-a", vec![listener(), listener()]);
        assert!(in_pod.contains("pod-a"));
        assert!(published.has_changed().unwrap());
        assert_eq!(published.borrow_and_update()["pod-a"].len(), 2);
        // Removing what is not there changes nothing the workers see.
        in_pod.remove("pod-b");
        assert!(!published.has_changed().unwrap());
        in_pod.remove("pod-a");
        assert!(!in_pod.contains("pod-a"));
        assert!(published.borrow_and_update().is_empty());
        // A draining agent publishes nothing more.
        in_pod.insert("pod-a", vec![listener()]);
        in_pod.close();
        assert!(published.borrow_and_update().is_empty());
        in_pod.insert("pod-c", vec![listener()]);
        assert!(!in_pod.contains("pod-c"));
    }
}
