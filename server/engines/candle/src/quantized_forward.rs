//! candle's quantized llama as a [`Forward`]: the model GGUF files and MLX
//! directories both become (see `gguf_file` and `mlx_dir`).

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};
use modeld_engine_core::EngineError;
use modeld_engine_core::generation::Forward;

use crate::interop::{candle_error, logits_of};

/// candle's quantized llama with its KV cache.
pub struct QuantizedForward {
    model: ModelWeights,
    cached: usize,
    pool: rayon::ThreadPool,
}

/// The longest context candle's quantized llama supports (its rotary tables).
pub const MAX_CONTEXT: u32 = MAX_SEQ_LEN as u32;

impl QuantizedForward {
    pub fn new(model: ModelWeights, pool: rayon::ThreadPool) -> QuantizedForward {
        QuantizedForward {
            model,
            cached: 0,
            pool,
        }
    }
}

impl Forward for QuantizedForward {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let (model, index) = (&mut self.model, self.cached);
        let logits = self
            .pool
            .install(|| {
                let input = Tensor::new(tokens, &Device::Cpu)?.unsqueeze(0)?;
                logits_of(model.forward(&input, index)?)
            })
            .map_err(|e| candle_error("forward", e))?;
        self.cached += tokens.len();
        Ok(logits)
    }

    fn cached(&self) -> usize {
        self.cached
    }

    fn truncate(&mut self, len: usize) -> usize {
        if len < self.cached {
            // The quantized llama's cache cannot be cut, only cleared.
            self.model.clear_kv_cache();
            self.cached = 0;
        }
        self.cached
    }
}
