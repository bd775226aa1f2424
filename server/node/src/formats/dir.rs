//! Recognizing directory models: Hugging Face style (config.json + safetensors, which
//! MLX shares), MLC-LLM (mlc-chat-config.json), Core ML packages (Manifest.json),
//! ONNX decoder exports (genai_config.json) and TFLite decoders with their tokenizer.

use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use modeld_engine_core::{ModelFormat, litertlm, safetensors, tflite};
use serde_json::Value;

use super::{Metadata, Sniffed, onnx, sniff_file, tflite_metadata};

/// Files of a directory model we are willing to list.
pub const MAX_FILES: usize = 10_000;
const MAX_DEPTH: usize = 8;
/// JSON side files (configs, manifests) larger than this are not parsed.
const MAX_JSON: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq)]
pub struct DirModel {
    pub format: ModelFormat,
    pub metadata: Metadata,
    /// Every regular file, relative to the directory, sorted.
    pub files: Vec<PathBuf>,
    /// Relative path of a tokenizer.json, when there is one.
    pub tokenizer_json: Option<PathBuf>,
}

/// Why a directory that looks like a model cannot be registered.
pub type DirError = String;

/// Returns the model the directory holds, `Ok(None)` when it is not a model directory.
pub fn sniff_dir(dir: &Path) -> Result<Option<DirModel>, DirError> {
    let has = |name: &str| dir.join(name).is_file();
    let (format, metadata) = if has("mlc-chat-config.json") {
        (
            ModelFormat::Mlc,
            mlc_metadata(&dir.join("mlc-chat-config.json"))?,
        )
    } else if has("genai_config.json") {
        (ModelFormat::Onnx, genai_metadata(dir)?)
    } else if has("Manifest.json") && dir.join("Data").is_dir() {
        (ModelFormat::CoreMl, coreml_package_metadata(dir)?)
    } else if let Some(graph) = lone_tflite(dir)?
        && has("tokenizer.json")
    {
        (ModelFormat::Tflite, tflite_dir_metadata(dir, &graph)?)
    } else if has("config.json") {
        match hf_metadata(dir)? {
            Some(found) => found,
            None => return Ok(None),
        }
    } else {
        return Ok(None);
    };
    let files = list_files(dir)?;
    let tokenizer_json = files
        .iter()
        .find(|p| p.as_os_str() == "tokenizer.json")
        .cloned();
    Ok(Some(DirModel {
        format,
        metadata,
        files,
        tokenizer_json,
    }))
}

fn read_json(path: &Path) -> Result<Value, DirError> {
    let len = fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if len > MAX_JSON {
        return Err(format!(
            "{} is {len} bytes; the limit is {MAX_JSON}",
            path.display()
        ));
    }
    let file = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_reader(BufReader::new(file))
        .map_err(|e| format!("{} is not valid JSON: {e}", path.display()))
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn u32_of(v: &Value, key: &str) -> u32 {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

fn mlc_metadata(config: &Path) -> Result<Metadata, DirError> {
    let v = read_json(config)?;
    Ok(Metadata {
        architecture: str_of(&v, "model_type").to_owned(),
        quantization: str_of(&v, "quantization").to_owned(),
        context_length: u32_of(&v, "context_window_size"),
        ..Metadata::default()
    })
}

/// An ONNX decoder export (onnxruntime-genai layout): genai_config.json names the
/// graph; its weights may sit in external-data files beside it, so the directory is
/// the model.
fn genai_metadata(dir: &Path) -> Result<Metadata, DirError> {
    let config = read_json(&dir.join("genai_config.json"))?;
    let model = config.get("model").cloned().unwrap_or_default();
    let decoder = model.get("decoder").cloned().unwrap_or_default();
    let file = str_of(&decoder, "filename");
    let rel = Path::new(file);
    if file.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "genai_config.json decoder.filename {file:?} is not a file inside the directory"
        ));
    }
    let graph = dir.join(rel);
    let handle = File::open(&graph).map_err(|e| format!("{}: {e}", graph.display()))?;
    let size = handle.metadata().map_err(|e| e.to_string())?.len();
    let Some(onnx::ProtoModel::Onnx { io, .. }) = onnx::sniff(&mut BufReader::new(handle), size)
    else {
        return Err(format!("{} is not an ONNX model", graph.display()));
    };
    let chat_template = read_json(&dir.join("tokenizer_config.json"))
        .ok()
        .map(|t| str_of(&t, "chat_template").to_owned())
        .unwrap_or_default();
    Ok(Metadata {
        architecture: str_of(&model, "type").to_owned(),
        context_length: u32_of(&model, "context_length"),
        chat_template,
        inputs: io.inputs,
        outputs: io.outputs,
        ..Metadata::default()
    })
}

/// The directory's one `.tflite` file, if it has exactly one at its top, else its one
/// `.litertlm` bundle.
fn lone_tflite(dir: &Path) -> Result<Option<PathBuf>, DirError> {
    for ext in ["tflite", "litertlm"] {
        let mut found =
            tflite::files_in(dir, ext).map_err(|e| format!("{}: {e}", dir.display()))?;
        if !found.is_empty() {
            return Ok(if found.len() == 1 { found.pop() } else { None });
        }
    }
    Ok(None)
}

/// A TFLite decoder with its tokenizer (and Hugging Face config) beside it: the
/// directory is the model, so the engine reads all of it. The context is what the
/// graph's cache holds (`kv_cache_k_0`'s second dimension), else the config's.
fn tflite_dir_metadata(dir: &Path, graph: &Path) -> Result<Metadata, DirError> {
    let model = if litertlm::is_bundle(graph) {
        litertlm::check(graph)
            .map(|b| b.model)
            .map_err(|e| e.to_string())?
    } else {
        tflite::check_file(graph)
            .map_err(|reason| format!("malformed tflite file {}: {reason}", graph.display()))?
    };
    let metadata = tflite_metadata(&model);
    let cache_slots = model
        .signature("decode")
        .and_then(|s| s.input("kv_cache_k_0"))
        .and_then(|t| t.shape.get(1))
        .and_then(|d| u32::try_from(*d).ok());
    let config = read_json(&dir.join("config.json")).unwrap_or_default();
    let chat_template = read_json(&dir.join("tokenizer_config.json"))
        .ok()
        .map(|t| str_of(&t, "chat_template").to_owned())
        .unwrap_or_default();
    Ok(Metadata {
        architecture: str_of(&config, "model_type").to_owned(),
        context_length: cache_slots.unwrap_or_else(|| u32_of(&config, "max_position_embeddings")),
        chat_template,
        ..metadata
    })
}

fn coreml_package_metadata(dir: &Path) -> Result<Metadata, DirError> {
    let manifest = read_json(&dir.join("Manifest.json"))?;
    let root = str_of(&manifest, "rootModelIdentifier");
    let item = manifest
        .get("itemInfoEntries")
        .and_then(|e| e.get(root))
        .ok_or_else(|| "Manifest.json names no root model item".to_owned())?;
    let rel = str_of(item, "path");
    let rel_path = Path::new(rel);
    if rel.is_empty()
        || rel_path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "Manifest.json root item path {rel:?} is not inside the package"
        ));
    }
    let spec = dir.join("Data").join(rel_path);
    let file = File::open(&spec).map_err(|e| format!("{}: {e}", spec.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    match onnx::sniff(&mut BufReader::new(file), size) {
        Some(onnx::ProtoModel::CoreMl { io, .. }) => Ok(Metadata {
            inputs: io.inputs,
            outputs: io.outputs,
            ..Metadata::default()
        }),
        _ => Err(format!(
            "{} is not a Core ML model specification",
            spec.display()
        )),
    }
}

/// config.json + safetensors weights. MLX models share the layout and are told apart
/// by a `quantization` block in config.json or `format: mlx` in the weights' metadata.
fn hf_metadata(dir: &Path) -> Result<Option<(ModelFormat, Metadata)>, DirError> {
    let mut weights = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        if path.is_file()
            && let Ok(Sniffed::Model { format, metadata }) = sniff_file(&path)
            && matches!(format, ModelFormat::Safetensors | ModelFormat::Mlx)
        {
            weights.push((format, metadata, path));
        }
    }
    if weights.is_empty() {
        return Ok(None);
    }
    let config = read_json(&dir.join("config.json"))?;
    let architecture = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| str_of(&config, "model_type"))
        .to_owned();
    let mlx_quant = config
        .get("quantization")
        .and_then(|q| q.get("bits"))
        .and_then(Value::as_u64);
    let is_mlx = mlx_quant.is_some() || weights.iter().any(|(f, _, _)| *f == ModelFormat::Mlx);
    let quantization = match mlx_quant {
        Some(bits) => format!("Q{bits}"),
        None => {
            let dtype = str_of(&config, "torch_dtype");
            match dtype {
                "float16" => "F16".to_owned(),
                "bfloat16" => "BF16".to_owned(),
                "float32" => "F32".to_owned(),
                _ => weights[0].1.quantization.clone(),
            }
        }
    };
    let chat_template = read_json(&dir.join("tokenizer_config.json"))
        .ok()
        .map(|t| str_of(&t, "chat_template").to_owned())
        .unwrap_or_default();
    let metadata = Metadata {
        name: str_of(&config, "_name_or_path").to_owned(),
        architecture,
        parameter_count: match mlx_quant {
            Some(bits) => mlx_parameters(&weights, bits),
            None => weights.iter().map(|(_, m, _)| m.parameter_count).sum(),
        },
        quantization,
        context_length: u32_of(&config, "max_position_embeddings"),
        chat_template,
        inputs: Vec::new(),
        outputs: Vec::new(),
    };
    let format = if is_mlx {
        ModelFormat::Mlx
    } else {
        ModelFormat::Safetensors
    };
    Ok(Some((format, metadata)))
}

/// The weights of an MLX model: its float tensors, and `32 / bits` weights in each
/// packed word (layers quantized to other widths than the default are counted at it).
fn mlx_parameters(weights: &[(ModelFormat, Metadata, PathBuf)], bits: u64) -> u64 {
    let per_word = if (1..=32).contains(&bits) {
        32 / bits
    } else {
        1
    };
    weights
        .iter()
        .map(|(_, metadata, path)| {
            let packed = File::open(path)
                .and_then(|f| Ok((f.metadata()?.len(), f)))
                .ok()
                .and_then(|(size, f)| safetensors::read_header(BufReader::new(f), size).ok())
                .map_or(0, |h| h.packed_words);
            metadata
                .parameter_count
                .saturating_add(packed.saturating_mul(per_word))
        })
        .sum()
}

/// Regular files under `dir`, relative, skipping hidden entries and symlinks.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>, DirError> {
    let mut out = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = stack.pop() {
        let entries = fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| e.to_string())?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let ty = entry.file_type().map_err(|e| e.to_string())?;
            let path = entry.path();
            if ty.is_dir() && depth < MAX_DEPTH {
                stack.push((path, depth + 1));
            } else if ty.is_file() {
                if out.len() >= MAX_FILES {
                    return Err(format!("more than {MAX_FILES} files"));
                }
                if let Ok(rel) = path.strip_prefix(dir) {
                    out.push(rel.to_path_buf());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}
