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
use modeld::api::auth::{Credentials, SharedCredentials};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7800";
/// How often what reports left for later is done (site replans, rollout moves)...
const TICK: Duration = Duration::from_millis(100);
/// ...and how often rollouts move with the clock alone.
const CLOCK_TICKS: u32 = 10;

#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    /// Accepted tokens (the agent's format; agents hold the `device` role).
    pub tokens_file: Option<PathBuf>,
    pub tls: Option<modeld::tls::TlsFiles>,
    /// Serve a non-loopback address without TLS and credentials.
    pub insecure: bool,
    /// Devices per site that download one set of files from the origin at once; the
    /// others read them from those devices.
    pub origin_fetches_per_site: usize,
    /// Bytes per second each site's origin downloads may take together.
    pub site_origin_rate_limit: Option<u64>,
}

/// The credentials to serve `addr` with, or why the controller must not serve it: the
/// agent's rule, since the controller tells every device what to run.
fn exposure(settings: &Settings, addr: SocketAddr) -> Result<Credentials> {
    let mut credentials = match &settings.tokens_file {
        Some(path) => Credentials::from_file(path).map_err(|e| Error::Config(e.to_string()))?,
        None => Credentials::default(),
    };
    if settings.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
        credentials = credentials.require_certificates();
    }
    let tls = settings.tls.is_some();
    if addr.ip().is_loopback() || (tls && !credentials.is_empty()) {
        return Ok(credentials);
    }
    if !settings.insecure {
        return Err(Error::Config(format!(
            "refusing to serve {addr}, which other hosts can reach, without TLS \
             (--tls-cert, --tls-key) and credentials (--tokens-file or --tls-client-ca); \
             configure them, or pass --insecure to serve it anyway"
        )));
    }
    warn!(%addr, "INSECURE: serving a non-loopback address without TLS and credentials");
    Ok(credentials)
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
    let credentials = SharedCredentials::new(exposure(&settings, addr)?);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(path) = &settings.tokens_file {
        credentials.watch(path.clone(), modeld::tls::RELOAD_CHECK, stop_rx.clone());
    }
    let tls = match &settings.tls {
        Some(files) => Some(
            modeld::tls::Tls::start(files.clone(), modeld::tls::GRPC, stop_rx.clone())
                .map_err(|e| Error::Config(e.to_string()))?,
        ),
        None => None,
    };
    let db = settings.data_dir.join("db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db))
        .await
        .map_err(|e| Error::Serve(e.to_string()))??;
    let controller = Controller::open(
        store.clone(),
        settings.origin_fetches_per_site,
        settings.site_origin_rate_limit,
    )?;
    let (stop_tx, stop_rx) = (stop_tx, stop_rx);
    {
        // Rollouts also move with the clock: wave intervals, devices lost too long.
        let controller = controller.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(TICK);
            let mut n = 0u32;
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                n = (n + 1) % CLOCK_TICKS;
                if let Err(e) = controller.tick(n == 0).await {
                    warn!(error = %e, "rollouts could not be moved on");
                }
            }
        });
    }
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
    info!(%addr, tls = tls.is_some(), "modeld-fleet listening");
    let server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .layer(modeld::api::auth::AuthLayer::with_rules(
            credentials,
            crate::api::access,
        ))
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
        .add_service(reflection_v1alpha);
    let served = match tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
        None => {
            server
                .serve_with_incoming_shutdown(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    shutdown,
                )
                .await
        }
    };
    let _ = stop_tx.send(true);
    served.map_err(|e| Error::Serve(e.to_string()))?;
    store.flush().await?;
    info!("store flushed; bye");
    Ok(())
}
