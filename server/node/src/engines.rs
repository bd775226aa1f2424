//! The inference engines of this build, as capabilities and compatibility answers see
//! them: each engine describes itself, and which engines exist is decided once, where
//! the agent is composed (each engine is a Cargo feature of the binary).

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

impl CompiledEngine {
    /// What `engine` says of itself.
    pub fn describe(engine: &dyn modeld_engine_core::Engine) -> CompiledEngine {
        CompiledEngine {
            runtime: engine.runtime(),
            version: engine.version(),
            formats: engine.formats().to_vec(),
            quantizations: engine
                .quantizations()
                .iter()
                .map(|q| (*q).to_owned())
                .collect(),
            accelerators: engine.accelerators(),
        }
    }
}
