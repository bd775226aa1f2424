//! Conversions between `modeld.v1` messages and the agent's domain types. Incoming
//! values are validated here; nothing below the api layer sees prost types.

use std::time::{SystemTime, UNIX_EPOCH};

use modeld_engine_core::{
    Accelerator, ArchiveFormat, CpuDispatch, CpuVariant, ModelFormat, Runtime,
};
use modeld_proto::pbjson_types::Timestamp;
use modeld_proto::v1 as pb;

use crate::error::{Error, Result};
use crate::hardware::DeviceClass;
use crate::lifecycle::ModelState;
use crate::registry::{ModelEntry, ModelFile, ModelSpec, Origin, TokenizerKind, TokenizerSource};

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Decodes a proto enum field, naming the field when the number is unknown.
fn known<E: TryFrom<i32>>(field: &str, value: i32) -> Result<E> {
    E::try_from(value).map_err(|_| Error::invalid(field, format!("unknown enum value {value}")))
}

pub fn format_from_pb(field: &str, v: i32) -> Result<Option<ModelFormat>> {
    Ok(ModelFormat::try_from(known::<pb::ModelFormat>(field, v)?).ok())
}

pub fn format_to_pb(f: ModelFormat) -> pb::ModelFormat {
    f.into()
}

pub fn runtime_from_pb(field: &str, v: i32) -> Result<Option<Runtime>> {
    Ok(Runtime::try_from(known::<pb::Runtime>(field, v)?).ok())
}

pub fn runtime_to_pb(r: Runtime) -> pb::Runtime {
    r.into()
}

pub fn accelerator_from_pb(field: &str, v: i32) -> Result<Option<Accelerator>> {
    Ok(Accelerator::try_from(known::<pb::Accelerator>(field, v)?).ok())
}

pub fn accelerator_to_pb(a: Accelerator) -> pb::Accelerator {
    a.into()
}

pub fn cpu_variant_to_pb(v: &CpuVariant) -> pb::CpuVariant {
    pb::CpuVariant {
        name: v.name.clone(),
        dispatch: match v.dispatch {
            CpuDispatch::Runtime => pb::CpuDispatch::Runtime,
            CpuDispatch::BuildTime => pb::CpuDispatch::BuildTime,
            CpuDispatch::Library => pb::CpuDispatch::Library,
        } as i32,
        features: v.features.clone(),
        withheld: v.withheld.clone(),
        module_path: v
            .module
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
    }
}

fn archive_from_pb(field: &str, v: i32) -> Result<Option<ArchiveFormat>> {
    Ok(ArchiveFormat::try_from(known::<pb::ArchiveFormat>(field, v)?).ok())
}

fn archive_to_pb(a: Option<ArchiveFormat>) -> pb::ArchiveFormat {
    a.map_or(pb::ArchiveFormat::Unspecified, Into::into)
}

fn tokenizer_kind_from_pb(field: &str, v: i32) -> Result<TokenizerKind> {
    use pb::TokenizerKind as P;
    Ok(match known::<P>(field, v)? {
        P::Unspecified => TokenizerKind::Auto,
        P::Embedded => TokenizerKind::Embedded,
        P::File => TokenizerKind::File,
        P::Runtime => TokenizerKind::Runtime,
    })
}

fn tokenizer_kind_to_pb(k: TokenizerKind) -> pb::TokenizerKind {
    match k {
        TokenizerKind::Auto => pb::TokenizerKind::Unspecified,
        TokenizerKind::Embedded => pb::TokenizerKind::Embedded,
        TokenizerKind::File => pb::TokenizerKind::File,
        TokenizerKind::Runtime => pb::TokenizerKind::Runtime,
    }
}

pub fn state_to_pb(s: ModelState) -> pb::ModelState {
    use pb::ModelState as P;
    match s {
        ModelState::Registered => P::Registered,
        ModelState::Downloading => P::Downloading,
        ModelState::Downloaded => P::Downloaded,
        ModelState::Extracting => P::Extracting,
        ModelState::Validating => P::Validating,
        ModelState::Initializing => P::Initializing,
        ModelState::Loading => P::Loading,
        ModelState::Ready => P::Ready,
        ModelState::Unloading => P::Unloading,
        ModelState::Failed => P::Failed,
    }
}

fn origin_to_pb(o: Origin) -> pb::ModelOrigin {
    match o {
        Origin::Builtin => pb::ModelOrigin::Builtin,
        Origin::Registered => pb::ModelOrigin::Registered,
        Origin::Imported => pb::ModelOrigin::Imported,
        Origin::Discovered => pb::ModelOrigin::Discovered,
    }
}

pub fn device_class_to_pb(d: DeviceClass) -> pb::DeviceClass {
    use pb::DeviceClass as P;
    match d {
        DeviceClass::Unknown => P::Unspecified,
        DeviceClass::Phone => P::Phone,
        DeviceClass::Tablet => P::Tablet,
        DeviceClass::Laptop => P::Laptop,
        DeviceClass::Desktop => P::Desktop,
        DeviceClass::Server => P::Server,
        DeviceClass::EdgeBox => P::EdgeBox,
        DeviceClass::VirtualMachine => P::VirtualMachine,
        DeviceClass::Container => P::Container,
    }
}

/// Converts a spec from the wire. Enum values are checked here; limits and required
/// fields are checked by `ModelSpec::validate`, which callers run after merging.
pub fn spec_from_pb(p: pb::ModelSpec, prefix: &str) -> Result<ModelSpec> {
    let f = |name: &str| format!("{prefix}.{name}");
    let mut files = Vec::with_capacity(p.files.len());
    for (i, file) in p.files.into_iter().enumerate() {
        files.push(ModelFile {
            archive: archive_from_pb(&format!("{prefix}.files[{i}].archive"), file.archive)?,
            member: (!file.member.is_empty()).then_some(file.member),
            name: file.name,
            urls: file.urls,
            sha256: file.sha256,
            size_bytes: file.size_bytes,
        });
    }
    let tokenizer = match p.tokenizer {
        Some(t) => TokenizerSource {
            kind: tokenizer_kind_from_pb(&f("tokenizer.kind"), t.kind)?,
            path: t.path,
        },
        None => TokenizerSource::default(),
    };
    Ok(ModelSpec {
        format: format_from_pb(&f("format"), p.format)?,
        preferred_runtime: runtime_from_pb(&f("preferred_runtime"), p.preferred_runtime)?,
        files,
        tokenizer,
        id: p.id,
        display_name: p.display_name,
        family: p.family,
        quantization: p.quantization,
        context_length: p.context_length,
        parameter_count: p.parameter_count,
        estimated_memory_bytes: p.estimated_memory_bytes,
        license: p.license,
        tags: p.tags,
        architecture: p.architecture,
        chat_template: p.chat_template,
        description: p.description,
        inputs: p.inputs,
        outputs: p.outputs,
    })
}

pub fn spec_to_pb(s: &ModelSpec) -> pb::ModelSpec {
    pb::ModelSpec {
        id: s.id.clone(),
        display_name: s.display_name.clone(),
        family: s.family.clone(),
        format: s.format.map_or(pb::ModelFormat::Unspecified, format_to_pb) as i32,
        files: s
            .files
            .iter()
            .map(|f| pb::ModelFile {
                name: f.name.clone(),
                urls: f.urls.clone(),
                sha256: f.sha256.clone(),
                size_bytes: f.size_bytes,
                member: f.member.clone().unwrap_or_default(),
                archive: archive_to_pb(f.archive) as i32,
            })
            .collect(),
        quantization: s.quantization.clone(),
        context_length: s.context_length,
        parameter_count: s.parameter_count,
        estimated_memory_bytes: s.estimated_memory_bytes,
        tokenizer: Some(pb::TokenizerSource {
            kind: tokenizer_kind_to_pb(s.tokenizer.kind) as i32,
            path: s.tokenizer.path.clone(),
        }),
        license: s.license.clone(),
        tags: s.tags.clone(),
        architecture: s.architecture.clone(),
        preferred_runtime: s
            .preferred_runtime
            .map_or(pb::Runtime::Unspecified, runtime_to_pb) as i32,
        chat_template: s.chat_template.clone(),
        description: s.description.clone(),
        inputs: s.inputs.clone(),
        outputs: s.outputs.clone(),
    }
}

pub fn model_to_pb(e: &ModelEntry) -> pb::Model {
    pb::Model {
        spec: Some(spec_to_pb(&e.spec)),
        origin: origin_to_pb(e.origin) as i32,
        state: state_to_pb(e.state) as i32,
        create_time: Some(timestamp(e.create_time)),
        update_time: Some(timestamp(e.update_time)),
        generation: e.generation,
        local_path: e
            .local_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        accelerators: e
            .spec
            .accelerators()
            .into_iter()
            .map(|a| accelerator_to_pb(a) as i32)
            .collect(),
        runtimes: e
            .spec
            .runtimes()
            .into_iter()
            .map(|r| runtime_to_pb(r) as i32)
            .collect(),
        source: e.source.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_domain_enum_survives_the_wire() {
        for f in ModelFormat::ALL {
            assert_eq!(
                format_from_pb("f", format_to_pb(f) as i32).unwrap(),
                Some(f)
            );
        }
        for r in Runtime::ALL {
            assert_eq!(
                runtime_from_pb("r", runtime_to_pb(r) as i32).unwrap(),
                Some(r)
            );
        }
        for a in Accelerator::ALL {
            assert_eq!(
                accelerator_from_pb("a", accelerator_to_pb(a) as i32).unwrap(),
                Some(a)
            );
        }
    }

    #[test]
    fn unknown_enum_number_names_the_field() {
        let err = format_from_pb("spec.format", 99).unwrap_err().to_string();
        assert_eq!(err, "spec.format: unknown enum value 99");
    }
}
