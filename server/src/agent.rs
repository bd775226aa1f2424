//! The agent: opens the store, builds the services, serves gRPC, and shuts down
//! gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::api;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::hardware::Hardware;
use crate::registry::Registry;
use crate::registry::compat::NodeResources;
use crate::storage::source::SourceContext;
use crate::storage::{Storage, StorageSettings};
use crate::store::Store;

/// Everything the services share.
#[derive(Debug)]
pub struct Agent {
    pub config: Config,
    pub store: Store,
    pub registry: Registry,
    pub storage: Storage,
    pub inference: crate::inference::Inference,
    pub hardware: Hardware,
    /// The memory budget resolved against this machine's physical memory.
    pub memory_budget_bytes: u64,
    /// Flips to true when the agent starts shutting down; long streams end on it.
    pub shutdown: watch::Receiver<bool>,
}

impl Agent {
    /// Current resources for compatibility checks.
    pub fn node_resources(&self) -> NodeResources {
        let memory = self.hardware.memory();
        let disk = self.hardware.disk();
        let mut accelerators: Vec<_> = self
            .hardware
            .host()
            .accelerators
            .iter()
            .map(|a| a.kind)
            .collect();
        accelerators.push(modeld_engine_core::Accelerator::Cpu);
        NodeResources {
            memory_budget_bytes: self.memory_budget_bytes,
            memory_available_bytes: memory.available_bytes,
            disk_free_bytes: disk.free_bytes,
            disk_quota_bytes: self.config.disk_quota,
            disk_used_bytes: self.storage.used_bytes().unwrap_or(0),
            physical_cores: self.hardware.host().cpu.physical_cores,
            accelerators,
        }
    }
}

/// Loads again the pinned models that were READY when the agent stopped.
async fn reload_pinned(agent: &Agent, reset: &[(String, crate::lifecycle::ModelState)]) {
    let pinned = match agent.store.pinned() {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "pinned models could not be read");
            return;
        }
    };
    for (id, record) in pinned {
        let was_ready = reset
            .iter()
            .any(|(r, s)| *r == id && *s == crate::lifecycle::ModelState::Ready);
        if !was_ready {
            continue;
        }
        let Ok(entry) = agent.registry.get(&id) else {
            continue;
        };
        let request = crate::inference::LoadRequest {
            runtime: record.runtime.parse().ok(),
            options: modeld_engine_core::LoadOptions {
                context_length: record.context_length,
                parallel: record.parallel,
                threads: record.threads,
                batch_size: record.batch_size,
                use_mmap: true,
                ..modeld_engine_core::LoadOptions::default()
            },
            pin: true,
            keep_alive: None,
        };
        let (updates, _ignored) = tokio::sync::mpsc::channel(1);
        match crate::lifecycle::load::drive(agent, &entry, request, &updates).await {
            Ok(_) => info!(model = %id, "pinned model reloaded"),
            Err(e) => warn!(model = %id, error = %e, "pinned model could not be reloaded"),
        }
    }
}

/// Serves the agent on `listener` until `shutdown` resolves, then drains in-flight
/// requests for up to the configured grace time and flushes the store.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let data_dir = config.data_dir.clone();
    let db_dir = data_dir.join("db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db_dir)).await??;
    let probe_dir = data_dir.clone();
    let hardware = tokio::task::spawn_blocking(move || Hardware::probe(&probe_dir)).await?;
    let memory_budget_bytes = config.memory_budget.resolve(hardware.memory().total_bytes);
    info!(
        node_id = store.node_id(),
        data_dir = %data_dir.display(),
        memory_budget_bytes,
        disk_quota_bytes = config.disk_quota.unwrap_or(0),
        "store open"
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let http = crate::http_client::build()?;
    let registry = Registry::new(store.clone(), config.models_dirs.clone(), http.clone());
    let lifecycle = registry.lifecycle().clone();
    // Nothing is in memory after a restart, whatever the store last recorded.
    let reset = lifecycle.recover()?;
    if !reset.is_empty() {
        info!(
            models = reset.len(),
            "models recorded as loaded are back to downloaded"
        );
    }
    let storage = Storage::open(
        &data_dir,
        store.clone(),
        lifecycle.clone(),
        SourceContext {
            http,
            headers: config.source_headers.clone(),
            stall_timeout: config.stall_timeout,
        },
        StorageSettings {
            max_concurrent_downloads: config.max_concurrent_downloads,
            retries: config.download_retries,
            retry_delay: config.retry_delay,
            quota: config.disk_quota,
            extract: config.extract,
        },
    )?;
    let grace = config.shutdown_grace;
    let mut inference_settings = config.inference.clone();
    inference_settings.memory_budget = memory_budget_bytes;
    let engines = crate::engines::instances(&config);
    let agent = Arc::new(Agent {
        config,
        store: store.clone(),
        registry,
        storage,
        inference: crate::inference::Inference::new(
            engines,
            store.clone(),
            lifecycle.clone(),
            inference_settings,
        ),
        hardware,
        memory_budget_bytes,
        shutdown: shutdown_rx.clone(),
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in api::SERVICE_NAMES.iter().chain(std::iter::once(&"")) {
        health
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
    let reaper = crate::memory::reaper::spawn(agent.clone());
    let startup = {
        let agent = agent.clone();
        let health = health.clone();
        tokio::spawn(async move {
            match agent.registry.load_builtin().await {
                Ok(o) => info!(
                    created = o.created.len(),
                    updated = o.updated.len(),
                    "built-in catalog registered"
                ),
                Err(e) => warn!(error = %e, "built-in catalog could not be registered"),
            }
            if agent.config.scan_on_start && !agent.config.models_dirs.is_empty() {
                match agent.registry.scan(Vec::new()).await {
                    Ok(o) => info!(
                        models = o.models.len(),
                        skipped = o.skipped.len(),
                        "models directories scanned"
                    ),
                    Err(e) => warn!(error = %e, "models directories could not be scanned"),
                }
            }
            let lookup = |id: &str| agent.registry.get(id).ok().map(|e| e.spec);
            match agent.storage.resume_unfinished(lookup).await {
                Ok(0) => {}
                Ok(n) => info!(transfers = n, "unfinished transfers resumed"),
                Err(e) => warn!(error = %e, "unfinished transfers could not be resumed"),
            }
            for name in api::SERVICE_NAMES.iter().chain(std::iter::once(&"")) {
                health
                    .set_service_status(*name, ServingStatus::Serving)
                    .await;
            }
            info!("serving");
            // Pinned models that were ready before the restart come back by themselves.
            reload_pinned(&agent, &reset).await;
        })
    };

    let addr = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("listener: {e}")))?;
    info!(%addr, "modeld listening");

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_routes(api::routes(agent.clone())?)
        .add_service(health_service)
        // Nodelay on accepted sockets: without it small answers wait for the peer's
        // delayed ACK (40 ms on Linux).
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            },
        );
    tokio::pin!(server);

    tokio::select! {
        result = &mut server => {
            result.map_err(|e| Error::Serve(e.to_string()))?;
        }
        () = shutdown => {
            info!(grace_secs = grace.as_secs(), "shutting down: draining in-flight requests");
            startup.abort();
            for name in api::SERVICE_NAMES.iter().chain(std::iter::once(&"")) {
                health.set_service_status(*name, ServingStatus::NotServing).await;
            }
            let _ = shutdown_tx.send(true);
            let _ = stop_tx.send(true);
            match tokio::time::timeout(grace, &mut server).await {
                Ok(result) => result.map_err(|e| Error::Serve(e.to_string()))?,
                Err(_) => warn!("grace time over: cancelling the requests still running"),
            }
        }
    }
    reaper.abort();
    agent.inference.unload_all(Duration::from_secs(1)).await;
    store.flush().await?;
    info!("store flushed; bye");
    Ok(())
}
