//! A bounds-checked reader for GGUF headers.
//!
//! llama.cpp asserts on malformed files, and an assert aborts the whole agent, so every
//! count, length and offset is checked here against the file size before any engine
//! sees the file. The reader streams (no seeking), so it also works on a member inside
//! a compressed archive.

use std::collections::BTreeMap;
use std::io::{self, Read};

pub const MAGIC: &[u8; 4] = b"GGUF";
/// GGML_MAX_DIMS in llama.cpp.
const MAX_DIMS: u32 = 4;
/// Longest string value we accept (chat templates and token texts are far shorter).
const MAX_STRING: u64 = 16 * 1024 * 1024;
/// Nesting of arrays of arrays we accept.
const MAX_ARRAY_DEPTH: u32 = 2;

/// A metadata value. Arrays are summarized (element type and length) unless the
/// caller asked to keep them, since vocabularies run to hundreds of thousands of
/// entries and most readers only need the scalars.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
    Array {
        elem_type: u32,
        len: u64,
    },
    /// A kept array of strings (e.g. `tokenizer.ggml.tokens`).
    Strings(Vec<String>),
    /// A kept array of integers (e.g. `tokenizer.ggml.token_type`).
    Ints(Vec<i64>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Uint(v) => Some(*v),
            Value::Int(v) => u64::try_from(*v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ggml_type: u32,
    pub offset: u64,
    pub size_bytes: u64,
}

/// What a GGUF header says, after every bound was checked.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Offset of the tensor data section from the start of the file.
    pub data_offset: u64,
}

impl GgufHeader {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    pub fn context_length(&self) -> Option<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.context_length"))
            .and_then(Value::as_u64)
    }

    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.dims.iter().product::<u64>())
            .sum()
    }

    /// The quantization label llama.cpp would print, e.g. "Q4_1".
    pub fn quantization(&self) -> Option<String> {
        if let Some(ft) = self.get("general.file_type").and_then(Value::as_u64)
            && let Some(name) = file_type_name(ft)
        {
            return Some(name.to_owned());
        }
        // Older files lack general.file_type: name the type holding the most weights.
        let mut by_type: BTreeMap<u32, u64> = BTreeMap::new();
        for t in &self.tensors {
            *by_type.entry(t.ggml_type).or_default() += t.size_bytes;
        }
        by_type
            .into_iter()
            .max_by_key(|(_, bytes)| *bytes)
            .and_then(|(ty, _)| type_layout(ty).map(|l| l.name.to_owned()))
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template").and_then(Value::as_str)
    }

    /// What an engine needs to know about the model: geometry, size, quantization.
    pub fn probe(&self) -> Result<crate::ModelProbe, String> {
        let arch = self
            .architecture()
            .ok_or_else(|| "general.architecture is missing".to_owned())?
            .to_owned();
        let number = |key: &str| {
            self.get(&format!("{arch}.{key}"))
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .unwrap_or(0)
        };
        let heads = number("attention.head_count");
        let embedding_length = number("embedding_length");
        let head_dim = match number("attention.key_length") {
            0 if heads > 0 => embedding_length / heads,
            n => n,
        };
        let kv_heads = match number("attention.head_count_kv") {
            0 => heads,
            n => n,
        };
        let vocab_size = match self.get("tokenizer.ggml.tokens") {
            Some(Value::Array { len, .. }) => u32::try_from(*len).unwrap_or(0),
            _ => 0,
        };
        Ok(crate::ModelProbe {
            parameter_count: self.parameter_count(),
            weights_bytes: self.tensors.iter().map(|t| t.size_bytes).sum(),
            context_length: number("context_length"),
            vocab_size,
            layers: number("block_count"),
            kv_heads,
            head_dim,
            embedding_length,
            quantization: self.quantization(),
            architecture: arch,
        })
    }
}

struct TypeLayout {
    name: &'static str,
    block: u64,
    bytes: u64,
}

/// Block size and bytes per block of each ggml tensor type llama.cpp can load.
fn type_layout(ty: u32) -> Option<TypeLayout> {
    let (name, block, bytes) = match ty {
        0 => ("F32", 1, 4),
        1 => ("F16", 1, 2),
        2 => ("Q4_0", 32, 18),
        3 => ("Q4_1", 32, 20),
        6 => ("Q5_0", 32, 22),
        7 => ("Q5_1", 32, 24),
        8 => ("Q8_0", 32, 34),
        9 => ("Q8_1", 32, 36),
        10 => ("Q2_K", 256, 84),
        11 => ("Q3_K", 256, 110),
        12 => ("Q4_K", 256, 144),
        13 => ("Q5_K", 256, 176),
        14 => ("Q6_K", 256, 210),
        15 => ("Q8_K", 256, 292),
        16 => ("IQ2_XXS", 256, 66),
        17 => ("IQ2_XS", 256, 74),
        18 => ("IQ3_XXS", 256, 98),
        19 => ("IQ1_S", 256, 50),
        20 => ("IQ4_NL", 32, 18),
        21 => ("IQ3_S", 256, 110),
        22 => ("IQ2_S", 256, 82),
        23 => ("IQ4_XS", 256, 136),
        24 => ("I8", 1, 1),
        25 => ("I16", 1, 2),
        26 => ("I32", 1, 4),
        27 => ("I64", 1, 8),
        28 => ("F64", 1, 8),
        29 => ("IQ1_M", 256, 56),
        30 => ("BF16", 1, 2),
        34 => ("TQ1_0", 256, 54),
        35 => ("TQ2_0", 256, 66),
        39 => ("MXFP4", 32, 17),
        _ => return None,
    };
    Some(TypeLayout { name, block, bytes })
}

/// llama.cpp's `llama_ftype` names.
fn file_type_name(ft: u64) -> Option<&'static str> {
    Some(match ft {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// Why a file with the GGUF magic is not a usable GGUF.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file (no GGUF magic)")]
    NotGguf,
    #[error("truncated at byte {at}: {what} needs {need} bytes, file has {size}")]
    Truncated {
        at: u64,
        what: String,
        need: u64,
        size: u64,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

struct Reader<'k, R> {
    inner: R,
    pos: u64,
    size: u64,
    /// Keys whose arrays are kept whole instead of summarized.
    keep: &'k [&'k str],
}

impl<R: Read> Reader<'_, R> {
    fn need(&self, n: u64, what: &str) -> Result<(), GgufError> {
        if self.size.saturating_sub(self.pos) < n {
            return Err(GgufError::Truncated {
                at: self.pos,
                what: what.to_owned(),
                need: n,
                size: self.size,
            });
        }
        Ok(())
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        self.need(N as u64, what)?;
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                GgufError::Truncated {
                    at: self.pos,
                    what: what.to_owned(),
                    need: N as u64,
                    size: self.pos,
                }
            } else {
                GgufError::Io(e)
            }
        })?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), GgufError> {
        self.need(n, what)?;
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied != n {
            return Err(GgufError::Truncated {
                at: self.pos + copied,
                what: what.to_owned(),
                need: n,
                size: self.pos + copied,
            });
        }
        self.pos += n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(GgufError::Invalid(format!(
                "{what}: string of {len} bytes exceeds the {MAX_STRING}-byte limit"
            )));
        }
        self.need(len, what)?;
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf)?;
        self.pos += len;
        String::from_utf8(buf)
            .map_err(|_| GgufError::Invalid(format!("{what}: string is not valid UTF-8")))
    }

    fn skip_string(&mut self, what: &str) -> Result<(), GgufError> {
        let len = self.u64(what)?;
        self.skip(len, what)
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<Value, GgufError> {
        Ok(match ty {
            0 => Value::Uint(u64::from(self.bytes::<1>(key)?[0])),
            1 => Value::Int(i64::from(i8::from_le_bytes(self.bytes(key)?))),
            2 => Value::Uint(u64::from(u16::from_le_bytes(self.bytes(key)?))),
            3 => Value::Int(i64::from(i16::from_le_bytes(self.bytes(key)?))),
            4 => Value::Uint(u64::from(self.u32(key)?)),
            5 => Value::Int(i64::from(i32::from_le_bytes(self.bytes(key)?))),
            6 => Value::Float(f64::from(f32::from_le_bytes(self.bytes(key)?))),
            7 => match self.bytes::<1>(key)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(GgufError::Invalid(format!(
                        "{key}: bool byte {b} is not 0 or 1"
                    )));
                }
            },
            8 => Value::String(self.string(key)?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(GgufError::Invalid(format!(
                        "{key}: arrays nested too deeply"
                    )));
                }
                let elem_type = self.u32(key)?;
                let len = self.u64(key)?;
                if depth == 0 && self.keep.contains(&key) {
                    return self.kept_array(elem_type, len, key);
                }
                match scalar_size(elem_type) {
                    Some(size) => {
                        let total = len.checked_mul(size).ok_or_else(|| {
                            GgufError::Invalid(format!("{key}: array length {len} overflows"))
                        })?;
                        self.skip(total, key)?;
                    }
                    None if elem_type == 8 => {
                        // Each string needs at least its 8-byte length.
                        self.need(len.saturating_mul(8), key)?;
                        for _ in 0..len {
                            self.skip_string(key)?;
                        }
                    }
                    None if elem_type == 9 => {
                        self.need(len.saturating_mul(12), key)?;
                        for _ in 0..len {
                            self.value(9, key, depth + 1)?;
                        }
                    }
                    None => {
                        return Err(GgufError::Invalid(format!(
                            "{key}: unknown array element type {elem_type}"
                        )));
                    }
                }
                Value::Array { elem_type, len }
            }
            10 => Value::Uint(self.u64(key)?),
            11 => Value::Int(i64::from_le_bytes(self.bytes(key)?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes(key)?)),
            other => {
                return Err(GgufError::Invalid(format!(
                    "{key}: unknown value type {other}"
                )));
            }
        })
    }
}

impl<R: Read> Reader<'_, R> {
    /// Reads a whole array of strings or integers. Every element is bounds-checked
    /// like a scalar, so a lying length fails as "truncated", not as an allocation.
    fn kept_array(&mut self, elem_type: u32, len: u64, key: &str) -> Result<Value, GgufError> {
        let min_elem = match elem_type {
            8 => 8,
            t => scalar_size(t).unwrap_or(1),
        };
        self.need(len.saturating_mul(min_elem), key)?;
        let cap = usize::try_from(len.min(1 << 20)).unwrap_or(0);
        if elem_type == 8 {
            let mut out = Vec::with_capacity(cap);
            for _ in 0..len {
                out.push(self.string(key)?);
            }
            return Ok(Value::Strings(out));
        }
        let mut out = Vec::with_capacity(cap);
        for _ in 0..len {
            let v = match self.value(elem_type, key, 1)? {
                Value::Int(v) => v,
                Value::Uint(v) => i64::try_from(v).map_err(|_| {
                    GgufError::Invalid(format!("{key}: array element {v} overflows"))
                })?,
                other => {
                    return Err(GgufError::Invalid(format!(
                        "{key}: expected integers, found {other:?}"
                    )));
                }
            };
            out.push(v);
        }
        Ok(Value::Ints(out))
    }
}

fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Reads and checks a GGUF header from `input`, whose total size is `size` bytes.
pub fn read_header<R: Read>(input: R, size: u64) -> Result<GgufHeader, GgufError> {
    read_header_keeping(input, size, &[])
}

/// Like [`read_header`], and keeps the arrays stored under `keep` whole.
pub fn read_header_keeping<R: Read>(
    input: R,
    size: u64,
    keep: &[&str],
) -> Result<GgufHeader, GgufError> {
    let mut r = Reader {
        inner: input,
        pos: 0,
        size,
        keep,
    };
    let magic: [u8; 4] = r.bytes("magic").map_err(|_| GgufError::NotGguf)?;
    if &magic != MAGIC {
        return Err(GgufError::NotGguf);
    }
    let version = r.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(GgufError::Invalid(format!(
            "GGUF version {version} is not supported (expected 2 or 3)"
        )));
    }
    let tensor_count = r.u64("tensor count")?;
    let kv_count = r.u64("metadata count")?;
    let remaining = size.saturating_sub(r.pos);
    // A key-value pair takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor
    // info at least 8 + 4 + 8 + 4 + 8.
    if kv_count.saturating_mul(13) > remaining {
        return Err(GgufError::Invalid(format!(
            "metadata count {kv_count} cannot fit in a {size}-byte file"
        )));
    }
    if tensor_count.saturating_mul(32) > remaining {
        return Err(GgufError::Invalid(format!(
            "tensor count {tensor_count} cannot fit in a {size}-byte file"
        )));
    }

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&key)?;
        let value = r.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(Value::Uint(a)) if *a > 0 && a.is_power_of_two() => *a,
        Some(other) => {
            return Err(GgufError::Invalid(format!(
                "general.alignment {other:?} must be a non-zero power of two"
            )));
        }
    };

    let mut tensors = Vec::with_capacity(usize::try_from(tensor_count.min(65_536)).unwrap_or(0));
    for i in 0..tensor_count {
        let name = r.string(&format!("tensor #{i} name"))?;
        let n_dims = r.u32(&name)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::Invalid(format!(
                "tensor {name:?} has {n_dims} dimensions (1-{MAX_DIMS} allowed)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.u64(&name)?);
        }
        let ggml_type = r.u32(&name)?;
        let offset = r.u64(&name)?;
        let layout = type_layout(ggml_type).ok_or_else(|| {
            GgufError::Invalid(format!("tensor {name:?} has unknown type {ggml_type}"))
        })?;
        let elements = dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .filter(|n| *n < (1 << 62))
            .ok_or_else(|| GgufError::Invalid(format!("tensor {name:?} dimensions overflow")))?;
        if dims[0] % layout.block != 0 {
            return Err(GgufError::Invalid(format!(
                "tensor {name:?}: row of {} elements is not a multiple of the {} block size {}",
                dims[0], layout.name, layout.block
            )));
        }
        if offset % alignment != 0 {
            return Err(GgufError::Invalid(format!(
                "tensor {name:?}: offset {offset} is not aligned to {alignment}"
            )));
        }
        let size_bytes = elements / layout.block * layout.bytes;
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            size_bytes,
        });
    }

    let data_offset = r
        .pos
        .div_ceil(alignment)
        .checked_mul(alignment)
        .filter(|start| tensors.is_empty() || *start <= size)
        .ok_or_else(|| {
            GgufError::Invalid(format!(
                "the tensor data section (aligned to {alignment}) starts past the end of the {size}-byte file"
            ))
        })?;
    let data_size = size.saturating_sub(data_offset);
    for t in &tensors {
        let end = t.offset.checked_add(t.size_bytes);
        if end.is_none_or(|end| end > data_size) {
            return Err(GgufError::Invalid(format!(
                "tensor {:?} (offset {}, {} bytes) runs past the end of the file's {data_size}-byte data section",
                t.name, t.offset, t.size_bytes
            )));
        }
    }
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF header with three KVs and one F32 tensor, without padding or data.
    fn tiny_gguf_header(tensor_offset: u64, tensor_len_elems: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&3u64.to_le_bytes()); // kvs
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        s(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "llama.context_length");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&2048u32.to_le_bytes());
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend_from_slice(&9u32.to_le_bytes());
        b.extend_from_slice(&8u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        s(&mut b, "w");
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&tensor_len_elems.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&tensor_offset.to_le_bytes());
        b
    }

    /// [`tiny_gguf_header`], padded to its data section and followed by `data_bytes`.
    fn tiny_gguf(tensor_offset: u64, tensor_len_elems: u64, data_bytes: usize) -> Vec<u8> {
        let mut b = tiny_gguf_header(tensor_offset, tensor_len_elems);
        while !b.len().is_multiple_of(32) {
            b.push(0);
        }
        b.extend(std::iter::repeat_n(0u8, data_bytes));
        b
    }

    fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        read_header(bytes, bytes.len() as u64)
    }

    #[test]
    fn reads_metadata_and_tensors() {
        let h = parse(&tiny_gguf(0, 8, 32)).unwrap();
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.context_length(), Some(2048));
        assert_eq!(h.parameter_count(), 8);
        assert_eq!(h.quantization().as_deref(), Some("F32"));
        assert_eq!(
            h.get("tokenizer.ggml.tokens"),
            Some(&Value::Array {
                elem_type: 8,
                len: 2
            })
        );
    }

    #[test]
    fn tensor_past_end_of_file_is_rejected() {
        let err = parse(&tiny_gguf(0, 64, 32)).unwrap_err();
        assert!(err.to_string().contains("runs past the end"), "{err}");
    }

    /// Found by fuzzing (bench/fuzz.sh, target gguf): an empty tensor in a file that ends
    /// before the aligned start of its data section was accepted, with a data offset past
    /// the end of the file.
    #[test]
    fn data_section_past_end_of_file_is_rejected() {
        let bytes = tiny_gguf_header(0, 0);
        assert!(
            !bytes.len().is_multiple_of(32),
            "the header must end off alignment"
        );
        let err = parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("starts past the end"), "{err}");
        // The same file padded to its data section is a valid (if odd) GGUF.
        let padded = tiny_gguf(0, 0, 0);
        assert_eq!(parse(&padded).unwrap().data_offset, padded.len() as u64);
    }

    #[test]
    fn misaligned_offset_is_rejected() {
        let err = parse(&tiny_gguf(4, 1, 64)).unwrap_err();
        assert!(err.to_string().contains("not aligned"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_never_a_panic() {
        let full = tiny_gguf(0, 8, 32);
        for len in 0..full.len() - 32 {
            assert!(parse(&full[..len]).is_err(), "prefix of {len} bytes parsed");
        }
    }

    #[test]
    fn absurd_counts_are_rejected_before_allocation() {
        let mut b = tiny_gguf(0, 8, 32);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(parse(&b).unwrap_err().to_string().contains("tensor count"));
        let mut b = tiny_gguf(0, 8, 32);
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(
            parse(&b)
                .unwrap_err()
                .to_string()
                .contains("metadata count")
        );
    }

    #[test]
    fn huge_string_length_is_rejected() {
        let mut b = tiny_gguf(0, 8, 32);
        // The first key's length field starts right after the 24-byte preamble.
        b[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        assert!(parse(&b).is_err());
    }
}
