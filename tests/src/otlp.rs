//! A real OTLP receiver: the collector's trace and metrics services (generated from
//! OpenTelemetry's protos), served over gRPC on a free port, keeping what arrives.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::Span;

#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    /// The metadata each export carried, for header checks.
    headers: Vec<HashMap<String, String>>,
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Received>>);

fn headers_of<T>(request: &tonic::Request<T>) -> HashMap<String, String> {
    request
        .metadata()
        .iter()
        .filter_map(|kv| match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                Some((k.to_string(), v.to_str().ok()?.to_owned()))
            }
            tonic::metadata::KeyAndValueRef::Binary(..) => None,
        })
        .collect()
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        r.headers.push(headers_of(&request));
        r.traces.push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let mut r = self.0.lock().unwrap_or_else(|p| p.into_inner());
        r.headers.push(headers_of(&request));
        r.metrics.push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The receiver; it stops when dropped.
pub struct Receiver {
    pub addr: SocketAddr,
    sink: Sink,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A span as received, with its attributes flattened to strings.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: HashMap<String, String>,
    /// The resource's attributes.
    pub resource: HashMap<String, String>,
}

fn value_string(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

pub fn attributes(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_string(kv.value.as_ref())))
        .collect()
}

fn span_of(span: &Span, resource: &HashMap<String, String>) -> ReceivedSpan {
    ReceivedSpan {
        name: span.name.clone(),
        trace_id: hex::encode(&span.trace_id),
        span_id: hex::encode(&span.span_id),
        parent_span_id: hex::encode(&span.parent_span_id),
        start_unix_nano: span.start_time_unix_nano,
        end_unix_nano: span.end_time_unix_nano,
        attributes: attributes(&span.attributes),
        resource: resource.clone(),
    }
}

/// One data point of a metric: its attributes and value (a sum's or gauge's number,
/// a histogram's count and sum).
#[derive(Debug, Clone)]
pub struct Point {
    pub attributes: HashMap<String, String>,
    pub value: f64,
    pub count: u64,
    pub unit: String,
    pub resource: HashMap<String, String>,
}

fn number(v: Option<&number_data_point::Value>) -> f64 {
    match v {
        Some(number_data_point::Value::AsDouble(d)) => *d,
        #[allow(clippy::cast_precision_loss)]
        Some(number_data_point::Value::AsInt(i)) => *i as f64,
        None => f64::NAN,
    }
}

fn points_of(m: &Metric, resource: &HashMap<String, String>) -> Vec<Point> {
    let point = |attrs: &[KeyValue], value: f64, count: u64| Point {
        attributes: attributes(attrs),
        value,
        count,
        unit: m.unit.clone(),
        resource: resource.clone(),
    };
    match &m.data {
        Some(metric::Data::Sum(s)) => s
            .data_points
            .iter()
            .map(|p| point(&p.attributes, number(p.value.as_ref()), 0))
            .collect(),
        Some(metric::Data::Gauge(g)) => g
            .data_points
            .iter()
            .map(|p| point(&p.attributes, number(p.value.as_ref()), 0))
            .collect(),
        Some(metric::Data::Histogram(h)) => h
            .data_points
            .iter()
            .map(|p| point(&p.attributes, p.sum.unwrap_or(f64::NAN), p.count))
            .collect(),
        _ => Vec::new(),
    }
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Sink::default();
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .add_service(MetricsServiceServer::new(sink.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
        let task = tokio::spawn(async move {
            let _ = server.await;
        });
        Receiver { addr, sink, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        f(&self.sink.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.with(|r| {
            let mut out = Vec::new();
            for request in &r.traces {
                for rs in &request.resource_spans {
                    let resource = rs
                        .resource
                        .as_ref()
                        .map(|r| attributes(&r.attributes))
                        .unwrap_or_default();
                    for ss in &rs.scope_spans {
                        out.extend(ss.spans.iter().map(|s| span_of(s, &resource)));
                    }
                }
            }
            out
        })
    }

    /// The points of metric `name` in the newest export that has it (cumulative
    /// temporality: the newest holds the totals).
    pub fn metric(&self, name: &str) -> Vec<Point> {
        self.with(|r| {
            for request in r.metrics.iter().rev() {
                let mut points = Vec::new();
                for rm in &request.resource_metrics {
                    let resource = rm
                        .resource
                        .as_ref()
                        .map(|r| attributes(&r.attributes))
                        .unwrap_or_default();
                    for sm in &rm.scope_metrics {
                        for m in sm.metrics.iter().filter(|m| m.name == name) {
                            points.extend(points_of(m, &resource));
                        }
                    }
                }
                if !points.is_empty() {
                    return points;
                }
            }
            Vec::new()
        })
    }

    /// The metadata of every export received.
    pub fn headers(&self) -> Vec<HashMap<String, String>> {
        self.with(|r| r.headers.clone())
    }

    /// Waits until `check` finds what it wants in the receiver, or panics after
    /// `timeout` with what it last saw.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Receiver) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            if Instant::now() > deadline {
                let names: Vec<String> = self.spans().into_iter().map(|s| s.name).collect();
                panic!("OTLP receiver: no {what} within {timeout:?}; spans seen: {names:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
