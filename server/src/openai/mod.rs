//! The OpenAI-compatible HTTP API (`--openai-listen`): `/v1/models`,
//! `/v1/completions` and `/v1/chat/completions`, streamed as server-sent events or
//! answered whole.
//!
//! Each request is translated into a call of the agent's own gRPC services, made
//! in-process through the same tower stack the gRPC listener serves (request ids,
//! spans and RPC metrics, the concurrency limit, audit, and authentication with the
//! same tokens and roles). So a completion is a `modeld.v1.Generate/Generate` with
//! every limit and error of one; this module adds only the translation.
//!
//! A model that is registered but not loaded is loaded on demand when the caller may
//! load models (operator or admin); an inference-only caller is told to have it loaded.

mod error;
mod wire;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::codegen::http;
use tower::BoxError;
use tower::util::BoxCloneSyncService;
use tracing::{info, warn};

use modeld_proto::v1 as pb;
use modeld_proto::v1::generate_client::GenerateClient;
use modeld_proto::v1::lifecycle_client::LifecycleClient;
use modeld_proto::v1::model_registry_client::ModelRegistryClient;

use crate::api::auth::VerifiedCertificate;
use crate::error::{Error, Result};
use error::OpenAiError;
use wire::Translated;

/// The agent's gRPC services behind their tower stack, callable without a transport.
/// (Its error is `Infallible`, as the stack's is: a boxed error type here trips a
/// higher-ranked lifetime check when a handler's future is proven `Send`.)
pub type InProcess = BoxCloneSyncService<
    http::Request<tonic::body::Body>,
    http::Response<tonic::body::Body>,
    Infallible,
>;

/// Wraps the served stack (`layers` applied to the routes) for in-process calls.
pub fn in_process<S, B>(service: S) -> InProcess
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    use tower::ServiceExt as _;
    BoxCloneSyncService::new(service.map_response(|r| r.map(tonic::body::Body::new)))
}

/// Request bodies above this are refused (413) before they are parsed.
pub const MAX_BODY_BYTES: usize = modeld_proto::MAX_MESSAGE_BYTES;

#[derive(Clone)]
struct Gateway {
    grpc: InProcess,
}

/// Who is calling, as the gRPC services will see them.
#[derive(Debug, Clone)]
struct Caller {
    headers: HeaderMap,
    certificate: Option<String>,
}

/// The peer of one HTTP connection: its address, and the identity of the client
/// certificate the TLS layer verified, if any.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub certificate: Option<String>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Plain>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Plain>) -> Peer {
        stream.remote_addr().clone()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Secure>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, Secure>) -> Peer {
        stream.remote_addr().clone()
    }
}

impl Caller {
    fn new(headers: HeaderMap, peer: &Peer) -> Caller {
        Caller {
            headers,
            certificate: peer.certificate.clone(),
        }
    }

    /// `message` as a gRPC request carrying the caller's credentials and trace.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for name in ["authorization", "traceparent", "tracestate", "x-request-id"] {
            if let Some(value) = self.headers.get(name)
                && let Ok(value) = value.to_str()
                && let Ok(value) = value.parse()
            {
                request.metadata_mut().insert(name, value);
            }
        }
        if let Some(identity) = &self.certificate {
            request
                .extensions_mut()
                .insert(VerifiedCertificate(identity.clone()));
        }
        request
    }
}

const ORIGIN: &str = "http://modeld.in-process";

impl Gateway {
    fn origin() -> http::Uri {
        http::Uri::from_static(ORIGIN)
    }

    fn generate(&self) -> GenerateClient<InProcess> {
        GenerateClient::with_origin(self.grpc.clone(), Self::origin())
            .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES)
    }

    fn lifecycle(&self) -> LifecycleClient<InProcess> {
        LifecycleClient::with_origin(self.grpc.clone(), Self::origin())
    }

    fn registry(&self) -> ModelRegistryClient<InProcess> {
        ModelRegistryClient::with_origin(self.grpc.clone(), Self::origin())
            .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES)
    }

    /// Starts a generation; a model that is not loaded is loaded first when the
    /// caller may load models.
    async fn start(
        &self,
        caller: &Caller,
        request: pb::GenerateRequest,
    ) -> std::result::Result<tonic::Streaming<pb::GenerateResponse>, OpenAiError> {
        match self
            .generate()
            .generate(caller.request(request.clone()))
            .await
        {
            Ok(stream) => return Ok(stream.into_inner()),
            Err(status) if reason(&status).as_deref() == Some("MODEL_NOT_READY") => {}
            Err(status) if names_model_id(&status) => {
                return Err(self.unknown_model(caller, &request.model_id, status).await);
            }
            Err(status) => return Err(status.into()),
        }
        self.load(caller, &request.model_id).await?;
        let stream = self.generate().generate(caller.request(request)).await?;
        Ok(stream.into_inner())
    }

    /// Generate calls an unregistered model a bad `model_id`; OpenAI's clients expect
    /// 404 `model_not_found`. The registry says which it is.
    async fn unknown_model(
        &self,
        caller: &Caller,
        model_id: &str,
        status: tonic::Status,
    ) -> OpenAiError {
        let lookup = pb::GetModelRequest {
            id: model_id.to_owned(),
        };
        match self.registry().get_model(caller.request(lookup)).await {
            Err(missing) if missing.code() == tonic::Code::NotFound => {
                let mut e = OpenAiError::from(status);
                e.status = StatusCode::NOT_FOUND;
                e.code = Some("model_not_found".into());
                e.message = format!(
                    "the model {model_id:?} does not exist on this node; GET /v1/models lists \
                     the ones that do"
                );
                e
            }
            _ => status.into(),
        }
    }

    async fn load(&self, caller: &Caller, model_id: &str) -> std::result::Result<(), OpenAiError> {
        info!(model = model_id, "openai: loading a model on demand");
        let load = pb::LoadRequest {
            model_id: model_id.to_owned(),
            options: None,
        };
        let mut progress = match self.lifecycle().load(caller.request(load)).await {
            Ok(stream) => stream.into_inner(),
            Err(status) if status.code() == tonic::Code::PermissionDenied => {
                let mut e = OpenAiError::from(status);
                e.status = StatusCode::BAD_REQUEST;
                e.message = format!(
                    "the model {model_id:?} is not loaded, and loading it needs the operator \
                     role: have an operator run `modelctl load {model_id}` ({})",
                    e.message
                );
                e.code = Some("model_not_loaded".into());
                return Err(e);
            }
            Err(status) => return Err(status.into()),
        };
        while let Some(update) = progress.next().await {
            update?;
        }
        Ok(())
    }
}

fn reason(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    Some(status.get_error_details().error_info()?.reason.clone())
}

/// A refusal that blames the request's `model_id`.
fn names_model_id(status: &tonic::Status) -> bool {
    use tonic_types::StatusExt as _;
    status.code() == tonic::Code::InvalidArgument
        && status
            .get_error_details()
            .bad_request()
            .and_then(|b| b.field_violations.first())
            .is_some_and(|v| v.field == "model_id")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
}

fn json(value: &serde_json::Value) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> std::result::Result<T, OpenAiError> {
    serde_json::from_slice(body)
        .map_err(|e| OpenAiError::invalid("", format!("the request body is not valid: {e}")))
}

async fn list_models(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
) -> std::result::Result<Response, OpenAiError> {
    let caller = Caller::new(headers, &peer);
    let mut data = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = gateway
            .registry()
            .list_models(caller.request(pb::ListModelsRequest {
                page_size: 1000,
                page_token,
                ..Default::default()
            }))
            .await?
            .into_inner();
        data.extend(page.models.iter().map(wire::ModelObject::of));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(json(&serde_json::json!({"object": "list", "data": data})))
}

async fn get_model(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> std::result::Result<Response, OpenAiError> {
    let caller = Caller::new(headers, &peer);
    let model = gateway
        .registry()
        .get_model(caller.request(pb::GetModelRequest { id }))
        .await?
        .into_inner()
        .model
        .unwrap_or_default();
    Ok(json(&serde_json::json!(wire::ModelObject::of(&model))))
}

async fn completions(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> std::result::Result<Response, OpenAiError> {
    let request: wire::CompletionRequest = parse(&body)?;
    let translated = request.translate()?;
    let caller = Caller::new(headers, &peer);
    respond(gateway, caller, translated, Shape::Completion).await
}

async fn chat_completions(
    State(gateway): State<Gateway>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> std::result::Result<Response, OpenAiError> {
    let request: wire::ChatRequest = parse(&body)?;
    let translated = request.translate()?;
    let caller = Caller::new(headers, &peer);
    respond(gateway, caller, translated, Shape::Chat).await
}

/// Which endpoint's objects to answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    Completion,
    Chat,
}

impl Shape {
    fn id(self) -> String {
        let prefix = match self {
            Shape::Completion => "cmpl",
            Shape::Chat => "chatcmpl",
        };
        format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
    }
}

/// What every object of one response repeats.
#[derive(Debug, Clone)]
struct Header {
    id: String,
    created: i64,
    model: String,
    shape: Shape,
}

impl Header {
    fn object(&self, streamed: bool) -> &'static str {
        match (self.shape, streamed) {
            (Shape::Completion, _) => "text_completion",
            (Shape::Chat, false) => "chat.completion",
            (Shape::Chat, true) => "chat.completion.chunk",
        }
    }

    /// One streamed chunk: a piece of text, or the end with its finish reason.
    fn chunk(
        &self,
        text: Option<&str>,
        logprob: Option<wire::TokenLogprob>,
        finish: Option<&str>,
        include_usage: bool,
    ) -> serde_json::Value {
        let choice = match self.shape {
            Shape::Completion => serde_json::json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
            Shape::Chat => serde_json::json!({
                "index": 0,
                "delta": match text { Some(t) => serde_json::json!({"content": t}), None => serde_json::json!({}) },
                "logprobs": logprob.map(|l| serde_json::json!({"content": [l]})),
                "finish_reason": finish,
            }),
        };
        let mut chunk = serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        // With include_usage every chunk says `usage: null` but the last, by OpenAI's
        // contract.
        if include_usage {
            chunk["usage"] = serde_json::Value::Null;
        }
        chunk
    }

    /// The chat stream's first chunk names the speaker.
    fn role_chunk(&self, include_usage: bool) -> serde_json::Value {
        let mut chunk = self.chunk(None, None, None, include_usage);
        chunk["choices"][0]["delta"] = serde_json::json!({"role": "assistant", "content": ""});
        chunk
    }

    fn usage_chunk(&self, usage: wire::Usage) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage,
        })
    }
}

/// The summary's error as an OpenAI error (a generation that failed after it began).
fn summary_error(summary: &pb::GenerateSummary) -> OpenAiError {
    let code = tonic::Code::from(summary.error_code);
    let mut e = OpenAiError::from(tonic::Status::new(code, summary.error.clone()));
    if !summary.error_reason.is_empty() {
        e.code = Some(summary.error_reason.to_lowercase());
    }
    e
}

async fn respond(
    gateway: Gateway,
    caller: Caller,
    t: Translated,
    shape: Shape,
) -> std::result::Result<Response, OpenAiError> {
    let header = Header {
        id: shape.id(),
        created: now(),
        model: t.request.model_id.clone(),
        shape,
    };
    let stream = gateway.start(&caller, t.request).await?;
    if t.stream {
        return Ok(streamed(header, stream, t.include_usage, t.logprobs).into_response());
    }
    whole(header, stream, t.logprobs).await
}

/// A non-streamed answer: the generation collected into one object.
async fn whole(
    header: Header,
    mut stream: tonic::Streaming<pb::GenerateResponse>,
    logprobs: bool,
) -> std::result::Result<Response, OpenAiError> {
    let mut text = String::new();
    let mut tokens = Vec::new();
    let mut summary = None;
    while let Some(message) = stream.next().await {
        match message?.event {
            Some(pb::generate_response::Event::Token(token)) => {
                text.push_str(&token.text);
                if logprobs {
                    tokens.extend(wire::TokenLogprob::of(&token));
                }
            }
            Some(pb::generate_response::Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    let summary = summary.unwrap_or_default();
    if summary.finish_reason() == pb::FinishReason::Error {
        return Err(summary_error(&summary));
    }
    let finish = wire::finish_reason(summary.finish_reason());
    let choice = match header.shape {
        Shape::Completion => serde_json::json!({
            "index": 0, "text": text, "logprobs": null, "finish_reason": finish,
        }),
        Shape::Chat => serde_json::json!({
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": if logprobs { serde_json::json!({"content": tokens}) } else { serde_json::Value::Null },
            "finish_reason": finish,
        }),
    };
    Ok(json(&serde_json::json!({
        "id": header.id,
        "object": header.object(false),
        "created": header.created,
        "model": header.model,
        "choices": [choice],
        "usage": wire::Usage::from(summary.usage),
    })))
}

/// A streamed answer as server-sent events, ending with `data: [DONE]`. A failure
/// after the stream began is sent as an `{"error": ...}` event, as OpenAI does.
/// A client that disconnects drops the stream, which cancels the generation.
fn streamed(
    header: Header,
    stream: tonic::Streaming<pb::GenerateResponse>,
    include_usage: bool,
    logprobs: bool,
) -> Sse<impl Stream<Item = std::result::Result<Event, Infallible>>> {
    let data = |v: serde_json::Value| Event::default().data(v.to_string());
    let first = (header.shape == Shape::Chat).then(|| data(header.role_chunk(include_usage)));
    let body = futures::stream::unfold(Some(stream), move |state| {
        let header = header.clone();
        async move {
            let mut stream = state?;
            let events: Vec<Event> = match stream.next().await {
                Some(Ok(message)) => match message.event {
                    Some(pb::generate_response::Event::Token(token)) => {
                        let logprob = logprobs.then(|| wire::TokenLogprob::of(&token)).flatten();
                        vec![data(header.chunk(
                            Some(&token.text),
                            logprob,
                            None,
                            include_usage,
                        ))]
                    }
                    Some(pb::generate_response::Event::Summary(s)) => {
                        if s.finish_reason() == pb::FinishReason::Error {
                            return Some((
                                vec![Event::default().data(summary_error(&s).body())],
                                None,
                            ));
                        }
                        let finish = wire::finish_reason(s.finish_reason());
                        let mut end =
                            vec![data(header.chunk(None, None, Some(finish), include_usage))];
                        if include_usage {
                            end.push(data(header.usage_chunk(wire::Usage::from(s.usage))));
                        }
                        end.push(Event::default().data("[DONE]"));
                        return Some((end, None));
                    }
                    None => Vec::new(),
                },
                Some(Err(status)) => {
                    return Some((
                        vec![Event::default().data(OpenAiError::from(status).body())],
                        None,
                    ));
                }
                None => return Some((vec![Event::default().data("[DONE]")], None)),
            };
            Some((events, Some(stream)))
        }
    })
    .flat_map(futures::stream::iter);
    let all = futures::stream::iter(first).chain(body).map(Ok);
    Sse::new(all).keep_alive(KeepAlive::default())
}

async fn not_found() -> OpenAiError {
    OpenAiError::not_found(
        "no such endpoint: modeld serves GET /v1/models, POST /v1/completions and POST \
         /v1/chat/completions",
    )
}

fn router(gateway: Gateway) -> Router {
    Router::new()
        .route("/v1/models", get(list_models))
        .route("/v1/models/{id}", get(get_model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(gateway)
}

/// Plain TCP connections.
struct Plain(TcpListener);

impl axum::serve::Listener for Plain {
    type Io = TcpStream;
    type Addr = Peer;

    async fn accept(&mut self) -> (TcpStream, Peer) {
        loop {
            match self.0.accept().await {
                Ok((tcp, addr)) => {
                    let _ = tcp.set_nodelay(true);
                    return (
                        tcp,
                        Peer {
                            addr,
                            certificate: None,
                        },
                    );
                }
                Err(e) => {
                    warn!(error = %e, "openai: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.0.local_addr()?,
            certificate: None,
        })
    }
}

/// TLS connections, handshaken by the agent's TLS acceptor.
struct Secure {
    incoming: tokio_stream::wrappers::ReceiverStream<
        std::io::Result<tokio_rustls::server::TlsStream<TcpStream>>,
    >,
    addr: SocketAddr,
}

impl axum::serve::Listener for Secure {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = Peer;

    async fn accept(&mut self) -> (Self::Io, Peer) {
        loop {
            match self.incoming.next().await {
                Some(Ok(tls)) => {
                    let (tcp, session) = tls.get_ref();
                    let peer = Peer {
                        addr: tcp.peer_addr().unwrap_or(self.addr),
                        certificate: session
                            .peer_certificates()
                            .and_then(|chain| chain.first())
                            .and_then(|leaf| crate::tls::certificate_identity(leaf)),
                    };
                    return (tls, peer);
                }
                Some(Err(e)) => warn!(error = %e, "openai: accept failed"),
                // The acceptor stopped: nothing will come any more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Peer> {
        Ok(Peer {
            addr: self.addr,
            certificate: None,
        })
    }
}

/// Serves the API on `listener` (over TLS when `tls` is given) until shutdown.
pub fn serve(
    grpc: InProcess,
    listener: TcpListener,
    tls: Option<crate::tls::Tls>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("openai listener: {e}")))?;
    let app = router(Gateway { grpc }).into_make_service_with_connect_info::<Peer>();
    info!(%addr, tls = tls.is_some(), "OpenAI-compatible API listening");
    Ok(tokio::spawn(async move {
        let stopped = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        let served = match tls {
            Some(tls) => {
                let secure = Secure {
                    incoming: tls.incoming(listener),
                    addr,
                };
                axum::serve(secure, app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
            None => {
                axum::serve(Plain(listener), app)
                    .with_graceful_shutdown(stopped)
                    .await
            }
        };
        if let Err(e) = served {
            warn!(error = %e, "the OpenAI-compatible listener failed");
        }
    }))
}
