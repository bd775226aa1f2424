//! Finding and loading the ONNX Runtime shared library. ort loads it at run time
//! (`load-dynamic`), so a build carries no copy and a device supplies the one that
//! suits it. A missing or too-old library is an error a person can act on, never an
//! abort: ort reads the library's version string before it asks for the API table.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use modeld_engine_core::EngineError;
use ort::environment::Environment;

/// The ONNX Runtime minor version this build's API level needs (1.x with x ≥ this).
pub const REQUIRED_MINOR: u32 = ort::MINOR_VERSION;

/// The process's one ONNX Runtime environment (ONNX Runtime allows one).
static ENVIRONMENT: Mutex<Option<Environment>> = Mutex::new(None);

/// Where the library is: the configured path, else `ORT_DYLIB_PATH`.
pub fn configured_path(configured: Option<&Path>) -> Option<PathBuf> {
    configured.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("ORT_DYLIB_PATH")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// The environment, loading the library at `configured` (or `ORT_DYLIB_PATH`) the
/// first time.
pub fn environment(configured: Option<&Path>) -> Result<Environment, EngineError> {
    let mut guard = ENVIRONMENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(env) = guard.as_ref() {
        return Ok(env.clone());
    }
    let path = configured_path(configured).ok_or_else(|| {
        EngineError::Unavailable(
            "the ONNX Runtime library is not configured: set --onnxruntime-library (or \
             ORT_DYLIB_PATH) to libonnxruntime.so from the onnxruntime 1.31 wheel \
             (scripts/setup fetches it)"
                .into(),
        )
    })?;
    if !path.is_file() {
        return Err(EngineError::Unavailable(format!(
            "the ONNX Runtime library {} does not exist",
            path.display()
        )));
    }
    let builder = ort::init_from(&path).map_err(|e| {
        EngineError::Unavailable(format!(
            "cannot use the ONNX Runtime library {}: {e} (this build needs ONNX Runtime 1.{REQUIRED_MINOR} or newer)",
            path.display()
        ))
    })?;
    let env = builder.with_name("modeld").build().map_err(|e| {
        EngineError::Unavailable(format!(
            "ONNX Runtime from {} did not start: {e}",
            path.display()
        ))
    })?;
    tracing::info!(library = %path.display(), "ONNX Runtime loaded");
    *guard = Some(env.clone());
    Ok(env)
}
