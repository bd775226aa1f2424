//! Requests into validated domain requests: every check a request can fail without
//! looking at the node's state, each naming the field at fault (INVALID_ARGUMENT with
//! a BadRequest violation), and every limit a request is held to, in one place.

use std::time::Duration;

use modeld_engine_core::{
    ChatMessage, FlashAttention, KvCacheType, LoadOptions, Runtime, Sampling, Truncation,
};
use modeld_proto::v1 as pb;

use modeld_node::error::{Error, Result};
use modeld_node::inference::LoadRequest;
use modeld_node::memory::KeepAlive;
use modeld_node::registry::spec;

/// Limits on what a request may ask for.
pub mod limits {
    use std::time::Duration;

    pub const STOP_STRINGS_MAX: usize = 16;
    pub const STOP_STRING_LEN_MAX: usize = 256;
    pub const PROMPT_BYTES_MAX: usize = 1024 * 1024;
    pub const CHAT_MESSAGES_MAX: usize = 1024;
    pub const TOKENS_MAX: usize = 1024 * 1024;
    pub const GRAMMAR_BYTES_MAX: usize = 64 * 1024;
    /// Requests a model decodes together, at most.
    pub const PARALLEL_MAX: u32 = 64;
    /// Longest grace an Unload may ask for.
    pub const UNLOAD_GRACE_MAX: Duration = Duration::from_secs(600);
    /// Grace when an Unload does not say.
    pub const UNLOAD_GRACE_DEFAULT: Duration = Duration::from_secs(30);
    /// History entries GetState returns when the request does not say, and at most.
    pub const HISTORY_DEFAULT: usize = 100;
    pub const HISTORY_MAX: usize = 10_000;
}

/// What a Generate asks for, checked.
#[derive(Debug)]
pub struct Generate {
    pub model_id: String,
    pub input: Input,
    pub sampling: Sampling,
    pub truncation: Truncation,
    pub max_tokens: u32,
    pub stop: Vec<String>,
    pub logprobs: bool,
    pub grammar: Option<String>,
    pub ignore_eos: bool,
    pub cache_prompt: bool,
}

#[derive(Debug)]
pub enum Input {
    Prompt(String),
    Chat(Vec<ChatMessage>),
}

impl TryFrom<pb::GenerateRequest> for Generate {
    type Error = Error;

    fn try_from(r: pb::GenerateRequest) -> Result<Generate> {
        spec::validate_id("model_id", &r.model_id)?;
        if r.stop.len() > limits::STOP_STRINGS_MAX {
            return Err(Error::invalid(
                "stop",
                format!("at most {} stop strings", limits::STOP_STRINGS_MAX),
            ));
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
            ));
        }
        if r.grammar.len() > limits::GRAMMAR_BYTES_MAX {
            return Err(Error::invalid(
                "grammar",
                format!(
                    "{} bytes; the limit is {}",
                    r.grammar.len(),
                    limits::GRAMMAR_BYTES_MAX
                ),
            ));
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
                ));
            }
        };
        let input = match r.input {
            Some(pb::generate_request::Input::Prompt(p)) => {
                if p.is_empty() || p.len() > limits::PROMPT_BYTES_MAX {
                    return Err(Error::invalid(
                        "prompt",
                        format!("must be 1 to {} bytes", limits::PROMPT_BYTES_MAX),
                    ));
                }
                Input::Prompt(p)
            }
            Some(pb::generate_request::Input::Chat(chat)) => {
                if chat.messages.is_empty() || chat.messages.len() > limits::CHAT_MESSAGES_MAX {
                    return Err(Error::invalid(
                        "chat.messages",
                        format!("must hold 1 to {} messages", limits::CHAT_MESSAGES_MAX),
                    ));
                }
                let bytes: usize = chat.messages.iter().map(|m| m.content.len()).sum();
                if bytes > limits::PROMPT_BYTES_MAX {
                    return Err(Error::invalid(
                        "chat.messages",
                        format!(
                            "{bytes} bytes of content; the limit is {}",
                            limits::PROMPT_BYTES_MAX
                        ),
                    ));
                }
                let mut messages = Vec::with_capacity(chat.messages.len());
                for m in chat.messages {
                    messages.push(ChatMessage {
                        role: role_name(m.role)?.to_owned(),
                        content: m.content,
                    });
                }
                Input::Chat(messages)
            }
            None => return Err(Error::invalid("input", "set prompt or chat")),
        };
        Ok(Generate {
            model_id: r.model_id,
            input,
            sampling,
            truncation,
            max_tokens: r.max_tokens,
            stop: r.stop,
            logprobs: r.logprobs,
            grammar: (!r.grammar.trim().is_empty()).then_some(r.grammar),
            ignore_eos: r.ignore_eos,
            cache_prompt: r.cache_prompt.unwrap_or(true),
        })
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

/// A Load's options, checked.
pub fn load_request(options: Option<pb::LoadOptions>) -> Result<LoadRequest> {
    let o = options.unwrap_or_default();
    let runtime = match pb::Runtime::try_from(o.runtime) {
        Ok(pb::Runtime::Unspecified) => None,
        Ok(r) => Some(
            Runtime::try_from(r)
                .map_err(|_| Error::invalid("options.runtime", "unknown runtime"))?,
        ),
        Err(_) => {
            return Err(Error::invalid(
                "options.runtime",
                format!("unknown enum value {}", o.runtime),
            ));
        }
    };
    let gpu_layers = match o.gpu_layers {
        -1 => u32::MAX,
        n if n < -1 => {
            return Err(Error::invalid(
                "options.gpu_layers",
                format!("{n}: use -1 for all layers, 0 for none"),
            ));
        }
        n => n.unsigned_abs(),
    };
    if o.max_concurrent_requests > limits::PARALLEL_MAX {
        return Err(Error::invalid(
            "options.max_concurrent_requests",
            format!(
                "{}; the limit is {}",
                o.max_concurrent_requests,
                limits::PARALLEL_MAX
            ),
        ));
    }
    let keep_alive = match o.keep_alive {
        None => None,
        Some(d) if d.seconds < 0 || d.nanos < 0 => Some(KeepAlive::Forever),
        Some(d) if d.seconds == 0 && d.nanos == 0 => Some(KeepAlive::UntilIdle),
        Some(d) => Some(KeepAlive::For(Duration::new(
            d.seconds.unsigned_abs(),
            d.nanos.unsigned_abs(),
        ))),
    };
    let optimization_level = match o.optimization_level {
        None => None,
        Some(level @ 0..=3) => Some(level as u8),
        Some(_) => {
            return Err(Error::invalid(
                "options.optimization_level",
                "must be 0 (off), 1 (basic), 2 (extended) or 3 (all)",
            ));
        }
    };
    let kv_cache_type = match pb::KvCacheType::try_from(o.kv_cache_type) {
        Ok(pb::KvCacheType::Unspecified | pb::KvCacheType::F16) => KvCacheType::F16,
        Ok(pb::KvCacheType::Q80) => KvCacheType::Q8_0,
        Ok(pb::KvCacheType::Q40) => KvCacheType::Q4_0,
        Err(_) => {
            return Err(Error::invalid(
                "options.kv_cache_type",
                format!("unknown enum value {}", o.kv_cache_type),
            ));
        }
    };
    let flash_attention = match pb::FlashAttention::try_from(o.flash_attention) {
        Ok(pb::FlashAttention::Unspecified | pb::FlashAttention::Auto) => FlashAttention::Auto,
        Ok(pb::FlashAttention::On) => FlashAttention::On,
        Ok(pb::FlashAttention::Off) => FlashAttention::Off,
        Err(_) => {
            return Err(Error::invalid(
                "options.flash_attention",
                format!("unknown enum value {}", o.flash_attention),
            ));
        }
    };
    // llama.cpp stores a quantized V cache only through its fused attention kernel.
    if kv_cache_type != KvCacheType::F16 && flash_attention == FlashAttention::Off {
        return Err(Error::invalid(
            "options.kv_cache_type",
            format!(
                "a {} KV cache needs flash attention: set flash_attention to auto or on, or \
                 keep the f16 cache",
                kv_cache_type.as_str()
            ),
        ));
    }
    Ok(LoadRequest {
        pin: o.pin,
        keep_alive,
        runtime,
        options: LoadOptions {
            context_length: o.context_length,
            parallel: o.max_concurrent_requests,
            threads: o.threads,
            batch_size: o.batch_size,
            gpu_layers,
            use_mmap: o.use_mmap.unwrap_or(true),
            use_mlock: o.use_mlock,
            execution_providers: o.execution_providers,
            optimization_level,
            // The agent sets it from what the memory manager admits.
            memory_limit_bytes: 0,
            kv_cache_type,
            flash_attention,
            // The engine process makes its own; a request never names a path to write.
            scratch_dir: None,
        },
    })
}

/// An Unload's grace: the default when unset, capped, never negative.
pub fn unload_grace(grace: Option<modeld_proto::pbjson_types::Duration>) -> Result<Duration> {
    match grace {
        None => Ok(limits::UNLOAD_GRACE_DEFAULT),
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            Err(Error::invalid("grace", "must not be negative"))
        }
        Some(d) => Ok(
            Duration::new(d.seconds.unsigned_abs(), d.nanos.unsigned_abs())
                .min(limits::UNLOAD_GRACE_MAX),
        ),
    }
}

/// How many history entries a GetState returns.
pub fn history_limit(requested: i32) -> Result<usize> {
    match requested {
        0 => Ok(limits::HISTORY_DEFAULT),
        n if n < 0 => Err(Error::invalid("history_limit", "must not be negative")),
        n => Ok(usize::try_from(n)
            .unwrap_or(limits::HISTORY_MAX)
            .min(limits::HISTORY_MAX)),
    }
}
