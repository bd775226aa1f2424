//! The OpenAI-compatible listener (`--openai-listen`) driven by the official `openai`
//! Python package, and by curl where the package hides the wire (TLS, raw errors).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use modeld_e2e::{Agent, AgentOptions, Assets, certs, gguf_spec, modelctl};

/// Where the agent's OpenAI listener is, from its log (it was asked for port 0).
fn openai_addr(agent: &Agent) -> String {
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("OpenAI-compatible API listening"))
        .unwrap_or_else(|| panic!("no OpenAI listener in the log:\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap()
        .to_owned()
}

/// Registers the real SmolLM2 GGUF as `id` by file:// (not downloaded, not loaded).
async fn register(agent: &Agent, id: &str) {
    let url = format!("file://{}", Assets::get().gguf.display());
    agent
        .client()
        .await
        .register_model(gguf_spec(id, &url))
        .await
        .unwrap();
}

/// Runs `script` with the test venv's Python; `sys.argv[1:]` are `args`.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(&Assets::get().python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const CLIENT_SCRIPT: &str = r#"
import sys
import openai

base, model = sys.argv[1], sys.argv[2]
# No retries: a refusal must surface as the error it is.
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed-on-loopback", max_retries=0)

ids = [m.id for m in client.models.list()]
assert model in ids, ids
assert client.models.retrieve(model).id == model

# The model is registered but not loaded: the first request loads it (pulling its
# file first), streamed with usage at the end.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me the capital of France."}],
    temperature=0,
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},
)
chunks = list(stream)
assert chunks[0].choices[0].delta.role == "assistant", chunks[0]
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert "Paris" in text, text
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
assert finishes in (["stop"], ["length"]), finishes
usage = chunks[-1].usage
assert usage is not None and usage.completion_tokens > 0 and usage.prompt_tokens > 0, chunks[-1]
assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

# Non-streamed, the same greedy answer.
whole = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Tell me the capital of France."}],
    temperature=0,
    max_tokens=16,
)
assert whole.choices[0].message.content == text, (whole.choices[0].message.content, text)
assert whole.usage.completion_tokens == usage.completion_tokens

# A completion: max_tokens is honoured exactly, and a stop string ends it early
# without appearing in the text.
counted = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=5, temperature=0)
assert counted.choices[0].finish_reason == "length", counted
assert counted.usage.completion_tokens == 5, counted.usage
stopped = client.completions.create(
    model=model, prompt="1, 2, 3, 4,", max_tokens=40, temperature=0, stop=[" 8"]
)
assert stopped.choices[0].finish_reason == "stop", stopped
assert "7" in stopped.choices[0].text and "8" not in stopped.choices[0].text, stopped.choices[0].text

# Logprobs of the chosen tokens.
lp = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, logprobs=True
)
assert len(lp.choices[0].logprobs.content) == lp.usage.completion_tokens
assert all(t.logprob <= 0 for t in lp.choices[0].logprobs.content)

# Errors come back in OpenAI's shape, as the package's exception classes.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("an unknown model answered")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e.body
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], temperature=-1)
    raise SystemExit("temperature -1 was accepted")
except openai.BadRequestError as e:
    assert e.param == "temperature" and "temperature" in e.message, e.body
try:
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], n=2)
    raise SystemExit("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.param == "n", e.body
try:
    client.chat.completions.create(model=model, messages=[])
    raise SystemExit("no messages was accepted")
except openai.BadRequestError as e:
    assert e.param == "messages", e.body

# A client that leaves mid-stream cancels the generation; the next request is served.
stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Count to one hundred."}],
    max_tokens=200, stream=True,
)
for i, _ in enumerate(stream):
    if i == 3:
        break
stream.close()
again = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=2, temperature=0)
assert again.choices[0].text, again
print("openai client ok")
"#;

#[tokio::test]
async fn the_openai_package_lists_streams_completes_and_gets_clear_errors() {
    let agent = Agent::start_with(AgentOptions {
        args: vec!["--openai-listen".into(), "127.0.0.1:0".into()],
        ..Default::default()
    })
    .await;
    register(&agent, "smol").await;
    let base = format!("http://{}", openai_addr(&agent));
    let out = python(CLIENT_SCRIPT, &[&base, "smol"]);
    assert!(out.contains("openai client ok"), "{out}");
    // The load on demand went through the lifecycle like any other.
    let (ok, state, _) = modelctl(&agent, &["state", "smol"]);
    assert!(ok && state.contains("ready"), "{state}");

    // What the package hides: a malformed body and an unknown path are JSON errors too.
    let curl = |args: &[&str]| -> (String, String) {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (body.to_owned(), code.to_owned())
    };
    let (body, code) = curl(&[
        &format!("{base}/v1/completions"),
        "-d",
        r#"{"model":"smol","prompt":"x","frobnicate":1}"#,
    ]);
    assert_eq!(code, "400", "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("frobnicate"),
        "{body}"
    );
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (body, code) = curl(&[&format!("{base}/v1/embeddings"), "-d", "{}"]);
    assert_eq!(code, "404", "{body}");
    assert!(body.contains("/v1/chat/completions"), "{body}");
}

const APP_TOKEN: &str = "app-openai-1f2e3d4c";
const CI_TOKEN: &str = "ci-openai-9a8b7c6d";

const ROLES_SCRIPT: &str = r#"
import sys
import openai

base, model, app, ci, ca = sys.argv[1:6]
http = openai.DefaultHttpxClient(verify=ca)
def client(key):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, http_client=http)

# The package refuses to send no key at all, so that request goes out bare.
bare = http.get(base + "/v1/models")
assert bare.status_code == 401, bare
assert bare.json()["error"]["type"] == "authentication_error", bare.text
try:
    client("wrong-key").models.list()
    raise SystemExit("a wrong api key was let in")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e
# An inference token may generate but not load: the model is not loaded, so it is told
# who can.
try:
    client(app).chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    raise SystemExit("an inference token loaded a model")
except openai.BadRequestError as e:
    assert e.code == "model_not_loaded" and "modelctl load" in e.message, e.body
# An operator's request loads it on demand; then the inference token is served.
r = client(ci).chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
assert r.usage.completion_tokens == 2, r
r = client(app).completions.create(model=model, prompt="Hello", max_tokens=2)
assert r.usage.completion_tokens == 2, r
print("roles ok")
"#;

/// Off loopback the listener needs TLS and credentials, like the gRPC one; with them,
/// the API key is the bearer token and roles hold.
#[tokio::test]
async fn the_openai_listener_takes_the_agents_tls_tokens_and_roles() {
    let refused = Command::new(modeld_e2e::binary("modeld"))
        .args(["--openai-listen", "0.0.0.0:0", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("refusing to serve") && err.contains("--insecure"),
        "{err}"
    );

    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let hash = |t: &str| hex::encode(sha2::Sha256::digest(t.as_bytes()));
    let tokens = certs::write(
        dir.path(),
        "tokens.toml",
        &format!(
            "[[tokens]]\nname = \"app\"\nrole = \"inference\"\nsha256 = \"{}\"\n\n\
             [[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            hash(APP_TOKEN),
            hash(CI_TOKEN)
        ),
    );
    let ca = certs::ca("modeld test CA");
    let (cert, key) = certs::leaf(&ca, "localhost", false);
    let cert = certs::write(dir.path(), "server.pem", &cert);
    let key = certs::write(dir.path(), "server.key", &key);
    let ca_path = certs::write(dir.path(), "ca.pem", &ca.pem);
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--openai-listen".into(),
            "127.0.0.1:0".into(),
            "--tokens-file".into(),
            tokens.display().to_string(),
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ],
        client_tls: Some(modelctl::Tls {
            ca: Some(ca_path.clone()),
            cert: None,
            key: None,
        }),
        token: Some(CI_TOKEN.into()),
        ..Default::default()
    })
    .await;
    register(&agent, "smol").await;
    let port = openai_addr(&agent).rsplit_once(':').unwrap().1.to_owned();
    let base = format!("https://localhost:{port}");
    let out = python(
        ROLES_SCRIPT,
        &[
            &base,
            "smol",
            APP_TOKEN,
            CI_TOKEN,
            &ca_path.display().to_string(),
        ],
    );
    assert!(out.contains("roles ok"), "{out}");
    // Plain HTTP to the TLS listener gets nowhere.
    let plain = Command::new("curl")
        .args([
            "-s",
            "-m",
            "5",
            &format!("http://localhost:{port}/v1/models"),
        ])
        .output()
        .unwrap();
    assert!(!plain.status.success());
    // The agent logged who called, never the key.
    assert!(!agent.log().contains(APP_TOKEN) && !agent.log().contains(CI_TOKEN));
}
