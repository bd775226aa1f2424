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

/// Engines in this build, best first. This build has none yet: the agent registers,
/// discovers and plans models, and answers compatibility questions honestly with
/// "no runtime" until engine features are enabled.
pub fn compiled() -> Vec<CompiledEngine> {
    Vec::new()
}
