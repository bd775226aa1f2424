//! OTLP export: whether it is on, where it goes, and the resource that names the node.
//!
//! The agent follows OpenTelemetry's standard variables (`OTEL_EXPORTER_OTLP_*`,
//! `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER`/`OTEL_METRICS_EXPORTER=none`,
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_BSP_*`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_SERVICE_NAME`); its own flags and config keys win
//! over them where both exist.

use std::collections::HashMap;

use opentelemetry::KeyValue;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::PeriodicReader;
use opentelemetry_sdk::resource::{EnvResourceDetector, ResourceDetector as _};

use super::Identity;
use crate::config::{OtlpProtocol, TelemetrySettings};
use crate::error::{Error, Result};

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_is(name: &str, value: &str) -> bool {
    env(name).is_some_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// The resource every trace and metric carries: the service, the node, its device
/// class, site and labels; then the standard variables; then `--resource-attribute`.
pub fn resource(settings: &TelemetrySettings, identity: &Identity) -> Resource {
    let mut ours = vec![
        KeyValue::new("service.name", "modeld"),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", identity.node_id.clone()),
        KeyValue::new("modeld.device.class", identity.device_class),
        KeyValue::new("host.arch", std::env::consts::ARCH),
        KeyValue::new("os.type", std::env::consts::OS),
    ];
    if let Some(site) = identity.site.as_ref().filter(|s| !s.is_empty()) {
        ours.push(KeyValue::new("modeld.site", site.clone()));
    }
    for (k, v) in &identity.labels {
        ours.push(KeyValue::new(format!("modeld.label.{k}"), v.clone()));
    }
    let from_env = EnvResourceDetector::new().detect();
    let mut builder = Resource::builder_empty()
        .with_attributes(ours)
        .with_attributes(
            from_env
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        );
    if let Some(name) = env("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name(name);
    }
    builder
        .with_attributes(
            settings
                .resource_attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
        )
        .build()
}

/// Where OTLP goes, once it is known to be on.
#[derive(Debug, Clone)]
pub struct Export {
    /// `None`: the exporter reads the standard variables.
    endpoint: Option<String>,
    protocol: OtlpProtocol,
    headers: Vec<(String, String)>,
    interval: Option<std::time::Duration>,
    /// `OTEL_TRACES_EXPORTER=none` turns traces off.
    pub traces: bool,
    metrics: bool,
}

impl Export {
    /// `None` when nothing asks for export, or the standard variables turn it off.
    pub fn from_settings(settings: &TelemetrySettings) -> Result<Option<Export>> {
        if env_is("OTEL_SDK_DISABLED", "true") {
            return Ok(None);
        }
        let configured = settings.otlp_endpoint.is_some()
            || [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            ]
            .iter()
            .any(|v| env(v).is_some());
        if !configured {
            return Ok(None);
        }
        if let Some(endpoint) = &settings.otlp_endpoint {
            let parsed = url::Url::parse(endpoint)
                .map_err(|e| Error::Config(format!("--otlp-endpoint {endpoint:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(Error::Config(format!(
                    "--otlp-endpoint {endpoint:?}: use an http:// or https:// address"
                )));
            }
        }
        let protocol = match settings.otlp_protocol {
            Some(p) => p,
            None => match env("OTEL_EXPORTER_OTLP_PROTOCOL") {
                Some(p) => p
                    .trim()
                    .parse()
                    .map_err(|e| Error::Config(format!("OTEL_EXPORTER_OTLP_PROTOCOL: {e}")))?,
                None => OtlpProtocol::Grpc,
            },
        };
        Ok(Some(Export {
            endpoint: settings
                .otlp_endpoint
                .as_ref()
                .map(|e| e.trim_end_matches('/').to_owned()),
            protocol,
            headers: settings.otlp_headers.clone(),
            interval: settings.otlp_export_interval,
            traces: !env_is("OTEL_TRACES_EXPORTER", "none"),
            metrics: !env_is("OTEL_METRICS_EXPORTER", "none"),
        }))
    }

    /// Where and how, for the start-up log (no header values).
    pub fn describe(&self) -> String {
        let protocol = match self.protocol {
            OtlpProtocol::Grpc => "grpc",
            OtlpProtocol::HttpProtobuf => "http/protobuf",
        };
        let endpoint = self
            .endpoint
            .clone()
            .unwrap_or_else(|| "(OTEL_EXPORTER_OTLP_* endpoint)".to_owned());
        format!("{endpoint} over {protocol}")
    }

    /// An HTTP endpoint given as a base gets the signal's path, as the standard
    /// variable does.
    fn http_endpoint(&self, signal_path: &str) -> Option<String> {
        self.endpoint.as_ref().map(|e| format!("{e}{signal_path}"))
    }

    fn metadata(&self) -> Result<tonic::metadata::MetadataMap> {
        let mut map = tonic::metadata::MetadataMap::new();
        for (k, v) in &self.headers {
            let key = tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| Error::Config(format!("otlp header {k:?}: not a valid name")))?;
            let value = v.parse().map_err(|_| {
                Error::Config(format!("otlp header {k:?}: invalid value (not shown)"))
            })?;
            map.insert(key, value);
        }
        Ok(map)
    }

    fn http_headers(&self) -> HashMap<String, String> {
        self.headers.iter().cloned().collect()
    }

    /// A gRPC exporter builder with the endpoint and headers configured here.
    fn tonic<B: WithExportConfig + WithTonicConfig>(&self, mut b: B) -> Result<B> {
        if let Some(e) = &self.endpoint {
            b = b.with_endpoint(e.clone());
        }
        if !self.headers.is_empty() {
            b = b.with_metadata(self.metadata()?);
        }
        Ok(b)
    }

    /// An HTTP/protobuf exporter builder with the endpoint (plus `signal_path`) and
    /// headers configured here.
    fn http<B: WithExportConfig + WithHttpConfig>(&self, b: B, signal_path: &str) -> B {
        let mut b = b.with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
        if let Some(e) = self.http_endpoint(signal_path) {
            b = b.with_endpoint(e);
        }
        if !self.headers.is_empty() {
            b = b.with_headers(self.http_headers());
        }
        b
    }

    pub fn span_exporter(&self) -> Result<opentelemetry_otlp::SpanExporter> {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let built = match self.protocol {
            OtlpProtocol::Grpc => self.tonic(builder.with_tonic())?.build(),
            OtlpProtocol::HttpProtobuf => self.http(builder.with_http(), "/v1/traces").build(),
        };
        built.map_err(|e| Error::Config(format!("OTLP trace exporter: {e}")))
    }

    pub fn metric_reader(
        &self,
    ) -> Result<Option<PeriodicReader<opentelemetry_otlp::MetricExporter>>> {
        if !self.metrics {
            return Ok(None);
        }
        let builder = opentelemetry_otlp::MetricExporter::builder();
        let built = match self.protocol {
            OtlpProtocol::Grpc => self.tonic(builder.with_tonic())?.build(),
            OtlpProtocol::HttpProtobuf => self.http(builder.with_http(), "/v1/metrics").build(),
        };
        let exporter = built.map_err(|e| Error::Config(format!("OTLP metric exporter: {e}")))?;
        let mut reader = PeriodicReader::builder(exporter);
        if let Some(interval) = self.interval {
            reader = reader.with_interval(interval);
        }
        Ok(Some(reader.build()))
    }
}

/// The span exporter the trace pipeline is built with before the agent can name
/// itself: spans ended before [`Deferred::connect`] are dropped (only start-up
/// precedes it), those after go to the connected exporter.
#[derive(Debug, Clone, Default)]
pub struct Deferred {
    inner: std::sync::Arc<std::sync::OnceLock<opentelemetry_otlp::SpanExporter>>,
}

impl Deferred {
    /// Hands over the exporter, its resource already set. Only the first call counts.
    pub fn connect(&self, exporter: opentelemetry_otlp::SpanExporter) {
        let _ = self.inner.set(exporter);
    }
}

impl opentelemetry_sdk::trace::SpanExporter for Deferred {
    async fn export(
        &self,
        batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        match self.inner.get() {
            Some(exporter) => exporter.export(batch).await,
            None => Ok(()),
        }
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner
            .get()
            .map_or(Ok(()), |e| e.shutdown_with_timeout(timeout))
    }

    fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
        self.inner.get().map_or(Ok(()), |e| e.force_flush())
    }
}
