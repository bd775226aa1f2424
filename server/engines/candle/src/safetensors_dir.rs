//! Llama-family models in the Hugging Face layout (MLX shares it): `config.json` and
//! `model.safetensors` (or shards listed by `model.safetensors.index.json`).
//!
//! Everything read from the files is untrusted: the configuration's numbers are held
//! to limits, each safetensors header is parsed by engine-core's checked reader, and
//! every tensor the network needs must be present with the shape the configuration
//! implies, before candle maps a byte.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama::{Cache, Config, Llama, LlamaConfig};
use modeld_engine_core::generation::Forward;
use modeld_engine_core::{EngineError, ModelProbe, safetensors};
use serde::Deserialize;

use crate::interop::{candle_error, logits_of};

const MAX_JSON_BYTES: u64 = 16 << 20;
const MAX_HIDDEN: u64 = 1 << 16;
const MAX_INTERMEDIATE: u64 = 1 << 20;
const MAX_LAYERS: u64 = 1024;
const MAX_HEADS: u64 = 4096;
const MAX_VOCAB: u64 = 1 << 22;
const MAX_POSITIONS: u64 = 1 << 24;
const MAX_SHARDS: usize = 4096;

/// The part of config.json this engine checks before handing it to candle.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) architectures: Vec<String>,
    #[serde(default)]
    pub(crate) model_type: String,
    pub(crate) hidden_size: u64,
    pub(crate) intermediate_size: u64,
    pub(crate) vocab_size: u64,
    pub(crate) num_hidden_layers: u64,
    pub(crate) num_attention_heads: u64,
    #[serde(default)]
    pub(crate) num_key_value_heads: Option<u64>,
    #[serde(default)]
    pub(crate) max_position_embeddings: u64,
    #[serde(default)]
    pub(crate) tie_word_embeddings: Option<bool>,
    #[serde(default)]
    pub(crate) rms_norm_eps: Option<f64>,
    #[serde(default)]
    pub(crate) rope_theta: Option<f64>,
    /// MLX's quantization block; read by `mlx_dir`.
    #[serde(default)]
    pub quantization: Option<serde_json::Value>,
}

/// A checked model directory.
#[derive(Debug, Clone)]
pub struct Checked {
    pub shards: Vec<PathBuf>,
    pub config: LlamaConfig,
    pub probe: ModelProbe,
    pub dtype: DType,
}

pub(crate) fn invalid(path: &Path, m: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidModel(format!("{}: {m}", path.display()))
}

fn read_json(path: &Path) -> Result<serde_json::Value, EngineError> {
    let len = std::fs::metadata(path).map_err(|e| invalid(path, e))?.len();
    if len > MAX_JSON_BYTES {
        return Err(invalid(
            path,
            format!("{len} bytes; the limit is {MAX_JSON_BYTES}"),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| invalid(path, e))?;
    serde_json::from_str(&text).map_err(|e| invalid(path, e))
}

/// The weight files of the directory: the shards an index lists, else
/// `model.safetensors`.
fn shards(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        let single = dir.join("model.safetensors");
        if !single.is_file() {
            return Err(invalid(
                dir,
                "no model.safetensors (or model.safetensors.index.json)",
            ));
        }
        return Ok(vec![single]);
    }
    let v = read_json(&index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid(&index, "no weight_map object"))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for name in map.values() {
        let name = name
            .as_str()
            .ok_or_else(|| invalid(&index, "weight_map values must be file names"))?;
        let rel = Path::new(name);
        if name.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            return Err(invalid(
                &index,
                format!("shard {name:?} is not a file inside the model's directory"),
            ));
        }
        let path = dir.join(rel);
        if !files.contains(&path) {
            if files.len() >= MAX_SHARDS {
                return Err(invalid(&index, format!("more than {MAX_SHARDS} shards")));
            }
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(invalid(&index, "the weight_map is empty"));
    }
    Ok(files)
}

/// A model directory whose configuration passed its limits and whose safetensors
/// headers passed engine-core's checked reader; nothing is mapped yet.
pub(crate) struct Layout {
    pub config_path: PathBuf,
    pub value: serde_json::Value,
    pub raw: RawConfig,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub shards: Vec<PathBuf>,
    pub tensors: BTreeMap<String, safetensors::TensorInfo>,
    pub file_bytes: u64,
}

pub(crate) fn read_layout(dir: &Path) -> Result<Layout, EngineError> {
    let config_path = dir.join("config.json");
    let value = read_json(&config_path)?;
    let raw: RawConfig =
        serde_json::from_value(value.clone()).map_err(|e| invalid(&config_path, e))?;
    let is_llama =
        raw.model_type == "llama" || raw.architectures.iter().any(|a| a == "LlamaForCausalLM");
    if !is_llama {
        return Err(EngineError::InvalidModel(format!(
            "{}: candle runs llama-family models here; this one is {:?} ({})",
            config_path.display(),
            raw.model_type,
            raw.architectures.join(", ")
        )));
    }
    let kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
    let within = |what: &str, v: u64, max: u64| {
        if v == 0 || v > max {
            Err(invalid(
                &config_path,
                format!("{what} = {v} is outside 1..={max}"),
            ))
        } else {
            Ok(())
        }
    };
    within("hidden_size", raw.hidden_size, MAX_HIDDEN)?;
    within("intermediate_size", raw.intermediate_size, MAX_INTERMEDIATE)?;
    within("vocab_size", raw.vocab_size, MAX_VOCAB)?;
    within("num_hidden_layers", raw.num_hidden_layers, MAX_LAYERS)?;
    within("num_attention_heads", raw.num_attention_heads, MAX_HEADS)?;
    within("num_key_value_heads", kv_heads, MAX_HEADS)?;
    within(
        "max_position_embeddings",
        raw.max_position_embeddings,
        MAX_POSITIONS,
    )?;
    if !raw.hidden_size.is_multiple_of(raw.num_attention_heads)
        || !raw.num_attention_heads.is_multiple_of(kv_heads)
        || !(raw.hidden_size / raw.num_attention_heads).is_multiple_of(2)
    {
        return Err(invalid(
            &config_path,
            format!(
                "hidden_size {} / {} heads / {kv_heads} key-value heads do not divide into even head sizes",
                raw.hidden_size, raw.num_attention_heads
            ),
        ));
    }
    for (what, v) in [
        ("rms_norm_eps", raw.rms_norm_eps),
        ("rope_theta", raw.rope_theta),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0)
        {
            return Err(invalid(
                &config_path,
                format!("{what} = {v} must be a positive number"),
            ));
        }
    }

    let shards = shards(dir)?;
    let mut tensors: BTreeMap<String, safetensors::TensorInfo> = BTreeMap::new();
    let mut file_bytes = 0u64;
    for shard in &shards {
        let file = std::fs::File::open(shard).map_err(|e| invalid(shard, e))?;
        let size = file.metadata().map_err(|e| invalid(shard, e))?.len();
        let header = safetensors::read_header(std::io::BufReader::new(file), size)
            .map_err(|e| invalid(shard, e))?;
        file_bytes = file_bytes.saturating_add(size);
        tensors.extend(header.tensors);
    }
    let head_dim = raw.hidden_size / raw.num_attention_heads;
    Ok(Layout {
        config_path,
        value,
        raw,
        kv_heads,
        head_dim,
        shards,
        tensors,
        file_bytes,
    })
}

impl Layout {
    /// Every tensor a llama of this configuration needs, with its logical shape
    /// (`[out, in]` for a projection, `[n]` for a norm).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<u64>)> {
        let raw = &self.raw;
        let h = raw.hidden_size;
        let q = raw.num_attention_heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        let inter = raw.intermediate_size;
        let vocab = raw.vocab_size;
        let mut expected: Vec<(String, Vec<u64>)> = vec![
            ("model.embed_tokens.weight".into(), vec![vocab, h]),
            ("model.norm.weight".into(), vec![h]),
        ];
        if !raw.tie_word_embeddings.unwrap_or(false) {
            expected.push(("lm_head.weight".into(), vec![vocab, h]));
        }
        for i in 0..raw.num_hidden_layers {
            let p = format!("model.layers.{i}");
            expected.extend([
                (format!("{p}.input_layernorm.weight"), vec![h]),
                (format!("{p}.post_attention_layernorm.weight"), vec![h]),
                (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
                (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
                (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
                (format!("{p}.mlp.gate_proj.weight"), vec![inter, h]),
                (format!("{p}.mlp.up_proj.weight"), vec![inter, h]),
                (format!("{p}.mlp.down_proj.weight"), vec![h, inter]),
            ]);
        }
        expected
    }

    /// The float tensor `name` (F32, F16 or BF16) with the `shape` the configuration
    /// implies; `otherwise` ends the message for a tensor of another dtype.
    pub fn float_tensor(
        &self,
        dir: &Path,
        name: &str,
        shape: &[u64],
        otherwise: &str,
    ) -> Result<&safetensors::TensorInfo, EngineError> {
        let t = self.tensor(dir, name)?;
        if t.shape != shape {
            return Err(invalid(
                dir,
                format!(
                    "tensor {name} has shape {:?}; the config implies {shape:?}",
                    t.shape
                ),
            ));
        }
        if !matches!(t.dtype.as_str(), "F32" | "F16" | "BF16") {
            return Err(invalid(
                dir,
                format!("tensor {name} is {}; {otherwise}", t.dtype),
            ));
        }
        Ok(t)
    }

    /// The tensor `name`, which must exist.
    pub fn tensor(&self, dir: &Path, name: &str) -> Result<&safetensors::TensorInfo, EngineError> {
        self.tensors
            .get(name)
            .ok_or_else(|| invalid(dir, format!("tensor {name} is missing")))
    }

    /// What every runtime reports of a llama: the parts of the probe that depend on
    /// the configuration only.
    pub fn probe(
        &self,
        parameter_count: u64,
        weights_bytes: u64,
        quantization: Option<String>,
    ) -> ModelProbe {
        let raw = &self.raw;
        ModelProbe {
            architecture: "llama".into(),
            parameter_count,
            weights_bytes,
            context_length: u32::try_from(raw.max_position_embeddings).unwrap_or(u32::MAX),
            vocab_size: u32::try_from(raw.vocab_size).unwrap_or(u32::MAX),
            layers: u32::try_from(raw.num_hidden_layers).unwrap_or(u32::MAX),
            kv_heads: u32::try_from(self.kv_heads).unwrap_or(u32::MAX),
            head_dim: u32::try_from(self.head_dim).unwrap_or(u32::MAX),
            embedding_length: u32::try_from(raw.hidden_size).unwrap_or(u32::MAX),
            quantization,
        }
    }
}

pub fn check(dir: &Path) -> Result<Checked, EngineError> {
    let layout = read_layout(dir)?;
    if layout.raw.quantization.is_some() {
        return Err(invalid(
            &layout.config_path,
            "the weights are quantized (an MLX model); load it as MLX",
        ));
    }
    let mut parameters = 0u64;
    let mut dtypes = std::collections::BTreeSet::new();
    for (name, shape) in layout.expected_tensors() {
        let t = layout.float_tensor(
            dir,
            &name,
            &shape,
            "candle here runs F32, F16 and BF16 weights",
        )?;
        parameters = parameters.saturating_add(shape.iter().product());
        dtypes.insert(t.dtype.clone());
    }

    let config: LlamaConfig = serde_json::from_value(layout.value.clone())
        .map_err(|e| invalid(&layout.config_path, e))?;
    let quantization = dtypes.iter().next().cloned();
    // candle's CPU kernels are fastest in F32; half-precision weights are widened.
    let weights_bytes = parameters.saturating_mul(4).max(layout.file_bytes);
    Ok(Checked {
        probe: layout.probe(parameters, weights_bytes, quantization),
        shards: layout.shards,
        config,
        dtype: DType::F32,
    })
}

/// A loaded llama over candle with its KV cache.
pub struct LlamaForward {
    model: Llama,
    config: Config,
    cache: Cache,
    dtype: DType,
    device: Device,
    cached: usize,
    pool: rayon::ThreadPool,
}

impl LlamaForward {
    pub fn load(
        checked: &Checked,
        context_length: u32,
        pool: rayon::ThreadPool,
    ) -> Result<LlamaForward, EngineError> {
        let device = Device::Cpu;
        let mut config = checked.config.clone().into_config(false);
        // The rotary tables are sized by this: only as long as the context we serve.
        config.max_position_embeddings = context_length as usize;
        let vb = map_weights(&checked.shards, checked.dtype, &device)?;
        let model = pool
            .install(|| Llama::load(vb, &config))
            .map_err(|e| candle_error("load", e))?;
        let cache = Cache::new(true, checked.dtype, &config, &device)
            .map_err(|e| candle_error("cache", e))?;
        Ok(LlamaForward {
            model,
            config,
            cache,
            dtype: checked.dtype,
            device,
            cached: 0,
            pool,
        })
    }
}

/// Maps the shards rather than reading them: the weights are paged in from the file
/// and never held twice, which matters on a device with little memory.
#[allow(unsafe_code)]
fn map_weights(
    shards: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, EngineError> {
    // SAFETY: a mapping is undefined behaviour only if the file changes while mapped.
    // Model files are the store's immutable, content-addressed blobs (or files a scan
    // registered, which the operator must not rewrite in place); their headers were
    // checked by `check` before this point.
    let tensors = unsafe { candle_core::safetensors::MmapedSafetensors::multi(shards) }
        .map_err(|e| candle_error("weights", e))?;
    Ok(VarBuilder::from_backend(
        Box::new(tensors),
        dtype,
        device.clone(),
    ))
}

impl Forward for LlamaForward {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let (model, cache, device, index) =
            (&self.model, &mut self.cache, &self.device, self.cached);
        let logits = self
            .pool
            .install(|| {
                let input = Tensor::new(tokens, device)?.unsqueeze(0)?;
                logits_of(model.forward(&input, index, cache)?)
            })
            .map_err(|e| candle_error("forward", e))?;
        self.cached += tokens.len();
        Ok(logits)
    }

    fn cached(&self) -> usize {
        self.cached
    }

    fn truncate(&mut self, len: usize) -> usize {
        if len >= self.cached {
            return self.cached;
        }
        // candle's llama cache cannot be cut, only replaced.
        match Cache::new(true, self.dtype, &self.config, &self.device) {
            Ok(cache) => {
                self.cache = cache;
                self.cached = 0;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the candle cache"),
        }
        self.cached
    }
}
