//! A TFLite decoder with its KV cache as signature inputs and outputs, stepped through
//! LiteRT as a [`Forward`].
//!
//! The convention (the one ai-edge-torch's generative exports follow, and the one
//! `scripts/derive-models.py` writes):
//! - signatures `decode` (one token) and, optionally, prefill signatures of fixed
//!   blocks: `prefill`, or several named `prefill_N` (ai-edge-torch exports one per
//!   block size); a prompt takes the smallest block that holds it;
//! - inputs `tokens` `[1, S]` int32, `input_pos` `[S]` int32, and per layer
//!   `kv_cache_k_N` and `kv_cache_v_N` `[1, C, kv_heads, head_dim]` float32;
//! - outputs `logits` `[1, S, vocab]` and the updated caches, named `kv_cache_k_N_out`
//!   (or `kv_cache_k_N`, as ai-edge-torch names them);
//! - query `i` attends to cache slots up to `input_pos[i]`, and a step writes its keys
//!   and values at `input_pos[0]..`.
//!
//! Each layer's cache lives in one buffer this engine owns, bound as both the input
//! and the output of every step (as LiteRT-LM binds them), so the graph's update of a
//! few slots is the only write and nothing is copied between steps. A prompt shorter than the prefill signature is padded: the
//! padding's keys land in slots past the sequence, which no real query attends to and
//! the next step overwrites.

use modeld_engine_core::EngineError;
use modeld_engine_core::generation::Forward;

use crate::library::{CompiledModel, Element, HostBuffer};
use modeld_engine_core::tflite::{ElementType, SignatureInfo, TensorInfo, TfliteModel};

/// The decoder's dimensions, read from its signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderShape {
    pub layers: usize,
    /// Cache slots: the longest sequence the graph holds.
    pub context: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    /// Tokens of the largest prefill signature; 1 without one.
    pub prefill: usize,
}

pub const DECODE: &str = "decode";
pub const PREFILL: &str = "prefill";

fn is_prefill(key: &str) -> bool {
    key == PREFILL || key.strip_prefix("prefill_").is_some_and(|n| !n.is_empty())
}

/// The prefill signatures (key, tokens), smallest block first. Read from a file
/// [`shape_of`] accepted.
pub fn prefill_signatures(model: &TfliteModel) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = model
        .signatures
        .iter()
        .filter(|s| is_prefill(&s.key))
        .filter_map(|s| Some((s.key.clone(), *s.input("tokens")?.shape.get(1)? as usize)))
        .collect();
    out.sort_by_key(|(_, tokens)| *tokens);
    out
}

/// Reads the decoder's shape from a checked file, refusing anything off the convention
/// with what it lacks.
pub fn shape_of(model: &TfliteModel) -> Result<DecoderShape, EngineError> {
    let convention = "modeld runs TFLite decoders with a `decode` signature (and optionally \
                      `prefill` or `prefill_N`) taking tokens, input_pos and kv_cache_k_N / \
                      kv_cache_v_N";
    let decode = model.signature(DECODE).ok_or_else(|| {
        let keys: Vec<&str> = model.signatures.iter().map(|s| s.key.as_str()).collect();
        EngineError::InvalidModel(format!(
            "no `decode` signature (it has {keys:?}): {convention}"
        ))
    })?;
    let shape = signature_shape(decode, None)?;
    if shape.prefill != 1 {
        return Err(EngineError::InvalidModel(format!(
            "the `decode` signature takes {} tokens, not 1",
            shape.prefill
        )));
    }
    let mut largest = shape;
    for prefill in model.signatures.iter().filter(|s| is_prefill(&s.key)) {
        let block = signature_shape(prefill, Some(&shape))?;
        if block.prefill > largest.prefill {
            largest = block;
        }
    }
    Ok(largest)
}

fn signature_shape(
    sig: &SignatureInfo,
    like: Option<&DecoderShape>,
) -> Result<DecoderShape, EngineError> {
    let bad = |what: String| EngineError::InvalidModel(format!("signature {:?}: {what}", sig.key));
    let input = |name: &str| {
        sig.input(name)
            .ok_or_else(|| bad(format!("no input `{name}`")))
    };
    let typed = |t: &TensorInfo, want: ElementType, rank: usize| {
        if t.element_type != want || t.shape.len() != rank {
            Err(bad(format!(
                "`{}` is {} {:?}, not a rank-{rank} {} tensor",
                t.name,
                t.element_type.as_str(),
                t.shape,
                want.as_str()
            )))
        } else {
            Ok(())
        }
    };
    let tokens = input("tokens")?;
    typed(tokens, ElementType::Int32, 2)?;
    let steps = tokens.shape[1] as usize;
    if tokens.shape[0] != 1 || steps == 0 {
        return Err(bad(format!("`tokens` is {:?}, not [1, S]", tokens.shape)));
    }
    let positions = input("input_pos")?;
    typed(positions, ElementType::Int32, 1)?;
    if positions.shape[0] as usize != steps {
        return Err(bad(format!(
            "`input_pos` is {:?} for {steps} tokens",
            positions.shape
        )));
    }
    let logits = sig
        .output("logits")
        .ok_or_else(|| bad("no output `logits`".into()))?;
    typed(logits, ElementType::Float32, 3)?;
    if logits.shape[0] != 1 || logits.shape[1] as usize != steps || logits.shape[2] <= 0 {
        return Err(bad(format!(
            "`logits` is {:?}, not [1, {steps}, vocab]",
            logits.shape
        )));
    }
    let layers = (0..)
        .take_while(|n| sig.input(&format!("kv_cache_k_{n}")).is_some())
        .count();
    if layers == 0 {
        return Err(bad(
            "no `kv_cache_k_0` input: a decoder without a KV cache".into()
        ));
    }
    let first = input("kv_cache_k_0")?;
    typed(first, ElementType::Float32, 4)?;
    let cache_shape = first.shape.clone();
    if cache_shape[0] != 1 || cache_shape.iter().any(|d| *d <= 0) {
        return Err(bad(format!(
            "`kv_cache_k_0` is {cache_shape:?}, not [1, context, kv_heads, head_dim]"
        )));
    }
    for n in 0..layers {
        for kind in ["k", "v"] {
            let name = format!("kv_cache_{kind}_{n}");
            let t = input(&name)?;
            if t.shape != cache_shape || t.element_type != ElementType::Float32 {
                return Err(bad(format!(
                    "`{name}` is {} {:?}, unlike kv_cache_k_0's float32 {cache_shape:?}",
                    t.element_type.as_str(),
                    t.shape
                )));
            }
            let out = output_for(sig, &name)
                .ok_or_else(|| bad(format!("no output `{name}_out` for the updated cache")))?;
            if out.shape != cache_shape || out.element_type != ElementType::Float32 {
                return Err(bad(format!(
                    "`{}` is {:?}, unlike its input's {cache_shape:?}",
                    out.name, out.shape
                )));
            }
        }
    }
    let expected_inputs = 2 + 2 * layers;
    if sig.inputs.len() != expected_inputs || sig.outputs.len() != 1 + 2 * layers {
        let names: Vec<&str> = sig.inputs.iter().map(|t| t.name.as_str()).collect();
        return Err(bad(format!(
            "{} inputs and {} outputs, where {layers} layers take {expected_inputs} and give {} \
             (inputs: {names:?})",
            sig.inputs.len(),
            sig.outputs.len(),
            1 + 2 * layers
        )));
    }
    let shape = DecoderShape {
        layers,
        context: cache_shape[1] as usize,
        kv_heads: cache_shape[2] as usize,
        head_dim: cache_shape[3] as usize,
        vocab: logits.shape[2] as usize,
        prefill: steps,
    };
    if steps > shape.context {
        return Err(bad(format!(
            "{steps} tokens a step, more than the {}-slot cache",
            shape.context
        )));
    }
    if let Some(like) = like {
        let same = DecoderShape {
            prefill: like.prefill,
            ..shape
        };
        if same != *like {
            return Err(bad(format!(
                "its cache or vocabulary ({shape:?}) differs from `decode`'s ({like:?})"
            )));
        }
    }
    Ok(shape)
}

/// The output that carries `input`'s update: `<input>_out`, else the same name.
fn output_for<'a>(sig: &'a SignatureInfo, input: &str) -> Option<&'a TensorInfo> {
    sig.output(&format!("{input}_out"))
        .or_else(|| sig.output(input))
}

/// What a signature position binds.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Tokens,
    Positions,
    Logits,
    /// Index into a cache set: layer N's keys at 2N, values at 2N + 1.
    Cache(usize),
}

fn slot_of(name: &str, output: bool) -> Option<Slot> {
    match name {
        "tokens" if !output => return Some(Slot::Tokens),
        "input_pos" if !output => return Some(Slot::Positions),
        "logits" if output => return Some(Slot::Logits),
        _ => {}
    }
    let name = if output {
        name.strip_suffix("_out").unwrap_or(name)
    } else {
        name
    };
    let (kind, layer) = name.strip_prefix("kv_cache_")?.split_once('_')?;
    let layer: usize = layer.parse().ok()?;
    match kind {
        "k" => Some(Slot::Cache(2 * layer)),
        "v" => Some(Slot::Cache(2 * layer + 1)),
        _ => None,
    }
}

/// One signature with its own token, position and logits buffers.
#[derive(Debug)]
struct Step {
    /// LiteRT's index of the signature.
    index: usize,
    tokens: usize,
    token_ids: HostBuffer,
    positions: HostBuffer,
    logits: HostBuffer,
    inputs: Vec<Slot>,
    outputs: Vec<Slot>,
}

#[derive(Debug)]
pub struct LiteRtDecoder {
    model: CompiledModel,
    decode: Step,
    /// Prefill signatures, smallest block first.
    prefills: Vec<Step>,
    /// The caches, each bound as both the input and the output of its layer.
    caches: Vec<HostBuffer>,
    cached: usize,
    shape: DecoderShape,
}

impl LiteRtDecoder {
    /// `prefills` are the file's prefill signatures (key, tokens), as
    /// [`prefill_signatures`] reads them.
    pub fn new(
        model: CompiledModel,
        shape: DecoderShape,
        prefills: &[(String, usize)],
    ) -> Result<LiteRtDecoder, EngineError> {
        let lib = model.library().clone();
        let cache_shape = [
            1,
            shape.context as i32,
            shape.kv_heads as i32,
            shape.head_dim as i32,
        ];
        let caches = (0..2 * shape.layers)
            .map(|_| HostBuffer::new(&lib, Element::Float32, &cache_shape))
            .collect::<Result<Vec<_>, _>>()?;
        let step = |key: &str, tokens: usize| -> Result<Option<Step>, EngineError> {
            let Some(index) = model.signatures.iter().position(|s| s.key == key) else {
                return Ok(None);
            };
            let sig = &model.signatures[index];
            let slots = |names: &[String], output: bool| {
                names
                    .iter()
                    .map(|n| {
                        slot_of(n, output)
                            .filter(|s| !matches!(s, Slot::Cache(i) if *i >= 2 * shape.layers))
                            .ok_or_else(|| {
                                EngineError::Load(format!(
                                    "LiteRT lists {} `{n}` in signature {key:?}, which the \
                                     checked file does not have",
                                    if output { "output" } else { "input" }
                                ))
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()
            };
            Ok(Some(Step {
                index,
                tokens,
                token_ids: HostBuffer::new(&lib, Element::Int32, &[1, tokens as i32])?,
                positions: HostBuffer::new(&lib, Element::Int32, &[tokens as i32])?,
                logits: HostBuffer::new(
                    &lib,
                    Element::Float32,
                    &[1, tokens as i32, shape.vocab as i32],
                )?,
                inputs: slots(&sig.inputs, false)?,
                outputs: slots(&sig.outputs, true)?,
            }))
        };
        let decode = step(DECODE, 1)?.ok_or_else(|| {
            EngineError::Load("LiteRT does not list the `decode` signature".into())
        })?;
        let mut blocks = Vec::with_capacity(prefills.len());
        for (key, tokens) in prefills {
            blocks.push(step(key, *tokens)?.ok_or_else(|| {
                EngineError::Load(format!("LiteRT does not list the {key:?} signature"))
            })?);
        }
        Ok(LiteRtDecoder {
            model,
            decode,
            prefills: blocks,
            caches,
            cached: 0,
            shape,
        })
    }

    /// Runs one signature over `tokens` (at most its length) at the cache's end and
    /// returns the logits of the last of them.
    fn step(
        &mut self,
        prefill: Option<usize>,
        tokens: &[u32],
        want_logits: bool,
    ) -> Result<Option<Vec<f32>>, EngineError> {
        let LiteRtDecoder {
            model,
            decode,
            prefills,
            caches,
            cached,
            shape,
        } = self;
        let step = match prefill.and_then(|i| prefills.get_mut(i)) {
            Some(p) => p,
            None => decode,
        };
        let take = tokens.len().min(step.tokens);
        let ids = step.token_ids.i32s_mut();
        for (i, slot) in ids.iter_mut().enumerate() {
            // Padding repeats the last token; its keys land past the sequence.
            let t = tokens.get(i).or(tokens.last()).copied().unwrap_or(0);
            *slot = i32::try_from(t)
                .ok()
                .filter(|t| (*t as usize) < shape.vocab)
                .ok_or_else(|| {
                    EngineError::InvalidRequest(format!(
                        "token {t} is outside the {}-token vocabulary",
                        shape.vocab
                    ))
                })?;
        }
        for (i, p) in step.positions.i32s_mut().iter_mut().enumerate() {
            *p = (*cached + i) as i32;
        }
        let bind = |slots: &[Slot], output: bool| {
            slots
                .iter()
                .map(|slot| match slot {
                    Slot::Tokens if !output => Some(&step.token_ids),
                    Slot::Positions if !output => Some(&step.positions),
                    Slot::Logits if output => Some(&step.logits),
                    Slot::Cache(i) => caches.get(*i),
                    _ => None,
                })
                .collect::<Option<Vec<&HostBuffer>>>()
                .ok_or_else(|| EngineError::Inference("a tensor bound to no buffer".into()))
        };
        let inputs = bind(&step.inputs, false)?;
        let outputs = bind(&step.outputs, true)?;
        model.run(step.index, &inputs, &outputs)?;
        *cached += take;
        if !want_logits {
            return Ok(None);
        }
        let vocab = shape.vocab;
        Ok(Some(
            step.logits.f32s()[(take - 1) * vocab..take * vocab].to_vec(),
        ))
    }
}

impl LiteRtDecoder {
    /// The prefill block for `remaining` prompt tokens: the smallest that holds them
    /// all, else the largest. A block writes all its slots, so only blocks that fit
    /// the cache's free slots qualify (LiteRT would shift one that does not).
    fn block_for(&self, remaining: usize) -> Option<usize> {
        let free = self.shape.context - self.cached;
        let fitting = self
            .prefills
            .iter()
            .enumerate()
            .filter(|(_, p)| p.tokens > 1 && p.tokens <= free);
        let mut largest = None;
        for (i, p) in fitting {
            if p.tokens >= remaining {
                return Some(i);
            }
            largest = Some(i);
        }
        largest
    }
}

impl Forward for LiteRtDecoder {
    fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::Inference("a step of no tokens".into()));
        }
        let total = self.cached + tokens.len();
        if total > self.shape.context {
            return Err(EngineError::ContextOverflow {
                prompt: total,
                context: self.shape.context as u32,
            });
        }
        let mut rest = tokens;
        loop {
            let prefill = if rest.len() > 1 {
                self.block_for(rest.len())
            } else {
                None
            };
            let take = prefill
                .and_then(|i| self.prefills.get(i))
                .map_or(1, |p| rest.len().min(p.tokens));
            let last = take == rest.len();
            let logits = self.step(prefill, &rest[..take], last)?;
            rest = &rest[take..];
            if let Some(logits) = logits {
                return Ok(logits);
            }
        }
    }

    fn cached(&self) -> usize {
        self.cached
    }

    /// The graph masks every slot past a query's position, so cutting the cache is
    /// forgetting its length; the next step overwrites what lies beyond.
    fn truncate(&mut self, len: usize) -> usize {
        self.cached = self.cached.min(len);
        self.cached
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, shape: &[i32], element_type: ElementType) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            element_type,
        }
    }

    /// A decoder signature of `steps` tokens over `layers` layers of a 16-slot cache.
    fn signature(key: &str, steps: i32, layers: usize, out_suffix: &str) -> SignatureInfo {
        let cache = [1, 16, 2, 4];
        let mut inputs = vec![
            tensor("tokens", &[1, steps], ElementType::Int32),
            tensor("input_pos", &[steps], ElementType::Int32),
        ];
        let mut outputs = vec![tensor("logits", &[1, steps, 10], ElementType::Float32)];
        for n in 0..layers {
            for kind in ["k", "v"] {
                let name = format!("kv_cache_{kind}_{n}");
                inputs.push(tensor(&name, &cache, ElementType::Float32));
                outputs.push(tensor(
                    &format!("{name}{out_suffix}"),
                    &cache,
                    ElementType::Float32,
                ));
            }
        }
        SignatureInfo {
            key: key.into(),
            subgraph: 0,
            inputs,
            outputs,
        }
    }

    fn model(signatures: Vec<SignatureInfo>) -> TfliteModel {
        TfliteModel {
            description: None,
            signatures,
            subgraphs: 1,
            operators: 0,
            constant_elements: 0,
            constant_bytes: 0,
        }
    }

    fn refusal(m: &TfliteModel) -> String {
        match shape_of(m) {
            Err(EngineError::InvalidModel(what)) => what,
            other => panic!("expected InvalidModel, got {other:?}"),
        }
    }

    #[test]
    fn the_shape_is_read_from_the_signatures() {
        let m = model(vec![
            signature(DECODE, 1, 2, "_out"),
            signature(PREFILL, 4, 2, "_out"),
        ]);
        assert_eq!(
            shape_of(&m).unwrap(),
            DecoderShape {
                layers: 2,
                context: 16,
                kv_heads: 2,
                head_dim: 4,
                vocab: 10,
                prefill: 4,
            }
        );
        // ai-edge-torch names the updated caches like the inputs.
        let m = model(vec![signature(DECODE, 1, 2, "")]);
        assert_eq!(shape_of(&m).unwrap().prefill, 1);
    }

    #[test]
    fn several_prefill_blocks_are_read_smallest_first() {
        let m = model(vec![
            signature("prefill_8", 8, 2, ""),
            signature(DECODE, 1, 2, ""),
            signature("prefill_4", 4, 2, ""),
            // Not a prefill signature: its shapes are not read.
            signature("prefiller", 64, 2, ""),
        ]);
        assert_eq!(shape_of(&m).unwrap().prefill, 8);
        assert_eq!(
            prefill_signatures(&m),
            [("prefill_4".to_owned(), 4), ("prefill_8".to_owned(), 8)]
        );
    }

    #[test]
    fn decoders_off_the_convention_are_refused_with_what_they_lack() {
        let m = model(vec![signature("serving_default", 1, 1, "_out")]);
        assert!(refusal(&m).contains("no `decode` signature"));

        let mut sig = signature(DECODE, 1, 2, "_out");
        sig.outputs.retain(|t| t.name != "kv_cache_v_1_out");
        assert!(refusal(&model(vec![sig])).contains("kv_cache_v_1_out"));

        let mut sig = signature(DECODE, 1, 1, "_out");
        sig.inputs[0].element_type = ElementType::Int64;
        assert!(refusal(&model(vec![sig])).contains("int64"));

        let mut prefill = signature(PREFILL, 4, 1, "_out");
        for t in prefill.inputs.iter_mut().chain(prefill.outputs.iter_mut()) {
            if t.name.starts_with("kv_cache") {
                t.shape = vec![1, 32, 2, 4];
            }
        }
        let m = model(vec![signature(DECODE, 1, 1, "_out"), prefill]);
        assert!(refusal(&m).contains("differs from `decode`'s"));

        let m = model(vec![signature(DECODE, 2, 1, "_out")]);
        assert!(refusal(&m).contains("not 1"));

        let m = model(vec![signature(DECODE, 1, 0, "_out")]);
        assert!(refusal(&m).contains("without a KV cache"));
    }

    #[test]
    fn signature_names_map_to_their_buffers() {
        assert!(matches!(slot_of("tokens", false), Some(Slot::Tokens)));
        assert!(matches!(slot_of("logits", true), Some(Slot::Logits)));
        assert!(matches!(
            slot_of("kv_cache_k_3", false),
            Some(Slot::Cache(6))
        ));
        assert!(matches!(
            slot_of("kv_cache_v_3_out", true),
            Some(Slot::Cache(7))
        ));
        assert!(matches!(
            slot_of("kv_cache_v_3", true),
            Some(Slot::Cache(7))
        ));
        assert!(slot_of("kv_cache_q_0", false).is_none());
        assert!(slot_of("logits", false).is_none());
    }
}
