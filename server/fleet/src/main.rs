use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Parser;

/// modeld-fleet: the controller that places models across a fleet of modeld agents.
#[derive(Debug, Parser)]
#[command(name = "modeld-fleet", version, about, long_about = None)]
struct Args {
    /// Address to serve gRPC on [default: 127.0.0.1:7800]. Port 0 picks a free port;
    /// the controller logs the address it bound.
    #[arg(long, env = "MODELD_FLEET_LISTEN")]
    listen: Option<SocketAddr>,

    /// Where the controller keeps its store [default: ~/.local/share/modeld-fleet].
    #[arg(long, env = "MODELD_FLEET_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Serve a non-loopback address although the controller has no TLS or credentials
    /// of its own yet.
    #[arg(long, env = "MODELD_FLEET_INSECURE")]
    insecure: bool,

    /// Log filter, e.g. "info" or "modeld_fleet=debug".
    #[arg(long, env = "MODELD_FLEET_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    modeld::telemetry::init(&args.log, modeld::config::LogFormat::Text)?;
    let data_dir = match args.data_dir {
        Some(d) => d,
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/share/modeld-fleet"))
            .context("no --data-dir and no HOME to put the default under")?,
    };
    let listen = match args.listen {
        Some(l) => l,
        None => modeld_fleet::serve::DEFAULT_LISTEN.parse()?,
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fleet-rt")
        .build()
        .context("starting the async runtime")?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            modeld_fleet::serve::serve(
                modeld_fleet::serve::Settings {
                    data_dir,
                    insecure: args.insecure,
                },
                listener,
                async {
                    let _ = tokio::signal::ctrl_c().await;
                },
            )
            .await?;
            anyhow::Ok(())
        })
}
