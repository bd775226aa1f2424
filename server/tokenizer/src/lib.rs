//! The unified tokenizer: one `Tokenizer` (engine-core) for every model, whichever
//! runtime serves it. Providers, in the order the agent picks them:
//!
//! - (c) the runtime's own tokenizer, when the engine has one (llama.cpp): exact by
//!   definition, and it costs no second copy of the vocabulary;
//! - (a) `tokenizer.json` next to the model (Hugging Face and MLX directories);
//! - (b) built from a GGUF's metadata, for engines without their own (candle, ONNX
//!   Runtime over a GGUF-derived export).
//!
//! Chat templates always render with minijinja from the model's own template, so the
//! same messages become the same prompt under every runtime.

pub mod chat_template;
pub mod gguf;
pub mod hf;
pub mod json;

use std::path::Path;
use std::sync::Arc;

use modeld_engine_core::{ChatMessage, EngineError, ModelFormat, SpecialTokens, Tokenizer};

pub use chat_template::ChatTemplate;
pub use hf::HfTokenizer;

/// The tokenizer a model gets: the runtime's own when it has one (with the model's
/// chat template rendered by minijinja), else a tokenizer.json beside the model,
/// else the GGUF's vocabulary.
pub fn for_model(
    model_path: &Path,
    format: ModelFormat,
    runtime_own: Option<Arc<dyn Tokenizer>>,
    chat_template: Option<&str>,
) -> Result<Arc<dyn Tokenizer>, EngineError> {
    if let Some(own) = runtime_own {
        let Some(source) = chat_template else {
            return Ok(own);
        };
        let text = |id: Option<u32>| {
            id.and_then(|i| own.token_bytes(i).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let special = own.special_tokens();
        return match ChatTemplate::new(source, &text(special.bos), &text(special.eos)) {
            Ok(template) => Ok(Arc::new(WithTemplate {
                inner: own,
                template,
            })),
            Err(e) => {
                // The runtime may still know the template by its built-in heuristics.
                tracing::warn!(error = %e, "the model's chat template does not compile; using the runtime's renderer");
                Ok(own)
            }
        };
    }
    if let Some(path) = json::find(model_path) {
        return Ok(json::from_file(&path)?.into_shared());
    }
    if format == ModelFormat::Gguf {
        return Ok(gguf::from_file(model_path)?.into_shared());
    }
    Err(EngineError::Load(format!(
        "no tokenizer for {}: put a tokenizer.json next to the model",
        model_path.display()
    )))
}

/// A runtime's own tokenizer with the model's chat template rendered by minijinja.
struct WithTemplate {
    inner: Arc<dyn Tokenizer>,
    template: ChatTemplate,
}

impl Tokenizer for WithTemplate {
    fn provider(&self) -> &str {
        self.inner.provider()
    }
    fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        self.inner.encode(text, add_special, parse_special)
    }
    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        self.inner.decode(ids, skip_special)
    }
    fn token_bytes(&self, id: u32) -> Result<Vec<u8>, EngineError> {
        self.inner.token_bytes(id)
    }
    fn vocab_size(&self) -> u32 {
        self.inner.vocab_size()
    }
    fn special_tokens(&self) -> &SpecialTokens {
        self.inner.special_tokens()
    }
    fn max_length(&self) -> u32 {
        self.inner.max_length()
    }
    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.template.render(messages, add_generation_prompt)
    }
}
