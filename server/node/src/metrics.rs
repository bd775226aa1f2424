//! What the node's modules count (loads, evictions, downloads, rejections), through
//! OpenTelemetry's metrics API. The agent installs the SDK (readers, exporters) as the
//! global meter provider before it builds the node; without one every instrument is a
//! no-op, so nothing here costs anything when metrics are off.
//!
//! Names are `modeld.*`; attributes follow OpenTelemetry's conventions where they
//! exist (`gen_ai.request.model`).

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};

/// Load stage durations, in seconds: from a cached small model's milliseconds to a
/// multi-gigabyte download over an edge uplink.
const STAGE_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
];

/// The instruments, created once from the global meter provider.
pub struct NodeMetrics {
    loads: Counter<u64>,
    load_stage: Histogram<f64>,
    evictions: Counter<u64>,
    disk_evictions: Counter<u64>,
    disk_evicted_bytes: Counter<u64>,
    download_bytes: Counter<u64>,
    download_retries: Counter<u64>,
    download_resumes: Counter<u64>,
    checksum_failures: Counter<u64>,
    rejected: Counter<u64>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

/// The node's instruments. The first call binds them to the global meter provider of
/// that moment, so the agent installs its provider first.
pub fn node() -> &'static NodeMetrics {
    static METRICS: OnceLock<NodeMetrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let meter = opentelemetry::global::meter("modeld");
        NodeMetrics {
            loads: meter
                .u64_counter("modeld.loads")
                .with_description("Loads that ended, by model, runtime and result")
                .build(),
            load_stage: meter
                .f64_histogram("modeld.load.stage.duration")
                .with_unit("s")
                .with_description(
                    "Time each stage of a load took (download, extract, validate, \
                     initialize, load), by model",
                )
                .with_boundaries(STAGE_BUCKETS.to_vec())
                .build(),
            evictions: meter
                .u64_counter("modeld.evictions")
                .with_description("Models unloaded for memory or idleness, by reason")
                .build(),
            disk_evictions: meter
                .u64_counter("modeld.storage.evictions")
                .with_description(
                    "Stored models removed, least recently used first, to make room on \
                     the disk or under the quota",
                )
                .build(),
            disk_evicted_bytes: meter
                .u64_counter("modeld.storage.evicted")
                .with_unit("By")
                .with_description("Bytes freed by removing stored models to make room")
                .build(),
            download_bytes: meter
                .u64_counter("modeld.download.received")
                .with_unit("By")
                .with_description(
                    "Bytes received by downloads, by source kind (origin, mirror, peer, local)",
                )
                .build(),
            download_retries: meter
                .u64_counter("modeld.download.retries")
                .with_description("Download attempts made again after a failure, by source kind")
                .build(),
            download_resumes: meter
                .u64_counter("modeld.download.resumes")
                .with_description(
                    "Download attempts that continued from a byte offset instead of byte 0",
                )
                .build(),
            checksum_failures: meter
                .u64_counter("modeld.download.checksum_failures")
                .with_description("Downloaded files whose size or SHA-256 did not match")
                .build(),
            rejected: meter
                .u64_counter("modeld.generate.rejected")
                .with_description(
                    "Generate requests answered RESOURCE_EXHAUSTED because the model's \
                     queue was full, by model",
                )
                .build(),
        }
    })
}

/// How a load ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadResult {
    Ok,
    /// It did not fit the memory budget: nothing is wrong with the model.
    MemoryExhausted,
    Error,
}

impl LoadResult {
    fn as_str(self) -> &'static str {
        match self {
            LoadResult::Ok => "ok",
            LoadResult::MemoryExhausted => "memory_exhausted",
            LoadResult::Error => "error",
        }
    }
}

/// Why a model was unloaded without an Unload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionReason {
    /// Least recently used, to make room for another model.
    MakeRoom,
    /// Its keep-alive ran out.
    Idle,
    /// The OS reported memory pressure.
    Pressure,
}

impl EvictionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionReason::MakeRoom => "make_room",
            EvictionReason::Idle => "idle",
            EvictionReason::Pressure => "pressure",
        }
    }
}

/// Where downloaded bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// The first http(s) URL a file lists (peers of its site may come before it).
    Origin,
    /// Any later http(s) URL.
    Mirror,
    /// Another agent (`modeld://`).
    Peer,
    /// A file on this machine (`file://`).
    Local,
}

impl SourceKind {
    /// The kind of the `index`-th of the URLs a file lists.
    pub fn of(urls: &[String], index: usize) -> SourceKind {
        let scheme = |url: &str| url.split_once("://").map_or("", |(s, _)| s).to_owned();
        let remote = |url: &String| !matches!(scheme(url).as_str(), "modeld" | "file");
        match urls.get(index).map(|u| scheme(u)).as_deref() {
            Some("modeld") => SourceKind::Peer,
            Some("file") => SourceKind::Local,
            _ if urls.iter().position(remote) == Some(index) => SourceKind::Origin,
            _ => SourceKind::Mirror,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Origin => "origin",
            SourceKind::Mirror => "mirror",
            SourceKind::Peer => "peer",
            SourceKind::Local => "local",
        }
    }
}

fn model(id: &str) -> KeyValue {
    KeyValue::new("gen_ai.request.model", id.to_owned())
}

impl NodeMetrics {
    pub fn load_ended(&self, model_id: &str, runtime: &'static str, result: LoadResult) {
        self.loads.add(
            1,
            &[
                model(model_id),
                KeyValue::new("modeld.runtime", runtime),
                KeyValue::new("modeld.load.result", result.as_str()),
            ],
        );
    }

    pub fn load_stage(&self, model_id: &str, stage: &'static str, took: Duration) {
        self.load_stage.record(
            took.as_secs_f64(),
            &[model(model_id), KeyValue::new("modeld.load.stage", stage)],
        );
    }

    pub fn evicted(&self, model_id: &str, reason: EvictionReason) {
        self.evictions.add(
            1,
            &[
                model(model_id),
                KeyValue::new("modeld.eviction.reason", reason.as_str()),
            ],
        );
    }

    pub fn disk_evicted(&self, model_id: &str, bytes: u64) {
        self.disk_evictions.add(1, &[model(model_id)]);
        self.disk_evicted_bytes.add(bytes, &[model(model_id)]);
    }

    pub fn downloaded(&self, source: SourceKind, bytes: u64) {
        if bytes > 0 {
            self.download_bytes.add(
                bytes,
                &[KeyValue::new("modeld.source.kind", source.as_str())],
            );
        }
    }

    pub fn download_retried(&self, source: SourceKind) {
        self.download_retries
            .add(1, &[KeyValue::new("modeld.source.kind", source.as_str())]);
    }

    pub fn download_resumed(&self, source: SourceKind) {
        self.download_resumes
            .add(1, &[KeyValue::new("modeld.source.kind", source.as_str())]);
    }

    pub fn checksum_failed(&self) {
        self.checksum_failures.add(1, &[]);
    }

    pub fn generate_rejected(&self, model_id: &str) {
        self.rejected.add(1, &[model(model_id)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_remote_url_is_the_origin_and_schemes_name_the_rest() {
        let urls: Vec<String> = [
            "modeld://peer:7700/x",
            "https://a/x",
            "https://b/x",
            "file:///m/x.gguf",
        ]
        .map(String::from)
        .into();
        assert_eq!(SourceKind::of(&urls, 0), SourceKind::Peer);
        assert_eq!(SourceKind::of(&urls, 1), SourceKind::Origin);
        assert_eq!(SourceKind::of(&urls, 2), SourceKind::Mirror);
        assert_eq!(SourceKind::of(&urls, 3), SourceKind::Local);
        assert_eq!(SourceKind::of(&urls[1..], 0), SourceKind::Origin);
    }
}
