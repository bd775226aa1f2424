//! Placement: which devices get a deployment's models, decided from what the devices
//! reported (their runtimes, memory budget, free disk and measured speeds), never
//! guessed. A pure function of deployments and devices, so it is tested without a
//! network and re-run from scratch on every change.
//!
//! Deployments are placed oldest first: a newer deployment that would overflow a
//! device goes elsewhere or is refused there with the reason, and never displaces an
//! older one. A device gets all of a deployment's models or none of them.

use std::collections::{BTreeMap, HashMap};

use bytesize::ByteSize;
use modeld_proto::fleet::v1 as fpb;
use modeld_proto::v1 as pb;

/// What one model of a deployment needs from a device, worked out once at apply.
#[derive(Debug, Clone, PartialEq)]
pub struct Needs {
    pub model_id: String,
    pub format: pb::ModelFormat,
    /// A runtime the load options name; `None` = any that runs the format.
    pub runtime: Option<pb::Runtime>,
    pub wanted: fpb::WantedState,
    /// Memory at the load's context (CheckCompatibility's figure); counted only for
    /// models that are loaded.
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub min_generation_tokens_per_second: f64,
}

/// A deployment ready to place: the stored message and its models' needs.
#[derive(Debug, Clone)]
pub struct Placeable<'a> {
    pub deployment: &'a fpb::Deployment,
    pub needs: &'a [Needs],
}

#[derive(Debug, Default)]
pub struct Plan {
    /// Every known device's assignments (empty for a device that gets nothing).
    pub assignments: BTreeMap<String, Vec<fpb::Assignment>>,
    pub results: BTreeMap<String, fpb::PlacementResult>,
}

fn human(bytes: u64) -> String {
    ByteSize::b(bytes).display().iec().to_string()
}

/// The device class as deployments name it ("edge-box" for DEVICE_CLASS_EDGE_BOX).
pub fn device_class_name(class: i32) -> String {
    pb::DeviceClass::try_from(class)
        .unwrap_or(pb::DeviceClass::Unspecified)
        .as_str_name()
        .trim_start_matches("DEVICE_CLASS_")
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// True when `os` (as reported, e.g. "Debian GNU/Linux") names `wanted` ("linux"):
/// the whole string or one of its words, ignoring case.
fn os_matches(os: &str, wanted: &str) -> bool {
    os.eq_ignore_ascii_case(wanted)
        || os
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|w| w.eq_ignore_ascii_case(wanted))
}

/// Why `device` is outside `selector`, or `None` when it matches.
pub fn mismatch(selector: &fpb::Selector, device: &fpb::Device) -> Option<String> {
    let caps = device.capabilities.clone().unwrap_or_default();
    let class = device_class_name(caps.device_class);
    if !selector.device_classes.is_empty() && !selector.device_classes.contains(&class) {
        return Some(format!("device class {class}"));
    }
    if !selector.os.is_empty() && !selector.os.iter().any(|o| os_matches(&caps.os, o)) {
        return Some(format!("OS {}", caps.os));
    }
    for (key, value) in &selector.labels {
        if device.labels.get(key) != Some(value) {
            return Some(format!("label {key}"));
        }
    }
    if !selector.sites.is_empty() && !selector.sites.contains(&device.site) {
        return Some(format!("site {:?}", device.site));
    }
    let total = caps.memory.map_or(0, |m| m.total_bytes);
    if total < selector.min_memory_bytes {
        return Some(format!("{} of memory", human(total)));
    }
    for wanted in &selector.accelerators {
        let has = *wanted == pb::Accelerator::Cpu as i32
            || caps.accelerators.iter().any(|a| a.kind == *wanted);
        if !has {
            return Some("missing accelerator".into());
        }
    }
    for wanted in &selector.runtimes {
        if !caps
            .runtimes
            .iter()
            .any(|r| r.runtime == *wanted && r.unavailable_reason.is_empty())
        {
            return Some("missing runtime".into());
        }
    }
    None
}

/// What a device has left while a plan fills it.
#[derive(Debug, Clone, Copy)]
struct Room {
    memory: u64,
    disk: u64,
}

/// True when the device holds the model's files, or is downloading them (the disk
/// it reports free already counts what arrived, so its own download must not push the
/// model off it).
fn stored_there(device: &fpb::Device, model_id: &str) -> bool {
    device.models.iter().any(|m| {
        m.model_id == model_id
            && !matches!(
                pb::ModelState::try_from(m.state),
                Ok(pb::ModelState::Registered
                    | pb::ModelState::Failed
                    | pb::ModelState::Unspecified)
                    | Err(_)
            )
    })
}

/// Generation tokens/s the device reaches (or is estimated to reach) with a model.
fn speed(device: &fpb::Device, need: &Needs) -> Option<f64> {
    let same_format = device
        .measurements
        .iter()
        .filter(|m| m.format == need.format as i32 && m.generation_tokens_per_second > 0.0);
    if let Some(exact) = same_format.clone().find(|m| m.model_id == need.model_id) {
        return Some(exact.generation_tokens_per_second);
    }
    // Decoding reads every weight once per token: speed scales inversely with size.
    #[allow(clippy::cast_precision_loss)]
    let scaled = same_format
        .filter(|m| m.model_bytes > 0 && need.disk_bytes > 0)
        .map(|m| m.generation_tokens_per_second * m.model_bytes as f64 / need.disk_bytes as f64)
        .reduce(f64::max);
    scaled.or_else(|| predicted_speed(device, need))
}

/// Generation tokens/s the device's own prediction gives (its measured bandwidth
/// times the runtime's efficiency, over the model's bytes), with the runtime the
/// deployment names or the device's first choice for the format.
fn predicted_speed(device: &fpb::Device, need: &Needs) -> Option<f64> {
    let caps = device.capabilities.as_ref()?;
    let basis = caps.performance.as_ref()?;
    if basis.memory_read_bytes_per_second <= 0.0 || need.disk_bytes == 0 {
        return None;
    }
    let runtime = match need.runtime {
        Some(r) => r as i32,
        None => *caps
            .formats
            .iter()
            .find(|f| f.format == need.format as i32)?
            .runtimes
            .first()?,
    };
    let factors = basis
        .runtimes
        .iter()
        .find(|f| f.runtime == runtime && f.format == need.format as i32)?;
    #[allow(clippy::cast_precision_loss)]
    Some(factors.decode * basis.memory_read_bytes_per_second / need.disk_bytes as f64)
}

/// Why `need` cannot go on `device` with `room` left, or `None` when it fits.
fn misfit(device: &fpb::Device, need: &Needs, room: Room) -> Option<String> {
    let caps = device.capabilities.clone().unwrap_or_default();
    let format_name = need
        .format
        .as_str_name()
        .trim_start_matches("MODEL_FORMAT_")
        .to_ascii_lowercase();
    let support = caps.formats.iter().find(|f| f.format == need.format as i32);
    let runnable = support.is_some_and(|f| f.runnable);
    if !runnable {
        return Some(format!("no runtime here runs {format_name}"));
    }
    if let Some(runtime) = need.runtime
        && !support.is_some_and(|f| f.runtimes.contains(&(runtime as i32)))
    {
        return Some(format!(
            "runtime {} is not available for {format_name} here",
            runtime.as_str_name()
        ));
    }
    if need.wanted != fpb::WantedState::Stored && need.memory_bytes > room.memory {
        return Some(format!(
            "needs {} of memory, the budget has {} left (of {})",
            human(need.memory_bytes),
            human(room.memory),
            human(caps.memory_budget_bytes)
        ));
    }
    if !stored_there(device, &need.model_id) && need.disk_bytes > room.disk {
        return Some(format!(
            "needs {} of disk, {} free",
            human(need.disk_bytes),
            human(room.disk)
        ));
    }
    if need.min_generation_tokens_per_second > 0.0 {
        match speed(device, need) {
            None => {
                return Some(format!(
                    "no speed measured or predicted for {format_name} here (run `modelctl bench` on the device)"
                ));
            }
            Some(tps) if tps < need.min_generation_tokens_per_second => {
                return Some(format!(
                    "generates about {tps:.1} tokens/s, the deployment asks for {:.1}",
                    need.min_generation_tokens_per_second
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// What a device that gets `deployment` holds for it, at the deployment's revision.
pub fn assignments_of(deployment: &fpb::Deployment) -> Vec<fpb::Assignment> {
    deployment
        .models
        .iter()
        .map(|model| {
            let mut load_options = model.load_options.clone().unwrap_or_default();
            load_options.pin = model.state == fpb::WantedState::Pinned as i32;
            fpb::Assignment {
                deployment: deployment.name.clone(),
                spec: model.spec.clone(),
                state: model.state,
                load_options: Some(load_options),
                prune: deployment.prune,
                revision: deployment.generation,
                ..Default::default()
            }
        })
        .collect()
}

/// How many of `matching` fitting devices the rule takes.
fn quota(placement: Option<&fpb::Placement>, matching: usize) -> usize {
    match placement {
        Some(p) if p.max_devices > 0 => p.max_devices as usize,
        Some(p) if p.fraction > 0.0 => {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let n = (p.fraction * matching as f64).ceil() as usize;
            n
        }
        _ => usize::MAX,
    }
}

/// Places `deployments` (oldest first) on `devices`. `previous` holds each device's
/// current assignments, so devices that already have a deployment keep it when a rule
/// takes only some of them.
pub fn plan(
    deployments: &[Placeable<'_>],
    devices: &[&fpb::Device],
    previous: &HashMap<String, Vec<fpb::Assignment>>,
) -> Plan {
    let mut out = Plan::default();
    let mut room: HashMap<&str, Room> = HashMap::new();
    // Which deployment placed each model id on each device: one id, one owner.
    let mut taken: HashMap<&str, HashMap<&str, &str>> = HashMap::new();
    for d in devices {
        let caps = d.capabilities.clone().unwrap_or_default();
        room.insert(
            d.id.as_str(),
            Room {
                memory: caps.memory_budget_bytes,
                disk: caps.disk_free_bytes,
            },
        );
        out.assignments.insert(d.id.clone(), Vec::new());
    }
    for p in deployments {
        let deployment = p.deployment;
        let selector = deployment.selector.clone().unwrap_or_default();
        let mut matching: Vec<&fpb::Device> = devices
            .iter()
            .copied()
            .filter(|d| mismatch(&selector, d).is_none())
            .collect();
        let had_it = |d: &fpb::Device| {
            previous
                .get(&d.id)
                .is_some_and(|a| a.iter().any(|a| a.deployment == deployment.name))
        };
        matching.sort_by(|a, b| had_it(b).cmp(&had_it(a)).then_with(|| a.id.cmp(&b.id)));
        let wanted = quota(deployment.placement.as_ref(), matching.len());
        let mut result = fpb::PlacementResult {
            matching_devices: u32::try_from(matching.len()).unwrap_or(u32::MAX),
            ..Default::default()
        };
        for device in matching {
            let Some(left) = room.get(device.id.as_str()).copied() else {
                continue;
            };
            let mut after = left;
            let mut refused = None;
            for need in p.needs {
                let owner = taken
                    .get(device.id.as_str())
                    .and_then(|t| t.get(need.model_id.as_str()));
                if let Some(owner) = owner {
                    refused = Some((
                        need.model_id.clone(),
                        format!("deployment {owner} already places {} here", need.model_id),
                    ));
                    break;
                }
                if let Some(reason) = misfit(device, need, after) {
                    refused = Some((need.model_id.clone(), reason));
                    break;
                }
                if need.wanted != fpb::WantedState::Stored {
                    after.memory -= need.memory_bytes;
                }
                if !stored_there(device, &need.model_id) {
                    after.disk = after.disk.saturating_sub(need.disk_bytes);
                }
            }
            if let Some((model_id, reason)) = refused {
                result.unplaced.push(fpb::Unplaced {
                    device_id: device.id.clone(),
                    model_id,
                    reason,
                });
                continue;
            }
            if result.device_ids.len() >= wanted {
                result.unplaced.push(fpb::Unplaced {
                    device_id: device.id.clone(),
                    model_id: String::new(),
                    reason: format!("the placement rule takes {wanted} device(s)"),
                });
                continue;
            }
            room.insert(device.id.as_str(), after);
            let owned = taken.entry(device.id.as_str()).or_default();
            for need in p.needs {
                owned.insert(need.model_id.as_str(), deployment.name.as_str());
            }
            result.device_ids.push(device.id.clone());
            out.assignments
                .entry(device.id.clone())
                .or_default()
                .extend(assignments_of(deployment));
        }
        if result.matching_devices == 0 {
            result.warning = if devices.is_empty() {
                "no device has connected yet".into()
            } else {
                "no device matches the selector".into()
            };
        } else if result.device_ids.is_empty() {
            result.warning = "no matching device fits the deployment".into();
        }
        out.results.insert(deployment.name.clone(), result);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn device(id: &str, class: pb::DeviceClass, budget: u64, disk: u64) -> fpb::Device {
        fpb::Device {
            id: id.into(),
            site: "lab".into(),
            labels: [("tier".to_owned(), "edge".to_owned())].into(),
            capabilities: Some(pb::GetCapabilitiesResponse {
                node_id: id.into(),
                os: "Debian GNU/Linux".into(),
                device_class: class as i32,
                memory: Some(pb::MemoryInfo {
                    total_bytes: 8 * budget,
                    ..Default::default()
                }),
                memory_budget_bytes: budget,
                disk_free_bytes: disk,
                formats: vec![pb::FormatSupport {
                    format: pb::ModelFormat::Gguf as i32,
                    runnable: true,
                    recognized: true,
                    runtimes: vec![pb::Runtime::LlamaCpp as i32],
                }],
                ..Default::default()
            }),
            connected: true,
            ..Default::default()
        }
    }

    fn need(id: &str, memory: u64, wanted: fpb::WantedState) -> Needs {
        Needs {
            model_id: id.into(),
            format: pb::ModelFormat::Gguf,
            runtime: None,
            wanted,
            memory_bytes: memory,
            disk_bytes: 100 * MIB,
            min_generation_tokens_per_second: 0.0,
        }
    }

    fn deployment(name: &str, ids: &[&str], placement: Option<fpb::Placement>) -> fpb::Deployment {
        fpb::Deployment {
            name: name.into(),
            models: ids
                .iter()
                .map(|id| fpb::DeploymentModel {
                    spec: Some(pb::ModelSpec {
                        id: (*id).into(),
                        ..Default::default()
                    }),
                    state: fpb::WantedState::Loaded as i32,
                    ..Default::default()
                })
                .collect(),
            placement,
            ..Default::default()
        }
    }

    fn run(deployments: &[(&fpb::Deployment, &[Needs])], devices: &[fpb::Device]) -> Plan {
        let placeable: Vec<Placeable<'_>> = deployments
            .iter()
            .map(|(d, needs)| Placeable {
                deployment: d,
                needs,
            })
            .collect();
        let devices: Vec<&fpb::Device> = devices.iter().collect();
        plan(&placeable, &devices, &HashMap::new())
    }

    #[test]
    fn a_model_goes_where_it_fits_and_the_rest_hear_why() {
        let devices = [
            device("big", pb::DeviceClass::EdgeBox, 1024 * MIB, 10_000 * MIB),
            device("small", pb::DeviceClass::Phone, 120 * MIB, 10_000 * MIB),
            device("full", pb::DeviceClass::EdgeBox, 1024 * MIB, 50 * MIB),
        ];
        let d = deployment("d", &["m"], None);
        let needs = [need("m", 200 * MIB, fpb::WantedState::Loaded)];
        let plan = run(&[(&d, &needs)], &devices);
        let result = &plan.results["d"];
        assert_eq!(result.device_ids, vec!["big".to_owned()]);
        assert_eq!(result.matching_devices, 3);
        let why = |id: &str| {
            result
                .unplaced
                .iter()
                .find(|u| u.device_id == id)
                .map(|u| u.reason.clone())
                .unwrap()
        };
        assert_eq!(
            why("small"),
            "needs 200.0 MiB of memory, the budget has 120.0 MiB left (of 120.0 MiB)"
        );
        assert_eq!(why("full"), "needs 100.0 MiB of disk, 50.0 MiB free");
        assert_eq!(plan.assignments["big"].len(), 1);
        assert!(plan.assignments["small"].is_empty());
    }

    #[test]
    fn an_older_deployment_keeps_its_room_and_a_newer_one_goes_elsewhere() {
        let devices = [
            device("a", pb::DeviceClass::EdgeBox, 1024 * MIB, 10_000 * MIB),
            device("b", pb::DeviceClass::EdgeBox, 1024 * MIB, 10_000 * MIB),
        ];
        let first = deployment(
            "first",
            &["m1"],
            Some(fpb::Placement {
                max_devices: 1,
                fraction: 0.0,
            }),
        );
        let second = deployment("second", &["m2"], None);
        let n1 = [need("m1", 800 * MIB, fpb::WantedState::Loaded)];
        let n2 = [need("m2", 800 * MIB, fpb::WantedState::Loaded)];
        let plan = run(&[(&first, &n1), (&second, &n2)], &devices);
        assert_eq!(plan.results["first"].device_ids, vec!["a".to_owned()]);
        assert_eq!(plan.results["second"].device_ids, vec!["b".to_owned()]);
        let refused = &plan.results["second"].unplaced[0];
        assert_eq!(refused.device_id, "a");
        assert!(
            refused.reason.starts_with("needs 800.0 MiB of memory"),
            "{}",
            refused.reason
        );
        // Stored models take no memory: both fit on one device.
        let n2_stored = [need("m2", 800 * MIB, fpb::WantedState::Stored)];
        let plan = run(&[(&first, &n1), (&second, &n2_stored)], &devices[..1]);
        assert_eq!(plan.results["second"].device_ids, vec!["a".to_owned()]);
    }

    #[test]
    fn one_model_id_has_one_deployment_per_device() {
        let devices = [device(
            "a",
            pb::DeviceClass::EdgeBox,
            1024 * MIB,
            10_000 * MIB,
        )];
        let first = deployment("first", &["m"], None);
        let second = deployment("second", &["m"], None);
        let needs = [need("m", 100 * MIB, fpb::WantedState::Loaded)];
        let plan = run(&[(&first, &needs), (&second, &needs)], &devices);
        assert_eq!(plan.results["first"].device_ids, vec!["a".to_owned()]);
        assert_eq!(
            plan.results["second"].unplaced[0].reason,
            "deployment first already places m here"
        );
        assert_eq!(plan.assignments["a"].len(), 1);
    }

    #[test]
    fn a_device_gets_all_of_a_deployment_or_none_of_it() {
        let devices = [device(
            "a",
            pb::DeviceClass::EdgeBox,
            300 * MIB,
            10_000 * MIB,
        )];
        let d = deployment("d", &["m1", "m2"], None);
        let needs = [
            need("m1", 200 * MIB, fpb::WantedState::Loaded),
            need("m2", 200 * MIB, fpb::WantedState::Loaded),
        ];
        let plan = run(&[(&d, &needs)], &devices);
        assert!(plan.results["d"].device_ids.is_empty());
        assert_eq!(plan.results["d"].unplaced[0].model_id, "m2");
        assert_eq!(
            plan.results["d"].warning,
            "no matching device fits the deployment"
        );
        assert!(plan.assignments["a"].is_empty());
    }

    #[test]
    fn placement_rules_take_a_count_or_a_fraction_and_keep_devices_that_have_it() {
        let devices: Vec<fpb::Device> = (0..10)
            .map(|i| {
                device(
                    &format!("d{i}"),
                    pb::DeviceClass::EdgeBox,
                    1024 * MIB,
                    10_000 * MIB,
                )
            })
            .collect();
        let needs = [need("m", 100 * MIB, fpb::WantedState::Loaded)];
        let tenth = deployment(
            "t",
            &["m"],
            Some(fpb::Placement {
                max_devices: 0,
                fraction: 0.25,
            }),
        );
        let plan = run(&[(&tenth, &needs)], &devices);
        assert_eq!(plan.results["t"].device_ids.len(), 3, "ceil(0.25 × 10)");
        let two = deployment(
            "two",
            &["m"],
            Some(fpb::Placement {
                max_devices: 2,
                fraction: 0.0,
            }),
        );
        let plan = run(&[(&two, &needs)], &devices);
        assert_eq!(
            plan.results["two"].device_ids,
            vec!["d0".to_owned(), "d1".to_owned()]
        );
        assert!(
            plan.results["two"]
                .unplaced
                .iter()
                .all(|u| u.reason.contains("takes 2"))
        );
        // A device that already holds it keeps it, whatever the order of ids.
        let previous: HashMap<String, Vec<fpb::Assignment>> = [(
            "d7".to_owned(),
            vec![fpb::Assignment {
                deployment: "two".into(),
                ..Default::default()
            }],
        )]
        .into();
        let placeable = [Placeable {
            deployment: &two,
            needs: &needs,
        }];
        let refs: Vec<&fpb::Device> = devices.iter().collect();
        let kept = super::plan(&placeable, &refs, &previous);
        assert_eq!(
            kept.results["two"].device_ids,
            vec!["d7".to_owned(), "d0".to_owned()]
        );
    }

    #[test]
    fn selectors_match_class_os_labels_site_memory_and_runtime() {
        let d = device("a", pb::DeviceClass::EdgeBox, 1024 * MIB, 0);
        let matches = |s: fpb::Selector| mismatch(&s, &d).is_none();
        assert!(matches(fpb::Selector::default()));
        assert!(matches(fpb::Selector {
            device_classes: vec!["edge-box".into()],
            ..Default::default()
        }));
        assert!(!matches(fpb::Selector {
            device_classes: vec!["phone".into()],
            ..Default::default()
        }));
        assert!(matches(fpb::Selector {
            os: vec!["linux".into()],
            ..Default::default()
        }));
        assert!(!matches(fpb::Selector {
            os: vec!["ios".into()],
            ..Default::default()
        }));
        assert!(matches(fpb::Selector {
            sites: vec!["lab".into()],
            ..Default::default()
        }));
        assert!(!matches(fpb::Selector {
            labels: [("tier".to_owned(), "desk".to_owned())].into(),
            ..Default::default()
        }));
        assert!(!matches(fpb::Selector {
            min_memory_bytes: 1 << 40,
            ..Default::default()
        }));
        assert!(matches(fpb::Selector {
            accelerators: vec![pb::Accelerator::Cpu as i32],
            ..Default::default()
        }));
        assert!(!matches(fpb::Selector {
            accelerators: vec![pb::Accelerator::Metal as i32],
            ..Default::default()
        }));
        assert!(!matches(fpb::Selector {
            runtimes: vec![pb::Runtime::LlamaCpp as i32],
            ..Default::default()
        }));
    }

    #[test]
    fn a_speed_floor_uses_the_devices_measurements_scaled_by_size() {
        let mut d = device("a", pb::DeviceClass::EdgeBox, 1024 * MIB, 10_000 * MIB);
        let mut fast = need("m", 100 * MIB, fpb::WantedState::Loaded);
        fast.min_generation_tokens_per_second = 50.0;
        let room = Room {
            memory: 1024 * MIB,
            disk: 10_000 * MIB,
        };
        assert!(
            misfit(&d, &fast, room)
                .unwrap()
                .contains("no speed measured")
        );
        // Measured 80 tokens/s on a model half the size: about 40 here.
        d.measurements.push(fpb::Measurement {
            format: pb::ModelFormat::Gguf as i32,
            model_id: "other".into(),
            model_bytes: 50 * MIB,
            generation_tokens_per_second: 80.0,
            ..Default::default()
        });
        assert!(
            misfit(&d, &fast, room)
                .unwrap()
                .contains("about 40.0 tokens/s")
        );
        fast.min_generation_tokens_per_second = 30.0;
        assert_eq!(misfit(&d, &fast, room), None);
    }

    #[test]
    fn without_measurements_a_speed_floor_uses_the_devices_prediction() {
        let mut d = device("a", pb::DeviceClass::EdgeBox, 1024 * MIB, 10_000 * MIB);
        let mut fast = need("m", 100 * MIB, fpb::WantedState::Loaded);
        fast.min_generation_tokens_per_second = 50.0;
        let room = Room {
            memory: 1024 * MIB,
            disk: 10_000 * MIB,
        };
        let caps = d.capabilities.get_or_insert_with(Default::default);
        caps.formats = vec![pb::FormatSupport {
            format: pb::ModelFormat::Gguf as i32,
            runnable: true,
            recognized: true,
            runtimes: vec![pb::Runtime::LlamaCpp as i32],
        }];
        // 10 GiB/s of bandwidth, half of it turned into tokens: 5 GiB/s over 100 MiB,
        // about 51 tokens/s.
        caps.performance = Some(pb::PerformanceBasis {
            memory_read_bytes_per_second: 10.0 * 1024.0 * MIB as f64,
            compute_flops_per_second: 1e11,
            measured_at: None,
            runtimes: vec![pb::RuntimeEfficiency {
                runtime: pb::Runtime::LlamaCpp as i32,
                format: pb::ModelFormat::Gguf as i32,
                decode: 0.5,
                prefill: 0.5,
                source: pb::EstimateSource::Predicted as i32,
                calibrated_on: String::new(),
            }],
        });
        assert_eq!(misfit(&d, &fast, room), None);
        fast.min_generation_tokens_per_second = 60.0;
        assert!(
            misfit(&d, &fast, room)
                .unwrap()
                .contains("about 51.2 tokens/s")
        );
        // A runtime the deployment names that the device has no factors for: unknown.
        fast.runtime = Some(pb::Runtime::Candle);
        assert!(misfit(&d, &fast, room).is_some());
    }
}
