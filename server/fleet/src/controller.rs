//! The controller's state and every change to it. One lock guards the in-memory view
//! (deployments, devices, assignments, the open streams); every change is written to
//! the store and flushed before the caller hears of it, then placement runs again from
//! scratch and devices whose assignments changed get them at once on their stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use modeld_proto::fleet::v1 as fpb;
use modeld_proto::pbjson_types::Timestamp;
use modeld_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};

use crate::deployment;
use crate::error::{Error, Result};
use crate::placement::{self, Needs, Placeable};
use crate::rollout;
use crate::sites;
use crate::store::Store;

/// What the controller sends down one device's stream.
pub type Outbox = mpsc::Sender<std::result::Result<fpb::ConnectResponse, tonic::Status>>;

/// Live events buffered per watcher before it must resume from the store.
const LIVE_BUFFER: usize = 1024;

fn now() -> Timestamp {
    modeld::api::convert::timestamp(SystemTime::now())
}

struct Session {
    outbox: Outbox,
    /// Tells this stream from a newer one of the same device.
    epoch: u64,
}

#[derive(Default)]
struct State {
    deployments: BTreeMap<String, (fpb::Deployment, Vec<Needs>)>,
    devices: BTreeMap<String, fpb::Device>,
    assignments: HashMap<String, fpb::Assignments>,
    results: BTreeMap<String, fpb::PlacementResult>,
    rollouts: BTreeMap<String, fpb::Rollout>,
    sessions: HashMap<String, Session>,
    /// Last phase seen per (deployment, device, model), for MODEL_PHASE events.
    phases: HashMap<(String, String, String), i32>,
    revision: u64,
    epochs: u64,
    /// A report changed what a site holds: replan on the next tick.
    replan_due: bool,
    /// A report may move a rollout: on the next tick.
    progress_due: bool,
}

pub struct Controller {
    store: Store,
    /// Devices per site that may download one set of files from the origin at once.
    origin_fetches_per_site: usize,
    /// Bytes per second a site's origin downloads may take together.
    site_origin_rate_limit: Option<u64>,
    state: Mutex<State>,
    events: broadcast::Sender<fpb::WatchResponse>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").finish_non_exhaustive()
    }
}

impl Controller {
    /// Loads the state a previous run left. Every device starts disconnected.
    pub fn open(
        store: Store,
        origin_fetches_per_site: usize,
        site_origin_rate_limit: Option<u64>,
    ) -> Result<Arc<Controller>> {
        let mut state = State {
            revision: store.last_revision()?,
            ..State::default()
        };
        for d in store.deployments()? {
            // Checked when applied; a record that no longer passes is kept but logged.
            match deployment::check(&d) {
                Ok(needs) => {
                    state.deployments.insert(d.name.clone(), (d, needs));
                }
                Err(e) => {
                    tracing::error!(deployment = %d.name, error = %e, "stored deployment no longer valid; ignoring it")
                }
            }
        }
        let stamp = now();
        for mut d in store.devices()? {
            if d.connected {
                d.connected = false;
                d.disconnected_since = Some(stamp);
            }
            state.devices.insert(d.id.clone(), d);
        }
        for (id, a) in store.assignments()? {
            state.assignments.insert(id, a);
        }
        for r in store.rollouts()? {
            state.rollouts.insert(r.deployment.clone(), r);
        }
        let (events, _) = broadcast::channel(LIVE_BUFFER);
        let controller = Arc::new(Controller {
            store,
            origin_fetches_per_site: origin_fetches_per_site.max(1),
            site_origin_rate_limit: site_origin_rate_limit.filter(|b| *b > 0),
            state: Mutex::new(state),
            events,
        });
        controller.with_state(|c, s| c.replan(s))?;
        Ok(controller)
    }

    fn with_state<T>(&self, f: impl FnOnce(&Controller, &mut State) -> Result<T>) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f(self, &mut state)
    }

    fn emit(&self, state: &mut State, mut event: fpb::WatchResponse) -> Result<()> {
        state.revision += 1;
        event.revision = state.revision;
        event.time = Some(now());
        self.store.append_event(&event)?;
        let _ = self.events.send(event);
        Ok(())
    }

    /// Places everything again and sends changed assignments to connected devices.
    fn replan(&self, state: &mut State) -> Result<()> {
        let mut plan = plan_for(state);
        rollout::shape(&mut plan.assignments, &state.rollouts, |name| {
            state
                .deployments
                .get(name)
                .and_then(|(d, _)| d.rollout.clone())
                .unwrap_or_default()
        });
        let shares = sites::share(
            &mut plan.assignments,
            &state.devices,
            self.origin_fetches_per_site,
            self.site_origin_rate_limit,
        );
        state.results = plan.results;
        for (device, items) in plan.assignments {
            let current = state.assignments.get(&device);
            let share = shares.get(&device).copied().unwrap_or(0);
            if current.is_some_and(|c| c.assignments == items && c.origin_bytes_per_second == share)
            {
                continue;
            }
            let generation = current.map_or(0, |c| c.generation) + 1;
            let next = fpb::Assignments {
                generation,
                assignments: items,
                origin_bytes_per_second: share,
            };
            self.store.put_assignments(&device, &next)?;
            if let Some(d) = state.devices.get_mut(&device) {
                d.assigned_generation = generation;
            }
            if let Some(session) = state.sessions.get(&device) {
                send(&session.outbox, &next);
            }
            state.assignments.insert(device, next);
        }
        self.refresh_phases(state)
    }

    /// Emits MODEL_PHASE events for every (deployment, device, model) whose phase moved.
    fn refresh_phases(&self, state: &mut State) -> Result<()> {
        let statuses = statuses(state, None);
        let mut seen = HashMap::new();
        let mut changed = Vec::new();
        for status in statuses {
            for d in &status.devices {
                let key = (status.name.clone(), d.device_id.clone(), d.model_id.clone());
                if state.phases.get(&key) != Some(&d.phase) {
                    changed.push((status.name.clone(), d.clone()));
                }
                seen.insert(key, d.phase);
            }
        }
        state.phases = seen;
        for (deployment, status) in changed {
            self.emit(
                state,
                fpb::WatchResponse {
                    kind: fpb::EventKind::ModelPhase as i32,
                    deployment,
                    device_id: status.device_id.clone(),
                    status: Some(status),
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }

    /// Like [`Controller::refresh_phases`] for one device: a report changes only its
    /// own rows, and a fleet of thousands reports at once.
    fn refresh_device_phases(&self, state: &mut State, id: &str) -> Result<()> {
        let Some(device) = state.devices.get(id) else {
            return Ok(());
        };
        let placed: Vec<&str> = state
            .assignments
            .get(id)
            .map(|a| {
                let mut names: Vec<&str> = a
                    .assignments
                    .iter()
                    .map(|x| x.deployment.as_str())
                    .collect();
                names.dedup();
                names
            })
            .unwrap_or_default();
        let mut changed = Vec::new();
        for name in placed {
            let Some((d, _)) = state.deployments.get(name) else {
                continue;
            };
            for row in rows(d, device) {
                let key = (name.to_owned(), row.device_id.clone(), row.model_id.clone());
                if state.phases.get(&key) != Some(&row.phase) {
                    changed.push((key, row));
                }
            }
        }
        for ((deployment, device_id, model_id), row) in changed {
            state
                .phases
                .insert((deployment.clone(), device_id.clone(), model_id), row.phase);
            self.emit(
                state,
                fpb::WatchResponse {
                    kind: fpb::EventKind::ModelPhase as i32,
                    deployment,
                    device_id,
                    status: Some(row),
                    ..Default::default()
                },
            )?;
        }
        Ok(())
    }

    /// Creates or replaces a deployment (or, with `dry_run`, shows what it would do).
    pub async fn apply(
        &self,
        mut d: fpb::Deployment,
        dry_run: bool,
    ) -> Result<fpb::ApplyDeploymentResponse> {
        let needs = deployment::check(&d)?;
        let response = self.with_state(|c, state| {
            let existing = state.deployments.get(&d.name).map(|(e, _)| e.clone());
            let changed = existing
                .as_ref()
                .is_none_or(|e| deployment::as_written(e) != deployment::as_written(&d));
            let stamp = now();
            d.create_time = existing
                .as_ref()
                .and_then(|e| e.create_time)
                .or(Some(stamp));
            d.generation = existing.as_ref().map_or(0, |e| e.generation) + u64::from(changed);
            d.update_time = if changed {
                Some(stamp)
            } else {
                existing.as_ref().and_then(|e| e.update_time)
            };
            if dry_run {
                let mut trial = State {
                    deployments: state.deployments.clone(),
                    devices: state.devices.clone(),
                    assignments: state.assignments.clone(),
                    ..State::default()
                };
                trial
                    .deployments
                    .insert(d.name.clone(), (d.clone(), needs.clone()));
                let placement = plan_for(&trial).results.remove(&d.name).unwrap_or_default();
                return Ok(fpb::ApplyDeploymentResponse {
                    deployment: Some(d.clone()),
                    placement: Some(placement),
                    changed,
                });
            }
            if changed {
                c.store.put_deployment(&d)?;
                state
                    .deployments
                    .insert(d.name.clone(), (d.clone(), needs.clone()));
                c.begin_rollout(state, existing.as_ref(), &d)?;
                c.emit(
                    state,
                    fpb::WatchResponse {
                        kind: fpb::EventKind::DeploymentApplied as i32,
                        deployment: d.name.clone(),
                        ..Default::default()
                    },
                )?;
                c.replan(state)?;
            }
            Ok(fpb::ApplyDeploymentResponse {
                deployment: Some(d.clone()),
                placement: state.results.get(&d.name).cloned(),
                changed,
            })
        })?;
        self.store.flush().await?;
        Ok(response)
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        self.with_state(|c, state| {
            if state.deployments.remove(name).is_none() {
                return Err(Error::DeploymentNotFound(name.to_owned()));
            }
            c.store.delete_deployment(name)?;
            if state.rollouts.remove(name).is_some() {
                c.store.delete_rollout(name)?;
            }
            c.emit(
                state,
                fpb::WatchResponse {
                    kind: fpb::EventKind::DeploymentDeleted as i32,
                    deployment: name.to_owned(),
                    ..Default::default()
                },
            )?;
            c.replan(state)
        })?;
        self.store.flush().await
    }

    pub fn deployment(&self, name: &str) -> Result<fpb::GetDeploymentResponse> {
        self.with_state(|_, state| {
            let (d, _) = state
                .deployments
                .get(name)
                .ok_or_else(|| Error::DeploymentNotFound(name.to_owned()))?;
            Ok(fpb::GetDeploymentResponse {
                deployment: Some(d.clone()),
                placement: state.results.get(name).cloned(),
            })
        })
    }

    pub fn deployments(&self) -> Vec<fpb::Deployment> {
        self.with_state(|_, state| Ok(state.deployments.values().map(|(d, _)| d.clone()).collect()))
            .unwrap_or_default()
    }

    pub fn devices(&self) -> Vec<fpb::Device> {
        self.with_state(|_, state| Ok(state.devices.values().cloned().collect()))
            .unwrap_or_default()
    }

    pub fn device(&self, id: &str) -> Result<fpb::Device> {
        self.with_state(|_, state| {
            state
                .devices
                .get(id)
                .cloned()
                .ok_or_else(|| Error::DeviceNotFound(id.to_owned()))
        })
    }

    pub fn status(&self, name: Option<&str>) -> Result<Vec<fpb::DeploymentStatus>> {
        self.with_state(|_, state| {
            if let Some(name) = name
                && !state.deployments.contains_key(name)
            {
                return Err(Error::DeploymentNotFound(name.to_owned()));
            }
            Ok(statuses(state, name))
        })
    }

    /// A device's stream opened: records what it said of itself and sends its
    /// assignments. Returns the stream's epoch for [`Controller::detach`].
    pub async fn attach(&self, hello: fpb::Hello, outbox: Outbox) -> Result<(String, u64)> {
        let capabilities = hello
            .capabilities
            .ok_or_else(|| Error::invalid("hello.capabilities", "is required"))?;
        let id = capabilities.node_id.clone();
        if id.is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
            return Err(Error::invalid(
                "hello.capabilities.node_id",
                "must be 1-128 printable characters",
            ));
        }
        let epoch = self.with_state(|c, state| {
            state.epochs += 1;
            let epoch = state.epochs;
            let report = hello.report.unwrap_or_default();
            let previous = state.devices.remove(&id).unwrap_or_default();
            let mut caps = capabilities;
            caps.disk_free_bytes = report.disk_free_bytes.max(caps.disk_free_bytes);
            let device = fpb::Device {
                id: id.clone(),
                site: hello.site,
                labels: hello.labels,
                capabilities: Some(caps),
                measurements: hello.measurements,
                models: report.models,
                connected: true,
                last_seen: Some(now()),
                disconnected_since: None,
                applied_generation: report.applied_generation.max(hello.applied_generation),
                assigned_generation: previous.assigned_generation,
                peer_address: hello.peer_address,
            };
            c.store.put_device(&device)?;
            state.devices.insert(id.clone(), device);
            state.sessions.insert(
                id.clone(),
                Session {
                    outbox: outbox.clone(),
                    epoch,
                },
            );
            c.emit(
                state,
                fpb::WatchResponse {
                    kind: fpb::EventKind::DeviceConnected as i32,
                    device_id: id.clone(),
                    ..Default::default()
                },
            )?;
            // Placement runs on the next tick, once for every device that connected
            // meanwhile (a fleet reconnects all at once after a controller restart).
            state.replan_due = true;
            state.progress_due = true;
            // A device that reconnects gets its assignments even if nothing changed.
            if let Some(a) = state.assignments.get(&id) {
                send(&outbox, a);
            }
            Ok(epoch)
        })?;
        self.store.flush().await?;
        tracing::info!(device = %id, "device connected");
        Ok((id, epoch))
    }

    /// A report from a connected device.
    pub fn report(&self, id: &str, report: fpb::Report) -> Result<()> {
        self.with_state(|c, state| {
            let Some(device) = state.devices.get_mut(id) else {
                return Err(Error::DeviceNotFound(id.to_owned()));
            };
            let newly_applied = report.applied_generation > device.applied_generation;
            // What the device holds decides its site's peers: a change replans.
            let held = |models: &[fpb::ModelReport]| -> Vec<(String, u64, bool)> {
                models
                    .iter()
                    .map(|m| (m.model_id.clone(), m.revision, sites::on_disk(m.state)))
                    .collect()
            };
            let holdings_changed = held(&device.models) != held(&report.models);
            device.models = report.models;
            device.applied_generation = report.applied_generation;
            device.last_seen = Some(now());
            if let Some(caps) = device.capabilities.as_mut() {
                caps.disk_free_bytes = report.disk_free_bytes;
            }
            c.store.put_device(device)?;
            if newly_applied {
                c.emit(
                    state,
                    fpb::WatchResponse {
                        kind: fpb::EventKind::AssignmentsApplied as i32,
                        device_id: id.to_owned(),
                        generation: report.applied_generation,
                        ..Default::default()
                    },
                )?;
            }
            // Replans and rollouts move on the next tick, once for every report
            // that came in meanwhile: a thousand devices report at once.
            if holdings_changed && !device_site_is_empty(state, id) {
                state.replan_due = true;
            }
            state.progress_due |= state.rollouts.values().any(rollout::active);
            c.refresh_device_phases(state, id)
        })
    }

    /// A device's stream ended. A newer stream of the same device is left alone.
    pub async fn detach(&self, id: &str, epoch: u64) {
        let result = self.with_state(|c, state| {
            if state.sessions.get(id).is_none_or(|s| s.epoch != epoch) {
                return Ok(());
            }
            state.sessions.remove(id);
            if let Some(device) = state.devices.get_mut(id) {
                device.connected = false;
                device.disconnected_since = Some(now());
                c.store.put_device(device)?;
            }
            c.emit(
                state,
                fpb::WatchResponse {
                    kind: fpb::EventKind::DeviceDisconnected as i32,
                    device_id: id.to_owned(),
                    ..Default::default()
                },
            )?;
            // Its site lost a peer, and a rollout may be waiting for it.
            state.replan_due |= !device_site_is_empty(state, id);
            state.progress_due = true;
            c.refresh_device_phases(state, id)
        });
        if let Err(e) = result {
            tracing::warn!(device = %id, error = %e, "the disconnection could not be recorded");
        }
        let _ = self.store.flush().await;
        tracing::info!(device = %id, "device disconnected");
    }

    /// Starts a rollout when an apply changed a deployment that has a strategy and ran
    /// somewhere; a change without a strategy ends any rollout (every device takes it).
    fn begin_rollout(
        &self,
        state: &mut State,
        existing: Option<&fpb::Deployment>,
        next: &fpb::Deployment,
    ) -> Result<()> {
        let name = next.name.as_str();
        let (Some(existing), Some(_)) = (existing, next.rollout.as_ref()) else {
            if state.rollouts.remove(name).is_some() {
                self.store.delete_rollout(name)?;
            }
            return Ok(());
        };
        // A change during a rollout starts over from the revision devices fall back to.
        let previous = state
            .rollouts
            .get(name)
            .filter(|r| rollout::active(r))
            .and_then(|r| r.previous.clone())
            .unwrap_or_else(|| existing.clone());
        let placed = plan_for(state)
            .results
            .remove(name)
            .unwrap_or_default()
            .device_ids;
        let devices: Vec<&fpb::Device> = placed
            .iter()
            .filter_map(|id| state.devices.get(id))
            .collect();
        let r = rollout::begin(&previous, next, &devices, SystemTime::now());
        tracing::info!(
            deployment = name,
            from = r.from_revision,
            to = r.to_revision,
            waves = r.waves,
            devices = r.devices.len(),
            "rollout started"
        );
        self.save_rollout(state, r)
    }

    fn save_rollout(&self, state: &mut State, r: fpb::Rollout) -> Result<()> {
        self.store.put_rollout(&r)?;
        let summary = fpb::Rollout {
            devices: Vec::new(),
            previous: None,
            ..r.clone()
        };
        state.rollouts.insert(r.deployment.clone(), r);
        self.emit(
            state,
            fpb::WatchResponse {
                kind: fpb::EventKind::Rollout as i32,
                deployment: summary.deployment.clone(),
                rollout: Some(summary),
                ..Default::default()
            },
        )
    }

    /// Moves every rollout on from what devices reported.
    fn progress(&self, state: &mut State) -> Result<()> {
        let names: Vec<String> = state.rollouts.keys().cloned().collect();
        let mut replan = false;
        for name in names {
            let (Some(mut r), Some((next, _))) = (
                state.rollouts.get(&name).cloned(),
                state.deployments.get(&name).cloned(),
            ) else {
                continue;
            };
            let moved = rollout::advance(&mut r, &next, &state.devices, SystemTime::now());
            if moved.rolling_back {
                self.restore_previous(state, &r)?;
            }
            if moved.changed {
                tracing::info!(deployment = %name, state = r.state().as_str_name(), wave = r.wave, failed = r.failed_devices, reason = %r.reason, "rollout moved");
                self.save_rollout(state, r)?;
            }
            replan |= moved.replan;
        }
        if replan {
            self.replan(state)?;
        }
        Ok(())
    }

    /// The deployment goes back to the previous revision's content, under a new
    /// revision number (numbers only grow, so a device never mistakes the old gates
    /// for the new).
    fn restore_previous(&self, state: &mut State, r: &fpb::Rollout) -> Result<()> {
        let Some(previous) = r.previous.clone() else {
            return Ok(());
        };
        let Some((current, _)) = state.deployments.get(&r.deployment) else {
            return Ok(());
        };
        let restored = fpb::Deployment {
            generation: current.generation + 1,
            update_time: Some(now()),
            ..previous
        };
        let needs = deployment::check(&restored)?;
        self.store.put_deployment(&restored)?;
        state
            .deployments
            .insert(restored.name.clone(), (restored, needs));
        Ok(())
    }

    /// What reports left for later: replans and rollouts moved on. With `clock`,
    /// rollouts move even without reports (wave intervals, devices lost too long).
    pub async fn tick(&self, clock: bool) -> Result<()> {
        let worked = self.with_state(|c, state| {
            let mut worked = false;
            if std::mem::take(&mut state.replan_due) {
                c.replan(state)?;
                worked = true;
            }
            if std::mem::take(&mut state.progress_due) || clock {
                c.progress(state)?;
                worked = true;
            }
            Ok(worked)
        })?;
        if worked {
            self.store.flush().await?;
        }
        Ok(())
    }

    pub fn rollout(&self, name: &str) -> Result<fpb::Rollout> {
        self.with_state(|_, state| {
            if !state.deployments.contains_key(name) {
                return Err(Error::DeploymentNotFound(name.to_owned()));
            }
            state
                .rollouts
                .get(name)
                .cloned()
                .ok_or_else(|| Error::RolloutNotFound(name.to_owned()))
        })
    }

    /// An operator's command on a rollout.
    pub async fn control(&self, name: &str, command: RolloutCommand) -> Result<fpb::Rollout> {
        use fpb::RolloutState as S;
        let r = self.with_state(|c, state| {
            let mut r = state
                .rollouts
                .get(name)
                .cloned()
                .ok_or_else(|| Error::RolloutNotFound(name.to_owned()))?;
            let current = r.state();
            let refuse = || {
                Err(Error::RolloutState(format!(
                    "the rollout of {name:?} is {}; {} needs one that is {}",
                    current
                        .as_str_name()
                        .trim_start_matches("ROLLOUT_STATE_")
                        .to_ascii_lowercase(),
                    command.as_str(),
                    command.allowed_from()
                )))
            };
            let now = SystemTime::now();
            match command {
                RolloutCommand::Pause if current == S::Progressing => {
                    r.state = S::Paused as i32;
                    r.reason = "paused by an operator".into();
                }
                RolloutCommand::Resume if current == S::Paused => {
                    r.state = S::Progressing as i32;
                    r.reason = String::new();
                }
                RolloutCommand::Abort if matches!(current, S::Progressing | S::Paused) => {
                    r.state = S::Aborted as i32;
                    r.reason = "aborted by an operator".into();
                }
                RolloutCommand::Rollback if rollout::active(&r) => {
                    r.reason = "rolled back by an operator".into();
                    rollout::start_rollback(&mut r, now);
                    c.restore_previous(state, &r)?;
                }
                _ => return refuse(),
            }
            r.update_time = Some(modeld::api::convert::timestamp(now));
            c.save_rollout(state, r.clone())?;
            c.replan(state)?;
            c.progress(state)?;
            Ok(state.rollouts.get(name).cloned().unwrap_or(r))
        })?;
        self.store.flush().await?;
        Ok(r)
    }

    /// Events after `since` from the store, then live ones; `since == 0` = live only.
    pub fn watch(
        &self,
        since: u64,
    ) -> Result<(
        Vec<fpb::WatchResponse>,
        broadcast::Receiver<fpb::WatchResponse>,
    )> {
        // Subscribing under the lock means no event falls between replay and live.
        self.with_state(|c, state| {
            let live = c.events.subscribe();
            if since == 0 {
                return Ok((Vec::new(), live));
            }
            let (past, first) = c.store.events_after(since)?;
            if first > since + 1 && since < state.revision {
                return Err(Error::RevisionCompacted { since, first });
            }
            Ok((past, live))
        })
    }
}

fn device_site_is_empty(state: &State, id: &str) -> bool {
    state.devices.get(id).is_none_or(|d| d.site.is_empty())
}

/// What an operator can do to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutCommand {
    Pause,
    Resume,
    Abort,
    Rollback,
}

impl RolloutCommand {
    fn as_str(self) -> &'static str {
        match self {
            RolloutCommand::Pause => "pause",
            RolloutCommand::Resume => "resume",
            RolloutCommand::Abort => "abort",
            RolloutCommand::Rollback => "rollback",
        }
    }

    fn allowed_from(self) -> &'static str {
        match self {
            RolloutCommand::Pause => "progressing",
            RolloutCommand::Resume => "paused",
            RolloutCommand::Abort => "progressing or paused",
            RolloutCommand::Rollback => "progressing, paused or aborted",
        }
    }
}

fn send(outbox: &Outbox, assignments: &fpb::Assignments) {
    let message = fpb::ConnectResponse {
        message: Some(fpb::connect_response::Message::Assignments(
            assignments.clone(),
        )),
    };
    // A full outbox means the device is not reading; it gets everything again when
    // it reconnects.
    if outbox.try_send(Ok(message)).is_err() {
        tracing::warn!("a device's stream is full or closed; it catches up on reconnect");
    }
}

/// Placement of every deployment (oldest first) on every known device.
fn plan_for(state: &State) -> placement::Plan {
    let mut ordered: Vec<&(fpb::Deployment, Vec<Needs>)> = state.deployments.values().collect();
    ordered.sort_by(|a, b| {
        let key = |d: &fpb::Deployment| d.create_time.map(|t| (t.seconds, t.nanos));
        key(&a.0)
            .cmp(&key(&b.0))
            .then_with(|| a.0.name.cmp(&b.0.name))
    });
    let placeable: Vec<Placeable<'_>> = ordered
        .iter()
        .map(|(d, needs)| Placeable {
            deployment: d,
            needs,
        })
        .collect();
    let devices: Vec<&fpb::Device> = state.devices.values().collect();
    let previous = state
        .assignments
        .iter()
        .map(|(id, a)| (id.clone(), a.assignments.clone()))
        .collect();
    placement::plan(&placeable, &devices, &previous)
}

/// Where a model stands on a device, from the device's last report.
fn phase<'a>(
    device: &'a fpb::Device,
    model_id: &str,
    wanted: i32,
) -> (fpb::ModelPhase, Option<&'a fpb::ModelReport>) {
    if !device.connected {
        return (fpb::ModelPhase::Unreachable, None);
    }
    let Some(report) = device.models.iter().find(|m| m.model_id == model_id) else {
        return (fpb::ModelPhase::Pending, None);
    };
    let state = pb::ModelState::try_from(report.state).unwrap_or(pb::ModelState::Unspecified);
    let stored_is_enough = wanted == fpb::WantedState::Stored as i32;
    let phase = match state {
        pb::ModelState::Ready => fpb::ModelPhase::Ready,
        pb::ModelState::Downloaded if stored_is_enough => fpb::ModelPhase::Stored,
        pb::ModelState::Downloading | pb::ModelState::Extracting => fpb::ModelPhase::Downloading,
        pb::ModelState::Validating | pb::ModelState::Initializing | pb::ModelState::Loading => {
            fpb::ModelPhase::Loading
        }
        pb::ModelState::Failed => fpb::ModelPhase::Failed,
        _ if !report.error.is_empty() => fpb::ModelPhase::Failed,
        _ => fpb::ModelPhase::Pending,
    };
    (phase, Some(report))
}

/// Where each model of `d` stands on `device`.
fn rows(d: &fpb::Deployment, device: &fpb::Device) -> Vec<fpb::DeviceModelStatus> {
    d.models
        .iter()
        .map(|model| {
            let model_id = model
                .spec
                .as_ref()
                .map(|s| s.id.clone())
                .unwrap_or_default();
            let (phase, report) = phase(device, &model_id, model.state);
            fpb::DeviceModelStatus {
                device_id: device.id.clone(),
                model_id,
                wanted: model.state,
                phase: phase as i32,
                bytes_done: report.map_or(0, |r| r.bytes_done),
                bytes_total: report.map_or(0, |r| r.bytes_total),
                error: report.map(|r| r.error.clone()).unwrap_or_default(),
                since: if phase == fpb::ModelPhase::Unreachable {
                    device.disconnected_since
                } else {
                    device.last_seen
                },
            }
        })
        .collect()
}

fn statuses(state: &State, only: Option<&str>) -> Vec<fpb::DeploymentStatus> {
    let mut out = Vec::new();
    for (name, (d, _)) in &state.deployments {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let result = state.results.get(name).cloned().unwrap_or_default();
        let mut status = fpb::DeploymentStatus {
            name: name.clone(),
            generation: d.generation,
            unplaced: result.unplaced.clone(),
            warning: result.warning.clone(),
            converged: true,
            ..Default::default()
        };
        for device_id in &result.device_ids {
            let Some(device) = state.devices.get(device_id) else {
                continue;
            };
            let up_to_date = device.applied_generation >= device.assigned_generation;
            for row in rows(d, device) {
                let reached = row.phase == fpb::ModelPhase::Ready as i32
                    || row.phase == fpb::ModelPhase::Stored as i32;
                if !(reached && up_to_date) {
                    status.converged = false;
                }
                status.devices.push(row);
            }
        }
        if result.device_ids.is_empty() {
            status.converged = false;
        }
        out.push(status);
    }
    out
}
