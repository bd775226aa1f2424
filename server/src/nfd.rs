//! Node Feature Discovery: on a Kubernetes node the agent keeps a feature file that
//! NFD's `local` source turns into node labels, so workloads can be scheduled next to
//! a loaded model (`nodeSelector: {modeld.io/model.smollm2-135m-instruct: ready}`).
//! NFD must allow the `modeld.io` namespace (`-extra-label-ns=modeld.io`); see
//! deploy/kubernetes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use modeld_node::Node;
use modeld_node::model::ModelState;
use tokio::sync::watch;
use tracing::warn;

/// How often the file is brought up to date besides lifecycle events.
const REFRESH: Duration = Duration::from_secs(10);
/// Kubernetes label names (after the prefix) and values are at most this long.
const LABEL_MAX: usize = 63;

/// The labels this node has now.
pub fn labels(node: &Node) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let host = node.hardware.host();
    out.insert("modeld.io/agent".into(), "true".into());
    out.insert(
        "modeld.io/device-class".into(),
        host.device_class.as_str().into(),
    );
    let gib = |bytes: u64| (bytes >> 30).to_string();
    out.insert(
        "modeld.io/memory-gib".into(),
        gib(node.hardware.memory().total_bytes),
    );
    out.insert(
        "modeld.io/memory-budget-gib".into(),
        gib(node.memory_budget_bytes),
    );
    for engine in node.inference.engines() {
        let name = engine.runtime.as_str().replace('.', "-");
        out.insert(format!("modeld.io/runtime.{name}"), "true".into());
    }
    if let Ok(models) = node.store.lifecycles() {
        for (id, record) in models {
            let state = ModelState::ALL.iter().find(|s| s.as_str() == record.state);
            let value = match state {
                Some(ModelState::Ready) => "ready",
                Some(ModelState::Downloaded) => "stored",
                Some(ModelState::Failed) => "failed",
                Some(ModelState::Registered) | None => continue,
                Some(_) => "loading",
            };
            // A label name part holds at most 63 characters; longer ids go unlabeled.
            if id.len() <= LABEL_MAX - "model.".len() {
                out.insert(format!("modeld.io/model.{id}"), value.into());
            }
        }
    }
    out
}

fn render(labels: &BTreeMap<String, String>) -> String {
    let mut text = String::from("# Written by modeld for Node Feature Discovery's local source.\n");
    for (k, v) in labels {
        text.push_str(&format!("{k}={v}\n"));
    }
    text
}

/// Writes `text` to `path` whole: NFD never reads a half-written file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Keeps the feature file at `path` current until `shutdown`, and removes it then, so
/// a stopped agent stops advertising its models.
pub fn spawn(
    path: PathBuf,
    node: Arc<Node>,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut events = node.registry.lifecycle().subscribe();
        let mut written = String::new();
        loop {
            let text = render(&labels(&node));
            if text != written {
                let (p, t) = (path.clone(), text.clone());
                match tokio::task::spawn_blocking(move || write_atomically(&p, &t)).await {
                    Ok(Ok(())) => written = text,
                    Ok(Err(e)) => {
                        warn!(path = %path.display(), error = %e, "the NFD feature file could not be written")
                    }
                    Err(e) => warn!(error = %e, "the NFD feature file task failed"),
                }
            }
            tokio::select! {
                _ = events.recv() => {}
                () = tokio::time::sleep(REFRESH) => {}
                _ = shutdown.wait_for(|s| *s) => {
                    let _ = std::fs::remove_file(&path);
                    return;
                }
            }
        }
    })
}
