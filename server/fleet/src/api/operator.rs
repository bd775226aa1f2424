//! `FleetService`: deployments in, placement and status out.

use std::sync::Arc;

use modeld_proto::fleet::v1 as fpb;
use modeld_proto::fleet::v1::fleet_service_server::FleetService;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use super::Boxed;
use crate::controller::{Controller, RolloutCommand};
use crate::error::Error;

pub struct OperatorApi {
    controller: Arc<Controller>,
}

impl OperatorApi {
    pub fn new(controller: Arc<Controller>) -> OperatorApi {
        OperatorApi { controller }
    }
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required").into());
    }
    Ok(())
}

impl OperatorApi {
    async fn command(&self, name: String, command: RolloutCommand) -> Result<fpb::Rollout, Status> {
        required("deployment", &name)?;
        Ok(self.controller.control(&name, command).await?)
    }
}

#[tonic::async_trait]
impl FleetService for OperatorApi {
    async fn get_rollout(
        &self,
        request: Request<fpb::GetRolloutRequest>,
    ) -> Result<Response<fpb::GetRolloutResponse>, Status> {
        let name = request.into_inner().deployment;
        required("deployment", &name)?;
        Ok(Response::new(fpb::GetRolloutResponse {
            rollout: Some(self.controller.rollout(&name)?),
        }))
    }

    async fn pause_rollout(
        &self,
        request: Request<fpb::PauseRolloutRequest>,
    ) -> Result<Response<fpb::PauseRolloutResponse>, Status> {
        let rollout = self
            .command(request.into_inner().deployment, RolloutCommand::Pause)
            .await?;
        Ok(Response::new(fpb::PauseRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn resume_rollout(
        &self,
        request: Request<fpb::ResumeRolloutRequest>,
    ) -> Result<Response<fpb::ResumeRolloutResponse>, Status> {
        let rollout = self
            .command(request.into_inner().deployment, RolloutCommand::Resume)
            .await?;
        Ok(Response::new(fpb::ResumeRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn abort_rollout(
        &self,
        request: Request<fpb::AbortRolloutRequest>,
    ) -> Result<Response<fpb::AbortRolloutResponse>, Status> {
        let rollout = self
            .command(request.into_inner().deployment, RolloutCommand::Abort)
            .await?;
        Ok(Response::new(fpb::AbortRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn rollback_rollout(
        &self,
        request: Request<fpb::RollbackRolloutRequest>,
    ) -> Result<Response<fpb::RollbackRolloutResponse>, Status> {
        let rollout = self
            .command(request.into_inner().deployment, RolloutCommand::Rollback)
            .await?;
        Ok(Response::new(fpb::RollbackRolloutResponse {
            rollout: Some(rollout),
        }))
    }

    async fn apply_deployment(
        &self,
        request: Request<fpb::ApplyDeploymentRequest>,
    ) -> Result<Response<fpb::ApplyDeploymentResponse>, Status> {
        let r = request.into_inner();
        let deployment = r
            .deployment
            .ok_or_else(|| Error::invalid("deployment", "is required"))?;
        Ok(Response::new(
            self.controller.apply(deployment, r.dry_run).await?,
        ))
    }

    async fn get_deployment(
        &self,
        request: Request<fpb::GetDeploymentRequest>,
    ) -> Result<Response<fpb::GetDeploymentResponse>, Status> {
        let name = request.into_inner().name;
        required("name", &name)?;
        Ok(Response::new(self.controller.deployment(&name)?))
    }

    async fn list_deployments(
        &self,
        _request: Request<fpb::ListDeploymentsRequest>,
    ) -> Result<Response<fpb::ListDeploymentsResponse>, Status> {
        Ok(Response::new(fpb::ListDeploymentsResponse {
            deployments: self.controller.deployments(),
        }))
    }

    async fn delete_deployment(
        &self,
        request: Request<fpb::DeleteDeploymentRequest>,
    ) -> Result<Response<fpb::DeleteDeploymentResponse>, Status> {
        let name = request.into_inner().name;
        required("name", &name)?;
        self.controller.delete(&name).await?;
        Ok(Response::new(fpb::DeleteDeploymentResponse {}))
    }

    async fn list_devices(
        &self,
        _request: Request<fpb::ListDevicesRequest>,
    ) -> Result<Response<fpb::ListDevicesResponse>, Status> {
        Ok(Response::new(fpb::ListDevicesResponse {
            devices: self.controller.devices(),
        }))
    }

    async fn get_device(
        &self,
        request: Request<fpb::GetDeviceRequest>,
    ) -> Result<Response<fpb::GetDeviceResponse>, Status> {
        let id = request.into_inner().id;
        required("id", &id)?;
        Ok(Response::new(fpb::GetDeviceResponse {
            device: Some(self.controller.device(&id)?),
        }))
    }

    async fn get_deployment_status(
        &self,
        request: Request<fpb::GetDeploymentStatusRequest>,
    ) -> Result<Response<fpb::GetDeploymentStatusResponse>, Status> {
        let name = request.into_inner().name;
        let only = (!name.is_empty()).then_some(name.as_str());
        Ok(Response::new(fpb::GetDeploymentStatusResponse {
            deployments: self.controller.status(only)?,
        }))
    }

    type WatchStream = Boxed<fpb::WatchResponse>;

    async fn watch(
        &self,
        request: Request<fpb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let since = request.into_inner().since_revision;
        let (past, live) = self.controller.watch(since)?;
        let stream = replay_then_live(past, since, live);
        Ok(Response::new(stream))
    }
}

/// Replayed events, then live ones (skipping any the replay already gave).
fn replay_then_live(
    past: Vec<fpb::WatchResponse>,
    since: u64,
    live: tokio::sync::broadcast::Receiver<fpb::WatchResponse>,
) -> Boxed<fpb::WatchResponse> {
    let last = past.last().map_or(since, |e| e.revision);
    let replay = futures::stream::iter(past.into_iter().map(Ok));
    let live = futures::stream::unfold(live, move |mut live| async move {
        loop {
            match live.recv().await {
                Ok(event) if event.revision <= last => {}
                Ok(event) => return Some((Ok(event), live)),
                Err(RecvError::Lagged(n)) => {
                    let lagged = Status::data_loss(format!(
                        "the watcher fell {n} events behind; watch again from the last revision seen"
                    ));
                    return Some((Err(lagged), live));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    Box::pin(futures::StreamExt::chain(replay, live))
}
