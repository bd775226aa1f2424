//! Checking a deployment before anything is stored: every field an operator can get
//! wrong gets an INVALID_ARGUMENT naming it, and nothing is half-applied.

use modeld_node::registry::compat;
use modeld_proto::fleet::v1 as fpb;
use modeld_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::placement::Needs;

/// Most models one deployment may name.
pub const MAX_MODELS: usize = 64;
/// Most values in one selector list, and most labels.
pub const MAX_SELECTOR_VALUES: usize = 64;
const DEVICE_CLASSES: [&str; 9] = [
    "unspecified",
    "phone",
    "tablet",
    "laptop",
    "desktop",
    "server",
    "edge-box",
    "virtual-machine",
    "container",
];

fn check_name(name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "deployment.name",
            format!("{name:?} must be 1-63 characters of a-z, 0-9 and '-', starting with a letter"),
        ))
    }
}

fn check_selector(s: &fpb::Selector) -> Result<()> {
    let f = |name: &str| format!("deployment.selector.{name}");
    for (name, len) in [
        ("device_classes", s.device_classes.len()),
        ("os", s.os.len()),
        ("labels", s.labels.len()),
        ("sites", s.sites.len()),
        ("accelerators", s.accelerators.len()),
        ("runtimes", s.runtimes.len()),
    ] {
        if len > MAX_SELECTOR_VALUES {
            return Err(Error::invalid(
                f(name),
                format!("{len} values; the limit is {MAX_SELECTOR_VALUES}"),
            ));
        }
    }
    for class in &s.device_classes {
        if !DEVICE_CLASSES.contains(&class.as_str()) {
            return Err(Error::invalid(
                f("device_classes"),
                format!(
                    "{class:?} is not a device class; use one of {}",
                    DEVICE_CLASSES[1..].join(", ")
                ),
            ));
        }
    }
    for a in &s.accelerators {
        if pb::Accelerator::try_from(*a).is_err() {
            return Err(Error::invalid(
                f("accelerators"),
                format!("unknown accelerator {a}"),
            ));
        }
    }
    for r in &s.runtimes {
        if matches!(
            pb::Runtime::try_from(*r),
            Err(_) | Ok(pb::Runtime::Unspecified)
        ) {
            return Err(Error::invalid(
                f("runtimes"),
                format!("unknown runtime {r}"),
            ));
        }
    }
    Ok(())
}

fn check_placement(p: &fpb::Placement) -> Result<()> {
    if p.max_devices > 0 && p.fraction != 0.0 {
        return Err(Error::invalid(
            "deployment.placement",
            "set max_devices or fraction, not both",
        ));
    }
    if !(p.fraction.is_finite() && (0.0..=1.0).contains(&p.fraction)) {
        return Err(Error::invalid(
            "deployment.placement.fraction",
            format!("{} must be more than 0 and at most 1", p.fraction),
        ));
    }
    Ok(())
}

/// Checks `d` and works out what each of its models needs from a device. Fields the
/// controller owns (generation, times) are ignored here and set by the caller.
pub fn check(d: &fpb::Deployment) -> Result<Vec<Needs>> {
    check_name(&d.name)?;
    if d.models.is_empty() {
        return Err(Error::invalid(
            "deployment.models",
            "name at least one model",
        ));
    }
    if d.models.len() > MAX_MODELS {
        return Err(Error::invalid(
            "deployment.models",
            format!("{} models; the limit is {MAX_MODELS}", d.models.len()),
        ));
    }
    check_selector(&d.selector.clone().unwrap_or_default())?;
    check_placement(&d.placement.unwrap_or_default())?;
    let mut needs: Vec<Needs> = Vec::with_capacity(d.models.len());
    for (i, m) in d.models.iter().enumerate() {
        let field = |name: &str| format!("deployment.models[{i}].{name}");
        let spec_pb = m
            .spec
            .clone()
            .ok_or_else(|| Error::invalid(field("spec"), "is required"))?;
        // The agent's own checks (which also require every file's sha256), so a
        // deployment the controller accepts is one every agent accepts.
        let spec = modeld::api::convert::spec_from_pb(spec_pb, &field("spec"))?
            .validate(&field("spec"))?;
        if needs.iter().any(|n| n.model_id == spec.id) {
            return Err(Error::invalid(
                field("spec.id"),
                format!("{:?} appears twice in the deployment", spec.id),
            ));
        }
        let wanted = match fpb::WantedState::try_from(m.state) {
            Ok(fpb::WantedState::Unspecified) | Err(_) => {
                return Err(Error::invalid(
                    field("state"),
                    "is required: STORED, LOADED or PINNED",
                ));
            }
            Ok(w) => w,
        };
        let load =
            modeld::api::validate::load_request(m.load_options.clone()).map_err(|e| match e {
                modeld_node::Error::InvalidArgument {
                    field: f,
                    description,
                } => Error::invalid(field(&f), description),
                other => Error::invalid(field("load_options"), other.to_string()),
            })?;
        if !(m.min_generation_tokens_per_second.is_finite()
            && m.min_generation_tokens_per_second >= 0.0)
        {
            return Err(Error::invalid(
                field("min_generation_tokens_per_second"),
                "must be 0 (any speed) or more",
            ));
        }
        let context = Some(load.options.context_length).filter(|c| *c > 0);
        let format = spec
            .format
            .ok_or_else(|| Error::invalid(field("spec.format"), "is required"))?;
        needs.push(Needs {
            memory_bytes: compat::estimate_memory(&spec, compat::load_context(&spec, context)),
            disk_bytes: spec.total_size(),
            model_id: spec.id,
            format: modeld::api::convert::format_to_pb(format),
            runtime: load.runtime.map(modeld::api::convert::runtime_to_pb),
            wanted,
            min_generation_tokens_per_second: m.min_generation_tokens_per_second,
        });
    }
    Ok(needs)
}

/// The deployment as an operator wrote it, without the fields the controller sets:
/// two applies of the same text compare equal.
pub fn as_written(d: &fpb::Deployment) -> fpb::Deployment {
    fpb::Deployment {
        generation: 0,
        create_time: None,
        update_time: None,
        ..d.clone()
    }
}
