//! One sequence through an ONNX decoder export, with its KV cache kept between steps:
//! each step's `present.N.*` outputs become the next step's `past_key_values.N.*`
//! inputs without leaving ONNX Runtime's memory.

use std::borrow::Cow;

use modeld_engine_core::EngineError;
use modeld_engine_core::generation::Forward;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use crate::config::{DecoderSection, layer_name};

/// The shapes one step ran with, as ONNX Runtime saw them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StepShape {
    /// `input_ids` sequence length.
    pub input_tokens: usize,
    /// `past_key_values.0.key` sequence length.
    pub past_tokens: usize,
    /// `present.0.key` sequence length.
    pub present_tokens: usize,
}

pub struct OnnxDecoder {
    session: Session,
    input_ids: String,
    attention_mask: Option<String>,
    position_ids: Option<String>,
    logits: String,
    /// Per layer: (past key, past value) input names and (present key, present value)
    /// output names.
    past_names: Vec<(String, String)>,
    present_names: Vec<(String, String)>,
    /// Per layer: the cache, keys then values, `[1, kv_heads, cached, head_size]`.
    past: Vec<(DynValue, DynValue)>,
    kv_heads: usize,
    head_size: usize,
    vocab: usize,
    cached: usize,
    steps: u64,
    last_step: StepShape,
}

fn inference(what: &str, e: impl std::fmt::Display) -> EngineError {
    EngineError::Inference(format!("ONNX Runtime {what}: {e}"))
}

impl OnnxDecoder {
    /// Wraps a session, checking that it has the inputs and outputs `decoder` names.
    pub fn new(
        session: Session,
        decoder: &DecoderSection,
        vocab: u32,
    ) -> Result<OnnxDecoder, EngineError> {
        let inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|i| i.name().to_owned())
            .collect();
        let outputs: Vec<String> = session
            .outputs()
            .iter()
            .map(|o| o.name().to_owned())
            .collect();
        let need = |list: &[String], name: &str, kind: &str| {
            if list.iter().any(|n| n == name) {
                Ok(name.to_owned())
            } else {
                Err(EngineError::InvalidModel(format!(
                    "the ONNX graph has no {kind} named {name:?} (it has {})",
                    list.join(", ")
                )))
            }
        };
        let optional = |name: &str| inputs.iter().any(|n| n == name).then(|| name.to_owned());
        let i = &decoder.inputs;
        let o = &decoder.outputs;
        let mut past_names = Vec::new();
        let mut present_names = Vec::new();
        for layer in 0..decoder.num_hidden_layers {
            past_names.push((
                need(&inputs, &layer_name(&i.past_key_names, layer), "input")?,
                need(&inputs, &layer_name(&i.past_value_names, layer), "input")?,
            ));
            present_names.push((
                need(&outputs, &layer_name(&o.present_key_names, layer), "output")?,
                need(
                    &outputs,
                    &layer_name(&o.present_value_names, layer),
                    "output",
                )?,
            ));
        }
        let mut decoder_state = OnnxDecoder {
            input_ids: need(&inputs, &i.input_ids, "input")?,
            attention_mask: optional(&i.attention_mask),
            position_ids: optional(&i.position_ids),
            logits: need(&outputs, &o.logits, "output")?,
            session,
            past_names,
            present_names,
            past: Vec::new(),
            kv_heads: decoder.num_key_value_heads as usize,
            head_size: decoder.head_size as usize,
            vocab: vocab as usize,
            cached: 0,
            steps: 0,
            last_step: StepShape::default(),
        };
        decoder_state.past = decoder_state.empty_cache()?;
        Ok(decoder_state)
    }

    fn empty_cache(&self) -> Result<Vec<(DynValue, DynValue)>, EngineError> {
        let empty = || -> Result<DynValue, EngineError> {
            Tensor::<f32>::from_array(([1usize, self.kv_heads, 0, self.head_size], Vec::new()))
                .map(Tensor::into_dyn)
                .map_err(|e| inference("empty cache", e))
        };
        self.past_names
            .iter()
            .map(|_| Ok((empty()?, empty()?)))
            .collect()
    }

    /// Forward passes run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The shapes of the last forward pass.
    pub fn last_step(&self) -> StepShape {
        self.last_step
    }

    /// The first `keep` positions of one cache tensor `[1, heads, cached, size]`.
    fn cut(&self, value: &DynValue, keep: usize) -> Result<DynValue, EngineError> {
        let (shape, data) = value
            .try_extract_tensor::<f32>()
            .map_err(|e| inference("cache", e))?;
        let dims: Vec<usize> = shape
            .iter()
            .map(|d| usize::try_from(*d).unwrap_or(0))
            .collect();
        let [1, heads, len, size] = dims[..] else {
            return Err(inference("cache", format!("unexpected shape {dims:?}")));
        };
        let keep = keep.min(len);
        let mut out = Vec::with_capacity(heads * keep * size);
        for h in 0..heads {
            let start = h * len * size;
            out.extend_from_slice(&data[start..start + keep * size]);
        }
        Tensor::<f32>::from_array(([1usize, heads, keep, size], out))
            .map(Tensor::into_dyn)
            .map_err(|e| inference("cache", e))
    }
}

impl Forward for OnnxDecoder {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let n = tokens.len();
        let total = self.cached + n;
        let tensor = |shape: [usize; 2], data: Vec<i64>| {
            Tensor::<i64>::from_array((shape, data))
                .map(SessionInputValue::from)
                .map_err(|e| inference("input", e))
        };
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(3 + 2 * self.past.len());
        inputs.push((
            Cow::from(self.input_ids.as_str()),
            tensor([1, n], tokens.iter().map(|t| i64::from(*t)).collect())?,
        ));
        if let Some(name) = &self.attention_mask {
            inputs.push((
                Cow::from(name.as_str()),
                tensor([1, total], vec![1; total])?,
            ));
        }
        if let Some(name) = &self.position_ids {
            let positions = (self.cached..total).map(|p| p as i64).collect();
            inputs.push((Cow::from(name.as_str()), tensor([1, n], positions)?));
        }
        for ((k_name, v_name), (k, v)) in self.past_names.iter().zip(&self.past) {
            inputs.push((Cow::from(k_name.as_str()), SessionInputValue::from(k)));
            inputs.push((Cow::from(v_name.as_str()), SessionInputValue::from(v)));
        }
        let mut outputs = self.session.run(inputs).map_err(|e| inference("run", e))?;
        let logits = {
            let value = outputs
                .get(&self.logits)
                .ok_or_else(|| inference("run", "no logits output"))?;
            let (shape, data) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| inference("logits", e))?;
            let expected = n * self.vocab;
            if data.len() != expected {
                return Err(inference(
                    "logits",
                    format!("shape {shape:?} is not [1, {n}, {}]", self.vocab),
                ));
            }
            data[(n - 1) * self.vocab..].to_vec()
        };
        let mut present = Vec::with_capacity(self.present_names.len());
        for (k_name, v_name) in &self.present_names {
            let k = outputs
                .remove(k_name)
                .ok_or_else(|| inference("run", format!("no output {k_name}")))?;
            let v = outputs
                .remove(v_name)
                .ok_or_else(|| inference("run", format!("no output {v_name}")))?;
            present.push((k, v));
        }
        drop(outputs);
        let present_tokens = present
            .first()
            .and_then(|(k, _)| k.try_extract_tensor::<f32>().ok())
            .and_then(|(shape, _)| shape.get(2).copied())
            .and_then(|d| usize::try_from(d).ok())
            .unwrap_or(0);
        if present_tokens != total {
            return Err(inference(
                "cache",
                format!("the graph returned {present_tokens} cached positions, expected {total}"),
            ));
        }
        self.last_step = StepShape {
            input_tokens: n,
            past_tokens: self.cached,
            present_tokens,
        };
        self.steps += 1;
        self.past = present;
        self.cached = total;
        Ok(logits)
    }

    fn cached(&self) -> usize {
        self.cached
    }

    fn truncate(&mut self, len: usize) -> usize {
        if len >= self.cached {
            return self.cached;
        }
        let cut = if len == 0 {
            self.empty_cache()
        } else {
            self.past
                .iter()
                .map(|(k, v)| Ok((self.cut(k, len)?, self.cut(v, len)?)))
                .collect()
        };
        match cut {
            Ok(past) => {
                self.past = past;
                self.cached = len;
            }
            Err(e) => {
                // An empty cache is always a correct (if slower) answer.
                tracing::warn!(error = %e, "could not cut the ONNX cache; dropping it");
                if let Ok(past) = self.empty_cache() {
                    self.past = past;
                }
                self.cached = 0;
            }
        }
        self.cached
    }
}
