//! Loading and unloading models, and what is in memory.

use clap::Args;
use modelctl::{Client, ClientError};
use modeld_proto::pbjson_types::Duration;
use modeld_proto::v1 as pb;

use super::Output;
use super::output;

#[derive(Debug, Args)]
pub struct LoadArgs {
    id: String,
    /// Tokens per request's context (0 = the model's own, capped by the agent).
    #[arg(long, default_value_t = 0)]
    context_length: u32,
    /// Requests decoded together (0 = the agent's default).
    #[arg(long, default_value_t = 0)]
    parallel: u32,
    /// Inference threads (0 = the engine's choice).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Runtime to use, e.g. llama.cpp (default: the best one for the format).
    #[arg(long)]
    runtime: Option<String>,
    /// Never evict this model for memory.
    #[arg(long)]
    pin: bool,
    /// Seconds the model stays loaded once idle (0 = unload when idle, negative =
    /// never; default: the agent's).
    #[arg(long, allow_negative_numbers = true)]
    keep_alive: Option<i64>,
    /// KV cache element type: f16, q8_0 (half the memory) or q4_0 (a quarter);
    /// llama.cpp only.
    #[arg(long, value_parser = ["f16", "q8_0", "q4_0"])]
    kv_cache_type: Option<String>,
    /// Flash attention: auto, on or off; llama.cpp only.
    #[arg(long, value_parser = ["auto", "on", "off"])]
    flash_attention: Option<String>,
}

#[derive(Debug, Args)]
pub struct UnloadArgs {
    id: String,
    /// Seconds running requests get to finish before they are cancelled.
    #[arg(long)]
    grace: Option<u64>,
}

#[derive(Debug, Args)]
pub struct StateArgs {
    id: String,
    /// History entries to show (0 = the agent's default of 100).
    #[arg(long, default_value_t = 0)]
    history: i32,
}

pub async fn load(client: &Client, a: LoadArgs, out: Output) -> anyhow::Result<()> {
    let runtime = match a.runtime.as_deref() {
        None => pb::Runtime::Unspecified,
        Some(name) => name
            .parse::<modeld_engine_core::Runtime>()
            .map(pb::Runtime::from)
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let mut stream = client
        .lifecycle()
        .load(pb::LoadRequest {
            model_id: a.id.clone(),
            options: Some(pb::LoadOptions {
                runtime: runtime as i32,
                context_length: a.context_length,
                max_concurrent_requests: a.parallel,
                threads: a.threads,
                pin: a.pin,
                keep_alive: a.keep_alive.map(|s| Duration {
                    seconds: s,
                    nanos: 0,
                }),
                kv_cache_type: match a.kv_cache_type.as_deref() {
                    Some("q8_0") => pb::KvCacheType::Q80,
                    Some("q4_0") => pb::KvCacheType::Q40,
                    Some(_) => pb::KvCacheType::F16,
                    None => pb::KvCacheType::Unspecified,
                } as i32,
                flash_attention: match a.flash_attention.as_deref() {
                    Some("on") => pb::FlashAttention::On,
                    Some("off") => pb::FlashAttention::Off,
                    Some(_) => pb::FlashAttention::Auto,
                    None => pb::FlashAttention::Unspecified,
                } as i32,
                ..Default::default()
            }),
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    // One bar across every stage (download, validate, initialize, load); indicatif
    // draws nothing when stderr is not a terminal.
    let bar = indicatif::ProgressBar::new(1000);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {percent:>3}% {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut last_state = String::new();
    while let Some(msg) = stream.message().await.map_err(ClientError::from)? {
        if out == Output::Json {
            outln!("{}", serde_json::to_string(&msg)?);
            continue;
        }
        if let Some(loaded) = msg.loaded {
            bar.finish_and_clear();
            outln!(
                "{} is ready: {}, {} context, {} threads, {} (estimated {})",
                loaded.model_id,
                output::runtime_name(loaded.runtime),
                loaded.context_length,
                loaded.threads,
                output::bytes(loaded.actual_memory_bytes),
                output::bytes(loaded.estimated_memory_bytes)
            );
        } else if let Some(p) = msg.progress {
            let state = output::short_enum(p.state().as_str_name(), "MODEL_STATE_");
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            bar.set_position((p.overall_progress.clamp(0.0, 1.0) * 1000.0) as u64);
            let eta = if p.eta_seconds >= 0.0 {
                format!(", about {:.0} s left", p.eta_seconds.ceil())
            } else {
                String::new()
            };
            bar.set_message(format!("{state}: {}{eta}", p.message));
            if bar.is_hidden() && state != last_state {
                eprintln!("{state}: {}", p.message);
            }
            last_state = state;
        }
    }
    Ok(())
}

pub async fn unload(client: &Client, a: UnloadArgs, out: Output) -> anyhow::Result<()> {
    let grace = a.grace.map(std::time::Duration::from_secs);
    let resp = client.unload(&a.id, grace).await?;
    if out == Output::Json {
        return output::json(&resp);
    }
    outln!(
        "{} unloaded ({} requests cancelled)",
        a.id,
        resp.cancelled_requests
    );
    Ok(())
}

pub async fn ps(client: &Client, out: Output) -> anyhow::Result<()> {
    let resp = client
        .lifecycle()
        .list_loaded(pb::ListLoadedRequest {})
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if out == Output::Json {
        return output::json(&resp);
    }
    let mut t = output::table(&[
        "MODEL",
        "RUNTIME",
        "CONTEXT",
        "ENGINE PID",
        "MEMORY (EST.)",
        "IN FLIGHT",
        "IDLE",
        "EXPIRES IN",
    ]);
    let now = std::time::SystemTime::now();
    let secs_from_now = |ts: &modeld_proto::pbjson_types::Timestamp| ts.seconds - unix_now(now);
    for m in &resp.models {
        let idle = m
            .last_used_time
            .as_ref()
            .map_or_else(String::new, |t| format!("{} s", -secs_from_now(t)));
        let expires = if m.pinned {
            "pinned".to_owned()
        } else {
            m.expire_time.as_ref().map_or_else(
                || "never".to_owned(),
                |t| format!("{} s", secs_from_now(t).max(0)),
            )
        };
        t.add_row(vec![
            m.model_id.clone(),
            output::runtime_name(m.runtime),
            // The KV cache type when it is not the default f16.
            match m.kv_cache_type() {
                pb::KvCacheType::Q80 => format!("{} (q8_0 KV)", m.context_length),
                pb::KvCacheType::Q40 => format!("{} (q4_0 KV)", m.context_length),
                _ => m.context_length.to_string(),
            },
            if m.engine_process_id == 0 {
                "in agent".to_owned()
            } else {
                m.engine_process_id.to_string()
            },
            // Measured resident memory (proportional where it differs), then the
            // estimate; "reported" when the engine runs inside the agent.
            format!(
                "{}{}{} ({})",
                output::bytes(m.actual_memory_bytes),
                if m.proportional_memory_bytes > 0
                    && m.proportional_memory_bytes < m.actual_memory_bytes
                {
                    format!(", {} PSS", output::bytes(m.proportional_memory_bytes))
                } else {
                    String::new()
                },
                if m.memory_measured { "" } else { " reported" },
                output::bytes(m.estimated_memory_bytes)
            ),
            m.in_flight_requests.to_string(),
            idle,
            expires,
        ]);
    }
    outln!("{t}");
    outln!(
        "memory: {} of {} budget",
        output::bytes(resp.memory_used_bytes),
        output::bytes(resp.memory_budget_bytes)
    );
    Ok(())
}

fn unix_now(now: std::time::SystemTime) -> i64 {
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub async fn state(client: &Client, a: StateArgs, out: Output) -> anyhow::Result<()> {
    let resp = client
        .lifecycle()
        .get_state(pb::GetStateRequest {
            model_id: a.id.clone(),
            history_limit: a.history,
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if out == Output::Json {
        return output::json(&resp);
    }
    outln!(
        "{}: {} ({} requests in flight)",
        a.id,
        state_name(resp.state),
        resp.in_flight_requests
    );
    if let Some(f) = &resp.failure {
        outln!(
            "failed in {}: {} ({:?})",
            output::short_enum(f.stage().as_str_name(), "LIFECYCLE_STAGE_"),
            f.message,
            tonic::Code::from_i32(f.code)
        );
    }
    let mut t = output::table(&["REV", "TIME", "FROM", "TO", "STAGE", "REASON"]);
    for h in &resp.history {
        t.add_row(transition_row(h));
    }
    outln!("{t}");
    Ok(())
}

fn state_name(v: i32) -> String {
    pb::ModelState::try_from(v).map_or_else(
        |_| v.to_string(),
        |s| output::short_enum(s.as_str_name(), "MODEL_STATE_"),
    )
}

fn transition_row(t: &pb::StateTransition) -> Vec<String> {
    let time = t
        .time
        .as_ref()
        .map(|ts| {
            let secs = u64::try_from(ts.seconds).unwrap_or(0);
            httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
        })
        .unwrap_or_default();
    vec![
        t.revision.to_string(),
        time,
        state_name(t.from_state),
        state_name(t.to_state),
        output::short_enum(t.stage().as_str_name(), "LIFECYCLE_STAGE_"),
        t.reason.clone(),
    ]
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this model's events (default: every model).
    id: Option<String>,
    /// Replay the events after this revision first (default: live events only).
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// Exit after this many events (default: follow until interrupted).
    #[arg(long)]
    max_events: Option<u64>,
}

/// Follows lifecycle events. When the agent goes away (a restart, a crash), it waits
/// and resumes from the last revision it printed, so nothing in between is missed.
pub async fn watch(client: &Client, a: WatchArgs, out: Output) -> anyhow::Result<()> {
    let mut last = a.since;
    let mut seen = 0u64;
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        let request = pb::WatchRequest {
            model_id: a.id.clone().unwrap_or_default(),
            since_revision: last,
        };
        let ended = match client.lifecycle().watch(request).await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(event)) => {
                            delay = std::time::Duration::from_millis(200);
                            last = event.revision;
                            seen += 1;
                            if out == Output::Json {
                                outln!("{}", serde_json::to_string(&event)?);
                            } else if let Some(t) = &event.transition {
                                let kind = output::short_enum(
                                    event.kind().as_str_name(),
                                    "WATCH_EVENT_KIND_",
                                );
                                let row = transition_row(t);
                                outln!(
                                    "{:>6}  {:<10} {:<24} {} -> {}  {}  {}",
                                    row[0],
                                    kind,
                                    t.model_id,
                                    row[2],
                                    row[3],
                                    row[4],
                                    row[5]
                                );
                            }
                            if a.max_events.is_some_and(|m| seen >= m) {
                                return Ok(());
                            }
                        }
                        Ok(None) => break tonic::Status::unavailable("the stream ended"),
                        Err(status) => break status,
                    }
                }
            }
            Err(status) => status,
        };
        match ended.code() {
            // The agent went away or is restarting: resume where we were.
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                eprintln!(
                    "watch: {} — resuming from revision {last} in {} ms",
                    ended.message(),
                    delay.as_millis()
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            _ => return Err(ClientError::from(ended).into()),
        }
    }
}
