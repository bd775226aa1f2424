use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use std::time::{Duration, Instant};

use modeld_engine_core::{
    ChatMessage, EngineError, FinishReason, GenerateRequest, Sampling, Truncation,
};
use modeld_proto::v1 as pb;
use modeld_proto::v1::generate_server::Generate;
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

    /// The model's worker. An unknown model is the request's fault (the field is
    /// named); a known one that is not loaded is FAILED_PRECONDITION with its state.
    fn worker(&self, model_id: &str) -> Result<Arc<ModelWorker>> {
        spec::validate_id("model_id", model_id)?;
        match self.agent.registry.get(model_id) {
            Err(Error::ModelNotFound { .. }) => Err(Error::invalid(
                "model_id",
                format!("no model {model_id:?} is registered on this node"),
            )),
            Err(e) => Err(e),
            Ok(_) => self.agent.inference.ready(model_id),
        }
    }
}

/// The deadline a gRPC client sent (`grpc-timeout`: digits and a unit letter).
pub(super) fn deadline<T>(request: &Request<T>) -> Option<Instant> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(timeout)
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
        top_p: match s.top_p {
            Some(p) if !(p > 0.0 && p <= 1.0) => {
                return Err(Error::invalid(
                    "sampling.top_p",
                    format!("{p} is outside (0, 1]"),
                ));
            }
            other => other,
        },
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

fn event_to_pb(event: Event) -> pb::GenerateResponse {
    let event = match event {
        Event::Token(t) => pb::generate_response::Event::Token(pb::GeneratedToken {
            text: t.text,
            token_id: t.id,
            logprob: t.logprob,
        }),
        Event::Done(finish, stats) => pb::generate_response::Event::Summary(pb::GenerateSummary {
            finish_reason: finish_to_pb(finish) as i32,
            usage: Some(pb::Usage {
                prompt_tokens: stats.prompt_tokens,
                generated_tokens: stats.generated_tokens,
                time_to_first_token_seconds: stats.time_to_first_token_seconds,
                prompt_tokens_per_second: stats.prompt_tokens_per_second,
                generation_tokens_per_second: stats.generation_tokens_per_second,
            }),
            error: String::new(),
        }),
        Event::Failed(e) => pb::generate_response::Event::Summary(pb::GenerateSummary {
            finish_reason: pb::FinishReason::Error as i32,
            usage: None,
            error: e.to_string(),
        }),
    };
    pb::GenerateResponse { event: Some(event) }
}

#[tonic::async_trait]
impl Generate for GenerateApi {
    type GenerateStream = Boxed<pb::GenerateResponse>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let deadline = deadline(&request);
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
        let truncation = match pb::Truncation::try_from(r.truncation) {
            Ok(pb::Truncation::Unspecified) => Truncation::Refuse,
            Ok(pb::Truncation::KeepStart) => Truncation::KeepStart,
            Ok(pb::Truncation::KeepEnd) => Truncation::KeepEnd,
            Err(_) => {
                return Err(Error::invalid(
                    "truncation",
                    format!("unknown enum value {}", r.truncation),
                )
                .into());
            }
        };
        let worker = self.worker(&r.model_id)?;
        let context = worker.info.context_length;
        if r.max_tokens >= context {
            return Err(Error::invalid(
                "max_tokens",
                format!(
                    "{} does not fit the model's {context}-token context",
                    r.max_tokens
                ),
            )
            .into());
        }
        let (text, parse_special) = match r.input {
            Some(pb::generate_request::Input::Prompt(p)) => {
                if p.is_empty() || p.len() > limits::PROMPT_BYTES_MAX {
                    return Err(Error::invalid(
                        "prompt",
                        format!("must be 1 to {} bytes", limits::PROMPT_BYTES_MAX),
                    )
                    .into());
                }
                (p, false)
            }
            Some(pb::generate_request::Input::Chat(chat)) => {
                if chat.messages.is_empty() || chat.messages.len() > limits::CHAT_MESSAGES_MAX {
                    return Err(Error::invalid(
                        "chat.messages",
                        format!("must hold 1 to {} messages", limits::CHAT_MESSAGES_MAX),
                    )
                    .into());
                }
                let bytes: usize = chat.messages.iter().map(|m| m.content.len()).sum();
                if bytes > limits::PROMPT_BYTES_MAX {
                    return Err(Error::invalid(
                        "chat.messages",
                        format!(
                            "{bytes} bytes of content; the limit is {}",
                            limits::PROMPT_BYTES_MAX
                        ),
                    )
                    .into());
                }
                let mut messages = Vec::with_capacity(chat.messages.len());
                for m in chat.messages {
                    messages.push(ChatMessage {
                        role: role_name(m.role)?.to_owned(),
                        content: m.content,
                    });
                }
                (worker.render_chat(messages).await?, true)
            }
            None => return Err(Error::invalid("input", "set prompt or chat").into()),
        };
        let prompt = worker
            .encode_prompt(text, parse_special, truncation, r.max_tokens)
            .await
            .map_err(|e| match e {
                Error::Engine(EngineError::ContextOverflow { prompt, .. }) => Error::invalid(
                    "prompt",
                    format!(
                        "{prompt} tokens and max_tokens {} do not fit the model's {context}-token context; shorten it, lower max_tokens, or set truncation",
                        r.max_tokens
                    ),
                ),
                other => other,
            })?;
        if r.max_tokens > 0 && prompt.len() + r.max_tokens as usize > context as usize {
            return Err(Error::invalid(
                "max_tokens",
                format!(
                    "{} plus the prompt's {} tokens exceed the model's {context}-token context",
                    r.max_tokens,
                    prompt.len()
                ),
            )
            .into());
        }
        let request = GenerateRequest {
            prompt,
            sampling,
            max_tokens: r.max_tokens,
            stop: r.stop,
            logprobs: r.logprobs,
            grammar: (!r.grammar.trim().is_empty()).then_some(r.grammar),
            ignore_eos: r.ignore_eos,
        };
        let events = worker.generate(request, deadline)?;
        let model_id = worker.model_id.clone();
        drop(worker);
        // The stream maps engine events as tonic polls it: no task or channel hop per
        // token, so a token costs one wake-up on the way out. Dropping the stream (the
        // client left) drops `events`, which stops the engine within one token.
        let stream = futures::stream::unfold(Some((events, false)), move |state| {
            let model_id = model_id.clone();
            async move {
                let (mut events, finished) = state?;
                let Some(event) = events.recv().await else {
                    // The engine dropped the request without an outcome: it crashed.
                    return (!finished).then(|| {
                        let e = Error::EnginePanicked {
                            id: model_id,
                            during: "this request",
                        };
                        (Err(Status::from(e)), None)
                    });
                };
                if let Event::Done(FinishReason::Cancelled, _) = &event
                    && deadline.is_some_and(|d| Instant::now() >= d)
                {
                    let status = Status::deadline_exceeded(
                        "the request's deadline passed; generation stopped",
                    );
                    return Some((Err(status), None));
                }
                let last = matches!(event, Event::Done(..) | Event::Failed(_));
                Some((Ok(event_to_pb(event)), Some((events, finished || last))))
            }
        });
        Ok(Response::new(Box::pin(stream)))
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
        let worker = self.worker(&r.model_id)?;
        let token_ids = worker
            .encode(r.text, r.add_special_tokens, r.parse_special)
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
        let worker = self.worker(&r.model_id)?;
        let text = worker.decode(r.token_ids, r.skip_special_tokens).await?;
        Ok(Response::new(pb::DetokenizeResponse { text }))
    }
}
