//! Provider (b): a tokenizer built from a GGUF's own metadata — its BPE vocabulary
//! and merges, the pre-tokenizer it names, and its control tokens as special tokens —
//! so engines without a tokenizer of their own (candle, ONNX Runtime) split text
//! exactly as llama.cpp does.
//!
//! Each pre-tokenizer name maps to the regexes llama.cpp uses for it
//! (`llama-vocab.cpp`). Names not in the table are refused rather than guessed: a
//! near-miss tokenizer produces fluent-looking nonsense.

use std::path::Path;

use modeld_engine_core::{EngineError, SpecialTokens};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::chat_template::ChatTemplate;
use super::hf::HfTokenizer;
use modeld_engine_core::gguf::{self, GgufHeader, Value};

/// Metadata arrays the tokenizer needs, kept whole when reading the header.
pub const KEYS: &[&str] = &[
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
];

/// Control-token texts llama.cpp treats as end of generation (`llama-vocab.cpp`).
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    // Fill-in-the-middle pad, repository and separator tokens, which llama.cpp
    // also ends on.
    "<|fim_pad|>",
    "<fim-pad>",
    "<PAD>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|fim_sep|>",
    "<fim-sep>",
    "<|file_sep|>",
];

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

// The GPT-2 split needs no regex here: the byte-level pre-tokenizer applies it itself.
const LLAMA3_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one pre-tokenizer name splits text before BPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreSplit {
    /// The GPT-2 regex alone.
    Gpt2,
    /// Every digit on its own, then the GPT-2 regex (SmolLM, StarCoder, ...).
    DigitsThenGpt2,
    /// Llama 3's regex (digits in groups of up to three); whole-word vocabulary hits
    /// skip the merges.
    Llama3,
    Qwen2,
}

fn pre_split(name: &str) -> Option<PreSplit> {
    Some(match name {
        "gpt-2" | "mpt" | "olmo" | "jais" | "trillion" => PreSplit::Gpt2,
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva" => {
            PreSplit::DigitsThenGpt2
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => PreSplit::Llama3,
        "qwen2" | "deepseek-r1-qwen" | "hunyuan" => PreSplit::Qwen2,
        _ => return None,
    })
}

fn load_error(message: impl Into<String>) -> EngineError {
    EngineError::Load(format!("GGUF tokenizer: {}", message.into()))
}

fn strings<'h>(header: &'h GgufHeader, key: &str) -> Result<&'h [String], EngineError> {
    match header.get(key) {
        Some(Value::Strings(v)) => Ok(v),
        Some(other) => Err(load_error(format!(
            "{key} is {other:?}, not a string array"
        ))),
        None => Err(load_error(format!("{key} is missing"))),
    }
}

fn token_id(header: &GgufHeader, key: &str, n: usize) -> Option<u32> {
    header
        .get(key)
        .and_then(Value::as_u64)
        .filter(|id| *id < n as u64)
        .and_then(|id| u32::try_from(id).ok())
}

/// Reads the GGUF's header (with its vocabulary) and builds the tokenizer.
pub fn from_file(path: &Path) -> Result<HfTokenizer, EngineError> {
    let file =
        std::fs::File::open(path).map_err(|e| load_error(format!("{}: {e}", path.display())))?;
    let size = file
        .metadata()
        .map_err(|e| load_error(format!("{}: {e}", path.display())))?
        .len();
    let header = gguf::read_header_keeping(std::io::BufReader::new(file), size, KEYS)
        .map_err(|e| load_error(format!("{}: {e}", path.display())))?;
    from_header(&header)
}

pub fn from_header(header: &GgufHeader) -> Result<HfTokenizer, EngineError> {
    let model = header
        .get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .ok_or_else(|| load_error("tokenizer.ggml.model is missing"))?;
    if model != "gpt2" {
        return Err(load_error(format!(
            "tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\"); \
             put a tokenizer.json next to the model or use an engine with its own tokenizer"
        )));
    }
    let pre_name = header
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let split = pre_split(pre_name).ok_or_else(|| {
        load_error(format!(
            "pre-tokenizer {pre_name:?} is not supported; put a tokenizer.json next to the model"
        ))
    })?;
    let tokens = strings(header, "tokenizer.ggml.tokens")?;
    let merges = strings(header, "tokenizer.ggml.merges")?;
    let types: &[i64] = match header.get("tokenizer.ggml.token_type") {
        Some(Value::Ints(v)) if v.len() == tokens.len() => v,
        Some(Value::Ints(v)) => {
            return Err(load_error(format!(
                "{} token types for {} tokens",
                v.len(),
                tokens.len()
            )));
        }
        _ => &[],
    };

    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| load_error(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(split == PreSplit::Llama3)
        .build()
        .map_err(|e| load_error(e.to_string()))?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, false, true);
    let regex_split = |re: &str| -> Result<PreTokenizerWrapper, EngineError> {
        Split::new(
            SplitPattern::Regex(re.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map(PreTokenizerWrapper::Split)
        .map_err(|e| load_error(e.to_string()))
    };
    let pre: PreTokenizerWrapper = match split {
        PreSplit::Gpt2 => byte_level.into(),
        PreSplit::DigitsThenGpt2 => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        PreSplit::Llama3 => Sequence::new(vec![
            regex_split(LLAMA3_REGEX)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
        PreSplit::Qwen2 => Sequence::new(vec![
            regex_split(QWEN2_REGEX)?,
            ByteLevel::new(false, false, false).into(),
        ])
        .into(),
    };
    tokenizer.with_pre_tokenizer(Some(pre));
    tokenizer.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));

    // Control tokens are special (matched only with parse_special, as in llama.cpp);
    // user-defined tokens are always matched.
    let mut control = Vec::new();
    let mut user_defined = Vec::new();
    for (token, ty) in tokens.iter().zip(types) {
        match *ty {
            TOKEN_TYPE_CONTROL => control.push(AddedToken::from(token.clone(), true)),
            TOKEN_TYPE_USER_DEFINED => {
                user_defined.push(AddedToken::from(token.clone(), false));
            }
            _ => {}
        }
    }
    tokenizer
        .add_special_tokens(control)
        .map_err(|e| load_error(format!("control tokens: {e}")))?;
    tokenizer
        .add_tokens(user_defined)
        .map_err(|e| load_error(format!("user-defined tokens: {e}")))?;

    let n = tokens.len();
    let eos = token_id(header, "tokenizer.ggml.eos_token_id", n);
    let mut end_of_generation: Vec<u32> = eos.into_iter().collect();
    end_of_generation.extend(token_id(header, "tokenizer.ggml.eot_token_id", n));
    end_of_generation.extend(token_id(header, "tokenizer.ggml.eom_token_id", n));
    // llama.cpp also ends generation on control tokens it knows by their text.
    for (i, (token, ty)) in tokens.iter().zip(types).enumerate() {
        if *ty == TOKEN_TYPE_CONTROL
            && END_OF_GENERATION_TEXTS.contains(&token.as_str())
            && let Ok(id) = u32::try_from(i)
        {
            end_of_generation.push(id);
        }
    }
    end_of_generation.sort_unstable();
    end_of_generation.dedup();
    let special = SpecialTokens {
        bos: token_id(header, "tokenizer.ggml.bos_token_id", n),
        eos,
        pad: token_id(header, "tokenizer.ggml.padding_token_id", n),
        // llama.cpp's defaults for a BPE vocabulary: no BOS, no EOS unless the file
        // says otherwise.
        add_bos: header
            .get("tokenizer.ggml.add_bos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        add_eos: header
            .get("tokenizer.ggml.add_eos_token")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        end_of_generation,
    };
    let text_of = |id: Option<u32>| {
        id.and_then(|i| tokens.get(i as usize))
            .cloned()
            .unwrap_or_default()
    };
    let template = header
        .chat_template()
        .map(|t| ChatTemplate::new(t, &text_of(special.bos), &text_of(special.eos)))
        .transpose()?;
    let max_length = header
        .context_length()
        .and_then(|c| u32::try_from(c).ok())
        .unwrap_or(0);
    Ok(HfTokenizer::new(
        "gguf", tokenizer, special, max_length, template,
    ))
}
