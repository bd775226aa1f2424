use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use modeld_proto::v1 as pb;
use modeld_proto::v1::storage_server::Storage as StorageRpc;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use super::{Agent, Boxed};
use modeld_node::error::{Error, Result};
use modeld_node::page;
use modeld_node::registry::spec;
use modeld_node::storage::PushHeader;
use modeld_node::storage::progress::TransferProgress;

/// Progress messages are sent at most this often per stream; the latest state wins.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);
const READ_CHUNK: usize = 1 << 20;

pub struct StorageApi {
    agent: Arc<Agent>,
}

impl StorageApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        StorageApi { agent }
    }
}

#[tonic::async_trait]
impl StorageRpc for StorageApi {
    type PullStream = Boxed<pb::PullResponse>;
    type ReadBlobStream = Boxed<pb::ReadBlobResponse>;

    async fn pull(
        &self,
        request: Request<pb::PullRequest>,
    ) -> Result<Response<Self::PullStream>, Status> {
        super::status::rpc(async move {
            let id = request.into_inner().model_id;
            spec::validate_id("model_id", &id)?;
            let entry = self.agent.node.registry.get(&id)?;
            let (rx, started_here) = self.agent.node.storage.pull(&entry.spec).await?;
            Ok(Response::new(forward_progress(
                rx,
                started_here,
                self.agent.shutdown.clone(),
            )))
        })
        .await
    }

    async fn list_transfers(
        &self,
        request: Request<pb::ListTransfersRequest>,
    ) -> Result<Response<pb::ListTransfersResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            let all: Vec<pb::TransferProgress> = self
                .agent
                .node
                .storage
                .list_transfers()
                .iter()
                .map(convert::progress_to_pb)
                .collect();
            let (transfers, next_page_token) = page::paginate(
                all,
                // Oldest first; the id breaks ties.
                |t| {
                    let start = t.start_time.unwrap_or_default();
                    format!("{:020}.{:09}/{}", start.seconds, start.nanos, t.transfer_id)
                },
                r.page_size,
                &r.page_token,
                "transfers",
            )?;
            Ok(Response::new(pb::ListTransfersResponse {
                transfers,
                next_page_token,
            }))
        })
        .await
    }

    async fn pause_transfer(
        &self,
        request: Request<pb::PauseTransferRequest>,
    ) -> Result<Response<pb::PauseTransferResponse>, Status> {
        super::status::rpc(async move {
            let id = request.into_inner().transfer_id;
            let p = self.agent.node.storage.pause(&id)?;
            Ok(Response::new(pb::PauseTransferResponse {
                progress: Some(convert::progress_to_pb(&p)),
            }))
        })
        .await
    }

    async fn resume_transfer(
        &self,
        request: Request<pb::ResumeTransferRequest>,
    ) -> Result<Response<pb::ResumeTransferResponse>, Status> {
        super::status::rpc(async move {
            let id = request.into_inner().transfer_id;
            let p = self.agent.node.storage.resume(&id)?;
            Ok(Response::new(pb::ResumeTransferResponse {
                progress: Some(convert::progress_to_pb(&p)),
            }))
        })
        .await
    }

    async fn cancel_transfer(
        &self,
        request: Request<pb::CancelTransferRequest>,
    ) -> Result<Response<pb::CancelTransferResponse>, Status> {
        super::status::rpc(async move {
            self.agent
                .node
                .storage
                .cancel(&request.into_inner().transfer_id)
                .await?;
            Ok(Response::new(pb::CancelTransferResponse {}))
        })
        .await
    }

    async fn push(
        &self,
        request: Request<Streaming<pb::PushRequest>>,
    ) -> Result<Response<pb::PushResponse>, Status> {
        super::status::rpc(async move {
            let mut stream = request.into_inner();
            let first = stream.message().await?.ok_or_else(|| {
                Error::invalid("header", "the stream was empty; send a header first")
            })?;
            let Some(pb::push_request::Message::Header(h)) = first.message else {
                return Err(
                    Error::invalid("header", "the first message must be the header").into(),
                );
            };
            spec::validate_id("header.model_id", &h.model_id)?;
            let entry = self.agent.node.registry.get(&h.model_id)?;
            let chunks = stream.map(|m| match m {
                Ok(pb::PushRequest {
                    message: Some(pb::push_request::Message::Chunk(data)),
                }) => Ok(Bytes::from(data)),
                Ok(_) => Err(Error::invalid(
                    "chunk",
                    "only the first message may be a header",
                )),
                Err(status) => Err(Error::ClientCancelled(status.message().to_owned())),
            });
            let header = PushHeader {
                file_name: h.file_name,
                size_bytes: h.size_bytes,
                sha256: h.sha256,
                offset: h.offset,
            };
            let (sha256, size_bytes, stored_new) = self
                .agent
                .node
                .storage
                .push(&entry.spec, header, Box::pin(chunks))
                .await?;
            Ok(Response::new(pb::PushResponse {
                sha256,
                size_bytes,
                stored_new,
            }))
        })
        .await
    }

    async fn get_push_offset(
        &self,
        request: Request<pb::GetPushOffsetRequest>,
    ) -> Result<Response<pb::GetPushOffsetResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            spec::validate_id("model_id", &r.model_id)?;
            let entry = self.agent.node.registry.get(&r.model_id)?;
            let offset = self
                .agent
                .node
                .storage
                .push_offset(&entry.spec, &r.file_name)
                .await?;
            Ok(Response::new(pb::GetPushOffsetResponse { offset }))
        })
        .await
    }

    async fn list_stored(
        &self,
        request: Request<pb::ListStoredRequest>,
    ) -> Result<Response<pb::ListStoredResponse>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            let stored = self.agent.node.storage.stored_models()?;
            // Every model listing a digest, so an operator sees which blobs are shared.
            let mut users: std::collections::HashMap<&str, Vec<String>> =
                std::collections::HashMap::new();
            for m in &stored {
                for (_, sha, _) in &m.files {
                    users
                        .entry(sha.as_str())
                        .or_default()
                        .push(m.model_id.clone());
                }
            }
            let storage = &self.agent.node.storage;
            let models: Vec<pb::StoredModel> = stored
                .iter()
                .map(|m| {
                    let evictability = storage.evictability(&m.model_id)?;
                    Ok(pb::StoredModel {
                        blobs: m
                            .files
                            .iter()
                            .map(|(_, sha, size)| pb::StoredBlob {
                                sha256: sha.clone(),
                                size_bytes: *size,
                                model_ids: users.get(sha.as_str()).cloned().unwrap_or_default(),
                            })
                            .collect(),
                        model_id: m.model_id.clone(),
                        size_bytes: m.size_bytes,
                        complete: m.complete,
                        path: m
                            .extracted_path
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_default(),
                        evictable: evictability.kept_because.is_none(),
                        kept_because: evictability.kept_because.unwrap_or_default(),
                        last_used_time: (evictability.last_used_unix_ms > 0).then(|| {
                            convert::timestamp(modeld_node::store::from_unix_ms(
                                evictability.last_used_unix_ms,
                            ))
                        }),
                    })
                })
                .collect::<Result<_>>()?;
            let (models, next_page_token) = page::paginate(
                models,
                |m| m.model_id.clone(),
                r.page_size,
                &r.page_token,
                "stored models",
            )?;
            Ok(Response::new(pb::ListStoredResponse {
                models,
                next_page_token,
            }))
        })
        .await
    }

    async fn delete_stored(
        &self,
        request: Request<pb::DeleteStoredRequest>,
    ) -> Result<Response<pb::DeleteStoredResponse>, Status> {
        super::status::rpc(async move {
            let id = request.into_inner().model_id;
            spec::validate_id("model_id", &id)?;
            let freed_bytes = self.agent.node.storage.delete_stored(&id).await?;
            Ok(Response::new(pb::DeleteStoredResponse { freed_bytes }))
        })
        .await
    }

    async fn get_usage(
        &self,
        _request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        super::status::rpc(async move {
            let storage = self.agent.node.storage.clone();
            let u = tokio::task::spawn_blocking(move || storage.usage())
                .await
                .map_err(Error::from)??;
            Ok(Response::new(pb::GetUsageResponse {
                used_bytes: u.used_bytes,
                free_bytes: u.free_bytes,
                quota_bytes: u.quota_bytes.unwrap_or(0),
                partial_bytes: u.partial_bytes,
                models: u
                    .per_model
                    .into_iter()
                    .map(|(model_id, size_bytes)| pb::ModelUsage {
                        model_id,
                        size_bytes,
                    })
                    .collect(),
            }))
        })
        .await
    }

    async fn read_blob(
        &self,
        request: Request<pb::ReadBlobRequest>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        super::status::rpc(async move {
            let r = request.into_inner();
            let (mut file, size) = self.agent.node.open_model_blob(&r.sha256, r.offset).await?;
            let storage = self.agent.node.storage.clone();
            let (tx, rx) = mpsc::channel(4);
            let mut offset = r.offset;
            tokio::spawn(async move {
                loop {
                    let mut buf = vec![0u8; READ_CHUNK];
                    let n = match file.read(&mut buf).await {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::internal(format!(
                                    "reading the blob failed: {e}"
                                ))))
                                .await;
                            return;
                        }
                    };
                    buf.truncate(n);
                    storage.serve_throttle(n as u64).await;
                    let msg = pb::ReadBlobResponse {
                        offset,
                        data: buf,
                        size_bytes: size,
                    };
                    offset += n as u64;
                    if tx.send(Ok(msg)).await.is_err() || n == 0 || offset >= size {
                        return;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Boxed<_>))
        })
        .await
    }
}

/// Turns a transfer's progress channel into a Pull stream. Dropping the stream (the
/// client went away) leaves the transfer running.
pub fn forward_progress(
    mut rx: watch::Receiver<TransferProgress>,
    started_here: bool,
    mut shutdown: watch::Receiver<bool>,
) -> Boxed<pb::PullResponse> {
    let (tx, out) = mpsc::channel(8);
    tokio::spawn(async move {
        loop {
            let snapshot = rx.borrow_and_update().clone();
            let message = pb::PullResponse {
                progress: Some(convert::progress_to_pb(&snapshot)),
                started_here,
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
            if let Some(error) = &snapshot.error {
                let _ = tx.send(Err(super::status::of(error))).await;
                return;
            }
            if snapshot.stage.is_final() {
                return;
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    // The transfer ended and its handle is gone; the last state was sent
                    // only if we saw it, so send it now.
                    let last = rx.borrow().clone();
                    let _ = tx.send(Ok(pb::PullResponse { progress: Some(convert::progress_to_pb(&last)), started_here })).await;
                    if let Some(error) = &last.error {
                        let _ = tx.send(Err(super::status::of(error))).await;
                    }
                    return;
                },
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    let _ = tx.send(Err(super::status::of(&Error::ShuttingDown))).await;
                    return;
                }
                () = tx.closed() => return,
            }
            // Coalesce bursts of updates, but never hold back the final one.
            let _ =
                tokio::time::timeout(PROGRESS_INTERVAL, rx.wait_for(|p| p.stage.is_final())).await;
        }
    });
    Box::pin(ReceiverStream::new(out))
}
