//! Metrics through the OpenTelemetry SDK, read in the Prometheus text format at
//! `/metrics` on `--metrics-listen`. Names follow OpenTelemetry's semantic conventions
//! where they exist (`gen_ai.server.*`) and are `modeld.*` otherwise.
//!
//! Request metrics are recorded where a request ends (the Generate stream); the node's
//! state (loaded models, memory, disk) is read when a scrape asks, so nothing polls.

use std::net::SocketAddr;
use std::sync::Arc;

use modeld_engine_core::{FinishReason, GenerateStats};
use modeld_node::Node;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::error::{Error, Result};

/// Time-to-first-token and per-token buckets, in seconds: from a fast desktop's few
/// milliseconds to a phone's seconds.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The instruments the services record into.
pub struct Metrics {
    /// Kept for the observable instruments' callbacks, which live as long as it.
    _provider: SdkMeterProvider,
    registry: prometheus::Registry,
    requests: Counter<u64>,
    tokens: Counter<u64>,
    time_to_first_token: Histogram<f64>,
    time_per_output_token: Histogram<f64>,
    rpc_duration: Histogram<f64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

impl Metrics {
    /// Builds the instruments and the gauges that read `node` at each scrape.
    pub fn new(node: &Arc<Node>) -> Result<Metrics> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| Error::Config(format!("metrics: {e}")))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name("modeld")
            .with_attributes([
                KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
                KeyValue::new("service.instance.id", node.store.node_id().to_owned()),
            ])
            .build();
        let provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(exporter)
            .build();
        let meter = provider.meter("modeld");
        observe_node(&meter, node);
        Ok(Metrics {
            requests: meter
                .u64_counter("modeld.generate.requests")
                .with_description("Generate requests that ended, by model and finish reason")
                .build(),
            tokens: meter
                .u64_counter("modeld.generate.tokens")
                .with_description(
                    "Tokens by model and gen_ai.token.type (input: prompt, output: generated)",
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
                .with_description("Time to answer an RPC; for a stream, until its response headers")
                .with_boundaries(LATENCY_BUCKETS.to_vec())
                .build(),
            _provider: provider,
            registry,
        })
    }

    /// Records a Generate request that ended.
    pub fn generate_done(&self, model: &str, reason: FinishReason, stats: &GenerateStats) {
        let model_attr = KeyValue::new("gen_ai.request.model", model.to_owned());
        self.requests.add(
            1,
            &[
                model_attr.clone(),
                KeyValue::new("gen_ai.response.finish_reason", finish_reason(reason)),
            ],
        );
        let typed =
            |kind: &'static str| [model_attr.clone(), KeyValue::new("gen_ai.token.type", kind)];
        self.tokens
            .add(u64::from(stats.prompt_tokens), &typed("input"));
        self.tokens
            .add(u64::from(stats.generated_tokens), &typed("output"));
        if stats.generated_tokens > 0 {
            let attrs = [model_attr];
            self.time_to_first_token
                .record(stats.time_to_first_token_seconds, &attrs);
            if stats.generation_tokens_per_second > 0.0 {
                self.time_per_output_token
                    .record(1.0 / stats.generation_tokens_per_second, &attrs);
            }
        }
    }

    /// Records an RPC's answer. `code` is the gRPC status when the answer carries it
    /// in its headers (an RPC refused before any message), else 0.
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
    pub fn generate_failed(&self, model: &str) {
        self.requests.add(
            1,
            &[
                KeyValue::new("gen_ai.request.model", model.to_owned()),
                KeyValue::new("gen_ai.response.finish_reason", "error"),
            ],
        );
    }

    /// The Prometheus text exposition of everything recorded.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            warn!(error = %e, "metrics could not be encoded");
        }
        out
    }
}

/// Gauges read from the node when a scrape asks.
fn observe_node(meter: &Meter, node: &Arc<Node>) {
    let n = node.clone();
    meter
        .u64_observable_gauge("modeld.models.loaded")
        .with_description("Models in memory")
        .with_callback(move |o| o.observe(n.inference.loaded().len() as u64, &[]))
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
        .u64_observable_gauge("modeld.memory.models")
        .with_unit("By")
        .with_description("Memory the loaded models use, by model")
        .with_callback(move |o| {
            for r in n.inference.resident() {
                o.observe(
                    r.bytes,
                    &[KeyValue::new("gen_ai.request.model", r.model_id)],
                );
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
