//! Room on a small disk. When a download or a push does not fit under the quota (or
//! on the disk), stored models that nothing needs now are removed, least recently used
//! first: not loaded (or on the way), not pinned, not placed by a fleet deployment, not
//! being transferred. Nothing is removed unless removing everything removable makes
//! room; otherwise the request is refused, saying what it needs and what stays.

use std::collections::HashSet;

use super::Storage;
use crate::error::{Error, Result};
use crate::lifecycle::Change;
use crate::model::ModelState;

/// Whether a stored model may be removed to make room, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evictability {
    /// `None` when it may go; else why it stays ("loaded", "pinned", ...).
    pub kept_because: Option<String>,
    /// Its last lifecycle event (stored, loaded, unloaded): the "recently used" of LRU.
    pub last_used_unix_ms: i64,
}

/// What every stored model's fate depends on, read once per decision.
struct Holds {
    pinned: HashSet<String>,
    fleet: HashSet<String>,
}

impl Storage {
    fn holds(&self) -> Result<Holds> {
        Ok(Holds {
            pinned: self
                .inner
                .store
                .pinned()?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
            fleet: self
                .inner
                .store
                .fleet_models()?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        })
    }

    fn evictability_with(&self, model_id: &str, holds: &Holds) -> Result<Evictability> {
        let record = self.inner.store.lifecycle(model_id)?;
        let last_used_unix_ms = record.as_ref().map_or(0, |r| r.update_time_unix_ms);
        let state = self.inner.lifecycle.state(model_id)?;
        let kept_because = if matches!(
            state,
            ModelState::Validating
                | ModelState::Initializing
                | ModelState::Loading
                | ModelState::Ready
                | ModelState::Unloading
        ) {
            Some(state.as_str().to_owned())
        } else if holds.pinned.contains(model_id) {
            Some("pinned".to_owned())
        } else if holds.fleet.contains(model_id) {
            Some("placed by a fleet deployment".to_owned())
        } else if self.running(model_id).is_some() {
            Some("transferring".to_owned())
        } else {
            None
        };
        Ok(Evictability {
            kept_because,
            last_used_unix_ms,
        })
    }

    /// Whether `model_id`'s stored files may be removed to make room.
    pub fn evictability(&self, model_id: &str) -> Result<Evictability> {
        self.evictability_with(model_id, &self.holds()?)
    }

    /// Makes `needed` bytes fit for `for_model`, removing stored models that may go,
    /// least recently used first, if that is what it takes.
    pub async fn make_room(&self, for_model: &str, needed: u64) -> Result<()> {
        // Two requests making room at once would both count the same free bytes.
        let _one_at_a_time = self.inner.room.lock().await;
        let shortfall = match self.check_space_blocking(needed).await {
            Ok(()) => return Ok(()),
            Err(Error::QuotaExceeded {
                needed, available, ..
            })
            | Err(Error::DiskFull {
                needed, available, ..
            }) => needed.saturating_sub(available),
            Err(e) => return Err(e),
        };
        let holds = self.holds()?;
        let mut candidates = Vec::new();
        let mut kept = Vec::new();
        for model in self.stored_models()? {
            if model.model_id == for_model {
                continue;
            }
            let e = self.evictability_with(&model.model_id, &holds)?;
            match e.kept_because {
                Some(why) => kept.push(format!("{} ({why})", model.model_id)),
                None => candidates.push((e.last_used_unix_ms, model.model_id, model.size_bytes)),
            }
        }
        let freeable: u64 = candidates.iter().map(|(_, _, size)| size).sum();
        if freeable < shortfall {
            let note = format!(
                "; removing every stored model not in use would free only {freeable} bytes \
                 of the {shortfall} missing{}",
                if kept.is_empty() {
                    String::new()
                } else {
                    format!("; kept: {}", kept.join(", "))
                }
            );
            return Err(match self.check_space_blocking(needed).await {
                Err(Error::QuotaExceeded {
                    needed,
                    available,
                    quota,
                    ..
                }) => Error::QuotaExceeded {
                    needed,
                    available,
                    quota,
                    kept: note,
                },
                Err(Error::DiskFull {
                    needed, available, ..
                }) => Error::DiskFull {
                    needed,
                    available,
                    kept: note,
                },
                Err(e) => e,
                Ok(()) => return Ok(()),
            });
        }
        candidates.sort();
        for (_, id, _) in candidates {
            self.evict(&id, for_model, needed).await?;
            if self.check_space_blocking(needed).await.is_ok() {
                return Ok(());
            }
        }
        self.check_space_blocking(needed).await
    }

    async fn check_space_blocking(&self, needed: u64) -> Result<()> {
        let storage = self.clone();
        tokio::task::spawn_blocking(move || storage.check_space(needed)).await?
    }

    async fn evict(&self, id: &str, for_model: &str, needed: u64) -> Result<()> {
        let freed = self.remove_stored(id).await?;
        self.inner.lifecycle.transition(
            id,
            ModelState::Registered,
            Change::because(format!(
                "stored files removed to make room for {for_model} ({needed} bytes): least \
                 recently used, not in use"
            )),
        )?;
        self.inner.store.flush().await?;
        crate::metrics::node().disk_evicted(id, freed);
        tracing::info!(
            model = id,
            freed_bytes = freed,
            for_model,
            "stored model removed to make room"
        );
        Ok(())
    }
}
