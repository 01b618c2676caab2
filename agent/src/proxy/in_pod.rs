//! HBONE on a pod's own address. Istio's HBONE peers dial `<pod IP>:15008`, where
//! ztunnel listens inside each pod's network namespace; the agent does the same, so
//! that such peers reach weft-served pods.
//!
//! The node's thread opens a listener inside each meshed pod's namespace and publishes
//! it here ([`InPod::insert`]); every data-plane worker accepts on all of them
//! ([`serve`]) as on the node's own HBONE port, and the inbound knows the pod dialed
//! from the connection's local address. The kernel's inbound program lets connections
//! to that port in as mesh traffic. An upgrade hands the listeners over to the next
//! agent with the node's ([`InPod::duplicates`], [`InPod::adopt`]), so that no
//! connection waiting in their queues is lost.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, TcpListener},
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::{sync::watch, task::JoinSet};

use super::{HBONE_PORT, Proxy};
use crate::{datapath::netns, sync};

/// The listeners of each pod, by container id.
type Published = BTreeMap<String, Vec<Arc<TcpListener>>>;

/// The in-pod listeners the node opened, for the workers to serve.
#[derive(Debug)]
pub struct InPod {
    published: watch::Sender<Arc<Published>>,
    /// Set once the agent drains: nothing is published any more.
    closed: AtomicBool,
    /// Listeners the agent before this one handed over, until the node claims them
    /// for their pods.
    inherited: Mutex<Vec<TcpListener>>,
}

impl Default for InPod {
    fn default() -> Self {
        Self {
            published: watch::Sender::new(Arc::default()),
            closed: AtomicBool::new(false),
            inherited: Mutex::default(),
        }
    }
}

impl InPod {
    /// Whether a socket taken over from the agent before is an in-pod listener: one
    /// on the HBONE port of a given address (the node's listens on every address).
    pub fn is_in_pod(address: SocketAddr) -> bool {
        address.port() == HBONE_PORT && !address.ip().is_unspecified()
    }

    /// Keeps `listeners`, handed over by the agent before, for the pods they were
    /// opened in ([`Self::take_inherited`]).
    pub fn adopt(&self, listeners: Vec<TcpListener>) {
        sync::lock(&self.inherited).extend(listeners);
    }

    /// The inherited listeners on exactly `addresses` in the network namespace whose
    /// cookie is `netns`, if every one of them was handed over.
    pub fn take_inherited(&self, addresses: &[SocketAddr], netns: u64) -> Option<Vec<TcpListener>> {
        let mut inherited = sync::lock(&self.inherited);
        let matches = |listener: &TcpListener| {
            listener
                .local_addr()
                .is_ok_and(|address| addresses.contains(&address))
                && netns::socket_cookie(listener).is_ok_and(|cookie| cookie == netns)
        };
        if inherited
            .iter()
            .filter(|listener| matches(listener))
            .count()
            != addresses.len()
        {
            return None;
        }
        let (taken, rest) = std::mem::take(&mut *inherited)
            .into_iter()
            .partition(|listener| matches(listener));
        *inherited = rest;
        Some(taken)
    }

    /// Closes the inherited listeners no pod claimed (their pods went away meanwhile).
    pub fn drop_inherited(&self) {
        sync::lock(&self.inherited).clear();
    }

    /// A duplicate of every listener served, to hand over to the next agent.
    pub fn duplicates(&self) -> Vec<OwnedFd> {
        self.published
            .borrow()
            .values()
            .flatten()
            .filter_map(|listener| listener.try_clone().ok().map(OwnedFd::from))
            .collect()
    }

    /// Serves `listeners` as pod `id`'s, in place of any it had. Refused (and the
    /// listeners closed) once the agent drains.
    pub fn insert(&self, id: &str, listeners: Vec<TcpListener>) {
        let listeners = listeners.into_iter().map(Arc::new).collect();
        // Checked under the channel's lock, which `close` takes after it marks.
        self.published.send_if_modified(|published| {
            if self.closed.load(Ordering::SeqCst) {
                return false;
            }
            Arc::make_mut(published).insert(id.to_owned(), listeners);
            true
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

    /// Lets go of every listener for good, once the agent drains: those handed over
    /// stay open with the next agent; the others close, so that no connection waits
    /// in a queue nobody serves.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
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

    #[test]
    fn inherited_listeners_go_to_the_pod_with_their_addresses_and_namespace() {
        let in_pod = InPod::default();
        let (a, b) = (listener(), listener());
        let (at_a, at_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let here = netns::socket_cookie(&a).unwrap();
        in_pod.adopt(vec![a, b]);
        // Every address must have been handed over, in the pod's namespace.
        let elsewhere: SocketAddr = "127.0.0.2:15008".parse().unwrap();
        assert!(in_pod.take_inherited(&[at_a, elsewhere], here).is_none());
        assert!(in_pod.take_inherited(&[at_a], here + 1).is_none());
        let taken = in_pod.take_inherited(&[at_a], here).expect("a's listener");
        assert_eq!(taken[0].local_addr().unwrap(), at_a);
        assert!(in_pod.take_inherited(&[at_a], here).is_none(), "taken once");
        in_pod.drop_inherited();
        assert!(in_pod.take_inherited(&[at_b], here).is_none(), "dropped");
        // What is served is what the next agent gets.
        in_pod.insert("pod-a", taken);
        let handed: Vec<SocketAddr> = in_pod
            .duplicates()
            .into_iter()
            .map(|fd| TcpListener::from(fd).local_addr().unwrap())
            .collect();
        assert_eq!(handed, [at_a]);
        assert!(InPod::is_in_pod("10.244.1.2:15008".parse().unwrap()));
        assert!(!InPod::is_in_pod("0.0.0.0:15008".parse().unwrap()));
        assert!(!InPod::is_in_pod("10.244.1.2:15001".parse().unwrap()));
    }
}
