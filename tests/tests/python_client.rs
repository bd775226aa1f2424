//! A real Python gRPC client (grpcio), with stubs generated from the committed protos.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use modeld_e2e::{Agent, Assets};

const SCRIPT: &str = r#"
import sys
import grpc
from modeld.v1 import registry_pb2, registry_pb2_grpc, model_pb2, node_pb2, node_pb2_grpc

channel = grpc.insecure_channel(sys.argv[1])
registry = registry_pb2_grpc.ModelRegistryStub(channel)
node = node_pb2_grpc.NodeStub(channel)

spec = model_pb2.ModelSpec(
    id="from-python",
    format=model_pb2.MODEL_FORMAT_GGUF,
    quantization="q8_0",
    files=[model_pb2.ModelFile(name="m.gguf", urls=["https://h.example/m.gguf"], sha256="6" * 64, size_bytes=42)],
)
created = registry.RegisterModel(registry_pb2.RegisterModelRequest(spec=spec))
assert created.created, created
assert created.model.spec.quantization == "Q8_0", created.model.spec.quantization

listed = registry.ListModels(registry_pb2.ListModelsRequest(quantization="Q8_0"))
assert [m.spec.id for m in listed.models] == ["from-python"], listed

try:
    registry.GetModel(registry_pb2.GetModelRequest(id="missing"))
    raise SystemExit("GetModel of a missing id succeeded")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.NOT_FOUND, e.code()
    assert "missing" in e.details(), e.details()

caps = node.GetCapabilities(node_pb2.GetCapabilitiesRequest())
assert caps.memory.total_bytes > 0 and caps.cpu.logical_cores >= 1, caps
print("python client ok:", caps.node_id)
"#;

/// Generates Python stubs from the committed protos and runs `script` against the
/// agent (its address is `sys.argv[1]`); returns stdout, failing on a non-zero exit.
fn run_python(agent: &Agent, script: &str) -> String {
    run_python_with(agent, script, &[])
}

/// `run_python` with more arguments after the address (`sys.argv[2:]`).
fn run_python_with(agent: &Agent, script: &str, extra: &[&str]) -> String {
    let assets = Assets::get();
    let out_dir = tempfile::tempdir().unwrap();
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let protos: Vec<String> = std::fs::read_dir(proto_root.join("modeld/v1"))
        .unwrap()
        .map(|e| format!("modeld/v1/{}", e.unwrap().file_name().to_string_lossy()))
        .filter(|p| p.ends_with(".proto"))
        .collect();
    let protoc = Command::new(&assets.python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&proto_root)
        .arg(format!("--python_out={}", out_dir.path().display()))
        .arg(format!("--grpc_python_out={}", out_dir.path().display()))
        .args(&protos)
        .current_dir(&proto_root)
        .output()
        .unwrap();
    assert!(
        protoc.status.success(),
        "protoc: {}",
        String::from_utf8_lossy(&protoc.stderr)
    );
    let run = Command::new(&assets.python)
        .args(["-c", script, &agent.addr.to_string()])
        .args(extra)
        .env("PYTHONPATH", out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    assert!(
        run.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    stdout
}

#[tokio::test]
async fn python_grpc_client_talks_to_the_agent() {
    let agent = Agent::start().await;
    let stdout = run_python(&agent, SCRIPT);
    assert!(stdout.contains("python client ok"), "{stdout}");
}

const DEADLINE_SCRIPT: &str = r#"
import sys, time
import grpc
from modeld.v1 import generate_pb2, generate_pb2_grpc, lifecycle_pb2, lifecycle_pb2_grpc

channel = grpc.insecure_channel(sys.argv[1])
gen = generate_pb2_grpc.GenerateStub(channel)
life = lifecycle_pb2_grpc.LifecycleStub(channel)

def request(max_tokens):
    return generate_pb2.GenerateRequest(
        model_id="smol",
        chat=generate_pb2.ChatMessages(messages=[generate_pb2.ChatMessage(
            role=generate_pb2.CHAT_ROLE_USER, content="Write a very long story about a lighthouse.")]),
        sampling=generate_pb2.SamplingParams(temperature=0.0),
        max_tokens=max_tokens)

# A long generation with a short deadline: the client gets DEADLINE_EXCEEDED after
# some tokens, not after 2000 of them.
tokens = 0
try:
    for message in gen.Generate(request(2000), timeout=1.5):
        if message.HasField("token"):
            tokens += 1
    raise SystemExit("the stream outlived its deadline")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
assert tokens > 0, "no token arrived before the deadline"

# The one slot is free again: the agent stopped that generation, so the next request
# is accepted (not RESOURCE_EXHAUSTED) and runs to its own end.
for _ in range(200):
    state = life.GetState(lifecycle_pb2.GetStateRequest(model_id="smol"))
    if state.in_flight_requests == 0:
        break
    time.sleep(0.05)
assert state.in_flight_requests == 0, state
summary = None
for message in gen.Generate(request(8)):
    if message.HasField("summary"):
        summary = message.summary
assert summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH, summary
assert summary.usage.generated_tokens == 8, summary
print("deadline ok", tokens)
"#;

/// A gRPC deadline stops generation on the agent, not just on the client, and the
/// model's only slot is free for the next request.
#[tokio::test]
async fn a_python_client_deadline_stops_generation_and_frees_the_slot() {
    let assets = Assets::get();
    let agent = Agent::start_with(modeld_e2e::AgentOptions {
        args: ["--parallel", "1", "--max-queued-requests", "0"]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let spec = modeld_e2e::gguf_spec("smol", &format!("file://{}", assets.gguf.display()));
    client.register_model(spec).await.unwrap();
    client.pull_to_end("smol").await.unwrap();
    client.load_to_end("smol", None).await.unwrap();
    let stdout = run_python(&agent, DEADLINE_SCRIPT);
    assert!(stdout.contains("deadline ok"), "{stdout}");
}

const TLS_SCRIPT: &str = r#"
import sys
import grpc
from modeld.v1 import node_pb2, node_pb2_grpc

port = sys.argv[1].rsplit(":", 1)[1]
ca_path, token = sys.argv[2], sys.argv[3]
credentials = grpc.ssl_channel_credentials(open(ca_path, "rb").read())
channel = grpc.secure_channel(f"localhost:{port}", credentials)
node = node_pb2_grpc.NodeStub(channel)
try:
    node.GetCapabilities(node_pb2.GetCapabilitiesRequest())
    raise SystemExit("answered without a token")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code()
caps = node.GetCapabilities(
    node_pb2.GetCapabilitiesRequest(), metadata=[("authorization", f"Bearer {token}")]
)
assert caps.cpu.logical_cores >= 1, caps
print("python tls ok")
"#;

/// The Python client over TLS with a token, as the README shows it.
#[tokio::test]
async fn python_grpc_client_over_tls_with_a_token() {
    use modeld_e2e::certs::{ca, leaf, write};
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let authority = ca("python test CA");
    let ca_path = write(dir.path(), "ca.pem", &authority.pem);
    let (cert, key) = leaf(&authority, "modeld", false);
    let cert_path = write(dir.path(), "server.pem", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    let token = "python-token-51";
    let tokens = write(
        dir.path(),
        "tokens.toml",
        &format!(
            "[[tokens]]\nname = \"py\"\nrole = \"inference\"\nsha256 = \"{}\"\n",
            hex::encode(sha2::Sha256::digest(token.as_bytes()))
        ),
    );
    let agent = Agent::start_with(modeld_e2e::AgentOptions {
        args: vec![
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
            "--tokens-file".into(),
            tokens.display().to_string(),
        ],
        client_tls: Some(modelctl::Tls {
            ca: Some(ca_path.clone()),
            ..Default::default()
        }),
        token: Some(token.into()),
        ..Default::default()
    })
    .await;
    let stdout = run_python_with(&agent, TLS_SCRIPT, &[&ca_path.display().to_string(), token]);
    assert!(stdout.contains("python tls ok"), "{stdout}");
}
