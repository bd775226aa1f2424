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

    /// TOML file of accepted bearer tokens, as the agent's `--tokens-file`: agents hold
    /// the `device` role, operators `operator` (or `admin`). Without it every caller
    /// is an anonymous admin, which only a loopback address allows.
    #[arg(long, env = "MODELD_FLEET_TOKENS_FILE")]
    tokens_file: Option<PathBuf>,

    /// PEM certificate chain and key to serve TLS; reloaded when they change.
    #[arg(long, env = "MODELD_FLEET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "MODELD_FLEET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// PEM CA bundle: every client must present a certificate from it (its subject CN
    /// or SAN URI is its identity, whose role the tokens file's [[clients]] gives).
    #[arg(long, env = "MODELD_FLEET_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Serve a non-loopback address without TLS and credentials.
    #[arg(long, env = "MODELD_FLEET_INSECURE")]
    insecure: bool,

    /// Devices per site that download a model's files from the origin at once (at
    /// least 1); the site's other devices read them from those devices.
    #[arg(
        long,
        env = "MODELD_FLEET_ORIGIN_FETCHES_PER_SITE",
        default_value_t = 1
    )]
    origin_fetches_per_site: usize,

    /// Most bytes per second the origin downloads of one site take together, e.g.
    /// "20MiB", divided among the site's devices that fetch from the origin at the
    /// time [default: no limit].
    #[arg(long, env = "MODELD_FLEET_SITE_ORIGIN_RATE_LIMIT")]
    site_origin_rate_limit: Option<bytesize::ByteSize>,

    /// Log filter, e.g. "info" or "modeld_fleet=debug".
    #[arg(long, env = "MODELD_FLEET_LOG", default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    modeld::telemetry::init(&args.log, modeld::config::LogFormat::Text, None)?;
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
                    tokens_file: args.tokens_file,
                    tls: match (args.tls_cert, args.tls_key) {
                        (Some(cert), Some(key)) => Some(modeld::tls::TlsFiles {
                            cert,
                            key,
                            client_ca: args.tls_client_ca,
                        }),
                        _ => None,
                    },
                    insecure: args.insecure,
                    origin_fetches_per_site: args.origin_fetches_per_site,
                    site_origin_rate_limit: args.site_origin_rate_limit.map(|b| b.as_u64()),
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
