use std::sync::Arc;

use std::time::{Duration, Instant, SystemTime};

use crate::telemetry::metrics::Served;

use modeld_engine_core::{EngineError, FinishReason, GenerateRequest};
use modeld_proto::v1 as pb;
use modeld_proto::v1::generate_server::Generate;
use tonic::{Request, Response, Status};

use super::convert;
use super::validate::{self, limits};
use super::{Agent, Boxed};
use modeld_node::error::{Error, Result};
use modeld_node::inference::{Event, ModelWorker};
use modeld_node::registry::spec;

/// What one Generate has done so far, recorded in metrics and its span when it ends:
/// by the engine's outcome, or, when the client leaves first (or its deadline
/// passes), as cancelled with the tokens it got.
struct Tally {
    metrics: Arc<crate::telemetry::metrics::Metrics>,
    model_id: String,
    runtime: &'static str,
    weight_bytes: u64,
    span: tracing::Span,
    submitted: SystemTime,
    prompt_tokens: u32,
    generated: u32,
    first_token: Option<SystemTime>,
    outcome_recorded: bool,
}

impl Tally {
    fn served(&self) -> Served<'_> {
        Served {
            model: &self.model_id,
            runtime: self.runtime,
            weight_bytes: self.weight_bytes,
        }
    }

    fn done(&mut self, reason: FinishReason, stats: &modeld_engine_core::GenerateStats) {
        self.outcome_recorded = true;
        self.metrics.generate_done(&self.served(), reason, stats);
        let span = &self.span;
        span.record("gen_ai.usage.output_tokens", stats.generated_tokens);
        span.record(
            "gen_ai.response.finish_reasons",
            crate::telemetry::metrics::finish_reason(reason),
        );
        span.record(
            "gen_ai.server.time_to_first_token",
            stats.time_to_first_token_seconds,
        );
        crate::telemetry::trace::generate_phases(
            span,
            crate::telemetry::trace::GeneratePhases {
                submitted: self.submitted,
                first_token: self.first_token,
                done: SystemTime::now(),
                time_to_first_token: Duration::try_from_secs_f64(stats.time_to_first_token_seconds)
                    .unwrap_or_default(),
            },
            stats.prompt_tokens,
            stats.generated_tokens,
        );
    }

    fn failed(&mut self, e: &Error) {
        self.outcome_recorded = true;
        self.metrics.generate_failed(&self.served());
        self.span.record("gen_ai.response.finish_reasons", "error");
        let _entered = self.span.enter();
        tracing::warn!(error = %e, "generation failed");
    }

    /// The engine's numbers as far as the stream saw them.
    fn so_far(&self) -> modeld_engine_core::GenerateStats {
        let now = SystemTime::now();
        let since = |t: SystemTime| now.duration_since(t).unwrap_or_default().as_secs_f64();
        let decoding = self.first_token.map(since).unwrap_or_default();
        modeld_engine_core::GenerateStats {
            prompt_tokens: self.prompt_tokens,
            cached_prompt_tokens: 0,
            generated_tokens: self.generated,
            time_to_first_token_seconds: self
                .first_token
                .and_then(|t| t.duration_since(self.submitted).ok())
                .map_or(0.0, |d| d.as_secs_f64()),
            prompt_tokens_per_second: 0.0,
            generation_tokens_per_second: if self.generated > 1 && decoding > 0.0 {
                f64::from(self.generated - 1) / decoding
            } else {
                0.0
            },
        }
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if !self.outcome_recorded {
            let stats = self.so_far();
            self.done(FinishReason::Cancelled, &stats);
        }
    }
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
        match self.agent.node.registry.get(model_id) {
            Err(Error::ModelNotFound { .. }) => Err(Error::invalid(
                "model_id",
                format!("no model {model_id:?} is registered on this node"),
            )),
            Err(e) => Err(e),
            Ok(_) => self.agent.node.inference.ready(model_id),
        }
    }
}

#[tonic::async_trait]
impl Generate for GenerateApi {
    type GenerateStream = Boxed<pb::GenerateResponse>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        super::status::rpc(async move {
        let deadline = super::layers::deadline(&request);
        let r = validate::Generate::try_from(request.into_inner())?;
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
        let chat = matches!(r.input, validate::Input::Chat(_));
        let (text, parse_special) = match r.input {
            validate::Input::Prompt(p) => (p, false),
            validate::Input::Chat(messages) => (worker.render_chat(messages).await?, true),
        };
        let prompt = worker
            .encode_prompt(text, parse_special, r.truncation, r.max_tokens)
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
            sampling: r.sampling,
            max_tokens: r.max_tokens,
            stop: r.stop,
            logprobs: r.logprobs,
            grammar: r.grammar,
            ignore_eos: r.ignore_eos,
            cache_prompt: r.cache_prompt,
        };
        let span = tracing::info_span!(
            "generate",
            "otel.name" = format!("generate {}", worker.model_id()),
            "gen_ai.operation.name" = if chat { "chat" } else { "text_completion" },
            "gen_ai.request.model" = %worker.model_id(),
            "gen_ai.request.max_tokens" = request.max_tokens,
            "modeld.runtime" = worker.runtime.as_str(),
            "gen_ai.usage.input_tokens" = request.prompt.len(),
            "gen_ai.usage.output_tokens" = tracing::field::Empty,
            "gen_ai.response.finish_reasons" = tracing::field::Empty,
            "gen_ai.server.time_to_first_token" = tracing::field::Empty,
        );
        let submitted = SystemTime::now();
        let prompt_tokens = u32::try_from(request.prompt.len()).unwrap_or(u32::MAX);
        let events = worker.generate(request, deadline)?;
        let tally = Tally {
            metrics: self.agent.metrics.clone(),
            model_id: worker.model_id(),
            runtime: worker.runtime.as_str(),
            weight_bytes: worker.estimate.weights,
            span,
            submitted,
            prompt_tokens,
            generated: 0,
            first_token: None,
            outcome_recorded: false,
        };
        drop(worker);
        // The stream maps engine events as tonic polls it: no task or channel hop per
        // token, so a token costs one wake-up on the way out. Dropping the stream (the
        // client left) drops `events`, which stops the engine within one token, and
        // the tally, which records the generation as cancelled.
        let stream = futures::stream::unfold(Some((events, tally)), move |state| async move {
            let (mut events, mut tally) = state?;
            let Some(event) = events.recv().await else {
                // The engine dropped the request without an outcome: it crashed.
                if tally.outcome_recorded {
                    return None;
                }
                let e = Error::EnginePanicked {
                    id: tally.model_id.clone(),
                    during: "this request",
                };
                tally.failed(&e);
                return Some((Err(super::status::of(&e)), None));
            };
            if let Event::Done(FinishReason::Cancelled, stats) = &event
                && deadline.is_some_and(|d| Instant::now() >= d)
            {
                tally.done(FinishReason::Cancelled, stats);
                let e = Error::DeadlineExceeded("the request's deadline passed; generation stopped");
                return Some((Err(super::status::of(&e)), None));
            }
            match &event {
                Event::Done(reason, stats) => tally.done(*reason, stats),
                Event::Failed(e) => tally.failed(e),
                Event::Token(_) => {
                    tally.generated = tally.generated.saturating_add(1);
                    tally.first_token.get_or_insert_with(SystemTime::now);
                }
            }
            Some((Ok(convert::event_to_pb(event)), Some((events, tally))))
        });
        Ok(Response::new(Box::pin(stream) as Boxed<_>))
    })
        .await
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        super::status::rpc(async move {
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
        })
        .await
    }

    async fn detokenize(
        &self,
        request: Request<pb::DetokenizeRequest>,
    ) -> Result<Response<pb::DetokenizeResponse>, Status> {
        super::status::rpc(async move {
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
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_after_the_stream_started_carries_its_reason_and_code() {
        let pb::GenerateResponse {
            event: Some(pb::generate_response::Event::Summary(summary)),
        } = convert::event_to_pb(Event::Failed(Error::Engine(
            modeld_engine_core::EngineError::Inference("decode: out of memory".into()),
        )))
        else {
            panic!("a failure ends the stream with a summary");
        };
        assert_eq!(summary.finish_reason(), pb::FinishReason::Error);
        assert!(summary.error.contains("out of memory"), "{}", summary.error);
        let status = crate::api::status::of(&Error::Engine(
            modeld_engine_core::EngineError::Inference(String::new()),
        ));
        assert_eq!(summary.error_code, status.code() as i32);
        assert!(!summary.error_reason.is_empty());
    }
}
