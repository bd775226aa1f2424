//! Reading blobs from other agents over their Storage.ReadBlob: the gRPC side of
//! `modeld://host:port` sources, which the storage layer sees only as bytes.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use modeld_engine_core::error_chain;
use modeld_proto::v1 as pb;
use tonic::Code;

use crate::config::PeerSettings;
use modeld_node::storage::source::{PeerBlob, PeerChunks, PeerSource, SourceFault, retryable};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How this agent reaches its peers: plaintext, or TLS against a CA (with a client
/// certificate for peers that require one), with a bearer token for their ReadBlob.
#[derive(Default)]
pub struct GrpcPeers {
    tls: Option<tonic::transport::ClientTlsConfig>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl std::fmt::Debug for GrpcPeers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcPeers")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .finish()
    }
}

impl GrpcPeers {
    pub fn new(settings: &PeerSettings) -> crate::error::Result<GrpcPeers> {
        let bad =
            |what: &str, e: String| crate::error::Error::Config(format!("peers: {what}: {e}"));
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| bad(&p.display().to_string(), e.to_string()))
        };
        let tls = match &settings.tls_ca {
            None => None,
            Some(ca) => {
                let mut config = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
                if let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) {
                    config = config.identity(tonic::transport::Identity::from_pem(
                        read(cert)?,
                        read(key)?,
                    ));
                }
                Some(config)
            }
        };
        let token = settings
            .token
            .as_ref()
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| bad("token", "only visible ASCII is allowed".into()))
            })
            .transpose()?;
        Ok(GrpcPeers { tls, token })
    }
}

impl PeerSource for GrpcPeers {
    fn open<'a>(
        &'a self,
        host: &'a str,
        port: u16,
        sha256: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, Result<PeerBlob, SourceFault>> {
        Box::pin(async move {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let mut endpoint =
                tonic::transport::Endpoint::from_shared(format!("{scheme}://{host}:{port}"))
                    .map_err(|e| SourceFault::Permanent(format!("bad peer address: {e}")))?
                    .connect_timeout(CONNECT_TIMEOUT);
            if let Some(tls) = &self.tls {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|e| SourceFault::Permanent(format!("peer TLS: {e}")))?;
            }
            let channel = endpoint.connect().await.map_err(|e| {
                retryable(format!(
                    "cannot reach peer {host}:{port}: {}",
                    error_chain(&e)
                ))
            })?;
            let mut client = pb::storage_client::StorageClient::new(channel)
                .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES);
            let mut request = tonic::Request::new(pb::ReadBlobRequest {
                sha256: sha256.to_owned(),
                offset,
            });
            if let Some(token) = &self.token {
                request
                    .metadata_mut()
                    .insert("authorization", token.clone());
            }
            let mut stream = client
                .read_blob(request)
                .await
                .map_err(|s| fault(&s))?
                .into_inner();
            // The first message tells the size; its bytes go to the reader first.
            let first = stream.message().await.map_err(|s| fault(&s))?;
            Ok(PeerBlob {
                start: first.as_ref().map_or(offset, |m| m.offset),
                total: first.as_ref().map(|m| m.size_bytes),
                chunks: Box::new(Chunks {
                    pending: first.map(|m| Bytes::from(m.data)).filter(|b| !b.is_empty()),
                    stream,
                }),
            })
        })
    }
}

struct Chunks {
    /// The first message's bytes, read to learn the size, not yet handed out.
    pending: Option<Bytes>,
    stream: tonic::Streaming<pb::ReadBlobResponse>,
}

impl PeerChunks for Chunks {
    fn next(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, SourceFault>> {
        Box::pin(async move {
            if let Some(first) = self.pending.take() {
                return Ok(Some(first));
            }
            match self.stream.message().await {
                Ok(msg) => Ok(msg.map(|m| Bytes::from(m.data))),
                Err(status) => Err(fault(&status)),
            }
        })
    }
}

/// A peer's status as a source fault: what may pass retries, what will not.
fn fault(status: &tonic::Status) -> SourceFault {
    let message = format!("peer answered {:?}: {}", status.code(), status.message());
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown => retryable(message),
        _ => SourceFault::Permanent(message),
    }
}
