//! Rollouts: a changed deployment reaches its devices in waves. A canary takes the new
//! revision first; each later wave starts only when every device before it passed the
//! gates the deployment names (the devices run them and report), grows by the growth
//! factor up to `max_unavailable`, and waits the wave interval. Too many failures abort
//! the rollout and, unless the deployment says otherwise, roll every device that took
//! the new revision back to the previous one, whose files it kept.
//!
//! Pure functions of the rollout record, the deployments and what devices reported, so
//! the controller calls them after every change and on a timer, and tests call them
//! without a network.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use modeld_proto::fleet::v1 as fpb;
use modeld_proto::pbjson_types::Timestamp;
use modeld_proto::v1 as pb;

use crate::placement;

use fpb::{DeviceRolloutPhase as Phase, RolloutState as State};

/// Defaults the protocol states for unset strategy fields.
const DEFAULT_GROWTH: f64 = 2.0;
const DEFAULT_DEVICE_LOST_TIMEOUT: Duration = Duration::from_secs(600);

fn stamp(t: SystemTime) -> Timestamp {
    modeld::api::convert::timestamp(t)
}

fn seconds_since(t: Option<&Timestamp>, now: SystemTime) -> f64 {
    let Some(t) = t else { return 0.0 };
    let then = SystemTime::UNIX_EPOCH
        + Duration::new(
            u64::try_from(t.seconds).unwrap_or(0),
            u32::try_from(t.nanos).unwrap_or(0),
        );
    now.duration_since(then).map_or(0.0, |d| d.as_secs_f64())
}

/// True while the rollout still decides which revision each device runs.
pub fn active(r: &fpb::Rollout) -> bool {
    matches!(
        State::try_from(r.state),
        Ok(State::Progressing | State::Paused | State::Aborted)
    )
}

/// Starts a rollout of `next` over `previous` on `devices` (the new revision's
/// placement). Devices are put in waves: the canary (preferring its labels), then
/// waves growing by the growth factor up to `max_unavailable`.
pub fn begin(
    previous: &fpb::Deployment,
    next: &fpb::Deployment,
    devices: &[&fpb::Device],
    now: SystemTime,
) -> fpb::Rollout {
    let strategy = next.rollout.clone().unwrap_or_default();
    let canary = strategy.canary.clone().unwrap_or_default();
    let mut ordered: Vec<&fpb::Device> = devices.to_vec();
    let preferred = |d: &fpb::Device| {
        !canary.labels.is_empty()
            && canary
                .labels
                .iter()
                .all(|(k, v)| d.labels.get(k) == Some(v))
    };
    ordered.sort_by(|a, b| {
        preferred(b)
            .cmp(&preferred(a))
            .then_with(|| a.id.cmp(&b.id))
    });
    let total = ordered.len();
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let canary_size = if canary.devices > 0 {
        canary.devices as usize
    } else if canary.fraction > 0.0 {
        (canary.fraction * total as f64).ceil() as usize
    } else {
        1
    }
    .clamp(1, total.max(1));
    let max_unavailable = strategy.max_unavailable.max(1) as usize;
    let growth = if strategy.growth_factor >= 1.0 {
        strategy.growth_factor
    } else {
        DEFAULT_GROWTH
    };
    let mut sizes = vec![canary_size];
    let mut placed = canary_size;
    while placed < total {
        let last = *sizes.last().unwrap_or(&1);
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let grown = ((last as f64) * growth).ceil() as usize;
        let size = grown.clamp(1, max_unavailable).min(total - placed);
        sizes.push(size);
        placed += size;
    }
    let mut rollout_devices = Vec::with_capacity(total);
    let mut iter = ordered.into_iter();
    for (wave, size) in sizes.iter().enumerate() {
        for d in iter.by_ref().take(*size) {
            rollout_devices.push(fpb::DeviceRollout {
                device_id: d.id.clone(),
                wave: u32::try_from(wave).unwrap_or(u32::MAX),
                phase: if wave == 0 {
                    Phase::Updating
                } else {
                    Phase::Waiting
                } as i32,
                since: Some(stamp(now)),
                ..Default::default()
            });
        }
    }
    fpb::Rollout {
        deployment: next.name.clone(),
        from_revision: previous.generation,
        to_revision: next.generation,
        state: State::Progressing as i32,
        wave: 0,
        waves: u32::try_from(sizes.len()).unwrap_or(u32::MAX),
        devices: rollout_devices,
        start_time: Some(stamp(now)),
        update_time: Some(stamp(now)),
        previous: Some(previous.clone()),
        ..Default::default()
    }
}

/// The spec each model had in the previous revision, by model id.
fn previous_specs(r: &fpb::Rollout) -> HashMap<String, pb::ModelSpec> {
    r.previous
        .iter()
        .flat_map(|p| &p.models)
        .filter_map(|m| m.spec.clone())
        .map(|s| (s.id.clone(), s))
        .collect()
}

/// Gives each device of an active rollout the revision its phase says: the new one
/// (with the gates, and the previous spec to keep) once its wave started, else the
/// previous one; a device a completed rollout skipped stays on the previous one.
/// `strategy_of` names the strategy of a deployment's current revision.
pub fn shape(
    assignments: &mut BTreeMap<String, Vec<fpb::Assignment>>,
    rollouts: &BTreeMap<String, fpb::Rollout>,
    strategy_of: impl Fn(&str) -> fpb::RolloutStrategy,
) {
    for r in rollouts.values() {
        // A completed rollout still holds its skipped devices on the previous
        // revision: the swap policy left them there, and the next revision is the one
        // to reach them, gated like any other.
        let running = active(r);
        if !running && r.state != State::Completed as i32 {
            continue;
        }
        let Some(previous) = &r.previous else {
            continue;
        };
        let old = placement::assignments_of(previous);
        let kept = previous_specs(r);
        let strategy = strategy_of(&r.deployment);
        let new_owner = |a: &fpb::Assignment| a.deployment == r.deployment;
        for device in &r.devices {
            if !running && device.phase != Phase::Skipped as i32 {
                continue;
            }
            let Some(items) = assignments.get_mut(&device.device_id) else {
                continue;
            };
            let on_new = matches!(
                Phase::try_from(device.phase),
                Ok(Phase::Updating | Phase::Passed | Phase::Failed)
            );
            if on_new {
                for a in items.iter_mut().filter(|a| new_owner(a)) {
                    let id = a.spec.as_ref().map(|s| s.id.clone()).unwrap_or_default();
                    a.gates = Some(strategy.gates.clone().unwrap_or_default());
                    a.swap = strategy.swap;
                    a.retain = kept
                        .get(&id)
                        .filter(|s| Some(*s) != a.spec.as_ref())
                        .cloned();
                }
            } else if items.iter().any(new_owner) {
                items.retain(|a| !new_owner(a));
                items.extend(old.iter().cloned());
            }
        }
    }
}

/// Where one device stands on the new revision, from its last report.
fn verdict(
    to_revision: u64,
    next: &fpb::Deployment,
    device: &fpb::Device,
) -> Option<(Phase, Vec<fpb::GateResult>, String)> {
    let mut results = Vec::new();
    let mut all_passed = true;
    for model in &next.models {
        let id = model
            .spec
            .as_ref()
            .map(|s| s.id.as_str())
            .unwrap_or_default();
        let gates = device
            .models
            .iter()
            .find(|m| m.model_id == id)
            .and_then(|m| m.gates.as_ref())
            .filter(|g| g.revision == to_revision);
        let Some(gates) = gates else {
            all_passed = false;
            continue;
        };
        results.extend(gates.results.iter().cloned());
        match fpb::GateState::try_from(gates.state) {
            Ok(fpb::GateState::Passed) => {}
            Ok(fpb::GateState::Failed) => {
                let why = gates
                    .results
                    .iter()
                    .filter(|g| !g.passed)
                    .map(|g| format!("{} {}: {}", g.model_id, g.gate, g.detail))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Some((Phase::Failed, results, why));
            }
            Ok(fpb::GateState::Skipped) => {
                let why = gates
                    .results
                    .iter()
                    .filter(|g| !g.passed)
                    .map(|g| g.detail.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Some((Phase::Skipped, results, why));
            }
            _ => all_passed = false,
        }
    }
    if all_passed {
        return Some((Phase::Passed, results, String::new()));
    }
    // Still running: show what has come in so far.
    Some((Phase::Updating, results, String::new()))
}

/// True when every model of `current` runs on the device at that revision.
fn back_on(current: &fpb::Deployment, device: &fpb::Device) -> bool {
    device.connected
        && current.models.iter().all(|model| {
            let id = model
                .spec
                .as_ref()
                .map(|s| s.id.as_str())
                .unwrap_or_default();
            device.models.iter().any(|m| {
                let stored_is_enough = model.state == fpb::WantedState::Stored as i32;
                let state =
                    pb::ModelState::try_from(m.state).unwrap_or(pb::ModelState::Unspecified);
                m.model_id == id
                    && m.revision == current.generation
                    && (state == pb::ModelState::Ready
                        || (stored_is_enough && state == pb::ModelState::Downloaded))
            })
        })
}

/// What [`advance`] changed, for the controller's events and replanning.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moved {
    /// Some device changed phase or the rollout changed state or wave.
    pub changed: bool,
    /// Devices' revisions must be recomputed (a wave started, an abort, a rollback).
    pub replan: bool,
    /// The rollout started rolling back: the deployment returns to `previous`.
    pub rolling_back: bool,
}

/// Moves the rollout on from what devices reported: device phases, then the abort
/// threshold, then the next wave or completion. `next` is the deployment's revision
/// being rolled out (or, once rolling back, the revision devices return to).
pub fn advance(
    r: &mut fpb::Rollout,
    next: &fpb::Deployment,
    devices: &BTreeMap<String, fpb::Device>,
    now: SystemTime,
) -> Moved {
    let mut moved = Moved::default();
    let strategy = next.rollout.clone().unwrap_or_default();
    let state = State::try_from(r.state).unwrap_or(State::Unspecified);
    if state == State::RollingBack {
        for d in &mut r.devices {
            if d.phase == Phase::RollingBack as i32
                && devices
                    .get(&d.device_id)
                    .is_some_and(|dev| back_on(next, dev))
            {
                d.phase = Phase::RolledBack as i32;
                d.since = Some(stamp(now));
                moved.changed = true;
            }
        }
        if r.devices
            .iter()
            .all(|d| d.phase != Phase::RollingBack as i32)
        {
            r.state = State::RolledBack as i32;
            moved.changed = true;
        }
        if moved.changed {
            r.update_time = Some(stamp(now));
        }
        return moved;
    }
    if !matches!(state, State::Progressing | State::Paused) {
        return moved;
    }
    let lost_after = match strategy.device_lost_timeout_seconds {
        0 => DEFAULT_DEVICE_LOST_TIMEOUT.as_secs_f64(),
        s => f64::from(s),
    };
    let fail_at_once = strategy.device_lost == fpb::DeviceLostPolicy::Fail as i32;
    let to_revision = r.to_revision;
    for d in &mut r.devices {
        if d.phase != Phase::Updating as i32 {
            continue;
        }
        let Some(device) = devices.get(&d.device_id) else {
            continue;
        };
        if !device.connected {
            let away = seconds_since(device.disconnected_since.as_ref(), now);
            if fail_at_once || away >= lost_after {
                d.phase = Phase::Failed as i32;
                d.reason = format!("disconnected for {away:.0} s while updating");
                d.since = Some(stamp(now));
                moved.changed = true;
            }
            continue;
        }
        if let Some((phase, gates, reason)) = verdict(to_revision, next, device)
            && (phase as i32 != d.phase || gates != d.gates)
        {
            d.phase = phase as i32;
            d.gates = gates;
            d.reason = reason;
            d.since = Some(stamp(now));
            moved.changed = true;
        }
    }
    let failed = r
        .devices
        .iter()
        .filter(|d| d.phase == Phase::Failed as i32)
        .count();
    r.failed_devices = u32::try_from(failed).unwrap_or(u32::MAX);
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let allowed = (strategy.max_failed_devices as usize)
        .max((strategy.max_failed_fraction * r.devices.len() as f64).floor() as usize);
    if failed > allowed {
        r.reason = format!(
            "{failed} device(s) failed their gates, more than the {allowed} allowed: {}",
            r.devices
                .iter()
                .filter(|d| d.phase == Phase::Failed as i32)
                .map(|d| format!("{} ({})", d.device_id, d.reason))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if strategy.manual_rollback {
            r.state = State::Aborted as i32;
        } else {
            start_rollback(r, now);
            moved.rolling_back = true;
        }
        r.update_time = Some(stamp(now));
        moved.changed = true;
        moved.replan = true;
        return moved;
    }
    let done = |d: &fpb::DeviceRollout| {
        matches!(
            Phase::try_from(d.phase),
            Ok(Phase::Passed | Phase::Failed | Phase::Skipped)
        )
    };
    let wave_done = r.devices.iter().filter(|d| d.wave <= r.wave).all(done);
    if wave_done && state == State::Progressing {
        if r.wave + 1 >= r.waves {
            r.state = State::Completed as i32;
            r.reason = String::new();
            moved.changed = true;
            moved.replan = true;
        } else {
            // The wave interval runs from the moment the last device of the wave
            // finished.
            let finished = r
                .devices
                .iter()
                .filter(|d| d.wave <= r.wave)
                .map(|d| seconds_since(d.since.as_ref(), now))
                .fold(f64::INFINITY, f64::min);
            if finished >= f64::from(strategy.wave_interval_seconds) {
                r.wave += 1;
                for d in r.devices.iter_mut().filter(|d| d.wave == r.wave) {
                    d.phase = Phase::Updating as i32;
                    d.since = Some(stamp(now));
                }
                moved.changed = true;
                moved.replan = true;
            }
        }
    }
    if moved.changed {
        r.update_time = Some(stamp(now));
    }
    moved
}

/// Every device that took the new revision goes back; the others never left.
pub fn start_rollback(r: &mut fpb::Rollout, now: SystemTime) {
    r.state = State::RollingBack as i32;
    for d in &mut r.devices {
        if matches!(
            Phase::try_from(d.phase),
            Ok(Phase::Updating | Phase::Passed | Phase::Failed)
        ) {
            d.phase = Phase::RollingBack as i32;
            d.since = Some(stamp(now));
        }
    }
    if r.devices
        .iter()
        .all(|d| d.phase != Phase::RollingBack as i32)
    {
        r.state = State::RolledBack as i32;
    }
    r.update_time = Some(stamp(now));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn device(id: &str, canary: bool) -> fpb::Device {
        let mut labels = std::collections::HashMap::new();
        if canary {
            labels.insert("ring".to_owned(), "canary".to_owned());
        }
        fpb::Device {
            id: id.into(),
            labels,
            connected: true,
            ..Default::default()
        }
    }

    fn deployment(generation: u64, strategy: fpb::RolloutStrategy) -> fpb::Deployment {
        fpb::Deployment {
            name: "d".into(),
            generation,
            models: vec![fpb::DeploymentModel {
                spec: Some(pb::ModelSpec {
                    id: "m".into(),
                    ..Default::default()
                }),
                state: fpb::WantedState::Loaded as i32,
                ..Default::default()
            }],
            rollout: Some(strategy),
            ..Default::default()
        }
    }

    fn sizes(r: &fpb::Rollout) -> Vec<usize> {
        (0..r.waves)
            .map(|w| r.devices.iter().filter(|d| d.wave == w).count())
            .collect()
    }

    #[test]
    fn a_device_skipped_by_a_completed_rollout_keeps_the_previous_revision() {
        let devices = [device("d0", false), device("d1", false)];
        let refs: Vec<&fpb::Device> = devices.iter().collect();
        let strategy = fpb::RolloutStrategy::default();
        let previous = deployment(1, strategy.clone());
        let next = deployment(2, strategy.clone());
        let mut r = begin(&previous, &next, &refs, SystemTime::now());
        r.state = State::Completed as i32;
        r.devices[0].phase = Phase::Skipped as i32;
        r.devices[1].phase = Phase::Passed as i32;
        let rollouts = BTreeMap::from([("d".to_owned(), r.clone())]);
        let fresh = || {
            BTreeMap::from([
                ("d0".to_owned(), placement::assignments_of(&next)),
                ("d1".to_owned(), placement::assignments_of(&next)),
            ])
        };
        let revision = |a: &BTreeMap<String, Vec<fpb::Assignment>>, d: &str| {
            a[d].iter().map(|x| x.revision).collect::<Vec<_>>()
        };
        let mut assignments = fresh();
        shape(&mut assignments, &rollouts, |_| strategy.clone());
        assert_eq!(revision(&assignments, "d0"), vec![1]);
        assert_eq!(revision(&assignments, "d1"), vec![2]);
        // Rolled back, the rollout no longer shapes anything.
        r.state = State::RolledBack as i32;
        let rollouts = BTreeMap::from([("d".to_owned(), r)]);
        let mut assignments = fresh();
        shape(&mut assignments, &rollouts, |_| strategy.clone());
        assert_eq!(revision(&assignments, "d0"), vec![2]);
    }

    #[test]
    fn waves_grow_from_the_canary_up_to_max_unavailable() {
        let devices: Vec<fpb::Device> = (0..10).map(|i| device(&format!("d{i}"), i == 7)).collect();
        let refs: Vec<&fpb::Device> = devices.iter().collect();
        let strategy = fpb::RolloutStrategy {
            canary: Some(fpb::Canary {
                devices: 1,
                labels: [("ring".to_owned(), "canary".to_owned())].into(),
                ..Default::default()
            }),
            max_unavailable: 3,
            ..Default::default()
        };
        let r = begin(
            &deployment(1, strategy.clone()),
            &deployment(2, strategy),
            &refs,
            SystemTime::now(),
        );
        assert_eq!(sizes(&r), vec![1, 2, 3, 3, 1]);
        assert_eq!(
            r.devices[0].device_id, "d7",
            "the labelled device is the canary"
        );
        assert_eq!(r.devices[0].phase, Phase::Updating as i32);
        assert!(
            r.devices[1..]
                .iter()
                .all(|d| d.phase == Phase::Waiting as i32)
        );
    }

    fn report(r: &fpb::Rollout, id: &str, state: fpb::GateState) -> fpb::Device {
        fpb::Device {
            models: vec![fpb::ModelReport {
                model_id: "m".into(),
                gates: Some(fpb::GateReport {
                    revision: r.to_revision,
                    state: state as i32,
                    results: vec![fpb::GateResult {
                        model_id: "m".into(),
                        gate: "smoke".into(),
                        passed: state == fpb::GateState::Passed,
                        detail: "answered".into(),
                    }],
                }),
                ..Default::default()
            }],
            ..device(id, false)
        }
    }

    #[test]
    fn a_device_lost_while_updating_is_waited_for_or_failed_as_the_policy_says() {
        let lost_at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let mut gone = device("d0", false);
        gone.connected = false;
        gone.disconnected_since = Some(stamp(lost_at));
        let seen = BTreeMap::from([("d0".to_owned(), gone.clone())]);
        let at = |s: u64| lost_at + std::time::Duration::from_secs(s);
        for (policy, timeout, failed_after) in [
            (fpb::DeviceLostPolicy::Wait, 60, 60),
            (fpb::DeviceLostPolicy::Fail, 60, 0),
        ] {
            let strategy = fpb::RolloutStrategy {
                device_lost: policy as i32,
                device_lost_timeout_seconds: timeout,
                max_failed_devices: 1,
                ..Default::default()
            };
            let next = deployment(2, strategy.clone());
            let mut r = begin(&deployment(1, strategy), &next, &[&gone], lost_at);
            if failed_after > 0 {
                advance(&mut r, &next, &seen, at(failed_after - 1));
                assert_eq!(r.devices[0].phase, Phase::Updating as i32, "{policy:?}");
            }
            advance(&mut r, &next, &seen, at(failed_after));
            assert_eq!(r.devices[0].phase, Phase::Failed as i32, "{policy:?}");
            assert!(r.devices[0].reason.contains("disconnected"), "{policy:?}");
        }
    }

    #[test]
    fn a_passing_canary_opens_the_next_wave_and_a_failure_rolls_back() {
        let devices: Vec<fpb::Device> = (0..3).map(|i| device(&format!("d{i}"), false)).collect();
        let refs: Vec<&fpb::Device> = devices.iter().collect();
        let next = deployment(2, fpb::RolloutStrategy::default());
        let mut r = begin(
            &deployment(1, fpb::RolloutStrategy::default()),
            &next,
            &refs,
            SystemTime::now(),
        );
        assert_eq!(sizes(&r), vec![1, 1, 1]);
        let mut seen: BTreeMap<String, fpb::Device> =
            devices.iter().map(|d| (d.id.clone(), d.clone())).collect();
        // Nothing reported yet: the canary is still updating.
        assert!(!advance(&mut r, &next, &seen, SystemTime::now()).replan);
        seen.insert("d0".into(), report(&r, "d0", fpb::GateState::Passed));
        let moved = advance(&mut r, &next, &seen, SystemTime::now());
        assert!(moved.replan);
        assert_eq!(r.wave, 1);
        assert_eq!(r.devices[1].phase, Phase::Updating as i32);
        seen.insert("d1".into(), report(&r, "d1", fpb::GateState::Failed));
        let moved = advance(&mut r, &next, &seen, SystemTime::now());
        assert!(moved.rolling_back);
        assert_eq!(r.state, State::RollingBack as i32);
        assert_eq!(r.failed_devices, 1);
        assert!(r.reason.contains("d1 (m smoke: answered)"), "{}", r.reason);
        // The device that never left its revision is not rolled back.
        assert_eq!(r.devices[2].phase, Phase::Waiting as i32);
        assert_eq!(r.devices[0].phase, Phase::RollingBack as i32);
    }
}
