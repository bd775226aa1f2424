//! The ONNX Runtime engine: decoder-only language models exported in the Optimum /
//! onnxruntime-genai convention (`input_ids`, `attention_mask`, `position_ids`,
//! `past_key_values.N.key/value` in; `logits`, `present.N.key/value` out), described
//! by a `genai_config.json` beside the graph.
//!
//! Files are checked before ONNX Runtime sees them: the configuration's numbers
//! against limits, and every external-data path against the model's directory.
//! Generation goes through engine-core's shared loop and sampler.

mod config;
mod decoder;
pub mod external_data;
mod library;

use std::path::{Path, PathBuf};

use modeld_engine_core::generation::SequenceModel;
use modeld_engine_core::{
    Accelerator, CpuVariant, Engine, EngineError, LoadOptions, LoadedModel, MemoryEstimate,
    ModelFormat, ModelInfo, ModelProbe, Runtime,
};
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};

pub use config::{Export, locate};
pub use decoder::{OnnxDecoder, StepShape};
pub use library::REQUIRED_MINOR;

/// The ONNX Runtime API level this build speaks.
pub const VERSION: &str = "1.31+ (ort 2.0.0-rc.15)";

/// Prompt tokens per forward pass: bounds the logits and attention scores one pass
/// allocates.
const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone, Default)]
pub struct OnnxEngine {
    /// libonnxruntime to load; `None` = `ORT_DYLIB_PATH`.
    library: Option<PathBuf>,
}

impl OnnxEngine {
    pub fn new(library: Option<PathBuf>) -> OnnxEngine {
        OnnxEngine { library }
    }

    /// Checks and opens the export at `path` as a bare decoder (no tokenizer): what
    /// `load` does underneath, for tests that look at the cache step by step.
    pub fn open_decoder(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<(OnnxDecoder, Export, ModelProbe), EngineError> {
        // Every load checks the files itself, whatever probed them before.
        let (export, probe) = inspect(path)?;
        let env = library::environment(self.library.as_deref())?;
        let mut builder = Session::builder(&env).map_err(|e| load("session", e))?;
        builder = configure(builder, options)?;
        let session = builder
            .commit_from_file(&export.graph)
            .map_err(|e| load("the graph", e))?;
        let decoder = OnnxDecoder::new(
            session,
            &export.config.model.decoder,
            export.config.model.vocab_size,
        )?;
        Ok((decoder, export, probe))
    }
}

/// Finds the export, checks its configuration and every external-data path, and
/// reads what the engine needs to know, before ONNX Runtime sees a file.
fn inspect(path: &Path) -> Result<(Export, ModelProbe), EngineError> {
    let export = locate(path)?;
    let files = external_data::check(&export.graph)?;
    let graph_bytes = std::fs::metadata(&export.graph)
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", export.graph.display())))?
        .len();
    let weights_bytes = files
        .iter()
        .fold(graph_bytes, |sum, (_, size)| sum.saturating_add(*size));
    let m = &export.config.model;
    let d = &m.decoder;
    let probe = ModelProbe {
        architecture: m.kind.clone(),
        // ONNX weights are float32 here; an estimate, not a count.
        parameter_count: weights_bytes / 4,
        weights_bytes,
        context_length: m.context_length,
        vocab_size: m.vocab_size,
        layers: d.num_hidden_layers,
        kv_heads: d.num_key_value_heads,
        head_dim: d.head_size,
        embedding_length: d.hidden_size,
        quantization: Some("F32".into()),
    };
    Ok((export, probe))
}

fn load(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Load(format!("ONNX Runtime could not load {what}: {e}"))
}

/// Threads, graph optimization and execution providers from the load options.
fn configure(
    builder: SessionBuilder,
    options: &LoadOptions,
) -> Result<SessionBuilder, EngineError> {
    let level = match options.optimization_level {
        Some(0) => GraphOptimizationLevel::Disable,
        Some(1) => GraphOptimizationLevel::Level1,
        Some(2) => GraphOptimizationLevel::Level2,
        None | Some(3) => GraphOptimizationLevel::Level3,
        Some(other) => {
            return Err(EngineError::InvalidRequest(format!(
                "optimization_level {other} is not one of 0 (off), 1 (basic), 2 (extended), 3 (all)"
            )));
        }
    };
    let threads = usize::try_from(options.threads_or_all_cores()).unwrap_or(usize::MAX);
    let providers = execution_providers(&options.execution_providers)?;
    let step = |what: &str, e: ort::Error<SessionBuilder>| load(what, e);
    builder
        .with_optimization_level(level)
        .map_err(|e| step("optimization level", e))?
        .with_intra_threads(threads)
        .map_err(|e| step("threads", e))?
        .with_inter_threads(1)
        .map_err(|e| step("threads", e))?
        .with_execution_providers(providers)
        .map_err(|e| step("execution providers", e))
}

/// Providers by name, best first. Core ML exists only in Apple builds.
fn execution_providers(
    names: &[String],
) -> Result<Vec<ort::ep::ExecutionProviderDispatch>, EngineError> {
    let defaults: &[&str] = if cfg!(target_vendor = "apple") {
        &["coreml", "cpu"]
    } else {
        &["cpu"]
    };
    let wanted: Vec<String> = if names.is_empty() {
        defaults.iter().map(|s| (*s).to_owned()).collect()
    } else {
        names
            .iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .collect()
    };
    wanted
        .iter()
        .map(|name| match name.as_str() {
            "cpu" => Ok(ort::ep::CPU::default().build()),
            #[cfg(target_vendor = "apple")]
            "coreml" => Ok(ort::ep::CoreML::default().build()),
            other => Err(EngineError::Unavailable(format!(
                "execution provider {other:?} is not built into this agent; available: {}",
                defaults.join(", ")
            ))),
        })
        .collect()
}

/// The device the first requested provider drives (ONNX Runtime uses the providers in
/// order and falls back to the CPU for what the first cannot run).
fn accelerator_of(names: &[String]) -> Accelerator {
    let first = names.first().map(|n| n.trim().to_ascii_lowercase());
    match first.as_deref() {
        Some("coreml") => Accelerator::Ane,
        None if cfg!(target_vendor = "apple") => Accelerator::Ane,
        _ => Accelerator::Cpu,
    }
}

impl Engine for OnnxEngine {
    fn runtime(&self) -> Runtime {
        Runtime::OnnxRuntime
    }

    fn version(&self) -> String {
        VERSION.to_owned()
    }

    fn runtime_paths(&self) -> Vec<std::path::PathBuf> {
        // The library is opened at the first load, and it opens its provider
        // libraries from its own directory.
        library::configured_path(self.library.as_deref())
            .and_then(|p| p.parent().map(std::path::Path::to_path_buf))
            .into_iter()
            .collect()
    }

    fn formats(&self) -> &[ModelFormat] {
        &[ModelFormat::Onnx]
    }

    fn quantizations(&self) -> &[&'static str] {
        &["F32"]
    }

    fn accelerators(&self) -> Vec<Accelerator> {
        if cfg!(target_vendor = "apple") {
            vec![Accelerator::Cpu, Accelerator::Ane]
        } else {
            vec![Accelerator::Cpu]
        }
    }

    /// ONNX Runtime's MLAS picks its kernels per operation when the library starts,
    /// from the CPU it finds; the library file, not this build, decides. Without a
    /// library file the runtime is unavailable here, and capabilities say why, so a
    /// fleet does not send ONNX models to this node. (The library is not loaded here:
    /// its version is checked by the first ONNX load.)
    fn cpu_variant(&self) -> Result<CpuVariant, EngineError> {
        CpuVariant::library(
            "mlas",
            library::configured_path(self.library.as_deref()),
            "ONNX Runtime",
            "no ONNX Runtime library is configured: set --onnxruntime-library (or \
             ORT_DYLIB_PATH) to libonnxruntime 1.31 or newer",
        )
    }

    fn probe(&self, path: &Path) -> Result<ModelProbe, EngineError> {
        inspect(path).map(|(_, probe)| probe)
    }

    fn estimate_memory(&self, probe: &ModelProbe, options: &LoadOptions) -> MemoryEstimate {
        let ctx = u64::from(options.context_for(probe.context_length));
        let kv = probe.kv_cache_bytes(ctx, 4);
        let chunk = PREFILL_CHUNK as u64;
        // Logits and attention scores of one prefill chunk; ONNX Runtime's arena
        // rounds up, so count them twice.
        let compute = 2
            * (chunk * u64::from(probe.vocab_size) * 4
                + chunk * ctx * u64::from(probe.kv_heads.max(1)) * 4 * 4);
        MemoryEstimate {
            weights: probe.weights_bytes,
            // A step's presents exist beside its pasts until the pasts are dropped.
            kv_cache: kv * 2,
            compute,
        }
    }

    fn load(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Box<dyn LoadedModel>, EngineError> {
        modeld_engine_core::refuse_llama_only_options(options)?;
        let (decoder, export, probe) = self.open_decoder(path, options)?;
        let tokenizer = modeld_tokenizer::for_model(&export.dir, ModelFormat::Onnx, None, None)?;
        let context_length = options.context_for(probe.context_length);
        let estimate = self.estimate_memory(&probe, options);
        let info = ModelInfo {
            architecture: probe.architecture.clone(),
            parameter_count: probe.parameter_count,
            context_length,
            vocab_size: export.config.model.vocab_size,
            chat_template: None,
            memory_bytes: estimate.total(),
            accelerator: accelerator_of(&options.execution_providers),
            threads: options.threads_or_all_cores(),
            ..ModelInfo::default()
        };
        Ok(Box::new(SequenceModel::new(
            decoder,
            tokenizer,
            info,
            PREFILL_CHUNK,
            "onnxruntime",
        )?))
    }
}
