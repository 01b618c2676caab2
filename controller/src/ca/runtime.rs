//! The running CA: loads (or first creates) the material, follows the store for
//! rotations, publishes the trust bundle for the compiler, and decides which root
//! signs.
//!
//! A new root is put in the bundle first and signs only once every agent connected to
//! this controller has acknowledged a view that holds it (or after the grace period,
//! for an agent that never answers); until then the previous root's key signs. A
//! rotated-out root leaves the bundle when its overlap ends.

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_api::config::v1::TrustBundle;

use super::{
    Authority, Material,
    store::{Store, StoreError},
    unix_seconds,
};
use crate::{pipeline::Published, stream::Nodes};

/// What signing uses now.
#[derive(Debug)]
pub struct CaState {
    pub authority: Arc<Authority>,
    /// The signing root is trusted by every connected agent.
    pub propagated: bool,
}

/// The CA in `/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    pub store: String,
    /// The subject of the root certificates are issued under now.
    pub signing_root: String,
    /// A new root waits for agents to trust it.
    pub propagating: bool,
    pub anchors: Vec<AnchorStatus>,
    /// Why the stored material was not loaded last time, if it was not.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnchorStatus {
    pub subject: String,
    pub not_after: u64,
    pub retire_at: Option<u64>,
}

/// Reads the CA from `store`, creating a self-signed root when there is none (or the
/// store is empty).
pub async fn load_or_create(store: &Store) -> anyhow::Result<Material> {
    use anyhow::Context as _;
    let stored = store.read().await?;
    let created = match stored {
        Some((material, _)) if !material.is_empty() => return Ok(material),
        Some((_, revision)) => {
            let material = Authority::generate_root(SystemTime::now())?;
            match store.replace(&material, revision).await {
                Ok(()) => Some(material),
                Err(StoreError::Conflict { .. }) => None,
                Err(err) => return Err(err.into()),
            }
        }
        None => {
            let material = Authority::generate_root(SystemTime::now())?;
            store.create(&material).await?.then_some(material)
        }
    };
    if let Some(material) = created {
        log::info!("created a self-signed mesh root in the {store}");
        return Ok(material);
    }
    // Another controller stored one first: use that.
    let (material, _) = store
        .read()
        .await?
        .filter(|(material, _)| !material.is_empty())
        .with_context(|| format!("the {store} was filled and is empty again"))?;
    Ok(material)
}

/// How often propagation and retirement are checked.
const TICK: Duration = Duration::from_millis(250);

/// Runs the CA until the receivers are gone.
#[derive(Debug)]
pub struct Runtime {
    pub store: Store,
    pub published: watch::Receiver<Published>,
    pub nodes: Arc<Nodes>,
    pub trust: watch::Sender<Arc<TrustBundle>>,
    pub state: watch::Sender<Arc<CaState>>,
    pub status: watch::Sender<Option<CaStatus>>,
    /// The longest a new root waits for agents before it signs anyway.
    pub grace: Duration,
}

/// A new root on its way to every agent.
struct Propagation {
    since: SystemTime,
    /// The first generation whose views hold the new bundle.
    generation: Option<u64>,
}

impl Runtime {
    /// Starts from `material` (already loaded once by [`load_or_create`]).
    pub async fn run(self, mut material: Material) {
        let now = SystemTime::now();
        let mut authority = match Authority::load(&material, now) {
            Ok(authority) => Arc::new(authority),
            Err(err) => {
                log::error!("the CA in the {} cannot be used: {err}", self.store);
                return;
            }
        };
        let mut error = None;
        // After a restart mid-rotation, make sure again that agents trust the new root.
        let mut propagation = authority.rotating().then_some(Propagation {
            since: now,
            generation: None,
        });
        let mut last_poll = now;
        let mut ticks = tokio::time::interval(TICK);
        loop {
            ticks.tick().await;
            let now = SystemTime::now();
            let mut reload = authority.next_retirement().is_some_and(|at| at <= now);
            if now.duration_since(last_poll).unwrap_or_default() >= self.store.poll_interval() {
                last_poll = now;
                match self.store.read().await {
                    Ok(Some((stored, _))) if stored != material => {
                        material = stored;
                        reload = true;
                    }
                    Ok(_) => {}
                    Err(err) => log::warn!("{err}; signing with the CA loaded before"),
                }
            }
            if reload {
                match Authority::load(&material, now) {
                    Ok(loaded) => {
                        if loaded.signing_root() != authority.signing_root() {
                            log::info!(
                                "new mesh root {}: trusted now, signing once every connected agent trusts it",
                                loaded.signing_root().subject
                            );
                            propagation = loaded.rotating().then_some(Propagation {
                                since: now,
                                generation: None,
                            });
                        }
                        authority = Arc::new(loaded);
                        error = None;
                    }
                    Err(err) => {
                        if error.as_ref() != Some(&err.to_string()) {
                            log::error!("{err}; signing with the CA loaded before");
                        }
                        error = Some(err.to_string());
                    }
                }
            }
            if let Some(pending) = &mut propagation {
                if pending.generation.is_none() {
                    let published = self.published.borrow();
                    if *published.trust == authority.trust_bundle(false) {
                        pending.generation = Some(published.generation);
                    }
                }
                let acked = pending
                    .generation
                    .is_some_and(|generation| self.nodes.all_acked(generation));
                let waited = now.duration_since(pending.since).unwrap_or_default();
                if acked || waited >= self.grace {
                    if acked {
                        log::info!(
                            "every connected agent trusts {}: signing with it",
                            authority.signing_root().subject
                        );
                    } else {
                        log::warn!(
                            "not every agent acknowledged the new root within {:?}; signing with it anyway",
                            self.grace
                        );
                    }
                    propagation = None;
                }
            }
            let propagated = propagation.is_none();
            let bundle = authority.trust_bundle(propagated);
            self.trust.send_if_modified(|current| {
                let changed = **current != bundle;
                if changed {
                    *current = Arc::new(bundle);
                }
                changed
            });
            let replace_state = {
                let state = self.state.borrow();
                !Arc::ptr_eq(&state.authority, &authority) || state.propagated != propagated
            };
            if replace_state {
                self.state.send_replace(Arc::new(CaState {
                    authority: Arc::clone(&authority),
                    propagated,
                }));
            }
            let status = Some(status(&self.store, &authority, propagated, error.clone()));
            self.status.send_if_modified(|current| {
                let changed = *current != status;
                if changed {
                    current.clone_from(&status);
                }
                changed
            });
            if self.trust.is_closed() && self.state.is_closed() {
                return;
            }
        }
    }
}

fn status(
    store: &Store,
    authority: &Authority,
    propagated: bool,
    error: Option<String>,
) -> CaStatus {
    CaStatus {
        store: store.to_string(),
        signing_root: authority.signing_anchor(propagated).subject.clone(),
        propagating: !propagated,
        anchors: authority
            .anchors()
            .iter()
            .map(|anchor| AnchorStatus {
                subject: anchor.subject.clone(),
                not_after: unix_seconds(anchor.not_after),
                retire_at: anchor.retire_at.map(unix_seconds),
            })
            .collect(),
        error,
    }
}
