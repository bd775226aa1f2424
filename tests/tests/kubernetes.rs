//! The Kubernetes manifests in deploy/kubernetes/, checked the ways a cluster would
//! meet them: kubernetes-validate against the API's own schemas (offline, strict, for
//! pinned Kubernetes versions); the cross-references no schema checks (labels, ports,
//! files in mounts, probes); the agent started exactly as the DaemonSet starts it (the
//! image's environment, the pod's arguments and environment, its mounts with Secrets'
//! files, inside a cgroup limited to the pod's memory limit); and the init step run
//! with only the capabilities the manifest grants it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use modeld_e2e::certs::{ca, leaf, write};
use modeld_e2e::{Assets, Client, binary, spawn_logged};

/// The oldest Kubernetes the manifests support, and the newest the pinned
/// kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

const TOKEN: &str = "kubernetes-test-token-7c2e";

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

/// Every YAML file in deploy/kubernetes/.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in deploy/kubernetes");
    files
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

/// Every document of every manifest, as PyYAML reads it (YAML 1.1, like kubectl).
fn documents() -> Vec<Value> {
    let script = r#"
import json, sys, yaml
docs = []
for path in sys.argv[1:]:
    with open(path) as f:
        docs.extend(d for d in yaml.safe_load_all(f) if d is not None)
print(json.dumps(docs))
"#;
    let out = run(Command::new(&Assets::get().python)
        .args(["-c", script])
        .args(manifest_files()));
    serde_json::from_str(out.trim()).unwrap()
}

/// The one document of `kind`.
fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "exactly one {kind} in deploy/kubernetes");
    found[0]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// `selector` (a label map) selects a pod labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let selector = selector.as_object().expect("matchLabels");
    !selector.is_empty() && selector.iter().all(|(k, v)| labels[k] == *v)
}

/// The agent's container in the DaemonSet's pod.
fn agent_container(pod: &Value) -> &Value {
    pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "modeld")
        .expect("a container named modeld")
}

/// The value of the flag `name` in `args` (`--flag value` or `--flag=value`).
fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().enumerate().find_map(|(i, a)| {
        if a == name {
            args.get(i + 1).cloned()
        } else {
            a.strip_prefix(&format!("{name}=")).map(str::to_owned)
        }
    })
}

/// A Kubernetes quantity ("4Gi", "500m", "2") in its base unit.
fn quantity(q: &Value) -> f64 {
    let s = match q {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => panic!("not a quantity: {other}"),
    };
    let suffixes: [(&str, f64); 9] = [
        ("Ki", 1024.0),
        ("Mi", 1024.0 * 1024.0),
        ("Gi", 1024.0 * 1024.0 * 1024.0),
        ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("m", 1e-3),
    ];
    for (suffix, factor) in suffixes {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<f64>().unwrap() * factor;
        }
    }
    s.parse().unwrap_or_else(|_| panic!("not a quantity: {s}"))
}

/// The environment of the container image's final stage (`ENV` in the Containerfile):
/// what the pod's own `env` overrides.
fn image_env() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(deploy("container/Containerfile")).unwrap();
    let last_stage = text
        .rsplit_once("\nFROM ")
        .map_or(text.as_str(), |(_, s)| s);
    last_stage
        .lines()
        .filter_map(|l| l.strip_prefix("ENV "))
        .flat_map(str::split_whitespace)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('"').to_owned()))
        .collect()
}

/// The container's own `env`: values, and resources through the downward API.
fn container_env(container: &Value) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for entry in container["env"].as_array().cloned().unwrap_or_default() {
        let name = entry["name"].as_str().unwrap().to_owned();
        let value = if let Some(v) = entry["value"].as_str() {
            v.to_owned()
        } else if let Some(field) = entry["valueFrom"]["resourceFieldRef"].as_object() {
            // "limits.cpu": resources.limits.cpu, in units of the divisor, rounded up.
            let resource = field["resource"].as_str().unwrap();
            let (section, resource) = resource.split_once('.').unwrap();
            let amount = quantity(&container["resources"][section][resource]);
            let divisor = field.get("divisor").map_or(1.0, quantity);
            (amount / divisor).ceil().to_string()
        } else {
            panic!("the test does not know how to resolve {entry}");
        };
        env.push((name, value));
    }
    env
}

/// The agent's environment in the pod: the image's, overridden by the container's.
fn pod_env(container: &Value) -> Vec<(String, String)> {
    let own = container_env(container);
    let mut env: Vec<(String, String)> = image_env()
        .into_iter()
        .filter(|(k, _)| !own.iter().any(|(o, _)| o == k))
        .collect();
    env.extend(own);
    env
}

fn env_value(env: &[(String, String)], key: &str) -> Option<String> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// A setting as the agent resolves it: the flag, else its environment variable.
fn setting(args: &[String], env: &[(String, String)], name: &str, var: &str) -> Option<String> {
    flag(args, name).or_else(|| env_value(env, var))
}

/// The container port `port` (a name or a number) means, if the container has it.
fn container_port(container: &Value, port: &Value) -> Option<u64> {
    container["ports"].as_array()?.iter().find_map(|p| {
        let matches = match port {
            Value::String(name) => p["name"] == name.as_str(),
            Value::Number(n) => p["containerPort"].as_u64() == n.as_u64(),
            _ => false,
        };
        if matches {
            p["containerPort"].as_u64()
        } else {
            None
        }
    })
}

/// The port the agent's gRPC listener binds, from --listen or MODELD_LISTEN.
fn listen_port(args: &[String], env: &[(String, String)]) -> u64 {
    let listen = setting(args, env, "--listen", "MODELD_LISTEN").expect("a listen address");
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn every_manifest_validates_against_the_kubernetes_api_schemas() {
    let assets = Assets::get();
    let files = manifest_files();
    let mut cmd = Command::new(&assets.python);
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        cmd.args(["--kubernetes-version", version]);
    }
    let said = run(cmd.args(&files));
    assert!(
        !said.contains("WARN") && !said.contains("ERROR"),
        "kubernetes-validate had remarks: {said}"
    );
    let resources = documents().len();
    assert!(
        resources >= 4,
        "namespace, daemonset, service, networkpolicy"
    );
    assert_eq!(
        said.matches(" passed for resource ").count(),
        resources * KUBERNETES_VERSIONS.len(),
        "every resource passed against every version: {said}"
    );
}

#[test]
fn the_daemonset_runs_the_agent_unprivileged_with_limits_and_credentials() {
    let docs = documents();
    let ds = one(&docs, "DaemonSet");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&ds["spec"]["selector"]["matchLabels"], labels));
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_ne!(pod["hostNetwork"], true);
    assert_ne!(pod["hostPID"], true);

    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    for id in ["runAsUser", "runAsGroup", "fsGroup"] {
        assert!(
            security[id].as_u64().is_some_and(|v| v > 0),
            "the pod sets a non-root {id}: {security}"
        );
    }
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");

    let agent = agent_container(pod);
    let own = &agent["securityContext"];
    assert_eq!(own["readOnlyRootFilesystem"], true);
    assert_eq!(own["allowPrivilegeEscalation"], false);
    assert_ne!(own["privileged"], true);
    assert_ne!(own["runAsUser"], 0);
    assert_eq!(strings(&own["capabilities"]["drop"]), ["ALL"]);
    assert!(strings(&own["capabilities"]["add"]).is_empty());

    // Requests and limits; memory requested as much as the limit the budget follows.
    let resources = &agent["resources"];
    for kind in ["requests", "limits"] {
        for name in ["cpu", "memory"] {
            assert!(
                !resources[kind][name].is_null(),
                "resources.{kind}.{name}: {resources}"
            );
        }
    }
    let limit = quantity(&resources["limits"]["memory"]);
    assert!(quantity(&resources["requests"]["memory"]) <= limit);
    assert!(quantity(&resources["requests"]["cpu"]) <= quantity(&resources["limits"]["cpu"]));
    assert!(limit >= f64::from(1u32 << 30), "room for a model: {limit}");

    let args = strings(&agent["args"]);
    let env = pod_env(agent);
    // The budget is a share of the cgroup's limit, never a size that could exceed it.
    if let Some(budget) = setting(&args, &env, "--memory-budget", "MODELD_MEMORY_BUDGET") {
        assert!(
            budget.ends_with('%'),
            "--memory-budget {budget}: a share follows the memory limit, a size does not"
        );
    }

    // A reachable listener with TLS and credentials, and no way around them (the
    // image's MODELD_INSECURE=true included).
    let listen = setting(&args, &env, "--listen", "MODELD_LISTEN").unwrap();
    assert!(
        !listen.starts_with("127.") && !listen.starts_with("[::1]"),
        "{listen}"
    );
    assert!(
        !args
            .iter()
            .any(|a| a == "--insecure" || a.starts_with("--insecure=")),
        "{args:?}"
    );
    let insecure = env_value(&env, "MODELD_INSECURE");
    assert!(
        insecure.is_none() || insecure.as_deref() == Some("false"),
        "MODELD_INSECURE={insecure:?} in the pod"
    );
    for (name, var) in [
        ("--tls-cert", "MODELD_TLS_CERT"),
        ("--tls-key", "MODELD_TLS_KEY"),
    ] {
        assert!(setting(&args, &env, name, var).is_some(), "{name}");
    }
    assert!(
        setting(&args, &env, "--tokens-file", "MODELD_TOKENS_FILE").is_some()
            || setting(&args, &env, "--tls-client-ca", "MODELD_TLS_CLIENT_CA").is_some(),
        "credentials: --tokens-file or --tls-client-ca"
    );

    // Every path the agent is given lies in something mounted into its container.
    let mounts: Vec<String> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_owned())
        .collect();
    // (The image's own environment may name the image's files.)
    let own_env = container_env(agent);
    let values = args.iter().chain(own_env.iter().map(|(_, v)| v));
    for value in values.filter(|v| v.starts_with('/')) {
        assert!(
            mounts
                .iter()
                .any(|m| value == m || value.starts_with(&format!("{m}/"))),
            "{value} is in none of the mounts {mounts:?}"
        );
    }

    // kubelet's gRPC probe speaks plaintext, and this listener is TLS: the probes must
    // not use it, and must reach the port the agent listens on.
    let port = listen_port(&args, &env);
    assert_eq!(
        container_port(agent, &Value::from("grpc")),
        Some(port),
        "the grpc port is the one --listen binds"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        let probe = &agent[probe];
        assert!(probe.is_object(), "{probe}");
        assert!(
            probe["grpc"].is_null(),
            "kubelet's grpc probe has no TLS: {probe}"
        );
        if let Some(tcp) = probe["tcpSocket"].as_object() {
            assert_eq!(container_port(agent, &tcp["port"]), Some(port), "{probe}");
        } else {
            assert!(probe["exec"].is_object(), "tcpSocket or exec: {probe}");
        }
    }
}

#[test]
fn the_service_and_network_policy_reach_the_agents_grpc_port_alone() {
    let docs = documents();
    let ds = one(&docs, "DaemonSet");
    let namespace = &ds["metadata"]["namespace"];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    let pod = &ds["spec"]["template"]["spec"];
    let agent = agent_container(pod);
    let port = listen_port(&strings(&agent["args"]), &pod_env(agent));
    assert_eq!(one(&docs, "Namespace")["metadata"]["name"], *namespace);

    let service = one(&docs, "Service");
    assert_eq!(service["metadata"]["namespace"], *namespace);
    assert_eq!(
        service["spec"]["clusterIP"], "None",
        "headless: one address per agent"
    );
    assert!(selects(&service["spec"]["selector"], labels));
    for p in service["spec"]["ports"].as_array().unwrap() {
        let target = if p["targetPort"].is_null() {
            &p["port"]
        } else {
            &p["targetPort"]
        };
        assert_eq!(container_port(agent, target), Some(port), "{p}");
    }

    let policy = one(&docs, "NetworkPolicy");
    assert_eq!(policy["metadata"]["namespace"], *namespace);
    assert!(selects(
        &policy["spec"]["podSelector"]["matchLabels"],
        labels
    ));
    assert!(strings(&policy["spec"]["policyTypes"]).contains(&"Ingress".to_owned()));
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    assert!(!rules.is_empty());
    for rule in rules {
        // Only the gRPC port (metrics stay on loopback)...
        let ports = rule["ports"]
            .as_array()
            .expect("every rule names its ports");
        for p in ports {
            assert_eq!(container_port(agent, &p["port"]), Some(port), "{p}");
        }
        // ...and only from peers that some selector narrows down.
        let from = rule["from"].as_array().expect("every rule names who");
        assert!(!from.is_empty());
        for peer in from {
            assert!(peer["ipBlock"].is_null(), "{peer}");
            let narrowed = ["podSelector", "namespaceSelector"].iter().any(|s| {
                peer[*s]["matchLabels"]
                    .as_object()
                    .is_some_and(|m| !m.is_empty())
            });
            let open_namespaces = peer["namespaceSelector"]
                .as_object()
                .is_some_and(|s| s.is_empty());
            assert!(narrowed && !open_namespaces, "a peer open to all: {peer}");
        }
    }
    // Other agents may fetch blobs from their peers.
    assert!(rules.iter().any(|r| {
        r["from"].as_array().unwrap().iter().any(|peer| {
            peer["namespaceSelector"].is_null()
                && selects(&peer["podSelector"]["matchLabels"], labels)
        })
    }));
}

/// What each of the agent container's mounts holds in this test: `(mountPath, dir)`,
/// longest path first. Secrets get their items' files, made here.
fn mount_volumes(
    pod: &Value,
    container: &Value,
    root: &Path,
    files: &SecretFiles,
) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for m in container["volumeMounts"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let volume = pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        let dir = root.join("volumes").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some(secret) = volume["secret"].as_object() {
            let items = secret
                .get("items")
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("list the Secret's keys as items: {volume}"));
            for item in items {
                let key = item["key"].as_str().unwrap();
                let text = files.get(key);
                std::fs::write(dir.join(item["path"].as_str().unwrap()), text).unwrap();
            }
        } else {
            assert!(
                volume["hostPath"].is_object() || volume["emptyDir"].is_object(),
                "the test does not know the volume {volume}"
            );
        }
        out.push((m["mountPath"].as_str().unwrap().to_owned(), dir));
    }
    out.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    out
}

/// `value` with a mount's path (at its start) replaced by where the test keeps it.
fn rewrite(value: &str, mounts: &[(String, PathBuf)]) -> String {
    for (mount, dir) in mounts {
        if value == mount {
            return dir.display().to_string();
        }
        if let Some(rest) = value.strip_prefix(mount.as_str())
            && rest.starts_with('/')
        {
            return format!("{}{rest}", dir.display());
        }
    }
    value.to_owned()
}

/// The files the Secrets hold, by key: a server certificate from a test CA, and a
/// tokens file accepting [`TOKEN`].
struct SecretFiles {
    ca: String,
    cert: String,
    key: String,
    tokens: String,
}

impl SecretFiles {
    fn new() -> SecretFiles {
        use sha2::Digest as _;
        let authority = ca("modeld kubernetes test CA");
        let (cert, key) = leaf(&authority, "modeld", false);
        let tokens = format!(
            "[[tokens]]\nname = \"kubernetes-test\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
        );
        SecretFiles {
            ca: authority.pem,
            cert,
            key,
            tokens,
        }
    }

    fn get(&self, key: &str) -> &str {
        match key {
            "tls.crt" => &self.cert,
            "tls.key" => &self.key,
            "ca.crt" => &self.ca,
            "tokens.toml" => &self.tokens,
            other => panic!("the test does not know what a Secret's {other:?} holds"),
        }
    }
}

/// A memory cgroup of this test's own under the one it runs in, limited to `limit`
/// bytes (as tests/tests/memory.rs makes it); `Err` (why) where none can be made.
fn limited_cgroup(limit: u64) -> Result<PathBuf, String> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let (base, own, file) = if let Some(path) = cgroups
        .lines()
        .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_owned()))
    {
        (
            PathBuf::from("/sys/fs/cgroup/memory"),
            path,
            "memory.limit_in_bytes",
        )
    } else if let Some(path) = cgroups.lines().find_map(|l| l.strip_prefix("0::")) {
        (
            PathBuf::from("/sys/fs/cgroup"),
            path.to_owned(),
            "memory.max",
        )
    } else {
        return Err("no memory cgroup in /proc/self/cgroup".into());
    };
    let dir = base
        .join(own.trim_start_matches('/'))
        .join(format!("modeld-k8s-e2e-{}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if let Err(e) = std::fs::write(dir.join(file), limit.to_string()) {
        let _ = std::fs::remove_dir(&dir);
        return Err(format!("{}: {e}", dir.join(file).display()));
    }
    Ok(dir)
}

/// A child process killed when the test ends, however it ends.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_agent_starts_as_the_daemonset_starts_it_and_budgets_from_its_memory_limit() {
    let docs = documents();
    let pod = &one(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let agent = agent_container(pod);
    let tmp = tempfile::tempdir().unwrap();
    let files = SecretFiles::new();
    let mounts = mount_volumes(pod, agent, tmp.path(), &files);
    let ca_path = write(tmp.path(), "ca.pem", &files.ca);

    // The pod's arguments and environment, with its mounts where this test keeps them
    // and its port made free; nothing of this test's environment leaks in.
    let any_port = |listen: &str| format!("{}:0", listen.rsplit_once(':').unwrap().0);
    let pod_args = strings(&agent["args"]);
    let mut args: Vec<String> = pod_args.iter().map(|a| rewrite(a, &mounts)).collect();
    if let Some(i) = args.iter().position(|a| a == "--listen") {
        let listen = any_port(&args[i + 1]);
        args[i + 1] = listen;
    }
    // The image's files (MODELD_ONNXRUNTIME_LIBRARY, say) are not on this machine: the
    // image's settings that name them are left out.
    let own = container_env(agent);
    let env: Vec<(String, String)> = pod_env(agent)
        .into_iter()
        .filter(|(k, v)| {
            own.iter().any(|(o, _)| o == k) || !v.starts_with('/') || rewrite(v, &mounts) != *v
        })
        .map(|(k, v)| {
            let v = if k == "MODELD_LISTEN" {
                any_port(&v)
            } else {
                rewrite(&v, &mounts)
            };
            (k, v)
        })
        .collect();

    // Inside a cgroup limited as the pod is, where one can be made here.
    let limit = quantity(&agent["resources"]["limits"]["memory"]) as u64;
    let cgroup = match limited_cgroup(limit) {
        Ok(dir) => Some(dir),
        Err(why) => {
            eprintln!(
                "no cgroup can be created here ({why}): the agent runs without the pod's memory limit"
            );
            None
        }
    };
    let program = match &cgroup {
        Some(dir) => {
            let wrapper = tmp.path().join("modeld-in-cgroup");
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\necho $$ > '{}/cgroup.procs' || exit 99\nexec '{}' \"$@\"\n",
                    dir.display(),
                    binary("modeld").display()
                ),
            )
            .unwrap();
            chmod(&wrapper, 0o755);
            wrapper
        }
        None => binary("modeld"),
    };
    let mut cmd = Command::new(program);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(&args)
        .stdout(std::process::Stdio::null());
    let (child, addr, log) = spawn_logged(cmd, "modeld listening", Duration::from_secs(60));
    let mut child = Running(child);
    assert!(!addr.ip().is_loopback(), "the pod's listener: {addr}");

    // TLS with the Secret's certificate, and the Secret's token.
    let url = format!("https://localhost:{}", addr.port());
    let tls = modelctl::Tls {
        ca: Some(ca_path),
        cert: None,
        key: None,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        if let Ok(c) = Client::connect_with_tls(&url, &tls).await
            && let Ok(c) = c.with_token(TOKEN)
            && c.is_serving().await.unwrap_or(false)
        {
            break c;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never served; log:\n{}",
            log.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let caps = client.capabilities().await.unwrap();
    let anonymous = Client::connect_with_tls(&url, &tls).await.unwrap();
    let refused = anonymous.capabilities().await.unwrap_err();
    assert_eq!(
        refused.status().map(tonic::Status::code),
        Some(tonic::Code::Unauthenticated),
        "{refused}"
    );
    let text = log.lock().unwrap().join("\n");
    assert!(!text.contains("INSECURE"), "{text}");

    // The budget is the default share of the memory limit the pod sets.
    let memory = caps.memory.unwrap();
    let share = setting(
        &pod_args,
        &pod_env(agent),
        "--memory-budget",
        "MODELD_MEMORY_BUDGET",
    )
    .map_or(0.75, |b| {
        b.trim_end_matches('%').parse::<f64>().unwrap() / 100.0
    });
    let usable = if memory.cgroup_limit_bytes > 0 {
        memory.cgroup_limit_bytes.min(memory.total_bytes)
    } else {
        memory.total_bytes
    };
    if cgroup.is_some() {
        assert!(
            memory.cgroup_limit_bytes > 0 && memory.cgroup_limit_bytes <= limit,
            "the agent sees the pod's limit of {limit}: {memory:?}"
        );
    }
    assert_eq!(
        caps.memory_budget_bytes,
        (usable as f64 * share) as u64,
        "{memory:?}"
    );

    // Node Feature Discovery's file, where the pod's mount puts it.
    if let Some(nfd) = setting(
        &args,
        &env,
        "--nfd-features-file",
        "MODELD_NFD_FEATURES_FILE",
    ) {
        let nfd = PathBuf::from(nfd);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !nfd.exists() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let labels = std::fs::read_to_string(&nfd).unwrap();
        assert!(labels.contains("modeld.io/agent=true"), "{labels}");
    }

    // SIGTERM, as kubelet stops a pod: a clean exit within the grace period.
    run(Command::new("kill").args(["-TERM", &child.0.id().to_string()]));
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    let deadline = Instant::now() + Duration::from_secs(grace);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "still running after {grace} s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    drop(child);
    if let Some(dir) = cgroup {
        for _ in 0..50 {
            if std::fs::remove_dir(&dir).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn chmod(path: impl AsRef<Path>, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn the_init_step_hands_the_host_directories_to_the_agent_with_its_capabilities_alone() {
    let docs = documents();
    let pod = &one(&docs, "DaemonSet")["spec"]["template"]["spec"];
    let agent = agent_container(pod);
    let security = &pod["securityContext"];
    let uid = security["runAsUser"].as_u64().unwrap();
    let gid = security["runAsGroup"].as_u64().unwrap();
    let volumes = pod["volumes"].as_array().unwrap();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .is_some_and(|v| v["hostPath"].is_object())
    };
    // fsGroup leaves hostPath volumes alone: an init container must see to each one
    // the agent writes.
    let written: Vec<(String, String)> = agent["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["readOnly"] != true && host_path(m["name"].as_str().unwrap()))
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(!written.is_empty());
    let data_dir = setting(
        &strings(&agent["args"]),
        &pod_env(agent),
        "--data-dir",
        "MODELD_DATA_DIR",
    );
    let inits = pod["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (name, _) in &written {
        assert!(
            inits.iter().any(|c| {
                c["volumeMounts"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["name"] == name.as_str()))
            }),
            "no init container prepares the hostPath volume {name}"
        );
    }

    if !is_root() {
        eprintln!("not root: skipping the run of the init step (it chowns)");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("no setpriv (util-linux): skipping the run of the init step");
        return;
    }

    // Twice: on a first install, where kubelet made the directories root's, and on a
    // node whose data directory another user left behind.
    for taken_over in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o755);
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for (name, mount) in &written {
            let dir = tmp.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            chmod(&dir, 0o755);
            mounts.push((mount.clone(), dir));
        }
        let data = mounts
            .iter()
            .find(|(m, _)| Some(m) == data_dir.as_ref())
            .expect("the data directory is a hostPath")
            .1
            .clone();
        if taken_over {
            let private = data.join("db");
            std::fs::create_dir(&private).unwrap();
            std::fs::write(private.join("conf"), "x").unwrap();
            chmod(private.join("conf"), 0o600);
            chmod(&private, 0o700);
            for p in [data.clone(), private.clone(), private.join("conf")] {
                if let Err(e) = std::os::unix::fs::chown(&p, Some(999), Some(999)) {
                    eprintln!("cannot chown here ({e}): skipping the run of the init step");
                    return;
                }
            }
        }
        // Something of NFD's own in its directory stays NFD's.
        for (_, dir) in mounts.iter().filter(|(_, d)| *d != data) {
            std::fs::write(dir.join("other"), "x").unwrap();
        }
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));

        for init in &inits {
            let own = &init["securityContext"];
            let mut line: Vec<String> = strings(&init["command"]);
            line.extend(strings(&init["args"]));
            let line: Vec<String> = line
                .iter()
                .map(|part| {
                    mounts.iter().fold(part.clone(), |text, (mount, dir)| {
                        text.replace(mount.as_str(), &dir.display().to_string())
                    })
                })
                .collect();
            // The container's capabilities: none but those it adds.
            let mut bounding = vec!["-all".to_owned()];
            bounding.extend(
                strings(&own["capabilities"]["add"])
                    .iter()
                    .map(|c| format!("+{}", c.to_lowercase())),
            );
            assert_eq!(strings(&own["capabilities"]["drop"]), ["ALL"]);
            let user = own["runAsUser"].as_u64().unwrap_or(uid);
            let group = own["runAsGroup"].as_u64().unwrap_or(gid);
            let mut cmd = Command::new("setpriv");
            cmd.arg(format!("--reuid={user}"))
                .arg(format!("--regid={group}"))
                .arg("--clear-groups")
                .arg(format!("--bounding-set={}", bounding.join(",")))
                .arg("--inh-caps=-all");
            if own["allowPrivilegeEscalation"] == false {
                cmd.arg("--no-new-privs");
            }
            run(cmd.arg("--").args(&line));
        }

        // The data directory is the agent's, all of it, and closed to others.
        let mut pending = vec![data.clone()];
        while let Some(p) = pending.pop() {
            let m = std::fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                (u64::from(m.uid()), u64::from(m.gid())),
                (uid, gid),
                "{} (taken over: {taken_over})",
                p.display()
            );
            if m.is_dir() {
                pending.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            }
        }
        let mode = std::fs::metadata(&data).unwrap().mode();
        assert_eq!(mode & 0o700, 0o700);
        assert_eq!(mode & 0o007, 0, "{mode:o}");

        // And the agent, as the pod runs it, writes where it must: its data, and its
        // feature file, replaced whole as it does.
        let mut script = String::from("set -eu\n");
        for (mount, dir) in &mounts {
            if *dir == data {
                script.push_str(&format!("mkdir '{}/blobs'\n", dir.display()));
            } else {
                script.push_str(&format!(
                    "echo a > '{0}/modeld.tmp' && mv '{0}/modeld.tmp' '{0}/modeld' # {mount}\n",
                    dir.display()
                ));
            }
        }
        let fs_group = security["fsGroup"].as_u64().unwrap();
        run(Command::new("setpriv")
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg(format!("--groups={fs_group}"))
            .args(["--bounding-set=-all", "--inh-caps=-all", "--no-new-privs"])
            .args(["--", "/bin/sh", "-c", &script]));
        for (_, dir) in mounts.iter().filter(|(_, d)| *d != data) {
            assert_eq!(
                std::fs::metadata(dir.join("other")).unwrap().uid(),
                0,
                "NFD's files stay root's"
            );
            assert_eq!(
                std::fs::metadata(dir).unwrap().uid(),
                0,
                "NFD's directory stays root's"
            );
        }
    }
}
