//! The protos carry the file options other languages' generators read (go_package,
//! java_package, java_multiple_files, csharp_namespace, swift_prefix), so each
//! generates without extra flags. protoc's own Java and C# generators place their
//! output by them; Debian's Go generators (protoc-gen-go, protoc-gen-go-grpc) make
//! packages that compile offline against Debian's packaged Go sources, and a Go client
//! built from them talks to a real agent: unary calls both ways, a server stream and
//! well-known types.
//!
//! The Go half needs `protoc`, `protoc-gen-go`, `protoc-gen-go-grpc` and `go` with
//! gRPC's sources (scripts/setup installs them from apt); it is skipped, saying so,
//! where they are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use modeld_e2e::{Agent, cache_dir};

/// Where Debian's golang-*-dev packages keep Go sources (a GOPATH tree).
const DEBIAN_GOCODE: &str = "/usr/share/gocode";

/// The options every file must set.
const OPTIONS: &[&str] = &[
    "csharp_namespace",
    "go_package",
    "java_multiple_files",
    "java_package",
    "swift_prefix",
];

fn proto_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto")
}

/// Every .proto under proto/, relative to it, sorted.
fn protos() -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "proto") {
                out.push(path);
            }
        }
    }
    let root = proto_root();
    let mut found = Vec::new();
    walk(&root, &mut found);
    let mut names: Vec<String> = found
        .iter()
        .map(|p| p.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    names.sort();
    assert!(names.len() >= 7, "{names:?}");
    names
}

/// One file's package and file options (`option NAME = VALUE;`, quotes removed).
fn header(proto: &str) -> (String, BTreeMap<String, String>) {
    let text = std::fs::read_to_string(proto_root().join(proto)).unwrap();
    let mut package = None;
    let mut options = BTreeMap::new();
    for line in text.lines() {
        if let Some(p) = line.strip_prefix("package ") {
            package = Some(p.trim_end_matches(';').to_owned());
        } else if let Some(o) = line.strip_prefix("option ") {
            let (name, value) = o.trim_end_matches(';').split_once(" = ").unwrap();
            options.insert(name.to_owned(), value.trim_matches('"').to_owned());
        }
    }
    (
        package.unwrap_or_else(|| panic!("{proto} has no package")),
        options,
    )
}

/// The Go import path of a go_package ("import/path;name").
fn go_import_path(go_package: &str) -> &str {
    go_package
        .split_once(';')
        .map_or(go_package, |(path, _)| path)
}

#[test]
fn every_proto_names_its_package_for_go_java_csharp_and_swift() {
    let mut by_package: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for proto in protos() {
        let (package, options) = header(&proto);
        for name in OPTIONS {
            assert!(options.contains_key(*name), "{proto} sets no {name}");
        }
        // Files of one package generate into one Go package, Java package, namespace.
        let first = by_package.entry(package.clone()).or_insert(options.clone());
        assert_eq!(
            *first, options,
            "{proto} differs from the rest of {package}"
        );

        let parts: Vec<&str> = package.split('.').collect();
        assert_eq!(options["java_package"], format!("dev.{package}"), "{proto}");
        assert_eq!(options["java_multiple_files"], "true", "{proto}");
        let pascal: Vec<String> = parts
            .iter()
            .map(|p| {
                let mut chars = p.chars();
                chars.next().unwrap().to_uppercase().chain(chars).collect()
            })
            .collect();
        assert_eq!(options["csharp_namespace"], pascal.join("."), "{proto}");
        // "…/modeld/v1;modeldv1": the import path ends with the package's path, and the
        // Go package name is its last two parts, as buf's managed mode names them.
        let go = &options["go_package"];
        let (path, name) = go.split_once(';').expect("go_package names the package");
        assert!(path.ends_with(&parts.join("/")), "{proto}: {go}");
        assert_eq!(name, parts[parts.len() - 2..].concat(), "{proto}: {go}");
        assert!(
            options["swift_prefix"]
                .chars()
                .next()
                .is_some_and(char::is_uppercase),
            "{proto}"
        );
    }
    // Different packages never share a generated package.
    for option in [
        "go_package",
        "java_package",
        "csharp_namespace",
        "swift_prefix",
    ] {
        let mut values: Vec<&String> = by_package.values().map(|o| &o[option]).collect();
        values.sort();
        values.dedup();
        assert_eq!(values.len(), by_package.len(), "{option} is shared");
    }
}

/// `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

#[test]
fn protocs_java_and_csharp_generators_place_code_by_the_options() {
    let Some(protoc) = which("protoc") else {
        eprintln!("no protoc on PATH (apt: protobuf-compiler): skipping");
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let (java, csharp) = (out.path().join("java"), out.path().join("csharp"));
    std::fs::create_dir(&java).unwrap();
    std::fs::create_dir(&csharp).unwrap();
    run(Command::new(protoc)
        .current_dir(proto_root())
        .arg(format!("--java_out={}", java.display()))
        .arg(format!("--csharp_out={}", csharp.display()))
        .args(protos()));
    // java_multiple_files: a file per message, in the java_package's directory.
    assert!(java.join("dev/modeld/v1/ModelSpec.java").is_file());
    for proto in protos() {
        let (_, options) = header(&proto);
        let dir = java.join(options["java_package"].replace('.', "/"));
        assert!(dir.is_dir(), "{proto}: no {}", dir.display());
        let stem = Path::new(&proto)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let class: String = stem
            .split('_')
            .map(|w| {
                let mut chars = w.chars();
                chars
                    .next()
                    .unwrap()
                    .to_uppercase()
                    .chain(chars)
                    .collect::<String>()
            })
            .collect();
        let cs = std::fs::read_to_string(csharp.join(format!("{class}.cs"))).unwrap();
        assert!(
            cs.contains(&format!("namespace {} {{", options["csharp_namespace"])),
            "{class}.cs"
        );
    }
}

#[tokio::test]
async fn debians_go_generators_compile_offline_and_the_client_talks_to_an_agent() {
    let tools = ["protoc", "protoc-gen-go", "protoc-gen-go-grpc", "go"];
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| which(t).is_none())
        .collect();
    let grpc_sources = Path::new(DEBIAN_GOCODE).join("src/google.golang.org/grpc");
    if !missing.is_empty() || !grpc_sources.is_dir() {
        eprintln!(
            "skipping the Go generation: missing {missing:?}{}; scripts/setup installs them \
             (apt: golang-go protobuf-compiler protoc-gen-go protoc-gen-go-grpc \
             golang-google-grpc-dev golang-google-protobuf-dev \
             golang-github-golang-protobuf-1-5-dev)",
            if grpc_sources.is_dir() {
                String::new()
            } else {
                format!(" and {}", grpc_sources.display())
            }
        );
        return;
    }

    // GOPATH mode over Debian's packaged sources: no module proxy, no network.
    let tmp = tempfile::tempdir().unwrap();
    let gopath = tmp.path().join("go");
    let src = gopath.join("src");
    std::fs::create_dir_all(&src).unwrap();
    run(Command::new("protoc")
        .current_dir(proto_root())
        .arg(format!("--go_out={}", src.display()))
        .arg(format!("--go-grpc_out={}", src.display()))
        .args(protos()));

    // Where each package landed: by its go_package, with no flag saying so.
    let mut imports: BTreeMap<String, String> = BTreeMap::new();
    for proto in protos() {
        let (package, options) = header(&proto);
        let path = go_import_path(&options["go_package"]).to_owned();
        let stem = Path::new(&proto)
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            src.join(&path).join(format!("{stem}.pb.go")).is_file(),
            "{proto} generated into {path}"
        );
        imports.insert(package, path);
    }
    let agent_pkg = &imports["modeld.v1"];
    let fleet_pkg = &imports["modeld.fleet.v1"];
    let client_dir = src.join("modeld.test/goclient");
    std::fs::create_dir_all(&client_dir).unwrap();
    std::fs::write(
        client_dir.join("main.go"),
        GO_CLIENT
            .replace("AGENT_PKG", agent_pkg)
            .replace("FLEET_PKG", fleet_pkg),
    )
    .unwrap();

    let go = |args: &[&str]| {
        let mut cmd = Command::new("go");
        cmd.args(args)
            .current_dir(tmp.path())
            .env("GO111MODULE", "off")
            .env(
                "GOPATH",
                std::env::join_paths([gopath.as_path(), Path::new(DEBIAN_GOCODE)]).unwrap(),
            )
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .env("GOCACHE", cache_dir().join("go-build"));
        cmd
    };
    let packages: Vec<String> = imports
        .values()
        .cloned()
        .chain(["modeld.test/goclient".to_owned()])
        .collect();
    let mut vet = go(&["vet"]);
    run(vet.args(&packages));
    let exe = tmp.path().join("goclient");
    let mut build = go(&["build", "-o"]);
    run(build.arg(&exe).arg("modeld.test/goclient"));

    let agent = Agent::start().await;
    let out = Command::new(&exe)
        .arg(agent.addr.to_string())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the Go client failed: {stdout}{stderr}{}",
        if stderr.contains("table_unmarshal") {
            "\n(github.com/golang/protobuf is v1.3, which cannot read APIv2 messages: \
             install golang-github-golang-protobuf-1-5-dev)"
        } else {
            ""
        }
    );
    let caps = agent.client().await.capabilities().await.unwrap();
    assert_eq!(
        stdout.trim(),
        format!(
            "node_id={} created=true quantization=Q8_0 format=MODEL_FORMAT_GGUF files=1 \
             snapshots=2",
            caps.node_id
        )
    );
    let model = agent.client().await.get_model("from-go").await.unwrap();
    assert_eq!(model.spec.unwrap().files[0].size_bytes, 42);
}

/// A Go client of the generated packages (AGENT_PKG, FLEET_PKG: their import paths).
const GO_CLIENT: &str = r#"// A Go client built from the generated packages: unary calls both ways, a server
// stream and well-known types, against the agent at os.Args[1].
package main

import (
	"context"
	"fmt"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	fleetv1 "FLEET_PKG"
	modeldv1 "AGENT_PKG"
)

func check(err error, what string) {
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", what, err)
		os.Exit(1)
	}
}

func main() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, os.Args[1], grpc.WithInsecure(), grpc.WithBlock())
	check(err, "dial")
	defer conn.Close()
	node := modeldv1.NewNodeClient(conn)
	registry := modeldv1.NewModelRegistryClient(conn)
	_ = fleetv1.NewFleetServiceClient(conn)

	caps, err := node.GetCapabilities(ctx, &modeldv1.GetCapabilitiesRequest{})
	check(err, "GetCapabilities")

	spec := &modeldv1.ModelSpec{
		Id:           "from-go",
		Format:       modeldv1.ModelFormat_MODEL_FORMAT_GGUF,
		Quantization: "q8_0",
		Files: []*modeldv1.ModelFile{{
			Name:      "m.gguf",
			Urls:      []string{"https://h.example/m.gguf"},
			Sha256:    "6666666666666666666666666666666666666666666666666666666666666666",
			SizeBytes: 42,
		}},
	}
	created, err := registry.RegisterModel(ctx, &modeldv1.RegisterModelRequest{Spec: spec})
	check(err, "RegisterModel")
	got, err := registry.GetModel(ctx, &modeldv1.GetModelRequest{Id: "from-go"})
	check(err, "GetModel")

	stream, err := node.WatchResources(ctx, &modeldv1.WatchResourcesRequest{
		Interval: durationpb.New(100 * time.Millisecond),
	})
	check(err, "WatchResources")
	snapshots := 0
	for snapshots < 2 {
		snapshot, err := stream.Recv()
		check(err, "WatchResources.Recv")
		if snapshot.GetMemory().GetTotalBytes() > 0 && snapshot.GetTime().AsTime().Year() > 2000 {
			snapshots++
		}
	}

	fmt.Printf("node_id=%s created=%t quantization=%s format=%s files=%d snapshots=%d\n",
		caps.GetNodeId(), created.GetCreated(), got.GetModel().GetSpec().GetQuantization(),
		got.GetModel().GetSpec().GetFormat(), len(got.GetModel().GetSpec().GetFiles()), snapshots)
}
"#;
