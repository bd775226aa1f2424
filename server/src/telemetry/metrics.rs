//! The agent's metrics through the OpenTelemetry SDK: exported over OTLP when a
//! collector is configured, and read in the Prometheus text format at `/metrics` on
//! `--metrics-listen`. Names follow OpenTelemetry's semantic conventions where they
//! exist (`gen_ai.*`, `rpc.*`, `process.*`) and are `modeld.*` otherwise. The node's
//! modules count their own events (`modeld_node::metrics`).
//!
//! Request metrics are recorded where a request ends; the node's state (loaded
//! models, queues, memory, disk, the process) is read when a reader collects, so
//! nothing polls.

use std::net::SocketAddr;
use std::sync::Arc;

use modeld_engine_core::{FinishReason, GenerateStats};
use modeld_node::Node;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// Time-to-first-token and per-token buckets, in seconds: from a fast desktop's few
/// milliseconds to a phone's seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Share of the measured memory bandwidth a decode achieved.
const UTILIZATION_BUCKETS: [f64; 11] = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0];

/// Bytes of weights read per second while decoding: 100 MB/s to 1 TB/s.
const BANDWIDTH_BUCKETS: [f64; 9] = [1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 1e11, 1e12];

/// Requests a model's recent figures cover, at most, and how far back.
const RECENT_REQUESTS: usize = 100;
const RECENT_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// One finished request, for the recent figures.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: std::time::Instant,
    time_to_first_token: f64,
    prompt_tokens_per_second: f64,
    generation_tokens_per_second: f64,
    generated_tokens: u32,
}

/// How a model served its recent requests (see [`Metrics::recent`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Recent {
    pub requests: u32,
    pub time_to_first_token_p50: f64,
    pub time_to_first_token_p95: f64,
    pub prompt_tokens_per_second: f64,
    pub generation_tokens_per_second: f64,
    pub generated_tokens: u64,
}

/// The `q` quantile of sorted `values` (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summarize(samples: &std::collections::VecDeque<Sample>, now: std::time::Instant) -> Recent {
    let live: Vec<&Sample> = samples
        .iter()
        .filter(|s| now.duration_since(s.at) <= RECENT_WINDOW)
        .collect();
    if live.is_empty() {
        return Recent::default();
    }
    let mut ttft: Vec<f64> = live.iter().map(|s| s.time_to_first_token).collect();
    ttft.sort_by(f64::total_cmp);
    #[allow(clippy::cast_precision_loss)]
    let n = live.len() as f64;
    Recent {
        requests: u32::try_from(live.len()).unwrap_or(u32::MAX),
        time_to_first_token_p50: quantile(&ttft, 0.5),
        time_to_first_token_p95: quantile(&ttft, 0.95),
        prompt_tokens_per_second: live.iter().map(|s| s.prompt_tokens_per_second).sum::<f64>() / n,
        generation_tokens_per_second: live
            .iter()
            .map(|s| s.generation_tokens_per_second)
            .sum::<f64>()
            / n,
        generated_tokens: live.iter().map(|s| u64::from(s.generated_tokens)).sum(),
    }
}

/// The instruments the services record into.
pub struct Metrics {
    registry: Option<prometheus::Registry>,
    /// Each model's latest requests, newest last.
    recent: std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<Sample>>>,
    requests: Counter<u64>,
    tokens: Counter<u64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    rpc_duration: Histogram<f64>,
    decode_bandwidth: Histogram<f64>,
    decode_utilization: Histogram<f64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// The name OpenTelemetry's `gen_ai.response.finish_reason` uses.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

/// What a finished Generate says about its model.
#[derive(Debug, Clone, Copy)]
pub struct Served<'a> {
    pub model: &'a str,
    pub runtime: &'static str,
    /// Bytes of weights one decode step reads.
    pub weight_bytes: u64,
}

impl Served<'_> {
    fn attrs(&self) -> [KeyValue; 2] {
        [
            KeyValue::new("gen_ai.request.model", self.model.to_owned()),
            KeyValue::new("modeld.runtime", self.runtime),
        ]
    }
}

impl Metrics {
    /// Builds the instruments on `telemetry`'s meter provider, and the gauges that
    /// read `node` when a reader collects.
    pub fn new(node: &Arc<Node>, telemetry: &super::Telemetry) -> Metrics {
        let meter = telemetry.meters.meter("modeld");
        observe_node(&meter, node);
        Metrics {
            requests: meter
                .u64_counter("modeld.generate.requests")
                .with_description(
                    "Generate requests that ended, by model, runtime and finish reason",
                )
                .build(),
            tokens: meter
                .u64_counter("modeld.generate.tokens")
                .with_description(
                    "Tokens by model, runtime and gen_ai.token.type (input: prompt, output: \
                     generated)",
                )
                .build(),
            time_to_first_token: meter
                .f64_histogram("gen_ai.server.time_to_first_token")
                .with_unit("s")
                .with_description(
                    "Time to generate the first token, from the engine's start on the request",
                )
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            time_per_output_token: meter
                .f64_histogram("gen_ai.server.time_per_output_token")
                .with_unit("s")
                .with_description("Time per output token after the first")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            rpc_duration: meter
                .f64_histogram("rpc.server.call.duration")
                .with_unit("s")
                .with_description("Time to answer an RPC; for a stream, until its last message")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            decode_bandwidth: meter
                .f64_histogram("modeld.decode.bandwidth")
                .with_unit("By/s")
                .with_description(
                    "Bytes of weights read per second while decoding (weight bytes × \
                     generation tokens/s), by model",
                )
                .with_boundaries(BANDWIDTH_BUCKETS.to_vec())
                .build(),
            decode_utilization: meter
                .f64_histogram("modeld.decode.bandwidth.utilization")
                .with_unit("1")
                .with_description(
                    "modeld.decode.bandwidth as a share of the node's measured memory read \
                     bandwidth (modeld.memory.bandwidth)",
                )
                .with_boundaries(UTILIZATION_BUCKETS.to_vec())
                .build(),
            registry: telemetry.prometheus.clone(),
            recent: std::sync::Mutex::default(),
        }
    }

    /// Records a Generate request that ended.
    pub fn generate_done(&self, served: &Served<'_>, reason: FinishReason, stats: &GenerateStats) {
        let [model, runtime] = served.attrs();
        self.requests.add(
            1,
            &[
                model.clone(),
                runtime.clone(),
                KeyValue::new("gen_ai.response.finish_reason", finish_reason(reason)),
            ],
        );
        let typed = |kind: &'static str| {
            [
                model.clone(),
                runtime.clone(),
                KeyValue::new("gen_ai.token.type", kind),
            ]
        };
        self.tokens
            .add(u64::from(stats.prompt_tokens), &typed("input"));
        self.tokens
            .add(u64::from(stats.generated_tokens), &typed("output"));
        if stats.generated_tokens == 0 {
            return;
        }
        self.remember(served.model, stats);
        let attrs = [model, runtime];
        self.time_to_first_token
            .record(stats.time_to_first_token_seconds, &attrs);
        // One token is all prefill: there is no decode rate to speak of.
        if stats.generated_tokens > 1 && stats.generation_tokens_per_second > 0.0 {
            self.time_per_output_token
                .record(1.0 / stats.generation_tokens_per_second, &attrs);
            #[allow(clippy::cast_precision_loss)]
            let achieved = served.weight_bytes as f64 * stats.generation_tokens_per_second;
            self.decode_bandwidth.record(achieved, &attrs);
            if let Some(limit) =
                modeld_node::performance::known_rates().map(|r| r.memory_read_bytes_per_second)
                && limit > 0.0
            {
                self.decode_utilization.record(achieved / limit, &attrs);
            }
        }
    }

    fn remember(&self, model: &str, stats: &GenerateStats) {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let samples = recent.entry(model.to_owned()).or_default();
        if samples.len() == RECENT_REQUESTS {
            samples.pop_front();
        }
        samples.push_back(Sample {
            at: std::time::Instant::now(),
            time_to_first_token: stats.time_to_first_token_seconds,
            prompt_tokens_per_second: stats.prompt_tokens_per_second,
            generation_tokens_per_second: stats.generation_tokens_per_second,
            generated_tokens: stats.generated_tokens,
        });
    }

    /// How `model` served its latest requests (at most the last 100, within the
    /// last 10 minutes) that produced tokens.
    pub fn recent(&self, model: &str) -> Recent {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent
            .get(model)
            .map(|samples| summarize(samples, std::time::Instant::now()))
            .unwrap_or_default()
    }

    /// Records an RPC's answer with its gRPC status code.
    pub fn rpc_answered(
        &self,
        service: &str,
        method: &str,
        code: i64,
        elapsed: std::time::Duration,
    ) {
        self.rpc_duration.record(
            elapsed.as_secs_f64(),
            &[
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_owned()),
                KeyValue::new("rpc.method", method.to_owned()),
                KeyValue::new("rpc.grpc.status_code", code),
            ],
        );
    }

    /// Records a Generate request that failed after it started.
    pub fn generate_failed(&self, served: &Served<'_>) {
        let [model, runtime] = served.attrs();
        self.requests.add(
            1,
            &[
                model,
                runtime,
                KeyValue::new("gen_ai.response.finish_reason", "error"),
            ],
        );
    }

    /// The Prometheus text exposition of everything recorded; empty when `/metrics`
    /// is not served.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let Some(registry) = &self.registry else {
            return out;
        };
        if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
            warn!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

fn model_attrs(w: &modeld_node::inference::ModelWorker) -> [KeyValue; 2] {
    [
        KeyValue::new("gen_ai.request.model", w.model_id()),
        KeyValue::new("modeld.runtime", w.runtime.as_str()),
    ]
}

/// Gauges read from the node when a reader collects.
fn observe_node(meter: &Meter, node: &Arc<Node>) {
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.models.loaded")
        .with_description("Models in memory")
        .with_callback(move |o| o.observe(n.inference.loaded().len() as u64, &[]))
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.generate.in_flight")
        .with_description("Generate requests running or waiting, by model")
        .with_callback(move |o| {
            for w in n.inference.loaded() {
                o.observe(w.in_flight() as u64, &model_attrs(&w));
            }
        })
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.generate.queued")
        .with_description(
            "Generate requests waiting for a free slot (beyond the model's parallel slots), \
             by model",
        )
        .with_callback(move |o| {
            for w in n.inference.loaded() {
                o.observe(
                    w.in_flight().saturating_sub(w.parallel) as u64,
                    &model_attrs(&w),
                );
            }
        })
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.memory.budget")
        .with_unit("By")
        .with_description("Memory loaded models may use")
        .with_callback(move |o| o.observe(n.memory_budget_bytes, &[]))
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.memory.used")
        .with_unit("By")
        .with_description("Memory the loaded models use together, as the memory manager counts it")
        .with_callback(move |o| {
            o.observe(n.inference.resident().iter().map(|r| r.bytes).sum(), &[]);
        })
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.memory.models")
        .with_unit("By")
        .with_description(
            "Memory each loaded model uses: measured from its engine process where it has \
             one, else as its engine reported",
        )
        .with_callback(move |o| {
            for w in n.inference.loaded() {
                o.observe(w.memory().charged_bytes(), &model_attrs(&w));
            }
        })
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.memory.models.estimated")
        .with_unit("By")
        .with_description("Memory each loaded model was estimated to need when it was admitted")
        .with_callback(move |o| {
            for w in n.inference.loaded() {
                o.observe(w.estimate.total(), &model_attrs(&w));
            }
        })
        .build();
    meter
        .f64_observable_gauge("modeld.memory.bandwidth")
        .with_unit("By/s")
        .with_description(
            "The node's memory read bandwidth (measured at start-up, kept a week per CPU)",
        )
        .with_callback(|o| {
            if let Some(rates) = modeld_node::performance::known_rates() {
                o.observe(rates.memory_read_bytes_per_second, &[]);
            }
        })
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.disk.free")
        .with_unit("By")
        .with_description("Free bytes on the data directory's filesystem")
        .with_callback(move |o| o.observe(n.hardware.disk().free_bytes, &[]))
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.disk.used")
        .with_unit("By")
        .with_description(
            "Bytes the agent's models take: blobs, partial downloads, unpacked models",
        )
        .with_callback(move |o| {
            if let Ok(used) = n.storage.used_bytes() {
                o.observe(used, &[]);
            }
        })
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.disk.quota")
        .with_unit("By")
        .with_description("The most the agent's models may take (--disk-quota); absent without one")
        .with_callback(move |o| {
            if let Some(quota) = n.disk_quota {
                o.observe(quota, &[]);
            }
        })
        .build();
    let n = node.clone();
    meter
        .u64_observable_gauge("process.memory.usage")
        .with_unit("By")
        .with_description(
            "Resident memory of the agent's own process (engine processes not included)",
        )
        .with_callback(move |o| o.observe(n.hardware.snapshot().agent_rss_bytes, &[]))
        .build();
    let n = node.clone();
    meter
        .f64_observable_gauge("system.cpu.utilization")
        .with_unit("1")
        .with_description("Share of the node's CPU time in use, all processes")
        .with_callback(move |o| o.observe(n.hardware.snapshot().cpu_usage_percent / 100.0, &[]))
        .build();
    meter
        .f64_observable_gauge("modeld.memory.pressure")
        .with_unit("%")
        .with_description(
            "Share of time tasks stalled on memory over the last 10 s (Linux PSI some avg10); \
             absent where the kernel has no PSI",
        )
        .with_callback(|o| {
            if let Some(p) = modeld_node::hardware::memory_pressure() {
                o.observe(p, &[]);
            }
        })
        .build();
}

/// Serves `/metrics` on `listener` until `shutdown`.
pub fn serve(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("metrics listener: {e}")))?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move {
                // Gauge callbacks read the node (and the disk): off the async runtime.
                let body = tokio::task::spawn_blocking(move || metrics.render())
                    .await
                    .unwrap_or_default();
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    );
    info!(%addr, "metrics listening");
    Ok(tokio::spawn(async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            warn!(error = %e, "the metrics listener failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(ago: u64, ttft: f64, tps: f64) -> Sample {
        Sample {
            at: std::time::Instant::now() - std::time::Duration::from_secs(ago),
            time_to_first_token: ttft,
            prompt_tokens_per_second: 100.0,
            generation_tokens_per_second: tps,
            generated_tokens: 10,
        }
    }

    #[test]
    fn recent_figures_are_quantiles_and_means_within_the_window() {
        let mut samples = std::collections::VecDeque::new();
        for i in 1..=20 {
            samples.push_back(sample(1, f64::from(i) / 100.0, 50.0));
        }
        // Too old to count.
        samples.push_front(sample(3600, 99.0, 1.0));
        let r = summarize(&samples, std::time::Instant::now());
        assert_eq!(r.requests, 20);
        assert!((r.time_to_first_token_p50 - 0.10).abs() < 1e-12, "{r:?}");
        assert!((r.time_to_first_token_p95 - 0.19).abs() < 1e-12, "{r:?}");
        assert!((r.generation_tokens_per_second - 50.0).abs() < 1e-12);
        assert_eq!(r.generated_tokens, 200);
        assert_eq!(
            summarize(
                &std::collections::VecDeque::new(),
                std::time::Instant::now()
            ),
            Recent::default()
        );
    }
}
