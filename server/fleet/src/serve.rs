//! The composition root: opens the store, loads the controller's state, and serves the
//! operator and device services with health and reflection until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use modeld_proto::fleet::v1 as fpb;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::api::{device::DeviceApi, operator::OperatorApi};
use crate::controller::Controller;
use crate::error::{Error, Result};
use crate::store::Store;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7800";

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Serve a non-loopback address anyway (the controller has no TLS or
    /// credentials of its own yet).
    pub insecure: bool,
}

/// Serves on `listener` until `shutdown` resolves.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("listener: {e}")))?;
    if !addr.ip().is_loopback() {
        if !settings.insecure {
            return Err(Error::Config(format!(
                "refusing to serve {addr}, which other hosts can reach: the controller has no \
                 TLS or credentials yet; serve a loopback address behind a TLS proxy, or pass \
                 --insecure"
            )));
        }
        warn!(%addr, "INSECURE: serving a non-loopback address without TLS or credentials");
    }
    let db = settings.data_dir.join("db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| Error::Serve(e.to_string()))??;
    let controller = Controller::open(store.clone())?;
    info!(
        deployments = controller.deployments().len(),
        devices = controller.devices().len(),
        data_dir = %settings.data_dir.display(),
        "fleet state loaded"
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in [
        fpb::fleet_service_server::SERVICE_NAME,
        fpb::device_service_server::SERVICE_NAME,
        "",
    ] {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    let reflection_err =
        |e: tonic_reflection::server::Error| Error::Serve(format!("reflection: {e}"));
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(modeld_proto::FLEET_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(reflection_err)?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(modeld_proto::FLEET_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(reflection_err)?;
    info!(%addr, "modeld-fleet listening");
    Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(
            fpb::fleet_service_server::FleetServiceServer::new(OperatorApi::new(
                controller.clone(),
            ))
            .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(modeld_proto::MAX_MESSAGE_BYTES),
        )
        .add_service(
            fpb::device_service_server::DeviceServiceServer::new(DeviceApi::new(controller))
                .max_decoding_message_size(modeld_proto::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(modeld_proto::MAX_MESSAGE_BYTES),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
        .map_err(|e| Error::Serve(e.to_string()))?;
    store.flush().await?;
    info!("store flushed; bye");
    Ok(())
}
