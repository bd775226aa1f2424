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
}

#[derive(Debug, Args)]
pub struct UnloadArgs {
    id: String,
    /// Seconds running requests get to finish before they are cancelled.
    #[arg(long)]
    grace: Option<i64>,
}

#[derive(Debug, Args)]
pub struct StateArgs {
    id: String,
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
                ..Default::default()
            }),
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(ClientError::from)? {
        if out == Output::Json {
            println!("{}", serde_json::to_string(&msg)?);
            continue;
        }
        if let Some(loaded) = msg.loaded {
            println!(
                "{} is ready: {}, {} context, {}",
                loaded.model_id,
                output::runtime_name(loaded.runtime),
                loaded.context_length,
                output::bytes(loaded.actual_memory_bytes)
            );
        } else if let Some(p) = msg.progress {
            eprintln!(
                "{}: {}",
                output::short_enum(p.state().as_str_name(), "MODEL_STATE_"),
                p.message
            );
        }
    }
    Ok(())
}

pub async fn unload(client: &Client, a: UnloadArgs, out: Output) -> anyhow::Result<()> {
    let resp = client
        .lifecycle()
        .unload(pb::UnloadRequest {
            model_id: a.id.clone(),
            grace: a.grace.map(|s| Duration {
                seconds: s,
                nanos: 0,
            }),
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if out == Output::Json {
        return output::json(&resp);
    }
    println!(
        "{} unloaded ({} requests cancelled)",
        a.id, resp.cancelled_requests
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
    let mut t = output::table(&["MODEL", "RUNTIME", "CONTEXT", "MEMORY", "IN FLIGHT"]);
    for m in &resp.models {
        t.add_row(vec![
            m.model_id.clone(),
            output::runtime_name(m.runtime),
            m.context_length.to_string(),
            output::bytes(m.actual_memory_bytes),
            m.in_flight_requests.to_string(),
        ]);
    }
    println!("{t}");
    println!(
        "memory: {} of {} budget",
        output::bytes(resp.memory_used_bytes),
        output::bytes(resp.memory_budget_bytes)
    );
    Ok(())
}

pub async fn state(client: &Client, a: StateArgs, out: Output) -> anyhow::Result<()> {
    let resp = client
        .lifecycle()
        .get_state(pb::GetStateRequest {
            model_id: a.id.clone(),
            history_limit: 0,
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if out == Output::Json {
        return output::json(&resp);
    }
    println!(
        "{}: {} ({} requests in flight)",
        a.id,
        output::short_enum(resp.state().as_str_name(), "MODEL_STATE_"),
        resp.in_flight_requests
    );
    Ok(())
}
