//! The engines of this build, and where they run: in an engine process per loaded
//! model (the default), or inside the agent.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use modeld_engine_core::Engine;

use crate::config::{Config, EngineIsolation, LogFormat};
use crate::error::{Error, Result};

/// The first argument that starts the binary as an engine process
/// (`crate::engine_host`).
pub const ENGINE_ROLE: &str = "engine-host";

/// What the engines need from the configuration, in both roles of the binary.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    pub llama_cpu_variants_dir: Option<PathBuf>,
    pub onnxruntime_library: Option<PathBuf>,
    pub litert_library: Option<PathBuf>,
    pub litert_lm_library: Option<PathBuf>,
}

/// The engines compiled into this build, one Cargo feature each, in the order
/// capabilities list them. Adding an engine: its crate, its feature, one line here.
#[allow(clippy::vec_init_then_push, unused_mut)] // one push per engine feature; none may be enabled
pub fn compiled(settings: &EngineSettings) -> Vec<Arc<dyn Engine>> {
    let _ = settings;
    let mut out: Vec<Arc<dyn Engine>> = Vec::new();
    #[cfg(feature = "llama")]
    out.push(Arc::new(modeld_engine_llama::LlamaEngine {
        cpu_variants_dir: settings.llama_cpu_variants_dir.clone(),
    }));
    #[cfg(feature = "onnx")]
    out.push(Arc::new(modeld_engine_onnx::OnnxEngine::new(
        settings.onnxruntime_library.clone(),
    )));
    #[cfg(feature = "candle")]
    out.push(Arc::new(modeld_engine_candle::CandleEngine));
    #[cfg(feature = "litert")]
    out.push(Arc::new(modeld_engine_litert::LiteRtEngine::new(
        settings.litert_library.clone(),
        settings.litert_lm_library.clone(),
    )));
    out
}

/// The engines the agent loads models with, as the configuration isolates them.
pub fn for_agent(config: &Config) -> Result<Vec<Arc<dyn Engine>>> {
    let settings = EngineSettings {
        llama_cpu_variants_dir: config.llama_cpu_variants_dir.clone(),
        onnxruntime_library: config.onnxruntime_library.clone(),
        litert_library: config.litert_library.clone(),
        litert_lm_library: config.litert_lm_library.clone(),
    };
    let engines = compiled(&settings);
    match config.engine_isolation {
        EngineIsolation::InProcess => Ok(engines),
        EngineIsolation::Process => isolated(engines, config, &settings),
    }
}

#[cfg(unix)]
fn isolated(
    engines: Vec<Arc<dyn Engine>>,
    config: &Config,
    settings: &EngineSettings,
) -> Result<Vec<Arc<dyn Engine>>> {
    let program = std::env::current_exe().map_err(|e| {
        Error::Config(format!(
            "cannot find modeld's own binary to start engine processes ({e}); \
             run with --engine-isolation in-process"
        ))
    })?;
    let mut args: Vec<OsString> = vec![
        ENGINE_ROLE.into(),
        "--log".into(),
        config.log.clone().into(),
        "--log-format".into(),
        match config.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
        .into(),
    ];
    if let Some(dir) = &settings.llama_cpu_variants_dir {
        args.extend(["--llama-cpu-variants-dir".into(), dir.clone().into()]);
    }
    if let Some(lib) = &settings.onnxruntime_library {
        args.extend(["--onnxruntime-library".into(), lib.clone().into()]);
    }
    if let Some(lib) = &settings.litert_library {
        args.extend(["--litert-library".into(), lib.clone().into()]);
    }
    if let Some(lib) = &settings.litert_lm_library {
        args.extend(["--litert-lm-library".into(), lib.clone().into()]);
    }
    let command = modeld_engine_process::EngineCommand { program, args };
    // Each engine's socket is served on the agent's runtime.
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::Config("engine processes are started from within the agent's runtime".into())
    })?;
    Ok(engines
        .into_iter()
        .map(|inner| {
            Arc::new(modeld_engine_process::ProcessEngine::new(
                inner,
                command.clone(),
                runtime.clone(),
            )) as Arc<dyn Engine>
        })
        .collect())
}

#[cfg(not(unix))]
fn isolated(
    _engines: Vec<Arc<dyn Engine>>,
    _config: &Config,
    _settings: &EngineSettings,
) -> Result<Vec<Arc<dyn Engine>>> {
    Err(Error::Config(
        "engine processes need a Unix platform here; run with --engine-isolation in-process".into(),
    ))
}
