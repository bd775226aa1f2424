//! The composition root: opens the store, builds the node from the configuration with
//! the engines of this build, serves the gRPC services, and shuts down gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::api::{self, Agent};
use crate::config::Config;
use crate::error::{Error, Result};
use modeld_node::hardware::Hardware;
use modeld_node::load::Loads;
use modeld_node::node::Node;
use modeld_node::registry::Registry;
use modeld_node::storage::source::SourceContext;
use modeld_node::storage::{Storage, StorageSettings};
use modeld_node::store::Store;

/// The credentials to serve `addr` with, or why the agent must not serve it. On
/// loopback anything goes; anywhere else the agent needs TLS and credentials (tokens,
/// or client certificates), which only `--insecure` waives, and then it says so at
/// every start.
fn exposure(config: &Config, addr: std::net::SocketAddr) -> Result<api::auth::Credentials> {
    let mut credentials = match &config.tokens_file {
        Some(path) => api::auth::Credentials::from_file(path)?,
        None => api::auth::Credentials::default(),
    };
    if config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
        credentials = credentials.require_certificates();
    }
    if !credentials.is_empty() {
        info!(tokens = credentials.len(), "callers need credentials");
    }
    let tls = config.tls.is_some();
    if addr.ip().is_loopback() || (tls && !credentials.is_empty()) {
        return Ok(credentials);
    }
    let missing = match (tls, credentials.is_empty()) {
        (false, true) => {
            "TLS (--tls-cert, --tls-key) and credentials (--tokens-file or --tls-client-ca)"
        }
        (false, false) => "TLS (--tls-cert, --tls-key)",
        _ => "credentials (--tokens-file or --tls-client-ca)",
    };
    if !config.insecure {
        return Err(Error::Config(format!(
            "refusing to serve {addr}, which other hosts can reach, without {missing}; \
             configure them, or pass --insecure to serve it anyway"
        )));
    }
    warn!(%addr, missing, "INSECURE: serving a non-loopback address without {missing}");
    Ok(credentials)
}

/// Loads again the pinned models that were READY when the agent stopped.
async fn reload_pinned(node: &Node, reset: &[(String, modeld_node::model::ModelState)]) {
    let pinned = match node.store.pinned() {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "pinned models could not be read");
            return;
        }
    };
    for (id, record) in pinned {
        let was_ready = reset
            .iter()
            .any(|(r, s)| *r == id && *s == modeld_node::model::ModelState::Ready);
        if !was_ready {
            continue;
        }
        let Ok(entry) = node.registry.get(&id) else {
            continue;
        };
        let request = modeld_node::inference::LoadRequest::pinned_again(&record);
        match modeld_node::load::drive_unwatched(node, &entry, request).await {
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
    let mut hardware = tokio::task::spawn_blocking(move || Hardware::probe(&probe_dir)).await?;
    // This machine's cores, even when --device-profile reports another device's.
    let default_threads = hardware.host().cpu.inference_threads();
    let mut memory_budget_bytes = config
        .memory_budget
        .resolve(hardware.memory().usable_bytes());
    if let Some(profile) = &config.device_profile {
        hardware = hardware.with_profile(profile);
        memory_budget_bytes = match profile.memory_budget {
            Some(budget) => budget.as_u64(),
            None => config
                .memory_budget
                .resolve(hardware.memory().usable_bytes()),
        };
        warn!(
            device_class = hardware.host().device_class.as_str(),
            os = %hardware.host().os,
            memory_budget_bytes,
            "SIMULATION: reporting the device of --device-profile instead of this machine"
        );
    }
    info!(
        node_id = store.node_id(),
        data_dir = %data_dir.display(),
        memory_budget_bytes,
        disk_quota_bytes = config.disk_quota.unwrap_or(0),
        default_threads,
        "store open"
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let http = modeld_node::http_client::build()?;
    // Before the node is built: its modules bind their instruments to the global
    // meter provider installed here.
    let telemetry = {
        let settings = config.telemetry.clone();
        let identity = crate::telemetry::Identity {
            node_id: store.node_id().to_owned(),
            device_class: hardware.host().device_class.as_str(),
            site: Some(config.site.clone()),
            labels: config.labels.clone(),
        };
        let prometheus = config.metrics_listen.is_some();
        Arc::new(
            tokio::task::spawn_blocking(move || {
                crate::telemetry::Telemetry::start(&settings, &identity, prometheus)
            })
            .await??,
        )
    };
    if let Some(to) = &telemetry.exporting_to {
        info!(otlp = %to, "exporting traces and metrics");
    }
    let roots = modeld_node::access::LocalRoots::new(
        config.allow_dirs.iter().chain(&config.models_dirs).cloned(),
    );
    info!(roots = ?roots.roots(), "local paths allowed under");
    let registry = Registry::new(
        store.clone(),
        config.models_dirs.clone(),
        roots.clone(),
        http.clone(),
    )
    .with_hosts(config.source_hosts.clone());
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
            peers: Some(Arc::new(api::peer::GrpcPeers::new(&config.peers)?)),
            roots,
            hosts: config.source_hosts.clone(),
            origin_limit: Arc::new(modeld_node::storage::bandwidth::OriginLimit::new(
                config.origin_rate_limit,
            )),
        },
        StorageSettings {
            max_concurrent_downloads: config.max_concurrent_downloads,
            retries: config.download_retries,
            retry_delay: config.retry_delay,
            quota: config.disk_quota,
            extract: config.extract,
            serve_rate_limit: config.serve_rate_limit,
        },
    )?;
    let grace = config.shutdown_grace;
    let mut inference_settings = config.inference.clone();
    inference_settings.memory_budget = memory_budget_bytes;
    if inference_settings.threads == 0 {
        inference_settings.threads = default_threads;
    }
    let engines = crate::engines::for_agent(&config)?;
    let node = Arc::new(Node {
        store: store.clone(),
        registry,
        storage,
        inference: Arc::new(modeld_node::inference::Inference::new(
            engines,
            store.clone(),
            lifecycle.clone(),
            inference_settings,
        )),
        hardware,
        memory_budget_bytes,
        disk_quota: config.disk_quota,
    });
    {
        // Speed predictions, runtime ranking and the bandwidth gauge stand on these.
        // Kept ones are read now; measuring (a third of a second of every core) waits
        // for the first caller that needs them, unless metrics are exported, whose
        // bandwidth gauge wants them from the start.
        let node = node.clone();
        let measure = telemetry.exporting_to.is_some() || telemetry.prometheus.is_some();
        tokio::task::spawn_blocking(move || {
            let rates = if measure {
                node.rates()
            } else {
                node.kept_rates()
            };
            if let Some(r) = rates {
                info!(
                    memory_read_bytes_per_second = r.memory_read_bytes_per_second,
                    compute_flops_per_second = r.compute_flops_per_second,
                    "memory bandwidth and compute rate"
                );
            }
        });
    }
    let pressure_threshold = config.memory_pressure_threshold;
    let scan_on_start = config.scan_on_start && !config.models_dirs.is_empty();
    let metrics = Arc::new(crate::telemetry::metrics::Metrics::new(&node, &telemetry));
    let agent = Arc::new(Agent {
        node: node.clone(),
        loads: Loads::default(),
        shutdown: shutdown_rx.clone(),
        metrics: metrics.clone(),
    });
    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            if !addr.ip().is_loopback() && !config.insecure {
                return Err(Error::Config(format!(
                    "refusing to serve metrics on {addr}, which other hosts can reach, in \
                     plain HTTP: serve them on loopback (behind a proxy with TLS), or pass \
                     --insecure"
                )));
            }
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Config(format!("--metrics-listen {addr}: {e}")))?;
            Some(crate::telemetry::metrics::serve(
                metrics,
                listener,
                shutdown_rx.clone(),
            )?)
        }
        None => None,
    };

    let (health, health_service) = tonic_health::server::health_reporter();
    for name in api::SERVICE_NAMES.iter().chain(std::iter::once(&"")) {
        health
            .set_service_status(*name, ServingStatus::NotServing)
            .await;
    }
    let supervisor = modeld_node::supervise::spawn(node.clone(), shutdown_rx.clone());
    let nfd = config
        .nfd_features_file
        .clone()
        .map(|path| crate::nfd::spawn(path, node.clone(), shutdown_rx.clone()));
    let fleet = match &config.fleet {
        Some(settings) => {
            let mut settings = settings.clone();
            if settings.advertise.is_none()
                && let Ok(bound) = listener.local_addr()
                && !bound.ip().is_unspecified()
            {
                settings.advertise = Some(bound.to_string());
            }
            let link = crate::fleet::link::Link::new(settings.clone())?;
            let reconciler = modeld_node::fleet::spawn(
                node.clone(),
                agent.loads.clone(),
                crate::fleet::link::stored_assignments(&node),
                shutdown_rx.clone(),
            );
            info!(url = %settings.url, site = %settings.site, "fleet: reporting to the controller");
            Some(crate::fleet::link::spawn(
                link,
                node.clone(),
                reconciler,
                shutdown_rx.clone(),
            ))
        }
        None => None,
    };
    let reaper = modeld_node::inference::reaper::spawn(
        node.inference.clone(),
        pressure_threshold,
        shutdown_rx.clone(),
    );
    let startup = {
        let agent = agent.clone();
        let health = health.clone();
        tokio::spawn(async move {
            match agent.node.registry.load_builtin().await {
                Ok(o) => info!(
                    created = o.created.len(),
                    updated = o.updated.len(),
                    "built-in catalog registered"
                ),
                Err(e) => warn!(error = %e, "built-in catalog could not be registered"),
            }
            if scan_on_start {
                match agent.node.registry.scan(Vec::new()).await {
                    Ok(o) => info!(
                        models = o.models.len(),
                        skipped = o.skipped.len(),
                        "models directories scanned"
                    ),
                    Err(e) => warn!(error = %e, "models directories could not be scanned"),
                }
            }
            let lookup = |id: &str| agent.node.registry.get(id).ok().map(|e| e.spec);
            match agent.node.storage.resume_unfinished(lookup).await {
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
            reload_pinned(&agent.node, &reset).await;
        })
    };

    let addr = listener
        .local_addr()
        .map_err(|e| Error::Serve(format!("listener: {e}")))?;
    let credentials = api::auth::SharedCredentials::new(exposure(&config, addr)?);
    if let Some(path) = &config.tokens_file {
        credentials.watch(path.clone(), crate::tls::RELOAD_CHECK, shutdown_rx.clone());
    }
    let tls = match &config.tls {
        Some(files) => Some(crate::tls::Tls::start(
            files.clone(),
            crate::tls::GRPC,
            shutdown_rx.clone(),
        )?),
        None => None,
    };
    info!(%addr, tls = tls.is_some(), "modeld listening");

    // One stack for every way in: the gRPC listener, and the OpenAI-compatible API,
    // which calls the same services in-process through it.
    let layers = tower::ServiceBuilder::new()
        .layer(api::layers::RequestIdLayer)
        .layer(api::layers::SpanLayer::with_metrics(agent.metrics.clone()))
        .layer(api::layers::RpcLimitLayer::new(config.max_concurrent_rpcs))
        .layer(api::layers::DeadlineLayer)
        .layer(api::audit::AuditLayer::new(store.clone()))
        .layer(api::auth::AuthLayer::new(credentials.clone()));
    let routes = api::routes(
        agent.clone(),
        config.reflection.unwrap_or(addr.ip().is_loopback()),
    )?;
    let openai = match config.openai_listen {
        Some(openai_addr) => {
            let listener = TcpListener::bind(openai_addr)
                .await
                .map_err(|e| Error::Config(format!("--openai-listen {openai_addr}: {e}")))?;
            // The same rule as the gRPC listener: off loopback, TLS and credentials.
            exposure(&config, openai_addr)?;
            let tls = match &config.tls {
                Some(files) => Some(crate::tls::Tls::start(
                    files.clone(),
                    crate::tls::HTTP1,
                    shutdown_rx.clone(),
                )?),
                None => None,
            };
            let in_process = crate::openai::in_process(layers.service(routes.clone()));
            Some(crate::openai::serve(
                in_process,
                listener,
                tls,
                shutdown_rx.clone(),
            )?)
        }
        None => None,
    };

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let server = Server::builder()
        .tcp_nodelay(true)
        // A peer that stops answering pings is dropped, with its streams.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .layer(layers)
        .add_routes(routes)
        .add_service(health_service);
    let stopped = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    let server: std::pin::Pin<
        Box<dyn Future<Output = std::result::Result<(), tonic::transport::Error>> + Send>,
    > = match tls {
        Some(tls) => Box::pin(server.serve_with_incoming_shutdown(tls.incoming(listener), stopped)),
        // Nodelay on accepted sockets: without it small answers wait for the peer's
        // delayed ACK (40 ms on Linux).
        None => Box::pin(server.serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            stopped,
        )),
    };
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
    if let Some(listener) = metrics_listener {
        listener.abort();
    }
    if let Some(listener) = openai {
        listener.abort();
    }
    if let Some(fleet) = fleet {
        fleet.abort();
    }
    if let Some(nfd) = nfd {
        // It removes its file when it sees the shutdown; give it the moment.
        let _ = tokio::time::timeout(Duration::from_secs(1), nfd).await;
    }
    // No restart may race the unloads below.
    supervisor.abort();
    node.inference.unload_all(Duration::from_secs(1)).await;
    store.flush().await?;
    // What is buffered reaches the collector before the process ends.
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    info!("store flushed; bye");
    Ok(())
}
