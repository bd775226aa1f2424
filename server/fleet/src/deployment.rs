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

/// Most smoke tests one rollout may run.
pub const MAX_SMOKE_TESTS: usize = 16;
/// Longest smoke-test prompt, in bytes.
pub const MAX_PROMPT_BYTES: usize = 4096;

fn check_fraction(field: &str, f: f64) -> Result<()> {
    if f.is_finite() && (0.0..=1.0).contains(&f) {
        Ok(())
    } else {
        Err(Error::invalid(field, format!("{f} must be from 0 to 1")))
    }
}

fn check_rollout(r: &fpb::RolloutStrategy, model_ids: &[String]) -> Result<()> {
    let f = |name: &str| format!("deployment.rollout.{name}");
    let canary = r.canary.clone().unwrap_or_default();
    if canary.devices > 0 && canary.fraction != 0.0 {
        return Err(Error::invalid(
            f("canary"),
            "set devices or fraction, not both",
        ));
    }
    check_fraction(&f("canary.fraction"), canary.fraction)?;
    check_fraction(&f("max_failed_fraction"), r.max_failed_fraction)?;
    if !(r.growth_factor == 0.0 || (r.growth_factor.is_finite() && r.growth_factor >= 1.0)) {
        return Err(Error::invalid(
            f("growth_factor"),
            format!("{} must be 0 (= 2) or at least 1", r.growth_factor),
        ));
    }
    for (name, value) in [("swap", r.swap), ("device_lost", r.device_lost)] {
        let known = match name {
            "swap" => fpb::SwapPolicy::try_from(value).is_ok(),
            _ => fpb::DeviceLostPolicy::try_from(value).is_ok(),
        };
        if !known {
            return Err(Error::invalid(f(name), format!("unknown policy {value}")));
        }
    }
    let gates = r.gates.clone().unwrap_or_default();
    if !(gates.max_slowdown == 0.0 || (gates.max_slowdown.is_finite() && gates.max_slowdown >= 1.0))
    {
        return Err(Error::invalid(
            f("gates.max_slowdown"),
            format!(
                "{} must be 0 (not checked) or at least 1",
                gates.max_slowdown
            ),
        ));
    }
    check_fraction(&f("gates.max_error_rate"), gates.max_error_rate)?;
    if gates.smoke_tests.len() > MAX_SMOKE_TESTS {
        return Err(Error::invalid(
            f("gates.smoke_tests"),
            format!(
                "{} tests; the limit is {MAX_SMOKE_TESTS}",
                gates.smoke_tests.len()
            ),
        ));
    }
    for (i, t) in gates.smoke_tests.iter().enumerate() {
        let field = |name: &str| f(&format!("gates.smoke_tests[{i}].{name}"));
        if t.prompt.trim().is_empty() {
            return Err(Error::invalid(field("prompt"), "is required"));
        }
        if t.prompt.len() > MAX_PROMPT_BYTES {
            return Err(Error::invalid(
                field("prompt"),
                format!("{} bytes; the limit is {MAX_PROMPT_BYTES}", t.prompt.len()),
            ));
        }
        if t.max_tokens > modeld_node::fleet::gates::MAX_SMOKE_TOKENS {
            return Err(Error::invalid(
                field("max_tokens"),
                format!(
                    "{} is more than {}",
                    t.max_tokens,
                    modeld_node::fleet::gates::MAX_SMOKE_TOKENS
                ),
            ));
        }
        if !t.model_id.is_empty() && !model_ids.contains(&t.model_id) {
            return Err(Error::invalid(
                field("model_id"),
                format!("{:?} is not a model of this deployment", t.model_id),
            ));
        }
        if !t.matches.is_empty()
            && let Err(e) = regex::Regex::new(&t.matches)
        {
            return Err(Error::invalid(field("matches"), e.to_string()));
        }
        if t.contains.is_empty() && t.equals.is_empty() && t.matches.is_empty() && !t.json {
            return Err(Error::invalid(
                field("contains"),
                "say what the answer must satisfy: contains, equals, matches or json",
            ));
        }
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
        // The device stages a new revision under `<id>.standby`, which must be a
        // valid id too.
        if let Err(e) =
            modeld_node::registry::spec::validate_id("", &modeld_node::fleet::standby_id(&spec.id))
        {
            return Err(Error::invalid(
                field("spec.id"),
                format!("too long to stage a rollout beside it: {e}"),
            ));
        }
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
    if let Some(r) = &d.rollout {
        let ids: Vec<String> = needs.iter().map(|n| n.model_id.clone()).collect();
        check_rollout(r, &ids)?;
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
