//! The gRPC surface: thin tonic services that convert requests into validated domain
//! calls and domain results back into messages. Errors map to statuses in [`status`].

pub mod audit;
pub mod auth;
pub mod convert;
mod generate;
pub mod layers;
mod lifecycle;
pub mod node;
pub mod peer;
mod registry;
pub mod status;
mod storage;
pub mod validate;

use std::sync::Arc;

use modeld_proto::v1 as pb;
use tonic::service::Routes;

use crate::error::{Error, Result};
use modeld_node::load::Loads;
use modeld_node::node::Node;
use modeld_proto::MAX_MESSAGE_BYTES;
use tokio::sync::watch;

/// A server stream of `T`s, as tonic's generated traits take it.
pub type Boxed<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<T, tonic::Status>> + Send>>;

/// Everything the services share: the node, the Loads in progress, and the shutdown
/// signal.
#[derive(Debug)]
pub struct Agent {
    pub node: Arc<Node>,
    /// The Loads in progress and who waits for them.
    pub loads: Loads,
    /// Flips to true when the agent starts shutting down; long streams end on it.
    pub shutdown: watch::Receiver<bool>,
    /// What the services record for `/metrics`.
    pub metrics: Arc<crate::telemetry::metrics::Metrics>,
}

/// Fully-qualified names of the modeld services, for health reporting.
pub const SERVICE_NAMES: [&str; 5] = [
    pb::model_registry_server::SERVICE_NAME,
    pb::storage_server::SERVICE_NAME,
    pb::lifecycle_server::SERVICE_NAME,
    pb::generate_server::SERVICE_NAME,
    pb::node_server::SERVICE_NAME,
];

/// Every modeld service, with explicit message size limits, plus server reflection
/// (v1 and v1alpha: grpcurl 1.8 only speaks v1alpha) when `reflection` is on.
/// Reflection also carries `google/rpc/error_details.proto`: the agent's errors
/// attach ErrorInfo and BadRequest details, and a client that finds their types by
/// reflection (grpcurl) prints them as JSON instead of opaque bytes.
pub fn routes(agent: Arc<Agent>, reflection: bool) -> Result<Routes> {
    let reflection_err =
        |e: tonic_reflection::server::Error| Error::Serve(format!("reflection: {e}"));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(modeld_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(reflection_err)?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(modeld_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(reflection_err)?;

    let mut builder = Routes::builder();
    if reflection {
        builder
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
    }
    builder
        .add_service(
            pb::model_registry_server::ModelRegistryServer::new(registry::RegistryApi::new(
                agent.clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::node_server::NodeServer::new(node::NodeApi::new(agent.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::storage_server::StorageServer::new(storage::StorageApi::new(agent.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::lifecycle_server::LifecycleServer::new(lifecycle::LifecycleApi::new(agent.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(
            pb::generate_server::GenerateServer::new(generate::GenerateApi::new(agent.clone()))
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    Ok(builder.routes())
}
