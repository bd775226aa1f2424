//! The audit log: every state-changing call (the table in `auth::changes_state`) with
//! who made it, when, from where and how it ended, written to the store and read back
//! by `Node.ListAudit` (`modelctl audit`). Refused calls are recorded too. A stream's
//! outcome is its trailers, so the entry is written when the response body ends.

use std::task::{Context, Poll};

use futures::future::BoxFuture;
use modeld_node::store::{AuditRecord, Store};
use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic_types::StatusExt as _;
use tower::{Layer, Service};

use super::auth::Identity;
use super::layers::RequestId;

/// Records state-changing calls in `store`.
#[derive(Debug, Clone)]
pub struct AuditLayer {
    store: Store,
}

impl AuditLayer {
    pub fn new(store: Store) -> AuditLayer {
        AuditLayer { store }
    }
}

impl<S> Layer<S> for AuditLayer {
    type Service = WithAudit<S>;

    fn layer(&self, inner: S) -> WithAudit<S> {
        WithAudit {
            inner,
            store: self.store.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct WithAudit<S> {
    inner: S,
    store: Store,
}

/// The entry being written, and where it goes.
struct Pending {
    store: Store,
    record: AuditRecord,
}

impl Pending {
    fn finish(mut self, status: Option<tonic::Status>) {
        if let Some(status) = status {
            self.record.code = status.code() as i32;
            if let Some(info) = status.get_error_details().error_info() {
                self.record.reason = info.reason.clone();
                if self.record.identity.is_empty()
                    && let Some(who) = info.metadata.get("identity")
                {
                    self.record.identity.clone_from(who);
                }
            }
        }
        if let Err(e) = self.store.append_audit(&self.record) {
            tracing::error!(error = %e, method = self.record.method, "audit entry not written");
            return;
        }
        // Readable at once; on disk shortly after, off the async threads, so a kill -9
        // right after the call keeps it too.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            runtime.spawn_blocking(move || {
                if let Err(e) = store.flush_blocking() {
                    tracing::error!(error = %e, "audit log not flushed");
                }
            });
        }
    }
}

/// A response body that writes its call's audit entry when it ends.
struct Audited {
    body: tonic::body::Body,
    pending: Option<Pending>,
}

impl http_body::Body for Audited {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(pending) = self.pending.take()
                {
                    pending.finish(tonic::Status::from_header_map(trailers));
                }
            }
            Poll::Ready(None) => {
                if let Some(pending) = self.pending.take() {
                    pending.finish(None);
                }
            }
            Poll::Ready(Some(Err(status))) => {
                if let Some(pending) = self.pending.take() {
                    pending.finish(Some(status.clone()));
                }
            }
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

impl Drop for Audited {
    fn drop(&mut self) {
        // The client went away before the end: recorded as cancelled.
        if let Some(pending) = self.pending.take() {
            pending.finish(Some(tonic::Status::cancelled("the client left")));
        }
    }
}

fn peer<B>(request: &http::Request<B>) -> String {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
        .map(|a| a.to_string())
        .unwrap_or_default()
}

impl<S, B> Service<http::Request<B>> for WithAudit<S>
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
        let method = request.uri().path().to_owned();
        if !super::auth::changes_state(&method) {
            return Box::pin(self.inner.call(request));
        }
        let record = AuditRecord {
            time_unix_ms: modeld_node::store::unix_ms(std::time::SystemTime::now()),
            method,
            request_id: request
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default(),
            peer: peer(&request),
            ..AuditRecord::default()
        };
        let store = self.store.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let mut record = record;
            if let Some(who) = response.extensions().get::<Identity>() {
                record.identity.clone_from(&who.name);
                record.role = who.role.as_str().to_owned();
            }
            let pending = Pending { store, record };
            // A refusal or a unary error comes as headers alone.
            if let Some(status) = tonic::Status::from_header_map(response.headers()) {
                pending.finish(Some(status));
                return Ok(response);
            }
            Ok(response.map(|body| {
                tonic::body::Body::new(Audited {
                    body,
                    pending: Some(pending),
                })
            }))
        })
    }
}
