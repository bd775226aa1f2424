//! `DeviceService`: the stream each agent keeps open to the controller.

use std::sync::Arc;

use modeld_proto::fleet::v1 as fpb;
use modeld_proto::fleet::v1::device_service_server::DeviceService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Boxed;
use crate::controller::Controller;
use crate::error::Error;

/// Messages queued for one device before the controller gives up on the stream.
const OUTBOX: usize = 16;

pub struct DeviceApi {
    controller: Arc<Controller>,
}

impl DeviceApi {
    pub fn new(controller: Arc<Controller>) -> DeviceApi {
        DeviceApi { controller }
    }
}

#[tonic::async_trait]
impl DeviceService for DeviceApi {
    type ConnectStream = Boxed<fpb::ConnectResponse>;

    async fn connect(
        &self,
        request: Request<Streaming<fpb::ConnectRequest>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Error::Protocol("the stream ended before its hello".into()))?;
        let Some(fpb::connect_request::Message::Hello(hello)) = first.message else {
            return Err(Error::Protocol("the first message must be a hello".into()).into());
        };
        let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
        let (id, epoch) = self.controller.attach(hello, outbox.clone()).await?;
        let controller = self.controller.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    // The device stopped reading; its stream is over.
                    () = outbox.closed() => break,
                };
                match message {
                    Ok(Some(fpb::ConnectRequest {
                        message: Some(fpb::connect_request::Message::Report(report)),
                    })) => {
                        if let Err(e) = controller.report(&id, report) {
                            tracing::warn!(device = %id, error = %e, "a report could not be recorded");
                        }
                    }
                    Ok(Some(_)) => {
                        let _ = outbox
                            .send(Err(Error::Protocol(
                                "only reports may follow the hello".into(),
                            )
                            .into()))
                            .await;
                        break;
                    }
                    Ok(None) => break,
                    Err(status) => {
                        tracing::info!(device = %id, status = %status.message(), "device stream failed");
                        break;
                    }
                }
            }
            controller.detach(&id, epoch).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(outbox_rx))))
    }
}
