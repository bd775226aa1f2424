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
    #[cfg(feature = "onnx")]
    out.push(CompiledEngine {
        runtime: Runtime::OnnxRuntime,
        version: modeld_engine_onnx::VERSION.to_owned(),
        formats: vec![ModelFormat::Onnx],
        quantizations: vec!["F32".into()],
        accelerators: modeld_engine_core::Engine::accelerators(
            &modeld_engine_onnx::OnnxEngine::default(),
        ),
    });
    #[cfg(feature = "candle")]
    out.push(CompiledEngine {
        runtime: Runtime::Candle,
        version: modeld_engine_candle::VERSION.to_owned(),
        formats: vec![ModelFormat::Safetensors, ModelFormat::Gguf],
        quantizations: [
            "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K",
        ]
        .iter()
        .map(|q| (*q).to_owned())
        .collect(),
        accelerators: vec![Accelerator::Cpu],
    });
    out
}

/// The engine implementations behind `compiled()`, in the same order.
#[allow(clippy::vec_init_then_push)]
pub fn instances(
    config: &crate::config::Config,
) -> Vec<std::sync::Arc<dyn modeld_engine_core::Engine>> {
    let _ = config;
    #[allow(unused_mut)]
    let mut out: Vec<std::sync::Arc<dyn modeld_engine_core::Engine>> = Vec::new();
    #[cfg(feature = "llama")]
    out.push(std::sync::Arc::new(modeld_engine_llama::LlamaEngine {
        cpu_variants_dir: config.llama_cpu_variants_dir.clone(),
    }));
    #[cfg(feature = "onnx")]
    out.push(std::sync::Arc::new(modeld_engine_onnx::OnnxEngine::new(
        config.onnxruntime_library.clone(),
    )));
    #[cfg(feature = "candle")]
    out.push(std::sync::Arc::new(modeld_engine_candle::CandleEngine));
    out
}

/// The runtimes of this build that can run `format`, best first: those measured on
/// this node (`Node.Benchmark`) by generation speed, fastest first, then the
/// unmeasured ones in build order. Generation speed ranks because it is what a chat
/// user waits on; a runtime that was never measured here is not assumed slower.
pub fn ranked(format: ModelFormat, measured: &[crate::store::BenchmarkRecord]) -> Vec<Runtime> {
    let speed = |r: Runtime| {
        measured
            .iter()
            .find(|m| m.format == format.as_str() && m.runtime == r.as_str())
            .map(|m| m.generation_tokens_per_second)
    };
    let mut able: Vec<(usize, Runtime, Option<f64>)> = compiled()
        .into_iter()
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

/// `compiled()` with the engines that run `format` in `ranked` order first.
pub fn compiled_ranked(
    format: ModelFormat,
    measured: &[crate::store::BenchmarkRecord],
) -> Vec<CompiledEngine> {
    let order = ranked(format, measured);
    let mut all = compiled();
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

    #[test]
    fn unmeasured_runtimes_keep_build_order() {
        let gguf: Vec<Runtime> = compiled()
            .into_iter()
            .filter(|e| e.formats.contains(&ModelFormat::Gguf))
            .map(|e| e.runtime)
            .collect();
        assert_eq!(ranked(ModelFormat::Gguf, &[]), gguf);
    }

    #[test]
    fn the_fastest_measured_runtime_comes_first() {
        let gguf = ranked(ModelFormat::Gguf, &[]);
        let Some(last) = gguf.last().copied() else {
            return; // no GGUF runtime in this build
        };
        let order = ranked(ModelFormat::Gguf, &[measured(last, 500.0)]);
        assert_eq!(order.first(), Some(&last));
        assert_eq!(order.len(), gguf.len());
        if let [a, b, ..] = gguf[..] {
            let order = ranked(ModelFormat::Gguf, &[measured(a, 10.0), measured(b, 20.0)]);
            assert_eq!(order[..2], [b, a]);
        }
    }
}
