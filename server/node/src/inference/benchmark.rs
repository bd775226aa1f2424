//! Node.Benchmark: measures a runtime's prompt and generation speed on a stored model
//! here, on a private instance (the model's served instance, if any, keeps serving),
//! and records the result so runtime selection can rank by it.

use std::sync::Arc;
use std::time::SystemTime;

use modeld_engine_core::{Flow, GenerateRequest, LoadOptions, Runtime, Sampling};

use super::{Inference, model_path};
use crate::error::{Error, Result};
use crate::registry::ModelEntry;
use crate::storage::Storage;
use crate::store::BenchmarkRecord;

/// Explicit limits: a benchmark holds a core busy, so its size is bounded.
pub const MAX_PROMPT_TOKENS: u32 = 4096;
pub const MAX_GENERATED_TOKENS: u32 = 1024;
pub const MAX_REPETITIONS: u32 = 10;

#[derive(Debug, Clone, Copy)]
pub struct BenchmarkPlan {
    pub runtime: Option<Runtime>,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub repetitions: u32,
    pub threads: u32,
}

/// Text the prompt is cut from: ordinary prose tokenizes like real prompts do.
const PROSE: &str = "The history of the lighthouse is a history of people who kept a \
    light burning through long nights so that ships could find their way home. Keepers \
    trimmed wicks, polished lenses and wrote the weather in their logbooks. ";

impl Inference {
    /// Loads `entry` with the chosen runtime, runs `repetitions` generations of a
    /// `prompt_tokens` prompt and `generated_tokens` tokens (greedy, end-of-text
    /// ignored), records the median rates, and unloads it.
    pub async fn benchmark(
        &self,
        entry: &ModelEntry,
        storage: &Storage,
        plan: BenchmarkPlan,
        rss: Arc<dyn Fn() -> u64 + Send + Sync>,
    ) -> Result<BenchmarkRecord> {
        let id = entry.spec.id.clone();
        let format = entry.spec.format_or_err()?;
        let runtime = plan.runtime.or(entry.spec.preferred_runtime);
        let engine = self.engine_for(&id, format, runtime)?;
        let path = model_path(entry, storage).await?;
        let mut options = LoadOptions {
            context_length: plan.prompt_tokens + plan.generated_tokens + 8,
            parallel: 1,
            threads: if plan.threads == 0 {
                self.settings.threads
            } else {
                plan.threads
            },
            use_mmap: true,
            ..LoadOptions::default()
        };
        let probe = {
            let (engine, path) = (engine.clone(), path.clone());
            tokio::task::spawn_blocking(move || engine.probe(&path)).await??
        };
        let estimate = engine.estimate_memory(&probe, &options).total();
        self.admit(&id, estimate).await?;
        options.memory_limit_bytes = super::engine_memory_limit(estimate);
        let runtime = engine.runtime();
        let (prompt_tps, generation_tps, peak) = tokio::task::spawn_blocking(move || {
            let before = rss();
            let mut model = engine.load(&path, &options)?;
            let tokenizer = model.tokenizer();
            let mut prompt = Vec::new();
            while prompt.len() < plan.prompt_tokens as usize {
                prompt.extend(tokenizer.encode(PROSE, false, false)?);
            }
            prompt.truncate(plan.prompt_tokens as usize);
            let request = GenerateRequest {
                prompt,
                sampling: Sampling {
                    temperature: Some(0.0),
                    ..Sampling::default()
                },
                max_tokens: plan.generated_tokens,
                ignore_eos: true,
                // Every run times the whole prompt, not what the last one left.
                cache_prompt: false,
                ..GenerateRequest::default()
            };
            let mut prompt_rates = Vec::new();
            let mut generation_rates = Vec::new();
            let mut peak = 0u64;
            // In an engine process the whole process is the model; inside the agent,
            // what the agent grew by.
            let held = |model: &dyn modeld_engine_core::LoadedModel| match model.process_id() {
                Some(pid) => crate::memory::process::measure(pid).map_or(0, |m| m.resident_bytes),
                None => rss().saturating_sub(before),
            };
            for _ in 0..plan.repetitions {
                let (_, stats) = model.generate(&request, &mut |_| Flow::Continue)?;
                prompt_rates.push(stats.prompt_tokens_per_second);
                generation_rates.push(stats.generation_tokens_per_second);
                peak = peak.max(held(model.as_ref()));
            }
            drop(model);
            Ok::<_, Error>((median(prompt_rates), median(generation_rates), peak))
        })
        .await??;
        let cost = crate::performance::ModelCost::of(&entry.spec);
        let record = BenchmarkRecord {
            format: format.as_str().to_owned(),
            runtime: runtime.as_str().to_owned(),
            model_id: id,
            prompt_tokens_per_second: prompt_tps,
            generation_tokens_per_second: generation_tps,
            peak_memory_bytes: peak,
            time_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            // Measured in the same terms as predictions, so the rates calibrate them.
            model_bytes: cost.bytes_per_token,
            parameter_count: cost.flops_per_token / 2,
        };
        self.store.put_benchmark(&record)?;
        self.store.flush().await?;
        Ok(record)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}
