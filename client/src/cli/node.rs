use std::time::Duration;

use clap::Subcommand;
use modelctl::Client;
use modeld_proto::v1 as pb;
use tokio_stream::StreamExt;

use super::Output;
use super::output::{self, accelerator_name, bytes, format_name, runtime_name, short_enum};

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Hardware, OS, runtimes and formats of the node.
    Info,
    /// Stream resource snapshots (memory, pressure, CPU) until interrupted.
    Watch {
        /// Seconds between snapshots (0.1 to 3600).
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many snapshots (0 = until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// Measure a stored model's prompt and generation speed with a runtime on this
    /// node; the agent records it and ranks runtimes by it when choosing one.
    Benchmark {
        /// Model id.
        id: String,
        /// Runtime to measure (llama.cpp, onnxruntime, candle); default: the one
        /// Load would choose.
        #[arg(long)]
        runtime: Option<String>,
        /// Prompt tokens (0 = 128).
        #[arg(long, default_value_t = 0)]
        prompt_tokens: u32,
        /// Generated tokens (0 = 64).
        #[arg(long, default_value_t = 0)]
        generated_tokens: u32,
        /// Runs; the medians are recorded (0 = 3).
        #[arg(long, default_value_t = 0)]
        repetitions: u32,
    },
}

pub async fn run(client: &Client, cmd: NodeCommand, out: Output) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::Info => info(client, out).await,
        NodeCommand::Watch { interval, count } => watch(client, interval, count, out).await,
        NodeCommand::Benchmark {
            id,
            runtime,
            prompt_tokens,
            generated_tokens,
            repetitions,
        } => {
            let runtime = match runtime.as_deref() {
                None => pb::Runtime::Unspecified,
                Some(name) => name
                    .parse::<modeld_engine_core::Runtime>()
                    .map(pb::Runtime::from)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            };
            let r = client
                .node()
                .benchmark(pb::BenchmarkRequest {
                    model_id: id,
                    runtime: runtime as i32,
                    prompt_tokens,
                    generated_tokens,
                    repetitions,
                })
                .await?
                .into_inner();
            if out == Output::Json {
                return output::json(&r);
            }
            outln!(
                "{} on {}: prompt {:.1} tokens/s, generation {:.1} tokens/s, peak memory {}",
                r.model_id,
                runtime_name(r.runtime),
                r.prompt_tokens_per_second,
                r.generation_tokens_per_second,
                bytes(r.peak_memory_bytes)
            );
            Ok(())
        }
    }
}

async fn info(client: &Client, out: Output) -> anyhow::Result<()> {
    let caps = client.capabilities().await?;
    if out == Output::Json {
        return output::json(&caps);
    }
    let cpu = caps.cpu.clone().unwrap_or_default();
    let mem = caps.memory.unwrap_or_default();
    let mut t = output::details();
    let device = short_enum(caps.device_class().as_str_name(), "DEVICE_CLASS_");
    t.add_row(vec!["node id".to_owned(), caps.node_id.clone()]);
    t.add_row(vec!["host".to_owned(), caps.hostname.clone()]);
    t.add_row(vec![
        "os".to_owned(),
        format!(
            "{} {} (kernel {})",
            caps.os, caps.os_version, caps.kernel_version
        ),
    ]);
    t.add_row(vec!["device class".to_owned(), device]);
    t.add_row(vec![
        "cpu".to_owned(),
        format!(
            "{} — {} physical / {} logical cores, {}",
            cpu.model, cpu.physical_cores, cpu.logical_cores, cpu.architecture
        ),
    ]);
    t.add_row(vec!["cpu features".to_owned(), cpu.features.join(" ")]);
    t.add_row(vec![
        "memory".to_owned(),
        format!(
            "{} available of {}",
            bytes(mem.available_bytes),
            bytes(mem.total_bytes)
        ),
    ]);
    if mem.cgroup_limit_bytes > 0 {
        t.add_row(vec![
            "cgroup memory limit".to_owned(),
            bytes(mem.cgroup_limit_bytes),
        ]);
    }
    t.add_row(vec![
        "memory budget".to_owned(),
        bytes(caps.memory_budget_bytes),
    ]);
    t.add_row(vec![
        "disk".to_owned(),
        format!(
            "{} free of {}",
            bytes(caps.disk_free_bytes),
            bytes(caps.disk_total_bytes)
        ),
    ]);
    t.add_row(vec![
        "disk quota".to_owned(),
        if caps.disk_quota_bytes == 0 {
            "none".to_owned()
        } else {
            bytes(caps.disk_quota_bytes)
        },
    ]);
    if let Some(p) = &caps.performance {
        t.add_row(vec![
            "measured rates".to_owned(),
            format!(
                "{}/s memory read, {:.1} GFLOP/s f32",
                bytes(p.memory_read_bytes_per_second.max(0.0) as u64),
                p.compute_flops_per_second / 1e9
            ),
        ]);
    }
    let accels: Vec<String> = caps
        .accelerators
        .iter()
        .map(|a| format!("{} {}", accelerator_name(a.kind), a.name))
        .collect();
    t.add_row(vec![
        "accelerators".to_owned(),
        if accels.is_empty() {
            "none (cpu only)".to_owned()
        } else {
            accels.join(", ")
        },
    ]);
    let runtimes: Vec<String> = caps
        .runtimes
        .iter()
        .map(|r| format!("{} {}", runtime_name(r.runtime), r.version))
        .collect();
    t.add_row(vec![
        "runtimes".to_owned(),
        if runtimes.is_empty() {
            "none compiled in".to_owned()
        } else {
            runtimes.join(", ")
        },
    ]);
    for r in &caps.runtimes {
        t.add_row(vec![
            format!("{} cpu kernels", runtime_name(r.runtime)),
            cpu_kernels(r),
        ]);
    }
    let runnable: Vec<String> = caps
        .formats
        .iter()
        .filter(|f| f.runnable)
        .map(|f| format_name(f.format))
        .collect();
    let recognized: Vec<String> = caps
        .formats
        .iter()
        .filter(|f| !f.runnable)
        .map(|f| format_name(f.format))
        .collect();
    t.add_row(vec![
        "formats runnable".to_owned(),
        if runnable.is_empty() {
            "none".to_owned()
        } else {
            runnable.join(", ")
        },
    ]);
    t.add_row(vec![
        "formats recognized only".to_owned(),
        recognized.join(", "),
    ]);
    t.add_row(vec!["agent version".to_owned(), caps.agent_version.clone()]);
    outln!("{t}");
    Ok(())
}

/// "icelake (chosen at startup; withheld: sapphirerapids)" and the like.
fn cpu_kernels(r: &pb::RuntimeInfo) -> String {
    if !r.unavailable_reason.is_empty() {
        return format!("unavailable: {}", r.unavailable_reason);
    }
    let Some(v) = &r.cpu_variant else {
        return "unknown".to_owned();
    };
    let how = match pb::CpuDispatch::try_from(v.dispatch) {
        Ok(pb::CpuDispatch::Runtime) => "chosen at startup",
        Ok(pb::CpuDispatch::BuildTime) => "fixed at build time",
        Ok(pb::CpuDispatch::Library) => "the library's own dispatch",
        _ => "unspecified",
    };
    let mut out = format!("{} ({how}", v.name);
    if !v.withheld.is_empty() {
        let names: Vec<&str> = v
            .withheld
            .iter()
            .map(|w| w.split(':').next().unwrap_or(w))
            .collect();
        out.push_str(&format!("; withheld: {}", names.join(", ")));
    }
    out.push(')');
    out
}

async fn watch(client: &Client, interval: f64, count: u64, out: Output) -> anyhow::Result<()> {
    if !interval.is_finite() || interval <= 0.0 {
        anyhow::bail!("--interval must be a positive number of seconds");
    }
    let d = Duration::from_secs_f64(interval);
    let request = pb::WatchResourcesRequest {
        interval: Some(modeld_proto::pbjson_types::Duration {
            seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
            nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        }),
    };
    let mut stream = client
        .node()
        .watch_resources(request)
        .await
        .map_err(modelctl::ClientError::from)?
        .into_inner();
    let mut seen = 0u64;
    while let Some(item) = stream.next().await {
        let snap = item.map_err(modelctl::ClientError::from)?;
        if out == Output::Json {
            outln!("{}", serde_json::to_string(&snap)?);
        } else {
            let mem = snap.memory.unwrap_or_default();
            let pressure = if snap.memory_pressure < 0.0 {
                "n/a".to_owned()
            } else {
                format!("{:.2}%", snap.memory_pressure)
            };
            outln!(
                "mem avail {:>10}  pressure {:>7}  cpu {:>5.1}%  agent rss {:>10}  disk free {:>10}",
                bytes(mem.available_bytes),
                pressure,
                snap.cpu_usage_percent,
                bytes(snap.agent_rss_bytes),
                bytes(snap.disk_free_bytes)
            );
        }
        seen += 1;
        if count > 0 && seen >= count {
            break;
        }
    }
    Ok(())
}
