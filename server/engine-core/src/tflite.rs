//! Checks a `.tflite` file before LiteRT sees it, the way the GGUF reader checks a
//! GGUF: every offset the flatbuffer holds (tables, their vtables, vectors, strings)
//! lies inside the file, every index (buffer, operator code, tensor, subgraph) names
//! something that exists, and every constant tensor's buffer holds exactly the bytes
//! its shape and type need. LiteRT's own verifier is not ours to rely on: a file that
//! fails here never reaches the library.
//!
//! The file is read with positioned reads of the few bytes each structure needs, so a
//! 500 MB model is checked without reading its weights.
//!
//! Field numbers are those of TFLite's `schema.fbs` (schema version 3).

use std::fs::File;
use std::io;
use std::path::Path;

use crate::EngineError;
use crate::flatbuffer::{
    Checked, Context as _, Fault, FileSource, MAX_STRING_BYTES, Reader, SliceSource, Source, Table,
    malformed,
};

/// TFLite's flatbuffer file identifier, at bytes 4..8.
pub const IDENTIFIER: &[u8; 4] = b"TFL3";
/// The schema version every current TFLite file carries.
pub const SCHEMA_VERSION: u32 = 3;

/// Explicit limits: a file claiming more is refused before anything is allocated for it.
pub const MAX_SUBGRAPHS: u32 = 1024;
pub const MAX_TENSORS: u32 = 1 << 20;
pub const MAX_OPERATORS: u32 = 1 << 20;
pub const MAX_BUFFERS: u32 = 1 << 20;
pub const MAX_SIGNATURES: u32 = 1024;
/// LiteRT's `LITERT_TENSOR_MAX_RANK`.
pub const MAX_RANK: u32 = 8;
pub const MAX_NAME_BYTES: u32 = MAX_STRING_BYTES;

/// A tensor as a signature names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The signature's name for it (the key a caller binds a buffer to).
    pub name: String,
    pub shape: Vec<i32>,
    pub element_type: ElementType,
}

/// One entry point of the model: a subgraph with named inputs and outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureInfo {
    pub key: String,
    pub subgraph: u32,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
}

impl SignatureInfo {
    pub fn input(&self, name: &str) -> Option<&TensorInfo> {
        self.inputs.iter().find(|t| t.name == name)
    }
    pub fn output(&self, name: &str) -> Option<&TensorInfo> {
        self.outputs.iter().find(|t| t.name == name)
    }
}

/// What the check learned of a valid file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TfliteModel {
    pub description: Option<String>,
    pub signatures: Vec<SignatureInfo>,
    pub subgraphs: u32,
    pub operators: u64,
    /// Elements of the constant tensors of weight types (floats and the integer
    /// types quantized weights use), each buffer counted once: subgraphs share
    /// weights through buffers. Shape and index constants (int32, int64, bool) are
    /// not parameters.
    pub constant_elements: u64,
    /// Bytes of those buffers.
    pub constant_bytes: u64,
}

impl TfliteModel {
    pub fn signature(&self, key: &str) -> Option<&SignatureInfo> {
        self.signatures.iter().find(|s| s.key == key)
    }

    /// The weights' type as quantization names go ("F32", "F16", "Q8", "Q4"), from
    /// the bits each constant element takes.
    pub fn weight_type(&self) -> &'static str {
        let bits = (self.constant_bytes * 8)
            .checked_div(self.constant_elements)
            .unwrap_or(32);
        match bits {
            b if b >= 24 => "F32",
            b if b >= 12 => "F16",
            b if b >= 6 => "Q8",
            _ => "Q4",
        }
    }
}

/// Declares TFLite's `TensorType` in schema order: a variant's position is its
/// number in the file.
macro_rules! element_types {
    ($($variant:ident = $name:literal,)*) => {
        /// TFLite's `TensorType`, by its schema number.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ElementType {
            $($variant,)*
        }

        impl ElementType {
            const ALL: &[ElementType] = &[$(ElementType::$variant,)*];

            fn from_schema(code: u8) -> Option<ElementType> {
                Self::ALL.get(usize::from(code)).copied()
            }

            pub fn as_str(self) -> &'static str {
                match self {
                    $(ElementType::$variant => $name,)*
                }
            }
        }
    };
}

element_types! {
    Float32 = "float32",
    Float16 = "float16",
    Int32 = "int32",
    Uint8 = "uint8",
    Int64 = "int64",
    String = "string",
    Bool = "bool",
    Int16 = "int16",
    Complex64 = "complex64",
    Int8 = "int8",
    Float64 = "float64",
    Complex128 = "complex128",
    Uint64 = "uint64",
    Resource = "resource",
    Variant = "variant",
    Uint32 = "uint32",
    Uint16 = "uint16",
    Int4 = "int4",
    Bfloat16 = "bfloat16",
    Int2 = "int2",
    Uint4 = "uint4",
    Float8E4m3fn = "float8_e4m3fn",
    Float8E5m2 = "float8_e5m2",
}

impl ElementType {
    /// Bits per element; `None` for types without a fixed size (strings, resources).
    pub fn bits(self) -> Option<u64> {
        use ElementType::*;
        match self {
            Int2 => Some(2),
            Int4 | Uint4 => Some(4),
            Uint8 | Int8 | Bool | Float8E4m3fn | Float8E5m2 => Some(8),
            Float16 | Bfloat16 | Int16 | Uint16 => Some(16),
            Float32 | Int32 | Uint32 => Some(32),
            Int64 | Uint64 | Float64 | Complex64 => Some(64),
            Complex128 => Some(128),
            String | Resource | Variant => None,
        }
    }

    /// Whether constants of this type are weights rather than shapes or indices.
    pub fn holds_weights(self) -> bool {
        use ElementType::*;
        !matches!(
            self,
            Int32 | Int64 | Uint32 | Uint64 | Bool | String | Resource | Variant
        )
    }
}

/// The files with extension `ext` (`tflite`, `litertlm`) at the top of `dir`, sorted:
/// a directory model holds one.
pub fn files_in(dir: &Path, ext: &str) -> io::Result<Vec<std::path::PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|x| x == ext) {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Checks the file at `path`; any lie is [`EngineError::InvalidModel`] naming where.
pub fn check(path: &Path) -> Result<TfliteModel, EngineError> {
    check_file(path)
        .map_err(|what| EngineError::InvalidModel(format!("{}: {what}", path.display())))
}

/// [`check`] with the reason alone, for a caller that names the file itself.
pub fn check_file(path: &Path) -> Result<TfliteModel, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    check_source(&FileSource(file), len).map_err(|e| match e {
        Fault::Io(e) => format!("read failed: {e}"),
        Fault::Malformed(what) => what,
    })
}

/// Checks a whole file held in memory (tests, fuzzing).
pub fn check_bytes(bytes: &[u8]) -> Result<TfliteModel, String> {
    check_source(&SliceSource(bytes), bytes.len() as u64).map_err(|e| match e {
        Fault::Io(e) => e.to_string(),
        Fault::Malformed(what) => what,
    })
}

/// Buffer sizes by index: `None` = empty (no constant data).
struct Buffers(Vec<Option<u64>>);

pub(crate) fn check_source(src: &dyn Source, len: u64) -> Checked<TfliteModel> {
    let r = Reader { src, len };
    if len < 8 {
        return malformed(format!("{len} bytes is too short for a TFLite flatbuffer"));
    }
    let identifier = r.bytes::<4>(4)?;
    if &identifier != IDENTIFIER {
        return malformed(format!(
            "the file identifier is {:?}, not \"TFL3\": not a TFLite model",
            String::from_utf8_lossy(&identifier)
        ));
    }
    let root = r.follow(0).at(|| "root".into())?;
    let model = r.table(root).at(|| "model".into())?;
    let version = r.u32_field(model, 0, 0)?;
    if version != SCHEMA_VERSION {
        return malformed(format!(
            "schema version {version}; LiteRT reads version {SCHEMA_VERSION}"
        ));
    }
    // Weights in files beside the model (schema fields 9 and Tensor 10): a path the
    // file names is not followed.
    if let Some(v) = r.vector_field(model, 9, 4, MAX_BUFFERS)?
        && v.len > 0
    {
        return malformed(
            "the model keeps its weights in external files; modeld loads self-contained \
             .tflite files only",
        );
    }
    let description = r.string_field(model, 3).at(|| "description".into())?;

    let mut op_codes = 0;
    if let Some(v) = r
        .vector_field(model, 1, 4, MAX_OPERATORS)
        .at(|| "operator codes".into())?
    {
        for i in 0..v.len {
            let code = r.table_in(v, i).at(|| format!("operator code {i}"))?;
            r.string_field(code, 1)
                .at(|| format!("operator code {i}"))?;
        }
        op_codes = v.len;
    }

    let buffers = check_buffers(&r, model)?;
    let subgraph_vec = r
        .vector_field(model, 2, 4, MAX_SUBGRAPHS)
        .at(|| "subgraphs".into())?
        .ok_or(Fault::Malformed("the model has no subgraphs".into()))?;
    let mut subgraphs = Vec::with_capacity(subgraph_vec.len as usize);
    let mut operators = 0u64;
    let mut counted = vec![false; buffers.0.len()];
    let mut constant_elements = 0u64;
    let mut constant_bytes = 0u64;
    for s in 0..subgraph_vec.len {
        let place = || format!("subgraph {s}");
        let table = r.table_in(subgraph_vec, s).at(place)?;
        let tensors = check_tensors(&r, table, &buffers).at(place)?;
        for t in &tensors {
            if let Some(bytes) = t.buffer_bytes
                && t.element_type.holds_weights()
                && !counted[t.buffer as usize]
            {
                counted[t.buffer as usize] = true;
                constant_elements = constant_elements.saturating_add(t.elements);
                constant_bytes = constant_bytes.saturating_add(bytes);
            }
        }
        let count = tensors.len() as u32;
        for (slot, what) in [(1, "inputs"), (2, "outputs")] {
            if let Some(v) = r.vector_field(table, slot, 4, MAX_TENSORS).at(place)? {
                for (i, index) in r.i32s(v)?.into_iter().enumerate() {
                    if index < 0 || index as u32 >= count {
                        return malformed(format!(
                            "subgraph {s}: {what}[{i}] names tensor {index} of {count}"
                        ));
                    }
                }
            }
        }
        operators += check_operators(&r, table, count, op_codes).at(place)?;
        subgraphs.push(tensors);
    }

    let mut signatures = Vec::new();
    if let Some(v) = r
        .vector_field(model, 7, 4, MAX_SIGNATURES)
        .at(|| "signatures".into())?
    {
        for i in 0..v.len {
            let place = || format!("signature {i}");
            let def = r.table_in(v, i).at(place)?;
            let key = r.string_field(def, 2).at(place)?.unwrap_or_default();
            let subgraph = r.u32_field(def, 4, 0)?;
            let Some(tensors) = subgraphs.get(subgraph as usize) else {
                return malformed(format!(
                    "signature {key:?} names subgraph {subgraph} of {}",
                    subgraphs.len()
                ));
            };
            let map = |slot: u64, what: &str| -> Checked<Vec<TensorInfo>> {
                let Some(v) = r.vector_field(def, slot, 4, MAX_TENSORS)? else {
                    return Ok(Vec::new());
                };
                (0..v.len)
                    .map(|j| {
                        let entry = r.table_in(v, j)?;
                        let name = r.string_field(entry, 0)?.unwrap_or_default();
                        let index = r.u32_field(entry, 1, 0)?;
                        let Some(t) = tensors.get(index as usize) else {
                            return malformed(format!(
                                "{what} {name:?} names tensor {index} of {}",
                                tensors.len()
                            ));
                        };
                        Ok(TensorInfo {
                            name,
                            shape: t.shape.clone(),
                            element_type: t.element_type,
                        })
                    })
                    .collect()
            };
            let inputs = map(0, "input").at(|| format!("signature {key:?}"))?;
            let outputs = map(1, "output").at(|| format!("signature {key:?}"))?;
            signatures.push(SignatureInfo {
                key,
                subgraph,
                inputs,
                outputs,
            });
        }
    }
    Ok(TfliteModel {
        description,
        signatures,
        subgraphs: subgraph_vec.len,
        operators,
        constant_elements,
        constant_bytes,
    })
}

fn check_buffers(r: &Reader<'_>, model: Table) -> Checked<Buffers> {
    let Some(v) = r
        .vector_field(model, 4, 4, MAX_BUFFERS)
        .at(|| "buffers".into())?
    else {
        return Ok(Buffers(Vec::new()));
    };
    let mut sizes = Vec::with_capacity(v.len as usize);
    for i in 0..v.len {
        let place = || format!("buffer {i}");
        let buffer = r.table_in(v, i).at(place)?;
        let data = r.vector_field(buffer, 0, 1, u32::MAX).at(place)?;
        let offset = r.u64_field(buffer, 1, 0)?;
        let size = r.u64_field(buffer, 2, 0)?;
        // Models over 2 GB keep data after the flatbuffer: offset and size then
        // locate it in the same file (offset 1 is the format's "no data" marker).
        let bytes = if offset > 1 {
            match offset.checked_add(size) {
                Some(end) if end <= r.len => Some(size),
                _ => {
                    return malformed(format!(
                        "buffer {i}: {size} bytes at offset {offset} lie past the end of the \
                         {}-byte file",
                        r.len
                    ));
                }
            }
        } else {
            data.map(|d| u64::from(d.len))
        };
        sizes.push(bytes.filter(|b| *b > 0));
    }
    Ok(Buffers(sizes))
}

struct Tensor {
    shape: Vec<i32>,
    element_type: ElementType,
    buffer: u32,
    elements: u64,
    /// Bytes of constant data, if the tensor has any.
    buffer_bytes: Option<u64>,
}

fn check_tensors(r: &Reader<'_>, subgraph: Table, buffers: &Buffers) -> Checked<Vec<Tensor>> {
    let Some(v) = r
        .vector_field(subgraph, 0, 4, MAX_TENSORS)
        .at(|| "tensors".into())?
    else {
        return Ok(Vec::new());
    };
    let mut tensors = Vec::with_capacity(v.len as usize);
    for i in 0..v.len {
        let table = r.table_in(v, i).at(|| format!("tensor {i}"))?;
        let name = r.string_field(table, 3).at(|| format!("tensor {i}"))?;
        let place = || format!("tensor {i} ({})", name.as_deref().unwrap_or("unnamed"));
        let shape = match r.vector_field(table, 0, 4, MAX_RANK).at(place)? {
            Some(s) => r.i32s(s)?,
            None => Vec::new(),
        };
        if let Some(d) = shape.iter().find(|d| **d < 0) {
            return malformed(format!("{}: dimension {d} in shape {shape:?}", place()));
        }
        if let Some(s) = r.vector_field(table, 7, 4, MAX_RANK).at(place)? {
            r.i32s(s)?;
        }
        let code = r.u8_field(table, 1, 0)?;
        let Some(element_type) = ElementType::from_schema(code) else {
            return malformed(format!("{}: unknown tensor type {code}", place()));
        };
        let buffer = r.u32_field(table, 2, 0)?;
        let Some(buffer_bytes) = buffers.0.get(buffer as usize).copied() else {
            return malformed(format!(
                "{}: names buffer {buffer} of {}",
                place(),
                buffers.0.len()
            ));
        };
        if let Some(external) = r.field(table, 10, 8)?
            && r.u64(external)? != 0
        {
            return malformed(format!("{}: its data is in an external file", place()));
        }
        let elements = shape
            .iter()
            .try_fold(1u64, |n, d| n.checked_mul(*d as u64))
            .ok_or_else(|| Fault::Malformed(format!("{}: shape {shape:?} overflows", place())))?;
        if let (Some(bytes), Some(bits)) = (buffer_bytes, element_type.bits()) {
            let needed = elements
                .checked_mul(bits)
                .map(|b| b.div_ceil(8))
                .ok_or_else(|| Fault::Malformed(format!("{}: shape overflows", place())))?;
            if bytes != needed {
                return malformed(format!(
                    "{}: buffer {buffer} holds {bytes} bytes; shape {shape:?} of {} needs {needed}",
                    place(),
                    element_type.as_str()
                ));
            }
        }
        if let Some(q) = r.field(table, 4, 4).at(place)? {
            let q = r.table(r.follow(q)?).at(place)?;
            // min, max, scale (float) and zero_point (int64): their bounds only.
            for (slot, size) in [(0, 4), (1, 4), (2, 4), (3, 8)] {
                r.vector_field(q, slot, size, MAX_TENSORS)
                    .at(|| format!("{}: quantization", place()))?;
            }
        }
        tensors.push(Tensor {
            shape,
            element_type,
            buffer,
            elements,
            buffer_bytes,
        });
    }
    Ok(tensors)
}

fn check_operators(r: &Reader<'_>, subgraph: Table, tensors: u32, op_codes: u32) -> Checked<u64> {
    let Some(v) = r
        .vector_field(subgraph, 3, 4, MAX_OPERATORS)
        .at(|| "operators".into())?
    else {
        return Ok(0);
    };
    for i in 0..v.len {
        let place = || format!("operator {i}");
        let op = r.table_in(v, i).at(place)?;
        let code = r.u32_field(op, 0, 0)?;
        if code >= op_codes {
            return malformed(format!(
                "operator {i}: names operator code {code} of {op_codes}"
            ));
        }
        for (slot, what) in [(1, "inputs"), (2, "outputs"), (8, "intermediates")] {
            if let Some(list) = r.vector_field(op, slot, 4, MAX_TENSORS).at(place)? {
                for index in r.i32s(list)? {
                    // -1 marks an optional input left out.
                    if index < -1 || index >= tensors as i32 {
                        return malformed(format!(
                            "operator {i}: {what} name tensor {index} of {tensors}"
                        ));
                    }
                }
            }
        }
        if let Some(options) = r.field(op, 4, 4).at(place)? {
            r.table(r.follow(options)?).at(place)?;
        }
        r.vector_field(op, 5, 1, u32::MAX).at(place)?;
    }
    Ok(u64::from(v.len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_foreign_files_are_refused() {
        assert!(check_bytes(b"").unwrap_err().contains("too short"));
        let mut onnx = vec![0u8; 64];
        onnx[4..8].copy_from_slice(b"ONNX");
        assert!(
            check_bytes(&onnx)
                .unwrap_err()
                .contains("not a TFLite model")
        );
    }

    #[test]
    fn offsets_past_the_end_are_refused_without_reading_them() {
        let mut file = vec![0u8; 16];
        file[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        file[4..8].copy_from_slice(IDENTIFIER);
        let err = check_bytes(&file).unwrap_err();
        assert!(err.contains("past the end"), "{err}");
    }

    #[test]
    fn every_element_type_has_a_name_and_known_size_rules() {
        for code in 0..=22u8 {
            let t = ElementType::from_schema(code).unwrap();
            assert!(!t.as_str().is_empty());
        }
        assert_eq!(ElementType::from_schema(23), None);
        assert_eq!(ElementType::Int4.bits(), Some(4));
        assert_eq!(ElementType::String.bits(), None);
    }
}
