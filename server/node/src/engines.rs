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

/// The runtimes of `engines` that can run `format`, best first: those measured on
/// this node (`Node.Benchmark`) by generation speed, fastest first, then the
/// unmeasured ones in build order. Generation speed ranks because it is what a chat
/// user waits on; a runtime that was never measured here is not assumed slower.
pub fn ranked(
    engines: &[CompiledEngine],
    format: ModelFormat,
    measured: &[crate::store::BenchmarkRecord],
) -> Vec<Runtime> {
    let speed = |r: Runtime| {
        measured
            .iter()
            .find(|m| m.format == format.as_str() && m.runtime == r.as_str())
            .map(|m| m.generation_tokens_per_second)
    };
    let mut able: Vec<(usize, Runtime, Option<f64>)> = engines
        .iter()
        .filter(|e| e.formats.contains(&format))
        .enumerate()
        .map(|(i, e)| (i, e.runtime, speed(e.runtime)))
        .collect();
    able.sort_by(|a, b| match (a.2, b.2) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.0.cmp(&b.0),
    });
    able.into_iter().map(|(_, r, _)| r).collect()
}

/// `engines` with those that run `format` in `ranked` order first.
pub fn compiled_ranked(
    engines: &[CompiledEngine],
    format: ModelFormat,
    measured: &[crate::store::BenchmarkRecord],
) -> Vec<CompiledEngine> {
    let order = ranked(engines, format, measured);
    let mut all = engines.to_vec();
    all.sort_by_key(|e| {
        order
            .iter()
            .position(|r| *r == e.runtime)
            .unwrap_or(usize::MAX)
    });
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::BenchmarkRecord;

    fn measured(runtime: Runtime, tps: f64) -> BenchmarkRecord {
        BenchmarkRecord {
            format: "gguf".into(),
            runtime: runtime.as_str().into(),
            generation_tokens_per_second: tps,
            ..BenchmarkRecord::default()
        }
    }

    fn engine(runtime: Runtime, formats: &[ModelFormat]) -> CompiledEngine {
        CompiledEngine {
            runtime,
            version: String::new(),
            formats: formats.to_vec(),
            quantizations: Vec::new(),
            accelerators: vec![Accelerator::Cpu],
        }
    }

    fn build() -> Vec<CompiledEngine> {
        vec![
            engine(Runtime::LlamaCpp, &[ModelFormat::Gguf]),
            engine(Runtime::OnnxRuntime, &[ModelFormat::Onnx]),
            engine(
                Runtime::Candle,
                &[ModelFormat::Safetensors, ModelFormat::Gguf],
            ),
        ]
    }

    #[test]
    fn unmeasured_runtimes_keep_build_order() {
        assert_eq!(
            ranked(&build(), ModelFormat::Gguf, &[]),
            [Runtime::LlamaCpp, Runtime::Candle]
        );
        assert_eq!(
            ranked(&build(), ModelFormat::Onnx, &[]),
            [Runtime::OnnxRuntime]
        );
        assert!(ranked(&build(), ModelFormat::CoreMl, &[]).is_empty());
    }

    #[test]
    fn the_fastest_measured_runtime_comes_first() {
        let order = ranked(
            &build(),
            ModelFormat::Gguf,
            &[measured(Runtime::Candle, 500.0)],
        );
        assert_eq!(order, [Runtime::Candle, Runtime::LlamaCpp]);
        let order = ranked(
            &build(),
            ModelFormat::Gguf,
            &[
                measured(Runtime::LlamaCpp, 10.0),
                measured(Runtime::Candle, 20.0),
            ],
        );
        assert_eq!(order, [Runtime::Candle, Runtime::LlamaCpp]);
        let all = compiled_ranked(
            &build(),
            ModelFormat::Gguf,
            &[measured(Runtime::Candle, 5.0)],
        );
        let runtimes: Vec<Runtime> = all.iter().map(|e| e.runtime).collect();
        assert_eq!(
            runtimes,
            [Runtime::Candle, Runtime::LlamaCpp, Runtime::OnnxRuntime]
        );
    }
}
