//! MLX models: the Hugging Face layout with MLX's affine quantization, as mlx-lm
//! writes it. A quantized projection `X` is three tensors: `X.weight`, packed
//! `uint32` words holding `bits`-bit integers as a little-endian bit stream along
//! each row, and `X.scales` and `X.biases`, one per group of `group_size` inputs, so
//! that a weight is `scale * q + bias`. `bits`, `group_size` and per-layer exceptions
//! come from the `quantization` block of config.json.
//!
//! MLX itself runs on Apple silicon (and Linux CPUs through its Python wheel); here
//! candle runs the same weights on any platform. A 4-bit projection whose scales and
//! biases are exact in f16 (f16 or bf16 scales; mlx-lm's usual output) becomes
//! ggml's Q4_1, the same affine form in blocks of 32, without any rounding, and is
//! multiplied quantized by candle's kernels. Any other width is dequantized to F32 at
//! load, and the memory estimate says so.
//!
//! The converted tensors reach candle's quantized llama through a GGUF description
//! held in memory, whose bytes are produced one tensor at a time as candle reads
//! them: loading holds the packed file mapped and at most one converted tensor
//! beyond the model itself.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, k_quants};
use candle_core::safetensors::MmapedSafetensors;
use candle_transformers::models::quantized_llama::ModelWeights;
use half::{bf16, f16};
use modeld_engine_core::{EngineError, ModelProbe};
use serde_json::Value as Json;

use crate::interop::candle_error;
use crate::quantized_forward::QuantizedForward;
use crate::safetensors_dir::{Layout, invalid, read_layout};

/// The widths MLX's affine quantization packs.
const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];
/// ggml's Q4_1 block: 32 weights, an f16 scale and an f16 minimum.
const Q4_1_BLOCK: u64 = 32;
const Q4_1_BYTES: u64 = 20;

/// MLX's affine quantization of one projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Affine {
    bits: u32,
    group_size: u64,
}

/// Where one of candle's tensors comes from, and how it is converted.
#[derive(Debug, Clone)]
enum Source {
    /// A float tensor (F32, F16 or BF16), widened to F32.
    Float { name: String, dtype: String },
    /// An MLX-quantized projection, to Q4_1 when `exact_q4_1`, else to F32.
    Quantized {
        module: String,
        affine: Affine,
        scale_dtype: String,
        bias_dtype: String,
        q4_1: bool,
    },
}

/// One tensor of the GGUF description: its name there, its logical shape (`[out,
/// in]` or `[n]`), its source and, for the query and key projections, the number of
/// heads whose rows are interleaved the way llama.cpp's rotary embedding expects.
#[derive(Debug, Clone)]
struct Planned {
    gguf_name: String,
    shape: Vec<u64>,
    source: Source,
    rope_heads: Option<u64>,
}

impl Planned {
    fn dtype(&self) -> GgmlDType {
        match &self.source {
            Source::Quantized { q4_1: true, .. } => GgmlDType::Q4_1,
            _ => GgmlDType::F32,
        }
    }

    fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    fn bytes(&self) -> u64 {
        match self.dtype() {
            GgmlDType::Q4_1 => self.elements() / Q4_1_BLOCK * Q4_1_BYTES,
            _ => self.elements() * 4,
        }
    }
}

/// A checked MLX directory: what candle will be given, tensor by tensor.
#[derive(Debug, Clone)]
pub struct Checked {
    pub probe: ModelProbe,
    shards: Vec<PathBuf>,
    plan: Vec<Planned>,
    metadata: Vec<(String, MetaValue)>,
}

#[derive(Debug, Clone)]
enum MetaValue {
    U32(u32),
    F32(f32),
    Str(&'static str),
}

/// Whether `dir` holds an MLX-quantized model (a `quantization` block in config.json).
pub fn is_mlx(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    serde_json::from_str::<Json>(&text)
        .ok()
        .and_then(|v| v.get("quantization").cloned())
        .is_some_and(|q| !q.is_null())
}

fn affine_of(config: &Path, what: &str, v: &Json) -> Result<Affine, EngineError> {
    let field = |key: &str| {
        v.get(key).and_then(Json::as_u64).ok_or_else(|| {
            invalid(
                config,
                format!("quantization of {what}: {key} must be a whole number"),
            )
        })
    };
    let bits = field("bits")?;
    let group_size = field("group_size")?;
    let bits = u32::try_from(bits)
        .ok()
        .filter(|b| BITS.contains(b))
        .ok_or_else(|| {
            invalid(
                config,
                format!("quantization of {what}: {bits} bits; MLX packs {BITS:?}"),
            )
        })?;
    if group_size == 0 || group_size > 1 << 16 {
        return Err(invalid(
            config,
            format!("quantization of {what}: group_size {group_size} is outside 1..=65536"),
        ));
    }
    Ok(Affine { bits, group_size })
}

/// The default quantization and the per-module exceptions (`false` keeps a module
/// in floats).
fn quantization(
    config: &Path,
    block: &Json,
) -> Result<(Affine, BTreeMap<String, Option<Affine>>), EngineError> {
    let object = block
        .as_object()
        .ok_or_else(|| invalid(config, "quantization must be an object"))?;
    if let Some(mode) = object.get("mode").and_then(Json::as_str)
        && mode != "affine"
    {
        return Err(invalid(
            config,
            format!("quantization mode {mode:?}; modeld runs MLX's affine quantization only"),
        ));
    }
    let default = affine_of(config, "the model", block)?;
    let mut exceptions = BTreeMap::new();
    for (key, v) in object {
        match v {
            Json::Object(_) => {
                exceptions.insert(key.clone(), Some(affine_of(config, key, v)?));
            }
            Json::Bool(false) => {
                exceptions.insert(key.clone(), None);
            }
            _ => {}
        }
    }
    Ok((default, exceptions))
}

/// The GGUF name of a Hugging Face llama tensor, and whether its rows are the heads
/// of a rotary projection (query or key).
fn gguf_name(name: &str) -> Option<(String, bool)> {
    let fixed = match name {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((f.to_owned(), false));
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let (ggml, rope) = match part {
        "input_layernorm.weight" => ("attn_norm", false),
        "post_attention_layernorm.weight" => ("ffn_norm", false),
        "self_attn.q_proj.weight" => ("attn_q", true),
        "self_attn.k_proj.weight" => ("attn_k", true),
        "self_attn.v_proj.weight" => ("attn_v", false),
        "self_attn.o_proj.weight" => ("attn_output", false),
        "mlp.gate_proj.weight" => ("ffn_gate", false),
        "mlp.up_proj.weight" => ("ffn_up", false),
        "mlp.down_proj.weight" => ("ffn_down", false),
        _ => return None,
    };
    Some((format!("blk.{layer}.{ggml}.weight"), rope))
}

pub fn check(dir: &Path) -> Result<Checked, EngineError> {
    let layout = read_layout(dir)?;
    let config = layout.config_path.clone();
    let Some(block) = layout.raw.quantization.clone() else {
        return Err(invalid(&config, "no quantization block: not an MLX model"));
    };
    let (default, exceptions) = quantization(&config, &block)?;
    let mut plan = Vec::new();
    for (name, shape) in layout.expected_tensors() {
        let Some((gguf, rope)) = gguf_name(&name) else {
            return Err(invalid(dir, format!("no GGUF name for {name}")));
        };
        let rope_heads = rope.then(|| {
            if name.contains("q_proj") {
                layout.raw.num_attention_heads
            } else {
                layout.kv_heads
            }
        });
        let module = name.trim_end_matches(".weight").to_owned();
        let scales = format!("{module}.scales");
        let source = if layout.tensors.contains_key(&scales) {
            let affine = match exceptions.get(&module) {
                Some(Some(a)) => *a,
                Some(None) => {
                    return Err(invalid(
                        &config,
                        format!("{module} is listed as not quantized but has {scales}"),
                    ));
                }
                None => default,
            };
            check_quantized(dir, &layout, &module, &shape, affine)?
        } else {
            let t = layout.float_tensor(
                dir,
                &name,
                &shape,
                &format!("without {scales} it is neither floats nor MLX-quantized"),
            )?;
            Source::Float {
                name,
                dtype: t.dtype.clone(),
            }
        };
        plan.push(Planned {
            gguf_name: gguf,
            shape,
            source,
            rope_heads,
        });
    }

    let parameters: u64 = plan.iter().map(Planned::elements).sum();
    let raw = &layout.raw;
    // candle keeps the token embeddings twice: as converted (the tied output
    // projection) and widened to F32 for the lookup.
    let embedding_f32 = raw.vocab_size * raw.hidden_size * 4;
    let weights_bytes = plan.iter().map(Planned::bytes).sum::<u64>() + embedding_f32;
    let quantization = format!(
        "Q{}{}",
        default.bits,
        if plan.iter().any(|p| p.dtype() == GgmlDType::Q4_1) {
            ""
        } else {
            " (dequantized to F32)"
        }
    );
    let metadata = vec![
        ("general.architecture".to_owned(), MetaValue::Str("llama")),
        (
            "llama.attention.head_count".to_owned(),
            MetaValue::U32(u32::try_from(raw.num_attention_heads).unwrap_or(u32::MAX)),
        ),
        (
            "llama.attention.head_count_kv".to_owned(),
            MetaValue::U32(u32::try_from(layout.kv_heads).unwrap_or(u32::MAX)),
        ),
        (
            "llama.block_count".to_owned(),
            MetaValue::U32(u32::try_from(raw.num_hidden_layers).unwrap_or(u32::MAX)),
        ),
        (
            "llama.embedding_length".to_owned(),
            MetaValue::U32(u32::try_from(raw.hidden_size).unwrap_or(u32::MAX)),
        ),
        (
            "llama.rope.dimension_count".to_owned(),
            MetaValue::U32(u32::try_from(layout.head_dim).unwrap_or(u32::MAX)),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".to_owned(),
            MetaValue::F32(raw.rms_norm_eps.unwrap_or(1e-5) as f32),
        ),
        (
            "llama.rope.freq_base".to_owned(),
            MetaValue::F32(raw.rope_theta.unwrap_or(10_000.0) as f32),
        ),
    ];
    Ok(Checked {
        probe: layout.probe(parameters, weights_bytes, Some(quantization)),
        shards: layout.shards,
        plan,
        metadata,
    })
}

fn check_quantized(
    dir: &Path,
    layout: &Layout,
    module: &str,
    shape: &[u64],
    affine: Affine,
) -> Result<Source, EngineError> {
    let &[out, inputs] = shape else {
        return Err(invalid(
            dir,
            format!("{module} is quantized but is not a projection"),
        ));
    };
    let Affine { bits, group_size } = affine;
    if !inputs.is_multiple_of(group_size) || !(inputs * u64::from(bits)).is_multiple_of(32) {
        return Err(invalid(
            dir,
            format!(
                "{module}: {inputs} inputs do not divide into groups of {group_size} and whole 32-bit words of {bits}-bit values"
            ),
        ));
    }
    let want = [
        (
            format!("{module}.weight"),
            vec![out, inputs * u64::from(bits) / 32],
        ),
        (format!("{module}.scales"), vec![out, inputs / group_size]),
        (format!("{module}.biases"), vec![out, inputs / group_size]),
    ];
    let mut dtypes = Vec::new();
    for (i, (name, want_shape)) in want.iter().enumerate() {
        let t = layout.tensor(dir, name)?;
        if &t.shape != want_shape {
            return Err(invalid(
                dir,
                format!(
                    "tensor {name} has shape {:?}; {bits}-bit groups of {group_size} over [{out}, {inputs}] imply {want_shape:?}",
                    t.shape
                ),
            ));
        }
        let ok = if i == 0 {
            t.dtype == "U32"
        } else {
            matches!(t.dtype.as_str(), "F32" | "F16" | "BF16")
        };
        if !ok {
            return Err(invalid(
                dir,
                format!(
                    "tensor {name} is {}; MLX packs weights in U32 with F32, F16 or BF16 scales and biases",
                    t.dtype
                ),
            ));
        }
        dtypes.push(t.dtype.clone());
    }
    let half = |d: &str| matches!(d, "F16" | "BF16");
    Ok(Source::Quantized {
        module: module.to_owned(),
        affine,
        q4_1: bits == 4
            && group_size.is_multiple_of(Q4_1_BLOCK)
            && half(&dtypes[1])
            && half(&dtypes[2]),
        scale_dtype: dtypes[1].clone(),
        bias_dtype: dtypes[2].clone(),
    })
}

impl Checked {
    /// The same model with every projection dequantized to F32: MLX's arithmetic
    /// without the 8-bit activations of a quantized kernel, at four bytes a weight.
    pub fn dequantized(mut self) -> Checked {
        let before: u64 = self.plan.iter().map(Planned::bytes).sum();
        for p in &mut self.plan {
            if let Source::Quantized { q4_1, .. } = &mut p.source {
                *q4_1 = false;
            }
        }
        let after: u64 = self.plan.iter().map(Planned::bytes).sum();
        self.probe.weights_bytes += after - before;
        self
    }
}

/// Loads the checked model into candle's quantized llama.
#[allow(unsafe_code)]
pub fn load(checked: &Checked, pool: rayon::ThreadPool) -> Result<QuantizedForward, EngineError> {
    // SAFETY: as for every safetensors model (see safetensors_dir::map_weights): the
    // files are the store's immutable blobs, and their headers were checked.
    let files = unsafe { MmapedSafetensors::multi(&checked.shards) }
        .map_err(|e| candle_error("weights", e))?;
    let plan = exact_in_f16(&files, &checked.plan)?;
    let mut offsets = Vec::with_capacity(plan.len());
    let mut tensor_infos = HashMap::new();
    let mut offset = 0u64;
    for p in &plan {
        offsets.push(offset);
        let dims: Vec<usize> = p.shape.iter().map(|&d| d as usize).collect();
        tensor_infos.insert(
            p.gguf_name.clone(),
            TensorInfo {
                ggml_dtype: p.dtype(),
                shape: dims.into(),
                offset,
            },
        );
        offset += p.bytes();
    }
    let metadata = checked
        .metadata
        .iter()
        .map(|(k, v)| {
            let v = match v {
                MetaValue::U32(n) => Value::U32(*n),
                MetaValue::F32(x) => Value::F32(*x),
                MetaValue::Str(s) => Value::String((*s).to_owned()),
            };
            (k.clone(), v)
        })
        .collect();
    let content = Content {
        magic: VersionedMagic::GgufV3,
        metadata,
        tensor_infos,
        tensor_data_offset: 0,
    };
    let mut reader = Converting {
        files: &files,
        plan: &plan,
        offsets,
        total: offset,
        position: 0,
        current: None,
    };
    let model = pool
        .install(|| ModelWeights::from_gguf(content, &mut reader, &Device::Cpu))
        .map_err(|e| candle_error("load", e))?;
    Ok(QuantizedForward::new(model, pool))
}

/// The plan with Q4_1 kept only where every scale and bias is exact in f16: bf16
/// values beyond f16's range (or too small for it) are dequantized to F32 instead of
/// being rounded.
fn exact_in_f16(files: &MmapedSafetensors, plan: &[Planned]) -> Result<Vec<Planned>, EngineError> {
    let mut plan = plan.to_vec();
    for p in &mut plan {
        if let Source::Quantized {
            module,
            scale_dtype,
            bias_dtype,
            q4_1,
            ..
        } = &mut p.source
            && *q4_1
        {
            let exact = |suffix: &str, dtype: &str| -> Result<bool, EngineError> {
                let values = floats(raw(files, &format!("{module}.{suffix}"))?, dtype);
                Ok(values.iter().all(|&x| f16::from_f32(x).to_f32() == x))
            };
            if !(exact("scales", scale_dtype)? && exact("biases", bias_dtype)?) {
                tracing::warn!(
                    module = %module,
                    "scales or biases are not exact in f16; dequantizing this projection to F32"
                );
                *q4_1 = false;
            }
        }
    }
    Ok(plan)
}

/// The GGUF data section of the converted model, produced tensor by tensor as it
/// is read.
struct Converting<'a> {
    files: &'a MmapedSafetensors,
    plan: &'a [Planned],
    offsets: Vec<u64>,
    total: u64,
    position: u64,
    current: Option<(usize, Vec<u8>)>,
}

impl Read for Converting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.position >= self.total || buf.is_empty() {
            return Ok(0);
        }
        let index = self
            .offsets
            .partition_point(|&o| o <= self.position)
            .saturating_sub(1);
        if self.current.as_ref().map(|(i, _)| *i) != Some(index) {
            self.current = None;
            let bytes = convert(self.files, &self.plan[index])
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.current = Some((index, bytes));
        }
        let Some((_, bytes)) = &self.current else {
            return Ok(0);
        };
        let start = (self.position - self.offsets[index]) as usize;
        let n = buf.len().min(bytes.len().saturating_sub(start));
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        self.position += n as u64;
        Ok(n)
    }
}

impl Seek for Converting<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.total.checked_add_signed(d),
            SeekFrom::Current(d) => self.position.checked_add_signed(d),
        };
        self.position = target.ok_or_else(|| std::io::Error::other("seek before the start"))?;
        Ok(self.position)
    }
}

fn raw<'a>(files: &'a MmapedSafetensors, name: &str) -> Result<&'a [u8], EngineError> {
    files
        .get(name)
        .map(|view| view.data())
        .map_err(|e| candle_error(name, e))
}

/// Little-endian floats of `dtype` as f32.
fn floats(bytes: &[u8], dtype: &str) -> Vec<f32> {
    match dtype {
        "F32" => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        "F16" => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    }
}

/// The `index`-th `bits`-bit value of a row packed as a little-endian bit stream.
fn unpack(row: &[u8], bits: u32, index: usize) -> u32 {
    let bit = index * bits as usize;
    let (byte, shift) = (bit / 8, bit % 8);
    // A value of at most 8 bits spans at most two bytes.
    let lo = u32::from(row[byte]);
    let hi = row.get(byte + 1).copied().map_or(0, u32::from);
    ((lo | hi << 8) >> shift) & ((1 << bits) - 1)
}

/// The source row of destination row `row`: llama.cpp's rotary embedding pairs
/// neighbouring rows of a head where Hugging Face pairs its two halves.
fn source_row(row: usize, rope_heads: Option<u64>, rows: usize) -> usize {
    let Some(heads) = rope_heads else {
        return row;
    };
    let head_dim = rows / heads as usize;
    let (head, within) = (row / head_dim, row % head_dim);
    head * head_dim + (within % 2) * (head_dim / 2) + within / 2
}

/// One tensor's bytes in its GGUF type.
fn convert(files: &MmapedSafetensors, p: &Planned) -> Result<Vec<u8>, EngineError> {
    let rows = p.shape[0] as usize;
    let cols = p.shape.get(1).map_or(1, |&c| c as usize);
    let mut out = Vec::with_capacity(p.bytes() as usize);
    match &p.source {
        Source::Float { name, dtype } => {
            let values = floats(raw(files, name)?, dtype);
            for row in 0..rows {
                let src = source_row(row, p.rope_heads, rows) * cols;
                for v in &values[src..src + cols] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        Source::Quantized {
            module,
            affine,
            scale_dtype,
            bias_dtype,
            q4_1,
        } => {
            let packed = raw(files, &format!("{module}.weight"))?;
            let scales = floats(raw(files, &format!("{module}.scales"))?, scale_dtype);
            let biases = floats(raw(files, &format!("{module}.biases"))?, bias_dtype);
            let row_bytes = cols * affine.bits as usize / 8;
            let group = affine.group_size as usize;
            let groups = cols / group;
            for row in 0..rows {
                let src = source_row(row, p.rope_heads, rows);
                let words = &packed[src * row_bytes..(src + 1) * row_bytes];
                let (s, b) = (
                    &scales[src * groups..(src + 1) * groups],
                    &biases[src * groups..(src + 1) * groups],
                );
                if *q4_1 {
                    q4_1_row(words, s, b, group, &mut out);
                } else {
                    for i in 0..cols {
                        let g = i / group;
                        let x = s[g] * unpack(words, affine.bits, i) as f32 + b[g];
                        out.extend_from_slice(&x.to_le_bytes());
                    }
                }
            }
        }
    }
    Ok(out)
}

/// A row of 4-bit MLX groups as ggml Q4_1 blocks: the same `d * q + m`, with the
/// group's scale and bias as each of its blocks' `d` and `m` (exact in f16, see
/// `exact_in_f16`).
fn q4_1_row(words: &[u8], scales: &[f32], biases: &[f32], group: usize, out: &mut Vec<u8>) {
    let cols = words.len() * 2;
    for block in 0..cols / Q4_1_BLOCK as usize {
        let first = block * Q4_1_BLOCK as usize;
        let g = first / group;
        out.extend_from_slice(&f16::from_f32(scales[g]).to_le_bytes());
        out.extend_from_slice(&f16::from_f32(biases[g]).to_le_bytes());
        for j in 0..16 {
            let lo = unpack(words, 4, first + j);
            let hi = unpack(words, 4, first + j + 16);
            out.push((lo | hi << 4) as u8);
        }
    }
}

// Q4_1's layout is ggml's; this module writes it byte by byte.
const _: () = assert!(std::mem::size_of::<k_quants::BlockQ4_1>() == Q4_1_BYTES as usize);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// MLX's packing: values as a little-endian bit stream along the row.
    fn pack(values: &[u32], bits: u32) -> Vec<u8> {
        let mut out = vec![0u8; (values.len() * bits as usize).div_ceil(8)];
        for (i, &v) in values.iter().enumerate() {
            for b in 0..bits as usize {
                if v >> b & 1 == 1 {
                    let bit = i * bits as usize + b;
                    out[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        out
    }

    #[test]
    fn every_width_mlx_packs_unpacks_to_its_values() {
        for bits in BITS {
            let values: Vec<u32> = (0..64u32).map(|i| (i * 7 + 3) % (1 << bits)).collect();
            let packed = pack(&values, bits);
            let back: Vec<u32> = (0..values.len())
                .map(|i| unpack(&packed, bits, i))
                .collect();
            assert_eq!(back, values, "{bits} bits");
        }
        // Four bits: eight values to a little-endian word, the first in the low nibble.
        let word = 0x7654_3210u32.to_le_bytes();
        assert_eq!(
            (0..8).map(|i| unpack(&word, 4, i)).collect::<Vec<_>>(),
            [0, 1, 2, 3, 4, 5, 6, 7]
        );
    }

    #[test]
    fn rotary_rows_are_interleaved_the_way_llama_cpp_permutes_them() {
        // llama.cpp's converter: reshape(heads, 2, head_dim / 2, ...).swapaxes(1, 2).
        let (heads, head_dim) = (3usize, 8usize);
        let rows = heads * head_dim;
        let mut expected = Vec::new();
        for h in 0..heads {
            for i in 0..head_dim / 2 {
                for half in 0..2 {
                    expected.push(h * head_dim + half * (head_dim / 2) + i);
                }
            }
        }
        let got: Vec<usize> = (0..rows)
            .map(|r| source_row(r, Some(heads as u64), rows))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(source_row(5, None, rows), 5);
    }

    #[test]
    fn four_bit_groups_become_q4_1_blocks_with_the_same_values() {
        let cols = 128;
        let group = 64;
        let values: Vec<u32> = (0..cols as u32).map(|i| (i * 5 + 1) % 16).collect();
        let words = pack(&values, 4);
        let scales = [0.015625f32, -0.5];
        let biases = [-0.25f32, 1.0];
        let mut bytes = Vec::new();
        q4_1_row(&words, &scales, &biases, group, &mut bytes);
        assert_eq!(bytes.len(), cols / 32 * Q4_1_BYTES as usize);
        let tensor = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q4_1,
            &bytes,
            vec![1, cols],
            &Device::Cpu,
        )
        .unwrap();
        let got = tensor
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (i, (g, q)) in got.iter().zip(&values).enumerate() {
            let want = scales[i / group] * *q as f32 + biases[i / group];
            assert_eq!(*g, want, "weight {i}");
        }
    }
}
