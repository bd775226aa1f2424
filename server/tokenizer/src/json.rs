//! Provider (a): `tokenizer.json` next to the model, with `tokenizer_config.json`
//! for the chat template, the special tokens and the maximum length, as Hugging Face
//! model directories (and MLX models) ship them.

use std::path::{Path, PathBuf};

use modeld_engine_core::{EngineError, SpecialTokens};
use serde_json::Value;

use super::chat_template::ChatTemplate;
use super::hf::HfTokenizer;

/// Largest tokenizer.json we parse (big multilingual vocabularies are ~20 MB).
pub const TOKENIZER_JSON_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// The largest chat_template.jinja read.
pub const CHAT_TEMPLATE_BYTES_MAX: u64 = 1024 * 1024;

fn load_error(message: impl Into<String>) -> EngineError {
    EngineError::Load(format!("tokenizer.json: {}", message.into()))
}

/// The `tokenizer.json` that belongs to the model at `model_path`: in the model's
/// directory, or next to its single file.
pub fn find(model_path: &Path) -> Option<PathBuf> {
    let dir = if model_path.is_dir() {
        model_path
    } else {
        model_path.parent()?
    };
    let candidate = dir.join("tokenizer.json");
    candidate.is_file().then_some(candidate)
}

fn read_text(path: &Path, max: u64) -> Result<String, EngineError> {
    let size = std::fs::metadata(path)
        .map_err(|e| load_error(format!("{}: {e}", path.display())))?
        .len();
    if size > max {
        return Err(load_error(format!(
            "{} is {size} bytes; the limit is {max}",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| load_error(format!("{}: {e}", path.display())))
}

fn read_json(path: &Path, max: u64) -> Result<Value, EngineError> {
    let text = read_text(path, max)?;
    serde_json::from_str(&text).map_err(|e| load_error(format!("{}: {e}", path.display())))
}

/// `"<s>"` or `{"content": "<s>", ...}`, as tokenizer_config.json writes tokens.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

pub fn from_file(path: &Path) -> Result<HfTokenizer, EngineError> {
    let size = std::fs::metadata(path)
        .map_err(|e| load_error(format!("{}: {e}", path.display())))?
        .len();
    if size > TOKENIZER_JSON_BYTES_MAX {
        return Err(load_error(format!(
            "{size} bytes; the limit is {TOKENIZER_JSON_BYTES_MAX}"
        )));
    }
    let tokenizer = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| load_error(format!("{}: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        read_json(&config_path, TOKENIZER_JSON_BYTES_MAX)?
    } else {
        Value::Null
    };
    let id_of = |text: &Option<String>| text.as_deref().and_then(|t| tokenizer.token_to_id(t));
    let bos_text = token_text(config.get("bos_token"));
    let eos_text = token_text(config.get("eos_token"));
    let pad_text = token_text(config.get("pad_token"));
    let eos = id_of(&eos_text);
    let special = SpecialTokens {
        bos: id_of(&bos_text),
        eos,
        pad: id_of(&pad_text),
        add_bos: config
            .get("add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        add_eos: config
            .get("add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        end_of_generation: eos.into_iter().collect(),
    };
    // Newer writers (transformers 5, mlx-lm) keep the template in its own file.
    let template_file = dir.join("chat_template.jinja");
    let source = match config.get("chat_template") {
        Some(Value::String(source)) => Some(source.clone()),
        _ if template_file.is_file() => Some(read_text(&template_file, CHAT_TEMPLATE_BYTES_MAX)?),
        _ => None,
    };
    let template = match source {
        Some(source) => Some(ChatTemplate::new(
            &source,
            bos_text.as_deref().unwrap_or_default(),
            eos_text.as_deref().unwrap_or_default(),
        )?),
        None => None,
    };
    // Configs write "no limit" as a huge float; anything past u32 means "the model's".
    let max_length = config
        .get("model_max_length")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    Ok(HfTokenizer::new(
        "tokenizer.json",
        tokenizer,
        special,
        max_length,
        template,
    ))
}

/// A tokenizer.json held in memory (a LiteRT-LM bundle carries one), with what its
/// container says instead of a tokenizer_config.json: the tokens that end a turn (by id
/// or by text; the first is the end-of-sequence token) and the chat template.
pub fn from_bytes(
    provider: &'static str,
    json: &[u8],
    stop_ids: &[u32],
    stop_texts: &[String],
    chat_template: Option<&str>,
    max_length: u32,
) -> Result<HfTokenizer, EngineError> {
    if json.len() as u64 > TOKENIZER_JSON_BYTES_MAX {
        return Err(load_error(format!(
            "{} bytes; the limit is {TOKENIZER_JSON_BYTES_MAX}",
            json.len()
        )));
    }
    let tokenizer =
        tokenizers::Tokenizer::from_bytes(json).map_err(|e| load_error(e.to_string()))?;
    let mut end_of_generation: Vec<u32> = Vec::new();
    let by_text = stop_texts.iter().filter_map(|t| tokenizer.token_to_id(t));
    for id in stop_ids.iter().copied().chain(by_text) {
        if !end_of_generation.contains(&id) {
            end_of_generation.push(id);
        }
    }
    let eos = end_of_generation.first().copied();
    let text_of = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let template = chat_template
        .map(|source| ChatTemplate::new(source, "", &text_of(eos)))
        .transpose()?;
    let special = SpecialTokens {
        bos: None,
        eos,
        pad: None,
        add_bos: false,
        add_eos: false,
        end_of_generation,
    };
    Ok(HfTokenizer::new(
        provider, tokenizer, special, max_length, template,
    ))
}
