//! The candle engine: llama-family models from a Hugging Face safetensors directory
//! (config.json + safetensors), from an MLX directory (the same layout with MLX's
//! affine quantization, see `mlx_dir`) and from GGUF through candle's quantized
//! llama.
//!
//! Files are checked before candle reads them (see `safetensors_dir` and
//! `gguf_file`). Tokenizers come from the same providers as every runtime
//! (tokenizer.json beside the model, else the GGUF's vocabulary), and generation goes
//! through engine-core's shared loop and sampler. Inference runs on a thread pool
//! this model owns, sized by the load options (`pool.install`, so candle's parallel
//! kernels use those threads).

mod gguf_file;
mod interop;
mod mlx_dir;
mod quantized_forward;
mod safetensors_dir;

use std::path::Path;

use modeld_engine_core::generation::{Forward, SequenceModel};
use modeld_engine_core::{
    Accelerator, Engine, EngineError, LoadOptions, LoadedModel, MemoryEstimate, ModelFormat,
    ModelInfo, ModelProbe, Runtime,
};

pub use quantized_forward::QuantizedForward;
pub use safetensors_dir::LlamaForward;

/// The candle version compiled in.
pub const VERSION: &str = "0.11.1";

/// Prompt tokens per forward pass: bounds the attention scores one pass allocates.
const PREFILL_CHUNK: usize = 256;

#[derive(Debug, Clone, Copy, Default)]
pub struct CandleEngine;

impl CandleEngine {
    /// Checks and opens the network at `path` as a bare [`Forward`] with its KV cache
    /// (no tokenizer): what `load` does underneath, for tests that step it by hand.
    pub fn open_forward(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<(ModelProbe, Box<dyn Forward>, ModelFormat), EngineError> {
        let pool = thread_pool(options.threads_or_all_cores())?;
        // A directory is safetensors with config.json, MLX-quantized or not; a file
        // is GGUF.
        Ok(if path.is_dir() && mlx_dir::is_mlx(path) {
            let checked = mlx_dir::check(path)?;
            let forward = mlx_dir::load(&checked, pool)?;
            (checked.probe, Box::new(forward), ModelFormat::Mlx)
        } else if path.is_dir() {
            let checked = safetensors_dir::check(path)?;
            let context = options.context_for(checked.probe.context_length);
            let forward = LlamaForward::load(&checked, context, pool)?;
            (checked.probe, Box::new(forward), ModelFormat::Safetensors)
        } else {
            let probe = gguf_file::check(path)?;
            let forward = gguf_file::load(path, pool)?;
            (probe, Box::new(forward), ModelFormat::Gguf)
        })
    }
}

impl CandleEngine {
    /// Opens an MLX directory like [`CandleEngine::open_forward`], with every
    /// projection dequantized to F32 when `quantized` is false: MLX's own arithmetic,
    /// which the parity tests hold to mlx-lm's logits.
    pub fn open_mlx_forward(
        &self,
        path: &Path,
        options: &LoadOptions,
        quantized: bool,
    ) -> Result<Box<dyn Forward>, EngineError> {
        let pool = thread_pool(options.threads_or_all_cores())?;
        let mut checked = mlx_dir::check(path)?;
        if !quantized {
            checked = checked.dequantized();
        }
        Ok(Box::new(mlx_dir::load(&checked, pool)?))
    }
}

fn thread_pool(threads: u32) -> Result<rayon::ThreadPool, EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(usize::try_from(threads).unwrap_or(usize::MAX))
        .thread_name(|i| format!("candle-{i}"))
        .build()
        .map_err(|e| EngineError::Load(format!("candle threads: {e}")))
}

impl Engine for CandleEngine {
    fn runtime(&self) -> Runtime {
        Runtime::Candle
    }

    fn version(&self) -> String {
        VERSION.to_owned()
    }

    fn formats(&self) -> &[ModelFormat] {
        &[
            ModelFormat::Safetensors,
            ModelFormat::Mlx,
            ModelFormat::Gguf,
        ]
    }

    fn quantizations(&self) -> &[&'static str] {
        &[
            "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K", // MLX's affine widths
            "Q2", "Q3", "Q4", "Q5", "Q6", "Q8",
        ]
    }

    fn accelerators(&self) -> Vec<Accelerator> {
        vec![Accelerator::Cpu]
    }

    fn probe(&self, path: &Path) -> Result<ModelProbe, EngineError> {
        if path.is_dir() && mlx_dir::is_mlx(path) {
            mlx_dir::check(path).map(|c| c.probe)
        } else if path.is_dir() {
            safetensors_dir::check(path).map(|c| c.probe)
        } else {
            gguf_file::check(path)
        }
    }

    fn estimate_memory(&self, probe: &ModelProbe, options: &LoadOptions) -> MemoryEstimate {
        let ctx = u64::from(options.context_for(probe.context_length));
        let kv = probe.kv_cache_bytes(ctx, 4);
        let chunk = PREFILL_CHUNK as u64;
        let heads = u64::from(probe.embedding_length / probe.head_dim.max(1));
        // Attention scores of one prefill chunk, its MLP activations and the logits;
        // concatenating the cache briefly holds it twice.
        let compute = chunk * ctx * heads.max(1) * 4
            + chunk * u64::from(probe.embedding_length) * 4 * 8
            + u64::from(probe.vocab_size) * 4;
        MemoryEstimate {
            weights: probe.weights_bytes,
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
        let (probe, forward, format) = self.open_forward(path, options)?;
        let mut context_length = options.context_for(probe.context_length);
        if matches!(format, ModelFormat::Gguf | ModelFormat::Mlx) {
            context_length = context_length.min(quantized_forward::MAX_CONTEXT);
        }
        let tokenizer = modeld_tokenizer::for_model(path, format, None, None)?;
        let estimate = self.estimate_memory(&probe, options);
        let info = ModelInfo {
            architecture: probe.architecture.clone(),
            parameter_count: probe.parameter_count,
            context_length,
            vocab_size: probe.vocab_size,
            chat_template: None,
            memory_bytes: estimate.total(),
            accelerator: Accelerator::Cpu,
            threads: options.threads_or_all_cores(),
            ..ModelInfo::default()
        };
        Ok(Box::new(SequenceModel::new(
            forward,
            tokenizer,
            info,
            PREFILL_CHUNK,
            "candle",
        )?))
    }
}
