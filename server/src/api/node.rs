use std::sync::Arc;
use std::time::Duration;

use modeld_engine_core::{ModelFormat, Runtime};
use modeld_proto::v1 as pb;
use modeld_proto::v1::node_server::Node;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert;
use super::{Agent, Boxed};
use modeld_node::error::Error;
use modeld_node::performance;

pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
pub const MAX_INTERVAL: Duration = Duration::from_secs(3600);
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

pub struct NodeApi {
    agent: Arc<Agent>,
}

impl NodeApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        NodeApi { agent }
    }
}

#[tonic::async_trait]
impl Node for NodeApi {
    async fn get_capabilities(
        &self,
        _request: Request<pb::GetCapabilitiesRequest>,
    ) -> Result<Response<pb::GetCapabilitiesResponse>, Status> {
        super::status::rpc(async move { Ok(Response::new(capabilities(&self.agent.node).await?)) })
            .await
    }

    type WatchResourcesStream = Boxed<pb::WatchResourcesResponse>;

    async fn watch_resources(
        &self,
        request: Request<pb::WatchResourcesRequest>,
    ) -> Result<Response<Self::WatchResourcesStream>, Status> {
        super::status::rpc(async move {
            let interval = match request.into_inner().interval {
                None => DEFAULT_INTERVAL,
                Some(d) => {
                    let secs = u64::try_from(d.seconds).ok();
                    let nanos = u32::try_from(d.nanos).ok();
                    let parsed = secs.zip(nanos).map(|(s, n)| Duration::new(s, n));
                    match parsed {
                        Some(i) if (MIN_INTERVAL..=MAX_INTERVAL).contains(&i) => i,
                        _ => {
                            return Err(Error::invalid(
                                "interval",
                                format!(
                                    "must be between {} ms and {} s",
                                    MIN_INTERVAL.as_millis(),
                                    MAX_INTERVAL.as_secs()
                                ),
                            )
                            .into());
                        }
                    }
                }
            };
            let (tx, rx) = mpsc::channel(4);
            let agent = self.agent.clone();
            let mut shutdown = self.agent.shutdown.clone();
            tokio::spawn(async move {
                let mut ticker = tokio::time::interval(interval);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = ticker.tick() => {}
                        () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                            let _ = tx.send(Err(super::status::of(&Error::ShuttingDown))).await;
                            break;
                        }
                        // The client went away: stop sampling for it.
                        () = tx.closed() => break,
                    }
                    let a = agent.clone();
                    let snapshot =
                        match tokio::task::spawn_blocking(move || a.node.hardware.snapshot()).await
                        {
                            Ok(s) => s,
                            Err(e) => {
                                let _ = tx.send(Err(super::status::of(&Error::from(e)))).await;
                                break;
                            }
                        };
                    if tx
                        .send(Ok(convert::snapshot_to_pb(snapshot)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            });
            Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as Boxed<_>))
        })
        .await
    }

    async fn benchmark(
        &self,
        request: Request<pb::BenchmarkRequest>,
    ) -> Result<Response<pb::BenchmarkResponse>, Status> {
        super::status::rpc(async move {
            use modeld_node::inference::{
                BenchmarkPlan, MAX_GENERATED_TOKENS, MAX_PROMPT_TOKENS, MAX_REPETITIONS,
            };
            let r = request.into_inner();
            let within = |field: &str, v: u32, default: u32, max: u32| match v {
                0 => Ok(default),
                v if v <= max => Ok(v),
                v => Err(Error::invalid(field, format!("{v}; the limit is {max}"))),
            };
            let plan = BenchmarkPlan {
                runtime: convert::runtime_from_pb("runtime", r.runtime)?,
                prompt_tokens: within("prompt_tokens", r.prompt_tokens, 128, MAX_PROMPT_TOKENS)?,
                generated_tokens: within(
                    "generated_tokens",
                    r.generated_tokens,
                    64,
                    MAX_GENERATED_TOKENS,
                )?,
                repetitions: within("repetitions", r.repetitions, 3, MAX_REPETITIONS)?,
                threads: 0,
            };
            if r.model_id.is_empty() {
                return Err(Error::invalid("model_id", "name the model to measure").into());
            }
            let entry = self.agent.node.registry.get(&r.model_id)?;
            let agent = self.agent.clone();
            let rss = Arc::new(move || agent.node.hardware.snapshot().agent_rss_bytes);
            let record = self
                .agent
                .node
                .inference
                .benchmark(&entry, &self.agent.node.storage, plan, rss)
                .await?;
            let runtime = record
                .runtime
                .parse::<Runtime>()
                .map_or(pb::Runtime::Unspecified, convert::runtime_to_pb);
            Ok(Response::new(pb::BenchmarkResponse {
                model_id: record.model_id,
                runtime: runtime as i32,
                prompt_tokens_per_second: record.prompt_tokens_per_second,
                generation_tokens_per_second: record.generation_tokens_per_second,
                peak_memory_bytes: record.peak_memory_bytes,
                time: Some(convert::timestamp(std::time::SystemTime::now())),
            }))
        })
        .await
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        super::status::rpc(async move {
            let limit = match request.into_inner().limit {
                0 => 100,
                n @ 1..=1000 => n as usize,
                n => {
                    return Err(Error::invalid("limit", format!("{n}; use 1 to 1000")).into());
                }
            };
            let store = self.agent.node.store.clone();
            let entries = tokio::task::spawn_blocking(move || store.audit(limit))
                .await
                .map_err(Error::from)??;
            Ok(Response::new(pb::ListAuditResponse {
                entries: entries
                    .into_iter()
                    .map(|(sequence, r)| convert::audit_to_pb(sequence, r))
                    .collect(),
            }))
        })
        .await
    }
}

/// What this node is and can run, as GetCapabilities answers and as the agent
/// introduces itself to a fleet controller.
pub async fn capabilities(
    node: &Arc<modeld_node::Node>,
) -> Result<pb::GetCapabilitiesResponse, Error> {
    let shared = node.clone();
    // Asking an engine for its CPU kernels may start its runtime (llama.cpp loads
    // its CPU variants once): blocking work, off the async runtime.
    let (memory, disk, variants, rates) = tokio::task::spawn_blocking(move || {
        (
            shared.hardware.memory(),
            shared.hardware.disk(),
            shared.inference.cpu_variants(),
            shared.rates(),
        )
    })
    .await
    .map_err(Error::from)?;
    let host = node.hardware.host();
    let compiled = node.inference.engines();
    let runtimes = compiled
        .iter()
        .map(|e| {
            let variant = variants.iter().find(|(r, _)| *r == e.runtime);
            (e, variant.map(|(_, v)| v))
        })
        .map(|(e, variant)| pb::RuntimeInfo {
            cpu_variant: variant
                .and_then(|v| v.as_ref().ok())
                .map(convert::cpu_variant_to_pb),
            unavailable_reason: variant
                .and_then(|v| v.as_ref().err())
                .cloned()
                .unwrap_or_default(),
            runtime: convert::runtime_to_pb(e.runtime) as i32,
            version: e.version.clone(),
            formats: e
                .formats
                .iter()
                .map(|f| convert::format_to_pb(*f) as i32)
                .collect(),
            quantizations: e.quantizations.clone(),
            accelerators: e
                .accelerators
                .iter()
                .map(|a| convert::accelerator_to_pb(*a) as i32)
                .collect(),
        })
        .collect();
    let measured = node.store.benchmarks()?;
    let formats = ModelFormat::ALL
        .into_iter()
        .map(|f| {
            // Best first, as Load would pick them.
            let here: Vec<Runtime> = performance::ranked(compiled, f, &measured, rates.as_ref());
            pb::FormatSupport {
                format: convert::format_to_pb(f) as i32,
                runnable: !here.is_empty(),
                recognized: true,
                runtimes: here
                    .into_iter()
                    .map(|r| convert::runtime_to_pb(r) as i32)
                    .collect(),
            }
        })
        .collect();
    Ok(pb::GetCapabilitiesResponse {
        node_id: node.store.node_id().to_owned(),
        hostname: host.hostname.clone(),
        os: host.os.clone(),
        os_version: host.os_version.clone(),
        kernel_version: host.kernel_version.clone(),
        device_class: convert::device_class_to_pb(host.device_class) as i32,
        cpu: Some(pb::CpuInfo {
            model: host.cpu.model.clone(),
            vendor: host.cpu.vendor.clone(),
            architecture: host.cpu.architecture.clone(),
            physical_cores: host.cpu.physical_cores,
            logical_cores: host.cpu.logical_cores,
            features: host.cpu.features.clone(),
            frequency_mhz: host.cpu.frequency_mhz,
        }),
        memory: Some(convert::memory_to_pb(memory)),
        accelerators: host
            .accelerators
            .iter()
            .map(|a| pb::AcceleratorInfo {
                kind: convert::accelerator_to_pb(a.kind) as i32,
                name: a.name.clone(),
                vendor: a.vendor.clone(),
                memory_bytes: a.memory_bytes,
                driver_version: a.driver_version.clone(),
            })
            .collect(),
        runtimes,
        formats,
        disk_free_bytes: disk.free_bytes,
        disk_total_bytes: disk.total_bytes,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        memory_budget_bytes: node.memory_budget_bytes,
        disk_quota_bytes: node.disk_quota.unwrap_or(0),
        start_time: Some(convert::timestamp(host.start_time)),
        performance: rates.map(|rates| pb::PerformanceBasis {
            memory_read_bytes_per_second: rates.memory_read_bytes_per_second,
            compute_flops_per_second: rates.compute_flops_per_second,
            measured_at: Some(convert::timestamp(rates.measured_at)),
            runtimes: compiled
                .iter()
                .flat_map(|e| e.formats.iter().map(move |f| (e.runtime, *f)))
                .map(|(runtime, format)| {
                    convert::factors_to_pb(&performance::factors(
                        runtime, format, &rates, &measured,
                    ))
                })
                .collect(),
        }),
    })
}
