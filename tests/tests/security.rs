//! What a request may touch on the agent's host: local paths only under the allowed
//! directories (`--allow-dir` and the models directories), resolved through links,
//! and a refusal that says nothing about the file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use modeld_e2e::{Agent, AgentOptions, Assets, gguf_spec, pb, reason};
use tonic::Code;

/// The exfiltration this closes: register a file the agent can read, learn its real
/// size and digest from the mismatch, register again, pull, read it back. The first
/// step is refused and tells nothing, whether the file exists or not.
#[tokio::test]
async fn a_file_outside_the_allowed_directories_is_refused_at_registration() {
    let allowed = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(AgentOptions {
        allow_dirs: Some(vec![allowed.path().to_path_buf()]),
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let mut messages = Vec::new();
    for (id, path) in [("passwd", "/etc/passwd"), ("ghost", "/etc/no-such-file")] {
        let spec = gguf_spec(id, &format!("file://{path}"));
        let e = client.register_model(spec).await.unwrap_err();
        let status = e.status().unwrap();
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert_eq!(reason(status), "PATH_NOT_ALLOWED");
        assert!(!status.message().contains(path), "{}", status.message());
        messages.push(status.message().to_owned());
    }
    assert_eq!(
        messages[0], messages[1],
        "an existing and a missing file read the same"
    );
    assert!(
        client.get_model("passwd").await.is_err(),
        "nothing was registered"
    );

    // A catalog cannot smuggle one in either, nor be read from outside.
    let manifest = r#"[{"id":"cat","format":"gguf","files":[{"name":"p","urls":["file:///etc/passwd"],"sha256":"0000000000000000000000000000000000000000000000000000000000000000","size":1}]}]"#;
    let e = client
        .import_catalog(
            pb::import_catalog_request::Source::Content(manifest.into()),
            pb::CatalogFormat::Json,
        )
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().code(), Code::PermissionDenied);
    let e = client
        .import_catalog(
            pb::import_catalog_request::Source::Path("/etc/passwd".into()),
            pb::CatalogFormat::Unspecified,
        )
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().code(), Code::PermissionDenied);
    assert!(client.is_serving().await.unwrap());
}

#[tokio::test]
async fn a_link_inside_an_allowed_directory_that_leads_outside_is_refused() {
    let allowed = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("secret.gguf");
    std::fs::copy(Assets::get().gguf, &secret).unwrap();
    std::os::unix::fs::symlink(&secret, allowed.path().join("link.gguf")).unwrap();
    let agent = Agent::start_with(AgentOptions {
        allow_dirs: Some(vec![allowed.path().to_path_buf()]),
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let url = format!("file://{}", allowed.path().join("link.gguf").display());
    let e = client
        .register_model(gguf_spec("link", &url))
        .await
        .unwrap_err();
    assert_eq!(e.status().unwrap().code(), Code::PermissionDenied);

    // Registered while it was a real file, swapped for a link before the pull: the
    // pull checks again, stores nothing and says nothing of the target.
    let real = allowed.path().join("real.gguf");
    std::fs::copy(Assets::get().gguf, &real).unwrap();
    let url = format!("file://{}", real.display());
    client
        .register_model(gguf_spec("swapped", &url))
        .await
        .unwrap();
    std::fs::remove_file(&real).unwrap();
    std::os::unix::fs::symlink(&secret, &real).unwrap();
    let e = client.pull_to_end("swapped").await.unwrap_err();
    let text = e.to_string();
    assert!(text.contains("allows"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    let stored = client
        .storage()
        .list_stored(pb::ListStoredRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        stored
            .models
            .iter()
            .all(|m| m.model_id != "swapped" || !m.complete),
        "{stored:?}"
    );

    // A scan follows links only where they stay inside.
    let scan = client
        .scan(vec![allowed.path().display().to_string()])
        .await
        .unwrap();
    assert!(
        scan.models
            .iter()
            .all(|m| m.spec.as_ref().is_none_or(|s| !s.id.contains("link")))
    );
    assert!(
        scan.skipped.iter().any(|s| s.reason.contains("outside")),
        "{:?}",
        scan.skipped
    );
}

#[tokio::test]
async fn a_model_under_an_allowed_directory_registers_and_pulls() {
    let assets = Assets::get();
    let agent = Agent::start_with(AgentOptions {
        allow_dirs: Some(vec![assets.gguf.parent().unwrap().to_path_buf()]),
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let url = format!("file://{}", assets.gguf.display());
    client
        .register_model(gguf_spec("smol", &url))
        .await
        .unwrap();
    client.pull_to_end("smol").await.unwrap();
}

const APP_TOKEN: &str = "app-0c3f9b2e5d7a41e8";
const CI_TOKEN: &str = "ci-5e8a1d4b7c2f9036";

/// An agent that accepts two tokens: "app" (inference) and "ci" (operator).
async fn agent_with_tokens() -> (Agent, tempfile::TempDir) {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let hash = |t: &str| hex::encode(sha2::Sha256::digest(t.as_bytes()));
    let path = dir.path().join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\nname = \"app\"\nrole = \"inference\"\nsha256 = \"{}\"\n\n\
             [[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            hash(APP_TOKEN),
            hash(CI_TOKEN)
        ),
    )
    .unwrap();
    let agent = Agent::start_with(AgentOptions {
        args: vec!["--tokens-file".into(), path.display().to_string()],
        ..Default::default()
    })
    .await;
    (agent, dir)
}

#[tokio::test]
async fn tokens_and_roles_decide_who_may_call_what() {
    let (agent, _dir) = agent_with_tokens().await;
    let anonymous = agent.client().await;
    // Health is open: load balancers and orchestrators probe without a token.
    assert!(anonymous.is_serving().await.unwrap());

    let e = anonymous.capabilities().await.unwrap_err();
    let status = e.status().unwrap();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert_eq!(reason(status), "CREDENTIALS_MISSING");

    let wrong = agent.client().await.with_token("not-a-token").unwrap();
    let e = wrong.capabilities().await.unwrap_err();
    assert_eq!(e.status().unwrap().code(), Code::Unauthenticated);
    assert_eq!(reason(e.status().unwrap()), "CREDENTIALS_INVALID");

    let app = agent.client().await.with_token(APP_TOKEN).unwrap();
    app.capabilities().await.unwrap();
    let url = format!("file://{}", Assets::get().gguf.display());
    let e = app
        .register_model(gguf_spec("smol", &url))
        .await
        .unwrap_err();
    let status = e.status().unwrap();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(status), "ROLE_REQUIRED");
    assert!(
        status.message().contains("operator"),
        "{}",
        status.message()
    );

    let ci = agent.client().await.with_token(CI_TOKEN).unwrap();
    ci.register_model(gguf_spec("smol", &url)).await.unwrap();
    // The app may read what the operator wrote.
    assert_eq!(
        app.get_model("smol").await.unwrap().spec.unwrap().id,
        "smol"
    );

    // modelctl carries the token from --token or MODELD_TOKEN.
    let (ok, _, err) = modeld_e2e::modelctl(&agent, &["models", "list"]);
    assert!(!ok && err.contains("token"), "{err}");
    let (ok, out, err) = modeld_e2e::modelctl(&agent, &["--token", APP_TOKEN, "models", "list"]);
    assert!(ok, "{err}");
    assert!(out.contains("smol"), "{out}");

    // grpcurl, with the header on the call and on reflection.
    let assets = Assets::get();
    let grpcurl = |headers: &[&str]| {
        let mut cmd = std::process::Command::new(&assets.grpcurl);
        cmd.arg("-plaintext");
        for h in headers {
            cmd.args(["-H", h]);
        }
        cmd.arg(agent.addr.to_string())
            .arg("modeld.v1.Node/GetCapabilities")
            .output()
            .unwrap()
    };
    let out = grpcurl(&[]);
    assert!(!out.status.success());
    let bearer = format!("authorization: Bearer {APP_TOKEN}");
    let out = grpcurl(&[&bearer]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No token ever reaches the log.
    let log = agent.log();
    assert!(!log.contains(APP_TOKEN) && !log.contains(CI_TOKEN));
    assert!(log.contains("call refused"), "{log}");
}

#[tokio::test]
async fn a_reachable_address_needs_tls_and_credentials_or_explicit_insecure() {
    let refused = std::process::Command::new(modeld_e2e::binary("modeld"))
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("refusing to serve") && err.contains("--insecure"),
        "{err}"
    );

    let agent = Agent::start_with(AgentOptions {
        listen: Some("0.0.0.0:0".parse().unwrap()),
        args: vec!["--insecure".into()],
        ..Default::default()
    })
    .await;
    assert!(agent.log().contains("INSECURE"), "{}", agent.log());
    // Reflection is off by default away from loopback.
    let listed = std::process::Command::new(&Assets::get().grpcurl)
        .args([
            "-plaintext",
            &format!("127.0.0.1:{}", agent.addr.port()),
            "list",
        ])
        .output()
        .unwrap();
    assert!(
        !listed.status.success(),
        "reflection answered on a reachable address"
    );
}

/// Remote sources follow at most 5 redirects, to http(s) only, and a header configured
/// for one host is never sent to the host a redirect points to.
#[tokio::test]
async fn redirects_are_bounded_and_headers_stay_with_their_host() {
    use modeld_e2e::{Fault, model_server};
    let assets = Assets::get();
    let (_dir_a, origin) = model_server(&assets).await;
    let (_dir_b, mirror) = model_server(&assets).await;
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--source-header".into(),
            "127.0.0.1=X-Api-Key: origin-secret".into(),
        ],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;

    // The origin (127.0.0.1) sends the download to a mirror named differently.
    let to_mirror = format!("http://localhost:{}/smol.gguf", mirror.addr.port());
    origin.fault("smol.gguf", Fault::Redirect(to_mirror));
    client
        .register_model(gguf_spec("redirected", &origin.url("smol.gguf")))
        .await
        .unwrap();
    client.pull_to_end("redirected").await.unwrap();
    let at_origin = origin.seen("smol.gguf");
    assert_eq!(at_origin[0].status, 302);
    assert_eq!(at_origin[0].api_key.as_deref(), Some("origin-secret"));
    let at_mirror = mirror.seen("smol.gguf");
    assert!(!at_mirror.is_empty(), "the redirect was followed");
    assert!(
        at_mirror.iter().all(|s| s.api_key.is_none()),
        "the origin's header reached the mirror: {at_mirror:?}"
    );

    // To another scheme: refused, nothing read. (A fresh agent each: the file is
    // already stored on the first one, content-addressed.)
    let scheme_agent = Agent::start().await;
    let client = scheme_agent.client().await;
    let (_dir_c, server) = model_server(&assets).await;
    server.always("smol.gguf", Fault::Redirect("file:///etc/passwd".into()));
    client
        .register_model(gguf_spec("to-file", &server.url("smol.gguf")))
        .await
        .unwrap();
    let e = client.pull_to_end("to-file").await.unwrap_err().to_string();
    assert!(e.contains("only http and https"), "{e}");

    // A loop: refused after 5.
    let looping_agent = Agent::start().await;
    let client = looping_agent.client().await;
    let (_dir_d, looping) = model_server(&assets).await;
    looping.always("smol.gguf", Fault::Redirect(looping.url("smol.gguf")));
    client
        .register_model(gguf_spec("looping", &looping.url("smol.gguf")))
        .await
        .unwrap();
    let e = client.pull_to_end("looping").await.unwrap_err().to_string();
    assert!(e.contains("more than 5 redirects"), "{e}");
    assert!(
        looping.seen("smol.gguf").len() <= 6 * 6,
        "retried without end"
    );
}

/// Past `--max-concurrent-rpcs`, a call is refused at once, never queued; streams count
/// while open; health is never refused.
#[tokio::test]
async fn the_rpc_limit_refuses_at_once_and_frees_with_the_streams() {
    let agent = Agent::start_with(AgentOptions {
        args: vec!["--max-concurrent-rpcs".into(), "2".into()],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let watch = || {
        let client = client.clone();
        async move {
            client
                .lifecycle()
                .watch(pb::WatchRequest::default())
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = watch().await;
    let second = watch().await;
    let started = std::time::Instant::now();
    let e = client.capabilities().await.unwrap_err();
    let status = e.status().unwrap();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(status), "TOO_MANY_RPCS");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "refused at once"
    );
    assert!(
        client.is_serving().await.unwrap(),
        "health is never refused"
    );

    drop(first);
    // The server sees the stream end when the client resets it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while client.capabilities().await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the permit never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(second);
}

/// Every state-changing call lands in the audit log with who made it and how it
/// ended, refusals included; only an admin reads it, and it survives a restart.
#[tokio::test]
async fn the_audit_log_records_who_changed_what() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let hash = |t: &str| hex::encode(sha2::Sha256::digest(t.as_bytes()));
    let path = dir.path().join("tokens.toml");
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\nname = \"app\"\nrole = \"inference\"\nsha256 = \"{}\"\n\
             [[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"{}\"\n\
             [[tokens]]\nname = \"root\"\nrole = \"admin\"\nsha256 = \"{}\"\n",
            hash(APP_TOKEN),
            hash(CI_TOKEN),
            hash("root-token-77")
        ),
    )
    .unwrap();
    let agent = Agent::start_with(AgentOptions {
        args: vec!["--tokens-file".into(), path.display().to_string()],
        ..Default::default()
    })
    .await;
    let as_ = |token: &'static str| {
        let agent = &agent;
        async move { agent.client().await.with_token(token).unwrap() }
    };
    let (app, ci, root) = (
        as_(APP_TOKEN).await,
        as_(CI_TOKEN).await,
        as_("root-token-77").await,
    );
    let url = format!("file://{}", Assets::get().gguf.display());
    assert!(
        agent
            .client()
            .await
            .register_model(gguf_spec("smol", &url))
            .await
            .is_err()
    );
    ci.register_model(gguf_spec("smol", &url)).await.unwrap();
    app.get_model("smol").await.unwrap();
    assert!(app.delete_model("smol").await.is_err());
    ci.pull_to_end("smol").await.unwrap();

    for (who, client) in [("app", &app), ("ci", &ci)] {
        let e = client
            .node()
            .list_audit(pb::ListAuditRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{who}");
    }
    let read = |client: modeld_e2e::Client| async move {
        client
            .node()
            .list_audit(pb::ListAuditRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| {
                let call = e.method.rsplit('/').next().unwrap().to_owned();
                (e.identity, call, e.code, e.reason)
            })
            .collect::<Vec<_>>()
    };
    let expected = vec![
        ("ci".to_owned(), "Pull".to_owned(), 0, String::new()),
        (
            "app".into(),
            "DeleteModel".into(),
            Code::PermissionDenied as i32,
            "ROLE_REQUIRED".into(),
        ),
        ("ci".into(), "RegisterModel".into(), 0, String::new()),
        (
            String::new(),
            "RegisterModel".into(),
            Code::Unauthenticated as i32,
            "CREDENTIALS_MISSING".into(),
        ),
    ];
    // Newest first; the read-only GetModel is not there.
    assert_eq!(read(root.clone()).await, expected);

    let (ok, out, err) = modeld_e2e::modelctl(&agent, &["--token", "root-token-77", "audit"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("RegisterModel") && out.contains("ROLE_REQUIRED"),
        "{out}"
    );

    let agent = agent.restart().await;
    let root = agent.client().await.with_token("root-token-77").unwrap();
    assert_eq!(read(root).await, expected, "kept across a restart");
}

/// Tokens are added and revoked by editing the file, without a restart; emptying it
/// does not open the agent.
#[tokio::test]
async fn the_tokens_file_is_read_again_when_it_changes() {
    use sha2::Digest as _;
    let (agent, dir) = agent_with_tokens().await;
    let path = dir.path().join("tokens.toml");
    let app = agent.client().await.with_token(APP_TOKEN).unwrap();
    app.capabilities().await.unwrap();

    // Revoke "app", add "new".
    let new_token = "new-token-93";
    std::fs::write(
        &path,
        format!(
            "[[tokens]]\nname = \"new\"\nrole = \"inference\"\nsha256 = \"{}\"\n",
            hex::encode(sha2::Sha256::digest(new_token.as_bytes()))
        ),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.capabilities().await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked token still works"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let new = agent.client().await.with_token(new_token).unwrap();
    new.capabilities().await.unwrap();

    // An emptied file keeps the tokens in force.
    std::fs::write(&path, "").unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let anonymous = agent.client().await;
    assert_eq!(
        anonymous
            .capabilities()
            .await
            .unwrap_err()
            .status()
            .unwrap()
            .code(),
        Code::Unauthenticated
    );
    new.capabilities().await.unwrap();
    assert!(
        agent.log().contains("holds no credentials"),
        "{}",
        agent.log()
    );
}

/// `--source-allow-host` and `--source-deny-host` decide which hosts downloads reach,
/// redirects included.
#[tokio::test]
async fn source_host_rules_hold_for_every_hop() {
    use modeld_e2e::{Fault, model_server};
    let assets = Assets::get();
    let (_a, origin) = model_server(&assets).await;
    let (_b, mirror) = model_server(&assets).await;
    // Only 127.0.0.1: "localhost" (the same machine, another name) is out.
    let agent = Agent::start_with(AgentOptions {
        args: vec!["--source-allow-host".into(), "127.0.0.1".into()],
        ..Default::default()
    })
    .await;
    let client = agent.client().await;
    let to_mirror = format!("http://localhost:{}/smol.gguf", mirror.addr.port());
    origin.always("smol.gguf", Fault::Redirect(to_mirror.clone()));
    client
        .register_model(gguf_spec("hop", &origin.url("smol.gguf")))
        .await
        .unwrap();
    let e = client.pull_to_end("hop").await.unwrap_err().to_string();
    assert!(e.contains("--source-allow-host"), "{e}");
    assert!(
        mirror.seen("smol.gguf").is_empty(),
        "the mirror was reached"
    );

    let denied = Agent::start_with(AgentOptions {
        args: vec!["--source-deny-host".into(), "localhost".into()],
        ..Default::default()
    })
    .await;
    let client = denied.client().await;
    client
        .register_model(gguf_spec("direct", &to_mirror))
        .await
        .unwrap();
    let e = client.pull_to_end("direct").await.unwrap_err().to_string();
    assert!(e.contains("--source-deny-host"), "{e}");
    assert!(mirror.seen("smol.gguf").is_empty());
}
