//! CheckCompatibility: would a model fit and run here, with which runtime and settings,
//! and if not, why not. Answered from the spec alone, before anything is downloaded.

use modeld_engine_core::{Accelerator, Runtime};

use super::ModelSpec;
use crate::engines::CompiledEngine;

/// Context length the agent plans for when neither the request nor the model says.
pub const DEFAULT_CONTEXT: u32 = 4096;

/// What the node has to offer, sampled by the caller.
#[derive(Debug, Clone, Default)]
pub struct NodeResources {
    pub memory_budget_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_free_bytes: u64,
    /// None when no quota is configured.
    pub disk_quota_bytes: Option<u64>,
    pub disk_used_bytes: u64,
    pub physical_cores: u32,
    pub accelerators: Vec<Accelerator>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuntimeSettings {
    pub runtime: Runtime,
    pub accelerator: Accelerator,
    pub context_length: u32,
    pub threads: u32,
    /// u32::MAX means "all layers".
    pub gpu_layers: u32,
    pub mmap: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Compatibility {
    pub compatible: bool,
    pub settings: Option<RuntimeSettings>,
    pub reasons: Vec<String>,
    pub runtime_available: bool,
    pub fits_memory: bool,
    pub fits_disk: bool,
    pub memory_required_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_required_bytes: u64,
    pub disk_available_bytes: u64,
    pub candidate_runtimes: Vec<Runtime>,
}

/// Memory a model needs at `context` tokens. Uses the spec's own estimate when it has
/// one; otherwise weights plus a KV cache sized from the weights (about 1/4096 of the
/// weights per token, which is close for small llama-family models and conservative for
/// large ones) plus compute buffers.
pub fn estimate_memory(spec: &ModelSpec, context: u32) -> u64 {
    if spec.estimated_memory_bytes > 0 {
        return spec.estimated_memory_bytes;
    }
    let weights = spec.total_size();
    let kv = weights / 4096 * u64::from(context);
    let compute = (weights / 10).max(64 * 1024 * 1024);
    weights + kv + compute
}

/// The context a Load would use: the requested one capped at the model's, else the
/// model's capped at [`DEFAULT_CONTEXT`]. The fleet controller places models by
/// [`estimate_memory`] at this context, the figure CheckCompatibility gives.
pub fn load_context(spec: &ModelSpec, requested: Option<u32>) -> u32 {
    let model_context = if spec.context_length > 0 {
        spec.context_length
    } else {
        DEFAULT_CONTEXT
    };
    match requested {
        Some(c) if c > 0 => c.min(model_context),
        _ => model_context.min(DEFAULT_CONTEXT),
    }
}

fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).to_string()
}

/// Checks `spec` against this node. `stored_locally` is true when no download is
/// needed (discovered models, or files already in the store).
pub fn check(
    spec: &ModelSpec,
    stored_locally: bool,
    node: &NodeResources,
    engines: &[CompiledEngine],
    requested_runtime: Option<Runtime>,
    requested_context: Option<u32>,
) -> Compatibility {
    let mut out = Compatibility::default();
    let Some(format) = spec.format else {
        out.reasons.push("the model has no format".into());
        return out;
    };
    out.candidate_runtimes = Runtime::for_format(format).collect();
    let compiled = |r: Runtime| {
        engines
            .iter()
            .find(|e| e.runtime == r && e.formats.contains(&format))
    };

    let chosen: Option<&CompiledEngine> = match requested_runtime {
        Some(r) if !r.formats().contains(&format) => {
            out.reasons.push(format!("{r} cannot run {format} models"));
            None
        }
        Some(r) => {
            let found = compiled(r);
            if found.is_none() {
                out.reasons.push(format!(
                    "this build of modeld does not include the {r} runtime"
                ));
            }
            found
        }
        None => {
            let found = spec
                .preferred_runtime
                .and_then(compiled)
                .or_else(|| engines.iter().find(|e| e.formats.contains(&format)));
            if found.is_none() {
                out.reasons.push(format!(
                    "this build of modeld has no runtime for {format} models (runtimes that can run them: {})",
                    out.candidate_runtimes
                        .iter()
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            found
        }
    };
    out.runtime_available = chosen.is_some();

    let context = load_context(spec, requested_context);
    out.memory_required_bytes = estimate_memory(spec, context);
    out.memory_available_bytes = node.memory_budget_bytes.min(node.memory_available_bytes);
    out.fits_memory = out.memory_required_bytes <= out.memory_available_bytes;
    if !out.fits_memory {
        out.reasons.push(format!(
            "needs about {} of memory at {context} tokens of context; {} is available to models here",
            human(out.memory_required_bytes),
            human(out.memory_available_bytes)
        ));
    }

    out.disk_required_bytes = if stored_locally { 0 } else { spec.total_size() };
    let quota_left = node
        .disk_quota_bytes
        .map(|q| q.saturating_sub(node.disk_used_bytes));
    out.disk_available_bytes =
        quota_left.map_or(node.disk_free_bytes, |q| q.min(node.disk_free_bytes));
    out.fits_disk = out.disk_required_bytes <= out.disk_available_bytes;
    if !out.fits_disk {
        out.reasons.push(format!(
            "needs {} of disk; {} is free{}",
            human(out.disk_required_bytes),
            human(out.disk_available_bytes),
            if quota_left.is_some() {
                " within the disk quota"
            } else {
                ""
            }
        ));
    }

    if let Some(engine) = chosen {
        let accelerator = engine
            .accelerators
            .iter()
            .copied()
            .find(|a| *a != Accelerator::Cpu && node.accelerators.contains(a))
            .unwrap_or(Accelerator::Cpu);
        out.settings = Some(RuntimeSettings {
            runtime: engine.runtime,
            accelerator,
            context_length: context,
            threads: node.physical_cores.max(1),
            gpu_layers: if accelerator == Accelerator::Cpu {
                0
            } else {
                u32::MAX
            },
            mmap: true,
        });
    }
    out.compatible = out.runtime_available && out.fits_memory && out.fits_disk;
    out
}

#[cfg(test)]
mod tests {
    use modeld_engine_core::ModelFormat;

    use super::*;
    use crate::registry::ModelFile;

    fn gguf(size: u64) -> ModelSpec {
        ModelSpec {
            id: "m".into(),
            format: Some(ModelFormat::Gguf),
            context_length: 8192,
            files: vec![ModelFile {
                name: "m.gguf".into(),
                urls: vec!["http://h/m.gguf".into()],
                sha256: "0".repeat(64),
                size_bytes: size,
                member: None,
                archive: None,
            }],
            ..Default::default()
        }
    }

    fn roomy() -> NodeResources {
        NodeResources {
            memory_budget_bytes: 8 << 30,
            memory_available_bytes: 16 << 30,
            disk_free_bytes: 100 << 30,
            physical_cores: 4,
            accelerators: vec![Accelerator::Cpu],
            ..Default::default()
        }
    }

    fn llama() -> CompiledEngine {
        CompiledEngine {
            runtime: Runtime::LlamaCpp,
            version: "test".into(),
            formats: vec![ModelFormat::Gguf],
            quantizations: vec![],
            accelerators: vec![Accelerator::Cpu, Accelerator::Cuda],
        }
    }

    #[test]
    fn no_engine_means_not_compatible_with_a_reason() {
        let c = check(&gguf(100 << 20), false, &roomy(), &[], None, None);
        assert!(!c.compatible && !c.runtime_available);
        assert!(
            c.reasons[0].contains("no runtime for gguf"),
            "{:?}",
            c.reasons
        );
        assert!(c.candidate_runtimes.contains(&Runtime::LlamaCpp));
        assert!(c.fits_memory && c.fits_disk);
    }

    #[test]
    fn compiled_engine_yields_settings() {
        let c = check(
            &gguf(100 << 20),
            false,
            &roomy(),
            &[llama()],
            None,
            Some(2048),
        );
        assert!(c.compatible, "{:?}", c.reasons);
        let s = c.settings.unwrap();
        assert_eq!(
            (s.runtime, s.accelerator, s.context_length, s.threads),
            (Runtime::LlamaCpp, Accelerator::Cpu, 2048, 4)
        );
    }

    #[test]
    fn too_big_for_budget_and_quota_says_both() {
        let mut node = roomy();
        node.memory_budget_bytes = 50 << 20;
        node.disk_quota_bytes = Some(10 << 20);
        let c = check(&gguf(100 << 20), false, &node, &[llama()], None, None);
        assert!(!c.compatible && !c.fits_memory && !c.fits_disk);
        assert_eq!(c.reasons.len(), 2, "{:?}", c.reasons);
        assert!(c.reasons[1].contains("quota"));
    }

    #[test]
    fn impossible_runtime_is_named() {
        let c = check(
            &gguf(1 << 20),
            false,
            &roomy(),
            &[llama()],
            Some(Runtime::OnnxRuntime),
            None,
        );
        assert!(!c.compatible);
        assert!(
            c.reasons[0].contains("onnxruntime cannot run gguf"),
            "{:?}",
            c.reasons
        );
    }

    #[test]
    fn local_models_need_no_disk() {
        let mut node = roomy();
        node.disk_free_bytes = 0;
        let c = check(&gguf(1 << 20), true, &node, &[llama()], None, None);
        assert!(c.fits_disk && c.disk_required_bytes == 0);
    }
}
