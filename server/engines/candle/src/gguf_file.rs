//! GGUF through candle's quantized llama. The header is read and checked by
//! engine-core's bounds-checked reader first; candle then reads the same file.

use std::path::Path;

use candle_core::Device;
use candle_core::quantized::gguf_file;
use candle_transformers::models::quantized_llama::ModelWeights;
use modeld_engine_core::{EngineError, ModelProbe, gguf};

use crate::interop::candle_error;
use crate::quantized_forward::QuantizedForward;

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

/// Opens the checked file in candle's quantized llama.
pub fn load(path: &Path, pool: rayon::ThreadPool) -> Result<QuantizedForward, EngineError> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
    let model = pool
        .install(|| {
            let content = gguf_file::Content::read(&mut file)?;
            ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
        })
        .map_err(|e| candle_error("load", e))?;
    Ok(QuantizedForward::new(model, pool))
}
