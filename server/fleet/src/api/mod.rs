//! The controller's gRPC services: the operator's (`FleetService`) and the devices'
//! (`DeviceService`), with health and reflection.

pub mod device;
pub mod operator;

use std::pin::Pin;

/// A server stream of `T`s, as tonic's generated traits take it.
pub type Boxed<T> =
    Pin<Box<dyn futures::Stream<Item = std::result::Result<T, tonic::Status>> + Send>>;

use modeld::api::auth::{Access, Role};

/// The controller's rule table: agents connect with the `device` role (or admin),
/// operators need the `operator` role for everything else; anything not named needs
/// admin.
pub fn access(path: &str) -> Access {
    match path {
        "/grpc.health.v1.Health/Check" | "/grpc.health.v1.Health/Watch" => Access::Open,
        "/modeld.fleet.v1.DeviceService/Connect" => Access::Needs(Role::Device),
        p if p.starts_with("/grpc.reflection.") => Access::Needs(Role::Inference),
        p if p.starts_with("/modeld.fleet.v1.FleetService/") => Access::Needs(Role::Operator),
        _ => Access::Needs(Role::Admin),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_connect_and_operators_operate() {
        assert_eq!(
            access("/modeld.fleet.v1.DeviceService/Connect"),
            Access::Needs(Role::Device)
        );
        for rpc in [
            "ApplyDeployment",
            "ListDevices",
            "GetDeploymentStatus",
            "Watch",
        ] {
            assert_eq!(
                access(&format!("/modeld.fleet.v1.FleetService/{rpc}")),
                Access::Needs(Role::Operator)
            );
        }
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Open);
        assert_eq!(
            access("/modeld.v1.Generate/Generate"),
            Access::Needs(Role::Admin)
        );
    }
}
