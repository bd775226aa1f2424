//! A tokenizer built on the `tokenizers` crate, whatever it was loaded from: a
//! `tokenizer.json` next to the model, or a GGUF's own vocabulary and merges.

use std::collections::HashMap;
use std::sync::Arc;

use modeld_engine_core::{ChatMessage, EngineError, SpecialTokens, Tokenizer};
use tokenizers::decoders::DecoderWrapper;

use super::chat_template::ChatTemplate;

/// How a vocabulary entry's text maps back to the bytes it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceEncoding {
    /// GPT-2 byte-level BPE: every byte is drawn as one printable character.
    ByteLevel,
    /// SentencePiece style: `▁` is a space and `<0xAB>` a raw byte.
    Metaspace,
}

pub struct HfTokenizer {
    provider: &'static str,
    /// Recognizes special-token text (`parse_special`).
    parsing: tokenizers::Tokenizer,
    /// Treats special-token text as plain text.
    literal: tokenizers::Tokenizer,
    /// Special and added tokens: their bytes are their literal text.
    added: HashMap<u32, (String, bool)>,
    pieces: PieceEncoding,
    byte_of_char: HashMap<char, u8>,
    special: SpecialTokens,
    max_length: u32,
    template: Option<ChatTemplate>,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("provider", &self.provider)
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`): printable bytes stand for
/// themselves, the rest are shifted past U+0100.
fn byte_level_table() -> HashMap<char, u8> {
    let mut table = HashMap::with_capacity(256);
    let mut shifted = 0u32;
    for b in 0u8..=255 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(256 + shifted).unwrap_or('\u{FFFD}');
            shifted += 1;
            c
        };
        table.insert(c, b);
    }
    table
}

fn tokenizer_error(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Inference(format!("tokenizer: {what}: {e}"))
}

impl HfTokenizer {
    /// Wraps a built tokenizer. `special.end_of_generation` is filled in from the
    /// special tokens when the caller left it empty.
    pub fn new(
        provider: &'static str,
        tokenizer: tokenizers::Tokenizer,
        mut special: SpecialTokens,
        max_length: u32,
        template: Option<ChatTemplate>,
    ) -> HfTokenizer {
        let pieces = match tokenizer.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => PieceEncoding::ByteLevel,
            Some(DecoderWrapper::Sequence(seq))
                if seq
                    .get_decoders()
                    .iter()
                    .any(|d| matches!(d, DecoderWrapper::ByteLevel(_))) =>
            {
                PieceEncoding::ByteLevel
            }
            _ => PieceEncoding::Metaspace,
        };
        let added: HashMap<u32, (String, bool)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (id, (t.content, t.special)))
            .collect();
        if special.end_of_generation.is_empty() {
            special.end_of_generation = special.eos.into_iter().collect();
        }
        let mut literal = tokenizer.clone();
        literal.set_encode_special_tokens(true);
        HfTokenizer {
            provider,
            parsing: tokenizer,
            literal,
            added,
            pieces,
            byte_of_char: byte_level_table(),
            special,
            max_length,
            template,
        }
    }

    /// This tokenizer as a `tokenizer.json`, so a model directory can carry exactly
    /// what this provider built (special tokens included).
    pub fn to_json(&self) -> Result<String, EngineError> {
        self.parsing
            .to_string(false)
            .map_err(|e| tokenizer_error("serialize", e))
    }

    pub fn into_shared(self) -> Arc<dyn Tokenizer> {
        Arc::new(self)
    }

    fn check(&self, id: u32) -> Result<(), EngineError> {
        let n = self.vocab_size();
        if id < n {
            Ok(())
        } else {
            Err(EngineError::InvalidRequest(format!(
                "token id {id} is outside the vocabulary (0..{n})"
            )))
        }
    }
}

impl Tokenizer for HfTokenizer {
    fn provider(&self) -> &str {
        self.provider
    }

    fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, EngineError> {
        let tokenizer = if parse_special {
            &self.parsing
        } else {
            &self.literal
        };
        // BOS/EOS are added here rather than by a post-processor, so both providers
        // follow the model's own add_bos/add_eos flags the same way.
        let encoding = tokenizer
            .encode_fast(text, false)
            .map_err(|e| tokenizer_error("encode", e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 2);
        if add_special
            && self.special.add_bos
            && let Some(bos) = self.special.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        if add_special
            && self.special.add_eos
            && let Some(eos) = self.special.eos
        {
            ids.push(eos);
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, EngineError> {
        for id in ids {
            self.check(*id)?;
        }
        self.parsing
            .decode(ids, skip_special)
            .map_err(|e| tokenizer_error("decode", e))
    }

    fn token_bytes(&self, id: u32) -> Result<Vec<u8>, EngineError> {
        self.check(id)?;
        if let Some((content, _)) = self.added.get(&id) {
            return Ok(content.as_bytes().to_vec());
        }
        let piece = self.parsing.id_to_token(id).unwrap_or_default();
        Ok(match self.pieces {
            PieceEncoding::ByteLevel => piece
                .chars()
                .map(|c| self.byte_of_char.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                // Not byte-level text after all (a hand-added token): take it as is.
                .unwrap_or_else(|| piece.as_bytes().to_vec()),
            PieceEncoding::Metaspace => {
                if let Some(hex) = piece
                    .strip_prefix("<0x")
                    .and_then(|h| h.strip_suffix('>'))
                    .filter(|h| h.len() == 2)
                    && let Ok(b) = u8::from_str_radix(hex, 16)
                {
                    vec![b]
                } else {
                    piece.replace('\u{2581}', " ").into_bytes()
                }
            }
        })
    }

    fn vocab_size(&self) -> u32 {
        u32::try_from(self.parsing.get_vocab_size(true)).unwrap_or(u32::MAX)
    }

    fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    fn max_length(&self) -> u32 {
        self.max_length
    }

    fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let template = self.template.as_ref().ok_or_else(|| {
            EngineError::InvalidRequest(
                "the model has no chat template; send a plain prompt instead".into(),
            )
        })?;
        template.render(messages, add_generation_prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_table_is_a_bijection_matching_gpt2() {
        let t = byte_level_table();
        assert_eq!(t.len(), 256);
        assert_eq!(t[&'Ġ'], b' ');
        assert_eq!(t[&'Ċ'], b'\n');
        assert_eq!(t[&'!'], b'!');
        let mut bytes: Vec<u8> = t.values().copied().collect();
        bytes.sort_unstable();
        bytes.dedup();
        assert_eq!(bytes.len(), 256);
    }
}
