//! Tower layers for what crosses every RPC, in front of all services:
//! - `RequestIdLayer`: every RPC has an id, the caller's `x-request-id` when it sent a
//!   usable one, else a new UUID; handlers see it as an extension, the caller gets it
//!   back in the response headers, and log lines carry it;
//! - `SpanLayer`: every RPC runs in a `rpc` tracing span (service, method, request id),
//!   and its answer is logged with its gRPC status and duration;
//! - `RpcLimitLayer`: at most `--max-concurrent-rpcs` RPCs in flight, streams included;
//!   one more is RESOURCE_EXHAUSTED at once;
//! - `DeadlineLayer`: the client's deadline, read once from `grpc-timeout` and handed to
//!   the handlers as an extension (tonic enforces the header only until a response
//!   starts, which for a stream is at once; the handlers enforce it to the end).

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use tonic::codegen::http;
use tower::{Layer, Service};
use tracing::Instrument as _;

/// The header a request id travels in, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// The longest caller-chosen request id kept; a longer or odd one is replaced.
pub const REQUEST_ID_MAX_LEN: usize = 128;

/// The id of one RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// A caller's id is kept when it is short printable ASCII without spaces: it ends up
/// in log lines and response headers.
fn usable_request_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= REQUEST_ID_MAX_LEN
        && value.bytes().all(|b| b.is_ascii_graphic())
}

/// Gives every RPC a [`RequestId`] and echoes it in the response headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = WithRequestId<S>;

    fn layer(&self, inner: S) -> WithRequestId<S> {
        WithRequestId { inner }
    }
}

#[derive(Debug, Clone)]
pub struct WithRequestId<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for WithRequestId<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| usable_request_id(v))
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
        request.extensions_mut().insert(RequestId(id.clone()));
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            if let Ok(value) = http::HeaderValue::from_str(&id) {
                response.headers_mut().insert(REQUEST_ID_HEADER, value);
            }
            Ok(response)
        })
    }
}

/// Runs every RPC in a `rpc` span that continues the caller's W3C trace context
/// (`traceparent` in the metadata) and lasts until the response's last frame; logs
/// its answer (at debug level; failures that are the agent's fault are logged where
/// they are mapped, in `status`), and records its duration and status code in the
/// metrics when there are any.
#[derive(Debug, Clone, Default)]
pub struct SpanLayer {
    metrics: Option<std::sync::Arc<crate::telemetry::metrics::Metrics>>,
}

impl SpanLayer {
    pub fn with_metrics(metrics: std::sync::Arc<crate::telemetry::metrics::Metrics>) -> SpanLayer {
        SpanLayer {
            metrics: Some(metrics),
        }
    }
}

impl<S> Layer<S> for SpanLayer {
    type Service = WithSpan<S>;

    fn layer(&self, inner: S) -> WithSpan<S> {
        WithSpan {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WithSpan<S> {
    inner: S,
    metrics: Option<std::sync::Arc<crate::telemetry::metrics::Metrics>>,
}

/// How an RPC's answer is recorded when it ends.
struct Answer {
    span: tracing::Span,
    started: Instant,
    metrics: Option<std::sync::Arc<crate::telemetry::metrics::Metrics>>,
    service: String,
    method: String,
    recorded: bool,
}

impl Answer {
    fn record(&mut self, code: i64) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        let elapsed = self.started.elapsed();
        if let Some(metrics) = &self.metrics {
            metrics.rpc_answered(&self.service, &self.method, code, elapsed);
        }
        self.span.record("rpc.grpc.status_code", code);
        if code != 0 {
            self.span.record("otel.status_code", "ERROR");
        }
        let _entered = self.span.enter();
        tracing::debug!(
            grpc_status = code,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "rpc answered"
        );
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        // The response ended without a status: the client went away mid-stream.
        self.record(i64::from(tonic::Code::Cancelled as i32));
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A response body that keeps its RPC's span open until its last frame and records
/// the status the trailers carry.
struct Traced {
    body: tonic::body::Body,
    answer: Answer,
}

impl http_body::Body for Traced {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        // Streams run as they are polled: their work belongs to the RPC's span.
        let span = this.answer.span.clone();
        let _entered = span.enter();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    this.answer.record(code);
                }
            }
            Poll::Ready(Some(Err(status))) => this.answer.record(status.code() as i64),
            Poll::Ready(None) => this.answer.record(0),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<S, B> Service<http::Request<B>> for WithSpan<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // gRPC paths are /package.Service/Method.
        let path = request.uri().path().trim_start_matches('/');
        let (service, method) = path.split_once('/').unwrap_or((path, ""));
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        let span = tracing::info_span!(
            "rpc",
            "otel.name" = path,
            "otel.kind" = "server",
            "otel.status_code" = tracing::field::Empty,
            "rpc.system" = "grpc",
            "rpc.service" = service,
            "rpc.method" = method,
            "rpc.grpc.status_code" = tracing::field::Empty,
            "enduser.id" = tracing::field::Empty,
            request_id,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        crate::telemetry::trace::adopt(
            &span,
            crate::telemetry::trace::caller_context(request.headers()),
        );
        let mut answer = Answer {
            span: span.clone(),
            started: Instant::now(),
            metrics: self.metrics.clone(),
            service: service.to_owned(),
            method: method.to_owned(),
            recorded: false,
        };
        let response = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        Box::pin(
            async move {
                let response = response.await?;
                // Refused before any message: the status is in the headers.
                if let Some(code) = grpc_status(response.headers()) {
                    answer.record(code);
                }
                Ok(response.map(|body| tonic::body::Body::new(Traced { body, answer })))
            }
            .instrument(span),
        )
    }
}

/// The instant a client's deadline passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

/// The deadline the client sent with `request`, if it sent one.
pub fn deadline<T>(request: &tonic::Request<T>) -> Option<Instant> {
    request.extensions().get::<Deadline>().map(|d| d.0)
}

/// `grpc-timeout`: at most eight digits and a unit (H, M, S, m, u, n), per the gRPC
/// over HTTP/2 protocol. Anything else is no deadline, as gRPC treats it.
pub fn parse_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Reads `grpc-timeout` into a [`Deadline`] extension.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = WithDeadline<S>;

    fn layer(&self, inner: S) -> WithDeadline<S> {
        WithDeadline { inner }
    }
}

#[derive(Debug, Clone)]
pub struct WithDeadline<S> {
    inner: S,
}

impl<S, B> Service<http::Request<B>> for WithDeadline<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> S::Future {
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_timeout)
            .and_then(|t| Instant::now().checked_add(t));
        if let Some(d) = deadline {
            request.extensions_mut().insert(Deadline(d));
        }
        self.inner.call(request)
    }
}

/// Caps the RPCs in flight across every connection: one over the cap is answered
/// RESOURCE_EXHAUSTED at once, never queued. A stream counts until its body ends.
/// Health checks are not counted, so probes see an overloaded agent as alive.
#[derive(Debug, Clone)]
pub struct RpcLimitLayer {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl RpcLimitLayer {
    pub fn new(limit: usize) -> RpcLimitLayer {
        RpcLimitLayer {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
        }
    }
}

impl<S> Layer<S> for RpcLimitLayer {
    type Service = WithRpcLimit<S>;

    fn layer(&self, inner: S) -> WithRpcLimit<S> {
        WithRpcLimit {
            inner,
            limit: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WithRpcLimit<S> {
    inner: S,
    limit: RpcLimitLayer,
}

/// A response body that holds its RPC's permit until it is done.
struct Permitted {
    body: tonic::body::Body,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl http_body::Body for Permitted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

impl<S, B> Service<http::Request<B>> for WithRpcLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path().starts_with("/grpc.health.") {
            return Box::pin(self.inner.call(request));
        }
        let Ok(permit) = self.limit.permits.clone().try_acquire_owned() else {
            use tonic_types::StatusExt as _;
            let status = tonic::Status::with_error_details(
                tonic::Code::ResourceExhausted,
                format!(
                    "the agent is serving its limit of {} RPCs at once; retry shortly \
                     (--max-concurrent-rpcs)",
                    self.limit.limit
                ),
                tonic_types::ErrorDetails::with_error_info(
                    "TOO_MANY_RPCS",
                    super::status::DOMAIN,
                    std::collections::HashMap::from([(
                        "limit".to_owned(),
                        self.limit.limit.to_string(),
                    )]),
                ),
            );
            let response = status.into_http::<tonic::body::Body>();
            return Box::pin(async move { Ok(response) });
        };
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| {
                tonic::body::Body::new(Permitted {
                    body,
                    _permit: permit,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn caller_request_ids_are_kept_only_when_printable_and_short() {
        assert!(usable_request_id("req-42"));
        assert!(usable_request_id(&"x".repeat(REQUEST_ID_MAX_LEN)));
        assert!(!usable_request_id(&"x".repeat(REQUEST_ID_MAX_LEN + 1)));
        assert!(!usable_request_id(""));
        assert!(!usable_request_id("two words"));
        assert!(!usable_request_id("tab\there"));
    }

    /// What the inner service saw and what the caller got back.
    async fn through_request_id(sent: Option<&'static str>) -> (String, String) {
        let service = RequestIdLayer.layer(tower::service_fn(|r: http::Request<()>| async move {
            let seen = r.extensions().get::<RequestId>().map(|i| i.0.clone());
            Ok::<_, std::convert::Infallible>(http::Response::new(seen.unwrap_or_default()))
        }));
        let mut request = http::Request::new(());
        if let Some(id) = sent {
            request
                .headers_mut()
                .insert(REQUEST_ID_HEADER, id.parse().unwrap());
        }
        let response = service.oneshot(request).await.unwrap();
        let echoed = response.headers()[REQUEST_ID_HEADER]
            .to_str()
            .unwrap()
            .to_owned();
        (response.into_body(), echoed)
    }

    #[tokio::test]
    async fn every_rpc_has_a_request_id_that_comes_back() {
        let (seen, echoed) = through_request_id(Some("req-42")).await;
        assert_eq!((seen.as_str(), echoed.as_str()), ("req-42", "req-42"));
        let (seen, echoed) = through_request_id(None).await;
        assert_eq!(seen, echoed);
        assert!(uuid::Uuid::parse_str(&seen).is_ok(), "{seen}");
        let (seen, _) = through_request_id(Some("has space")).await;
        assert!(
            uuid::Uuid::parse_str(&seen).is_ok(),
            "a bad id is replaced: {seen}"
        );
        let (other, _) = through_request_id(None).await;
        assert_ne!(seen, other, "generated ids differ");
    }

    #[tokio::test]
    async fn handlers_run_inside_the_rpc_span() {
        let _subscriber = tracing::subscriber::set_default(tracing_subscriber::registry());
        let service =
            SpanLayer::default().layer(tower::service_fn(|_: http::Request<()>| async move {
                let name = tracing::Span::current().metadata().map(|m| m.name());
                assert_eq!(name, Some("rpc"));
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
            }));
        let request = http::Request::builder()
            .uri("/modeld.v1.Node/GetCapabilities")
            .body(())
            .unwrap();
        service.oneshot(request).await.unwrap();
    }

    #[test]
    fn timeouts_parse_in_every_unit_and_nothing_else() {
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("10S"), Some(Duration::from_secs(10)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("7u"), Some(Duration::from_micros(7)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in [
            "",
            "S",
            "10",
            "10s",
            "123456789S",
            "-1S",
            "+1S",
            "1.5S",
            " 1S",
        ] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
    }

    async fn seen(headers: &[(&'static str, &str)]) -> Option<Deadline> {
        let service = DeadlineLayer.layer(tower::service_fn(|r: http::Request<()>| async move {
            Ok::<_, std::convert::Infallible>(r.extensions().get::<Deadline>().copied())
        }));
        let mut request = http::Request::new(());
        for (k, v) in headers {
            request.headers_mut().insert(*k, v.parse().unwrap());
        }
        service.oneshot(request).await.unwrap()
    }

    #[tokio::test]
    async fn the_layer_hands_the_deadline_to_the_handler() {
        let before = Instant::now();
        let d = seen(&[("grpc-timeout", "1500m")]).await.unwrap().0;
        let after = Instant::now();
        assert!(d >= before + Duration::from_millis(1500));
        assert!(d <= after + Duration::from_millis(1500));
        assert_eq!(seen(&[]).await, None);
        assert_eq!(seen(&[("grpc-timeout", "soon")]).await, None);
    }
}
