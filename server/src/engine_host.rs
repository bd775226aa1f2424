//! The binary's engine role: `modeld engine-host`, started by the agent once per
//! loaded model with its socket as stdin. Not for people to run.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser as _;

use crate::config::LogFormat;
use crate::engines::{self, ENGINE_ROLE, EngineSettings};

#[derive(Debug, clap::Parser)]
#[command(
    name = "modeld engine-host",
    about = "An engine process (started by the agent)"
)]
struct HostArgs {
    #[arg(long, default_value = "info")]
    log: String,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[arg(long)]
    llama_cpu_variants_dir: Option<PathBuf>,
    #[arg(long)]
    onnxruntime_library: Option<PathBuf>,
    #[arg(long)]
    litert_library: Option<PathBuf>,
    #[arg(long)]
    litert_lm_library: Option<PathBuf>,
}

/// True when the process was started in the engine role.
pub fn is_engine_role() -> bool {
    std::env::args_os().nth(1).is_some_and(|a| a == ENGINE_ROLE)
}

/// Runs the engine process to its end. No async runtime and no thread starts before
/// the process confines itself (see `modeld_engine_process::confine`).
#[cfg(unix)]
pub fn main() -> anyhow::Result<()> {
    let args = HostArgs::parse_from(std::env::args_os().skip(1));
    crate::telemetry::init(&args.log, args.log_format, None)?;
    let engines = engines::compiled(&EngineSettings {
        llama_cpu_variants_dir: args.llama_cpu_variants_dir,
        onnxruntime_library: args.onnxruntime_library,
        litert_library: args.litert_library,
        litert_lm_library: args.litert_lm_library,
    });
    let channel = modeld_engine_process::host::channel_from_stdin()
        .context("the engine process needs its socket as stdin")?;
    modeld_engine_process::host::serve(&engines, channel).map_err(anyhow::Error::msg)
}

#[cfg(not(unix))]
pub fn main() -> anyhow::Result<()> {
    anyhow::bail!("engine processes need a Unix platform")
}
