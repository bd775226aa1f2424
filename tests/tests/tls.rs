//! TLS on the agent's listener, with certificates made in the test (rcgen): an agent
//! with TLS and credentials serves a non-loopback address without --insecure; a
//! client that does not trust its CA, or speaks plaintext, gets nothing; a rotated
//! certificate is picked up without a restart; with a client CA, a client's
//! certificate is its identity and an expired or missing one is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modeld_e2e::certs::{Ca, ca, leaf, write};
use modeld_e2e::{Agent, AgentOptions, Client, reason};

const TOKEN: &str = "tls-test-token-4b1d";

fn tokens_file(dir: &Path, clients: &[(&str, &str)]) -> PathBuf {
    use sha2::Digest as _;
    let mut text = format!(
        "[[tokens]]\nname = \"ci\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
        hex::encode(sha2::Sha256::digest(TOKEN.as_bytes()))
    );
    for (identity, role) in clients {
        text.push_str(&format!(
            "\n[[clients]]\nidentity = \"{identity}\"\nrole = \"{role}\"\n"
        ));
    }
    write(dir, "tokens.toml", &text)
}

fn tls(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> modelctl::Tls {
    modelctl::Tls {
        ca: ca.map(Path::to_path_buf),
        cert: cert.map(Path::to_path_buf),
        key: key.map(Path::to_path_buf),
    }
}

/// Connects and asks for capabilities: the status code of the failure, if any.
async fn call(agent: &Agent, tls: &modelctl::Tls, token: Option<&str>) -> Result<(), String> {
    let url = format!("https://localhost:{}", agent.addr.port());
    let client = Client::connect_with_tls(&url, tls)
        .await
        .map_err(|e| e.to_string())?;
    let client = match token {
        Some(t) => client.with_token(t).unwrap(),
        None => client,
    };
    client.capabilities().await.map(drop).map_err(|e| {
        e.status().map_or_else(
            || e.to_string(),
            |s| format!("{:?} {}", s.code(), reason(s)),
        )
    })
}

#[tokio::test]
async fn tls_with_tokens_serves_a_reachable_address_and_rotates_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (ca("modeld test CA 1"), ca("modeld test CA 2"));
    let ca1_path = write(dir.path(), "ca1.pem", &ca1.pem);
    let ca2_path = write(dir.path(), "ca2.pem", &ca2.pem);
    let (cert, key) = leaf(&ca1, "modeld", false);
    let cert_path = write(dir.path(), "server.pem", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    let tokens = tokens_file(dir.path(), &[]);

    // TLS and a credential: a reachable address needs no --insecure.
    let agent = Agent::start_with(AgentOptions {
        listen: Some("0.0.0.0:0".parse().unwrap()),
        args: vec![
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
            "--tokens-file".into(),
            tokens.display().to_string(),
            // Off by default off loopback; grpcurl below needs it.
            "--reflection".into(),
            "true".into(),
        ],
        client_tls: Some(tls(Some(&ca1_path), None, None)),
        token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await;
    assert!(!agent.log().contains("INSECURE"), "{}", agent.log());

    let trusting_ca1 = tls(Some(&ca1_path), None, None);
    let trusting_ca2 = tls(Some(&ca2_path), None, None);
    call(&agent, &trusting_ca1, Some(TOKEN)).await.unwrap();
    assert_eq!(
        call(&agent, &trusting_ca1, None).await.unwrap_err(),
        "Unauthenticated CREDENTIALS_MISSING"
    );
    assert!(
        call(&agent, &trusting_ca2, Some(TOKEN)).await.is_err(),
        "untrusted CA"
    );
    let plain = Client::connect(&format!("http://127.0.0.1:{}", agent.addr.port())).await;
    if let Ok(plain) = plain {
        assert!(
            plain.capabilities().await.is_err(),
            "plaintext gets nothing"
        );
    }
    // A refused handshake is logged; a bare TCP connect and close (a load balancer's
    // or kubelet's probe) is not, or probes would fill the log.
    let waited = Instant::now();
    while !agent.log().contains("TLS handshake refused") {
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "the plaintext client's refusal is logged: {}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probes: Vec<u16> = (0..3)
        .map(|_| {
            let probe = std::net::TcpStream::connect(agent.addr).unwrap();
            probe.local_addr().unwrap().port()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log = agent.log();
    for port in probes {
        assert!(
            !log.contains(&format!(":{port} ")) && !log.ends_with(&format!(":{port}")),
            "the probe from port {port} was logged:\n{log}"
        );
    }

    // grpcurl, as the README shows it.
    let assets = modeld_e2e::Assets::get();
    let out = std::process::Command::new(&assets.grpcurl)
        .args(["-cacert", &ca1_path.display().to_string()])
        .args(["-H", &format!("authorization: Bearer {TOKEN}")])
        .arg(format!("localhost:{}", agent.addr.port()))
        .arg("modeld.v1.Node/GetCapabilities")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Rotate to a certificate from CA 2: new connections get it, no restart.
    let (cert, key) = leaf(&ca2, "modeld", false);
    write(dir.path(), "server.key.new", &key);
    write(dir.path(), "server.pem.new", &cert);
    std::fs::rename(dir.path().join("server.key.new"), &key_path).unwrap();
    std::fs::rename(dir.path().join("server.pem.new"), &cert_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while call(&agent, &trusting_ca2, Some(TOKEN)).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the rotated certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(call(&agent, &trusting_ca1, Some(TOKEN)).await.is_err());
    assert!(agent.log().contains("TLS certificate reloaded"));
}

#[tokio::test]
async fn with_a_client_ca_a_certificate_is_the_callers_identity() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, client_ca, other_ca) = (ca("server CA"), ca("device CA"), ca("other CA"));
    let server_ca_path = write(dir.path(), "server-ca.pem", &server_ca.pem);
    let client_ca_path = write(dir.path(), "client-ca.pem", &client_ca.pem);
    let (cert, key) = leaf(&server_ca, "modeld", false);
    let cert_path = write(dir.path(), "server.pem", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    let tokens = tokens_file(
        dir.path(),
        &[("fleet-controller", "operator"), ("old-device", "operator")],
    );
    let client = |name: &str, ca: &Ca, expired: bool| {
        let (cert, key) = leaf(ca, name, expired);
        tls(
            Some(&server_ca_path),
            Some(&write(dir.path(), &format!("{name}.pem"), &cert)),
            Some(&write(dir.path(), &format!("{name}.key"), &key)),
        )
    };
    let controller = client("fleet-controller", &client_ca, false);
    let agent = Agent::start_with(AgentOptions {
        args: vec![
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
            "--tls-client-ca".into(),
            client_ca_path.display().to_string(),
            "--tokens-file".into(),
            tokens.display().to_string(),
        ],
        client_tls: Some(controller.clone()),
        ..Default::default()
    })
    .await;

    // The controller's certificate carries the operator role: it may register.
    let c = agent.client().await;
    let url = format!("file://{}", modeld_e2e::Assets::get().gguf.display());
    c.register_model(modeld_e2e::gguf_spec("smol", &url))
        .await
        .unwrap();

    // A device the tokens file gives no role: known, but not allowed.
    let laptop = client("laptop", &client_ca, false);
    assert_eq!(
        call(&agent, &laptop, None).await.unwrap_err(),
        "PermissionDenied ROLE_REQUIRED"
    );
    // No certificate, one from another CA, or an expired one: no connection.
    for (what, t) in [
        ("none", tls(Some(&server_ca_path), None, None)),
        ("other CA", client("stranger", &other_ca, false)),
        ("expired", client("old-device", &client_ca, true)),
    ] {
        let e = call(&agent, &t, None).await.unwrap_err();
        assert!(
            !e.contains("PermissionDenied"),
            "{what}: refused in the handshake, not by role: {e}"
        );
    }
    // A token still works beside a certificate.
    assert!(call(&agent, &controller, Some(TOKEN)).await.is_ok());
}

/// A peer fetch (`modeld://`) from an agent that serves TLS and needs a token: the
/// fetching agent checks the peer's certificate and sends its token.
#[tokio::test]
async fn peers_fetch_over_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = ca("peer CA");
    let ca_path = write(dir.path(), "ca.pem", &server_ca.pem);
    let (cert, key) = leaf(&server_ca, "modeld", false);
    let cert_path = write(dir.path(), "server.pem", &cert);
    let key_path = write(dir.path(), "server.key", &key);
    let tokens = tokens_file(dir.path(), &[]);
    let a = Agent::start_with(AgentOptions {
        args: vec![
            "--tls-cert".into(),
            cert_path.display().to_string(),
            "--tls-key".into(),
            key_path.display().to_string(),
            "--tokens-file".into(),
            tokens.display().to_string(),
        ],
        client_tls: Some(tls(Some(&ca_path), None, None)),
        token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await;
    let url = format!("file://{}", modeld_e2e::Assets::get().gguf.display());
    let a_client = a.client().await;
    a_client
        .register_model(modeld_e2e::gguf_spec("smol", &url))
        .await
        .unwrap();
    a_client.pull_to_end("smol").await.unwrap();

    let peer = format!("modeld://localhost:{}", a.addr.port());
    let fetch = |args: Vec<String>| {
        let peer = peer.clone();
        async move {
            let b = Agent::start_with(AgentOptions {
                args,
                ..Default::default()
            })
            .await;
            let client = b.client().await;
            client
                .register_model(modeld_e2e::gguf_spec("smol", &peer))
                .await
                .unwrap();
            let result = client
                .pull_to_end("smol")
                .await
                .map(drop)
                .map_err(|e| e.to_string());
            (b, result)
        }
    };
    let ca_arg = vec!["--peer-tls-ca".to_owned(), ca_path.display().to_string()];
    // The CA but no token: the peer refuses.
    let (_b, without) = fetch(ca_arg.clone()).await;
    assert!(without.unwrap_err().contains("Unauthenticated"));
    // CA and token: fetched, verified, stored.
    let mut with_token = ca_arg;
    with_token.extend(["--peer-token".to_owned(), TOKEN.to_owned()]);
    let (b, with) = fetch(with_token).await;
    with.unwrap();
    assert!(!b.log().contains(TOKEN), "the peer token was logged");
}
