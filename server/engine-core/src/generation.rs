//! One generation loop for every engine that exposes a plain forward pass over a KV
//! cache (ONNX Runtime, candle): prompt prefill in chunks, the shared [`Sampler`],
//! streaming-safe text, stop strings, end-of-generation tokens, limits and timing.
//! llama.cpp batches sequences itself and keeps its own loop.

use std::sync::Arc;
use std::time::Instant;

use crate::engine::{
    EngineError, FinishReason, Flow, GenerateOutcome, GenerateRequest, GenerateStats, LoadedModel,
    ModelInfo, Token, Tokenizer,
};
use crate::sampler::Sampler;
use crate::text::{StopMatcher, StopOutcome, Utf8Stream};

/// A decoder network with its own KV cache, one sequence at a time.
pub trait Forward: Send {
    /// Runs `tokens` at the positions after those the cache holds, appends them to
    /// the cache, and returns the logits of the last one (one per vocabulary entry).
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError>;
    /// Tokens the cache holds.
    fn cached(&self) -> usize;
    /// Cuts the cache to at most `len` tokens and returns how many it kept. A runtime
    /// that can only drop its cache whole returns 0 (unless `len` equals `cached()`).
    fn truncate(&mut self, len: usize) -> usize;
}

/// An engine with several kinds of network picks one at load time.
impl Forward for Box<dyn Forward> {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        (**self).forward(tokens)
    }
    fn cached(&self) -> usize {
        (**self).cached()
    }
    fn truncate(&mut self, len: usize) -> usize {
        (**self).truncate(len)
    }
}

/// Runs requests over a [`Forward`], reusing the cache for a prompt that starts the
/// way the previous one did (a chat's next turn).
pub struct SequenceRunner<F> {
    forward: F,
    tokenizer: Arc<dyn Tokenizer>,
    context_length: u32,
    prefill_chunk: usize,
    /// The tokens in the cache, in order.
    cached_tokens: Vec<u32>,
    runtime: &'static str,
}

impl<F: Forward> SequenceRunner<F> {
    /// `prefill_chunk` bounds the tokens of one forward call, which bounds the
    /// activations a long prompt needs.
    pub fn new(
        forward: F,
        tokenizer: Arc<dyn Tokenizer>,
        context_length: u32,
        prefill_chunk: usize,
        runtime: &'static str,
    ) -> Self {
        SequenceRunner {
            forward,
            tokenizer,
            context_length,
            prefill_chunk: prefill_chunk.max(1),
            cached_tokens: Vec::new(),
            runtime,
        }
    }

    /// Logits for the token after `prompt`, from an empty cache.
    pub fn logits(&mut self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.check_prompt(prompt)?;
        self.reset();
        let out = self.prefill(prompt, false).map(|(logits, _)| logits);
        if out.is_err() {
            self.reset();
        }
        out
    }

    fn reset(&mut self) {
        self.forward.truncate(0);
        self.cached_tokens.clear();
    }

    fn check_prompt(&self, prompt: &[u32]) -> Result<(), EngineError> {
        check_prompt(prompt, self.context_length, self.tokenizer.vocab_size())
    }

    /// Feeds what of `prompt` the cache does not hold yet (all of it unless `reuse`);
    /// returns the last logits and how many prompt tokens the cache gave.
    fn prefill(&mut self, prompt: &[u32], reuse: bool) -> Result<(Vec<f32>, usize), EngineError> {
        // At least the last prompt token is always run: its logits start the reply.
        let shared = if reuse {
            self.cached_tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1)
        } else {
            0
        };
        let kept = self.forward.truncate(shared).min(shared);
        self.cached_tokens.truncate(kept);
        let mut logits = Vec::new();
        for chunk in prompt[kept..].chunks(self.prefill_chunk) {
            logits = self.forward.forward(chunk)?;
            self.cached_tokens.extend_from_slice(chunk);
        }
        Ok((logits, kept))
    }

    pub fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> GenerateOutcome {
        if request.grammar.is_some() {
            return Err(EngineError::InvalidRequest(format!(
                "grammar-constrained output is supported by the llama.cpp runtime only, not {}",
                self.runtime
            )));
        }
        self.check_prompt(&request.prompt)?;
        let outcome = self.run(request, sink);
        if outcome.is_err() {
            // The cache may hold part of a failed step.
            self.reset();
        }
        outcome
    }

    fn run(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> GenerateOutcome {
        let started = Instant::now();
        let mut sampler = Sampler::new(&request.sampling);
        let mut stops = StopMatcher::new(&request.stop);
        let mut utf8 = Utf8Stream::default();
        let end_of_generation = self.tokenizer.special_tokens().end_of_generation.clone();
        let max_tokens = if request.max_tokens == 0 {
            u32::MAX
        } else {
            request.max_tokens
        };
        let (mut logits, cached) = self.prefill(&request.prompt, request.cache_prompt)?;
        let prompt_done = Instant::now();
        let mut first_token_at = None;
        let mut generated = 0u32;
        let finish = loop {
            let sampled = sampler.sample(&mut logits, request.logprobs)?;
            first_token_at.get_or_insert_with(Instant::now);
            if !request.ignore_eos && end_of_generation.contains(&sampled.id) {
                break FinishReason::Stop;
            }
            generated += 1;
            let text = utf8.push(&self.tokenizer.token_bytes(sampled.id)?);
            let (text, stopped) = match stops.push(&text) {
                StopOutcome::Emit(t) => (t, false),
                StopOutcome::Stopped(t) => (t, true),
            };
            let flow = sink(Token {
                id: sampled.id,
                text,
                logprob: sampled.logprob,
            });
            if flow == Flow::Stop {
                break FinishReason::Cancelled;
            }
            if stopped {
                break FinishReason::Stop;
            }
            if generated >= max_tokens
                || self.cached_tokens.len() + 1 >= self.context_length as usize
            {
                break FinishReason::Length;
            }
            logits = self.forward.forward(&[sampled.id])?;
            self.cached_tokens.push(sampled.id);
        };
        let timings = crate::Timings {
            started,
            prompt_done,
            first_token: first_token_at,
            end: Instant::now(),
        };
        Ok((
            finish,
            GenerateStats::timed(request.prompt.len(), cached, generated, timings),
        ))
    }
}

/// What every engine refuses before it computes: an empty prompt, one that leaves no
/// room in the `context`, and ids outside the vocabulary of `vocab` tokens.
pub fn check_prompt(prompt: &[u32], context: u32, vocab: u32) -> Result<(), EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if prompt.len() >= context as usize {
        return Err(EngineError::ContextOverflow {
            prompt: prompt.len(),
            context,
        });
    }
    if let Some(bad) = prompt.iter().find(|t| **t >= vocab) {
        return Err(EngineError::InvalidRequest(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}

/// A loaded model that is a [`Forward`] behind the shared loop: what an engine that
/// produces logits hands the agent.
pub struct SequenceModel<F> {
    runner: SequenceRunner<F>,
    tokenizer: Arc<dyn Tokenizer>,
    info: ModelInfo,
}

impl<F: Forward> SequenceModel<F> {
    /// `info.context_length` bounds every request; see [`SequenceRunner::new`] for
    /// `prefill_chunk`. A tokenizer with more tokens than the network has logits for
    /// is refused: its ids would index past them.
    pub fn new(
        forward: F,
        tokenizer: Arc<dyn Tokenizer>,
        info: ModelInfo,
        prefill_chunk: usize,
        runtime: &'static str,
    ) -> Result<Self, EngineError> {
        if tokenizer.vocab_size() > info.vocab_size {
            return Err(EngineError::InvalidModel(format!(
                "the tokenizer has {} tokens but the model's logits cover {}",
                tokenizer.vocab_size(),
                info.vocab_size
            )));
        }
        Ok(SequenceModel {
            runner: SequenceRunner::new(
                forward,
                tokenizer.clone(),
                info.context_length,
                prefill_chunk,
                runtime,
            ),
            tokenizer,
            info,
        })
    }
}

impl<F: Forward> LoadedModel for SequenceModel<F> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> Arc<dyn Tokenizer> {
        self.tokenizer.clone()
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn FnMut(Token) -> Flow,
    ) -> GenerateOutcome {
        self.runner.generate(request, sink)
    }

    fn logits(&mut self, prompt: &[u32]) -> Result<Vec<f32>, EngineError> {
        self.runner.logits(prompt)
    }
}
