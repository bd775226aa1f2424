//! Supervision of loaded models. When a model fails while serving (its engine
//! process died, or its engine panicked), the worker has already ended its requests
//! with the reason and the lifecycle recorded FAILED. Here the failed worker is
//! dropped, the crash is counted, and a pinned model is started again in a fresh
//! process after a backoff: 1 s, 2 s, 4 s... Past [`CRASH_LIMIT`] crashes within
//! [`CRASH_WINDOW`] it stays FAILED, with reason ENGINE_CRASH_LOOP, until an operator
//! loads it again. A model that is not pinned waits for the next Load.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBuilder};
use tokio::sync::watch;

use crate::error::Error;
use crate::inference::{CRASH_LIMIT, CRASH_WINDOW, LoadRequest};
use crate::model::{ModelState, Stage};
use crate::node::Node;

/// Runs until `shutdown` turns true.
pub fn spawn(node: Arc<Node>, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    let failures = node.inference.take_failures();
    tokio::spawn(async move {
        let Some(mut failures) = failures else {
            tracing::error!("a second supervisor was started; this one does nothing");
            return;
        };
        let mut stop = shutdown.clone();
        loop {
            let id = tokio::select! {
                id = failures.recv() => match id {
                    Some(id) => id,
                    None => return,
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            node.inference.forget_failed(&id);
            let (node, shutdown) = (node.clone(), shutdown.clone());
            tokio::spawn(async move { recover(&node, &id, shutdown).await });
        }
    })
}

/// The wait before restart number `crashes` (1-based).
pub fn backoff(crashes: usize) -> Duration {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(60))
        .without_max_times()
        .build()
        .nth(crashes.saturating_sub(1))
        .unwrap_or(Duration::from_secs(60))
}

async fn recover(node: &Node, id: &str, mut shutdown: watch::Receiver<bool>) {
    loop {
        let crashes = node.inference.record_crash(id);
        let pinned = match node.store.pinned() {
            Ok(all) => all.into_iter().find(|(m, _)| m == id).map(|(_, r)| r),
            Err(e) => {
                tracing::warn!(model = id, error = %e, "pinned models could not be read");
                None
            }
        };
        let Some(record) = pinned else { return };
        if crashes >= CRASH_LIMIT {
            let error = Error::CrashLoop {
                id: id.to_owned(),
                crashes,
                window_minutes: CRASH_WINDOW.as_secs() / 60,
            };
            tracing::error!(model = id, error = %error, "not restarting the model");
            if let Err(e) = node.registry.lifecycle().fail(id, Stage::Serve, &error) {
                tracing::warn!(model = id, error = %e, "the crash loop could not be recorded");
            }
            let _ = node.store.flush().await;
            return;
        }
        let delay = backoff(crashes);
        tracing::info!(
            model = id,
            crashes,
            delay_ms = delay.as_millis(),
            "restarting the pinned model after a crash"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // An operator may have acted meanwhile: unloaded, deleted or loaded it.
        if node.inference.ready(id).is_ok()
            || !matches!(node.registry.lifecycle().state(id), Ok(ModelState::Failed))
        {
            return;
        }
        let Ok(entry) = node.registry.get(id) else {
            return;
        };
        match crate::load::drive_unwatched(node, &entry, LoadRequest::pinned_again(&record)).await {
            Ok(_) => {
                tracing::info!(model = id, "pinned model restarted");
                return;
            }
            // It crashed again while loading: that counts, and the loop decides.
            Err(e @ Error::EngineCrashed { .. }) => {
                tracing::warn!(model = id, error = %e, "the restart crashed");
            }
            Err(e) => {
                tracing::warn!(model = id, error = %e, "the pinned model could not be restarted");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_doubling_up_to_a_minute() {
        let waits: Vec<u64> = (1..=8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60]);
    }
}
