//! The controller's gRPC services: the operator's (`FleetService`) and the devices'
//! (`DeviceService`), with health and reflection.

pub mod device;
pub mod operator;

use std::pin::Pin;

/// A server stream of `T`s, as tonic's generated traits take it.
pub type Boxed<T> =
    Pin<Box<dyn futures::Stream<Item = std::result::Result<T, tonic::Status>> + Send>>;
