//! Speed before measuring it (the seed's `estimatePerformance`): a model's prompt and
//! generation tokens/s on this node, predicted from the node's measured memory
//! bandwidth and compute rate and the model's bytes and FLOPs per token, then
//! replaced by what Node.Benchmark measures.
//!
//! Decoding one token reads every weight once, so it runs at some share of
//! `bandwidth ÷ bytes per token`; a prompt is matrix products over every weight, so it
//! runs at some share of `compute ÷ (2 × parameters)`. Those shares are each runtime's
//! efficiency factors: built-in ones until a benchmark of any model of the format has
//! run here, whose figures then calibrate them for every model of that format.

use std::time::{Duration, SystemTime};

use modeld_engine_core::{ModelFormat, Runtime};

use crate::engines::CompiledEngine;
use crate::registry::ModelSpec;
use crate::store::{BenchmarkRecord, NodeRatesRecord, Store};

/// Rates older than this are measured again when next asked for.
pub const RATES_KEPT: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the node measured of itself.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rates {
    pub memory_read_bytes_per_second: f64,
    pub compute_flops_per_second: f64,
    pub measured_at: SystemTime,
}

impl Rates {
    pub fn from_record(r: &NodeRatesRecord) -> Rates {
        Rates {
            memory_read_bytes_per_second: r.memory_read_bytes_per_second,
            compute_flops_per_second: r.compute_flops_per_second,
            measured_at: crate::store::from_unix_ms(r.measured_unix_ms),
        }
    }

    pub fn to_record(self, cpu: &str) -> NodeRatesRecord {
        NodeRatesRecord {
            memory_read_bytes_per_second: self.memory_read_bytes_per_second,
            compute_flops_per_second: self.compute_flops_per_second,
            measured_unix_ms: crate::store::unix_ms(self.measured_at),
            cpu: cpu.to_owned(),
        }
    }

    /// Measures both rates with `threads` threads. Blocking, about a third of a second.
    pub fn measure(threads: usize) -> Rates {
        Rates {
            memory_read_bytes_per_second: crate::hardware::bandwidth::measure(threads),
            compute_flops_per_second: crate::hardware::compute::measure(threads),
            // To the millisecond, as the store keeps it: the same figures either way.
            measured_at: crate::store::from_unix_ms(crate::store::unix_ms(SystemTime::now())),
        }
    }
}

/// Where a figure comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Built-in efficiency factors on the node's measured rates.
    Predicted,
    /// Factors from a benchmark of another model of the format on this node.
    Calibrated,
    /// A benchmark of this model with this runtime on this node.
    Measured,
}

/// What one token costs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelCost {
    /// Weight bytes a generated token reads.
    pub bytes_per_token: u64,
    /// FLOPs of a prompt token: two per parameter (a multiply and an add).
    pub flops_per_token: u64,
}

impl ModelCost {
    /// From the spec: its files' bytes, and its parameter count, or one estimated
    /// from the bytes and the quantization when the spec does not say.
    pub fn of(spec: &ModelSpec) -> ModelCost {
        let bytes = spec.total_size();
        let parameters = if spec.parameter_count > 0 {
            spec.parameter_count
        } else {
            #[allow(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss
            )]
            let estimated =
                (bytes as f64 / bytes_per_weight(spec.format, &spec.quantization)) as u64;
            estimated
        };
        ModelCost {
            bytes_per_token: bytes,
            flops_per_token: parameters.saturating_mul(2),
        }
    }
}

/// Bytes one weight takes in a quantization (GGUF's block formats include their
/// scales), or the usual dtype of the format when the spec names none.
fn bytes_per_weight(format: Option<ModelFormat>, quantization: &str) -> f64 {
    let q = quantization.to_ascii_uppercase();
    let named = [
        ("F32", 4.0),
        ("FP32", 4.0),
        ("BF16", 2.0),
        ("F16", 2.0),
        ("FP16", 2.0),
        ("Q8", 1.0625),
        ("INT8", 1.0),
        ("Q6", 0.8203),
        ("Q5", 0.6875),
        ("Q4_1", 0.625),
        ("Q4", 0.5625),
        ("INT4", 0.5),
        ("Q3", 0.4297),
        ("Q2", 0.3281),
    ];
    if let Some((_, b)) = named.iter().find(|(name, _)| q.contains(name)) {
        return *b;
    }
    match format {
        // Most GGUF files are 4-bit quantizations.
        Some(ModelFormat::Gguf) => 0.5625,
        Some(ModelFormat::Safetensors | ModelFormat::Mlx) => 2.0,
        _ => 4.0,
    }
}

/// The shares of the node's rates a runtime reaches with a format.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub runtime: Runtime,
    pub format: ModelFormat,
    pub decode: f64,
    pub prefill: f64,
    pub source: Source,
    /// The benchmarked model the factors come from, when calibrated.
    pub calibrated_on: String,
}

/// The built-in factors: (decode, prefill), what bench/predict.sh's Node.Benchmark of
/// the test model of each pair (SmolLM2-135M) implied on a 2-core AMD EPYC VM with
/// llama.cpp's haswell kernels on 2026-12-02 (decode: the mean of two runs; prefill:
/// the run with today's compute probe). A benchmark on the node replaces them.
/// candle's quantized GGUF path has no fast kernels, hence its low factors. MLX's
/// 4-bit models run on the same kernel (as Q4_1); their factors are from the run of
/// 2026-12-03 on a faster VM of the same kind, where the other pairs' generation was
/// predicted within 6% by the factors above. LiteRT's are from a later run that day
/// (bench/results/predict-2026-12-03-litert.md), where llama.cpp's factors predicted its
/// generation at 1.17x.
fn builtin(runtime: Runtime, format: ModelFormat) -> (f64, f64) {
    match (runtime, format) {
        (Runtime::LlamaCpp, _) => (0.41, 0.50),
        (Runtime::Candle, ModelFormat::Gguf) => (0.065, 0.041),
        (Runtime::Candle, ModelFormat::Mlx) => (0.047, 0.043),
        (Runtime::Candle, _) => (0.46, 0.55),
        (Runtime::OnnxRuntime, _) => (0.69, 0.77),
        (Runtime::Tflite, _) => (0.56, 0.61),
        // Runtimes not measured yet: llama.cpp's, the best-known CPU runtime's.
        _ => (0.41, 0.50),
    }
}

/// The factors for `runtime` on `format` models: from the node's benchmark of that
/// format and runtime when one recorded its model's size, else the built-in ones.
pub fn factors(
    runtime: Runtime,
    format: ModelFormat,
    rates: &Rates,
    measured: &[BenchmarkRecord],
) -> Factors {
    let calibrated = measured.iter().find(|b| {
        b.runtime == runtime.as_str()
            && b.format == format.as_str()
            && b.model_bytes > 0
            && b.parameter_count > 0
            && b.generation_tokens_per_second > 0.0
            && b.prompt_tokens_per_second > 0.0
    });
    match calibrated {
        Some(b)
            if rates.memory_read_bytes_per_second > 0.0 && rates.compute_flops_per_second > 0.0 =>
        {
            #[allow(clippy::cast_precision_loss)]
            let (bytes, flops) = (b.model_bytes as f64, 2.0 * b.parameter_count as f64);
            Factors {
                runtime,
                format,
                decode: b.generation_tokens_per_second * bytes / rates.memory_read_bytes_per_second,
                prefill: b.prompt_tokens_per_second * flops / rates.compute_flops_per_second,
                source: Source::Calibrated,
                calibrated_on: b.model_id.clone(),
            }
        }
        _ => {
            let (decode, prefill) = builtin(runtime, format);
            Factors {
                runtime,
                format,
                decode,
                prefill,
                source: Source::Predicted,
                calibrated_on: String::new(),
            }
        }
    }
}

/// How fast a model runs, or would run, here with one runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub runtime: Runtime,
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
    pub source: Source,
    /// Memory bandwidth ÷ bytes per token; 0 when the bandwidth is unknown.
    pub generation_ceiling_tokens_per_second: f64,
    pub cost: ModelCost,
    pub basis: String,
}

/// The speed of `spec` with `runtime` here: the benchmark of this very model when
/// one ran, else a prediction from `rates`. `None` when neither exists (the rates
/// are not measured) or the model has no format.
pub fn estimate(
    spec: &ModelSpec,
    runtime: Runtime,
    rates: Option<&Rates>,
    measured: &[BenchmarkRecord],
) -> Option<Estimate> {
    let format = spec.format?;
    let cost = ModelCost::of(spec);
    #[allow(clippy::cast_precision_loss)]
    let (bytes, flops) = (
        cost.bytes_per_token.max(1) as f64,
        cost.flops_per_token.max(1) as f64,
    );
    let ceiling = rates.map_or(0.0, |r| r.memory_read_bytes_per_second / bytes);
    let this_model = measured.iter().find(|b| {
        b.model_id == spec.id && b.runtime == runtime.as_str() && b.format == format.as_str()
    });
    if let Some(b) = this_model {
        return Some(Estimate {
            runtime,
            prompt_tokens_per_second: b.prompt_tokens_per_second,
            generation_tokens_per_second: b.generation_tokens_per_second,
            source: Source::Measured,
            generation_ceiling_tokens_per_second: ceiling,
            cost,
            basis: format!(
                "measured by Node.Benchmark on {}",
                httpdate::fmt_http_date(crate::store::from_unix_ms(b.time_unix_ms))
            ),
        });
    }
    let rates = rates?;
    if rates.memory_read_bytes_per_second <= 0.0 || rates.compute_flops_per_second <= 0.0 {
        return None;
    }
    let f = factors(runtime, format, rates, measured);
    let whose = match f.source {
        Source::Calibrated => format!("factors from the benchmark of {}", f.calibrated_on),
        _ => format!("{runtime}'s built-in factors"),
    };
    Some(Estimate {
        runtime,
        prompt_tokens_per_second: f.prefill * rates.compute_flops_per_second / flops,
        generation_tokens_per_second: f.decode * rates.memory_read_bytes_per_second / bytes,
        source: f.source,
        generation_ceiling_tokens_per_second: ceiling,
        cost,
        basis: format!(
            "generation {:.2} × {}/s of memory bandwidth ÷ {} per token; prompt {:.2} × {:.1} GFLOP/s ÷ {:.2} GFLOP per token ({whose})",
            f.decode,
            bytesize::ByteSize::b(as_u64(rates.memory_read_bytes_per_second)),
            bytesize::ByteSize::b(cost.bytes_per_token),
            f.prefill,
            rates.compute_flops_per_second / 1e9,
            flops / 1e9,
        ),
    })
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn as_u64(v: f64) -> u64 {
    v.max(0.0) as u64
}

/// The rates, once measured or loaded in this process.
static KNOWN: std::sync::OnceLock<Rates> = std::sync::OnceLock::new();

/// The node's rates, if this process has them yet.
pub fn known_rates() -> Option<Rates> {
    KNOWN.get().copied()
}

/// The rates `cpu` measured within [`RATES_KEPT`], if `store` keeps them: a read, no
/// measurement.
pub fn load_kept(store: &Store, cpu: &str) -> crate::error::Result<Option<Rates>> {
    if let Some(known) = KNOWN.get() {
        return Ok(Some(*known));
    }
    let kept = store.node_rates()?.filter(|r| {
        let age = SystemTime::now()
            .duration_since(crate::store::from_unix_ms(r.measured_unix_ms))
            .unwrap_or(Duration::MAX);
        r.cpu == cpu
            && age < RATES_KEPT
            && r.memory_read_bytes_per_second > 0.0
            && r.compute_flops_per_second > 0.0
    });
    Ok(kept.map(|r| *KNOWN.get_or_init(|| Rates::from_record(&r))))
}

/// The rates [`load_kept`] finds; else measures them with `threads` threads and
/// stores them, so that a restart does not measure again. Blocking: a measurement
/// takes about a third of a second of every core.
pub fn load_or_measure(store: &Store, cpu: &str, threads: usize) -> crate::error::Result<Rates> {
    if let Some(kept) = load_kept(store, cpu)? {
        return Ok(kept);
    }
    let measured = Rates::measure(threads);
    store.put_node_rates(&measured.to_record(cpu))?;
    // Durable at once: a crash right after start-up would measure again.
    store.flush_blocking()?;
    Ok(*KNOWN.get_or_init(|| measured))
}

/// The runtimes of `engines` that can run `format`, best first, as Load picks them:
/// by their decode efficiency here (calibrated by this node's benchmarks, else
/// built in) once the node's rates are known. Before that, by the generation speed
/// measured here, fastest first, then the unmeasured ones in build order: a runtime
/// never measured is not assumed slower.
pub fn ranked(
    engines: &[CompiledEngine],
    format: ModelFormat,
    measured: &[BenchmarkRecord],
    rates: Option<&Rates>,
) -> Vec<Runtime> {
    let speed = |r: Runtime| match rates {
        Some(rates) => Some(factors(r, format, rates, measured).decode),
        None => measured
            .iter()
            .find(|m| m.format == format.as_str() && m.runtime == r.as_str())
            .map(|m| m.generation_tokens_per_second),
    };
    let mut able: Vec<(usize, Runtime, Option<f64>)> = engines
        .iter()
        .filter(|e| e.formats.contains(&format))
        .enumerate()
        .map(|(i, e)| (i, e.runtime, speed(e.runtime)))
        .collect();
    able.sort_by(|a, b| match (a.2, b.2) {
        (Some(x), Some(y)) => y.total_cmp(&x).then(a.0.cmp(&b.0)),
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
    measured: &[BenchmarkRecord],
    rates: Option<&Rates>,
) -> Vec<CompiledEngine> {
    let order = ranked(engines, format, measured, rates);
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
    use crate::registry::ModelFile;

    fn spec(id: &str, bytes: u64, parameters: u64) -> ModelSpec {
        ModelSpec {
            id: id.into(),
            format: Some(ModelFormat::Gguf),
            files: vec![ModelFile {
                name: "m.gguf".into(),
                urls: Vec::new(),
                sha256: String::new(),
                size_bytes: bytes,
                member: None,
                archive: None,
            }],
            parameter_count: parameters,
            ..ModelSpec::default()
        }
    }

    fn rates() -> Rates {
        Rates {
            memory_read_bytes_per_second: 10e9,
            compute_flops_per_second: 100e9,
            measured_at: SystemTime::UNIX_EPOCH,
        }
    }

    fn bench(
        model: &str,
        bytes: u64,
        parameters: u64,
        prompt: f64,
        generation: f64,
    ) -> BenchmarkRecord {
        BenchmarkRecord {
            format: "gguf".into(),
            runtime: "llama.cpp".into(),
            model_id: model.into(),
            prompt_tokens_per_second: prompt,
            generation_tokens_per_second: generation,
            model_bytes: bytes,
            parameter_count: parameters,
            ..BenchmarkRecord::default()
        }
    }

    #[test]
    fn a_prediction_is_bandwidth_over_bytes_and_compute_over_flops() {
        let e = estimate(
            &spec("a", 100_000_000, 100_000_000),
            Runtime::LlamaCpp,
            Some(&rates()),
            &[],
        )
        .unwrap();
        let (decode, prefill) = builtin(Runtime::LlamaCpp, ModelFormat::Gguf);
        assert_eq!(e.source, Source::Predicted);
        assert!((e.generation_ceiling_tokens_per_second - 100.0).abs() < 1e-9);
        assert!((e.generation_tokens_per_second - decode * 100.0).abs() < 1e-9);
        // 100 GFLOP/s over 0.2 GFLOP per token.
        assert!((e.prompt_tokens_per_second - prefill * 500.0).abs() < 1e-9);
        // Twice the bytes, half the speed.
        let big = estimate(
            &spec("b", 200_000_000, 200_000_000),
            Runtime::LlamaCpp,
            Some(&rates()),
            &[],
        )
        .unwrap();
        assert!(
            (big.generation_tokens_per_second * 2.0 - e.generation_tokens_per_second).abs() < 1e-9
        );
        assert!((big.prompt_tokens_per_second * 2.0 - e.prompt_tokens_per_second).abs() < 1e-9);
    }

    #[test]
    fn a_benchmark_of_one_model_calibrates_the_others_and_is_the_answer_for_itself() {
        let measured = [bench("a", 100_000_000, 100_000_000, 300.0, 80.0)];
        let a = estimate(
            &spec("a", 100_000_000, 100_000_000),
            Runtime::LlamaCpp,
            Some(&rates()),
            &measured,
        )
        .unwrap();
        assert_eq!(a.source, Source::Measured);
        assert_eq!(
            (a.prompt_tokens_per_second, a.generation_tokens_per_second),
            (300.0, 80.0)
        );
        // A model twice the size, same runtime and format: half of each measured rate.
        let b = estimate(
            &spec("b", 200_000_000, 200_000_000),
            Runtime::LlamaCpp,
            Some(&rates()),
            &measured,
        )
        .unwrap();
        assert_eq!(b.source, Source::Calibrated);
        assert!(
            (b.generation_tokens_per_second - 40.0).abs() < 1e-9,
            "{b:?}"
        );
        assert!((b.prompt_tokens_per_second - 150.0).abs() < 1e-9, "{b:?}");
        assert!(b.basis.contains("benchmark of a"), "{}", b.basis);
        // Another runtime is not calibrated by it.
        let c = estimate(
            &spec("b", 200_000_000, 200_000_000),
            Runtime::Candle,
            Some(&rates()),
            &measured,
        )
        .unwrap();
        assert_eq!(c.source, Source::Predicted);
        // Without measured rates there is nothing to predict from, only to report.
        assert!(estimate(&spec("b", 1, 1), Runtime::LlamaCpp, None, &measured).is_none());
        assert_eq!(
            estimate(
                &spec("a", 100_000_000, 100_000_000),
                Runtime::LlamaCpp,
                None,
                &measured
            )
            .unwrap()
            .source,
            Source::Measured
        );
    }

    #[test]
    fn the_parameter_count_is_estimated_from_the_quantization_when_unknown() {
        let mut s = spec("q", 625_000_000, 0);
        s.quantization = "Q4_1".into();
        assert_eq!(ModelCost::of(&s).flops_per_token, 2_000_000_000);
        s.quantization = "F16".into();
        assert_eq!(ModelCost::of(&s).flops_per_token, 625_000_000);
        s.quantization = "BF16".into();
        assert_eq!(ModelCost::of(&s).flops_per_token, 625_000_000);
        s.quantization = String::new();
        s.format = Some(ModelFormat::Onnx);
        assert_eq!(ModelCost::of(&s).flops_per_token, 312_500_000);
    }

    fn engine(runtime: Runtime, formats: &[ModelFormat]) -> CompiledEngine {
        CompiledEngine {
            runtime,
            version: String::new(),
            formats: formats.to_vec(),
            quantizations: Vec::new(),
            accelerators: vec![modeld_engine_core::Accelerator::Cpu],
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
    fn unmeasured_runtimes_keep_build_order_until_the_rates_are_known() {
        assert_eq!(
            ranked(&build(), ModelFormat::Gguf, &[], None),
            [Runtime::LlamaCpp, Runtime::Candle]
        );
        assert_eq!(
            ranked(&build(), ModelFormat::Onnx, &[], None),
            [Runtime::OnnxRuntime]
        );
        assert!(ranked(&build(), ModelFormat::CoreMl, &[], None).is_empty());
        // Without rates, a measured runtime comes first.
        let mut candle = bench("a", 0, 0, 10.0, 500.0);
        candle.runtime = "candle".into();
        assert_eq!(
            ranked(&build(), ModelFormat::Gguf, &[candle], None),
            [Runtime::Candle, Runtime::LlamaCpp]
        );
    }

    #[test]
    fn with_rates_the_predicted_or_calibrated_fastest_comes_first() {
        // The built-in factors put llama.cpp ahead of candle for GGUF.
        assert_eq!(
            ranked(&build(), ModelFormat::Gguf, &[], Some(&rates())),
            [Runtime::LlamaCpp, Runtime::Candle]
        );
        // A benchmark here that finds candle near the bandwidth's limit (0.9 of it)
        // puts it first; one that finds it slow keeps it behind.
        let mut fast = bench("a", 100_000_000, 100_000_000, 400.0, 90.0);
        fast.runtime = "candle".into();
        assert_eq!(
            ranked(&build(), ModelFormat::Gguf, &[fast.clone()], Some(&rates())),
            [Runtime::Candle, Runtime::LlamaCpp]
        );
        let mut slow = fast.clone();
        slow.generation_tokens_per_second = 5.0;
        assert_eq!(
            ranked(&build(), ModelFormat::Gguf, &[slow], Some(&rates())),
            [Runtime::LlamaCpp, Runtime::Candle]
        );
        let all = compiled_ranked(&build(), ModelFormat::Gguf, &[fast], Some(&rates()));
        let runtimes: Vec<Runtime> = all.iter().map(|e| e.runtime).collect();
        assert_eq!(
            runtimes,
            [Runtime::Candle, Runtime::LlamaCpp, Runtime::OnnxRuntime]
        );
    }
}
