//! Chat templates: the model's own Jinja template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`), rendered with minijinja the way Hugging Face renders it.
//!
//! Templates come from model files, so they are untrusted: rendering runs on a fuel
//! budget and a recursion limit, and a template that does not compile is refused at
//! load with the compiler's message.

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use modeld_engine_core::{ChatMessage, EngineError};

/// Instructions one render may execute; chat templates need a few thousand.
pub const FUEL: u64 = 2_000_000;
/// Nesting a template may reach (macros, includes, loops).
pub const RECURSION_LIMIT: usize = 64;
/// Longest template we compile.
pub const TEMPLATE_BYTES_MAX: usize = 256 * 1024;

const NAME: &str = "chat";

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn raise_exception(message: String) -> Result<String, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// Some templates stamp the date; keep it deterministic per call.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let date =
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
    // Only the common "%d %b %Y" shape is worth supporting; anything else gets the
    // HTTP date, which is still a readable date.
    if format == "%d %b %Y" {
        let parts: Vec<&str> = date.split(' ').collect();
        if let [_, day, month, year, ..] = parts.as_slice() {
            return format!("{day} {month} {year}");
        }
    }
    date
}

impl ChatTemplate {
    /// Compiles `source`. `bos_token` and `eos_token` are the texts templates may
    /// insert (`{{ bos_token }}`).
    pub fn new(
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate, EngineError> {
        if source.len() > TEMPLATE_BYTES_MAX {
            return Err(EngineError::Load(format!(
                "the chat template is {} bytes; the limit is {TEMPLATE_BYTES_MAX}",
                source.len()
            )));
        }
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::Load(format!("chat template syntax: {e}")))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        // Templates written for Python's Jinja call str methods like .strip().
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(|e| EngineError::Load(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
        })
    }

    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self
            .env
            .get_template(NAME)
            .map_err(|e| EngineError::Inference(format!("chat template: {e}")))?;
        let messages: Vec<_> = messages
            .iter()
            .map(|m| context! { role => &m.role, content => &m.content })
            .collect();
        template
            .render(context! {
                messages,
                add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| {
                // raise_exception is the template telling the caller what it refuses
                // (e.g. roles out of order): that is the request's fault.
                if e.kind() == ErrorKind::InvalidOperation {
                    EngineError::InvalidRequest(format!(
                        "the model's chat template refused the messages: {}",
                        e.detail().unwrap_or("no reason given")
                    ))
                } else {
                    EngineError::InvalidRequest(format!("chat template: {e}"))
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_like_transformers() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[msg("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(&[msg("system", "S"), msg("user", "Hi")], false)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ bos_token }}{{ messages[0].content.strip() }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(t.render(&[msg("user", "  hi  ")], false).unwrap(), "<s>hi");
        let err = t.render(&[msg("assistant", "x")], false).unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidRequest(m) if m.contains("first message must be from the user")),
            "{err}"
        );
    }

    #[test]
    fn a_runaway_template_runs_out_of_fuel_instead_of_hanging() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        let err = t.render(&[msg("user", "x")], true).unwrap_err();
        assert!(err.to_string().contains("fuel"), "{err}");
    }

    #[test]
    fn a_broken_template_is_refused_at_load() {
        let err = ChatTemplate::new("{% for x in %}", "", "").unwrap_err();
        assert!(err.to_string().contains("does not compile"), "{err}");
    }
}
