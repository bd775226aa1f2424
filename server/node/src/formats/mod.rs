//! Recognizing model formats from content, never from file names, and reading the
//! metadata each format carries. Used by discovery now and by validation before load.
//!
//! Readers here treat every byte as hostile: counts, lengths and offsets are checked
//! against the file size before anything is allocated or followed.

pub mod archive;
pub mod dir;
/// The bounds-checked GGUF reader lives in engine-core, so engines can probe files
/// with it too.
pub use modeld_engine_core::gguf;
pub mod onnx;
pub use modeld_engine_core::protobuf;
pub use modeld_engine_core::safetensors;

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use modeld_engine_core::{ArchiveFormat, ModelFormat, litertlm, tflite};

/// Metadata a model file carries about itself. Absent values are empty or zero.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata {
    pub name: String,
    pub architecture: String,
    pub parameter_count: u64,
    pub quantization: String,
    pub context_length: u32,
    pub chat_template: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
}

/// What the first bytes (and, where needed, the header) of a file say it is.
#[derive(Debug, Clone, PartialEq)]
pub enum Sniffed {
    Model {
        format: ModelFormat,
        metadata: Metadata,
    },
    Archive(ArchiveFormat),
    /// It carries a format's signature but its header is broken.
    Malformed {
        format: ModelFormat,
        reason: String,
    },
    Unknown,
}

/// How many leading bytes classification looks at.
const HEAD: usize = 64;
/// ONNX members inside archives are read into memory to be walked; larger ones are not.
const MAX_IN_MEMORY_PROTO: u64 = 64 * 1024 * 1024;

/// Classifies the file at `path`.
pub fn sniff_file(path: &Path) -> io::Result<Sniffed> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut head = [0u8; HEAD];
    let n = read_full(&mut reader, &mut head)?;
    if head[..n].starts_with(litertlm::MAGIC) {
        return Ok(litertlm_file(path));
    }
    if looks_like_protobuf(&head[..n]) {
        if let Some(model) = onnx::sniff(&mut reader, size) {
            return Ok(proto_model(model));
        }
        return Ok(sniff_extension(path));
    }
    let chained = io::Cursor::new(head[..n].to_vec()).chain(reader);
    let sniffed = sniff_head_and_stream(&head[..n], chained, size)?;
    Ok(match sniffed {
        Sniffed::Unknown => sniff_extension(path),
        // A flatbuffer is checked by its offsets, which a file (not a stream) allows.
        Sniffed::Model {
            format: ModelFormat::Tflite,
            ..
        } => tflite_file(path),
        other => other,
    })
}

/// A TFLite file, checked whole (every offset and index), with what it holds.
fn tflite_file(path: &Path) -> Sniffed {
    match tflite::check_file(path) {
        Ok(model) => Sniffed::Model {
            format: ModelFormat::Tflite,
            metadata: tflite_metadata(&model),
        },
        Err(reason) => Sniffed::Malformed {
            format: ModelFormat::Tflite,
            reason,
        },
    }
}

/// A LiteRT-LM bundle: a TFLite decoder with its tokenizer and metadata, checked whole.
fn litertlm_file(path: &Path) -> Sniffed {
    match litertlm::check(path) {
        Ok(bundle) => Sniffed::Model {
            format: ModelFormat::Tflite,
            metadata: Metadata {
                context_length: litertlm::llm_metadata(path, &bundle)
                    .ok()
                    .flatten()
                    .map_or(0, |m| m.max_num_tokens),
                ..tflite_metadata(&bundle.model)
            },
        },
        Err(e) => Sniffed::Malformed {
            format: ModelFormat::Tflite,
            reason: e.to_string(),
        },
    }
}

pub(crate) fn tflite_metadata(model: &tflite::TfliteModel) -> Metadata {
    // The entry point a caller runs: a decoder's `decode`, else the first signature.
    let entry = model
        .signature("decode")
        .or_else(|| model.signatures.first());
    let names = |list: &[tflite::TensorInfo]| list.iter().map(|t| t.name.clone()).collect();
    Metadata {
        name: model.description.clone().unwrap_or_default(),
        parameter_count: model.constant_elements,
        quantization: model.weight_type().to_owned(),
        inputs: entry.map(|s| names(&s.inputs)).unwrap_or_default(),
        outputs: entry.map(|s| names(&s.outputs)).unwrap_or_default(),
        ..Metadata::default()
    }
}

/// Classifies a stream of `size` bytes, e.g. an archive member. `name` is only used for
/// formats without a public signature (picoLLM).
pub fn sniff_stream<R: Read>(mut r: R, size: u64, name: &str) -> io::Result<Sniffed> {
    let mut head = [0u8; HEAD];
    let n = read_full(&mut r, &mut head)?;
    if looks_like_protobuf(&head[..n]) {
        if size > MAX_IN_MEMORY_PROTO {
            return Ok(Sniffed::Unknown);
        }
        let mut buf = head[..n].to_vec();
        r.take(size - n as u64).read_to_end(&mut buf)?;
        let len = buf.len() as u64;
        let mut cur = io::Cursor::new(buf);
        return Ok(match onnx::sniff(&mut cur, len) {
            Some(model) => proto_model(model),
            None => sniff_extension(Path::new(name)),
        });
    }
    let chained = io::Cursor::new(head[..n].to_vec()).chain(r);
    Ok(match sniff_head_and_stream(&head[..n], chained, size)? {
        Sniffed::Unknown => sniff_extension(Path::new(name)),
        other => other,
    })
}

fn sniff_head_and_stream<R: Read>(head: &[u8], stream: R, size: u64) -> io::Result<Sniffed> {
    if head.starts_with(gguf::MAGIC) {
        return Ok(match gguf::read_header(stream, size) {
            Ok(h) => Sniffed::Model {
                format: ModelFormat::Gguf,
                metadata: gguf_metadata(&h),
            },
            Err(gguf::GgufError::Io(e)) => return Err(e),
            Err(e) => Sniffed::Malformed {
                format: ModelFormat::Gguf,
                reason: e.to_string(),
            },
        });
    }
    if head.len() >= 8 && &head[4..8] == b"TFL3" {
        return Ok(Sniffed::Model {
            format: ModelFormat::Tflite,
            metadata: Metadata::default(),
        });
    }
    if head.len() >= 8 && &head[4..6] == b"ET" && head[6..8].iter().all(u8::is_ascii_alphanumeric) {
        return Ok(Sniffed::Model {
            format: ModelFormat::ExecuTorch,
            metadata: Metadata::default(),
        });
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Ok(Sniffed::Archive(ArchiveFormat::Zip));
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Ok(if archive::gzip_holds_tar(stream) {
            Sniffed::Archive(ArchiveFormat::TarGz)
        } else {
            Sniffed::Unknown
        });
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(match safetensors::read_header(stream, size) {
            Ok(h) => Sniffed::Model {
                format: if h.metadata.get("format").is_some_and(|f| f == "mlx") {
                    ModelFormat::Mlx
                } else {
                    ModelFormat::Safetensors
                },
                metadata: Metadata {
                    parameter_count: h.parameter_count,
                    quantization: h.dominant_dtype,
                    ..Metadata::default()
                },
            },
            Err(reason) => Sniffed::Malformed {
                format: ModelFormat::Safetensors,
                reason,
            },
        });
    }
    Ok(Sniffed::Unknown)
}

/// picoLLM publishes no file signature, so its extension is all there is to go on.
fn sniff_extension(path: &Path) -> Sniffed {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("pllm") => Sniffed::Model {
            format: ModelFormat::PicoLlm,
            metadata: Metadata::default(),
        },
        _ => Sniffed::Unknown,
    }
}

/// ONNX and Core ML both open with field 1 as a varint (tag byte 0x08).
fn looks_like_protobuf(head: &[u8]) -> bool {
    head.first() == Some(&0x08)
}

fn proto_model(model: onnx::ProtoModel) -> Sniffed {
    match model {
        onnx::ProtoModel::Onnx { producer, io, .. } => Sniffed::Model {
            format: ModelFormat::Onnx,
            metadata: Metadata {
                name: producer,
                inputs: io.inputs,
                outputs: io.outputs,
                ..Metadata::default()
            },
        },
        onnx::ProtoModel::CoreMl { io, .. } => Sniffed::Model {
            format: ModelFormat::CoreMl,
            metadata: Metadata {
                inputs: io.inputs,
                outputs: io.outputs,
                ..Metadata::default()
            },
        },
    }
}

pub fn gguf_metadata(h: &gguf::GgufHeader) -> Metadata {
    Metadata {
        name: h
            .get("general.name")
            .and_then(gguf::Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        architecture: h.architecture().unwrap_or_default().to_owned(),
        parameter_count: h.parameter_count(),
        quantization: h.quantization().unwrap_or_default(),
        context_length: h
            .context_length()
            .and_then(|c| u32::try_from(c).ok())
            .unwrap_or(0),
        chat_template: h.chat_template().unwrap_or_default().to_owned(),
        inputs: Vec::new(),
        outputs: Vec::new(),
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
