//! The container image (deploy/container), built and run for real with podman. No
//! container registry is reachable here, so build-image makes the root filesystem from
//! Debian packages with mmdebstrap and the Containerfile starts FROM scratch; the test
//! builds the image from this build's binaries (scripts/package --from), checks what
//! is in it (every library the agent, its llama.cpp CPU variants and ONNX Runtime load
//! resolves inside the image), starts it with its data directory on a named volume,
//! waits for gRPC health, pushes the SmolLM2 GGUF into it, loads it and generates,
//! loads an ONNX model through the image's ONNX Runtime, then restarts the container
//! and replaces it by a new one on the same volume: the model is still stored, loads
//! without a push and generates the same greedy tokens.
//!
//! Skipped, saying so, only where podman is not installed (scripts/setup installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use modeld_e2e::{Assets, Client, SMOLLM2_SHA256, binary, pb};

/// The built-in catalog's model: the test GGUF is the same file, pushed (the catalog's
/// source is not reachable from here).
const MODEL: &str = "smollm2-135m-instruct";

/// How containers are run, and why each flag. `--runtime runc`: crun 1.8 (Debian 12's
/// default) refuses hybrid cgroup hierarchies, such as this VM's (cgroup v1 with a
/// cgroup2 mount holding a controller: "cgroups in hybrid mode not supported, drop all
/// controllers from cgroupv2"); runc runs on v1, hybrid and v2 alike. The ulimits:
/// podman asks for 1048576 open files and 32768 processes, and setting a limit above
/// the caller's hard limit needs CAP_SYS_RESOURCE, which root lacks in this VM
/// ("setrlimit `RLIMIT_NOFILE`: Operation not permitted"); these are below any hard
/// limit and ample for an agent. `--pull=never`: the image is local, never fetched.
const RUN_FLAGS: &[&str] = &[
    "--pull=never",
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=8192:8192",
    "--ulimit",
    "nproc=8192:8192",
];

const START_TIMEOUT: Duration = Duration::from_secs(60);

fn podman(args: &[&str]) -> Output {
    Command::new("podman")
        .args(args)
        .output()
        .expect("run podman")
}

/// Runs podman; panics with its output unless it succeeds. Returns stdout.
fn podman_ok(args: &[&str]) -> String {
    let out = podman(args);
    assert!(
        out.status.success(),
        "podman {}: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The container's output so far (the agent logs to stderr).
fn logs(name: &str) -> String {
    let out = podman(&["logs", name]);
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Removes what the test made, also when it fails: the container, the volume, the
/// image (and with it the layers only it used).
struct Cleanup {
    container: String,
    volume: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = podman(&["rm", "--force", "--time", "0", self.container.as_str()]);
        let _ = podman(&["volume", "rm", "--force", self.volume.as_str()]);
        let _ = podman(&["rmi", "--force", self.image.as_str()]);
    }
}

/// A TCP port free on loopback now. The container shares the host's network and
/// listens there on loopback, which needs neither TLS nor --insecure.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the agent's container (`podman run -d`), as an operator would on one host.
fn run_container(name: &str, volume: &str, image: &str, port: u16, onnx_dir: &Path) {
    let listen = format!("MODELD_LISTEN=127.0.0.1:{port}");
    let data = format!("{volume}:/var/lib/modeld");
    let models = format!("{}:/models/smollm2-onnx:ro", onnx_dir.display());
    let mut args = vec!["run", "--detach", "--name", name];
    args.extend_from_slice(RUN_FLAGS);
    args.extend_from_slice(&[
        "--network",
        "host",
        "--volume",
        data.as_str(),
        "--volume",
        models.as_str(),
        "--env",
        listen.as_str(),
        "--env",
        "MODELD_INSECURE=false",
        "--env",
        "MODELD_ALLOW_DIRS=/models",
        image,
    ]);
    podman_ok(&args);
}

/// Waits until the agent in `name` reports SERVING on gRPC health; panics with the
/// container's log if it exits or never does.
async fn wait_serving(name: &str, url: &str) -> Client {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(client) = Client::connect(url).await
            && client.is_serving().await.unwrap_or(false)
        {
            return client;
        }
        let running = podman_ok(&["inspect", "--format", "{{.State.Running}}", name]);
        assert_eq!(
            running.trim(),
            "true",
            "the container exited; log:\n{}",
            logs(name)
        );
        assert!(
            Instant::now() < deadline,
            "the agent never reported SERVING; log:\n{}",
            logs(name)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `modelctl --addr URL ARGS`; panics with its output unless it succeeds.
fn modelctl(url: &str, args: &[&str]) -> String {
    let out = Command::new(binary("modelctl"))
        .arg("--addr")
        .arg(url)
        .args(args)
        .output()
        .expect("run modelctl");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "modelctl {}: {stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A proto3 JSON integer: a number, or a string for 64-bit fields.
fn int(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        .unwrap_or_else(|| panic!("not an integer: {v}"))
}

/// Greedy generation through `modelctl -o json generate`: the token ids.
fn generate(url: &str, model: &str) -> Vec<u64> {
    let out = modelctl(
        url,
        &[
            "-o",
            "json",
            "generate",
            model,
            "--temperature",
            "0",
            "--max-tokens",
            "4",
            "The capital of France is",
        ],
    );
    let mut ids = Vec::new();
    let mut summary = None;
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let event: Value = serde_json::from_str(line).unwrap();
        if let Some(token) = event.get("token") {
            // proto3 JSON leaves out zeros: no tokenId is token 0.
            ids.push(token.get("tokenId").map_or(0, int));
        } else if let Some(s) = event.get("summary") {
            summary = Some(s.clone());
        }
    }
    let summary = summary.unwrap_or_else(|| panic!("no summary in: {out}"));
    assert!(!ids.is_empty(), "{model} generated nothing: {out}");
    assert_eq!(
        int(&summary["usage"]["generatedTokens"]),
        ids.len() as u64,
        "{out}"
    );
    ids
}

/// The model is stored, complete, on the node (its data directory).
fn assert_stored(url: &str) {
    let storage: Value = serde_json::from_str(&modelctl(url, &["-o", "json", "storage"])).unwrap();
    let stored = storage["stored"]
        .as_array()
        .and_then(|s| s.iter().find(|m| m["modelId"] == MODEL))
        .unwrap_or_else(|| panic!("{MODEL} is not stored: {storage}"));
    assert_eq!(stored["complete"], true, "{storage}");
    assert_eq!(stored["blobs"][0]["sha256"], SMOLLM2_SHA256, "{storage}");
}

/// Stops the container as podman does (SIGTERM, then SIGKILL after the grace time):
/// the agent, PID 1 in it, shuts down cleanly.
fn stop(name: &str) {
    podman_ok(&["stop", "--time", "30", name]);
    let code = podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", name]);
    assert_eq!(
        code.trim(),
        "0",
        "the agent did not exit cleanly; log:\n{}",
        logs(name)
    );
}

#[tokio::test]
async fn the_image_builds_without_a_registry_and_keeps_its_models_across_restarts() {
    let have_podman = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_podman {
        eprintln!(
            "SKIPPED: podman is not installed (scripts/setup installs it with buildah, runc \
             and mmdebstrap): the container image is not tested"
        );
        return;
    }
    let assets = Assets::get();
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let cleanup = Cleanup {
        container: format!("modeld-e2e-{unique}"),
        volume: format!("modeld-e2e-data-{unique}"),
        image: format!("localhost/modeld-e2e:{unique}"),
    };
    let (name, volume, image) = (
        cleanup.container.as_str(),
        cleanup.volume.as_str(),
        cleanup.image.as_str(),
    );

    // The image, from this build's binaries and the test assets' ONNX Runtime.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let built = binary("modeld").parent().unwrap().to_path_buf();
    let started = Instant::now();
    let out = Command::new(root.join("deploy/container/build-image"))
        .arg("--from")
        .arg(&built)
        .arg("--onnxruntime")
        .arg(&assets.ort_lib)
        .arg("--litert")
        .arg(&assets.litert_lib)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build-image: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), image);
    eprintln!("image built in {:.1?}", started.elapsed());

    // What the image says about itself.
    let inspect: Value = serde_json::from_str(&podman_ok(&["image", "inspect", image])).unwrap();
    let config = &inspect[0]["Config"];
    assert_eq!(config["User"], "modeld", "{config}");
    assert_eq!(config["Entrypoint"][0], "/opt/modeld/modeld", "{config}");
    assert!(
        config["Volumes"].get("/var/lib/modeld").is_some(),
        "the data directory is a volume: {config}"
    );
    let env: Vec<&str> = config["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for var in [
        "MODELD_DATA_DIR=/var/lib/modeld",
        "MODELD_ONNXRUNTIME_LIBRARY=/opt/onnxruntime/libonnxruntime.so",
        "MODELD_LITERT_LIBRARY=/opt/litert/libLiteRt.so",
    ] {
        assert!(env.contains(&var), "{var} not in {env:?}");
    }

    // What is in it: the agent's user owns the data directory, and every library the
    // agent, modelctl, the llama.cpp CPU variants and ONNX Runtime link is found in the
    // image. The variants are loaded by the agent after libggml-base, from its own
    // directory: ldd looks there for them too.
    let script = "id -u; stat -c %u /var/lib/modeld; \
        ldd /opt/modeld/modeld /opt/modeld/modelctl /opt/onnxruntime/libonnxruntime.so \
        /opt/litert/libLiteRt.so; \
        LD_LIBRARY_PATH=/opt/modeld ldd /opt/modeld/llama-cpu-variants/*.so";
    let mut args = vec!["run", "--rm"];
    args.extend_from_slice(RUN_FLAGS);
    args.extend_from_slice(&["--entrypoint", "/bin/sh", image, "-c", script]);
    let contents = podman_ok(&args);
    let mut lines = contents.lines();
    assert_eq!(lines.next(), Some("10001"), "runs as modeld: {contents}");
    assert_eq!(
        lines.next(),
        Some("10001"),
        "modeld owns its data: {contents}"
    );
    assert!(!contents.contains("not found"), "{contents}");
    for lib in [
        "libgomp.so.1",
        "libstdc++.so.6",
        "libllama.so.0",
        "libggml-base.so.0",
    ] {
        assert!(
            contents.contains(&format!("{lib} => /")),
            "{lib}: {contents}"
        );
    }
    assert!(
        contents.contains("libllama.so.0 => /opt/modeld/libllama.so.0"),
        "{contents}"
    );
    assert!(
        contents.contains("/opt/modeld/llama-cpu-variants/libggml-cpu-"),
        "the CPU variants are in the image: {contents}"
    );

    // The agent in its container, on the volume.
    podman_ok(&["volume", "create", volume]);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    run_container(name, volume, image, port, &assets.onnx_dir);
    let client = wait_serving(name, &url).await;
    eprintln!("container serving in {:.1?}", started.elapsed());
    let agent = podman_ok(&["exec", name, "sh", "-c", "grep ^Uid: /proc/1/status"]);
    assert_eq!(
        agent.split_whitespace().nth(1),
        Some("10001"),
        "the agent runs as modeld: {agent}"
    );

    let caps = client.capabilities().await.unwrap();
    assert_eq!(caps.device_class(), pb::DeviceClass::Container, "{caps:?}");
    let runtime = |r: pb::Runtime| {
        caps.runtimes
            .iter()
            .find(|info| info.runtime() == r)
            .unwrap_or_else(|| panic!("{r:?} not in {caps:?}"))
    };
    let llama = runtime(pb::Runtime::LlamaCpp);
    assert!(llama.unavailable_reason.is_empty(), "{llama:?}");
    let variant = llama.cpu_variant.as_ref().unwrap();
    assert!(
        variant
            .module_path
            .starts_with("/opt/modeld/llama-cpu-variants/"),
        "{variant:?}"
    );
    if cfg!(feature = "onnx") {
        let onnx = runtime(pb::Runtime::OnnxRuntime);
        assert!(onnx.unavailable_reason.is_empty(), "{onnx:?}");
    }
    if cfg!(feature = "litert") {
        let litert = runtime(pb::Runtime::Tflite);
        assert!(litert.unavailable_reason.is_empty(), "{litert:?}");
        let variant = litert.cpu_variant.as_ref().unwrap();
        assert_eq!(variant.module_path, "/opt/litert/libLiteRt.so");
    }

    // Push the model (its catalog source is out of reach), load it, generate.
    let gguf = assets.gguf.display().to_string();
    let pushed = modelctl(&url, &["push", MODEL, gguf.as_str()]);
    assert!(pushed.contains("stored"), "{pushed}");
    let loaded = modelctl(&url, &["load", MODEL]);
    assert!(loaded.contains("is ready"), "{loaded}");
    let tokens = generate(&url, MODEL);
    assert_stored(&url);

    // An ONNX model from a read-only bind mount, through the image's ONNX Runtime.
    if cfg!(feature = "onnx") {
        let scanned = modelctl(&url, &["-o", "json", "scan", "/models/smollm2-onnx"]);
        assert!(scanned.contains("MODEL_FORMAT_ONNX"), "{scanned}");
        let scan: Value = serde_json::from_str(&scanned).unwrap();
        let onnx_id = scan["models"][0]["spec"]["id"].as_str().unwrap().to_owned();
        let loaded = modelctl(&url, &["load", onnx_id.as_str(), "--context-length", "512"]);
        assert!(loaded.contains("onnxruntime"), "{loaded}");
        generate(&url, &onnx_id);
        assert!(logs(name).contains("ONNX Runtime loaded"), "{}", logs(name));
    }

    // A restart of the container: the model is still there, loads without a push and
    // says the same.
    drop(client);
    stop(name);
    let started = Instant::now();
    podman_ok(&["start", name]);
    let client = wait_serving(name, &url).await;
    eprintln!("container restarted in {:.1?}", started.elapsed());
    assert_stored(&url);
    modelctl(&url, &["load", MODEL]);
    assert_eq!(generate(&url, MODEL), tokens);

    // A new container from the image on the same volume (an upgrade, say): the data
    // was on the volume, not in the old container. The model is stored, not loaded.
    drop(client);
    stop(name);
    podman_ok(&["rm", name]);
    run_container(name, volume, image, port, &assets.onnx_dir);
    let client = wait_serving(name, &url).await;
    assert_stored(&url);
    let state = client.state(MODEL, 0).await.unwrap();
    assert_eq!(state.state(), pb::ModelState::Downloaded, "{state:?}");
    modelctl(&url, &["load", MODEL]);
    assert_eq!(generate(&url, MODEL), tokens);
    drop(client);
    stop(name);
}
