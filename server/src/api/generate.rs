use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use modeld_engine_core::{FinishReason, GenerateRequest, Sampling};
use modeld_proto::v1 as pb;
use modeld_proto::v1::generate_server::Generate;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::error::{Error, Result};
use crate::inference::{Event, ModelWorker};
use crate::registry::spec;

/// Limits on what a request may ask for.
pub mod limits {
    pub const STOP_STRINGS_MAX: usize = 16;
    pub const STOP_STRING_LEN_MAX: usize = 256;
    pub const PROMPT_BYTES_MAX: usize = 1024 * 1024;
    pub const CHAT_MESSAGES_MAX: usize = 1024;
    pub const TOKENS_MAX: usize = 1024 * 1024;
    pub const GRAMMAR_BYTES_MAX: usize = 64 * 1024;
}

pub struct GenerateApi {
    agent: Arc<Agent>,
}

impl GenerateApi {
    pub fn new(agent: Arc<Agent>) -> Self {
        GenerateApi { agent }
    }

    async fn worker(&self, model_id: &str) -> Result<Arc<ModelWorker>> {
        spec::validate_id("model_id", model_id)?;
        let entry = self.agent.registry.get(model_id)?;
        self.agent
            .inference
            .worker(&entry, &self.agent.storage)
            .await
    }
}

fn check_range(field: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>> {
    match v {
        Some(x) if !(x.is_finite() && x >= lo && x <= hi) => Err(Error::invalid(
            field,
            format!("{x} is outside [{lo}, {hi}]"),
        )),
        other => Ok(other),
    }
}

fn sampling_from_pb(s: Option<pb::SamplingParams>) -> Result<Sampling> {
    let s = s.unwrap_or_default();
    Ok(Sampling {
        temperature: check_range("sampling.temperature", s.temperature, 0.0, 5.0)?,
        top_k: s.top_k,
        top_p: check_range("sampling.top_p", s.top_p, 0.0, 1.0)?,
        min_p: check_range("sampling.min_p", s.min_p, 0.0, 1.0)?,
        repeat_penalty: check_range("sampling.repeat_penalty", s.repeat_penalty, 0.0, 10.0)?,
        frequency_penalty: check_range(
            "sampling.frequency_penalty",
            s.frequency_penalty,
            -10.0,
            10.0,
        )?,
        presence_penalty: check_range(
            "sampling.presence_penalty",
            s.presence_penalty,
            -10.0,
            10.0,
        )?,
        penalty_last_n: s.penalty_last_n,
        seed: s.seed,
    })
}

fn role_name(role: i32) -> Result<&'static str> {
    match pb::ChatRole::try_from(role) {
        Ok(pb::ChatRole::System) => Ok("system"),
        Ok(pb::ChatRole::User) => Ok("user"),
        Ok(pb::ChatRole::Assistant) => Ok("assistant"),
        Ok(pb::ChatRole::Tool) => Ok("tool"),
        Ok(pb::ChatRole::Unspecified) => Err(Error::invalid("chat.messages.role", "is required")),
        Err(_) => Err(Error::invalid(
            "chat.messages.role",
            format!("unknown enum value {role}"),
        )),
    }
}

fn finish_to_pb(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
    }
}

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Generate for GenerateApi {
    type GenerateStream = Boxed<pb::GenerateResponse>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let r = request.into_inner();
        if r.stop.len() > limits::STOP_STRINGS_MAX {
            return Err(Error::invalid(
                "stop",
                format!("at most {} stop strings", limits::STOP_STRINGS_MAX),
            )
            .into());
        }
        if let Some(long) = r
            .stop
            .iter()
            .find(|s| s.len() > limits::STOP_STRING_LEN_MAX)
        {
            return Err(Error::invalid(
                "stop",
                format!(
                    "{} bytes; the limit is {}",
                    long.len(),
                    limits::STOP_STRING_LEN_MAX
                ),
            )
            .into());
        }
        if r.grammar.len() > limits::GRAMMAR_BYTES_MAX {
            return Err(Error::invalid(
                "grammar",
                format!(
                    "{} bytes; the limit is {}",
                    r.grammar.len(),
                    limits::GRAMMAR_BYTES_MAX
                ),
            )
            .into());
        }
        let sampling = sampling_from_pb(r.sampling)?;
        let worker = self.worker(&r.model_id).await?;
        let prompt = match r.input {
            Some(pb::generate_request::Input::Prompt(p)) => {
                if p.is_empty() || p.len() > limits::PROMPT_BYTES_MAX {
                    return Err(Error::invalid(
                        "prompt",
                        format!("must be 1 to {} bytes", limits::PROMPT_BYTES_MAX),
                    )
                    .into());
                }
                worker.tokenize(p, true, false).await?
            }
            Some(pb::generate_request::Input::Chat(chat)) => {
                if chat.messages.is_empty() || chat.messages.len() > limits::CHAT_MESSAGES_MAX {
                    return Err(Error::invalid(
                        "chat.messages",
                        format!("must hold 1 to {} messages", limits::CHAT_MESSAGES_MAX),
                    )
                    .into());
                }
                let mut messages = Vec::with_capacity(chat.messages.len());
                for m in chat.messages {
                    messages.push((role_name(m.role)?.to_owned(), m.content));
                }
                let text = worker.render_chat(messages).await?;
                worker.tokenize(text, true, true).await?
            }
            None => return Err(Error::invalid("input", "set prompt or chat").into()),
        };
        let request = GenerateRequest {
            prompt,
            sampling,
            max_tokens: r.max_tokens,
            stop: r.stop,
            logprobs: r.logprobs,
            grammar: (!r.grammar.trim().is_empty()).then_some(r.grammar),
        };
        let mut events = worker.generate(request)?;
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let message = match event {
                    Event::Token(t) => pb::GenerateResponse {
                        event: Some(pb::generate_response::Event::Token(pb::GeneratedToken {
                            text: t.text,
                            token_id: t.id,
                            logprob: t.logprob,
                        })),
                    },
                    Event::Done(finish, stats) => pb::GenerateResponse {
                        event: Some(pb::generate_response::Event::Summary(pb::GenerateSummary {
                            finish_reason: finish_to_pb(finish) as i32,
                            usage: Some(pb::Usage {
                                prompt_tokens: stats.prompt_tokens,
                                generated_tokens: stats.generated_tokens,
                                time_to_first_token_seconds: stats.time_to_first_token_seconds,
                                prompt_tokens_per_second: stats.prompt_tokens_per_second,
                                generation_tokens_per_second: stats.generation_tokens_per_second,
                            }),
                            error: String::new(),
                        })),
                    },
                    Event::Failed(e) => pb::GenerateResponse {
                        event: Some(pb::generate_response::Event::Summary(pb::GenerateSummary {
                            finish_reason: pb::FinishReason::Error as i32,
                            usage: None,
                            error: e.to_string(),
                        })),
                    },
                };
                // The client went away: dropping `events` makes the worker stop.
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        if r.text.len() > limits::PROMPT_BYTES_MAX {
            return Err(Error::invalid(
                "text",
                format!(
                    "{} bytes; the limit is {}",
                    r.text.len(),
                    limits::PROMPT_BYTES_MAX
                ),
            )
            .into());
        }
        let worker = self.worker(&r.model_id).await?;
        let token_ids = worker
            .tokenize(r.text, r.add_special_tokens, r.parse_special)
            .await?;
        let pieces = worker.pieces(token_ids.clone()).await?;
        Ok(Response::new(pb::TokenizeResponse { token_ids, pieces }))
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        let r = request.into_inner();
        if r.token_ids.len() > limits::TOKENS_MAX {
            return Err(Error::invalid(
                "token_ids",
                format!("at most {} tokens", limits::TOKENS_MAX),
            )
            .into());
        }
        let worker = self.worker(&r.model_id).await?;
        let text = worker
            .detokenize(r.token_ids, r.skip_special_tokens)
            .await?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }
}
