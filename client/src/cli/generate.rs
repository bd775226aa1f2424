use std::io::Write;

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
    let mut stream = client
        .generate()
        .generate(request)
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let mut stdout = std::io::stdout();
    while let Some(msg) = stream.next().await {
        let msg = msg.map_err(ClientError::from)?;
        if out == Output::Json {
            println!("{}", serde_json::to_string(&msg)?);
            continue;
        }
        match msg.event {
            Some(pb::generate_response::Event::Token(t)) => {
                write!(stdout, "{}", t.text)?;
                stdout.flush()?;
            }
            Some(pb::generate_response::Event::Summary(s)) => {
                writeln!(stdout)?;
                if s.finish_reason() == pb::FinishReason::Error {
                    anyhow::bail!("generation failed: {}", s.error);
                }
                let u = s.usage.unwrap_or_default();
                eprintln!(
                    "[{}: {} prompt + {} generated tokens, first token {:.0} ms, {:.1} tokens/s]",
                    output::short_enum(s.finish_reason().as_str_name(), "FINISH_REASON_"),
                    u.prompt_tokens,
                    u.generated_tokens,
                    u.time_to_first_token_seconds * 1000.0,
                    u.generation_tokens_per_second
                );
            }
            None => {}
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
    println!("{t}");
    Ok(())
}
