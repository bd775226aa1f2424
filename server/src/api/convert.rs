//! Conversions between `modeld.v1` messages and the agent's domain types. Incoming
//! values are validated here; nothing below the api layer sees prost types.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use modeld_engine_core::{
    Accelerator, ArchiveFormat, CpuDispatch, CpuVariant, FinishReason, ModelFormat, Runtime,
};
use modeld_proto::pbjson_types::Timestamp;
use modeld_proto::v1 as pb;

use modeld_node::error::{Error, Result};
use modeld_node::hardware::DeviceClass;
use modeld_node::hardware::{MemoryInfo, ResourceSnapshot};
use modeld_node::inference::{Event, ModelWorker};
use modeld_node::lifecycle::{EventKind, Failure, Transition};
use modeld_node::load::LoadUpdate;
use modeld_node::model::{ModelState, Stage};
use modeld_node::registry::{
    ModelEntry, ModelFile, ModelSpec, Origin, TokenizerKind, TokenizerSource,
};
use modeld_node::storage::progress::Stage as TransferStage;
use modeld_node::storage::progress::{FileProgress, TransferProgress};

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

pub fn lifecycle_stage_to_pb(s: Stage) -> pb::LifecycleStage {
    match s {
        Stage::Download => pb::LifecycleStage::Download,
        Stage::Extract => pb::LifecycleStage::Extract,
        Stage::Validate => pb::LifecycleStage::Validate,
        Stage::Initialize => pb::LifecycleStage::Initialize,
        Stage::Load => pb::LifecycleStage::Load,
        Stage::Unload => pb::LifecycleStage::Unload,
        Stage::Serve => pb::LifecycleStage::Serve,
    }
}

pub fn transfer_stage_to_pb(s: TransferStage) -> pb::TransferStage {
    use pb::TransferStage as P;
    match s {
        TransferStage::Queued => P::Queued,
        TransferStage::Connecting => P::Connecting,
        TransferStage::Downloading => P::Downloading,
        TransferStage::Verifying => P::Verifying,
        TransferStage::Extracting => P::Extracting,
        TransferStage::Done => P::Done,
        TransferStage::Paused => P::Paused,
        TransferStage::Failed => P::Failed,
        TransferStage::Cancelled => P::Cancelled,
    }
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

pub fn failure_to_pb(f: &Failure) -> pb::FailureInfo {
    pb::FailureInfo {
        stage: lifecycle_stage_to_pb(f.stage) as i32,
        code: super::status::code(f.kind) as i32,
        reason: f.reason.clone(),
        message: f.message.clone(),
    }
}

pub fn transition_to_pb(t: &Transition) -> pb::StateTransition {
    let millis = u64::try_from(t.time_unix_ms).unwrap_or(0);
    pb::StateTransition {
        revision: t.revision,
        model_id: t.model_id.clone(),
        from_state: t.from.map_or(pb::ModelState::Unspecified, state_to_pb) as i32,
        to_state: t.to.map_or(pb::ModelState::Unspecified, state_to_pb) as i32,
        stage: t
            .stage
            .map_or(pb::LifecycleStage::Unspecified, lifecycle_stage_to_pb) as i32,
        time: Some(timestamp(
            std::time::UNIX_EPOCH + Duration::from_millis(millis),
        )),
        progress: t.progress,
        reason: t.reason.clone(),
        failure: t.failure.as_ref().map(failure_to_pb),
    }
}

pub fn watch_response(t: &Transition) -> pb::WatchResponse {
    let kind = match t.kind {
        EventKind::Transition => pb::WatchEventKind::Transition,
        EventKind::Registered => pb::WatchEventKind::Registered,
        EventKind::Deleted => pb::WatchEventKind::Deleted,
        EventKind::Evicted => pb::WatchEventKind::Evicted,
    };
    pb::WatchResponse {
        kind: kind as i32,
        transition: Some(transition_to_pb(t)),
        revision: t.revision,
    }
}

/// A progress report as a Watch event: the model stays in its state (`from` = `to`),
/// at the revision of its last stored event.
pub fn progress_response(p: &modeld_node::lifecycle::Progress) -> pb::WatchResponse {
    let state = state_to_pb(p.state) as i32;
    pb::WatchResponse {
        kind: pb::WatchEventKind::Progress as i32,
        transition: Some(pb::StateTransition {
            revision: p.revision,
            model_id: p.model_id.clone(),
            from_state: state,
            to_state: state,
            stage: lifecycle_stage_to_pb(p.stage) as i32,
            time: Some(timestamp(
                std::time::UNIX_EPOCH
                    + Duration::from_millis(u64::try_from(p.time_unix_ms).unwrap_or(0)),
            )),
            progress: p.progress,
            reason: p.message.clone(),
            failure: None,
        }),
        revision: p.revision,
    }
}

/// Blocking: measuring a process's proportional memory reads its page tables.
pub fn loaded_to_pb(w: &ModelWorker) -> pb::LoadedModel {
    let memory = w.memory();
    pb::LoadedModel {
        engine_process_id: w.process_id.unwrap_or(0),
        proportional_memory_bytes: memory.proportional_bytes.unwrap_or(0),
        memory_measured: memory.measured,
        model_id: w.model_id(),
        runtime: pb::Runtime::from(w.runtime) as i32,
        accelerator: pb::Accelerator::from(w.info.accelerator) as i32,
        estimated_memory_bytes: w.estimate.total(),
        actual_memory_bytes: memory.resident_bytes,
        in_flight_requests: u32::try_from(w.in_flight()).unwrap_or(u32::MAX),
        last_used_time: Some(timestamp(w.last_used())),
        expire_time: if w.pinned {
            None
        } else {
            w.keep_alive.expires(w.last_used()).map(timestamp)
        },
        pinned: w.pinned,
        context_length: w.info.context_length,
        load_time: Some(timestamp(w.loaded_at)),
        parallel_slots: u32::try_from(w.parallel).unwrap_or(u32::MAX),
        threads: w.info.threads,
        kv_cache_type: match w.info.kv_cache_type {
            modeld_engine_core::KvCacheType::F16 => pb::KvCacheType::F16,
            modeld_engine_core::KvCacheType::Q8_0 => pb::KvCacheType::Q80,
            modeld_engine_core::KvCacheType::Q4_0 => pb::KvCacheType::Q40,
        } as i32,
        flash_attention: match w.info.flash_attention {
            modeld_engine_core::FlashAttention::Auto => pb::FlashAttention::Auto,
            modeld_engine_core::FlashAttention::On => pb::FlashAttention::On,
            modeld_engine_core::FlashAttention::Off => pb::FlashAttention::Off,
        } as i32,
        queued_requests: u32::try_from(w.in_flight().saturating_sub(w.parallel))
            .unwrap_or(u32::MAX),
        recent: None,
    }
}

pub fn recent_to_pb(r: &crate::telemetry::metrics::Recent) -> pb::RecentRequests {
    pb::RecentRequests {
        requests: r.requests,
        time_to_first_token_p50_seconds: r.time_to_first_token_p50,
        time_to_first_token_p95_seconds: r.time_to_first_token_p95,
        prompt_tokens_per_second: r.prompt_tokens_per_second,
        generation_tokens_per_second: r.generation_tokens_per_second,
        generated_tokens: r.generated_tokens,
    }
}

pub fn update_to_pb(u: &LoadUpdate) -> pb::LoadResponse {
    pb::LoadResponse {
        progress: Some(pb::LoadProgress {
            state: state_to_pb(u.state) as i32,
            stage: lifecycle_stage_to_pb(u.stage) as i32,
            stage_progress: u.stage_progress,
            overall_progress: u.overall_progress,
            message: u.message.clone(),
            eta_seconds: u.eta_seconds.unwrap_or(-1.0),
        }),
        loaded: None,
    }
}

pub fn file_to_pb(f: &FileProgress) -> pb::FileProgress {
    pb::FileProgress {
        name: f.name.clone(),
        sha256: f.sha256.clone(),
        stage: transfer_stage_to_pb(f.stage) as i32,
        bytes_done: f.bytes_done,
        bytes_total: f.bytes_total,
        bytes_per_second: f.bytes_per_second,
        eta_seconds: f.eta_seconds.unwrap_or(-1.0),
        attempt: f.attempt,
        source_url: f.source_url.clone(),
        error: f.error.clone(),
    }
}

pub fn progress_to_pb(p: &TransferProgress) -> pb::TransferProgress {
    pb::TransferProgress {
        transfer_id: p.id.clone(),
        model_id: p.model_id.clone(),
        stage: transfer_stage_to_pb(p.stage) as i32,
        bytes_done: p.bytes_done(),
        bytes_total: p.bytes_total(),
        bytes_per_second: p.bytes_per_second(),
        eta_seconds: p.eta_seconds().unwrap_or(-1.0),
        files: p.files.iter().map(file_to_pb).collect(),
        start_time: Some(timestamp(p.start_time)),
        error: p.error.as_ref().map(|e| e.to_string()).unwrap_or_default(),
    }
}

pub fn finish_to_pb(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

pub fn event_to_pb(event: Event) -> pb::GenerateResponse {
    let event = match event {
        Event::Token(t) => pb::generate_response::Event::Token(pb::GeneratedToken {
            text: t.text,
            token_id: t.id,
            logprob: t.logprob,
        }),
        Event::Done(finish, stats) => pb::generate_response::Event::Summary(pb::GenerateSummary {
            finish_reason: finish_to_pb(finish) as i32,
            usage: Some(pb::Usage {
                prompt_tokens: stats.prompt_tokens,
                cached_prompt_tokens: stats.cached_prompt_tokens,
                generated_tokens: stats.generated_tokens,
                time_to_first_token_seconds: stats.time_to_first_token_seconds,
                prompt_tokens_per_second: stats.prompt_tokens_per_second,
                generation_tokens_per_second: stats.generation_tokens_per_second,
            }),
            error: String::new(),
            error_reason: String::new(),
            error_code: 0,
        }),
        Event::Failed(e) => {
            // The stream has started, so the failure travels in the summary: with the
            // same reason and code it would carry as a status.
            let status = super::status::of(&e);
            let reason = tonic_types::StatusExt::get_error_details(&status)
                .error_info()
                .map(|i| i.reason.clone())
                .unwrap_or_default();
            pb::generate_response::Event::Summary(pb::GenerateSummary {
                finish_reason: pb::FinishReason::Error as i32,
                usage: None,
                error: e.to_string(),
                error_reason: reason,
                error_code: status.code() as i32,
            })
        }
    };
    pb::GenerateResponse { event: Some(event) }
}

pub fn memory_to_pb(m: MemoryInfo) -> pb::MemoryInfo {
    pb::MemoryInfo {
        total_bytes: m.total_bytes,
        available_bytes: m.available_bytes,
        swap_total_bytes: m.swap_total_bytes,
        swap_free_bytes: m.swap_free_bytes,
        cgroup_limit_bytes: m.cgroup_limit_bytes.unwrap_or(0),
    }
}

pub fn snapshot_to_pb(s: ResourceSnapshot) -> pb::WatchResourcesResponse {
    pb::WatchResourcesResponse {
        time: s.time.map(timestamp),
        memory: Some(memory_to_pb(s.memory)),
        memory_pressure: s.memory_pressure.unwrap_or(-1.0),
        cpu_usage_percent: s.cpu_usage_percent,
        agent_rss_bytes: s.agent_rss_bytes,
        disk_free_bytes: s.disk_free_bytes,
        // No model is loaded by this agent yet; the memory manager reports real figures.
        loaded_models_bytes: 0,
    }
}

pub fn audit_to_pb(sequence: u64, r: modeld_node::store::AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        sequence,
        time: Some(timestamp(modeld_node::store::from_unix_ms(r.time_unix_ms))),
        identity: r.identity,
        role: r.role,
        method: r.method,
        request_id: r.request_id,
        peer: r.peer,
        code: r.code,
        reason: r.reason,
    }
}

pub fn estimate_source_to_pb(s: modeld_node::performance::Source) -> pb::EstimateSource {
    use modeld_node::performance::Source;
    match s {
        Source::Predicted => pb::EstimateSource::Predicted,
        Source::Calibrated => pb::EstimateSource::Calibrated,
        Source::Measured => pb::EstimateSource::Measured,
    }
}

pub fn estimate_to_pb(e: &modeld_node::performance::Estimate) -> pb::PerformanceEstimate {
    pb::PerformanceEstimate {
        runtime: runtime_to_pb(e.runtime) as i32,
        prompt_tokens_per_second: e.prompt_tokens_per_second,
        generation_tokens_per_second: e.generation_tokens_per_second,
        source: estimate_source_to_pb(e.source) as i32,
        generation_ceiling_tokens_per_second: e.generation_ceiling_tokens_per_second,
        bytes_per_token: e.cost.bytes_per_token,
        flops_per_token: e.cost.flops_per_token,
        basis: e.basis.clone(),
    }
}

pub fn factors_to_pb(f: &modeld_node::performance::Factors) -> pb::RuntimeEfficiency {
    pb::RuntimeEfficiency {
        runtime: runtime_to_pb(f.runtime) as i32,
        format: format_to_pb(f.format) as i32,
        decode: f.decode,
        prefill: f.prefill,
        source: estimate_source_to_pb(f.source) as i32,
        calibrated_on: f.calibrated_on.clone(),
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
