//! `genai_config.json`, the onnxruntime-genai description of a decoder export: which
//! file, its geometry, and the names of its inputs and outputs. Every number is
//! checked against a limit before anything is sized from it.

use std::path::{Component, Path, PathBuf};

use modeld_engine_core::EngineError;
use serde::Deserialize;

/// Side files larger than this are not parsed.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
const MAX_LAYERS: u32 = 1024;
const MAX_HEADS: u32 = 4096;
const MAX_HEAD_SIZE: u32 = 4096;
const MAX_CONTEXT: u32 = 1 << 24;
const MAX_VOCAB: u32 = 1 << 22;

#[derive(Debug, Clone, Deserialize)]
pub struct GenaiConfig {
    pub model: ModelSection,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelSection {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: OneOrMany,
    pub context_length: u32,
    pub vocab_size: u32,
    pub decoder: DecoderSection,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(u32),
    Many(Vec<u32>),
}

impl OneOrMany {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(id) => vec![*id],
            OneOrMany::Many(ids) => ids.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DecoderSection {
    pub filename: String,
    pub head_size: u32,
    pub hidden_size: u32,
    pub num_attention_heads: u32,
    pub num_key_value_heads: u32,
    pub num_hidden_layers: u32,
    #[serde(default)]
    pub inputs: InputNames,
    #[serde(default)]
    pub outputs: OutputNames,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct InputNames {
    pub input_ids: String,
    pub attention_mask: String,
    pub position_ids: String,
    pub past_key_names: String,
    pub past_value_names: String,
}

impl Default for InputNames {
    fn default() -> Self {
        InputNames {
            input_ids: "input_ids".into(),
            attention_mask: "attention_mask".into(),
            position_ids: "position_ids".into(),
            past_key_names: "past_key_values.%d.key".into(),
            past_value_names: "past_key_values.%d.value".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct OutputNames {
    pub logits: String,
    pub present_key_names: String,
    pub present_value_names: String,
}

impl Default for OutputNames {
    fn default() -> Self {
        OutputNames {
            logits: "logits".into(),
            present_key_names: "present.%d.key".into(),
            present_value_names: "present.%d.value".into(),
        }
    }
}

/// `pattern` with `%d` replaced by `layer`.
pub fn layer_name(pattern: &str, layer: u32) -> String {
    pattern.replace("%d", &layer.to_string())
}

/// A decoder export on disk: its directory, graph file and configuration.
#[derive(Debug, Clone)]
pub struct Export {
    pub dir: PathBuf,
    pub graph: PathBuf,
    pub config: GenaiConfig,
}

/// Finds the export at `path`: a directory holding `genai_config.json`, or a graph
/// file with `genai_config.json` beside it.
pub fn locate(path: &Path) -> Result<Export, EngineError> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let config_path = dir.join("genai_config.json");
    let invalid = |m: String| EngineError::InvalidModel(format!("{}: {m}", config_path.display()));
    let size = std::fs::metadata(&config_path)
        .map_err(|e| {
            EngineError::InvalidModel(format!(
                "{} is not a decoder export this engine can run: genai_config.json ({e}) must \
                 describe it (onnxruntime-genai convention)",
                path.display()
            ))
        })?
        .len();
    if size > MAX_CONFIG_BYTES {
        return Err(invalid(format!(
            "{size} bytes; the limit is {MAX_CONFIG_BYTES}"
        )));
    }
    let text = std::fs::read_to_string(&config_path).map_err(|e| invalid(e.to_string()))?;
    let config: GenaiConfig = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    check(&config).map_err(invalid)?;
    let name = &config.model.decoder.filename;
    let rel = Path::new(name);
    if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(invalid(format!(
            "decoder.filename {name:?} must name a file inside the model's directory"
        )));
    }
    let graph = if path.is_dir() {
        dir.join(rel)
    } else {
        path.to_path_buf()
    };
    if !graph.is_file() {
        return Err(invalid(format!(
            "the decoder {} is missing",
            graph.display()
        )));
    }
    Ok(Export { dir, graph, config })
}

fn check(c: &GenaiConfig) -> Result<(), String> {
    let m = &c.model;
    let d = &m.decoder;
    let within = |what: &str, v: u32, max: u32| {
        if v == 0 || v > max {
            Err(format!("{what} = {v} is outside 1..={max}"))
        } else {
            Ok(())
        }
    };
    within("model.context_length", m.context_length, MAX_CONTEXT)?;
    within("model.vocab_size", m.vocab_size, MAX_VOCAB)?;
    within("decoder.num_hidden_layers", d.num_hidden_layers, MAX_LAYERS)?;
    within(
        "decoder.num_attention_heads",
        d.num_attention_heads,
        MAX_HEADS,
    )?;
    within(
        "decoder.num_key_value_heads",
        d.num_key_value_heads,
        MAX_HEADS,
    )?;
    within("decoder.head_size", d.head_size, MAX_HEAD_SIZE)?;
    within(
        "decoder.hidden_size",
        d.hidden_size,
        MAX_HEADS * MAX_HEAD_SIZE,
    )?;
    if !d.num_attention_heads.is_multiple_of(d.num_key_value_heads) {
        return Err(format!(
            "{} attention heads cannot share {} key/value heads",
            d.num_attention_heads, d.num_key_value_heads
        ));
    }
    Ok(())
}
