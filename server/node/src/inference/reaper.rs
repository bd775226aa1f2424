//! Background unloading: models whose keep-alive expired, and idle models while the
//! OS reports memory pressure (Linux PSI; other platforms report none yet). Every
//! unload here is an `evicted` lifecycle event with its reason.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use super::Inference;

/// How often keep-alives and pressure are checked.
pub const TICK: Duration = Duration::from_millis(500);
/// Default PSI "some avg10" (percent of time tasks stalled on memory) above which
/// idle models are evicted, one per tick (`--memory-pressure-threshold`).
pub const PRESSURE_THRESHOLD: f64 = 10.0;

/// Runs until `shutdown` turns true. `pressure_threshold`: PSI percent above which
/// idle models are evicted; `None` = never.
pub fn spawn(
    inference: Arc<Inference>,
    pressure_threshold: Option<f64>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            expire_keep_alives(&inference).await;
            if let Some(threshold) = pressure_threshold {
                relieve_pressure(&inference, threshold).await;
            }
        }
    })
}

async fn expire_keep_alives(inference: &Inference) {
    let now = SystemTime::now();
    // Ids, not workers: a worker handle held across the eviction would keep its
    // queue open, and the unload would wait forever for the worker to end.
    let expired: Vec<String> = inference
        .loaded()
        .iter()
        .filter(|w| !w.pinned && w.in_flight() == 0)
        .filter(|w| {
            w.keep_alive
                .expires(w.last_used())
                .is_some_and(|e| e <= now)
        })
        .map(|w| w.model_id())
        .collect();
    for id in expired {
        let reason = "keep-alive expired".to_owned();
        if let Err(e) = inference
            .evict(&id, crate::metrics::EvictionReason::Idle, &reason)
            .await
        {
            tracing::warn!(model = %id, error = %e, "keep-alive unload failed");
        }
    }
}

async fn relieve_pressure(inference: &Inference, threshold: f64) {
    let Some(pressure) = pressure() else { return };
    if pressure < threshold {
        return;
    }
    let mut idle: Vec<_> = inference
        .resident()
        .into_iter()
        .filter(|r| !r.pinned && r.in_flight == 0)
        .collect();
    idle.sort_by_key(|r| r.last_used);
    if let Some(victim) = idle.first() {
        let reason = format!("memory pressure: PSI some avg10 {pressure:.1}% ≥ {threshold}%");
        if let Err(e) = inference
            .evict(
                &victim.model_id,
                crate::metrics::EvictionReason::Pressure,
                &reason,
            )
            .await
        {
            tracing::warn!(model = %victim.model_id, error = %e, "pressure eviction failed");
        }
    }
}

/// The OS's memory pressure, in percent of time stalled; `None` where unknown.
#[cfg(target_os = "linux")]
fn pressure() -> Option<f64> {
    crate::hardware::memory_pressure()
}

/// Apple platforms report pressure as levels, not percentages, through a dispatch
/// source that needs Apple's frameworks; nothing reads it yet.
#[cfg(not(target_os = "linux"))]
fn pressure() -> Option<f64> {
    None
}
