//! Services whose RPCs later stages implement. They are registered now so the whole
//! contract is visible through reflection, and each RPC answers UNIMPLEMENTED naming
//! itself rather than the generic "unknown method".

use std::pin::Pin;

use futures::Stream;
use modeld_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::error::Error;

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn unimplemented<T>(rpc: &'static str) -> Result<T, Status> {
    Err(Error::Unimplemented { rpc }.into())
}

pub struct LifecycleApi;

#[tonic::async_trait]
impl pb::lifecycle_server::Lifecycle for LifecycleApi {
    type LoadStream = Boxed<pb::LoadResponse>;
    type WatchStream = Boxed<pb::WatchResponse>;

    async fn load(
        &self,
        _: Request<pb::LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        unimplemented("modeld.v1.Lifecycle/Load")
    }
    async fn unload(
        &self,
        _: Request<pb::UnloadRequest>,
    ) -> Result<Response<pb::UnloadResponse>, Status> {
        unimplemented("modeld.v1.Lifecycle/Unload")
    }
    async fn get_state(
        &self,
        _: Request<pb::GetStateRequest>,
    ) -> Result<Response<pb::GetStateResponse>, Status> {
        unimplemented("modeld.v1.Lifecycle/GetState")
    }
    async fn list_loaded(
        &self,
        _: Request<pb::ListLoadedRequest>,
    ) -> Result<Response<pb::ListLoadedResponse>, Status> {
        unimplemented("modeld.v1.Lifecycle/ListLoaded")
    }
    async fn watch(
        &self,
        _: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        unimplemented("modeld.v1.Lifecycle/Watch")
    }
}
