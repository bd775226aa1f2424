//! Agent configuration: command-line flags, each with an environment variable, over an
//! optional TOML file, over defaults. Flags win over env (clap), env over the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use clap::Parser;
use serde::Deserialize;

use crate::error::{Error, Result};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Share of physical memory loaded models may use when no budget is configured.
pub const DEFAULT_MEMORY_FRACTION: f64 = 0.75;
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// modeld: the node agent that takes models from registered to streaming tokens.
#[derive(Debug, Clone, Default, Parser)]
#[command(name = "modeld", version, about, long_about = None)]
pub struct Args {
    /// Address to serve gRPC on [default: 127.0.0.1:7700]. Port 0 picks a free port; the
    /// agent logs the address it bound. A non-loopback address needs TLS and
    /// credentials (--tls-cert/--tls-key, and --tokens-file or --tls-client-ca), or
    /// --insecure.
    #[arg(long, env = "MODELD_LISTEN")]
    pub listen: Option<SocketAddr>,

    /// Where the agent keeps its store, blobs and extracted models
    /// [default: $XDG_DATA_HOME/modeld or ~/.local/share/modeld].
    #[arg(long, env = "MODELD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// TOML file with any of these settings (same names, snake_case). Flags and
    /// environment variables override it.
    #[arg(long, env = "MODELD_CONFIG")]
    pub config: Option<PathBuf>,

    /// Memory loaded models may use: a size such as "300MB" or "4GiB", or a share of
    /// memory such as "75%" [default: 75%]: of physical memory, or of the agent's
    /// cgroup memory limit (a container's) when that is smaller. A larger budget keeps more models
    /// warm; a smaller one leaves room for other software on the device.
    #[arg(long, env = "MODELD_MEMORY_BUDGET")]
    pub memory_budget: Option<MemoryBudget>,

    /// Most disk the agent's models may take, e.g. "20GB"; "0" means no quota beyond
    /// the free space of the filesystem.
    #[arg(long, env = "MODELD_DISK_QUOTA")]
    pub disk_quota: Option<ByteSize>,

    /// Most bytes per second downloads from origins (http and https sources) take on
    /// this device together, e.g. "10MiB"; peers of the site and local files are not
    /// limited. A fleet controller may lower it to the device's share of its site's
    /// limit. [default: no limit]
    #[arg(long, env = "MODELD_ORIGIN_RATE_LIMIT")]
    pub origin_rate_limit: Option<ByteSize>,

    /// Bytes per second this device serves to the peers of its site (ReadBlob), all
    /// readers together, e.g. "20MiB", so seeding a site leaves bandwidth for the
    /// device's own work. [default: no limit]
    #[arg(long, env = "MODELD_SERVE_RATE_LIMIT")]
    pub serve_rate_limit: Option<ByteSize>,

    /// A directory of models to discover (repeatable; the env variable takes a
    /// comma-separated list). Models found there are used in place, never copied.
    #[arg(long = "models-dir", env = "MODELD_MODELS_DIRS", value_delimiter = ',')]
    pub models_dirs: Vec<PathBuf>,

    /// A TOML file of accepted bearer tokens, each a name, a role (admin, operator,
    /// inference) and the SHA-256 of the token. With none, every caller is an
    /// anonymous admin, which the agent allows on a loopback address only.
    #[arg(long, env = "MODELD_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// A host http(s) sources and catalog URLs may reach (repeatable; `.example.com`
    /// covers the domain and its subdomains). With none, any host not denied.
    #[arg(
        long = "source-allow-host",
        env = "MODELD_SOURCE_ALLOW_HOSTS",
        value_delimiter = ','
    )]
    pub source_allow_hosts: Vec<String>,

    /// A host http(s) sources and catalog URLs may never reach, redirects included
    /// (repeatable; wins over --source-allow-host).
    #[arg(
        long = "source-deny-host",
        env = "MODELD_SOURCE_DENY_HOSTS",
        value_delimiter = ','
    )]
    pub source_deny_hosts: Vec<String>,

    /// PEM CA bundle for peers (`modeld://` sources): when set, peers are reached over
    /// TLS and their certificates checked against it.
    #[arg(long, env = "MODELD_PEER_TLS_CA")]
    pub peer_tls_ca: Option<PathBuf>,

    /// PEM client certificate to present to peers that require one (with
    /// --peer-tls-key).
    #[arg(long, env = "MODELD_PEER_TLS_CERT")]
    pub peer_tls_cert: Option<PathBuf>,

    /// PEM key of --peer-tls-cert.
    #[arg(long, env = "MODELD_PEER_TLS_KEY")]
    pub peer_tls_key: Option<PathBuf>,

    /// Bearer token sent to peers (their ReadBlob needs the operator role). Never
    /// logged.
    #[arg(long, env = "MODELD_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<String>,

    /// Serve gRPC server reflection (what grpcurl lists and describes with)
    /// [default: true on a loopback address, false elsewhere].
    #[arg(long, env = "MODELD_REFLECTION")]
    pub reflection: Option<bool>,

    /// RPCs served at once across all connections, streams included [default: 256];
    /// one more is answered RESOURCE_EXHAUSTED at once. Health checks do not count.
    #[arg(long, env = "MODELD_MAX_CONCURRENT_RPCS")]
    pub max_concurrent_rpcs: Option<usize>,

    /// HTTP/2 streams one connection may have open [default: 128].
    #[arg(long, env = "MODELD_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<u32>,

    /// PEM certificate chain to serve TLS with (with --tls-key). Read again when the
    /// file changes, so a rotation needs no restart.
    #[arg(long, env = "MODELD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "MODELD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA bundle: every client must present a certificate from it (mTLS); its
    /// subject common name (or SAN URI) is its identity, given a role by the tokens
    /// file's [[clients]].
    #[arg(long, env = "MODELD_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve a non-loopback address without TLS and credentials. Anyone who can
    /// reach the port can then do anything; the agent says so at every start.
    #[arg(long, env = "MODELD_INSECURE")]
    pub insecure: bool,

    /// A directory requests may name local files in (repeatable; the env variable
    /// takes a comma-separated list): `file://` sources, scan directories, catalog
    /// files. The models directories count too; nothing else on the host does.
    #[arg(long = "allow-dir", env = "MODELD_ALLOW_DIRS", value_delimiter = ',')]
    pub allow_dirs: Vec<PathBuf>,

    /// Scan the models directories at start-up [default: true].
    #[arg(long, env = "MODELD_SCAN_ON_START", action = clap::ArgAction::Set)]
    pub scan_on_start: Option<bool>,

    /// Log filter in tracing's EnvFilter syntax, e.g. "info" or "modeld=debug,warn"
    /// [default: info].
    #[arg(long, env = "MODELD_LOG")]
    pub log: Option<String>,

    /// Log format: "text" for people, "json" for log shippers [default: text].
    #[arg(long, env = "MODELD_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Seconds in-flight requests get to finish on SIGINT/SIGTERM before they are
    /// cancelled [default: 10].
    #[arg(long, env = "MODELD_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,

    /// Requests each model decodes together, sharing every forward pass (continuous
    /// batching) [default: 4]. Each gets its own context, so KV-cache memory grows with it.
    #[arg(long, env = "MODELD_PARALLEL")]
    pub parallel: Option<u32>,

    /// Requests per model that may wait for a free slot [default: 8]; beyond them a
    /// request is answered RESOURCE_EXHAUSTED at once instead of waiting unboundedly.
    #[arg(long, env = "MODELD_MAX_QUEUED_REQUESTS")]
    pub max_queued_requests: Option<usize>,

    /// Seconds an idle model stays loaded unless its Load says otherwise
    /// [default: 300]. 0 unloads a model as soon as it is idle; negative never does.
    #[arg(long, env = "MODELD_KEEP_ALIVE_SECS", allow_negative_numbers = true)]
    pub keep_alive_secs: Option<i64>,

    /// Memory pressure (Linux PSI "some avg10", percent of time stalled on memory)
    /// above which idle models are evicted one at a time [default: 10]; 0 turns
    /// pressure eviction off.
    #[arg(long, env = "MODELD_MEMORY_PRESSURE_THRESHOLD")]
    pub memory_pressure_threshold: Option<f64>,

    /// The ONNX Runtime shared library (libonnxruntime.so / .dylib, 1.31 or newer) the
    /// onnx engine loads [default: $ORT_DYLIB_PATH]. Without it ONNX models fail to
    /// load with FAILED_PRECONDITION; everything else works.
    #[arg(long, env = "MODELD_ONNXRUNTIME_LIBRARY")]
    pub onnxruntime_library: Option<PathBuf>,

    /// The LiteRT shared library (libLiteRt.so from the ai-edge-litert 2.3 wheel) the
    /// litert engine loads for .tflite decoders [default: $LITERT_LIBRARY]. Without it
    /// TFLite models fail to load with FAILED_PRECONDITION; everything else works.
    #[arg(long, env = "MODELD_LITERT_LIBRARY")]
    pub litert_library: Option<PathBuf>,

    /// The LiteRT-LM shared library (liblitert-lm.so from the litert-lm-api 0.18 wheel)
    /// the litert engine runs .litertlm bundles with [default: $LITERT_LM_LIBRARY].
    /// Without it bundles fail to load with FAILED_PRECONDITION.
    #[arg(long, env = "MODELD_LITERT_LM_LIBRARY")]
    pub litert_lm_library: Option<PathBuf>,

    /// The directory of llama.cpp's CPU variant modules (libggml-cpu-*.so) to choose
    /// from [default: llama-cpu-variants/ beside the modeld binary, else the build's].
    #[arg(long, env = "MODELD_LLAMA_CPU_VARIANTS_DIR")]
    pub llama_cpu_variants_dir: Option<PathBuf>,

    /// Where models run: "process" starts an engine process per loaded model, so a
    /// crash in a runtime ends that model alone; "in-process" runs them inside the
    /// agent, for platforms that cannot start processes [default: process].
    #[arg(long, env = "MODELD_ENGINE_ISOLATION")]
    pub engine_isolation: Option<EngineIsolation>,

    /// Inference threads per model [default: 0 = one per physical core this process may
    /// use].
    #[arg(long, env = "MODELD_THREADS")]
    pub threads: Option<u32>,

    /// Tokens per request's context [default: 0 = the model's own, capped at 4096].
    #[arg(long, env = "MODELD_CONTEXT_LENGTH")]
    pub context_length: Option<u32>,

    /// Downloads that run at once; more wait in a queue [default: 2]. More parallel
    /// downloads rarely help on one uplink and cost disk seeks on small devices.
    #[arg(long, env = "MODELD_MAX_CONCURRENT_DOWNLOADS")]
    pub max_concurrent_downloads: Option<usize>,

    /// Milliseconds without a byte before a download counts as stalled and is retried
    /// [default: 30000]. Lower detects dead connections sooner; too low aborts slow links.
    #[arg(long, env = "MODELD_STALL_TIMEOUT_MS")]
    pub stall_timeout_ms: Option<u64>,

    /// Attempts per source before the next mirror is tried [default: 5].
    #[arg(long, env = "MODELD_DOWNLOAD_RETRIES")]
    pub download_retries: Option<usize>,

    /// First retry delay in milliseconds; later ones double, with jitter, up to 64x
    /// [default: 500]. A Retry-After header from the server takes precedence.
    #[arg(long, env = "MODELD_RETRY_DELAY_MS")]
    pub retry_delay_ms: Option<u64>,

    /// Extra request header for one source host, as "HOST=Header-Name: value"
    /// (repeatable; the env variable takes a ';'-separated list). Values are never
    /// logged. Flags show up in process lists: prefer the config file for secrets.
    #[arg(
        long = "source-header",
        env = "MODELD_SOURCE_HEADERS",
        value_delimiter = ';',
        hide_env_values = true
    )]
    pub source_headers: Vec<String>,

    /// Most bytes one archive may unpack to [default: 64GiB].
    #[arg(long, env = "MODELD_EXTRACT_MAX_BYTES")]
    pub extract_max_bytes: Option<ByteSize>,

    /// Most entries one archive may hold [default: 10000].
    #[arg(long, env = "MODELD_EXTRACT_MAX_ENTRIES")]
    pub extract_max_entries: Option<usize>,

    /// Highest compression ratio (unpacked/packed) an archive may have [default: 200];
    /// above it the archive is treated as a decompression bomb.
    #[arg(long, env = "MODELD_EXTRACT_MAX_RATIO")]
    pub extract_max_ratio: Option<u64>,

    /// Hugging Face token, sent as "Authorization: Bearer ..." to huggingface.co only.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<String>,

    /// Fleet controller to dial out to, e.g. "https://fleet.example:7800". The agent
    /// introduces itself, reports its models and converges to the models the
    /// controller assigns it; while the controller is away it keeps serving, keeps
    /// converging to the assignments it holds, and retries with backoff.
    #[arg(long, env = "MODELD_FLEET")]
    pub fleet: Option<String>,

    /// The site this device belongs to, for deployments that select by site.
    #[arg(long, env = "MODELD_SITE")]
    pub site: Option<String>,

    /// A label KEY=VALUE deployments can select on (repeatable; the env variable takes
    /// a comma-separated list).
    #[arg(long = "label", env = "MODELD_LABELS", value_delimiter = ',')]
    pub labels: Vec<String>,

    /// Bearer token the agent presents to the fleet controller.
    #[arg(long, env = "MODELD_FLEET_TOKEN", hide_env_values = true)]
    pub fleet_token: Option<String>,

    /// CA bundle (PEM) the controller's certificate must chain to (https:// only).
    #[arg(long, env = "MODELD_FLEET_TLS_CA")]
    pub fleet_tls_ca: Option<PathBuf>,

    /// host:port where devices of this agent's site reach its ReadBlob, so that a site
    /// downloads each model from the origin once [default: the listen address, unless
    /// it is 0.0.0.0 or ::, which says nothing to a peer].
    #[arg(long, env = "MODELD_FLEET_ADVERTISE")]
    pub fleet_advertise: Option<String>,

    /// Client certificate and key (PEM) for a controller that requires one.
    #[arg(long, env = "MODELD_FLEET_TLS_CERT", requires = "fleet_tls_key")]
    pub fleet_tls_cert: Option<PathBuf>,
    #[arg(long, env = "MODELD_FLEET_TLS_KEY", requires = "fleet_tls_cert")]
    pub fleet_tls_key: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9464. A
    /// non-loopback address needs --insecure (the endpoint is plain HTTP).
    #[arg(long, env = "MODELD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Also serve an OpenAI-compatible HTTP API (/v1/models, /v1/completions,
    /// /v1/chat/completions) here, e.g. 127.0.0.1:8080. Off by default. It takes the
    /// same TLS, tokens (the API key is the bearer token) and roles as the gRPC listener.
    #[arg(long, env = "MODELD_OPENAI_LISTEN")]
    pub openai_listen: Option<SocketAddr>,

    /// Export traces and metrics over OTLP to this collector, e.g.
    /// http://127.0.0.1:4317 (grpc) or http://127.0.0.1:4318 (http/protobuf). The
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT (and its _TRACES_/_METRICS_ forms) work too.
    /// Off when neither is set, or when OTEL_SDK_DISABLED=true.
    #[arg(long, env = "MODELD_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// OTLP protocol: grpc or http/protobuf [default: OTEL_EXPORTER_OTLP_PROTOCOL, else
    /// grpc].
    #[arg(long, env = "MODELD_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<OtlpProtocol>,

    /// A header KEY=VALUE sent with every OTLP export, e.g. a collector's API key
    /// (repeatable; the env variable takes a comma-separated list). Values are never
    /// logged. Without any, OTEL_EXPORTER_OTLP_HEADERS applies.
    #[arg(
        long = "otlp-header",
        env = "MODELD_OTLP_HEADERS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub otlp_headers: Vec<String>,

    /// Milliseconds between OTLP metric exports [default: OTEL_METRIC_EXPORT_INTERVAL,
    /// else 60000].
    #[arg(long, env = "MODELD_OTLP_EXPORT_INTERVAL_MS")]
    pub otlp_export_interval_ms: Option<u64>,

    /// A resource attribute KEY=VALUE added to every trace and metric (repeatable),
    /// on top of service.name=modeld, service.instance.id=<node id>, the device class,
    /// the site and the labels. OTEL_RESOURCE_ATTRIBUTES works too.
    #[arg(
        long = "resource-attribute",
        env = "MODELD_RESOURCE_ATTRIBUTES",
        value_delimiter = ','
    )]
    pub resource_attributes: Vec<String>,

    /// Kubernetes: keep a Node Feature Discovery feature file here (e.g.
    /// /etc/kubernetes/node-feature-discovery/features.d/modeld), so the node gets
    /// labels such as modeld.io/runtime.llama-cpp and modeld.io/model.ID=ready.
    #[arg(long, env = "MODELD_NFD_FEATURES_FILE")]
    pub nfd_features_file: Option<PathBuf>,

    /// Testing and simulation: a TOML file that makes the agent report another
    /// device (class, OS, memory, accelerators) and budget its memory, so a fleet of
    /// different devices can run on one machine. Everything else stays real.
    #[arg(long, env = "MODELD_DEVICE_PROFILE")]
    pub device_profile: Option<PathBuf>,
}

/// How the agent takes part in a fleet (`--fleet`).
#[derive(Clone, Default)]
pub struct FleetSettings {
    pub url: String,
    /// host:port peers of the site read blobs from; `None` = the listen address.
    pub advertise: Option<String>,
    pub site: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub token: Option<String>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

impl std::fmt::Debug for FleetSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetSettings")
            .field("url", &self.url)
            .field("advertise", &self.advertise)
            .field("site", &self.site)
            .field("labels", &self.labels)
            .field("token", &self.token.as_ref().map(|_| "redacted"))
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .finish_non_exhaustive()
    }
}

/// Parses "KEY=VALUE" labels: keys are 1-63 characters of [a-z0-9._/-], values at
/// most 63 printable characters.
pub fn parse_labels<'a>(
    items: impl IntoIterator<Item = &'a str>,
) -> std::result::Result<std::collections::BTreeMap<String, String>, String> {
    let mut out = std::collections::BTreeMap::new();
    for item in items {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("label {item:?} is not KEY=VALUE"))?;
        let (key, value) = (key.trim(), value.trim());
        let key_ok = (1..=63).contains(&key.len())
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._/-".contains(&b));
        if !key_ok {
            return Err(format!(
                "label key {key:?} must be 1-63 characters of a-z, 0-9, '.', '_', '/', '-'"
            ));
        }
        if value.len() > 63 || value.chars().any(char::is_control) {
            return Err(format!(
                "label {key:?}: the value must be at most 63 printable characters"
            ));
        }
        out.insert(key.to_owned(), value.to_owned());
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    Bytes(u64),
    /// Share of physical memory, in (0, 1].
    Fraction(f64),
}

impl MemoryBudget {
    pub fn resolve(self, physical: u64) -> u64 {
        match self {
            MemoryBudget::Bytes(b) => b,
            // Physical memory fits in f64's 53-bit mantissa for any real machine.
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            MemoryBudget::Fraction(f) => (physical as f64 * f) as u64,
        }
    }
}

impl FromStr for MemoryBudget {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(pct) = s.strip_suffix('%') {
            let v: f64 = pct
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percentage like \"75%\""))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("{s:?} must be between 0% and 100%"));
            }
            return Ok(MemoryBudget::Fraction(v / 100.0));
        }
        let size: ByteSize = s
            .parse()
            .map_err(|e| format!("{s:?} is not a size like \"300MB\" or \"4GiB\": {e}"))?;
        if size.as_u64() == 0 {
            return Err("a memory budget of 0 would refuse every model".into());
        }
        Ok(MemoryBudget::Bytes(size.as_u64()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Where loaded models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineIsolation {
    /// One engine process per loaded model, confined to the model's files.
    #[default]
    Process,
    /// Inside the agent: a crash in a runtime ends the agent.
    InProcess,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!("{s:?} is not a log format; use text or json")),
        }
    }
}

/// Reads and checks a device profile (TOML).
fn read_profile(path: &Path) -> Result<modeld_node::hardware::DeviceProfile> {
    let bad = |e: String| Error::Config(format!("device profile {}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let profile: modeld_node::hardware::DeviceProfile =
        toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    profile.validate().map_err(bad)?;
    Ok(profile)
}

/// The TOML file's shape: every key optional, unknown keys refused (a typo must not
/// silently fall back to a default).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    memory_budget: Option<String>,
    disk_quota: Option<String>,
    origin_rate_limit: Option<String>,
    serve_rate_limit: Option<String>,
    models_dirs: Option<Vec<PathBuf>>,
    allow_dirs: Option<Vec<PathBuf>>,
    tokens_file: Option<PathBuf>,
    insecure: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    max_concurrent_rpcs: Option<usize>,
    max_streams_per_connection: Option<u32>,
    reflection: Option<bool>,
    peer_tls_ca: Option<PathBuf>,
    peer_tls_cert: Option<PathBuf>,
    peer_tls_key: Option<PathBuf>,
    peer_token: Option<String>,
    source_allow_hosts: Option<Vec<String>>,
    source_deny_hosts: Option<Vec<String>>,
    scan_on_start: Option<bool>,
    log: Option<String>,
    log_format: Option<LogFormat>,
    shutdown_grace_secs: Option<u64>,
    max_concurrent_downloads: Option<usize>,
    parallel: Option<u32>,
    keep_alive_secs: Option<i64>,
    memory_pressure_threshold: Option<f64>,
    onnxruntime_library: Option<PathBuf>,
    litert_library: Option<PathBuf>,
    litert_lm_library: Option<PathBuf>,
    llama_cpu_variants_dir: Option<PathBuf>,
    engine_isolation: Option<EngineIsolation>,
    max_queued_requests: Option<usize>,
    threads: Option<u32>,
    context_length: Option<u32>,
    stall_timeout_ms: Option<u64>,
    download_retries: Option<usize>,
    retry_delay_ms: Option<u64>,
    extract_max_bytes: Option<String>,
    extract_max_entries: Option<usize>,
    extract_max_ratio: Option<u64>,
    /// host → header name → value
    source_headers:
        Option<std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>,
    hf_token: Option<String>,
    fleet: Option<String>,
    site: Option<String>,
    labels: Option<std::collections::BTreeMap<String, String>>,
    fleet_token: Option<String>,
    fleet_tls_ca: Option<PathBuf>,
    fleet_tls_cert: Option<PathBuf>,
    fleet_tls_key: Option<PathBuf>,
    fleet_advertise: Option<String>,
    device_profile: Option<PathBuf>,
    nfd_features_file: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    openai_listen: Option<SocketAddr>,
    otlp_endpoint: Option<String>,
    otlp_protocol: Option<OtlpProtocol>,
    /// header name → value
    otlp_headers: Option<std::collections::BTreeMap<String, String>>,
    otlp_export_interval_ms: Option<u64>,
    resource_attributes: Option<std::collections::BTreeMap<String, String>>,
}

/// The wire OTLP is exported over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "grpc" => Ok(OtlpProtocol::Grpc),
            "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
            other => Err(format!(
                "OTLP protocol {other:?}: use grpc or http/protobuf (http/json is not built in)"
            )),
        }
    }
}

/// Where and how traces and metrics leave the agent. Headers may hold credentials:
/// Debug shows their names only.
#[derive(Clone, Default)]
pub struct TelemetrySettings {
    /// `None`: only the standard OTEL_EXPORTER_OTLP_* variables can turn export on.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: Option<OtlpProtocol>,
    pub otlp_headers: Vec<(String, String)>,
    pub otlp_export_interval: Option<Duration>,
    pub resource_attributes: Vec<(String, String)>,
}

impl std::fmt::Debug for TelemetrySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetrySettings")
            .field("otlp_endpoint", &self.otlp_endpoint)
            .field("otlp_protocol", &self.otlp_protocol)
            .field(
                "otlp_headers",
                &self.otlp_headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .field("otlp_export_interval", &self.otlp_export_interval)
            .field("resource_attributes", &self.resource_attributes)
            .finish()
    }
}

/// Splits "KEY=VALUE" items; `what` names them in the error.
fn key_values(
    what: &str,
    file: Option<std::collections::BTreeMap<String, String>>,
    flags: Vec<String>,
) -> Result<Vec<(String, String)>> {
    // The file's first, so a flag's value for a key wins.
    let mut out: std::collections::BTreeMap<String, String> = file.unwrap_or_default();
    for item in flags {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.trim().is_empty())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{what}: an item is not KEY=VALUE (value not shown)"
                ))
            })?;
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out.into_iter().collect())
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub memory_budget: MemoryBudget,
    /// None = no quota.
    pub disk_quota: Option<u64>,
    /// Bytes per second origin downloads may take together; `None` = no limit.
    pub origin_rate_limit: Option<u64>,
    /// Bytes per second served to peers together; `None` = no limit.
    pub serve_rate_limit: Option<u64>,
    pub models_dirs: Vec<PathBuf>,
    /// Where requests may name local files, besides `models_dirs`.
    pub allow_dirs: Vec<PathBuf>,
    /// Accepted bearer tokens; `None` = no credentials (loopback only).
    pub tokens_file: Option<PathBuf>,
    /// Serve a non-loopback address without TLS and credentials.
    pub insecure: bool,
    /// TLS for the listener; `None` = plaintext.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Serve reflection; `None` = only on a loopback address.
    pub reflection: Option<bool>,
    /// Which hosts remote sources may reach.
    pub source_hosts: modeld_node::http_client::HostPolicy,
    /// How peers (`modeld://` sources) are reached.
    pub peers: PeerSettings,
    /// RPCs served at once; one more is RESOURCE_EXHAUSTED.
    pub max_concurrent_rpcs: usize,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    pub scan_on_start: bool,
    pub log: String,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub max_concurrent_downloads: usize,
    pub inference: modeld_node::inference::InferenceSettings,
    /// PSI percent above which idle models are evicted; `None` = never.
    pub memory_pressure_threshold: Option<f64>,
    /// libonnxruntime for the onnx engine; `None` = `ORT_DYLIB_PATH`.
    pub onnxruntime_library: Option<PathBuf>,
    /// libLiteRt for the litert engine; `None` = `LITERT_LIBRARY`.
    pub litert_library: Option<PathBuf>,
    /// liblitert-lm for `.litertlm` bundles; `None` = `LITERT_LM_LIBRARY`.
    pub litert_lm_library: Option<PathBuf>,
    /// llama.cpp's CPU variants; `None` = packaged beside the binary, else the build's.
    pub llama_cpu_variants_dir: Option<PathBuf>,
    pub engine_isolation: EngineIsolation,
    pub stall_timeout: Duration,
    pub download_retries: usize,
    pub retry_delay: Duration,
    pub extract: modeld_node::storage::extract::Limits,
    /// Extra headers per source host; their values never print.
    pub source_headers: modeld_node::storage::source::HostHeaders,
    /// The site this device belongs to (`--site`); empty = none.
    pub site: String,
    /// The device's labels (`--label`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The fleet controller this agent reports to; `None` = standalone.
    pub fleet: Option<FleetSettings>,
    /// The device this agent reports instead of itself (simulation and tests).
    pub device_profile: Option<modeld_node::hardware::DeviceProfile>,
    /// Node Feature Discovery feature file to keep current.
    pub nfd_features_file: Option<PathBuf>,
    /// Where `/metrics` is served; `None` = nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Where the OpenAI-compatible HTTP API is served; `None` = nowhere.
    pub openai_listen: Option<SocketAddr>,
    /// OTLP export of traces and metrics.
    pub telemetry: TelemetrySettings,
}

impl Config {
    /// Merges flags/env over the config file over defaults.
    pub fn load(args: Args) -> Result<Config> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let bad = |key: &str, e: String| Error::Config(format!("config file: {key}: {e}"));
        let file_budget = file
            .memory_budget
            .as_deref()
            .map(MemoryBudget::from_str)
            .transpose()
            .map_err(|e| bad("memory_budget", e))?;
        // A size the flag gives, else the file; 0 (or neither) = none.
        let size_limit = |key: &str, flag: Option<ByteSize>, file: Option<&str>| {
            let file = file
                .map(ByteSize::from_str)
                .transpose()
                .map_err(|e| bad(key, e))?;
            Ok::<_, Error>(flag.or(file).map(|b| b.as_u64()).filter(|b| *b > 0))
        };
        let disk_quota = size_limit("disk_quota", args.disk_quota, file.disk_quota.as_deref())?;
        let origin_rate_limit = size_limit(
            "origin_rate_limit",
            args.origin_rate_limit,
            file.origin_rate_limit.as_deref(),
        )?;
        let serve_rate_limit = size_limit(
            "serve_rate_limit",
            args.serve_rate_limit,
            file.serve_rate_limit.as_deref(),
        )?;
        let listen = match args.listen.or(file.listen) {
            Some(l) => l,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|e| Error::Config(format!("default listen address: {e}")))?,
        };
        let data_dir = absolute(
            args.data_dir
                .or(file.data_dir)
                .unwrap_or_else(default_data_dir),
        )?;
        let models_dirs = if args.models_dirs.is_empty() {
            file.models_dirs.unwrap_or_default()
        } else {
            args.models_dirs
        };
        let models_dirs = models_dirs
            .into_iter()
            .map(absolute)
            .collect::<Result<Vec<_>>>()?;
        let allow_dirs = if args.allow_dirs.is_empty() {
            file.allow_dirs.unwrap_or_default()
        } else {
            args.allow_dirs
        }
        .into_iter()
        .map(absolute)
        .collect::<Result<Vec<_>>>()?;
        // The file's labels first, so a flag's value for a key wins.
        let mut items: Vec<String> = file
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        items.extend(args.labels.iter().cloned());
        let labels = parse_labels(items.iter().map(String::as_str))
            .map_err(|e| Error::Config(format!("labels: {e}")))?;
        let site = args.site.clone().or(file.site.clone()).unwrap_or_default();
        Ok(Config {
            listen,
            data_dir,
            memory_budget: args
                .memory_budget
                .or(file_budget)
                .unwrap_or(MemoryBudget::Fraction(DEFAULT_MEMORY_FRACTION)),
            disk_quota,
            origin_rate_limit,
            serve_rate_limit,
            models_dirs,
            allow_dirs,
            tokens_file: args
                .tokens_file
                .or(file.tokens_file)
                .map(absolute)
                .transpose()?,
            insecure: args.insecure || file.insecure.unwrap_or(false),
            reflection: args.reflection.or(file.reflection),
            peers: PeerSettings {
                tls_ca: args.peer_tls_ca.or(file.peer_tls_ca),
                tls_cert: args.peer_tls_cert.or(file.peer_tls_cert),
                tls_key: args.peer_tls_key.or(file.peer_tls_key),
                token: args.peer_token.or(file.peer_token),
            },
            source_hosts: modeld_node::http_client::HostPolicy::new(
                if args.source_allow_hosts.is_empty() {
                    file.source_allow_hosts.unwrap_or_default()
                } else {
                    args.source_allow_hosts
                },
                if args.source_deny_hosts.is_empty() {
                    file.source_deny_hosts.unwrap_or_default()
                } else {
                    args.source_deny_hosts
                },
            ),
            max_concurrent_rpcs: args
                .max_concurrent_rpcs
                .or(file.max_concurrent_rpcs)
                .unwrap_or(DEFAULT_MAX_CONCURRENT_RPCS)
                .max(1),
            max_streams_per_connection: args
                .max_streams_per_connection
                .or(file.max_streams_per_connection)
                .unwrap_or(128)
                .max(1),
            tls: match (
                args.tls_cert.or(file.tls_cert),
                args.tls_key.or(file.tls_key),
                args.tls_client_ca.or(file.tls_client_ca),
            ) {
                (Some(cert), Some(key), client_ca) => Some(crate::tls::TlsFiles {
                    cert: absolute(cert)?,
                    key: absolute(key)?,
                    client_ca: client_ca.map(absolute).transpose()?,
                }),
                (None, None, None) => None,
                _ => {
                    return Err(Error::Config(
                        "TLS needs both a certificate and a key (--tls-cert, --tls-key); a \
                         client CA needs them too"
                            .into(),
                    ));
                }
            },
            scan_on_start: args.scan_on_start.or(file.scan_on_start).unwrap_or(true),
            log: args.log.or(file.log).unwrap_or_else(|| "info".to_owned()),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            shutdown_grace: args
                .shutdown_grace_secs
                .or(file.shutdown_grace_secs)
                .map_or(DEFAULT_SHUTDOWN_GRACE, Duration::from_secs),
            max_concurrent_downloads: args
                .max_concurrent_downloads
                .or(file.max_concurrent_downloads)
                .unwrap_or(2)
                .max(1),
            onnxruntime_library: args.onnxruntime_library.or(file.onnxruntime_library),
            litert_library: args.litert_library.or(file.litert_library),
            litert_lm_library: args.litert_lm_library.or(file.litert_lm_library),
            llama_cpu_variants_dir: args.llama_cpu_variants_dir.or(file.llama_cpu_variants_dir),
            engine_isolation: args
                .engine_isolation
                .or(file.engine_isolation)
                .unwrap_or_default(),
            memory_pressure_threshold: match args
                .memory_pressure_threshold
                .or(file.memory_pressure_threshold)
                .unwrap_or(modeld_node::inference::reaper::PRESSURE_THRESHOLD)
            {
                t if t.is_finite() && t > 0.0 => Some(t),
                _ => None,
            },
            inference: modeld_node::inference::InferenceSettings {
                parallel: args.parallel.or(file.parallel).unwrap_or(4).clamp(1, 64),
                max_queued: args
                    .max_queued_requests
                    .or(file.max_queued_requests)
                    .unwrap_or(8),
                threads: args.threads.or(file.threads).unwrap_or(0),
                context_length: args.context_length.or(file.context_length).unwrap_or(0),
                // Resolved against physical memory once the hardware is probed.
                memory_budget: u64::MAX,
                keep_alive: modeld_node::memory::KeepAlive::from_secs(
                    args.keep_alive_secs.or(file.keep_alive_secs).unwrap_or(300),
                ),
            },
            stall_timeout: Duration::from_millis(
                args.stall_timeout_ms
                    .or(file.stall_timeout_ms)
                    .unwrap_or(30_000)
                    .max(1),
            ),
            download_retries: args.download_retries.or(file.download_retries).unwrap_or(5),
            retry_delay: Duration::from_millis(
                args.retry_delay_ms
                    .or(file.retry_delay_ms)
                    .unwrap_or(500)
                    .max(1),
            ),
            extract: {
                let defaults = modeld_node::storage::extract::Limits::default();
                let file_bytes = file
                    .extract_max_bytes
                    .as_deref()
                    .map(ByteSize::from_str)
                    .transpose()
                    .map_err(|e| bad("extract_max_bytes", e))?;
                modeld_node::storage::extract::Limits {
                    max_bytes: args
                        .extract_max_bytes
                        .or(file_bytes)
                        .map_or(defaults.max_bytes, |b| b.as_u64()),
                    max_entries: args
                        .extract_max_entries
                        .or(file.extract_max_entries)
                        .unwrap_or(defaults.max_entries),
                    max_ratio: args
                        .extract_max_ratio
                        .or(file.extract_max_ratio)
                        .unwrap_or(defaults.max_ratio),
                }
            },
            source_headers: source_headers(
                &args.source_headers,
                file.source_headers.as_ref(),
                args.hf_token.or(file.hf_token),
            )?,
            site: site.clone(),
            labels: labels.clone(),
            fleet: match args.fleet.or(file.fleet) {
                None => None,
                Some(url) => {
                    let parsed = url::Url::parse(&url)
                        .map_err(|e| Error::Config(format!("--fleet {url:?}: {e}")))?;
                    if !matches!(parsed.scheme(), "http" | "https") {
                        return Err(Error::Config(format!(
                            "--fleet {url:?}: use an http:// or https:// address"
                        )));
                    }
                    Some(FleetSettings {
                        url,
                        advertise: args.fleet_advertise.or(file.fleet_advertise),
                        site,
                        labels,
                        token: args.fleet_token.or(file.fleet_token),
                        tls_ca: args
                            .fleet_tls_ca
                            .or(file.fleet_tls_ca)
                            .map(absolute)
                            .transpose()?,
                        tls_cert: args
                            .fleet_tls_cert
                            .or(file.fleet_tls_cert)
                            .map(absolute)
                            .transpose()?,
                        tls_key: args
                            .fleet_tls_key
                            .or(file.fleet_tls_key)
                            .map(absolute)
                            .transpose()?,
                    })
                }
            },
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            openai_listen: args.openai_listen.or(file.openai_listen),
            telemetry: TelemetrySettings {
                otlp_endpoint: args.otlp_endpoint.or(file.otlp_endpoint),
                otlp_protocol: args.otlp_protocol.or(file.otlp_protocol),
                otlp_headers: key_values("otlp headers", file.otlp_headers, args.otlp_headers)?,
                otlp_export_interval: args
                    .otlp_export_interval_ms
                    .or(file.otlp_export_interval_ms)
                    .map(|ms| {
                        if ms == 0 {
                            Err(Error::Config(
                                "otlp_export_interval_ms must be above 0".into(),
                            ))
                        } else {
                            Ok(Duration::from_millis(ms))
                        }
                    })
                    .transpose()?,
                resource_attributes: key_values(
                    "resource attributes",
                    file.resource_attributes,
                    args.resource_attributes,
                )?,
            },
            nfd_features_file: args
                .nfd_features_file
                .or(file.nfd_features_file)
                .map(absolute)
                .transpose()?,
            device_profile: match args.device_profile.or(file.device_profile) {
                None => None,
                Some(path) => Some(read_profile(&path)?),
            },
        })
    }
}

fn source_headers(
    flags: &[String],
    file: Option<&std::collections::BTreeMap<String, std::collections::BTreeMap<String, String>>>,
    hf_token: Option<String>,
) -> Result<modeld_node::storage::source::HostHeaders> {
    use reqwest::header::{HeaderName, HeaderValue};
    let mut out = modeld_node::storage::source::HostHeaders::default();
    let mut add = |host: &str, name: &str, value: &str| -> Result<()> {
        let bad = |what: &str| {
            Error::Config(format!(
                "source header for {host:?}: invalid {what} (value not shown)"
            ))
        };
        let name =
            HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad("header name"))?;
        let value = HeaderValue::from_str(value.trim()).map_err(|_| bad("header value"))?;
        out.insert(host.trim(), name, value);
        Ok(())
    };
    if let Some(file) = file {
        for (host, headers) in file {
            for (name, value) in headers {
                add(host, name, value)?;
            }
        }
    }
    for flag in flags {
        let (host, header) = flag
            .split_once('=')
            .ok_or_else(|| Error::Config("--source-header takes HOST=Header-Name: value".into()))?;
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| Error::Config("--source-header takes HOST=Header-Name: value".into()))?;
        add(host, name, value)?;
    }
    if let Some(token) = hf_token.filter(|t| !t.trim().is_empty()) {
        add(
            "huggingface.co",
            "authorization",
            &format!("Bearer {}", token.trim()),
        )?;
    }
    Ok(out)
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Error::Config(format!("config file {}: {e}", path.display())))
}

fn absolute(p: PathBuf) -> Result<PathBuf> {
    std::path::absolute(&p)
        .map_err(|e| Error::Config(format!("cannot resolve path {}: {e}", p.display())))
}

fn default_data_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if cfg!(target_vendor = "apple")
        && let Some(home) = &home
    {
        return home.join("Library/Application Support/modeld");
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(xdg).join("modeld");
    }
    match home {
        Some(home) => home.join(".local/share/modeld"),
        None => PathBuf::from("modeld-data"),
    }
}

/// Where the peer credentials are (`--peer-tls-ca`, `--peer-tls-cert`,
/// `--peer-tls-key`, `--peer-token`).
#[derive(Clone, Default)]
pub struct PeerSettings {
    pub tls_ca: Option<std::path::PathBuf>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub token: Option<String>,
}

impl std::fmt::Debug for PeerSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSettings")
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("token", &self.token.as_ref().map(|_| "redacted"))
            .finish()
    }
}

/// The most RPCs the agent serves at once, streams included, unless configured.
pub const DEFAULT_MAX_CONCURRENT_RPCS: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("modeld.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn flags_win_over_file_and_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "listen = \"127.0.0.1:9000\"\nmemory_budget = \"300MB\"\ndisk_quota = \"1GB\"\nlog = \"debug\"\n",
        );
        let args = Args {
            config: Some(path),
            listen: Some("127.0.0.1:9100".parse().unwrap()),
            ..Args::default()
        };
        let c = Config::load(args).unwrap();
        assert_eq!(c.listen.port(), 9100);
        assert_eq!(c.memory_budget, MemoryBudget::Bytes(300_000_000));
        assert_eq!(c.disk_quota, Some(1_000_000_000));
        assert_eq!(c.log, "debug");
        assert!(c.scan_on_start);
    }

    #[test]
    fn env_wins_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "log = \"debug\"\n");
        // clap resolves env itself; parse a fake command line with the env set for it.
        let args = Args::try_parse_from(["modeld", "--config", path.to_str().unwrap()]).unwrap();
        let args = Args {
            log: Some("warn".into()),
            ..args
        };
        assert_eq!(Config::load(args).unwrap().log, "warn");
    }

    #[test]
    fn unknown_file_keys_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "memory_budjet = \"1GB\"\n");
        let err = Config::load(Args {
            config: Some(path),
            ..Args::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("memory_budjet"), "{err}");
    }

    #[test]
    fn memory_budget_parses_sizes_and_percentages() {
        assert_eq!("300MB".parse(), Ok(MemoryBudget::Bytes(300_000_000)));
        assert_eq!("1GiB".parse(), Ok(MemoryBudget::Bytes(1 << 30)));
        assert_eq!("50%".parse(), Ok(MemoryBudget::Fraction(0.5)));
        assert!("150%".parse::<MemoryBudget>().is_err());
        assert!("lots".parse::<MemoryBudget>().is_err());
        assert_eq!(MemoryBudget::Fraction(0.5).resolve(1000), 500);
    }

    #[test]
    fn zero_quota_means_none() {
        let c = Config::load(Args {
            disk_quota: Some(ByteSize::b(0)),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(c.disk_quota, None);
    }

    #[test]
    fn the_onnxruntime_library_comes_from_the_file_unless_a_flag_names_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("modeld.toml");
        std::fs::write(
            &file,
            "onnxruntime_library = \"/opt/ort/libonnxruntime.so\"\n",
        )
        .unwrap();
        let from_file = Config::load(Args {
            config: Some(file.clone()),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(
            from_file.onnxruntime_library,
            Some(PathBuf::from("/opt/ort/libonnxruntime.so"))
        );
        let flag = Config::load(Args {
            config: Some(file),
            onnxruntime_library: Some(PathBuf::from("/usr/lib/libonnxruntime.so")),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(
            flag.onnxruntime_library,
            Some(PathBuf::from("/usr/lib/libonnxruntime.so"))
        );
    }
}

#[cfg(test)]
mod deploy_example_tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/modeld.toml");
        let c = Config::load(Args {
            config: Some(path),
            ..Args::default()
        })
        .unwrap();
        assert_eq!(c.disk_quota, Some(40_000_000_000));
        assert_eq!(c.models_dirs, [PathBuf::from("/srv/models")]);
        assert_eq!((c.inference.parallel, c.inference.max_queued), (4, 8));
        assert_eq!(
            c.inference.keep_alive,
            modeld_node::memory::KeepAlive::For(Duration::from_secs(300))
        );
        assert_eq!(c.memory_pressure_threshold, Some(10.0));
    }
}

#[cfg(test)]
mod fleet_config_tests {
    use super::*;

    #[test]
    fn the_shipped_device_profiles_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/fleet/profiles");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let profile = read_profile(&path).unwrap();
            assert!(profile.memory_budget.is_some(), "{}", path.display());
            seen += 1;
        }
        assert_eq!(seen, 3);
    }

    #[test]
    fn otlp_settings_merge_flags_over_the_file_and_never_show_header_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("modeld.toml");
        std::fs::write(
            &file,
            "otlp_endpoint = \"http://file:4317\"\notlp_protocol = \"http/protobuf\"\n\
             otlp_export_interval_ms = 5000\n\
             [otlp_headers]\nx-api-key = \"from-file\"\nx-tenant = \"t1\"\n\
             [resource_attributes]\n\"deployment.environment\" = \"prod\"\n",
        )
        .unwrap();
        let config = Config::load(Args {
            config: Some(file.clone()),
            otlp_headers: vec!["x-api-key=from-flag".into()],
            resource_attributes: vec!["team=edge".into()],
            ..Args::default()
        })
        .unwrap();
        let t = &config.telemetry;
        assert_eq!(t.otlp_endpoint.as_deref(), Some("http://file:4317"));
        assert_eq!(t.otlp_protocol, Some(OtlpProtocol::HttpProtobuf));
        assert_eq!(t.otlp_export_interval, Some(Duration::from_secs(5)));
        assert_eq!(
            t.otlp_headers,
            vec![
                ("x-api-key".to_owned(), "from-flag".to_owned()),
                ("x-tenant".to_owned(), "t1".to_owned())
            ]
        );
        assert_eq!(t.resource_attributes.len(), 2);
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("from-flag") && !shown.contains("t1\""),
            "{shown}"
        );
        assert!(shown.contains("x-api-key"), "{shown}");

        let bad = |args: Args| Config::load(args).unwrap_err().to_string();
        assert!(
            bad(Args {
                otlp_headers: vec!["no-equals-sign".into()],
                ..Args::default()
            })
            .contains("KEY=VALUE")
        );
        assert!(
            bad(Args {
                otlp_export_interval_ms: Some(0),
                ..Args::default()
            })
            .contains("above 0")
        );
        assert!(
            "http/json"
                .parse::<OtlpProtocol>()
                .unwrap_err()
                .contains("grpc")
        );
    }

    #[test]
    fn fleet_flags_and_labels_are_checked() {
        let config = |args: Args| Config::load(args).map(|c| c.fleet);
        let fleet = config(Args {
            fleet: Some("http://127.0.0.1:7800".into()),
            site: Some("lab".into()),
            labels: vec!["tier=edge".into(), "zone=a".into()],
            ..Args::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(fleet.site, "lab");
        assert_eq!(fleet.labels.get("tier").map(String::as_str), Some("edge"));
        let bad = |args: Args| config(args).unwrap_err().to_string();
        assert!(
            bad(Args {
                fleet: Some("ftp://x".into()),
                ..Args::default()
            })
            .contains("http://")
        );
        assert!(
            bad(Args {
                fleet: Some("http://x".into()),
                labels: vec!["Tier=edge".into()],
                ..Args::default()
            })
            .contains("label key")
        );
        assert!(
            bad(Args {
                fleet: Some("http://x".into()),
                labels: vec!["noequals".into()],
                ..Args::default()
            })
            .contains("KEY=VALUE")
        );
        // A token never shows in the settings' debug output.
        let with_token = config(Args {
            fleet: Some("http://x".into()),
            fleet_token: Some("s3cret".into()),
            ..Args::default()
        })
        .unwrap()
        .unwrap();
        assert!(!format!("{with_token:?}").contains("s3cret"));
    }
}
