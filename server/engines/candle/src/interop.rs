//! candle's results in engine-core's terms.

use modeld_engine_core::EngineError;

pub fn candle_error(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Inference(format!("candle {what}: {e}"))
}

/// The logits of a forward pass (`[1, vocab]`, any dtype) as F32 values.
pub fn logits_of(t: candle_core::Tensor) -> candle_core::Result<Vec<f32>> {
    t.squeeze(0)?
        .to_dtype(candle_core::DType::F32)?
        .to_vec1::<f32>()
}
