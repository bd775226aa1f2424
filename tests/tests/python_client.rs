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

#[tokio::test]
async fn python_grpc_client_talks_to_the_agent() {
    let assets = Assets::get();
    let agent = Agent::start().await;
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
        .args(["-c", SCRIPT, &agent.addr.to_string()])
        .env("PYTHONPATH", out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("python client ok"), "{stdout}");
}
