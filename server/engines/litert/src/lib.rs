//! The LiteRT engine: TensorFlow Lite decoders (`.tflite` with `decode` and `prefill`
//! signatures and a KV cache, see [`decoder`]) run through LiteRT's C API, which is
//! opened at run time from a configured `libLiteRt` the way the ONNX engine opens
//! libonnxruntime.
//!
//! Files are checked in Rust before LiteRT sees them (engine-core's `tflite`); generation goes
//! through engine-core's shared loop and sampler.

pub mod decoder;
mod dylib;
mod library;
mod lm;

use std::path::{Path, PathBuf};

use modeld_engine_core::generation::SequenceModel;
use modeld_engine_core::litertlm::{self, Bundle};
use modeld_engine_core::{
    Accelerator, CpuVariant, Engine, EngineError, LoadOptions, LoadedModel, MemoryEstimate,
    ModelFormat, ModelInfo, ModelProbe, Runtime,
};

pub use decoder::{DecoderShape, LiteRtDecoder};
pub use library::LIBRARY_ENV;
pub use lm::library::LIBRARY_ENV as LM_LIBRARY_ENV;
pub use modeld_engine_core::tflite::TfliteModel;

/// The C API this build speaks.
pub const VERSION: &str = "LiteRT 2.x C API (compiled model, CPU)";

#[derive(Debug, Clone, Default)]
pub struct LiteRtEngine {
    /// libLiteRt to open; `None` = `LITERT_LIBRARY`.
    library: Option<PathBuf>,
    /// liblitert-lm, for `.litertlm` bundles; `None` = `LITERT_LM_LIBRARY`.
    lm_library: Option<PathBuf>,
}

/// A checked model: its file, what the check read, and the decoder's shape.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub file: PathBuf,
    pub model: TfliteModel,
    pub shape: DecoderShape,
    /// The prefill signatures (key, tokens), smallest block first.
    pub prefills: Vec<(String, usize)>,
    pub probe: ModelProbe,
    /// Set when the file is a LiteRT-LM bundle, which LiteRT-LM runs.
    pub bundle: Option<Bundle>,
}

impl LiteRtEngine {
    pub fn new(library: Option<PathBuf>, lm_library: Option<PathBuf>) -> LiteRtEngine {
        LiteRtEngine {
            library,
            lm_library,
        }
    }

    /// Checks and opens the decoder at `path` without a tokenizer: what `load` does
    /// underneath, for tests that step the cache themselves.
    pub fn open_decoder(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<(LiteRtDecoder, Inspected), EngineError> {
        // Every load checks the file itself, whatever probed it before.
        let inspected = inspect(path)?;
        let decoder = self.decoder_for(&inspected, options)?;
        Ok((decoder, inspected))
    }

    /// LiteRT's decoder over a checked `.tflite` file.
    fn decoder_for(
        &self,
        inspected: &Inspected,
        options: &LoadOptions,
    ) -> Result<LiteRtDecoder, EngineError> {
        if inspected.bundle.is_some() {
            return Err(EngineError::InvalidRequest(format!(
                "{} is a LiteRT-LM bundle: LiteRT-LM runs it, not LiteRT's decoder",
                inspected.file.display()
            )));
        }
        let lib = library::open(self.library.as_deref())?;
        let compiled =
            library::CompiledModel::open(lib, &inspected.file, options.threads_or_all_cores())?;
        LiteRtDecoder::new(compiled, inspected.shape, &inspected.prefills)
    }
}

/// The model file `path` names: the file itself, or the one `.tflite` file in a
/// directory, else its one `.litertlm` bundle.
pub fn locate(path: &Path) -> Result<PathBuf, EngineError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let listing = |ext| {
        modeld_engine_core::tflite::files_in(path, ext)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))
    };
    let mut found = listing("tflite")?;
    if found.is_empty() {
        found = listing("litertlm")?;
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(EngineError::InvalidModel(format!(
            "{} holds no .tflite file or .litertlm bundle",
            path.display()
        ))),
        n => Err(EngineError::InvalidModel(format!(
            "{} holds {n} model files; register the one to run",
            path.display()
        ))),
    }
}

/// Checks the file and reads what the engine needs, before LiteRT sees it.
pub fn inspect(path: &Path) -> Result<Inspected, EngineError> {
    let file = locate(path)?;
    let bundle = if litertlm::is_bundle(&file) {
        Some(litertlm::check(&file)?)
    } else {
        None
    };
    let model = match &bundle {
        Some(b) => b.model.clone(),
        None => modeld_engine_core::tflite::check(&file)?,
    };
    let shape = decoder::shape_of(&model).map_err(|e| match e {
        EngineError::InvalidModel(what) => {
            EngineError::InvalidModel(format!("{}: {what}", file.display()))
        }
        other => other,
    })?;
    let config = file
        .parent()
        .map(|d| d.join("config.json"))
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let text = |key: &str| {
        config
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let number = |key: &str| {
        config
            .as_ref()
            .and_then(|c| c.get(key))
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    let probe = ModelProbe {
        architecture: text("model_type").unwrap_or_else(|| "tflite-decoder".into()),
        // Every constant element: weights, plus the tables a graph keeps (rotary angles).
        parameter_count: model.constant_elements,
        weights_bytes: model.constant_bytes,
        context_length: shape.context as u32,
        vocab_size: shape.vocab as u32,
        layers: shape.layers as u32,
        kv_heads: shape.kv_heads as u32,
        head_dim: shape.head_dim as u32,
        embedding_length: number("hidden_size").unwrap_or(0),
        quantization: Some(model.weight_type().into()),
    };
    Ok(Inspected {
        file,
        prefills: decoder::prefill_signatures(&model),
        model,
        shape,
        probe,
        bundle,
    })
}

/// Measured with the 135M decoder (541 MB of float32), on Linux: LiteRT's engine
/// process held 743 MiB (PSS), 514 MiB of it XNNPACK's packed weights in the shared
/// weight cache (the file's own pages are read once, while packing) and 217 MiB of
/// anonymous memory (caches, logits, XNNPACK's workspace); without the cache, 1.6 GiB
/// (the mapped file and one packed copy per signature). LiteRT-LM over the same
/// decoder held 822 MiB (PSS): its packed weights in a cache file it maps, and 241 MiB
/// of anonymous memory. One estimate covers both routes, so it errs high for the
/// first (827 MiB): admission must not let either overcommit.
pub fn estimate(probe: &ModelProbe) -> MemoryEstimate {
    // The graph's cache is fixed at export: the context option cannot shrink it.
    let kv_cache = probe.kv_cache_bytes(u64::from(probe.context_length), 4);
    let vocab = u64::from(probe.vocab_size);
    let copies = if cfg!(target_os = "linux") { 1 } else { 3 };
    MemoryEstimate {
        weights: probe.weights_bytes * copies,
        kv_cache,
        // The prefill block's logits, and the runtime's workspace (up to half the
        // weights, as measured).
        compute: 64 * vocab * 4 + probe.weights_bytes / 2,
    }
}

impl Engine for LiteRtEngine {
    fn runtime(&self) -> Runtime {
        Runtime::Tflite
    }

    fn version(&self) -> String {
        VERSION.to_owned()
    }

    fn runtime_paths(&self) -> Vec<PathBuf> {
        // LiteRT opens its accelerator libraries from its own directory.
        [
            library::configured_path(self.library.as_deref()),
            lm::library::configured_path(self.lm_library.as_deref()),
        ]
        .into_iter()
        .flatten()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect()
    }

    fn formats(&self) -> &[ModelFormat] {
        &[ModelFormat::Tflite]
    }

    fn quantizations(&self) -> &[&'static str] {
        &["F32", "F16", "Q8"]
    }

    fn accelerators(&self) -> Vec<Accelerator> {
        vec![Accelerator::Cpu]
    }

    /// XNNPACK, inside the library, picks its kernels for the CPU it finds: the
    /// library file decides, not this build. Without one the runtime is unavailable
    /// here, and capabilities say why.
    fn cpu_variant(&self) -> Result<CpuVariant, EngineError> {
        // A node with LiteRT-LM alone still runs bundles: the runtime is there.
        let (path, runtime) = match library::configured_path(self.library.as_deref()) {
            Some(path) => (Some(path), "LiteRT"),
            None => (
                lm::library::configured_path(self.lm_library.as_deref()),
                "LiteRT-LM",
            ),
        };
        CpuVariant::library(
            "xnnpack",
            path,
            runtime,
            &format!(
                "no LiteRT library is configured: set --litert-library (or {LIBRARY_ENV}) to \
                 libLiteRt.so from the ai-edge-litert 2.3 wheel for .tflite decoders, and \
                 --litert-lm-library (or {LM_LIBRARY_ENV}) to liblitert-lm.so from the \
                 litert-lm-api 0.18 wheel for .litertlm bundles"
            ),
        )
    }

    fn probe(&self, path: &Path) -> Result<ModelProbe, EngineError> {
        inspect(path).map(|i| i.probe)
    }

    fn estimate_memory(&self, probe: &ModelProbe, _options: &LoadOptions) -> MemoryEstimate {
        estimate(probe)
    }

    /// LiteRT-LM writes the weights XNNPACK packed to a cache directory and maps them.
    fn writes_scratch(&self, path: &Path) -> bool {
        locate(path).is_ok_and(|file| litertlm::is_bundle(&file))
    }

    fn load(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<Box<dyn LoadedModel>, EngineError> {
        modeld_engine_core::refuse_llama_only_options(options)?;
        if !options.execution_providers.is_empty()
            && options
                .execution_providers
                .iter()
                .any(|p| !p.trim().eq_ignore_ascii_case("cpu"))
        {
            return Err(EngineError::Unavailable(format!(
                "execution providers {:?}: this agent runs LiteRT on the CPU only",
                options.execution_providers
            )));
        }
        let inspected = inspect(path)?;
        if let Some(bundle) = &inspected.bundle {
            return lm::load(self.lm_library.as_deref(), &inspected, bundle, options);
        }
        let decoder = self.decoder_for(&inspected, options)?;
        let dir = inspected
            .file
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        let tokenizer = modeld_tokenizer::for_model(&dir, ModelFormat::Tflite, None, None)?;
        let probe = &inspected.probe;
        let context_length = options.context_for(probe.context_length);
        let memory = estimate(probe);
        let info = ModelInfo {
            architecture: probe.architecture.clone(),
            parameter_count: probe.parameter_count,
            context_length,
            vocab_size: probe.vocab_size,
            chat_template: None,
            memory_bytes: memory.total(),
            accelerator: Accelerator::Cpu,
            threads: options.threads_or_all_cores(),
            ..ModelInfo::default()
        };
        Ok(Box::new(SequenceModel::new(
            decoder,
            tokenizer,
            info,
            inspected.shape.prefill,
            "litert",
        )?))
    }
}
