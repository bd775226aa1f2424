//! Throughput as a client sees it: prompt and generation tokens/s, time to first
//! token and its overhead over the engine's own, and aggregate tokens/s with several
//! streams at once — all through the full gRPC stream. With `--conversation`, a
//! greedy chat instead: each turn's time to first token with the prompt cache and
//! without it.

use std::time::{Duration, Instant};

use clap::Args;
use modelctl::{Client, ClientError};
use modeld_proto::v1 as pb;
use serde::Serialize;

use super::Output;
use super::output;

#[derive(Debug, Args)]
pub struct BenchArgs {
    id: String,
    /// Concurrent streams per level, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    concurrency: Vec<usize>,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens each stream generates (end-of-sequence is ignored, as llama-bench does).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Runs per level; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Start the streams of a level this many milliseconds apart instead of all at
    /// once, as a server sees requests arrive.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    stagger_ms: u64,
    /// Instead of the levels: a greedy chat of this many turns, each sent whole (as
    /// a chat client does), first with the prompt cache and then without it.
    #[arg(long, value_name = "TURNS")]
    conversation: Option<usize>,
}

/// One stream, timed at the client.
struct Timed {
    sent: Instant,
    /// When each token arrived, its id, and the text of them all.
    tokens: Vec<Instant>,
    ids: Vec<u32>,
    text: String,
    usage: pb::Usage,
}

#[derive(Debug, Clone, Serialize)]
pub struct Level {
    pub concurrency: usize,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// Prompt tokens over the client's time to first token (one stream).
    pub prompt_tokens_per_second: f64,
    /// Generation tokens/s summed over streams, counted while all of them generate.
    pub generation_tokens_per_second: f64,
    /// The streams' own generation rates (after the first token), summed: with
    /// staggered starts the streams never all generate at once.
    pub summed_stream_tokens_per_second: f64,
    /// All tokens (prompt and generated) over wall time, like llama-batched-bench's S.
    pub total_tokens_per_second: f64,
    pub time_to_first_token_ms: f64,
    /// Client time to first token minus the engine's own.
    pub time_to_first_token_overhead_ms: f64,
    pub wall_seconds: f64,
}

async fn one_stream(client: &Client, request: pb::GenerateRequest) -> anyhow::Result<Timed> {
    let sent = Instant::now();
    let mut stream = client
        .generate()
        .generate(request)
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let (mut tokens, mut ids, mut text, mut usage) = (Vec::new(), Vec::new(), String::new(), None);
    while let Some(msg) = stream.message().await.map_err(ClientError::from)? {
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => {
                tokens.push(Instant::now());
                ids.push(t.token_id);
                text.push_str(&t.text);
            }
            Some(pb::generate_response::Event::Summary(s)) => {
                if s.finish_reason() == pb::FinishReason::Error {
                    anyhow::bail!("generation failed: {}", s.error);
                }
                usage = s.usage;
            }
            None => {}
        }
    }
    Ok(Timed {
        sent,
        tokens,
        ids,
        text,
        usage: usage.ok_or_else(|| anyhow::anyhow!("the stream ended without a summary"))?,
    })
}

/// A prompt of exactly `n` tokens: a repeated word, checked with the model's tokenizer.
async fn prompt_of(client: &Client, id: &str, n: usize) -> anyhow::Result<String> {
    let text = " the".repeat(n);
    let count = client
        .generate()
        .tokenize(pb::TokenizeRequest {
            model_id: id.to_owned(),
            text: text.clone(),
            add_special_tokens: true,
            parse_special: false,
        })
        .await
        .map_err(ClientError::from)?
        .into_inner()
        .token_ids
        .len();
    if count != n {
        eprintln!("note: the prompt is {count} tokens, not {n}");
    }
    Ok(text)
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn level(
    client: &Client,
    a: &BenchArgs,
    prompt: &str,
    concurrency: usize,
) -> anyhow::Result<Level> {
    let request = |prompt: String| pb::GenerateRequest {
        model_id: a.id.clone(),
        input: Some(pb::generate_request::Input::Prompt(prompt)),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: a.max_tokens,
        ignore_eos: true,
        // Every run computes its whole prompt, not what the run before left.
        cache_prompt: Some(false),
        ..Default::default()
    };
    let started = Instant::now();
    let stagger = Duration::from_millis(a.stagger_ms);
    let streams = futures::future::try_join_all((0..concurrency).map(|i| async move {
        let delay = stagger * u32::try_from(i).unwrap_or(u32::MAX);
        tokio::time::sleep(delay).await;
        one_stream(client, request(prompt.to_owned())).await
    }))
    .await?;
    let wall = started.elapsed();
    let first = |t: &Timed| t.tokens.first().copied().unwrap_or(t.sent);
    let last = |t: &Timed| t.tokens.last().copied().unwrap_or(t.sent);
    // The generation window opens once every stream has its first token.
    let window_start = streams.iter().map(first).max().unwrap_or(started);
    let window_end = streams.iter().map(last).max().unwrap_or(started);
    let in_window: usize = streams
        .iter()
        .map(|t| t.tokens.iter().filter(|at| **at > window_start).count())
        .sum();
    let window = secs(window_end.saturating_duration_since(window_start));
    let s0 = &streams[0];
    let ttft = secs(first(s0).saturating_duration_since(s0.sent));
    let prompt_tokens: u32 = streams.iter().map(|t| t.usage.prompt_tokens).sum();
    let generated_tokens: u32 = streams.iter().map(|t| t.usage.generated_tokens).sum();
    #[allow(clippy::cast_precision_loss)]
    Ok(Level {
        concurrency,
        prompt_tokens,
        generated_tokens,
        prompt_tokens_per_second: f64::from(s0.usage.prompt_tokens) / ttft,
        generation_tokens_per_second: if window > 0.0 {
            in_window as f64 / window
        } else {
            0.0
        },
        summed_stream_tokens_per_second: streams.iter().map(stream_rate).sum(),
        total_tokens_per_second: f64::from(prompt_tokens + generated_tokens) / secs(wall),
        time_to_first_token_ms: ttft * 1000.0,
        time_to_first_token_overhead_ms: (ttft - s0.usage.time_to_first_token_seconds) * 1000.0,
        wall_seconds: secs(wall),
    })
}

/// A stream's tokens after its first over the time they took.
fn stream_rate(t: &Timed) -> f64 {
    match (t.tokens.first(), t.tokens.last()) {
        (Some(first), Some(last)) if last > first => {
            #[allow(clippy::cast_precision_loss)]
            let after_first = (t.tokens.len() - 1) as f64;
            after_first / secs(*last - *first)
        }
        _ => 0.0,
    }
}

fn median_by(mut runs: Vec<Level>, key: impl Fn(&Level) -> f64) -> Option<Level> {
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    let mid = runs.len() / 2;
    runs.into_iter().nth(mid)
}

pub async fn bench(client: &Client, a: BenchArgs, out: Output) -> anyhow::Result<()> {
    if let Some(turns) = a.conversation {
        return conversation(client, &a, turns, out).await;
    }
    let prompt = prompt_of(client, &a.id, a.prompt_tokens).await?;
    // One warm-up, so page faults and first-use allocations are not measured.
    level(client, &a, &prompt, 1).await?;
    let mut results = Vec::new();
    for &c in &a.concurrency {
        let mut runs = Vec::new();
        for _ in 0..a.runs.max(1) {
            runs.push(level(client, &a, &prompt, c).await?);
        }
        if let Some(m) = median_by(runs, |l| l.generation_tokens_per_second) {
            results.push(m);
        }
    }
    if out == Output::Json {
        return output::json(&results);
    }
    let mut t = output::table(&[
        "STREAMS",
        "PROMPT t/s",
        "GEN t/s",
        "STREAMS' GEN t/s",
        "TOTAL t/s",
        "TTFT ms",
        "TTFT OVERHEAD ms",
    ]);
    for l in &results {
        t.add_row(vec![
            l.concurrency.to_string(),
            format!("{:.1}", l.prompt_tokens_per_second),
            format!("{:.1}", l.generation_tokens_per_second),
            format!("{:.1}", l.summed_stream_tokens_per_second),
            format!("{:.1}", l.total_tokens_per_second),
            format!("{:.1}", l.time_to_first_token_ms),
            format!("{:.2}", l.time_to_first_token_overhead_ms),
        ]);
    }
    outln!("{t}");
    Ok(())
}

/// What a user says in the benchmark's chat, turn after turn.
const QUESTIONS: [&str; 10] = [
    "What is the capital of France?",
    "Tell me about its history.",
    "Which river runs through it?",
    "Name three famous museums there.",
    "What food is the city known for?",
    "How do people get around?",
    "What is the weather like in spring?",
    "Which neighbourhoods should a visitor see?",
    "What is a good day trip from there?",
    "Summarise our conversation in two sentences.",
];

/// One turn of the benchmark's chat.
#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    pub turn: usize,
    pub prompt_tokens: u32,
    /// Prompt tokens the cache gave (the run with the cache).
    pub cached_prompt_tokens: u32,
    pub time_to_first_token_ms_cached: f64,
    pub time_to_first_token_ms_uncached: f64,
    /// The two runs' replies, token for token.
    pub same_reply: bool,
}

/// One greedy chat reply.
async fn reply(
    client: &Client,
    a: &BenchArgs,
    messages: &[pb::ChatMessage],
    cache_prompt: bool,
) -> anyhow::Result<Timed> {
    let request = pb::GenerateRequest {
        model_id: a.id.clone(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: messages.to_vec(),
        })),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: a.max_tokens,
        cache_prompt: Some(cache_prompt),
        ..Default::default()
    };
    one_stream(client, request).await
}

/// A chat of `turns` turns, each whole conversation sent once with the prompt cache
/// and once without; the history goes on with the reply the cache gave.
async fn conversation(
    client: &Client,
    a: &BenchArgs,
    turns: usize,
    out: Output,
) -> anyhow::Result<()> {
    let ttft_ms = |t: &Timed| {
        secs(
            t.tokens
                .first()
                .copied()
                .unwrap_or(t.sent)
                .saturating_duration_since(t.sent),
        ) * 1000.0
    };
    let mut messages = Vec::new();
    let mut results = Vec::new();
    for (turn, question) in QUESTIONS.iter().cycle().take(turns).enumerate() {
        messages.push(pb::ChatMessage {
            role: pb::ChatRole::User as i32,
            content: (*question).to_owned(),
        });
        let cached = reply(client, a, &messages, true).await?;
        let fresh = reply(client, a, &messages, false).await?;
        results.push(Turn {
            turn: turn + 1,
            prompt_tokens: cached.usage.prompt_tokens,
            cached_prompt_tokens: cached.usage.cached_prompt_tokens,
            time_to_first_token_ms_cached: ttft_ms(&cached),
            time_to_first_token_ms_uncached: ttft_ms(&fresh),
            same_reply: cached.ids == fresh.ids,
        });
        messages.push(pb::ChatMessage {
            role: pb::ChatRole::Assistant as i32,
            content: cached.text,
        });
    }
    if out == Output::Json {
        return output::json(&results);
    }
    let mut t = output::table(&[
        "TURN",
        "PROMPT",
        "CACHED",
        "TTFT ms (cache)",
        "TTFT ms (no cache)",
        "SAME REPLY",
    ]);
    for r in &results {
        t.add_row(vec![
            r.turn.to_string(),
            r.prompt_tokens.to_string(),
            r.cached_prompt_tokens.to_string(),
            format!("{:.1}", r.time_to_first_token_ms_cached),
            format!("{:.1}", r.time_to_first_token_ms_uncached),
            if r.same_reply { "yes" } else { "NO" }.to_owned(),
        ]);
    }
    outln!("{t}");
    Ok(())
}
