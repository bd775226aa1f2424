//! A typed client for modeld agents.
//!
//! ```no_run
//! # async fn demo() -> Result<(), modelctl::ClientError> {
//! let client = modelctl::Client::connect("http://127.0.0.1:7700").await?;
//! let caps = client.capabilities().await?;
//! println!("{} has {} cores", caps.hostname, caps.cpu.map(|c| c.logical_cores).unwrap_or(0));
//! # Ok(()) }
//! ```

use std::time::Duration;

use modeld_proto::v1 as pb;
use modeld_proto::v1::generate_client::GenerateClient;
use modeld_proto::v1::lifecycle_client::LifecycleClient;
use modeld_proto::v1::model_registry_client::ModelRegistryClient;
use modeld_proto::v1::node_client::NodeClient;
use modeld_proto::v1::storage_client::StorageClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic_types::StatusExt;

pub use modeld_proto::fleet;
pub use modeld_proto::v1;

pub mod deployment;

/// Default agent address, matching `modeld --listen`'s default.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7700";
/// Default fleet controller address, matching `modeld-fleet --listen`'s default.
pub const DEFAULT_FLEET_ADDR: &str = "http://127.0.0.1:7800";
/// Largest message the client accepts: the agent's own limit.
pub use modeld_proto::MAX_MESSAGE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{addr:?} is not a valid agent address: {reason}")]
    InvalidAddress { addr: String, reason: String },
    #[error(
        "cannot connect to modeld at {addr}: {reason} (is the agent running? set --addr or MODELD_ADDR)"
    )]
    Connect { addr: String, reason: String },
    // Not `#[from]`: that would make the status the error's source too, and callers
    // printing the chain would show the message twice.
    #[error("{}", describe_status(.0))]
    Rpc(tonic::Status),
    #[error("the token is not usable in a header: {0}")]
    InvalidToken(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// Adds the caller's credentials to every call.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> std::result::Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// TLS material for connecting to an agent.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM CA bundle the agent's certificate must chain to; `None` = system roots.
    pub ca: Option<std::path::PathBuf>,
    /// PEM client certificate and key, for agents that require one (mTLS).
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl Tls {
    pub fn is_empty(&self) -> bool {
        self.ca.is_none() && self.cert.is_none() && self.key.is_none()
    }

    fn client_config(&self) -> Result<tonic::transport::ClientTlsConfig> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Tls(format!("{}: {e}", p.display())))
        };
        let mut config = tonic::transport::ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?)),
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(config.identity(tonic::transport::Identity::from_pem(
                read(cert)?,
                read(key)?,
            ))),
            (None, None) => Ok(config),
            _ => Err(ClientError::Tls(
                "a client certificate needs its key, and a key its certificate".into(),
            )),
        }
    }
}

/// What the service clients run over: the connection, with credentials added.
pub type Transport = InterceptedService<Channel, Credentials>;

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        ClientError::Rpc(s)
    }
}

impl ClientError {
    /// The gRPC status, when the agent answered with one.
    pub fn status(&self) -> Option<&tonic::Status> {
        match self {
            ClientError::Rpc(s) => Some(s),
            _ => None,
        }
    }

    /// The `ErrorInfo.reason` the agent attached, e.g. `MODEL_NOT_FOUND`.
    pub fn reason(&self) -> Option<String> {
        self.status()
            .and_then(|s| s.get_error_details().error_info().map(|i| i.reason.clone()))
    }
}

/// "message (CODE, REASON)": what a person needs to act on a failed call.
pub fn describe_status(s: &tonic::Status) -> String {
    let reason = s
        .get_error_details()
        .error_info()
        .map(|i| format!(", {}", i.reason))
        .unwrap_or_default();
    format!("{} ({:?}{reason})", s.message(), s.code())
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// One agent. Cloning is cheap and shares the connection.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    channel: Channel,
    credentials: Credentials,
}

impl Client {
    /// Connects to an agent at `addr` (`http://host:port`; a bare `host:port` is taken
    /// as http).
    pub async fn connect(addr: &str) -> Result<Client> {
        Client::connect_with_tls(addr, &Tls::default()).await
    }

    /// Connects over TLS when `addr` is `https://` (or any TLS file is given): the
    /// agent's certificate checked against `tls.ca` (else the system's roots), and
    /// `tls.cert`/`tls.key` presented when the agent asks for a client certificate.
    pub async fn connect_with_tls(addr: &str, tls: &Tls) -> Result<Client> {
        let addr = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let invalid = |reason: String| ClientError::InvalidAddress {
            addr: addr.clone(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true);
        let secure = addr.starts_with("https://");
        if !secure && !tls.is_empty() {
            return Err(invalid(
                "TLS files were given: use an https:// address".into(),
            ));
        }
        if secure {
            endpoint = endpoint
                .tls_config(tls.client_config()?)
                .map_err(|e| invalid(e.to_string()))?;
        }
        let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
            addr: addr.clone(),
            reason: modeld_engine_core::error_chain(&e),
        })?;
        Ok(Client {
            addr,
            channel,
            credentials: Credentials::default(),
        })
    }

    /// Sends `token` as `authorization: Bearer TOKEN` on every call.
    pub fn with_token(mut self, token: &str) -> Result<Client> {
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| ClientError::InvalidToken("only visible ASCII is allowed".into()))?;
        self.credentials.authorization = Some(value);
        Ok(self)
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn registry(&self) -> ModelRegistryClient<Transport> {
        ModelRegistryClient::with_interceptor(self.channel.clone(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn node(&self) -> NodeClient<Transport> {
        NodeClient::with_interceptor(self.channel.clone(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn storage(&self) -> StorageClient<Transport> {
        StorageClient::with_interceptor(self.channel.clone(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn lifecycle(&self) -> LifecycleClient<Transport> {
        LifecycleClient::with_interceptor(self.channel.clone(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// The fleet controller's operator service (for a client connected to a
    /// `modeld-fleet` address).
    pub fn fleet(
        &self,
    ) -> modeld_proto::fleet::v1::fleet_service_client::FleetServiceClient<Transport> {
        modeld_proto::fleet::v1::fleet_service_client::FleetServiceClient::with_interceptor(
            self.channel.clone(),
            self.credentials.clone(),
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn generate(&self) -> GenerateClient<Transport> {
        GenerateClient::with_interceptor(self.channel.clone(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// True when the agent's health service reports SERVING.
    pub async fn is_serving(&self) -> Result<bool> {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        let resp = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        Ok(resp.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
    }

    pub async fn capabilities(&self) -> Result<pb::GetCapabilitiesResponse> {
        Ok(self
            .node()
            .get_capabilities(pb::GetCapabilitiesRequest {})
            .await?
            .into_inner())
    }

    /// Every model matching `filter`, following page tokens to the end.
    pub async fn list_all_models(
        &self,
        mut filter: pb::ListModelsRequest,
    ) -> Result<Vec<pb::Model>> {
        let mut out = Vec::new();
        let mut registry = self.registry();
        loop {
            let page = registry.list_models(filter.clone()).await?.into_inner();
            out.extend(page.models);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            filter.page_token = page.next_page_token;
        }
    }

    pub async fn get_model(&self, id: &str) -> Result<pb::Model> {
        let resp = self
            .registry()
            .get_model(pb::GetModelRequest { id: id.to_owned() })
            .await?
            .into_inner();
        resp.model.ok_or_else(|| {
            tonic::Status::internal("agent answered GetModel without a model").into()
        })
    }

    pub async fn register_model(&self, spec: pb::ModelSpec) -> Result<pb::RegisterModelResponse> {
        Ok(self
            .registry()
            .register_model(pb::RegisterModelRequest { spec: Some(spec) })
            .await?
            .into_inner())
    }

    pub async fn update_model(&self, spec: pb::ModelSpec, paths: Vec<String>) -> Result<pb::Model> {
        let resp = self
            .registry()
            .update_model(pb::UpdateModelRequest {
                spec: Some(spec),
                update_mask: Some(modeld_proto::pbjson_types::FieldMask { paths }),
            })
            .await?
            .into_inner();
        resp.model.ok_or_else(|| {
            tonic::Status::internal("agent answered UpdateModel without a model").into()
        })
    }

    pub async fn delete_model(&self, id: &str) -> Result<()> {
        self.registry()
            .delete_model(pb::DeleteModelRequest { id: id.to_owned() })
            .await?;
        Ok(())
    }

    pub async fn import_catalog(
        &self,
        source: pb::import_catalog_request::Source,
        format: pb::CatalogFormat,
    ) -> Result<pb::ImportCatalogResponse> {
        Ok(self
            .registry()
            .import_catalog(pb::ImportCatalogRequest {
                source: Some(source),
                format: format as i32,
            })
            .await?
            .into_inner())
    }

    pub async fn scan(&self, directories: Vec<String>) -> Result<pb::ScanModelsResponse> {
        Ok(self
            .registry()
            .scan_models(pb::ScanModelsRequest { directories })
            .await?
            .into_inner())
    }

    /// Starts or joins the download of a model and follows it to the end. Returns the
    /// last progress message; a failed transfer is an error with the agent's status.
    pub async fn pull_to_end(&self, model_id: &str) -> Result<pb::TransferProgress> {
        let mut stream = self
            .storage()
            .pull(pb::PullRequest {
                model_id: model_id.to_owned(),
            })
            .await?
            .into_inner();
        let mut last = None;
        while let Some(msg) = stream.message().await? {
            last = msg.progress;
        }
        last.ok_or_else(|| tonic::Status::internal("Pull ended without any progress").into())
    }

    /// A model's lifecycle state, failure and the last `history_limit` transitions
    /// (0 = the agent's default).
    pub async fn state(&self, model_id: &str, history_limit: i32) -> Result<pb::GetStateResponse> {
        Ok(self
            .lifecycle()
            .get_state(pb::GetStateRequest {
                model_id: model_id.to_owned(),
                history_limit,
            })
            .await?
            .into_inner())
    }

    /// The models in memory and the budget they share.
    pub async fn list_loaded(&self) -> Result<pb::ListLoadedResponse> {
        Ok(self
            .lifecycle()
            .list_loaded(pb::ListLoadedRequest {})
            .await?
            .into_inner())
    }

    /// Unloads a model; `grace` (None = the agent's default) lets running requests
    /// finish first.
    pub async fn unload(
        &self,
        model_id: &str,
        grace: Option<std::time::Duration>,
    ) -> Result<pb::UnloadResponse> {
        let grace = grace.map(|g| modeld_proto::pbjson_types::Duration {
            seconds: i64::try_from(g.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(g.subsec_nanos()).unwrap_or(0),
        });
        Ok(self
            .lifecycle()
            .unload(pb::UnloadRequest {
                model_id: model_id.to_owned(),
                grace,
            })
            .await?
            .into_inner())
    }

    /// Loads a model and waits until it is ready (or the load fails).
    pub async fn load_to_end(
        &self,
        model_id: &str,
        options: Option<pb::LoadOptions>,
    ) -> Result<pb::LoadedModel> {
        let mut stream = self
            .lifecycle()
            .load(pb::LoadRequest {
                model_id: model_id.to_owned(),
                options,
            })
            .await?
            .into_inner();
        let mut loaded = None;
        while let Some(msg) = stream.message().await? {
            if msg.loaded.is_some() {
                loaded = msg.loaded;
            }
        }
        loaded.ok_or_else(|| tonic::Status::internal("Load ended without a loaded model").into())
    }

    pub async fn check_compatibility(
        &self,
        request: pb::CheckCompatibilityRequest,
    ) -> Result<pb::CheckCompatibilityResponse> {
        Ok(self
            .registry()
            .check_compatibility(request)
            .await?
            .into_inner())
    }
}
