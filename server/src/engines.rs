//! The inference engines compiled into this build. Each engine is a Cargo feature of
//! the agent; a device build carries only the runtimes it needs, and capabilities and
//! compatibility answers come from this list, never from what the code could do.

use modeld_engine_core::{Accelerator, ModelFormat, Runtime};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledEngine {
    pub runtime: Runtime,
    /// Version of the runtime library linked in.
    pub version: String,
    pub formats: Vec<ModelFormat>,
    pub quantizations: Vec<String>,
    /// Accelerators this build of the engine can drive on this platform.
    pub accelerators: Vec<Accelerator>,
}

/// Engines in this build, best first, as capabilities and compatibility report them.
#[allow(clippy::vec_init_then_push)] // one push per engine feature; none may be enabled
pub fn compiled() -> Vec<CompiledEngine> {
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(feature = "llama")]
    out.push(CompiledEngine {
        runtime: Runtime::LlamaCpp,
        version: modeld_engine_llama::VERSION.to_owned(),
        formats: vec![ModelFormat::Gguf],
        quantizations: [
            "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_S",
            "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS",
        ]
        .iter()
        .map(|q| (*q).to_owned())
        .collect(),
        accelerators: vec![Accelerator::Cpu],
    });
    out
}

/// The engine implementations behind `compiled()`.
#[allow(clippy::vec_init_then_push)]
pub fn instances() -> Vec<std::sync::Arc<dyn modeld_engine_core::Engine>> {
    #[allow(unused_mut)]
    let mut out: Vec<std::sync::Arc<dyn modeld_engine_core::Engine>> = Vec::new();
    #[cfg(feature = "llama")]
    out.push(std::sync::Arc::new(modeld_engine_llama::LlamaEngine));
    out
}
