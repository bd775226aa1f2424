//! Deployment files: YAML (or JSON) in the proto3 JSON mapping of
//! `modeld.fleet.v1.Deployment`, where enum values may also be written short and in
//! lower case (`state: loaded`, `format: gguf`, `runtime: llama-cpp`). Unknown fields
//! are errors that name the field, so a typo never silently changes a deployment.

use modeld_proto::fleet::v1 as fpb;
use modeld_proto::v1 as pb;
use serde_json::Value;

/// Enum fields a deployment carries: (key as written, enum prefix, name check).
type EnumCheck = fn(&str) -> bool;
const ENUMS: &[(&str, &str, EnumCheck)] = &[
    ("state", "WANTED_STATE_", |n| {
        fpb::WantedState::from_str_name(n).is_some()
    }),
    ("format", "MODEL_FORMAT_", |n| {
        pb::ModelFormat::from_str_name(n).is_some()
    }),
    ("runtime", "RUNTIME_", |n| {
        pb::Runtime::from_str_name(n).is_some()
    }),
    ("preferredRuntime", "RUNTIME_", |n| {
        pb::Runtime::from_str_name(n).is_some()
    }),
    ("preferred_runtime", "RUNTIME_", |n| {
        pb::Runtime::from_str_name(n).is_some()
    }),
    ("runtimes", "RUNTIME_", |n| {
        pb::Runtime::from_str_name(n).is_some()
    }),
    ("accelerators", "ACCELERATOR_", |n| {
        pb::Accelerator::from_str_name(n).is_some()
    }),
    ("kind", "TOKENIZER_KIND_", |n| {
        pb::TokenizerKind::from_str_name(n).is_some()
    }),
    ("archive", "ARCHIVE_FORMAT_", |n| {
        pb::ArchiveFormat::from_str_name(n).is_some()
    }),
];

/// "loaded" → "WANTED_STATE_LOADED", when that is a value of the enum.
fn expand(value: &mut Value, prefix: &str, known: EnumCheck) {
    match value {
        Value::String(s) if !known(s) => {
            let long = format!(
                "{prefix}{}",
                s.trim().to_ascii_uppercase().replace(['-', '.'], "_")
            );
            if known(&long) {
                *s = long;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| expand(v, prefix, known)),
        _ => {}
    }
}

fn walk(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if let Some((_, prefix, known)) = ENUMS.iter().find(|(k, _, _)| k == key) {
                    expand(v, prefix, *known);
                }
                walk(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(walk),
        _ => {}
    }
}

/// Parses a deployment file.
pub fn parse(text: &str) -> Result<fpb::Deployment, String> {
    let mut value: Value = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    walk(&mut value);
    serde_json::from_value(value).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_enum_names_and_either_field_case_parse() {
        let d = parse(
            "name: smol\nprune: true\nselector:\n  device_classes: [server]\n  runtimes: [llama-cpp]\nplacement: {maxDevices: 2}\nmodels:\n  - state: loaded\n    loadOptions: {runtime: llama.cpp, contextLength: 512}\n    spec:\n      id: smol\n      format: gguf\n      files: [{name: m.gguf, urls: ['http://h/m.gguf'], sha256: 'ab', sizeBytes: 3}]\n",
        )
        .unwrap();
        assert_eq!(d.name, "smol");
        assert!(d.prune);
        let m = &d.models[0];
        assert_eq!(m.state, fpb::WantedState::Loaded as i32);
        assert_eq!(
            m.spec.as_ref().unwrap().format,
            pb::ModelFormat::Gguf as i32
        );
        assert_eq!(
            m.load_options.as_ref().unwrap().runtime,
            pb::Runtime::LlamaCpp as i32
        );
        assert_eq!(
            d.selector.unwrap().runtimes,
            vec![pb::Runtime::LlamaCpp as i32]
        );
        assert_eq!(d.placement.unwrap().max_devices, 2);
    }

    #[test]
    fn the_shipped_example_parses() {
        let d = parse(include_str!("../../deploy/fleet/smollm2-edge.yaml")).unwrap();
        assert_eq!(d.name, "smollm2-edge");
        assert_eq!(d.models[0].state, fpb::WantedState::Loaded as i32);
        assert_eq!(
            d.models[0].load_options.as_ref().unwrap().context_length,
            2048
        );
    }

    #[test]
    fn unknown_fields_and_values_are_named() {
        let e = parse("name: x\nmodles: []\n").unwrap_err();
        assert!(e.contains("modles"), "{e}");
        let e = parse("name: x\nmodels: [{state: sideways}]\n").unwrap_err();
        assert!(e.contains("sideways"), "{e}");
    }
}
