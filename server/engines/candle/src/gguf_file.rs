//! GGUF through candle's quantized llama. The header is read and checked by
//! engine-core's bounds-checked reader first; candle then reads the same file.

use std::path::Path;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::{MAX_SEQ_LEN, ModelWeights};
use modeld_engine_core::generation::Forward;
use modeld_engine_core::{EngineError, ModelProbe, gguf};

use crate::{candle_error, logits_of};

/// Checks the file and reads what the engine needs from it.
pub fn check(path: &Path) -> Result<ModelProbe, EngineError> {
    let invalid = |m: String| EngineError::InvalidModel(format!("{}: {m}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| invalid(e.to_string()))?;
    let size = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    let header = gguf::read_header(std::io::BufReader::new(file), size)
        .map_err(|e| invalid(e.to_string()))?;
    let probe = header.probe().map_err(invalid)?;
    if probe.architecture != "llama" {
        return Err(invalid(format!(
            "candle runs GGUF models of the llama architecture here; this one is {:?}",
            probe.architecture
        )));
    }
    Ok(probe)
}

/// candle's quantized llama with its KV cache.
pub struct QuantizedForward {
    model: ModelWeights,
    cached: usize,
    pool: rayon::ThreadPool,
}

/// The longest context candle's quantized llama supports (its rotary tables).
pub const MAX_CONTEXT: u32 = MAX_SEQ_LEN as u32;

impl QuantizedForward {
    pub(crate) fn new(model: ModelWeights, pool: rayon::ThreadPool) -> QuantizedForward {
        QuantizedForward {
            model,
            cached: 0,
            pool,
        }
    }

    pub fn load(path: &Path, pool: rayon::ThreadPool) -> Result<QuantizedForward, EngineError> {
        let mut file = std::fs::File::open(path)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let model = pool
            .install(|| {
                let content = gguf_file::Content::read(&mut file)?;
                ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
            })
            .map_err(|e| candle_error("load", e))?;
        Ok(QuantizedForward {
            model,
            cached: 0,
            pool,
        })
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
