use clap::Args;
use modelctl::{Client, ClientError};
use modeld_proto::v1 as pb;
use tokio_stream::StreamExt;

use super::Output;
use super::output;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    id: String,
    prompt: String,
    /// Most tokens to generate (0 = until the context is full).
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 = greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long = "stop")]
    stop: Vec<String>,
    /// Send the prompt as one user message, rendered with the model's chat template.
    #[arg(long)]
    chat: bool,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    id: String,
    text: String,
    /// Add the model's BOS (and other automatic special tokens).
    #[arg(long)]
    add_special: bool,
    /// Parse special-token text such as "<|im_start|>" as the token itself.
    #[arg(long)]
    parse_special: bool,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    id: String,
    /// A system message that opens the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    /// 0 = greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
}

/// Streams one generation to stdout (or JSON lines); returns the text and summary.
async fn stream_to_stdout(
    client: &Client,
    request: pb::GenerateRequest,
    out: Output,
) -> anyhow::Result<(String, Option<pb::GenerateSummary>)> {
    let mut stream = client
        .generate()
        .generate(request)
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let mut text = String::new();
    let mut summary = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(ClientError::from)?;
        if out == Output::Json {
            outln!("{}", serde_json::to_string(&msg)?);
        }
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => {
                if out != Output::Json {
                    out!("{}", t.text);
                    output::flush_stdout();
                }
                text.push_str(&t.text);
            }
            Some(pb::generate_response::Event::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    if out != Output::Json {
        outln!();
    }
    if let Some(s) = &summary
        && s.finish_reason() == pb::FinishReason::Error
    {
        anyhow::bail!("generation failed: {}", s.error);
    }
    Ok((text, summary))
}

fn print_usage(s: &pb::GenerateSummary) {
    let u = s.usage.unwrap_or_default();
    // Last, so the counts keep their places for whoever reads them.
    let cached = match u.cached_prompt_tokens {
        0 => String::new(),
        n => format!(", {n} prompt tokens from the cache"),
    };
    eprintln!(
        "[{}: {} prompt + {} generated tokens, first token {:.0} ms, {:.1} tokens/s{cached}]",
        output::short_enum(s.finish_reason().as_str_name(), "FINISH_REASON_"),
        u.prompt_tokens,
        u.generated_tokens,
        u.time_to_first_token_seconds * 1000.0,
        u.generation_tokens_per_second
    );
}

pub async fn generate(client: &Client, a: GenerateArgs, out: Output) -> anyhow::Result<()> {
    let input = if a.chat {
        pb::generate_request::Input::Chat(pb::ChatMessages {
            messages: vec![pb::ChatMessage {
                role: pb::ChatRole::User as i32,
                content: a.prompt,
            }],
        })
    } else {
        pb::generate_request::Input::Prompt(a.prompt)
    };
    let request = pb::GenerateRequest {
        model_id: a.id,
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            temperature: a.temperature,
            seed: a.seed,
            ..Default::default()
        }),
        max_tokens: a.max_tokens,
        stop: a.stop,
        ..Default::default()
    };
    let (_, summary) = stream_to_stdout(client, request, out).await?;
    if out != Output::Json
        && let Some(s) = summary
    {
        print_usage(&s);
    }
    Ok(())
}

/// A read-eval-print loop over stdin. Each turn sends the whole conversation, so the
/// model sees what was said before; `/reset` forgets it, `/exit` (or end of input)
/// leaves. Works from a pipe as well as a terminal.
pub async fn chat(client: &Client, a: ChatArgs) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt;

    let opening: Vec<pb::ChatMessage> = a
        .system
        .iter()
        .map(|s| pb::ChatMessage {
            role: pb::ChatRole::System as i32,
            content: s.clone(),
        })
        .collect();
    let mut messages = opening.clone();
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if interactive {
        eprintln!("chatting with {} (/reset forgets, /exit leaves)", a.id);
    }
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        if interactive {
            eprint!(">>> ");
        }
        let Some(line) = lines.next_line().await? else {
            break;
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                messages.clone_from(&opening);
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(pb::ChatMessage {
            role: pb::ChatRole::User as i32,
            content: line.to_owned(),
        });
        let request = pb::GenerateRequest {
            model_id: a.id.clone(),
            input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                messages: messages.clone(),
            })),
            sampling: Some(pb::SamplingParams {
                temperature: a.temperature,
                seed: a.seed,
                ..Default::default()
            }),
            max_tokens: a.max_tokens,
            // A long conversation keeps its latest turns rather than failing.
            truncation: pb::Truncation::KeepEnd as i32,
            ..Default::default()
        };
        match stream_to_stdout(client, request, Output::Table).await {
            Ok((reply, summary)) => {
                if let Some(s) = summary {
                    print_usage(&s);
                }
                messages.push(pb::ChatMessage {
                    role: pb::ChatRole::Assistant as i32,
                    content: reply,
                });
            }
            Err(e) => {
                // The turn failed: forget it so the conversation stays consistent.
                messages.pop();
                eprintln!("error: {e:#}");
            }
        }
    }
    Ok(())
}

pub async fn tokenize(client: &Client, a: TokenizeArgs, out: Output) -> anyhow::Result<()> {
    let resp = client
        .generate()
        .tokenize(pb::TokenizeRequest {
            model_id: a.id,
            text: a.text,
            add_special_tokens: a.add_special,
            parse_special: a.parse_special,
        })
        .await
        .map_err(ClientError::from)?
        .into_inner();
    if out == Output::Json {
        return output::json(&resp);
    }
    let mut t = output::table(&["#", "ID", "PIECE"]);
    for (i, (id, piece)) in resp.token_ids.iter().zip(&resp.pieces).enumerate() {
        t.add_row(vec![i.to_string(), id.to_string(), format!("{piece:?}")]);
    }
    outln!("{t}");
    Ok(())
}
