//! The OpenAI API's request and response bodies, and their translation to and from
//! `modeld.v1.Generate`. Only what modeld can honour is accepted: a field it cannot
//! (several choices, tools, images, logit bias) is refused by name, and an unknown
//! field is refused rather than silently ignored.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use modeld_proto::v1 as pb;

use super::error::OpenAiError;

/// One string or several, as `prompt` and `stop` may be.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
    /// Accepted for compatibility; modeld's chunks never carry obfuscation padding.
    #[serde(default, rename = "include_obfuscation")]
    _include_obfuscation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
}

/// The sampling fields both endpoints share, plus llama.cpp server's extensions
/// (`top_k`, `min_p`, `repeat_penalty`) that edge apps already send. (Each request
/// lists them itself: serde cannot refuse unknown fields around a flattened struct.)
#[derive(Debug, Default)]
struct Sampling {
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
}

macro_rules! sampling {
    ($request:expr) => {
        Sampling {
            temperature: $request.temperature,
            top_p: $request.top_p,
            top_k: $request.top_k,
            min_p: $request.min_p,
            repeat_penalty: $request.repeat_penalty,
            presence_penalty: $request.presence_penalty,
            frequency_penalty: $request.frequency_penalty,
            seed: $request.seed,
        }
    };
}

impl Sampling {
    fn into_pb(self) -> Result<pb::SamplingParams, OpenAiError> {
        let seed = self
            .seed
            .map(|s| {
                u64::try_from(s).map_err(|_| {
                    OpenAiError::invalid("seed", format!("seed {s} must not be negative"))
                })
            })
            .transpose()?;
        Ok(pb::SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            penalty_last_n: 0,
            seed,
        })
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: OneOrMany,
    /// OpenAI's default for this endpoint is 16 tokens; so is modeld's.
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub best_of: Option<u32>,
    pub echo: Option<bool>,
    pub logprobs: Option<u32>,
    pub suffix: Option<String>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// An end-user id for abuse tracking; modeld's audit names the credential.
    #[serde(rename = "user")]
    _user: Option<IgnoredAny>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<ResponseFormat>,
    pub tools: Option<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
    /// An end-user id for abuse tracking; modeld's audit names the credential.
    #[serde(rename = "user")]
    _user: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
    /// A participant's name: chat templates have no place for it.
    #[serde(rename = "name")]
    _name: Option<IgnoredAny>,
    pub tool_calls: Option<serde_json::Value>,
    #[serde(rename = "tool_call_id")]
    _tool_call_id: Option<IgnoredAny>,
}

/// A message's content: a string, or parts of which only text is understood.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

fn unsupported(param: &str, why: &str) -> OpenAiError {
    OpenAiError::invalid(param, format!("{param}: {why}"))
}

/// `n`/`best_of` above one would need several generations per request; modeld runs
/// one, so asking for more is refused instead of answered with fewer.
fn single_choice(param: &str, n: Option<u32>) -> Result<(), OpenAiError> {
    match n {
        None | Some(1) => Ok(()),
        Some(n) => Err(unsupported(
            param,
            &format!(
                "{n} choices were asked for; modeld generates one per request (send several requests)"
            ),
        )),
    }
}

fn no_logit_bias(
    bias: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Result<(), OpenAiError> {
    match bias {
        Some(b) if !b.is_empty() => Err(unsupported("logit_bias", "is not supported by modeld")),
        _ => Ok(()),
    }
}

fn stops(stop: Option<OneOrMany>) -> Vec<String> {
    stop.map(OneOrMany::into_vec).unwrap_or_default()
}

/// What a request asks for, in modeld's terms.
#[derive(Debug)]
pub struct Translated {
    pub request: pb::GenerateRequest,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: bool,
}

pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

impl CompletionRequest {
    pub fn translate(self) -> Result<Translated, OpenAiError> {
        single_choice("n", self.n)?;
        single_choice("best_of", self.best_of)?;
        no_logit_bias(self.logit_bias.as_ref())?;
        if self.echo == Some(true) {
            return Err(unsupported("echo", "is not supported by modeld"));
        }
        if self.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(unsupported(
                "suffix",
                "insertion is not supported by modeld",
            ));
        }
        if self.logprobs.is_some_and(|n| n > 0) {
            return Err(unsupported(
                "logprobs",
                "is supported on /v1/chat/completions only",
            ));
        }
        let mut prompts = self.prompt.into_vec();
        if prompts.len() != 1 {
            return Err(OpenAiError::invalid(
                "prompt",
                format!(
                    "{} prompts were sent; modeld takes one per request",
                    prompts.len()
                ),
            ));
        }
        let prompt = prompts.pop().unwrap_or_default();
        let sampling = sampling!(self).into_pb()?;
        Ok(Translated {
            request: pb::GenerateRequest {
                model_id: self.model,
                input: Some(pb::generate_request::Input::Prompt(prompt)),
                sampling: Some(sampling),
                max_tokens: self.max_tokens.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS),
                stop: stops(self.stop),
                ..Default::default()
            },
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            logprobs: false,
        })
    }
}

impl ChatRequest {
    pub fn translate(self) -> Result<Translated, OpenAiError> {
        single_choice("n", self.n)?;
        no_logit_bias(self.logit_bias.as_ref())?;
        if self.tools.is_some() || self.tool_choice.is_some() {
            return Err(unsupported(
                "tools",
                "tool calling is not supported by modeld",
            ));
        }
        if self.top_logprobs.is_some_and(|n| n > 0) {
            return Err(unsupported(
                "top_logprobs",
                "modeld reports the chosen token's logprob only (logprobs: true)",
            ));
        }
        if let Some(format) = &self.response_format
            && format.kind != "text"
        {
            return Err(unsupported(
                "response_format",
                &format!("{:?} is not supported; only \"text\"", format.kind),
            ));
        }
        if self.messages.is_empty() {
            return Err(OpenAiError::invalid(
                "messages",
                "messages: at least one message is required",
            ));
        }
        let sampling = sampling!(self).into_pb()?;
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.translate(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Translated {
            request: pb::GenerateRequest {
                model_id: self.model,
                input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
                    messages,
                })),
                sampling: Some(sampling),
                max_tokens: self.max_completion_tokens.or(self.max_tokens).unwrap_or(0),
                stop: stops(self.stop),
                logprobs: self.logprobs,
                ..Default::default()
            },
            stream: self.stream,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            logprobs: self.logprobs,
        })
    }
}

impl ChatMessage {
    fn translate(self, index: usize) -> Result<pb::ChatMessage, OpenAiError> {
        let param = format!("messages[{index}]");
        let role = match self.role.as_str() {
            // OpenAI's newer name for the system prompt.
            "system" | "developer" => pb::ChatRole::System,
            "user" => pb::ChatRole::User,
            "assistant" => pb::ChatRole::Assistant,
            "tool" => pb::ChatRole::Tool,
            other => {
                return Err(OpenAiError::invalid(
                    &format!("{param}.role"),
                    format!(
                        "{param}.role: {other:?} is not one of system, developer, user, assistant, tool"
                    ),
                ));
            }
        };
        if self.tool_calls.is_some() {
            return Err(unsupported(
                &format!("{param}.tool_calls"),
                "tool calling is not supported by modeld",
            ));
        }
        let content = match self.content {
            None => String::new(),
            Some(Content::Text(text)) => text,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for (j, part) in parts.into_iter().enumerate() {
                    match (part.kind.as_str(), part.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(OpenAiError::invalid(
                                &format!("{param}.content[{j}]"),
                                format!(
                                    "{param}.content[{j}]: {kind:?} parts are not supported; only text"
                                ),
                            ));
                        }
                    }
                }
                text
            }
        };
        Ok(pb::ChatMessage {
            role: role as i32,
            content,
        })
    }
}

/// OpenAI's name for why generation ended.
pub fn finish_reason(reason: pb::FinishReason) -> &'static str {
    match reason {
        pb::FinishReason::Length => "length",
        // A cancelled generation ends the HTTP request too, so nobody reads this;
        // an error is answered as an error, not a finish reason.
        pb::FinishReason::Stop
        | pb::FinishReason::Cancelled
        | pb::FinishReason::Error
        | pb::FinishReason::Unspecified => "stop",
    }
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// OpenAI's name for what the prompt cache gave.
#[derive(Debug, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<Option<pb::Usage>> for Usage {
    fn from(u: Option<pb::Usage>) -> Usage {
        let u = u.unwrap_or_default();
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.generated_tokens,
            total_tokens: u.prompt_tokens.saturating_add(u.generated_tokens),
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_prompt_tokens,
            },
        }
    }
}

/// One entry of a chat choice's `logprobs.content`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<serde_json::Value>,
}

impl TokenLogprob {
    pub fn of(token: &pb::GeneratedToken) -> Option<TokenLogprob> {
        Some(TokenLogprob {
            token: token.text.clone(),
            logprob: token.logprob?,
            bytes: token.text.as_bytes().to_vec(),
            top_logprobs: Vec::new(),
        })
    }
}

#[derive(Debug, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
}

impl ModelObject {
    pub fn of(model: &pb::Model) -> ModelObject {
        ModelObject {
            id: model
                .spec
                .as_ref()
                .map(|s| s.id.clone())
                .unwrap_or_default(),
            object: "model",
            created: model.create_time.as_ref().map_or(0, |t| t.seconds),
            owned_by: "modeld",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: serde_json::Value) -> Result<Translated, OpenAiError> {
        serde_json::from_value::<ChatRequest>(body)
            .map_err(|e| OpenAiError::invalid("", e.to_string()))?
            .translate()
    }

    #[test]
    fn a_chat_request_becomes_a_generate_request() {
        let t = chat(serde_json::json!({
            "model": "smol",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
            ],
            "max_tokens": 8,
            "temperature": 0.5,
            "seed": 7,
            "stop": "\n",
            "stream": true,
            "stream_options": {"include_usage": true}
        }))
        .unwrap();
        assert!(t.stream && t.include_usage);
        assert_eq!(t.request.max_tokens, 8);
        assert_eq!(t.request.stop, vec!["\n".to_owned()]);
        let sampling = t.request.sampling.unwrap();
        assert_eq!((sampling.temperature, sampling.seed), (Some(0.5), Some(7)));
        let Some(pb::generate_request::Input::Chat(c)) = t.request.input else {
            panic!("not a chat");
        };
        assert_eq!(c.messages[0].role, pb::ChatRole::System as i32);
        assert_eq!(c.messages[1].content, "Hi");
    }

    #[test]
    fn what_modeld_cannot_honour_is_refused_by_name() {
        for (body, param) in [
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
                "n",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}),
                "tools",
            ),
            (
                serde_json::json!({"model": "m", "messages": []}),
                "messages",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "messages[0].content[0]",
            ),
            (
                serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": -1}),
                "seed",
            ),
        ] {
            let e = chat(body).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{e:?}");
        }
        let unknown = serde_json::from_value::<ChatRequest>(serde_json::json!({
            "model": "m", "messages": [], "frobnicate": 1
        }))
        .unwrap_err();
        assert!(unknown.to_string().contains("frobnicate"), "{unknown}");
    }
}
