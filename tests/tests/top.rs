//! `modelctl top` in a real terminal (tmux), against a real agent serving the real
//! model: it shows the loaded model with its recent figures, refreshes as requests
//! arrive, and quits on `q`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use modeld_e2e::{Agent, Assets, binary, gguf_spec, model_server, modelctl};

/// A tmux server of its own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        let found = Command::new("tmux").arg("-V").output();
        assert!(
            found.is_ok_and(|o| o.status.success()),
            "tmux is needed for this test: scripts/setup installs it"
        );
        Tmux {
            socket: format!("modeld-top-{}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap()
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }

    /// Waits until the screen shows what `want` accepts, or panics with the screen.
    fn wait_for(&self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let screen = self.screen();
            if want(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "top never showed {what}; the screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn generate(agent: &Agent) {
    let (ok, out, err) = modelctl(
        agent,
        &[
            "generate",
            "smol",
            "The capital of France is",
            "--max-tokens",
            "4",
            "--temperature",
            "0",
        ],
    );
    assert!(ok, "{out}{err}");
}

/// The number in column `REQUESTS` of the row for model `smol` (columns are aligned
/// under their headers).
fn requests_shown(screen: &str) -> Option<u32> {
    let header: Vec<char> = screen
        .lines()
        .find(|l| l.contains("REQUESTS"))?
        .chars()
        .collect();
    let at = (0..header.len())
        .find(|i| header[*i..].starts_with(&['R', 'E', 'Q', 'U', 'E', 'S', 'T', 'S']))?;
    let row: Vec<char> = screen
        .lines()
        .find(|l| l.contains(" smol "))?
        .chars()
        .collect();
    let cell: String = row.get(at..)?.iter().collect();
    cell.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_shows_the_agent_live_in_a_terminal_and_quits_on_q() {
    let assets = Assets::get();
    let (_files, server) = model_server(&assets).await;
    let agent = Agent::start().await;
    let client = agent.client().await;
    client
        .register_model(gguf_spec("smol", &server.url("smol.gguf")))
        .await
        .unwrap();
    client.load_to_end("smol", None).await.unwrap();
    generate(&agent);
    generate(&agent);

    let tmux = Tmux::new();
    let command = format!(
        "{} --addr {} top --interval-ms 300",
        binary("modelctl").display(),
        agent.url()
    );
    let started = tmux.run(&[
        "new-session",
        "-d",
        "-x",
        "160",
        "-y",
        "40",
        "-s",
        "top",
        &command,
    ]);
    assert!(started.status.success(), "{started:?}");

    let screen = tmux.wait_for("the loaded model with two requests", |s| {
        requests_shown(s) == Some(2)
    });
    for want in [
        "TTFT P50",
        "TTFT P95",
        "TOKENS/S",
        "llama.cpp",
        "budget",
        "q quits",
    ] {
        assert!(screen.contains(want), "{want} is on the screen:\n{screen}");
    }
    let row = screen.lines().find(|l| l.contains(" smol ")).unwrap();
    assert!(
        row.contains(" ms") || row.contains(" s "),
        "time to first token is shown: {row}"
    );

    // It refreshes by itself.
    generate(&agent);
    tmux.wait_for("the third request", |s| requests_shown(s) == Some(3));

    tmux.run(&["send-keys", "-t", "top", "q"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tmux.alive() {
        assert!(Instant::now() < deadline, "top did not quit on q");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn top_without_a_terminal_prints_one_frame() {
    let agent = Agent::start().await;
    let (ok, out, err) = modelctl(&agent, &["top"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("no model loaded"), "{out}");
    assert!(out.contains("memory: models"), "{out}");
}
