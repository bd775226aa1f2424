use anyhow::Context as _;
use clap::Parser as _;
use modeld::{Args, Config};

fn main() -> anyhow::Result<()> {
    modeld::allocator::limit_arenas();
    if modeld::engine_host::is_engine_role() {
        return modeld::engine_host::main();
    }
    let config = Config::load(Args::parse())?;
    modeld::telemetry::init(&config.log, config.log_format, Some(&config.telemetry))?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("modeld-rt")
        .build()
        .context("starting the async runtime")?
        .block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    modeld::serve::serve(config, listener, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
