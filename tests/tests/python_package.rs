//! The Python package under `client/python` (modeld-client), installed by pip the way a
//! user installs it — the build generates the stubs from the protos — and driven with
//! nothing but `import modeld_client` against real agents: register and load the real
//! model with progress while a watch follows it, stream a chat generation, tokenize
//! and detokenize, rich errors as exceptions (ErrorInfo reason, metadata, field
//! violations), cancelled and timed-out streams that free the model's only slot, and
//! TLS with tokens and client certificates.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use modeld_e2e::{Agent, AgentOptions, Assets, SMOLLM2_SHA256, SMOLLM2_SIZE};

/// A fresh virtual environment holding modeld-client, installed by pip from a copy of
/// `client/python` beside a copy of `proto/` (the layout the build expects), so the
/// build's files stay out of the checkout and apart from other tests'.
struct Venv {
    dir: tempfile::TempDir,
    python: PathBuf,
}

/// Runs `cmd`; its stdout, failing with both streams on a non-zero exit.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Copies a source tree, leaving out what builds and interpreters leave behind.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if ["build", "dist", "__pycache__"].contains(&name.as_str()) || name.ends_with(".egg-info")
        {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(&name));
        } else {
            std::fs::copy(entry.path(), to.join(&name)).unwrap();
        }
    }
}

/// Where `python` installs pure-Python packages.
fn purelib(python: &Path) -> PathBuf {
    let out = run(Command::new(python).args([
        "-c",
        "import sysconfig; print(sysconfig.get_path('purelib'))",
    ]));
    PathBuf::from(out.trim())
}

/// `pip install client/python` into a new venv, offline: the venv sees the pinned test
/// venv's packages through a `.pth` file, so pip resolves the package's dependencies
/// (grpcio, protobuf, googleapis-common-protos) against them, and builds with its
/// setuptools and grpcio-tools (`--no-build-isolation`, as nothing may be downloaded).
fn install_package() -> Venv {
    let assets = Assets::get();
    let dir = tempfile::tempdir().unwrap();
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let source = dir.path().join("src");
    copy_tree(&repo.join("client/python"), &source.join("client/python"));
    copy_tree(&repo.join("proto"), &source.join("proto"));
    let venv = dir.path().join("venv");
    run(Command::new(&assets.python)
        .args(["-m", "venv", "--without-pip"])
        .arg(&venv));
    let python = venv.join("bin/python");
    std::fs::write(
        purelib(&python).join("modeld-test-venv.pth"),
        format!("{}\n", purelib(&assets.python).display()),
    )
    .unwrap();
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--no-cache-dir",
            "--no-index",
            "--no-build-isolation",
        ])
        .arg(source.join("client/python"))
        .current_dir(dir.path()));
    Venv { dir, python }
}

/// Runs `script` with the venv's Python and `args` (`sys.argv[1:]`); returns stdout.
fn python(venv: &Venv, script: &str, args: &[String]) -> String {
    run(Command::new(&venv.python)
        .arg("-c")
        .arg(script)
        .args(args)
        .env_remove("PYTHONPATH")
        .env("PYTHONNOUSERSITE", "1")
        .current_dir(venv.dir.path()))
}

fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const FLOWS: &str = r##"
import importlib.util, sys, threading, time
import modeld_client
from modeld_client.v1 import model_pb2

# Installed into the venv, stubs included, and no top-level `modeld` package claimed.
assert "/site-packages/modeld_client/" in modeld_client.__file__, modeld_client.__file__
assert importlib.util.find_spec("modeld") is None

addr, gguf, sha256, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = modeld_client.Client(addr, timeout=30)

caps = client.capabilities()
assert caps.cpu.logical_cores >= 1 and caps.memory.total_bytes > 0, caps

# Register by file:// (the format from the file name), and find it in the registry.
model = client.register("smol", f"file://{gguf}", sha256=sha256, size_bytes=size, display_name="SmolLM2")
assert model.spec.format == model_pb2.MODEL_FORMAT_GGUF and model.spec.display_name == "SmolLM2", model
assert "smol" in [m.spec.id for m in client.models(query="smol")]
registered_at = client.state("smol").history[-1].revision

# A watch from the registration on, in a thread, until the model is READY.
events = []
watch = client.watch("smol", since_revision=registered_at)
def follow():
    for event in watch:
        events.append(event)
        if event.transition.to_state == model_pb2.MODEL_STATE_READY:
            watch.cancel()
watcher = threading.Thread(target=follow)
watcher.start()

# Load with progress: the agent pulls the file, validates it and loads it.
progress = []
loaded = client.load("smol", on_progress=progress.append)
assert loaded.model_id == "smol" and loaded.context_length > 0, loaded
stages = {modeld_client.stage_name(p.stage) for p in progress}
assert {"download", "load"} <= stages, stages
assert modeld_client.state_name(progress[-1].state) == "ready", progress[-1]
assert progress[-1].overall_progress == 1.0, progress[-1]

watcher.join(30)
assert not watcher.is_alive(), "the watch never saw READY"
assert watch.cancelled and watch.done
seen = [modeld_client.state_name(e.transition.to_state) for e in events]
assert "downloading" in seen and seen[-1] == "ready", seen
assert all(e.revision > registered_at for e in events), events

# Streaming generation from chat messages (tuples or dicts).
reply = client.generate(
    "smol",
    messages=[("system", "Answer briefly."), {"role": "user", "content": "What is the capital of France?"}],
    max_tokens=16,
    temperature=0,
)
chunks = list(reply)
assert chunks and "".join(chunks) == reply.text, chunks
assert reply.finish_reason in ("stop", "length"), reply.summary
assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.generated_tokens <= 16, reply.usage
assert reply.usage.generated_tokens == len(reply.tokens), (reply.usage, len(reply.tokens))
assert reply.request_id, "no x-request-id"

# Tokenize and detokenize round trip.
tokens = client.tokenize("smol", "Hello world")
assert len(tokens.ids) == len(tokens.pieces) >= 2, tokens
assert "".join(tokens.pieces) == "Hello world", tokens
assert client.detokenize("smol", tokens.ids) == "Hello world"

# Rich errors. NotFound, with the ErrorInfo reason and facts:
try:
    client.load("no-such-model")
    raise SystemExit("loading an unknown model succeeded")
except modeld_client.NotFoundError as e:
    assert e.reason == "MODEL_NOT_FOUND" and e.domain == "modeld", repr(e)
    assert e.metadata.get("model_id") == "no-such-model", e.metadata
    assert "no-such-model" in e.message and e.request_id, (e.message, e.request_id)
    assert isinstance(e, modeld_client.ModeldError) and e.code.name == "NOT_FOUND"
# InvalidArgument, naming the field at fault:
try:
    client.generate("smol", "Hi", temperature=9.0).collect()
    raise SystemExit("temperature 9 was accepted")
except modeld_client.InvalidArgumentError as e:
    assert e.reason == "INVALID_ARGUMENT", repr(e)
    assert [v.field for v in e.field_violations] == ["sampling.temperature"], e.field_violations
# A generation that ends with finish reason ERROR raises what its summary says:
broken = client.generate("smol", "Hi", grammar="root ::= (", max_tokens=4)
try:
    broken.collect()
    raise SystemExit("a broken grammar generated")
except modeld_client.InvalidArgumentError as e:
    assert e.reason == "INVALID_ARGUMENT" and "grammar" in e.message, repr(e)
    assert broken.finish_reason == "error", broken.summary
# FailedPrecondition on a model that is registered but not loaded, saying its state:
client.register("idle", f"file://{gguf}", sha256=sha256, size_bytes=size)
try:
    client.generate("idle", "Hi", max_tokens=4).collect()
    raise SystemExit("generated on a model that is not loaded")
except modeld_client.FailedPreconditionError as e:
    assert e.reason == "MODEL_NOT_READY", repr(e)
    assert e.metadata.get("state"), e.metadata

def wait_idle():
    for _ in range(200):
        if client.state("smol").in_flight_requests == 0:
            return
        time.sleep(0.05)
    raise SystemExit("the cancelled request still runs on the agent")

story = [("user", "Write a very long story about a lighthouse.")]
# A stream cancelled mid-way: the iteration just ends, and the agent stops the
# generation and frees the model's only slot (--parallel 1, no queue) for the next.
stream = client.generate("smol", messages=story, max_tokens=2000, temperature=0)
received = []
for text in stream:
    received.append(text)
    if len(received) == 5:
        stream.cancel()
assert len(received) == 5, len(received)
assert stream.cancelled and stream.finish_reason == "cancelled" and stream.summary is None
wait_idle()
after = client.generate("smol", messages=story, max_tokens=8, temperature=0)
after.collect()
assert after.finish_reason == "length" and after.usage.generated_tokens == 8, after.summary

# Cancelled from another thread, and by leaving a `with` block early.
stream = client.generate("smol", messages=story, max_tokens=2000, temperature=0)
threading.Timer(0.5, stream.cancel).start()
n = sum(1 for _ in stream)
assert stream.cancelled and 0 < n < 2000, n
wait_idle()
with client.generate("smol", messages=story, max_tokens=2000) as stream:
    for text in stream:
        break
assert stream.cancelled
wait_idle()

# A deadline stops the generation on the agent too.
try:
    client.generate("smol", messages=story, max_tokens=2000, temperature=0, timeout=1.0).collect()
    raise SystemExit("the generation outlived its deadline")
except modeld_client.DeadlineExceededError as e:
    assert e.code.name == "DEADLINE_EXCEEDED", repr(e)
wait_idle()
assert client.generate("smol", "Once upon a time", max_tokens=4).collect()

assert [m.model_id for m in client.loaded().models] == ["smol"]
assert client.unload("smol").state == model_pb2.MODEL_STATE_DOWNLOADED
client.close()
print("python package ok:", repr(reply.text), reply.usage.generated_tokens)
"##;

/// The common flows through the installed package against an agent with one slot and
/// no queue, so a cancelled stream that kept running would refuse the next request.
#[tokio::test]
async fn the_python_package_loads_generates_cancels_and_raises_rich_errors() {
    let assets = Assets::get();
    let venv = install_package();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--parallel".into(),
            "1".into(),
            "--max-queued-requests".into(),
            "0".into(),
            "--metrics-listen".into(),
            metrics.to_string(),
        ],
        ..AgentOptions::default()
    })
    .await;
    let stdout = python(
        &venv,
        FLOWS,
        &[
            agent.addr.to_string(),
            assets.gguf.display().to_string(),
            SMOLLM2_SHA256.to_owned(),
            SMOLLM2_SIZE.to_string(),
        ],
    );
    assert!(stdout.contains("python package ok"), "{stdout}");

    // The agent answered the three streams the client cancelled as CANCELLED.
    let cancelled = [
        "rpc_service=\"modeld.v1.Generate\"",
        "rpc_method=\"Generate\"",
        "rpc_grpc_status_code=\"1\"",
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(metrics);
        let count = sample(&text, "rpc_server_call_duration_seconds_count", &cancelled);
        if count.is_some_and(|c| c >= 3.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cancelled Generates: {count:?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SECURE: &str = r##"
import os, sys
import modeld_client
from modeld_client import TLS, Client

addr, mtls_addr, ca, token, cert, key = sys.argv[1:7]
port, mtls_port = addr.rsplit(":", 1)[1], mtls_addr.rsplit(":", 1)[1]
url = f"https://localhost:{port}"

def refused(client, error, reason):
    try:
        client.capabilities()
    except error as e:
        assert e.reason == reason, repr(e)
        return
    raise SystemExit(f"{client} answered; expected {error.__name__} {reason}")

# TLS with the test CA: no token, a wrong one, then the right one.
refused(Client(url, tls=TLS(ca=ca)), modeld_client.UnauthenticatedError, "CREDENTIALS_MISSING")
refused(Client(url, tls=TLS(ca=ca), token="not-the-token"), modeld_client.UnauthenticatedError, "CREDENTIALS_INVALID")
with Client(url, tls=TLS(ca=ca), token=token) as client:
    assert client.capabilities().cpu.logical_cores >= 1
    # The token's role is inference; registering needs operator.
    try:
        client.register("nope", "https://models.example/m.gguf", sha256="0" * 64, size_bytes=1)
        raise SystemExit("an inference token registered a model")
    except modeld_client.PermissionDeniedError as e:
        assert e.reason == "ROLE_REQUIRED", repr(e)
# The CA as PEM bytes, and the name the certificate is checked for given apart from
# the address; a name the certificate does not carry fails the handshake.
pem = open(ca, "rb").read()
with Client(f"127.0.0.1:{port}", tls=TLS(ca=pem, server_name="localhost"), token=token) as client:
    assert client.capabilities().cpu.logical_cores >= 1
# A client that checks another name, one that does not trust the agent's CA, and a
# plaintext one get nowhere.
for client in (
    Client(f"127.0.0.1:{port}", tls=TLS(ca=pem, server_name="elsewhere.example"), token=token, timeout=10),
    Client(url, token=token, timeout=10),
    Client(f"http://localhost:{port}", token=token, timeout=10),
):
    try:
        client.capabilities()
        raise SystemExit(f"{client} connected")
    except modeld_client.UnavailableError as e:
        assert e.reason == "", repr(e)
# Configured from the environment, as modelctl is.
os.environ.update(MODELD_ADDR=url, MODELD_TOKEN=token, MODELD_TLS_CA=ca)
with Client.from_env() as client:
    assert client.capabilities().cpu.logical_cores >= 1

# mTLS: the client certificate is the caller's identity, whose role (operator) may
# register.
with Client(f"https://localhost:{mtls_port}", tls=TLS(ca=ca, cert=cert, key=key)) as client:
    model = client.register("by-cert", "https://models.example/m.gguf", sha256="0" * 64, size_bytes=1)
    assert model.spec.id == "by-cert", model
print("python package tls ok")
"##;

/// TLS, tokens and client certificates through the installed package.
#[tokio::test]
async fn the_python_package_speaks_tls_with_tokens_and_client_certificates() {
    use modeld_e2e::certs::{ca, leaf, write};
    use sha2::Digest as _;
    let venv = install_package();
    let dir = tempfile::tempdir().unwrap();
    let authority = ca("python package test CA");
    let ca_path = write(dir.path(), "ca.pem", &authority.pem);
    let (cert, key) = leaf(&authority, "modeld", false);
    let cert_path = write(dir.path(), "server.pem", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    let (client_cert, client_key) = leaf(&authority, "py-operator", false);
    let client_cert_path = write(dir.path(), "client.pem", &client_cert);
    let client_key_path = write(dir.path(), "client.key", &client_key);
    let token = "python-package-token-83";
    let tokens = write(
        dir.path(),
        "tokens.toml",
        &format!(
            "[[tokens]]\nname = \"py\"\nrole = \"inference\"\nsha256 = \"{}\"\n\n\
             [[clients]]\nidentity = \"py-operator\"\nrole = \"operator\"\n",
            hex::encode(sha2::Sha256::digest(token.as_bytes()))
        ),
    );
    let server_args = vec![
        "--tls-cert".to_owned(),
        cert_path.display().to_string(),
        "--tls-key".into(),
        key_path.display().to_string(),
        "--tokens-file".into(),
        tokens.display().to_string(),
    ];
    let with_tokens = Agent::start_with(AgentOptions {
        args: server_args.clone(),
        client_tls: Some(modelctl::Tls {
            ca: Some(ca_path.clone()),
            ..Default::default()
        }),
        token: Some(token.into()),
        ..Default::default()
    })
    .await;
    let mut client_ca_args = server_args;
    client_ca_args.extend(["--tls-client-ca".to_owned(), ca_path.display().to_string()]);
    let with_client_ca = Agent::start_with(AgentOptions {
        args: client_ca_args,
        client_tls: Some(modelctl::Tls {
            ca: Some(ca_path.clone()),
            cert: Some(client_cert_path.clone()),
            key: Some(client_key_path.clone()),
        }),
        ..Default::default()
    })
    .await;
    let stdout = python(
        &venv,
        SECURE,
        &[
            with_tokens.addr.to_string(),
            with_client_ca.addr.to_string(),
            ca_path.display().to_string(),
            token.to_owned(),
            client_cert_path.display().to_string(),
            client_key_path.display().to_string(),
        ],
    );
    assert!(stdout.contains("python package tls ok"), "{stdout}");
}
