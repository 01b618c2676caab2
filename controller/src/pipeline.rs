//! From a source's objects to what the stream sends: every time the objects (or the
//! CA's trust bundle) change, compile them (off the async threads) and publish the result as a new generation,
//! with the verdicts for the status writers.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio::sync::watch;
use weft_api::config::v1::TrustBundle;

use crate::{
    compile::{Compiled, Settings, compile},
    objects::Objects,
    status::Statuses,
};

/// One compiled generation of the mesh.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// Counts compiles since the controller started; 0 until the first.
    pub generation: u64,
    pub compiled: Arc<Compiled>,
    /// What the compiled objects were read from (see [`Objects::sources`]).
    pub sources: BTreeMap<String, String>,
    /// The trust bundle the views hold.
    pub trust: Arc<TrustBundle>,
}

/// Changes that arrive within this window are compiled together.
const SETTLE: Duration = Duration::from_millis(20);

/// Compiles `objects` whenever it or `trust` changes, until `objects` closes. Nothing is
/// compiled before the source delivered its first objects.
pub async fn run(
    mut objects: watch::Receiver<Arc<Objects>>,
    mut trust: watch::Receiver<Arc<TrustBundle>>,
    settings: Settings,
    published: watch::Sender<Published>,
    statuses: watch::Sender<Arc<Statuses>>,
) {
    let settings = Arc::new(settings);
    let mut generation = 0;
    let mut have_objects = false;
    loop {
        tokio::select! {
            changed = objects.changed() => {
                if changed.is_err() {
                    return;
                }
                have_objects = true;
            }
            // A closed trust channel (no CA) leaves only the objects to wait for.
            Ok(()) = trust.changed() => {}
        }
        if !have_objects {
            continue;
        }
        tokio::time::sleep(SETTLE).await;
        let current = Arc::clone(&objects.borrow_and_update());
        let bundle = Arc::clone(&trust.borrow_and_update());
        let settings = Arc::clone(&settings);
        let sources = current.sources.clone();
        let started = std::time::Instant::now();
        let compile_bundle = Arc::clone(&bundle);
        let compiled = match tokio::task::spawn_blocking(move || {
            compile(&current, &settings, &compile_bundle)
        })
        .await
        {
            Ok(compiled) => compiled,
            Err(err) => {
                log::error!("the compiler failed: {err}; keeping the last generation");
                continue;
            }
        };
        let took = started.elapsed();
        generation += 1;
        metrics::histogram!("weft_controller_compile_seconds").record(took.as_secs_f64());
        metrics::gauge!("weft_controller_generation").set(generation as f64);
        log_changed_verdicts(&statuses.borrow(), &compiled.statuses);
        log::info!(
            "generation {generation}: compiled {} shared resource(s) for {} node(s) in {:.1} ms",
            compiled.shared.len(),
            compiled.local.len(),
            took.as_secs_f64() * 1000.0
        );
        statuses.send_replace(Arc::new(compiled.statuses.clone()));
        published.send_replace(Published {
            generation,
            compiled: Arc::new(compiled),
            sources,
            trust: bundle,
        });
    }
}

/// Logs each verdict that is new or differs from the last generation's, so a user of
/// the file source sees at once why a policy did not apply.
fn log_changed_verdicts(before: &Statuses, now: &Statuses) {
    for ((kind, key), verdict) in now {
        if before.get(&(*kind, key.clone())) == Some(verdict) {
            continue;
        }
        if verdict.accepted {
            log::info!("{kind} {key}: {}: {}", verdict.reason, verdict.message);
        } else {
            log::warn!(
                "{kind} {key} is not accepted: {}: {}",
                verdict.reason,
                verdict.message
            );
        }
    }
}
