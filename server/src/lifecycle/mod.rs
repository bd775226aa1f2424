//! The model lifecycle: one state machine for every model, whatever its runtime.
//!
//! One table (`allowed`) says which transitions exist, and nothing changes a model's
//! state except `Lifecycle::transition`, which checks it. Every transition is an event
//! persisted in sled under a global, monotonically increasing revision, together with
//! the model's new state, in one atomic batch; Watch replays events from the store and
//! follows live ones through a broadcast channel that never blocks the writer.

pub mod load;

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::store::{FailureRecord, LifecycleRecord, Store, TransitionRecord};

/// Lifecycle state of one model. "generating" is `Ready` with requests in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelState {
    Registered,
    Downloading,
    Downloaded,
    Extracting,
    Validating,
    Initializing,
    Loading,
    Ready,
    Unloading,
    Failed,
}

impl ModelState {
    pub const ALL: [ModelState; 10] = [
        ModelState::Registered,
        ModelState::Downloading,
        ModelState::Downloaded,
        ModelState::Extracting,
        ModelState::Validating,
        ModelState::Initializing,
        ModelState::Loading,
        ModelState::Ready,
        ModelState::Unloading,
        ModelState::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Registered => "registered",
            ModelState::Downloading => "downloading",
            ModelState::Downloaded => "downloaded",
            ModelState::Extracting => "extracting",
            ModelState::Validating => "validating",
            ModelState::Initializing => "initializing",
            ModelState::Loading => "loading",
            ModelState::Ready => "ready",
            ModelState::Unloading => "unloading",
            ModelState::Failed => "failed",
        }
    }

    pub fn parse(name: &str) -> Option<ModelState> {
        ModelState::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// True while some stage holds the model's files: deleting it then would pull them
    /// from under a download, an extraction or a running engine.
    pub fn holds_files(self) -> bool {
        !matches!(
            self,
            ModelState::Registered | ModelState::Downloaded | ModelState::Failed
        )
    }
}

impl fmt::Display for ModelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The stage of the lifecycle a transition belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Download,
    Extract,
    Validate,
    Initialize,
    Load,
    Unload,
}

impl Stage {
    pub const ALL: [Stage; 6] = [
        Stage::Download,
        Stage::Extract,
        Stage::Validate,
        Stage::Initialize,
        Stage::Load,
        Stage::Unload,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Download => "download",
            Stage::Extract => "extract",
            Stage::Validate => "validate",
            Stage::Initialize => "initialize",
            Stage::Load => "load",
            Stage::Unload => "unload",
        }
    }

    pub fn parse(name: &str) -> Option<Stage> {
        Stage::ALL.into_iter().find(|s| s.as_str() == name)
    }

    /// The stage a model is in while in `state`.
    pub fn of(state: ModelState) -> Option<Stage> {
        Some(match state {
            ModelState::Downloading => Stage::Download,
            ModelState::Extracting => Stage::Extract,
            ModelState::Validating => Stage::Validate,
            ModelState::Initializing => Stage::Initialize,
            ModelState::Loading => Stage::Load,
            ModelState::Unloading => Stage::Unload,
            _ => return None,
        })
    }
}

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
    /// The google.rpc code the failure was answered with.
    pub code: i32,
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

    fn parse(name: &str) -> EventKind {
        match name {
            "registered" => EventKind::Registered,
            "deleted" => EventKind::Deleted,
            "evicted" => EventKind::Evicted,
            _ => EventKind::Transition,
        }
    }
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

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn failure_record(f: &Failure) -> FailureRecord {
    FailureRecord {
        stage: f.stage.as_str().to_owned(),
        code: f.code,
        message: f.message.clone(),
    }
}

fn failure_from(r: &FailureRecord) -> Option<Failure> {
    Some(Failure {
        stage: Stage::parse(&r.stage)?,
        code: r.code,
        message: r.message.clone(),
    })
}

impl Transition {
    fn from_record(revision: u64, r: TransitionRecord) -> Transition {
        Transition {
            revision,
            kind: EventKind::parse(&r.kind),
            model_id: r.model_id,
            from: ModelState::parse(&r.from_state),
            to: ModelState::parse(&r.to_state),
            stage: Stage::parse(&r.stage),
            time_unix_ms: r.time_unix_ms,
            progress: r.progress,
            reason: r.reason,
            failure: r.failure.as_ref().and_then(failure_from),
        }
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
        Lifecycle {
            inner: Arc::new(Inner {
                store,
                live,
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
                state: ModelState::parse(&r.state).unwrap_or(ModelState::Registered),
                revision: r.revision,
                failure: r.failure.as_ref().and_then(failure_from),
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

    /// Moves `id` to `Failed`, recording the stage, the code and the message.
    pub fn fail(&self, id: &str, stage: Stage, error: &Error) -> Result<Option<Transition>> {
        let code = tonic::Status::from(error).code() as i32;
        let failure = Failure {
            stage,
            code,
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
            (Some(r), _) => ModelState::parse(&r.state),
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
            .collect();
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
            .collect()))
    }

    pub fn last_revision(&self) -> Result<u64> {
        self.store().last_revision()
    }

    /// Live events from now on. A receiver that falls behind gets `Lagged` and
    /// catches up from the store; the writer never waits for it.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Transition>> {
        self.inner.live.subscribe()
    }

    /// After a restart nothing is in memory: models caught loading, loaded or
    /// unloading go back to `Downloaded`. Returns each model reset and the state it
    /// was in. The caller flushes.
    pub fn recover(&self) -> Result<Vec<(String, ModelState)>> {
        let mut reset = Vec::new();
        for (id, record) in self.store().lifecycles()? {
            let before = ModelState::parse(&record.state);
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
        assert_eq!(failure.code, tonic::Code::InvalidArgument as i32);
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
