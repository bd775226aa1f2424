//! Checks a LiteRT-LM bundle (`.litertlm`) before the runtime sees it, and reads what
//! the agent needs from it without the runtime: the TFLite decoder (checked like a
//! `.tflite` file, see [`crate::tflite`]), the Hugging Face tokenizer and the model's
//! metadata (chat template, stop tokens).
//!
//! The layout, as LiteRT-LM's `litertlm_read.cc` reads it: the magic `LITERTLM`, a
//! version (major, minor, patch: three little-endian `u32`), four bytes of padding, the
//! `u64` offset where the header ends, then the header itself, a flatbuffer
//! (`litertlm_header_schema.fbs`) listing the sections: each a byte range of the file
//! and what it holds. A Hugging Face tokenizer section is its JSON, zlib-compressed,
//! after a `u64` of its uncompressed size.

use std::fs::File;
use std::io::{self, Read as _};
use std::path::Path;

use crate::EngineError;
use crate::flatbuffer::{Checked, Context as _, Fault, FileSource, Reader, SliceSource, Source};
use crate::flatbuffer::{Window, malformed};
use crate::protobuf::{self, WireValue};
use crate::tflite::{self, TfliteModel};

pub const MAGIC: &[u8; 8] = b"LITERTLM";
/// The major version LiteRT-LM's reader accepts.
pub const MAJOR_VERSION: u32 = 1;
/// Where the header's flatbuffer starts.
const HEADER_START: u64 = 32;

/// Explicit limits: a bundle claiming more is refused before anything is allocated.
pub const MAX_HEADER_BYTES: u64 = 1 << 20;
pub const MAX_SECTIONS: u32 = 64;
pub const MAX_METADATA_BYTES: u64 = 1 << 20;
pub const MAX_TOKENIZER_BYTES: u64 = 64 << 20;
pub const MAX_STOP_TOKENS: usize = 64;

/// What a section holds (`AnySectionDataType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionKind {
    None,
    GenericBinary,
    Deprecated,
    TfliteModel,
    SentencePieceTokenizer,
    LlmMetadata,
    HfTokenizerZlib,
    /// A type this reader does not know; its bytes are only bounds-checked.
    Other(u8),
}

impl SectionKind {
    fn from_u8(v: u8) -> SectionKind {
        match v {
            0 => SectionKind::None,
            1 => SectionKind::GenericBinary,
            2 => SectionKind::Deprecated,
            3 => SectionKind::TfliteModel,
            4 => SectionKind::SentencePieceTokenizer,
            5 => SectionKind::LlmMetadata,
            6 => SectionKind::HfTokenizerZlib,
            other => SectionKind::Other(other),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub kind: SectionKind,
    pub begin: u64,
    pub end: u64,
}

/// What the check learned of a valid bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    pub version: (u32, u32, u32),
    pub sections: Vec<Section>,
    /// The decoder: the TFLite section with a `decode` signature (every TFLite section
    /// was checked).
    pub model: TfliteModel,
}

impl Bundle {
    pub fn section(&self, kind: SectionKind) -> Option<Section> {
        self.sections.iter().copied().find(|s| s.kind == kind)
    }
}

/// The model metadata a bundle carries (`litert.lm.proto.LlmMetadata`), as far as the
/// agent uses it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LlmMetadata {
    /// Token ids that end a turn.
    pub stop_ids: Vec<u32>,
    /// Token texts that end a turn.
    pub stop_texts: Vec<String>,
    pub max_num_tokens: u32,
    pub jinja_prompt_template: Option<String>,
}

/// Whether the file starts with a LiteRT-LM bundle's magic.
pub fn is_bundle(path: &Path) -> bool {
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| &magic == MAGIC)
}

/// Checks the bundle at `path`; any lie is [`EngineError::InvalidModel`] naming where.
pub fn check(path: &Path) -> Result<Bundle, EngineError> {
    let invalid = |what: String| EngineError::InvalidModel(format!("{}: {what}", path.display()));
    let file = File::open(path).map_err(|e| invalid(e.to_string()))?;
    let len = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    check_source(&FileSource(file), len).map_err(|e| invalid(describe(e)))
}

/// Checks a whole bundle held in memory (tests, fuzzing).
pub fn check_bytes(bytes: &[u8]) -> Result<Bundle, String> {
    check_source(&SliceSource(bytes), bytes.len() as u64).map_err(describe)
}

fn describe(e: Fault) -> String {
    match e {
        Fault::Io(e) => format!("read failed: {e}"),
        Fault::Malformed(what) => what,
    }
}

fn check_source(src: &dyn Source, len: u64) -> Checked<Bundle> {
    let file = Reader { src, len };
    if len < HEADER_START {
        return malformed(format!("{len} bytes is too short for a LiteRT-LM bundle"));
    }
    if &file.bytes::<8>(0)? != MAGIC {
        return malformed("no LITERTLM magic: not a LiteRT-LM bundle");
    }
    let version = (file.u32(8)?, file.u32(12)?, file.u32(16)?);
    if version.0 != MAJOR_VERSION {
        return malformed(format!(
            "bundle version {}.{}.{}; LiteRT-LM reads major version {MAJOR_VERSION}",
            version.0, version.1, version.2
        ));
    }
    let header_end = file.u64(24)?;
    if header_end <= HEADER_START || header_end > len {
        return malformed(format!(
            "the header ends at {header_end}, outside the {len}-byte file"
        ));
    }
    if header_end - HEADER_START > MAX_HEADER_BYTES {
        return malformed(format!(
            "the header is {} bytes; the limit is {MAX_HEADER_BYTES}",
            header_end - HEADER_START
        ));
    }
    let window = Window {
        inner: src,
        base: HEADER_START,
    };
    let header = Reader {
        src: &window,
        len: header_end - HEADER_START,
    };
    let sections = read_sections(&header).at(|| "header".into())?;
    let mut placed: Vec<Section> = sections.clone();
    placed.sort_by_key(|s| s.begin);
    for (i, s) in placed.iter().enumerate() {
        if s.begin < header_end || s.begin >= s.end || s.end > len {
            return malformed(format!(
                "a section spans bytes {}..{}, outside the data (bytes {header_end}..{len})",
                s.begin, s.end
            ));
        }
        if let Some(next) = placed.get(i + 1)
            && next.begin < s.end
        {
            return malformed(format!(
                "sections {}..{} and {}..{} overlap",
                s.begin, s.end, next.begin, next.end
            ));
        }
    }
    let mut decoder = None;
    for s in sections
        .iter()
        .filter(|s| s.kind == SectionKind::TfliteModel)
    {
        let window = Window {
            inner: src,
            base: s.begin,
        };
        let model = tflite::check_source(&window, s.end - s.begin)
            .at(|| format!("the TFLite section at {}..{}", s.begin, s.end))?;
        if decoder.is_none() && model.signature("decode").is_some() {
            decoder = Some(model);
        }
    }
    let Some(model) = decoder else {
        return malformed("the bundle holds no TFLite model with a \"decode\" signature");
    };
    Ok(Bundle {
        version,
        sections,
        model,
    })
}

fn read_sections(r: &Reader<'_>) -> Checked<Vec<Section>> {
    let root = r.follow(0)?;
    let meta = r.table(root)?;
    let Some(at) = r.field(meta, 1, 4)? else {
        return malformed("no section metadata");
    };
    let section_metadata = r.table(r.follow(at)?)?;
    let Some(objects) = r.vector_field(section_metadata, 0, 4, MAX_SECTIONS)? else {
        return malformed("no sections");
    };
    (0..objects.len)
        .map(|i| {
            let t = r.table_in(objects, i).at(|| format!("section {i}"))?;
            Ok(Section {
                begin: r.u64_field(t, 1, 0)?,
                end: r.u64_field(t, 2, 0)?,
                kind: SectionKind::from_u8(r.u8_field(t, 3, 0)?),
            })
        })
        .collect()
}

fn read_section(path: &Path, section: Section, max: u64) -> Result<Vec<u8>, EngineError> {
    let invalid = |what: String| EngineError::InvalidModel(format!("{}: {what}", path.display()));
    let size = section.end - section.begin;
    if size > max {
        return Err(invalid(format!(
            "a {:?} section of {size} bytes; the limit is {max}",
            section.kind
        )));
    }
    let file = File::open(path).map_err(|e| invalid(e.to_string()))?;
    let mut bytes = vec![0u8; size as usize];
    FileSource(file)
        .read_at(section.begin, &mut bytes)
        .map_err(|e| invalid(format!("read failed: {e}")))?;
    Ok(bytes)
}

/// The bundle's Hugging Face `tokenizer.json`, if it carries one.
pub fn hf_tokenizer_json(path: &Path, bundle: &Bundle) -> Result<Option<Vec<u8>>, EngineError> {
    let Some(section) = bundle.section(SectionKind::HfTokenizerZlib) else {
        return Ok(None);
    };
    let invalid = |what: String| {
        EngineError::InvalidModel(format!("{}: the tokenizer section: {what}", path.display()))
    };
    // Compressed text is rarely smaller than a tenth of the original.
    let compressed = read_section(path, section, MAX_TOKENIZER_BYTES)?;
    let (size, data) = compressed
        .split_first_chunk::<8>()
        .ok_or_else(|| invalid("shorter than its size prefix".into()))?;
    let size = u64::from_le_bytes(*size);
    if size > MAX_TOKENIZER_BYTES {
        return Err(invalid(format!(
            "claims {size} bytes uncompressed; the limit is {MAX_TOKENIZER_BYTES}"
        )));
    }
    let mut json = Vec::with_capacity(size as usize);
    flate2::read::ZlibDecoder::new(data)
        .take(size + 1)
        .read_to_end(&mut json)
        .map_err(|e| invalid(format!("zlib: {e}")))?;
    if json.len() as u64 != size {
        return Err(invalid(format!(
            "inflates to {} bytes, not the {size} it claims",
            json.len()
        )));
    }
    Ok(Some(json))
}

/// The bundle's model metadata, if it carries any.
pub fn llm_metadata(path: &Path, bundle: &Bundle) -> Result<Option<LlmMetadata>, EngineError> {
    let Some(section) = bundle.section(SectionKind::LlmMetadata) else {
        return Ok(None);
    };
    let bytes = read_section(path, section, MAX_METADATA_BYTES)?;
    parse_metadata(&bytes).map(Some).map_err(|e| {
        EngineError::InvalidModel(format!("{}: the model metadata: {e}", path.display()))
    })
}

/// Field numbers of `litert.lm.proto.LlmMetadata` and `TokenUnion`.
fn parse_metadata(msg: &[u8]) -> io::Result<LlmMetadata> {
    let mut out = LlmMetadata::default();
    let payload = |start: u64, len: u64| {
        msg.get(start as usize..(start + len) as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a field past the end"))
    };
    let utf8 = |bytes: &[u8]| {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "a string is not UTF-8"))
    };
    for field in protobuf::fields(&mut io::Cursor::new(msg), 0, msg.len() as u64)? {
        match (field.number, field.value) {
            (2, WireValue::Len { start, len }) => {
                if out.stop_ids.len() + out.stop_texts.len() >= MAX_STOP_TOKENS {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("more than {MAX_STOP_TOKENS} stop tokens"),
                    ));
                }
                let union = payload(start, len)?;
                for inner in protobuf::fields(&mut io::Cursor::new(union), 0, len)? {
                    match (inner.number, inner.value) {
                        (1, WireValue::Len { start, len }) => {
                            let ids = payload_in(union, start, len)?;
                            out.stop_ids.extend(token_ids(ids)?);
                        }
                        (2, WireValue::Len { start, len }) => {
                            out.stop_texts.push(utf8(payload_in(union, start, len)?)?);
                        }
                        _ => {}
                    }
                }
            }
            (5, WireValue::Varint(n)) => out.max_num_tokens = u32::try_from(n).unwrap_or(0),
            (7, WireValue::Len { start, len }) => {
                out.jinja_prompt_template = Some(utf8(payload(start, len)?)?);
            }
            _ => {}
        }
    }
    Ok(out)
}

fn payload_in(msg: &[u8], start: u64, len: u64) -> io::Result<&[u8]> {
    msg.get(start as usize..(start + len) as usize)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "a field past the end"))
}

/// `TokenIds`: `repeated int32 ids = 1`, packed or not.
fn token_ids(msg: &[u8]) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut push = |v: u64| {
        if ids.len() < MAX_STOP_TOKENS {
            ids.push(v as u32);
        }
    };
    for field in protobuf::fields(&mut io::Cursor::new(msg), 0, msg.len() as u64)? {
        match (field.number, field.value) {
            (1, WireValue::Varint(v)) => push(v),
            (1, WireValue::Len { start, len }) => {
                let mut packed = io::Cursor::new(payload_in(msg, start, len)?);
                while packed.position() < len {
                    push(protobuf::varint(&mut packed)?.0);
                }
            }
            _ => {}
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, header_end: u64) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        for v in [version, 0, 0, 0] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&header_end.to_le_bytes());
        b
    }

    #[test]
    fn foreign_and_short_files_are_refused() {
        assert!(check_bytes(b"LITERT").unwrap_err().contains("too short"));
        let mut not = header(1, 40);
        not[..8].copy_from_slice(b"TFL3TFL3");
        assert!(check_bytes(&not).unwrap_err().contains("magic"));
        assert!(
            check_bytes(&header(2, 40))
                .unwrap_err()
                .contains("major version 1")
        );
    }

    #[test]
    fn a_header_end_outside_the_file_or_past_the_limit_is_refused() {
        let mut b = header(1, 10_000);
        b.resize(64, 0);
        assert!(
            check_bytes(&b)
                .unwrap_err()
                .contains("outside the 64-byte file")
        );
        let big = HEADER_START + MAX_HEADER_BYTES + 1;
        let mut b = header(1, big);
        b.resize(big as usize, 0);
        assert!(check_bytes(&b).unwrap_err().contains("the limit is"));
    }

    #[test]
    fn token_ids_read_packed_and_unpacked() {
        // ids: [2] unpacked, then [5, 300] packed.
        let msg = [0x08, 0x02, 0x0a, 0x03, 0x05, 0xac, 0x02];
        assert_eq!(token_ids(&msg).unwrap(), vec![2, 5, 300]);
    }

    #[test]
    fn metadata_reads_stop_tokens_and_the_template() {
        let mut msg = vec![0x12, 0x04, 0x0a, 0x02, 0x08, 0x02]; // stop_tokens { token_ids { ids: 2 } }
        msg.extend([0x12, 0x05, 0x12, 0x03]); // stop_tokens { token_str: "</s" }
        msg.extend(b"</s");
        msg.extend([0x28, 0x80, 0x04]); // max_num_tokens: 512
        msg.extend([0x3a, 0x02]); // jinja_prompt_template: "hi"
        msg.extend(b"hi");
        let m = parse_metadata(&msg).unwrap();
        assert_eq!(m.stop_ids, vec![2]);
        assert_eq!(m.stop_texts, vec!["</s".to_owned()]);
        assert_eq!(m.max_num_tokens, 512);
        assert_eq!(m.jinja_prompt_template.as_deref(), Some("hi"));
        assert!(parse_metadata(&[0x3a, 0x09, b'x']).is_err());
    }
}
