//! ONNX files may keep tensors in side files ("external data"), named by a path in the
//! model. ONNX Runtime opens whatever path it is given, so every location is checked
//! here, before a session exists: relative, inside the model's directory (after
//! symlinks), present, and large enough for the bytes the tensor claims.

use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Component, Path, PathBuf};

use modeld_engine_core::EngineError;
use modeld_engine_core::protobuf::{self, WireValue};

/// Nested graphs (If/Loop bodies inside functions...) deeper than this are refused.
const MAX_DEPTH: usize = 32;
/// An external-data entry's key or value longer than this is not one we trust.
const MAX_ENTRY: u64 = 4096;

/// A tensor's external data, as the model names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    pub location: String,
    pub offset: u64,
    pub length: Option<u64>,
}

/// Checks every external-data reference of the ONNX model at `model` and returns the
/// distinct files they use (absolute), with their sizes.
pub fn check(model: &Path) -> Result<Vec<(PathBuf, u64)>, EngineError> {
    let invalid = |m: String| EngineError::InvalidModel(format!("{}: {m}", model.display()));
    let file = File::open(model).map_err(|e| invalid(e.to_string()))?;
    let size = file.metadata().map_err(|e| invalid(e.to_string()))?.len();
    let mut r = BufReader::new(file);
    let mut refs = Vec::new();
    let top = protobuf::fields(&mut r, 0, size).map_err(|e| invalid(e.to_string()))?;
    for f in top {
        match (f.number, f.value) {
            // ModelProto.graph
            (7, WireValue::Len { start, len }) => {
                graph(&mut r, start, len, 0, &mut refs).map_err(invalid)?;
            }
            // ModelProto.functions: FunctionProto.node = 7
            (25, WireValue::Len { start, len }) => {
                for n in sub(&mut r, start, len, 7).map_err(invalid)? {
                    node(&mut r, n.0, n.1, 0, &mut refs).map_err(invalid)?;
                }
            }
            _ => {}
        }
    }
    let dir = model.parent().unwrap_or(Path::new("."));
    let root = dir
        .canonicalize()
        .map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
    let mut files: Vec<(PathBuf, u64)> = Vec::new();
    for x in refs {
        let path = resolve(&root, &x.location).map_err(invalid)?;
        let len = std::fs::metadata(&path)
            .map_err(|e| invalid(format!("external data {:?}: {e}", x.location)))?
            .len();
        let end = x.offset.checked_add(x.length.unwrap_or(0));
        if end.is_none_or(|end| end > len) {
            return Err(invalid(format!(
                "external data {:?} claims bytes {}..+{} of a {len}-byte file",
                x.location,
                x.offset,
                x.length.unwrap_or(0)
            )));
        }
        if !files.iter().any(|(p, _)| *p == path) {
            files.push((path, len));
        }
    }
    Ok(files)
}

/// `location` inside `root`: relative, no `..`, and still inside once symlinks are
/// followed.
fn resolve(root: &Path, location: &str) -> Result<PathBuf, String> {
    let rel = Path::new(location);
    if location.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!(
            "external data location {location:?} leaves the model's directory; only paths inside it are allowed"
        ));
    }
    let path = root.join(rel);
    let real = path
        .canonicalize()
        .map_err(|e| format!("external data {location:?}: {e}"))?;
    if !real.starts_with(root) {
        return Err(format!(
            "external data location {location:?} resolves outside the model's directory (to {})",
            real.display()
        ));
    }
    Ok(real)
}

type Span = (u64, u64);

/// The payload spans of the length-delimited fields `number` among `fields`.
fn spans(fields: &[protobuf::Field], number: u32) -> Vec<Span> {
    fields
        .iter()
        .filter(|f| f.number == number)
        .filter_map(|f| match f.value {
            WireValue::Len { start, len } => Some((start, len)),
            _ => None,
        })
        .collect()
}

/// The payload spans of the length-delimited fields `number` of the message at
/// `[start, start+len)`.
fn sub<R: Read + Seek>(r: &mut R, start: u64, len: u64, number: u32) -> Result<Vec<Span>, String> {
    let fields = protobuf::fields(r, start, start + len).map_err(|e| e.to_string())?;
    Ok(spans(&fields, number))
}

fn graph<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    depth: usize,
    out: &mut Vec<ExternalRef>,
) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("graphs nested deeper than {MAX_DEPTH}"));
    }
    let fields = protobuf::fields(r, start, start + len).map_err(|e| e.to_string())?;
    for f in fields {
        let WireValue::Len { start, len } = f.value else {
            continue;
        };
        match f.number {
            // GraphProto.node
            1 => node(r, start, len, depth, out)?,
            // GraphProto.initializer
            5 => tensor(r, start, len, out)?,
            // GraphProto.sparse_initializer: values = 1, indices = 2
            15 => {
                for (s, l) in sub(r, start, len, 1)?
                    .into_iter()
                    .chain(sub(r, start, len, 2)?)
                {
                    tensor(r, s, l, out)?;
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// NodeProto.attribute (5): AttributeProto t = 5, g = 6, tensors = 10, graphs = 11.
fn node<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    depth: usize,
    out: &mut Vec<ExternalRef>,
) -> Result<(), String> {
    for (s, l) in sub(r, start, len, 5)? {
        for f in protobuf::fields(r, s, s + l).map_err(|e| e.to_string())? {
            let WireValue::Len { start, len } = f.value else {
                continue;
            };
            match f.number {
                5 | 10 => tensor(r, start, len, out)?,
                6 | 11 => graph(r, start, len, depth + 1, out)?,
                _ => {}
            }
        }
    }
    Ok(())
}

/// TensorProto: external_data = 13 (StringStringEntryProto key = 1, value = 2),
/// data_location = 14 (1 = EXTERNAL).
fn tensor<R: Read + Seek>(
    r: &mut R,
    start: u64,
    len: u64,
    out: &mut Vec<ExternalRef>,
) -> Result<(), String> {
    let fields = protobuf::fields(r, start, start + len).map_err(|e| e.to_string())?;
    let external = fields
        .iter()
        .any(|f| f.number == 14 && f.value == WireValue::Varint(1));
    let entries = spans(&fields, 13);
    if !external && entries.is_empty() {
        return Ok(());
    }
    let mut x = ExternalRef {
        location: String::new(),
        offset: 0,
        length: None,
    };
    for (s, l) in entries {
        let msg = protobuf::read_payload(r, s, l, MAX_ENTRY).map_err(|e| e.to_string())?;
        let key = protobuf::string_field(&msg, 1).unwrap_or_default();
        let value = protobuf::string_field(&msg, 2).unwrap_or_default();
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("external data {key} {value:?} is not a number"))
        };
        match key.as_str() {
            "location" => x.location = value.clone(),
            "offset" => x.offset = number()?,
            "length" => x.length = Some(number()?),
            _ => {}
        }
    }
    if x.location.is_empty() {
        return Err("a tensor stored as external data names no location".into());
    }
    out.push(x);
    Ok(())
}
