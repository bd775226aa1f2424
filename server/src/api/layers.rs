//! Tower layers for what crosses every RPC, in front of all services. Today: the
//! client's deadline, read once from the `grpc-timeout` header and handed to the
//! handlers as a request extension (tonic enforces the header only until a response
//! starts, which for a stream is at once; the handlers enforce it to the end).

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tonic::codegen::http;
use tower::{Layer, Service};

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

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

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
