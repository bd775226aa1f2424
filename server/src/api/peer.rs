//! Reading blobs from other agents over their Storage.ReadBlob: the gRPC side of
//! `modeld://host:port` sources, which the storage layer sees only as bytes.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use modeld_engine_core::error_chain;
use modeld_proto::v1 as pb;
use tonic::Code;

use modeld_node::storage::source::{PeerBlob, PeerChunks, PeerSource, SourceFault, retryable};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct GrpcPeers;

impl PeerSource for GrpcPeers {
    fn open<'a>(
        &'a self,
        host: &'a str,
        port: u16,
        sha256: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, Result<PeerBlob, SourceFault>> {
        Box::pin(async move {
            let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{host}:{port}"))
                .map_err(|e| SourceFault::Permanent(format!("bad peer address: {e}")))?
                .connect_timeout(CONNECT_TIMEOUT);
            let channel = endpoint.connect().await.map_err(|e| {
                retryable(format!(
                    "cannot reach peer {host}:{port}: {}",
                    error_chain(&e)
                ))
            })?;
            let mut client = pb::storage_client::StorageClient::new(channel)
                .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES);
            let mut stream = client
                .read_blob(pb::ReadBlobRequest {
                    sha256: sha256.to_owned(),
                    offset,
                })
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
