//! What the agent tells its operator: logs through `tracing` to stderr (text or
//! JSON); traces and metrics through OpenTelemetry, exported over OTLP when a
//! collector is configured ([`otlp`]), metrics also in the Prometheus text format on
//! `--metrics-listen` ([`metrics`]); trace context taken from callers ([`trace`]).
//!
//! The subscriber is installed first thing, before the agent knows who it is (its
//! node id is in the store). When traces are exported, the OpenTelemetry layer is in
//! it from the start, with an exporter that is connected, and given the resource that
//! names the node, once the agent knows it ([`otlp::Deferred`]). Without export there
//! is no such layer and spans cost what a log filter costs.

pub mod metrics;
pub mod otlp;
pub mod trace;

use std::io::IsTerminal;
use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing::level_filters::LevelFilter;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry};

use crate::config::{LogFormat, TelemetrySettings};
use crate::error::{Error, Result};

type OtelLayer = tracing_opentelemetry::OpenTelemetryLayer<Registry, SdkTracer>;

/// The trace pipeline `init` set up, waiting for `Telemetry::start` to connect it.
struct Traces {
    provider: SdkTracerProvider,
    exporter: otlp::Deferred,
    export: otlp::Export,
}

static TRACES: OnceLock<Traces> = OnceLock::new();

/// Installs the global subscriber: logs per `filter` and `format`, and, when
/// `telemetry` exports traces, the OpenTelemetry layer. Fails on an invalid filter
/// rather than silently logging nothing.
pub fn init(filter: &str, format: LogFormat, telemetry: Option<&TelemetrySettings>) -> Result<()> {
    let filter = EnvFilter::try_new(filter)
        .map_err(|e| Error::Config(format!("log filter {filter:?}: {e}")))?;
    let mut traces = None;
    if let Some(settings) = telemetry
        && let Some(export) = otlp::Export::from_settings(settings)?
        && export.traces
    {
        let exporter = otlp::Deferred::default();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter.clone())
            .build();
        traces = Some(Traces {
            provider,
            exporter,
            export,
        });
    }
    let otel: Option<OtelLayer> = traces.as_ref().map(|t| {
        tracing_opentelemetry::layer()
            .with_tracer(t.provider.tracer("modeld"))
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_location(false)
    });
    // Traces carry the agent's own spans at info and above, whatever the log filter
    // says: a quieter log must not blind the trace.
    let traced = Targets::new()
        .with_target("modeld", LevelFilter::INFO)
        .with_target("modeld_node", LevelFilter::INFO)
        .with_target("modeld_engine_process", LevelFilter::INFO);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let fmt = match format {
        LogFormat::Text => fmt
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(otel.with_filter(traced))
        .with(fmt)
        .try_init()
        .map_err(|e| Error::Config(format!("logging already initialized: {e}")))?;
    if let Some(t) = traces {
        let _ = TRACES.set(t);
    }
    Ok(())
}

/// Who the agent is, for the resource every trace and metric carries.
#[derive(Debug, Clone)]
pub struct Identity {
    pub node_id: String,
    pub device_class: &'static str,
    pub site: Option<String>,
    pub labels: std::collections::BTreeMap<String, String>,
}

/// The OpenTelemetry providers the agent runs. Shut down to flush what is buffered.
pub struct Telemetry {
    pub meters: SdkMeterProvider,
    tracers: Option<SdkTracerProvider>,
    /// What `/metrics` renders, when it is served.
    pub prometheus: Option<prometheus::Registry>,
    /// Where OTLP goes, for the start-up log.
    pub exporting_to: Option<String>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry")
            .field("exporting_to", &self.exporting_to)
            .field("tracing", &self.tracers.is_some())
            .field("prometheus", &self.prometheus.is_some())
            .finish()
    }
}

impl Telemetry {
    /// Builds the providers, installs them globally (the node's modules record through
    /// the global meter), and slots the trace layer in when traces are exported.
    /// Blocking: the HTTP exporter builds a blocking client; call it where that is
    /// allowed, inside the async runtime's context (the gRPC exporter's channel lives
    /// there).
    pub fn start(
        settings: &TelemetrySettings,
        identity: &Identity,
        prometheus: bool,
    ) -> Result<Telemetry> {
        // Callers' trace context is read whether or not the agent exports: log lines
        // carry the caller's trace id either way.
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        let resource = otlp::resource(settings, identity);
        let export = otlp::Export::from_settings(settings)?;
        let mut meters = SdkMeterProvider::builder().with_resource(resource.clone());
        let registry = if prometheus {
            let registry = prometheus::Registry::new();
            let exporter = opentelemetry_prometheus::exporter()
                .with_registry(registry.clone())
                .build()
                .map_err(|e| Error::Config(format!("metrics: {e}")))?;
            meters = meters.with_reader(exporter);
            Some(registry)
        } else {
            None
        };
        if let Some(export) = &export
            && let Some(reader) = export.metric_reader()?
        {
            meters = meters.with_reader(reader);
        }
        let mut tracers = None;
        if let Some(traces) = TRACES.get() {
            let mut exporter = traces.export.span_exporter()?;
            opentelemetry_sdk::trace::SpanExporter::set_resource(&mut exporter, &resource);
            traces.exporter.connect(exporter);
            opentelemetry::global::set_tracer_provider(traces.provider.clone());
            trace::exporting(true);
            tracers = Some(traces.provider.clone());
        }
        let meters = meters.build();
        opentelemetry::global::set_meter_provider(meters.clone());
        Ok(Telemetry {
            meters,
            tracers,
            prometheus: registry,
            exporting_to: export.map(|e| e.describe()),
        })
    }

    /// Exports what is buffered and stops the exporters. Blocking.
    pub fn shutdown(&self) {
        trace::exporting(false);
        if let Some(tracers) = &self.tracers
            && let Err(e) = tracers.shutdown()
        {
            tracing::warn!(error = %e, "traces could not be flushed");
        }
        if let Err(e) = self.meters.shutdown() {
            tracing::warn!(error = %e, "metrics could not be flushed");
        }
    }
}
