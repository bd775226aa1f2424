//! The model lifecycle: one state machine for every model, whatever its runtime.
//!
//! One table (`allowed`) says which transitions exist, and nothing changes a model's
//! state except `Lifecycle::transition`, which checks it. Every transition is an event
//! persisted in sled under a global, monotonically increasing revision, together with
//! the model's new state, in one atomic batch; Watch replays events from the store and
//! follows live ones through a broadcast channel that never blocks the writer.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use crate::error::{Error, ErrorKind, Result};
use crate::model::{ModelState, Stage};
use crate::store::{FailureRecord, LifecycleRecord, Store, TransitionRecord, unix_ms};

/// The one table of allowed transitions.
pub fn allowed(from: ModelState, to: ModelState) -> bool {
    use ModelState::{
        Downloaded, Downloading, Extracting, Failed, Initializing, Loading, Ready, Registered,
        Unloading, Validating,
    };
    matches!(
        (from, to),
        // A pull, or a push; files another model already stored need no download; a
        // discovered local file needs no download either.
        (Registered, Downloading | Downloaded | Validating)
            | (Downloading, Extracting | Downloaded | Failed | Registered)
            // A model of several files downloads the next one after unpacking.
            | (Extracting, Downloaded | Downloading | Failed | Registered)
            // Load; deleting the files; fetching again.
            | (Downloaded, Validating | Registered | Downloading)
            | (Validating, Initializing | Failed | Downloaded | Registered)
            | (Initializing, Loading | Failed | Downloaded | Registered)
            | (Loading, Ready | Failed | Downloaded | Registered)
            // A restart or a crash drops what was in memory.
            | (Ready, Unloading | Failed | Downloaded)
            | (Unloading, Downloaded | Registered | Failed)
            // Retry from where it failed, or forget the files.
            | (Failed, Downloading | Validating | Downloaded | Registered)
    )
}

/// Why a model failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub stage: Stage,
    pub kind: ErrorKind,
    /// The error's stable reason ("" in records older than reasons).
    pub reason: String,
    pub message: String,
}

/// What kind of event a revision records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Transition,
    Registered,
    Deleted,
    Evicted,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::Transition => "transition",
            EventKind::Registered => "registered",
            EventKind::Deleted => "deleted",
            EventKind::Evicted => "evicted",
        }
    }

    /// Records written before events had kinds carry none: those are transitions.
    fn parse(name: &str) -> Option<EventKind> {
        Some(match name {
            "" | "transition" => EventKind::Transition,
            "registered" => EventKind::Registered,
            "deleted" => EventKind::Deleted,
            "evicted" => EventKind::Evicted,
            _ => return None,
        })
    }
}

/// Progress events a watcher gets per model and second, at most.
pub const PROGRESS_PER_SECOND: u32 = 4;

/// How far a model is within its state: sent to watchers, never stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub model_id: String,
    pub state: ModelState,
    /// The revision of the model's last stored event.
    pub revision: u64,
    pub stage: Stage,
    /// 0..1 within the stage.
    pub progress: f64,
    pub time_unix_ms: i64,
    pub message: String,
}

/// One lifecycle event.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub revision: u64,
    pub kind: EventKind,
    pub model_id: String,
    /// `None` when the model was just registered.
    pub from: Option<ModelState>,
    /// `None` when the model was deleted.
    pub to: Option<ModelState>,
    pub stage: Option<Stage>,
    pub time_unix_ms: i64,
    pub progress: f64,
    pub reason: String,
    pub failure: Option<Failure>,
}

/// What a transition says about itself beyond its states.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub stage: Option<Stage>,
    pub progress: f64,
    pub reason: String,
}

impl Change {
    pub fn because(reason: impl Into<String>) -> Change {
        Change {
            reason: reason.into(),
            ..Change::default()
        }
    }
}

/// A model's state now.
#[derive(Debug, Clone, PartialEq)]
pub struct Current {
    pub state: ModelState,
    pub revision: u64,
    pub failure: Option<Failure>,
}

/// Events kept in the store for watchers to resume from.
pub const RETAINED_EVENTS: u64 = 10_000;
/// Live events buffered per watcher before it must catch up from the store.
const LIVE_BUFFER: usize = 1024;

fn failure_record(f: &Failure) -> FailureRecord {
    FailureRecord {
        stage: f.stage.as_str().to_owned(),
        legacy_code: 0,
        message: f.message.clone(),
        kind: f.kind.as_str().to_owned(),
        reason: f.reason.clone(),
    }
}

/// A record that names a state, stage or kind this agent does not know is corrupt,
/// never silently read as some default.
fn corrupt(tree: &'static str, key: impl Into<String>, what: &str, value: &str) -> Error {
    Error::CorruptRecord {
        tree,
        key: key.into(),
        message: format!("unknown {what} {value:?}"),
    }
}

fn failure_from(tree: &'static str, key: &str, r: &FailureRecord) -> Result<Failure> {
    let kind = if r.kind.is_empty() {
        ErrorKind::from_rpc_code(r.legacy_code)
    } else {
        ErrorKind::parse(&r.kind).ok_or_else(|| corrupt(tree, key, "error kind", &r.kind))?
    };
    Ok(Failure {
        stage: Stage::parse(&r.stage).ok_or_else(|| corrupt(tree, key, "stage", &r.stage))?,
        kind,
        reason: r.reason.clone(),
        message: r.message.clone(),
    })
}

/// An optional state or stage: empty means none.
fn optional<T>(
    key: &str,
    what: &str,
    value: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Option<T>> {
    if value.is_empty() {
        return Ok(None);
    }
    parse(value)
        .map(Some)
        .ok_or_else(|| corrupt(EVENTS_TREE, key, what, value))
}

const EVENTS_TREE: &str = "lifecycle_events";

impl Transition {
    fn from_record(revision: u64, r: TransitionRecord) -> Result<Transition> {
        let key = revision.to_string();
        Ok(Transition {
            revision,
            kind: EventKind::parse(&r.kind)
                .ok_or_else(|| corrupt(EVENTS_TREE, &key, "event kind", &r.kind))?,
            from: optional(&key, "state", &r.from_state, ModelState::parse)?,
            to: optional(&key, "state", &r.to_state, ModelState::parse)?,
            stage: optional(&key, "stage", &r.stage, Stage::parse)?,
            failure: r
                .failure
                .as_ref()
                .map(|f| failure_from(EVENTS_TREE, &key, f))
                .transpose()?,
            model_id: r.model_id,
            time_unix_ms: r.time_unix_ms,
            progress: r.progress,
            reason: r.reason,
        })
    }

    fn to_record(&self) -> TransitionRecord {
        TransitionRecord {
            model_id: self.model_id.clone(),
            from_state: self.from.map(|s| s.as_str().to_owned()).unwrap_or_default(),
            to_state: self.to.map(|s| s.as_str().to_owned()).unwrap_or_default(),
            stage: self
                .stage
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            time_unix_ms: self.time_unix_ms,
            progress: self.progress,
            reason: self.reason.clone(),
            failure: self.failure.as_ref().map(failure_record),
            kind: self.kind.as_str().to_owned(),
        }
    }
}

/// Why a watcher cannot resume where it asked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub requested: u64,
    pub oldest: u64,
}

/// The lifecycle manager: the one writer of model states. Cheap to clone.
#[derive(Clone)]
pub struct Lifecycle {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    live: broadcast::Sender<Arc<Transition>>,
    /// Progress within a state: sent live, never stored, at most
    /// [`PROGRESS_PER_SECOND`] per model.
    progress: broadcast::Sender<Arc<Progress>>,
    /// When each model's last progress event went out.
    progress_sent: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Serializes writers so revisions are handed out in order.
    write: std::sync::Mutex<()>,
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle").finish_non_exhaustive()
    }
}

impl Lifecycle {
    pub fn new(store: Store) -> Lifecycle {
        let (live, _) = broadcast::channel(LIVE_BUFFER);
        let (progress, _) = broadcast::channel(LIVE_BUFFER);
        Lifecycle {
            inner: Arc::new(Inner {
                store,
                live,
                progress,
                progress_sent: std::sync::Mutex::default(),
                write: std::sync::Mutex::new(()),
            }),
        }
    }

    fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A model's state now; a model no stage has touched is `Registered`.
    pub fn current(&self, id: &str) -> Result<Current> {
        Ok(match self.store().lifecycle(id)? {
            Some(r) => Current {
                state: ModelState::parse(&r.state)
                    .ok_or_else(|| corrupt("lifecycle", id, "state", &r.state))?,
                revision: r.revision,
                failure: r
                    .failure
                    .as_ref()
                    .map(|f| failure_from("lifecycle", id, f))
                    .transpose()?,
            },
            None => Current {
                state: ModelState::Registered,
                revision: 0,
                failure: None,
            },
        })
    }

    pub fn state(&self, id: &str) -> Result<ModelState> {
        Ok(self.current(id)?.state)
    }

    /// Moves `id` to `to` if the table allows it from where the model is; staying in
    /// the same state is no event. The caller flushes.
    pub fn transition(
        &self,
        id: &str,
        to: ModelState,
        change: Change,
    ) -> Result<Option<Transition>> {
        self.write(
            id,
            Some(to),
            change,
            None,
            EventKind::Transition,
            |from| match from {
                Some(from) if from == to => Ok(false),
                Some(from) if allowed(from, to) => Ok(true),
                Some(from) => Err(Error::InvalidTransition {
                    id: id.to_owned(),
                    from,
                    to,
                }),
                None => Ok(true),
            },
        )
    }

    /// Records that every file of `id` is stored: DOWNLOADED, unless the model is
    /// already past that (validating, loading, loaded or unloading), which storing its
    /// files again (a second push, a pull of what is here) does not change.
    pub fn stored(&self, id: &str, change: Change) -> Result<Option<Transition>> {
        use ModelState::{Downloaded, Initializing, Loading, Ready, Unloading, Validating};
        self.write(
            id,
            Some(Downloaded),
            change,
            None,
            EventKind::Transition,
            |from| match from {
                Some(Downloaded | Validating | Initializing | Loading | Ready | Unloading) => {
                    Ok(false)
                }
                Some(from) if allowed(from, Downloaded) => Ok(true),
                Some(from) => Err(Error::InvalidTransition {
                    id: id.to_owned(),
                    from,
                    to: Downloaded,
                }),
                None => Ok(true),
            },
        )
    }

    /// Moves `id` to `Failed`, recording the stage, the error's kind and reason, and
    /// the message.
    pub fn fail(&self, id: &str, stage: Stage, error: &Error) -> Result<Option<Transition>> {
        let (kind, reason) = error.classify();
        let failure = Failure {
            stage,
            kind,
            reason: reason.to_owned(),
            message: error.to_string(),
        };
        let change = Change {
            stage: Some(stage),
            progress: 0.0,
            reason: format!("{} failed", stage.as_str()),
        };
        self.write(
            id,
            Some(ModelState::Failed),
            change,
            Some(failure),
            EventKind::Transition,
            |from| match from {
                Some(ModelState::Failed) => Ok(true),
                Some(from) if allowed(from, ModelState::Failed) => Ok(true),
                Some(from) => Err(Error::InvalidTransition {
                    id: id.to_owned(),
                    from,
                    to: ModelState::Failed,
                }),
                None => Ok(true),
            },
        )
    }

    /// Starts unloading `id` for memory (or keep-alive): the event says why.
    pub fn evicted(&self, id: &str, reason: &str) -> Result<Option<Transition>> {
        let to = ModelState::Unloading;
        self.write(
            id,
            Some(to),
            Change::because(reason),
            None,
            EventKind::Evicted,
            |from| match from {
                Some(from) if allowed(from, to) => Ok(true),
                Some(from) => Err(Error::InvalidTransition {
                    id: id.to_owned(),
                    from,
                    to,
                }),
                None => Ok(true),
            },
        )
    }

    /// Records that a model was registered (its state starts at `Registered`).
    pub fn registered(&self, id: &str, reason: &str) -> Result<Option<Transition>> {
        self.write(
            id,
            Some(ModelState::Registered),
            Change::because(reason),
            None,
            EventKind::Registered,
            |_| Ok(true),
        )
    }

    /// Records that a model was deleted from the registry.
    pub fn deleted(&self, id: &str) -> Result<Option<Transition>> {
        self.write(
            id,
            None,
            Change::because("deleted"),
            None,
            EventKind::Deleted,
            |_| Ok(true),
        )
    }

    fn write(
        &self,
        id: &str,
        to: Option<ModelState>,
        change: Change,
        failure: Option<Failure>,
        kind: EventKind,
        check: impl FnOnce(Option<ModelState>) -> Result<bool>,
    ) -> Result<Option<Transition>> {
        let _guard = self
            .inner
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let existing = self.store().lifecycle(id)?;
        let from = match (&existing, kind) {
            (_, EventKind::Registered) => None,
            (Some(r), _) => Some(
                ModelState::parse(&r.state)
                    .ok_or_else(|| corrupt("lifecycle", id, "state", &r.state))?,
            ),
            (None, _) => Some(ModelState::Registered),
        };
        if !check(from)? {
            return Ok(None);
        }
        let revision = self.store().last_revision()? + 1;
        let now = unix_ms(SystemTime::now());
        let transition = Transition {
            revision,
            kind,
            model_id: id.to_owned(),
            from,
            to,
            stage: change.stage.or_else(|| to.and_then(Stage::of)),
            time_unix_ms: now,
            progress: change.progress,
            reason: change.reason,
            failure,
        };
        let state = to.map(|s| LifecycleRecord {
            state: s.as_str().to_owned(),
            revision,
            update_time_unix_ms: now,
            failure: transition.failure.as_ref().map(failure_record),
        });
        self.store()
            .put_transition(revision, &transition.to_record(), state.as_ref())?;
        if revision % 256 == 0 {
            self.store().prune_transitions(RETAINED_EVENTS)?;
        }
        tracing::debug!(
            model = id,
            revision,
            from = from.map_or("-", ModelState::as_str),
            to = to.map_or("-", ModelState::as_str),
            "lifecycle"
        );
        let transition = Arc::new(transition);
        // No receiver is fine: nobody watches.
        let _ = self.inner.live.send(transition.clone());
        Ok(Some((*transition).clone()))
    }

    /// A model's history, oldest first, at most `limit` events.
    pub fn history(&self, id: &str, limit: usize) -> Result<Vec<Transition>> {
        let mut events: Vec<Transition> = self
            .store()
            .transitions_of(id, limit)?
            .into_iter()
            .map(|(rev, r)| Transition::from_record(rev, r))
            .collect::<Result<_>>()?;
        events.reverse();
        Ok(events)
    }

    /// Events after `after`, oldest first, at most `limit`; or `Compacted` when events
    /// the caller has not seen were already dropped.
    pub fn events_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<std::result::Result<Vec<Transition>, Compacted>> {
        let oldest = self.store().first_revision()?;
        if oldest > 0 && after + 1 < oldest {
            return Ok(Err(Compacted {
                requested: after,
                oldest,
            }));
        }
        Ok(Ok(self
            .store()
            .transitions_after(after, limit)?
            .into_iter()
            .map(|(rev, r)| Transition::from_record(rev, r))
            .collect::<Result<_>>()?))
    }

    pub fn last_revision(&self) -> Result<u64> {
        self.store().last_revision()
    }

    /// Live events from now on. A receiver that falls behind gets `Lagged` and
    /// catches up from the store; the writer never waits for it.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Transition>> {
        self.inner.live.subscribe()
    }

    /// Live progress from now on. Progress is not history: a receiver that falls
    /// behind skips what it missed.
    pub fn subscribe_progress(&self) -> broadcast::Receiver<Arc<Progress>> {
        self.inner.progress.subscribe()
    }

    /// Reports how far `id` is within its current state (a download's bytes), for
    /// watchers. Reports closer together than `1 / PROGRESS_PER_SECOND` are dropped,
    /// unless `last` says this one closes the stage. Cheap when nobody watches.
    pub fn progress(
        &self,
        id: &str,
        stage: Stage,
        progress: f64,
        message: impl FnOnce() -> String,
        last: bool,
    ) {
        if self.inner.progress.receiver_count() == 0 {
            return;
        }
        let now = std::time::Instant::now();
        {
            let mut sent = self
                .inner
                .progress_sent
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = sent.get(id).is_none_or(|t| {
                now.duration_since(*t) >= Duration::from_secs(1) / PROGRESS_PER_SECOND
            });
            if !due && !last {
                return;
            }
            if last {
                sent.remove(id);
            } else {
                sent.insert(id.to_owned(), now);
            }
        }
        let Ok(current) = self.current(id) else {
            return;
        };
        let _ = self.inner.progress.send(Arc::new(Progress {
            model_id: id.to_owned(),
            state: current.state,
            revision: current.revision,
            stage,
            progress: progress.clamp(0.0, 1.0),
            time_unix_ms: unix_ms(SystemTime::now()),
            message: message(),
        }));
    }

    /// After a restart nothing is in memory: models caught loading, loaded or
    /// unloading go back to `Downloaded`. Returns each model reset and the state it
    /// was in. The caller flushes.
    pub fn recover(&self) -> Result<Vec<(String, ModelState)>> {
        let mut reset = Vec::new();
        for (id, record) in self.store().lifecycles()? {
            let before = ModelState::parse(&record.state);
            if before.is_none() {
                // Reported where it is read (GetState, Load); the agent still starts.
                tracing::error!(model = %id, state = %record.state, "unknown lifecycle state in the store");
            }
            let in_memory = matches!(
                before,
                Some(
                    ModelState::Validating
                        | ModelState::Initializing
                        | ModelState::Loading
                        | ModelState::Ready
                        | ModelState::Unloading
                )
            );
            if in_memory {
                // One model that cannot be recovered must not keep the agent down.
                match self.transition(
                    &id,
                    ModelState::Downloaded,
                    Change::because("the agent restarted; nothing is in memory"),
                ) {
                    Ok(_) => reset.extend(before.map(|b| (id.clone(), b))),
                    Err(e) => {
                        tracing::error!(model = %id, error = %e, "cannot recover the model's state")
                    }
                }
            }
        }
        Ok(reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lifecycle() -> (tempfile::TempDir, Lifecycle) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        (dir, Lifecycle::new(store))
    }

    #[test]
    fn the_table_allows_the_lifecycle_and_nothing_else() {
        use ModelState::*;
        let path = [
            Registered,
            Downloading,
            Extracting,
            Downloaded,
            Validating,
            Initializing,
            Loading,
            Ready,
            Unloading,
            Downloaded,
        ];
        for w in path.windows(2) {
            assert!(allowed(w[0], w[1]), "{} -> {}", w[0], w[1]);
        }
        for (from, to) in [
            (Registered, Ready),
            (Registered, Loading),
            (Downloading, Ready),
            (Downloading, Loading),
            (Ready, Downloading),
            (Ready, Registered),
            (Ready, Loading),
            (Registered, Unloading),
            (Failed, Ready),
            (Unloading, Ready),
            (Downloaded, Ready),
        ] {
            assert!(!allowed(from, to), "{from} -> {to} must be refused");
        }
        for s in ModelState::ALL {
            if s != Failed && s != Registered && s != Downloaded {
                assert!(allowed(s, Failed) || s == Failed, "{s} can fail");
            }
        }
    }

    #[test]
    fn files_stored_again_leave_a_loaded_model_loaded() {
        let (_dir, lc) = lifecycle();
        lc.registered("m", "test").unwrap();
        assert!(lc.stored("m", Change::because("push")).unwrap().is_some());
        for to in [
            ModelState::Validating,
            ModelState::Initializing,
            ModelState::Loading,
            ModelState::Ready,
        ] {
            lc.transition("m", to, Change::default()).unwrap();
        }
        assert!(
            lc.stored("m", Change::because("push again"))
                .unwrap()
                .is_none()
        );
        assert_eq!(lc.state("m").unwrap(), ModelState::Ready);
    }

    #[test]
    fn transitions_are_checked_persisted_and_numbered() {
        let (_dir, lc) = lifecycle();
        lc.registered("m", "test").unwrap();
        let t = lc
            .transition("m", ModelState::Downloading, Change::because("pull"))
            .unwrap()
            .unwrap();
        assert_eq!(t.revision, 2);
        assert_eq!(t.stage, Some(Stage::Download));
        assert!(
            lc.transition("m", ModelState::Downloading, Change::default())
                .unwrap()
                .is_none(),
            "staying put is no event"
        );
        let err = lc
            .transition("m", ModelState::Ready, Change::default())
            .unwrap_err();
        assert!(matches!(err, Error::InvalidTransition { .. }));
        assert!(err.to_string().contains("downloading"), "{err}");
        let failed = lc
            .fail("m", Stage::Download, &Error::invalid("x", "y"))
            .unwrap()
            .unwrap();
        assert_eq!(failed.to, Some(ModelState::Failed));
        let current = lc.current("m").unwrap();
        assert_eq!(current.state, ModelState::Failed);
        assert_eq!(current.revision, 3);
        let failure = current.failure.unwrap();
        assert_eq!(failure.stage, Stage::Download);
        assert_eq!(failure.kind, crate::error::ErrorKind::InvalidArgument);
        assert_eq!(failure.reason, "INVALID_ARGUMENT");
        let history = lc.history("m", 100).unwrap();
        assert_eq!(
            history.iter().map(|t| t.revision).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        assert_eq!(history[0].kind, EventKind::Registered);
        // Leaving Failed clears the failure.
        lc.transition("m", ModelState::Downloading, Change::because("retry"))
            .unwrap();
        assert!(lc.current("m").unwrap().failure.is_none());
    }

    #[test]
    fn watchers_resume_from_the_store_until_events_are_compacted() {
        let (_dir, lc) = lifecycle();
        lc.registered("a", "test").unwrap();
        lc.registered("b", "test").unwrap();
        lc.transition("a", ModelState::Downloading, Change::default())
            .unwrap();
        let after_1 = lc.events_after(1, 100).unwrap().unwrap();
        assert_eq!(
            after_1.iter().map(|t| t.revision).collect::<Vec<_>>(),
            vec![2, 3]
        );
        lc.store().prune_transitions(1).unwrap();
        assert_eq!(
            lc.events_after(0, 100).unwrap(),
            Err(Compacted {
                requested: 0,
                oldest: 3
            })
        );
        assert_eq!(lc.events_after(2, 100).unwrap().unwrap().len(), 1);
    }
}
